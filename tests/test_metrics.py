"""PSNR, MS-SSIM, NIQE on real frames; LPIPS/FID loading (absent and synthetic weights)."""

from __future__ import annotations

import hashlib
import importlib.resources
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim as library_ms_ssim

from pipeline.data.codecs import get_codec
from pipeline.eval import fidelity
from pipeline.eval.fid import FID_WEIGHTS_FILE, FIDInception, frechet_distance, load_fid_inception
from pipeline.eval.fidelity import PSNR_CAP_DB, cap_psnr, ms_ssim, ms_ssim_levels, psnr
from pipeline.eval.lpips import LPIPS, LPIPS_BACKBONES, load_lpips
from pipeline.eval.niqe import (
    NIQE_PUBLISHED_FITTED_ON,
    NIQEModel,
    fit_niqe_model,
    matlab_imresize,
    matlab_rgb2gray,
    niqe,
    published_niqe_model,
)
from pipeline.eval.weights import Unavailable


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
    assert fidelity._ms_ssim_tensor(tx, ty, fidelity.MS_SSIM_WEIGHTS) == pytest.approx(expected, rel=1e-6)
    assert ms_ssim(image, other) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- NIQE

NIQE_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "niqe_reference"
# computequality.m of the NIQE release with its modelparameters.mat, as its MATLAB run prints them
MATLAB_NIQE = {"image1.bmp": 5.0290, "image2.bmp": 17.8659}
# NIQE (published model) of the ten frankfurt frames at 512x256: original, HEVC QP 32, HEVC QP 47, and the
# original blurred with sigma 2; measured with this implementation to pin its features (x265 4.3 via
# pillow-heif 1.8.1 for the HEVC columns, libheif's own picture: ``chroma_upsampling="nearest"``)
FRANKFURT_NIQE = {
    "frankfurt_000000_005898": (3.2365, 3.1257, 6.4789, 7.5896),
    "frankfurt_000000_011461": (3.8207, 3.7382, 6.0865, 8.1105),
    "frankfurt_000000_015389": (3.3076, 3.5515, 5.3465, 8.1204),
    "frankfurt_000000_017228": (3.1343, 3.8915, 6.0694, 8.2193),
    "frankfurt_000000_020321": (3.9687, 3.8572, 6.3270, 7.9039),
    "frankfurt_000001_011835": (3.5320, 4.0974, 5.1456, 7.8669),
    "frankfurt_000001_048654": (4.0969, 3.9516, 6.8213, 7.5158),
    "frankfurt_000001_055603": (4.1491, 5.3015, 9.0615, 8.1968),
    "frankfurt_000001_070099": (3.5689, 3.9955, 6.2054, 7.3364),
    "frankfurt_000001_075984": (3.8454, 4.0804, 4.8336, 7.7511),
}


def test_niqe_reproduces_the_matlab_reference() -> None:
    """The independent-implementation check: the release's own MATLAB scores of its two test images."""
    if not NIQE_REFERENCE.is_dir():
        pytest.fail(f"NIQE reference images not found at {NIQE_REFERENCE}; expected beside the project")
    for name, expected in MATLAB_NIQE.items():
        image = cv2.cvtColor(cv2.imread(str(NIQE_REFERENCE / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert image.shape == (512, 768, 3)
        assert abs(niqe(image) - expected) < 1e-3, name


def test_matlab_imresize_half() -> None:
    rng = np.random.default_rng(0)
    assert np.allclose(matlab_imresize(np.full((97, 50), 7.25), 0.5), 7.25, rtol=0, atol=1e-12)
    for shape in ((96, 96), (97, 51), (5, 3), (1, 8)):
        half = (math.ceil(shape[0] / 2), math.ceil(shape[1] / 2))
        assert matlab_imresize(rng.random(shape), 0.5).shape == half
    # Halving with antialiasing: the bicubic kernel is widened 2x, so output x (1-based) sits at input
    # 2x - 0.5 and weighs inputs 2x-4 .. 2x+3 by cubic(|d| / 2) / 2, i.e. by
    # [-3, -9, 29, 111, 111, 29, -9, -3] / 256, indices outside the image mirrored (0 -> 1, -1 -> 2, 9 -> 8).
    # A row of 256 at input row 5 (1-based) therefore gives -3, 29, 111, -9 in output rows 1..4; every row
    # is constant, so the column pass (weights summing to 1) changes nothing.
    delta = np.zeros((8, 6))
    delta[4] = 256.0
    expected = np.repeat(np.array([[-3.0], [29.0], [111.0], [-9.0]]), 3, axis=1)
    assert np.allclose(matlab_imresize(delta, 0.5), expected, rtol=0, atol=1e-9)
    # away from the borders a ramp is sampled at its value there: 0-based output j sits at input 2j + 0.5
    ramp = np.tile(np.arange(16.0), (4, 1))
    assert np.allclose(matlab_imresize(ramp, 0.5)[:, 2:6], [4.5, 6.5, 8.5, 10.5], rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def frankfurt_niqe(cityscapes_root: Path) -> dict[str, tuple[float, float, float, float]]:
    """NIQE (published model) of each frankfurt frame at 512x256: original, HEVC QP 32 and 47, blurred."""
    codec = get_codec("hevc", chroma_upsampling="nearest")
    values = {}
    for path in sorted((cityscapes_root / "leftImg8bit" / "val" / "frankfurt").glob("*_leftImg8bit.png")):
        bgr = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (512, 256), interpolation=cv2.INTER_AREA)
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        variants = [
            image,
            codec.roundtrip(image, 32).decoded,
            codec.roundtrip(image, 47).decoded,
            cv2.GaussianBlur(image, (0, 0), 2.0),
        ]
        values[path.name.removesuffix("_leftImg8bit.png")] = tuple(niqe(v) for v in variants)
    return values


def test_niqe_pinned_on_cityscapes_frames(frankfurt_niqe: dict[str, tuple[float, ...]]) -> None:
    assert frankfurt_niqe.keys() == FRANKFURT_NIQE.keys()
    for name, expected in FRANKFURT_NIQE.items():
        assert np.allclose(frankfurt_niqe[name], expected, rtol=0, atol=1e-3), name


def test_niqe_orders_compression_and_blur(frankfurt_niqe: dict[str, tuple[float, ...]]) -> None:
    """original < HEVC QP 32 < QP 47 < blurred, on the mean over the ten frames. Per frame, NIQE cannot
    tell the original from QP 32 (reversed on 4 of 10 frames; the mean over the first 3 is ordered by only
    0.017), and QP 47 is worse than the blur on one frame; both clean versions beat both degraded ones."""
    table = np.array(list(frankfurt_niqe.values()))
    original, qp32, qp47, blurred = table.mean(axis=0)
    assert original < qp32 < qp47 < blurred
    assert np.all(np.maximum(table[:, 0], table[:, 1]) < np.minimum(table[:, 2], table[:, 3]))


def test_niqe_default_is_the_published_model(sample_image: np.ndarray) -> None:
    model = published_niqe_model()
    assert published_niqe_model() is model
    assert model.mu.shape == (36,) and model.cov.shape == (36, 36) and np.allclose(model.cov, model.cov.T)
    assert model.fitted_on == NIQE_PUBLISHED_FITTED_ON and model.patch_size == 96
    assert niqe(sample_image) == niqe(sample_image, model)
    assert math.isfinite(niqe(sample_image))
    with pytest.raises(ValueError, match="at least 96x96"):
        niqe(sample_image[:64])
    restored = NIQEModel.from_dict(model.to_dict())
    assert np.array_equal(restored.mu, model.mu) and np.array_equal(restored.cov, model.cov)


def test_published_model_file_and_notice() -> None:
    data = importlib.resources.files("pipeline.eval").joinpath("assets")
    digest = hashlib.sha256(data.joinpath("niqe_pristine.mat").read_bytes()).hexdigest()
    notice = data.joinpath("NIQE_NOTICE.txt").read_text()
    assert digest in notice and "modelparameters.mat" in notice
    for marker in ("COPYRIGHT NOTICE STARTS WITH THIS LINE", "COPYRIGHT NOTICE ENDS WITH THIS LINE"):
        assert marker in notice


def test_matlab_rgb2gray_rounds() -> None:
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [100, 100, 100], [10, 0, 0], [0, 0, 5]]], dtype=np.uint8)
    # 10 * 0.2989 = 2.99 -> 3 and 5 * 0.1140 = 0.57 -> 1: rounded, not truncated as uint8 casts would
    assert matlab_rgb2gray(rgb).tolist() == [[255, 0, 100, 3, 1]]


@pytest.fixture(scope="module")
def niqe_setup(cityscapes_root: Path) -> tuple[NIQEModel, list[np.ndarray]]:
    frames = _frames(cityscapes_root, 10, (512, 256))
    return fit_niqe_model(frames[:7], fitted_on="7 sample frames"), frames[7:]


def test_dataset_fitted_niqe_model(niqe_setup: tuple[NIQEModel, list[np.ndarray]]) -> None:
    model, held_out = niqe_setup
    assert model.mu.shape == (36,) and model.cov.shape == (36, 36)
    assert np.allclose(model.cov, model.cov.T)
    assert model.fitted_on == "7 sample frames"
    assert 7 <= model.n_patches <= 70  # sharpness selection keeps some of the 10 patches per frame
    restored = NIQEModel.from_dict(model.to_dict())
    assert np.array_equal(restored.mu, model.mu) and restored.patch_size == 96
    for image in held_out:
        clean = niqe(image, model)
        assert math.isfinite(clean)
        assert niqe(_noisy(image, 12), model) > clean
        assert niqe(cv2.GaussianBlur(image, (0, 0), 2.0), model) > clean


def test_niqe_of_flat_images(niqe_setup: tuple[NIQEModel, list[np.ndarray]]) -> None:
    model, _ = niqe_setup
    flat = np.full((128, 256, 3), 90, dtype=np.uint8)
    with pytest.raises(ValueError, match="usable patches"):
        fit_niqe_model([flat])
    assert math.isnan(niqe(flat, model)) and math.isnan(niqe(flat))


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
    reference = LPIPS("alex")
    torch.save(
        {f"features.{k}": v for k, v in reference.features.state_dict().items()},
        tmp_path / LPIPS_BACKBONES["alex"][0],
    )
    lins = {f"lin{i}.model.1.weight": lin.weight.detach().abs() for i, lin in enumerate(reference.lins)}
    torch.save(lins, tmp_path / "alex.pth")
    model = load_lpips(str(tmp_path / "alex.pth"))
    assert isinstance(model, LPIPS) and model.net == "alex"
    assert model(sample_image, sample_image) == pytest.approx(0.0, abs=1e-7)
    near, far = model(sample_image, _noisy(sample_image, 4)), model(sample_image, _noisy(sample_image, 40))
    assert 0.0 < near < far
    (tmp_path / LPIPS_BACKBONES["alex"][0]).unlink()
    missing_backbone = load_lpips(str(tmp_path / "alex.pth"))
    assert isinstance(missing_backbone, Unavailable) and "alexnet-owt" in missing_backbone.reason


def test_fid_inception_loads_and_frechet_distance(tmp_path: Path, sample_image: np.ndarray) -> None:
    torch.manual_seed(0)
    weights = tmp_path / FID_WEIGHTS_FILE
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
