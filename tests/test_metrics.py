"""PSNR, MS-SSIM, NIQE on real frames; LPIPS/FID loading (absent and synthetic weights)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim as library_ms_ssim

from pipeline import metrics
from pipeline.metrics import (
    LPIPS_BACKBONES,
    PSNR_CAP_DB,
    FIDInception,
    NIQEModel,
    Unavailable,
    cap_psnr,
    fit_niqe_model,
    frechet_distance,
    load_fid_inception,
    load_lpips,
    ms_ssim,
    ms_ssim_levels,
    niqe,
    psnr,
)


def _frames(root: Path, count: int, size: tuple[int, int]) -> list[np.ndarray]:
    paths = sorted((root / "leftImg8bit").rglob("*_leftImg8bit.png"))[:count]
    return [
        cv2.cvtColor(cv2.resize(cv2.imread(str(p)), size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        for p in paths
    ]


def _noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def test_psnr_identical_is_inf_and_capped(sample_image: np.ndarray) -> None:
    assert psnr(sample_image, sample_image.copy()) == math.inf
    assert cap_psnr(psnr(sample_image, sample_image)) == PSNR_CAP_DB
    assert cap_psnr(35.5) == 35.5


@pytest.mark.parametrize("k", [1, 3, 10])
def test_psnr_of_known_mse(k: int) -> None:
    rng = np.random.default_rng(k)
    a = rng.integers(k, 256 - k, size=(64, 96, 3)).astype(np.uint8)
    signs = rng.choice([-1, 1], size=a.shape)
    b = (a.astype(np.int16) + signs * k).astype(np.uint8)  # |a - b| == k everywhere: MSE = k^2
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / k**2), abs=1e-12)
    assert psnr(b, a) == pytest.approx(psnr(a, b))


def test_psnr_accepts_tensors_and_rejects_bad_input(sample_image: np.ndarray) -> None:
    noisy = _noisy(sample_image, 8)
    chw = torch.from_numpy(noisy).permute(2, 0, 1)
    assert psnr(torch.from_numpy(sample_image), chw) == pytest.approx(psnr(sample_image, noisy))
    with pytest.raises(ValueError, match="uint8"):
        psnr(sample_image.astype(np.float32), sample_image)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(sample_image, sample_image[:64])
    with pytest.raises(ValueError, match="H x W x 3"):
        psnr(sample_image[..., 0], sample_image[..., 0])


def test_ms_ssim_levels_rule() -> None:
    assert ms_ssim_levels(161, 300) == 5
    assert ms_ssim_levels(160, 300) == 4
    assert ms_ssim_levels(128, 256) == 4
    assert ms_ssim_levels(40, 40) == 2
    assert ms_ssim_levels(12, 12) == 1
    with pytest.raises(ValueError, match="MS-SSIM needs"):
        ms_ssim_levels(10, 200)


def test_ms_ssim_identical_is_one_and_falls_with_noise(sample_image: np.ndarray) -> None:
    assert ms_ssim(sample_image, sample_image) == pytest.approx(1.0, abs=1e-9)
    values = [ms_ssim(sample_image, _noisy(sample_image, s)) for s in (2, 8, 25)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ms_ssim_loop_matches_library_at_five_scales(cityscapes_root: Path) -> None:
    (image,) = _frames(cityscapes_root, 1, (384, 192))
    other = cv2.GaussianBlur(image, (0, 0), 1.5)
    tx = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    ty = torch.from_numpy(other).permute(2, 0, 1)[None].float()
    expected = float(library_ms_ssim(tx, ty, data_range=255))
    assert metrics._ms_ssim_tensor(tx, ty, metrics.MS_SSIM_WEIGHTS) == pytest.approx(expected, rel=1e-6)
    assert ms_ssim(image, other) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def niqe_setup(cityscapes_root: Path) -> tuple[NIQEModel, list[np.ndarray]]:
    frames = _frames(cityscapes_root, 10, (512, 256))
    return fit_niqe_model(frames[:7], fitted_on="7 sample frames"), frames[7:]


def test_niqe_model_fit(niqe_setup: tuple[NIQEModel, list[np.ndarray]]) -> None:
    model, _ = niqe_setup
    assert model.mu.shape == (36,) and model.cov.shape == (36, 36)
    assert np.allclose(model.cov, model.cov.T)
    assert model.fitted_on == "7 sample frames"
    assert 7 <= model.n_patches <= 70  # sharpness selection keeps some of the 10 patches per frame
    restored = NIQEModel.from_dict(model.to_dict())
    assert np.array_equal(restored.mu, model.mu) and restored.patch_size == 96


def test_niqe_prefers_clean_over_noisy_or_blurred(niqe_setup: tuple[NIQEModel, list[np.ndarray]]) -> None:
    model, held_out = niqe_setup
    for image in held_out:
        clean = niqe(image, model)
        assert math.isfinite(clean)
        assert niqe(_noisy(image, 12), model) > clean
        assert niqe(cv2.GaussianBlur(image, (0, 0), 2.0), model) > clean


def test_niqe_errors(niqe_setup: tuple[NIQEModel, list[np.ndarray]]) -> None:
    model, held_out = niqe_setup
    with pytest.raises(ValueError, match="at least 96x96"):
        niqe(held_out[0][:64], model)
    flat = np.full((128, 256, 3), 90, dtype=np.uint8)
    with pytest.raises(ValueError, match="usable patches"):
        fit_niqe_model([flat])
    assert math.isnan(niqe(flat, model))


def test_lpips_and_fid_unavailable_without_weights(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "alex.pth"
    for result in (load_lpips(str(missing)), load_fid_inception(str(tmp_path / "pt_inception.pth"))):
        assert isinstance(result, Unavailable)
        assert "not found" in result.reason and str(tmp_path) in result.reason
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    assert "unusable" in load_fid_inception(str(garbage)).reason


def test_lpips_loads_local_files_and_measures(tmp_path: Path, sample_image: np.ndarray) -> None:
    """Random (not ImageNet) weights in the torchvision/lpips file layouts: checks loading and the maths'
    basic properties, not published LPIPS values."""
    torch.manual_seed(0)
    reference = metrics.LPIPS("alex")
    torch.save(
        {f"features.{k}": v for k, v in reference.features.state_dict().items()},
        tmp_path / LPIPS_BACKBONES["alex"][0],
    )
    lins = {f"lin{i}.model.1.weight": lin.weight.detach().abs() for i, lin in enumerate(reference.lins)}
    torch.save(lins, tmp_path / "alex.pth")
    model = load_lpips(str(tmp_path / "alex.pth"))
    assert isinstance(model, metrics.LPIPS) and model.net == "alex"
    assert model(sample_image, sample_image) == pytest.approx(0.0, abs=1e-7)
    near, far = model(sample_image, _noisy(sample_image, 4)), model(sample_image, _noisy(sample_image, 40))
    assert 0.0 < near < far
    (tmp_path / LPIPS_BACKBONES["alex"][0]).unlink()
    missing_backbone = load_lpips(str(tmp_path / "alex.pth"))
    assert isinstance(missing_backbone, Unavailable) and "alexnet-owt" in missing_backbone.reason


def test_fid_inception_loads_and_frechet_distance(tmp_path: Path, sample_image: np.ndarray) -> None:
    torch.manual_seed(0)
    weights = tmp_path / metrics.FID_WEIGHTS_FILE
    torch.save({**FIDInception().state_dict(), "fc.weight": torch.zeros(1008, 2048)}, weights)
    model = load_fid_inception(str(weights))
    assert isinstance(model, FIDInception)
    feats = model.features(sample_image)
    assert feats.shape == (2048,) and np.all(np.isfinite(feats))

    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 8))
    shift = np.array([1.0, -2.0, 0, 0, 0.5, 0, 0, 0])
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(real, real + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(real[:1], real)
