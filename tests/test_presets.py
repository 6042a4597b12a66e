"""Presets defined in TOML are first-class: ``?preset=``, ``--preset`` on enhance (local and
``--server``) and on serve; an unknown name is refused with the names there are."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import SIM_PRESETS, run_cli
from PIL import Image

from chaoqing.config import Config, Preset
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer

pytestmark = pytest.mark.timeout(120)

CUSTOM = Preset("upscale-only", "sim-upscale-x4", None, "a preset only this config defines")


def _png(width: int = 48, height: int = 32) -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def custom_gateway(start_model_server: Callable[..., Any]) -> Iterator[GatewayServer]:
    upscaler = start_model_server(["sim-upscale-x4"], sim_latency_ms=5)
    config = Config(port=0, presets={**SIM_PRESETS, CUSTOM.name: CUSTOM}, preset="fast",
                    endpoints={"sim-upscale-x4": (upscaler.url,)})
    metrics = GatewayMetrics()
    server = GatewayServer(config, RemoteModels.from_config(config, metrics), metrics=metrics, watch_hub=False)
    server.start()
    yield server
    server.stop(grace_s=1.0)


def test_a_custom_preset_is_chosen_by_query(custom_gateway: GatewayServer) -> None:
    response = requests.post(f"{custom_gateway.url}/v1/enhance?preset={CUSTOM.name}&scale=2", data=_png(),
                             headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["X-Output-Size"] == "96x64"
    assert custom_gateway.metrics.sample(
        "chaoqing_requests_total", {"route": "/v1/enhance", "status": "200", "preset": CUSTOM.name}) == 1
    unknown = requests.post(f"{custom_gateway.url}/v1/enhance?preset=nope", data=_png(),
                            headers={"Content-Type": "image/png"}, timeout=30)
    assert unknown.status_code == 400 and CUSTOM.name in unknown.json()["error"]["message"]


def test_enhance_takes_a_preset_only_the_server_knows(custom_gateway: GatewayServer, tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(_png())
    completed = run_cli("enhance", str(photo), "-o", str(tmp_path / "out"), "--server", custom_gateway.url,
                        "--preset", CUSTOM.name, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert f"with preset {CUSTOM.name}" in completed.stderr
    with Image.open(tmp_path / "out" / "a.png") as image:
        assert image.size == (96, 64)


def test_enhance_runs_a_preset_of_its_config_on_embedded_model_servers(tmp_path: Path) -> None:
    config = tmp_path / "chaoqing.toml"
    config.write_text(f'[presets.{CUSTOM.name}]\nupscaler = "sim-upscale-x4"\nface_model = ""\n')
    photo = tmp_path / "a.png"
    photo.write_bytes(_png())
    completed = run_cli("enhance", str(photo), "-o", str(tmp_path / "out"), "--config", str(config),
                        "--preset", CUSTOM.name, timeout=100)
    assert completed.returncode == 0, completed.stderr
    with Image.open(tmp_path / "out" / "a.png") as image:
        assert image.size == (96, 64)


@pytest.mark.parametrize("command", ["enhance", "serve"])
def test_an_unknown_preset_is_refused_with_the_names_there_are(command: str, tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(_png())
    arguments = [command, str(photo)] if command == "enhance" else [command, "--port", "0"]
    completed = run_cli(*arguments, "--preset", "nope", timeout=30)
    assert completed.returncode == 2, completed.stderr
    assert "'nope' is not one of fast, balanced, quality" in completed.stderr
    assert "Traceback" not in completed.stderr
