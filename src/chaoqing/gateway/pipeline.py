"""The enhancement pipeline: one photo in, fanned out over model servers, one photo out.

::

    decode (threadpool)
      ├─ spawn: upscale the background (and alpha) ──▶ upscaler model server(s)
      └─ spawn: detect faces ──▶ detector
               └─ per face, spawn: align (threadpool) → enhance ──▶ face model
                                  → inverse warp + soft mask (threadpool)
    join under the request deadline; check each greenlet; composite (threadpool); encode (threadpool)

Policies (named, not scattered):

- the background failing fails the request (its error decides the status: 502/503/504);
- detection failing fails the request too (the seed's rule: every branch must succeed);
- one face failing, or not finishing before ``FACE_DEADLINE_RESERVE`` ahead of the request
  deadline, keeps the background's pixels for that face; the result counts it;
- on any failure or at the deadline, every greenlet still running is killed.

All state is per request: nothing here is shared between greenlets except read-only
arrays. Remote calls happen only in greenlets of this hub; pixel work only in the
threadpool. ``sequential=True`` runs the same stages one after another, the way the
GFPGAN / Real-ESRGAN command-line tools do, for benchmarks.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gevent
import numpy as np
import numpy.typing as npt
from gevent.lock import BoundedSemaphore

from chaoqing.config import Config
from chaoqing.errors import BadModelResponse, ChaoqingError, DeadlineExceeded
from chaoqing.gateway.remote import CallObserver, RemoteModel, RemoteModels
from chaoqing.gateway.stages.composite import (
    FacePaste,
    composite_face_pastes_in_place,
    prepare_face_paste,
)
from chaoqing.gateway.stages.decode import (
    DecodedImage,
    check_media_type,
    check_output_size,
    decode_image,
    to_8_bit,
)
from chaoqing.gateway.stages.detect import (
    DETECTOR_OUTPUTS,
    DetectedFace,
    faces_from_detections,
    shrink_for_detection,
)
from chaoqing.gateway.stages.encode import (
    MEDIA_TYPES,
    check_encodable,
    choose_output_format,
    encode_image,
)
from chaoqing.gateway.stages.enhance_faces import (
    align_face,
    choose_crop_size,
    enhanced_face_from,
    face_size_in_image,
)
from chaoqing.gateway.stages.face_geometry import FFHQ_TEMPLATE_512
from chaoqing.gateway.stages.resize import restore_bit_depth
from chaoqing.gateway.stages.upscale import upscale_image

__all__ = [
    "FACE_DEADLINE_RESERVE",
    "EnhanceOptions",
    "EnhanceResult",
    "PipelineServices",
    "enhance_photo",
    "quiet_expected_errors",
    "return_freed_memory_promptly",
]

_log = logging.getLogger("chaoqing.gateway.pipeline")

T = TypeVar("T")

# Faces must be done this long before the request deadline (or this fraction of the whole
# budget, whichever is smaller), so a slow face leaves time to composite and encode the rest.
FACE_DEADLINE_RESERVE = 2.0
FACE_DEADLINE_RESERVE_FRACTION = 0.1
MAX_FACES_IN_FLIGHT = 32


@dataclass(frozen=True)
class EnhanceOptions:
    """What one request asks for (already validated by the HTTP layer or the CLI)."""

    scale: float = 2.0
    faces: bool = True
    preset: str = "balanced"
    output_format: str | None = None
    quality: int | None = None
    request_id: str = ""
    sequential: bool = False


@dataclass(frozen=True)
class EnhanceResult:
    """The encoded photo and what it took."""

    data: bytes
    media_type: str
    output_format: str
    width: int
    height: int
    faces_detected: int
    faces_enhanced: int
    face_errors: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineServices:
    """What the pipeline needs from the process: config and the remote models."""

    config: Config
    remotes: RemoteModels
    observer: CallObserver | None = None


def quiet_expected_errors() -> None:
    """Stop this thread's hub from printing a traceback for every greenlet that ends in a
    ChaoqingError: the pipeline checks each greenlet and answers those errors itself.
    Call once at start-up of a process that runs the pipeline."""
    hub = gevent.get_hub()
    if ChaoqingError not in hub.NOT_ERROR:
        hub.NOT_ERROR = (*hub.NOT_ERROR, ChaoqingError)


# glibc malloc.h: mallopt's parameter for the size from which blocks are mmap'ed (and given
# back to the kernel as soon as they are freed).
GLIBC_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 1024 * 1024


def return_freed_memory_promptly() -> bool:
    """Have glibc's malloc map every block of ``LARGE_BLOCK_BYTES`` or more on its own and
    unmap it when freed. By default the threshold climbs (up to 32 MiB) each time a large
    block is freed, after which image-sized blocks (Pillow's 16 MiB blocks, tiles,
    temporaries) come from per-thread heaps that keep them: measured with a 12 MP photo to
    2× (docs/tiling.md), the gateway's peak went from 580 to 508 MiB and its resident memory
    after the request from 350 to 140 MiB. Call once at start-up of a gateway process (the
    environment variable ``MALLOC_MMAP_THRESHOLD_=1048576`` does the same, e.g. under
    gunicorn). Returns False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(GLIBC_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))


def offload(function: Callable[..., T], *arguments: Any) -> T:
    """Run CPU work in C (cv2, numpy, Pillow release the GIL) on gevent's native threadpool."""
    result: T = gevent.get_hub().threadpool.apply(function, arguments)
    return result


class _StageTimer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.monotonic() - started


@dataclass(frozen=True)
class _FaceOutcome:
    detected: int
    pastes: tuple[FacePaste, ...]
    errors: tuple[str, ...]


NO_FACES = _FaceOutcome(0, (), ())


def _composite(background: npt.NDArray[Any], pastes: tuple[FacePaste, ...]) -> npt.NDArray[Any]:
    """Faces go into the colour channels only; alpha stays the background's. In place: the
    background is this request's own new array, and a copy would cost 3 bytes per output
    pixel (144 MB at 48 MP)."""
    canvas = background if background.flags.writeable else background.copy()
    composite_face_pastes_in_place(canvas, pastes)
    return canvas


@dataclass(frozen=True)
class _Request:
    """Everything the branches of one request share, all read-only."""

    decoded: DecodedImage
    rgb8: npt.NDArray[np.uint8]
    options: EnhanceOptions
    config: Config
    remotes: RemoteModels
    output_size: tuple[int, int]  # width, height
    deadline: float
    timer: _StageTimer

    @property
    def background_scale(self) -> float:
        width, height = self.output_size
        return (width / self.decoded.width + height / self.decoded.height) / 2


def enhance_photo(data: bytes, media_type: str | None, options: EnhanceOptions, services: PipelineServices) -> EnhanceResult:
    """Enhance one encoded photo. Raises ChaoqingError subclasses (see module notes)."""
    config = services.config
    started = time.monotonic()
    deadline = started + config.request_deadline_s
    timer = _StageTimer()
    preset = config.presets[options.preset]
    with timer("decode"):
        check_media_type(media_type, data)
        decoded = offload(decode_image, data, config.limits)
        check_output_size(decoded.width, decoded.height, options.scale, config.limits)
        output_format = choose_output_format(options.output_format, decoded)
        output_size = (max(1, round(decoded.width * options.scale)), max(1, round(decoded.height * options.scale)))
        check_encodable(output_format, *output_size)
        rgb8: npt.NDArray[np.uint8] = offload(to_8_bit, decoded.rgb)  # the same array when already 8-bit
    request = _Request(decoded, rgb8, options, config, services.remotes, output_size, deadline, timer)
    face_model = preset.face_model if options.faces else None

    if options.sequential:
        background = _upscale_background(request, preset.upscaler)
        faces = _enhance_faces(request, face_model, sequential=True) if face_model else NO_FACES
    else:
        branches = [gevent.spawn(_upscale_background, request, preset.upscaler)]
        if face_model:
            branches.append(gevent.spawn(_enhance_faces, request, face_model, sequential=False))
        try:
            finished = gevent.joinall(branches, timeout=max(0.0, deadline - time.monotonic()))
            if len(finished) < len(branches):
                raise DeadlineExceeded(f"the request did not finish within {config.request_deadline_s:g} s")
            for branch in branches:
                if not branch.successful():
                    raise branch.exception
        finally:
            gevent.killall([branch for branch in branches if not branch.dead], block=False)
        background = branches[0].value
        faces = branches[1].value if face_model else NO_FACES

    with timer("composite"):
        canvas = offload(_composite, background, faces.pastes) if faces.pastes else background
    with timer("encode"):
        alpha = canvas[:, :, 3] if canvas.shape[2] == 4 else None
        encoded = offload(
            encode_image, canvas[:, :, :3], alpha, output_format, options.quality, decoded.icc_profile, decoded.bit_depth
        )
    timer.timings["total"] = time.monotonic() - started
    return EnhanceResult(
        data=encoded,
        media_type=MEDIA_TYPES[output_format],
        output_format=output_format,
        width=output_size[0],
        height=output_size[1],
        faces_detected=faces.detected,
        faces_enhanced=len(faces.pastes),
        face_errors=faces.errors,
        timings=timer.timings,
    )


# -- the background branch ---------------------------------------------------------------


def _upscale_background(request: _Request, model_name: str) -> npt.NDArray[Any]:
    """The background at the output size: RGB (+ alpha as a 4th channel), 8 or 16 bits."""
    model = request.remotes[model_name]
    with request.timer("upscale"):
        alpha = request.decoded.alpha
        if alpha is not None and not _is_opaque(alpha):
            # alpha goes through the same model as a grey image, concurrently with the colour
            grey = np.repeat(to_8_bit(alpha)[:, :, None], 3, axis=2)
            jobs = [gevent.spawn(_upscale_plane, request, model, plane) for plane in (request.rgb8, grey)]
            try:
                gevent.joinall(jobs, raise_error=True)
            finally:
                gevent.killall([job for job in jobs if not job.dead], block=False)
            colour, upscaled_alpha = jobs[0].value, jobs[1].value[:, :, 1]
        else:
            colour, upscaled_alpha = _upscale_plane(request, model, request.rgb8), None
        if request.decoded.bit_depth == 8 and alpha is None:
            return colour
        return offload(_finish_background, request.decoded, request.rgb8, colour, upscaled_alpha)


def _is_opaque(alpha: npt.NDArray[Any]) -> bool:
    return bool(alpha.min() == np.iinfo(alpha.dtype).max)


def _upscale_plane(request: _Request, model: RemoteModel, rgb8: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return upscale_image(
        model, rgb8, request.output_size, request.config.tiles, request.deadline, offload, request.options.request_id
    )


def _finish_background(
    decoded: DecodedImage, rgb8: npt.NDArray[np.uint8], colour: npt.NDArray[np.uint8], alpha: npt.NDArray[np.uint8] | None
) -> npt.NDArray[Any]:
    """Threadpool: back to 16 bits when the input had them; alpha as a 4th channel."""
    height, width = colour.shape[:2]
    planes: list[npt.NDArray[Any]] = [colour]
    if decoded.bit_depth == 16:
        planes = [restore_bit_depth(colour, decoded.rgb, rgb8)]
    if decoded.alpha is not None:
        if alpha is None:  # fully opaque: no model call was spent on it
            alpha_out = np.full((height, width), np.iinfo(decoded.alpha.dtype).max, dtype=decoded.alpha.dtype)
        elif decoded.bit_depth == 16:
            alpha_out = restore_bit_depth(alpha, decoded.alpha, to_8_bit(decoded.alpha))
        else:
            alpha_out = alpha
        planes.append(alpha_out[:, :, None])
    return np.ascontiguousarray(np.concatenate(planes, axis=2)) if len(planes) > 1 else planes[0]


# -- the face branch ---------------------------------------------------------------------


def _enhance_faces(request: _Request, face_model_name: str, *, sequential: bool) -> _FaceOutcome:
    """Detect, then enhance every face in its own greenlet; failures keep the background."""
    detector = request.remotes[request.config.detector]
    face_model = request.remotes[face_model_name]
    with request.timer("detect"):
        small, factor = offload(shrink_for_detection, request.rgb8, request.config.detection_max_side)
        detections = detector.infer({"image": small}, DETECTOR_OUTPUTS, request.deadline, request_id=request.options.request_id)
        faces = faces_from_detections(detections, factor, request.rgb8.shape)
        template = _alignment_template(detector, request.deadline)
    if not faces:
        return NO_FACES
    budget = request.deadline - time.monotonic()
    face_deadline = request.deadline - min(FACE_DEADLINE_RESERVE, budget * FACE_DEADLINE_RESERVE_FRACTION)
    with request.timer("faces"):
        if sequential:
            results: list[FacePaste | None | str] = [_try_face(request, face_model, face, template, face_deadline) for face in faces]
        else:
            gate = BoundedSemaphore(MAX_FACES_IN_FLIGHT)

            def gated(face: DetectedFace) -> FacePaste | None | str:
                with gate:
                    return _try_face(request, face_model, face, template, face_deadline)

            jobs = [gevent.spawn(gated, face) for face in faces]
            try:
                gevent.joinall(jobs, timeout=max(0.0, face_deadline - time.monotonic()))
            finally:
                gevent.killall([job for job in jobs if not job.dead], block=False)
            results = [_face_result(job, face) for job, face in zip(jobs, faces, strict=True)]
    pastes = tuple(item for item in results if isinstance(item, FacePaste))
    errors = tuple(item for item in results if isinstance(item, str))
    return _FaceOutcome(len(faces), pastes, errors)


def _alignment_template(detector: RemoteModel, deadline: float) -> npt.NDArray[np.float64]:
    """The template for the detector's landmarks (its metadata says; FFHQ's 5 points otherwise)."""
    raw = detector.metadata(deadline).parameters.get("alignment_template_512")
    if raw is None:
        return FFHQ_TEMPLATE_512
    template = np.asarray(raw, dtype=np.float64)
    if template.shape != (5, 2) or not np.all(np.isfinite(template)):
        raise BadModelResponse(f"detector {detector.name}: alignment_template_512 is not [5,2] numbers")
    return template


def _face_result(job: gevent.Greenlet, face: DetectedFace) -> FacePaste | None | str:
    if job.successful():
        value: FacePaste | None | str = job.value
        return value
    if job.exception is not None and not isinstance(job.exception, gevent.GreenletExit):
        _log.error("face %d failed unexpectedly", face.index, exc_info=job.exception)
        return f"face {face.index}: internal error"
    return f"face {face.index}: not finished by the deadline"


def _try_face(
    request: _Request, face_model: RemoteModel, face: DetectedFace, template: npt.NDArray[np.float64], deadline: float
) -> FacePaste | None | str:
    """One face: a paste, None when it is too small to enhance, or the reason it failed."""
    try:
        return _enhance_face(request, face_model, face, template, deadline)
    except ChaoqingError as exc:
        _log.warning("request %s face %d kept as background: %s", request.options.request_id, face.index, exc)
        return f"face {face.index}: {exc}"


def _enhance_face(
    request: _Request, face_model: RemoteModel, face: DetectedFace, template: npt.NDArray[np.float64], deadline: float
) -> FacePaste | None:
    side = offload(face_size_in_image, face.landmarks, template)  # an LMEDS fit: ~0.6 ms, off the hub
    eye_distance = side * _TEMPLATE_EYE_DISTANCE_FRACTION
    if eye_distance < request.config.min_eye_distance_px:
        return None
    metadata = face_model.metadata(deadline)
    image_input = metadata.input("image")
    fixed = image_input.shape[1] if len(image_input.shape) == 4 and image_input.shape[1] > 0 else None
    crop_size = choose_crop_size(side, request.background_scale, metadata.scale, fixed, request.config.face_input_size)
    crop = offload(align_face, request.rgb8, face, template, crop_size)
    output = face_model.infer({"image": crop.crop[None]}, ["image"], deadline, request_id=request.options.request_id)
    enhanced = enhanced_face_from(crop, output["image"], request.background_scale, face_model.name)
    width, height = request.output_size
    return offload(prepare_face_paste, enhanced, (height, width, 3))


# The two eyes of the FFHQ template are this fraction of the crop's side apart
# (facexlib's template: 125.9 px at 512).
_TEMPLATE_EYE_DISTANCE_FRACTION = float(np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0])) / 512
