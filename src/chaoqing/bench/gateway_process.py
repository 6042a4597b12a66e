"""``python -m chaoqing.bench.gateway_process --config FILE``: one gateway process to measure.

What ``chaoqing serve`` runs — :class:`chaoqing.gateway.server.GatewayServer` with ``watch_hub=True``,
so gevent's monitor thread reports a blocked hub as ``chaoqing_hub_blocked_*`` metrics — for
a configuration that names every model endpoint (the bench starts the model servers itself,
as separate processes). Two additions, for benchmarks only:

- the monitor's threshold comes from ``--blocking-threshold-s`` (gevent's own
  ``GEVENT_MAX_BLOCKING_TIME``, which the server honours); the monitor only says that the hub
  was held longer than the threshold, not for how long;
- a greenlet switch tracer measures how long each greenlet other than the hub ran before it
  switched away — the time the hub could do nothing else — and publishes the longest as
  ``chaoqing_bench_hub_longest_hold_seconds{where="..."}`` on ``/metrics``, and the most
  thread CPU time one such run used as ``chaoqing_bench_hub_longest_hold_cpu_seconds`` (on a
  shared machine the wall-clock hold also counts the time the OS ran other processes).
  SIGUSR1 resets both (the bench sends it after its warm-up requests).

gevent's monitor only counts periods in which no greenlet switched; the tracer says how long
the longest hold was and in which greenlet.

The first line on stdout is ``... listening on URL``; SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["HubHoldTracer", "main"]

LONGEST_HOLD_METRIC = "chaoqing_bench_hub_longest_hold_seconds"
LONGEST_HOLD_CPU_METRIC = "chaoqing_bench_hub_longest_hold_cpu_seconds"
HOLDS_OVER_THRESHOLD_METRIC = "chaoqing_bench_hub_holds_over_threshold"
WHERE_MAX_CHARS = 160


class HubHoldTracer:
    """A greenlet trace function: the longest time one greenlet (not the hub) ran between
    switches on this thread. Chains to the trace function installed before it (gevent's
    monitor has one). Install and reset on the hub's thread."""

    def __init__(self, hub: Any, threshold_s: float) -> None:
        import greenlet

        self.hub = hub
        self.threshold_s = threshold_s
        self.longest_s = 0.0
        self.longest_cpu_s = 0.0
        self.where = ""
        self.holds_over_threshold = 0
        self._clock = time.perf_counter
        self._cpu_clock = time.thread_time
        self._since = self._clock()
        self._cpu_since = self._cpu_clock()
        self._previous = greenlet.settrace(self)

    def __call__(self, event: str, arguments: Any) -> None:
        now = self._clock()
        cpu_now = self._cpu_clock()
        if event in ("switch", "throw"):
            origin = arguments[0]
            if origin is not self.hub:
                held = now - self._since
                if held > self.threshold_s:
                    self.holds_over_threshold += 1
                if held > self.longest_s:
                    self.longest_s = held
                    self.where = repr(origin)[:WHERE_MAX_CHARS]
                self.longest_cpu_s = max(self.longest_cpu_s, cpu_now - self._cpu_since)
            self._since = now
            self._cpu_since = cpu_now
        if self._previous is not None:
            self._previous(event, arguments)

    def reset(self) -> None:
        self.longest_s = 0.0
        self.longest_cpu_s = 0.0
        self.where = ""
        self.holds_over_threshold = 0


class _TracerCollector:
    """Publishes a :class:`HubHoldTracer` in a Prometheus registry."""

    def __init__(self, tracer: HubHoldTracer) -> None:
        self.tracer = tracer

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        longest = GaugeMetricFamily(LONGEST_HOLD_METRIC, "Longest time one greenlet held the hub (bench tracer)",
                                    labels=["where"])
        longest.add_metric([self.tracer.where], self.tracer.longest_s)
        yield longest
        longest_cpu = GaugeMetricFamily(LONGEST_HOLD_CPU_METRIC, "Most CPU time one greenlet used between switches "
                                        "(the wall-clock hold less the time the OS ran other processes)")
        longest_cpu.add_metric([], self.tracer.longest_cpu_s)
        yield longest_cpu
        over = CounterMetricFamily(HOLDS_OVER_THRESHOLD_METRIC, "Greenlet runs longer than the blocking threshold")
        over.add_metric([], self.tracer.holds_over_threshold)
        yield over


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaoqing.bench.gateway_process")
    parser.add_argument("--config", required=True, help="gateway TOML naming every model endpoint")
    parser.add_argument("--blocking-threshold-s", type=float, default=0.01,
                        help="gevent monitor threshold (GEVENT_MAX_BLOCKING_TIME)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from gevent import monkey

    monkey.patch_all()
    arguments = _parse_arguments(argv)
    os.environ["GEVENT_MAX_BLOCKING_TIME"] = str(arguments.blocking_threshold_s)

    import gevent

    from chaoqing.config import load_config
    from chaoqing.errors import ConfigError
    from chaoqing.gateway.metrics import GatewayMetrics
    from chaoqing.gateway.remote import RemoteModels
    from chaoqing.gateway.server import GatewayServer
    from chaoqing.logs import configure_logging

    configure_logging(arguments.log_level, "text")
    try:
        config = load_config(arguments.config)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    missing = [name for name in config.models_needed() if name not in config.endpoints]
    if missing:
        sys.exit(f"error: no endpoint for {', '.join(missing)}")
    metrics = GatewayMetrics()
    server = GatewayServer(config, RemoteModels.from_config(config, metrics), None, metrics, watch_hub=True)
    tracer = HubHoldTracer(gevent.get_hub(), arguments.blocking_threshold_s)
    metrics.registry.register(_TracerCollector(tracer))
    server.start()
    print(f"chaoqing bench gateway listening on {server.url} pid={os.getpid()}", flush=True)

    stopping: list[bool] = []

    def on_stop() -> None:
        if not stopping:
            stopping.append(True)
            gevent.spawn(server.stop, 2.0)

    gevent.signal_handler(signal.SIGTERM, on_stop)
    gevent.signal_handler(signal.SIGINT, on_stop)
    gevent.signal_handler(signal.SIGUSR1, tracer.reset)
    server.serve_forever()


if __name__ == "__main__":
    main()
