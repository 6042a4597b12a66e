"""A replica that accepts calls and never answers, and the start-up of replicas.

The gateway's v2 client against fake v2 servers on port 0: an attempt past its own timeout
(configured, or published in the model's metadata) is retried once on another replica within
the request's deadline, and the silent replica is ejected until it has waited out
``eject_for_s`` and a health check says it is ready. A replica that is still starting is no
failure: no "circuit open" / "circuit closed" pair is logged before its first ready.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import numpy as np
import pytest
from conftest import connections_to, eventually
from fakes import FakeV2Server

from chaoqing.config import RemoteSettings, load_config
from chaoqing.errors import ConfigError, ModelServerError, ModelTimeout, ModelUnavailable
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import (
    CIRCUIT_CLOSED,
    CIRCUIT_OPEN,
    Endpoint,
    RemoteModel,
    RemoteModels,
)
from chaoqing.gateway.server import wait_until_ready
from chaoqing.protocol.listen import bound_port, create_listener

pytestmark = pytest.mark.timeout(60)

MODEL = "fake-upscaler"
ATTEMPT_TIMEOUT_S = 0.3
DEADLINE_S = 5.0
SLACK_S = 1.5  # a healthy fake answers a 4×4 image in milliseconds; a busy CI machine adds the rest
EARLY = 0.9  # event-loop timers keep millisecond time: a timeout may end a hair before its nominal time
IMAGE = np.zeros((1, 4, 4, 3), dtype=np.uint8)


class _LoadingFake(FakeV2Server):
    """A FakeV2Server whose ready route answers 503 (loading) until ``loaded`` is set, and
    counts the health checks it gets."""

    def __init__(self, behaviour: str, **kwargs: Any) -> None:
        self.loaded = False
        self.ready_checks = 0
        super().__init__(behaviour, **kwargs)

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"].endswith("/ready"):
            self.ready_checks += 1
            if not self.loaded:
                return self._json(start_response, "503 Service Unavailable", {"ready": False, "state": "loading"})
        return super()._app(environ, start_response)


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeV2Server]]:
    """``fakes(behaviour, ...)`` starts a FakeV2Server (or ``kind=_LoadingFake``); all stop after the test."""
    started: list[FakeV2Server] = []

    def start(behaviour: str, *, kind: type[FakeV2Server] = FakeV2Server, **kwargs: Any) -> FakeV2Server:
        fake = kind(behaviour, model=MODEL, delay_s=0.0, **kwargs)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def remotes() -> Iterator[Callable[..., RemoteModels]]:
    """``remotes(urls, metrics, **settings)`` builds RemoteModels for MODEL; all closed after the test."""
    built: list[RemoteModels] = []

    def build(urls: tuple[str, ...], metrics: GatewayMetrics | None = None, **settings: Any) -> RemoteModels:
        models = RemoteModels({MODEL: urls}, RemoteSettings(**settings), metrics)
        built.append(models)
        return models

    yield build
    for models in built:
        models.close()


def _endpoint(model: RemoteModel, url: str) -> Endpoint:
    return next(endpoint for endpoint in model.endpoints if endpoint.url == url)


def _timed_infer(model: RemoteModel, deadline_s: float = DEADLINE_S) -> tuple[np.ndarray, float]:
    started = time.monotonic()
    outputs = model.infer({"image": IMAGE}, ["image"], started + deadline_s)
    return outputs["image"], time.monotonic() - started




# -- a silent replica ------------------------------------------------------------------------


def test_a_silent_replica_costs_one_attempt_timeout_then_is_ejected(
    fakes: Callable[..., FakeV2Server], remotes: Callable[..., RemoteModels]
) -> None:
    silent, healthy = fakes("hang"), fakes("slow")
    metrics = GatewayMetrics()
    # health checks run often and the silent replica says it is ready: they must not let it back early
    models = remotes((silent.url, healthy.url), metrics, attempt_timeout_s=ATTEMPT_TIMEOUT_S,
                     eject_for_s=30.0, health_interval_s=0.05)
    models.start_health_checks()
    model = models[MODEL]
    # two calls at once: fewest outstanding sends one to each replica
    first_pair = [gevent.spawn(_timed_infer, model) for _ in range(2)]
    gevent.joinall(first_pair, raise_error=True)
    assert silent.calls == 1 and healthy.calls == 2, "the silent replica's call was retried on the healthy one"
    for job in first_pair:
        upscaled, _ = job.value
        assert upscaled.shape == (1, 16, 16, 3)
    slowest = max(job.value[1] for job in first_pair)
    assert ATTEMPT_TIMEOUT_S * EARLY <= slowest < ATTEMPT_TIMEOUT_S + SLACK_S, f"{slowest:.2f} s"
    assert _endpoint(model, silent.url).circuit == CIRCUIT_OPEN
    labels = {"model": MODEL, "endpoint": silent.url, "outcome": "attempt_timeout"}
    assert metrics.sample("chaoqing_remote_calls_total", labels) == 1
    # ejected: later calls go to the healthy replica only
    for _ in range(6):
        _timed_infer(model)
    assert silent.calls == 1 and healthy.calls == 8
    assert _endpoint(model, silent.url).circuit == CIRCUIT_OPEN


def test_a_silent_replica_stays_ejected_while_its_health_check_says_not_ready(
    fakes: Callable[..., FakeV2Server], remotes: Callable[..., RemoteModels]
) -> None:
    silent, healthy = fakes("hang", kind=_LoadingFake), fakes("slow")
    assert isinstance(silent, _LoadingFake)
    silent.loaded = True
    eject_for_s = 0.4
    models = remotes((silent.url, healthy.url), attempt_timeout_s=ATTEMPT_TIMEOUT_S, eject_for_s=eject_for_s,
                     health_interval_s=0.05)
    models.start_health_checks()
    model = models[MODEL]
    gevent.joinall([gevent.spawn(_timed_infer, model) for _ in range(2)], raise_error=True)
    assert silent.calls == 1
    silent_endpoint = _endpoint(model, silent.url)
    assert silent_endpoint.circuit == CIRCUIT_OPEN
    # it stops saying ready: past eject_for_s, no trial call goes to it
    silent.loaded = False
    ejected_at = time.monotonic()
    while time.monotonic() - ejected_at < eject_for_s * 3:
        _timed_infer(model)
        gevent.sleep(0.05)
    assert silent.calls == 1, "a call reached a replica whose health check says it is not ready"
    assert silent_endpoint.circuit == CIRCUIT_OPEN
    # it recovers and says ready: a health check lets it back, and calls reach it again
    silent.behaviour, silent.loaded = "slow", True
    assert eventually(lambda: silent_endpoint.circuit == CIRCUIT_CLOSED)
    for _ in range(4):  # two at a time: one of each pair goes to the replica let back
        gevent.joinall([gevent.spawn(_timed_infer, model) for _ in range(2)], raise_error=True)
    assert silent.calls > 1


def test_the_deadline_caps_the_attempt_and_its_retry(
    fakes: Callable[..., FakeV2Server], remotes: Callable[..., RemoteModels]
) -> None:
    first, second = fakes("hang"), fakes("hang")
    model = remotes((first.url, second.url), attempt_timeout_s=ATTEMPT_TIMEOUT_S, health_interval_s=60)[MODEL]
    deadline_s = 0.5  # the retry gets only what is left of it
    started = time.monotonic()
    with pytest.raises(ModelTimeout):
        model.infer({"image": IMAGE}, ["image"], started + deadline_s)
    elapsed = time.monotonic() - started
    assert deadline_s * EARLY <= elapsed < deadline_s + SLACK_S, f"{elapsed:.2f} s"
    assert (first.calls, second.calls) == (1, 1), "one retry, and only one"


def test_an_attempt_timeout_longer_than_the_deadline_leaves_the_deadline_alone(
    fakes: Callable[..., FakeV2Server], remotes: Callable[..., RemoteModels]
) -> None:
    first, second = fakes("hang"), fakes("hang")
    model = remotes((first.url, second.url), attempt_timeout_s=30.0, health_interval_s=60)[MODEL]
    deadline_s = 0.4
    started = time.monotonic()
    with pytest.raises(ModelTimeout):
        model.infer({"image": IMAGE}, ["image"], started + deadline_s)
    elapsed = time.monotonic() - started
    assert deadline_s * EARLY <= elapsed < deadline_s + SLACK_S, f"{elapsed:.2f} s"
    assert first.calls + second.calls == 1, "the deadline is spent: no retry"
    assert all(endpoint.circuit == CIRCUIT_CLOSED for endpoint in model.endpoints), "one timeout is not an ejection"


def test_a_single_silent_replica_answers_model_timeout_at_its_attempt_timeout(
    fakes: Callable[..., FakeV2Server], remotes: Callable[..., RemoteModels]
) -> None:
    silent = fakes("hang")
    model = remotes((silent.url,), attempt_timeout_s=ATTEMPT_TIMEOUT_S, eject_for_s=30.0, health_interval_s=60)[MODEL]
    started = time.monotonic()
    with pytest.raises(ModelTimeout, match="attempt timeout"):
        model.infer({"image": IMAGE}, ["image"], started + DEADLINE_S)
    elapsed = time.monotonic() - started
    assert ATTEMPT_TIMEOUT_S * EARLY <= elapsed < ATTEMPT_TIMEOUT_S + SLACK_S, f"{elapsed:.2f} s"
    # the abandoned attempt's connection was closed, not kept in the pool (no health checks hold one)
    assert eventually(lambda: connections_to(silent.port) == 0)
    # ejected, nowhere to go: the next call fails without reaching it
    with pytest.raises(ModelUnavailable) as raised:
        model.infer({"image": IMAGE}, ["image"], time.monotonic() + DEADLINE_S)
    assert raised.value.retry_after_s >= 1.0
    assert silent.calls == 1


def test_a_model_that_publishes_its_attempt_timeout_uses_it(
    fakes: Callable[..., FakeV2Server], remotes: Callable[..., RemoteModels]
) -> None:
    silent = fakes("hang", parameters={"attempt_timeout_s": ATTEMPT_TIMEOUT_S})
    model = remotes((silent.url,), attempt_timeout_s=60.0, health_interval_s=60)[MODEL]
    assert model.attempt_timeout_s == 60.0, "the configured value until the metadata is read"
    assert model.metadata().attempt_timeout_s == ATTEMPT_TIMEOUT_S
    assert model.attempt_timeout_s == ATTEMPT_TIMEOUT_S
    started = time.monotonic()
    with pytest.raises(ModelTimeout, match="attempt timeout"):
        model.infer({"image": IMAGE}, ["image"], started + DEADLINE_S)
    assert time.monotonic() - started < ATTEMPT_TIMEOUT_S + SLACK_S


def test_attempt_timeout_configuration(remotes: Callable[..., RemoteModels], fakes: Callable[..., FakeV2Server]) -> None:
    assert RemoteSettings().attempt_timeout_s == 180.0
    environ = {"CHAOQING_REMOTE__ATTEMPT_TIMEOUT_S": "12.5"}
    assert load_config(environ=environ).remote.attempt_timeout_s == 12.5
    for bad in (-1.0, math.nan):
        with pytest.raises(ConfigError, match="attempt_timeout_s"):
            RemoteSettings(attempt_timeout_s=bad)
    no_limit = remotes((fakes("slow").url,), attempt_timeout_s=0.0)[MODEL]
    assert no_limit.attempt_timeout_s == math.inf, "0: the deadline alone"
    _timed_infer(no_limit)


# -- start-up ---------------------------------------------------------------------------------


def _free_port() -> int:
    listener = create_listener("127.0.0.1", 0)
    port = bound_port(listener)
    listener.close()
    return port


def test_a_replica_still_starting_logs_no_circuit_changes_before_its_first_ready(
    fakes: Callable[..., FakeV2Server], remotes: Callable[..., RemoteModels], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="chaoqing.gateway.remote")
    port = _free_port()
    models = remotes((f"http://127.0.0.1:{port}",), eject_after_failures=1, eject_for_s=0.2, health_interval_s=0.05)
    model = models[MODEL]
    endpoint = model.endpoints[0]
    server: list[_LoadingFake] = []

    def come_up() -> None:
        # not listening yet (refused) ...
        assert eventually(lambda: endpoint.circuit == CIRCUIT_OPEN)
        gevent.sleep(0.3)
        # ... then listening but loading (503) ...
        fake = fakes("slow", kind=_LoadingFake, port=port)
        assert isinstance(fake, _LoadingFake)
        server.append(fake)
        assert eventually(lambda: fake.ready_checks >= 2)
        # ... then ready
        fake.loaded = True

    bringing_up = gevent.spawn(come_up)
    wait_until_ready(models, [MODEL], timeout_s=20.0)  # what `chaoqing serve` does at start-up
    bringing_up.get(timeout=5)
    messages = [(record.levelno, record.getMessage()) for record in caplog.records]
    ready_at = next(index for index, (_, message) in enumerate(messages) if message.endswith(": ready"))
    before_ready = messages[:ready_at]
    assert any("circuit open" in message for _, message in before_ready), "it was probed while down"
    assert all(level == logging.DEBUG for level, message in before_ready if "circuit" in message), before_ready
    assert not any("circuit" in message and level > logging.DEBUG for level, message in messages[ready_at:]), messages
    assert endpoint.circuit == CIRCUIT_CLOSED
    assert sum(message.endswith(": ready") for _, message in messages) == 1
    _timed_infer(model)

    # a failure once it has been ready is one: logged as the circuit opening and closing
    caplog.clear()
    fake = server[0]
    fake.loaded = False
    assert model.check_health() == {endpoint.url: False}
    fake.loaded = True
    assert model.check_health() == {endpoint.url: True}
    fake.behaviour = "error_500"
    with pytest.raises(ModelServerError, match="broke on purpose"):
        _timed_infer(model)
    circuit_lines = [(record.levelno, record.getMessage().rpartition(": ")[2])
                     for record in caplog.records if "circuit" in record.getMessage()]
    assert circuit_lines == [
        (logging.INFO, "circuit open (health check)"),
        (logging.INFO, "circuit closed (health check)"),
        (logging.WARNING, "circuit open"),
    ]
    assert not any(record.getMessage().endswith(": ready") for record in caplog.records), "ready is said once"
