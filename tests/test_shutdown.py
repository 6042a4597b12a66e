"""Graceful shutdown of ``chaoqing serve`` in a subprocess, with embedded sim model servers.

SIGTERM closes the listener at once (new connections are refused), lets requests already in
flight finish within the grace period, then stops the model-server children; an idle
keep-alive connection does not hold the exit up.
"""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from chaoqing.bench.overload import SIM_PRESETS_TOML

pytestmark = pytest.mark.timeout(120)

SIM_LATENCY_MS = 1500  # longer than gevent's own 1 s stop timeout, which must not cut the request off

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


def _start_serve(config_path: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "chaoqing", "serve", "--port", "0", "--config", str(config_path),
               "--log-level", "warning", "--log-format", "text"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    url = ""
    with gevent.Timeout(60, AssertionError("chaoqing serve did not print its URL within 60 s")):
        for line in process.stdout:
            if "serving on " in line:
                url = line.split("serving on ")[1].split()[0]
                break
    assert url, f"chaoqing serve exited with {process.poll()}"
    return process, url


def _refused(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_drains_in_flight_refuses_new_and_stops_children(tmp_path: Path) -> None:
    config_path = tmp_path / "chaoqing.toml"
    config_path.write_text(SIM_CONFIG)
    process, url = _start_serve(config_path)
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert len(children) == 3, commands
        for model in ("sim-upscale-x4", "sim-detector", "sim-face"):
            assert any(f"--model {model}" in command for command in commands), (model, commands)
        assert all(f"--sim-latency-ms {float(SIM_LATENCY_MS)}" in command for command in commands), commands

        idle = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))  # a keep-alive client, idle
        started = time.monotonic()
        in_flight = gevent.spawn(
            requests.post, f"{url}/v1/enhance?preset=fast&scale=2", data=_png(),
            headers={"Content-Type": "image/png"}, timeout=30,
        )
        gevent.sleep(0.4)  # the request is admitted and waiting on the sim upscaler
        process.send_signal(signal.SIGTERM)
        gevent.sleep(0.3)
        assert _refused(url), "the listener still accepts after SIGTERM"

        response = in_flight.get(timeout=30)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (128, 96)
        assert elapsed >= SIM_LATENCY_MS / 1000, "the sim latency from [model_server] reached the children"

        assert process.wait(timeout=20) == 0
        idle.close()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"model-server children still running: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    config_path = tmp_path / "chaoqing.toml"
    config_path.write_text(SIM_CONFIG.replace(f"sim_latency_ms = {SIM_LATENCY_MS}", "sim_latency_ms = 20000"))
    process, url = _start_serve(config_path)
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        in_flight = gevent.spawn(
            requests.post, f"{url}/v1/enhance?preset=fast", data=_png(), headers={"Content-Type": "image/png"}, timeout=30
        )
        gevent.sleep(0.4)
        process.send_signal(signal.SIGTERM)
        gevent.sleep(0.5)
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
