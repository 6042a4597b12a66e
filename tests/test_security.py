"""Security: API keys, no URL fetching, output paths that stay inside their folder, temporary
files cleaned up, no internals in responses, and request bodies bounded while they are read
(an oversized or endless upload is refused quickly and the connection closed, not drained)."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pytest
import requests
from conftest import SimGateway, run_cli
from PIL import Image

from chaoqing import batch
from chaoqing.batch import _write_atomically, plan_outputs
from chaoqing.config import Limits, load_config
from chaoqing.gateway import app as gateway_module
from chaoqing.modelserver.app import ModelServer
from chaoqing.protocol.listen import bound_port, create_listener

pytestmark = pytest.mark.timeout(60)

StartGateway = Callable[..., SimGateway]
SRC = Path(__file__).resolve().parents[1] / "src" / "chaoqing"


def _png(width: int = 48, height: int = 32) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# A refusal that reads no body answers within this: generous for a busy 2-core machine, and
# short of the 10 s these raw clients wait for an answer and of the 60 s body read timeout.
PROMPTLY_S = 5.0


def _post(gateway: SimGateway, body: bytes, query: str = "", headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{gateway.url}/v1/enhance{query}", data=body,
                         headers={"Content-Type": "image/png", **(headers or {})}, timeout=30)


# -- raw HTTP, for what requests will not send ---------------------------------------------


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, elapsed: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.elapsed = elapsed

    def json(self) -> Any:
        return json.loads(self.body)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _read_response(connection: socket.socket, started: float) -> RawResponse:
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before a response: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = connection.recv(65536)
        assert chunk, "the connection closed inside the response body"
        body += chunk
    return RawResponse(int(lines[0].split()[1]), headers, body, time.monotonic() - started)


def _closed_by_server(connection: socket.socket, within_s: float = 2.0) -> bool:
    """True when the server closes the connection (EOF or reset) within ``within_s``."""
    connection.settimeout(within_s)
    try:
        while True:
            if not connection.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- API keys ------------------------------------------------------------------------------


def test_api_keys_from_the_environment_guard_enhance_only(start_sim_gateway: StartGateway) -> None:
    config = load_config(environ={"CHAOQING_API_KEYS": " first-key , second-key "})
    assert config.api_keys == ("first-key", "second-key")
    gateway = start_sim_gateway(api_keys=config.api_keys)
    photo = _png()
    refused = {
        "no header": {},
        "wrong key": {"Authorization": "Bearer nope"},
        "a prefix of a key": {"Authorization": "Bearer first"},
        "a key plus more": {"Authorization": "Bearer first-key2"},
        "both keys": {"Authorization": "Bearer first-key,second-key"},
        "Basic scheme": {"Authorization": "Basic first-key"},
        "no scheme": {"Authorization": "first-key"},
        "empty bearer": {"Authorization": "Bearer "},
        "key in another header": {"X-Api-Key": "first-key"},
    }
    for label, headers in refused.items():
        response = _post(gateway, photo, headers=headers)
        assert response.status_code == 401, label
        assert response.json() == {"error": {"code": "unauthorized", "message": response.json()["error"]["message"]}}
        assert "first-key" not in response.text and "second-key" not in response.text, label
    for header in ("Bearer second-key", "bearer first-key", "Bearer   first-key  "):
        assert _post(gateway, photo, headers={"Authorization": header}).status_code == 200, header
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert requests.get(f"{gateway.url}{path}", timeout=10).status_code == 200, path
    document = requests.get(f"{gateway.url}/openapi.json", timeout=5).json()
    assert document["paths"]["/v1/enhance"]["post"]["security"] == [{"bearer": []}]
    assert "first-key" not in json.dumps(document)


def test_every_key_is_compared_in_constant_time(start_sim_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = start_sim_gateway(api_keys=("k-one", "k-two", "k-three"))
    compared: list[tuple[bytes, bytes]] = []
    original = gateway_module.hmac.compare_digest

    def counting(supplied: bytes, key: bytes) -> bool:
        compared.append((supplied, key))
        return original(supplied, key)

    monkeypatch.setattr(gateway_module.hmac, "compare_digest", counting)
    assert _post(gateway, _png(), headers={"Authorization": "Bearer k-one"}).status_code == 200
    assert [key for _, key in compared] == [b"k-one", b"k-two", b"k-three"], "a match does not stop the comparisons"


def test_a_refused_key_with_a_huge_body_is_answered_without_reading_it(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway(api_keys=("k",))
    connection = _connect(gateway.url)
    started = time.monotonic()
    connection.sendall(_head("/v1/enhance", {"Content-Type": "image/png", "Content-Length": str(1 << 30)}) + b"x" * 1000)
    response = _read_response(connection, started)
    assert response.status == 401 and response.headers.get("connection") == "close"
    assert _closed_by_server(connection)
    connection.close()


# -- no URL fetching -----------------------------------------------------------------------

HTTP_CLIENT_MODULES = ("urllib.request", "http.client", "requests", "httpx", "urllib3", "aiohttp", "pycurl")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_server_module_can_fetch_a_url_except_the_model_client() -> None:
    # chaoqing.bench holds load generators: client programs that the servers never import
    server_modules = [path for path in SRC.rglob("*.py") if "bench" not in path.relative_to(SRC).parts]
    assert len(server_modules) > 20
    for path in server_modules:
        imported = _imports(path)
        assert not any(name == module or name.startswith(module + ".") for name in imported for module in HTTP_CLIENT_MODULES), path
        if any(name.startswith("geventhttpclient") for name in imported):
            # remote.py calls the configured model endpoints; batch.py posts to the --server a user names
            assert path.name in ("remote.py", "batch.py"), f"{path} imports an HTTP client"


def test_urls_in_uploads_are_never_fetched(start_sim_gateway: StartGateway) -> None:
    canary = create_listener("127.0.0.1", 0)
    canary_url = f"http://127.0.0.1:{bound_port(canary)}/steal"
    visits: list[Any] = []
    watcher = gevent.spawn(lambda: visits.append(canary.accept()))
    gateway = start_sim_gateway()
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"><image xlink:href="{canary_url}" width="9" height="9"/></svg>'
    png_with_url = Image.open(io.BytesIO(_png()))
    buffer = io.BytesIO()
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("url", canary_url)
    png_with_url.save(buffer, "PNG", pnginfo=text)
    attempts = [
        requests.post(f"{gateway.url}/v1/enhance", data=canary_url.encode(), headers={"Content-Type": "text/uri-list"}, timeout=10),
        requests.post(f"{gateway.url}/v1/enhance", data=canary_url.encode(), headers={"Content-Type": "image/png"}, timeout=10),
        requests.post(f"{gateway.url}/v1/enhance", data=svg.encode(), headers={"Content-Type": "image/svg+xml"}, timeout=10),
        requests.post(f"{gateway.url}/v1/enhance", data=svg.encode(), headers={"Content-Type": "image/jpeg"}, timeout=10),
        requests.post(f"{gateway.url}/v1/enhance?url={canary_url}", data=_png(), headers={"Content-Type": "image/png"}, timeout=10),
        requests.post(f"{gateway.url}/v1/enhance", files={"url": (None, canary_url)}, timeout=10),
        requests.post(f"{gateway.url}/v1/enhance", data=buffer.getvalue(), headers={"Content-Type": "image/png"}, timeout=10),
    ]
    assert [response.status_code for response in attempts] == [415, 400, 415, 400, 200, 400, 200]
    gevent.sleep(0.2)
    assert visits == [], "the gateway connected to a URL found in an upload"
    watcher.kill()
    canary.close()


# -- output paths and temporary files ------------------------------------------------------


def test_plan_outputs_stays_inside_the_output_folder(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("a.png", "b..png", "c...png", "sub/d..jpg"):
        (photos / name).write_bytes(_png())
    out = tmp_path / "out"
    planned = plan_outputs([photos], out, None, recursive=True)
    assert sorted(item.target.relative_to(out.resolve()).as_posix() for item in planned) == [
        "a.png", "b..png", "c...png", "sub/d..jpg"
    ]
    # a file named by a path with ../ in it lands in the folder under its own name
    single = plan_outputs([photos / "sub" / ".." / "a.png"], out, "webp")
    assert single[0].target == out.resolve() / "a.webp"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        plan_outputs([photos], out, None, recursive=True)
    (out / "sub").unlink()
    (out / "a.png").symlink_to(outside / "a.png")
    with pytest.raises(ValueError, match="outside"):
        plan_outputs([photos / "a.png"], out, None)


def test_symlinked_input_folders_are_not_descended(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(_png())
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "private.png").write_bytes(_png())
    (photos / "link").symlink_to(secret, target_is_directory=True)
    planned = plan_outputs([photos], tmp_path / "out", None, recursive=True)
    assert [item.label for item in planned] == ["a.png"]


def test_the_cli_refuses_an_output_that_escapes_through_a_symlink(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(_png())
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    (out / "a.png").symlink_to(victim)
    result = run_cli("enhance", str(photos), "-o", str(out), "--overwrite", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "outside" in result.stderr and "Traceback" not in result.stderr
    assert victim.read_bytes() == b"keep me"


def test_write_atomically_leaves_no_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "photo.png"
    _write_atomically(target, b"first")
    assert target.read_bytes() == b"first"
    assert sorted(path.name for path in target.parent.iterdir()) == ["photo.png"]

    def broken_replace(source: str, destination: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch.os, "replace", broken_replace)
    with pytest.raises(OSError):
        _write_atomically(target, b"second")
    monkeypatch.undo()
    assert target.read_bytes() == b"first", "a failed write leaves the old output whole"
    assert sorted(path.name for path in target.parent.iterdir()) == ["photo.png"]

    class Interrupted(BaseException):
        pass

    real_fdopen = os.fdopen

    def fdopen_then_interrupt(descriptor: int, mode: str) -> Any:
        file = real_fdopen(descriptor, mode)
        original_write = file.write

        def write(data: bytes) -> int:
            original_write(data[:2])
            raise Interrupted()

        file.write = write  # type: ignore[method-assign]
        return file

    monkeypatch.setattr(batch.os, "fdopen", fdopen_then_interrupt)
    with pytest.raises(Interrupted):
        _write_atomically(target, b"third")
    monkeypatch.undo()
    assert sorted(path.name for path in target.parent.iterdir()) == ["photo.png"]

    # a symlink at the target is replaced, never written through
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    linked = tmp_path / "out" / "linked.png"
    linked.symlink_to(victim)
    _write_atomically(linked, b"new")
    assert victim.read_bytes() == b"keep me" and not linked.is_symlink() and linked.read_bytes() == b"new"


# -- no internals in responses -------------------------------------------------------------


def test_unexpected_errors_are_500_without_internals(
    start_sim_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start_sim_gateway()

    def broken(*arguments: Any) -> Any:
        raise RuntimeError("secret detail at /srv/chaoqing/internal.py")

    monkeypatch.setattr(gateway_module, "enhance_photo", broken)
    with caplog.at_level(logging.ERROR, logger="chaoqing.gateway.app"):
        response = _post(gateway, _png())
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret detail" in caplog.text, "the traceback goes to the log"
    assert _post(gateway, _png(), "?faces=false").status_code == 500  # and the process keeps serving


def test_model_server_errors_carry_no_traceback(start_model_server: Callable[..., ModelServer]) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1)
    for body in (b"{", b'{"inputs": 5}', b'{"inputs": [{"name": "image", "shape": [1], "datatype": "NOPE", "data": [1]}]}'):
        response = requests.post(f"{server.url}/v2/models/sim-upscale-x2/infer", data=body, timeout=10)
        assert response.status_code == 400
        assert set(response.json()) == {"error"} and "Traceback" not in response.text and "File \"" not in response.text


# -- request bodies bounded while read -----------------------------------------------------


def test_a_2gb_content_length_is_413_at_once_and_the_connection_closed(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway()
    connection = _connect(gateway.url)
    started = time.monotonic()
    connection.sendall(_head("/v1/enhance", {"Content-Type": "image/png", "Content-Length": str(2 << 30)}) + b"\0" * 65536)
    response = _read_response(connection, started)
    assert response.status == 413 and response.json()["error"]["code"] == "image_too_large"
    assert response.elapsed < PROMPTLY_S
    assert response.headers.get("connection") == "close"
    assert _closed_by_server(connection), "the server kept reading a body it refused"
    connection.close()
    assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200


def test_a_chunked_upload_past_the_limit_is_cut_off(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway(limits=Limits(max_body_bytes=1_000_000))
    connection = _connect(gateway.url)
    started = time.monotonic()
    connection.sendall(_head("/v1/enhance", {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}))
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    sent = [0]

    def stream_forever() -> None:
        try:
            while sent[0] < 2_000_000_000:
                connection.sendall(chunk)
                sent[0] += 65536
        except OSError:
            pass  # the server closed the connection: it stopped reading

    sender = gevent.spawn(stream_forever)
    response = _read_response(connection, started)
    assert response.status == 413 and response.json()["error"]["code"] == "image_too_large"
    assert response.elapsed < PROMPTLY_S
    sender.join(timeout=5)
    assert sender.dead, "the server is still reading an upload past its limit"
    # what the sender got out before the reset: the limit plus the kernel's socket buffers
    assert sent[0] < 64_000_000, f"{sent[0]} bytes sent"
    connection.close()


def test_a_chunked_upload_within_the_limit_is_enhanced(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway()
    photo = _png(40, 30)

    def pieces() -> Any:
        for start in range(0, len(photo), 1000):
            yield photo[start:start + 1000]

    response = requests.post(f"{gateway.url}/v1/enhance?scale=2&faces=false", data=pieces(),
                             headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (80, 60)


def _trickle(connection: socket.socket, data: bytes, times: int) -> None:
    """Send ``data`` every 0.1 s, ``times`` times, until the server closes the connection."""
    try:
        for _ in range(times):
            connection.sendall(data)
            gevent.sleep(0.1)
    except OSError:
        pass


def test_a_slow_loris_body_gets_408_within_the_read_timeout(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway(body_read_timeout_s=0.5)
    connection = _connect(gateway.url)
    started = time.monotonic()
    connection.sendall(_head("/v1/enhance", {"Content-Type": "image/png", "Content-Length": "10000"}))
    trickler = gevent.spawn(_trickle, connection, b"\0", 100)
    response = _read_response(connection, started)
    assert response.status == 408 and response.json()["error"]["code"] == "request_timeout"
    # at the read timeout, not when the trickle would have ended (10 s)
    assert 0.5 <= response.elapsed < PROMPTLY_S
    assert _closed_by_server(connection)
    trickler.kill()
    connection.close()


def test_a_body_that_was_read_keeps_the_connection_alive(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway()
    connection = _connect(gateway.url)
    body = b"this is not an image"
    for _ in range(2):
        started = time.monotonic()
        connection.sendall(_head("/v1/enhance", {"Content-Type": "image/png", "Content-Length": str(len(body))}) + body)
        response = _read_response(connection, started)
        assert response.status == 400 and response.headers.get("connection") != "close"
    connection.close()


def test_the_model_server_refuses_a_2gb_body_without_reading_it(start_model_server: Callable[..., ModelServer]) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1)
    connection = _connect(server.url)
    started = time.monotonic()
    connection.sendall(_head("/v2/models/sim-upscale-x2/infer", {"Content-Length": str(2 << 30), "Inference-Header-Content-Length": "10"}))
    connection.sendall(b"\0" * 65536)
    response = _read_response(connection, started)
    assert response.status == 413 and response.elapsed < PROMPTLY_S
    assert _closed_by_server(connection)
    connection.close()



def test_idle_and_slow_header_connections_are_closed(start_sim_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    from chaoqing.protocol.listen import QuietHandler

    monkeypatch.setattr(QuietHandler, "request_head_timeout_s", 0.5)
    gateway = start_sim_gateway()
    idle = _connect(gateway.url)
    started = time.monotonic()
    assert _closed_by_server(idle, within_s=PROMPTLY_S), "an idle connection holds a server slot for ever"
    assert 0.4 <= time.monotonic() - started, "closed before its 0.5 s"
    idle.close()

    slow = _connect(gateway.url)
    started = time.monotonic()
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
    trickler = gevent.spawn(_trickle, slow, b"X-Slow: x\r\n", 50)
    response = _read_response(slow, started)
    assert response.status == 408 and response.elapsed < PROMPTLY_S  # the trickle never ends the head
    assert _closed_by_server(slow)
    trickler.kill()
    slow.close()

    # a kept-alive connection used within the limit keeps working
    kept = _connect(gateway.url)
    for _ in range(3):
        started = time.monotonic()
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert _read_response(kept, started).status == 200
        gevent.sleep(0.2)
    kept.close()
