"""``chaoqing bench load``: capacity of one gateway process, and of gunicorn with gevent workers.

Sim model servers (upscale 300 ms, detect 40 ms, face 120 ms, 2 faces; processes of their
own), small photos (256×256 JPEG), and a load generator in a process of its own
(:mod:`chaoqing.bench.loadgen`: gevent, one keep-alive connection per client). Every phase
gets a fresh gateway process (so its peak RSS is that phase's), warmed with a few requests:

1. **single**: one client, one request at a time: the unloaded p50.
2. **saturation**: a closed loop of many clients (no think time): the request rate at which
   the gateway process is saturated, with the CPU it used (cores).
3. **levels**: 10, 100 and 1000 clients, paced to offer 80% of that rate together (the
   10-client level cannot offer it: each client waits for its answer).
4. **sweep** (gateway only): the most clients, offering 20%…120% of the saturation rate,
   for the plot of latency percentiles against offered load.

Targets, at the most clients and 80% of the saturation rate on the single gateway
process: p99 ≤ 1.5 × the single-request p50, no errors, peak RSS ≤ 500 MB, longest hub
block ≤ 50 ms. The hub is watched two ways: gevent's monitor thread (``--blocking-threshold-ms``,
``chaoqing_hub_blocked_total``: how often the hub was held past the threshold) and a
greenlet switch tracer that measures the longest hold itself (see
:mod:`chaoqing.bench.gateway_process`). Gunicorn workers run without either.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["load", "run_load_bench"]

P99_OVER_SINGLE_P50 = 1.5
PEAK_RSS_MB = 500.0
LONGEST_BLOCK_MS = 50.0
WARMUP_REQUESTS = 5
MAX_IN_FLIGHT = 4096
REQUEST_TIMEOUT_S = 60.0
MEGABYTE = 1024 * 1024

COLUMNS = [
    ("server", "target", ""),
    ("phase", "phase", ""),
    ("clients", "clients", "d"),
    ("connections", "connections", "d"),
    ("offered req/s", "offered_rps", ".1f"),
    ("throughput req/s", "throughput_rps", ".1f"),
    ("p50 ms", "latency_ms_p50", ".0f"),
    ("p99 ms", "latency_ms_p99", ".0f"),
    ("errors", "errors", "d"),
    ("gateway CPU (cores)", "gateway_cpu_cores", ".2f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("longest hub hold ms", "longest_hub_hold_ms", ".1f"),
    ("of it CPU ms", "longest_hub_hold_cpu_ms", ".1f"),
    ("monitor reports", "hub_blocked_reports", "d"),
]


class _Server:
    """A gateway under test: one process (the bench's gateway process) or gunicorn's master
    and workers. ``pids()`` are the processes that serve requests."""

    def __init__(self, child: Any, kind: str) -> None:
        self.child = child
        self.kind = kind

    @property
    def url(self) -> str:
        return str(self.child.url)

    def pids(self) -> list[int]:
        import psutil

        if self.kind == "gateway":
            return [self.child.pid]
        return [process.pid for process in psutil.Process(self.child.pid).children()]

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for pid in self.pids():
            try:
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        self.child.stop()


def _start_on_port(name: str, command: list[str], port: int, environment: dict[str, str] | None = None) -> Any:
    """``command``, which listens on ``port``, started and waited for until ``/readyz``
    answers 200 (a ChildProcess); stopped if it never does. Raises BenchError."""
    from gevent import subprocess

    from chaoqing.bench.common import ChildProcess, die_with_parent, wait_until_ready
    from chaoqing.errors import BenchError

    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               env={**os.environ, **(environment or {})},
                               preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
    child = ChildProcess(name, process, f"http://127.0.0.1:{port}")
    try:
        wait_until_ready(child.url + "/readyz", process=process)
    except BenchError:
        child.stop()
        raise
    return child


def _start_gunicorn(config_path: Path, workers: int) -> Any:
    from chaoqing.bench.common import free_port

    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(workers), "--bind", f"127.0.0.1:{port}",
               "--worker-connections", "4096", "--backlog", "4096",
               # idle connections stay open as the gateway process's do (gunicorn's default is 2 s)
               "--keep-alive", str(int(REQUEST_TIMEOUT_S)), "--log-level", "warning", "--timeout", "120",
               "chaoqing.wsgi:app"]
    return _start_on_port("gunicorn", command, port, {"CHAOQING_CONFIG": str(config_path)})


def _start_workers(config_path: Path, workers: int) -> Any:
    """``chaoqing serve --workers N`` on a free port (the config names every model's endpoint,
    so it starts no model server), ready."""
    from chaoqing.bench.common import free_port

    port = free_port()
    command = [sys.executable, "-m", "chaoqing", "serve", "--workers", str(workers), "--port", str(port),
               "--config", str(config_path), "--log-level", "warning"]
    return _start_on_port("serve --workers", command, port)


def _metrics_value(text: str, name: str) -> float:
    """The first sample named ``name`` (labels ignored) in a Prometheus exposition; NaN if none."""
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return float("nan")
    return float("nan")


def _hub_where(text: str) -> str:
    from chaoqing.bench.gateway_process import LONGEST_HOLD_METRIC

    for line in text.splitlines():
        if line.startswith(LONGEST_HOLD_METRIC + "{"):
            return line.split('where="', 1)[1].rsplit('"}', 1)[0]
    return ""


def _scrape(url: str) -> str:
    from urllib.parse import urlsplit

    from chaoqing.bench.common import HttpConnection

    parts = urlsplit(url)
    connection = HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout_s=10.0)
    try:
        return connection.request("GET", "/metrics").body.decode("utf-8", "replace")
    finally:
        connection.close()


def _run_generator(spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Run :mod:`chaoqing.bench.loadgen` in a process of its own; its JSON result."""
    from gevent import subprocess

    from chaoqing.errors import BenchError

    spec_path = directory / "loadgen.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    completed = subprocess.run([sys.executable, "-m", "chaoqing.bench.loadgen", str(spec_path)],
                               capture_output=True, text=True, timeout=spec["duration_s"] + REQUEST_TIMEOUT_S + 60)
    if completed.returncode != 0:
        raise BenchError(f"load generator failed: {completed.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def _phase(start_server: Callable[[], _Server], kind: str, phase: str, clients: int, rate: float, duration_s: float,
           photo_path: Path, request_path: str, directory: Path) -> dict[str, Any]:
    """One phase on a fresh server: warm it, reset its hub tracer, load it, measure."""
    import signal
    from urllib.parse import urlsplit

    from chaoqing.bench.common import HttpConnection, peak_rss_bytes, summarize

    server = start_server()
    try:
        parts = urlsplit(server.url)
        body = photo_path.read_bytes()
        warm = HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80)
        for _ in range(WARMUP_REQUESTS):
            warm.request("POST", request_path, body, {"Content-Type": "image/jpeg"})
        warm.close()
        before_text = ""
        if kind == "gateway":
            os.kill(server.child.pid, signal.SIGUSR1)  # reset the hub tracer after the warm-up
            time.sleep(0.05)
            before_text = _scrape(server.url)
        cpu_before = server.cpu_seconds()
        spec = {"host": parts.hostname, "port": parts.port, "path": request_path, "body_path": str(photo_path),
                "content_type": "image/jpeg", "clients": clients, "rate": rate, "duration_s": duration_s,
                "timeout_s": REQUEST_TIMEOUT_S}
        generated = _run_generator(spec, directory)
        cpu_used = server.cpu_seconds() - cpu_before
        after_text = _scrape(server.url) if kind == "gateway" else ""
        rss = [peak_rss_bytes(pid) for pid in server.pids()]
    finally:
        server.stop()
    samples = generated["samples"]
    elapsed = max(float(generated["elapsed_s"]), 1e-9)
    ok = [latency for _, latency, status in samples if status == 200]
    latency = summarize(ok)
    row: dict[str, Any] = {
        "target": kind, "phase": phase, "clients": clients, "offered_rps": rate if rate > 0 else float("nan"),
        "duration_s": duration_s, "connections": generated.get("connections", 0), "requests": len(samples),
        "throughput_rps": len(ok) / elapsed,
        "latency_ms_p50": latency["p50"], "latency_ms_p95": latency["p95"], "latency_ms_p99": latency["p99"],
        "latency_ms_max": latency["max"], "errors": len(samples) - len(ok), "error_kinds": generated["errors"],
        "gateway_cpu_cores": cpu_used / elapsed, "peak_rss_mb": sum(rss) / MEGABYTE,
        "peak_rss_mb_per_process": [round(value / MEGABYTE, 1) for value in rss],
        "longest_hub_hold_ms": float("nan"), "longest_hub_hold_cpu_ms": float("nan"), "hub_blocked_reports": None,
    }
    if kind == "gateway":
        from chaoqing.bench.gateway_process import LONGEST_HOLD_CPU_METRIC, LONGEST_HOLD_METRIC

        row["longest_hub_hold_ms"] = _metrics_value(after_text, LONGEST_HOLD_METRIC) * 1000.0
        row["longest_hub_hold_cpu_ms"] = _metrics_value(after_text, LONGEST_HOLD_CPU_METRIC) * 1000.0
        row["longest_hub_hold_where"] = _hub_where(after_text)
        reports = _metrics_value(after_text, "chaoqing_hub_blocked_total") - _metrics_value(before_text, "chaoqing_hub_blocked_total")
        row["hub_blocked_reports"] = 0 if math.isnan(reports) else int(reports)  # NaN: the counter never moved
    return row


def run_load_bench(*, targets: list[str], client_levels: list[int], sweep: list[float], offered_fraction: float,
                   duration_s: float, saturation_duration_s: float, saturation_clients: int, single_duration_s: float,
                   workers: int, width: int, height: int, scale: float, faces: int, upscale_ms: float,
                   detect_ms: float, face_ms: float, blocking_threshold_s: float,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """Every phase for every target; returns rows and the figures the targets use."""
    from contextlib import ExitStack

    from chaoqing.bench.common import (
        encode_photo,
        raise_open_file_limit,
        start_gateway,
        start_model_server,
        synthetic_photo,
        write_gateway_config,
    )

    raise_open_file_limit()
    rows: list[dict[str, Any]] = []
    saturation: dict[str, float] = {}
    single: dict[str, float] = {}
    request_path = f"/v1/enhance?preset=balanced&scale={scale:g}"
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="chaoqing-bench-") as temporary:
        directory = Path(temporary)
        photo_path = directory / "photo.jpg"
        photo_path.write_bytes(encode_photo(synthetic_photo(width, height)))
        servers = {
            "sim-upscale-x4": start_model_server(["sim-upscale-x4"], sim_latency_ms=upscale_ms),
            "sim-detector": start_model_server(["sim-detector"], sim_latency_ms=detect_ms, sim_faces=faces),
            "sim-face": start_model_server(["sim-face"], sim_latency_ms=face_ms),
        }
        for child in servers.values():
            stack.callback(child.stop)
        config_path = write_gateway_config(
            directory, {name: child.url for name, child in servers.items()}, upscaler="sim-upscale-x4",
            face_model="sim-face", detector="sim-detector", max_in_flight=MAX_IN_FLIGHT,
            request_deadline_s=REQUEST_TIMEOUT_S,
        )

        for kind in targets:
            def start_server(kind: str = kind) -> _Server:
                if kind == "gateway":
                    return _Server(start_gateway(config_path, blocking_threshold_s=blocking_threshold_s), kind)
                if kind == "workers":
                    return _Server(_start_workers(config_path, workers), kind)
                return _Server(_start_gunicorn(config_path, workers), kind)

            def measure(phase: str, clients: int, rate: float, seconds: float, kind: str = kind,
                        start_server: Callable[[], _Server] = start_server) -> dict[str, Any]:
                progress(f"{kind}: {phase}, {clients} clients, " + (f"{rate:.1f} req/s" if rate else "closed loop")
                         + f", {seconds:g} s")
                row = _phase(start_server, kind, phase, clients, rate, seconds, photo_path, request_path, directory)
                rows.append(row)
                return row

            single[kind] = measure("single", 1, 0.0, single_duration_s)["latency_ms_p50"]
            saturation[kind] = measure("saturation", saturation_clients, 0.0, saturation_duration_s)["throughput_rps"]
            reference = saturation["gateway"] if "gateway" in saturation else saturation[kind]
            offered = offered_fraction * reference
            for clients in client_levels:
                measure("level", clients, offered, duration_s)
            if kind == "gateway":
                for fraction in sweep:
                    if abs(fraction - offered_fraction) > 1e-9:
                        measure("sweep", max(client_levels), fraction * reference, duration_s)
    return {"rows": rows, "saturation_rps": saturation, "single_p50_ms": single}


def _sweep_points(rows: list[dict[str, Any]], most_clients: int) -> list[dict[str, Any]]:
    points = [row for row in rows if row["target"] == "gateway" and row["clients"] == most_clients
              and row["phase"] in ("level", "sweep")]
    return sorted(points, key=lambda row: row["offered_rps"])


def plot_load(rows: list[dict[str, Any]], most_clients: int, single_p50: float, saturation: float, path: Path,
              title: str) -> None:
    """Latency percentiles (p50, p95, p99) of the gateway process against offered load."""
    from chaoqing.bench.common import load_pyplot

    pyplot = load_pyplot()
    points = _sweep_points(rows, most_clients)
    offered = [row["offered_rps"] for row in points]
    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=110)
    for key, label, style in (("latency_ms_p50", "p50", "o-"), ("latency_ms_p95", "p95", "s-"),
                              ("latency_ms_p99", "p99", "^-")):
        axes.plot(offered, [row[key] for row in points], style, label=f"gateway process {label}")
    gunicorn = [row for row in rows if row["target"] == "gunicorn" and row["clients"] == most_clients
                and row["phase"] == "level"]
    if gunicorn:
        axes.plot([row["offered_rps"] for row in gunicorn], [row["latency_ms_p99"] for row in gunicorn], "kx",
                  markersize=9, label="gunicorn 2 workers p99")
    if not math.isnan(single_p50):
        axes.axhline(P99_OVER_SINGLE_P50 * single_p50, color="tab:red", linestyle="--",
                     label=f"target: p99 ≤ {P99_OVER_SINGLE_P50:g} × single p50")
    if not math.isnan(saturation):
        axes.axvline(saturation, color="grey", linestyle=":", label="saturation rate (closed loop)")
    axes.set_xlabel("offered load (requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=name) from None
    if not values or min(values) <= 0:
        raise click.BadParameter("give at least one number, all positive", param_hint=name)
    return values


@click.command("load")
@click.option("--clients", "clients_text", default="10,100,1000", show_default=True, help="Client counts of the levels.")
@click.option("--offered-fraction", default=0.8, show_default=True, type=click.FloatRange(0.01, 10),
              help="Levels offer this fraction of the gateway process's saturation rate.")
@click.option("--sweep", "sweep_text", default="0.2,0.4,0.6,0.8,1.0,1.2", show_default=True,
              help="Fractions of the saturation rate offered by the most clients (gateway process).")
@click.option("--duration", "duration_s", default=20.0, show_default=True, type=click.FloatRange(0.5),
              help="Seconds per level and sweep point.")
@click.option("--saturation-duration", "saturation_duration_s", default=15.0, show_default=True,
              type=click.FloatRange(0.5))
@click.option("--saturation-clients", default=200, show_default=True, type=click.IntRange(1),
              help="Closed-loop clients that saturate the gateway.")
@click.option("--single-duration", "single_duration_s", default=6.0, show_default=True, type=click.FloatRange(0.5))
@click.option("--targets", "targets_text", default="gateway,gunicorn", show_default=True,
              help="gateway (one process), gunicorn (gevent workers), workers (chaoqing serve --workers), "
                   "comma-separated.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes of gunicorn and of serve --workers.")
@click.option("--width", default=256, show_default=True, type=click.IntRange(16))
@click.option("--height", default=256, show_default=True, type=click.IntRange(16))
@click.option("--scale", default=4.0, show_default=True, type=click.FloatRange(1, 4))
@click.option("--faces", default=2, show_default=True, type=click.IntRange(0, 64), help="Faces per photo.")
@click.option("--upscale-ms", default=300.0, show_default=True, type=click.FloatRange(0))
@click.option("--detect-ms", default=40.0, show_default=True, type=click.FloatRange(0))
@click.option("--face-ms", default=120.0, show_default=True, type=click.FloatRange(0))
@click.option("--blocking-threshold-ms", default=10.0, show_default=True, type=click.FloatRange(1),
              help="gevent monitor threshold in the gateway process.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw latency percentiles against offered load to this PNG (needs matplotlib).")
def load(clients_text: str, offered_fraction: float, sweep_text: str, duration_s: float, saturation_duration_s: float,
         saturation_clients: int, single_duration_s: float, targets_text: str, workers: int, width: int, height: int,
         scale: float, faces: int, upscale_ms: float, detect_ms: float, face_ms: float, blocking_threshold_ms: float,
         as_json: bool, plot_path: Path | None) -> None:
    """Throughput and tail latency under 10…1000 clients: one gateway process vs gunicorn."""
    from chaoqing.bench.common import Report, Target, command_line, report
    from chaoqing.errors import BenchError

    client_levels = sorted({int(value) for value in _floats(clients_text, "--clients")})
    sweep = sorted(set(_floats(sweep_text, "--sweep")))
    targets = [item.strip() for item in targets_text.split(",") if item.strip()]
    if not targets or set(targets) - {"gateway", "gunicorn", "workers"}:
        raise click.BadParameter("use gateway, gunicorn, workers, comma-separated", param_hint="--targets")
    targets.sort(key=["gateway", "gunicorn", "workers"].index)  # the gateway's saturation rate sets the levels
    if plot_path is not None:
        from chaoqing.bench.common import load_pyplot

        load_pyplot()

    def progress(message: str) -> None:
        click.echo(f"… {message}", err=True)

    try:
        measured = run_load_bench(
            targets=targets, client_levels=client_levels, sweep=sweep, offered_fraction=offered_fraction,
            duration_s=duration_s, saturation_duration_s=saturation_duration_s, saturation_clients=saturation_clients,
            single_duration_s=single_duration_s, workers=workers, width=width, height=height, scale=scale, faces=faces,
            upscale_ms=upscale_ms, detect_ms=detect_ms, face_ms=face_ms,
            blocking_threshold_s=blocking_threshold_ms / 1000.0, progress=progress,
        )
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    rows = measured["rows"]
    most = max(client_levels)
    target_rows = [row for row in rows if row["target"] == "gateway" and row["phase"] == "level" and row["clients"] == most]
    result_targets: list[Target] = []
    if target_rows:
        row = target_rows[0]
        single_p50 = measured["single_p50_ms"]["gateway"]
        label = f"gateway, {most} clients at {offered_fraction:.0%} of saturation"
        result_targets = [
            Target(f"p99 / single-request p50 ({label})", row["latency_ms_p99"] / single_p50, P99_OVER_SINGLE_P50),
            Target(f"errors ({label})", float(row["errors"]), 0.0),
            Target(f"peak RSS ({label})", row["peak_rss_mb"], PEAK_RSS_MB, unit=" MB"),
            Target(f"longest hub block ({label})", row["longest_hub_hold_ms"], LONGEST_BLOCK_MS, unit=" ms"),
        ]
    settings = {"photo": f"{width}x{height} synthetic JPEG", "scale": scale, "faces": faces, "upscale_ms": upscale_ms,
                "detect_ms": detect_ms, "face_ms": face_ms, "clients": client_levels, "sweep": sweep,
                "offered_fraction": offered_fraction, "duration_s": duration_s,
                "saturation_duration_s": saturation_duration_s, "saturation_clients": saturation_clients,
                "gunicorn_workers": workers, "blocking_threshold_ms": blocking_threshold_ms}
    extra = {"saturation_rps": measured["saturation_rps"], "single_p50_ms": measured["single_p50_ms"]}
    if plot_path is not None and "gateway" in measured["saturation_rps"]:
        plot_load(rows, most, measured["single_p50_ms"]["gateway"], measured["saturation_rps"]["gateway"], plot_path,
                  f"load: {most} clients, sim U={upscale_ms:g} D={detect_ms:g} F={face_ms:g} ms, {faces} faces, "
                  f"{width}×{height} photo")
    report(Report("load", command_line(), settings, rows, result_targets, extra), COLUMNS, as_json=as_json)
