"""``chaoqing bench overhead``: what one remote call costs the gateway's v2 client.

One model-server process with instant sim models (``--model-option latency_ms=0``, no
batching, so no queue delay), called one call at a time over loopback by four clients with
the same payloads (KServe v2 with Triton's binary tensor extension both ways):

- ``chaoqing``: :class:`chaoqing.gateway.remote.RemoteModel.infer`, the gateway's client;
- ``tritonclient``: ``tritonclient.http.InferenceServerClient.infer`` (binary in and out);
- ``requests``: a ``requests.Session`` POST of the same encoded message, decoded the same way;
- ``urllib3``: an ``urllib3.HTTPConnectionPool`` POST, likewise.

``--server NAME=URL`` adds a v2 server someone else started, measured in the same rounds as
chaoqing's own (``built-in``): a Ray Serve deployment (``chaoqing ray deploy``) or any other
that serves ``sim-upscale-x2`` and ``sim-face`` with ``latency_ms=0`` and no batching, so that
the difference between servers is the cost of their hop. ``--clients`` narrows the clients.

The clients take turns in rounds (every client, then again), so the noise of a shared
machine falls on all of them alike. Reported: µs per call (p50, p90), and each client's
p50 against the gateway client's. The server's own time is in every figure; the
differences between clients are their overheads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

__all__ = ["named_urls", "overhead", "run_overhead"]

CLIENTS = ("chaoqing", "tritonclient", "requests", "urllib3")
PAYLOADS = {  # name: (model, input side); sim-upscale-x2 doubles, sim-face quadruples
    "tiny 8×8 → 16×16": ("sim-upscale-x2", 8),
    "face 128×128 → 512×512": ("sim-face", 128),
    "tile 256×256 → 512×512": ("sim-upscale-x2", 256),
}
WARMUP_CALLS = 10
CALL_DEADLINE_S = 30.0

BUILT_IN_SERVER = "built-in"

COLUMNS = [
    ("payload", "payload", ""),
    ("server", "server", ""),
    ("client", "client", ""),
    ("calls", "calls", "d"),
    ("µs per call p50", "us_per_call_p50", ".0f"),
    ("µs per call p90", "us_per_call_p90", ".0f"),
    ("p50 / chaoqing p50", "ratio_to_chaoqing", ".2f"),
    ("p50 / built-in p50", "ratio_to_built_in", ".2f"),
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


TARGETS_BUILT_IN = "chaoqing model server"  # --target rows: the gateway's own client on each server


def _server_callers(urls: dict[str, str], model: str, image: Any) -> dict[str, Callable[[], Any]]:
    """The gateway's client on each server: chaoqing's own (binary, and JSON), then the targets."""
    from chaoqing.config import RemoteSettings
    from chaoqing.gateway.remote import RemoteModels

    built_in = urls[TARGETS_BUILT_IN]
    remotes = {
        TARGETS_BUILT_IN: RemoteModels({model: [built_in]}, RemoteSettings(tensor_encoding="binary"))[model],
        f"{TARGETS_BUILT_IN}, JSON": RemoteModels({model: [built_in]}, RemoteSettings(tensor_encoding="json"))[model],
        **{name: RemoteModels({model: [url]}, RemoteSettings())[model]
           for name, url in urls.items() if name != TARGETS_BUILT_IN},
    }

    def caller(remote: Any) -> Callable[[], Any]:
        return lambda: remote.infer({"image": image}, ["image"], time.monotonic() + CALL_DEADLINE_S)["image"]

    return {name: caller(remote) for name, remote in remotes.items()}


def run_overhead(calls: int, rounds: int, servers: dict[str, str] | None = None,
                 clients: tuple[str, ...] = CLIENTS, targets: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every client on every payload and server (chaoqing's own, ``built-in``, then
    ``servers``: name → URL); one row per (payload, server, client). With ``targets`` (name →
    URL), the gateway's own client instead, on chaoqing's server with binary and with JSON
    tensors and on each target with the encoding it offers (``tensor_encoding = "auto"``); one
    row per (payload, server), named as its client. Raises BenchError."""
    import numpy as np

    from chaoqing.bench.common import raise_open_file_limit, start_model_server, summarize
    from chaoqing.errors import BenchError

    raise_open_file_limit()
    server = start_model_server(["sim-upscale-x2", "sim-face"], sim_latency_ms=0.0, max_batch_size=1)
    urls = {BUILT_IN_SERVER: server.url, **(servers or {})}
    rows: list[dict[str, Any]] = []
    try:
        rng = np.random.default_rng(0)
        for payload, (model, side) in PAYLOADS.items():
            image = rng.integers(0, 256, size=(1, side, side, 3), dtype=np.uint8)
            if targets:
                compared = _server_callers({TARGETS_BUILT_IN: server.url, **targets}, model, image)
                callers = {(name, name): call for name, call in compared.items()}
            else:
                callers = {
                    (server_name, name): call
                    for server_name, url in urls.items()
                    for name, call in _callers(url, model, image).items() if name in clients
                }
            scale = 4 if model == "sim-face" else 2
            for (server_name, name), call in callers.items():
                for _ in range(WARMUP_CALLS):
                    output = call()
                if tuple(output.shape) != (1, side * scale, side * scale, 3):
                    raise BenchError(f"{name} got {output.shape} from {model} at {server_name}")
            timings: dict[tuple[str, str], list[float]] = {key: [] for key in callers}
            per_round = max(1, calls // rounds)
            for _ in range(rounds):
                for key, call in callers.items():
                    for _ in range(per_round):
                        started = time.perf_counter()
                        call()
                        timings[key].append((time.perf_counter() - started) * 1e6)
            for server_name, name in callers:
                summary = summarize(timings[(server_name, name)])
                values = np.asarray(timings[(server_name, name)])
                reference = timings.get((server_name, "chaoqing"))
                built_in_key = (TARGETS_BUILT_IN, TARGETS_BUILT_IN) if targets else (BUILT_IN_SERVER, name)
                built_in = summarize(timings[built_in_key])["p50"]
                rows.append({"payload": payload, "model": model, "input_shape": [1, side, side, 3],
                             "server": server_name, "client": name,
                             "url": (targets or {}).get(server_name, server.url) if targets else urls[server_name],
                             "calls": len(values), "us_per_call_p50": summary["p50"],
                             "us_per_call_p90": float(np.percentile(values, 90)),
                             "ratio_to_chaoqing": summary["p50"] / summarize(reference)["p50"] if reference else None,
                             "ratio_to_built_in": summary["p50"] / built_in})
    finally:
        server.stop()
    return rows


def named_urls(context: click.Context, parameter: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """Click callback: ``NAME=URL`` values as a dict; raises click.BadParameter for a malformed one."""
    named: dict[str, str] = {}
    for value in values:
        name, separator, url = value.partition("=")
        if not separator or not name or not url.startswith(("http://", "https://")) or name == BUILT_IN_SERVER:
            raise click.BadParameter(f"{value!r} is not NAME=http://HOST:PORT (NAME not {BUILT_IN_SERVER!r})")
        named[name] = url.rstrip("/")
    return named


@click.command("overhead")
@click.option("--calls", default=400, show_default=True, type=click.IntRange(1), help="Calls per client and payload.")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1),
              help="Turns the clients take (calls are split evenly among them).")
@click.option("--server", "servers", multiple=True, metavar="NAME=URL", callback=named_urls,
              help="Also call this v2 server (sim-upscale-x2 and sim-face, latency_ms=0, no batching), "
                   "e.g. ray=http://127.0.0.1:8000.")
@click.option("--clients", "clients_text", default=",".join(CLIENTS), show_default=True,
              help="Comma-separated clients to measure.")
@click.option("--target", "targets", multiple=True, metavar="NAME=URL", callback=named_urls,
              help="Compare servers instead: the gateway's client on chaoqing's model server (binary and JSON "
                   "tensors) and on this v2 server with the encoding it offers, e.g. one without the binary "
                   "extension such as MLServer; it must serve sim-upscale-x2 and sim-face with no latency.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def overhead(calls: int, rounds: int, servers: dict[str, str], clients_text: str, targets: dict[str, str],
             as_json: bool) -> None:
    """µs per v2 call: the gateway's client vs tritonclient, requests, urllib3 (instant sim);
    with --target, chaoqing's model server vs other v2 servers."""
    from chaoqing.bench.common import Report, command_line, report
    from chaoqing.errors import BenchError

    try:
        import requests  # noqa: F401
        import tritonclient.http  # noqa: F401
        import urllib3  # noqa: F401
    except ImportError as exc:
        raise click.UsageError(f"overhead needs {exc.name}: pip install 'chaoqing[bench]'") from None
    clients = tuple(name.strip() for name in clients_text.split(",") if name.strip())
    unknown = sorted(set(clients) - set(CLIENTS))
    if unknown or not clients:
        raise click.UsageError(f"--clients: {', '.join(unknown) or 'none given'}; the clients are {', '.join(CLIENTS)}")
    try:
        if targets and servers:
            raise click.UsageError("--target compares servers with the gateway's client; --server compares "
                                   "clients on each server: give one or the other")
        rows = run_overhead(calls, rounds, servers, clients, targets)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    # the issue sets no target here: the table is the comparison
    settings = {"calls": calls, "rounds": rounds, "sim_latency_ms": 0, "servers": servers, "clients": list(clients),
                "targets": targets}
    report(Report("overhead", command_line(), settings, rows),
           COLUMNS, as_json=as_json)
