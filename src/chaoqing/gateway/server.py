"""Running the gateway: model endpoints (configured or embedded), gevent's WSGIServer, shutdown.

:func:`open_models` gives the gateway its remote models: the configured endpoints, plus an
embedded model-server child process for every needed model that has none.
:class:`GatewayServer` serves the app on a TCP_NODELAY listener with a bounded connection
pool, watches the hub with gevent's monitor thread (blocking events become metrics), and
stops gracefully (:meth:`GatewayServer.stop`): the listener closes; requests in flight get
``shutdown_grace_s`` to finish, and a request arriving on a kept-alive connection meanwhile
is answered 503 ``shutting_down``; what still runs after the grace is answered 503
``shutting_down`` with Retry-After; then the model-server children are stopped and a final
"stopped" line is logged. The job runner (:mod:`chaoqing.gateway.jobs`) starts with the server;
a stop releases its running jobs at once (back to queued, for another gateway sharing the
spool or the next start) and ends the event streams.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIServer
from gevent.socket import socket

from chaoqing.config import FACE_DESCRIPTOR, Config
from chaoqing.errors import ModelsNotReady
from chaoqing.gateway.app import Gateway
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.pipeline import quiet_expected_errors
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.supervisor import SIMULATOR_PREFIX, ModelServerSupervisor
from chaoqing.protocol.listen import QuietHandler, bound_port, create_listener

__all__ = ["MAX_BLOCKING_TIME_S", "GatewayServer", "open_models", "start_hub_watch"]

_log = logging.getLogger("chaoqing.gateway.server")

MAX_BLOCKING_TIME_S = 0.1  # gevent's monitor reports the hub blocked longer than this
CONNECTIONS_PER_IN_FLIGHT = 8  # idle keep-alive and health-check connections beside the work
HUB_BLOCK_LOG_INTERVAL_S = 1.0  # at most one "event loop blocked" warning per interval
# after the grace, the requests answered 503 shutting_down need a moment to unwind and write it
SHUTTING_DOWN_WRITE_TIMEOUT_S = 5.0
# model servers drain what is left of abandoned calls: at most one batch (the model server's own
# stop allows 10 s too); then the supervisor kills them
MODEL_SERVER_STOP_TIMEOUT_S = 10.0


def open_models(
    config: Config, models: Iterable[str], metrics: GatewayMetrics | None = None, *, log_level: str = "warning"
) -> tuple[RemoteModels, ModelServerSupervisor | None]:
    """Remote models for ``models``: configured endpoints, embedded children for the rest.

    Raises SupervisorError when an embedded model server does not start.
    """
    needed = list(dict.fromkeys(models))
    missing = [name for name in needed if name not in config.endpoints]
    supervisor = None
    endpoints = {name: urls for name, urls in config.endpoints.items()}
    companions: dict[str, tuple[str, ...]] = {}
    if (config.detector in missing and FACE_DESCRIPTOR not in config.endpoints
            and not config.detector.startswith(SIMULATOR_PREFIX)):
        # the detector's child also serves the face descriptor, for the identity guard (a
        # simulator's child takes sim options, which the descriptor refuses: it gets its own)
        companions[config.detector] = (FACE_DESCRIPTOR,)
        missing = [name for name in missing if name != FACE_DESCRIPTOR]
    if missing:
        supervisor = ModelServerSupervisor(missing, config.model_server, log_level=log_level,
                                           user_models=config.models, companions=companions)
        supervisor.start()
        endpoints.update(supervisor.endpoints)
    return RemoteModels(endpoints, config.remote, metrics), supervisor


def wait_until_ready(remotes: RemoteModels, models: Iterable[str], timeout_s: float) -> None:
    """Poll readiness until every model has a ready endpoint; raises ModelsNotReady."""
    wanted = list(models)
    ends_at = time.monotonic() + timeout_s
    while True:
        readiness = remotes.readiness()
        waiting = [name for name in wanted if not readiness.get(name)]
        if not waiting:
            return
        if time.monotonic() >= ends_at:
            raise ModelsNotReady(f"models not ready after {timeout_s:.0f} s: {', '.join(waiting)}")
        gevent.sleep(0.2)


def start_hub_watch(metrics: GatewayMetrics) -> None:
    """Turn gevent's monitor-thread reports of a blocked hub into metrics and a log line."""
    from gevent import config as gevent_config
    from gevent import events

    gevent_config.monitor_thread = True
    if "GEVENT_MAX_BLOCKING_TIME" not in os.environ:  # gevent's own variable wins (benchmarks lower it)
        gevent_config.max_blocking_time = MAX_BLOCKING_TIME_S
    gevent_config.print_blocking_reports = False  # its multi-line stderr report would break JSON logs
    hub = gevent.get_hub()
    last_logged = [0.0]

    def record(period_s: float, where: str) -> None:  # on the hub thread, once it runs again
        metrics.on_hub_blocked(period_s)
        now = time.monotonic()
        if now - last_logged[0] > HUB_BLOCK_LOG_INTERVAL_S:  # a long block is reported every period
            _log.warning("the event loop was blocked for over %.0f ms in %s", period_s * 1000, where)
            last_logged[0] = now

    def on_event(event: Any) -> None:  # on gevent's monitor thread: hand the report to the hub
        if isinstance(event, events.EventLoopBlocked) and event.hub is hub:
            hub.loop.run_callback_threadsafe(record, float(event.blocking_time), repr(event.greenlet)[:120])

    events.subscribers.append(on_event)
    # the monitor thread stops for good at its first check (0.1 s) if the hub greenlet has not
    # started by then (it tests `if not hub`, and a greenlet not yet started is false); gevent
    # scans every package's entry points while starting it, which can take that long: start the hub
    gevent.sleep(0)
    hub.start_periodic_monitoring_thread()


class ResponsesInProgress:
    """How many responses are being produced or written; idle keep-alive connections are not
    counted, so a stop can wait for the work without waiting for idle clients."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every response was written within ``timeout_s``."""
        return bool(self._idle.wait(timeout_s))


class _CountingHandler(QuietHandler):
    """QuietHandler that counts each response from its first byte read to its last written."""

    server: _GatewayWSGIServer

    def handle_one_response(self) -> None:
        responses = self.server.responses
        responses.begin()
        try:
            super().handle_one_response()
        finally:
            responses.end()


class _GatewayWSGIServer(WSGIServer):  # type: ignore[misc]
    """gevent's WSGIServer with a count of the responses in progress."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses = ResponsesInProgress()


class GatewayServer:
    """One gateway process's HTTP server.

    Pass ``listener`` (from :func:`chaoqing.protocol.listen.create_listener`) to bind before
    anything else starts; without it the address is bound here. Raises OSError when the
    address cannot be bound.
    """

    def __init__(self, config: Config, remotes: RemoteModels, supervisor: ModelServerSupervisor | None = None,
                 metrics: GatewayMetrics | None = None, *, watch_hub: bool = True,
                 listener: socket | None = None) -> None:
        self.config = config
        self.remotes = remotes
        self.supervisor = supervisor
        self.metrics = metrics or GatewayMetrics()
        quiet_expected_errors()
        self.gateway = Gateway(config, remotes, self.metrics)
        self.app = self.gateway.app
        self._listener = listener if listener is not None else create_listener(config.host, config.port)
        self.port = bound_port(self._listener)
        threadpool = gevent.get_hub().threadpool
        threadpool.maxsize = max(threadpool.maxsize, (os.cpu_count() or 2) * 2)
        self._server = _GatewayWSGIServer(
            self._listener, self.app, spawn=config.max_in_flight * CONNECTIONS_PER_IN_FLIGHT,
            log=None, error_log=_log, handler_class=_CountingHandler,
        )
        self._stopped = Event()
        if watch_hub:
            start_hub_watch(self.metrics)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> None:
        self.remotes.start_health_checks()
        self._server.start()
        self.gateway.jobs.start()

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` has finished. (gevent's own serve_forever wakes when the
        listener closes and kills the requests still running one second later.)"""
        if not self._server.started:
            self.start()
        self._stopped.wait()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting; drain; answer what is left 503 shutting_down; stop the children.

        Requests in flight get ``grace_s`` (``config.shutdown_grace_s`` when None) to finish;
        a request arriving on a kept-alive connection meanwhile is answered 503 shutting_down
        with Connection: close. /v1/enhance requests still running after the grace are
        answered 503 shutting_down with Retry-After. Idle keep-alive connections do not hold
        the shutdown up: only responses do. Ends with a "stopped" line in the log."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        started = time.monotonic()
        responses = self._server.responses
        try:
            self._server.close()  # the listener: new connections are refused from here on
            self.gateway.begin_shutdown()
            self.gateway.jobs.stop()  # jobs may run for hours: released now, not after the grace
            if not responses.wait_idle(grace_s):
                cancelled = self.gateway.cancel_in_flight()
                if cancelled:
                    _log.warning("%d request(s) outlasted the %g s grace; answering them 503 shutting_down",
                                 cancelled, grace_s)
                    responses.wait_idle(SHUTTING_DOWN_WRITE_TIMEOUT_S)
                if responses.count:
                    _log.warning("%d response(s) not written after the grace; closing their connections",
                                 responses.count)
            self._server.stop(timeout=0)  # closes idle keep-alive connections, and any response left
            self.remotes.close()
            if self.supervisor is not None:
                self.supervisor.stop(grace_s=MODEL_SERVER_STOP_TIMEOUT_S)
            _log.info("stopped in %.1f s", time.monotonic() - started)
        finally:
            self._stopped.set()
