"""Interop with a KServe v2 server chaoqing did not write: KServe's Python model server
(``chaoqing[kserve]``, in the test extra: it installs beside Ray Serve, which MLServer does not).

A real ``python -m chaoqing.interop.kserve_model`` subprocess (KServe's ``ModelServer``, uvicorn,
FastAPI) on 127.0.0.1 serves the compact upscaler and CenterFace, the default detector, through
:class:`chaoqing.interop.kserve_model.ChaoqingKServeModel`. Its REST side speaks the binary
tensor extension, which the launcher lists in ``GET /v2``, so the gateway's "auto" encoding
goes binary. The gateway against it must give the same photo as the gateway against chaoqing's
own model server with the same models (within 1/255: both run the same networks on the same
pixels), and JSON to the same KServe server must too.
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

from chaoqing.config import CENTERFACE, Config, JobSettings, Preset, RemoteSettings
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.protocol import v2

pytest.importorskip("kserve")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

UPSCALER = "realesr-animevideov3-x4"
DETECTOR = CENTERFACE
# the compact model enhances the faces too: quick on 2 cores, and the face path (detection,
# metadata scale, crops, pastes) is exercised against KServe all the same
INTEROP_PRESET = Preset("interop", UPSCALER, UPSCALER, "compact model for background and faces")
START_TIMEOUT_S = 120.0
FACE_CROP = (slice(20, 236), slice(92, 308))  # rows, columns of astronaut(): her face


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def kserve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("kserve")
    http_port = _free_port()
    log_path = folder / "kserve.log"
    command = [sys.executable, "-m", "chaoqing.interop.kserve_model", "--model", UPSCALER, "--model", DETECTOR,
               "--http-port", str(http_port), "--threads", "2"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        ends_at = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"kserve exited: {log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < ends_at, f"kserve not ready: {log_path.read_text()[-3000:]}"
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


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _portrait() -> bytes:
    """The astronaut's face and shoulders at 200×200 (one face): the background in one tile."""
    return _png(Image.fromarray(data.astronaut()[FACE_CROP]).resize((200, 200), Image.Resampling.LANCZOS))


def _enhance(server: GatewayServer, photo: bytes, scale: float = 2.0) -> tuple[np.ndarray, requests.Response]:
    response = requests.post(f"{server.url}/v1/enhance?scale={scale}", data=photo,
                             headers={"Content-Type": "image/png"}, timeout=240)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")), response


def _max_difference(first: np.ndarray, second: np.ndarray) -> int:
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


def test_kserve_answers_the_v2_routes_the_gateway_uses(kserve_url: str) -> None:
    server_metadata = requests.get(f"{kserve_url}/v2", timeout=10).json()
    assert server_metadata["name"] == "kserve" and "binary_tensor_data" in server_metadata["extensions"]
    metadata = requests.get(f"{kserve_url}/v2/models/{UPSCALER}", timeout=10).json()
    assert metadata["parameters"]["scale"] == 4 and metadata["inputs"][0]["name"] == "image"
    assert requests.get(f"{kserve_url}/v2/models/{DETECTOR}/ready", timeout=10).status_code == 200
    # a malformed call is the client's fault, said as KServe says it
    bad = requests.post(f"{kserve_url}/v2/models/{UPSCALER}/infer", timeout=10, json={
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [0.0] * 12}]})
    assert bad.status_code == 400 and "UINT8" in json.dumps(bad.json())
    # binary both ways, as Triton's extension says: the detector's three outputs come back raw
    photo = np.ascontiguousarray(data.astronaut()[FACE_CROP])
    message = v2.encode_infer_request({"image": photo}, ["boxes", "scores", "landmarks"])
    answer = requests.post(f"{kserve_url}/v2/models/{DETECTOR}/infer", data=message.join(),
                           headers=message.http_headers(), timeout=60)
    assert answer.status_code == 200, answer.text
    length = answer.headers.get(v2.HEADER_LENGTH_HEADER)
    assert length is not None and int(length) < len(answer.content)
    outputs = v2.decode_infer_response(answer.content, int(length))
    assert outputs["boxes"].shape == (1, 4) and outputs["scores"].shape == (1,)
    assert outputs["landmarks"].shape == (1, 5, 2)


def test_the_gateway_gets_the_same_photo_from_kserve_as_from_its_own_model_server(
    kserve_url: str, start_model_server: Callable[..., object], start_gateway: Callable[..., GatewayServer]
) -> None:
    own = start_model_server([UPSCALER, DETECTOR], threads=2)
    photo = _portrait()
    via_kserve = start_gateway(kserve_url)
    via_own = start_gateway(own.url)  # type: ignore[attr-defined]
    image_kserve, response_kserve = _enhance(via_kserve, photo)
    image_own, response_own = _enhance(via_own, photo)

    assert via_kserve.remotes[UPSCALER].endpoints[0].tensor_encoding == "binary"
    assert image_kserve.shape == image_own.shape == (400, 400, 3)
    for response in (response_kserve, response_own):
        assert response.headers["X-Faces-Detected"] == "1" and response.headers["X-Faces-Enhanced"] == "1"
    assert _max_difference(image_kserve, image_own) <= 1
    # and the same over JSON: KServe's REST side takes plain v2 too
    image_json, _ = _enhance(start_gateway(kserve_url, tensor_encoding="json"), photo)
    assert _max_difference(image_json, image_own) <= 1


def test_the_gateway_tiles_through_kserve_as_through_its_own_server(
    kserve_url: str, start_model_server: Callable[..., object], start_gateway: Callable[..., GatewayServer]
) -> None:
    """A photo over the compact model's published tile size (276): tiles with context and the
    optional edge_padding input, which KServe passes on like any other input."""
    own = start_model_server([UPSCALER, DETECTOR], threads=2)
    wide = _png(Image.fromarray(data.astronaut()).resize((320, 320), Image.Resampling.LANCZOS))
    image_kserve, _ = _enhance(start_gateway(kserve_url), wide, scale=1.5)
    image_own, _ = _enhance(start_gateway(own.url), wide, scale=1.5)  # type: ignore[attr-defined]
    assert image_kserve.shape == image_own.shape == (480, 480, 3)
    assert _max_difference(image_kserve, image_own) <= 1


def test_the_launcher_refuses_settings_it_does_not_know() -> None:
    from chaoqing.errors import RunnerError
    from chaoqing.interop.hosted import build_runner
    from chaoqing.interop.kserve_model import main

    with pytest.raises(RunnerError, match="unknown setting"):
        build_runner("sim-face", {"thread": 2})
    with pytest.raises(SystemExit):  # argparse: --option NAME must be a runner setting
        main(["--model", "sim-face", "--http-port", "1", "--option", "colour=red"])
