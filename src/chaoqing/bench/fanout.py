"""``chaoqing bench fanout``: does the gateway overlap its remote calls as the design says?

Sim model servers with fixed latencies (upscale U, detect D, face F), each a process of its
own; for each number of faces N, a fresh detector (``--model-option faces=N``) and a fresh
gateway process. One request at a time, three ways, interleaved round by round so that the noise of
a shared machine falls on all three alike:

- **concurrent, through HTTP**: POST /v1/enhance to the gateway process (the figure judged);
- **concurrent, in process**: :func:`chaoqing.gateway.pipeline.enhance_photo` called here, on the
  same model servers (the gateway's HTTP layer and the upload/download are the difference);
- **sequential, in process**: the pipeline's own stages one after another
  (:func:`chaoqing.bench.sequential.enhance_photo_sequentially`), stage after stage and
  face after face, the way the GFPGAN / Real-ESRGAN tools work.

``--server NAME=URL`` measures another v2 server too, someone else's (a Ray Serve deployment:
``chaoqing ray deploy``), through a gateway of its own, in the same run: at the N its
``sim-detector`` publishes (metadata ``parameters.faces``), with ``sim-upscale-x4`` and
``sim-face`` beside it, started with the latencies given here; rows say which server.

Reported per N: p50/p95 latency; the critical path max(U, D + F) + the measured decode,
composite and encode (the gateway's Server-Timing medians); the sequential sum U + D + N·F;
their ratios. Targets: ratio to the critical path ≤ 1.05 and speedup over sequential ≥ 6.5
at the largest N (16 by default).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from chaoqing.bench.overhead import named_urls

__all__ = ["fanout", "run_fanout"]

RATIO_TARGET = 1.05
SPEEDUP_TARGET = 6.5
DEFAULT_FACES = "0,1,4,16"
PRESET = "balanced"
WARMUP_REQUESTS = 3

BUILT_IN_SERVER = "built-in"

COLUMNS = [
    ("faces", "faces", "d"),
    ("server", "server", ""),
    ("p50 ms", "latency_ms_p50", ".0f"),
    ("p95 ms", "latency_ms_p95", ".0f"),
    ("in-process p50 ms", "in_process_ms_p50", ".0f"),
    ("decode+composite+encode ms", "measured_stages_ms", ".1f"),
    ("critical path ms", "critical_path_ms", ".0f"),
    ("ratio to critical path", "ratio_to_critical_path", ".3f"),
    ("sequential sum ms", "sequential_sum_ms", ".0f"),
    ("sequential p50 ms", "sequential_ms_p50", ".0f"),
    ("speedup vs sequential", "speedup_vs_sequential", ".2f"),
]


def _median(values: list[float]) -> float:
    from chaoqing.bench.common import summarize

    return summarize(values)["p50"]


class _Trial:
    """One number of faces: the gateway over HTTP, and the pipeline in this process, on the
    same model servers."""

    def __init__(self, faces: int, photo: bytes, path: str, scale: float, gateway_url: str, config_path: Path) -> None:
        from chaoqing.bench.common import HttpConnection
        from chaoqing.config import load_config
        from chaoqing.gateway.metrics import GatewayMetrics
        from chaoqing.gateway.pipeline import PipelineServices
        from chaoqing.gateway.remote import RemoteModels

        self.faces = faces
        self.photo = photo
        self.path = path
        self.scale = scale
        host, port = gateway_url.split("//", 1)[1].rsplit(":", 1)
        self.connection = HttpConnection(host, int(port))
        config = load_config(config_path)
        self.remotes = RemoteModels.from_config(config, GatewayMetrics())
        self.services = PipelineServices(config, self.remotes)

    def over_http(self) -> tuple[float, dict[str, float]]:
        """One request to the gateway: milliseconds, and its Server-Timing stages."""
        from chaoqing.bench.common import parse_server_timing
        from chaoqing.errors import BenchError

        sent = time.perf_counter()
        reply = self.connection.request("POST", self.path, self.photo, {"Content-Type": "image/jpeg"})
        elapsed = (time.perf_counter() - sent) * 1000.0
        if reply.status != 200:
            raise BenchError(f"gateway answered {reply.status}: {reply.body[:200]!r}")
        enhanced = int(reply.headers.get("x-faces-enhanced", "-1"))
        if enhanced != self.faces:
            raise BenchError(f"{enhanced} of {self.faces} faces enhanced")
        return elapsed, parse_server_timing(reply.headers.get("server-timing", ""))

    def in_process(self, sequential: bool) -> float:
        """The same photo through :func:`enhance_photo` here: milliseconds."""
        from chaoqing.bench.sequential import enhance_photo_sequentially
        from chaoqing.errors import BenchError
        from chaoqing.gateway.pipeline import EnhanceOptions, enhance_photo

        options = EnhanceOptions(scale=self.scale, preset=PRESET)
        run = enhance_photo_sequentially if sequential else enhance_photo
        sent = time.perf_counter()
        result = run(self.photo, "image/jpeg", options, self.services)
        if result.faces_enhanced != self.faces:
            raise BenchError(f"{result.faces_enhanced} of {self.faces} faces enhanced in process")
        return (time.perf_counter() - sent) * 1000.0

    def close(self) -> None:
        self.connection.close()
        self.remotes.close()


def _published_faces(url: str) -> int:
    """How many faces the ``sim-detector`` at ``url`` reports; raises BenchError."""
    import json
    import urllib.request

    from chaoqing.errors import BenchError

    try:
        with urllib.request.urlopen(f"{url}/v2/models/sim-detector", timeout=10) as answer:
            return int(json.loads(answer.read())["parameters"]["faces"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{url} has no sim-detector that says its faces: {exc}") from None


def run_fanout(face_counts: list[int], *, upscale_ms: float, detect_ms: float, face_ms: float, requests: int,
               sequential_requests: int, width: int, height: int, scale: float,
               servers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Measure every N of ``face_counts`` on the built-in sim servers, and each of ``servers``
    (name → URL) at the N its detector publishes; one result row per N and server. Raises
    BenchError."""
    import tempfile
    from contextlib import ExitStack

    import gevent

    from chaoqing.bench.common import (
        encode_photo,
        raise_open_file_limit,
        start_gateway,
        start_model_server,
        synthetic_photo,
        write_gateway_config,
    )
    from chaoqing.gateway.pipeline import quiet_expected_errors

    raise_open_file_limit()
    quiet_expected_errors()
    threadpool = gevent.get_hub().threadpool
    threadpool.maxsize = max(threadpool.maxsize, 2 * (os.cpu_count() or 2))  # as GatewayServer does
    photo = encode_photo(synthetic_photo(width, height))
    path = f"/v1/enhance?preset={PRESET}&scale={scale:g}"
    rows: list[dict[str, Any]] = []
    others = {name: (url, _published_faces(url)) for name, url in (servers or {}).items()}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="chaoqing-bench-") as directory:
        # no dynamic batching: every call waits its latency on "hardware of its own", and none
        # waits the batcher's queue delay for companions
        upscaler = start_model_server(["sim-upscale-x4"], sim_latency_ms=upscale_ms, max_batch_size=1)
        stack.callback(upscaler.stop)
        face_server = start_model_server(["sim-face"], sim_latency_ms=face_ms, max_batch_size=1)
        stack.callback(face_server.stop)

        def through_a_gateway(faces: int, folder: Path, endpoints: dict[str, str]) -> dict[str, Any]:
            """A gateway process on ``endpoints`` (its config in ``folder``), measured."""
            with ExitStack() as per_gateway:
                config_path = write_gateway_config(folder, endpoints, upscaler="sim-upscale-x4",
                                                   face_model="sim-face", detector="sim-detector")
                gateway = start_gateway(config_path)
                per_gateway.callback(gateway.stop)
                trial = _Trial(faces, photo, path, scale, gateway.url, config_path)
                per_gateway.callback(trial.close)
                return _measure(trial, requests, sequential_requests, upscale_ms, detect_ms, face_ms)

        for faces in face_counts:
            with ExitStack() as per_count:
                detector = start_model_server(["sim-detector"], sim_latency_ms=detect_ms, sim_faces=faces,
                                              max_batch_size=1)
                per_count.callback(detector.stop)
                endpoints = {"sim-upscale-x4": upscaler.url, "sim-face": face_server.url, "sim-detector": detector.url}
                rows.append({**through_a_gateway(faces, Path(directory), endpoints), "server": BUILT_IN_SERVER})
            for name, (url, published_faces) in others.items():
                if published_faces != faces:
                    continue
                folder = Path(directory) / name
                folder.mkdir(exist_ok=True)
                models = ("sim-upscale-x4", "sim-face", "sim-detector")
                rows.append({**through_a_gateway(faces, folder, dict.fromkeys(models, url)), "server": name, "url": url})
    return rows


def _measure(trial: _Trial, requests: int, sequential_requests: int, upscale_ms: float, detect_ms: float,
             face_ms: float) -> dict[str, Any]:
    """Warm up, then interleave: a share of the concurrent requests (HTTP and in process),
    then one sequential request, round after round."""
    for _ in range(WARMUP_REQUESTS):
        trial.over_http()
        trial.in_process(False)
    trial.in_process(True)
    latencies: list[float] = []
    stage_samples: list[dict[str, float]] = []
    in_process_latencies: list[float] = []
    sequential_latencies: list[float] = []
    rounds = max(1, sequential_requests)
    for round_index in range(rounds):
        share = requests // rounds + (1 if round_index < requests % rounds else 0)
        for _ in range(share):
            elapsed, stages = trial.over_http()
            latencies.append(elapsed)
            stage_samples.append(stages)
            in_process_latencies.append(trial.in_process(False))
        sequential_latencies.append(trial.in_process(True))
    return _row(trial.faces, latencies, stage_samples, in_process_latencies, sequential_latencies, upscale_ms,
                detect_ms, face_ms)


def _row(faces: int, latencies: list[float], stage_samples: list[dict[str, float]], in_process: list[float],
         sequential: list[float], upscale_ms: float, detect_ms: float, face_ms: float) -> dict[str, Any]:
    from chaoqing.bench.common import summarize

    stages = {name: _median([sample.get(name, 0.0) for sample in stage_samples])
              for name in ("decode", "upscale", "detect", "faces", "composite", "encode", "total")}
    measured = stages["decode"] + stages["composite"] + stages["encode"]
    face_branch = detect_ms + (face_ms if faces else 0.0)
    critical_path = max(upscale_ms, face_branch) + measured
    sequential_sum = upscale_ms + detect_ms + faces * face_ms
    latency = summarize(latencies)
    sequential_summary = summarize(sequential)
    return {
        "faces": faces,
        "requests": len(latencies),
        "latency_ms_p50": latency["p50"],
        "latency_ms_p95": latency["p95"],
        "in_process_ms_p50": summarize(in_process)["p50"],
        "server_total_ms_p50": stages["total"],
        "stages_ms_p50": stages,
        "measured_stages_ms": measured,
        "critical_path_ms": critical_path,
        "sequential_sum_ms": sequential_sum,
        "sequential_requests": len(sequential),
        "sequential_ms_p50": sequential_summary["p50"],
        "ratio_to_critical_path": latency["p50"] / critical_path,
        "speedup_vs_sequential": sequential_summary["p50"] / latency["p50"],
        "sequential_ratio_to_sum": sequential_summary["p50"] / (sequential_sum + measured),
    }


def plot_fanout(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Latency against the number of faces: concurrent (p50, p95), sequential, critical path."""
    from chaoqing.bench.common import load_pyplot

    pyplot = load_pyplot()
    faces = [row["faces"] for row in rows]
    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=110)
    axes.plot(faces, [row["sequential_ms_p50"] for row in rows], "s-", color="tab:red", label="sequential pipeline (p50)")
    axes.plot(faces, [row["sequential_sum_ms"] for row in rows], ":", color="tab:red", label="U + D + N·F")
    axes.plot(faces, [row["latency_ms_p50"] for row in rows], "o-", color="tab:blue", label="gateway over HTTP (p50)")
    axes.fill_between(faces, [row["latency_ms_p50"] for row in rows], [row["latency_ms_p95"] for row in rows],
                      color="tab:blue", alpha=0.2, label="gateway p50–p95")
    axes.plot(faces, [row["critical_path_ms"] for row in rows], "--", color="black",
              label="critical path max(U, D+F) + decode/composite/encode")
    axes.set_xlabel("faces in the photo (N)")
    axes.set_ylabel("latency (ms)")
    axes.set_xticks(faces)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


@click.command("fanout")
@click.option("--faces", "faces_text", default=DEFAULT_FACES, show_default=True, help="Comma-separated numbers of faces N.")
@click.option("--upscale-ms", default=300.0, show_default=True, type=click.FloatRange(0), help="Sim upscaler latency U.")
@click.option("--detect-ms", default=40.0, show_default=True, type=click.FloatRange(0), help="Sim detector latency D.")
@click.option("--face-ms", default=120.0, show_default=True, type=click.FloatRange(0), help="Sim face model latency F.")
@click.option("--requests", default=20, show_default=True, type=click.IntRange(1), help="Concurrent requests per N.")
@click.option("--sequential-requests", default=5, show_default=True, type=click.IntRange(1),
              help="Sequential-mode requests per N (each takes U + D + N·F).")
@click.option("--width", default=256, show_default=True, type=click.IntRange(16), help="Photo width (synthetic JPEG).")
@click.option("--height", default=256, show_default=True, type=click.IntRange(16), help="Photo height.")
@click.option("--scale", default=4.0, show_default=True, type=click.FloatRange(1, 4),
              help="Requested scale; 4 is the sim upscaler's own (below it the gateway resamples every pixel).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw latency against N to this PNG (needs matplotlib).")
@click.option("--server", "servers", multiple=True, metavar="NAME=URL", callback=named_urls,
              help="Also measure this v2 server's sim-upscale-x4, sim-face and sim-detector (same latencies), "
                   "at the N its detector publishes, e.g. ray=http://127.0.0.1:8000.")
def fanout(faces_text: str, upscale_ms: float, detect_ms: float, face_ms: float, requests: int,
           sequential_requests: int, width: int, height: int, scale: float, as_json: bool, plot_path: Path | None,
           servers: dict[str, str]) -> None:
    """Concurrent fan-out against the critical path and the sequential way (sim models)."""
    from chaoqing.bench.common import Report, Target, command_line, report
    from chaoqing.errors import BenchError

    try:
        face_counts = sorted({int(item) for item in faces_text.split(",") if item.strip()})
    except ValueError:
        raise click.BadParameter(f"{faces_text!r} is not a comma-separated list of integers", param_hint="--faces")
    if not face_counts or min(face_counts) < 0:
        raise click.BadParameter("give at least one number of faces, none negative", param_hint="--faces")
    if plot_path is not None:
        from chaoqing.bench.common import load_pyplot

        load_pyplot()  # fail before measuring, not after
    try:
        rows = run_fanout(face_counts, upscale_ms=upscale_ms, detect_ms=detect_ms, face_ms=face_ms, requests=requests,
                          sequential_requests=sequential_requests, width=width, height=height, scale=scale,
                          servers=servers)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    largest = [row for row in rows if row["server"] == BUILT_IN_SERVER][-1]
    targets = [
        Target(f"ratio_to_critical_path at N={largest['faces']}", largest["ratio_to_critical_path"], RATIO_TARGET),
        Target(f"speedup_vs_sequential at N={largest['faces']}", largest["speedup_vs_sequential"], SPEEDUP_TARGET,
               at_most=False),
    ]
    settings = {"upscale_ms": upscale_ms, "detect_ms": detect_ms, "face_ms": face_ms, "requests": requests,
                "sequential_requests": sequential_requests, "photo": f"{width}x{height} synthetic JPEG",
                "scale": scale, "preset": PRESET, "servers": servers}
    result = Report("fanout", command_line(), settings, rows, targets)
    if plot_path is not None:
        plot_fanout([row for row in rows if row["server"] == BUILT_IN_SERVER], plot_path, f"fan-out, sim U={upscale_ms:g} D={detect_ms:g} F={face_ms:g} ms, "
                                     f"{width}×{height} photo, scale {scale:g}")
    report(result, COLUMNS, as_json=as_json)
