"""The model server over real HTTP: routes, binary tensors, malformed requests, batching,
overload, and a server that stays responsive while a model computes."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

import gevent
import numpy as np
import pytest
import requests
from conftest import eventually

from chaoqing.config import RemoteSettings
from chaoqing.errors import InvalidTensorRequest, ModelServerError, ModelUnavailable, RunnerError
from chaoqing.gateway.remote import RemoteModel
from chaoqing.modelserver.app import ModelServer, ModelServerOptions, validate_inputs
from chaoqing.modelserver.runners import RunnerSettings, create_runner
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec
from chaoqing.protocol import v2

pytestmark = pytest.mark.timeout(60)

StartServer = Callable[..., ModelServer]


def _image(height: int, width: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def _post_infer(server: ModelServer, model: str, body: bytes, headers: Mapping[str, str]) -> requests.Response:
    return requests.post(f"{server.url}/v2/models/{model}/infer", data=body, headers=dict(headers), timeout=10)


def test_health_metadata_and_model_metadata(start_model_server: StartServer) -> None:
    server = start_model_server(["sim-upscale-x2", "sim-detector"], sim_latency_ms=1)
    assert requests.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
    metadata = requests.get(f"{server.url}/v2", timeout=5).json()
    assert "binary_tensor_data" in metadata["extensions"]
    model = requests.get(f"{server.url}/v2/models/sim-upscale-x2", timeout=5).json()
    assert model["name"] == "sim-upscale-x2"
    assert model["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert model["outputs"][0]["name"] == "image"
    assert model["parameters"]["scale"] == 2
    assert requests.get(f"{server.url}/v2/models/sim-upscale-x2/ready", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/v2/models/sim-upscale-x2/versions/1", timeout=5).status_code == 200
    detector = requests.get(f"{server.url}/v2/models/sim-detector", timeout=5).json()
    assert {item["name"] for item in detector["outputs"]} == {"boxes", "scores", "landmarks"}
    unknown = requests.get(f"{server.url}/v2/models/nope", timeout=5)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


def test_own_client_gets_binary_tensors_back(start_model_server: StartServer) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1)
    remote = RemoteModel("sim-upscale-x2", [server.url], RemoteSettings())
    image = _image(5, 7)
    output = remote.infer({"image": image}, ["image"], time.monotonic() + 10)["image"]
    assert output.shape == (1, 10, 14, 3)
    np.testing.assert_array_equal(output, image.repeat(2, axis=1).repeat(2, axis=2))
    assert remote.metadata().scale == 2
    remote.close()


def test_json_tensors_both_ways(start_model_server: StartServer) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1)
    image = _image(2, 3)
    message = v2.encode_infer_request({"image": image}, ["image"], binary_inputs=False, binary_outputs=False)
    response = _post_infer(server, "sim-upscale-x2", message.join(), message.http_headers())
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    output = response.json()["outputs"][0]
    assert output["shape"] == [1, 4, 6, 3] and output["datatype"] == "UINT8"
    np.testing.assert_array_equal(np.array(output["data"], np.uint8).reshape(output["shape"]), image.repeat(2, 1).repeat(2, 2))


def _raw_exchange(server: ModelServer, payload: bytes, shut_write: bool = True) -> tuple[int, dict[str, object]]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(payload)
        if shut_write:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def _good_message() -> v2.EncodedMessage:
    return v2.encode_infer_request({"image": _image(4, 4)}, ["image"])


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(start_model_server: StartServer) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1, max_request_bytes=10_000_000)
    url_path = "/v2/models/sim-upscale-x2/infer"
    good = _good_message()
    body = good.join()
    header_length = good.header_length
    assert header_length is not None

    def request_bytes(path: str, body: bytes, content_length: int, header_claim: int | None) -> bytes:
        lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {content_length}", "Connection: close"]
        if header_claim is not None:
            lines.append(f"Inference-Header-Content-Length: {header_claim}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    cases = {
        "truncated binary body": request_bytes(url_path, body[:-10], len(body), header_length),
        "1 GB header-length claim": request_bytes(url_path, body, len(body), 1 << 30),
        "non-JSON header": request_bytes(url_path, b"\x00garbage" + body, len(body) + 8, header_length + 8),
        "unknown model": request_bytes("/v2/models/nope/infer", body, len(body), header_length),
        "body over the byte limit": request_bytes(url_path, b"", 50_000_000, 10),
    }
    # a binary_data_size that lies, a datatype mismatch, a shape mismatch, an empty image
    lying = json.loads(body[:header_length])
    lying["inputs"][0]["parameters"]["binary_data_size"] = 10
    lying_header = json.dumps(lying).encode()
    cases["binary_data_size lies"] = request_bytes(url_path, lying_header + body[header_length:], len(lying_header) + len(body) - header_length, len(lying_header))
    for label, tensors in {
        "datatype mismatch": {"image": np.zeros((1, 4, 4, 3), np.float32)},
        "rank mismatch": {"image": np.zeros((4, 4, 3), np.uint8)},
        "channel mismatch": {"image": np.zeros((1, 4, 4, 4), np.uint8)},
        "empty image": {"image": np.zeros((1, 0, 4, 3), np.uint8)},
        "unknown input": {"image": np.zeros((1, 4, 4, 3), np.uint8), "extra": np.zeros(1, np.uint8)},
    }.items():
        message = v2.encode_infer_request(tensors, ["image"])
        cases[label] = request_bytes(url_path, message.join(), message.content_length, message.header_length)
    unknown_output = v2.encode_infer_request({"image": _image(2, 2)}, ["nothing"])
    cases["unknown output"] = request_bytes(url_path, unknown_output.join(), unknown_output.content_length, unknown_output.header_length)

    expected_status = {"unknown model": 404, "body over the byte limit": 413}
    for label, payload in cases.items():
        status, answer = _raw_exchange(server, payload)
        assert status == expected_status.get(label, 400), (label, status, answer)
        assert isinstance(answer.get("error"), str) and answer["error"], label
        after = _post_infer(server, "sim-upscale-x2", body, good.http_headers())
        assert after.status_code == 200, (label, after.text)


def test_slow_body_is_cut_off_with_408(start_model_server: StartServer) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1, body_read_timeout_s=0.3)
    head = b"POST /v2/models/sim-upscale-x2/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"
    status, answer = _raw_exchange(server, head, shut_write=False)
    assert status == 408 and "in time" in str(answer["error"])


def test_batcher_runs_16_concurrent_requests_as_at_most_3_batches(start_model_server: StartServer) -> None:
    # a batch goes as soon as it holds 8; the queue delay only has to outlast the spread of the
    # 16 arrivals, generously on a busy machine (at 0.05 s, a slow arrival could start a batch of its own)
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=20, max_batch_size=8, max_queue_delay_s=1.0)
    remote = RemoteModel("sim-upscale-x2", [server.url], RemoteSettings(connections_per_endpoint=32))
    images = [_image(6, 6, seed=index) for index in range(16)]
    deadline = time.monotonic() + 10
    jobs = [gevent.spawn(remote.infer, {"image": image}, ["image"], deadline) for image in images]
    gevent.joinall(jobs, raise_error=True)
    for image, job in zip(images, jobs, strict=True):
        np.testing.assert_array_equal(job.value["image"], image.repeat(2, 1).repeat(2, 2))
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    batches = _metric(metrics, 'chaoqing_model_batch_size_count{model="sim-upscale-x2"}')
    items = _metric(metrics, 'chaoqing_model_batch_size_sum{model="sim-upscale-x2"}')
    assert items == 16
    assert batches <= 3, f"{batches} batches for 16 requests"
    remote.close()


def test_requests_of_different_shapes_are_not_stacked(start_model_server: StartServer) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=20, max_batch_size=8, max_queue_delay_s=0.05)
    remote = RemoteModel("sim-upscale-x2", [server.url], RemoteSettings())
    images = [_image(4 + index % 2, 6, seed=index) for index in range(6)]
    jobs = [gevent.spawn(remote.infer, {"image": image}, ["image"], time.monotonic() + 10) for image in images]
    gevent.joinall(jobs, raise_error=True)
    for image, job in zip(images, jobs, strict=True):
        np.testing.assert_array_equal(job.value["image"], image.repeat(2, 1).repeat(2, 2))
    remote.close()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


class _Gate:
    """Holds every thread that reaches it until :meth:`open`; counts them. A native lock: a
    runner runs on a native thread, and monkey-patching made threading's own locks gevent's."""

    def __init__(self) -> None:
        from gevent import monkey

        self._lock = monkey.get_original("_thread", "allocate_lock")()
        self._lock.acquire()
        self.reached = 0

    def pass_through(self) -> None:
        self.reached += 1
        self._lock.acquire()
        self._lock.release()

    def open(self) -> None:
        self._lock.release()


class _BlockingRunner(Runner):
    """Orchestration-test stand-in: holds its instance thread at ``gate`` (a real native-thread
    wait, as a computing model's) until the test opens it; then echoes its input, or fails."""

    def __init__(self, gate: _Gate | None = None, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail
        self.spec = ModelSpec(
            name="blocking",
            platform="test",
            inputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            max_batch_size=1,
            parameters={"scale": 1},
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.gate is not None:
            self.gate.pass_through()
        if self.fail:
            raise RunnerError("the test runner fails on purpose")
        return {"image": np.array(inputs["image"])}


def test_full_queue_answers_503_with_retry_after(start_model_server: StartServer) -> None:
    gate = _Gate()
    server = start_model_server(
        ["blocking"], runner_factory=lambda name, settings: _BlockingRunner(gate), max_queue_size=2, max_batch_size=1
    )
    message = _good_message()

    def post() -> requests.Response:
        return _post_infer(server, "blocking", message.join(), message.http_headers())

    jobs = [gevent.spawn(post) for _ in range(6)]
    try:
        # one computes (held at the gate) and two wait in the queue: at least three are refused
        refused_at_once = eventually(lambda: gate.reached == 1 and sum(job.ready() for job in jobs) >= 3, 10.0)
    finally:
        gate.open()
    gevent.joinall(jobs, raise_error=True)
    statuses = sorted(job.value.status_code for job in jobs)
    assert refused_at_once, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 3, statuses
    refused = next(job.value for job in jobs if job.value.status_code == 503)
    assert refused.headers["Retry-After"] and "queue full" in refused.json()["error"]
    assert post().status_code == 200


def test_runner_failure_is_500_and_the_server_survives(start_model_server: StartServer) -> None:
    server = start_model_server(["blocking"], runner_factory=lambda name, settings: _BlockingRunner(fail=True))
    message = _good_message()
    response = _post_infer(server, "blocking", message.join(), message.http_headers())
    assert response.status_code == 500
    assert "fails on purpose" in response.json()["error"]
    assert requests.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200


def test_request_timeout_parameter_drops_queued_work(start_model_server: StartServer) -> None:
    gate = _Gate()
    server = start_model_server(["blocking"], runner_factory=lambda name, settings: _BlockingRunner(gate), max_batch_size=1)
    message = _good_message()
    first = gevent.spawn(_post_infer, server, "blocking", message.join(), message.http_headers())
    try:
        assert eventually(lambda: gate.reached == 1), "the first request never reached the model"
        # queued behind the one the gate holds, until its own 0.1 s timeout passes
        hurried = v2.encode_infer_request({"image": _image(4, 4)}, ["image"], parameters={"timeout": 100_000})
        response = _post_infer(server, "blocking", hurried.join(), hurried.http_headers())
    finally:
        gate.open()
    assert response.status_code == 504
    assert first.get().status_code == 200
    assert gate.reached == 1, "the request that timed out in the queue was computed anyway"


def test_client_translates_server_errors(start_model_server: StartServer) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1)
    remote = RemoteModel("sim-upscale-x2", [server.url], RemoteSettings())
    with pytest.raises(ModelServerError, match="must be UINT8") as caught:
        remote.infer({"image": np.zeros((1, 2, 2, 3), np.float32)}, ["image"], time.monotonic() + 5)
    assert caught.value.status == 400
    missing = RemoteModel("not-served", [server.url], RemoteSettings())
    with pytest.raises(ModelServerError, match="unknown model") as caught:
        missing.infer({"image": _image(2, 2)}, ["image"], time.monotonic() + 5)
    assert caught.value.status == 404
    remote.close()
    missing.close()


def test_unreachable_server_is_model_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteModel("x", [f"http://127.0.0.1:{port}"], RemoteSettings())
    with pytest.raises(ModelUnavailable, match="unreachable"):
        remote.infer({"image": _image(2, 2)}, ["image"], time.monotonic() + 5)
    remote.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_health_answers_while_a_real_model_computes(start_model_server: StartServer) -> None:
    server = start_model_server(["realesrgan-x4plus"], threads=2)
    remote = RemoteModel("realesrgan-x4plus", [server.url], RemoteSettings())
    computing_started = time.perf_counter()
    job = gevent.spawn(remote.infer, {"image": _image(64, 64)}, ["image"], time.monotonic() + 100)
    latencies = []
    while not job.ready():
        started = time.perf_counter()
        assert requests.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - started)
        gevent.sleep(0.05)
    computing_s = time.perf_counter() - computing_started
    assert job.get()["image"].shape == (1, 256, 256, 3)
    assert len(latencies) >= 5, "the model finished too fast to observe"
    # a model computing on the hub (or holding the GIL) would hold a health check most of that time
    assert max(latencies) < computing_s / 4, f"health took up to {max(latencies):.3f} s of the model's {computing_s:.3f} s"
    remote.close()


def test_runner_registry_refuses_unknown_models() -> None:
    with pytest.raises(RunnerError, match="realesrgan-x4plus"):
        create_runner("no-such-model", RunnerSettings())


def test_threads_are_not_leaked_by_stopped_servers(start_model_server: StartServer) -> None:
    before = threading.active_count()
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1)
    remote = RemoteModel("sim-upscale-x2", [server.url], RemoteSettings())
    remote.infer({"image": _image(3, 3)}, ["image"], time.monotonic() + 5)
    remote.close()
    server.stop(timeout_s=1)
    assert eventually(lambda: threading.active_count() <= before + 1), f"{threading.active_count()} threads, {before} before"


def test_optional_inputs_may_be_left_out_and_value_ranges_are_enforced() -> None:
    spec = ModelSpec(
        "padded", "test",
        inputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),
                TensorSpec("edge_padding", "INT32", (-1, 1), optional=True, value_range=(0, 10))),
        outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
        max_batch_size=8,
    )
    assert spec.as_metadata()["parameters"]["optional_inputs"] == ["edge_padding"]
    image = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    validate_inputs(spec, {"image": image}, 10**6)
    validate_inputs(spec, {"image": image, "edge_padding": np.array([[0], [10]], dtype=np.int32)}, 10**6)
    with pytest.raises(InvalidTensorRequest, match="from 0 to 10"):
        validate_inputs(spec, {"image": image, "edge_padding": np.array([[0], [11]], dtype=np.int32)}, 10**6)
    with pytest.raises(InvalidTensorRequest, match="from 0 to 10"):
        validate_inputs(spec, {"image": image, "edge_padding": np.array([[-1], [0]], dtype=np.int32)}, 10**6)
    with pytest.raises(InvalidTensorRequest, match="needs input 'image'"):
        validate_inputs(spec, {"edge_padding": np.zeros((1, 1), dtype=np.int32)}, 10**6)


def test_a_sim_of_one_accelerator_queues_in_the_batcher(start_model_server: StartServer) -> None:
    """A simulator's batch limit (``concurrency=1``) is the batcher's: calls wait in its bounded
    queue, as for a busy real model, and a full queue answers 503."""
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=300, sim_concurrency=1, max_queue_size=2,
                                max_batch_size=1)
    message = v2.encode_infer_request({"image": _image(4, 4)}, ["image"])
    jobs = [gevent.spawn(_post_infer, server, "sim-upscale-x2", message.join(), message.http_headers())
            for _ in range(6)]
    gevent.joinall(jobs, raise_error=True)
    statuses = sorted(job.value.status_code for job in jobs)
    assert statuses.count(200) >= 2 and 503 in statuses, statuses


def test_a_model_that_fails_to_load_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def broken_factory(name: str, settings: RunnerSettings) -> Runner:
        raise RunnerError(f"weights of {name} are missing")

    server = ModelServer(ModelServerOptions(models=("broken",), port=0), broken_factory)
    try:
        with caplog.at_level(logging.ERROR, logger="chaoqing.modelserver.app"):
            server.start()
            assert not server.wait_ready(10.0)
        failures = [record for record in caplog.records if "failed to load" in record.getMessage()]
        assert failures and failures[0].exc_info is not None, caplog.records
        assert failures[0].exc_info[0] is RunnerError
        ready = requests.get(f"{server.url}/v2/models/broken/ready", timeout=5)
        assert ready.status_code == 503 and "weights of broken are missing" in ready.json()["error"]
        assert requests.get(f"{server.url}/v2/health/ready", timeout=5).json()["models"] == {"broken": "failed"}
    finally:
        server.stop(timeout_s=1.0)
