"""The gateway's KServe v2 client: binary tensors over geventhttpclient, replicas, deadlines.

**Use only from greenlets on the hub thread** of a gevent process (monkey-patched, as the
gateway is). Nothing here is safe to call from gevent's threadpool workers or from plain
threads: connection pools, counters and health state belong to the hub.

Shape::

    RemoteModels                       every model the gateway calls, by name
     └── RemoteModel                   one model on one or more endpoints (replicas)
          └── Endpoint                 one server URL: a geventhttpclient connection pool
                                       with TCP_NODELAY, outstanding-call count, circuit

Each call has a deadline (an absolute ``time.monotonic()`` value, usually the request's),
and each attempt of a call its own limit: the deadline or the model's attempt timeout,
whichever comes first, enforced with :class:`gevent.Timeout` around the whole exchange, not
only per socket operation. The attempt's limit is also sent as Triton's ``timeout``
parameter so a server drops work nobody waits for.

Attempt timeout. A replica that accepts a call and never answers (a wedged process, a
stopped VM) would otherwise hold the call until the request's deadline. The attempt timeout
is the model's published ``parameters.attempt_timeout_s`` once its metadata has been read,
else ``RemoteSettings.attempt_timeout_s`` (0: none, the deadline alone). An attempt past it,
with the deadline not yet reached, counts as ``attempt_timeout``, ejects its replica at once
(it is let back after ``eject_for_s``, when a health check says ready or a trial call
succeeds) and is retried once on another replica within the same deadline.

Replicas. Each call goes to the available endpoint with the fewest calls outstanding from
this process (ties broken at random). The counts are this process's own and exact, so
looking at every endpoint costs nothing and cannot herd on stale figures; power of two
choices, made for many balancers that share stale load figures, left replicas idle here:
16 tiles on 4 replicas that compute one tile at a time took 5–6 tile times in most runs,
against 4 with the fewest outstanding (tests/test_fleet.py). An endpoint that refuses
connections is ejected at once; one that times out or answers 5xx is ejected after
``eject_after_failures`` failures in a row (its circuit opens: calls go to the other
replicas, or fail fast with ModelUnavailable and Retry-After when none is left); after
``eject_for_s`` one trial call is let through (half-open) and a success closes the circuit.
Active health checks (``GET /v2/models/{m}/ready`` on every endpoint every
``health_interval_s``) eject an endpoint that stops answering and re-admit one that is
ready again, so a restarted replica takes calls within about a second; an endpoint ejected
for failing calls while it says it is ready waits out ``eject_for_s`` (else a server that
answers every call with 500 would be let back every second). A call that fails on
one replica with a retryable error (unreachable, connection lost mid-call, 5xx, malformed
answer, the attempt timeout) is retried once on another replica within the same deadline;
client errors (4xx) and the deadline are not retried (nothing is left to retry with). While
a health check says an ejected endpoint is not ready, it stays ejected: no trial call goes
to a server that says it cannot take one.

Start-up. A replica a health check has never seen ready is starting, not failing: its
circuit is held open without a "circuit open" line, and its first ready is logged as
"ready". Failures after that are logged as circuits opening and closing.

Tensor encoding. Triton's binary tensor data extension is an extension: a plain v2 server
(Seldon MLServer) takes only JSON ``data`` arrays. With ``RemoteSettings.tensor_encoding``
"auto" (the default), each endpoint's first call reads the server metadata (``GET /v2``)
once: binary when its ``extensions`` list ``binary_tensor_data``, JSON when the list lacks
it (MLServer lists none), binary when /v2 has no such list or answers 4xx (a server that
predates the field; binary is what chaoqing's servers and Triton take). "binary" and "json"
skip the question. A JSON call sends ``Content-Type: application/json`` with flat ``data``
arrays and asks for JSON outputs; the answer is decoded the same way either way, binary or not, so a
server that answers JSON to a binary request works too.

Errors (all :class:`chaoqing.errors.ModelServerError`): ModelUnavailable (refused,
unreachable, 503, circuit open), ModelTimeout (deadline passed), BadModelResponse
(malformed or missing tensors), ModelServerError itself for other answers, carrying the
server's ``{"error": ...}`` message and status.
"""

from __future__ import annotations

import json
import logging
import math
import random
import socket as stdlib_socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import gevent
import numpy as np
from gevent import Timeout
from geventhttpclient import HTTPParseError
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.response import HTTPConnectionClosed, HTTPSocketPoolResponse

from chaoqing.config import Config, RemoteSettings
from chaoqing.errors import (
    BadModelResponse,
    MalformedMessage,
    ModelServerError,
    ModelTimeout,
    ModelUnavailable,
)
from chaoqing.protocol import v2

__all__ = [
    "CallObserver",
    "Endpoint",
    "ModelMetadata",
    "RemoteModel",
    "RemoteModels",
    "TensorMetadata",
]

_log = logging.getLogger("chaoqing.gateway.remote")

RESPONSE_BLOCK_SIZE = 256 * 1024  # recv size for responses: big tensors in few syscalls
HEALTH_TIMEOUT_S = 2.0
# one metadata attempt (a model server answers metadata from its event loop, not its queue);
# a fetch without a deadline may retry once within twice this
METADATA_TIMEOUT_S = 10.0
ATTEMPT_TIMEOUT_PARAMETER = "attempt_timeout_s"  # in a model's metadata parameters, seconds
# the extension name a v2 server lists in its metadata's "extensions" (Triton's protocol docs)
BINARY_EXTENSION = "binary_tensor_data"
BINARY, JSON = "binary", "json"  # RemoteSettings.tensor_encoding, once "auto" is resolved
HEALTH_CHECK = "health check"  # the reason given for circuit changes a health check makes
CIRCUIT_CLOSED, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN = "closed", "open", "half_open"

_Result = TypeVar("_Result")


class CallObserver(Protocol):
    """Receives what the client sees, for metrics. The default observer ignores it all."""

    def on_call(self, model: str, endpoint: str, outcome: str, seconds: float) -> None: ...

    def on_circuit(self, model: str, endpoint: str, state: str) -> None: ...


class _SilentObserver:
    def on_call(self, model: str, endpoint: str, outcome: str, seconds: float) -> None:
        pass

    def on_circuit(self, model: str, endpoint: str, state: str) -> None:
        pass


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What the gateway needs to know about a remote model, read from ``GET /v2/models/{m}``."""

    name: str
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The model's output/input size ratio (``parameters.scale``; 1 when absent)."""
        raw = self.parameters.get("scale", 1)
        try:
            return float(raw)
        except (TypeError, ValueError):
            return 1.0

    @property
    def max_batch_size(self) -> int:
        raw = self.parameters.get("max_batch_size", 0)
        return raw if isinstance(raw, int) else 0

    @property
    def attempt_timeout_s(self) -> float | None:
        """The longest one call should take, as the model server sees it
        (``parameters.attempt_timeout_s``); None when absent or not a positive number."""
        raw = self.parameters.get(ATTEMPT_TIMEOUT_PARAMETER)
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw <= 0:
            return None
        return float(raw)

    def input(self, name: str) -> TensorMetadata:
        """The input ``name``; raises BadModelResponse when the metadata lists no such input."""
        found = self.find_input(name)
        if found is None:
            raise BadModelResponse(f"model {self.name} has no input {name!r}", model=self.name)
        return found

    def find_input(self, name: str) -> TensorMetadata | None:
        """The input ``name``, or None when the metadata does not list it (a v2 server may
        publish no tensors at all: MLServer does for a model whose settings declare none)."""
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        return None

    @classmethod
    def from_json(cls, payload: Any, model: str) -> ModelMetadata:
        """Parse v2 model metadata; raises BadModelResponse when it is not metadata."""
        try:
            def tensors(key: str) -> tuple[TensorMetadata, ...]:
                return tuple(
                    TensorMetadata(str(item["name"]), str(item["datatype"]), tuple(int(dim) for dim in item["shape"]))
                    for item in payload.get(key) or ()  # MLServer leaves undeclared tensors out
                )

            parameters = payload.get("parameters") or {}
            if not isinstance(parameters, dict):
                parameters = {}
            return cls(str(payload["name"]), str(payload.get("platform", "")), tensors("inputs"), tensors("outputs"), parameters)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise BadModelResponse(f"model {model}: metadata is malformed ({exc})", model=model) from None


class _NoDelayPool(ConnectionPool):
    def after_connect(self, sock: Any) -> None:
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)


class _PoolResponse(HTTPSocketPoolResponse):
    """geventhttpclient's pooled response, but a Content-Length body is read straight into one
    preallocated buffer with recv_into: the parser's own read copies every block twice in
    Python (6.5 ms against 1.6 ms for a 3 MB tensor here, on the hub). A body cut short
    closes the socket; a complete one returns it to the pool when the server keeps alive."""

    def read_body(self) -> bytes | bytearray:
        sock, pool, length = self._sock, self._pool, self.content_length
        if sock is None or pool is None or self.message_complete or length is None or "transfer-encoding" in self:
            return bytes(self.read())
        body = bytearray(length)
        received = len(self._body_buffer)  # what came with the headers
        body[:received] = self._body_buffer
        self._body_buffer.clear()
        self._sock = self._pool = None
        view = memoryview(body)
        try:
            while received < length:
                count = sock.recv_into(view[received:])
                if not count:
                    raise HTTPConnectionClosed("connection closed in the middle of the body")
                received += count
        except BaseException:
            pool.release_socket(sock)
            raise
        if self.should_keep_alive():
            pool.return_socket(sock)
        else:
            pool.release_socket(sock)
        return body


@dataclass
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes | bytearray


class Endpoint:
    """One model server URL. Hub-thread only."""

    def __init__(self, url: str, settings: RemoteSettings) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r}: model endpoints must be http://host:port URLs")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.base_path = parts.path.rstrip("/")
        self.settings = settings
        self._pool = _NoDelayPool(
            self.host,
            self.port,
            self.host,
            self.port,
            size=settings.connections_per_endpoint,
            connection_timeout=settings.connect_timeout_s,
            # the deadline is enforced by gevent.Timeout around each call; this only
            # bounds a single socket operation of a call without a deadline
            network_timeout=3600.0,
        )
        self.outstanding = 0
        self.consecutive_failures = 0
        self.circuit = CIRCUIT_CLOSED
        self.open_until = 0.0
        self._trial_in_flight = False
        # whether a ready health check may close an open circuit before open_until: yes when it
        # opened because the server was down (refused, or not ready); no when the server answered
        # but failed (5xx, timeouts, malformed tensors) or went silent while it says it is ready
        self.readmit_when_ready = False
        # whether a health check has ever seen it ready: until then it is starting, not failing
        self.seen_ready = False
        # BINARY or JSON; None until "auto" has read the server's metadata (RemoteModel._encoding_for)
        self.tensor_encoding: str | None = None if settings.tensor_encoding == "auto" else settings.tensor_encoding

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, circuit={self.circuit}, outstanding={self.outstanding})"

    # -- circuit --------------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """Whether a call may go here now (a half-open circuit lets one trial through)."""
        if self.circuit == CIRCUIT_CLOSED:
            return True
        return now >= self.open_until and not self._trial_in_flight

    def record_success(self) -> str | None:
        self.consecutive_failures = 0
        self._trial_in_flight = False
        self.readmit_when_ready = False
        if self.circuit != CIRCUIT_CLOSED:
            self.circuit = CIRCUIT_CLOSED
            return CIRCUIT_CLOSED
        return None

    def record_failure(self, now: float, *, eject_now: bool, server_down: bool = False) -> str | None:
        """Count a failure; open the circuit at once (``eject_now``) or after enough in a row.

        ``server_down``: the server is not there (refused, not ready), so a ready health check
        may re-admit it before ``eject_for_s`` has passed."""
        self.consecutive_failures += 1
        self._trial_in_flight = False
        self.readmit_when_ready = server_down
        if eject_now or self.circuit != CIRCUIT_CLOSED or self.consecutive_failures >= self.settings.eject_after_failures:
            self.open_until = now + self.settings.eject_for_s
            if self.circuit != CIRCUIT_OPEN:
                self.circuit = CIRCUIT_OPEN
                return CIRCUIT_OPEN
        return None

    def hold_open(self, now: float) -> None:
        """Keep an ejected endpoint ejected (a health check says it is not ready): no trial call."""
        if self.circuit == CIRCUIT_OPEN:
            self.open_until = max(self.open_until, now + self.settings.eject_for_s)

    def begin(self, now: float) -> None:
        self.outstanding += 1
        if self.circuit != CIRCUIT_CLOSED and now >= self.open_until:
            self.circuit = CIRCUIT_HALF_OPEN
            self._trial_in_flight = True

    def end(self) -> None:
        self.outstanding -= 1

    # -- HTTP -----------------------------------------------------------------------------

    def exchange(
        self, method: str, path: str, chunks: Sequence[bytes | memoryview] = (), headers: Mapping[str, str] | None = None
    ) -> _Reply:
        """One HTTP exchange. Raises OSError / HTTP parse errors as they come; the caller's
        gevent.Timeout bounds it. The socket goes back to the pool only after a complete
        response; on any interruption it is closed, so the pool never loses a slot."""
        head = [f"{method} {self.base_path}{path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        body_length = sum(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes for chunk in chunks)
        head.append(f"Content-Length: {body_length}")
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        request_head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        for attempt in (1, 2):
            sock = self._pool.get_socket()
            try:
                if chunks and len(chunks[0]) < 65536:
                    sock.sendall(request_head + bytes(chunks[0]))  # one write: no small-segment stall
                    rest = chunks[1:]
                else:
                    sock.sendall(request_head)
                    rest = chunks
                for chunk in rest:
                    sock.sendall(chunk)
            except BaseException:
                self._pool.release_socket(sock)
                raise
            try:
                response = _PoolResponse(sock, self._pool, block_size=RESPONSE_BLOCK_SIZE, method=method)
            except HTTPConnectionClosed:
                # a kept-alive connection the server had closed: nothing was processed
                if attempt == 1:
                    continue
                raise
            body = response.read_body()
            return _Reply(response.status_code, {key.lower(): value for key, value in response.items()}, body)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._pool.close()


def _error_message(reply: _Reply) -> str:
    try:
        payload = json.loads(reply.body)
    except (ValueError, RecursionError):
        return reply.body[:200].decode("utf-8", "replace") or f"HTTP {reply.status}"
    error = payload.get("error") or payload.get("detail") if isinstance(payload, dict) else None  # detail: FastAPI's
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error) if error else f"HTTP {reply.status}"


def _says_ready(body: bytes | bytearray) -> bool:
    """Whether a 200 readiness answer means ready: the status says so, unless a JSON body says
    ``"ready": false`` (the health extension's body, which some servers send with 200)."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return True
    return not (isinstance(payload, dict) and payload.get("ready") is False)


class RemoteModel:
    """A model served by one or more endpoints. Hub-thread only."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        settings: RemoteSettings,
        observer: CallObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not urls:
            raise ValueError(f"model {name}: no endpoints")
        self.name = name
        self.settings = settings
        self.endpoints = [Endpoint(url, settings) for url in urls]
        self._observer: CallObserver = observer or _SilentObserver()
        self._rng = rng or random.Random()
        self._metadata: ModelMetadata | None = None
        self._health_checker: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r}, {self.endpoints!r})"

    # -- choosing -------------------------------------------------------------------------

    def _choose(self, exclude: Endpoint | None) -> Endpoint:
        now = time.monotonic()
        candidates = [endpoint for endpoint in self.endpoints if endpoint is not exclude and endpoint.available(now)]
        if not candidates:
            reopen = min((endpoint.open_until for endpoint in self.endpoints), default=now)
            error = ModelUnavailable(
                f"model {self.name}: no endpoint available (all {len(self.endpoints)} ejected after failures)",
                model=self.name,
            )
            error.retry_after_s = max(1.0, reopen - now)
            raise error
        fewest = min(endpoint.outstanding for endpoint in candidates)
        least_busy = [endpoint for endpoint in candidates if endpoint.outstanding == fewest]
        return least_busy[0] if len(least_busy) == 1 else self._rng.choice(least_busy)

    def _note(self, endpoint: Endpoint, change: str | None, reason: str = "", *, starting: bool = False) -> None:
        """Log and observe a circuit change. ``starting``: the endpoint has not been ready yet,
        and a server still starting is no failure (logged at DEBUG only)."""
        if change is not None:
            # a health check seeing a server go down is routine; a failing call is not
            level = logging.DEBUG if starting else logging.INFO if reason == HEALTH_CHECK else logging.WARNING
            _log.log(level, "model %s endpoint %s: circuit %s%s", self.name, endpoint.url, change,
                     f" ({reason})" if reason else "")
            self._observer.on_circuit(self.name, endpoint.url, change)

    @property
    def attempt_timeout_s(self) -> float:
        """How long one attempt of an inference call may go unanswered before its endpoint
        counts as silent: the model's published ``attempt_timeout_s`` once its metadata has
        been read, else ``settings.attempt_timeout_s``; infinite (the deadline alone) when
        that is 0."""
        published = self._metadata.attempt_timeout_s if self._metadata is not None else None
        if published is not None:
            return published
        configured = self.settings.attempt_timeout_s
        return configured if configured > 0 else math.inf

    # -- calls ----------------------------------------------------------------------------

    def _call(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        chunks: Sequence[bytes | memoryview],
        headers: Mapping[str, str] | None,
        deadline: float,
        purpose: str,
        attempt_timeout_s: float,
    ) -> _Reply:
        """One call to one endpoint, with circuit bookkeeping and error translation.

        It may take ``attempt_timeout_s`` or until ``deadline``, whichever comes first. Past
        its own timeout, the deadline not reached, the endpoint is taken for silent: ejected at
        once, the outcome ``attempt_timeout``. The connection of an interrupted exchange is
        closed, never returned to the pool. Raises ModelTimeout, ModelUnavailable or
        ModelServerError.
        """
        started = time.monotonic()
        remaining = deadline - started
        if remaining <= 0:
            raise ModelTimeout(f"model {self.name}: deadline passed before the call", model=self.name, endpoint=endpoint.url)
        limit_s = min(remaining, attempt_timeout_s)
        endpoint.begin(started)
        outcome = "error"
        timeout = Timeout(limit_s)
        timeout.start()
        try:
            try:
                reply = endpoint.exchange(method, path, chunks, headers)
            except Timeout as exc:
                if exc is not timeout:
                    raise
                if limit_s < remaining:
                    outcome = "attempt_timeout"
                    self._note(endpoint, endpoint.record_failure(time.monotonic(), eject_now=True),
                               f"no answer within the attempt timeout of {limit_s:g} s")
                    raise ModelTimeout(
                        f"model {self.name} at {endpoint.url}: no answer within the attempt timeout of "
                        f"{limit_s:.3f} s ({purpose})",
                        model=self.name, endpoint=endpoint.url,
                    ) from None
                outcome = "timeout"
                self._note(endpoint, endpoint.record_failure(time.monotonic(), eject_now=False))
                raise ModelTimeout(
                    f"model {self.name} at {endpoint.url}: no answer within {remaining:.3f} s ({purpose})",
                    model=self.name, endpoint=endpoint.url,
                ) from None
            except (OSError, HTTPConnectionClosed, HTTPParseError, ValueError) as exc:
                outcome = "unreachable"
                refused = isinstance(exc, ConnectionRefusedError)
                self._note(endpoint, endpoint.record_failure(time.monotonic(), eject_now=refused, server_down=refused))
                raise ModelUnavailable(
                    f"model {self.name} at {endpoint.url} is unreachable: {exc or type(exc).__name__}",
                    model=self.name, endpoint=endpoint.url,
                ) from exc
            if reply.status >= 500:
                outcome = f"http_{reply.status}"
                self._note(endpoint, endpoint.record_failure(time.monotonic(), eject_now=False))
                message = f"model {self.name} at {endpoint.url}: {_error_message(reply)}"
                if reply.status == 503:
                    raise ModelUnavailable(message, model=self.name, endpoint=endpoint.url, status=503)
                if reply.status == 504:
                    raise ModelTimeout(message, model=self.name, endpoint=endpoint.url, status=504)
                raise ModelServerError(message, model=self.name, endpoint=endpoint.url, status=reply.status)
            self._note(endpoint, endpoint.record_success())
            if reply.status >= 400:
                outcome = f"http_{reply.status}"
                raise ModelServerError(
                    f"model {self.name} at {endpoint.url} refused the request: {_error_message(reply)}",
                    model=self.name, endpoint=endpoint.url, status=reply.status,
                )
            outcome = "ok"
            return reply
        finally:
            timeout.close()
            endpoint.end()
            self._observer.on_call(self.name, endpoint.url, outcome, time.monotonic() - started)

    def _with_retry(self, attempt: Callable[[Endpoint], _Result], deadline: float, attempt_timeout_s: float) -> _Result:
        """Run ``attempt`` on a chosen endpoint; once more on another one after a retryable failure.

        A timeout is retried only when it was the attempt's own (``attempt_timeout_s`` ended
        before ``deadline``); the deadline leaves nothing to retry with.
        """
        endpoint = self._choose(None)
        started = time.monotonic()
        try:
            return attempt(endpoint)
        except ModelTimeout as first_error:
            if started + attempt_timeout_s >= deadline:
                raise
            retry_on: ModelServerError = first_error
        except (ModelUnavailable, BadModelResponse) as first_error:
            retry_on = first_error
        except ModelServerError as first_error:
            if first_error.status < 500:
                raise
            retry_on = first_error
        try:
            other = self._choose(endpoint)
        except ModelUnavailable:
            raise retry_on from None
        _log.info("model %s: retrying on %s after %s", self.name, other.url, retry_on)
        return attempt(other)

    def metadata(self, deadline: float | None = None) -> ModelMetadata:
        """The model's v2 metadata (fetched once, then cached).

        Raises ModelTimeout, ModelUnavailable, BadModelResponse or ModelServerError.
        """
        if self._metadata is None:
            stop = deadline if deadline is not None else time.monotonic() + 2 * METADATA_TIMEOUT_S

            def fetch(endpoint: Endpoint) -> ModelMetadata:
                reply = self._call(
                    endpoint, "GET", f"/v2/models/{self.name}", (), None, stop, "metadata", METADATA_TIMEOUT_S
                )
                try:
                    payload = json.loads(reply.body)
                except (ValueError, RecursionError):
                    raise BadModelResponse(f"model {self.name}: metadata is not JSON", model=self.name) from None
                return ModelMetadata.from_json(payload, self.name)

            self._metadata = self._with_retry(fetch, stop, METADATA_TIMEOUT_S)
        return self._metadata

    def _encoding_for(self, endpoint: Endpoint, deadline: float) -> str:
        """BINARY or JSON for ``endpoint``: the setting, or (auto) what its ``GET /v2`` lists,
        read once (see the module notes). A question that gets no answer (unreachable, 5xx,
        no time left) is asked again on the next call, and this one goes binary: its own
        failure, if the server is down, is the one to report."""
        if endpoint.tensor_encoding is not None:
            return endpoint.tensor_encoding
        extensions: Any = None
        try:
            with Timeout(max(0.0, min(deadline - time.monotonic(), HEALTH_TIMEOUT_S))):
                reply = endpoint.exchange("GET", "/v2")
        except (Timeout, OSError, HTTPConnectionClosed, HTTPParseError, ValueError):
            return BINARY
        if reply.status >= 500:
            return BINARY
        if reply.status == 200:
            try:
                payload = json.loads(reply.body)
            except (ValueError, RecursionError):
                payload = None
            extensions = payload.get("extensions") if isinstance(payload, dict) else None
        # a list without the extension (MLServer's is empty) means JSON; no list, or a 4xx, binary
        listed = isinstance(extensions, list)
        endpoint.tensor_encoding = JSON if listed and BINARY_EXTENSION not in extensions else BINARY
        _log.info("model %s endpoint %s: tensors go %s (server extensions: %s)", self.name, endpoint.url,
                  endpoint.tensor_encoding, extensions)
        return endpoint.tensor_encoding

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        deadline: float,
        *,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on ``inputs``; return the requested ``outputs`` (read-only arrays).

        ``deadline`` is absolute, on the ``time.monotonic()`` clock; each attempt also has
        :attr:`attempt_timeout_s`, after which it is retried once on another endpoint. Raises
        ModelTimeout, ModelUnavailable, BadModelResponse or ModelServerError.
        """
        attempt_timeout_s = self.attempt_timeout_s

        def attempt(endpoint: Endpoint) -> dict[str, np.ndarray]:
            # counted as outstanding while its encoding is asked (GET /v2 yields): a call chosen
            # beside this one must see it busy and go to the next replica
            endpoint.outstanding += 1
            try:
                binary = self._encoding_for(endpoint, deadline) == BINARY
            finally:
                endpoint.outstanding -= 1
            limit_us = max(1, int(min(deadline - time.monotonic(), attempt_timeout_s) * 1e6))
            message = v2.encode_infer_request(
                inputs, outputs, binary_inputs=binary, binary_outputs=binary, request_id=request_id,
                parameters={"timeout": limit_us},
            )
            headers = {key: value for key, value in message.http_headers().items() if key != "Content-Length"}
            reply = self._call(
                endpoint, "POST", f"/v2/models/{self.name}/infer", message.chunks, headers, deadline, "infer",
                attempt_timeout_s,
            )
            raw_length = reply.headers.get(v2.HEADER_LENGTH_HEADER.lower())
            try:
                header_length = int(raw_length) if raw_length is not None else None
                tensors = v2.decode_infer_response(reply.body, header_length)
            except (ValueError, MalformedMessage) as exc:
                raise BadModelResponse(
                    f"model {self.name} at {endpoint.url}: malformed response ({exc})", model=self.name, endpoint=endpoint.url
                ) from None
            missing = [name for name in outputs if name not in tensors]
            if missing:
                raise BadModelResponse(
                    f"model {self.name} at {endpoint.url}: response lacks {', '.join(missing)}",
                    model=self.name, endpoint=endpoint.url,
                )
            return {name: tensors[name] for name in outputs}

        return self._with_retry(attempt, deadline, attempt_timeout_s)

    # -- health ---------------------------------------------------------------------------

    def check_health(self) -> dict[str, bool]:
        """Ask each endpoint whether it is ready; eject or re-admit accordingly.

        An endpoint never seen ready is starting: held out without a circuit-open line, and
        its first ready is logged as "ready". An ejected endpoint that says it is not ready
        stays ejected."""
        results: dict[str, bool] = {}

        def probe(endpoint: Endpoint) -> None:
            ready = False
            try:
                with Timeout(HEALTH_TIMEOUT_S):
                    reply = endpoint.exchange("GET", f"/v2/models/{self.name}/ready")
                ready = reply.status == 200 and _says_ready(reply.body)
            except (Timeout, OSError, HTTPConnectionClosed, HTTPParseError, ValueError):
                ready = False
            now = time.monotonic()
            starting = not endpoint.seen_ready
            if ready and endpoint.circuit != CIRCUIT_CLOSED and (endpoint.readmit_when_ready or now >= endpoint.open_until):
                self._note(endpoint, endpoint.record_success(), HEALTH_CHECK, starting=starting)
            elif not ready and endpoint.circuit == CIRCUIT_CLOSED:
                self._note(endpoint, endpoint.record_failure(now, eject_now=True, server_down=True), HEALTH_CHECK,
                           starting=starting)
            elif not ready:
                endpoint.hold_open(now)
            if ready and starting:
                endpoint.seen_ready = True
                _log.info("model %s endpoint %s: ready", self.name, endpoint.url)
            results[endpoint.url] = ready

        gevent.joinall([gevent.spawn(probe, endpoint) for endpoint in self.endpoints], timeout=HEALTH_TIMEOUT_S * 2)
        return results

    def start_health_checks(self) -> None:
        if self._health_checker is None:
            self._health_checker = gevent.spawn(self._health_loop)

    def _health_loop(self) -> None:
        while True:
            self.check_health()
            gevent.sleep(self.settings.health_interval_s)

    def close(self) -> None:
        if self._health_checker is not None:
            self._health_checker.kill()
            self._health_checker = None
        for endpoint in self.endpoints:
            endpoint.close()


class RemoteModels:
    """Every model the gateway calls, by name. Hub-thread only."""

    def __init__(
        self,
        endpoints: Mapping[str, Sequence[str]],
        settings: RemoteSettings,
        observer: CallObserver | None = None,
    ) -> None:
        self.settings = settings
        self._models = {name: RemoteModel(name, urls, settings, observer) for name, urls in endpoints.items()}

    @classmethod
    def from_config(cls, config: Config, observer: CallObserver | None = None) -> RemoteModels:
        return cls(config.endpoints, config.remote, observer)

    def __getitem__(self, name: str) -> RemoteModel:
        model = self._models.get(name)
        if model is None:
            raise ModelUnavailable(f"no endpoint is configured for model {name!r}", model=name)
        return model

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def start_health_checks(self) -> None:
        for model in self._models.values():
            model.start_health_checks()

    def readiness(self) -> dict[str, bool]:
        """Each model's readiness: ready when at least one endpoint is ready."""
        results: dict[str, bool] = {}

        def check(model: RemoteModel) -> None:
            results[model.name] = any(model.check_health().values())

        gevent.joinall([gevent.spawn(check, model) for model in self._models.values()], timeout=HEALTH_TIMEOUT_S * 3)
        return {name: results.get(name, False) for name in self._models}

    def close(self) -> None:
        for model in self._models.values():
            model.close()
