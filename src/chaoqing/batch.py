"""``chaoqing enhance``: many photos through the pipeline, with a progress bar and a summary.

Photos go through the same pipeline as the HTTP API: in this process against embedded
model servers (started here, stopped at the end), or against a running gateway
(``--server URL``). Several photos are in flight at once (``--jobs``), each one fanning out
as usual. Outputs are written atomically (a temporary file in the target folder, then a
rename, removed on failure) and only ever inside the chosen output folder; a photo whose
output exists is skipped unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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

__all__ = ["IMAGE_SUFFIXES", "BatchJob", "BatchSummary", "PhotoOutcome", "PlannedPhoto", "plan_outputs", "run_batch"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEFAULT_OUTPUT_FOLDER = Path("enhanced")
SUFFIX_FOR_FORMAT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
SUMMARY_ROWS = 40  # more photos than this: the table lists failures only
SERVER_TIMEOUT_S = 900.0


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
    """The models this job calls: no detector when faces are off or the preset has no face model."""
    preset = job.config.presets[job.preset]
    if job.faces and preset.face_model:
        return job.config.models_needed(job.preset)
    return (preset.upscaler,)


class _LocalRunner:
    """Photos through the pipeline in this process, against embedded or configured model servers."""

    def __init__(self, job: BatchJob) -> None:
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
        self.services = PipelineServices(job.config, self.remotes)
        self.job = job

    def enhance(self, data: bytes) -> tuple[bytes, str, int | None, int, int, int]:
        from chaoqing.gateway.pipeline import EnhanceOptions, enhance_photo

        job = self.job
        options = EnhanceOptions(job.scale, job.faces, job.preset, job.output_format, job.quality,
                                 strip_metadata=job.strip_metadata, strip_gps=job.strip_gps)
        result = enhance_photo(data, None, options, self.services)
        detected = None if result.face_detection_skipped else result.faces_detected
        return result.data, result.output_format, detected, result.faces_enhanced, result.width, result.height

    def close(self) -> None:
        self.remotes.close()
        if self.supervisor is not None:
            self.supervisor.stop(grace_s=5.0)


class _ServerRunner:
    """Photos posted to a running gateway."""

    def __init__(self, job: BatchJob) -> None:
        from geventhttpclient import HTTPClient

        parts = urlsplit(job.server or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidParameter(f"--server must be an http(s) URL, not {job.server!r}")
        self.base_path = parts.path.rstrip("/")
        self.client = HTTPClient(parts.hostname, parts.port, ssl=parts.scheme == "https", concurrency=job.concurrency,
                                 connection_timeout=10, network_timeout=SERVER_TIMEOUT_S)
        self.job = job

    def enhance(self, data: bytes) -> tuple[bytes, str, int | None, int, int, int]:
        job = self.job
        query: dict[str, Any] = {"scale": job.scale, "preset": job.preset, "faces": str(job.faces).lower()}
        if job.output_format:
            query["format"] = job.output_format
        if job.quality:
            query["quality"] = job.quality
        for name, value in (("strip_metadata", job.strip_metadata), ("strip_gps", job.strip_gps)):
            if value is not None:
                query[name] = str(value).lower()
        headers = {"Content-Type": "application/octet-stream"}
        if job.api_key:
            headers["Authorization"] = f"Bearer {job.api_key}"
        response = self.client.request("POST", f"{self.base_path}/v1/enhance?{urlencode(query)}", body=data, headers=headers)
        body = response.read()
        if response.status_code != 200:
            try:
                error = json.loads(body)["error"]
                message = f"{error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}"
            raise GatewayError(message, status=response.status_code)
        media_type = _header(response, "content-type") or "image/png"
        output_format = {"image/jpeg": "jpeg", "image/webp": "webp"}.get(media_type, "png")
        width, _, height = (_header(response, "x-output-size") or "0x0").partition("x")
        skipped = _header(response, "x-face-detection") == "skipped"
        detected = None if skipped else int(_header(response, "x-faces-detected") or 0)
        return (body, output_format, detected, int(_header(response, "x-faces-enhanced") or 0),
                int(width or 0), int(height or 0))

    def close(self) -> None:
        self.client.close()


def _header(response: HTTPResponse, name: str) -> str | None:
    """The value of header ``name``; the last one when it came more than once."""
    value = response.get(name)
    return value[-1] if isinstance(value, list) else value


def _megapixels(data: bytes) -> float:
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as image:
            return image.width * image.height / 1e6
    except (OSError, ValueError, Image.DecompressionBombError):  # the pipeline will say what is wrong with it
        return 0.0


def run_batch(photos: Sequence[PlannedPhoto], job: BatchJob, stream: IO[str] | None = None) -> BatchSummary:
    """Enhance ``photos``; show progress on ``stream`` (stderr); print the summary table."""
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
    progress = tqdm(total=len(pending), unit="photo", file=stream, dynamic_ncols=True, disable=not pending,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} photos{postfix} [{elapsed}<{remaining}]")
    megapixels = [0.0, 0.0]
    gate = BoundedSemaphore(job.concurrency)

    def process(photo: PlannedPhoto) -> PhotoOutcome:
        assert runner is not None
        with gate:
            photo_started = time.monotonic()
            try:
                data = gevent.get_hub().threadpool.apply(_read_photo, (photo.source, job.config.limits.max_body_bytes))
                megapixels_in = _megapixels(data)
                encoded, output_format, detected, enhanced, width, height = runner.enhance(data)
                target = photo.target
                if SUFFIX_FOR_FORMAT[output_format] != target.suffix.lower() and target.suffix.lower() != ".jpeg":
                    target = target.with_suffix(SUFFIX_FOR_FORMAT[output_format])
                gevent.get_hub().threadpool.apply(_write_atomically, (target, encoded))
                outcome = PhotoOutcome(photo, "done", time.monotonic() - photo_started, detected, enhanced,
                                       megapixels_in, width * height / 1e6, written=target)
            except (ChaoqingError, OSError) as exc:
                message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                outcome = PhotoOutcome(photo, "failed", time.monotonic() - photo_started, error=message)
            megapixels[0] += outcome.megapixels_in
            megapixels[1] += outcome.megapixels_out
            megapixels_text = f"{format_megapixels(megapixels[0])} MP in → {format_megapixels(megapixels[1])} MP out"
            progress.set_postfix_str(megapixels_text, refresh=False)
            progress.update(1)
            if outcome.status == "failed":
                progress.write(f"failed: {photo.label}: {outcome.error}", file=stream)
            return outcome

    try:
        workers = [gevent.spawn(process, photo) for photo in pending]
        gevent.joinall(workers, raise_error=True)
        summary.outcomes.extend(worker.value for worker in workers)
    finally:
        progress.close()
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
