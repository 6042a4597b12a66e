"""Failing model servers, through the real HTTP gateway: each fault gets its documented answer
within the request deadline (or degrades a face, as the pipeline's policy says), retries go
at most once to another replica, a failing endpoint's circuit opens (fast 503 + Retry-After)
and closes again when it recovers. After each fault: nothing in flight, no request greenlet
left, no socket left open towards the broken server, the process's descriptors back to
their baseline. (test_gateway.py covers the single-fault answers; this adds the leak checks,
replicas, circuits and recovery.)
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import numpy as np
import pytest
import requests
from conftest import SimGateway, connections_to, eventually
from fakes import FakeV2Server
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from PIL import Image

from chaoqing.config import RemoteSettings, TileSettings
from chaoqing.protocol.listen import bound_port, create_listener

pytestmark = pytest.mark.timeout(90)

StartGateway = Callable[..., SimGateway]
DEADLINE_S = 1.5
# What a request may take past its deadline (decode, encode, HTTP) on a busy 2-core machine:
# generous, and still far short of the 5 s and more the faulty fakes below take to answer.
ANSWER_SLACK_S = 1.5
GOOD = "good"  # any behaviour FakeV2Server does not know answers correctly

# Long-lived greenlets of servers, health checkers and batchers (not left over by requests)
INFRASTRUCTURE = ("_health_loop", "_keep_spool", "_schedule_forever", "serve_forever", "_do_read", "handle", "_watch",
                  "WSGIServer", "StreamServer", "_load", "accept", "_run_batches", "Batcher")


def _photo(width: int = 160, height: int = 120) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 64 + 96], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


PHOTO = _photo()


class _SilentLog:
    def write(self, *_: Any) -> None:
        pass

    def flush(self) -> None:
        pass


_SILENT_LOG = _SilentLog()


class KillableFake(FakeV2Server):
    """A FakeV2Server whose stop() also ends the connections it serves (a hanging handler
    included), so that whatever stays open afterwards is the gateway's."""

    def __init__(self, behaviour: str, model: str, delay_s: float = 0.5) -> None:
        super().__init__(behaviour, model=model, delay_s=delay_s)
        self._server.stop()
        self._listener = create_listener("127.0.0.1", 0)
        self.port = bound_port(self._listener)
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = WSGIServer(self._listener, self._app, spawn=Pool(256), log=None, error_log=_SILENT_LOG)
        self._server.start()


def _good_fake(model: str) -> KillableFake:
    """A fake that answers correctly until its ``behaviour`` is set to a fault."""
    fake = KillableFake("slow", model=model, delay_s=0.0)
    fake.behaviour = GOOD
    return fake


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def _post(gateway: SimGateway, query: str = "") -> tuple[Reply, float]:
    """POST the photo on a connection of its own, closed before returning (requests would keep
    its socket until garbage collection, and the descriptor counts here are exact)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", gateway.server.port, timeout=30)
    try:
        connection.request("POST", f"/v1/enhance{query}", body=PHOTO, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        reply = Reply(response.status, {name.title(): value for name, value in response.getheaders()}, response.read())
    finally:
        connection.close()
    return reply, time.monotonic() - started


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))



@dataclass
class Baseline:
    descriptors: int
    greenlets: Callable[[], list[gevent.Greenlet]]

    def request_greenlets(self) -> list[gevent.Greenlet]:
        return [item for item in self.greenlets() if not any(word in repr(item) for word in INFRASTRUCTURE)]


@pytest.fixture
def leak_check(greenlet_census: Callable[[], list[gevent.Greenlet]]) -> Iterator[Callable[[], Baseline]]:
    """``baseline = leak_check()`` once the gateway is warm; checked again after the test body
    via ``assert_clean(gateway, baseline)``."""
    yield lambda: Baseline(_open_descriptors(), greenlet_census)


def assert_clean(gateway: SimGateway, baseline: Baseline, broken_port: int | None = None, connections_before: int = 0) -> None:
    assert eventually(lambda: gateway.server.gateway.in_flight == 0), "a request is still in flight"
    assert eventually(lambda: baseline.request_greenlets() == [], 3.0), baseline.request_greenlets()
    if broken_port is not None:
        assert eventually(lambda: connections_to(broken_port) <= connections_before), (
            f"{connections_to(broken_port)} sockets to the broken server, {connections_before} before the fault"
        )
    assert eventually(lambda: _open_descriptors() <= baseline.descriptors), (
        f"{_open_descriptors()} descriptors open, {baseline.descriptors} before the fault"
    )


# -- one fault at a time, then the leak checks ---------------------------------------------

UPSCALER_FAULTS = {
    # behaviour: (status, code, answered by, in seconds, plus ANSWER_SLACK_S): at the deadline,
    # or at once (before the deadline; the status says it was not the deadline)
    "hang": (504, "deadline_exceeded", DEADLINE_S),
    "slow": (504, "deadline_exceeded", DEADLINE_S),  # slower than the deadline
    "garbage": (502, "model_error", 0.0),
    "wrong_shape": (502, "model_error", 0.0),
    "wrong_dtype": (502, "model_error", 0.0),
    "error_500": (502, "model_error", 0.0),
    "close_mid_response": (503, "model_unavailable", 0.0),
}


@pytest.mark.parametrize("behaviour", list(UPSCALER_FAULTS))
def test_an_upscaler_fault_is_answered_in_time_and_leaves_nothing_behind(
    start_sim_gateway: StartGateway, leak_check: Callable[[], Baseline], behaviour: str
) -> None:
    fake = _good_fake("sim-upscale-x4")
    gateway = start_sim_gateway(endpoints={"sim-upscale-x4": (fake.url,)}, request_deadline_s=DEADLINE_S)
    assert _post(gateway)[0].status_code == 200  # warm: metadata cached, connections pooled
    connections_before = connections_to(fake.port)
    baseline = leak_check()
    fake.behaviour, fake.delay_s = behaviour, 5.0
    status, code, answered_by = UPSCALER_FAULTS[behaviour]
    response, elapsed = _post(gateway)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert elapsed < answered_by + ANSWER_SLACK_S, f"{elapsed:.2f} s"
    if status == 503:
        assert int(response.headers["Retry-After"]) >= 1
    fake.stop()  # its handlers (a hanging one too) and its listener go; the gateway's side must be closed already
    assert_clean(gateway, baseline, fake.port, connections_before)


FACE_FAULTS = ("hang", "slow", "garbage", "wrong_shape", "error_500", "close_mid_response")


@pytest.mark.parametrize("behaviour", FACE_FAULTS)
def test_a_face_model_fault_degrades_the_faces_not_the_photo(
    start_sim_gateway: StartGateway, leak_check: Callable[[], Baseline], behaviour: str
) -> None:
    fake = _good_fake("sim-face")
    gateway = start_sim_gateway(endpoints={"sim-face": (fake.url,)}, request_deadline_s=3.0)
    warm, _ = _post(gateway)
    assert warm.status_code == 200 and warm.headers["X-Faces-Enhanced"] == "2"
    connections_before = connections_to(fake.port)
    baseline = leak_check()
    fake.behaviour, fake.delay_s = behaviour, 10.0
    response, elapsed = _post(gateway)
    # a 200 (not a 504) says the faces were given up before the request deadline
    assert response.status_code == 200, response.text
    assert response.headers["X-Faces-Detected"] == "2" and response.headers["X-Faces-Enhanced"] == "0"
    assert elapsed < 3.0 + ANSWER_SLACK_S, f"{elapsed:.2f} s: the photo waited for the faces' fake (10 s)"
    fake.stop()
    assert_clean(gateway, baseline, fake.port, connections_before)


def test_a_detector_fault_fails_the_request(start_sim_gateway: StartGateway, leak_check: Callable[[], Baseline]) -> None:
    fake = KillableFake("error_500", model="sim-detector")
    gateway = start_sim_gateway(endpoints={"sim-detector": (fake.url,)})
    assert _post(gateway, "?faces=false")[0].status_code == 200
    baseline = leak_check()
    response, _ = _post(gateway)
    assert response.status_code == 502 and response.json()["error"]["code"] == "model_error"
    fake.stop()
    assert_clean(gateway, baseline)


def test_refused_connections_are_503_at_once(start_sim_gateway: StartGateway, leak_check: Callable[[], Baseline]) -> None:
    process, url = _start_sim_process(latency_ms=10)
    try:
        gateway = start_sim_gateway(endpoints={"sim-upscale-x4": (url,)}, request_deadline_s=DEADLINE_S)
        assert _post(gateway)[0].status_code == 200
        baseline = leak_check()
        process.kill()  # its kept-alive connections are reset, its port refuses
        process.wait()
        for _ in range(3):
            response, elapsed = _post(gateway)
            assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
            assert elapsed < DEADLINE_S, f"{elapsed:.2f} s: a refused connection waited for the deadline"
        assert_clean(gateway, baseline, int(url.rsplit(":", 1)[1]))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _start_sim_process(latency_ms: int) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "chaoqing", "model-server", "--model", "sim-upscale-x4", "--port", "0",
               "--model-option", f"latency_ms={latency_ms}", "--log-level", "error", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().split("listening on ")[1].split()[0]
    assert eventually(lambda: _ready(url), 20)
    return process, url


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_model_server_killed_mid_request_then_restarted(
    start_sim_gateway: StartGateway, leak_check: Callable[[], Baseline]
) -> None:
    process, url = _start_sim_process(latency_ms=2000)
    port = int(url.rsplit(":", 1)[1])
    replacement: subprocess.Popen[str] | None = None
    deadline_s = 10.0
    try:
        gateway = start_sim_gateway(
            endpoints={"sim-upscale-x4": (url,)}, request_deadline_s=deadline_s,
            remote=RemoteSettings(eject_for_s=1.0, health_interval_s=0.2),
        )
        assert _post(gateway, "?faces=false")[0].status_code == 200
        baseline = leak_check()
        killer = gevent.spawn_later(0.5, os.kill, process.pid, signal.SIGKILL)
        response, elapsed = _post(gateway, "?faces=false")
        killer.join()
        process.wait()
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
        assert elapsed < deadline_s / 2, "noticed when the connection dropped, not at the deadline"
        assert_clean(gateway, baseline, port)
        # the server comes back on the same port (as the supervisor restarts it): the gateway recovers
        command = [sys.executable, "-m", "chaoqing", "model-server", "--model", "sim-upscale-x4", "--port", str(port),
                   "--model-option", "latency_ms=10", "--log-level", "error", "--threads", "1"]
        replacement = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert eventually(lambda: _ready(url), 20)
        assert eventually(lambda: _post(gateway, "?faces=false")[0].status_code == 200, 5.0), "no recovery"
    finally:
        for child in (process, replacement):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()


# -- replicas, retries and circuits --------------------------------------------------------


def _single_call_gateway(start_sim_gateway: StartGateway, urls: tuple[str, ...], **changes: Any) -> SimGateway:
    """One upscaler call per request: no tiles, no faces (queries use faces=false)."""
    return start_sim_gateway(endpoints={"sim-upscale-x4": urls}, tiles=TileSettings(tile_size=0), **changes)


def test_a_failing_replica_is_retried_once_on_the_other(start_sim_gateway: StartGateway) -> None:
    broken, healthy = KillableFake("error_500", model="sim-upscale-x4"), _good_fake("sim-upscale-x4")
    gateway = _single_call_gateway(start_sim_gateway, (broken.url, healthy.url),
                                   remote=RemoteSettings(eject_after_failures=1000, health_interval_s=60))
    for _ in range(12):
        response, _ = _post(gateway, "?faces=false")
        assert response.status_code == 200, response.text
    assert broken.calls >= 1, "power of two choices picked the broken replica at least once in 12"
    assert healthy.calls == 12, "every request ended on the healthy replica, each exactly once"
    broken.stop()
    healthy.stop()


@pytest.mark.parametrize("second", ["garbage", "error_500"])
def test_when_both_replicas_fail_each_is_called_once(start_sim_gateway: StartGateway, second: str) -> None:
    first_fake, second_fake = KillableFake("error_500", model="sim-upscale-x4"), KillableFake(second, model="sim-upscale-x4")
    gateway = _single_call_gateway(start_sim_gateway, (first_fake.url, second_fake.url))
    response, _ = _post(gateway, "?faces=false")
    assert response.status_code == 502 and response.json()["error"]["code"] == "model_error"
    assert (first_fake.calls, second_fake.calls) == (1, 1), "a retry, and only one"
    first_fake.stop()
    second_fake.stop()


def test_a_timeout_is_not_retried(start_sim_gateway: StartGateway) -> None:
    hanging, healthy = KillableFake("hang", model="sim-upscale-x4"), _good_fake("sim-upscale-x4")
    gateway = _single_call_gateway(start_sim_gateway, (hanging.url, healthy.url), request_deadline_s=0.8)
    for _ in range(4):
        calls_before = hanging.calls + healthy.calls
        response, elapsed = _post(gateway, "?faces=false")
        assert hanging.calls + healthy.calls == calls_before + 1, "the deadline is spent: no second call"
        assert response.status_code in (200, 504) and elapsed < 0.8 + ANSWER_SLACK_S, f"{elapsed:.2f} s"
    hanging.stop()
    healthy.stop()


def test_a_failing_endpoint_opens_its_circuit_and_closes_it_when_it_recovers(
    start_sim_gateway: StartGateway, leak_check: Callable[[], Baseline]
) -> None:
    fake = KillableFake("error_500", model="sim-upscale-x4")
    eject_for_s = 3.0
    gateway = _single_call_gateway(
        start_sim_gateway, (fake.url,), remote=RemoteSettings(eject_after_failures=3, eject_for_s=eject_for_s, health_interval_s=0.2)
    )
    for _ in range(3):
        assert _post(gateway, "?faces=false")[0].status_code == 502
    assert fake.calls == 3
    opened_at = time.monotonic()
    baseline = leak_check()
    # open: answered without calling the endpoint, though its health check says ready
    fast = [_post(gateway, "?faces=false") for _ in range(5)]
    still_open = time.monotonic() - opened_at < eject_for_s
    assert all(response.status_code == 503 for response, _ in fast), [response.status_code for response, _ in fast]
    assert all(response.json()["error"]["code"] == "model_unavailable" for response, _ in fast)
    assert all(1 <= int(response.headers["Retry-After"]) <= eject_for_s for response, _ in fast)
    assert max(elapsed for _, elapsed in fast) < DEADLINE_S, "an open circuit answers at once"
    if still_open:  # 5 small requests take far less than eject_for_s, even on a busy machine
        assert fake.calls == 3, "calls reached an endpoint whose circuit is open"
    # the endpoint recovers: after the open period a trial call (or a health check) closes the circuit
    fake.behaviour = GOOD
    assert eventually(lambda: _post(gateway, "?faces=false")[0].status_code == 200, eject_for_s + 3.0)
    assert all(_post(gateway, "?faces=false")[0].status_code == 200 for _ in range(3))
    fake.stop()
    assert_clean(gateway, baseline)


def test_a_hanging_endpoint_does_not_pile_up_connections(start_sim_gateway: StartGateway, leak_check: Callable[[], Baseline]) -> None:
    hanging = _good_fake("sim-upscale-x4")
    gateway = _single_call_gateway(
        start_sim_gateway, (hanging.url,), request_deadline_s=0.5,
        remote=RemoteSettings(eject_after_failures=3, eject_for_s=30.0, health_interval_s=60),
    )
    assert _post(gateway, "?faces=false")[0].status_code == 200
    connections_before = connections_to(hanging.port)
    baseline = leak_check()
    hanging.behaviour, calls_before = "hang", hanging.calls
    jobs = [gevent.spawn(_post, gateway, "?faces=false") for _ in range(12)]
    gevent.joinall(jobs, raise_error=True)
    statuses = sorted(job.value[0].status_code for job in jobs)
    assert set(statuses) <= {503, 504}, statuses
    later = [_post(gateway, "?faces=false") for _ in range(5)]
    # a call that went through would hang until the 0.5 s deadline and answer 504
    assert all(response.status_code == 503 for response, _ in later), "the circuit is open"
    assert hanging.calls - calls_before <= 12
    hanging.stop()
    assert_clean(gateway, baseline, hanging.port, connections_before)


class _NestedJsonServer:
    """Answers metadata nested 100 000 deep: the client must call it malformed, not crash."""

    def __init__(self) -> None:
        self._listener = create_listener("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{bound_port(self._listener)}"
        self._server = WSGIServer(self._listener, self._app, log=None, error_log=_SILENT_LOG)
        self._server.start()

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = b"[" * 100_000
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def stop(self) -> None:
        self._server.stop(timeout=0.1)


def test_deeply_nested_json_from_a_model_server_is_a_502(start_sim_gateway: StartGateway) -> None:
    nested = _NestedJsonServer()
    gateway = start_sim_gateway(endpoints={"sim-upscale-x4": (nested.url,)})
    response, _ = _post(gateway, "?faces=false")
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "model_error"
    nested.stop()
