"""Graceful shutdown of ``chaoqing serve`` in a subprocess, with embedded sim model servers.

SIGTERM closes the listener at once (new connections are refused), lets requests already in
flight finish within ``shutdown_grace_s``, answers a request on a kept-alive connection 503
shutting_down, answers what still runs after the grace 503 shutting_down with Retry-After,
then stops the model-server children and logs a final "stopped" line; an idle keep-alive
connection does not hold the exit up. A second signal exits at once.
"""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from chaoqing.bench.overload import SIM_PRESETS_TOML

pytestmark = pytest.mark.timeout(120)

SIM_LATENCY_MS = 1500  # longer than gevent's own 1 s stop timeout, which must not cut the request off
SLOW_SIM_LATENCY_MS = 20_000  # a request that outlasts every grace period below
SHORT_GRACE_S = 5.0  # long enough for the keep-alive request below on a busy machine; far below 20 s

SIM_CONFIG = f"""
request_deadline_s = 30
{SIM_PRESETS_TOML}
[model_server]
sim_latency_ms = {SIM_LATENCY_MS}
threads = 1
"""


def _png(width: int = 64, height: int = 48) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _start_serve(config_path: Path, log_path: Path, *arguments: str) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "chaoqing", "serve", "--port", "0", "--config", str(config_path),
               "--log-level", "info", "--log-format", "json", *arguments]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    url = ""
    with gevent.Timeout(60, AssertionError("chaoqing serve did not print its URL within 60 s")):
        for line in process.stdout:
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
                break
    assert url, f"chaoqing serve exited with {process.poll()}: {log_path.read_text()}"
    return process, url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _refused(url: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=2):
            return False
    except (ConnectionRefusedError, ConnectionResetError):  # reset: queued as the listener closed
        return True


def _eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    ends_at = time.monotonic() + timeout_s
    while time.monotonic() < ends_at:
        if condition():
            return True
        gevent.sleep(0.05)
    return condition()


def _in_flight(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("chaoqing_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def _start_request(url: str, query: str = "preset=fast&scale=2") -> gevent.Greenlet:
    """An enhance request, started and admitted (the gateway counts it in flight)."""
    request = gevent.spawn(requests.post, f"{url}/v1/enhance?{query}", data=_png(),
                           headers={"Content-Type": "image/png"}, timeout=60)
    assert _eventually(lambda: _in_flight(url) == 1.0), "the request was not admitted"
    return request


def _log_records(log_path: Path) -> list[dict[str, Any]]:
    """The gateway's JSON log lines (the children log plain text to the same stderr)."""
    records = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def _model_server_children(process: subprocess.Popen[str]) -> list[psutil.Process]:
    children = psutil.Process(process.pid).children(recursive=True)
    commands = [" ".join(child.cmdline()) for child in children]
    assert len(children) == 3, commands
    for model in ("sim-upscale-x4", "sim-detector", "sim-face"):
        assert any(f"--model {model}" in command for command in commands), (model, commands)
    return children


def test_sigterm_drains_in_flight_refuses_new_and_stops_children(tmp_path: Path) -> None:
    config_path = tmp_path / "chaoqing.toml"
    config_path.write_text(SIM_CONFIG)
    log_path = tmp_path / "serve.log"
    process, url = _start_serve(config_path, log_path)
    try:
        children = _model_server_children(process)
        idle = socket.create_connection(("127.0.0.1", _port(url)))  # a keep-alive client, idle
        started = time.monotonic()
        in_flight = _start_request(url)
        process.send_signal(signal.SIGTERM)
        assert _eventually(lambda: _refused(url)), "the listener still accepts after SIGTERM"

        response = in_flight.get(timeout=30)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text  # well inside the default 60 s grace
        assert Image.open(io.BytesIO(response.content)).size == (128, 96)
        assert elapsed >= SIM_LATENCY_MS / 1000, "the sim latency from [model_server] reached the children"

        assert process.wait(timeout=30) == 0
        idle.close()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"model-server children still running: {alive}"
        records = _log_records(log_path)
        messages = [record["message"] for record in records]
        assert any(message.startswith("stopping (draining up to 60 s") for message in messages), messages
        assert messages[-1].startswith("stopped"), messages
        assert not any("outlasted" in message for message in messages), messages
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_request_past_the_grace_is_answered_503_shutting_down(tmp_path: Path) -> None:
    config_path = tmp_path / "chaoqing.toml"
    config_path.write_text(SIM_CONFIG.replace(f"sim_latency_ms = {SIM_LATENCY_MS}", f"sim_latency_ms = {SLOW_SIM_LATENCY_MS}"))
    log_path = tmp_path / "serve.log"
    process, url = _start_serve(config_path, log_path, "--shutdown-grace-s", str(SHORT_GRACE_S))
    kept_alive = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=30)
    try:
        children = _model_server_children(process)
        kept_alive.request("GET", "/healthz")
        first = kept_alive.getresponse()
        first.read()
        assert first.status == 200 and not first.will_close

        started = time.monotonic()
        in_flight = _start_request(url)
        process.send_signal(signal.SIGTERM)
        assert _eventually(lambda: _refused(url)), "the listener still accepts after SIGTERM"

        # during the drain, a request on the connection kept alive: 503 and the connection closed
        kept_alive.request("GET", "/healthz")
        refused = kept_alive.getresponse()
        body = json.loads(refused.read())
        assert refused.status == 503, body
        assert body["error"]["code"] == "shutting_down", body
        assert refused.getheader("Connection") == "close" and refused.will_close
        assert refused.getheader("Retry-After") is not None
        assert process.poll() is None, "the request in flight holds the drain open"

        response = in_flight.get(timeout=60)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json()["error"]["code"] == "shutting_down", response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert SHORT_GRACE_S <= elapsed < SLOW_SIM_LATENCY_MS / 1000, "answered at the end of the grace"

        assert process.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"model-server children still running: {alive}"
        records = _log_records(log_path)
        messages = [record["message"] for record in records]
        assert any("1 request(s) outlasted the 5 s grace" in message for message in messages), messages
        access = [record for record in records if record["logger"] == "chaoqing.access"]
        assert [(record["status"], record.get("error")) for record in access] == [(503, "shutting_down")]
        assert messages[-1].startswith("stopped"), messages
    finally:
        kept_alive.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    config_path = tmp_path / "chaoqing.toml"
    config_path.write_text(SIM_CONFIG.replace(f"sim_latency_ms = {SIM_LATENCY_MS}", f"sim_latency_ms = {SLOW_SIM_LATENCY_MS}"))
    process, url = _start_serve(config_path, tmp_path / "serve.log")
    try:
        children = _model_server_children(process)
        in_flight = _start_request(url, "preset=fast")
        process.send_signal(signal.SIGTERM)
        assert _eventually(lambda: _refused(url)), "the listener still accepts after SIGTERM"
        assert process.poll() is None, "the first signal drains: a request is still in flight"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        assert time.monotonic() - started < 5
        in_flight.join(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], "children die with the gateway (PR_SET_PDEATHSIG) even when it is forced out"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
