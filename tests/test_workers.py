"""``chaoqing serve --workers 2`` in a subprocess, with embedded sim model servers.

Two gateway processes accept on the one port: requests are answered by both (each worker's
``/metrics`` names its pid); the model servers are started once, by the parent, not per
worker; a worker killed is restarted while the other serves; SIGTERM drains every worker,
stops the model servers and exits 0.
"""

from __future__ import annotations

import io
import re
import signal
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

pytestmark = pytest.mark.timeout(150)

SIM_CONFIG = f"""
request_deadline_s = 30
{SIM_PRESETS_TOML}
[model_server]
sim_latency_ms = 200
threads = 1
"""
PID_PATTERN = re.compile(r'^chaoqing_gateway_process\{pid="(\d+)"\} 1', re.MULTILINE)
SIM_MODELS = ("sim-upscale-x4", "sim-detector", "sim-face")


def _png(width: int = 64, height: int = 48) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _answering_pid(url: str) -> int:
    """The pid of the worker that takes a new connection's /metrics."""
    with requests.Session() as session:  # a connection of its own
        match = PID_PATTERN.search(session.get(f"{url}/metrics", timeout=10).text)
    assert match, "no chaoqing_gateway_process metric"
    return int(match.group(1))


def _enhance(url: str) -> int:
    with requests.Session() as session:
        response = session.post(f"{url}/v1/enhance?preset=fast&scale=2", data=_png(),
                                headers={"Content-Type": "image/png"}, timeout=60)
    return response.status_code


def test_two_workers_share_the_port_and_the_model_servers(tmp_path: Path) -> None:
    config_path = tmp_path / "chaoqing.toml"
    config_path.write_text(SIM_CONFIG)
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "chaoqing", "serve", "--port", "0", "--config", str(config_path),
               "--workers", "2", "--log-level", "info", "--log-format", "json"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        line = ""
        with gevent.Timeout(90, AssertionError(f"no 'serving on' line: {log_path.read_text()[-2000:]}")):
            for line in process.stdout:
                if "serving on " in line:
                    break
        assert "with 2 workers" in line, line
        url = line.split("serving on ")[1].split()[0]

        children = psutil.Process(process.pid).children()
        commands = [" ".join(child.cmdline()) for child in children]
        model_servers = [command for command in commands if " model-server " in command]
        workers = [child for child, command in zip(children, commands, strict=True) if "--listen-fd" in command]
        assert len(workers) == 2, commands
        # started once, by the parent: one per model, and none under a worker
        assert sorted(model for command in model_servers for model in SIM_MODELS if f"--model {model}" in command) \
            == sorted(SIM_MODELS), commands
        assert len(model_servers) == len(SIM_MODELS), commands
        assert all(not worker.children() for worker in workers)

        worker_pids = {worker.pid for worker in workers}
        jobs = [gevent.spawn(_enhance, url) for _ in range(12)]
        gevent.joinall(jobs, raise_error=True)
        assert [job.value for job in jobs] == [200] * 12
        seen: set[int] = set()
        for _ in range(200):  # the kernel picks the worker for each new connection: both, soon
            seen.add(_answering_pid(url))
            if seen == worker_pids:
                break
        assert seen == worker_pids, (seen, worker_pids)

        killed = workers[0]
        killed.kill()
        assert _enhance(url) == 200  # the other worker serves meanwhile
        ends_at = time.monotonic() + 30
        while time.monotonic() < ends_at:
            current = [child for child in psutil.Process(process.pid).children()
                       if "--listen-fd" in " ".join(child.cmdline())]
            if len(current) == 2 and killed.pid not in {child.pid for child in current}:
                break
            gevent.sleep(0.2)
        else:
            raise AssertionError("the killed worker was not restarted")
        assert _enhance(url) == 200

        everything = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        _gone, alive = psutil.wait_procs(everything, timeout=10)
        assert not alive, [child.cmdline() for child in alive]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
