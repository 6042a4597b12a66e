"""The model server: KServe v2 REST in front of runners, with dynamic batching.

Routes (``{m}`` is a model name; ``/versions/{v}`` may follow it, as Triton's clients send)::

    GET  /v2/health/live         200 while the process serves
    GET  /v2/health/ready        200 when every model is loaded, else 503
    GET  /v2                     server metadata; extensions list binary_tensor_data
    GET  /v2/models/{m}          model metadata: inputs, outputs (-1 = variable), parameters.scale
    GET  /v2/models/{m}/ready    200 / 503
    POST /v2/models/{m}/infer    JSON tensors, or Triton's binary tensor data extension both ways
    GET  /metrics                Prometheus: queue depth, batch sizes, inference time

Errors are ``{"error": "..."}`` with 400 (malformed request), 404 (unknown model), 413
(body over ``max_request_bytes``), 408 (body not received in time), 503 (queue full or
model not ready, with Retry-After), 504 (the request's ``timeout`` parameter, microseconds
as in Triton, passed while it was queued) and 500 (the runner raised). A malformed request
never takes the process down.

Threads: the HTTP side is gevent greenlets on one hub; each model instance computes on a
native thread of its own (see :mod:`chaoqing.modelserver.batcher`). With ``compute_slots``
(a folder of slot files, :mod:`chaoqing.modelserver.compute`) every heavy batch holds one of
the slots the model servers on this machine share while it computes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import numpy as np
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from chaoqing import __version__
from chaoqing.errors import (
    BodyTooLarge,
    ChaoqingError,
    InvalidTensorRequest,
    MalformedMessage,
    Overloaded,
    SlowRequestBody,
    UnknownModel,
    http_error_for,
    retry_after_for,
)
from chaoqing.modelserver.batcher import Batcher, BatchRecord, BatchSettings
from chaoqing.modelserver.compute import ComputeBudget
from chaoqing.modelserver.runners import RunnerSettings, check_runtimes, create_runner
from chaoqing.modelserver.runners.base import ModelSpec, Runner
from chaoqing.protocol import v2
from chaoqing.protocol.listen import BODY_READ_KEY, QuietHandler, bound_port, create_listener

__all__ = ["ModelServer", "ModelServerApp", "ModelServerOptions", "validate_inputs"]

_log = logging.getLogger("chaoqing.modelserver.app")

SERVER_NAME = "chaoqing"
EXTENSIONS = ("binary_tensor_data", "model_metadata", "health", "metrics")
BODY_READ_TIMEOUT_S = 30.0
MAX_HEADER_BYTES = 1024 * 1024  # the JSON part of a request; tensors go binary
MICROSECONDS = 1e-6

StartResponse = Callable[..., Any]


@dataclass(frozen=True)
class ModelServerOptions:
    """Everything one model server process needs."""

    models: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 9000
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    batching: BatchSettings = field(default_factory=BatchSettings)
    max_request_bytes: int = 1024 * 1024 * 1024
    max_input_pixels: int = 16_777_216  # per call, all batch items together (4096²)
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S
    max_connections: int = 1024
    compute_slots: str | None = None  # a folder of slot files shared on this machine; None: no budget


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chaoqing_model_requests", "Inference requests by model and outcome", ["model", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "chaoqing_model_request_seconds", "Inference request latency, queueing included", ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "chaoqing_model_batch_size", "Items per executed batch", ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "chaoqing_model_inference_seconds", "Compute time per batch", ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "chaoqing_model_queue_wait_seconds", "Time the oldest item of a batch waited", ["model"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "chaoqing_model_queue_depth", "Requests waiting for a batch", ["model"], registry=self.registry
        )
        self.slot_wait_seconds = Histogram(
            "chaoqing_model_compute_slot_wait_seconds", "Time a batch waited for a compute slot", ["model"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.slots_waiting = Gauge(
            "chaoqing_compute_slots_waiting", "Batches of this server waiting for a compute slot", registry=self.registry
        )
        self.slots_held = Gauge(
            "chaoqing_compute_slots_held", "Compute slots this server holds", registry=self.registry
        )

    def batch_recorder(self, model: str) -> Callable[[BatchRecord], None]:
        def record(batch: BatchRecord) -> None:
            self.batch_size.labels(model).observe(batch.size)
            self.inference_seconds.labels(model).observe(batch.compute_s)
            self.queue_wait_seconds.labels(model).observe(batch.queue_wait_s)
            self.slot_wait_seconds.labels(model).observe(batch.slot_wait_s)

        return record


@dataclass
class _Model:
    name: str
    state: str = "loading"  # loading | ready | failed
    error: str = ""
    spec: ModelSpec | None = None
    batcher: Batcher | None = None


def decode_infer_call(spec: ModelSpec, body: bytes, header_length: int | None,
                      max_input_pixels: int) -> tuple[v2.InferRequest, float | None]:
    """A v2 infer body decoded and checked against the model's metadata (inputs, the outputs
    asked for), and its ``parameters.timeout`` in seconds (None: none asked): what this server
    and the Ray Serve deployment (:mod:`chaoqing.modelserver.ray_serve`) both do before they
    compute. Raises InvalidTensorRequest."""
    try:
        request = v2.decode_infer_request(body, header_length)
    except MalformedMessage as exc:
        raise InvalidTensorRequest(str(exc)) from None
    validate_inputs(spec, request.inputs, max_input_pixels)
    known_outputs = {tensor.name for tensor in spec.outputs}
    for requested in request.outputs:
        if requested.name not in known_outputs:
            raise InvalidTensorRequest(f"model {spec.name} has no output {requested.name!r}")
    return request, _timeout_of(request.parameters)


def validate_inputs(spec: ModelSpec, inputs: Mapping[str, np.ndarray], max_input_pixels: int) -> None:
    """Check decoded inputs against the model's metadata; raises InvalidTensorRequest."""
    expected = {tensor.name: tensor for tensor in spec.inputs}
    unknown = set(inputs) - set(expected)
    if unknown:
        raise InvalidTensorRequest(
            f"model {spec.name} has no input(s) {', '.join(sorted(unknown))}; it takes {', '.join(expected)}"
        )
    for name, tensor in expected.items():
        array = inputs.get(name)
        if array is None:
            if tensor.optional:
                continue
            raise InvalidTensorRequest(f"model {spec.name} needs input {name!r}")
        if v2.datatype_of(array) != tensor.datatype:
            raise InvalidTensorRequest(
                f"input {name!r} must be {tensor.datatype}, not {v2.datatype_of(array)}"
            )
        if array.ndim != len(tensor.shape):
            raise InvalidTensorRequest(
                f"input {name!r} must have {len(tensor.shape)} dimensions {list(tensor.shape)}, "
                f"not {list(array.shape)}"
            )
        for actual, wanted in zip(array.shape, tensor.shape, strict=True):
            if actual == 0:
                raise InvalidTensorRequest(f"input {name!r} has an empty dimension: {list(array.shape)}")
            if wanted != -1 and actual != wanted:
                raise InvalidTensorRequest(f"input {name!r} has shape {list(array.shape)}, expected {list(tensor.shape)}")
        if spec.max_batch_size > 0 and array.shape[0] > spec.max_batch_size:
            raise InvalidTensorRequest(
                f"input {name!r}: batch of {array.shape[0]} exceeds max_batch_size {spec.max_batch_size}"
            )
        if tensor.value_range is not None:
            low, high = tensor.value_range
            if not (low <= array.min() and array.max() <= high):
                raise InvalidTensorRequest(f"input {name!r} must hold values from {low:g} to {high:g}")
        if array.ndim >= 3:
            pixels = math.prod(array.shape[:-1])
            if pixels > max_input_pixels:
                raise InvalidTensorRequest(
                    f"input {name!r} has {pixels} pixels; this server takes at most {max_input_pixels} per call"
                )


class ModelServerApp:
    """The WSGI application. Models are looked up in ``models`` on every request."""

    def __init__(self, options: ModelServerOptions, models: Mapping[str, _Model], metrics: _Metrics,
                 budget: ComputeBudget | None = None) -> None:
        self.options = options
        self.models = models
        self.metrics = metrics
        self.budget = budget

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes | memoryview]:
        method = environ.get("REQUEST_METHOD", "GET")
        parts = [part for part in environ.get("PATH_INFO", "/").split("/") if part]
        try:
            return self._route(method, parts, environ, start_response)
        except ChaoqingError as exc:
            return _error(start_response, exc, _unread_body(environ))
        except Exception as exc:  # noqa: BLE001 - the error hook: a bug is a 500 with a traceback in the log
            _log.exception("unexpected error on %s %s", method, environ.get("PATH_INFO"))
            return _error(start_response, exc, _unread_body(environ))

    def _route(
        self, method: str, parts: list[str], environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes | memoryview]:
        if parts == ["metrics"] and method == "GET":
            for name, model in self.models.items():
                if model.batcher is not None:
                    self.metrics.queue_depth.labels(name).set(model.batcher.queue_depth)
            if self.budget is not None:
                self.metrics.slots_waiting.set(self.budget.waiting)
                self.metrics.slots_held.set(self.budget.held)
            body = generate_latest(self.metrics.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return [body]
        if not parts or parts[0] != "v2":
            return _json(start_response, 404, {"error": f"no route {environ.get('PATH_INFO')}"})
        rest = parts[1:]
        if rest == [] and method == "GET":
            return _json(
                start_response, 200, {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
            )
        if rest == ["health", "live"] and method == "GET":
            return _json(start_response, 200, {"live": True})
        if rest == ["health", "ready"] and method == "GET":
            waiting = {name: model.state for name, model in self.models.items() if model.state != "ready"}
            if waiting:
                return _json(start_response, 503, {"ready": False, "models": waiting})
            return _json(start_response, 200, {"ready": True})
        if len(rest) >= 2 and rest[0] == "models":
            found = self.models.get(rest[1])
            if found is None:
                raise UnknownModel(f"unknown model {rest[1]!r}; this server has {', '.join(self.models)}")
            model = found
            action = rest[2:]
            if len(action) >= 2 and action[0] == "versions":
                if action[1] != "1":
                    raise UnknownModel(f"model {model.name} has only version 1, not {action[1]!r}")
                action = action[2:]
            if action == [] and method == "GET":
                if model.spec is None:
                    return _json(start_response, 503, {"error": f"model {model.name} is {model.state}"})
                return _json(start_response, 200, model.spec.as_metadata())
            if action == ["ready"] and method == "GET":
                if model.state == "ready":
                    return _json(start_response, 200, {"name": model.name, "ready": True})
                return _json(start_response, 503, {"name": model.name, "ready": False, "state": model.state, "error": model.error})
            if action == ["infer"] and method == "POST":
                return self._infer(model, environ, start_response)
        return _json(start_response, 404 if method == "GET" else 405, {"error": f"no route {method} {environ.get('PATH_INFO')}"})

    def _infer(self, model: _Model, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes | memoryview]:
        started = time.monotonic()
        outcome = "error"
        try:
            if model.state != "ready" or model.batcher is None or model.spec is None:
                raise Overloaded(f"model {model.name} is {model.state}", retry_after_s=1.0)
            body, header_length = self._read_body(environ)
            request, timeout_s = decode_infer_call(model.spec, body, header_length, self.options.max_input_pixels)
            outputs = model.batcher.infer(request.inputs, timeout_s)
            message = v2.encode_infer_response(model.name, outputs, request)
            start_response("200 OK", list(message.http_headers().items()))
            outcome = "ok"
            return list(message.chunks)
        except ChaoqingError as exc:
            outcome = http_error_for(exc).code
            raise
        finally:
            self.metrics.requests.labels(model.name, outcome).inc()
            self.metrics.request_seconds.labels(model.name).observe(time.monotonic() - started)

    def _read_body(self, environ: dict[str, Any]) -> tuple[bytes, int | None]:
        raw_length = environ.get("CONTENT_LENGTH") or ""
        if not raw_length.isdigit():
            raise InvalidTensorRequest("an inference request needs a Content-Length")
        content_length = int(raw_length)
        if content_length > self.options.max_request_bytes:
            raise BodyTooLarge(
                f"body of {content_length} bytes exceeds this server's limit of {self.options.max_request_bytes}"
            )
        raw_header = environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH")
        header_length: int | None = None
        if raw_header is not None:
            digits = raw_header.strip()
            # ASCII digits only: str.isdigit() also takes '²', which int() refuses
            if not (digits.isascii() and digits.isdigit()) or len(digits) > len(raw_length):
                raise InvalidTensorRequest(
                    f"{v2.HEADER_LENGTH_HEADER} must be a non-negative integer no larger than the body"
                )
            header_length = int(digits)
            if header_length > content_length:
                raise InvalidTensorRequest(
                    f"{v2.HEADER_LENGTH_HEADER} claims {header_length} bytes but the body has {content_length}"
                )
            if header_length > MAX_HEADER_BYTES:
                raise InvalidTensorRequest(
                    f"the JSON header is {header_length} bytes; send tensors as binary data (limit {MAX_HEADER_BYTES})"
                )
        elif content_length > MAX_HEADER_BYTES * 64:
            raise InvalidTensorRequest("JSON tensors this large must be sent as binary data")
        try:
            with gevent.Timeout(self.options.body_read_timeout_s, SlowRequestBody("the request body did not arrive in time")):
                body: bytes = environ["wsgi.input"].read(content_length)
        except (OSError, ValueError) as exc:
            raise InvalidTensorRequest(f"could not read the request body: {exc}") from None
        if len(body) != content_length:
            raise InvalidTensorRequest(f"the body ended after {len(body)} of {content_length} bytes")
        environ[BODY_READ_KEY] = True
        return body, header_length


_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def _timeout_of(parameters: Mapping[str, Any]) -> float | None:
    raw = parameters.get("timeout")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw <= 0:
        raise InvalidTensorRequest("parameters.timeout must be a positive number of microseconds")
    return float(raw) * MICROSECONDS


def _json(start_response: StartResponse, status: int, payload: Mapping[str, Any], extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [("Content-Type", v2.JSON_CONTENT_TYPE), ("Content-Length", str(len(body))), *extra]
    start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
    return [body]


def _unread_body(environ: Mapping[str, Any]) -> bool:
    has_body = (environ.get("CONTENT_LENGTH") or "0") not in ("", "0") or "chunked" in environ.get(
        "HTTP_TRANSFER_ENCODING", ""
    ).lower()
    return has_body and not environ.get(BODY_READ_KEY)


def _error(start_response: StartResponse, error: BaseException, body_unread: bool = False) -> list[bytes]:
    status = http_error_for(error).status
    message = str(error) if isinstance(error, ChaoqingError) else "internal server error"
    extra = [("Connection", "close")] if body_unread else []
    retry_after = retry_after_for(error)
    if retry_after is not None:
        extra.append(("Retry-After", str(max(1, math.ceil(retry_after)))))
    return _json(start_response, status, {"error": message}, extra)


class ModelServer:
    """A running model server: listener bound at construction, models loaded in the background.

    ``start()`` returns at once (health/live answers while models load); ``serve_forever()``
    blocks; ``stop()`` closes the listener, lets in-flight requests finish within its
    timeout, then releases the models. ``port`` is the bound port (useful with port 0).
    Raises OSError when the address cannot be bound, ConfigError when ``compute_slots`` is not a
    folder of slot files, RunnerError when a model's runtime or device is missing (before the
    port is taken: a start-up error in one line that says what to install). A user's model file
    (``options.runner.user_models``) is loaded here, before the port is taken too, so that a
    missing or malformed file is such an error, naming the file (RunnerError).
    """

    def __init__(self, options: ModelServerOptions, runner_factory: Callable[[str, RunnerSettings], Runner] = create_runner) -> None:
        if not options.models:
            raise ValueError("a model server needs at least one model")
        self.options = options
        self._runner_factory = runner_factory
        self._metrics = _Metrics()
        self.models: dict[str, _Model] = {name: _Model(name) for name in options.models}
        check_runtimes(options.models, options.runner)
        self._preloaded = self._load_user_models()
        # one budget for every model of this process; raises ConfigError for a bad folder
        self.budget = ComputeBudget(Path(options.compute_slots)) if options.compute_slots else None
        self.app = ModelServerApp(options, self.models, self._metrics, self.budget)
        self._listener = create_listener(options.host, options.port)
        self.port = bound_port(self._listener)
        self._server = WSGIServer(
            self._listener,
            self.app,
            spawn=options.max_connections,
            log=None,
            error_log=_log,
            handler_class=QuietHandler,
        )
        self._loaders: list[gevent.Greenlet] = []

    def _load_user_models(self) -> dict[str, Runner]:
        """The user models' runners, loaded now; raises what the first that fails raises."""
        loaded: dict[str, Runner] = {}
        try:
            for name in self.options.models:
                if name in self.options.runner.user_models:
                    loaded[name] = self._runner_factory(name, self.options.runner)
        except BaseException:
            for runner in loaded.values():
                runner.close()
            raise
        return loaded

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    def start(self) -> None:
        self._server.start()
        self._loaders = [gevent.spawn(self._load, model) for model in self.models.values()]

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for every model to finish loading; True when all are ready."""
        gevent.joinall(self._loaders, timeout=timeout_s)
        return all(model.state == "ready" for model in self.models.values())

    def serve_forever(self) -> None:
        if not self._server.started:
            self.start()
        self._server.serve_forever()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.stop(timeout=timeout_s)
        gevent.killall(self._loaders)
        for runner in self._preloaded.values():  # stopped before they were handed over
            runner.close()
        self._preloaded.clear()
        for model in self.models.values():
            if model.batcher is not None:
                model.batcher.close()
        if self.budget is not None:
            self.budget.close()

    def _load(self, model: _Model) -> None:
        hub = gevent.get_hub()
        started = time.monotonic()
        try:
            runner = self._preloaded.pop(model.name, None)
            if runner is None:
                # loading parses weights in C; keep the hub answering health checks meanwhile
                runner = hub.threadpool.apply(self._runner_factory, (model.name, self.options.runner))
        except Exception as exc:  # noqa: BLE001 - logged with its traceback, the model marked failed
            # a runtime or weights that fail to load can raise anything (from C too); health
            # says the model failed and the server keeps serving the others
            model.state, model.error = "failed", str(exc)
            _log.exception("model %s failed to load: %s", model.name, exc)
            return
        model.spec = runner.spec
        model.batcher = Batcher(runner, self.options.batching, self._metrics.batch_recorder(model.name), self.budget)
        model.state = "ready"
        _log.info("model %s ready in %.2f s", model.name, time.monotonic() - started)
