"""Simulated models, for tests and benchmarks only: created when named, never otherwise.

They honour the real models' tensor contracts and metadata, compute something cheap and
deterministic, and take as long as they are told: :meth:`Runner.run` waits
``latency_ms`` per batch, then computes. The settings are their own (:class:`SimSettings`,
from the model server's ``--model-option KEY=VALUE``); nothing else in the server knows
about simulators.

How the latency is waited. The batcher calls a real runner on a native thread per model
instance; a simulator sleeping there would need one thread per simulated call in flight
(16 faces at once in ``chaoqing bench fanout``) and would overlap only as far as the threads
went. So a simulator sets the generic :attr:`Runner.runs_on_hub`: the batcher calls it in a
greenlet on the hub, where it waits with ``gevent.sleep`` (any number at once, each exactly
its latency, as if every call had hardware of its own) and hands its outputs, a
nearest-neighbour resize that grows with the image, to the hub's small thread pool so the hub
keeps answering. ``concurrency`` N > 0 makes it one accelerator: it declares
:attr:`Runner.max_concurrent_batches` = N, and the batcher starts no more batches than that.
The limit is declared rather than taken by a semaphore inside :meth:`run` so that the
batcher keeps doing what it does for a busy real model: requests wait in its bounded queue
(a full queue answers 503), a request abandoned while queued is never computed, and batches
grow while the model is busy. A semaphore inside :meth:`run` would empty that queue into
batches parked on the semaphore, computing abandoned calls and never refusing one.

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
from dataclasses import dataclass, fields

import cv2
import gevent
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
    "SimSettings",
    "SimUpscaler",
]

SIM_PLATFORM = "sim"
FACE_MARK_LEVELS = 16
FACE_FILL_FRACTION = 0.8
MIN_FACE_SIDE_PX = 16
TOP_SCORE = 2.0
BOTTOM_SCORE = 1.0
TEMPLATE_SIZE_PX = 512.0
MILLISECONDS = 1e-3


@dataclass(frozen=True)
class SimSettings:
    """What a simulator is told, from the model server's ``--model-option KEY=VALUE``.

    - ``latency_ms``: how long each batch takes, waited cooperatively.
    - ``faces``: how many faces ``sim-detector`` reports (the upscalers ignore it).
    - ``concurrency``: batches the model takes at once; 0 = no limit, as if every batch had
      hardware of its own. 1, with the server's ``--max-batch-size 1``, makes one sim server
      compute one call at a time, like one accelerator.

    Raises RunnerError when a value is negative or ``latency_ms`` is not finite.
    """

    latency_ms: float = 0.0
    faces: int = 2
    concurrency: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0) or self.faces < 0 or self.concurrency < 0:
            raise RunnerError(
                f"sim options must be >= 0 (latency_ms finite): latency_ms={self.latency_ms}, "
                f"faces={self.faces}, concurrency={self.concurrency}"
            )

    @property
    def latency_s(self) -> float:
        return self.latency_ms * MILLISECONDS

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> SimSettings:
        """Settings from ``KEY=VALUE`` model options (strings, as the command line gives them).

        Raises RunnerError for an unknown key, or a value that is not a number >= 0
        (``faces`` and ``concurrency`` are integers).
        """
        known = [item.name for item in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise RunnerError(f"unknown sim option(s) {', '.join(unknown)}; the simulators take {', '.join(known)}")
        try:
            return cls(
                latency_ms=float(options.get("latency_ms", cls.latency_ms)),
                faces=int(options.get("faces", cls.faces)),
                concurrency=int(options.get("concurrency", cls.concurrency)),
            )
        except ValueError as exc:
            raise RunnerError(f"sim options {dict(options)}: {exc}") from None


def _wait_latency(settings: SimSettings) -> None:
    if settings.latency_ms > 0:
        gevent.sleep(settings.latency_s)


class SimUpscaler(Runner):
    """Nearest-neighbour ×``scale``; with ``mark_faces`` also brightens (``sim-face``)."""

    runs_on_hub = True
    holds_compute_slot = False  # waits, computes next to nothing: as if on hardware of its own

    def __init__(
        self,
        name: str,
        scale: int,
        *,
        settings: SimSettings = SimSettings(),
        max_batch_size: int = 8,
        mark_faces: bool = False,
    ) -> None:
        """Raises RunnerError when ``scale`` or ``max_batch_size`` is below 1."""
        if scale < 1 or max_batch_size < 1:
            raise RunnerError("scale and max_batch_size must be >= 1")
        self.scale = scale
        self.mark_faces = mark_faces
        self.settings = settings
        self.max_concurrent_batches = settings.concurrency
        self.spec = ModelSpec(
            name=name,
            platform=SIM_PLATFORM,
            inputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            max_batch_size=max_batch_size,
            parameters={"scale": scale},
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Wait the latency, then resize every image of ``inputs["image"]`` (UINT8 [B,H,W,3])
        on the hub's thread pool. Call from a greenlet.

        Raises RunnerError when the input is missing or malformed.
        """
        images = image_batch(inputs)
        _wait_latency(self.settings)
        upscaled: np.ndarray = gevent.get_hub().threadpool.apply(self._upscale, (images,))
        return {"image": upscaled}

    def _upscale(self, images: np.ndarray) -> np.ndarray:
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
        return upscaled


class SimFaceDetector(Runner):
    """``faces`` deterministic faces on a grid; the face detector's contract and metadata."""

    runs_on_hub = True
    holds_compute_slot = False  # waits, computes next to nothing: as if on hardware of its own

    def __init__(self, name: str, *, settings: SimSettings = SimSettings()) -> None:
        self.faces = settings.faces
        self.settings = settings
        self.max_concurrent_batches = settings.concurrency
        self.spec = detector_spec(name, SIM_PLATFORM, {"faces": settings.faces})

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Wait the latency, then lay out the faces over ``inputs["image"]`` (UINT8 [H,W,3]);
        a few small arrays, computed on the hub. Call from a greenlet.

        Raises RunnerError when the input is missing or malformed.
        """
        image = validate_image(inputs)
        _wait_latency(self.settings)
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
