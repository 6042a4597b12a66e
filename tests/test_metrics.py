"""Operability: the gateway's and model servers' Prometheus metrics, scraped over HTTP while
requests are made, and the logs (one JSON line per request; readable text on a terminal)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import numpy as np
import pytest
import requests
from conftest import SimGateway, eventually
from fakes import FakeV2Server
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from chaoqing.config import FACE_DESCRIPTOR
from chaoqing.logs import JsonFormatter, TextFormatter

StartGateway = Callable[..., SimGateway]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

STAGES_WITH_FACES = ("decode", "detect", "faces", "upscale", "composite", "encode", "total")


def _photo_png(width: int = 160, height: int = 120) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 64 + 96], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _post(url: str, body: bytes, query: str = "", **headers: str) -> requests.Response:
    return requests.post(f"{url}/v1/enhance{query}", data=body, headers={"Content-Type": "image/png", **headers}, timeout=30)


def scrape(url: str) -> Samples:
    """Every sample of ``url``/metrics, keyed by name and labels."""
    response = requests.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")  # Prometheus text format
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Delta:
    """How much each sample moved between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


@pytest.fixture
def gateway(start_sim_gateway: StartGateway) -> SimGateway:
    return start_sim_gateway(upscale_ms=30, detect_ms=5, face_ms=10, faces=2)


# -- the gateway's metrics ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_counters_and_histograms_move_with_the_requests_made(gateway: SimGateway) -> None:
    url = gateway.url
    # the face descriptor's endpoint is the detector's (config.py), which a simulator does not serve:
    # its circuit rightly opens, and no preset here asks for it
    endpoints = {name: urls[0] for name, urls in gateway.config.endpoints.items() if name != FACE_DESCRIPTOR}
    before = scrape(url)
    photo = _photo_png()
    for _ in range(3):
        assert _post(url, photo, "?preset=balanced&scale=2").status_code == 200
    assert _post(url, photo, "?preset=fast").status_code == 200
    assert _post(url, photo, "?scale=abc").status_code == 400
    assert _post(url, b"not a picture").status_code == 400
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 200
    assert requests.get(f"{url}/web/style.css", timeout=5).status_code == 200
    assert requests.get(f"{url}/no/such/page", timeout=5).status_code == 404
    after = scrape(url)
    delta = Delta(before, after)

    # requests by route, status and preset; end-to-end latency
    assert delta("chaoqing_requests_total", route="/v1/enhance", status="200", preset="balanced") == 3
    assert delta("chaoqing_requests_total", route="/v1/enhance", status="200", preset="fast") == 1
    assert delta("chaoqing_requests_total", route="/v1/enhance", status="400", preset="balanced") == 2
    assert delta("chaoqing_request_seconds_count", route="/v1/enhance", preset="balanced") == 5
    assert delta("chaoqing_request_seconds_sum", route="/v1/enhance", preset="balanced") >= 3 * 0.030
    # the other routes, through the middleware (bounded labels: templates, not paths)
    assert delta("chaoqing_requests_total", route="/healthz", status="200", preset="") == 1
    assert delta("chaoqing_requests_total", route="/readyz", status="200", preset="") == 1
    assert delta("chaoqing_requests_total", route="/web/{name}", status="200", preset="") == 1
    assert delta("chaoqing_requests_total", route="(unmatched)", status="404", preset="") == 1
    assert value(after, "chaoqing_requests_total", route="/metrics", status="200", preset="") >= 1
    assert delta("chaoqing_request_seconds_count", route="/healthz", preset="") == 1

    # stages, as in Server-Timing: the 4 photos that succeeded, 3 of them with faces
    for stage in STAGES_WITH_FACES:
        expected = 3 if stage in ("detect", "faces") else 4
        assert delta("chaoqing_stage_seconds_count", stage=stage) == expected, stage
    assert delta("chaoqing_stage_seconds_sum", stage="upscale") >= 4 * 0.030
    assert delta("chaoqing_stage_seconds_bucket", stage="total", le="+Inf") == 4

    # faces per request
    assert delta("chaoqing_faces_per_request_count") == 4
    assert delta("chaoqing_faces_per_request_sum") == 6
    assert delta("chaoqing_faces_enhanced_total") == 6
    assert delta("chaoqing_faces_failed_total") == 0

    # remote calls by model, endpoint and outcome, with latency
    upscaler, detector, face = endpoints["sim-upscale-x4"], endpoints["sim-detector"], endpoints["sim-face"]
    assert delta("chaoqing_remote_calls_total", model="sim-upscale-x4", endpoint=upscaler, outcome="ok") >= 4
    assert delta("chaoqing_remote_calls_total", model="sim-detector", endpoint=detector, outcome="ok") >= 3
    assert delta("chaoqing_remote_calls_total", model="sim-face", endpoint=face, outcome="ok") >= 6
    assert delta("chaoqing_remote_call_seconds_count", model="sim-face", endpoint=face) >= 6
    assert delta("chaoqing_remote_call_seconds_sum", model="sim-upscale-x4", endpoint=upscaler) >= 4 * 0.030

    # every endpoint's circuit, closed; nothing in flight; the hub metrics exist
    for name, endpoint in endpoints.items():
        assert ("chaoqing_circuit_state", frozenset({"model": name, "endpoint": endpoint}.items())) in after
        assert value(after, "chaoqing_circuit_state", model=name, endpoint=endpoint) == 0
    assert value(after, "chaoqing_requests_in_flight") == 0
    assert ("chaoqing_hub_blocked_total", frozenset()) in after
    assert ("chaoqing_hub_blocked_seconds_total", frozenset()) in after


@pytest.mark.timeout(60)
def test_the_in_flight_gauge_counts_requests_being_processed(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway(upscale_ms=2000, detect_ms=5, face_ms=10)
    photo = _photo_png()
    calls = [gevent.spawn(_post, gateway.url, photo) for _ in range(3)]
    during = 0.0

    def all_three_counted() -> bool:  # each stays 2 s once admitted; polled until the first ends
        nonlocal during
        during = value(scrape(gateway.url), "chaoqing_requests_in_flight")
        return during == 3 or any(call.ready() for call in calls)

    assert eventually(all_three_counted, 10.0)
    gevent.joinall(calls, raise_error=True)
    assert [call.value.status_code for call in calls] == [200, 200, 200]
    assert during == 3
    assert value(scrape(gateway.url), "chaoqing_requests_in_flight") == 0


@pytest.mark.timeout(60)
def test_the_circuit_gauge_shows_an_endpoint_ejected_after_failures(start_sim_gateway: StartGateway) -> None:
    broken = FakeV2Server("error_500", model="sim-upscale-x4")
    try:
        gateway = start_sim_gateway(endpoints={"sim-upscale-x4": (broken.url,)})
        photo = _photo_png()
        for _ in range(3):
            assert _post(gateway.url, photo).status_code == 502
        samples = scrape(gateway.url)
        assert value(samples, "chaoqing_circuit_state", model="sim-upscale-x4", endpoint=broken.url) == 2  # open
        failed = sum(sample for (name, labels), sample in samples.items()
                     if name == "chaoqing_remote_calls_total" and ("endpoint", broken.url) in labels
                     and ("outcome", "ok") not in labels)  # (its metadata call succeeds)
        assert failed >= 3
        assert value(samples, "chaoqing_requests_total", route="/v1/enhance", status="502", preset="balanced") == 3
        healthy = gateway.config.endpoints["sim-face"][0]
        assert value(samples, "chaoqing_circuit_state", model="sim-face", endpoint=healthy) == 0
    finally:
        broken.stop()


HUB_WATCH_SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.monkey import get_original
    from chaoqing.logs import configure_logging
    from chaoqing.gateway.metrics import GatewayMetrics
    from chaoqing.gateway.server import start_hub_watch

    configure_logging("info", "json")
    metrics = GatewayMetrics()
    start_hub_watch(metrics)
    gevent.sleep(0.3)
    get_original("time", "sleep")(0.6)   # a greenlet that blocks the hub
    gevent.sleep(0.4)
    print(metrics.exposition()[0].decode())
""")


@pytest.mark.timeout(60)
def test_hub_blocks_seen_by_gevents_monitor_become_metrics_and_one_log_line() -> None:
    environment = {name: setting for name, setting in os.environ.items() if name != "GEVENT_MAX_BLOCKING_TIME"}
    completed = subprocess.run([sys.executable, "-c", HUB_WATCH_SCRIPT], check=False, capture_output=True, text=True,
                               timeout=40, env=environment)
    assert completed.returncode == 0, completed.stderr
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(completed.stdout) for sample in family.samples
    }
    blocks = value(samples, "chaoqing_hub_blocked_total")
    # once per 0.1 s period while blocked (0.6 s), not once per check: at most 6 and a late
    # report; a monitor thread that a busy machine runs late sees fewer, never none
    assert 1 <= blocks <= 8, completed.stdout
    assert value(samples, "chaoqing_hub_blocked_seconds_total") == pytest.approx(blocks * 0.1)
    lines = completed.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]  # JSON logs stay JSON: no multi-line gevent report
    blocked = [record for record in records if "event loop was blocked" in record["message"]]
    assert len(blocked) == 1 and blocked[0]["level"] == "warning", lines


# -- the model servers' metrics -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_model_servers_expose_queue_depth_batch_sizes_and_inference_time(gateway: SimGateway) -> None:
    face_server = gateway.model_servers["sim-face"].url
    before = scrape(face_server)
    photo = _photo_png()
    calls = [gevent.spawn(_post, gateway.url, photo) for _ in range(4)]
    gevent.joinall(calls, raise_error=True)
    assert all(call.value.status_code == 200 for call in calls)
    delta = Delta(before, scrape(face_server))
    assert delta("chaoqing_model_requests_total", model="sim-face", outcome="ok") == 8
    assert delta("chaoqing_model_batch_size_sum", model="sim-face") == 8  # items
    batches = delta("chaoqing_model_batch_size_count", model="sim-face")
    assert 1 <= batches <= 8
    assert delta("chaoqing_model_inference_seconds_count", model="sim-face") == batches
    assert delta("chaoqing_model_queue_wait_seconds_count", model="sim-face") == batches
    assert delta("chaoqing_model_request_seconds_count", model="sim-face") == 8
    assert ("chaoqing_model_queue_depth", frozenset({"model": "sim-face"}.items())) in delta.after


# -- logs -----------------------------------------------------------------------------------


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """The gateway's access log as JSON lines, captured in this process."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("chaoqing.access")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(previous_level)


@pytest.mark.timeout(60)
def test_one_json_access_line_per_request_with_id_status_stages_faces_and_bytes(
    gateway: SimGateway, access_log: io.StringIO
) -> None:
    photo = _photo_png()
    good = _post(gateway.url, photo, "?scale=2", **{"X-Request-Id": "log-test-1"})
    bad = _post(gateway.url, b"GIF89a but not really", "", **{"X-Request-Id": "log-test-2"})  # 21 bytes
    assert good.status_code == 200 and bad.status_code == 400
    assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200  # debug level: not in the log
    records = [json.loads(line) for line in access_log.getvalue().splitlines()]
    assert [record["request_id"] for record in records] == ["log-test-1", "log-test-2"]
    ok, failed = records
    assert ok["level"] == "info" and ok["logger"] == "chaoqing.access" and ok["message"] == "POST /v1/enhance 200"
    assert ok["status"] == 200 and ok["route"] == "/v1/enhance" and ok["preset"] == "balanced"
    assert ok["bytes_in"] == len(photo) and ok["bytes_out"] == len(good.content)
    assert ok["faces_detected"] == 2 and ok["faces_enhanced"] == 2
    assert set(ok["stages_ms"]) == set(STAGES_WITH_FACES)
    assert ok["stages_ms"]["upscale"] >= 30 and ok["total_ms"] >= ok["stages_ms"]["total"]
    assert ok["time"].endswith("Z") and "error" not in ok
    assert failed["status"] == 400 and failed["error"] == "invalid_image" and failed["bytes_in"] == 21
    assert "bytes_out" not in failed and "stages_ms" not in failed


def _record(message: str, level: int = logging.INFO, fields: dict[str, Any] | None = None,
            exc_info: Any = None) -> logging.LogRecord:
    record = logging.LogRecord("chaoqing.gateway.app", level, __file__, 1, message, (), exc_info)
    if fields is not None:
        record.fields = fields
    return record


@pytest.mark.timeout(10)
def test_formatters_json_with_exception_and_text_with_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    payload = json.loads(JsonFormatter().format(_record("unexpected error", logging.ERROR, exc_info=exc_info)))
    assert payload["level"] == "error" and "ValueError: boom" in payload["exception"]
    fields = {"status": 200, "request_id": "abc", "stages_ms": {"decode": 2.4, "total": 9.0}}
    line = TextFormatter().format(_record("POST /v1/enhance 200", fields=fields))
    assert "info" in line and "POST /v1/enhance 200" in line
    assert line.endswith("status=200 request_id=abc stages_ms=decode:2.4,total:9.0")
    assert "\n" not in line


LOGGING_SCRIPT = textwrap.dedent("""
    import logging, sys
    from chaoqing.logs import configure_logging
    configure_logging(sys.argv[1], sys.argv[2])
    logging.getLogger("chaoqing.access").info("POST /v1/enhance 200", extra={"fields": {"status": 200}})
    logging.getLogger("chaoqing.gateway.app").warning("careful")
    logging.getLogger("chaoqing.gateway.app").debug("details")
""")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("level, log_format, expected_messages", [
    ("info", "json", ["POST /v1/enhance 200", "careful"]),
    ("debug", "auto", ["POST /v1/enhance 200", "careful", "details"]),  # stderr is a pipe here: JSON
    ("warning", "json", ["careful"]),
])
def test_log_level_and_format_on_stderr(level: str, log_format: str, expected_messages: list[str]) -> None:
    completed = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, level, log_format], check=False,
                               capture_output=True, text=True, timeout=20)
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stderr.splitlines()]
    assert [record["message"] for record in records] == expected_messages
    if "POST /v1/enhance 200" in expected_messages:
        assert records[0]["status"] == 200


@pytest.mark.timeout(30)
def test_text_logs_for_people() -> None:
    completed = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, "info", "text"], check=False,
                               capture_output=True, text=True, timeout=20)
    lines = completed.stderr.splitlines()
    assert len(lines) == 2
    assert "chaoqing.access" in lines[0] and lines[0].endswith("POST /v1/enhance 200  status=200")
    assert "warning" in lines[1] and lines[1].endswith("careful")
