"""Simulated models, for tests and benchmarks only: created when named, never otherwise.

They honour the real models' tensor contracts and metadata, compute something cheap and
deterministic, and declare ``simulated_latency_s`` (from ``sim_latency_ms``): the model
server waits that long per batch cooperatively, as if the call ran on hardware of its own.
:meth:`Runner.run` itself never sleeps.

- ``sim-upscale-x2`` / ``sim-upscale-x4``: ``image`` UINT8 [B,H,W,3] → [B,sH,sW,3], a
  nearest-neighbour resize (each pixel becomes an s×s block).
- ``sim-face``: like ``realesrgan-x4plus`` used on aligned faces: [B,H,W,3] → [B,4H,4W,3],
  nearest-neighbour ×4, then every channel brightened by :data:`FACE_MARK_LEVELS`
  (saturating at 255), so a test can tell pasted faces from the ×4 background: a face pixel
  is the background's value plus 16, except where that would pass 255.
- ``sim-detector``: the face detector's contract and metadata; returns ``faces`` squares laid
  out on a grid over the image (row by row, ⌈√faces⌉ columns), each
  :data:`FACE_FILL_FRACTION` of its cell's shorter side and centred in it, with landmarks in
  dlib's 5-point order placed by the FFHQ alignment template scaled into the box, and scores
  descending from 2.0 to 1.0. No faces when the squares would be under
  :data:`MIN_FACE_SIDE_PX` pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import cv2
import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec, image_batch
from chaoqing.modelserver.runners.dlib_detector import (
    ALIGNMENT_TEMPLATE_512,
    detector_spec,
    empty_detections,
    validate_image,
)

__all__ = [
    "FACE_FILL_FRACTION",
    "FACE_MARK_LEVELS",
    "MIN_FACE_SIDE_PX",
    "SimFaceDetector",
    "SimUpscaler",
]

SIM_PLATFORM = "sim"
FACE_MARK_LEVELS = 16
FACE_FILL_FRACTION = 0.8
MIN_FACE_SIDE_PX = 16
TOP_SCORE = 2.0
BOTTOM_SCORE = 1.0
TEMPLATE_SIZE_PX = 512.0


class SimUpscaler(Runner):
    """Nearest-neighbour ×``scale``; with ``mark_faces`` also brightens (``sim-face``)."""

    def __init__(
        self,
        name: str,
        scale: int,
        *,
        latency_s: float = 0.0,
        max_batch_size: int = 8,
        mark_faces: bool = False,
    ) -> None:
        """Raises RunnerError when ``scale`` < 1, ``latency_s`` < 0 or ``max_batch_size`` < 1."""
        if scale < 1 or latency_s < 0 or max_batch_size < 1:
            raise RunnerError("scale and max_batch_size must be >= 1, latency >= 0")
        self.scale = scale
        self.mark_faces = mark_faces
        self.simulated_latency_s = latency_s
        self.spec = ModelSpec(
            name=name,
            platform=SIM_PLATFORM,
            inputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            max_batch_size=max_batch_size,
            parameters={"scale": scale},
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Resize every image of ``inputs["image"]`` (UINT8 [B,H,W,3]).

        Raises RunnerError when the input is missing or malformed.
        """
        images = image_batch(inputs)
        batch_size, height, width, _ = images.shape
        scale = self.scale
        upscaled = np.empty((batch_size, height * scale, width * scale, 3), dtype=np.uint8)
        for index in range(batch_size):
            cv2.resize(
                images[index],
                (width * scale, height * scale),
                dst=upscaled[index],
                interpolation=cv2.INTER_NEAREST,
            )
        if self.mark_faces:
            np.minimum(upscaled, 255 - FACE_MARK_LEVELS, out=upscaled)
            upscaled += FACE_MARK_LEVELS
        return {"image": upscaled}


class SimFaceDetector(Runner):
    """``faces`` deterministic faces on a grid; the face detector's contract and metadata."""

    def __init__(self, name: str, *, faces: int = 2, latency_s: float = 0.0) -> None:
        """Raises RunnerError when ``faces`` or ``latency_s`` is negative."""
        if faces < 0 or latency_s < 0:
            raise RunnerError("faces and latency must be >= 0")
        self.faces = faces
        self.simulated_latency_s = latency_s
        self.spec = detector_spec(name, SIM_PLATFORM, {"faces": faces})

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Lay out the faces over ``inputs["image"]`` (UINT8 [H,W,3]).

        Raises RunnerError when the input is missing or malformed.
        """
        image = validate_image(inputs)
        height, width, _ = image.shape
        if self.faces == 0:
            return empty_detections()
        columns = math.ceil(math.sqrt(self.faces))
        rows = math.ceil(self.faces / columns)
        cell_width = width / columns
        cell_height = height / rows
        side = math.floor(FACE_FILL_FRACTION * min(cell_width, cell_height))
        if side < MIN_FACE_SIDE_PX:
            return empty_detections()
        indices = np.arange(self.faces)
        centers_x = (indices % columns + 0.5) * cell_width
        centers_y = (indices // columns + 0.5) * cell_height
        left = np.floor(centers_x - side / 2)
        top = np.floor(centers_y - side / 2)
        boxes = np.stack([left, top, left + side, top + side], axis=1).astype(np.float32)
        template = np.array(ALIGNMENT_TEMPLATE_512, dtype=np.float32) * (side / TEMPLATE_SIZE_PX)
        landmarks = template[np.newaxis] + boxes[:, np.newaxis, :2]
        scores = np.linspace(TOP_SCORE, BOTTOM_SCORE, self.faces, dtype=np.float32)
        return {
            "boxes": boxes,
            "scores": scores,
            "landmarks": np.ascontiguousarray(landmarks, dtype=np.float32),
        }
