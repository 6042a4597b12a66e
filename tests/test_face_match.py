"""Matching a pasted face to its photo: strength, colour, texture (chaoqing.gateway.stages.face_match)."""

from __future__ import annotations

import numpy as np
import pytest

from chaoqing.gateway.stages.composite import FacePaste, composite_face_pastes
from chaoqing.gateway.stages.face_geometry import PasteBox
from chaoqing.gateway.stages.face_match import (
    MIN_TEXTURE_GAIN,
    FaceMatchSettings,
    match_paste_to_background,
    measure_texture,
)

SIDE = 240  # background
FACE = PasteBox(60, 60, 180, 180)  # a 120 px face in its middle


def _soft_mask(box: PasteBox, ramp: int = 8) -> np.ndarray:
    """A square mask, 1 inside, ramping to 0 over ``ramp`` px at the edge (as the real one does)."""
    ys, xs = np.mgrid[0:box.height, 0:box.width]
    edge = np.minimum.reduce([ys, xs, box.height - 1 - ys, box.width - 1 - xs]).astype(np.float32)
    return np.clip(edge / ramp, 0, 1).astype(np.float32)


def _photo(seed: int = 0, noise: float = 0.0, colour: tuple[float, float, float] = (170, 120, 100)) -> np.ndarray:
    """A smooth skin-like gradient with optional Gaussian grain (σ in 8-bit levels)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    base = np.stack([np.full((SIDE, SIDE), value, np.float32) for value in colour], axis=2)
    base += ((xs + ys) / (2 * SIDE) * 30)[..., None]
    base += rng.normal(0, noise, base.shape).astype(np.float32) if noise else 0
    return np.clip(np.rint(base), 0, 255).astype(np.uint8)


def _paste(patch: np.ndarray) -> FacePaste:
    return FacePaste(FACE, patch[FACE.slices], _soft_mask(FACE))


def test_strength_zero_leaves_the_background_and_one_the_face() -> None:
    background, face = _photo(0), _photo(1, colour=(90, 160, 200))
    off = FaceMatchSettings(strength=0.0, colour=False, texture=False)
    matched, _ = match_paste_to_background(_paste(face), background, off)
    assert np.array_equal(composite_face_pastes(background, [matched]), background)
    full = FaceMatchSettings(strength=1.0, colour=False, texture=False)
    matched, _ = match_paste_to_background(_paste(face), background, full)
    assert matched is not None and np.array_equal(composite_face_pastes(background, [matched]),
                                                  composite_face_pastes(background, [_paste(face)]))
    half, _ = match_paste_to_background(_paste(face), background, FaceMatchSettings(0.5, False, False))
    middle = composite_face_pastes(background, [half])[120, 120].astype(float)
    expected = (background[120, 120].astype(float) + face[120, 120].astype(float)) / 2
    assert np.abs(middle - expected).max() <= 1


def test_colour_takes_the_photos_colours_back_and_keeps_the_faces_detail() -> None:
    background = _photo(0, colour=(170, 120, 100))
    face = _photo(0, colour=(120, 120, 150))  # the face model made the skin bluish
    face[110:130, 110:130] = 20  # ... and a dark feature (an eye) that is the model's detail
    matched, _ = match_paste_to_background(_paste(face), background, FaceMatchSettings(colour=True, texture=False))
    result = composite_face_pastes(background, [matched]).astype(float)
    skin = result[80:100, 140:170].reshape(-1, 3).mean(axis=0)
    assert np.abs(skin - background[80:100, 140:170].reshape(-1, 3).mean(axis=0)).max() < 4, skin
    luma = result @ np.array([0.299, 0.587, 0.114])
    eye, around = luma[115:125, 115:125].mean(), luma[80:100, 140:170].mean()
    assert around - eye > 80, "the face's own dark feature survives (only its colour is the photo's)"


def test_an_iris_keeps_the_photos_blue() -> None:
    background = _photo(0)
    background[112:128, 112:128] = (60, 110, 190)  # a blue iris, 16 px across in a 120 px face
    face = background.copy()
    face[112:128, 112:128] = (40, 30, 25)  # the restorer painted it dark brown ("doll eyes")
    matched, _ = match_paste_to_background(_paste(face), background, FaceMatchSettings(colour=True, texture=False))
    iris = composite_face_pastes(background, [matched])[116:124, 116:124].reshape(-1, 3).mean(axis=0)
    assert iris[2] > iris[0] + 40, f"the iris is blue again, not brown: {iris}"


def test_texture_gives_a_clean_face_the_photos_grain() -> None:
    background = _photo(0, noise=6.0)
    face = _photo(1, noise=0.0)
    plain, _ = match_paste_to_background(_paste(face), background, FaceMatchSettings(colour=False, texture=False))
    before = measure_texture(composite_face_pastes(background, [plain])[plain.box.slices], plain.soft_mask)
    matched, measure = match_paste_to_background(_paste(face), background,
                                                 FaceMatchSettings(colour=False, texture=True))
    assert measure is not None and measure.added > 0 and measure.kept == 1.0
    after = measure_texture(composite_face_pastes(background, [matched])[matched.box.slices], matched.soft_mask)
    assert before.inside / before.outside < 0.3, before
    assert 0.8 <= after.inside / after.outside <= 1.25, after


def test_texture_tones_down_a_face_noisier_than_its_photo_but_keeps_most_of_it() -> None:
    background = _photo(0, noise=1.0)
    face = _photo(1, noise=8.0)
    _, measure = match_paste_to_background(_paste(face), background,
                                                 FaceMatchSettings(colour=False, texture=True))
    assert measure is not None and measure.added == 0 and measure.kept == pytest.approx(MIN_TEXTURE_GAIN)


def test_everything_off_is_the_paste_itself_and_bad_strength_is_refused() -> None:
    background, face = _photo(0), _photo(1)
    paste = _paste(face)
    same, measure = match_paste_to_background(paste, background, FaceMatchSettings(1.0, False, False))
    assert same is paste and measure is None
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="face strength"):
            FaceMatchSettings(strength=bad)


def test_a_face_at_the_frames_edge_and_16_bit_photos() -> None:
    background = (_photo(0, noise=4.0).astype(np.uint16) * 257)
    face = _photo(1)
    edge = PasteBox(0, 0, 100, 100)
    paste = FacePaste(edge, face[edge.slices], _soft_mask(edge))
    matched, _ = match_paste_to_background(paste, background, FaceMatchSettings())
    assert matched.patch.dtype == np.uint16 and matched.box.left == 0 and matched.box.top == 0
    assert composite_face_pastes(background, [matched]).shape == background.shape


def test_a_presets_face_min_crop_raises_small_faces_crops_and_nothing_else() -> None:
    from chaoqing.gateway.stages.enhance_faces import MIN_CROP_SIZE, choose_crop_size

    # a 74 px face at ×2 for a ×4 model: 37 px wanted, so the fit is the 64 px floor
    assert choose_crop_size(74, 2.0, 4.0, None, 128) == MIN_CROP_SIZE
    assert choose_crop_size(74, 2.0, 4.0, None, 128, 128) == 128  # balanced: supersampled
    assert choose_crop_size(400, 2.0, 4.0, None, 128, 128) == 128  # a large face: the cap, as before
    assert choose_crop_size(400, 2.0, 4.0, None, 256, 128) == 208  # above the floor, the fit rules
    assert choose_crop_size(74, 2.0, 4.0, 512, 128, 128) == 512  # a fixed-input restorer keeps its size


def test_face_min_crop_is_a_preset_setting_checked_at_load() -> None:
    from chaoqing.config import PRESETS, ConfigError, config_from_mapping

    assert PRESETS["balanced"].face_min_crop == 128 and PRESETS["balanced"].face_model == "span-kendata-x4"
    assert PRESETS["quality"].face_min_crop is None
    config = config_from_mapping({"presets": {"balanced": {"face_min_crop": 64}, "mine": {
        "upscaler": "realesr-animevideov3-x4", "face_model": "span-kendata-x4", "face_min_crop": 192}}})
    assert config.presets["balanced"].face_min_crop == 64 and config.presets["mine"].face_min_crop == 192
    assert config.presets["balanced"].face_model == "span-kendata-x4"  # the rest of the built-in stays
    for bad in (8, 4096, 96.5, True, "128"):
        with pytest.raises(ConfigError, match="face_min_crop"):
            config_from_mapping({"presets": {"balanced": {"face_min_crop": bad}}})
