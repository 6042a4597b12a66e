"""No surprise 504: a synchronous request whose estimated compute passes its deadline is
refused at once, with the estimate, and pointed to /v1/jobs; the estimator prefers what the
gateway observed, then the model's metadata, then the configured default."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import requests
from conftest import SimGateway, eventually
from fakes import FakeV2Server
from PIL import Image

from chaoqing.config import Config, JobSettings
from chaoqing.errors import EstimateExceedsDeadline, http_error_for
from chaoqing.gateway.estimate import (
    FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL,
    OBSERVED_DECAY,
    ComputeEstimator,
    SpeedBasis,
)
from chaoqing.gateway.remote import RemoteModels

StartGateway = Callable[..., SimGateway]

SLOW_MEGAPIXELS_PER_S = 0.001  # what the fake upscaler's metadata claims: 1000 s per input MP
DEADLINE_S = 10.0


def _png(width: int, height: int) -> bytes:
    rows = np.linspace(0, 255, width * height * 3, dtype=np.float64).reshape(height, width, 3)
    buffer = io.BytesIO()
    Image.fromarray(rows.astype(np.uint8)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


@pytest.fixture
def slow_upscaler() -> Iterator[FakeV2Server]:
    fake = FakeV2Server("slow", model="sim-upscale-x4", scale=4, delay_s=0.01,
                        parameters={"input_megapixels_per_s": SLOW_MEGAPIXELS_PER_S})
    yield fake
    fake.stop()


def _enhance(gateway: SimGateway, data: bytes, scale: int = 2) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.post(f"{gateway.url}/v1/enhance?preset=fast&scale={scale}", data=data,
                             headers={"Content-Type": "image/png"}, timeout=30)
    return response, time.monotonic() - started


@pytest.mark.timeout(60)
def test_a_photo_too_large_for_the_deadline_is_refused_at_once_and_a_job_takes_it(
    start_sim_gateway: StartGateway, slow_upscaler: FakeV2Server
) -> None:
    gateway = start_sim_gateway(endpoints={"sim-upscale-x4": (slow_upscaler.url,)}, request_deadline_s=DEADLINE_S)
    large = _png(400, 300)  # 0.12 MP at 0.001 MP/s: 120 s of compute, against a 10 s deadline

    response, seconds = _enhance(gateway, large)
    assert response.status_code == 413, response.text
    assert seconds < 1.0, f"refused after {seconds:.2f} s"
    error = response.json()["error"]
    expected_s = 0.12 / SLOW_MEGAPIXELS_PER_S + 0.12 * 4 * FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL
    assert error["code"] == "estimate_exceeds_deadline"
    assert error["estimate_s"] == pytest.approx(expected_s, abs=0.1) and error["deadline_s"] == DEADLINE_S
    assert error["jobs"] == "/v1/jobs"
    assert "POST /v1/jobs" in error["message"] and "120 s" in error["message"] and "metadata" in error["message"]
    assert slow_upscaler.calls == 0, "refused before any model call"
    assert gateway.metrics.sample("chaoqing_requests_total",
                                  {"route": "/v1/enhance", "status": "413", "preset": "fast"}) == 1

    small = _png(48, 32)  # 0.0015 MP: 1.5 s by the metadata
    response, _ = _enhance(gateway, small)
    assert response.status_code == 200, response.text
    assert response.headers["X-Output-Size"] == "96x64"
    assert slow_upscaler.calls == 1

    # the gateway measured the upscaler now, and that beats the metadata: even at a speed far
    # above the one it saw, 12 MP cannot be done in 10 s
    response, seconds = _enhance(gateway, _png(4000, 3000))
    assert response.status_code == 413 and seconds < 1.0, response.text
    assert "observed" in response.json()["error"]["message"]

    # the same large photo as a job: accepted, and done
    submitted = requests.post(f"{gateway.url}/v1/jobs?preset=fast&scale=2", data=large,
                              headers={"Content-Type": "image/png"}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_url = f"{gateway.url}{submitted.headers['Location']}"
    assert eventually(lambda: requests.get(job_url, timeout=10).json()["status"] == "done", within_s=20)
    result = requests.get(f"{job_url}/result", timeout=10)
    assert result.status_code == 200 and result.headers["X-Output-Size"] == "800x600"


@pytest.mark.timeout(30)
def test_the_estimator_prefers_observed_then_metadata_then_default(slow_upscaler: FakeV2Server) -> None:
    unpublished = FakeV2Server("slow", model="quiet-upscaler", delay_s=0.01)
    config = Config(endpoints={"sim-upscale-x4": (slow_upscaler.url,), "quiet-upscaler": (unpublished.url,)},
                    jobs=JobSettings(default_megapixels_per_s=0.05))
    remotes = RemoteModels.from_config(config)
    try:
        estimator = ComputeEstimator(remotes, config.jobs.default_megapixels_per_s)
        assert estimator.speed_of("quiet-upscaler").basis is SpeedBasis.DEFAULT
        assert estimator.speed_of("quiet-upscaler").megapixels_per_s == 0.05
        assert estimator.speed_of("not-configured").basis is SpeedBasis.DEFAULT
        published = estimator.speed_of("sim-upscale-x4")
        assert published.basis is SpeedBasis.METADATA and published.megapixels_per_s == SLOW_MEGAPIXELS_PER_S

        estimator.observe("sim-upscale-x4", 2.0, 4.0)  # 0.5 MP/s
        observed = estimator.speed_of("sim-upscale-x4")
        assert observed.basis is SpeedBasis.OBSERVED and observed.megapixels_per_s == pytest.approx(0.5)
        # a thumbnail whose call overheads dominate barely moves it; a large photo does
        estimator.observe("sim-upscale-x4", 0.01, 1.0)
        assert estimator.speed_of("sim-upscale-x4").megapixels_per_s == pytest.approx(
            (2.0 * OBSERVED_DECAY + 0.01) / (4.0 * OBSERVED_DECAY + 1.0))
        assert estimator.speed_of("sim-upscale-x4").megapixels_per_s > 0.35
        for _ in range(10):
            estimator.observe("sim-upscale-x4", 4.0, 2.0)  # the machine got faster: 2 MP/s
        assert estimator.speed_of("sim-upscale-x4").megapixels_per_s == pytest.approx(2.0, rel=0.05)
        estimator.observe("sim-upscale-x4", 1.0, None)  # nothing measured: ignored
        estimator.observe("sim-upscale-x4", 1.0, 0.0)

        estimate = estimator.estimate("quiet-upscaler", 2000, 1000, 2.0)
        assert estimate.input_megapixels == 2.0 and estimate.output_megapixels == 8.0
        assert estimate.seconds == pytest.approx(2.0 / 0.05 + 8.0 * FINISH_SECONDS_PER_OUTPUT_MEGAPIXEL)
    finally:
        remotes.close()
        unpublished.stop()


@pytest.mark.timeout(10)
def test_the_refusal_is_a_413_with_its_own_code() -> None:
    error = EstimateExceedsDeadline("too long", estimate_s=120.0, deadline_s=10.0)
    mapped = http_error_for(error)
    assert (mapped.status, mapped.code) == (413, "estimate_exceeds_deadline")
    assert (error.estimate_s, error.deadline_s) == (120.0, 10.0)
