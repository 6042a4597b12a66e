"""The face stage's pure parts: size and align each face's crop, read the model's answer.

The face model is remote; :mod:`chaoqing.gateway.pipeline` runs one greenlet per face that calls
:func:`align_face` (threadpool), the model, :func:`enhanced_face_from`, then
:func:`chaoqing.gateway.stages.composite.prepare_face_paste` (threadpool).

Crop size: a model with a fixed input (a 512 px GFPGAN export) gets exactly that. A model
that takes any size (Real-ESRGAN ×4) gets the smallest multiple of 16 that, after the
model's scale, covers the face as large as it will appear in the output, between
``MIN_CROP_SIZE`` (or the preset's ``face_min_crop``, which wins) and the configured
``face_input_size``: small faces cost little, large ones are bounded. A preset's
``face_min_crop`` above the fit supersamples: the model's answer is shrunk onto the face
(balanced: 128 px for every face, which measured closer to the photo's own face than the fit,
docs/faces.md).

Template: faces align to FFHQ's 5 points (the detector's convention says where its points land
in such a crop, :func:`~chaoqing.gateway.stages.detect.alignment_template`), unless the face
model's metadata names another (``parameters.face_template``, a user's face restorer:
``arcface-128`` for GPEN-BFR-256); :func:`face_model_template` carries the detector's template
into that layout.

Inputs: the crop as ``image``; a model that lists a ``weight`` input (CodeFormer's fidelity)
gets the request's or preset's ``face_fidelity`` there, or its own default when neither says
(:func:`face_model_inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from chaoqing.errors import BadModelResponse
from chaoqing.gateway.stages.composite import EnhancedFace
from chaoqing.gateway.stages.detect import DetectedFace
from chaoqing.gateway.stages.face_geometry import (
    FFHQ_TEMPLATE_512,
    TEMPLATE_SIZE,
    estimate_affine_matrix,
    invert_affine_matrix,
    warp_face_by_landmarks,
)

__all__ = [
    "FACE_MODEL_TEMPLATES",
    "MIN_CROP_SIZE",
    "FaceCrop",
    "align_face",
    "choose_crop_size",
    "enhanced_face_from",
    "face_model_inputs",
    "face_model_template",
    "face_size_in_image",
]

MIN_CROP_SIZE = 64
CROP_MULTIPLE = 16

# FaceFusion face_helper WARP_TEMPLATE_SET['arcface_128'] (fractions of the crop's side) at 512 px:
# the layout GPEN-BFR-256 is trained on, tighter around the face than FFHQ's.
ARCFACE_128_TEMPLATE_512 = np.array(
    [
        [0.36167656, 0.40387734],
        [0.63696719, 0.40235469],
        [0.50019687, 0.56044219],
        [0.38710391, 0.72160547],
        [0.61507734, 0.72034453],
    ],
    dtype=np.float64,
) * TEMPLATE_SIZE
ARCFACE_128_TEMPLATE_512.setflags(write=False)

# A face model's metadata ``face_template`` → where FFHQ's 5 points (eye centres, nose tip, mouth
# corners) lie in its 512 px crop (chaoqing.config.FACE_TEMPLATES names the same).
FACE_MODEL_TEMPLATES: Mapping[str, npt.NDArray[np.float64]] = {
    "ffhq-512": FFHQ_TEMPLATE_512,
    "arcface-128": ARCFACE_128_TEMPLATE_512,
}
FACE_TEMPLATE_PARAMETER = "face_template"
WEIGHT_INPUT = "weight"


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
    min_size: int | None = None,
) -> int:
    """The crop side for one face (see the module notes); ``min_size``: the preset's
    ``face_min_crop`` (None: ``MIN_CROP_SIZE``)."""
    if fixed_size:
        return fixed_size
    wanted = face_side_in_image * background_scale / max(model_scale, 1e-6)
    rounded = math.ceil(wanted / CROP_MULTIPLE) * CROP_MULTIPLE
    floor = MIN_CROP_SIZE if min_size is None else min_size
    return int(min(max(rounded, floor), max(max_size, floor)))


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


def face_model_template(
    detector_template: npt.NDArray[np.float64], parameters: Mapping[str, object], model_name: str
) -> npt.NDArray[np.float64]:
    """The 512 px template the detector's landmarks align to for this face model.

    ``detector_template`` (where the detector's points land in an FFHQ crop) itself when the
    model names no template or ``ffhq-512``; else the model's layout: its points when the
    detector's are FFHQ's own, otherwise the detector's template carried by the similarity
    that takes FFHQ's points to the model's.

    Raises BadModelResponse for a template name the gateway does not know.
    """
    name = parameters.get(FACE_TEMPLATE_PARAMETER)
    if name is None or name == "ffhq-512":
        return detector_template
    target = FACE_MODEL_TEMPLATES.get(name) if isinstance(name, str) else None
    if target is None:
        raise BadModelResponse(f"face model {model_name}: face_template {name!r} is not one of "
                               f"{', '.join(FACE_MODEL_TEMPLATES)}")
    if np.array_equal(detector_template, FFHQ_TEMPLATE_512):
        return target
    ffhq_to_model = estimate_affine_matrix(FFHQ_TEMPLATE_512, target)
    carried: npt.NDArray[np.float64] = detector_template @ ffhq_to_model[:, :2].T + ffhq_to_model[:, 2]
    return carried


def face_model_inputs(crop: FaceCrop, takes_weight: bool, fidelity: float | None) -> dict[str, np.ndarray]:
    """The face model's inputs: the crop as ``image`` [1,S,S,3]; and ``weight`` FP32 [1,1] when
    the model takes one and a fidelity is asked for (else the model's own default applies)."""
    inputs: dict[str, np.ndarray] = {"image": crop.crop[None]}
    if takes_weight and fidelity is not None:
        inputs[WEIGHT_INPUT] = np.array([[fidelity]], dtype=np.float32)
    return inputs
