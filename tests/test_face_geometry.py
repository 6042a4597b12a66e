"""Unit tests for the pure face geometry (face_geometry) and compositing (composite) stages.

Every input is built here (synthetic textures, or scikit-image's astronaut); no files are read.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import skimage.data

from chaoqing.errors import ChaoqingError, DegenerateLandmarks
from chaoqing.gateway.stages.composite import (
    EnhancedFace,
    FacePaste,
    composite_face_pastes,
    composite_faces,
    prepare_face_paste,
)
from chaoqing.gateway.stages.face_geometry import (
    DLIB_5_TEMPLATE_512,
    FFHQ_TEMPLATE_512,
    PasteBox,
    blend_face_into,
    compute_paste_box,
    create_resize_matrix,
    create_soft_mask,
    estimate_affine_matrix,
    eye_distance,
    invert_affine_matrix,
    paste_back,
    scale_template,
    warp_face_by_landmarks,
)

pytestmark = pytest.mark.timeout(60)

FloatArray = npt.NDArray[np.float64]
ImageArray = npt.NDArray[Any]

# Round trips on a smooth texture measured 0.55-1.0 levels of mean error in the face's interior
# (a half-pixel misplacement costs 1.4-5 levels); the bound leaves room for other platforms.
ROUND_TRIP_TOLERANCE = 1.6


# --- helpers -------------------------------------------------------------------------------


def smooth_texture(height: int, width: int, seed: int, sigma: float = 3.0) -> ImageArray:
    """Blurred noise: detail everywhere, but smooth enough to resample without aliasing."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    smooth = (smooth - smooth.mean()) / smooth.std() * 40 + 128
    return np.asarray(np.clip(np.rint(smooth), 0, 255), dtype=np.uint8)


def gentle_gradient(height: int, width: int) -> ImageArray:
    """A smooth photo-like background: slow ramps and waves, steps well under 2 levels."""
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 90 + 60 * columns / width + 10 * np.sin(rows / 23.0)
    green = 120 + 40 * rows / height + 10 * np.cos(columns / 31.0)
    blue = 150 - 30 * (rows + columns) / (height + width)
    return np.asarray(
        np.clip(np.rint(np.stack([red, green, blue], axis=2)), 0, 255), dtype=np.uint8
    )


def face_landmarks(
    centre: tuple[float, float], eye_distance_px: float, angle_degrees: float = 0.0
) -> FloatArray:
    """FFHQ-layout 5 points around ``centre``: eyes ``eye_distance_px`` apart, rotated."""
    template = FFHQ_TEMPLATE_512 - FFHQ_TEMPLATE_512.mean(axis=0)
    template_eye_distance = float(np.linalg.norm(FFHQ_TEMPLATE_512[0] - FFHQ_TEMPLATE_512[1]))
    angle = math.radians(angle_degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = eye_distance_px / template_eye_distance
    return np.asarray(template @ rotation.T * scale + np.asarray(centre), dtype=np.float64)


def read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    copy = np.array(array)
    copy.setflags(write=False)
    return copy


def upscale(image: ImageArray, scale: float) -> ImageArray:
    height, width = image.shape[:2]
    size = (round(width * scale), round(height * scale))
    assert size[0] == width * scale and size[1] == height * scale, "pick sizes that scale exactly"
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_CUBIC))


def matrix_scale(affine_matrix: FloatArray) -> float:
    return math.sqrt(abs(float(np.linalg.det(affine_matrix[:, :2]))))


def matrix_rotation_degrees(affine_matrix: FloatArray) -> float:
    return math.degrees(math.atan2(affine_matrix[1, 0], affine_matrix[0, 0]))


def apply_matrix(affine_matrix: FloatArray, points: FloatArray) -> FloatArray:
    return np.asarray(points @ affine_matrix[:, :2].T + affine_matrix[:, 2], dtype=np.float64)


def interior_error(
    pasted: ImageArray,
    background: ImageArray,
    inverse_affine_matrix: FloatArray,
    face_shape: tuple[int, ...],
    background_scale: float,
) -> float:
    """Mean absolute difference where the soft mask is fully on."""
    box = compute_paste_box(inverse_affine_matrix, face_shape, background.shape)
    mask = create_soft_mask(inverse_affine_matrix, face_shape, box, background_scale)
    interior = mask > 0.999
    assert interior.sum() > 1000
    rows, columns = box.slices
    difference = np.abs(pasted[rows, columns].astype(np.float64) - background[rows, columns])
    return float(difference[interior].mean())


# --- templates and alignment ---------------------------------------------------------------


def test_templates_are_read_only_constants() -> None:
    assert FFHQ_TEMPLATE_512.shape == (5, 2) and DLIB_5_TEMPLATE_512.shape == (5, 2)
    with pytest.raises(ValueError):
        FFHQ_TEMPLATE_512[0, 0] = 0.0
    with pytest.raises(ValueError):
        DLIB_5_TEMPLATE_512[0, 0] = 0.0


def test_scale_template_scales_a_copy() -> None:
    template = read_only(FFHQ_TEMPLATE_512)
    half = scale_template(template, 256)
    np.testing.assert_allclose(half, FFHQ_TEMPLATE_512 / 2)
    assert half.flags.writeable and not np.shares_memory(half, template)
    with pytest.raises(ValueError):
        scale_template(template, 0)


def test_dlib_template_to_itself_is_identity_and_keeps_ffhq_points() -> None:
    affine_matrix = estimate_affine_matrix(DLIB_5_TEMPLATE_512, DLIB_5_TEMPLATE_512)
    np.testing.assert_allclose(affine_matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-6)
    np.testing.assert_allclose(
        apply_matrix(affine_matrix, FFHQ_TEMPLATE_512), FFHQ_TEMPLATE_512, atol=1e-4
    )


@pytest.mark.parametrize("angle_degrees", [-35.0, -5.0, 0.0, 12.0, 90.0, 170.0])
@pytest.mark.parametrize("template", [FFHQ_TEMPLATE_512, DLIB_5_TEMPLATE_512])
def test_alignment_recovers_rotation_scale_and_translation(
    angle_degrees: float, template: FloatArray
) -> None:
    angle = math.radians(angle_degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    landmarks = template @ rotation.T * 0.37 + [410.0, -25.0]
    affine_matrix = estimate_affine_matrix(read_only(landmarks), read_only(template))
    assert matrix_scale(affine_matrix) == pytest.approx(1 / 0.37, rel=1e-6)
    assert matrix_rotation_degrees(affine_matrix) == pytest.approx(-angle_degrees, abs=1e-4)
    np.testing.assert_allclose(apply_matrix(affine_matrix, landmarks), template, atol=1e-3)


def test_alignment_tolerates_one_stray_point() -> None:
    landmarks = FFHQ_TEMPLATE_512 * 0.5 + 40
    landmarks[2] += (30.0, -25.0)  # a badly placed nose
    affine_matrix = estimate_affine_matrix(landmarks, FFHQ_TEMPLATE_512)
    assert matrix_scale(affine_matrix) == pytest.approx(2.0, rel=1e-3)
    assert matrix_rotation_degrees(affine_matrix) == pytest.approx(0.0, abs=0.1)


@pytest.mark.parametrize(
    "landmarks",
    [
        np.full((5, 2), 100.0),
        np.array([[1.0, 2.0], [np.nan, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]),
        np.array([[1.0, 2.0], [np.inf, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]),
    ],
    ids=["coincident", "nan", "infinite"],
)
def test_degenerate_landmarks_raise(landmarks: FloatArray) -> None:
    with pytest.raises(DegenerateLandmarks) as raised:
        estimate_affine_matrix(landmarks, FFHQ_TEMPLATE_512)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, ChaoqingError)
    image = smooth_texture(64, 64, seed=1)
    with pytest.raises(DegenerateLandmarks):
        warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 128)


def test_misshapen_landmarks_raise_value_error() -> None:
    with pytest.raises(ValueError):
        estimate_affine_matrix(np.zeros((5, 3)), FFHQ_TEMPLATE_512)
    with pytest.raises(ValueError):
        estimate_affine_matrix(FFHQ_TEMPLATE_512[:4], FFHQ_TEMPLATE_512)


def test_eye_distance_for_both_layouts() -> None:
    dlib_eyes = np.linalg.norm(DLIB_5_TEMPLATE_512[0:2].mean(0) - DLIB_5_TEMPLATE_512[2:4].mean(0))
    assert eye_distance(DLIB_5_TEMPLATE_512) == pytest.approx(dlib_eyes)
    assert eye_distance(DLIB_5_TEMPLATE_512, "dlib5") == pytest.approx(128.1, abs=0.1)
    ffhq_eyes = np.linalg.norm(FFHQ_TEMPLATE_512[0] - FFHQ_TEMPLATE_512[1])
    assert eye_distance(FFHQ_TEMPLATE_512, "ffhq5") == pytest.approx(ffhq_eyes)
    with pytest.raises(ValueError):
        eye_distance(FFHQ_TEMPLATE_512, "mediapipe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        eye_distance(FFHQ_TEMPLATE_512[:4])


# --- warping to the crop -------------------------------------------------------------------


def test_warp_puts_landmarks_on_the_template() -> None:
    image = np.full((300, 400, 3), 128, dtype=np.uint8)
    landmarks = face_landmarks((210.0, 140.0), eye_distance_px=90.0, angle_degrees=20.0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for (x, y), colour in zip(landmarks, colours):
        cv2.circle(image, (round(x), round(y)), 4, colour, thickness=-1)
    crop_frame, affine_matrix = warp_face_by_landmarks(
        read_only(image), read_only(landmarks), FFHQ_TEMPLATE_512, 256
    )
    assert crop_frame.shape == (256, 256, 3) and crop_frame.dtype == np.uint8
    assert affine_matrix.shape == (2, 3)
    for (x, y), colour in zip(scale_template(FFHQ_TEMPLATE_512, 256), colours):
        np.testing.assert_allclose(crop_frame[round(y), round(x)], colour, atol=40)


def test_warp_replicates_the_border_and_keeps_dtype() -> None:
    image = np.full((100, 100, 3), 40000, dtype=np.uint16)
    landmarks = face_landmarks((5.0, 5.0), eye_distance_px=60.0)  # mostly off the image
    crop_frame, _affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 128)
    assert crop_frame.dtype == np.uint16
    assert np.all(crop_frame == 40000)


def test_warp_of_a_face_larger_than_the_crop_does_not_alias() -> None:
    # A one-pixel checkerboard shrunk 6x must come out flat grey, not as moiré.
    rows, columns = np.mgrid[0:1200, 0:1200]
    checkerboard = (((rows + columns) % 2) * 255).astype(np.uint8)
    image = np.repeat(checkerboard[:, :, np.newaxis], 3, axis=2)
    landmarks = face_landmarks((600.0, 600.0), eye_distance_px=6 * 126.0, angle_degrees=7.0)
    crop_frame, _affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 512)
    assert matrix_scale(_affine_matrix) == pytest.approx(1 / 6, rel=0.01)
    assert abs(float(crop_frame.mean()) - 127.5) < 2
    assert float(crop_frame.std()) < 8  # plain bilinear sampling: about 100


# --- inverse affine ------------------------------------------------------------------------


@pytest.mark.parametrize("background_scale", [1.0, 2.0, 3.5, 4.0])
@pytest.mark.parametrize("model_scale", [1.0, 2.0, 4.0])
def test_inverse_matrix_follows_the_pixel_centre_convention(
    background_scale: float, model_scale: float
) -> None:
    landmarks = face_landmarks((123.4, 88.8), eye_distance_px=47.0, angle_degrees=-17.0)
    affine_matrix = estimate_affine_matrix(landmarks, scale_template(FFHQ_TEMPLATE_512, 128))
    inverse_affine_matrix = invert_affine_matrix(
        read_only(affine_matrix), background_scale, model_scale
    )
    points = np.array([[0.0, 0.0], [123.4, 88.8], [17.25, 301.5], [-3.0, 7.0]])
    crop_points = apply_matrix(affine_matrix, points)
    enhanced_points = model_scale * (crop_points + 0.5) - 0.5
    background_points = background_scale * (points + 0.5) - 0.5
    np.testing.assert_allclose(
        apply_matrix(inverse_affine_matrix, enhanced_points), background_points, atol=1e-9
    )
    assert matrix_scale(inverse_affine_matrix) == pytest.approx(
        background_scale / model_scale / matrix_scale(affine_matrix)
    )


def test_inverse_matrix_equals_facexlib_minus_half_a_pixel() -> None:
    affine_matrix = estimate_affine_matrix(
        face_landmarks((200.0, 150.0), 80.0, 9.0), scale_template(FFHQ_TEMPLATE_512, 512)
    )
    facexlib_matrix = cv2.invertAffineTransform(affine_matrix) * 4.0
    facexlib_matrix[:, 2] += 0.5 * 4.0  # facexlib's extra_offset for upscale_factor > 1
    ours = invert_affine_matrix(affine_matrix, background_scale=4.0)
    np.testing.assert_allclose(ours[:, :2], facexlib_matrix[:, :2], atol=1e-12)
    np.testing.assert_allclose(ours[:, 2], facexlib_matrix[:, 2] - 0.5, atol=1e-9)
    np.testing.assert_allclose(
        invert_affine_matrix(affine_matrix), cv2.invertAffineTransform(affine_matrix), atol=1e-12
    )


def test_invert_rejects_bad_matrices() -> None:
    with pytest.raises(ValueError):
        invert_affine_matrix(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        invert_affine_matrix(np.eye(3))
    with pytest.raises(ValueError):
        invert_affine_matrix(np.eye(3)[:2], background_scale=0.0)
    np.testing.assert_allclose(create_resize_matrix(2.0), [[2, 0, 0.5], [0, 2, 0.5]])


# --- round trips ---------------------------------------------------------------------------


def round_trip(
    image: ImageArray,
    landmarks: FloatArray,
    crop_size: int,
    model_scale: int,
    background_scale: float,
) -> tuple[ImageArray, ImageArray, FloatArray, tuple[int, ...]]:
    """Align, 'enhance' by a plain resize, paste onto an upscaled background."""
    crop_frame, affine_matrix = warp_face_by_landmarks(
        image, landmarks, FFHQ_TEMPLATE_512, crop_size
    )
    enhanced_face = np.asarray(
        cv2.resize(crop_frame, None, fx=model_scale, fy=model_scale, interpolation=cv2.INTER_CUBIC)
    )
    background = upscale(image, background_scale)
    inverse_affine_matrix = invert_affine_matrix(affine_matrix, background_scale, model_scale)
    pasted = paste_back(
        read_only(background), read_only(enhanced_face), inverse_affine_matrix, background_scale
    )
    return pasted, background, inverse_affine_matrix, enhanced_face.shape


@pytest.mark.parametrize("background_scale", [1.0, 2.0, 3.5, 4.0])
@pytest.mark.parametrize("model_scale", [1, 4])
def test_round_trip_matches_the_upscaled_background(
    background_scale: float, model_scale: int
) -> None:
    image = smooth_texture(200, 240, seed=3)
    landmarks = face_landmarks((121.0, 97.0), eye_distance_px=28.0, angle_degrees=12.0)
    pasted, background, inverse_affine_matrix, face_shape = round_trip(
        image, landmarks, 128, model_scale, background_scale
    )
    error = interior_error(pasted, background, inverse_affine_matrix, face_shape, background_scale)
    assert error < ROUND_TRIP_TOLERANCE


@pytest.mark.parametrize("background_scale", [1.0, 2.0, 4.0])
def test_round_trip_on_a_photo(background_scale: float) -> None:
    astronaut = np.asarray(skimage.data.astronaut())  # type: ignore[no-untyped-call]
    image = np.asarray(cv2.GaussianBlur(astronaut, (0, 0), 1.5))
    # Her eyes, nose and mouth, roughly; the geometry does not depend on it.
    landmarks = np.array(
        [[188.0, 100.0], [228.0, 97.0], [210.0, 120.0], [192.0, 143.0], [226.0, 141.0]]
    )
    pasted, background, inverse_affine_matrix, face_shape = round_trip(
        image, landmarks, 256, 2, background_scale
    )
    error = interior_error(pasted, background, inverse_affine_matrix, face_shape, background_scale)
    assert error < 3.0


def test_half_a_pixel_off_is_measurably_worse() -> None:
    # The round trip can tell facexlib's translation from ours: the math is not slack.
    image = smooth_texture(200, 240, seed=4)
    landmarks = face_landmarks((121.0, 97.0), eye_distance_px=28.0, angle_degrees=-8.0)
    pasted, background, inverse_affine_matrix, face_shape = round_trip(
        image, landmarks, 128, 1, 2.0
    )
    ours = interior_error(pasted, background, inverse_affine_matrix, face_shape, 2.0)
    shifted_matrix = inverse_affine_matrix + [[0, 0, 0.5], [0, 0, 0.5]]
    crop_frame, _affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 128)
    shifted = paste_back(background, crop_frame, shifted_matrix, 2.0)
    theirs = interior_error(shifted, background, inverse_affine_matrix, face_shape, 2.0)
    assert ours < 0.6 * theirs


# --- soft mask -----------------------------------------------------------------------------


def soft_mask_case(
    background_scale: float = 2.0, eye_distance_px: float = 40.0
) -> tuple[FloatArray, tuple[int, ...], PasteBox, npt.NDArray[np.float32]]:
    affine_matrix = estimate_affine_matrix(
        face_landmarks((150.0, 110.0), eye_distance_px, angle_degrees=25.0),
        scale_template(FFHQ_TEMPLATE_512, 256),
    )
    inverse_affine_matrix = invert_affine_matrix(affine_matrix, background_scale, 2.0)
    face_shape = (512, 512, 3)
    box = compute_paste_box(
        inverse_affine_matrix,
        face_shape,
        (round(240 * background_scale), round(300 * background_scale), 3),
    )
    mask = create_soft_mask(inverse_affine_matrix, face_shape, box, background_scale)
    return inverse_affine_matrix, face_shape, box, mask


@pytest.mark.parametrize("background_scale", [1.0, 2.0, 4.0])
def test_soft_mask_is_one_inside_zero_outside_and_smooth(background_scale: float) -> None:
    inverse_affine_matrix, _face_shape, box, mask = soft_mask_case(background_scale)
    assert mask.dtype == np.float32 and mask.shape == (box.height, box.width)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    # Fully on at the warped landmarks (well inside the crop).
    template_points = scale_template(FFHQ_TEMPLATE_512, 512)
    for x, y in apply_matrix(inverse_affine_matrix, template_points):
        assert mask[round(y) - box.top, round(x) - box.left] == pytest.approx(1.0, abs=1e-6)
    # Exactly off wherever the pixel centre falls outside the enhanced crop.
    rows, columns = np.mgrid[box.top : box.bottom, box.left : box.right].astype(np.float64)
    to_face = cv2.invertAffineTransform(inverse_affine_matrix)
    face_x = to_face[0, 0] * columns + to_face[0, 1] * rows + to_face[0, 2]
    face_y = to_face[1, 0] * columns + to_face[1, 1] * rows + to_face[1, 2]
    outside = (face_x < -0.5) | (face_y < -0.5) | (face_x > 511.5) | (face_y > 511.5)
    assert outside.sum() > 0 and np.all(mask[outside] == 0.0)
    # A ramp, not a step: w_edge = sqrt(area) / 20 pixels of Gaussian.
    edge_width = math.sqrt(float((mask > 0).sum())) / 20
    steepest = max(np.abs(np.diff(mask, axis=0)).max(), np.abs(np.diff(mask, axis=1)).max())
    assert steepest < 1.5 / edge_width
    ramp = (mask > 0.01) & (mask < 0.99)
    assert ramp.sum() > 4 * math.sqrt(float((mask > 0).sum())) * edge_width * 0.5


def test_soft_mask_of_a_large_face_stays_inside_the_face() -> None:
    # Large faces take the coarse-grid path (w_edge > 16).
    inverse_affine_matrix, _face_shape, box, mask = soft_mask_case(4.0, eye_distance_px=110.0)
    edge_width = math.sqrt(float((mask > 0).sum())) / 20
    assert edge_width > 16
    to_face = cv2.invertAffineTransform(inverse_affine_matrix)
    rows, columns = np.mgrid[box.top : box.bottom, box.left : box.right].astype(np.float64)
    face_x = to_face[0, 0] * columns + to_face[0, 1] * rows + to_face[0, 2]
    face_y = to_face[1, 0] * columns + to_face[1, 1] * rows + to_face[1, 2]
    outside = (face_x < -0.5) | (face_y < -0.5) | (face_x > 511.5) | (face_y > 511.5)
    assert np.all(mask[outside] == 0.0)
    centre_x, centre_y = apply_matrix(inverse_affine_matrix, np.array([[255.5, 255.5]]))[0]
    assert mask[round(centre_y) - box.top, round(centre_x) - box.left] == pytest.approx(1.0)
    steepest = max(np.abs(np.diff(mask, axis=0)).max(), np.abs(np.diff(mask, axis=1)).max())
    assert steepest < 1.5 / edge_width


def test_no_visible_box_around_a_slightly_different_face() -> None:
    background_scale = 2.0
    image = gentle_gradient(240, 300)
    landmarks = face_landmarks((150.0, 115.0), eye_distance_px=45.0, angle_degrees=15.0)
    crop_frame, affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 256)
    brighter_face = np.clip(crop_frame.astype(np.int16) + 8, 0, 255).astype(np.uint8)
    background = upscale(image, background_scale)
    inverse_affine_matrix = invert_affine_matrix(affine_matrix, background_scale)
    pasted = paste_back(background, brighter_face, inverse_affine_matrix, background_scale)

    box = compute_paste_box(inverse_affine_matrix, brighter_face.shape, background.shape)
    mask = np.zeros(background.shape[:2], dtype=np.float32)
    mask[box.slices] = create_soft_mask(
        inverse_affine_matrix, brighter_face.shape, box, background_scale
    )
    boundary = (mask > 0) & (mask < 1)
    boundary[:, -1] = boundary[-1, :] = False

    def steps(image_: ImageArray) -> npt.NDArray[np.float64]:
        as_float = image_.astype(np.float64)
        across = np.abs(as_float[:-1, :-1] - as_float[:-1, 1:]).max(axis=2)
        down = np.abs(as_float[:-1, :-1] - as_float[1:, :-1]).max(axis=2)
        return np.asarray(np.maximum(across, down), dtype=np.float64)

    pasted_steps = steps(pasted)[boundary[:-1, :-1]]
    background_steps = steps(background)[boundary[:-1, :-1]]
    # The pasted face's edge is no more visible than the photo's own texture...
    assert pasted_steps.mean() <= background_steps.mean() + 0.5
    assert pasted_steps.max() <= background_steps.max() + 2
    # ...and the same square elsewhere in the photo is as smooth as that edge.
    elsewhere = np.roll(boundary, shift=(-box.top, -box.left), axis=(0, 1))
    assert pasted_steps.mean() <= steps(background)[elsewhere[:-1, :-1]].mean() + 0.5
    # A hard paste of the same face would show the 8-level step.
    hard = np.where(
        (mask > 0.5)[:, :, np.newaxis], np.clip(background.astype(np.int16) + 8, 0, 255), background
    )
    assert steps(hard)[boundary[:-1, :-1]].max() >= 6


def test_paste_touches_only_the_box_and_only_where_the_mask_is_on() -> None:
    image = smooth_texture(200, 260, seed=5)
    landmarks = face_landmarks((90.0, 80.0), eye_distance_px=24.0, angle_degrees=-20.0)
    crop_frame, affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 128)
    face = np.full_like(crop_frame, 250)
    background = upscale(image, 2.0)
    inverse_affine_matrix = invert_affine_matrix(affine_matrix, 2.0)
    pasted = paste_back(background, face, inverse_affine_matrix, 2.0)
    box = compute_paste_box(inverse_affine_matrix, face.shape, background.shape)
    assert 0 < box.width * box.height < 0.4 * background.shape[0] * background.shape[1]
    outside = np.ones(background.shape[:2], dtype=bool)
    outside[box.slices] = False
    np.testing.assert_array_equal(pasted[outside], background[outside])
    mask = create_soft_mask(inverse_affine_matrix, face.shape, box, 2.0)
    inside_pasted, inside_background = pasted[box.slices], background[box.slices]
    np.testing.assert_array_equal(inside_pasted[mask == 0], inside_background[mask == 0])
    assert np.all(inside_pasted[mask == 1] == 250)


# --- inputs, dtypes and edges --------------------------------------------------------------


def test_inputs_are_not_mutated() -> None:
    image = read_only(smooth_texture(120, 160, seed=6))
    landmarks = read_only(face_landmarks((80.0, 60.0), 30.0, 10.0))
    crop_frame, affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 128)
    affine_matrix = read_only(affine_matrix)
    inverse_affine_matrix = read_only(invert_affine_matrix(affine_matrix, 2.0, 2.0))
    face = read_only(np.asarray(cv2.resize(crop_frame, (256, 256))) // 2)
    background = read_only(upscale(np.array(image), 2.0))
    saved = [
        np.array(a)
        for a in (image, landmarks, affine_matrix, inverse_affine_matrix, face, background)
    ]

    pasted = paste_back(background, face, inverse_affine_matrix, 2.0)
    enhanced = EnhancedFace(face, inverse_affine_matrix, background_scale=2.0, face_index=0)
    composited = composite_faces(background, [enhanced, enhanced])

    for before, after in zip(
        saved, (image, landmarks, affine_matrix, inverse_affine_matrix, face, background)
    ):
        np.testing.assert_array_equal(before, after)
    assert pasted.flags.writeable and composited.flags.writeable
    assert not np.shares_memory(pasted, background)
    assert not np.array_equal(pasted, background)


def test_blend_face_into_needs_a_writable_canvas() -> None:
    background = read_only(np.zeros((64, 64, 3), dtype=np.uint8))
    face = np.full((32, 32, 3), 200, dtype=np.uint8)
    shift = np.array([[1.0, 0.0, 16.0], [0.0, 1.0, 16.0]])
    with pytest.raises(ValueError):
        blend_face_into(background, face, shift)
    canvas = np.array(background)
    box = blend_face_into(canvas, face, shift)
    assert not box.is_empty and canvas[32, 32, 0] == 200


def test_face_partly_outside_the_image() -> None:
    image = smooth_texture(120, 160, seed=7)
    landmarks = face_landmarks((8.0, 150.0), eye_distance_px=30.0)  # bottom-left, mostly outside
    crop_frame, affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 128)
    face = np.full_like(crop_frame, 255)
    background = upscale(image, 2.0)
    inverse_affine_matrix = invert_affine_matrix(affine_matrix, 2.0)
    box = compute_paste_box(inverse_affine_matrix, face.shape, background.shape)
    assert box.left == 0 and box.bottom == background.shape[0]
    pasted = paste_back(background, face, inverse_affine_matrix, 2.0)
    assert pasted.shape == background.shape
    # The face reaches the frame's corner opaque (the frame edge is not eroded, as in facexlib).
    assert np.all(pasted[-1, 0] == 255)
    outside = np.ones(background.shape[:2], dtype=bool)
    outside[box.slices] = False
    np.testing.assert_array_equal(pasted[outside], background[outside])


def test_face_entirely_outside_the_image_is_a_no_op() -> None:
    background = smooth_texture(80, 100, seed=8)
    face = np.full((64, 64, 3), 255, dtype=np.uint8)
    far_away = np.array([[0.5, 0.0, 500.0], [0.0, 0.5, -400.0]])
    assert compute_paste_box(far_away, face.shape, background.shape).is_empty
    pasted = paste_back(background, face, far_away)
    np.testing.assert_array_equal(pasted, background)
    assert pasted is not background and not np.shares_memory(pasted, background)
    paste = prepare_face_paste(EnhancedFace(face, far_away), background.shape)
    assert paste.box.is_empty
    np.testing.assert_array_equal(composite_face_pastes(background, [paste]), background)


def test_uint16_background_keeps_its_depth() -> None:
    image = smooth_texture(120, 160, seed=9)
    landmarks = face_landmarks((80.0, 60.0), 30.0, 5.0)
    crop_frame, affine_matrix = warp_face_by_landmarks(image, landmarks, FFHQ_TEMPLATE_512, 128)
    face = np.clip(crop_frame.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    background_8 = upscale(image, 2.0)
    background_16 = read_only(np.minimum(background_8.astype(np.uint16) * 257, 65530) + 3)
    inverse_affine_matrix = invert_affine_matrix(affine_matrix, 2.0)
    pasted_16 = paste_back(background_16, face, inverse_affine_matrix, 2.0)
    pasted_8 = paste_back(background_8, face, inverse_affine_matrix, 2.0)
    assert pasted_16.dtype == np.uint16
    np.testing.assert_allclose(pasted_16.astype(np.float64) / 257, pasted_8, atol=1.0)
    box = compute_paste_box(inverse_affine_matrix, face.shape, background_16.shape)
    outside = np.ones(background_16.shape[:2], dtype=bool)
    outside[box.slices] = False
    np.testing.assert_array_equal(pasted_16[outside], background_16[outside])  # low bits too


def test_rgba_background_keeps_its_alpha() -> None:
    background = np.zeros((64, 64, 4), dtype=np.uint8)
    background[..., 3] = np.arange(64, dtype=np.uint8)[np.newaxis, :] * 4
    face = np.full((32, 32, 3), 200, dtype=np.uint8)
    shift = np.array([[1.0, 0.0, 16.0], [0.0, 1.0, 16.0]])
    pasted = paste_back(background, face, shift)
    np.testing.assert_array_equal(pasted[..., 3], background[..., 3])
    assert pasted[32, 32, 0] == 200


def test_unsupported_arrays_raise_value_error() -> None:
    face = np.zeros((32, 32, 3), dtype=np.uint8)
    shift = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with pytest.raises(ValueError):
        paste_back(np.zeros((64, 64, 3), dtype=np.float32), face, shift)
    with pytest.raises(ValueError):
        paste_back(np.zeros((64, 64), dtype=np.uint8), face, shift)
    with pytest.raises(ValueError):
        paste_back(np.zeros((64, 64, 3), dtype=np.uint8), face, np.full((2, 3), np.nan))


# --- composite stage -----------------------------------------------------------------------


def test_composite_puts_later_faces_on_top() -> None:
    background = np.full((200, 200, 3), 100, dtype=np.uint8)
    dark = np.full((100, 100, 3), 20, dtype=np.uint8)
    light = np.full((100, 100, 3), 230, dtype=np.uint8)
    first = EnhancedFace(dark, np.array([[1.0, 0.0, 30.0], [0.0, 1.0, 30.0]]), face_index=0)
    second = EnhancedFace(light, np.array([[1.0, 0.0, 70.0], [0.0, 1.0, 70.0]]), face_index=1)
    composited = composite_faces(read_only(background), [first, second])
    assert np.all(composited[120, 120] == 230)  # overlap: the later face
    assert np.all(composited[60, 60] == 20)  # only the first face
    np.testing.assert_array_equal(composited[5, 5], background[5, 5])
    np.testing.assert_array_equal(
        composited,
        paste_back(
            paste_back(background, dark, first.inverse_affine_matrix),
            light,
            second.inverse_affine_matrix,
        ),
    )
    reversed_order = composite_faces(background, [second, first])
    assert np.all(reversed_order[120, 120] == 20)


def test_prepared_pastes_are_box_sized_and_read_only() -> None:
    background = np.full((300, 400, 3), 100, dtype=np.uint8)
    face = np.full((256, 256, 3), 200, dtype=np.uint8)
    half = np.array([[0.5, 0.0, 250.0], [0.0, 0.5, 100.0]])
    enhanced = EnhancedFace(face, half, background_scale=1.0, face_index=3)
    paste = prepare_face_paste(enhanced, background.shape)
    assert isinstance(paste, FacePaste) and paste.face_index == 3
    assert paste.patch.shape[:2] == (paste.box.height, paste.box.width)
    assert paste.soft_mask.shape == (paste.box.height, paste.box.width)
    assert paste.box.width <= 133 and paste.box.height <= 133
    assert not paste.patch.flags.writeable and not paste.soft_mask.flags.writeable
    assert not enhanced.enhanced_crop.flags.writeable
    assert face.flags.writeable  # the caller's own array is left alone
    with pytest.raises(ValueError):
        EnhancedFace(face, np.eye(3))
    np.testing.assert_array_equal(
        composite_face_pastes(background, [paste]), composite_faces(background, [enhanced])
    )
    unchanged = composite_faces(background, [])
    np.testing.assert_array_equal(unchanged, background)
    assert unchanged is not background
