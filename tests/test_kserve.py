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

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from skimage import data
from third_party import (
    FACE_CROP,
    UPSCALER,
    enhance,
    free_port,
    gateway_starter,
    max_difference,
    portrait,
    v2_server_process,
    wide_photo,
)

from chaoqing.config import CENTERFACE
from chaoqing.gateway.server import GatewayServer
from chaoqing.protocol import v2

pytest.importorskip("kserve")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DETECTOR = CENTERFACE


@pytest.fixture(scope="module")
def kserve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("kserve")
    http_port = free_port()
    command = [sys.executable, "-m", "chaoqing.interop.kserve_model", "--model", UPSCALER, "--model", DETECTOR,
               "--http-port", str(http_port), "--threads", "2"]
    with v2_server_process("kserve", command, folder, folder / "kserve.log", f"http://127.0.0.1:{http_port}") as url:
        yield url


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayServer]]:
    yield from gateway_starter(tmp_path, DETECTOR)


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
    photo = portrait()
    via_kserve = start_gateway(kserve_url)
    via_own = start_gateway(own.url)  # type: ignore[attr-defined]
    image_kserve, response_kserve = enhance(via_kserve, photo)
    image_own, response_own = enhance(via_own, photo)

    assert via_kserve.remotes[UPSCALER].endpoints[0].tensor_encoding == "binary"
    assert image_kserve.shape == image_own.shape == (400, 400, 3)
    for response in (response_kserve, response_own):
        assert response.headers["X-Faces-Detected"] == "1" and response.headers["X-Faces-Enhanced"] == "1"
    assert max_difference(image_kserve, image_own) <= 1
    # and the same over JSON: KServe's REST side takes plain v2 too
    image_json, _ = enhance(start_gateway(kserve_url, tensor_encoding="json"), photo)
    assert max_difference(image_json, image_own) <= 1


def test_the_gateway_tiles_through_kserve_as_through_its_own_server(
    kserve_url: str, start_model_server: Callable[..., object], start_gateway: Callable[..., GatewayServer]
) -> None:
    """A photo over the compact model's published tile size (276): tiles with context and the
    optional edge_padding input, which KServe passes on like any other input."""
    own = start_model_server([UPSCALER, DETECTOR], threads=2)
    wide = wide_photo()
    image_kserve, _ = enhance(start_gateway(kserve_url), wide, scale=1.5)
    image_own, _ = enhance(start_gateway(own.url), wide, scale=1.5)  # type: ignore[attr-defined]
    assert image_kserve.shape == image_own.shape == (480, 480, 3)
    assert max_difference(image_kserve, image_own) <= 1


def test_the_launcher_refuses_settings_it_does_not_know() -> None:
    from chaoqing.errors import RunnerError
    from chaoqing.interop.hosted import build_runner
    from chaoqing.interop.kserve_model import main

    with pytest.raises(RunnerError, match="unknown setting"):
        build_runner("sim-face", {"thread": 2})
    with pytest.raises(SystemExit):  # argparse: --option NAME must be a runner setting
        main(["--model", "sim-face", "--http-port", "1", "--option", "colour=red"])
