"""``python -m chaoqing.bench.loadgen SPEC.json``: a load generator in a process of its own.

gevent and one keep-alive connection per client (TCP_NODELAY, each request in one write),
so a thousand clients cost a thousand sockets and greenlets, not threads. The spec (JSON)::

    {"host": "127.0.0.1", "port": 8080, "path": "/v1/enhance?scale=2",
     "body_path": "photo.jpg", "content_type": "image/jpeg",
     "clients": 1000, "rate": 80.0, "duration_s": 20, "timeout_s": 30, "seed": 1}

``rate`` > 0 paces the clients open-loop: each sends every ``clients / rate`` seconds from a
random phase, so together they offer ``rate`` requests per second; a client whose previous
answer came late sends at once (it never bursts to catch up). ``rate`` 0 is a closed loop:
each client sends its next request as soon as the last one is answered. Requests start
only within ``duration_s``; the ones running at its end are waited for.

Every client opens its connection at the start and keeps it, so ``clients`` connections are
open through the whole run even when each client sends rarely. Stdout gets one JSON
document: ``samples`` as [start offset s, latency ms, status] (status 0 for a request that got
no HTTP answer), ``errors`` by kind, ``connections`` opened, and ``elapsed_s``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["main", "run_load"]

START_DELAY_S = 0.2  # every client is spawned before the first request is due


def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the load ``spec`` describes (see the module notes) and return what was measured."""
    import gevent
    from gevent.pool import Group

    from chaoqing.bench.common import HttpConnection

    body = Path(spec["body_path"]).read_bytes()
    headers = {"Content-Type": spec.get("content_type", "application/octet-stream")}
    clients = int(spec["clients"])
    rate = float(spec.get("rate", 0.0))
    timeout_s = float(spec.get("timeout_s", 60.0))
    period = clients / rate if rate > 0 else 0.0
    random_phase = random.Random(spec.get("seed", 1))
    samples: list[tuple[float, float, int]] = []
    errors: Counter[str] = Counter()
    start = time.monotonic() + START_DELAY_S
    end = start + float(spec["duration_s"])

    connected: list[int] = []

    def client(first_at: float) -> None:
        connection = HttpConnection(spec["host"], int(spec["port"]), timeout_s=timeout_s)
        next_at = first_at
        try:
            try:  # every client holds its connection open from the start, sending or not
                connection.connect()
                connected.append(1)
            except OSError as exc:
                errors[f"connect_{type(exc).__name__}"] += 1
            while next_at < end:
                delay = next_at - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
                sent = time.monotonic()
                status = 0
                try:
                    with gevent.Timeout(timeout_s):
                        status = connection.request("POST", spec["path"], body, headers).status
                    if status != 200:
                        errors[f"http_{status}"] += 1
                except gevent.Timeout:
                    errors["timeout"] += 1
                    connection.close()
                except Exception as exc:  # noqa: BLE001 - any client-side failure is one error of its kind
                    errors[type(exc).__name__] += 1
                    connection.close()
                finished = time.monotonic()
                samples.append((sent - start, (finished - sent) * 1000.0, status))
                next_at = max(next_at + period, finished) if period else finished
        finally:
            connection.close()

    group = Group()
    for _ in range(clients):
        group.spawn(client, start + (random_phase.random() * period if period else 0.0))
    group.join()
    return {"samples": samples, "errors": dict(errors), "elapsed_s": time.monotonic() - start,
            "duration_s": float(spec["duration_s"]), "clients": clients, "rate": rate,
            "connections": len(connected)}


def main() -> None:
    from gevent import monkey

    monkey.patch_all()
    from chaoqing.bench.common import raise_open_file_limit

    raise_open_file_limit()
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    json.dump(run_load(spec), sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
