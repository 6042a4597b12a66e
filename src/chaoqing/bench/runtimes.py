"""``chaoqing bench runtimes``: every bundled model on every runtime, side by side.

For each model × runtime × input size × batch: median input megapixels per second over
``--rounds`` alternating rounds (and the fastest round's seconds: on a shared machine the
least disturbed), the first call's seconds, the peak RSS and the largest difference to ncnn's
output on the same input.

- **What is timed** is the model's runner as a model server runs it (edge padding, the
  model's tiles unless ``--tile-size`` says otherwise, uint8 in and out), on a square crop of a
  real photo (``--photo``; by default scikit-image's astronaut, 512×512, cropped at its
  centre, or resized up first when the photo is smaller than the size), repeated ``batch``
  times in one call (one forward per tile position on OpenVINO, ONNX Runtime and PyTorch; image
  by image on ncnn).
- **Alternating rounds**: each round runs every size and batch on every runtime, the
  runtimes' order rotating from round to round, so that a shared machine's drift falls on
  all of them. Before the rounds each (size, batch) is warmed up once on each runtime,
  untimed by the rounds: ONNX Runtime and OpenVINO pay a one-time cost per new input shape
  (reported as ``first call s``).
- **A process per (model, runtime)** (:mod:`chaoqing.bench.runtime_worker`), loaded before the
  rounds and kept until the model is done, so each peak RSS is that runtime's own (read after
  each warm-up; sizes are warmed smallest first, so it is the peak up to that size).
- **Difference to ncnn**: the largest absolute difference between the network's float output
  and ncnn's, tile by tile on the warm-up call, in 1/255 units (``max diff /255``), and the
  largest difference between the uint8 outputs in levels.
- **Devices**: ``--device`` takes a comma-separated list; each runtime runs on the first
  device it drives (``cpu``, ``vulkan:N`` for ncnn, ``cuda:N`` and ``tensorrt:N`` for ONNX
  Runtime, ``cuda:N`` for PyTorch, which uses fp16 there), and a runtime that drives none of
  them is reported as skipped. A runtime that is not installed, or a device that is not
  there, is reported in its row, not raised.

The machine's load average is recorded before and after the run: these numbers come from a
shared machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from gevent import subprocess  # the bench process is monkey-patched; unpatched (tests) it works too

__all__ = ["RuntimePlan", "default_models", "default_sizes", "run_runtimes", "runtimes"]

PLUS = "realesrgan-x4plus"
RRDB_SIZES = (128, 256)  # x4plus: ~6 s per 128² call on 2 cores (0.0027 MP/s, DESIGN.md)
LIGHT_SIZES = (256, 512)  # compact and SPAN: ~1 s per 256² call
WORKER_START_TIMEOUT_S = 600.0  # a first conversion to ONNX of x4plus on a busy machine
REFERENCE_RUNTIME = "ncnn"
LEVEL = 255.0  # one uint8 level, the unit the differences are given in
MEGABYTE = 2**20

COLUMNS = [
    ("model", "model", ""),
    ("runtime", "runtime", ""),
    ("device", "device", ""),
    ("size", "size", ""),
    ("batch", "batch", ""),
    ("MP/s", "mp_per_s", ".4f"),
    ("s/call", "seconds", ".2f"),
    ("best s", "best_s", ".2f"),
    ("vs ncnn", "speed_vs_ncnn", ".2f"),
    ("first call s", "first_call_s", ".1f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("max diff /255", "max_diff_255", ".4f"),
    ("max diff levels", "max_diff_levels", ""),
    ("note", "note", ""),
]


@dataclass(frozen=True)
class RuntimePlan:
    """What to run: models, runtimes, sizes per model, batches, rounds, threads, devices."""

    models: Sequence[str]
    runtimes: Sequence[str]
    sizes: Mapping[str, Sequence[int]]
    batches: Sequence[int] = (1,)
    rounds: int = 2
    threads: int = 0
    devices: Sequence[str] = ("cpu",)
    tile_size: int = 0
    photo: Path | None = None
    photo_label: str = field(default="skimage.data.astronaut()")


def default_models() -> list[str]:
    """The models the built-in presets use, then realesrgan-x4plus."""
    from chaoqing.config import PRESETS

    names: list[str] = []
    for preset in PRESETS.values():
        names += [preset.upscaler] + ([preset.face_model] if preset.face_model else [])
    return list(dict.fromkeys([*names, PLUS]))


def default_sizes(model_name: str) -> tuple[int, ...]:
    """128 and 256 for RRDBNet (x4plus is slow on a CPU), 256 and 512 for the light networks."""
    from chaoqing.modelserver.runners.catalog import UPSCALERS

    return RRDB_SIZES if UPSCALERS[model_name].architecture == "RRDBNet" else LIGHT_SIZES


def device_for(runtime_name: str, devices: Sequence[str]) -> str | None:
    """The first of ``devices`` that ``runtime_name`` drives, or None."""
    from chaoqing.errors import RunnerError
    from chaoqing.modelserver.runners.backends import check_device

    for device in devices:
        try:
            check_device(runtime_name, device)
        except RunnerError:
            continue
        return device
    return None


def _photo_rgb(photo: Path | None) -> Any:
    import numpy as np

    if photo is None:
        from skimage import data  # a test dependency; the default photo needs it

        return np.ascontiguousarray(data.astronaut())  # type: ignore[no-untyped-call]
    from PIL import Image, ImageOps

    with Image.open(photo) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def photo_crop(rgb: Any, size: int) -> Any:
    """A ``size``² crop at the photo's centre; a photo smaller than that is first resized
    (Lanczos) so that its shorter side is ``size``."""
    import numpy as np
    from PIL import Image

    height, width = rgb.shape[:2]
    if min(height, width) < size:
        factor = size / min(height, width)
        resized = Image.fromarray(rgb).resize((max(size, round(width * factor)), max(size, round(height * factor))),
                                              Image.Resampling.LANCZOS)
        rgb = np.asarray(resized)
        height, width = rgb.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


class _Worker:
    """One :mod:`chaoqing.bench.runtime_worker` process and its line protocol."""

    def __init__(self, model: str, runtime: str, device: str, plan: RuntimePlan, inputs: Path) -> None:
        from chaoqing.bench.common import die_with_parent

        self.runtime = runtime
        self.device = device
        self.error = ""
        self.stderr_path = inputs / f"{model}-{runtime}.stderr"
        command = [sys.executable, "-m", "chaoqing.bench.runtime_worker", "--model", model, "--runtime", runtime,
                   "--device", device, "--threads", str(plan.threads), "--max-batch", str(max(plan.batches)),
                   "--tile-size", str(plan.tile_size), "--inputs", str(inputs)]
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        self.ready = self._receive()
        if "error" in self.ready:
            self.error = self.ready["error"]

    def _receive(self) -> dict[str, Any]:
        import json

        from chaoqing.bench.runtime_worker import MESSAGE_MARK

        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(MESSAGE_MARK):
                message: dict[str, Any] = json.loads(line[len(MESSAGE_MARK):])
                return message
        self.process.wait()
        tail = self.stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        return {"error": f"the worker exited with code {self.process.returncode}: {' | '.join(tail) or 'no output'}"}

    def ask(self, command: str, size: int, batch: int) -> dict[str, Any]:
        """Send one command; its answer, or ``{"error": ...}`` when the worker fails."""
        if self.error:
            return {"error": self.error}
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(f"{command} {size} {batch}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # _receive says why it exited
        answer = self._receive()
        if "error" in answer and self.process.poll() is not None:
            self.error = answer["error"]
        return answer

    def stop(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _differences(inputs: Path, runtime: str, size: int, batch: int) -> tuple[float | None, int | None, str]:
    """Largest difference of ``runtime``'s saved outputs to ncnn's: float (in /255) and uint8
    (levels), and a note when they cannot be compared."""
    import numpy as np

    reference_path = inputs / f"{REFERENCE_RUNTIME}-{size}-{batch}.npz"
    path = inputs / f"{runtime}-{size}-{batch}.npz"
    if not reference_path.is_file() or not path.is_file():
        return None, None, ""
    with np.load(reference_path) as reference, np.load(path) as measured:
        levels = int(np.abs(reference["output"].astype(np.int16) - measured["output"].astype(np.int16)).max())
        reference_tiles = [reference[key] for key in reference.files if key.startswith("tile_")]
        measured_tiles = [measured[key] for key in measured.files if key.startswith("tile_")]
        # ncnn runs a batch image by image, the others as one forward: compare image by image
        reference_images = [image for tile in reference_tiles for image in tile]
        measured_images = [image for tile in measured_tiles for image in tile]
        if [image.shape for image in reference_images] != [image.shape for image in measured_images]:
            return None, levels, "tiles differ from ncnn's"
        largest = max(float(np.abs(one - other).max()) for one, other in zip(reference_images, measured_images,
                                                                              strict=True))
    return largest * LEVEL, levels, ""


def run_runtimes(plan: RuntimePlan, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Measure every model of ``plan`` on its runtimes; one row per model × runtime × size ×
    batch (a runtime that cannot run gets one row per model saying why). Raises BenchError
    when a model is unknown or the photo cannot be read."""
    import numpy as np

    from chaoqing.errors import BenchError
    from chaoqing.modelserver.runners.catalog import UPSCALERS

    unknown = [name for name in plan.models if name not in UPSCALERS]
    if unknown:
        raise BenchError(f"not bundled upscalers: {', '.join(unknown)}; choose from {', '.join(UPSCALERS)}")
    try:
        rgb = _photo_rgb(plan.photo)
    except (OSError, ImportError) as exc:
        raise BenchError(f"cannot read the photo {plan.photo_label}: {exc}") from exc
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chaoqing-bench-runtimes-") as directory:
        for model in plan.models:
            inputs = Path(directory) / model
            inputs.mkdir()
            sizes = sorted(plan.sizes[model])
            for size in sizes:
                np.save(inputs / f"{size}.npy", photo_crop(rgb, size))
            rows += _run_model(model, sizes, plan, inputs, progress)
    return rows


def _run_model(model: str, sizes: Sequence[int], plan: RuntimePlan, inputs: Path,
               progress: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    workers: list[_Worker] = []
    shapes = [(size, batch) for size in sizes for batch in sorted(plan.batches)]
    try:
        for runtime in plan.runtimes:
            device = device_for(runtime, plan.devices)
            if device is None:
                rows.append({"model": model, "runtime": runtime, "note": f"skipped: drives none of {','.join(plan.devices)}"})
                continue
            progress(f"{model}: loading on {runtime} ({device})")
            worker = _Worker(model, runtime, device, plan, inputs)
            if worker.error:
                rows.append({"model": model, "runtime": runtime, "device": device, "note": worker.error})
                worker.stop()
                continue
            workers.append(worker)
        results: dict[tuple[str, int, int], dict[str, Any]] = {}
        for size, batch in shapes:  # smallest first: the peak RSS after each is the peak up to it
            for worker in workers:
                progress(f"{model}: warming up {worker.runtime} at {size}² × {batch}")
                answer = worker.ask("warm", size, batch)
                results[(worker.runtime, size, batch)] = {
                    "first_call_s": answer.get("seconds"), "peak_rss_bytes": answer.get("peak_rss_bytes"),
                    "gpu_peak_bytes": answer.get("gpu_peak_bytes"), "runs_s": [], "error": answer.get("error", "")}
        for round_index in range(plan.rounds):
            shift = round_index % max(1, len(workers))
            order = workers[shift:] + workers[:shift]
            progress(f"{model}: round {round_index + 1} of {plan.rounds}: {', '.join(w.runtime for w in order)}")
            for size, batch in shapes:
                for worker in order:
                    result = results[(worker.runtime, size, batch)]
                    if result["error"]:
                        continue
                    answer = worker.ask("time", size, batch)
                    if "error" in answer:
                        result["error"] = answer["error"]
                    else:
                        result["runs_s"].append(answer["seconds"])
    finally:
        for worker in workers:
            worker.stop()
    for size, batch in shapes:
        reference = results.get((REFERENCE_RUNTIME, size, batch), {})
        reference_seconds = statistics.median(reference["runs_s"]) if reference.get("runs_s") else None
        for worker in workers:
            result = results[(worker.runtime, size, batch)]
            row: dict[str, Any] = {"model": model, "runtime": worker.runtime, "device": worker.device,
                                   "platform": worker.ready.get("platform"), "load_s": worker.ready.get("load_s"),
                                   "size": size, "batch": batch, "input_megapixels": batch * size * size / 1e6,
                                   "runs_s": result["runs_s"], "first_call_s": result["first_call_s"],
                                   "note": result["error"]}
            if result["peak_rss_bytes"]:
                row["peak_rss_mb"] = result["peak_rss_bytes"] / MEGABYTE
            if result["gpu_peak_bytes"]:
                row["gpu_peak_mb"] = result["gpu_peak_bytes"] / MEGABYTE
            if result["runs_s"]:
                row["seconds"] = statistics.median(result["runs_s"])
                row["best_s"] = min(result["runs_s"])  # the least disturbed round, on a shared machine
                row["mp_per_s"] = row["input_megapixels"] / row["seconds"]
                if reference_seconds is not None:
                    row["speed_vs_ncnn"] = reference_seconds / row["seconds"]
            if not result["error"] and worker.runtime != REFERENCE_RUNTIME:
                difference, levels, note = _differences(inputs, worker.runtime, size, batch)
                row.update({"max_diff_255": difference, "max_diff_levels": levels})
                row["note"] = note
            elif worker.runtime == REFERENCE_RUNTIME:
                row["note"] = row["note"] or "reference"
            rows.append(row)
    return rows


def _integers(text: str, option: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated whole numbers", param_hint=option) from None
    if not values or min(values) < 1:
        raise click.BadParameter("at least one number, each ≥ 1", param_hint=option)
    return values


def _names(text: str) -> list[str]:
    return list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


@click.command("runtimes")
@click.option("--models", "models_text", default="", help="Comma-separated bundled upscalers; default: the models "
              "the built-in presets use, and realesrgan-x4plus.")
@click.option("--runtimes", "runtimes_text", default="", help="Comma-separated runtimes; default: every one installed "
              "(ncnn, openvino, onnxruntime, torch).")
@click.option("--sizes", "sizes_text", default="", help="Comma-separated square input sizes for every model; "
              "default: 128,256 for x4plus (RRDBNet), 256,512 for the others.")
@click.option("--batch", "batch_text", default="1", show_default=True,
              help="Comma-separated batch sizes (images per call: one forward per tile on OpenVINO, ONNX Runtime, "
                   "PyTorch; image by image on ncnn), e.g. 1,8 on a GPU.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1, 50),
              help="Timed rounds, the runtimes' order rotating each round (medians).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="Compute threads of each runtime; 0 = number of CPUs.")
@click.option("--device", "device_text", default="cpu", show_default=True,
              help="Comma-separated devices; each runtime runs on the first it drives: cpu, vulkan:N (ncnn), "
                   "cuda:N (onnxruntime, torch in fp16), tensorrt:N (onnxruntime).")
@click.option("--tile-size", default=0, show_default=True, type=click.IntRange(0, 8192),
              help="The runner's tile size in input pixels; 0 = each model's default (128 x4plus, 256 the others).")
@click.option("--photo", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The photo to crop the inputs from (centre crops); default: skimage.data.astronaut().")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def runtimes(models_text: str, runtimes_text: str, sizes_text: str, batch_text: str, rounds: int, threads: int,
             device_text: str, tile_size: int, photo: Path | None, as_json: bool) -> None:
    """MP/s, peak RSS and difference to ncnn of the bundled models on each runtime."""
    from chaoqing.bench.common import Report, command_line, report
    from chaoqing.errors import BenchError, RunnerError
    from chaoqing.modelserver.runners.backends import RUNTIMES, parse_device
    from chaoqing.modelserver.runners.catalog import UPSCALERS
    from chaoqing.modelserver.runners.listing import installed_runtimes

    models = _names(models_text) or default_models()
    unknown = [name for name in models if name not in UPSCALERS]
    if unknown:
        raise click.BadParameter(f"not bundled upscalers: {', '.join(unknown)}", param_hint="--models")
    installed = installed_runtimes()
    chosen_runtimes = _names(runtimes_text) or [name for name, present in installed.items() if present]
    unknown = [name for name in chosen_runtimes if name not in RUNTIMES]
    if unknown:
        raise click.BadParameter(f"unknown runtimes {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}",
                                 param_hint="--runtimes")
    devices = _names(device_text) or ["cpu"]
    try:
        devices = [str(parse_device(device)) for device in devices]
    except RunnerError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    fixed_sizes = _integers(sizes_text, "--sizes") if sizes_text else None
    plan = RuntimePlan(
        models=models, runtimes=chosen_runtimes,
        sizes={model: fixed_sizes or default_sizes(model) for model in models},
        batches=_integers(batch_text, "--batch"), rounds=rounds, threads=threads, devices=devices,
        tile_size=tile_size, photo=photo, photo_label=str(photo) if photo else "skimage.data.astronaut()",
    )
    load_before = [round(value, 2) for value in os.getloadavg()]
    started = time.monotonic()

    def progress(message: str) -> None:
        click.echo(f"… {message}", err=True)

    try:
        rows = run_runtimes(plan, progress)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    settings = {"models": list(models), "runtimes": chosen_runtimes, "sizes": {m: list(s) for m, s in plan.sizes.items()},
                "batches": list(plan.batches), "rounds": rounds, "threads": threads, "devices": devices,
                "tile_size": tile_size, "photo": plan.photo_label,
                "not_installed": [name for name, present in installed.items() if not present]}
    extra = {"load_average_before": load_before, "wall_s": time.monotonic() - started,
             "runtime_versions": _runtime_versions(chosen_runtimes)}
    report(Report("runtimes", command_line(), settings, rows, [], extra), COLUMNS, as_json=as_json)
    if not as_json:
        click.echo(f"load average before {load_before}; {extra['wall_s']:.0f} s; versions {extra['runtime_versions']}")


def _runtime_versions(names: Sequence[str]) -> dict[str, str]:
    """Each installed runtime's package version (from its metadata: nothing is imported)."""
    from importlib import metadata

    packages = {"ncnn": "ncnn", "openvino": "openvino", "onnxruntime": "onnxruntime", "torch": "torch"}
    versions = {}
    for name in names:
        for distribution in (packages.get(name, name), f"{name}-gpu"):
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions
