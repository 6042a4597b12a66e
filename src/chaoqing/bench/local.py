"""``chaoqing bench local``: on one machine, the service against the same work done in sequence.

Two ways to enhance the same photo with the same models, crop sizes and output, timed in
one run and alternating (a shared machine drifts by more than the difference measured):

- **the script**: one process, one call after another, direct runner calls (no servers, no
  HTTP): decode; the preset's upscaler on the whole photo (the runner tiles it itself) and
  a resize to the output size; the detector; per face the gateway's own alignment, crop size
  (``face_input_size``, 128 px), face model, inverse warp and soft mask; composite; encode.
  Its runners use the runtime and device the config gives each model, as the service's
  children do, and every core (``--threads``, 0 = the cores this process may use), as a
  script with nothing else to run would. This is what the Real-ESRGAN / GFPGAN tools do.
- **the service**: a real ``chaoqing serve`` subprocess (embedded model servers, HTTP), with
  ``[model_server] compute_slots`` set to each value of ``--compute-slots`` (a value 0 shows
  it without a budget), one POST /v1/enhance per photo and scale.

Photos come from ``--photos`` (a folder): for each count in ``--faces`` (2 and 4), the
smallest photo in which the detector finds exactly that many faces, or the ones ``--photo``
names. Each round runs every
photo × scale × side once; the order of the sides rotates from round to round, and each
side is warmed up once first (untimed). Per photo and scale the table gives the medians
and the ratio service / script; the target is ≤ 0.9 for the first ``--compute-slots``
value. The JSON holds every run, the load average before it, the service's Server-Timing
and the script's own stage times.

``--batching`` adds, for each photo's face crops, the face model three ways: the crops one
after another on every core, as one batch on every core, and side by side ``slots`` at a time
on cores / slots threads each (as the model servers run them under a budget).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click

__all__ = ["local", "run_local"]

RATIO_TARGET = 0.9  # issue 12: the service takes at most 0.9× the sequential script's time
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
SERVE_START_TIMEOUT_S = 300.0  # three model servers load on a busy 2-core machine
REQUEST_DEADLINE_S = 1800.0  # generous: a run must never fail on a slow round
SERVING_MARK = "serving on "
STOP_GRACE_S = 30.0

COLUMNS = [
    ("photo", "photo", ""),
    ("size", "size", ""),
    ("faces", "faces", ""),
    ("scale", "scale", "g"),
    ("slots", "compute_slots", ""),
    ("script s", "script_s", ".2f"),
    ("service s", "service_s", ".2f"),
    ("service / script", "ratio", ".3f"),
    ("load", "load_average", ".2f"),
]
BATCHING_COLUMNS = [
    ("photo", "photo", ""),
    ("crops", "crops", ""),
    ("in turn s", "in_turn_s", ".2f"),
    ("one batch s", "one_batch_s", ".2f"),
    ("side by side s", "side_by_side_s", ".2f"),
]


def usable_cores() -> int:
    """The cores this process may run on (its affinity), as the supervisor counts them."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class LocalPlan:
    """What one ``bench local`` run measures."""

    photos_path: Path
    preset: str
    scales: tuple[float, ...]
    face_counts: tuple[int, ...]
    compute_slots: tuple[int, ...]
    rounds: int
    threads: int
    config_path: Path | None = None
    batching: bool = False
    photo_names: tuple[str, ...] = ()  # these files of the folder instead of choosing by face count


@dataclass
class _Photo:
    path: Path
    data: bytes
    media_type: str
    width: int
    height: int
    faces: int

    @property
    def size(self) -> str:
        return f"{self.width}×{self.height}"


@dataclass
class _Cell:
    """One photo at one scale: every run of the script and of each service."""

    photo: _Photo
    scale: float
    script_runs_s: list[float] = field(default_factory=list)
    script_stages: list[dict[str, float]] = field(default_factory=list)
    script_loads: list[float] = field(default_factory=list)
    crop_sides: list[int] = field(default_factory=list)
    service_runs_s: dict[int, list[float]] = field(default_factory=dict)
    service_timings: dict[int, list[str]] = field(default_factory=dict)
    service_loads: dict[int, list[float]] = field(default_factory=dict)
    service_faces: dict[int, int] = field(default_factory=dict)


class _Script:
    """The sequential script: the preset's runners in this process, called one after another."""

    def __init__(self, config: Any, preset_name: str, threads: int) -> None:
        from chaoqing.modelserver.runners import RunnerSettings, create_runner

        preset = config.presets[preset_name]
        self.config = config
        self.preset = preset
        settings = config.model_server
        sim_options = {"latency_ms": str(settings.sim_latency_ms), "faces": str(settings.sim_faces)}

        def runner_settings(name: str) -> Any:
            options = sim_options if name.startswith("sim-") else {}
            user_models = {name: config.models[name]} if name in config.models else {}  # a file of the user's
            runtime = config.models[name].runtime if user_models else settings.runtime_for(name)
            return RunnerSettings(threads=threads, runtime=runtime, device=settings.device_for(name),
                                  model_options=options, user_models=user_models)

        self.upscaler = create_runner(preset.upscaler, runner_settings(preset.upscaler))
        self.detector = create_runner(config.detector, runner_settings(config.detector))
        self.face_model = (
            create_runner(preset.face_model, runner_settings(preset.face_model)) if preset.face_model else None
        )

    def close(self) -> None:
        for runner in (self.upscaler, self.detector, self.face_model):
            if runner is not None:
                runner.close()

    def count_faces(self, rgb: Any) -> int:
        return len(self.detect(rgb))

    def detect(self, rgb: Any) -> list[Any]:
        """The faces the gateway would enhance: detected on its shrunk copy, largest first."""
        from chaoqing.gateway.stages.detect import faces_from_detections, shrink_for_detection

        small, factor = shrink_for_detection(rgb, self.config.detection_max_side)
        faces = faces_from_detections(self.detector.run({"image": small}), factor, rgb.shape)
        faces.sort(key=_box_area, reverse=True)
        return faces[: self.config.limits.max_faces]

    def face_crops(self, rgb: Any, faces: Sequence[Any], background_scale: float) -> list[Any]:
        """Each face aligned exactly as the gateway aligns it (crop size, template, warp)."""
        import numpy as np

        from chaoqing.gateway.stages.detect import alignment_template
        from chaoqing.gateway.stages.enhance_faces import (
            align_face,
            choose_crop_size,
            face_size_in_image,
        )
        from chaoqing.gateway.stages.face_geometry import FFHQ_TEMPLATE_512

        assert self.face_model is not None
        template = alignment_template(self.detector.spec.parameters, self.config.detector)
        eye_fraction = float(np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0])) / 512
        image_input = next(tensor for tensor in self.face_model.spec.inputs if tensor.name == "image")
        fixed = image_input.shape[1] if len(image_input.shape) == 4 and image_input.shape[1] > 0 else None
        model_scale = float(self.face_model.spec.parameters.get("scale", 1))
        crops = []
        for face in faces:
            side = face_size_in_image(face.landmarks, template)
            if side * eye_fraction < self.config.min_eye_distance_px:
                continue  # the gateway leaves such a face alone too
            crop_size = choose_crop_size(side, background_scale, model_scale, fixed, self.config.face_input_size,
                                         self.preset.face_min_crop)
            crops.append(align_face(rgb, face, template, crop_size))
        return crops

    def enhance(self, data: bytes, scale: float) -> tuple[bytes, dict[str, float], list[int]]:
        """The whole photo at ``scale``, in sequence: (encoded output, seconds per stage, crop sides)."""
        from chaoqing.gateway.pipeline import EnhanceOptions, face_match_settings
        from chaoqing.gateway.stages.composite import composite_face_pastes, prepare_face_paste
        from chaoqing.gateway.stages.decode import decode_image, to_8_bit
        from chaoqing.gateway.stages.encode import choose_output_format, encode_image
        from chaoqing.gateway.stages.enhance_faces import enhanced_face_from
        from chaoqing.gateway.stages.face_match import match_paste_to_background
        from chaoqing.gateway.stages.resize import resize_image

        stages: dict[str, float] = {}
        clock = _Clock(stages)
        with clock("decode"):
            decoded = decode_image(data, self.config.limits)
            rgb = to_8_bit(decoded.rgb)
            width, height = max(1, round(decoded.width * scale)), max(1, round(decoded.height * scale))
            background_scale = (width / decoded.width + height / decoded.height) / 2
        with clock("upscale"):
            native = self.upscaler.run({"image": rgb[None]})["image"][0]
            background = resize_image(native, width, height)
        pastes, crop_sides = [], []
        if self.face_model is not None:
            with clock("detect"):
                faces = self.detect(rgb)
            with clock("faces"):
                for crop in self.face_crops(rgb, faces, background_scale):
                    output = self.face_model.run({"image": crop.crop[None]})["image"]
                    enhanced = enhanced_face_from(crop, output, background_scale, self.preset.face_model or "")
                    pastes.append(prepare_face_paste(enhanced, (height, width, 3)))
                    crop_sides.append(int(crop.crop.shape[0]))
        with clock("composite"):
            settings = face_match_settings(EnhanceOptions(), self.preset)  # the preset's, as the service's
            pastes = [match_paste_to_background(paste, background, settings, background_scale)[0] for paste in pastes]
            canvas: Any = composite_face_pastes(background, pastes) if pastes else background
        with clock("encode"):
            output_format = choose_output_format(None, decoded)
            encoded = encode_image(canvas, None, output_format, None, decoded.icc_profile, 8)
        return encoded, stages, crop_sides


class _Clock:
    def __init__(self, stages: dict[str, float]) -> None:
        self.stages = stages

    def __call__(self, name: str) -> _Clock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self.stages[self._name] = self.stages.get(self._name, 0.0) + time.perf_counter() - self._started


def _box_area(face: Any) -> float:
    left, top, right, bottom = face.box
    return float(max(0.0, right - left) * max(0.0, bottom - top))


class _Service:
    """A ``chaoqing serve`` subprocess on a free port, with this compute budget."""

    def __init__(self, compute_slots: int, config_path: Path | None, face_input_size: int) -> None:
        self.compute_slots = compute_slots
        self.config_path = config_path
        self.face_input_size = face_input_size
        self.process: Any = None
        self.url = ""
        self.connection: Any = None

    def start(self) -> None:
        """Start it and wait until it serves; raises BenchError when it does not."""
        import gevent
        from gevent import subprocess

        from chaoqing.bench.common import HttpConnection, die_with_parent
        from chaoqing.errors import BenchError

        command = [sys.executable, "-m", "chaoqing", "serve", "--port", "0", "--log-level", "warning"]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        environment = {
            **os.environ, "PYTHONUNBUFFERED": "1",
            # the environment overrides the config file: the budget under test, and no request
            # of the bench may fail on a slow round
            "CHAOQING_MODEL_SERVER__COMPUTE_SLOTS": str(self.compute_slots),
            "CHAOQING_REQUEST_DEADLINE_S": str(REQUEST_DEADLINE_S),
            "CHAOQING_FACE_INPUT_SIZE": str(self.face_input_size),
            "CHAOQING_REMOTE__ATTEMPT_TIMEOUT_S": "0",
        }
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=environment,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        line = ""
        with gevent.Timeout(SERVE_START_TIMEOUT_S, False):
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if SERVING_MARK in line:
                    break
        if SERVING_MARK not in line:
            self.stop()
            raise BenchError(f"chaoqing serve (compute_slots {self.compute_slots}) did not start: "
                             f"exit code {self.process.poll()}; see its log above")
        self.url = line.split(SERVING_MARK, 1)[1].split()[0].rstrip("/")
        host, port = self.url.split("//", 1)[1].rsplit(":", 1)
        self.connection = HttpConnection(host, int(port), timeout_s=REQUEST_DEADLINE_S)

    def enhance(self, photo: _Photo, preset: str, scale: float) -> Any:
        """One POST /v1/enhance; raises BenchError unless it answers 200."""
        from chaoqing.errors import BenchError

        reply = self.connection.request("POST", f"/v1/enhance?preset={preset}&scale={scale:g}", photo.data,
                                        {"Content-Type": photo.media_type})
        if reply.status != 200:
            raise BenchError(f"the service answered {reply.status} for {photo.path.name}: {reply.body[:300]!r}")
        return reply

    def stop(self) -> None:
        from chaoqing.bench.common import stop_process

        if self.connection is not None:
            self.connection.close()
        if self.process is not None:
            stop_process(self.process, STOP_GRACE_S)  # SIGTERM: it drains and stops its model servers


class FaceCounter(Protocol):
    """What chooses photos by their faces: the script, or bench presets' detector alone."""

    def count_faces(self, rgb: Any) -> int:
        """The faces the gateway would enhance in this RGB photo."""


def _choose_photos(plan: LocalPlan, script: FaceCounter, progress: Callable[[str], None]) -> list[_Photo]:
    """The named photos, or for each face count the smallest photo of the folder with exactly
    that many faces."""
    from chaoqing.bench.models import _load_rgb
    from chaoqing.errors import BenchError

    if not plan.photos_path.is_dir():
        raise BenchError(f"--photos {plan.photos_path} is not a folder")
    found: dict[int, list[_Photo]] = {}
    named = [plan.photos_path / name for name in plan.photo_names]
    missing = [path.name for path in named if not path.is_file() or path.suffix.lower() not in PHOTO_SUFFIXES]
    if missing:
        raise BenchError(f"not a photo in {plan.photos_path}: {', '.join(missing)}")
    for path in named or sorted(plan.photos_path.iterdir()):
        if path.suffix.lower() not in PHOTO_SUFFIXES:
            continue
        rgb = _load_rgb(path)
        faces = script.count_faces(rgb)
        progress(f"{path.name}: {rgb.shape[1]}×{rgb.shape[0]}, {faces} face(s)")
        found.setdefault(faces, []).append(_Photo(path, path.read_bytes(), MEDIA_TYPES[path.suffix.lower()],
                                                  rgb.shape[1], rgb.shape[0], faces))
    if named:
        return [photo for photos in found.values() for photo in photos]
    chosen = []
    for count in plan.face_counts:
        if count not in found:
            raise BenchError(f"no photo in {plan.photos_path} has exactly {count} face(s) the detector finds; "
                             f"found {', '.join(f'{faces}: {len(photos)}' for faces, photos in sorted(found.items()))}")
        chosen.append(min(found[count], key=lambda photo: photo.width * photo.height))
    return chosen


def _run_script(script: _Script, cell: _Cell) -> None:
    cell.script_loads.append(os.getloadavg()[0])
    started = time.perf_counter()
    _, stages, crop_sides = script.enhance(cell.photo.data, cell.scale)
    cell.script_runs_s.append(time.perf_counter() - started)
    cell.script_stages.append(stages)
    cell.crop_sides = crop_sides


def _run_service(service: _Service, cell: _Cell, preset: str) -> None:
    slots = service.compute_slots
    cell.service_loads.setdefault(slots, []).append(os.getloadavg()[0])
    started = time.perf_counter()
    reply = service.enhance(cell.photo, preset, cell.scale)
    cell.service_runs_s.setdefault(slots, []).append(time.perf_counter() - started)
    cell.service_timings.setdefault(slots, []).append(reply.headers.get("server-timing", ""))
    cell.service_faces[slots] = int(reply.headers.get("x-faces-enhanced", "0"))


def _measure_batching(script: _Script, photo: _Photo, slots: int, threads: int) -> dict[str, Any]:
    """The face model on this photo's ×4 crops: in turn, as one batch, and ``slots`` side by side."""
    import gevent
    import numpy as np
    from gevent.threadpool import ThreadPool

    from chaoqing.bench.models import _load_rgb
    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    assert script.face_model is not None and script.preset.face_model is not None
    rgb = _load_rgb(photo.path)
    crops = [crop.crop for crop in script.face_crops(rgb, script.detect(rgb), 4.0)]
    same_size = [crop for crop in crops if crop.shape == crops[0].shape]  # a batch needs one shape
    started = time.perf_counter()
    for crop in same_size:
        script.face_model.run({"image": crop[None]})
    in_turn_s = time.perf_counter() - started
    started = time.perf_counter()
    script.face_model.run({"image": np.stack(same_size)})
    one_batch_s = time.perf_counter() - started
    side_runner = create_runner(script.preset.face_model, RunnerSettings(threads=max(1, threads // slots)))
    pool = ThreadPool(slots)
    try:
        side_runner.run({"image": same_size[0][None]})  # its first call sets ncnn up, as the others' did
        started = time.perf_counter()
        gevent.joinall([pool.spawn(side_runner.run, {"image": crop[None]}) for crop in same_size], raise_error=True)
        side_by_side_s = time.perf_counter() - started
    finally:
        pool.kill()
        side_runner.close()
    return {"photo": photo.path.name, "crops": len(same_size), "crop_side": int(same_size[0].shape[0]),
            "threads": threads, "side_by_side_threads": max(1, threads // slots), "slots": slots,
            "in_turn_s": in_turn_s, "one_batch_s": one_batch_s, "side_by_side_s": side_by_side_s}


def run_local(plan: LocalPlan, progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                            dict[str, Any]]:
    """Measure; returns (table rows, batching rows, extra JSON). Raises BenchError."""
    from contextlib import ExitStack

    from chaoqing.config import load_config
    from chaoqing.errors import BenchError, ConfigError

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as model servers do, before ncnn loads
    try:
        config = load_config(plan.config_path)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    if plan.preset not in config.presets:
        raise BenchError(f"preset {plan.preset!r} is not one of {', '.join(config.presets)}")
    threads = plan.threads or usable_cores()
    with ExitStack() as stack:
        progress(f"loading the {plan.preset} preset's runners in this process ({threads} threads each)")
        script = _Script(config, plan.preset, threads)
        stack.callback(script.close)
        photos = _choose_photos(plan, script, progress)
        cells = [_Cell(photo, scale) for photo in photos for scale in plan.scales]
        services = []
        for slots in plan.compute_slots:
            progress(f"starting chaoqing serve with compute_slots {slots}")
            service = _Service(slots, plan.config_path, config.face_input_size)
            stack.callback(service.stop)
            service.start()
            services.append(service)
        warm_photo = min(photos, key=lambda photo: photo.width * photo.height)
        progress(f"warming up both sides on {warm_photo.path.name} (untimed)")
        _run_script(script, _Cell(warm_photo, plan.scales[0]))
        for service in services:
            _run_service(service, _Cell(warm_photo, plan.scales[0]), plan.preset)
        sides: list[Any] = ["script", *services]
        for round_index in range(plan.rounds):
            order = sides[round_index % len(sides):] + sides[: round_index % len(sides)]
            for cell in cells:
                for side in order:
                    name = "the script" if side == "script" else f"the service (slots {side.compute_slots})"
                    progress(f"round {round_index + 1}/{plan.rounds}: {name} on {cell.photo.path.name} ×{cell.scale:g}")
                    if side == "script":
                        _run_script(script, cell)
                    else:
                        _run_service(side, cell, plan.preset)
        batching_rows = []
        if plan.batching and script.face_model is not None:
            budget = next((slots for slots in plan.compute_slots if slots > 0), 2)
            for photo in photos:
                progress(f"batching: the face model on {photo.path.name}'s crops three ways")
                batching_rows.append(_measure_batching(script, photo, budget, threads))
    rows = []
    for cell in cells:
        script_s = statistics.median(cell.script_runs_s)
        for slots in plan.compute_slots:
            service_s = statistics.median(cell.service_runs_s[slots])
            if cell.service_faces[slots] != len(cell.crop_sides):
                raise BenchError(f"{cell.photo.path.name} ×{cell.scale:g}: the service enhanced "
                                 f"{cell.service_faces[slots]} face(s), the script {len(cell.crop_sides)}")
            rows.append({
                "photo": cell.photo.path.name, "size": cell.photo.size, "faces": cell.photo.faces,
                "scale": cell.scale, "compute_slots": slots, "script_s": script_s, "service_s": service_s,
                "ratio": service_s / script_s,
                "load_average": statistics.median(cell.script_loads + cell.service_loads[slots]),
                "script_runs_s": cell.script_runs_s, "service_runs_s": cell.service_runs_s[slots],
                "script_loads": cell.script_loads, "service_loads": cell.service_loads[slots],
                "crop_sides": cell.crop_sides,
                "script_stages_s": {stage: statistics.median(run[stage] for run in cell.script_stages)
                                    for stage in cell.script_stages[0]},
                "service_server_timing": cell.service_timings[slots],
            })
    extra = {"photos": [{"photo": photo.path.name, "size": photo.size, "faces": photo.faces} for photo in photos],
             "script_threads": threads, "cores": usable_cores(), "preset": plan.preset,
             "preset_models": {"upscaler": config.presets[plan.preset].upscaler,
                               "face_model": config.presets[plan.preset].face_model, "detector": config.detector},
             "runtimes": {name: config.model_server.runtime_for(name)
                          for name in (config.presets[plan.preset].upscaler, config.presets[plan.preset].face_model)
                          if name},
             "face_input_size": config.face_input_size}
    return rows, batching_rows, extra


@click.command("local")
@click.option("--photos", "photos_path", default=None, envvar="CHAOQING_BENCH_PHOTOS", show_envvar=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of photos; for each --faces count the smallest with that many faces is used. Required.")
@click.option("--preset", default=None, metavar="NAME", help="Preset from the config.  [default: the config's, balanced]")
@click.option("--scales", "scales_text", default="4,2", show_default=True, help="Output scales (comma-separated).")
@click.option("--faces", "faces_text", default="2,4", show_default=True,
              help="Face counts: one photo each (comma-separated).")
@click.option("--photo", "photo_names", multiple=True, metavar="NAME",
              help="Use this photo of the folder (repeatable) instead of choosing one per --faces count.")
@click.option("--compute-slots", "slots_text", default=None,
              help="The service's [model_server] compute_slots, one service each (comma-separated; 0 = no "
                   "budget); the target is judged on the first.  [default: the config's]")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 20),
              help="Rounds; each runs every photo and scale on every side, in a rotating order (medians).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="The script's threads per runner; 0 = the cores this process may use.")
@click.option("--batching", is_flag=True, help="Also time the face model on each photo's crops: in turn, as one "
                                               "batch, and side by side one per compute slot.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file: presets, models, face_input_size; the service is started with it too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def local(photos_path: Path | None, preset: str | None, scales_text: str, faces_text: str, slots_text: str | None,
          photo_names: tuple[str, ...], rounds: int, threads: int, batching: bool, config_path: Path | None,
          as_json: bool) -> None:
    """The service against the same work in sequence, on this machine."""
    from chaoqing.bench.common import (
        Report,
        Target,
        command_line,
        markdown_table,
        number_list,
        report,
    )
    from chaoqing.config import load_config
    from chaoqing.errors import BenchError, ConfigError

    if photos_path is None:
        raise click.UsageError("no photos: give --photos FOLDER (or set CHAOQING_BENCH_PHOTOS)")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    slots = number_list(slots_text, "--compute-slots", int) if slots_text else (config.model_server.compute_slots,)
    if min(slots) < 0:
        raise click.BadParameter("compute slots are 0 (no budget) or more", param_hint="--compute-slots")
    plan = LocalPlan(
        photos_path=photos_path, preset=preset or config.preset, scales=number_list(scales_text, "--scales", float),
        face_counts=number_list(faces_text, "--faces", int), compute_slots=slots, rounds=rounds, threads=threads,
        config_path=config_path, batching=batching, photo_names=photo_names,
    )

    def progress(message: str) -> None:
        click.echo(f"… {message}", err=True)

    try:
        rows, batching_rows, extra = run_local(plan, progress)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    judged = plan.compute_slots[0]
    targets = [Target(f"service / script, {row['photo']} ({row['faces']} faces) ×{row['scale']:g}, "
                      f"compute_slots {judged}", row["ratio"], RATIO_TARGET)
               for row in rows if row["compute_slots"] == judged]
    settings = {"photos": str(photos_path), "photo_names": list(photo_names), "preset": plan.preset, "scales": list(plan.scales),
                "faces": list(plan.face_counts), "compute_slots": list(plan.compute_slots), "rounds": rounds,
                "threads": threads, "config": str(config_path) if config_path else None}
    report(Report("local", command_line(), settings, rows, targets, {**extra, "batching": batching_rows}),
           COLUMNS, as_json=as_json)
    if batching_rows and not as_json:
        click.echo("")
        click.echo(markdown_table(batching_rows, BATCHING_COLUMNS))

