"""Interop with a KServe v2 server chaoqing did not write: Seldon MLServer (``chaoqing[mlserver]``).

A real ``mlserver start`` subprocess on 127.0.0.1 serves the compact upscaler and the face
detector through :class:`chaoqing.interop.mlserver_model.ChaoqingModel`. Its REST side has no
binary tensor extension and lists no extensions, so the gateway talks JSON to it. The gateway
against it must give the same photo as the gateway against chaoqing's own model server with
the same models (within 1/255: both run the same ncnn network on the same pixels).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from third_party import (
    UPSCALER,
    enhance,
    free_port,
    gateway_starter,
    max_difference,
    portrait,
    v2_server_process,
    wide_photo,
)

from chaoqing.gateway.server import GatewayServer

pytest.importorskip("mlserver")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DETECTOR = "face-detector"


def _mlserver_command() -> list[str]:
    script = Path(sys.executable).with_name("mlserver")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlserver.cli.main"]


@pytest.fixture(scope="module")
def mlserver_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from chaoqing.interop.mlserver_model import write_repository

    repository = tmp_path_factory.mktemp("mlserver")
    http_port = free_port()
    write_repository(repository, [UPSCALER, DETECTOR], http_port=http_port, grpc_port=free_port(),
                     metrics_port=free_port(), runner={"threads": 2})
    with v2_server_process("mlserver", [*_mlserver_command(), "start", str(repository)], repository,
                           repository / "mlserver.log", f"http://127.0.0.1:{http_port}") as url:
        yield url


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayServer]]:
    yield from gateway_starter(tmp_path, DETECTOR)


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
    photo = portrait()
    via_mlserver = start_gateway(mlserver_url)
    via_own = start_gateway(own.url)  # type: ignore[attr-defined]
    image_mlserver, response_mlserver = enhance(via_mlserver, photo)
    image_own, response_own = enhance(via_own, photo)

    assert via_mlserver.remotes[UPSCALER].endpoints[0].tensor_encoding == "json"
    assert via_own.remotes[UPSCALER].endpoints[0].tensor_encoding == "binary"
    assert image_mlserver.shape == image_own.shape == (400, 400, 3)
    for response in (response_mlserver, response_own):
        assert response.headers["X-Faces-Detected"] == "1" and response.headers["X-Faces-Enhanced"] == "1"
    assert max_difference(image_mlserver, image_own) <= 1


def test_the_gateway_tiles_through_mlserver_as_through_its_own_server(
    mlserver_url: str, start_model_server: Callable[..., object], start_gateway: Callable[..., GatewayServer]
) -> None:
    """A photo over the compact model's published tile size (276): tiles with context and the
    optional edge_padding input, over JSON."""
    own = start_model_server([UPSCALER, DETECTOR], threads=2)
    wide = wide_photo()
    image_mlserver, _ = enhance(start_gateway(mlserver_url), wide, scale=1.5)
    image_own, _ = enhance(start_gateway(own.url), wide, scale=1.5)  # type: ignore[attr-defined]
    assert image_mlserver.shape == image_own.shape == (480, 480, 3)
    assert max_difference(image_mlserver, image_own) <= 1
