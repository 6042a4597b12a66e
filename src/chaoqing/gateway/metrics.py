"""The gateway's Prometheus metrics, in a registry of its own (no global state).

Requests by route/status/preset, latency per stage (the Server-Timing stages), faces per
request, requests in flight, remote calls by model/endpoint/outcome with latency, circuit
state per endpoint, hub blocking events reported by gevent's monitor thread, and jobs
(submitted, running here, ended by how, in the spool by status, the spool's bytes).
:class:`GatewayMetrics` is also the remote client's :class:`chaoqing.gateway.remote.CallObserver`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from chaoqing.gateway.pipeline import EnhanceResult
    from chaoqing.gateway.remote import RemoteModels

__all__ = ["GatewayMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class GatewayMetrics:
    """All gateway metrics; ``exposition()`` renders them for ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        # which process answered: `serve --workers N` and gunicorn workers share one port, and a
        # scrape reaches one of them (each counts only its own requests)
        Gauge("chaoqing_gateway_process", "This gateway process (always 1), by pid", ["pid"],
              registry=registry).labels(str(os.getpid())).set(1)
        self.requests = Counter(
            "chaoqing_requests", "HTTP requests by route, status and preset", ["route", "status", "preset"], registry=registry
        )
        self.request_seconds = Histogram(
            "chaoqing_request_seconds", "End-to-end request latency", ["route", "preset"], buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "chaoqing_stage_seconds", "Latency of each pipeline stage (as in Server-Timing)", ["stage"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.faces_detected = Histogram(
            "chaoqing_faces_per_request", "Faces detected per request", buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.faces_enhanced = Counter("chaoqing_faces_enhanced", "Faces enhanced and composited", registry=registry)
        self.faces_failed = Counter("chaoqing_faces_failed", "Faces left as background after a failure", registry=registry)
        self.in_flight = Gauge("chaoqing_requests_in_flight", "Enhance requests being processed", registry=registry)
        self.remote_calls = Counter(
            "chaoqing_remote_calls", "Calls to model servers by model, endpoint and outcome", ["model", "endpoint", "outcome"],
            registry=registry,
        )
        self.remote_call_seconds = Histogram(
            "chaoqing_remote_call_seconds", "Latency of calls to model servers", ["model", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.circuit_state = Gauge(
            "chaoqing_circuit_state", "Endpoint circuit: 0 closed, 1 half-open, 2 open", ["model", "endpoint"],
            registry=registry,
        )
        self.hub_blocks = Counter(
            "chaoqing_hub_blocked", "Times gevent's monitor saw the hub blocked longer than the limit", registry=registry
        )
        # gevent's monitor reports once per period in which no greenlet switched, and does not
        # measure the block: reports × the period approximates the time blocked
        self.hub_block_seconds = Counter(
            "chaoqing_hub_blocked_seconds", "Approximate time the hub was blocked (reports × monitor period)",
            registry=registry,
        )

        self.jobs_submitted = Counter("chaoqing_jobs_submitted", "Jobs this process accepted (POST /v1/jobs)",
                                      registry=registry)
        self.jobs_running = Gauge("chaoqing_jobs_running", "Jobs this process is running", registry=registry)
        self.jobs_ended = Counter(
            "chaoqing_jobs_ended", "Runs this process ended: done, failed, cancelled, released (an orderly stop), "
            "taken_over (its heartbeat stalled and another gateway took the job)", ["outcome"], registry=registry,
        )
        self.jobs_in_spool = Gauge("chaoqing_jobs_in_spool", "Jobs in the spool by status, at this process's last look",
                                   ["status"], registry=registry)
        self.jobs_spool_bytes = Gauge("chaoqing_jobs_spool_bytes", "Bytes of inputs and results in the spool, at this "
                                      "process's last look", registry=registry)

    # -- the remote client's observer -----------------------------------------------------

    def on_call(self, model: str, endpoint: str, outcome: str, seconds: float) -> None:
        self.remote_calls.labels(model, endpoint, outcome).inc()
        self.remote_call_seconds.labels(model, endpoint).observe(seconds)

    def on_circuit(self, model: str, endpoint: str, state: str) -> None:
        self.circuit_state.labels(model, endpoint).set(CIRCUIT_VALUES.get(state, -1))

    # -- requests ------------------------------------------------------------------------

    def observe_request(self, route: str, status: int, preset: str, seconds: float, result: EnhanceResult | None) -> None:
        self.requests.labels(route, str(status), preset).inc()
        self.request_seconds.labels(route, preset).observe(seconds)
        if result is None:
            return
        for stage, stage_seconds in result.timings.items():
            self.stage_seconds.labels(stage).observe(stage_seconds)
        self.faces_detected.observe(result.faces_detected)
        self.faces_enhanced.inc(result.faces_enhanced)
        self.faces_failed.inc(len(result.face_errors))

    def on_hub_blocked(self, period_s: float) -> None:
        """One report of gevent's monitor: the hub did not switch for ``period_s``."""
        self.hub_blocks.inc()
        self.hub_block_seconds.inc(period_s)

    def refresh_circuits(self, remotes: RemoteModels) -> None:
        """Set every endpoint's circuit gauge from the client's current state (at scrape time:
        the client reports changes, but not the initial closed state or a silent half-open)."""
        for name in remotes.names():
            for endpoint in remotes[name].endpoints:
                self.circuit_state.labels(name, endpoint.url).set(CIRCUIT_VALUES.get(endpoint.circuit, -1))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when absent); for tests and benchmarks."""
        value = self.registry.get_sample_value(name, labels or {})
        return float(value) if value is not None else 0.0

    def __repr__(self) -> str:
        return "GatewayMetrics()"

    def __reduce__(self) -> Any:  # never pickled into worker processes by accident
        raise TypeError("GatewayMetrics belongs to one process")
