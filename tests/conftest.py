"""Shared fixtures. The test process is monkey-patched like the gateway, so blocking clients
(requests, tritonclient) and in-process gevent servers share one hub."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import gevent
import pytest
from hypothesis import settings

from chaoqing.config import Config, JobSettings, Preset
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.modelserver.app import ModelServer, ModelServerOptions
from chaoqing.modelserver.batcher import BatchSettings
from chaoqing.modelserver.runners import RunnerSettings

SIM_OPTION_KEYWORDS = {"sim_latency_ms": "latency_ms", "sim_faces": "faces", "sim_concurrency": "concurrency"}

# Hypothesis draws new examples on every run unless told otherwise, so a run could fail where
# the one before passed. The suite draws the same examples each time (a failure reproduces);
# HYPOTHESIS_PROFILE=explore draws fresh ones, for a deeper run by hand.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def connections_to(port: int) -> int:
    """This process's established TCP connections towards ``port`` (the client's side)."""
    import psutil

    process = psutil.Process()
    # psutil 6 renamed connections() to net_connections(); kserve 0.21 pins psutil < 6
    listing = process.net_connections if hasattr(process, "net_connections") else process.connections
    return sum(
        1 for connection in listing("tcp")
        if connection.raddr and connection.raddr.port == port and connection.status == psutil.CONN_ESTABLISHED
    )


def eventually(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    """Poll ``condition`` every 20 ms, yielding to other greenlets, until it holds (True) or
    ``within_s`` has passed (False): for waiting on a state rather than sleeping a guessed time."""
    import time

    ends_at = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > ends_at:
            return False
        gevent.sleep(0.02)
    return True


@pytest.fixture
def start_model_server() -> Iterator[Callable[..., ModelServer]]:
    """Start in-process model servers on 127.0.0.1, port 0; all are stopped after the test.

    ``start_model_server(["sim-upscale-x2"], sim_latency_ms=10, max_batch_size=8, ...)``;
    ``sim_latency_ms``, ``sim_faces`` and ``sim_concurrency`` become the simulators' model
    options (``latency_ms``, ``faces``, ``concurrency``); ``runner_factory=`` substitutes
    runners (orchestration tests only).
    """
    servers: list[ModelServer] = []

    def start(models: list[str], *, runner_factory: Any = None, ready_timeout_s: float = 60.0, **settings: Any) -> ModelServer:
        model_options = {option: str(settings.pop(keyword)) for keyword, option in SIM_OPTION_KEYWORDS.items()
                         if keyword in settings}
        runner_fields = {key: settings.pop(key) for key in list(settings) if key in RunnerSettings.__dataclass_fields__}
        runner_fields.setdefault("model_options", model_options)
        batch_fields = {key: settings.pop(key) for key in list(settings) if key in BatchSettings.__dataclass_fields__}
        runner_fields.setdefault("threads", 2)
        options = ModelServerOptions(
            models=tuple(models),
            host="127.0.0.1",
            port=0,
            runner=RunnerSettings(**runner_fields),
            batching=BatchSettings(**batch_fields),
            **settings,
        )
        server = ModelServer(options, runner_factory) if runner_factory else ModelServer(options)
        server.start()
        servers.append(server)
        assert server.wait_ready(ready_timeout_s), {name: model.state for name, model in server.models.items()}
        return server

    yield start
    for server in servers:
        server.stop(timeout_s=1.0)


@pytest.fixture
def greenlet_census() -> Iterator[Callable[[], list[gevent.Greenlet]]]:
    """Returns a function listing greenlets started during the test that are still alive."""
    import gc

    before = {id(item) for item in gc.get_objects() if isinstance(item, gevent.Greenlet)}

    def alive() -> list[gevent.Greenlet]:
        gevent.sleep(0.05)
        return [
            item
            for item in gc.get_objects()
            if isinstance(item, gevent.Greenlet) and id(item) not in before and not item.dead
        ]

    yield alive


def run_cli(*arguments: str, timeout: float = 120, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``chaoqing ARGS`` in a subprocess with this interpreter."""
    command = [sys.executable, "-c", "from chaoqing.cli import main; main()", *arguments]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)


def tiny_photos_and_config(tmp_path: Path, config_text: str) -> tuple[Path, Path]:
    """A ``photos`` folder holding one generated 96×64 PNG, and ``sim.toml`` holding
    ``config_text``, under ``tmp_path``: what the bench programs' smoke tests run on."""
    from chaoqing.bench.common import encode_photo, synthetic_photo

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "tiny.png").write_bytes(encode_photo(synthetic_photo(96, 64), "PNG"))
    config = tmp_path / "sim.toml"
    config.write_text(config_text, encoding="utf-8")
    return photos, config


SIM_PRESETS = {
    "fast": Preset("fast", "sim-upscale-x4", None, "sim upscaler, no faces"),
    "balanced": Preset("balanced", "sim-upscale-x4", "sim-face", "sim upscaler and sim faces"),
    "quality": Preset("quality", "sim-upscale-x4", "sim-face", "sim upscaler and sim faces"),
}


@dataclass
class SimGateway:
    """A gateway in this process in front of sim model servers (one server per model)."""

    server: GatewayServer
    config: Config
    model_servers: dict[str, ModelServer] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def metrics(self) -> GatewayMetrics:
        return self.server.metrics


@pytest.fixture
def start_sim_gateway(
    start_model_server: Callable[..., ModelServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., SimGateway]]:
    """``start_sim_gateway(upscale_ms=50, detect_ms=10, face_ms=20, faces=2, endpoints={...}, **config)``.

    ``endpoints`` replaces the URL of a model (e.g. with a fake); other keyword arguments
    change the Config. The job spool is a fresh temporary folder unless ``jobs=`` says.
    """
    gateways: list[GatewayServer] = []

    def start(upscale_ms: float = 50, detect_ms: float = 10, face_ms: float = 20, faces: int = 2,
              endpoints: dict[str, tuple[str, ...]] | None = None, **config_changes: Any) -> SimGateway:
        servers = {
            "sim-upscale-x4": start_model_server(["sim-upscale-x4"], sim_latency_ms=upscale_ms, max_batch_size=8),
            "sim-detector": start_model_server(["sim-detector"], sim_latency_ms=detect_ms, sim_faces=faces),
            "sim-face": start_model_server(["sim-face"], sim_latency_ms=face_ms, max_batch_size=8),
        }
        urls = {name: (server.url,) for name, server in servers.items()}
        urls.update(endpoints or {})
        config_changes.setdefault("jobs", JobSettings(spool_dir=str(tmp_path_factory.mktemp("spool"))))
        config = Config(port=0, detector="sim-detector", presets=SIM_PRESETS, endpoints=urls, **config_changes)
        metrics = GatewayMetrics()
        server = GatewayServer(config, RemoteModels.from_config(config, metrics), metrics=metrics, watch_hub=False)
        server.start()
        gateways.append(server)
        return SimGateway(server, config, servers)

    yield start
    for gateway in gateways:
        gateway.stop(grace_s=1.0)


@pytest.fixture
def start_model_server_process() -> Iterator[Callable[..., str]]:
    """``start_model_server_process("sim-upscale-x4", "--model-option", "latency_ms=100")`` → URL of a
    ``chaoqing model-server`` child process (ready); all are stopped after the test."""
    import time

    import requests

    processes: list[subprocess.Popen[str]] = []

    def start(*arguments: str, ready_timeout_s: float = 30.0) -> str:
        models: list[str] = []
        rest: list[str] = []
        for argument in arguments:
            if argument.startswith("-") or rest:
                rest.append(argument)
            else:
                models += ["--model", argument]
        command = [sys.executable, "-m", "chaoqing", "model-server", *models, "--port", "0", "--log-level", "error", *rest]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.split("listening on ")[1].split()[0]
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    return url
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"{arguments} not ready"
            time.sleep(0.05)

    yield start
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class SwitchWatch:
    """Measures the longest time any one greenlet other than the hub ran without switching
    (what gevent's monitor thread calls the hub being blocked; the hub itself waiting in its
    event loop is idle, not blocked), in this thread's CPU time: the work a greenlet did while
    it held the hub. Time the OS gave to other processes, or this thread spent waiting for the
    GIL, is not counted: a wall-clock measure counts it too, and on a busy 2-core machine it
    swung by tens of milliseconds between runs of the same request."""

    def __init__(self) -> None:
        import time

        self._clock = time.thread_time
        self.longest = 0.0
        self.longest_in = ""
        self._last = self._clock()

    def __enter__(self) -> Self:
        import greenlet

        self._previous = greenlet.settrace(self._trace)
        self._last = self._clock()
        return self

    def _trace(self, event: str, arguments: Any) -> None:
        now = self._clock()
        if event in ("switch", "throw") and not isinstance(arguments[0], gevent.hub.Hub):
            ran = now - self._last
            if ran > self.longest:
                self.longest = ran
                self.longest_in = repr(arguments[0])[:200]
        self._last = now

    def __exit__(self, *exc_info: object) -> None:
        import greenlet

        greenlet.settrace(self._previous)
