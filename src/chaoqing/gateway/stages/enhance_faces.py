"""The face stage's pure parts: size and align each face's crop, read the model's answer.

The face model is remote; :mod:`chaoqing.gateway.pipeline` runs one greenlet per face that calls
:func:`align_face` (threadpool), the model, :func:`enhanced_face_from`, then
:func:`chaoqing.gateway.stages.composite.prepare_face_paste` (threadpool).

Crop size: a model with a fixed input (a 512 px GFPGAN export) gets exactly that. A model
that takes any size (Real-ESRGAN ×4) gets the smallest multiple of 16 that, after the
model's scale, covers the face as large as it will appear in the output, between
``MIN_CROP_SIZE`` and the configured ``face_input_size``: small faces cost little, large
ones are bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from chaoqing.errors import BadModelResponse
from chaoqing.gateway.stages.composite import EnhancedFace
from chaoqing.gateway.stages.detect import DetectedFace
from chaoqing.gateway.stages.face_geometry import (
    TEMPLATE_SIZE,
    estimate_affine_matrix,
    invert_affine_matrix,
    warp_face_by_landmarks,
)

__all__ = ["MIN_CROP_SIZE", "FaceCrop", "align_face", "choose_crop_size", "enhanced_face_from", "face_size_in_image"]

MIN_CROP_SIZE = 64
CROP_MULTIPLE = 16


@dataclass(frozen=True, eq=False)
class FaceCrop:
    """One aligned face: the crop sent to the face model and the image → crop matrix."""

    face_index: int
    crop: npt.NDArray[np.uint8]
    affine_matrix: npt.NDArray[np.float64]


def face_size_in_image(landmarks: npt.NDArray[np.float64], template_512: npt.NDArray[np.float64]) -> float:
    """Side, in image pixels, of the 512 px aligned crop of this face (works for any 5-point
    layout: it is the inverse of the alignment's scale). Raises DegenerateLandmarks."""
    matrix = estimate_affine_matrix(landmarks, template_512)
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    return TEMPLATE_SIZE / scale


def choose_crop_size(
    face_side_in_image: float,
    background_scale: float,
    model_scale: float,
    fixed_size: int | None,
    max_size: int,
) -> int:
    """The crop side for one face (see the module notes)."""
    if fixed_size:
        return fixed_size
    wanted = face_side_in_image * background_scale / max(model_scale, 1e-6)
    rounded = math.ceil(wanted / CROP_MULTIPLE) * CROP_MULTIPLE
    return int(min(max(rounded, MIN_CROP_SIZE), max(max_size, MIN_CROP_SIZE)))


def align_face(
    rgb: npt.NDArray[np.uint8], face: DetectedFace, template_512: npt.NDArray[np.float64], crop_size: int
) -> FaceCrop:
    """Warp one face to the template at ``crop_size`` (BORDER_REPLICATE). Raises DegenerateLandmarks."""
    crop, affine_matrix = warp_face_by_landmarks(rgb, face.landmarks, template_512, crop_size)
    return FaceCrop(face.index, np.ascontiguousarray(crop), affine_matrix)


def enhanced_face_from(
    crop: FaceCrop, model_output: np.ndarray, background_scale: float, model_name: str
) -> EnhancedFace:
    """Check the face model's output [1, h, w, 3] and pair it with its paste-back matrix.

    The model's scale is read off the output itself (h / crop side), so a model whose
    metadata says nothing still pastes correctly. Raises BadModelResponse.
    """
    side = crop.crop.shape[0]
    if model_output.ndim != 4 or model_output.shape[0] != 1 or model_output.shape[3] != 3:
        raise BadModelResponse(f"face model {model_name} returned shape {list(model_output.shape)}, expected [1,h,w,3]")
    height, width = model_output.shape[1:3]
    if height != width or height < 1:
        raise BadModelResponse(f"face model {model_name} returned a {width}×{height} face for a square crop")
    if model_output.dtype != np.uint8:
        raise BadModelResponse(f"face model {model_name} returned {model_output.dtype}, expected uint8")
    model_scale = height / side
    inverse = invert_affine_matrix(crop.affine_matrix, background_scale, model_scale)
    return EnhancedFace(model_output[0], inverse, background_scale, crop.face_index)
