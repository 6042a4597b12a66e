"""The model server with the bundled models: the CLI starts fast, and any v2 client
(tritonclient here) gets the same tensors as chaoqing's own client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from skimage import data

from chaoqing.config import RemoteSettings
from chaoqing.gateway.remote import RemoteModel
from chaoqing.modelserver.app import ModelServer
from chaoqing.modelserver.runners import RunnerSettings, create_runner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_cli_model_server_is_ready_within_10_seconds() -> None:
    command = [sys.executable, "-m", "chaoqing", "model-server", "--model", "realesr-animevideov3-x4",
               "--model", "face-detector", "--port", "0", "--threads", "2"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        ready_after = None
        while time.monotonic() - started < 30:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    ready_after = time.monotonic() - started
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or busy importing the runtimes on a loaded machine
            time.sleep(0.1)
        assert ready_after is not None and ready_after < 10, f"ready after {ready_after} s"
        models = {name: requests.get(f"{url}/v2/models/{name}", timeout=5).json() for name in ("realesr-animevideov3-x4", "face-detector")}
        assert models["realesr-animevideov3-x4"]["parameters"]["scale"] == 4
        assert models["face-detector"]["outputs"][2]["shape"] == [-1, 5, 2]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0


def test_cli_model_server_on_openvino_is_ready_and_matches_ncnn(tmp_path: Path) -> None:
    """--runtime openvino: the ONNX form is built at first use (into the cache folder), then
    the same contract answers with ncnn's pixels to within 1/255."""
    command = [sys.executable, "-m", "chaoqing", "model-server", "--model", "realesr-animevideov3-x4",
               "--runtime", "openvino", "--port", "0", "--threads", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "CHAOQING_CACHE_DIR": str(tmp_path)})
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        ends_at = time.monotonic() + 60
        while requests.get(f"{url}/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < ends_at, "not ready within 60 s"
            time.sleep(0.1)
        metadata = requests.get(f"{url}/v2/models/realesr-animevideov3-x4", timeout=5).json()
        assert metadata["platform"] == "openvino" and metadata["parameters"]["runtime"] == "openvino"
        assert list(tmp_path.rglob("*.onnx")), "the converted model is cached where CHAOQING_CACHE_DIR says"
        crop = np.ascontiguousarray(data.astronaut()[40:104, 160:224])
        remote = RemoteModel("realesr-animevideov3-x4", [url], RemoteSettings())
        served = remote.infer({"image": crop[None]}, ["image"], time.monotonic() + 60)["image"]
        remote.close()
        reference = create_runner("realesr-animevideov3-x4", RunnerSettings(threads=2)).run({"image": crop[None]})["image"]
        assert np.abs(served.astype(np.int16) - reference.astype(np.int16)).max() <= 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0


def test_tritonclient_and_own_client_get_the_same_tensors(start_model_server) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.http as triton

    server: ModelServer = start_model_server(["realesr-animevideov3-x4", "face-detector"], threads=2)
    astronaut = data.astronaut()
    crop = np.ascontiguousarray(astronaut[40:104, 160:224])  # the face, 64×64
    host_port = server.url.removeprefix("http://")
    client = triton.InferenceServerClient(url=host_port, connection_timeout=30, network_timeout=120)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("realesr-animevideov3-x4")
    metadata = client.get_model_metadata("realesr-animevideov3-x4")
    assert metadata["inputs"][0]["shape"] == [-1, -1, -1, 3]

    image_input = triton.InferInput("image", [1, 64, 64, 3], "UINT8")
    image_input.set_data_from_numpy(crop[None], binary_data=True)
    result = client.infer(
        "realesr-animevideov3-x4", [image_input], outputs=[triton.InferRequestedOutput("image", binary_data=True)]
    )
    triton_output = result.as_numpy("image")

    own = RemoteModel("realesr-animevideov3-x4", [server.url], RemoteSettings())
    own_output = own.infer({"image": crop[None]}, ["image"], time.monotonic() + 60)["image"]
    assert triton_output.shape == (1, 256, 256, 3)
    np.testing.assert_array_equal(triton_output, own_output)

    # JSON tensors through tritonclient too (binary_data=False both ways)
    small = np.ascontiguousarray(crop[:8, :8])
    json_input = triton.InferInput("image", [1, 8, 8, 3], "UINT8")
    json_input.set_data_from_numpy(small[None], binary_data=False)
    json_result = client.infer(
        "realesr-animevideov3-x4", [json_input], outputs=[triton.InferRequestedOutput("image", binary_data=False)]
    )
    own_small = own.infer({"image": small[None]}, ["image"], time.monotonic() + 60)["image"]
    np.testing.assert_array_equal(json_result.as_numpy("image"), own_small)

    # the detector: three outputs, mixed binary and JSON
    detector_input = triton.InferInput("image", list(astronaut.shape), "UINT8")
    detector_input.set_data_from_numpy(astronaut, binary_data=True)
    detection = client.infer(
        "face-detector",
        [detector_input],
        outputs=[
            triton.InferRequestedOutput("boxes", binary_data=True),
            triton.InferRequestedOutput("scores", binary_data=False),
            triton.InferRequestedOutput("landmarks", binary_data=True),
        ],
    )
    own_detector = RemoteModel("face-detector", [server.url], RemoteSettings())
    own_detection = own_detector.infer({"image": astronaut}, ["boxes", "scores", "landmarks"], time.monotonic() + 60)
    for name in ("boxes", "scores", "landmarks"):
        np.testing.assert_array_equal(detection.as_numpy(name), own_detection[name])
    assert detection.as_numpy("boxes").shape == (1, 4)
    client.close()
    own.close()
    own_detector.close()

