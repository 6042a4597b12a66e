"""``chaoqing bench presets``: what each preset costs a user, in seconds per megapixel and per face.

The README's preset table quotes these numbers. For each preset and photo, one real
``chaoqing serve`` subprocess (embedded model servers, the default compute budget, HTTP)
answers ``POST /v1/enhance`` twice per round: once with ``faces=false`` and once with faces
enhanced. From the medians over ``--rounds``:

- **seconds per megapixel** = the ``faces=false`` time / the photo's input megapixels: the
  background (decode, upscale, resample, encode), what a photo without faces costs;
- **seconds per face** = (the time with faces − the time without) / the faces enhanced: what
  each face adds to the wait. With faces enhanced beside the background, a face may add less
  than its own model time (it overlaps the upscale); that is the number a user waits for.

The order of the two requests alternates from round to round, and one untimed request per
preset warms the model servers first. Photos come from ``--photos``: the ones ``--photo``
names, or for each count in ``--faces`` the smallest photo in which the detector finds that
many faces. The JSON holds every run, the Server-Timing and the load average before each.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

__all__ = ["PresetsPlan", "presets", "run_presets"]

COLUMNS = [
    ("preset", "preset", ""),
    ("background", "upscaler", ""),
    ("faces by", "face_model", ""),
    ("photo", "photo", ""),
    ("input MP", "input_megapixels", ".3f"),
    ("faces", "faces", ""),
    ("scale", "scale", "g"),
    ("no faces s", "without_faces_s", ".2f"),
    ("with faces s", "with_faces_s", ".2f"),
    ("s per MP", "seconds_per_megapixel", ".1f"),
    ("s per face", "seconds_per_face", ".1f"),
    ("load", "load_average", ".2f"),
]


@dataclass(frozen=True)
class PresetsPlan:
    """What one ``bench presets`` run measures."""

    photos_path: Path
    preset_names: tuple[str, ...]
    scale: float
    face_counts: tuple[int, ...]
    rounds: int
    config_path: Path | None = None
    photo_names: tuple[str, ...] = ()


@dataclass
class _Cell:
    """One preset on one photo: every timed run, both ways."""

    preset: str
    photo: Any  # chaoqing.bench.local._Photo
    runs_s: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    timings: dict[bool, list[str]] = field(default_factory=lambda: {False: [], True: []})
    loads: list[float] = field(default_factory=list)
    faces_enhanced: int = 0


class _FaceCounter:
    """Counts the faces the gateway would enhance, with the configured detector in this process."""

    def __init__(self, config: Any) -> None:
        from chaoqing.modelserver.runners import RunnerSettings, create_runner

        self.config = config
        settings = config.model_server
        self.detector = create_runner(config.detector, RunnerSettings(
            runtime=settings.runtime_for(config.detector), device=settings.device_for(config.detector)))

    def count_faces(self, rgb: Any) -> int:
        from chaoqing.gateway.stages.detect import faces_from_detections, shrink_for_detection

        small, factor = shrink_for_detection(rgb, self.config.detection_max_side)
        faces = faces_from_detections(self.detector.run({"image": small}), factor, rgb.shape)
        return min(len(faces), int(self.config.limits.max_faces))

    def close(self) -> None:
        self.detector.close()


def _request(service: Any, cell: _Cell, scale: float, with_faces: bool) -> None:
    from chaoqing.errors import BenchError

    photo = cell.photo
    path = f"/v1/enhance?preset={cell.preset}&scale={scale:g}&faces={'true' if with_faces else 'false'}"
    cell.loads.append(os.getloadavg()[0])
    started = time.perf_counter()
    reply = service.connection.request("POST", path, photo.data, {"Content-Type": photo.media_type})
    elapsed = time.perf_counter() - started
    if reply.status != 200:
        raise BenchError(f"{cell.preset} on {photo.path.name}: the service answered {reply.status}: "
                         f"{reply.body[:300]!r}")
    cell.runs_s[with_faces].append(elapsed)
    cell.timings[with_faces].append(reply.headers.get("server-timing", ""))
    if with_faces:
        cell.faces_enhanced = int(reply.headers.get("x-faces-enhanced", "0"))


def _row(cell: _Cell, config: Any, scale: float) -> dict[str, Any]:
    preset = config.presets[cell.preset]
    without_s = statistics.median(cell.runs_s[False])
    with_s = statistics.median(cell.runs_s[True])
    megapixels = cell.photo.width * cell.photo.height / 1e6
    faces = cell.faces_enhanced
    return {
        "preset": cell.preset, "upscaler": preset.upscaler, "face_model": preset.face_model or "—",
        "photo": cell.photo.path.name, "size": cell.photo.size, "input_megapixels": megapixels,
        "faces": faces, "scale": scale, "without_faces_s": without_s, "with_faces_s": with_s,
        "seconds_per_megapixel": without_s / megapixels,
        "seconds_per_face": (with_s - without_s) / faces if faces and preset.face_model else None,
        "load_average": statistics.median(cell.loads),
        "without_faces_runs_s": cell.runs_s[False], "with_faces_runs_s": cell.runs_s[True],
        "without_faces_server_timing": cell.timings[False], "with_faces_server_timing": cell.timings[True],
        "loads": cell.loads,
    }


def run_presets(plan: PresetsPlan, progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure; returns (table rows, extra JSON). Raises BenchError."""
    from contextlib import ExitStack

    from chaoqing.bench.local import LocalPlan, _choose_photos, _Service
    from chaoqing.config import load_config
    from chaoqing.errors import BenchError, ConfigError

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as model servers do, before ncnn loads
    try:
        config = load_config(plan.config_path)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    unknown = [name for name in plan.preset_names if name not in config.presets]
    if unknown:
        raise BenchError(f"unknown preset(s) {', '.join(unknown)}; the config has {', '.join(config.presets)}")
    choice = LocalPlan(photos_path=plan.photos_path, preset=plan.preset_names[0], scales=(plan.scale,),
                       face_counts=plan.face_counts, compute_slots=(config.model_server.compute_slots,),
                       rounds=plan.rounds, threads=0, photo_names=plan.photo_names)
    counter = _FaceCounter(config)
    try:
        photos = _choose_photos(choice, counter, progress)
    finally:
        counter.close()
    with ExitStack() as stack:
        progress(f"starting chaoqing serve (compute_slots {config.model_server.compute_slots})")
        service = _Service(config.model_server.compute_slots, plan.config_path, config.face_input_size)
        stack.callback(service.stop)
        service.start()
        cells = [_Cell(name, photo) for name in plan.preset_names for photo in photos]
        for name in plan.preset_names:
            warm = min(photos, key=lambda photo: photo.width * photo.height)
            progress(f"warming up {name} on {warm.path.name} (untimed)")
            _request(service, _Cell(name, warm), plan.scale, True)
        for round_index in range(plan.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            for cell in cells:
                for with_faces in order:
                    progress(f"round {round_index + 1}/{plan.rounds}: {cell.preset} on {cell.photo.path.name} "
                             f"×{plan.scale:g}, faces {'on' if with_faces else 'off'}")
                    _request(service, cell, plan.scale, with_faces)
    rows = [_row(cell, config, plan.scale) for cell in cells]
    extra = {"photos": [{"photo": photo.path.name, "size": photo.size, "faces": photo.faces} for photo in photos],
             "compute_slots": config.model_server.compute_slots, "face_input_size": config.face_input_size,
             "runtimes": {name: config.model_server.runtime_for(name)
                          for preset in plan.preset_names
                          for name in (config.presets[preset].upscaler, config.presets[preset].face_model) if name}}
    return rows, extra


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


@click.command("presets")
@click.option("--photos", "photos_path", default=None, envvar="CHAOQING_BENCH_PHOTOS", show_envvar=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of photos; for each --faces count the smallest with that many faces is used. Required.")
@click.option("--presets", "presets_text", default=None,
              help="Presets to measure (comma-separated).  [default: every preset of the config]")
@click.option("--scale", default=2.0, show_default=True, type=click.FloatRange(1, 4),
              help="Output scale (the API's default is 2).")
@click.option("--faces", "faces_text", default="2,4", show_default=True,
              help="Face counts: one photo each (comma-separated).")
@click.option("--photo", "photo_names", multiple=True, metavar="NAME",
              help="Use this photo of the folder (repeatable) instead of choosing one per --faces count.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 20),
              help="Rounds; each runs every preset and photo with faces and without (medians).")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file: presets and models; the service is started with it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def presets(photos_path: Path | None, presets_text: str | None, scale: float, faces_text: str,
            photo_names: tuple[str, ...], rounds: int, config_path: Path | None, as_json: bool) -> None:
    """Seconds per megapixel and per face of each preset, through the real service."""
    from chaoqing.bench.common import Report, command_line, number_list, report
    from chaoqing.config import load_config
    from chaoqing.errors import BenchError, ConfigError

    if photos_path is None:
        raise click.UsageError("no photos: give --photos FOLDER (or set CHAOQING_BENCH_PHOTOS)")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    names = _names(presets_text) if presets_text else tuple(config.presets)
    if not names:
        raise click.BadParameter("give at least one preset", param_hint="--presets")
    plan = PresetsPlan(photos_path=photos_path, preset_names=names, scale=scale,
                       face_counts=number_list(faces_text, "--faces", int), rounds=rounds, config_path=config_path,
                       photo_names=photo_names)

    def progress(message: str) -> None:
        click.echo(f"… {message}", err=True)

    try:
        rows, extra = run_presets(plan, progress)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    settings = {"photos": str(photos_path), "photo_names": list(photo_names), "presets": list(names), "scale": scale,
                "faces": list(plan.face_counts), "rounds": rounds, "config": str(config_path) if config_path else None}
    report(Report("presets", command_line(), settings, rows, [], extra), COLUMNS, as_json=as_json)
