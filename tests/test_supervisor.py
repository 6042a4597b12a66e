"""The embedded model servers of ``chaoqing serve``: what each child is started with."""

from __future__ import annotations

import time

import psutil
import pytest
import requests

from chaoqing.config import ModelServerSettings
from chaoqing.gateway.supervisor import ModelServerSupervisor

pytestmark = pytest.mark.timeout(120)

READY_TIMEOUT_S = 60.0


def _option_values(command: list[str]) -> list[str]:
    return [command[index + 1] for index, argument in enumerate(command) if argument == "--model-option"]


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.05)


def test_only_simulators_get_the_sim_settings() -> None:
    settings = ModelServerSettings(threads=1, sim_latency_ms=7.0, sim_faces=3)
    supervisor = ModelServerSupervisor(["face-detector", "sim-detector"], settings, log_level="error")
    supervisor.start()
    try:
        commands = {model: psutil.Process(pid).cmdline() for model, pid in supervisor.pids().items()}
        simulator_url = supervisor.endpoints["sim-detector"][0]
        _wait_ready(simulator_url)
        metadata = requests.get(f"{simulator_url}/v2/models/sim-detector", timeout=5).json()
    finally:
        supervisor.stop(grace_s=5.0)
    assert _option_values(commands["face-detector"]) == [], commands["face-detector"]
    assert not any(argument.startswith("--sim") for argument in commands["face-detector"])
    assert _option_values(commands["sim-detector"]) == ["latency_ms=7.0", "faces=3"]
    assert metadata["parameters"]["faces"] == 3, "the option reached the simulator"
