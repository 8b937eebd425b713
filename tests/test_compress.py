"""compress / decompress: round trips on sample frames, the model checks, corrupt files, tiling, folders."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.compress.container import pack, read_container
from pipeline.compress.tiling import TILE_TOLERANCE, enhance_tiled, fit_gains_tiled, tile_starts
from pipeline.data.codecs import LabelCoder, get_codec
from pipeline.eval.inputs import EvalSample
from pipeline.eval.methods import Method, reconstruct
from pipeline.model.correction_scale import fit_code
from pipeline.model.export import export_generator, load_generator
from pipeline.model.inference import enhance_image, fit_gains
from pipeline.model.map_choice import MapChoice, codec_slope
from pipeline.model.spec import GeneratorSpec

LABEL_NC = 34  # Cityscapes label ids
SIZE = (256, 128)


def _generator_file(path: Path, seed: int, **spec_changes: object) -> Path:
    """A tiny residual generator whose correction head is non-zero (a trained model's stand-in)."""
    values: dict[str, object] = {
        "ngf": 4,
        "n_downsample": 2,
        "n_blocks": 1,
        "norm": "instance",
        "label_nc": LABEL_NC,
        "use_instance": False,
        "residual": True,
        "codec": "hevc",
        "codec_options": {"chroma_upsampling": "linear"},  # trained on today's decoded pictures
        "quality": 42,
        "phase": 2,
    }
    values.update(spec_changes)
    spec = GeneratorSpec(**values)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    generator = spec.build_generator()
    assert generator.correction is not None
    with torch.no_grad():
        generator.correction[-1].weight.normal_(0, 0.02)
        generator.correction[-1].bias.zero_()
    return export_generator(path, generator, spec)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, cityscapes_root: Path) -> Path:
    """``images/<city>/<key>.png`` and ``labels/<key>.png`` for two frames at 256x128, and two models."""
    root = tmp_path_factory.mktemp("compress")
    for image in sorted((cityscapes_root / "leftImg8bit").rglob("*_leftImg8bit.png"))[:2]:
        key = image.name.removesuffix("_leftImg8bit.png")
        label = next((cityscapes_root / "gtFine").rglob(f"{key}_gtFine_labelIds.png"))
        rgb = cv2.resize(cv2.imread(str(image)), SIZE, interpolation=cv2.INTER_AREA)
        (root / "images" / image.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "images" / image.parent.name / f"{key}.png"), rgb)
        ids = cv2.resize(cv2.imread(str(label), cv2.IMREAD_UNCHANGED), SIZE, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(root / "labels" / f"{key}.png"), ids)
    _generator_file(root / "model.safetensors", seed=0)
    _generator_file(root / "other.safetensors", seed=1)
    return root


def _frame(work: Path) -> tuple[Path, Path]:
    image = sorted((work / "images").rglob("*.png"))[0]
    return image, work / "labels" / image.name


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_no_enhance_round_trip_is_the_codecs_decode(work: Path, tmp_path: Path, capsys) -> None:
    image, label = _frame(work)
    out = tmp_path / "x.jse"
    assert (
        main(
            [
                "compress",
                str(image),
                "--label",
                str(label),
                "--codec",
                "hevc",
                "--quality",
                "42",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    container = read_container(out)
    assert "codec" in printed and "label" in printed and f"{container.bpp()['total']:.4f} bpp" in printed
    # file size = the parts plus the header
    size = out.stat().st_size
    assert size == len(container.codec_bitstream) + len(container.label_bitstream) + container.header_bytes()
    assert container.header_bytes() < 64 and out.read_bytes() == pack(container)
    assert (container.width, container.height, container.codec, container.quality) == (*SIZE, "hevc", 42)
    assert not container.model  # no --model: the file names none
    rgb = _rgb(image)
    expected = get_codec("hevc").roundtrip(rgb, 42)
    assert container.codec_bitstream == expected.bitstream

    png = tmp_path / "x.png"
    assert main(["decompress", str(out), "-o", str(png), "--no-enhance"]) == 0
    assert np.array_equal(_rgb(png), expected.decoded)
    # without a model to use, decompression says what to do
    assert main(["decompress", str(out), "-o", str(png)]) == 2
    assert "--no-enhance" in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["none", "frame", "channels"])
def test_enhanced_output_is_evaluations_reconstruction(
    work: Path, tmp_path: Path, capsys, scale: str
) -> None:
    image, label = _frame(work)
    model = work / "model.safetensors"
    if scale != "none":  # the same weights, whose encoder sends the scale or gains of their correction
        model = _generator_file(tmp_path / "scaled.safetensors", seed=0, correction_scale=scale)
    out, png = tmp_path / "x.jse", tmp_path / "x.png"
    assert main(["compress", str(image), "--label", str(label), "--model", str(model), "-o", str(out)]) == 0
    container = read_container(out)
    assert (container.correction_scale is None) == (scale != "frame")
    assert (container.correction_gains is None) == (scale != "channels")
    assert container.model.sha256 and not container.model.name  # a file: its hash, no registry name
    assert (container.codec, container.quality) == ("hevc", 42)  # taken from the model's spec
    assert main(["decompress", str(out), "-o", str(png), "--model", str(model)]) == 0
    assert "enhanced by" in capsys.readouterr().out

    generator, spec = load_generator(model)
    rgb = _rgb(image)
    coder = LabelCoder(container.label_coder)
    ids = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    sample = EvalSample(
        key="k",
        image=rgb,
        label=coder.reconstruct(ids),
        instance=None,
        decoded={42: get_codec("hevc").roundtrip(rgb, 42).decoded},
        bpp={42: 0.25},
    )
    made = reconstruct(Method("hevc-SE", 42, generator, spec), sample, 42)
    expected = made.image
    assert np.array_equal(_rgb(png), expected)
    assert not np.array_equal(expected, sample.decoded[42])  # the model does change the frame
    # the evaluation charges the scale's byte or the gains' bytes (ngf + 1), as the file carries them
    side = {"none": 0, "frame": 8, "channels": 8 * 5}[scale]
    assert made.bpp == pytest.approx(0.25 + side / (SIZE[0] * SIZE[1]))
    if scale == "frame":  # the file's scale is the one that fits this frame best, and evaluation reports it
        enhanced = enhance_image(generator, spec, sample.decoded[42], sample.label, quality=42)
        assert container.correction_scale == fit_code(rgb, sample.decoded[42], enhanced)
        assert made.scale == container.correction_scale / 128
    else:
        assert made.scale is None
    if scale == "channels":  # the file's gains are the encoder's fit on this frame, not the generator's own
        gains = fit_gains(generator, spec, rgb, sample.decoded[42], sample.label, quality=42)
        assert container.correction_gains == gains and len(gains) == 5 and set(gains) != {192}


@pytest.mark.parametrize(
    ("recorded", "trained_on"),
    [("linear", "linear"), ("nearest", "nearest"), (None, "nearest")],  # None: an export before version 8
)
def test_decompress_decodes_as_the_generator_was_trained(
    work: Path, tmp_path: Path, recorded: str | None, trained_on: str
) -> None:
    image, label = _frame(work)
    options = {"chroma_upsampling": recorded} if recorded else None
    spec = dataclasses.replace(load_generator(work / "model.safetensors")[1], codec_options=options)
    model = export_generator(
        tmp_path / "identity.safetensors", spec.build_generator(), spec
    )  # outputs its input
    out, png = tmp_path / "x.jse", tmp_path / "x.png"
    assert main(["compress", str(image), "--label", str(label), "--model", str(model), "-o", str(out)]) == 0
    assert main(["decompress", str(out), "-o", str(png), "--model", str(model)]) == 0
    stream = read_container(out).codec_bitstream
    pictures = {way: get_codec("hevc", chroma_upsampling=way).decode(stream) for way in ("linear", "nearest")}
    assert not np.array_equal(pictures["linear"], pictures["nearest"])
    assert np.array_equal(_rgb(png), pictures[trained_on])


def test_model_hash_mismatch_refused_unless_forced(work: Path, tmp_path: Path, capsys) -> None:
    image, label = _frame(work)
    out, png = tmp_path / "x.jse", tmp_path / "x.png"
    main(
        [
            "compress",
            str(image),
            "--label",
            str(label),
            "--model",
            str(work / "model.safetensors"),
            "-o",
            str(out),
        ]
    )
    capsys.readouterr()
    assert main(["decompress", str(out), "-o", str(png), "--model", str(work / "other.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not png.exists()
    assert (
        main(["decompress", str(out), "-o", str(png), "--model", str(work / "other.safetensors"), "--force"])
        == 0
    )


def test_gains_for_another_model_are_refused_even_forced(work: Path, tmp_path: Path, capsys) -> None:
    """A file's gains belong to its head's parts: another model's decoder cannot use them."""
    image, label = _frame(work)
    model = _generator_file(tmp_path / "gained.safetensors", seed=0, correction_scale="channels")
    out, png = tmp_path / "x.jse", tmp_path / "x.png"
    assert main(["compress", str(image), "--label", str(label), "--model", str(model), "-o", str(out)]) == 0
    assert len(read_container(out).correction_gains or ()) == 5
    capsys.readouterr()
    other = str(work / "model.safetensors")
    assert main(["decompress", str(out), "-o", str(png), "--model", other, "--force"]) == 2
    err = capsys.readouterr().err
    assert "carries 5 correction gains" in err and "takes no correction gains" in err
    assert not png.exists()


def test_model_for_another_quality_refused(work: Path, tmp_path: Path, capsys) -> None:
    image, label = _frame(work)
    model = work / "model.safetensors"
    assert (
        main(
            [
                "compress",
                str(image),
                "--label",
                str(label),
                "--model",
                str(model),
                "--quality",
                "37",
                "-o",
                str(tmp_path / "a.jse"),
            ]
        )
        == 2
    )
    assert "q42" in capsys.readouterr().err
    out = tmp_path / "b.jse"
    assert main(["compress", str(image), "--label", str(label), "--quality", "37", "-o", str(out)]) == 0
    assert main(["decompress", str(out), "-o", str(tmp_path / "b.png"), "--model", str(model)]) == 2
    assert "trained at q42" in capsys.readouterr().err


def test_label_map_sizes(work: Path, tmp_path: Path, capsys) -> None:
    image, label = _frame(work)
    ids = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    half = tmp_path / "half.png"
    cv2.imwrite(str(half), ids[::2, ::2])
    assert (
        main(
            [
                "compress",
                str(image),
                "--label",
                str(half),
                "-o",
                str(tmp_path / "h.jse"),
                "--label-downsample",
                "2",
            ]
        )
        == 0
    )
    container = read_container(tmp_path / "h.jse")
    assert container.label_downsample == 2
    assert np.array_equal(
        LabelCoder(container.label_coder, 2).decode(container.label_bitstream, SIZE),
        np.repeat(np.repeat(ids[::2, ::2], 2, 0), 2, 1),
    )
    odd = tmp_path / "odd.png"
    cv2.imwrite(str(odd), ids[:100, :200])
    assert main(["compress", str(image), "--label", str(odd), "-o", str(tmp_path / "o.jse")]) == 2
    assert "divided by a whole number" in capsys.readouterr().err


def _corrupt_files(good: bytes) -> dict[str, bytes]:
    return {
        "truncated": good[: len(good) // 2],
        "wrong-magic": b"GIF89a" + good[6:],
        "unknown-version": good[:8] + b"\x09" + good[9:],
        "flipped": good[:-20] + bytes([good[-20] ^ 1]) + good[-19:],
        "empty": b"",
    }


def test_corrupt_files_one_line_exit_2(work: Path, tmp_path: Path, capsys) -> None:
    image, label = _frame(work)
    good = tmp_path / "good.jse"
    main(["compress", str(image), "--label", str(label), "-o", str(good)])
    capsys.readouterr()
    for name, data in _corrupt_files(good.read_bytes()).items():
        bad = tmp_path / f"{name}.jse"
        bad.write_bytes(data)
        assert main(["decompress", str(bad), "-o", str(tmp_path / f"{name}.png"), "--no-enhance"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (name, err)
    # a well-formed container around a garbage codec stream: the decoder's failure is one line too
    container = read_container(good)
    from dataclasses import replace

    garbage = tmp_path / "garbage.jse"
    garbage.write_bytes(
        pack(replace(container, codec_bitstream=b"\x00\x10\x00\x10\x00\x00\x00\x01" + bytes(40)))
    )
    assert main(["decompress", str(garbage), "-o", str(tmp_path / "g.png"), "--no-enhance"]) == 2
    assert "corrupt hevc bitstream" in capsys.readouterr().err


def test_cli_subprocess_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jse"
    bad.write_bytes(b"\x89JSE\r\n\x1a\n\x01\x04hevc")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "decompress",
            str(bad),
            "-o",
            str(tmp_path / "x.png"),
            "--no-enhance",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tile_starts_cover_with_overlap() -> None:
    assert tile_starts(100, 128, 16) == [0]
    starts = tile_starts(300, 128, 32)
    assert starts[0] == 0 and starts[-1] == 300 - 128
    assert all(b - a <= 128 - 32 for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize(
    ("norm", "padding"), [("instance", "reflect"), ("batch", "reflect"), ("batch", "zeros")]
)
def test_tiled_matches_untiled_within_tolerance(
    cityscapes_root: Path, tmp_path: Path, norm: str, padding: str
) -> None:
    image = sorted((cityscapes_root / "leftImg8bit").rglob("*_leftImg8bit.png"))[0]
    label = next(
        (cityscapes_root / "gtFine").rglob(image.name.replace("leftImg8bit.png", "gtFine_labelIds.png"))
    )
    rgb = cv2.cvtColor(
        cv2.resize(cv2.imread(str(image)), (512, 256), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
    )
    ids = cv2.resize(
        cv2.imread(str(label), cv2.IMREAD_UNCHANGED), (512, 256), interpolation=cv2.INTER_NEAREST
    )
    model = _generator_file(tmp_path / "g.safetensors", seed=0, norm=norm, padding=padding)
    generator, spec = load_generator(model)
    decoded = get_codec("hevc").roundtrip(rgb, 42).decoded
    whole = enhance_image(generator, spec, decoded, ids)
    assert np.array_equal(enhance_tiled(generator, spec, decoded, ids, tile=512, overlap=64), whole)
    tiled = enhance_tiled(generator, spec, decoded, ids, tile=256, overlap=64)
    diff = np.abs(tiled.astype(np.int16) - whole.astype(np.int16))
    assert np.abs(whole.astype(np.int16) - decoded).mean() > 2  # the model changes the frame: a real test
    assert diff.mean() <= TILE_TOLERANCE["mean"], diff.mean()
    assert np.percentile(diff, 99.9) <= TILE_TOLERANCE["p999"], np.percentile(diff, 99.9)
    if norm == "batch":  # no statistics of its own: only the receptive field is cut at the seams
        assert diff.max() <= 1
    assert not any(m._forward_hooks for m in generator.modules())  # the statistics hooks are gone
    # per-part gains: fitted over the tiles (each pixel weighted by its tile's share), passed to every tile
    gained = dataclasses.replace(spec, correction_scale="channels")
    codes = fit_gains(generator, gained, rgb, decoded, ids)
    assert fit_gains_tiled(generator, gained, rgb, decoded, ids, tile=512, overlap=64) == codes
    tiled_codes = fit_gains_tiled(generator, gained, rgb, decoded, ids, tile=256, overlap=64)
    # equal on this machine for both norms; a code of rounding is left to other platforms
    assert max(abs(a - b) for a, b in zip(codes, tiled_codes, strict=True)) <= 1
    whole = enhance_image(generator, gained, decoded, ids, gains=codes)
    tiled = enhance_tiled(generator, gained, decoded, ids, tile=256, overlap=64, gains=codes)
    diff = np.abs(tiled.astype(np.int16) - whole.astype(np.int16))
    assert diff.mean() <= TILE_TOLERANCE["mean"] and np.percentile(diff, 99.9) <= TILE_TOLERANCE["p999"]
    assert not np.array_equal(whole, enhance_image(generator, spec, decoded, ids))  # the gains do act
    assert not any(m._forward_hooks for m in generator.modules())


def test_folder_mode(work: Path, tmp_path: Path, capsys) -> None:
    out, pngs = tmp_path / "jse", tmp_path / "png"
    assert main(["compress", str(work / "images"), "--label", str(work / "labels"), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    files = sorted(out.rglob("*.jse"))
    assert len(files) == 2 and all(
        f.parent.parent == out for f in files
    )  # images/<city>/<key>.png layout kept
    assert "2 image(s)" in printed.out and "compress" in printed.err  # the summary; the progress bar
    assert (
        main(["decompress", str(out), "-o", str(pngs), "--model", str(work / "model.safetensors"), "--force"])
        == 0
    )
    assert sorted(p.relative_to(pngs).with_suffix("") for p in pngs.rglob("*.png")) == sorted(
        f.relative_to(out).with_suffix("") for f in files
    )
    (work / "images" / "extra.png").write_bytes(
        (work / "labels" / files[0].with_suffix(".png").name).read_bytes()
    )
    try:
        (tmp_path / "nolabels").mkdir()
        assert (
            main(["compress", str(work / "images"), "--label", str(tmp_path / "nolabels"), "-o", str(out)])
            == 2
        )
        assert "no single label map" in capsys.readouterr().err
    finally:
        (work / "images" / "extra.png").unlink()


@pytest.mark.parametrize("sent", [True, False])
def test_send_map_rd_keeps_the_map_only_where_the_rule_says(
    work: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, sent: bool
) -> None:
    """--send-map rd: the encoder enhances its own decoded frame with the map and on zero semantics and
    hands both, the map's bits and the codec's slope to the rule; a frame whose map is withheld is a version 4
    file without a label stream, decoded on zero semantics: evaluation's reconstruction either way, scaled
    as the model's encoder scales it. The rule is forced each way here (tests/test_map_choice.py tests it)."""
    image, label = _frame(work)
    model = _generator_file(tmp_path / "m.safetensors", seed=0, correction_scale="frame")
    generator, spec = load_generator(model)
    with torch.no_grad():  # semantics that change the output
        generator.model[1].weight.normal_(0.0, 0.5)
    model = export_generator(tmp_path / "sees.safetensors", generator, spec)
    seen: list[tuple[np.ndarray, np.ndarray, float, float]] = []

    def forced(original, with_map, without, map_bits, slope):  # type: ignore[no-untyped-def]
        seen.append((with_map, without, map_bits, slope))
        return MapChoice(sent, 0.0, 0.0)

    monkeypatch.setattr("pipeline.compress.commands.choose_map", forced)
    out, png = tmp_path / "x.jse", tmp_path / "x.png"
    argv = ["compress", str(image), "--label", str(label), "--model", str(model), "-o", str(out)]
    assert main([*argv, "--send-map", "rd"]) == 0
    printed = capsys.readouterr().out
    container = read_container(out)
    assert container.map_withheld is not sent and bool(container.label_bitstream) is sent
    assert ("no label map (withheld by the encoder" in printed) is not sent
    assert main(["decompress", str(out), "-o", str(png), "--model", str(model)]) == 0

    rgb, coder = _rgb(image), LabelCoder("auto")
    ids = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    result = get_codec("hevc").roundtrip(rgb, 42)
    sample = EvalSample("k", rgb, coder.reconstruct(ids), None, {42: result.decoded}, {42: result.bpp})
    blind = dataclasses.replace(spec, zero_semantics=True)
    with_map, without = (reconstruct(Method("hevc-SE", 42, generator, s), sample, 42) for s in (spec, blind))
    ((handed_with, handed_without, map_bits, slope),) = seen
    assert np.array_equal(handed_with, with_map.image) and np.array_equal(handed_without, without.image)
    assert map_bits == 8 * len(coder.encode(ids)) and slope == codec_slope(
        get_codec("hevc"), rgb, 42, result.decoded, 8 * len(result.bitstream)
    )
    assert np.array_equal(_rgb(png), (with_map if sent else without).image)
    assert container.correction_scale == round(128 * (with_map if sent else without).scale)


def test_send_map_rd_is_refused_where_there_is_nothing_to_choose(work: Path, tmp_path: Path, capsys) -> None:
    image, label = _frame(work)
    argv = ["compress", str(image), "--label", str(label), "-o", str(tmp_path / "x.jse"), "--send-map", "rd"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--send-map rd needs --model" in err and len(err.strip().splitlines()) == 1


def test_send_map_rd_never_sends_a_zero_semantics_models_map(work: Path, tmp_path: Path, capsys) -> None:
    """The rule itself, unforced: a map that changes nothing removes no squared error, so it is not sent."""
    image, label = _frame(work)
    model = _generator_file(tmp_path / "blind.safetensors", seed=0, zero_semantics=True)
    out = tmp_path / "x.jse"
    argv = ["compress", str(image), "--label", str(label), "--model", str(model), "-o", str(out)]
    assert main([*argv, "--send-map", "rd"]) == 0
    assert read_container(out).map_withheld
    assert main([*argv, "--send-map", "always"]) == 0
    assert not read_container(out).map_withheld
