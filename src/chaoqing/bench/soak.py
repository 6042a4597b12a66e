"""``chaoqing bench soak``: minutes of mixed good and bad requests at moderate load.

A gateway process (``chaoqing serve``, embedded sim model servers) takes ``--clients``
closed-loop clients on loopback for ``--minutes``. Each request is drawn from a fixed mix:
photos that must come back (PNG, JPEG with faces, multipart, WebP out, no faces) and hostile
ones that must get their documented 4xx (not an image, truncated, a bomb header, absurd
parameters, wrong media type, an output over the limit, a form without its field, unknown
routes). Any other answer is *unexpected* and counted by kind.

Every ``--sample-s`` the gateway's RSS, open descriptors and threads are sampled (and its
model-server children's RSS). After a warm-up (10 % of the run, 10 to 60 s), RSS growth is
the median of the last minute of samples over the median of the first minute; the target is
under 10 %, and zero unexpected answers. Exits 1 when an answer was unexpected, or (runs of a minute or more)
when RSS grew past ``--max-rss-growth``.
"""

from __future__ import annotations

import os
import random
import statistics
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from chaoqing.bench.overload import (
    Client,
    GatewayProcess,
    Reply,
    percentiles,
    start_gateway_process,
    synthetic_png,
    write_json,
)

__all__ = ["run_soak", "soak"]

RSS_GROWTH_TARGET = 0.10
MIN_JUDGED_MINUTES = 1.0
WARMUP_FRACTION = 0.10
WARMUP_MIN_S = 10.0
WARMUP_MAX_S = 60.0
RSS_WINDOW_SAMPLES = 12  # a minute of samples at the default 5 s


@dataclass(frozen=True)
class SoakRequest:
    """One kind of request in the mix and the answer it must get."""

    name: str
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    code: str = ""  # the error code a 4xx must carry
    weight: float = 1.0

    def judge(self, reply: Reply) -> str:
        """'' when the reply is what this request must get, else what was wrong."""
        if reply.status != self.status:
            return f"{self.name}: {reply.status} {reply.error_code()}".strip()
        if self.code and reply.error_code() != self.code:
            return f"{self.name}: {reply.status} {reply.error_code()} (wanted {self.code})"
        if self.status == 200 and not reply.headers.get("content-type", "").startswith("image/"):
            return f"{self.name}: 200 without an image"
        return ""


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _jpeg(width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _multipart(field: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "soakboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"photo.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def request_mix(bad_fraction: float) -> list[SoakRequest]:
    """The good and the bad requests, weighted so that bad ones make ``bad_fraction`` of the load."""
    png = synthetic_png(160, 120)
    jpeg = _jpeg(320, 240)
    image = {"Content-Type": "image/png"}
    good = [
        SoakRequest("png with faces", "POST", "/v1/enhance?scale=2", png, image, 200),
        SoakRequest("jpeg with faces", "POST", "/v1/enhance?scale=2", jpeg, {"Content-Type": "image/jpeg"}, 200),
        SoakRequest("no faces, webp out", "POST", "/v1/enhance?faces=false&format=webp&quality=80", png, image, 200),
        SoakRequest("fast preset, scale 4", "POST", "/v1/enhance?preset=fast&scale=4", png, image, 200),
        SoakRequest("multipart", "POST", "/v1/enhance?scale=1.5", *_multipart("image", png), 200),
    ]
    bad = [
        SoakRequest("empty body", "POST", "/v1/enhance", b"", image, 400, "invalid_image"),
        SoakRequest("text as jpeg", "POST", "/v1/enhance", b"not an image at all", {"Content-Type": "image/jpeg"},
                    400, "invalid_image"),
        SoakRequest("truncated png", "POST", "/v1/enhance", png[: len(png) // 2], image, 400, "invalid_image"),
        SoakRequest("bomb header", "POST", "/v1/enhance", _png_header(60000, 60000), image, 413, "image_too_large"),
        SoakRequest("scale=nan", "POST", "/v1/enhance?scale=nan", png, image, 400, "invalid_parameter"),
        SoakRequest("quality=0", "POST", "/v1/enhance?format=jpeg&quality=0", png, image, 400, "invalid_parameter"),
        SoakRequest("text/plain", "POST", "/v1/enhance", png, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        SoakRequest("form without image", "POST", "/v1/enhance", *_multipart("photo", png), 400, "invalid_parameter"),
        SoakRequest("unknown route", "GET", "/nope", b"", {}, 404, "not_found"),
        SoakRequest("wrong method", "GET", "/v1/enhance", b"", {}, 405, "method_not_allowed"),
    ]
    good_weight = (1 - bad_fraction) / len(good)
    bad_weight = bad_fraction / len(bad)
    return [_weighted(item, good_weight) for item in good] + [_weighted(item, bad_weight) for item in bad]


def _weighted(item: SoakRequest, weight: float) -> SoakRequest:
    return SoakRequest(item.name, item.method, item.path, item.body, item.headers, item.status, item.code, weight)


@dataclass(frozen=True)
class Sample:
    elapsed_s: float
    requests: int
    rss_bytes: int
    children_rss_bytes: int
    descriptors: int
    threads: int


def _sample(gateway: GatewayProcess, started: float, requests: int) -> Sample:
    import psutil

    process = psutil.Process(gateway.process.pid)
    return Sample(round(time.monotonic() - started, 1), requests, int(process.memory_info().rss),
                  gateway.children_rss_bytes(), int(process.num_fds()), int(process.num_threads()))


def run_soak(*, minutes: float, clients: int, bad_fraction: float, sim_latency_ms: float, faces: int,
             sample_s: float, seed: int = 1, on_sample: Callable[[Sample], None] | None = None) -> dict[str, Any]:
    """Run the soak against a fresh gateway process; the result as a JSON-able dict."""
    import gevent

    mix = request_mix(bad_fraction)
    weights = [item.weight for item in mix]
    duration_s = minutes * 60
    warmup_s = min(WARMUP_MAX_S, max(WARMUP_MIN_S, duration_s * WARMUP_FRACTION)) if minutes >= MIN_JUDGED_MINUTES \
        else duration_s * WARMUP_FRACTION * 3
    outcomes: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    good_latencies: list[float] = []
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="chaoqing-soak-") as folder:
        gateway = start_gateway_process(Path(folder), max_in_flight=max(16, clients * 2), sim_latency_ms=sim_latency_ms,
                                        sim_faces=faces)
        started = time.monotonic()
        stop_at = started + duration_s
        try:
            def client_loop(index: int) -> None:
                rng = random.Random(seed * 1000 + index)
                client = Client(gateway.url)
                try:
                    while time.monotonic() < stop_at:
                        item = rng.choices(mix, weights)[0]
                        try:
                            reply = client.request(item.method, item.path, item.body, item.headers)
                        except OSError as exc:
                            unexpected[f"{item.name}: {type(exc).__name__}"] += 1
                            outcomes["connection error"] += 1
                            gevent.sleep(0.1)
                            continue
                        outcomes[f"{reply.status}"] += 1
                        problem = item.judge(reply)
                        if problem:
                            unexpected[problem] += 1
                        elif reply.status == 200:
                            good_latencies.append(reply.seconds)
                finally:
                    client.close()

            def sampler() -> None:
                while True:
                    sample = _sample(gateway, started, sum(outcomes.values()))
                    samples.append(sample)
                    if on_sample is not None:
                        on_sample(sample)
                    gevent.sleep(sample_s)

            watcher = gevent.spawn(sampler)
            gevent.joinall([gevent.spawn(client_loop, index) for index in range(clients)])
            watcher.kill()
            samples.append(_sample(gateway, started, sum(outcomes.values())))
        finally:
            gateway.stop()
        exit_code = gateway.process.returncode
    after_warmup = [sample for sample in samples if sample.elapsed_s >= warmup_s] or samples[-1:]
    first, last = after_warmup[0], samples[-1]
    # RSS swings by a tenth from one sample to the next (a 640×480 output's arrays come and go):
    # compare the median of the first and of the last windows after the warm-up
    window = max(1, min(RSS_WINDOW_SAMPLES, len(after_warmup) // 4))
    rss_early = statistics.median(sample.rss_bytes for sample in after_warmup[:window])
    rss_late = statistics.median(sample.rss_bytes for sample in after_warmup[-window:])
    rss_growth = (rss_late - rss_early) / rss_early
    total = sum(outcomes.values())
    judged = minutes >= MIN_JUDGED_MINUTES
    return {
        "scenario": "soak",
        "settings": {"minutes": minutes, "clients": clients, "bad_fraction": bad_fraction, "sim_latency_ms": sim_latency_ms,
                     "faces": faces, "sample_s": sample_s, "warmup_s": round(warmup_s, 1),
                     "load_average_1min_at_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()},
        "requests": total,
        "requests_per_s": round(total / duration_s, 1) if duration_s else 0.0,
        "statuses": dict(sorted(outcomes.items())),
        "unexpected": dict(unexpected),
        "unexpected_total": sum(unexpected.values()),
        "good_latency": {key: round(value, 1) for key, value in percentiles(good_latencies).items()},
        "rss_mb_after_warmup": round(first.rss_bytes / 2**20, 1),
        "rss_mb_last": round(last.rss_bytes / 2**20, 1),
        "rss_mb_early_median": round(rss_early / 2**20, 1),
        "rss_mb_late_median": round(rss_late / 2**20, 1),
        "rss_window_samples": window,
        "rss_mb_max": round(max(sample.rss_bytes for sample in samples) / 2**20, 1),
        "rss_growth": round(rss_growth, 4),
        "rss_growth_judged": judged,
        "children_rss_mb_after_warmup": round(first.children_rss_bytes / 2**20, 1),
        "children_rss_mb_last": round(last.children_rss_bytes / 2**20, 1),
        "descriptors_after_warmup": first.descriptors,
        "descriptors_last": last.descriptors,
        "threads_last": last.threads,
        "gateway_exit_code": exit_code,
        "samples": [sample.__dict__ for sample in samples],
        "passed": not unexpected and (not judged or rss_growth < RSS_GROWTH_TARGET),
    }


def print_result(result: dict[str, Any], max_rss_growth: float) -> None:
    latency = result["good_latency"]
    click.echo(f"{result['requests']} requests in {result['settings']['minutes']:g} min "
               f"({result['requests_per_s']}/s, {result['settings']['clients']} clients); statuses {result['statuses']}")
    click.echo(f"good requests: p50 {latency['p50_ms']} ms, p95 {latency['p95_ms']} ms, p99 {latency['p99_ms']} ms, "
               f"max {latency['max_ms']} ms")
    click.echo(f"gateway RSS (median of {result['rss_window_samples']} samples): {result['rss_mb_early_median']} MB after "
               f"warm-up → {result['rss_mb_late_median']} MB at the end (growth {result['rss_growth']:+.1%}, max "
               f"{result['rss_mb_max']} MB); model servers "
               f"{result['children_rss_mb_after_warmup']} → {result['children_rss_mb_last']} MB")
    click.echo(f"gateway descriptors: {result['descriptors_after_warmup']} → {result['descriptors_last']}; "
               f"threads at the end {result['threads_last']}; exit code after SIGTERM {result['gateway_exit_code']}")
    growth_ok = result["rss_growth"] < max_rss_growth
    judged = "" if result["rss_growth_judged"] else " (not judged: runs under a minute are mostly warm-up)"
    click.echo(f"{'PASS' if growth_ok or not result['rss_growth_judged'] else 'FAIL'}  RSS growth under "
               f"{max_rss_growth:.0%}{judged}")
    click.echo(f"{'PASS' if not result['unexpected'] else 'FAIL'}  unexpected answers: {result['unexpected_total']}")
    for problem, count in sorted(result["unexpected"].items(), key=lambda item: -item[1])[:20]:
        click.echo(f"      {count} × {problem}")


@click.command("soak")
@click.option("--minutes", default=10.0, show_default=True, type=click.FloatRange(0.01, 24 * 60.0),
              help="How long to run (a CI smoke run: 0.1).")
@click.option("--clients", default=4, show_default=True, type=click.IntRange(1, 256), help="Closed-loop clients.")
@click.option("--bad-fraction", default=0.3, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Share of hostile requests in the mix.")
@click.option("--sim-latency-ms", default=50.0, show_default=True, type=click.FloatRange(0.0, 60_000.0),
              help="Latency of every sim model.")
@click.option("--faces", default=2, show_default=True, type=click.IntRange(0, 64), help="Faces the sim detector reports.")
@click.option("--sample-s", default=5.0, show_default=True, type=click.FloatRange(0.1, 600.0),
              help="Seconds between RSS samples.")
@click.option("--max-rss-growth", default=RSS_GROWTH_TARGET, show_default=True, type=click.FloatRange(0.0, 10.0),
              help="Largest RSS growth after the warm-up that passes.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the result (with every sample) here as JSON.")
def soak(minutes: float, clients: int, bad_fraction: float, sim_latency_ms: float, faces: int, sample_s: float,
         max_rss_growth: float, json_path: Path | None) -> None:
    """Mixed good and hostile requests for minutes: 0 unexpected answers, RSS growth < 10 %."""
    def show(sample: Sample) -> None:
        click.echo(f"  {sample.elapsed_s:7.1f} s  {sample.requests:7d} requests  RSS {sample.rss_bytes / 2**20:6.1f} MB  "
                   f"fds {sample.descriptors:4d}  threads {sample.threads:3d}", err=True)

    result = run_soak(minutes=minutes, clients=clients, bad_fraction=bad_fraction, sim_latency_ms=sim_latency_ms,
                      faces=faces, sample_s=sample_s, on_sample=show)
    result["passed"] = not result["unexpected"] and (not result["rss_growth_judged"] or result["rss_growth"] < max_rss_growth)
    print_result(result, max_rss_growth)
    write_json(json_path, result)
    if not result["passed"]:
        sys.exit(1)
