"""``chaoqing bench quality``: the metrics against known values, the degradations, and a real
run (the compact model and Lanczos on a small crop of skimage's astronaut)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from click.testing import CliRunner
from PIL import Image

from chaoqing.bench.quality import (
    DEGRADATIONS,
    LANCZOS,
    degrade,
    measure,
    prepare_original,
    quality,
    run_quality,
)

COMPACT_X4 = "realesr-animevideov3-x4"
# BT.601 luma weights of skimage.color.rgb2ycbcr (on [0, 255] input): Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
LUMA_GAIN = (65.481 + 128.553 + 24.966) / 255


def _astronaut(side: int) -> np.ndarray:
    photo = np.asarray(skimage.data.astronaut())  # type: ignore[no-untyped-call]
    return np.asarray(Image.fromarray(photo[:256, 128:384]).resize((side, side), Image.Resampling.LANCZOS))


@pytest.mark.timeout(20)
def test_identity_is_perfect_and_a_known_offset_gives_its_psnr() -> None:
    original = _astronaut(64)
    same = measure(original, original.copy(), shave=4)
    assert same.psnr_db == math.inf and same.ssim == pytest.approx(1.0) and same.sharpness == pytest.approx(1.0)
    offset = 2  # every channel +2: Y moves by 2·LUMA_GAIN everywhere (no value clips: astronaut[..] < 254)
    brighter = np.clip(original.astype(np.int16) + offset, 0, 255).astype(np.uint8)
    assert (original < 254).all()
    shifted = measure(original, brighter, shave=4)
    assert shifted.psnr_db == pytest.approx(20 * math.log10(255 / (offset * LUMA_GAIN)), abs=0.01)
    assert shifted.sharpness == pytest.approx(1.0, abs=1e-6)  # a constant shift adds no detail
    blurred = np.asarray(Image.fromarray(original).resize((16, 16), Image.Resampling.BOX).resize(
        (64, 64), Image.Resampling.BILINEAR))
    assert measure(original, blurred, shave=4).sharpness < 0.5


@pytest.mark.timeout(20)
def test_degradations_are_small_deterministic_and_differ() -> None:
    original = prepare_original(_astronaut(70), max_side=64, multiple=4)
    assert original.shape == (64, 64, 3)
    copies = {}
    for degradation in DEGRADATIONS:
        small = degrade(original, degradation.name, 4, seed=3)
        assert small.shape == (16, 16, 3) and small.dtype == np.uint8
        assert np.array_equal(small, degrade(original, degradation.name, 4, seed=3))
        copies[degradation.name] = small
    assert not np.array_equal(copies["bicubic"], copies["noise"])
    assert not np.array_equal(copies["bicubic"], copies["jpeg"])
    # blur: a softer copy than the plain downscale
    assert np.abs(np.diff(copies["blur"].astype(float), axis=1)).mean() < np.abs(
        np.diff(copies["bicubic"].astype(float), axis=1)).mean()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_real_run_measures_the_compact_model_against_lanczos(tmp_path: Path) -> None:
    Image.fromarray(_astronaut(96)).save(tmp_path / "astronaut.png")
    rows, records, _ = run_quality([tmp_path], {4: [COMPACT_X4]}, ["bicubic", "jpeg"], max_side=96,
                                   runtime="ncnn", threads=2, progress=lambda message: None, find_faces=False)
    assert len(records) == 2 * 2  # two degradations × (Lanczos, compact)
    by_key = {(row["degradation"], row["model"]): row for row in rows}
    assert set(by_key) == {(degradation, model) for degradation in ("bicubic", "jpeg", "all")
                           for model in (LANCZOS, COMPACT_X4)}
    for row in rows:
        assert 18 < row["psnr_db"] < 35, row  # a 24 px input upscaled ×4: far from the original, far from noise
        assert 0.3 < row["ssim"] < 1
        assert row["photos"] == (2 if row["degradation"] == "all" else 1)
    lanczos, compact = by_key[("bicubic", LANCZOS)], by_key[("bicubic", COMPACT_X4)]
    assert lanczos["sharpness"] < compact["sharpness"]  # Lanczos blurs; the model restores edges
    assert compact["seconds"] > 0 and compact["license"] == "BSD-3-Clause"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_command_prints_json_and_writes_crops(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_astronaut(64)).save(photos / "astronaut.png")
    crops = tmp_path / "crops"
    result = CliRunner().invoke(quality, ["--photos", str(photos), "--models-x4", COMPACT_X4, "--models-x2", "",
                                          "--degradations", "noise", "--max-side", "64", "--threads", "2",
                                          "--crops", str(crops), "--native-crops", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["scenario"] == "quality"
    assert [(row["degradation"], row["model"]) for row in document["results"]] == [
        ("noise", LANCZOS), ("noise", COMPACT_X4), ("all", LANCZOS), ("all", COMPACT_X4)]
    assert {record["photo"] for record in document["measurements"]} == {"photos/astronaut.png"}
    assert document["degradations"] == {"noise": "bicubic downscale, then Gaussian noise σ = 5/255"}
    sheet, native = (Path(path) for path in document["crops"])
    assert sheet.parent == crops and sheet.name == "quality-x4-noise-photos-astronaut.png"
    with Image.open(sheet) as image:
        assert image.width == 3 * 64  # original, Lanczos, the compact model
    assert native.name == "quality-x4-native-photos-astronaut.png"
    with Image.open(native) as image:  # the photo as it is, nearest, Lanczos, compact: 40 px enlarged ×4
        assert image.size == (3 * 160, 160 + 14)


DOCS_QUALITY = Path(__file__).resolve().parents[1] / "docs" / "quality.md"


@pytest.mark.timeout(10)
def test_built_in_presets_name_only_commercial_models_and_the_documented_presets_parse() -> None:
    """docs/quality.md's rule: no non-commercial or unverified weights in a built-in preset;
    its [presets.X] snippets load as written and name bundled models."""
    import re
    import tomllib

    from chaoqing.config import PRESETS, Config, config_from_mapping
    from chaoqing.modelserver.runners.catalog import UPSCALERS

    for preset in PRESETS.values():
        for name in (preset.upscaler, preset.face_model):
            if name is not None:
                assert UPSCALERS[name].card.commercial_use == "yes", (preset.name, name)
    # compact, 4xSPANkendata (balanced's faces), x4plus (quality), the detector: each a model server `serve` starts
    assert len(Config().models_needed()) <= 4
    snippets = re.findall(r"```toml\n(.*?)```", DOCS_QUALITY.read_text(encoding="utf-8"), re.DOTALL)
    documented = config_from_mapping(tomllib.loads("\n".join(snippets))).presets
    assert documented["photo-nc"].upscaler == "span-clearreality-x4"
    assert UPSCALERS["span-clearreality-x4"].card.commercial_use == "no"
    assert "NON-COMMERCIAL" in documented["photo-nc"].description
    assert documented["photo-clean"].upscaler == "span-kendata-x4"
    for name in ("photo-nc", "photo-clean"):
        assert documented[name].face_model in UPSCALERS
