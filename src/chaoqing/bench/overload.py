"""``chaoqing bench overload``: the gateway at 1× and at 3× its capacity (sim model servers).

A gateway process (``chaoqing serve``, embedded sim model servers, ``max_in_flight`` =
``--capacity``) is driven by closed-loop clients on loopback: first ``capacity`` of them
(1×), then ``factor × capacity`` (3× by default). A client refused with 503 waits what
Retry-After says and tries again (``--backoff-ms`` instead: a client retrying much sooner,
which makes the refusals cost CPU on a small machine). Reported per phase: admitted requests per second and their
latency (p50/p95/p99), refusals and how fast they came, statuses other than expected, and the
gateway's resident memory (RSS, sampled every 0.5 s), open descriptors and CPU. Admitted
latency is reported as the clients see it and as the gateway measured it (Server-Timing
``total``); the verdict uses the latter, the load generator sharing the machine.

What the design promises, checked in the verdict: past capacity a request is refused at once
with ``503 overloaded`` and Retry-After (no queue grows), the admitted ones keep their 1×
latency, and memory stays where it was at 1×.

Also home of what ``chaoqing bench soak`` shares: :func:`start_gateway_process` and
:class:`Client`. Everything runs in the CLI's monkey-patched process, from greenlets.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

__all__ = [
    "Client",
    "GatewayProcess",
    "Reply",
    "overload",
    "percentiles",
    "run_overload",
    "start_gateway_process",
    "synthetic_png",
    "write_json",
]

START_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
RSS_SAMPLE_INTERVAL_S = 0.5
# verdict thresholds
REFUSAL_P50_MS = 50.0  # a refusal costs parsing and one JSON line, nothing queued (seen by the clients)
LATENCY_RATIO = 1.25  # admitted p50 at 3× over p50 at 1×
LATENCY_SLACK_MS = 20.0  # plus this much, for a shared machine's noise
RSS_GROWTH_LIMIT = 0.10

SIM_PRESETS_TOML = """
detector = "sim-detector"

[presets.fast]
upscaler = "sim-upscale-x4"
face_model = ""

[presets.balanced]
upscaler = "sim-upscale-x4"
face_model = "sim-face"

[presets.quality]
upscaler = "sim-upscale-x4"
face_model = "sim-face"

[presets.anime]
upscaler = "sim-upscale-x4"
face_model = ""
"""


# -- the gateway under test ------------------------------------------------------------------


@dataclass
class GatewayProcess:
    """``chaoqing serve`` in a child process, with its embedded sim model servers."""

    process: subprocess.Popen[str]
    url: str
    directory: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def rss_bytes(self) -> int:
        import psutil

        return int(psutil.Process(self.process.pid).memory_info().rss)

    def children_rss_bytes(self) -> int:
        import psutil

        return sum(int(child.memory_info().rss) for child in psutil.Process(self.process.pid).children(recursive=True))

    def open_descriptors(self) -> int:
        import psutil

        return int(psutil.Process(self.process.pid).num_fds())

    def cpu_seconds(self) -> float:
        """User + system CPU time the gateway process (not its children) has used so far."""
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        """SIGTERM (drain, then children), SIGKILL after the grace period."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_gateway_process(directory: Path, *, max_in_flight: int, sim_latency_ms: float, sim_faces: int,
                          request_deadline_s: float = 30.0) -> GatewayProcess:
    """Write a sim-preset config into ``directory`` and start ``chaoqing serve`` on a free port.

    Raises click.ClickException when it does not print its URL in time.
    """
    config_path = directory / "chaoqing.toml"
    config_path.write_text(
        f"max_in_flight = {max_in_flight}\nrequest_deadline_s = {request_deadline_s}\n{SIM_PRESETS_TOML}\n"
        f"[model_server]\nsim_latency_ms = {sim_latency_ms}\nsim_faces = {sim_faces}\nthreads = 1\n"
    )
    command = [sys.executable, "-m", "chaoqing", "serve", "--port", "0", "--config", str(config_path),
               "--log-level", "error", "--log-format", "json"]
    with open(directory / "gateway.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    url = ""
    import gevent

    with gevent.Timeout(START_TIMEOUT_S, False):
        for line in process.stdout:
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
                break
    if not url:
        process.kill()
        process.wait()
        raise click.ClickException(f"the gateway did not start; see {directory / 'gateway.log'}")
    return GatewayProcess(process, url, directory)


# -- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    seconds: float

    def error_code(self) -> str:
        try:
            return str(json.loads(self.body)["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return ""


class Client:
    """One keep-alive HTTP/1.1 connection (reopened when the server closes it)."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self._connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Reply:
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                self._connection.request(method, path, body=body or None, headers=dict(headers or {}))
                response = self._connection.getresponse()
                data = response.read()
                if response.will_close:
                    self._connection.close()
                return Reply(response.status, {key.lower(): value for key, value in response.getheaders()}, data,
                             time.perf_counter() - started)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._connection.close()  # a kept-alive connection the server had closed
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._connection.close()


# -- numbers ---------------------------------------------------------------------------------


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds (nearest rank); zeros when empty."""
    if not seconds:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(seconds)

    def rank(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))] * 1000

    return {"p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99), "max_ms": ordered[-1] * 1000}


def synthetic_png(width: int = 160, height: int = 120) -> bytes:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 64 + 96], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def write_json(path: Path | None, result: Mapping[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")


# -- the scenario ----------------------------------------------------------------------------


@dataclass
class _Phase:
    name: str
    clients: int
    admitted: list[float] = field(default_factory=list)
    admitted_in_gateway: list[float] = field(default_factory=list)  # Server-Timing total
    refused: list[float] = field(default_factory=list)
    refused_without_retry_after: int = 0
    unexpected: dict[str, int] = field(default_factory=dict)
    rss_samples: list[int] = field(default_factory=list)
    descriptor_samples: list[int] = field(default_factory=list)
    seconds: float = 0.0
    gateway_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        admitted = percentiles(self.admitted)
        in_gateway = percentiles(self.admitted_in_gateway)
        refused = percentiles(self.refused)
        return {
            "phase": self.name,
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "admitted": len(self.admitted),
            "admitted_per_s": round(len(self.admitted) / self.seconds, 1) if self.seconds else 0.0,
            **{f"admitted_{key}": round(value, 1) for key, value in admitted.items()},
            **{f"in_gateway_{key}": round(value, 1) for key, value in in_gateway.items()},
            "refused": len(self.refused),
            **{f"refused_{key}": round(value, 1) for key, value in refused.items()},
            "refused_without_retry_after": self.refused_without_retry_after,
            "unexpected": dict(self.unexpected),
            "rss_mb_first": round(self.rss_samples[0] / 2**20, 1) if self.rss_samples else 0.0,
            "rss_mb_max": round(max(self.rss_samples) / 2**20, 1) if self.rss_samples else 0.0,
            "rss_mb_last": round(self.rss_samples[-1] / 2**20, 1) if self.rss_samples else 0.0,
            "descriptors_max": max(self.descriptor_samples, default=0),
            "gateway_cpu_percent": round(100 * self.gateway_cpu_s / self.seconds, 1) if self.seconds else 0.0,
        }


def _server_timing_total_ms(header: str) -> float | None:
    """``total;dur=123.4`` from a Server-Timing header, in ms."""
    for entry in header.split(","):
        name, _, rest = entry.strip().partition(";")
        if name == "total" and rest.startswith("dur="):
            try:
                return float(rest[4:])
            except ValueError:
                return None
    return None


def _run_phase(gateway: GatewayProcess, phase: _Phase, seconds: float, backoff_s: float | None, photo: bytes) -> None:
    """``backoff_s`` None: wait what Retry-After says after a refusal."""
    import gevent

    stop_at = time.monotonic() + seconds
    query = "/v1/enhance?scale=2"
    headers = {"Content-Type": "image/png"}

    def client_loop() -> None:
        client = Client(gateway.url)
        try:
            while time.monotonic() < stop_at:
                try:
                    reply = client.request("POST", query, photo, headers)
                except OSError as exc:
                    label = f"connection error: {type(exc).__name__}"
                    phase.unexpected[label] = phase.unexpected.get(label, 0) + 1
                    gevent.sleep(1.0)
                    continue
                if reply.status == 200:
                    phase.admitted.append(reply.seconds)
                    total_ms = _server_timing_total_ms(reply.headers.get("server-timing", ""))
                    if total_ms is not None:
                        phase.admitted_in_gateway.append(total_ms / 1000)
                elif reply.status == 503 and reply.error_code() == "overloaded":
                    phase.refused.append(reply.seconds)
                    if "retry-after" not in reply.headers:
                        phase.refused_without_retry_after += 1
                    gevent.sleep(backoff_s if backoff_s is not None else float(reply.headers.get("retry-after", "1")))
                else:
                    label = f"{reply.status} {reply.error_code()}".strip()
                    phase.unexpected[label] = phase.unexpected.get(label, 0) + 1
        finally:
            client.close()

    def sampler() -> None:
        while True:
            phase.rss_samples.append(gateway.rss_bytes())
            phase.descriptor_samples.append(gateway.open_descriptors())
            gevent.sleep(RSS_SAMPLE_INTERVAL_S)

    started, cpu_before = time.monotonic(), gateway.cpu_seconds()
    watcher = gevent.spawn(sampler)
    clients = [gevent.spawn(client_loop) for _ in range(phase.clients)]
    gevent.joinall(clients)
    watcher.kill()
    phase.seconds = time.monotonic() - started
    phase.gateway_cpu_s = gateway.cpu_seconds() - cpu_before


def run_overload(*, capacity: int, factor: float, seconds: float, sim_latency_ms: float, faces: int,
                 backoff_ms: float | None, warmup_s: float = 2.0) -> dict[str, Any]:
    """Run the two phases against a fresh gateway process; the result as a JSON-able dict."""
    photo = synthetic_png()
    with tempfile.TemporaryDirectory(prefix="chaoqing-overload-") as folder:
        gateway = start_gateway_process(Path(folder), max_in_flight=capacity, sim_latency_ms=sim_latency_ms, sim_faces=faces)
        try:
            backoff_s = None if backoff_ms is None else backoff_ms / 1000
            _run_phase(gateway, _Phase("warm-up", capacity), warmup_s, backoff_s, photo)
            baseline = _Phase("1x", capacity)
            _run_phase(gateway, baseline, seconds, backoff_s, photo)
            overloaded = _Phase(f"{factor:g}x", max(capacity + 1, round(capacity * factor)))
            _run_phase(gateway, overloaded, seconds, backoff_s, photo)
        finally:
            gateway.stop()
    one, many = baseline.summary(), overloaded.summary()
    # judged inside the gateway (Server-Timing): what the clients see also carries the load
    # generator's own hub, busy with the refused clients, on the same cores
    latency_limit = one["in_gateway_p50_ms"] * LATENCY_RATIO + LATENCY_SLACK_MS
    rss_growth = (many["rss_mb_max"] - one["rss_mb_max"]) / one["rss_mb_max"] if one["rss_mb_max"] else 0.0
    checks = {
        "refused at once (p50 refusal ms)": (many["refused_p50_ms"], many["refused_p50_ms"] <= REFUSAL_P50_MS),
        "every refusal has Retry-After": (many["refused_without_retry_after"], many["refused_without_retry_after"] == 0),
        "admitted p50 ms in the gateway at overload within limit": (
            many["in_gateway_p50_ms"], many["in_gateway_p50_ms"] <= latency_limit),
        "RSS growth over 1x": (round(rss_growth, 4), rss_growth <= RSS_GROWTH_LIMIT),
        "no unexpected answers": (sum(one["unexpected"].values()) + sum(many["unexpected"].values()),
                                  not one["unexpected"] and not many["unexpected"]),
        "overload phase saw refusals": (many["refused"], many["refused"] > 0),
    }
    return {
        "scenario": "overload",
        "settings": {"capacity": capacity, "factor": factor, "seconds_per_phase": seconds, "sim_latency_ms": sim_latency_ms,
                     "faces": faces, "backoff_ms": "Retry-After" if backoff_ms is None else backoff_ms, "cpus": os.cpu_count(),
                     "load_average_1min": round(os.getloadavg()[0], 2)},
        "phases": [one, many],
        "latency_limit_ms": round(latency_limit, 1),
        "checks": {name: {"value": value, "passed": passed} for name, (value, passed) in checks.items()},
        "passed": all(passed for _, passed in checks.values()),
    }


COLUMNS = (
    ("phase", "phase"), ("clients", "clients"), ("admitted/s", "admitted_per_s"), ("p50 ms", "admitted_p50_ms"),
    ("p95 ms", "admitted_p95_ms"), ("p99 ms", "admitted_p99_ms"), ("in gateway p50 ms", "in_gateway_p50_ms"),
    ("in gateway p99 ms", "in_gateway_p99_ms"), ("refused", "refused"),
    ("refusal p50 ms", "refused_p50_ms"), ("refusal p99 ms", "refused_p99_ms"), ("RSS MB first", "rss_mb_first"),
    ("RSS MB max", "rss_mb_max"), ("fds max", "descriptors_max"), ("gateway CPU %", "gateway_cpu_percent"),
)


def print_result(result: Mapping[str, Any]) -> None:
    header = " | ".join(title for title, _ in COLUMNS)
    click.echo(f"| {header} |")
    click.echo("|" + "|".join("---" for _ in COLUMNS) + "|")
    for phase in result["phases"]:
        click.echo("| " + " | ".join(str(phase[key]) for _, key in COLUMNS) + " |")
    click.echo("")
    for name, check in result["checks"].items():
        click.echo(f"{'PASS' if check['passed'] else 'FAIL'}  {name}: {check['value']}")
    for phase in result["phases"]:
        if phase["unexpected"]:
            click.echo(f"unexpected answers in {phase['phase']}: {phase['unexpected']}")


@click.command("overload")
@click.option("--capacity", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="The gateway's max_in_flight.")
@click.option("--factor", default=3.0, show_default=True, type=click.FloatRange(1.0, 100.0),
              help="Clients in the overload phase, as a multiple of capacity.")
@click.option("--seconds", default=20.0, show_default=True, type=click.FloatRange(0.5, 3600.0), help="Length of each phase.")
@click.option("--sim-latency-ms", default=150.0, show_default=True, type=click.FloatRange(0.0, 60_000.0),
              help="Latency of every sim model (a request with faces costs about twice this).")
@click.option("--faces", default=2, show_default=True, type=click.IntRange(0, 64), help="Faces the sim detector reports.")
@click.option("--backoff-ms", default=None, type=click.FloatRange(0.0, 10_000.0),
              help="How long a refused client waits before trying again.  [default: what Retry-After says]")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result here as JSON.")
def overload(capacity: int, factor: float, seconds: float, sim_latency_ms: float, faces: int, backoff_ms: float | None,
             json_path: Path | None) -> None:
    """The gateway at 1× and at 3× its capacity: refusals are immediate, admitted latency and
    memory stay where they were. Exits 1 when a request got an answer other than 200 or
    503 overloaded."""
    result = run_overload(capacity=capacity, factor=factor, seconds=seconds, sim_latency_ms=sim_latency_ms,
                          faces=faces, backoff_ms=backoff_ms)
    print_result(result)
    write_json(json_path, result)
    if not result["checks"]["no unexpected answers"]["passed"]:
        sys.exit(1)
