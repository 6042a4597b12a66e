"""The detect stage's pure parts: shrink a large photo for the detector, read its answer.

The detector itself is remote (a model server's ``face-detector`` or any v2 model with the
same tensors: ``boxes`` FP32 [N,4], ``scores`` FP32 [N], ``landmarks`` FP32 [N,5,2]); the
pipeline calls it. HOG finds faces as well on a 2048 px copy as on a 24 MP original, in a
fraction of the time, so large photos are shrunk first and the results scaled back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from chaoqing.errors import BadModelResponse
from chaoqing.gateway.stages.face_geometry import DLIB_5_TEMPLATE_512, FFHQ_TEMPLATE_512

__all__ = [
    "DETECTOR_OUTPUTS",
    "LANDMARK_TEMPLATES",
    "DetectedFace",
    "alignment_template",
    "faces_from_detections",
    "shrink_for_detection",
]

DETECTOR_OUTPUTS = ("boxes", "scores", "landmarks")
LANDMARK_COUNT = 5

# A detector's metadata ``landmark_convention`` → the 512 px template its 5 points align to:
# CenterFace gives FFHQ's own points (eye centres, nose tip, mouth corners), dlib's predictor
# eye corners and the base of the nose (face_geometry.DLIB_5_TEMPLATE_512 maps them to FFHQ).
LANDMARK_TEMPLATES: Mapping[str, npt.NDArray[np.float64]] = {
    "ffhq-5": FFHQ_TEMPLATE_512,
    "dlib-5": DLIB_5_TEMPLATE_512,
}


def alignment_template(parameters: Mapping[str, object], detector_name: str) -> npt.NDArray[np.float64]:
    """The template a detector's landmarks align to, from its metadata ``parameters``: the
    template of a known ``landmark_convention``; else its ``alignment_template_512``; else
    FFHQ's 5 points.

    Raises BadModelResponse for an unknown convention without a template, or a template that
    is not [5,2] finite numbers."""
    convention = parameters.get("landmark_convention")
    if isinstance(convention, str) and convention in LANDMARK_TEMPLATES:
        return LANDMARK_TEMPLATES[convention]
    raw = parameters.get("alignment_template_512")
    if raw is None:
        if convention is not None:
            raise BadModelResponse(
                f"detector {detector_name}: landmark_convention {convention!r} is not one of "
                f"{', '.join(LANDMARK_TEMPLATES)} and it publishes no alignment_template_512"
            )
        return FFHQ_TEMPLATE_512
    try:
        template = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        template = np.zeros(0)
    if template.shape != (LANDMARK_COUNT, 2) or not np.all(np.isfinite(template)):
        raise BadModelResponse(f"detector {detector_name}: alignment_template_512 is not [5,2] numbers")
    return template


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face in original-image pixels: box (x1, y1, x2, y2), score, 5 landmarks [5, 2]."""

    index: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: npt.NDArray[np.float64]


def shrink_for_detection(rgb: npt.NDArray[np.uint8], max_side: int) -> tuple[npt.NDArray[np.uint8], float]:
    """A copy no larger than ``max_side`` on its long side (INTER_AREA), and the factor
    original/shrunk to scale detections back (1.0 when the photo is already small enough;
    the photo itself is returned then)."""
    height, width = rgb.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return rgb, 1.0
    factor = longest / max_side
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    shrunk = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(shrunk), width / size[0]


def faces_from_detections(
    outputs: Mapping[str, np.ndarray], factor: float, image_shape: tuple[int, ...]
) -> list[DetectedFace]:
    """Validate the detector's tensors and scale them to the original image.

    Faces with non-finite numbers are dropped. Raises BadModelResponse when the tensors do
    not fit together (shapes, counts).
    """
    boxes, scores, landmarks = (np.asarray(outputs[name], dtype=np.float64) for name in DETECTOR_OUTPUTS)
    count = boxes.shape[0] if boxes.ndim == 2 else -1
    if scores.shape == (count, 1):  # [N, 1]: a server that takes the first dimension for a batch (MLServer's codec)
        scores = scores.reshape(count)
    if (
        boxes.shape != (count, 4)
        or scores.shape != (count,)
        or landmarks.shape != (count, LANDMARK_COUNT, 2)
    ):
        raise BadModelResponse(
            f"detector returned boxes {list(boxes.shape)}, scores {list(scores.shape)}, "
            f"landmarks {list(landmarks.shape)}; expected [N,4], [N], [N,5,2]"
        )
    height, width = image_shape[:2]
    faces: list[DetectedFace] = []
    for index in range(count):
        if not (np.all(np.isfinite(boxes[index])) and np.all(np.isfinite(landmarks[index])) and np.isfinite(scores[index])):
            continue
        # detections are in shrunk-image pixel centres; map back through the resize
        box = boxes[index] * factor
        points = (landmarks[index] + 0.5) * factor - 0.5
        x1, y1, x2, y2 = (float(value) for value in box)
        faces.append(
            DetectedFace(
                index=len(faces),
                box=(max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)),
                score=float(scores[index]),
                landmarks=points,
            )
        )
    return faces
