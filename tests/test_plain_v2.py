"""The gateway against a v2 server that offers only what the protocol promises.

The fake here takes JSON tensors only (a binary request is a 400, as from a server without
Triton's extension), lists no extensions in ``GET /v2``, publishes model metadata without
``parameters`` (no scale, tile size, timeouts) and without tensors, answers errors as FastAPI
does (``{"detail": ...}``), gives the detector's scores as [N, 1], and says readiness with
``{"ready": ...}``. The gateway must still enhance photos: JSON both ways, defaults where the
metadata is silent.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from gevent.pywsgi import WSGIServer
from PIL import Image

from chaoqing.config import Config, JobSettings, Preset, RemoteSettings
from chaoqing.errors import ModelServerError
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer
from chaoqing.protocol.listen import bound_port, create_listener

pytestmark = pytest.mark.timeout(60)

UPSCALER, FACE_MODEL, DETECTOR = "plain-upscaler", "plain-face", "plain-detector"
SCALE = 4
FACE_BOX = [10.0, 10.0, 40.0, 40.0]
FACE_LANDMARKS = [[18.0, 20.0], [32.0, 20.0], [25.0, 27.0], [19.0, 33.0], [31.0, 33.0]]


class PlainV2Server:
    """JSON-only v2 models: two nearest-neighbour ×4 upscalers and a detector of one face."""

    def __init__(self) -> None:
        self.infer_calls = 0
        self.ready = True
        self._listener = create_listener("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{bound_port(self._listener)}"
        self._server = WSGIServer(self._listener, self._app, log=None, error_log=None)
        self._server.start()

    def stop(self) -> None:
        self._server.stop(timeout=0.1)

    @staticmethod
    def _json(start_response: Any, status: str, payload: Any) -> list[bytes]:
        body = json.dumps(payload).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        path: str = environ["PATH_INFO"]
        models = (UPSCALER, FACE_MODEL, DETECTOR)
        if path == "/v2":
            return self._json(start_response, "200 OK", {"name": "plain", "version": "0", "extensions": []})
        name = path.split("/")[3] if path.startswith("/v2/models/") else ""
        if name not in models:
            return self._json(start_response, "404 Not Found", {"detail": "no such model"})
        if path.endswith("/ready"):
            return self._json(start_response, "200 OK", {"name": name, "ready": self.ready})
        if path == f"/v2/models/{name}":
            return self._json(start_response, "200 OK", {"name": name, "versions": [], "platform": ""})
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if "HTTP_INFERENCE_HEADER_CONTENT_LENGTH" in environ:
            return self._json(start_response, "400 Bad Request", {"detail": "the body is not JSON"})
        try:
            request = json.loads(body)
        except ValueError:
            return self._json(start_response, "400 Bad Request", {"detail": "the body is not JSON"})
        self.infer_calls += 1
        tensor = request["inputs"][0]
        image = np.asarray(tensor["data"], dtype=np.uint8).reshape(tensor["shape"])
        if name == DETECTOR:
            outputs = [
                {"name": "boxes", "datatype": "FP32", "shape": [1, 4], "data": FACE_BOX},
                {"name": "scores", "datatype": "FP32", "shape": [1, 1], "data": [0.9]},
                {"name": "landmarks", "datatype": "FP32", "shape": [1, 5, 2],
                 "data": [value for point in FACE_LANDMARKS for value in point]},
            ]
        else:
            upscaled = image.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
            outputs = [{"name": "image", "datatype": "UINT8", "shape": list(upscaled.shape),
                        "data": upscaled.reshape(-1).tolist(), "parameters": {"content_type": "np"}}]
        return self._json(start_response, "200 OK", {"model_name": name, "outputs": outputs})


@pytest.fixture
def plain_server() -> Iterator[PlainV2Server]:
    server = PlainV2Server()
    yield server
    server.stop()


@pytest.fixture
def gateway(plain_server: PlainV2Server, tmp_path: Any) -> Iterator[GatewayServer]:
    preset = Preset("plain", UPSCALER, FACE_MODEL, "plain v2 models")
    config = Config(port=0, detector=DETECTOR, presets={"plain": preset}, preset="plain",
                    endpoints={name: (plain_server.url,) for name in (UPSCALER, FACE_MODEL, DETECTOR)},
                    jobs=JobSettings(spool_dir=str(tmp_path / "spool")), remote=RemoteSettings(health_interval_s=0.2))
    server = GatewayServer(config, RemoteModels.from_config(config, GatewayMetrics()), watch_hub=False)
    server.start()
    yield server
    server.stop(grace_s=1.0)


def _photo(width: int = 64, height: int = 48) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_gateway_enhances_through_a_plain_json_only_v2_server(
    gateway: GatewayServer, plain_server: PlainV2Server
) -> None:
    response = requests.post(f"{gateway.url}/v1/enhance?scale=2", data=_photo(),
                             headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (128, 96)
    assert response.headers["X-Faces-Detected"] == "1" and response.headers["X-Faces-Enhanced"] == "1"
    assert plain_server.infer_calls == 3  # background, detector, one face: none refused as binary
    assert all(endpoint.tensor_encoding == "json" for name in (UPSCALER, FACE_MODEL, DETECTOR)
               for endpoint in gateway.remotes[name].endpoints)


def test_binary_forced_on_a_json_only_server_fails_with_its_own_words(plain_server: PlainV2Server) -> None:
    remote = RemoteModels({UPSCALER: [plain_server.url]}, RemoteSettings(tensor_encoding="binary"))[UPSCALER]
    image = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ModelServerError, match="the body is not JSON") as caught:
        remote.infer({"image": image}, ["image"], time.monotonic() + 10)
    assert caught.value.status == 400


def test_a_200_that_says_not_ready_is_not_ready(plain_server: PlainV2Server) -> None:
    remote = RemoteModels({UPSCALER: [plain_server.url]}, RemoteSettings())[UPSCALER]
    assert remote.check_health() == {plain_server.url: True}
    plain_server.ready = False
    assert remote.check_health() == {plain_server.url: False}
