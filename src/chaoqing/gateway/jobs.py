"""Jobs: a photo accepted now, enhanced in the background, its progress and result kept on disk.

``POST /v1/jobs`` stores the upload in the spool and answers at once; a runner in some gateway
process sharing that spool picks the job up, runs the same pipeline as ``/v1/enhance`` with
the job's own limits and deadline (``[jobs]``), and leaves the result beside it for
``result_ttl_s``. The HTTP side is :mod:`chaoqing.gateway.app`; this module is the spool
(:class:`Spool`, plain files, called on the threadpool) and the runner
(:class:`JobService`, greenlets on the hub).

The spool, one directory per job, no database::

    SPOOL/jobs/ID/input        the upload, as sent
    SPOOL/jobs/ID/state.json   the job's state; always replaced whole (write a temporary file,
                               then os.replace), so a reader sees the old state or the new one
    SPOOL/jobs/ID/run-N        the claim of run N: created with O_CREAT|O_EXCL, so of two
                               gateways that try, one gets it
    SPOOL/jobs/ID/cancel       a DELETE asked to cancel it (from whichever gateway)
    SPOOL/jobs/ID/result       the image, written (and fsync'ed) before the state says done
    SPOOL/incoming/ID/         a job being written; renamed into jobs/ once whole
    SPOOL/trash/ID-TOKEN/      a job being deleted; renamed out of jobs/ first

Who writes a job's state: whoever holds its highest run claim (and the POST that made it,
before any claim). Claims only go up, so there is no lock to break: a gateway takes a queued
job by creating ``run-(N+1)`` where ``N`` is the last; it takes over a job whose gateway
died (a running state whose heartbeat is older than ``heartbeat_timeout_s``, or a claim
never followed by a state) the same way, counting the run as lost. A gateway that finds
a later claim than its own (it stalled past the timeout and was taken over) drops the run
without another write. A job that lost ``max_attempts`` runs is failed with ``job_lost``
and the reason. An orderly stop releases its running jobs (state queued, no attempt spent)
for another gateway or the next start.

Per running job, one writer greenlet is the only one in this process that writes its
state: progress at most every ``PROGRESS_WRITE_INTERVAL_S`` (the pipeline's
:class:`~chaoqing.gateway.pipeline.ProgressListener` only updates memory), a heartbeat at
least every ``heartbeat_timeout_s / 4``, and the final state once. It also looks for a
cancel file and for a later claim. A DELETE on the gateway that runs the job kills the
job's greenlet at once (the pipeline kills its branches, their model calls are abandoned);
on another gateway it leaves the cancel file, which the owner sees within a tick.

ETA: once a tile is done, the seconds per tile measured so far times the tiles left (and
the same for faces, which run beside the tiles: the later of the two counts), plus an
estimate of composite and encode; before that, the input megapixels over the upscaler's
speed, as :class:`~chaoqing.gateway.estimate.ComputeEstimator` knows it (observed by this
gateway, else its metadata's ``input_megapixels_per_s``, else ``[jobs]
default_megapixels_per_s``). ``eta_basis`` says which of the two.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import BoundedSemaphore
from gevent.queue import Empty, Queue

from chaoqing.config import Config, JobSettings
from chaoqing.errors import (
    ChaoqingError,
    ImageTooLarge,
    JobHasNoResult,
    JobLost,
    JobNotFinished,
    JobNotFound,
    Overloaded,
    SpoolFull,
    http_error_for,
)
from chaoqing.gateway.estimate import (
    FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL,
    MEGAPIXEL,
    ComputeEstimator,
)
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.pipeline import (
    EnhanceOptions,
    EnhanceResult,
    PipelineServices,
    ProgressStage,
    enhance_photo,
)
from chaoqing.gateway.stages.decode import (
    check_media_type,
    check_output_size,
    probe_image,
)

__all__ = [
    "JOB_ID_PATTERN",
    "JobService",
    "JobState",
    "JobStatus",
    "Spool",
    "default_spool_dir",
    "job_config",
    "job_document",
    "key_digest",
]

_log = logging.getLogger("chaoqing.gateway.jobs")

T = TypeVar("T")

JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")  # secrets.token_hex(16): 128 random bits
STATE_FILE = "state.json"
INPUT_FILE = "input"
RESULT_FILE = "result"
CANCEL_FILE = "cancel"
RUN_PREFIX = "run-"
STATE_VERSION = 1  # the layout of state.json

PROGRESS_WRITE_INTERVAL_S = 0.5  # a running job's state on disk is at most this old
SCAN_INTERVAL_S = 1.0  # how often a gateway looks at the spool for work and expired jobs
ORPHAN_AGE_S = 3600.0  # incoming/ and trash/ entries older than this were left by a crash
CANCEL_WAIT_S = 5.0  # a DELETE waits this long for another gateway to stop the job it runs
STOP_TIMEOUT_S = 10.0  # an orderly stop waits this long for its released jobs' last writes
EVENT_POLL_INTERVAL_S = 0.25  # an event stream looks at its job this often
EVENT_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
EVENT_RETRY_MS = 2000  # EventSource reconnects after this long
RESULT_CHUNK_BYTES = 1024 * 1024
SPOOL_FULL_RETRY_AFTER_S = 60.0  # when no finished job is due to expire sooner
NOT_FINISHED_RETRY_AFTER_S = 2.0
MAX_RETRY_AFTER_S = 3600.0


class JobStatus(enum.StrEnum):
    """Where a job is; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class EtaBasis(enum.StrEnum):
    MEASURED = "measured"  # from the tiles (and faces) done so far
    ESTIMATE = "estimate"  # from the upscaler's speed: observed, published in its metadata, or configured


# -- the state, as stored -------------------------------------------------------------------


@dataclass(frozen=True)
class JobInput:
    """The upload: its media type (sniffed from the bytes), size and pixels (as displayed)."""

    media_type: str
    bytes: int
    width: int
    height: int


@dataclass(frozen=True)
class JobProgress:
    """How far the current run is. ``faces_total`` None: not detected yet; ``faces`` False:
    faces are not enhanced (faces=false, or a preset without a face model). ``eta_at`` is a
    wall-clock time, so a reader's ETA stays right however old the snapshot."""

    stage: str | None = None
    tiles_done: int = 0
    tiles_total: int | None = None
    faces: bool = False
    faces_done: int = 0
    faces_total: int | None = None
    eta_at: float | None = None
    eta_basis: str | None = None


@dataclass(frozen=True)
class JobFailure:
    code: str
    message: str
    status: int


@dataclass(frozen=True)
class JobResult:
    media_type: str
    bytes: int
    width: int
    height: int
    faces_detected: int | None  # None: detection was skipped (faces off, or no face model)
    faces_enhanced: int
    faces_over_limit: int
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    faces_identity: tuple[Mapping[str, Any], ...] = ()  # the identity guard's report per face it checked


@dataclass(frozen=True)
class JobState:
    """What ``state.json`` holds. Times are wall-clock seconds (``time.time()``): gateways on
    different machines compare them, so their clocks must agree (NTP)."""

    id: str
    status: JobStatus
    created: float
    parameters: Mapping[str, Any]  # EnhanceOptions' fields but request_id
    input: JobInput
    request_id: str = ""
    key_sha256: str = ""  # of the API key that made it ("" without keys); never the key
    runs: int = 0  # the highest run claim this state was written under
    attempts: int = 0  # runs that started
    lost: int = 0  # runs whose gateway stopped without a word
    owner: str = ""  # the gateway process running it: host:pid:token
    heartbeat: float = 0.0
    started: float | None = None  # the current (or last) run's start
    finished: float | None = None
    expires: float | None = None
    progress: JobProgress = JobProgress()
    error: JobFailure | None = None
    result: JobResult | None = None
    version: int = 0  # bumped at every write

    def replace(self, **changes: Any) -> JobState:
        return dataclasses.replace(self, version=self.version + 1, **changes)

    @property
    def spool_bytes(self) -> int:
        """Bytes this job holds in the spool (its input, and its result once there)."""
        return self.input.bytes + (self.result.bytes if self.result is not None else 0)

    def options(self) -> EnhanceOptions:
        known = {item.name for item in dataclasses.fields(EnhanceOptions)}
        values = {name: value for name, value in self.parameters.items() if name in known and name != "request_id"}
        return EnhanceOptions(**values, request_id=self.request_id or self.id)

    def to_json(self) -> bytes:
        payload = dataclasses.asdict(self)
        payload["layout"] = STATE_VERSION
        return json.dumps(payload, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobState:
        """Raises ValueError (or KeyError, TypeError) for a state that is not one."""
        payload = json.loads(raw)
        error, result = payload.pop("error", None), payload.pop("result", None)
        plain = {item.name for item in dataclasses.fields(cls)} - {"status", "input", "progress", "error", "result"}
        return cls(
            **{key: value for key, value in payload.items() if key in plain},  # a later layout's extras are ignored
            status=JobStatus(payload["status"]),
            input=JobInput(**payload["input"]),
            progress=JobProgress(**payload.get("progress") or {}),
            error=JobFailure(**error) if error else None,
            result=JobResult(**result) if result else None,
        )


def key_digest(api_key: str) -> str:
    """What a job stores of the API key that made it: its SHA-256, hex ("" for no key)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"


def job_document(state: JobState, now: float | None = None) -> dict[str, Any]:
    """The job as the API shows it (GET /v1/jobs/{id}, the events); see docs/jobs.md."""
    now = time.time() if now is None else now
    progress = state.progress
    elapsed = None
    if state.started is not None:
        elapsed = round(max(0.0, (state.finished if state.finished is not None else now) - state.started), 1)
    eta = None
    if state.status is JobStatus.RUNNING and progress.eta_at is not None:
        eta = round(max(0.0, progress.eta_at - now), 1)
    elif state.status is JobStatus.DONE:
        eta = 0.0
    base = f"/v1/jobs/{state.id}"
    return {
        "id": state.id,
        "status": str(state.status),
        "created": _iso(state.created),
        "started": _iso(state.started),
        "finished": _iso(state.finished),
        "expires": _iso(state.expires),
        "parameters": dict(state.parameters),
        "input": dataclasses.asdict(state.input),
        "progress": {
            "stage": progress.stage,
            "tiles": None if progress.tiles_total is None else {"done": progress.tiles_done, "total": progress.tiles_total},
            "faces": {"done": progress.faces_done, "total": progress.faces_total} if progress.faces else None,
            "elapsed_s": elapsed,
            "eta_s": eta,
            "eta_basis": progress.eta_basis if eta is not None and state.status is JobStatus.RUNNING else None,
        },
        "attempts": state.attempts,
        "error": dataclasses.asdict(state.error) if state.error is not None else None,
        "result": dataclasses.asdict(state.result) if state.result is not None else None,
        "links": {"self": base, "result": f"{base}/result", "events": f"{base}/events"},
    }


def default_spool_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/chaoqing/jobs``, else ``~/.local/state/chaoqing/jobs`` (the XDG base
    directory default): state a user's service keeps across restarts, not a cache."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "chaoqing" / "jobs"


def job_config(config: Config) -> Config:
    """The Config a job runs under: the request's, with the job's deadline and limits."""
    jobs = config.jobs
    limits = dataclasses.replace(
        config.limits, max_body_bytes=jobs.max_body_bytes, max_input_pixels=jobs.max_input_pixels,
        max_output_pixels=jobs.max_output_pixels,
    )
    return config.replace(limits=limits, request_deadline_s=jobs.deadline_s)


# -- the spool: plain files, called on the threadpool ----------------------------------------


@dataclass(frozen=True)
class SurveyEntry:
    """One job as a scan of the spool found it."""

    id: str
    state: JobState | None  # None: unreadable (being written or removed)
    highest_run: int
    highest_run_at: float  # the claim file's mtime
    cancel_requested: bool


class Spool:
    """The spool directory's files. Every method does blocking I/O: call them on the threadpool.

    Raises OSError for what the filesystem refuses (full, read-only, gone)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs = root / "jobs"
        self.incoming = root / "incoming"
        self.trash = root / "trash"

    def directory(self, job_id: str) -> Path:
        return self.jobs / job_id

    def create(self, state: JobState, data: bytes) -> None:
        """Write the job whole in incoming/, then publish it into jobs/ with one rename."""
        for folder in (self.jobs, self.incoming, self.trash):
            folder.mkdir(parents=True, exist_ok=True)
        staging = self.incoming / state.id
        staging.mkdir()
        try:
            _write_file(staging / INPUT_FILE, data, durable=True)
            _write_file(staging / STATE_FILE, state.to_json(), durable=True)
            os.rename(staging, self.directory(state.id))
            _sync_directory(self.jobs)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def read_state(self, job_id: str) -> JobState | None:
        """The job's state; None when there is no such job (or it is being removed)."""
        try:
            raw = (self.directory(job_id) / STATE_FILE).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return JobState.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            _log.error("job %s: state.json is unreadable (%s); leaving it alone", job_id, exc)
            return None

    def write_state(self, state: JobState, *, durable: bool = False) -> None:
        _write_file(self.directory(state.id) / STATE_FILE, state.to_json(), durable=durable)

    def commit(self, state: JobState, result: bytes | None) -> None:
        """A run's last word: the result (when done), then the final state, both durable."""
        if result is not None:
            _write_file(self.directory(state.id) / RESULT_FILE, result, durable=True)
        self.write_state(state, durable=True)

    def read_input(self, job_id: str) -> bytes:
        return (self.directory(job_id) / INPUT_FILE).read_bytes()

    def open_result(self, job_id: str) -> tuple[BinaryIO, int]:
        """The result, opened, and its size. Raises FileNotFoundError when it is gone."""
        file = open(self.directory(job_id) / RESULT_FILE, "rb")  # noqa: SIM115 - the response closes it
        return file, os.fstat(file.fileno()).st_size

    def claim(self, job_id: str, run: int, owner: str) -> bool:
        """Create ``run-N`` exclusively: True when this caller got it."""
        try:
            descriptor = os.open(self.directory(job_id) / f"{RUN_PREFIX}{run}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except (FileNotFoundError, NotADirectoryError):  # deleted meanwhile
            return False
        try:
            os.write(descriptor, owner.encode())
        finally:
            os.close(descriptor)
        return True

    def highest_run(self, job_id: str) -> tuple[int, float]:
        """The highest run claimed so far and its claim's mtime ((0, 0) for none)."""
        highest, mtime = 0, 0.0
        try:
            names = os.listdir(self.directory(job_id))
        except (FileNotFoundError, NotADirectoryError):
            return 0, 0.0
        for name in names:
            if name.startswith(RUN_PREFIX) and name[len(RUN_PREFIX):].isdigit():
                run = int(name[len(RUN_PREFIX):])
                highest = max(highest, run)
        if highest:
            try:
                mtime = os.stat(self.directory(job_id) / f"{RUN_PREFIX}{highest}").st_mtime
            except FileNotFoundError:
                mtime = 0.0
        return highest, mtime

    def request_cancel(self, job_id: str) -> None:
        try:
            (self.directory(job_id) / CANCEL_FILE).touch()
        except (FileNotFoundError, NotADirectoryError):
            pass

    def tick(self, job_id: str, run: int, state: JobState | None) -> tuple[bool, bool]:
        """A running job's writer tick: write ``state`` (when given, not fsync'ed: progress),
        then say whether a cancel was asked for and whether a later run superseded this one."""
        directory = self.directory(job_id)
        superseded = (directory / f"{RUN_PREFIX}{run + 1}").exists()
        if state is not None and not superseded:
            self.write_state(state)
        return (directory / CANCEL_FILE).exists(), superseded

    def job_ids(self) -> list[str]:
        try:
            return [name for name in os.listdir(self.jobs) if JOB_ID_PATTERN.match(name)]
        except FileNotFoundError:  # nothing was ever submitted here
            return []

    def survey(self, skip: set[str]) -> tuple[list[str], list[SurveyEntry]]:
        """Every job id, and the entries of those not in ``skip`` (the finished ones the caller
        knows already: a finished state never changes)."""
        ids = self.job_ids()
        entries = []
        for job_id in ids:
            if job_id in skip:
                continue
            state = self.read_state(job_id)
            highest, highest_at = self.highest_run(job_id)
            cancel = (self.directory(job_id) / CANCEL_FILE).exists()
            entries.append(SurveyEntry(job_id, state, highest, highest_at, cancel))
        return ids, entries

    def remove(self, job_id: str) -> bool:
        """Delete the job: renamed into trash/ first, so no reader sees half a job. False when
        another gateway removed it first."""
        self.trash.mkdir(parents=True, exist_ok=True)
        target = self.trash / f"{job_id}-{secrets.token_hex(4)}"
        try:
            os.rename(self.directory(job_id), target)
        except (FileNotFoundError, NotADirectoryError):
            return False
        shutil.rmtree(target, ignore_errors=True)
        return True

    def remove_orphans(self, now: float) -> int:
        """incoming/ and trash/ entries a crash left behind (older than ORPHAN_AGE_S)."""
        removed = 0
        for folder in (self.incoming, self.trash):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_AGE_S:
                        shutil.rmtree(entry.path, ignore_errors=True)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


def _write_file(path: Path, data: bytes, *, durable: bool) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, then os.replace."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        _sync_directory(path.parent)


def _sync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform allows opening a directory)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# -- progress, in memory ---------------------------------------------------------------------


class ProgressTracker:
    """A running job's :class:`~chaoqing.gateway.pipeline.ProgressListener`: it only updates
    these fields (on the hub); the job's writer greenlet snapshots them."""

    def __init__(self, faces: bool, input_megapixels: float, output_megapixels: float,
                 megapixels_per_s: float) -> None:
        self.faces = faces
        self.input_megapixels = input_megapixels
        self.output_megapixels = output_megapixels
        self.megapixels_per_s = megapixels_per_s
        self.stage: ProgressStage | None = None
        self.tiles_done = 0
        self.tiles_total: int | None = None
        self.faces_done = 0
        self.faces_total: int | None = None
        self.started = time.monotonic()
        self.tiles_started: float | None = None
        self.faces_started: float | None = None
        self.revision = 0  # bumped at every change

    def on_stage(self, stage: ProgressStage) -> None:
        self.stage = stage
        self.revision += 1

    def on_tiles(self, done: int, total: int) -> None:
        if self.tiles_started is None:
            self.tiles_started = time.monotonic()
        self.tiles_done, self.tiles_total = done, total
        self.revision += 1

    def on_faces(self, done: int, total: int) -> None:
        if self.faces_started is None:
            self.faces_started = time.monotonic()
        self.faces_done, self.faces_total = done, total
        self.revision += 1

    def eta(self, now: float) -> tuple[float | None, EtaBasis | None]:
        """Seconds left and what they rest on (see the module notes); (None, None) before
        the run has begun."""
        finish = self.output_megapixels * FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL
        if self.stage is None:
            return None, None
        if self.stage in (ProgressStage.COMPOSITE, ProgressStage.ENCODE):
            return finish, EtaBasis.ESTIMATE
        background, basis = self._background_left(now)
        faces = _rate_left(self.faces_started, self.faces_done, self.faces_total, now)
        left = background if faces is None else max(background, faces)
        return left + finish, basis

    def _background_left(self, now: float) -> tuple[float, EtaBasis]:
        measured = _rate_left(self.tiles_started, self.tiles_done, self.tiles_total, now)
        if measured is not None:
            return measured, EtaBasis.MEASURED
        estimate = self.input_megapixels / self.megapixels_per_s
        begun = now - self.tiles_started if self.tiles_started is not None else 0.0
        return max(0.0, estimate - begun), EtaBasis.ESTIMATE

    def snapshot(self) -> JobProgress:
        now = time.monotonic()
        eta, basis = self.eta(now)
        return JobProgress(
            stage=str(self.stage) if self.stage is not None else None,
            tiles_done=self.tiles_done, tiles_total=self.tiles_total,
            faces=self.faces, faces_done=self.faces_done, faces_total=self.faces_total,
            eta_at=None if eta is None else time.time() + eta,
            eta_basis=None if basis is None else str(basis),
        )


def _rate_left(started: float | None, done: int, total: int | None, now: float) -> float | None:
    """Seconds per item so far × items left; None until one item is done."""
    if started is None or total is None:
        return None
    if done >= total:
        return 0.0
    if done == 0:
        return None
    return (now - started) / done * (total - done)


# -- the runner: greenlets on the hub ---------------------------------------------------------


class _Ending(enum.Enum):
    CANCELLED = "cancelled"  # DELETE
    RELEASED = "released"  # an orderly stop: back to queued


@dataclass(frozen=True)
class _Finished:
    status: JobStatus
    expires: float


@dataclass
class _OwnedJob:
    """A job this process runs: its claim, its progress, its greenlets."""

    state: JobState  # as written when the run began (progress comes from the tracker)
    tracker: ProgressTracker
    run: int
    greenlet: gevent.Greenlet | None = None
    writer: gevent.Greenlet | None = None
    requests: Queue[tuple[JobState, bytes | None]] = field(default_factory=Queue)
    final: AsyncResult = field(default_factory=AsyncResult)  # the state written last (None: dropped)
    final_claimed: bool = False
    written: JobState | None = None

    @property
    def id(self) -> str:
        return self.state.id

    def live_state(self) -> JobState:
        base = self.written or self.state
        return dataclasses.replace(base, progress=self.tracker.snapshot())

    def offer_final(self, state: JobState, result: bytes | None = None) -> bool:
        """Hand the writer the run's last state; only the first offer counts (True)."""
        if self.final_claimed:
            return False
        self.final_claimed = True
        self.requests.put((state, result))
        return True


class JobService:
    """One gateway process's side of the spool: takes jobs in, runs up to ``max_running`` at
    once, keeps the spool within its bounds and TTL, and answers the API's questions."""

    def __init__(self, config: Config, services: PipelineServices, metrics: GatewayMetrics,
                 estimator: ComputeEstimator | None = None) -> None:
        self.config = config
        self.settings: JobSettings = config.jobs
        self.metrics = metrics
        self.pipeline = dataclasses.replace(services, config=job_config(config))
        self.spool = Spool(Path(self.settings.spool_dir) if self.settings.spool_dir else default_spool_dir())
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._owned: dict[str, _OwnedJob] = {}
        self._finished: dict[str, _Finished] = {}  # finished jobs seen (their state never changes)
        self._sizes: dict[str, int] = {}  # id → bytes, every job seen
        self._admission = BoundedSemaphore(1)
        self._wake = Event()
        self._keeper: gevent.Greenlet | None = None
        self.estimator = estimator or ComputeEstimator(services.remotes, self.settings.default_megapixels_per_s)
        self.stopping = False
        self.event_streams = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start looking at the spool (every SCAN_INTERVAL_S, and at once after a submission)."""
        if self._keeper is None:
            self._keeper = gevent.spawn(self._keep_spool)

    def stop(self) -> None:
        """Stop taking jobs and release the running ones (state queued, no attempt spent) for
        another gateway or the next start; waits up to STOP_TIMEOUT_S for their last writes."""
        self.stopping = True
        self._wake.set()
        if self._keeper is not None:  # it ends at its next look (a claim it is making is finished first)
            self._keeper.join(timeout=STOP_TIMEOUT_S)
            self._keeper.kill(block=True, timeout=STOP_TIMEOUT_S)
        enders = [gevent.spawn(self._end, owned, _Ending.RELEASED) for owned in list(self._owned.values())]
        gevent.joinall(enders, timeout=STOP_TIMEOUT_S)
        if enders:
            _log.info("released %d running job(s) for another gateway or the next start", len(enders))

    @property
    def running(self) -> int:
        return len(self._owned)

    # -- the API ---------------------------------------------------------------------------

    def probe(self, data: bytes, media_type: str | None, options: EnhanceOptions) -> JobInput:
        """Refuse at once what the job would fail on: not an image, over the job limits; the
        upload as the job records it (the media type its bytes say).

        Raises UnsupportedMediaType, InvalidImage, ImageTooLarge, InvalidParameter."""
        limits = self.pipeline.config.limits
        sniffed = check_media_type(media_type, data)
        info = _offload(probe_image, data, limits)
        check_output_size(info.width, info.height, options.scale, limits)
        return JobInput(sniffed, len(data), info.width, info.height)

    def check_room(self, upload_bytes: int) -> None:
        """Raises SpoolFull when one more job of ``upload_bytes`` would pass ``max_jobs`` or
        ``max_bytes``, ImageTooLarge when it could never fit."""
        if upload_bytes > self.settings.max_bytes:
            raise ImageTooLarge(f"the upload is {upload_bytes} bytes; the job spool holds {self.settings.max_bytes} in all")
        count, used = self._usage()
        if count + 1 > self.settings.max_jobs:
            raise SpoolFull(f"the job spool holds {count} jobs, its limit; retry when older results expire",
                            retry_after_s=self._retry_after())
        if used + upload_bytes > self.settings.max_bytes:
            raise SpoolFull(f"the job spool holds {used} bytes, and {upload_bytes} more would pass its limit of "
                            f"{self.settings.max_bytes}; retry when older results expire", retry_after_s=self._retry_after())

    def submit(self, data: bytes, media_type: str | None, options: EnhanceOptions, key_sha256: str) -> JobState:
        """Store a new job (queued) and wake the runner.

        Raises what :meth:`probe` and :meth:`check_room` raise, and SpoolFull when the spool
        cannot be written (OSError: full disk, read-only)."""
        upload = self.probe(data, media_type, options)
        parameters = {key: value for key, value in dataclasses.asdict(options).items() if key != "request_id"}
        job_id = secrets.token_hex(16)
        now = time.time()
        state = JobState(
            id=job_id, status=JobStatus.QUEUED, created=now, parameters=parameters,
            input=upload,
            request_id=options.request_id, key_sha256=key_sha256,
            progress=JobProgress(faces=self._faces_enhanced(options)),
        )
        with self._admission:
            self.check_room(len(data))
            try:
                _offload(self.spool.create, state, data)
            except OSError as exc:
                _log.error("cannot write job %s into the spool %s: %s", job_id, self.spool.root, exc)
                raise SpoolFull(f"the job spool cannot take the upload ({exc.strerror})",
                                retry_after_s=SPOOL_FULL_RETRY_AFTER_S) from None
            self._sizes[job_id] = state.spool_bytes
        self.metrics.jobs_submitted.inc()
        _log.info("job %s queued: %d bytes, %d×%d, preset %s, ×%g", job_id, len(data), upload.width, upload.height,
                  options.preset, options.scale)
        self._wake.set()
        return state

    def find(self, job_id: str, key_sha256: str) -> JobState:
        """The job's current state (live when this process runs it). Raises JobNotFound for
        no such job, and for a job another API key made."""
        owned = self._owned.get(job_id)
        state = owned.live_state() if owned is not None else None
        if state is None and JOB_ID_PATTERN.match(job_id):
            state = _offload(self.spool.read_state, job_id)
        if state is None or not secrets.compare_digest(state.key_sha256, key_sha256):
            raise JobNotFound(f"no job {job_id[:40]!r}")
        return state

    def open_result(self, job_id: str, key_sha256: str) -> tuple[JobState, Iterator[bytes], int]:
        """The finished job's state, its image as chunks read on the threadpool, and its size.

        Raises JobNotFound, JobNotFinished (queued, running: with Retry-After), JobHasNoResult
        (failed, cancelled)."""
        state = self.find(job_id, key_sha256)
        if state.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            eta = job_document(state)["progress"]["eta_s"]
            wait = NOT_FINISHED_RETRY_AFTER_S if eta is None else min(max(1.0, eta), MAX_RETRY_AFTER_S)
            raise JobNotFinished(f"job {job_id} is {state.status}; its result is not there yet", retry_after_s=wait)
        if state.status is not JobStatus.DONE:
            reason = f": {state.error.message}" if state.error is not None else ""
            raise JobHasNoResult(f"job {job_id} {state.status}{reason}; it has no result")
        try:
            file, size = _offload(self.spool.open_result, job_id)
        except FileNotFoundError:
            raise JobNotFound(f"no job {job_id!r}") from None  # expired and removed just now
        return state, _FileChunks(file), size

    def cancel(self, job_id: str, key_sha256: str) -> tuple[int, JobState | None]:
        """DELETE: cancel a queued or running job (200 and its state; 202 when the gateway
        running it has not confirmed within CANCEL_WAIT_S), or delete a finished one and its
        result (204). Raises JobNotFound."""
        state = self.find(job_id, key_sha256)
        if state.status.finished:
            if _offload(self.spool.remove, job_id):
                self._forget(job_id)
            return 204, None
        owned = self._owned.get(job_id)
        if owned is not None:
            final = self._end(owned, _Ending.CANCELLED)
            return 200, final or self.find(job_id, key_sha256)
        _offload(self.spool.request_cancel, job_id)
        self._wake.set()  # this process's runner cancels it if it is queued (see _take)
        ends_at = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < ends_at:
            gevent.sleep(EVENT_POLL_INTERVAL_S)
            current = self.find(job_id, key_sha256)
            if current.status.finished:
                return 200, current
        return 202, self.find(job_id, key_sha256)

    def events(self, job_id: str, key_sha256: str) -> Iterator[bytes]:
        """The job as Server-Sent Events (see :func:`_event_stream`). Raises JobNotFound, and
        Overloaded past ``max_event_streams`` open streams."""
        state = self.find(job_id, key_sha256)
        if self.event_streams >= self.settings.max_event_streams:
            raise Overloaded(f"{self.event_streams} event streams are open, the limit of this gateway process; "
                             "poll GET /v1/jobs/{id} instead", retry_after_s=NOT_FINISHED_RETRY_AFTER_S)
        return _CountedStream(self, _event_stream(self, state, key_sha256))

    # -- keeping the spool -------------------------------------------------------------------

    def _keep_spool(self) -> None:
        scans = 0
        while not self.stopping:
            try:
                self._scan(orphans=scans % 600 == 0)
            except OSError as exc:
                _log.warning("cannot read the job spool %s: %s", self.spool.root, exc)
            except Exception:  # noqa: BLE001 - the keeper must outlive any one bad scan; logged with its traceback
                _log.exception("looking at the job spool failed")
            scans += 1
            self._wake.wait(SCAN_INTERVAL_S)
            self._wake.clear()

    def _scan(self, *, orphans: bool = False) -> None:
        ids, entries = _offload(self.spool.survey, set(self._finished))
        present = set(ids)
        for job_id in [job_id for job_id in self._finished if job_id not in present]:
            self._forget(job_id)
        for job_id in [job_id for job_id in self._sizes if job_id not in present]:
            self._sizes.pop(job_id, None)
        now = time.time()
        waiting: list[SurveyEntry] = []
        for entry in entries:
            state = entry.state
            if state is None:
                continue
            self._sizes[entry.id] = state.spool_bytes
            if state.status.finished:
                self._note_finished(state)
            elif entry.id not in self._owned:
                waiting.append(entry)
        self._update_gauges(entries)
        for job_id in [job_id for job_id, finished in self._finished.items() if finished.expires <= now]:
            if _offload(self.spool.remove, job_id):
                _log.info("job %s expired; removed", job_id)
            self._forget(job_id)
        waiting.sort(key=lambda entry: entry.state.created if entry.state is not None else 0.0)
        for entry in waiting:
            if self.stopping:
                return
            if entry.state is not None:
                self._take(entry, entry.state, now)
        if orphans:
            _offload(self.spool.remove_orphans, now)

    def _take(self, entry: SurveyEntry, state: JobState, now: float) -> None:
        """Claim a job that needs a gateway: queued (when a slot is free, or to cancel it), or
        one whose gateway is gone (its run counts as lost)."""
        lost = self._owner_lost(entry, state, now)
        claimable = state.status is JobStatus.QUEUED and state.runs == entry.highest_run
        if not (lost or claimable):
            return
        if not (lost or entry.cancel_requested or self.running < self.settings.max_running):
            return
        run = entry.highest_run + 1
        if not _offload(self.spool.claim, state.id, run, self.owner):
            return  # another gateway was quicker
        current = _offload(self.spool.read_state, state.id) or state
        if lost:
            current = self._after_loss(current, entry, now)
        if current.status.finished:
            self._commit_alone(current.replace(runs=run))
        elif entry.cancel_requested:
            self._commit_alone(_final(current, JobStatus.CANCELLED, self.settings, runs=run))
        elif self.running < self.settings.max_running and not self.stopping:
            self._begin(current, run)
        else:  # taken over with no slot free: queued again, for whichever gateway has one
            self._commit_alone(current.replace(status=JobStatus.QUEUED, runs=run, owner="", progress=_fresh(current)))

    def _owner_lost(self, entry: SurveyEntry, state: JobState, now: float) -> bool:
        timeout = self.settings.heartbeat_timeout_s
        if entry.highest_run > state.runs:  # claimed, and no state ever written under that claim
            return now - entry.highest_run_at > timeout
        if state.status is not JobStatus.RUNNING:
            return False
        return now - state.heartbeat > timeout or _owner_process_gone(state.owner)

    def _after_loss(self, state: JobState, entry: SurveyEntry, now: float) -> JobState:
        lost = state.lost + 1
        last_sign = max(state.heartbeat, entry.highest_run_at)
        _log.warning("job %s: its gateway %s stopped while running it (last heard of %.0f s ago); lost runs: %d of %d",
                     state.id, state.owner or "(unknown)", now - last_sign, lost, self.settings.max_attempts)
        if lost >= self.settings.max_attempts:
            error = JobLost(
                f"the gateway running it stopped without a word {lost} time(s) (last: {state.owner or 'unknown'}); "
                "not run again: a photo that kills its gateway, e.g. out of memory, would keep doing so"
            )
            return _final(state, JobStatus.FAILED, self.settings, error=_job_error(error), lost=lost)
        return state.replace(status=JobStatus.QUEUED, lost=lost, owner="")

    def _commit_alone(self, state: JobState) -> None:
        """Write a state no run of this process follows (taken over, cancelled while queued)."""
        _offload(self.spool.commit, state, None)
        if state.status.finished:
            self._note_finished(state)
            self.metrics.jobs_ended.labels(str(state.status)).inc()
            _log.info("job %s %s%s", state.id, state.status, f": {state.error.message}" if state.error else "")

    def _begin(self, state: JobState, run: int) -> None:
        options = state.options()
        output_megapixels = state.input.width * state.input.height * options.scale**2 / MEGAPIXEL
        tracker = ProgressTracker(self._faces_enhanced(options), state.input.width * state.input.height / MEGAPIXEL,
                                  output_megapixels, self.settings.default_megapixels_per_s)
        now = time.time()
        running = state.replace(
            status=JobStatus.RUNNING, runs=run, attempts=state.attempts + 1, owner=self.owner, heartbeat=now,
            started=now, finished=None, error=None, progress=JobProgress(faces=tracker.faces),
        )
        _offload(self.spool.write_state, running, durable=True)
        owned = _OwnedJob(running, tracker, run, written=running)
        self._owned[state.id] = owned
        self.metrics.jobs_running.set(self.running)
        owned.writer = gevent.spawn(self._write, owned)
        owned.greenlet = gevent.spawn(self._run, owned)
        _log.info("job %s running (attempt %d)", state.id, running.attempts)

    # -- one run -----------------------------------------------------------------------------

    def _run(self, owned: _OwnedJob) -> None:
        state = owned.state
        try:
            data = _offload(self.spool.read_input, state.id)
            options = state.options()
            upscaler = self.config.presets[options.preset].upscaler
            owned.tracker.megapixels_per_s = self.estimator.speed_of(upscaler).megapixels_per_s
            result = enhance_photo(data, state.input.media_type, options, self.pipeline, owned.tracker)
            self.estimator.observe(upscaler, state.input.width * state.input.height / MEGAPIXEL,
                                   result.timings.get("upscale"))
        except ChaoqingError as exc:
            owned.offer_final(_final(owned.live_state(), JobStatus.FAILED, self.settings, error=_job_error(exc)))
            return
        except OSError as exc:  # the input could not be read
            error = _job_error(exc, f"the job's input could not be read: {exc.strerror}")
            owned.offer_final(_final(owned.live_state(), JobStatus.FAILED, self.settings, error=error))
            return
        except Exception as exc:  # noqa: BLE001 - a bug fails the job (internal_error), logged with its traceback
            _log.error("job %s failed unexpectedly", state.id, exc_info=exc)
            owned.offer_final(_final(owned.live_state(), JobStatus.FAILED, self.settings, error=_job_error(exc)))
            return
        done = _final(owned.live_state(), JobStatus.DONE, self.settings, result=_job_result(result))
        owned.offer_final(done, result.data)

    def _write(self, owned: _OwnedJob) -> None:
        """The run's one writer (see the module notes); never killed: it ends after the final
        state, or when a later run supersedes this one."""
        heartbeat_every = self.settings.heartbeat_timeout_s / 4
        interval = min(PROGRESS_WRITE_INTERVAL_S, heartbeat_every)
        revision = -1
        while True:
            try:
                final, result = owned.requests.get(timeout=interval)
            except Empty:
                pass
            else:
                self._write_final(owned, final, result)
                return
            now = time.time()
            written = owned.written or owned.state
            snapshot: JobState | None = None
            if owned.tracker.revision != revision or now - written.heartbeat >= heartbeat_every:
                revision = owned.tracker.revision
                snapshot = written.replace(progress=owned.tracker.snapshot(), heartbeat=now)
            try:
                cancel, superseded = _offload(self.spool.tick, owned.id, owned.run, snapshot)
            except OSError as exc:
                _log.warning("job %s: cannot write its progress: %s", owned.id, exc)
                continue
            if snapshot is not None and not superseded:
                owned.written = snapshot
            if superseded:
                self._drop(owned)
                return
            if cancel:
                gevent.spawn(self._end, owned, _Ending.CANCELLED)

    def _write_final(self, owned: _OwnedJob, state: JobState, result: bytes | None) -> None:
        try:
            _offload(self.spool.commit, state.replace(heartbeat=time.time()), result)
        except OSError as exc:
            _log.error("job %s: cannot store its %s state: %s", owned.id, state.status, exc)
            failed = _final(state, JobStatus.FAILED, self.settings, result=None,
                            error=_job_error(exc, f"the result could not be stored: {exc.strerror}"))
            try:
                _offload(self.spool.commit, failed, None)
                state = failed
            except OSError:  # left running: its heartbeat stops, and a gateway takes it over
                self._drop(owned)
                return
        self._owned.pop(owned.id, None)
        self.metrics.jobs_running.set(self.running)
        owned.written = state
        if state.status.finished:
            self._note_finished(state)
            self.metrics.jobs_ended.labels(str(state.status)).inc()
        else:
            self.metrics.jobs_ended.labels(_Ending.RELEASED.value).inc()
        elapsed = time.time() - (owned.state.started or time.time())
        detail = f": {state.error.message}" if state.error is not None else ""
        _log.info("job %s %s after %.1f s%s", state.id, state.status if state.status.finished else "released",
                  elapsed, detail)
        owned.final.set(state)
        self._wake.set()  # a slot is free

    def _drop(self, owned: _OwnedJob) -> None:
        """A later run took this one over: stop computing, write nothing more."""
        _log.warning("job %s: another gateway took it over (this one's heartbeat stalled); dropping this run", owned.id)
        if owned.greenlet is not None:
            owned.greenlet.kill(block=False)
        self._owned.pop(owned.id, None)
        self.metrics.jobs_running.set(self.running)
        self.metrics.jobs_ended.labels("taken_over").inc()
        owned.final.set(None)

    def _end(self, owned: _OwnedJob, ending: _Ending) -> JobState | None:
        """Cancel or release a running job: the final state goes to its writer first (so a
        result arriving meanwhile cannot win), then the job's greenlet is killed, which kills
        its branches and abandons their model calls. Returns the state written last."""
        current = owned.live_state()
        if ending is _Ending.CANCELLED:
            final = _final(current, JobStatus.CANCELLED, self.settings)
        else:
            final = current.replace(status=JobStatus.QUEUED, owner="", progress=_fresh(current))
        if owned.offer_final(final) and owned.greenlet is not None:
            owned.greenlet.kill(block=True, timeout=STOP_TIMEOUT_S)
        try:
            written: JobState | None = owned.final.get(timeout=STOP_TIMEOUT_S * 2)
        except gevent.Timeout:  # its writer is stuck on the spool; the heartbeat stops, and a gateway takes over
            _log.warning("job %s: its last state was not written within %g s", owned.id, STOP_TIMEOUT_S * 2)
            return None
        return written

    # -- helpers ------------------------------------------------------------------------------

    def _faces_enhanced(self, options: EnhanceOptions) -> bool:
        preset = self.config.presets.get(options.preset)
        return bool(options.faces and preset is not None and preset.face_model)

    def _usage(self) -> tuple[int, int]:
        ids = _offload(self.spool.job_ids)
        unknown = [job_id for job_id in ids if job_id not in self._sizes]
        for job_id in unknown:
            state = _offload(self.spool.read_state, job_id)
            if state is not None:
                self._sizes[job_id] = state.spool_bytes
        return len(ids), sum(self._sizes.get(job_id, 0) for job_id in ids)

    def _retry_after(self) -> float:
        now = time.time()
        expiries = [finished.expires for finished in self._finished.values() if finished.expires > now]
        if not expiries:
            return SPOOL_FULL_RETRY_AFTER_S
        return min(MAX_RETRY_AFTER_S, max(1.0, min(expiries) - now + SCAN_INTERVAL_S))

    def _note_finished(self, state: JobState) -> None:
        self._finished[state.id] = _Finished(state.status, state.expires if state.expires is not None else time.time())
        self._sizes[state.id] = state.spool_bytes

    def _forget(self, job_id: str) -> None:
        self._finished.pop(job_id, None)
        self._sizes.pop(job_id, None)

    def _update_gauges(self, entries: list[SurveyEntry]) -> None:
        counts = dict.fromkeys(JobStatus, 0)
        for entry in entries:
            if entry.state is not None and not entry.state.status.finished:
                counts[entry.state.status] += 1
        for finished in self._finished.values():
            counts[finished.status] += 1
        for status, count in counts.items():
            self.metrics.jobs_in_spool.labels(str(status)).set(count)
        self.metrics.jobs_spool_bytes.set(sum(self._sizes.values()))


def _fresh(state: JobState) -> JobProgress:
    return JobProgress(faces=state.progress.faces)


def _final(state: JobState, status: JobStatus, settings: JobSettings, **changes: Any) -> JobState:
    now = time.time()
    changes.setdefault("progress", dataclasses.replace(state.progress, eta_at=None, eta_basis=None))
    return state.replace(status=status, finished=now, expires=now + settings.result_ttl_s, owner="", **changes)


def _job_error(error: BaseException, message: str | None = None) -> JobFailure:
    mapped = http_error_for(error)
    if message is None:
        message = str(error) if isinstance(error, ChaoqingError) else "internal error"
    return JobFailure(mapped.code, message, mapped.status)


def _job_result(result: EnhanceResult) -> JobResult:
    return JobResult(
        media_type=result.media_type, bytes=len(result.data), width=result.width, height=result.height,
        faces_detected=None if result.face_detection_skipped else result.faces_detected,
        faces_enhanced=result.faces_enhanced,
        faces_over_limit=result.faces_over_limit,
        timings_ms={stage: round(seconds * 1000, 1) for stage, seconds in result.timings.items()},
        faces_identity=result.faces.identity_checks,
    )


def _owner_process_gone(owner: str) -> bool:
    """Whether ``owner`` was a process on this host that no longer exists (a restart here
    need not wait out the heartbeat timeout). A pid that is alive, or ours, says nothing:
    it may be another process with a reused pid, or another container's."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _offload(function: Callable[..., T], *arguments: Any, **keywords: Any) -> T:
    """Blocking file I/O on gevent's threadpool (a spool on NFS must not stall the hub)."""
    if keywords:
        arguments_tuple = (function, arguments, keywords)
        result: T = gevent.get_hub().threadpool.apply(_call_with_keywords, arguments_tuple)
        return result
    value: T = gevent.get_hub().threadpool.apply(function, arguments)
    return value


def _call_with_keywords(function: Callable[..., T], arguments: tuple[Any, ...], keywords: dict[str, Any]) -> T:
    return function(*arguments, **keywords)


# -- streaming -------------------------------------------------------------------------------


class _FileChunks:
    """A result file as a WSGI iterable: chunks read on the threadpool; closed by the server."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        chunk = _offload(self.file.read, RESULT_CHUNK_BYTES)
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        self.file.close()


class _CountedStream:
    """An event stream, counted among the open ones until the server closes it."""

    def __init__(self, service: JobService, events: Iterator[bytes]) -> None:
        self.service = service
        self.events = events
        self.closed = False
        service.event_streams += 1

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self.events)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.service.event_streams -= 1
            close = getattr(self.events, "close", None)
            if close is not None:
                close()


def _event(name: str, state: JobState) -> bytes:
    data = json.dumps(job_document(state), separators=(",", ":"))
    return f"event: {name}\nid: {state.version}\ndata: {data}\n\n".encode()


def _signature(state: JobState) -> tuple[Any, ...]:
    progress = state.progress
    return (state.status, state.attempts, progress.stage, progress.tiles_done, progress.tiles_total,
            progress.faces_done, progress.faces_total)


def _event_stream(service: JobService, state: JobState, key_sha256: str) -> Iterator[bytes]:
    """``event: progress`` at every change of status, stage, tiles or faces (the job's JSON
    as data), then one ``event: done|failed|cancelled`` and the end; a comment line every
    EVENT_KEEPALIVE_S. Ends early (the client reconnects) when the job is removed or the
    gateway stops. Memory per stream: the last state."""
    yield f"retry: {EVENT_RETRY_MS}\n\n".encode()
    last: tuple[Any, ...] | None = None
    last_sent = time.monotonic()
    while True:
        signature = _signature(state)
        if state.status.finished:
            if signature != last:
                yield _event("progress", state)
            yield _event(str(state.status), state)
            return
        if signature != last:
            last = signature
            last_sent = time.monotonic()
            yield _event("progress", state)
        elif time.monotonic() - last_sent > EVENT_KEEPALIVE_S:
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"
        if service.stopping:
            return
        gevent.sleep(EVENT_POLL_INTERVAL_S)
        try:
            state = service.find(state.id, key_sha256)
        except JobNotFound:
            return
