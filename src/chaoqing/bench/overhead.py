"""``chaoqing bench overhead``: what one remote call costs the gateway's v2 client.

One model-server process with instant sim models (``--model-option latency_ms=0``, no
batching, so no queue delay), called one call at a time over loopback by four clients with
the same payloads (KServe v2 with Triton's binary tensor extension both ways):

- ``chaoqing``: :class:`chaoqing.gateway.remote.RemoteModel.infer`, the gateway's client;
- ``tritonclient``: ``tritonclient.http.InferenceServerClient.infer`` (binary in and out);
- ``requests``: a ``requests.Session`` POST of the same encoded message, decoded the same way;
- ``urllib3``: an ``urllib3.HTTPConnectionPool`` POST, likewise.

The clients take turns in rounds (every client, then again), so the noise of a shared
machine falls on all of them alike. Reported: µs per call (p50, p90), and each client's
p50 against the gateway client's. The server's own time is in every figure; the
differences between clients are their overheads.

``--target NAME=URL`` (repeatable) compares servers instead of clients: the gateway's client
calls the same payloads on chaoqing's model server (binary tensors, and again with JSON
tensors) and on each target — any v2 server that serves ``sim-upscale-x2`` and ``sim-face``
with no latency, such as Seldon MLServer with :mod:`chaoqing.interop.mlserver_model`
(docs/scale-out.md says how) — in turns, the target's tensor encoding chosen as the gateway
chooses it. The differences are what each server, and JSON, add to a hop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

__all__ = ["overhead", "run_overhead"]

CLIENTS = ("chaoqing", "tritonclient", "requests", "urllib3")
PAYLOADS = {  # name: (model, input side); sim-upscale-x2 doubles, sim-face quadruples
    "tiny 8×8 → 16×16": ("sim-upscale-x2", 8),
    "face 128×128 → 512×512": ("sim-face", 128),
    "tile 256×256 → 512×512": ("sim-upscale-x2", 256),
}
WARMUP_CALLS = 10
CALL_DEADLINE_S = 30.0

COLUMNS = [
    ("payload", "payload", ""),
    ("client", "client", ""),
    ("calls", "calls", "d"),
    ("µs per call p50", "us_per_call_p50", ".0f"),
    ("µs per call p90", "us_per_call_p90", ".0f"),
    ("p50 / chaoqing p50", "ratio_to_chaoqing", ".2f"),
]


def _callers(url: str, model: str, image: Any) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per client, each returning the output array."""
    from urllib.parse import urlsplit

    import requests
    import tritonclient.http as triton_http
    import urllib3

    from chaoqing.config import RemoteSettings
    from chaoqing.gateway.remote import RemoteModels
    from chaoqing.protocol import v2

    parts = urlsplit(url)
    remote = RemoteModels({model: [url]}, RemoteSettings())[model]
    triton = triton_http.InferenceServerClient(f"{parts.hostname}:{parts.port}", concurrency=1)
    session = requests.Session()
    pool = urllib3.HTTPConnectionPool(parts.hostname or "127.0.0.1", parts.port, maxsize=1)
    path = f"/v2/models/{model}/infer"

    def call_chaoqing() -> Any:
        return remote.infer({"image": image}, ["image"], time.monotonic() + CALL_DEADLINE_S)["image"]

    def call_triton() -> Any:
        tensor = triton_http.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image, binary_data=True)
        requested = triton_http.InferRequestedOutput("image", binary_data=True)
        return triton.infer(model, [tensor], outputs=[requested]).as_numpy("image")

    def encoded() -> tuple[bytes, dict[str, str]]:
        message = v2.encode_infer_request({"image": image}, ["image"])
        return message.join(), message.http_headers()

    def decoded(status: int, headers: Any, body: bytes) -> Any:
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        length = headers.get(v2.HEADER_LENGTH_HEADER)
        return v2.decode_infer_response(body, int(length) if length is not None else None)["image"]

    def call_requests() -> Any:
        body, headers = encoded()
        response = session.post(url + path, data=body, headers=headers, timeout=CALL_DEADLINE_S)
        return decoded(response.status_code, response.headers, response.content)

    def call_urllib3() -> Any:
        body, headers = encoded()
        response = pool.request("POST", path, body=body, headers=headers, timeout=CALL_DEADLINE_S)
        return decoded(response.status, response.headers, response.data)

    return {"chaoqing": call_chaoqing, "tritonclient": call_triton, "requests": call_requests,
            "urllib3": call_urllib3}


BUILT_IN_SERVER = "chaoqing model server"


def _server_callers(urls: dict[str, str], model: str, image: Any) -> dict[str, Callable[[], Any]]:
    """The gateway's client on each server: chaoqing's own (binary, and JSON), then the targets."""
    from chaoqing.config import RemoteSettings
    from chaoqing.gateway.remote import RemoteModels

    built_in = urls[BUILT_IN_SERVER]
    remotes = {
        BUILT_IN_SERVER: RemoteModels({model: [built_in]}, RemoteSettings(tensor_encoding="binary"))[model],
        f"{BUILT_IN_SERVER}, JSON": RemoteModels({model: [built_in]}, RemoteSettings(tensor_encoding="json"))[model],
        **{name: RemoteModels({model: [url]}, RemoteSettings())[model]
           for name, url in urls.items() if name != BUILT_IN_SERVER},
    }

    def caller(remote: Any) -> Callable[[], Any]:
        return lambda: remote.infer({"image": image}, ["image"], time.monotonic() + CALL_DEADLINE_S)["image"]

    return {name: caller(remote) for name, remote in remotes.items()}


def run_overhead(calls: int, rounds: int, targets: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every client on every payload; one row per (payload, client). With ``targets`` (name →
    URL), the gateway's client on every server instead; one row per (payload, server).
    Raises BenchError."""
    import numpy as np

    from chaoqing.bench.common import raise_open_file_limit, start_model_server, summarize
    from chaoqing.errors import BenchError

    raise_open_file_limit()
    server = start_model_server(["sim-upscale-x2", "sim-face"], sim_latency_ms=0.0, max_batch_size=1)
    rows: list[dict[str, Any]] = []
    try:
        rng = np.random.default_rng(0)
        for payload, (model, side) in PAYLOADS.items():
            image = rng.integers(0, 256, size=(1, side, side, 3), dtype=np.uint8)
            if targets:
                callers = _server_callers({BUILT_IN_SERVER: server.url, **targets}, model, image)
            else:
                callers = _callers(server.url, model, image)
            scale = 4 if model == "sim-face" else 2
            for name, call in callers.items():
                for _ in range(WARMUP_CALLS):
                    output = call()
                if tuple(output.shape) != (1, side * scale, side * scale, 3):
                    raise BenchError(f"{name} got {output.shape} from {model}")
            timings: dict[str, list[float]] = {name: [] for name in callers}
            per_round = max(1, calls // rounds)
            for _ in range(rounds):
                for name, call in callers.items():
                    for _ in range(per_round):
                        started = time.perf_counter()
                        call()
                        timings[name].append((time.perf_counter() - started) * 1e6)
            reference = summarize(next(iter(timings.values())))["p50"]
            for name in callers:
                summary = summarize(timings[name])
                values = np.asarray(timings[name])
                rows.append({"payload": payload, "model": model, "input_shape": [1, side, side, 3], "client": name,
                             "calls": len(timings[name]), "us_per_call_p50": summary["p50"],
                             "us_per_call_p90": float(np.percentile(values, 90)),
                             "ratio_to_chaoqing": summary["p50"] / reference})
    finally:
        server.stop()
    return rows


@click.command("overhead")
@click.option("--calls", default=400, show_default=True, type=click.IntRange(1), help="Calls per client and payload.")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1),
              help="Turns the clients take (calls are split evenly among them).")
@click.option("--target", "targets", multiple=True, metavar="NAME=URL",
              help="Compare servers instead: the gateway's client on chaoqing's model server and on this v2 "
                   "server, which must serve sim-upscale-x2 and sim-face with no latency (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def overhead(calls: int, rounds: int, targets: tuple[str, ...], as_json: bool) -> None:
    """µs per v2 call: the gateway's client vs tritonclient, requests, urllib3 (instant sim);
    or, with --target, chaoqing's model server vs other v2 servers."""
    from chaoqing.bench.common import Report, command_line, report
    from chaoqing.errors import BenchError

    try:
        import requests  # noqa: F401
        import tritonclient.http  # noqa: F401
        import urllib3  # noqa: F401
    except ImportError as exc:
        raise click.UsageError(f"overhead needs {exc.name}: pip install 'chaoqing[bench]'") from None
    named: dict[str, str] = {}
    for target in targets:
        name, separator, url = target.partition("=")
        if not separator or not name or not url.startswith("http://"):
            raise click.BadParameter(f"{target!r} is not NAME=http://HOST:PORT", param_hint="--target")
        named[name] = url.rstrip("/")
    try:
        rows = run_overhead(calls, rounds, named)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    # the issue sets no target here: the table is the comparison
    report(Report("overhead", command_line(), {"calls": calls, "rounds": rounds, "sim_latency_ms": 0,
                                               "targets": named}, rows),
           COLUMNS, as_json=as_json)
