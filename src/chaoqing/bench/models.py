"""``chaoqing bench models``: the bundled models on this machine, direct and served.

Input megapixels per second of each runner called directly (in this process), through
its model server (one ``chaoqing model-server`` process per model, called with the
gateway's v2 client), and of each preset end to end through a gateway process (POST
/v1/enhance at scale 4, the models' own, so the gateway resamples nothing):

- **fast** (compact Real-ESRGAN ×4, no faces) on a photo of ``--megapixels`` (the largest
  photo of ``--photos``, resized with Lanczos to that size when it differs);
- **balanced** (compact background, 4xSPANkendata faces) and **quality** (x4plus everywhere) on
  the smallest photo of ``--photos`` in which the detector finds a face.

A preset's direct figure is the sum of the direct runner times of the calls it makes: the
upscaler on the photo, the detector on the photo (balanced, quality), and the face model
on one ``face_input_size`` (128 px) crop per face found. Efficiency = direct time / time
through the gateway (MP/s through the gateway over MP/s direct). Target: ≥ 85% for the
fast preset on a 2 MP photo.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import click

from chaoqing.config import PRESETS

__all__ = ["models", "run_models"]

EFFICIENCY_TARGET = 0.85
COMPACT = "realesr-animevideov3-x4"
PLUS = "realesrgan-x4plus"
DETECTOR = "face-detector"
# (upscaler, face model) of each built-in preset measured here, as chaoqing.config.PRESETS has them
PRESET_MODELS = {name: (PRESETS[name].upscaler, PRESETS[name].face_model) for name in ("fast", "balanced", "quality")}
WARMUP_SIDE = 64  # warm-up calls use a corner this big: same code paths, little time
FACE_CROP_SIDE = 128  # Config.face_input_size: the largest crop the pipeline sends a face model
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEADLINE_S = 1800.0
PHOTOS_VARIABLE = "CHAOQING_BENCH_PHOTOS"  # names the photos when --photos is not given

COLUMNS = [
    ("what", "what", ""),
    ("photo", "photo", ""),
    ("input MP", "input_megapixels", ".3f"),
    ("direct s", "direct_s", ".2f"),
    ("direct MP/s", "direct_mp_per_s", ".4f"),
    ("model server s", "server_s", ".2f"),
    ("model server MP/s", "server_mp_per_s", ".4f"),
    ("gateway s", "gateway_s", ".2f"),
    ("gateway MP/s", "gateway_mp_per_s", ".4f"),
    ("efficiency", "efficiency", ".1%"),
]


def _photos(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(item for item in path.iterdir() if item.suffix.lower() in PHOTO_SUFFIXES)


def _load_rgb(path: Path) -> Any:
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _resize_to_megapixels(rgb: Any, megapixels: float) -> Any:
    import numpy as np
    from PIL import Image

    height, width = rgb.shape[:2]
    factor = (megapixels * 1e6 / (width * height)) ** 0.5
    size = (max(16, round(width * factor)), max(16, round(height * factor)))
    if size == (width, height):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def _timed(function: Any, *arguments: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*arguments)
    return time.perf_counter() - started, result


def run_models(photos_path: Path, megapixels: float, presets: list[str], threads: int,
               progress: Any, rounds: int = 1) -> list[dict[str, Any]]:
    """Measure the runners and the presets; one row per runner and per preset. Raises BenchError.

    The fast preset's photo is run ``rounds`` times each way, directly and through the gateway,
    alternating (direct, gateway, direct, gateway, ...), and the medians are compared: on a
    shared machine passes minutes apart can differ by more than the overhead being measured.
    """
    import tempfile
    from contextlib import ExitStack

    import numpy as np

    from chaoqing.bench.common import (
        HttpConnection,
        encode_photo,
        raise_open_file_limit,
        start_gateway,
        start_model_server,
    )
    from chaoqing.config import Config, RemoteSettings
    from chaoqing.errors import BenchError
    from chaoqing.gateway.remote import RemoteModels
    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as model servers do, before ncnn loads
    raise_open_file_limit()
    candidates = _photos(photos_path)
    if not candidates:
        raise BenchError(f"no photos in {photos_path}")
    # every preset's models: the gateway is ready only with all
    needed = list(dict.fromkeys([*(name for models in PRESET_MODELS.values() for name in models if name), DETECTOR]))
    face_models = list(dict.fromkeys(face for preset in presets if (face := PRESET_MODELS[preset][1]) is not None))
    direct_models = [COMPACT] if presets == ["fast"] else list(dict.fromkeys(
        [COMPACT, DETECTOR, *face_models, *([PLUS] if "quality" in presets else [])]))
    runners = {name: create_runner(name, RunnerSettings(threads=threads)) for name in direct_models}

    def direct(name: str, rgb: Any) -> float:
        batched = rgb if name == DETECTOR else rgb[None]
        return _timed(runners[name].run, {"image": np.ascontiguousarray(batched)})[0]

    largest = max(candidates, key=lambda path: _load_rgb(path).size)
    big_rgb = _resize_to_megapixels(_load_rgb(largest), megapixels)
    face_photo, face_rgb, face_count = None, None, 0
    if DETECTOR in runners:
        found_faces = []
        for path in candidates:
            rgb = _load_rgb(path)
            found = len(runners[DETECTOR].run({"image": rgb})["scores"])
            if found:
                found_faces.append((found, rgb.size, path, rgb))
        if found_faces:  # the fewest faces, then the fewest pixels: x4plus is slow on a CPU
            face_count, _, face_photo, face_rgb = min(found_faces, key=lambda item: item[:2])
        else:
            raise BenchError(f"the detector finds no face in any photo of {photos_path}")
    crop = np.ascontiguousarray(_resize_to_megapixels(face_rgb, FACE_CROP_SIDE**2 / 1e6)[:FACE_CROP_SIDE, :FACE_CROP_SIDE]) \
        if face_rgb is not None else None

    # (what, model, photo label, rgb) for every runner measurement
    jobs: list[tuple[str, str, str, Any]] = [(COMPACT, COMPACT, largest.name, big_rgb)]
    if face_rgb is not None and face_photo is not None:
        jobs += [(COMPACT, COMPACT, face_photo.name, face_rgb), (DETECTOR, DETECTOR, face_photo.name, face_rgb)]
        jobs += [(name, name, f"{FACE_CROP_SIDE}×{FACE_CROP_SIDE} crop", crop) for name in face_models]
        if "quality" in presets:
            jobs.append((PLUS, PLUS, face_photo.name, face_rgb))
    rows: list[dict[str, Any]] = []
    direct_seconds: dict[tuple[str, str], float] = {}
    for what, model, label, rgb in jobs:
        progress(f"{model} directly on {label}")
        direct(model, rgb[:WARMUP_SIDE, :WARMUP_SIDE])  # the first call sets ncnn up
        direct_seconds[(model, label)] = direct(model, rgb)
    for name, runner in list(runners.items()):
        if not (name == COMPACT and "fast" in presets and rounds > 1):  # kept for the side-by-side rounds
            runner.close()
            del runners[name]

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="chaoqing-bench-") as directory:
        servers = {}
        for name in needed:
            progress(f"starting the {name} model server")
            servers[name] = start_model_server([name], threads=threads)
            stack.callback(servers[name].stop)
        endpoints = {name: (child.url,) for name, child in servers.items()}
        remotes = RemoteModels(endpoints, RemoteSettings())
        stack.callback(remotes.close)
        for what, model, label, rgb in jobs:
            progress(f"{model} through its model server on {label}")
            batched = rgb if model == DETECTOR else rgb[None]
            outputs = ["boxes", "scores", "landmarks"] if model == DETECTOR else ["image"]

            def through_server(model: str = model, batched: Any = batched, outputs: list[str] = outputs) -> None:
                remotes[model].infer({"image": np.ascontiguousarray(batched)}, outputs, time.monotonic() + DEADLINE_S)

            remotes[model].infer({"image": np.ascontiguousarray(batched[..., :WARMUP_SIDE, :WARMUP_SIDE, :])}, outputs,
                                 time.monotonic() + DEADLINE_S)  # connections, metadata, ncnn set-up
            seconds = _timed(through_server)[0]
            megapixels_in = rgb.shape[0] * rgb.shape[1] / 1e6
            rows.append({"what": f"runner {what}", "photo": label, "input_megapixels": megapixels_in,
                         "direct_s": direct_seconds[(model, label)],
                         "direct_mp_per_s": megapixels_in / direct_seconds[(model, label)],
                         "server_s": seconds, "server_mp_per_s": megapixels_in / seconds,
                         "efficiency": direct_seconds[(model, label)] / seconds, "efficiency_of": "model server / direct"})

        gateway_config = Config(detector=DETECTOR, endpoints={name: (child.url,) for name, child in servers.items()},
                                request_deadline_s=DEADLINE_S)
        config_path = Path(directory) / "gateway.toml"
        config_path.write_text(_config_toml(gateway_config), encoding="utf-8")
        progress("starting the gateway")
        gateway = start_gateway(config_path)
        stack.callback(gateway.stop)
        host, port = gateway.url.split("//", 1)[1].rsplit(":", 1)
        connection = HttpConnection(host, int(port), timeout_s=DEADLINE_S)
        stack.callback(connection.close)
        for preset in presets:
            upscaler, face_model = PRESET_MODELS[preset]
            if preset == "fast":
                label, rgb = largest.name, big_rgb
            else:
                assert face_photo is not None
                label, rgb = face_photo.name, face_rgb
            body = encode_photo(rgb, "JPEG", 95)
            request_path = f"/v1/enhance?preset={preset}&scale=4&format=jpeg"
            progress(f"preset {preset} through the gateway on {label}")

            def through_gateway(request_path: str = request_path, body: bytes = body) -> Any:
                reply = connection.request("POST", request_path, body, {"Content-Type": "image/jpeg"})
                if reply.status != 200:
                    raise BenchError(f"gateway answered {reply.status}: {reply.body[:300]!r}")
                return reply

            through_gateway(request_path, encode_photo(np.ascontiguousarray(rgb[:WARMUP_SIDE, :WARMUP_SIDE]), "JPEG", 95))
            seconds, reply = _timed(through_gateway)
            extra: dict[str, Any] = {}
            if preset == "fast" and rounds > 1:
                direct_runs, gateway_runs = [direct_seconds[(upscaler, label)]], [seconds]
                for round_number in range(2, rounds + 1):
                    progress(f"round {round_number} of {rounds}: {upscaler} directly, then preset fast, on {label}")
                    direct_runs.append(direct(upscaler, rgb))
                    gateway_runs.append(_timed(through_gateway)[0])
                direct_seconds[(upscaler, label)] = statistics.median(direct_runs)
                seconds = statistics.median(gateway_runs)
                extra = {"rounds": rounds, "direct_runs_s": direct_runs, "gateway_runs_s": gateway_runs}
            faces = int(reply.headers.get("x-faces-enhanced", "0"))
            total_direct = direct_seconds[(upscaler, label)]
            if face_model is not None:
                total_direct += direct_seconds[(DETECTOR, label)]
                total_direct += faces * direct_seconds[(face_model, f"{FACE_CROP_SIDE}×{FACE_CROP_SIDE} crop")]
            megapixels_in = rgb.shape[0] * rgb.shape[1] / 1e6
            rows.append({"what": f"preset {preset}", "photo": label, "input_megapixels": megapixels_in,
                         "faces": faces, "direct_s": total_direct, "direct_mp_per_s": megapixels_in / total_direct,
                         "gateway_s": seconds, "gateway_mp_per_s": megapixels_in / seconds,
                         "efficiency": total_direct / seconds, "efficiency_of": "gateway / direct",
                         "server_timing": reply.headers.get("server-timing", ""), **extra})
    for runner in runners.values():
        runner.close()
    if face_count:
        rows.append({"what": "faces found", "photo": face_photo.name if face_photo else "", "faces": face_count})
    return rows


def _config_toml(config: Any) -> str:
    lines = ['host = "127.0.0.1"', "port = 0", f'detector = "{config.detector}"',
             f"request_deadline_s = {config.request_deadline_s}", "",
             "[endpoints]"]
    lines += [f'"{name}" = ["{urls[0]}"]' for name, urls in config.endpoints.items()]
    return "\n".join(lines) + "\n"


@click.command("models")
@click.option("--photos", "photos_path", default=None, envvar=PHOTOS_VARIABLE, show_envvar=True,
              type=click.Path(exists=True, path_type=Path),
              help="A photo or a folder of them (one with a face for balanced and quality). Required.")
@click.option("--megapixels", default=2.0, show_default=True, type=click.FloatRange(0.001, 16),
              help="Size of the fast preset's photo.")
@click.option("--presets", "presets_text", default="fast,balanced,quality", show_default=True,
              help="Presets to run end to end (comma-separated).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="ncnn threads, direct and in the model servers; 0 = number of CPUs.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 20),
              help="Side-by-side rounds of the fast preset: direct, gateway, direct, gateway, ... (medians).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def models(photos_path: Path | None, megapixels: float, presets_text: str, threads: int, rounds: int,
           as_json: bool) -> None:
    """MP/s of the bundled models: directly, through a model server, end to end."""
    from chaoqing.bench.common import Report, Target, command_line, report
    from chaoqing.errors import BenchError

    presets = [item.strip() for item in presets_text.split(",") if item.strip()]
    if not presets or set(presets) - set(PRESET_MODELS):
        raise click.BadParameter(f"choose from {', '.join(PRESET_MODELS)}", param_hint="--presets")
    if photos_path is None:
        raise click.UsageError(
            f"no photos: give --photos PATH (a photo or a folder of them) or set {PHOTOS_VARIABLE}"
        )

    def progress(message: str) -> None:
        click.echo(f"… {message}", err=True)

    try:
        rows = run_models(photos_path, megapixels, presets, threads, progress, rounds)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    targets = [Target(f"fast preset efficiency through the gateway ({row['input_megapixels']:.2f} MP photo)",
                      row["efficiency"], EFFICIENCY_TARGET, at_most=False)
               for row in rows if row["what"] == "preset fast"]
    settings = {"photos": str(photos_path), "megapixels": megapixels, "presets": presets, "threads": threads,
                "scale": 4, "rounds": rounds}
    report(Report("models", command_line(), settings, [row for row in rows if row["what"] != "faces found"], targets),
           COLUMNS, as_json=as_json)
