"""Jobs through the real HTTP gateway, against sim model servers, each with a spool of its own
(tmp_path): every state, progress rising in steps (GET and the event stream), the result the
same as /v1/enhance gives, cancellation that abandons the model calls, the TTL, the spool's
bounds, key scoping, a restart that loses nothing, and two gateways sharing one spool."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pytest
import requests
from conftest import SimGateway, connections_to, eventually
from fakes import FakeV2Server
from PIL import Image
from test_gateway import OpenApiChecker

from chaoqing.config import JobSettings, TileSettings
from chaoqing.gateway.jobs import (
    RUN_PREFIX,
    JobInput,
    JobState,
    JobStatus,
    Spool,
    key_digest,
)

pytestmark = pytest.mark.timeout(60)

StartGateway = Callable[..., SimGateway]
# tiles of at most 96 input pixels (the least the default overlap and margin allow is 65): a
# 320×240 photo is cut into a dozen, two at a time, so progress has steps to rise through
SMALL_TILES = TileSettings(tile_size=96, max_concurrent_tiles=2)
TILE_LATENCY_MS = 120


def _photo(width: int = 320, height: int = 240) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y) % 97 + 80], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


PHOTO = _photo()
SMALL_PHOTO = _photo(64, 48)


def _settings(spool: Path, **changes: Any) -> JobSettings:
    return JobSettings(spool_dir=str(spool), **changes)


def _submit(gateway: SimGateway, body: bytes = PHOTO, query: str = "?scale=2",
            headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{gateway.url}/v1/jobs{query}", data=body,
                         headers={"Content-Type": "image/png", **(headers or {})}, timeout=30)


def _job(gateway: SimGateway, job_id: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(f"{gateway.url}/v1/jobs/{job_id}", headers=headers, timeout=10)


def _wait_for(gateway: SimGateway, job_id: str, statuses: tuple[str, ...], within_s: float = 20.0,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        seen.append(_job(gateway, job_id, headers).json())
        return seen[-1].get("status") in statuses

    assert eventually(reached, within_s), seen[-1:]
    return seen[-1]


def _events(response: requests.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a Server-Sent Events stream; comments and retry skipped."""
    name, data = "message", ""
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                yield name, json.loads(data)
            name, data = "message", ""
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data += line[len("data: "):]


def _upscale_inferences(gateway: SimGateway) -> float:
    """Inference requests the gateway's upscaler model server answered (its own counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    exposition = requests.get(f"{gateway.model_servers['sim-upscale-x4'].url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(exposition) for sample in family.samples
               if sample.name == "chaoqing_model_requests_total" and sample.labels.get("outcome") == "ok")


def test_a_job_rises_in_steps_to_done_and_its_result_is_what_enhance_gives(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_sim_gateway(upscale_ms=TILE_LATENCY_MS, face_ms=300, faces=2, tiles=SMALL_TILES,
                                jobs=_settings(tmp_path))
    checker = OpenApiChecker(gateway)
    accepted = _submit(gateway, query="?scale=2&preset=balanced")
    assert accepted.status_code == 202, accepted.text
    checker.check("/v1/jobs", "post", accepted)
    job = accepted.json()
    assert accepted.headers["Location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert len(job["id"]) == 32 and job["status"] in ("queued", "running")
    assert job["input"] == {"media_type": "image/png", "bytes": len(PHOTO), "width": 320, "height": 240}

    streamed: list[tuple[str, dict[str, Any]]] = []

    def read_stream() -> None:
        with requests.get(f"{gateway.url}{job['links']['events']}", stream=True, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            streamed.extend(_events(response))

    reader = gevent.spawn(read_stream)
    polled: list[dict[str, Any]] = []
    while not polled or polled[-1]["status"] not in ("done", "failed"):
        response = _job(gateway, job["id"])
        checker.check("/v1/jobs/{job_id}", "get", response)
        polled.append(response.json())
        gevent.sleep(0.03)
    reader.join(timeout=10)
    assert polled[-1]["status"] == "done", polled[-1]
    assert eventually(lambda: gateway.server.gateway.jobs.event_streams == 0), "the ended stream is still counted"

    tiles = [state["progress"]["tiles"]["done"] for state in polled if state["progress"]["tiles"]]
    total = polled[-1]["progress"]["tiles"]["total"]
    assert total >= 6 and tiles[-1] == total
    assert tiles == sorted(tiles) and len(set(tiles)) >= 4, f"tiles done as polled: {tiles}"
    faces = [state["progress"]["faces"] for state in polled]
    assert polled[-1]["progress"]["faces"] == {"done": 2, "total": 2}
    assert {"done": 0, "total": 2} in faces or {"done": 0, "total": None} in faces
    running = [state for state in polled if state["status"] == "running" and state["progress"]["stage"] == "enhance"]
    assert running and all(state["progress"]["eta_s"] is not None for state in running)
    assert {state["progress"]["eta_basis"] for state in running} <= {"estimate", "measured"}
    assert "measured" in {state["progress"]["eta_basis"] for state in running}
    assert polled[-1]["result"]["faces_enhanced"] == 2 and polled[-1]["attempts"] == 1

    assert [name for name, _ in streamed][-1] == "done"
    progress_events = [data for name, data in streamed if name == "progress"]
    streamed_tiles = [data["progress"]["tiles"]["done"] for data in progress_events if data["progress"]["tiles"]]
    assert streamed_tiles == sorted(streamed_tiles) and len(set(streamed_tiles)) >= 4, streamed_tiles

    result = requests.get(f"{gateway.url}{job['links']['result']}", timeout=10)
    checker.check("/v1/jobs/{job_id}/result", "get", result)
    assert result.headers["X-Faces-Enhanced"] == "2" and result.headers["X-Output-Size"] == "640x480"
    direct = requests.post(f"{gateway.url}/v1/enhance?scale=2&preset=balanced", data=PHOTO,
                           headers={"Content-Type": "image/png"}, timeout=30)
    assert direct.status_code == 200
    assert result.content == direct.content
    assert result.headers["Content-Type"] == direct.headers["Content-Type"] == "image/png"


def test_an_alpha_channel_adds_its_own_tiles_to_the_count(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_sim_gateway(faces=0, upscale_ms=5, tiles=SMALL_TILES, jobs=_settings(tmp_path))
    rgb = np.asarray(Image.open(io.BytesIO(PHOTO)))
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (rgb.shape[0], 1))
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha])).save(buffer, "PNG")
    totals = []
    for body in (PHOTO, buffer.getvalue()):
        done = _wait_for(gateway, _submit(gateway, body, "?preset=fast").json()["id"], ("done", "failed"))
        assert done["status"] == "done", done
        totals.append(done["progress"]["tiles"])
    assert totals[1] == {"done": 2 * totals[0]["total"], "total": 2 * totals[0]["total"]}, totals


def test_a_job_waits_queued_while_max_running_jobs_run(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_sim_gateway(upscale_ms=600, faces=0, jobs=_settings(tmp_path, max_running=1))
    first = _submit(gateway, SMALL_PHOTO, "?preset=fast").json()
    _wait_for(gateway, first["id"], ("running",))
    second = _submit(gateway, SMALL_PHOTO, "?preset=fast").json()
    gevent.sleep(0.3)
    waiting = _job(gateway, second["id"]).json()
    assert waiting["status"] == "queued" and waiting["progress"]["stage"] is None
    assert waiting["progress"]["faces"] is None, "the fast preset enhances no faces"
    not_yet = requests.get(f"{gateway.url}/v1/jobs/{second['id']}/result", timeout=10)
    assert not_yet.status_code == 409 and not_yet.json()["error"]["code"] == "job_not_finished"
    assert "Retry-After" in not_yet.headers
    OpenApiChecker(gateway).check("/v1/jobs/{job_id}/result", "get", not_yet)
    assert _wait_for(gateway, first["id"], ("done",))["status"] == "done"
    finished = _wait_for(gateway, second["id"], ("done",))
    assert finished["result"]["faces_detected"] is None, "detection was skipped, not 0 faces found"


def test_a_model_error_fails_the_job_with_its_reason(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    broken = FakeV2Server("error_500", model="sim-upscale-x4")
    try:
        gateway = start_sim_gateway(faces=0, endpoints={"sim-upscale-x4": (broken.url,)}, jobs=_settings(tmp_path))
        job = _submit(gateway, SMALL_PHOTO, "?preset=fast").json()
        failed = _wait_for(gateway, job["id"], ("failed", "done"))
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "model_error" and failed["error"]["status"] == 502
        assert "broke on purpose" in failed["error"]["message"]
        assert failed["finished"] is not None and failed["expires"] is not None
        no_result = requests.get(f"{gateway.url}/v1/jobs/{job['id']}/result", timeout=10)
        assert no_result.status_code == 409 and no_result.json()["error"]["code"] == "job_has_no_result"
        OpenApiChecker(gateway).check("/v1/jobs/{job_id}", "get", _job(gateway, job["id"]))
    finally:
        broken.stop()


def test_delete_cancels_a_running_job_and_abandons_its_model_calls(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    hanging = FakeV2Server("hang", model="sim-upscale-x4")
    try:
        gateway = start_sim_gateway(faces=0, endpoints={"sim-upscale-x4": (hanging.url,)}, jobs=_settings(tmp_path))
        job = _submit(gateway, SMALL_PHOTO, "?preset=fast").json()
        _wait_for(gateway, job["id"], ("running",))
        assert eventually(lambda: hanging.calls >= 1 and connections_to(hanging.port) >= 1)
        started = time.monotonic()
        cancelled = requests.delete(f"{gateway.url}/v1/jobs/{job['id']}", timeout=10)
        assert cancelled.status_code == 200, cancelled.text
        assert time.monotonic() - started < 2.0
        assert cancelled.json()["status"] == "cancelled" and cancelled.json()["error"] is None
        OpenApiChecker(gateway).check("/v1/jobs/{job_id}", "delete", cancelled)
        assert eventually(lambda: connections_to(hanging.port) == 0, 5), "the model call was not abandoned"
        assert _job(gateway, job["id"]).json()["status"] == "cancelled", "a cancelled job keeps its state"
        assert requests.get(f"{gateway.url}/v1/jobs/{job['id']}/result", timeout=10).status_code == 409
        assert gateway.server.gateway.jobs.running == 0
        deleted = requests.delete(f"{gateway.url}/v1/jobs/{job['id']}", timeout=10)
        assert deleted.status_code == 204, "a finished job is deleted"
        assert _job(gateway, job["id"]).status_code == 404
        assert not (tmp_path / "jobs" / job["id"]).exists()
    finally:
        hanging.stop()


def test_finished_jobs_are_removed_after_their_ttl(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_sim_gateway(faces=0, upscale_ms=5, jobs=_settings(tmp_path, result_ttl_s=1.0))
    job = _submit(gateway, SMALL_PHOTO, "?preset=fast").json()
    done = _wait_for(gateway, job["id"], ("done",))
    assert (tmp_path / "jobs" / job["id"] / "result").exists()
    assert done["expires"] is not None
    assert eventually(lambda: not (tmp_path / "jobs" / job["id"]).exists(), 6), "the sweeper left it"
    missing = _job(gateway, job["id"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_the_spool_bounds_refuse_with_spool_full(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_sim_gateway(faces=0, upscale_ms=5, jobs=_settings(tmp_path / "count", max_jobs=2))
    checker = OpenApiChecker(gateway)
    for _ in range(2):
        _wait_for(gateway, _submit(gateway, SMALL_PHOTO, "?preset=fast").json()["id"], ("done",))
    refused = _submit(gateway, SMALL_PHOTO, "?preset=fast")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "spool_full"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400 + 1
    checker.check("/v1/jobs", "post", refused)
    assert len(os.listdir(tmp_path / "count" / "jobs")) == 2

    room = len(SMALL_PHOTO) * 2 + len(SMALL_PHOTO) // 2  # two uploads fit, a third does not
    small = start_sim_gateway(faces=0, upscale_ms=2000, jobs=_settings(tmp_path / "bytes", max_bytes=room))
    for _ in range(2):
        assert _submit(small, SMALL_PHOTO, "?preset=fast").status_code == 202
    over = _submit(small, SMALL_PHOTO, "?preset=fast")
    assert over.status_code == 503 and over.json()["error"]["code"] == "spool_full"
    assert "bytes" in over.json()["error"]["message"] and "Retry-After" in over.headers
    too_big = _submit(small, _photo(400, 300), "?preset=fast")
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "image_too_large"


def test_a_job_is_seen_only_with_the_key_that_made_it(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_sim_gateway(faces=0, upscale_ms=5, api_keys=("key-a", "key-b"), jobs=_settings(tmp_path))
    key_a, key_b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    assert _submit(gateway, SMALL_PHOTO, "?preset=fast").status_code == 401
    job = _submit(gateway, SMALL_PHOTO, "?preset=fast", headers=key_a).json()
    assert _wait_for(gateway, job["id"], ("done",), headers=key_a)["status"] == "done"
    for path in ("", "/result", "/events"):
        other = requests.get(f"{gateway.url}/v1/jobs/{job['id']}{path}", headers=key_b, timeout=10)
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found", path
        anonymous = requests.get(f"{gateway.url}/v1/jobs/{job['id']}{path}", timeout=10)
        assert anonymous.status_code == 401, path
    assert requests.delete(f"{gateway.url}/v1/jobs/{job['id']}", headers=key_b, timeout=10).status_code == 404
    mine = requests.get(f"{gateway.url}/v1/jobs/{job['id']}/result", headers=key_a, timeout=10)
    assert mine.status_code == 200 and mine.headers["X-Face-Detection"] == "skipped"
    assert "X-Faces-Detected" not in mine.headers
    stored = json.loads((tmp_path / "jobs" / job["id"] / "state.json").read_text())
    assert stored["key_sha256"] == key_digest("key-a") and "key-a" not in json.dumps(stored)
    unknown = requests.get(f"{gateway.url}/v1/jobs/{'0' * 32}", headers=key_a, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"


def test_a_gateway_stopped_mid_job_releases_it_and_the_next_one_finishes_it(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    first = start_sim_gateway(faces=0, upscale_ms=TILE_LATENCY_MS, tiles=SMALL_TILES, jobs=_settings(tmp_path))
    job = _submit(first, query="?preset=fast").json()
    assert eventually(lambda: (_job(first, job["id"]).json()["progress"]["tiles"] or {}).get("done", 0) >= 1, 10)
    streamed: list[str] = []

    def read_stream() -> None:
        with requests.get(f"{first.url}{job['links']['events']}", stream=True, timeout=30) as response:
            streamed.extend(name for name, _ in _events(response))

    reader = gevent.spawn(read_stream)
    assert eventually(lambda: bool(streamed))
    stopping = time.monotonic()
    first.server.stop(grace_s=30.0)
    assert time.monotonic() - stopping < 10, "an open event stream held the stop up"
    reader.join(timeout=5)
    assert reader.dead and "done" not in streamed, streamed
    stored = Spool(tmp_path).read_state(job["id"])
    assert stored is not None and stored.status is JobStatus.QUEUED and stored.lost == 0, stored
    second = start_sim_gateway(faces=0, upscale_ms=5, tiles=SMALL_TILES, jobs=_settings(tmp_path))
    done = _wait_for(second, job["id"], ("done", "failed"))
    assert done["status"] == "done" and done["attempts"] == 2, done
    assert requests.get(f"{second.url}/v1/jobs/{job['id']}/result", timeout=10).status_code == 200


def _abandoned_job(spool: Spool, owner: str, lost: int, heartbeat_age_s: float) -> str:
    """A job whose state says running under ``owner``, heartbeat ``heartbeat_age_s`` old,
    as a gateway that died mid-job leaves it."""
    job_id = os.urandom(16).hex()
    now = time.time()
    state = JobState(
        id=job_id, status=JobStatus.RUNNING, created=now - 60, input=JobInput("image/png", len(SMALL_PHOTO), 64, 48),
        parameters={"scale": 2.0, "faces": False, "preset": "fast", "output_format": None, "quality": None},
        runs=lost + 1, attempts=lost + 1, lost=lost, owner=owner, heartbeat=now - heartbeat_age_s, started=now - 50,
    )
    spool.create(dataclasses.replace(state, status=JobStatus.QUEUED), SMALL_PHOTO)
    assert spool.claim(job_id, lost + 1, owner)
    spool.write_state(state)
    return job_id


def test_a_job_left_running_by_a_dead_gateway_runs_again_or_fails_with_the_reason(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    live_elsewhere = _abandoned_job(spool, "elsewhere:4242:cafe", lost=0, heartbeat_age_s=0.0)
    stale = _abandoned_job(spool, "elsewhere:4242:beef", lost=0, heartbeat_age_s=60.0)
    spent = _abandoned_job(spool, "elsewhere:4242:f00d", lost=1, heartbeat_age_s=60.0)
    gateway = start_sim_gateway(faces=0, upscale_ms=5, jobs=_settings(tmp_path, heartbeat_timeout_s=2.0))
    again = _wait_for(gateway, stale, ("done", "failed"))
    assert again["status"] == "done" and again["attempts"] == 2
    failed = _wait_for(gateway, spent, ("done", "failed"))
    assert failed["status"] == "failed" and failed["error"]["code"] == "job_lost"
    assert "stopped without a word 2 time(s)" in failed["error"]["message"]
    assert _job(gateway, live_elsewhere).json()["status"] == "running", "a fresh heartbeat is left alone"
    assert _wait_for(gateway, live_elsewhere, ("done",), within_s=10)["attempts"] == 2, "...until it goes stale"
    assert (tmp_path / "jobs" / live_elsewhere / f"{RUN_PREFIX}2").exists()


def test_a_job_whose_gateway_process_is_gone_is_taken_over_without_waiting_for_its_heartbeat(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    job_id = _abandoned_job(Spool(tmp_path), f"{socket.gethostname()}:{gone}:0dead", lost=0, heartbeat_age_s=0.0)
    gateway = start_sim_gateway(faces=0, upscale_ms=5, jobs=_settings(tmp_path))  # heartbeat_timeout_s: 30 s
    started = time.monotonic()
    done = _wait_for(gateway, job_id, ("done", "failed"), within_s=10)
    assert done["status"] == "done" and done["attempts"] == 2
    assert time.monotonic() - started < 10, "a process known dead on this host is not waited for"


def test_delete_on_another_gateway_cancels_the_job_where_it_runs(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    runner = start_sim_gateway(faces=0, upscale_ms=20_000, jobs=_settings(tmp_path))
    other = start_sim_gateway(faces=0, upscale_ms=5, jobs=_settings(tmp_path, max_running=1))
    job = _submit(runner, SMALL_PHOTO, "?preset=fast").json()
    assert eventually(lambda: runner.server.gateway.jobs.running == 1, 10)
    cancelled = requests.delete(f"{other.url}/v1/jobs/{job['id']}", timeout=15)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    assert runner.server.gateway.jobs.running == 0, "the gateway that ran it stopped it"
    assert _job(runner, job["id"]).json()["status"] == "cancelled"


def test_two_gateways_on_one_spool_never_run_a_job_twice(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    settings = _settings(tmp_path, max_running=2)
    gateways = [start_sim_gateway(faces=0, upscale_ms=150, jobs=settings) for _ in range(2)]
    jobs = [_submit(gateways[index % 2], SMALL_PHOTO, "?preset=fast").json()["id"] for index in range(8)]
    finished = [_wait_for(gateways[0], job_id, ("done", "failed"), within_s=30) for job_id in jobs]
    assert [state["status"] for state in finished] == ["done"] * 8
    assert all(state["attempts"] == 1 for state in finished)
    calls = [_upscale_inferences(gateway) for gateway in gateways]
    assert sum(calls) == 8, f"one upscale call per job, each on one gateway: {calls}"
    assert all(count >= 1 for count in calls), f"both gateways took jobs: {calls}"
    runs = [sorted(name for name in os.listdir(tmp_path / "jobs" / job_id) if name.startswith(RUN_PREFIX))
            for job_id in jobs]
    assert runs == [[f"{RUN_PREFIX}1"]] * 8


def test_job_requests_are_checked_before_they_are_stored(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_sim_gateway(faces=0, jobs=_settings(tmp_path, max_input_pixels=10_000))
    checker = OpenApiChecker(gateway)
    for body, query, status, code in (
        (b"not an image", "", 400, "invalid_image"),
        (SMALL_PHOTO, "?scale=9", 400, "invalid_parameter"),
        (SMALL_PHOTO, "?preset=nope", 400, "invalid_parameter"),
        (PHOTO, "", 413, "image_too_large"),
    ):
        response = _submit(gateway, body, query)
        assert response.status_code == status and response.json()["error"]["code"] == code, (query, response.text)
        checker.check("/v1/jobs", "post", response)
    assert not (tmp_path / "jobs").exists() or os.listdir(tmp_path / "jobs") == []
    for bad in ("nope", "../../etc/passwd", "A" * 32):
        assert _job(gateway, bad).status_code == 404
