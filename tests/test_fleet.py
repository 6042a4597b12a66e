"""Several replicas per model: tiles spread over them, a replica killed mid-request, a
replica that comes back.

The replicas are real ``chaoqing model-server`` processes running ``sim-upscale-x4`` with
``--max-batch-size 1 --model-option concurrency=1``: each computes one tile at a time, taking
the simulated latency L per tile, the way one accelerator would. (Without those options a sim
server has unlimited concurrency, and one replica would be as fast as four.) Processes, not
in-process servers, so that a test can SIGKILL one and start it again on the same port.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gevent
import numpy as np
import pytest
import requests
from conftest import SimGateway
from PIL import Image

from chaoqing.config import RemoteSettings, TileSettings
from chaoqing.gateway.remote import CIRCUIT_CLOSED, CIRCUIT_OPEN, Endpoint, RemoteModels
from chaoqing.gateway.stages.tiling import plan_tiles
from chaoqing.modelserver.app import ModelServer

pytestmark = pytest.mark.timeout(120)

StartGateway = Callable[..., SimGateway]

UPSCALER = "sim-upscale-x4"
REPLICA_COUNT = 4
TILE_LATENCY_S = 0.75  # L: what one replica takes per tile
# 16 tiles: a 208×208 photo in 64 px tiles whose neighbours overlap by the minimum
# (overlap 8 + 2 × margin 4 = 16 px): 64 + 3 × (64 − 16) = 208, so 4 × 4 tiles.
FLEET_TILES = TileSettings(tile_size=64, overlap=8, margin=4, max_concurrent_tiles=REPLICA_COUNT)
PHOTO_SIDE = 208
TILE_COUNT = 16
# What a request adds to the model time at this size: 16 small calls on loopback,
# resampling, the canvas (measured here: 55–75 ms on an idle machine, up to 0.47 s with
# both cores saturated by other work). Less than one tile time, so a tile that waited behind
# another on a busy replica while one sat idle (+L) fails the test: power of two choices did
# that in most runs here (5·L–6·L), least outstanding calls never.
FLEET_OVERHEAD_S = 0.6
READY_TIMEOUT_S = 30.0
# The gateway's health checks run every RemoteSettings.health_interval_s (1 s by default); a
# replica that is ready again is used within about that, plus one probe's round trip.
READMISSION_WITHIN_S = 3.0


@dataclass
class Replica:
    """One ``chaoqing model-server`` child process on a fixed port."""

    port: int
    arguments: tuple[str, ...]
    process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ReplicaFleet:
    """Starts, kills and restarts model-server processes; stops every one at the end."""

    def __init__(self) -> None:
        self.replicas: list[Replica] = []

    def start(self, count: int, *arguments: str) -> list[Replica]:
        started = [self._spawn(Replica(0, arguments)) for _ in range(count)]
        for replica in started:
            self._read_port(replica)
        for replica in started:
            self._wait_ready(replica)
        self.replicas += started
        return started

    def kill(self, replica: Replica) -> None:
        """SIGKILL: no goodbye, connections reset, calls in flight are lost."""
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGKILL)
        replica.process.wait()

    def restart(self, replica: Replica) -> None:
        """Start the replica again on the port it had; returns once it is ready."""
        self._spawn(replica)
        self._read_port(replica)
        self._wait_ready(replica)

    def stop_all(self) -> None:
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.kill()
                replica.process.wait()
            if replica.process is not None and replica.process.stdout is not None:
                replica.process.stdout.close()

    def _spawn(self, replica: Replica) -> Replica:
        command = [sys.executable, "-m", "chaoqing", "model-server", "--model", UPSCALER,
                   "--port", str(replica.port), "--log-level", "error", *replica.arguments]
        replica.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        return replica

    def _read_port(self, replica: Replica) -> None:
        assert replica.process is not None and replica.process.stdout is not None
        line = replica.process.stdout.readline()
        assert "listening on " in line, f"the model server did not start: {line!r}"
        replica.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])

    def _wait_ready(self, replica: Replica) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if requests.get(f"{replica.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"replica on port {replica.port} not ready"
            time.sleep(0.05)


@pytest.fixture
def fleet() -> Iterator[ReplicaFleet]:
    replicas = ReplicaFleet()
    yield replicas
    replicas.stop_all()


def _one_tile_at_a_time(latency_s: float) -> tuple[str, ...]:
    return ("--model-option", f"latency_ms={latency_s * 1000}", "--max-batch-size", "1",
            "--model-option", "concurrency=1")


def _photo_png(side: int = PHOTO_SIDE) -> bytes:
    y, x = np.mgrid[0:side, 0:side]
    photo = np.stack([x * 255 // (side - 1), y * 255 // (side - 1), (x * y) % 251], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    return buffer.getvalue()


def _enhance(gateway: SimGateway, body: bytes, timeout: float = 60) -> requests.Response:
    return requests.post(f"{gateway.url}/v1/enhance?preset=fast&scale=2", data=body,
                         headers={"Content-Type": "image/png"}, timeout=timeout)


def _stage_seconds(response: requests.Response, stage: str) -> float:
    for item in response.headers["Server-Timing"].split(","):
        name, _, parameters = item.strip().partition(";")
        if name == stage:
            return float(parameters.split("dur=")[1].split(";")[0]) / 1000
    raise AssertionError(f"no {stage} in {response.headers['Server-Timing']}")


def _calls(gateway: SimGateway, replica: Replica, outcome: str = "ok") -> float:
    return gateway.metrics.sample("chaoqing_remote_calls_total",
                                  {"model": UPSCALER, "endpoint": replica.url, "outcome": outcome})


def _endpoint(gateway: SimGateway, replica: Replica) -> Endpoint:
    return next(item for item in gateway.server.remotes[UPSCALER].endpoints if item.url == replica.url)


def test_the_photo_is_cut_into_sixteen_tiles() -> None:
    plan = plan_tiles(PHOTO_SIDE, PHOTO_SIDE, 2 * PHOTO_SIDE, 2 * PHOTO_SIDE, FLEET_TILES.tile_size,
                      FLEET_TILES.overlap, FLEET_TILES.margin)
    assert len(plan.tiles) == TILE_COUNT


@pytest.mark.parametrize("sim_concurrency, rounds", [(1, 4), (0, 1)])
def test_concurrency_one_makes_a_sim_server_compute_one_call_at_a_time(
    start_model_server: Callable[..., ModelServer], sim_concurrency: int, rounds: int
) -> None:
    """The option the fleet tests rest on: 4 calls at once to one sim server take 4·L with
    ``concurrency=1`` (and batches of one), L without it (every batch waits on its own)."""
    latency_s = 0.5
    server = start_model_server([UPSCALER], sim_latency_ms=latency_s * 1000, max_batch_size=1,
                                sim_concurrency=sim_concurrency)
    remotes = RemoteModels({UPSCALER: (server.url,)}, RemoteSettings())
    model = remotes[UPSCALER]
    image = np.zeros((1, 8, 8, 3), np.uint8)
    model.infer({"image": image}, ["image"], time.monotonic() + 10)  # warm-up: the connection
    started = time.monotonic()
    calls = [gevent.spawn(model.infer, {"image": image}, ["image"], time.monotonic() + 10) for _ in range(4)]
    gevent.joinall(calls, raise_error=True)
    elapsed = time.monotonic() - started
    remotes.close()
    # a whole latency of slack on a busy machine; 1 round and 4 rounds stay far apart all the same
    assert rounds * latency_s <= elapsed < (rounds + 1) * latency_s, elapsed


def test_four_replicas_upscale_sixteen_tiles_in_four_tile_times(
    fleet: ReplicaFleet, start_sim_gateway: StartGateway
) -> None:
    """16 tiles, 4 replicas that each take L per tile and one tile at a time: 4·L, not 16·L.

    ``max_concurrent_tiles`` = 4 = the fleet's capacity (replicas × tiles each runs at once):
    every replica always has exactly one tile, and no tile waits in one replica's queue
    while another replica is idle. More tiles in flight would not be faster (they would
    queue at the replicas); fewer would leave replicas idle.
    """
    replicas = fleet.start(REPLICA_COUNT, *_one_tile_at_a_time(TILE_LATENCY_S))
    four = start_sim_gateway(endpoints={UPSCALER: tuple(replica.url for replica in replicas)}, tiles=FLEET_TILES)
    body = _photo_png()
    assert _enhance(four, _photo_png(FLEET_TILES.tile_size)).status_code == 200  # warm-up: metadata; one tile
    response = _enhance(four, body)
    assert response.status_code == 200, response.text
    upscale_s = _stage_seconds(response, "upscale")
    rounds = TILE_COUNT // REPLICA_COUNT
    assert rounds * TILE_LATENCY_S <= upscale_s <= rounds * TILE_LATENCY_S + FLEET_OVERHEAD_S, upscale_s
    assert all(_calls(four, replica) >= rounds for replica in replicas), "every replica took its share"


def test_a_replica_killed_mid_request_costs_one_retry_not_the_request(
    fleet: ReplicaFleet, start_sim_gateway: StartGateway
) -> None:
    latency_s = 0.3
    replicas = fleet.start(REPLICA_COUNT, *_one_tile_at_a_time(latency_s))
    gateway = start_sim_gateway(endpoints={UPSCALER: tuple(replica.url for replica in replicas)}, tiles=FLEET_TILES)
    body = _photo_png()
    expected = _enhance(gateway, body)
    assert expected.status_code == 200
    victim = replicas[1]
    # half-way through the second round of tiles: the victim is computing one of them
    killer = gevent.spawn_later(1.5 * latency_s, fleet.kill, victim)
    response = _enhance(gateway, body)
    killer.get()
    assert response.status_code == 200, response.text
    assert response.content == expected.content
    assert _calls(gateway, victim, "unreachable") >= 1, "the victim's tile failed there..."
    assert sum(_calls(gateway, replica) for replica in replicas) >= 2 * TILE_COUNT, "...and was done elsewhere"
    assert _endpoint(gateway, victim).circuit == CIRCUIT_OPEN
    # 16 tiles over the 3 that are left: 6 rounds at most, plus the round the kill cost
    assert _stage_seconds(response, "upscale") < 8 * latency_s + FLEET_OVERHEAD_S


def test_a_replica_that_comes_back_is_used_again_within_seconds(
    fleet: ReplicaFleet, start_sim_gateway: StartGateway
) -> None:
    replicas = fleet.start(2, *_one_tile_at_a_time(0.02))
    gateway = start_sim_gateway(
        endpoints={UPSCALER: tuple(replica.url for replica in replicas)}, tiles=FLEET_TILES,
        remote=RemoteSettings(),  # the defaults: health checks every second, ejection for 5 s
    )
    body = _photo_png()
    assert _enhance(gateway, body).status_code == 200
    victim = replicas[0]
    endpoint = _endpoint(gateway, victim)
    fleet.kill(victim)
    deadline = time.monotonic() + READMISSION_WITHIN_S
    while endpoint.circuit != CIRCUIT_OPEN:
        assert time.monotonic() < deadline, "the health check did not eject the dead replica"
        time.sleep(0.05)
    response = _enhance(gateway, body)
    assert response.status_code == 200, "the survivor does the work meanwhile"
    calls_before = _calls(gateway, victim)

    fleet.restart(victim)
    back_at = time.monotonic()
    while endpoint.circuit != CIRCUIT_CLOSED:
        assert time.monotonic() - back_at < READMISSION_WITHIN_S, "not re-admitted within a few seconds"
        time.sleep(0.05)
    assert _enhance(gateway, body).status_code == 200
    assert _calls(gateway, victim) > calls_before, "the replica that came back took tiles again"
