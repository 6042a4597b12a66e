"""``chaoqing enhance``: many photos through the pipeline, with progress bars and a summary.

Photos go through the same pipeline as the HTTP API: in this process against embedded
model servers (started here, stopped at the end), or against a running gateway
(``--server URL``), as jobs (``POST /v1/jobs``, their events, the result, then the job
deleted). Several photos are in flight at once (``--jobs``), each one fanning out as usual.

Progress: on a terminal, the photos bar and under it a bar per photo in flight with its
tiles and faces done, its stage and ETA; these come from the job's progress on the server,
or here from the pipeline's listener with the jobs' tracker (the same counts and ETA).
Elsewhere (a log, a pipe) plain lines say the same, a few per photo. Outputs are written atomically (a temporary file in the target folder, then a
rename, removed on failure) and only ever inside the chosen output folder; a photo whose
output exists is skipped unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import click
import gevent
from gevent.lock import BoundedSemaphore
from tqdm import tqdm

from chaoqing.config import Config
from chaoqing.errors import ChaoqingError, GatewayError, ImageTooLarge, InvalidParameter

if TYPE_CHECKING:
    from geventhttpclient.response import HTTPResponse

    from chaoqing.gateway.jobs import ProgressTracker
    from chaoqing.gateway.pipeline import ProgressStage

__all__ = ["IMAGE_SUFFIXES", "BatchJob", "BatchSummary", "PhotoOutcome", "PhotoProgress", "PlannedPhoto", "plan_outputs",
           "run_batch"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEFAULT_OUTPUT_FOLDER = Path("enhanced")
SUFFIX_FOR_FORMAT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
SUMMARY_ROWS = 40  # more photos than this: the table lists failures only
SERVER_TIMEOUT_S = 900.0  # a reply (or, on an event stream, the next line: a keep-alive comes every 15 s)
FINAL_JOB_STATUSES = ("done", "failed", "cancelled")
POLL_INTERVAL_S = 0.5  # GET /v1/jobs/{id} this often when its event stream is refused or cut
CANCEL_ON_CLOSE_S = 5.0  # an interrupted run spends at most this long cancelling its jobs
PHOTO_LABEL_WIDTH = 24  # characters of a photo's name beside its bar
TERMINAL_REDRAW_S = 0.1  # a photo's bar is redrawn at most this often (and at every stage)
ETA_TICK_S = 1.0  # the bars are redrawn this often, so their ETAs count down
PLAIN_LINE_INTERVAL_S = 10.0  # without a terminal, a photo's line at most this often within one stage


@dataclass(frozen=True)
class PlannedPhoto:
    source: Path
    target: Path
    label: str  # how the photo is named in the output (relative to its input)


@dataclass(frozen=True)
class BatchJob:
    config: Config
    preset: str
    scale: float
    faces: bool = True
    output_format: str | None = None
    quality: int | None = None
    server: str | None = None
    api_key: str | None = None
    concurrency: int = 2
    overwrite: bool = False
    strip_metadata: bool | None = None  # None: the config's [encode] default (the server's, with server)
    strip_gps: bool | None = None
    face_strength: float | None = None  # None: the preset's (the server's, with server)
    face_colour: bool | None = None
    face_texture: bool | None = None
    face_fidelity: float | None = None  # a face restorer's fidelity weight; None: the preset's, else the model's
    identity_guard: bool | None = None  # None: the preset's (the server's, with server)


@dataclass
class PhotoOutcome:
    photo: PlannedPhoto
    status: str  # done | skipped | failed
    seconds: float = 0.0
    faces_detected: int | None = 0  # None: detection skipped (faces off, or a preset without a face model)
    faces_enhanced: int = 0
    megapixels_in: float = 0.0
    megapixels_out: float = 0.0
    error: str = ""
    written: Path | None = None


@dataclass
class BatchSummary:
    outcomes: list[PhotoOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(outcome.status == "failed" for outcome in self.outcomes)

    @property
    def done(self) -> int:
        return sum(outcome.status == "done" for outcome in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(outcome.status == "skipped" for outcome in self.outcomes)


def _target_suffix(source: Path, output_format: str | None) -> str:
    """The default is stages.encode.choose_output_format's: JPEG → jpeg, WebP → webp, else png
    (a file whose bytes say otherwise gets its suffix corrected when it is written)."""
    if output_format:
        return SUFFIX_FOR_FORMAT[output_format]
    suffix = source.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return ".jpg"
    return ".webp" if suffix == ".webp" else ".png"


def _images_in(folder: Path, recursive: bool) -> Iterator[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(candidates):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            yield path


def plan_outputs(
    inputs: Sequence[Path], output: Path | None, output_format: str | None, *, recursive: bool = False
) -> list[PlannedPhoto]:
    """Map every input photo to its output path, inside the output folder.

    A single file input with ``output`` ending in an image suffix writes exactly there.
    Raises ValueError when an output would land outside the output folder.
    """
    sources: list[tuple[Path, Path]] = []  # (photo, path relative to its input)
    for item in inputs:
        if item.is_dir():
            sources.extend((photo, photo.relative_to(item)) for photo in _images_in(item, recursive))
        else:
            sources.append((item, Path(item.name)))
    if len(sources) == 1 and len(inputs) == 1 and inputs[0].is_file() and output is not None \
            and output.suffix.lower() in IMAGE_SUFFIXES:
        photo, relative = sources[0]
        return [PlannedPhoto(photo, output, str(relative))]
    folder = (output or DEFAULT_OUTPUT_FOLDER).resolve()
    planned: list[PlannedPhoto] = []
    taken: set[Path] = set()
    for photo, relative in sources:
        target = (folder / relative).with_suffix(_target_suffix(photo, output_format))
        if target in taken:  # a.png and a.gif would both become a.png
            target = target.with_name(f"{relative.stem}{relative.suffix.replace('.', '-')}{target.suffix}")
        resolved = target.resolve()
        if not resolved.is_relative_to(folder):
            raise ValueError(f"{photo}: its output {resolved} would be outside {folder}")
        taken.add(target)
        planned.append(PlannedPhoto(photo, target, str(relative)))
    return planned


def _file_mode() -> int:
    """0o666 less the process umask (mkstemp makes 0o600 files; outputs are ordinary files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".chaoqing-", suffix=target.suffix, dir=target.parent)
    try:
        os.fchmod(descriptor, _file_mode())
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _read_photo(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise ImageTooLarge(f"{size} bytes; the limit is {limit}")
    return path.read_bytes()


def _models_for(job: BatchJob) -> tuple[str, ...]:
    """The models this job calls: no detector when faces are off or the preset has no face model;
    the face descriptor when --identity-guard asks for it."""
    from chaoqing.config import FACE_DESCRIPTOR

    preset = job.config.presets[job.preset]
    if job.faces and preset.face_model:
        needed = job.config.models_needed(job.preset)
        return (*needed, FACE_DESCRIPTOR) if job.identity_guard and FACE_DESCRIPTOR not in needed else needed
    return (preset.upscaler,)


@dataclass(frozen=True)
class PhotoProgress:
    """How far one photo is, as its runner hears it (a job's progress, or the pipeline's
    listener here). ``faces`` False: faces are not enhanced; ``eta_at`` is wall-clock."""

    stage: str | None = None
    tiles_done: int = 0
    tiles_total: int | None = None
    faces: bool = False
    faces_done: int = 0
    faces_total: int | None = None
    eta_at: float | None = None

    @classmethod
    def from_job(cls, document: Mapping[str, Any]) -> PhotoProgress:
        """From a job's JSON (GET /v1/jobs/{id}, its events). Raises KeyError, TypeError for
        a document that is not one."""
        progress = document["progress"]
        tiles, faces, eta = progress.get("tiles"), progress.get("faces"), progress.get("eta_s")
        return cls(
            stage=progress.get("stage"),
            tiles_done=int(tiles["done"]) if tiles else 0, tiles_total=int(tiles["total"]) if tiles else None,
            faces=faces is not None,
            faces_done=int(faces["done"]) if faces else 0,
            faces_total=int(faces["total"]) if faces and faces["total"] is not None else None,
            eta_at=None if eta is None else time.time() + float(eta),
        )

    @property
    def steps(self) -> tuple[int, int]:
        """Model calls done and planned so far: the tiles, and the faces once detected."""
        total = (self.tiles_total or 0) + (self.faces_total or 0)
        return self.tiles_done + self.faces_done, total

    def describe(self, now: float) -> str:
        """``tiles 3/9 · faces 1/2 · enhance · ETA 00:12`` (the parts known so far)."""
        parts = []
        if self.tiles_total is not None:
            parts.append(f"tiles {self.tiles_done}/{self.tiles_total}")
        if self.faces:
            parts.append("faces …" if self.faces_total is None else f"faces {self.faces_done}/{self.faces_total}")
        parts.append(self.stage or "queued")
        if self.eta_at is not None:
            parts.append(f"ETA {tqdm.format_interval(max(0.0, self.eta_at - now))}")
        return " · ".join(parts)


ProgressCallback = Callable[[PhotoProgress], None]


@dataclass(frozen=True)
class _Enhanced:
    data: bytes
    output_format: str
    faces_detected: int | None
    faces_enhanced: int
    width: int
    height: int


class _LocalRunner:
    """Photos through the pipeline in this process, against embedded or configured model
    servers; each photo's progress from the same listener and ETA as a job's."""

    def __init__(self, job: BatchJob) -> None:
        from chaoqing.gateway.estimate import ComputeEstimator
        from chaoqing.gateway.jobs import job_config
        from chaoqing.gateway.pipeline import PipelineServices, quiet_expected_errors
        from chaoqing.gateway.server import open_models, wait_until_ready

        quiet_expected_errors()
        models = _models_for(job)
        self.remotes, self.supervisor = open_models(job.config, models)
        try:
            wait_until_ready(self.remotes, models, timeout_s=120)
        except BaseException:
            self.close()
            raise
        # the CLI waits as a job does: a job's deadline and limits, not a synchronous request's
        self.services = PipelineServices(job_config(job.config), self.remotes)
        self.estimator = ComputeEstimator(self.remotes, job.config.jobs.default_megapixels_per_s)
        self.job = job

    def enhance(self, data: bytes, size: tuple[int, int], on_progress: ProgressCallback) -> _Enhanced:
        from chaoqing.gateway.estimate import MEGAPIXEL
        from chaoqing.gateway.jobs import ProgressTracker
        from chaoqing.gateway.pipeline import EnhanceOptions, enhance_photo

        job = self.job
        options = EnhanceOptions(job.scale, job.faces, job.preset, job.output_format, job.quality,
                                 strip_metadata=job.strip_metadata, strip_gps=job.strip_gps,
                                 face_strength=job.face_strength, face_colour=job.face_colour,
                                 face_texture=job.face_texture, face_fidelity=job.face_fidelity,
                                 identity_guard=job.identity_guard)
        upscaler = job.config.presets[job.preset].upscaler
        input_megapixels = size[0] * size[1] / MEGAPIXEL
        faces = bool(job.faces and job.config.presets[job.preset].face_model)
        tracker = ProgressTracker(faces, input_megapixels, input_megapixels * job.scale**2,
                                  self.estimator.speed_of(upscaler).megapixels_per_s)
        result = enhance_photo(data, None, options, self.services, _ForwardingListener(tracker, on_progress))
        self.estimator.observe(upscaler, input_megapixels, result.timings.get("upscale"))
        detected = None if result.face_detection_skipped else result.faces_detected
        return _Enhanced(result.data, result.output_format, detected, result.faces_enhanced, result.width, result.height)

    def close(self) -> None:
        self.remotes.close()
        if self.supervisor is not None:
            self.supervisor.stop(grace_s=5.0)


class _ForwardingListener:
    """The pipeline's ProgressListener for one photo here: the jobs' tracker keeps the counts
    and the ETA; every change is passed on as a PhotoProgress."""

    def __init__(self, tracker: ProgressTracker, on_progress: ProgressCallback) -> None:
        self.tracker = tracker
        self.on_progress = on_progress

    def _forward(self) -> None:
        snapshot = self.tracker.snapshot()
        self.on_progress(PhotoProgress(snapshot.stage, snapshot.tiles_done, snapshot.tiles_total, snapshot.faces,
                                       snapshot.faces_done, snapshot.faces_total, snapshot.eta_at))

    def on_stage(self, stage: ProgressStage) -> None:
        self.tracker.on_stage(stage)
        self._forward()

    def on_tiles(self, done: int, total: int) -> None:
        self.tracker.on_tiles(done, total)
        self._forward()

    def on_faces(self, done: int, total: int) -> None:
        self.tracker.on_faces(done, total)
        self._forward()


class _ServerRunner:
    """Photos sent to a running gateway as jobs (POST /v1/jobs, its events, the result, then
    the job deleted), so each photo's progress is the server's own; a gateway without jobs
    gets POST /v1/enhance."""

    def __init__(self, job: BatchJob) -> None:
        from geventhttpclient import HTTPClient

        parts = urlsplit(job.server or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidParameter(f"--server must be an http(s) URL, not {job.server!r}")
        self.base_path = parts.path.rstrip("/")
        # a photo holds one connection at a time (its POST, then its events, then its result),
        # and one more serves the polls and deletes
        self.client = HTTPClient(parts.hostname, parts.port, ssl=parts.scheme == "https",
                                 concurrency=job.concurrency + 1, connection_timeout=10,
                                 network_timeout=SERVER_TIMEOUT_S)
        self.job = job
        self.jobs_supported = True
        self.open_jobs: set[str] = set()  # job paths submitted and not yet deleted

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = dict(extra)
        if self.job.api_key:
            headers["Authorization"] = f"Bearer {self.job.api_key}"
        return headers

    def _query(self) -> str:
        job = self.job
        query: dict[str, Any] = {"scale": job.scale, "preset": job.preset, "faces": str(job.faces).lower()}
        if job.output_format:
            query["format"] = job.output_format
        if job.quality:
            query["quality"] = job.quality
        for name, value in (("strip_metadata", job.strip_metadata), ("strip_gps", job.strip_gps),
                            ("face_colour", job.face_colour), ("face_texture", job.face_texture),
                            ("identity_guard", job.identity_guard)):
            if value is not None:
                query[name] = str(value).lower()
        if job.face_strength is not None:
            query["face_strength"] = f"{job.face_strength:g}"
        if job.face_fidelity is not None:
            query["face_fidelity"] = f"{job.face_fidelity:g}"
        return urlencode(query)

    def enhance(self, data: bytes, size: tuple[int, int], on_progress: ProgressCallback) -> _Enhanced:
        """Raises GatewayError for what the gateway answered, and OSError for the network."""
        if self.jobs_supported:
            headers = self._headers(**{"Content-Type": "application/octet-stream"})
            response = self.client.request("POST", f"{self.base_path}/v1/jobs?{self._query()}", body=data,
                                           headers=headers)
            body = response.read()
            if response.status_code in (404, 405):  # a gateway from before jobs
                self.jobs_supported = False
            else:
                document = _json_or_error(response.status_code, body, 202)
                try:
                    job_path = f"{self.base_path}/v1/jobs/{document['id']}"
                    self.open_jobs.add(job_path)
                    try:
                        on_progress(PhotoProgress.from_job(document))
                        self._follow(job_path, on_progress)
                        return self._result(job_path)
                    finally:
                        self._delete(job_path)
                except (KeyError, TypeError, ValueError) as exc:
                    raise GatewayError(f"the gateway's job document is not one: {exc!r}") from None
        return self._enhance_synchronously(data)

    def _follow(self, job_path: str, on_progress: ProgressCallback) -> None:
        """Until the job is done: its events, else (a stream refused or cut) polls. Raises
        GatewayError when it failed or was cancelled."""
        document = self._stream_events(job_path, on_progress)
        while document is None or document["status"] not in FINAL_JOB_STATUSES:
            if document is not None:
                gevent.sleep(POLL_INTERVAL_S)
            response = self.client.request("GET", job_path, headers=self._headers())
            document = _json_or_error(response.status_code, response.read(), 200)
            on_progress(PhotoProgress.from_job(document))
        if document["status"] != "done":
            error = document.get("error") or {}
            raise GatewayError(f"{error.get('code', document['status'])}: {error.get('message', 'the job ' + document['status'])}",
                               status=int(error.get("status") or 0))

    def _stream_events(self, job_path: str, on_progress: ProgressCallback) -> dict[str, Any] | None:
        """Read the job's Server-Sent Events; its last document (None when the stream was refused)."""
        response = self.client.request("GET", f"{job_path}/events", headers=self._headers(Accept="text/event-stream"))
        if response.status_code != 200:
            response.read()
            return None
        document: dict[str, Any] | None = None
        data: list[str] = []
        try:
            while True:
                line = response.readline(b"\n")
                if not line:  # the stream ended (the gateway stopping): poll from here
                    return document
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith("data:"):
                    data.append(text[5:].lstrip())
                elif not text and data:  # an event is whole
                    document = json.loads("\n".join(data))
                    data = []
                    on_progress(PhotoProgress.from_job(document))
                    if document["status"] in FINAL_JOB_STATUSES:
                        response.read()  # the end of the stream, so its connection can be used again
                        return document
        except (OSError, ValueError, KeyError, TypeError):  # cut or garbled: poll from here
            response.release()
            return document

    def _result(self, job_path: str) -> _Enhanced:
        response = self.client.request("GET", f"{job_path}/result", headers=self._headers())
        body = response.read()
        if response.status_code != 200:
            _json_or_error(response.status_code, body, 200)
        return _enhanced_from(response, body)

    def _delete(self, job_path: str) -> None:
        """Cancel the job, or delete it and its result from the spool; best effort."""
        self.open_jobs.discard(job_path)
        try:
            self.client.request("DELETE", job_path, headers=self._headers()).read()
        except (OSError, gevent.Timeout):
            pass

    def _enhance_synchronously(self, data: bytes) -> _Enhanced:
        headers = self._headers(**{"Content-Type": "application/octet-stream"})
        response = self.client.request("POST", f"{self.base_path}/v1/enhance?{self._query()}", body=data, headers=headers)
        body = response.read()
        if response.status_code != 200:
            _json_or_error(response.status_code, body, 200)
        return _enhanced_from(response, body)

    def close(self) -> None:
        """Cancel the jobs still open (an interrupted run leaves nothing running on the server)."""
        with gevent.Timeout(CANCEL_ON_CLOSE_S, False):
            gevent.joinall([gevent.spawn(self._delete, path) for path in list(self.open_jobs)])
        self.client.close()


def _json_or_error(status: int, body: bytes, expected: int) -> dict[str, Any]:
    """The JSON of a reply with status ``expected``; raises GatewayError for any other."""
    if status == expected:
        try:
            document = json.loads(body)
        except ValueError:
            raise GatewayError(f"HTTP {status}: the gateway's answer is not JSON", status=status) from None
        if isinstance(document, dict):
            return document
        raise GatewayError(f"HTTP {status}: the gateway's answer is not a JSON object", status=status)
    try:
        error = json.loads(body)["error"]
        message = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {status}"
    raise GatewayError(message, status=status)


def _enhanced_from(response: HTTPResponse, body: bytes) -> _Enhanced:
    """The photo and what its headers say (from /v1/enhance or a job's result)."""
    media_type = _header(response, "content-type") or "image/png"
    output_format = {"image/jpeg": "jpeg", "image/webp": "webp"}.get(media_type, "png")
    width, _, height = (_header(response, "x-output-size") or "0x0").partition("x")
    skipped = _header(response, "x-face-detection") == "skipped"
    detected = None if skipped else int(_header(response, "x-faces-detected") or 0)
    return _Enhanced(body, output_format, detected, int(_header(response, "x-faces-enhanced") or 0),
                     int(width or 0), int(height or 0))


def _header(response: HTTPResponse, name: str) -> str | None:
    """The value of header ``name``; the last one when it came more than once."""
    value = response.get(name)
    return value[-1] if isinstance(value, list) else value


def _pixel_size(data: bytes) -> tuple[int, int]:
    """The photo's width and height from its header ((0, 0) when it has none)."""
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as image:
            return image.width, image.height
    except (OSError, ValueError, Image.DecompressionBombError):  # the pipeline will say what is wrong with it
        return 0, 0


# -- what the terminal shows -----------------------------------------------------------------


class _PhotoLine:
    """One photo in flight, as a display shows it."""

    def __init__(self, photo: PlannedPhoto) -> None:
        self.photo = photo
        self.progress = PhotoProgress()
        self.bar: tqdm[Any] | None = None
        self.slot = 0
        self.drawn_at = 0.0
        self.drawn_stage: str | None = None


class _TerminalDisplay:
    """A terminal: the photos bar, and under it a bar per photo in flight (its tiles and
    faces done of those planned, its stage and ETA), redrawn in place."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.stream = stream
        self.overall = tqdm(total=total, unit="photo", file=stream, dynamic_ncols=True, disable=not total, position=0,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} photos{postfix} [{elapsed}<{remaining}]")
        self.free_slots: list[int] = []
        self.slots_used = 0
        self.lines: set[_PhotoLine] = set()
        self.ticker = gevent.spawn(self._tick)

    def start(self, photo: PlannedPhoto) -> _PhotoLine:
        line = _PhotoLine(photo)
        if self.free_slots:
            line.slot = self.free_slots.pop(0)
        else:
            self.slots_used += 1
            line.slot = self.slots_used
        label = photo.label if len(photo.label) <= PHOTO_LABEL_WIDTH else "…" + photo.label[-PHOTO_LABEL_WIDTH + 1:]
        line.bar = tqdm(total=1, file=self.stream, dynamic_ncols=True, position=line.slot, leave=False,
                        desc=f"  {label:<{PHOTO_LABEL_WIDTH}}", bar_format=_photo_bar_format(""))
        self.lines.add(line)
        self._draw(line, force=True)
        return line

    def update(self, line: _PhotoLine, progress: PhotoProgress) -> None:
        line.progress = progress
        done, total = progress.steps
        self._draw(line, force=progress.stage != line.drawn_stage or (total > 0 and done == total))

    def _draw(self, line: _PhotoLine, *, force: bool = False) -> None:
        now = time.monotonic()
        if line.bar is None or (not force and now - line.drawn_at < TERMINAL_REDRAW_S):
            return
        done, total = line.progress.steps
        line.bar.total = max(1, total)
        line.bar.n = min(done, max(1, total))
        line.bar.bar_format = _photo_bar_format(line.progress.describe(time.time()))
        line.bar.refresh()
        line.drawn_at, line.drawn_stage = now, line.progress.stage

    def _tick(self) -> None:
        """The ETAs count down between updates."""
        while True:
            gevent.sleep(ETA_TICK_S)
            for line in list(self.lines):
                self._draw(line, force=True)

    def finish(self, line: _PhotoLine, outcome: PhotoOutcome, totals: str) -> None:
        self.lines.discard(line)
        if line.bar is not None:
            line.bar.close()
            line.bar = None
        self.free_slots.append(line.slot)
        self.free_slots.sort()
        self.overall.set_postfix_str(totals, refresh=False)
        self.overall.update(1)
        if outcome.status == "failed":
            self.overall.write(f"failed: {outcome.photo.label}: {outcome.error}", file=self.stream)

    def close(self) -> None:
        self.ticker.kill(block=False)
        for line in list(self.lines):
            if line.bar is not None:
                line.bar.close()
        self.overall.close()


def _photo_bar_format(text: str) -> str:
    """A photo's bar, then ``text`` (tqdm's postfix would put a comma before it)."""
    escaped = text.replace("{", "{{").replace("}", "}}")
    return "{desc} {percentage:3.0f}%|{bar}| " + escaped


class _PlainDisplay:
    """Not a terminal (a log, a pipe): a line when a photo enters a stage, at most one more
    every PLAIN_LINE_INTERVAL_S, and one when it ends."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.stream = stream
        self.total = total
        self.finished = 0

    def start(self, photo: PlannedPhoto) -> _PhotoLine:
        return _PhotoLine(photo)

    def update(self, line: _PhotoLine, progress: PhotoProgress) -> None:
        line.progress = progress
        now = time.monotonic()
        if progress.stage == line.drawn_stage and now - line.drawn_at < PLAIN_LINE_INTERVAL_S:
            return
        line.drawn_at, line.drawn_stage = now, progress.stage
        self.stream.write(f"{line.photo.label}: {progress.describe(time.time())}\n")
        self.stream.flush()

    def finish(self, line: _PhotoLine, outcome: PhotoOutcome, totals: str) -> None:
        self.finished += 1
        if outcome.status == "failed":
            self.stream.write(f"failed: {outcome.photo.label}: {outcome.error}\n")
        else:
            self.stream.write(f"{outcome.photo.label}: done in {outcome.seconds:.1f} s "
                              f"({self.finished}/{self.total} photos, {totals})\n")
        self.stream.flush()

    def close(self) -> None:
        pass


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def run_batch(photos: Sequence[PlannedPhoto], job: BatchJob, stream: IO[str] | None = None) -> BatchSummary:
    """Enhance ``photos``; show progress on ``stream`` (stderr): on a terminal the photos bar
    and a bar per photo in flight, else plain lines; then print the summary table."""
    stream = stream or sys.stderr
    summary = BatchSummary()
    started = time.monotonic()
    pending: list[PlannedPhoto] = []
    for photo in photos:
        if photo.target.exists() and not job.overwrite:
            summary.outcomes.append(PhotoOutcome(photo, "skipped", error="output exists (use --overwrite)"))
        else:
            pending.append(photo)
    runner: _LocalRunner | _ServerRunner | None = None
    if pending:
        click.echo(f"enhancing {len(pending)} photo(s) with preset {job.preset} at ×{job.scale:g}"
                   + (f" via {job.server}" if job.server else " (starting model servers…)"), err=True)
        try:
            runner = _ServerRunner(job) if job.server else _LocalRunner(job)
        except ChaoqingError as exc:
            summary.outcomes.extend(PhotoOutcome(photo, "failed", error=str(exc)) for photo in pending)
            pending = []
    display: _TerminalDisplay | _PlainDisplay = (
        _TerminalDisplay(len(pending), stream) if _is_terminal(stream) else _PlainDisplay(len(pending), stream))
    megapixels = [0.0, 0.0]
    gate = BoundedSemaphore(job.concurrency)

    def process(photo: PlannedPhoto) -> PhotoOutcome:
        assert runner is not None
        with gate:
            photo_started = time.monotonic()
            line = display.start(photo)
            try:
                data = gevent.get_hub().threadpool.apply(_read_photo, (photo.source, job.config.jobs.max_body_bytes))
                size = _pixel_size(data)
                enhanced = runner.enhance(data, size, lambda progress: display.update(line, progress))
                target = photo.target
                if SUFFIX_FOR_FORMAT[enhanced.output_format] != target.suffix.lower() and target.suffix.lower() != ".jpeg":
                    target = target.with_suffix(SUFFIX_FOR_FORMAT[enhanced.output_format])
                gevent.get_hub().threadpool.apply(_write_atomically, (target, enhanced.data))
                outcome = PhotoOutcome(photo, "done", time.monotonic() - photo_started, enhanced.faces_detected,
                                       enhanced.faces_enhanced, size[0] * size[1] / 1e6,
                                       enhanced.width * enhanced.height / 1e6, written=target)
            except (ChaoqingError, OSError) as exc:
                message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                outcome = PhotoOutcome(photo, "failed", time.monotonic() - photo_started, error=message)
            megapixels[0] += outcome.megapixels_in
            megapixels[1] += outcome.megapixels_out
            totals = f"{format_megapixels(megapixels[0])} MP in → {format_megapixels(megapixels[1])} MP out"
            display.finish(line, outcome, totals)
            return outcome

    try:
        workers = [gevent.spawn(process, photo) for photo in pending]
        gevent.joinall(workers, raise_error=True)
        summary.outcomes.extend(worker.value for worker in workers)
    finally:
        display.close()
        if runner is not None:
            runner.close()
    summary.seconds = time.monotonic() - started
    print_summary(summary, stream)
    return summary


def format_megapixels(megapixels: float) -> str:
    """Two decimals below 10 MP (small photos do not all read 0.0), one above."""
    return f"{megapixels:.2f}" if megapixels < 10 else f"{megapixels:.1f}"


def _display_path(path: Path | None) -> str:
    if path is None:
        return ""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def print_summary(summary: BatchSummary, stream: IO[str]) -> None:
    """A table of photos (or only the failures, when there are many), then the totals."""
    rows = summary.outcomes if len(summary.outcomes) <= SUMMARY_ROWS else [
        outcome for outcome in summary.outcomes if outcome.status == "failed"
    ]
    if rows:
        width = min(48, max(len("photo"), *(len(outcome.photo.label) for outcome in rows)))
        stream.write(f"\n{'photo':<{width}}  {'status':<7}  {'faces':>7}  {'MP out':>7}  {'time':>7}  note\n")
        for outcome in rows:
            label = outcome.photo.label if len(outcome.photo.label) <= width else "…" + outcome.photo.label[-width + 1:]
            faces = "-" if outcome.status != "done" else (
                "skipped" if outcome.faces_detected is None else f"{outcome.faces_enhanced}/{outcome.faces_detected}")
            note = outcome.error if outcome.status != "done" else _display_path(outcome.written)
            megapixels_out = format_megapixels(outcome.megapixels_out)
            stream.write(f"{label:<{width}}  {outcome.status:<7}  {faces:>7}  {megapixels_out:>7}  "
                         f"{outcome.seconds:>6.1f}s  {note}\n")
    looked = [outcome for outcome in summary.outcomes if outcome.status == "done" and outcome.faces_detected is not None]
    faces_enhanced = sum(outcome.faces_enhanced for outcome in looked)
    faces_detected = sum(outcome.faces_detected or 0 for outcome in looked)
    done = [outcome for outcome in summary.outcomes if outcome.status == "done"]
    faces = (f"faces {faces_enhanced}/{faces_detected} enhanced" if looked or not done
             else "faces not looked for (detection skipped)")
    stream.write(
        f"\n{len(summary.outcomes)} photo(s): {summary.done} done, {summary.skipped} skipped, {summary.failed} failed; "
        f"{faces}; {summary.seconds:.1f} s\n"
    )
    stream.flush()
