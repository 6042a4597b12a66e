"""The enhancement pipeline: one photo in, fanned out over model servers, one photo out.

::

    decode (threadpool)
      ├─ spawn: upscale the background (and alpha) ──▶ upscaler model server(s)
      └─ spawn: detect faces ──▶ detector
               └─ per face, spawn: align (threadpool) → enhance ──▶ face model
                                  → identity guard, when on ──▶ face descriptor
                                  → inverse warp + soft mask (threadpool)
    join under the request deadline; check each greenlet; composite (threadpool); encode (threadpool)

Policies (named, not scattered):

- the background failing fails the request (its error decides the status: 502/503/504);
- detection failing fails the request too (the seed's rule: every branch must succeed);
- a branch the request cannot do without answers the request the moment it fails: the
  branches are joined with ``gevent.iwait``, the first failure is raised at once and every
  greenlet still running (the other branch, its faces, their remote calls) is killed;
- one face failing, or not finishing before ``FACE_DEADLINE_RESERVE`` ahead of the request
  deadline, keeps the background's pixels for that face; the result counts it;
- with ``identity_guard`` on, a face whose restored version the face descriptor finds too far
  from the input face is composited at the lower strength the guard found (stages/identity.py);
  a descriptor call that fails fails that face (it keeps the background: never pasted unchecked);
- at most ``limits.max_faces`` faces are enhanced, the largest first; the rest keep the
  background and are counted;
- at the deadline, every greenlet still running is killed.

Each face ends as a :class:`FaceResult`: enhanced (with its paste), too small, over the
limit, failed or not finished (with the reason).

A caller that watches one photo (a job, the CLI) passes a :class:`ProgressListener` to
:func:`enhance_photo`: it hears the stage, the background's tiles done out of their total
and the faces done out of theirs, on the hub, and must only update memory (a job writes its
state to disk on a greenlet of its own). The synchronous request passes none.

All state is per request: nothing here is shared between greenlets except read-only
arrays. Remote calls happen only in greenlets of this hub; pixel work only in the
threadpool. The branches are public building blocks (:func:`prepare_photo`,
:func:`upscale_background`, :func:`detect_faces`, :func:`enhance_face`,
:func:`finish_photo`), so a benchmark can run them one after another
(:mod:`chaoqing.bench.sequential`); the request path has no such mode.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import gevent
import numpy as np
import numpy.typing as npt
from gevent.lock import BoundedSemaphore

from chaoqing.config import FACE_DESCRIPTOR, Config, Preset
from chaoqing.errors import ChaoqingError, DeadlineExceeded
from chaoqing.gateway.remote import CallObserver, RemoteModel, RemoteModels
from chaoqing.gateway.stages.composite import (
    EnhancedFace,
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
    alignment_template,
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
    face_model_inputs,
    face_model_template,
    face_size_in_image,
)
from chaoqing.gateway.stages.face_geometry import FFHQ_TEMPLATE_512
from chaoqing.gateway.stages.face_match import FaceMatchSettings, match_paste_to_background
from chaoqing.gateway.stages.identity import (
    DESCRIPTOR_OUTPUTS,
    IdentityCheck,
    describe_side,
    guard_identity,
    identity_tiles,
)
from chaoqing.gateway.stages.metadata import OutputMetadata, output_metadata
from chaoqing.gateway.stages.resize import restore_bit_depth
from chaoqing.gateway.stages.upscale import upscale_image

__all__ = [
    "FACE_DEADLINE_RESERVE",
    "DetectedFaces",
    "EnhanceOptions",
    "EnhanceResult",
    "FaceResult",
    "FaceStatus",
    "FacesOutcome",
    "PhotoRequest",
    "PipelineServices",
    "ProgressListener",
    "ProgressStage",
    "detect_faces",
    "enhance_face",
    "enhance_faces",
    "enhance_photo",
    "face_match_settings",
    "finish_photo",
    "identity_guard_on",
    "join_branches",
    "prepare_photo",
    "quiet_expected_errors",
    "return_freed_memory_promptly",
    "upscale_background",
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
    strip_metadata: bool | None = None  # write no EXIF, XMP, ICC; None: config.encode's default
    strip_gps: bool | None = None  # write EXIF and XMP without GPS; None: config.encode's default
    face_strength: float | None = None  # blend with the background's own face; None: the preset's
    face_colour: bool | None = None  # give faces the photo's colours; None: the preset's
    face_texture: bool | None = None  # give faces the photo's grain; None: the preset's
    face_fidelity: float | None = None  # a face restorer's fidelity weight; None: the preset's, else the model's
    identity_guard: bool | None = None  # keep who the face is (stages/identity.py); None: the preset's


class FaceStatus(enum.Enum):
    """How one detected face ended."""

    ENHANCED = "enhanced"  # restored and pasted
    TOO_SMALL = "too_small"  # eyes closer than min_eye_distance_px: not worth a model call
    OVER_LIMIT = "over_limit"  # beyond limits.max_faces (the smallest go first)
    FAILED = "failed"  # its model call or geometry failed; the background stays
    NOT_FINISHED = "not_finished"  # still running at the face deadline


@dataclass(frozen=True)
class FaceResult:
    """One face's outcome: its status, the paste when enhanced, the reason when not, and
    what the identity guard found when it ran."""

    index: int
    status: FaceStatus
    paste: FacePaste | None = None
    reason: str = ""
    identity: IdentityCheck | None = None


@dataclass(frozen=True)
class FacesOutcome:
    """Every detected face's result, in detection order."""

    results: tuple[FaceResult, ...] = ()
    detection_skipped: bool = False  # faces off, or a preset without a face model: nothing was looked for

    @property
    def detected(self) -> int:
        return len(self.results)

    @property
    def pastes(self) -> tuple[FacePaste, ...]:
        return tuple(result.paste for result in self.results if result.paste is not None)

    def count(self, status: FaceStatus) -> int:
        return sum(1 for result in self.results if result.status is status)

    @property
    def identity_checks(self) -> tuple[dict[str, Any], ...]:
        """The identity guard's report of each face it checked (docs/faces.md)."""
        return tuple(result.identity.as_dict(result.index) for result in self.results if result.identity is not None)

    @property
    def errors(self) -> tuple[str, ...]:
        """The reasons of faces that failed or did not finish."""
        unfinished = (FaceStatus.FAILED, FaceStatus.NOT_FINISHED)
        return tuple(result.reason for result in self.results if result.status in unfinished)


NO_FACES = FacesOutcome(detection_skipped=True)


@dataclass(frozen=True)
class EnhanceResult:
    """The encoded photo and what it took."""

    data: bytes
    media_type: str
    output_format: str
    width: int
    height: int
    faces: FacesOutcome
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def face_detection_skipped(self) -> bool:
        return self.faces.detection_skipped

    @property
    def faces_detected(self) -> int:
        return self.faces.detected

    @property
    def faces_enhanced(self) -> int:
        return self.faces.count(FaceStatus.ENHANCED)

    @property
    def faces_over_limit(self) -> int:
        return self.faces.count(FaceStatus.OVER_LIMIT)

    @property
    def face_errors(self) -> tuple[str, ...]:
        return self.faces.errors


class ProgressStage(enum.StrEnum):
    """Where one photo is, as a :class:`ProgressListener` hears it."""

    DECODE = "decode"
    ENHANCE = "enhance"  # the background's tiles and the faces, at once
    COMPOSITE = "composite"
    ENCODE = "encode"


class ProgressListener(Protocol):
    """Told how one photo goes. Called on the hub from the pipeline's greenlets: an
    implementation only updates memory, and never blocks or raises."""

    def on_stage(self, stage: ProgressStage) -> None:
        """The photo entered ``stage``."""

    def on_tiles(self, done: int, total: int) -> None:
        """The background's model calls: ``done`` of ``total`` (0 of N when planned; a photo
        that fits one call is 1 tile; an alpha channel adds its own tiles)."""

    def on_faces(self, done: int, total: int) -> None:
        """Faces enhanced or given up: ``done`` of the ``total`` chosen (0 of N when detected;
        faces over ``limits.max_faces`` are not counted). Never called when faces are off."""


class _NoProgress:
    """The listener of a caller that does not watch (the synchronous request)."""

    def on_stage(self, stage: ProgressStage) -> None:
        pass

    def on_tiles(self, done: int, total: int) -> None:
        pass

    def on_faces(self, done: int, total: int) -> None:
        pass


NO_PROGRESS: ProgressListener = _NoProgress()


class _TileTally:
    """Sums the tiles of the planes one background sends (colour, and alpha when there is
    one) into one count for the listener."""

    def __init__(self, listener: ProgressListener, planes: int) -> None:
        self.listener = listener
        self.done = [0] * planes
        self.total = [0] * planes

    def plane(self, index: int) -> Callable[[int, int], None]:
        def count(done: int, total: int) -> None:
            self.done[index], self.total[index] = done, total
            self.listener.on_tiles(sum(self.done), sum(self.total))

        return count


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


def join_branches(branches: Iterable[gevent.Greenlet], deadline: float, what: str) -> None:
    """Wait for every branch, but not a moment longer than needed: the first branch that
    fails has its exception raised at once, and when the deadline passes DeadlineExceeded
    is raised. Either way every branch still running is killed (without waiting), so its
    remote calls are abandoned and their connections closed."""
    pending = list(branches)
    try:
        for finished in gevent.iwait(pending, timeout=max(0.0, deadline - time.monotonic())):
            if not finished.successful():
                raise finished.exception
        for branch in pending:  # iwait stops at the deadline, even as a branch ends at that moment
            if not branch.dead:
                raise DeadlineExceeded(f"{what} did not finish by the request's deadline")
            if not branch.successful():
                raise branch.exception
    finally:
        gevent.killall([branch for branch in pending if not branch.dead], block=False)


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


def face_match_settings(options: EnhanceOptions, preset: Preset) -> FaceMatchSettings:
    """How this request's faces are matched to the photo: its own options, else the preset's."""
    return FaceMatchSettings(
        strength=preset.face_strength if options.face_strength is None else options.face_strength,
        colour=preset.face_colour if options.face_colour is None else options.face_colour,
        texture=preset.face_texture if options.face_texture is None else options.face_texture,
    )


def _composite(background: npt.NDArray[Any], pastes: tuple[FacePaste, ...], settings: list[FaceMatchSettings],
               background_scale: float) -> npt.NDArray[Any]:
    """Match every face to the background (before any is blended in), then blend them.
    Faces go into the colour channels only; alpha stays the background's. In place: the
    background is this request's own new array, and a copy would cost 3 bytes per output
    pixel (144 MB at 48 MP)."""
    matched = [match_paste_to_background(paste, background, face_settings, background_scale)[0]
               for paste, face_settings in zip(pastes, settings, strict=True)]
    canvas = background if background.flags.writeable else background.copy()
    composite_face_pastes_in_place(canvas, matched)
    return canvas


@dataclass(frozen=True)
class PhotoRequest:
    """Everything the branches of one request share, all read-only."""

    decoded: DecodedImage
    rgb8: npt.NDArray[np.uint8]
    options: EnhanceOptions
    config: Config
    remotes: RemoteModels
    output_size: tuple[int, int]  # width, height
    output_format: str
    started: float
    deadline: float
    timer: _StageTimer
    progress: ProgressListener = NO_PROGRESS

    @property
    def background_scale(self) -> float:
        width, height = self.output_size
        return (width / self.decoded.width + height / self.decoded.height) / 2


def enhance_photo(
    data: bytes, media_type: str | None, options: EnhanceOptions, services: PipelineServices,
    progress: ProgressListener | None = None,
) -> EnhanceResult:
    """Enhance one encoded photo: the background and the faces at once, then composite;
    ``progress`` hears how it goes.

    Raises ChaoqingError subclasses (see the module notes): InvalidImage, ImageTooLarge,
    UnsupportedMediaType, DeadlineExceeded, and the ModelServerError of a failed branch.
    """
    request = prepare_photo(data, media_type, options, services, progress)
    request.progress.on_stage(ProgressStage.ENHANCE)
    preset = request.config.presets[options.preset]
    face_model = preset.face_model if options.faces else None
    background = gevent.spawn(upscale_background, request, preset.upscaler)
    faces = gevent.spawn(enhance_faces, request, face_model) if face_model else None
    join_branches([branch for branch in (background, faces) if branch is not None], request.deadline, "the request")
    return finish_photo(request, background.value, faces.value if faces is not None else NO_FACES)


def prepare_photo(
    data: bytes, media_type: str | None, options: EnhanceOptions, services: PipelineServices,
    progress: ProgressListener | None = None,
) -> PhotoRequest:
    """Check and decode the upload (threadpool); fix the output size, format and deadline.

    Raises UnsupportedMediaType, InvalidImage, ImageTooLarge."""
    config = services.config
    started = time.monotonic()
    timer = _StageTimer()
    listener = progress if progress is not None else NO_PROGRESS
    listener.on_stage(ProgressStage.DECODE)
    with timer("decode"):
        check_media_type(media_type, data)
        decoded = offload(decode_image, data, config.limits)
        check_output_size(decoded.width, decoded.height, options.scale, config.limits)
        output_format = choose_output_format(options.output_format, decoded)
        output_size = (max(1, round(decoded.width * options.scale)), max(1, round(decoded.height * options.scale)))
        check_encodable(output_format, *output_size)
        rgb8: npt.NDArray[np.uint8] = offload(to_8_bit, decoded.rgb)  # the same array when already 8-bit
    return PhotoRequest(
        decoded, rgb8, options, config, services.remotes, output_size, output_format,
        started, started + config.request_deadline_s, timer, listener,
    )


def finish_photo(request: PhotoRequest, background: npt.NDArray[Any], faces: FacesOutcome) -> EnhanceResult:
    """Composite the faces onto the background and encode (threadpool)."""
    timer = request.timer
    request.progress.on_stage(ProgressStage.COMPOSITE)
    with timer("composite"):
        settings = face_match_settings(request.options, request.config.presets[request.options.preset])
        per_face = [settings if result.identity is None else dataclasses.replace(settings, strength=result.identity.strength)
                    for result in faces.results if result.paste is not None]  # the guard's strength, where it ran
        canvas = (offload(_composite, background, faces.pastes, per_face, request.background_scale)
                  if faces.pastes else background)
    request.progress.on_stage(ProgressStage.ENCODE)
    with timer("encode"):
        encoded, metadata_notes = offload(_encode_output, request, canvas)
    for note in metadata_notes:
        _log.warning("request %s metadata: %s", request.options.request_id, note)
    timer.timings["total"] = time.monotonic() - request.started
    return EnhanceResult(
        data=encoded,
        media_type=MEDIA_TYPES[request.output_format],
        output_format=request.output_format,
        width=request.output_size[0],
        height=request.output_size[1],
        faces=faces,
        timings=timer.timings,
    )


def _encode_output(request: PhotoRequest, canvas: npt.NDArray[Any]) -> tuple[bytes, tuple[str, ...]]:
    """Threadpool: the upload's metadata made true of the output (or stripped), then the
    encoder; with the notes on metadata left out, for the log."""
    decoded, options, settings = request.decoded, request.options, request.config.encode
    alpha = canvas[:, :, 3] if canvas.shape[2] == 4 else None
    strip_metadata = settings.strip_metadata if options.strip_metadata is None else options.strip_metadata
    strip_gps = settings.strip_gps if options.strip_gps is None else options.strip_gps
    if strip_metadata:  # no profile either: the pixels are converted to sRGB, which viewers assume
        metadata, profile, convert_from = OutputMetadata(), None, decoded.icc_profile
    else:
        width, height = request.output_size
        metadata = output_metadata(decoded.metadata, width, height, request.output_format, strip_gps=strip_gps)
        metadata = OutputMetadata(metadata.exif, metadata.xmp, decoded.metadata.notes + metadata.notes)
        profile, convert_from = decoded.icc_profile, None
    encoded = encode_image(
        canvas[:, :, :3], alpha, request.output_format, options.quality, profile, decoded.bit_depth,
        png_compress_level=settings.png_compress_level, exif=metadata.exif, xmp=metadata.xmp,
        convert_to_srgb_from=convert_from,
    )
    return encoded, metadata.notes


# -- the background branch ---------------------------------------------------------------


def upscale_background(request: PhotoRequest, model_name: str) -> npt.NDArray[Any]:
    """The background at the output size: RGB (+ alpha as a 4th channel), 8 or 16 bits."""
    model = request.remotes[model_name]
    with request.timer("upscale"):
        alpha = request.decoded.alpha
        colour: npt.NDArray[np.uint8]  # a greenlet's value is untyped
        if alpha is not None and not _is_opaque(alpha):
            # alpha goes through the same model as a grey image, concurrently with the colour
            grey = np.repeat(to_8_bit(alpha)[:, :, None], 3, axis=2)
            tally = _TileTally(request.progress, 2)
            planes = [gevent.spawn(_upscale_plane, request, model, plane, tally.plane(index))
                      for index, plane in enumerate((request.rgb8, grey))]
            join_branches(planes, request.deadline, "the background")
            colour, upscaled_alpha = planes[0].value, planes[1].value[:, :, 1]
        else:
            colour, upscaled_alpha = _upscale_plane(request, model, request.rgb8, request.progress.on_tiles), None
        if request.decoded.bit_depth == 8 and alpha is None:
            return colour
        return offload(_finish_background, request.decoded, request.rgb8, colour, upscaled_alpha)


def _is_opaque(alpha: npt.NDArray[Any]) -> bool:
    return bool(alpha.min() == np.iinfo(alpha.dtype).max)


def _upscale_plane(
    request: PhotoRequest, model: RemoteModel, rgb8: npt.NDArray[np.uint8], on_tiles: Callable[[int, int], None]
) -> npt.NDArray[np.uint8]:
    return upscale_image(
        model, rgb8, request.output_size, request.config.tiles, request.deadline, offload, request.options.request_id,
        on_tiles,
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


@dataclass(frozen=True)
class DetectedFaces:
    """The detector's answer, ready to enhance: the faces to enhance (the largest
    ``limits.max_faces``), those over the limit, and the template their landmarks align to."""

    chosen: tuple[DetectedFace, ...]
    over_limit: tuple[DetectedFace, ...]
    template: npt.NDArray[np.float64]


def enhance_faces(request: PhotoRequest, face_model_name: str) -> FacesOutcome:
    """Detect, then enhance every face in its own greenlet; a face that fails keeps the background.

    Raises the detector's ModelServerError (detection is a branch the request needs)."""
    detected = detect_faces(request)
    face_model = request.remotes[face_model_name]
    face_deadline = _face_deadline(request)
    gate = BoundedSemaphore(MAX_FACES_IN_FLIGHT)
    total = len(detected.chosen)
    finished = [0]
    request.progress.on_faces(0, total)

    def gated(face: DetectedFace) -> FaceResult:
        with gate:
            try:
                return enhance_face(request, face_model, face, detected.template, face_deadline)
            finally:
                finished[0] += 1
                request.progress.on_faces(finished[0], total)

    with request.timer("faces"):
        jobs = [gevent.spawn(gated, face) for face in detected.chosen]
        try:
            gevent.joinall(jobs, timeout=max(0.0, face_deadline - time.monotonic()))
        finally:
            gevent.killall([job for job in jobs if not job.dead], block=False)
    results = [_face_result(job, face) for job, face in zip(jobs, detected.chosen, strict=True)]
    results += [FaceResult(face.index, FaceStatus.OVER_LIMIT, reason="over limits.max_faces") for face in detected.over_limit]
    return FacesOutcome(tuple(sorted(results, key=lambda result: result.index)))


def detect_faces(request: PhotoRequest) -> DetectedFaces:
    """Call the detector on a shrunk copy; keep the largest ``limits.max_faces`` faces.

    Raises ModelServerError subclasses, BadModelResponse for a malformed answer."""
    detector = request.remotes[request.config.detector]
    with request.timer("detect"):
        small, factor = offload(shrink_for_detection, request.rgb8, request.config.detection_max_side)
        detections = detector.infer({"image": small}, DETECTOR_OUTPUTS, request.deadline, request_id=request.options.request_id)
        faces = faces_from_detections(detections, factor, request.rgb8.shape)
        template = _alignment_template(detector, request.deadline) if faces else FFHQ_TEMPLATE_512
    by_size = sorted(faces, key=_box_area, reverse=True)
    limit = request.config.limits.max_faces
    return DetectedFaces(tuple(by_size[:limit]), tuple(by_size[limit:]), template)


def _box_area(face: DetectedFace) -> float:
    left, top, right, bottom = face.box
    return max(0.0, right - left) * max(0.0, bottom - top)


def _face_deadline(request: PhotoRequest) -> float:
    budget = request.deadline - time.monotonic()
    return request.deadline - min(FACE_DEADLINE_RESERVE, budget * FACE_DEADLINE_RESERVE_FRACTION)


def _alignment_template(detector: RemoteModel, deadline: float) -> npt.NDArray[np.float64]:
    """The template for the detector's landmarks, as its metadata's convention or template says."""
    return alignment_template(detector.metadata(deadline).parameters, detector.name)


def _face_result(job: gevent.Greenlet, face: DetectedFace) -> FaceResult:
    if job.successful():
        result: FaceResult = job.value
        return result
    if job.exception is not None and not isinstance(job.exception, gevent.GreenletExit):
        _log.error("face %d failed unexpectedly", face.index, exc_info=job.exception)
        return FaceResult(face.index, FaceStatus.FAILED, reason=f"face {face.index}: internal error")
    return FaceResult(face.index, FaceStatus.NOT_FINISHED, reason=f"face {face.index}: not finished by the deadline")


def enhance_face(
    request: PhotoRequest, face_model: RemoteModel, face: DetectedFace, template: npt.NDArray[np.float64], deadline: float
) -> FaceResult:
    """One face: align (threadpool), the model, the paste (threadpool). Its own errors make a
    FAILED result rather than fail the request; anything unexpected still raises."""
    try:
        restored = _restore_face(request, face_model, face, template, deadline)
    except ChaoqingError as exc:
        _log.warning("request %s face %d kept as background: %s", request.options.request_id, face.index, exc)
        return FaceResult(face.index, FaceStatus.FAILED, reason=f"face {face.index}: {exc}")
    if restored is None:
        return FaceResult(face.index, FaceStatus.TOO_SMALL, reason="eyes closer than min_eye_distance_px")
    return FaceResult(face.index, FaceStatus.ENHANCED, paste=restored[0], identity=restored[1])


def _restore_face(
    request: PhotoRequest, face_model: RemoteModel, face: DetectedFace, template: npt.NDArray[np.float64], deadline: float
) -> tuple[FacePaste, IdentityCheck | None] | None:
    side = offload(face_size_in_image, face.landmarks, template)  # an LMEDS fit: ~0.6 ms, off the hub
    eye_distance = side * _TEMPLATE_EYE_DISTANCE_FRACTION
    if eye_distance < request.config.min_eye_distance_px:
        return None
    metadata = face_model.metadata(deadline)
    model_template = face_model_template(template, metadata.parameters, face_model.name)
    if model_template is not template:  # a model aligned its own way (arcface 128): its crop's side
        side = offload(face_size_in_image, face.landmarks, model_template)
    image_input = metadata.find_input("image")  # a plain v2 server may list no tensors: any size then
    fixed = image_input.shape[1] if image_input and len(image_input.shape) == 4 and image_input.shape[1] > 0 else None
    preset = request.config.presets[request.options.preset]
    crop_size = choose_crop_size(side, request.background_scale, metadata.scale, fixed, request.config.face_input_size,
                                 preset.face_min_crop)
    crop = offload(align_face, request.rgb8, face, model_template, crop_size)
    fidelity = request.options.face_fidelity if request.options.face_fidelity is not None else preset.face_fidelity
    inputs = face_model_inputs(crop, metadata.find_input("weight") is not None, fidelity)
    output = face_model.infer(inputs, ["image"], deadline, request_id=request.options.request_id)
    enhanced = enhanced_face_from(crop, output["image"], request.background_scale, face_model.name)
    identity = _check_identity(request, face, template, enhanced, deadline)
    width, height = request.output_size
    return offload(prepare_face_paste, enhanced, (height, width, 3)), identity


def identity_guard_on(options: EnhanceOptions, config: Config) -> bool:
    """Whether this request's faces are guarded: its own option, else the preset's."""
    return config.identity_guard_for(options.preset) if options.identity_guard is None else options.identity_guard


def _check_identity(
    request: PhotoRequest, face: DetectedFace, template: npt.NDArray[np.float64], restored: EnhancedFace,
    deadline: float,
) -> IdentityCheck | None:
    """The identity guard on one restored face (:mod:`chaoqing.gateway.stages.identity`), in the
    face's greenlet: None when the request does not guard, or asks for strength 0.

    Raises the descriptor's ModelServerError (the face then keeps the background, as for any
    failed face) and DegenerateLandmarks."""
    strength = face_match_settings(request.options, request.config.presets[request.options.preset]).strength
    if not identity_guard_on(request.options, request.config) or strength == 0.0:
        return None
    descriptor = request.remotes[FACE_DESCRIPTOR]

    def describe(image: npt.NDArray[np.uint8], boxes: npt.NDArray[np.float32],
                 landmarks: npt.NDArray[np.float32] | None) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        inputs: dict[str, np.ndarray] = {"image": image, "boxes": boxes}
        if landmarks is not None:
            inputs["landmarks"] = landmarks
        answer = descriptor.infer(inputs, DESCRIPTOR_OUTPUTS, deadline, request_id=request.options.request_id)
        return answer["descriptors"], answer["landmarks"]

    with request.timer("identity"):
        side = offload(face_size_in_image, face.landmarks, template)  # the detector's template: FFHQ-like crops
        tiles = offload(identity_tiles, request.rgb8, face.landmarks, template, restored, describe_side(side))
        check = guard_identity(tiles, strength, request.config.identity_guard, describe, offload)
    if check.guarded:
        _log.info("request %s face %d: identity distance %.3f > %.2f, strength %.2f → %.2f (distance %.3f)",
                  request.options.request_id, face.index, check.distance_before, check.threshold,
                  check.requested_strength, check.strength, check.distance_after)
    return check


# The two eyes of the FFHQ template are this fraction of the crop's side apart
# (facexlib's template: 125.9 px at 512).
_TEMPLATE_EYE_DISTANCE_FRACTION = float(np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0])) / 512
