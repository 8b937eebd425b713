"""The shard -> batch loader on real shards of the Cityscapes sample (256x128, hevc QP 42)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import random
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, JobConfig, from_dict
from pipeline.data import loader as loader_module
from pipeline.data.loader import LoaderError, augment, make_dataset, make_loader, shard_urls
from pipeline.data.manifest import Manifest, ManifestError, SplitEntry
from pipeline.data.members import decode_instance
from pipeline.model.inputs import edge_map

WIDTH, HEIGHT = 256, 128
MEMBER = "hevc_q42"


@pytest.fixture(scope="module")
def built(small_shards: Path, cityscapes_root: Path) -> tuple[JobConfig, Manifest]:
    """The session's shards (hevc QP 37 and 42: the loader must pick q42), 4 samples a shard; the training
    split ``val`` holds the 10 frankfurt frames (the other cities are held out)."""
    cfg = from_dict(
        {
            "data": {"root": str(cityscapes_root), "width": WIDTH, "height": HEIGHT, "splits": ["val"]},
            "shards": {"output": str(small_shards), "codecs": [{"name": "hevc", "qualities": [37, 42]}]},
            "loader": {"split": "val", "codec": "hevc", "quality": 42, "batch_size": 4, "shuffle": 8},
        }
    )
    return cfg, Manifest.read(small_shards)


def _with(cfg: JobConfig, **loader: object) -> JobConfig:
    return dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, **loader))


def _originals(cfg: JobConfig) -> dict[str, dict[str, np.ndarray]]:
    """Full-size members straight from the tars, decoded independently of the loader."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for url in shard_urls(cfg):
        with tarfile.open(url) as tar:
            for info in tar.getmembers():
                key, _, member = info.name.partition(".")
                data = np.frombuffer(tar.extractfile(info).read(), np.uint8)
                entry = out.setdefault(key, {})
                if member == "json":
                    entry["json"] = json.load(io.BytesIO(data.tobytes()))
                elif member in ("image.png", f"{MEMBER}.png", "hevc_q37.png"):
                    entry[member] = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                elif member == "label.png":
                    entry[member] = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
                elif member == "instance.npz":
                    entry["instance"] = decode_instance(data.tobytes())
    return out


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_batch_format(built: tuple[JobConfig, Manifest]) -> None:
    cfg, manifest = built
    originals = _originals(cfg)
    batches = list(make_dataset(cfg, train=False))
    assert sorted(_keys(batches)) == sorted(originals)
    assert len(originals) == manifest.splits["val"].samples == 10
    assert [len(b["key"]) for b in batches] == [4, 4, 2]  # partial last batch kept
    batch = batches[0]
    assert batch["image"].shape == batch["decoded"].shape == (4, 3, HEIGHT, WIDTH)
    assert batch["label"].shape == (4, HEIGHT, WIDTH) and batch["edge"].shape == (4, 1, HEIGHT, WIDTH)
    assert batch["image"].dtype == batch["decoded"].dtype == batch["edge"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert batch["bpp"].dtype == batch["label_bpp"].dtype == torch.float32 and batch["bpp"].shape == (4,)
    assert batch["quality"].dtype == torch.int64 and batch["quality"].tolist() == [42] * 4
    for name in ("image", "decoded"):
        assert -1.0 <= batch[name].min() < -0.5 and 0.5 < batch[name].max() <= 1.0
    assert set(batch["edge"].unique().tolist()) == {0.0, 1.0}
    for i, key in enumerate(batch["key"]):
        original = originals[key]
        assert np.array_equal(_to_uint8(batch["image"][i]), original["image.png"])
        assert np.array_equal(_to_uint8(batch["decoded"][i]), original[f"{MEMBER}.png"])
        assert not np.array_equal(original["image.png"], original[f"{MEMBER}.png"])
        assert not np.array_equal(original["hevc_q37.png"], original[f"{MEMBER}.png"])
        assert np.array_equal(batch["label"][i].numpy(), original["label.png"])
        meta = original["json"]
        assert batch["bpp"][i].item() == pytest.approx(meta["codecs"][MEMBER]["bpp"])
        assert batch["label_bpp"][i].item() == pytest.approx(meta["label"]["bpp"])


def _locate(crop: np.ndarray, full: np.ndarray) -> tuple[int, int, bool, bool]:
    """Where ``crop`` (maybe flipped, then maybe transposed) lies in ``full``: exact match by template
    search; returns top, left, flipped, transposed."""
    for transposed, flipped in itertools.product((False, True), repeat=2):
        window = crop.swapaxes(0, 1) if transposed else crop
        window = window[:, ::-1] if flipped else window
        scores = cv2.matchTemplate(full, np.ascontiguousarray(window), cv2.TM_SQDIFF)
        top, left = np.unravel_index(np.argmin(scores), scores.shape)
        if np.array_equal(full[top : top + window.shape[0], left : left + window.shape[1]], window):
            return int(top), int(left), flipped, transposed
    raise AssertionError("crop not found in the original image")


@pytest.mark.parametrize("transpose", [False, True], ids=["flip", "flip+transpose"])
def test_crop_flip_and_transpose_are_aligned(built: tuple[JobConfig, Manifest], transpose: bool) -> None:
    cfg, _ = built
    originals = _originals(cfg)
    crop_h, crop_w = 48, 80
    placements = []
    dataset = make_dataset(_with(cfg, crop=[crop_h, crop_w], flip=True, transpose=transpose), seed=3)
    for batch in dataset:
        assert batch["image"].shape[-2:] == batch["label"].shape[-2:] == (crop_h, crop_w)
        for i, key in enumerate(batch["key"]):
            original = originals[key]
            top, left, flipped, transposed = _locate(_to_uint8(batch["image"][i]), original["image.png"])
            step = -1 if flipped else 1
            rows, cols = (crop_w, crop_h) if transposed else (crop_h, crop_w)

            def window(
                array: np.ndarray, cut: tuple = (top, left, rows, cols, step, transposed)
            ) -> np.ndarray:
                at, left_, height, width, stride, swap = cut
                out = array[at : at + height, left_ : left_ + width][:, ::stride]
                return out.swapaxes(0, 1) if swap else out

            assert np.array_equal(_to_uint8(batch["decoded"][i]), window(original[f"{MEMBER}.png"]))
            assert np.array_equal(batch["label"][i].numpy(), window(original["label.png"]))
            full_edge = edge_map(torch.from_numpy(original["instance"].astype(np.int32))).numpy()
            assert np.array_equal(batch["edge"][i, 0].numpy(), window(full_edge))
            placements.append((top, left, flipped, transposed))
    assert len(placements) == 10
    assert {p[2] for p in placements} == {False, True}
    assert {p[3] for p in placements} == ({False, True} if transpose else {False})
    assert len({p[:2] for p in placements}) > 5


def test_transpose_off_draws_no_coin() -> None:
    """Without ``transpose`` a seed draws the crop offsets and the flip it always drew, in that order."""
    rows = np.arange(40 * 60).reshape(40, 60)
    sample = {"key": "k", "image": rows, "decoded": rows, "label": rows, "edge": rows}
    out = augment(sample, random.Random(7), (16, 24), flip=True, transpose=False)
    rng = random.Random(7)
    top, left, flipped = rng.randint(0, 40 - 16), rng.randint(0, 60 - 24), rng.random() < 0.5
    expected = rows[top : top + 16, left : left + 24][:, :: -1 if flipped else 1]
    assert all(np.array_equal(out[name], expected) for name in ("image", "decoded", "label", "edge"))
    swapped = augment(sample, random.Random(7), (16, 24), flip=True, transpose=True)
    assert swapped["label"].shape == (16, 24)


def test_transpose_refuses_a_window_that_does_not_fit(built: tuple[JobConfig, Manifest]) -> None:
    cfg, _ = built  # frames are 128 high: a transposed 64x200 crop is a 200x64 window
    with pytest.raises(LoaderError, match=r"transposed, a 200x64 window\) is larger than sample"):
        for _ in make_dataset(_with(cfg, crop=[64, 200], transpose=True), seed=0):
            pass
    with pytest.raises(ConfigError, match="^transpose needs loader.crop"):
        _with(cfg, crop=[], transpose=True)


def test_deterministic_given_seed(built: tuple[JobConfig, Manifest]) -> None:
    cfg = _with(built[0], crop=[32, 32], flip=True)

    def first_epochs(seed: int) -> list[tuple[list[str], torch.Tensor]]:
        dataset = make_dataset(cfg, seed=seed)
        return [(b["key"], b["image"]) for epoch in range(2) for b in itertools.islice(dataset, 2)]

    one, again, other = first_epochs(0), first_epochs(0), first_epochs(1)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(one, again, strict=True))
    assert any(a[0] != b[0] or not torch.equal(a[1], b[1]) for a, b in zip(one, other, strict=True))
    assert one[:2] != one[2:] and [k for k, _ in one[:2]] != [k for k, _ in one[2:]]  # epochs differ


@pytest.mark.parametrize("single_shard", [False, True], ids=["split-shards", "split-samples"])
def test_ranks_and_workers_disjoint_and_complete(
    built: tuple[JobConfig, Manifest], single_shard: bool
) -> None:
    cfg, manifest = built
    if single_shard:  # 1 shard < 2 ranks x 2 workers: split by sample
        cfg = _with(cfg, num_workers=2, crop=[16, 16], batch_size=3)
        cfg = _with(cfg, shards=str(Path(cfg.shards.output) / manifest.splits["val"].shards[0]))
        expected = set(_originals(cfg))
        assert len(expected) == 4
    else:  # 3 shards >= 2 ranks x 1 worker: split by shard
        cfg = _with(cfg, num_workers=1, crop=[16, 16], batch_size=3)
        assert len(manifest.splits["val"].shards) >= 2
        expected = set(_originals(cfg))
    loaders = [make_loader(cfg, rank=rank, world_size=2, seed=5) for rank in range(2)]
    # workers from a fork server: a fork of this (threaded) process could copy a held lock and hang
    assert all(
        loader.pipeline[0].multiprocessing_context.get_start_method() == "forkserver" for loader in loaders
    )
    for _epoch in range(2):  # shard order changes per epoch, identically on every rank
        per_rank = []
        for rank, loader in enumerate(loaders):
            keys = _keys(loader)
            assert len(keys) == len(set(keys)), f"rank {rank} saw a sample twice: {sorted(keys)}"
            per_rank.append(set(keys))
        assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == expected


def test_resampled_is_endless(built: tuple[JobConfig, Manifest]) -> None:
    cfg = _with(built[0], resampled=True, crop=[16, 16], batch_size=4)
    streams = []
    for rank in range(2):
        batches = list(itertools.islice(make_dataset(cfg, rank=rank, world_size=2), 8))
        assert all(len(b["key"]) == 4 for b in batches)
        streams.append(_keys(batches))
    assert len(streams[0]) == 32 > 10  # more than one epoch's worth on a single rank
    assert set(streams[0]) <= set(_originals(cfg)) and streams[0] != streams[1]
    loader = make_loader(cfg, rank=0, world_size=2)
    assert len(list(loader)) == len(list(loader)) == 2  # nominal epoch: ceil(10 / (2 x 4)) batches


def test_several_qualities_are_drawn_per_sample(built: tuple[JobConfig, Manifest]) -> None:
    """With loader.qualities every sample's decoded image is one of those qualities, drawn per sample (both
    appear), reproducibly for a seed; without it only loader.quality's."""
    cfg, _ = built
    originals = _originals(cfg)
    mixed = _with(cfg, qualities=[37, 42], crop=[], flip=False)

    def drawn(seed: int) -> list[tuple[str, str]]:
        out = []
        dataset = make_dataset(mixed, seed=seed)
        for _ in range(3):  # three epochs of 10 frames: each pass over one dataset draws anew
            for batch in dataset:
                for i, key in enumerate(batch["key"]):
                    decoded = _to_uint8(batch["decoded"][i])
                    member = [
                        m
                        for m in ("hevc_q37.png", f"{MEMBER}.png")
                        if np.array_equal(decoded, originals[key][m])
                    ]
                    assert len(member) == 1
                    assert batch["bpp"][i].item() == pytest.approx(
                        originals[key]["json"]["codecs"][member[0][:-4]]["bpp"]
                    )
                    assert batch["quality"][i].item() == {"hevc_q37.png": 37, f"{MEMBER}.png": 42}[member[0]]
                    out.append((key, member[0]))
        return out

    first = drawn(1)
    assert {m for _, m in first} == {"hevc_q37.png", f"{MEMBER}.png"}
    assert drawn(1) == first
    with pytest.raises(ManifestError, match="hevc_q32"):
        shard_urls(_with(cfg, qualities=[32, 42]))


def test_quality_weights_set_how_often_each_quality_is_drawn(built: tuple[JobConfig, Manifest]) -> None:
    """loader.quality_weights, in loader.qualities' order (not sorted), sets how often each is drawn."""
    cfg, _ = built

    def counts(qualities: list[int], weights: list[float]) -> dict[int, int]:
        weighted = _with(cfg, qualities=qualities, quality_weights=weights, crop=[], flip=False)
        drawn: dict[int, int] = {37: 0, 42: 0}
        dataset = make_dataset(weighted, seed=3)
        for _ in range(6):  # six epochs of 10 frames: each pass over one dataset draws anew
            for batch in dataset:
                for quality in batch["quality"].tolist():
                    drawn[quality] += 1
        return drawn

    assert counts([42, 37], [1, 9])[37] >= 48  # 54 expected of 60
    assert counts([37, 42], [1, 9])[42] >= 48
    assert counts([37, 42], [1, 1]) == counts([42, 37], [2, 2])  # only the ratios count


def test_clear_errors(built: tuple[JobConfig, Manifest], tmp_path: Path) -> None:
    cfg, manifest = built
    with pytest.raises(ManifestError, match=r"hevc_q32 .*not built.*\['hevc_q37', 'hevc_q42'\]"):
        shard_urls(_with(cfg, quality=32))
    with pytest.raises(ManifestError, match=r"split 'train'.*built: \['test', 'val', 'valid'\]"):
        shard_urls(cfg, "train")
    with pytest.raises(ManifestError, match="no manifest.json"):
        shard_urls(dataclasses.replace(cfg, shards=dataclasses.replace(cfg.shards, output=str(tmp_path))))
    with pytest.raises(LoaderError, match="no such shard file"):
        shard_urls(_with(cfg, shards=str(tmp_path / "val-{000000..000001}.tar")))
    rejected = dataclasses.replace(manifest, splits={**manifest.splits, "val": SplitEntry((), 0, ())})
    rejected.write(tmp_path / "rejected")
    with pytest.raises(LoaderError, match="split 'val' has no shards .*every sample was rejected"):
        shard_urls(
            dataclasses.replace(
                cfg, shards=dataclasses.replace(cfg.shards, output=str(tmp_path / "rejected"))
            )
        )
    with pytest.raises(LoaderError, match=r"larger than sample"):
        next(iter(make_dataset(_with(cfg, crop=[HEIGHT, WIDTH + 1]))))
    with pytest.raises(ConfigError, match="positive"):
        _with(cfg, crop=[0, 8])  # refused by the config itself
    with pytest.raises(ConfigError, match="cache_mb needs loader.num_workers=0"):
        _with(cfg, cache_mb=64, num_workers=2)


def test_extra_shard_folders_train_too(built: tuple[JobConfig, Manifest], tmp_path: Path) -> None:
    """loader.extra_shards: the same frames built at another size join every epoch and count as trained
    on; a folder without the training qualities is refused; the digest counts the option only when set."""
    from conftest import HOLDOUT

    from pipeline.config import with_overrides
    from pipeline.data.manifest import dataset_info
    from pipeline.data.shards import build_shards

    cfg, manifest = built

    def extra_folder(name: str, qualities: list[int]) -> str:
        out = tmp_path / name
        codecs = [{"name": "hevc", "qualities": qualities}]
        size = {"data.width": 128, "data.height": 64, "data.holdout": HOLDOUT}
        build_shards(with_overrides(cfg, {**size, "shards.output": str(out), "shards.codecs": codecs}))
        return str(out)

    both = _with(cfg, extra_shards=[extra_folder("half", [37, 42])], crop=[32, 64], shuffle=0)
    keys = _keys(make_loader(both, train=True, seed=0))
    trained = manifest.split("val").keys
    assert sorted(keys) == sorted(trained * 2)  # every frame at both sizes, once each
    assert dataset_info(both).train_frames == tuple(sorted(trained))
    assert both.training_digest() != cfg.training_digest()
    assert _with(cfg, extra_shards=[]).training_digest() == cfg.training_digest()

    lacking = _with(cfg, extra_shards=[extra_folder("q37", [37])])
    with pytest.raises(ManifestError, match="hevc_q42"):
        shard_urls(lacking)


@pytest.mark.parametrize("crop", [[], [32, 64]], ids=["full", "crop"])
def test_decoded_cache_gives_the_same_batches_and_decodes_once(
    built: tuple[JobConfig, Manifest], crop: list[int], png_decodes: list[str]
) -> None:
    """A DecodedCache shared by the pipelines of successive epochs (what the trainer's loader.cache_mb
    does): the same batches, with each sample and quality PNG-decoded once."""
    cfg = _with(built[0], qualities=[37, 42], crop=crop, flip=True)
    decoded = png_decodes

    def epochs(cache: loader_module.DecodedCache | None) -> list[dict[str, object]]:
        return [batch for epoch in range(4) for batch in make_dataset(cfg, seed=epoch, cache=cache)]

    plain = epochs(None)
    plain_decodes, decoded[:] = len(decoded), []
    cached = epochs(loader_module.DecodedCache(budget=64 * 2**20))
    assert len(plain) == len(cached) == 4 * 3  # 10 frames an epoch, batches of 4
    for a, b in zip(plain, cached, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["quality"], b["quality"])
        for name in ("image", "decoded", "label", "edge"):
            assert torch.equal(a[name], b[name])
    drawn = {(key, int(q)) for batch in cached for key, q in zip(batch["key"], batch["quality"], strict=True)}
    assert plain_decodes == 4 * 10 * 3  # image, decoded image and label of every sample of every epoch
    assert len(decoded) == 3 * len(drawn) < plain_decodes


def test_decoded_cache_keeps_to_its_budget() -> None:
    cache = loader_module.DecodedCache(budget=1000)
    arrays = {"image": np.zeros(400, np.uint8), "key": "a"}
    for key in "abc":
        cache.put({"__url__": "s.tar", "__key__": key, loader_module.DECODED: "hevc_q42"}, arrays)
    assert cache.used == 800
    assert cache.get({"__url__": "s.tar", "__key__": "b", loader_module.DECODED: "hevc_q42"}) is arrays
    assert cache.get({"__url__": "s.tar", "__key__": "c", loader_module.DECODED: "hevc_q42"}) is None
    assert cache.get({"__url__": "s.tar", "__key__": "a", loader_module.DECODED: "hevc_q37"}) is None
