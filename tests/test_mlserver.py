"""Interop with a KServe v2 server chaoqing did not write: Seldon MLServer (``chaoqing[mlserver]``).

A real ``mlserver start`` subprocess on 127.0.0.1 serves the compact upscaler and the face
detector through :class:`chaoqing.interop.mlserver_model.ChaoqingModel`. Its REST side has no
binary tensor extension and lists no extensions, so the gateway talks JSON to it. The gateway
against it must give the same photo as the gateway against chaoqing's own model server with
the same models (within 1/255: both run the same ncnn network on the same pixels).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data

from chaoqing.config import Config, JobSettings, Preset, RemoteSettings
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer

pytest.importorskip("mlserver")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

UPSCALER = "realesr-animevideov3-x4"
DETECTOR = "face-detector"
# the compact model enhances the faces too: quick on 2 cores, and the face path (detection,
# metadata scale, crops, pastes) is exercised against MLServer all the same
INTEROP_PRESET = Preset("interop", UPSCALER, UPSCALER, "compact model for background and faces")
START_TIMEOUT_S = 120.0
FACE_CROP = (slice(20, 236), slice(92, 308))  # rows, columns of astronaut(): her face


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _mlserver_command() -> list[str]:
    script = Path(sys.executable).with_name("mlserver")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlserver.cli.main"]


@pytest.fixture(scope="module")
def mlserver_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from chaoqing.interop.mlserver_model import write_repository

    repository = tmp_path_factory.mktemp("mlserver")
    http_port = _free_port()
    write_repository(repository, [UPSCALER, DETECTOR], http_port=http_port, grpc_port=_free_port(),
                     metrics_port=_free_port(), runner={"threads": 2})
    log_path = repository / "mlserver.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([*_mlserver_command(), "start", str(repository)], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=repository, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        ends_at = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"mlserver exited: {log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < ends_at, f"mlserver not ready: {log_path.read_text()[-3000:]}"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayServer]]:
    servers: list[GatewayServer] = []

    def start(url: str, **remote: object) -> GatewayServer:
        config = Config(
            port=0, detector=DETECTOR, presets={"interop": INTEROP_PRESET}, preset="interop",
            endpoints={UPSCALER: (url,), DETECTOR: (url,)}, remote=RemoteSettings(**remote),  # type: ignore[arg-type]
            jobs=JobSettings(spool_dir=str(tmp_path / f"spool-{len(servers)}")),
        )
        server = GatewayServer(config, RemoteModels.from_config(config, GatewayMetrics()), watch_hub=False)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=1.0)


def _photo() -> bytes:
    """The astronaut's face and shoulders at 200×200 (one face): the background in one tile."""
    portrait = Image.fromarray(data.astronaut()[FACE_CROP]).resize((200, 200), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    portrait.save(buffer, "PNG")
    return buffer.getvalue()


def _enhance(server: GatewayServer, photo: bytes, scale: float = 2.0) -> tuple[np.ndarray, requests.Response]:
    response = requests.post(f"{server.url}/v1/enhance?scale={scale}", data=photo,
                             headers={"Content-Type": "image/png"}, timeout=240)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")), response


def test_mlserver_says_what_a_plain_v2_server_says(mlserver_url: str) -> None:
    server_metadata = requests.get(f"{mlserver_url}/v2", timeout=10).json()
    assert server_metadata["name"] == "mlserver" and "binary_tensor_data" not in server_metadata["extensions"]
    metadata = requests.get(f"{mlserver_url}/v2/models/{UPSCALER}", timeout=10).json()
    assert metadata["parameters"]["scale"] == 4 and metadata["inputs"][0]["name"] == "image"
    # a malformed call is the client's fault, said as MLServer says it
    bad = requests.post(f"{mlserver_url}/v2/models/{UPSCALER}/infer", timeout=10, json={
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [0.0] * 12}]})
    assert bad.status_code == 400 and "UINT8" in json.dumps(bad.json())


def test_the_gateway_gets_the_same_photo_from_mlserver_as_from_its_own_model_server(
    mlserver_url: str, start_model_server: Callable[..., object], start_gateway: Callable[..., GatewayServer]
) -> None:
    own = start_model_server([UPSCALER, DETECTOR], threads=2)
    photo = _photo()
    via_mlserver = start_gateway(mlserver_url)
    via_own = start_gateway(own.url)  # type: ignore[attr-defined]
    image_mlserver, response_mlserver = _enhance(via_mlserver, photo)
    image_own, response_own = _enhance(via_own, photo)

    assert via_mlserver.remotes[UPSCALER].endpoints[0].tensor_encoding == "json"
    assert via_own.remotes[UPSCALER].endpoints[0].tensor_encoding == "binary"
    assert image_mlserver.shape == image_own.shape == (400, 400, 3)
    for response in (response_mlserver, response_own):
        assert response.headers["X-Faces-Detected"] == "1" and response.headers["X-Faces-Enhanced"] == "1"
    difference = np.abs(image_mlserver.astype(np.int16) - image_own.astype(np.int16))
    assert difference.max() <= 1, f"max difference {difference.max()} levels"


def test_the_gateway_tiles_through_mlserver_as_through_its_own_server(
    mlserver_url: str, start_model_server: Callable[..., object], start_gateway: Callable[..., GatewayServer]
) -> None:
    """A photo over the compact model's published tile size (276): tiles with context and the
    optional edge_padding input, over JSON."""
    own = start_model_server([UPSCALER, DETECTOR], threads=2)
    wide = Image.fromarray(data.astronaut()).resize((320, 320), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    wide.save(buffer, "PNG")
    image_mlserver, _ = _enhance(start_gateway(mlserver_url), buffer.getvalue(), scale=1.5)
    image_own, _ = _enhance(start_gateway(own.url), buffer.getvalue(), scale=1.5)  # type: ignore[attr-defined]
    assert image_mlserver.shape == image_own.shape == (480, 480, 3)
    difference = np.abs(image_mlserver.astype(np.int16) - image_own.astype(np.int16))
    assert difference.max() <= 1, f"max difference {difference.max()} levels"
