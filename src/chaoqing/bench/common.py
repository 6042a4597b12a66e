"""What the bench scenarios share: child processes, a small HTTP client, photos, numbers.

- :class:`ChildProcess`, :func:`start_model_server`, :func:`start_gateway`,
  :func:`write_gateway_config`: model servers and gateways as separate processes on
  127.0.0.1 (so the process being measured is measured alone), stopped by the bench.
- :class:`HttpConnection`: one keep-alive HTTP/1.1 connection with TCP_NODELAY, the request
  written in one ``sendall`` (no Nagle stall on the client side either).
- :func:`synthetic_photo`, :func:`encode_photo`: deterministic photo-like inputs.
- :func:`summarize`, :class:`Target`, :func:`report`: percentiles, the targets each scenario
  checks, and the output (a table, or one JSON document with ``--json``).
- :func:`machine_description`: what ran it, recorded with every result.

Everything here runs in a monkey-patched process (``chaoqing bench`` is started through the
CLI's ``main``, which patches first), from greenlets of its hub.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import platform
import resource
import signal
import socket as stdlib_socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from chaoqing.config import PRESETS
from chaoqing.errors import BenchError

__all__ = [
    "ChildProcess",
    "HttpConnection",
    "HttpReply",
    "Report",
    "Target",
    "command_line",
    "die_with_parent",
    "encode_photo",
    "free_port",
    "load_pyplot",
    "machine_description",
    "markdown_table",
    "parse_server_timing",
    "peak_rss_bytes",
    "raise_open_file_limit",
    "report",
    "start_gateway",
    "start_model_server",
    "summarize",
    "synthetic_photo",
    "wait_until_ready",
    "write_gateway_config",
]

LISTENING_MARK = "listening on "
START_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
RECEIVE_BLOCK_BYTES = 256 * 1024
PR_SET_PDEATHSIG = 1
SIMULATOR_PREFIX = "sim-"  # how chaoqing.modelserver.runners names its simulators



# -- processes ------------------------------------------------------------------------------


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit (inherited by children:
    1000 client connections need as many descriptors on each side). Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the bench dies (Linux); runs between fork and exec."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class ChildProcess:
    """A server process started by the bench; ``url`` once it listens."""

    name: str
    process: Any  # subprocess.Popen (gevent's, in the patched bench process)
    url: str = ""

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL."""
        stop_process(self.process)


def stop_process(process: Any, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``process`` (a gevent.subprocess.Popen), wait up to ``grace_s``, then SIGKILL;
    close its stdout."""
    from gevent import subprocess

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _launch(name: str, command: Sequence[str], ready_path: str,
            environment: Mapping[str, str] | None = None) -> ChildProcess:
    """Start ``command``, wait for its first line with ``listening on URL``, then until
    ``URL + ready_path`` answers 200; the child is stopped if either fails."""
    import gevent
    from gevent import subprocess

    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})},
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
    )
    child = ChildProcess(name, process)
    line = ""
    with gevent.Timeout(START_TIMEOUT_S, False):
        assert process.stdout is not None
        line = process.stdout.readline()
    if LISTENING_MARK not in line:
        child.stop()
        raise BenchError(f"{name} did not start (exit code {process.poll()}): {line.strip() or 'no output'}")
    child.url = line.split(LISTENING_MARK, 1)[1].split()[0].rstrip("/")
    try:
        wait_until_ready(child.url + ready_path, process=process)
    except BaseException:
        child.stop()
        raise
    return child


def start_model_server(models: Sequence[str], *, sim_latency_ms: float = 0.0, sim_faces: int = 0,
                       max_batch_size: int = 8, threads: int = 0) -> ChildProcess:
    """``chaoqing model-server`` for ``models`` on a free port; returns once it is ready.

    ``sim_latency_ms`` and ``sim_faces`` reach the simulators as their ``--model-option``
    settings (``latency_ms``, ``faces``); a server of real models is started without them.

    Raises BenchError when ``models`` mix simulators and real models, or when the server does
    not start or become ready."""
    command = [sys.executable, "-m", "chaoqing", "model-server", "--port", "0", "--log-level", "warning",
               "--max-batch-size", str(max_batch_size), "--threads", str(threads)]
    simulators = [model.startswith(SIMULATOR_PREFIX) for model in models]
    if any(simulators) and not all(simulators):
        raise BenchError(f"one bench model server serves simulators or real models, not both: {', '.join(models)}")
    if all(simulators):
        command += ["--model-option", f"latency_ms={sim_latency_ms}", "--model-option", f"faces={sim_faces}"]
    for model in models:
        command += ["--model", model]
    return _launch("model server " + ",".join(models), command, "/v2/health/ready")


def start_gateway(config_path: Path, *, blocking_threshold_s: float = 0.01, log_level: str = "warning") -> ChildProcess:
    """One gateway process (:mod:`chaoqing.bench.gateway_process`) for ``config_path``, ready.

    Raises BenchError when it does not start or its models are not ready."""
    command = [sys.executable, "-m", "chaoqing.bench.gateway_process", "--config", str(config_path),
               "--blocking-threshold-s", str(blocking_threshold_s), "--log-level", log_level]
    return _launch("gateway", command, "/readyz")


def wait_until_ready(url: str, timeout_s: float = READY_TIMEOUT_S, process: Any = None) -> None:
    """Poll ``url`` until it answers 200; raises BenchError after ``timeout_s``, or as soon
    as ``process`` (a Popen, when given) has exited."""
    from urllib.parse import urlsplit

    import gevent
    from geventhttpclient.response import HTTPParseError

    parts = urlsplit(url)
    ends_at = time.monotonic() + timeout_s
    while True:
        try:
            connection = HttpConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout_s=5.0)
            try:
                if connection.request("GET", parts.path).status == 200:
                    return
            finally:
                connection.close()
        except (OSError, HTTPParseError):
            pass
        if process is not None and process.poll() is not None:
            raise BenchError(f"the server of {url} exited with code {process.returncode}")
        if time.monotonic() >= ends_at:
            raise BenchError(f"{url} was not ready within {timeout_s:.0f} s")
        gevent.sleep(0.1)


def number_list(text: str, option: str, convert: Callable[[str], Any], low: float | None = None,
                high: float | None = None) -> tuple[Any, ...]:
    """A comma-separated option's numbers, at least one, each converted (``int``, ``float``)
    and, where given, within [low, high]. Raises click.BadParameter naming ``option``."""
    try:
        values = tuple(convert(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None
    if not values:
        raise click.BadParameter("give at least one value", param_hint=option)
    if (low is not None and min(values) < low) or (high is not None and max(values) > high):
        raise click.BadParameter(f"each from {low:g} to {high:g}", param_hint=option)
    return values


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for servers that cannot bind port 0 and say which)."""
    with stdlib_socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (Linux's VmHWM), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for these values


def write_gateway_config(directory: Path, endpoints: Mapping[str, str], *, upscaler: str, face_model: str | None,
                         detector: str, max_in_flight: int = 64, request_deadline_s: float = 120.0,
                         extra: Mapping[str, Any] | None = None) -> Path:
    """A gateway TOML whose built-in presets all use ``upscaler`` (and ``face_model`` for those
    that enhance faces; fast and anime never do) and name every endpoint, as gunicorn needs."""
    lines = ['host = "127.0.0.1"', "port = 0", f"detector = {_toml_string(detector)}", f"max_in_flight = {max_in_flight}",
             f"request_deadline_s = {request_deadline_s}"]
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {json.dumps(value)}")
    for preset, built_in in PRESETS.items():  # every one: a preset left out keeps its real models
        faces = "" if built_in.face_model is None or face_model is None else face_model
        lines += ["", f"[presets.{preset}]", f"upscaler = {_toml_string(upscaler)}", f"face_model = {_toml_string(faces)}"]
    lines += ["", "[endpoints]"]
    for model, url in endpoints.items():
        lines.append(f"{_toml_string(model)} = [{_toml_string(url)}]")
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- HTTP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 connection (TCP_NODELAY; the request in one write).

    Raises OSError (and geventhttpclient's parse errors) as they come; reconnects on the
    next request after a failure."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._sock: Any = None

    def _connect(self) -> Any:
        from gevent import socket

        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        return sock

    def connect(self) -> None:
        """Open the connection now (a request opens it when it is not open)."""
        if self._sock is None:
            self._sock = self._connect()

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> HttpReply:
        from geventhttpclient.response import HTTPConnectionClosed, HTTPSocketResponse

        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        message = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (1, 2):
            reused = self._sock is not None
            if self._sock is None:
                self._sock = self._connect()
            try:
                self._sock.sendall(message)
                response = HTTPSocketResponse(self._sock, block_size=RECEIVE_BLOCK_BYTES, method=method)
                data = response.read()
            except (HTTPConnectionClosed, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused and attempt == 1:
                    continue  # the server had closed the idle connection: nothing was processed
                raise
            except BaseException:
                self.close()
                raise
            reply = HttpReply(response.status_code, {key.lower(): value for key, value in response.items()}, data)
            if not response.should_keep_alive():
                self.close()
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def parse_server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: decode;dur=1.2, upscale;dur=300.5`` → {stage: milliseconds}."""
    stages: dict[str, float] = {}
    for item in header.split(","):
        name, _, parameters = item.strip().partition(";")
        for parameter in parameters.split(";"):
            key, _, value = parameter.partition("=")
            if key.strip() == "dur":
                try:
                    stages[name.strip()] = float(value)
                except ValueError:
                    pass
    return stages


# -- photos ---------------------------------------------------------------------------------


def synthetic_photo(width: int, height: int, seed: int = 0) -> Any:
    """A deterministic photo-like RGB uint8 image: smooth colour fields, edges and grain
    (so JPEG and PNG sizes are like a photo's, not like a flat test card's)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for channel in range(3):
        frequency = 2 * math.pi / max(width, height) * (1.5 + channel)
        field_values = 128 + 60 * np.sin(x * frequency + channel) * np.cos(y * frequency * 0.7 - channel)
        channels.append(field_values)
    image = np.stack(channels, axis=2)
    for _ in range(12):  # a few hard-edged rectangles
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        image[top : top + int(rng.integers(8, height // 3 + 9)), left : left + int(rng.integers(8, width // 3 + 9))] = (
            rng.integers(0, 256, size=3)
        )
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_photo(rgb: Any, image_format: str = "JPEG", quality: int = 90) -> bytes:
    """``rgb`` as JPEG (``quality``) or PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    options = {"quality": quality} if image_format.upper() == "JPEG" else {}
    Image.fromarray(rgb).save(buffer, image_format.upper(), **options)
    return buffer.getvalue()


# -- numbers --------------------------------------------------------------------------------


def summarize(values_ms: Iterable[float]) -> dict[str, float]:
    """count, mean, p50, p95, p99, max of ``values_ms`` (NaN when empty)."""
    import numpy as np

    values = np.asarray(list(values_ms), dtype=np.float64)
    if values.size == 0:
        nan = float("nan")
        return {"count": 0, "mean": nan, "p50": nan, "p95": nan, "p99": nan, "max": nan}
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }


@dataclass(frozen=True)
class Target:
    """One target of the issue: ``value`` against ``limit`` (at most, or at least)."""

    name: str
    value: float
    limit: float
    at_most: bool = True
    unit: str = ""

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def describe(self) -> str:
        comparison = "≤" if self.at_most else "≥"
        verdict = "MET" if self.met else "MISSED"
        text = f"{self.name}: {self.value:.3g}{self.unit} (target {comparison} {self.limit:.3g}{self.unit}) {verdict}"
        if not self.met and not math.isnan(self.value) and self.limit:
            text += f" by {abs(self.value - self.limit) / abs(self.limit) * 100:.1f}%"
        return text

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit,
                "comparison": "at_most" if self.at_most else "at_least", "unit": self.unit, "met": self.met}


def machine_description() -> dict[str, Any]:
    """CPU model, cores, memory, Python and the packages that matter, for the record."""
    import gevent
    import psutil

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        # the machine is shared: 1, 5 and 15-minute load averages when the result was printed
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


@dataclass
class Report:
    """What a scenario prints: a title, table rows, targets, notes; or all of it as JSON."""

    scenario: str
    command: str
    settings: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def report(result: Report, columns: Sequence[tuple[str, str, str]], *, as_json: bool) -> None:
    """Print ``result``: one JSON document with ``as_json``; else a table whose ``columns``
    are (heading, key in each result row, format spec), then the targets."""
    if as_json:
        document = {
            "scenario": result.scenario, "command": result.command, "machine": machine_description(),
            "settings": result.settings, "results": result.results,
            "targets": [target.as_json() for target in result.targets], **result.extra,
        }
        click.echo(json.dumps(document, indent=2, default=_json_default))
        return
    machine = machine_description()
    click.echo(f"# chaoqing bench {result.scenario} — {machine['cpu']}, {machine['cores']} cores, "
               f"Python {machine['python']}, gevent {machine['gevent']}, load average {machine['load_average']}")
    click.echo(f"$ {result.command}")
    click.echo(markdown_table(result.results, columns))
    for target in result.targets:
        click.echo(f"target {target.describe()}")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows`` (missing or NaN values print as —)."""
    lines = ["| " + " | ".join(heading for heading, _, _ in columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("—")
            else:
                cells.append(format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; raises click.UsageError when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install 'chaoqing[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def command_line() -> str:
    """How this bench was invoked, for the record (``chaoqing bench ...``)."""
    arguments = sys.argv[1:]
    return " ".join(["chaoqing", *arguments]) if arguments else "chaoqing"
