"""``chaoqing bench large`` and ``chaoqing bench seams``: large photos through tiles.

``large`` — one large photo (12 MP by default, to 2×: 48 MP out) through the running
service: ``chaoqing serve`` in a child process, exactly as users start it, with a config that
maps every preset to the chosen upscaler without face enhancement (what the ``fast`` preset
does), so no unused model is loaded. The gateway starts its model servers itself (or uses
``--endpoints``). Reported: latency, Server-Timing stages, the gateway process's peak
resident memory (Linux's ``VmHWM``, and the largest of RSS samples taken while the request
ran), its RSS just before the request, the sizes that set the memory (decoded input,
uint16 canvas, uint8 output, tiles in flight) and the output. The model servers are other
processes and are not counted.

``seams`` — tiled against whole-image output for one real model on a crop of
scikit-image's astronaut (or ``--photo``): PSNR, largest difference, and the mean absolute
step between neighbouring output pixels across the tile seams, tiled against untiled at the
same columns and rows. It runs the runner in this process and stitches with the gateway's
own code (:mod:`chaoqing.gateway.stages.tiling`, the same plan, resampling and canvas as
:func:`chaoqing.gateway.stages.upscale.upscale_image`); the whole-image reference is one untiled pass of
the network (the runner's own tile size raised to the image's size), so it measures what
tiling costs, the runner's internal tiles included.

Photos: ``--photo PATH`` (any file Pillow opens), else scikit-image's astronaut. For
``large`` the source is mirrored out to ``--megapixels`` at 4:3 (mirroring keeps a photo's
real detail, unlike blowing it up), then JPEG-encoded at quality 92, as a camera would.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from chaoqing.config import PRESETS, TileSettings

__all__ = ["large", "mean_step_across", "mirrored_photo", "psnr", "run_large", "run_seams", "seams"]

COMPACT_X4 = "realesr-animevideov3-x4"
DEFAULT_MEGAPIXELS = 12.0
ASPECT_WIDTH, ASPECT_HEIGHT = 4, 3  # a camera's frame
CAMERA_JPEG_QUALITY = 92
SAMPLE_INTERVAL_S = 0.05  # RSS samples while the request runs
TIMELINE_POINTS = 40  # RSS samples kept in the report (the largest of each stretch)
START_TIMEOUT_S = 180.0  # `chaoqing serve` loads its models before it prints its URL
BENCH_DEADLINE_S = 1800.0  # a 12 MP photo on 2 CPU cores takes minutes; the default 300 s is for users
SERVING_MARK = "serving on "
STOP_GRACE_S = 30.0
BYTES_PER_MEBIBYTE = 1024 * 1024
PEAK_LINE = "VmHWM:"  # Linux /proc/PID/status: peak resident set size, kB
RSS_LINE = "VmRSS:"
KIBIBYTE = 1024
PIXEL_LEVELS = 255.0


# -- photos -----------------------------------------------------------------------------------


def _source_photo(path: Path | None) -> Any:
    """RGB uint8 [H, W, 3] from ``path``, or scikit-image's astronaut.

    Raises click.ClickException when the file cannot be read or scikit-image is missing."""
    import numpy as np

    if path is not None:
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise click.ClickException(f"cannot read {path}: {exc}") from exc
    try:
        import skimage.data
    except ImportError as exc:
        raise click.ClickException("scikit-image is not installed: pass --photo PATH") from exc
    return np.asarray(skimage.data.astronaut())  # type: ignore[no-untyped-call]


def mirrored_photo(source: Any, megapixels: float) -> Any:
    """``source`` mirrored out (and cropped) to about ``megapixels`` at 4:3."""
    import numpy as np

    unit = math.sqrt(megapixels * 1e6 / (ASPECT_WIDTH * ASPECT_HEIGHT))
    width, height = round(unit * ASPECT_WIDTH), round(unit * ASPECT_HEIGHT)
    source_height, source_width = source.shape[:2]
    padded = np.pad(source, ((0, max(0, height - source_height)), (0, max(0, width - source_width)), (0, 0)),
                    mode="symmetric")
    return np.ascontiguousarray(padded[:height, :width])


def _jpeg(rgb: Any, quality: int = CAMERA_JPEG_QUALITY) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# -- the gateway process ----------------------------------------------------------------------


def _memory_line(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` size in bytes (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1]) * KIBIBYTE
    except OSError:
        pass
    return 0


def _write_config(directory: Path, upscaler: str, endpoints: Sequence[str], tiles: Mapping[str, int]) -> Path:
    lines = [f"request_deadline_s = {BENCH_DEADLINE_S}", "", "[tiles]"]
    lines += [f"{key} = {value}" for key, value in tiles.items()]
    lines += ["", "[model_server]", "sim_latency_ms = 0"]
    for preset in PRESETS:  # every built-in one: a preset left out keeps its real models
        lines += ["", f"[presets.{preset}]", f"upscaler = {json.dumps(upscaler)}", 'face_model = ""']
    if endpoints:
        lines += ["", "[endpoints]", f"{json.dumps(upscaler)} = {json.dumps(list(endpoints))}"]
    path = directory / "bench-large.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class _Service:
    process: Any  # gevent.subprocess.Popen
    url: str
    log_path: Path

    def stop(self) -> None:
        """SIGTERM (the gateway drains and stops its model servers), SIGKILL after a while."""
        from chaoqing.bench.common import stop_process

        stop_process(self.process, STOP_GRACE_S)


def _start_service(config_path: Path, log_path: Path) -> _Service:
    """``chaoqing serve --config FILE --port 0``; returns once it prints its URL (models ready).

    Raises click.ClickException when it does not start."""
    import gevent
    from gevent import subprocess

    command = [sys.executable, "-m", "chaoqing", "serve", "--config", str(config_path), "--port", "0",
               "--log-level", "warning", "--log-format", "text"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True)
    service = _Service(process, "", log_path)
    line = ""
    with gevent.Timeout(START_TIMEOUT_S, False):
        assert process.stdout is not None
        while SERVING_MARK not in line:
            line = process.stdout.readline()
            if not line:
                break
    if SERVING_MARK not in line:
        service.stop()
        raise click.ClickException(f"chaoqing serve did not start; its log:\n{log_path.read_text()[-3000:]}")
    service.url = line.split(SERVING_MARK, 1)[1].split()[0].rstrip("/")
    return service


def _post(url: str, body: bytes, query: str, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    """POST a JPEG to /v1/enhance; returns status, headers (lower-case names), body."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
    try:
        connection.request("POST", f"/v1/enhance?{query}", body=body, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        data = response.read()
        return response.status, {key.lower(): value for key, value in response.getheaders()}, data
    finally:
        connection.close()


def _server_timing_s(header: str) -> dict[str, float]:
    """Server-Timing's stages in seconds."""
    from chaoqing.bench.common import parse_server_timing

    return {stage: round(milliseconds / 1000, 3) for stage, milliseconds in parse_server_timing(header).items()}


def run_large(photo: Path | None, megapixels: float, scale: float, upscaler: str, endpoints: Sequence[str],
              tiles: Mapping[str, int], output_format: str) -> dict[str, Any]:
    """One large photo through ``chaoqing serve``; the numbers as a dict.

    Raises click.ClickException when the service does not start or the request fails."""
    import gevent
    import numpy as np
    import psutil

    from chaoqing.config import TileSettings
    from chaoqing.gateway.stages.tiling import plan_tiles

    source = _source_photo(photo)
    rgb = mirrored_photo(source, megapixels) if megapixels > 0 else source
    height, width = rgb.shape[:2]
    body = _jpeg(rgb)
    output_width, output_height = round(width * scale), round(height * scale)
    settings = TileSettings(**tiles)
    with tempfile.TemporaryDirectory(prefix="chaoqing-bench-large-") as folder:
        directory = Path(folder)
        service = _start_service(_write_config(directory, upscaler, endpoints, tiles), directory / "serve.log")
        try:
            gateway = psutil.Process(service.process.pid)
            warm_up = _jpeg(np.ascontiguousarray(source[:64, :64]))
            status, _, answer = _post(service.url, warm_up, "preset=fast&scale=2&format=png", 120)
            if status != 200:
                raise click.ClickException(f"the warm-up request failed: {status} {answer[:300]!r}")
            rss_before = gateway.memory_info().rss
            peak_before = _memory_line(gateway.pid, PEAK_LINE)
            sampled_peak = rss_before
            timeline: list[tuple[float, float]] = []

            def sample() -> None:
                nonlocal sampled_peak
                while True:
                    rss = gateway.memory_info().rss
                    sampled_peak = max(sampled_peak, rss)
                    timeline.append((round(time.monotonic() - started, 2), _mib(rss)))
                    gevent.sleep(SAMPLE_INTERVAL_S)

            started = time.monotonic()
            sampler = gevent.spawn(sample)
            try:
                status, headers, answer = _post(service.url, body, f"preset=fast&scale={scale}&format={output_format}",
                                                BENCH_DEADLINE_S + 60)
            finally:
                latency = time.monotonic() - started
                sampler.kill()
            peak_after = _memory_line(gateway.pid, PEAK_LINE)
            rss_after = gateway.memory_info().rss
            if status != 200:
                raise click.ClickException(f"the request failed: {status} {answer[:500]!r}")
        finally:
            service.stop()
    # what the gateway had to hold, by the design (see docs/tiling.md)
    tile_size = min(settings.tile_size, _published_tile_size(upscaler)) if settings.tile_size else 0
    plan = plan_tiles(width, height, output_width, output_height, tile_size, settings.overlap, settings.margin)
    tile_height, tile_width = plan.tile_shape
    native_scale = 4
    in_flight = min(settings.max_concurrent_tiles, len(plan.tiles))
    sizes = {
        "request_body": len(body),
        "decoded_input": width * height * 3,
        "canvas_uint16": output_width * output_height * 3 * 2,
        "output_uint8": output_width * output_height * 3,
        "native_tile_outputs_in_flight": in_flight * tile_width * tile_height * native_scale**2 * 3,
        "response_body": len(answer),
    }
    return {
        "photo": str(photo) if photo else "skimage astronaut, mirrored",
        "input": f"{width}x{height}", "input_megapixels": round(width * height / 1e6, 2),
        "output": f"{output_width}x{output_height}", "output_megapixels": round(output_width * output_height / 1e6, 2),
        "upscaler": upscaler, "scale": scale, "format": output_format,
        "tiles": len(plan.tiles), "tile_shape": [tile_width, tile_height], "tiles_in_flight": in_flight,
        "latency_s": round(latency, 2),
        "input_megapixels_per_s": round(width * height / 1e6 / latency, 4),
        "stages_s": _server_timing_s(headers.get("server-timing", "")),
        "gateway_rss_before_mib": _mib(rss_before),
        "gateway_rss_after_mib": _mib(rss_after),
        "gateway_peak_rss_mib": _mib(max(peak_after, sampled_peak)),
        "gateway_peak_rss_sampled_mib": _mib(sampled_peak),
        "gateway_peak_before_request_mib": _mib(peak_before),
        "gateway_peak_above_idle_mib": _mib(max(peak_after, sampled_peak) - rss_before),
        "sizes_mib": {key: _mib(value) for key, value in sizes.items()},
        "rss_timeline_mib": _decimate(timeline, TIMELINE_POINTS),
    }


def _decimate(timeline: Sequence[tuple[float, float]], points: int) -> list[tuple[float, float]]:
    """At most ``points`` samples of ``timeline``: the largest of each stretch, where it was."""
    if len(timeline) <= points:
        return list(timeline)
    stretch = math.ceil(len(timeline) / points)
    return [max(timeline[start : start + stretch], key=lambda item: item[1]) for start in range(0, len(timeline), stretch)]


def _published_tile_size(upscaler: str) -> int:
    """The tile size the runner publishes (the gateway lowers its tiles to it)."""
    from chaoqing.modelserver.runners.realesrgan import MODELS, one_pass_size

    model = MODELS.get(upscaler)
    return one_pass_size(model.default_tile_size, model.tile_context) if model else 1 << 30


def _mib(value: float) -> float:
    return round(value / BYTES_PER_MEBIBYTE, 1)


@click.command("large")
@click.option("--photo", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Source photo (default: scikit-image's astronaut).")
@click.option("--megapixels", default=DEFAULT_MEGAPIXELS, show_default=True, type=click.FloatRange(0, 16),
              help="Mirror the source out to this size (4:3); 0 sends the photo as it is.")
@click.option("--scale", default=2.0, show_default=True, type=click.FloatRange(1, 4))
@click.option("--upscaler", default=COMPACT_X4, show_default=True,
              help="Model for the background; sim-upscale-x4 measures the gateway alone in seconds.")
@click.option("--endpoints", default="", help="Comma-separated URLs of running servers of the upscaler.")
@click.option("--tile-size", default=TileSettings.tile_size, show_default=True, type=click.IntRange(0, 4096))
@click.option("--overlap", default=16, show_default=True, type=click.IntRange(0, 512))
@click.option("--margin", default=8, show_default=True, type=click.IntRange(0, 512))
@click.option("--max-concurrent-tiles", default=8, show_default=True, type=click.IntRange(1, 1024))
@click.option("--format", "output_format", default="jpeg", show_default=True, type=click.Choice(["jpeg", "png", "webp"]))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def large(photo: Path | None, megapixels: float, scale: float, upscaler: str, endpoints: str, tile_size: int,
          overlap: int, margin: int, max_concurrent_tiles: int, output_format: str, as_json: bool) -> None:
    """A 12 MP photo to 2× through `chaoqing serve`: latency and the gateway's peak memory."""
    tiles = {"tile_size": tile_size, "overlap": overlap, "margin": margin, "max_concurrent_tiles": max_concurrent_tiles}
    urls = [url.strip() for url in endpoints.split(",") if url.strip()]
    result = run_large(photo, megapixels, scale, upscaler, urls, tiles, output_format)
    result["command"] = "chaoqing " + " ".join(sys.argv[1:])
    _print(result, as_json)


# -- seams ------------------------------------------------------------------------------------


def psnr(reference: Any, candidate: Any) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when equal)."""
    import numpy as np

    error = np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(PIXEL_LEVELS**2 / error)


def mean_step_across(image: Any, positions: Sequence[int], axis: int) -> float:
    """Mean absolute difference between each of ``positions`` (columns for ``axis`` 1, rows
    for 0) and the one before it, over the other axis and the channels."""
    import numpy as np

    index = np.asarray(positions)
    here = np.take(image, index, axis=axis).astype(np.int16)
    before = np.take(image, index - 1, axis=axis).astype(np.int16)
    return float(np.abs(here - before).mean())


def run_seams(model_name: str, photo: Path | None, size: int, scale: float, tile_size: int, overlap: int, margin: int,
              threads: int, with_context: bool = True) -> dict[str, Any]:
    """Tiled against whole for one model; the numbers as a dict. Raises RunnerError."""
    import numpy as np

    from chaoqing.gateway.stages.resize import resize_image
    from chaoqing.gateway.stages.tiling import TileCanvas, plan_tiles, tile_window, window_core
    from chaoqing.gateway.stages.upscale import EDGE_PADDING_INPUT, geometry_from_parameters
    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    source = _source_photo(photo)
    image = np.ascontiguousarray(source[:size, :size])
    height, width = image.shape[:2]
    output_width, output_height = round(width * scale), round(height * scale)
    whole_runner = create_runner(model_name, RunnerSettings(threads=threads, tile_size=max(width, height)))
    started = time.monotonic()
    native = whole_runner.run({"image": image[None]})["image"][0]
    whole_s = time.monotonic() - started
    whole_runner.close()
    whole = resize_image(native, output_width, output_height)
    runner = create_runner(model_name, RunnerSettings(threads=threads))  # as a model server runs it
    settings = TileSettings(tile_size=tile_size, overlap=overlap, margin=margin)
    parameters = dict(runner.spec.as_metadata()["parameters"])
    if not with_context:
        parameters.pop("optional_inputs", None)
    geometry = geometry_from_parameters(parameters, settings)  # as the gateway does
    gateway_tile, context = geometry.tile_size, geometry.context
    plan = plan_tiles(width, height, output_width, output_height, gateway_tile, geometry.overlap, geometry.margin)
    canvas = TileCanvas(plan)
    started = time.monotonic()
    for tile in plan.tiles:
        inputs = {"image": tile_window(image, tile, context)[None]}
        if context:
            inputs[EDGE_PADDING_INPUT] = np.zeros((1, 1), dtype=np.int32)
        canvas.add(tile, window_core(runner.run(inputs)["image"][0], tile, context))
    tiled_s = time.monotonic() - started
    runner.close()
    tiled = canvas.finish()
    columns, rows = plan.seam_windows()
    difference = np.abs(whole.astype(np.int16) - tiled.astype(np.int16))
    result: dict[str, Any] = {
        "model": model_name, "photo": str(photo) if photo else "skimage astronaut",
        "input": f"{width}x{height}", "scale": scale, "output": f"{output_width}x{output_height}",
        "tile_size": gateway_tile, "overlap": geometry.overlap, "margin": geometry.margin, "context": context,
        "tiles": len(plan.tiles),
        "psnr_db": round(psnr(whole, tiled), 2), "max_difference": int(difference.max()),
        "mean_difference": round(float(difference.mean()), 4),
        "whole_s": round(whole_s, 1), "tiled_s": round(tiled_s, 1),
    }
    for name, positions, axis in (("columns", columns, 1), ("rows", rows, 0)):
        if positions:
            untiled_step = mean_step_across(whole, positions, axis)
            tiled_step = mean_step_across(tiled, positions, axis)
            result[f"seam_{name}"] = len(positions)
            result[f"seam_step_{name}_untiled"] = round(untiled_step, 4)
            result[f"seam_step_{name}_tiled"] = round(tiled_step, 4)
            result[f"seam_step_{name}_ratio"] = round(tiled_step / untiled_step, 4)
    return result


@click.command("seams")
@click.option("--model", "model_name", default=COMPACT_X4, show_default=True,
              help="realesr-animevideov3-x4 or realesrgan-x4plus (x4plus: minutes on 2 cores).")
@click.option("--photo", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Source photo (default: scikit-image's astronaut); its top-left SIZE×SIZE crop is used.")
@click.option("--size", default=480, show_default=True, type=click.IntRange(16, 2048),
              help="Crop side: 480 = two tiles a side (the gateway shrinks them to overlap by the minimum).")
@click.option("--scale", default=2.0, show_default=True, type=click.FloatRange(1, 4))
@click.option("--tile-size", default=TileSettings.tile_size, show_default=True, type=click.IntRange(16, 4096),
              help="The gateway's tile size (lowered to the model's published one, as the gateway does).")
@click.option("--overlap", default=16, show_default=True, type=click.IntRange(0, 512))
@click.option("--margin", default=8, show_default=True, type=click.IntRange(0, 512))
@click.option("--context/--no-context", default=True, show_default=True,
              help="Send tiles with the photo around them and edge_padding 0, as the gateway does for models "
                   "that take it; --no-context: plain tiles, the model pads each.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256), help="ncnn threads; 0 = all CPUs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def seams(model_name: str, photo: Path | None, size: int, scale: float, tile_size: int, overlap: int, margin: int,
          context: bool, threads: int, as_json: bool) -> None:
    """Tiled against whole-image output: PSNR and the steps across tile seams."""
    from chaoqing.errors import RunnerError

    try:
        result = run_seams(model_name, photo, size, scale, tile_size, overlap, margin, threads, context)
    except (RunnerError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    result["command"] = "chaoqing " + " ".join(sys.argv[1:])
    _print(result, as_json)


def _print(result: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        click.echo(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
