"""chaoqing's runners as Ray Serve deployments, behind the same KServe v2 routes as its model server.

For more than one machine: Ray places the replicas on a cluster's nodes and GPUs, restarts
the ones that die, autoscales and batches; the gateway points at Ray's HTTP proxy as it would
at any v2 server (``[endpoints]``), and never imports Ray. Needs ``pip install 'chaoqing[ray]'``.

Shape: one Serve *application* per model, each one *deployment* (:class:`V2ModelDeployment`)
at route prefix ``/v2/models/{model}``, plus one small application at ``/v2``
(:class:`V2ServerDeployment`: server metadata, ``/v2/health/live``, ``/v2/health/ready``, and
404 for a model nobody deployed). Ray's proxy routes on the longest prefix, so a call goes
proxy → the model's replica, one hop, and the replica decodes and encodes the v2 message with
:mod:`chaoqing.protocol.v2` and checks it with the model server's own
:func:`~chaoqing.modelserver.app.validate_inputs`::

    GET  /v2                          server metadata
    GET  /v2/health/live              200 while the proxy and this app answer
    GET  /v2/health/ready             200 when every configured model has a replica, else 503
    GET  /v2/models/{m}               model metadata (the runner's, as the model server gives it)
    GET  /v2/models/{m}/ready         200 (a replica answers only once its runner is loaded)
    POST /v2/models/{m}/infer         JSON tensors, or Triton's binary tensor data extension

Batching: each replica gathers up to ``max_batch_size`` requests for ``batch_wait_timeout_s``
with ``@serve.batch``, stacks those of one input shape along the batch dimension (at most the
runner's own ``max_batch_size`` items per call) and calls :meth:`Runner.run` once per stack, on
the replica's compute thread (one: a runner is called one batch at a time; the simulators,
which wait rather than compute, may run up to their ``concurrency`` at once). Serve lets a
replica hold ``max_ongoing_requests`` requests (its default, 5, keeps batches small), so the
settings raise it to twice ``max_batch_size`` by default.

Configuration: a TOML file (:func:`load_ray_config`; ``docs/scale-out.md`` shows one), read by
``chaoqing ray deploy --config FILE`` (:func:`run_applications`), or turned into Serve's own
config file for ``serve run`` / ``serve deploy`` by ``chaoqing ray config`` (:func:`serve_config`),
whose applications name :func:`build_model_app` and :func:`build_server_app` as import paths.

Errors: :func:`load_ray_config` raises ConfigError; the deployments answer the model server's
status codes (400, 404, 500, 504) with ``{"error": ...}``; nothing here exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import tomllib
import types
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chaoqing import __version__
from chaoqing.errors import (
    BodyTooLarge,
    ChaoqingError,
    ConfigError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidTensorRequest,
    UnknownModel,
    http_error_for,
)
from chaoqing.protocol import v2

__all__ = [
    "MODEL_DEPLOYMENT",
    "SERVER_APPLICATION",
    "AutoscalingSettings",
    "RayModelSettings",
    "RayServeConfig",
    "V2ModelDeployment",
    "V2ServerDeployment",
    "build_applications",
    "build_model_app",
    "build_server_app",
    "load_ray_config",
    "run_applications",
    "serve_config",
    "start_applications",
    "start_ray",
    "stop_applications",
]

_log = logging.getLogger("chaoqing.modelserver.ray_serve")

SERVER_APPLICATION = "chaoqing"  # the /v2 application; each model's application is named after the model
MODEL_DEPLOYMENT = "V2Model"
SERVER_DEPLOYMENT = "V2Server"
SERVER_NAME = "chaoqing-ray"
EXTENSIONS = ("binary_tensor_data", "model_metadata", "health")
DEFAULT_HTTP_PORT = 8000  # Ray Serve's own default
LOOPBACK = "127.0.0.1"
MEGABYTE = 1024 * 1024
READY_PROBE_TIMEOUT_S = 2.0
# a simulator with concurrency 0 waits any number of batches at once; bound the threads that wait
MAX_WAITING_THREADS = 64
# Serve's default health-check period, 10 s: a killed replica is noticed that late; 1 s here
# (measured on 2 cores: a killed replica is replaced 2-3 s later, docs/scale-out.md)
DEFAULT_HEALTH_CHECK_PERIOD_S = 1.0


@dataclass(frozen=True)
class AutoscalingSettings:
    """Serve's ``autoscaling_config``: replicas between the bounds, aiming at
    ``target_ongoing_requests`` per replica."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"autoscaling: need 0 <= min_replicas <= max_replicas, max_replicas >= 1 ({self})")
        if not self.target_ongoing_requests > 0:
            raise ConfigError("autoscaling.target_ongoing_requests: must be positive")


@dataclass(frozen=True)
class RayModelSettings:
    """One model's deployment: how many replicas, how they batch, what each replica holds.

    - ``num_replicas``, or ``autoscaling`` (then ``num_replicas`` is ignored);
    - ``max_batch_size`` requests gathered for up to ``batch_wait_timeout_s`` (``@serve.batch``);
    - ``max_ongoing_requests`` per replica: 0 means twice ``max_batch_size`` (Serve's default, 5,
      keeps batches small);
    - ``num_cpus`` / ``num_gpus``: the replica actor's ``ray_actor_options`` (Ray places it on a
      node with that much free; a GPU replica also needs ``device`` such as ``cuda:0``, and Ray
      sets ``CUDA_VISIBLE_DEVICES`` so that index 0 is its own GPU);
    - ``runtime``, ``device``, ``threads``, ``tile_size``, ``model_options``: the runner, as the
      model server's options build it (:class:`~chaoqing.modelserver.runners.RunnerSettings`);
      ``threads`` 0 means ``num_cpus`` rounded up;
    - ``health_check_period_s``: how often Serve checks each replica (how soon a dead one is
      replaced).
    """

    name: str
    num_replicas: int = 1
    autoscaling: AutoscalingSettings | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.002
    max_ongoing_requests: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    runtime: str = "ncnn"
    device: str = "cpu"
    threads: int = 0
    tile_size: int = 0
    model_options: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    health_check_period_s: float = DEFAULT_HEALTH_CHECK_PERIOD_S
    max_request_bytes: int = 1024 * MEGABYTE
    max_input_pixels: int = 16_777_216

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_options", types.MappingProxyType(dict(self.model_options)))
        where = f"models.{self.name}"
        if self.num_replicas < 1:
            raise ConfigError(f"{where}.num_replicas: must be >= 1")
        if self.max_batch_size < 1 or self.max_ongoing_requests < 0:
            raise ConfigError(f"{where}: max_batch_size must be >= 1, max_ongoing_requests >= 0")
        if not (math.isfinite(self.batch_wait_timeout_s) and self.batch_wait_timeout_s >= 0):
            raise ConfigError(f"{where}.batch_wait_timeout_s: must be >= 0")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.threads < 0 or self.tile_size < 0:
            raise ConfigError(f"{where}: num_cpus, num_gpus, threads and tile_size must be >= 0")
        if not self.health_check_period_s > 0:
            raise ConfigError(f"{where}.health_check_period_s: must be positive")

    @property
    def ongoing_requests_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def runner_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~chaoqing.modelserver.runners.RunnerSettings`."""
        return {
            "threads": self.threads or max(1, math.ceil(self.num_cpus)),
            "runtime": self.runtime,
            "device": self.device,
            "tile_size": self.tile_size,
            "max_batch_size": self.max_batch_size,
            "model_options": dict(self.model_options),
        }

    def as_arguments(self) -> dict[str, Any]:
        """Plain values for Serve's config file (``args``); :meth:`from_arguments` reads them back."""
        arguments: dict[str, Any] = {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("autoscaling", "model_options")
        }
        arguments["model_options"] = dict(self.model_options)
        if self.autoscaling is not None:
            arguments["autoscaling"] = asdict(self.autoscaling)
        return arguments

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> RayModelSettings:
        """Settings from a table (TOML, or Serve's ``args``). Raises ConfigError for an unknown
        key or a value of the wrong kind."""
        known = set(cls.__dataclass_fields__)
        name = str(arguments.get("name", "?"))
        unknown = sorted(set(arguments) - known)
        if unknown:
            raise ConfigError(f"models.{name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(arguments)
        try:
            raw_autoscaling = values.pop("autoscaling", None)
            autoscaling = AutoscalingSettings(**raw_autoscaling) if raw_autoscaling is not None else None
            options = {str(key): str(value) for key, value in dict(values.pop("model_options", {})).items()}
            return cls(**values, autoscaling=autoscaling, model_options=options)
        except TypeError as exc:
            raise ConfigError(f"models.{name}: {exc}") from None

    def deployment_options(self) -> dict[str, Any]:
        """Serve's options for this model's deployment."""
        options: dict[str, Any] = {
            "name": MODEL_DEPLOYMENT,
            "max_ongoing_requests": self.ongoing_requests_limit,
            "health_check_period_s": self.health_check_period_s,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = asdict(self.autoscaling)
        else:
            options["num_replicas"] = self.num_replicas
        return options


@dataclass(frozen=True)
class RayServeConfig:
    """``chaoqing ray deploy``'s configuration: where Ray runs, where Serve listens, the models.

    ``address`` "" starts a Ray instance in this process (``num_cpus``, ``num_gpus`` and
    ``object_store_memory_mb`` size it; 0 lets Ray decide); ``"auto"`` or ``"HOST:PORT"`` joins a
    running cluster (``ray start --head``), whose size is its own.
    """

    models: tuple[RayModelSettings, ...]
    address: str = ""
    num_cpus: int = 0
    num_gpus: int = 0
    object_store_memory_mb: int = 0
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models: deploy at least one model ([models.NAME])")
        names = [model.name for model in self.models]
        if len(set(names)) != len(names) or SERVER_APPLICATION in names:
            raise ConfigError(f"models: names must be unique and not {SERVER_APPLICATION!r}")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http.port: {self.http_port} is not a port")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.object_store_memory_mb < 0:
            raise ConfigError("ray: num_cpus, num_gpus and object_store_memory_mb must be >= 0")
        if self.address and (self.num_cpus or self.num_gpus or self.object_store_memory_mb):
            raise ConfigError("ray: num_cpus, num_gpus and object_store_memory_mb size a local instance; "
                              "a cluster joined with address has the size `ray start` gave it")

    @property
    def url(self) -> str:
        """The URL gateways put in ``[endpoints]`` for every model here."""
        return f"http://{self.http_host}:{self.http_port}"


def load_ray_config(path: Path) -> RayServeConfig:
    """Read a ``chaoqing ray`` TOML file::

        [ray]
        address = ""                      # "" starts Ray here; "auto" joins `ray start --head`
        num_cpus = 2
        object_store_memory_mb = 256
        [http]
        host = "127.0.0.1"
        port = 8000
        [defaults]                        # every model's settings, under its own table's
        health_check_period_s = 1
        [models."realesr-animevideov3-x4"]
        num_replicas = 2
        num_cpus = 1
        [models."realesrgan-x4plus"]
        autoscaling = { min_replicas = 1, max_replicas = 4, target_ongoing_requests = 2 }
        num_gpus = 1
        device = "cuda:0"
        runtime = "torch"

    Raises ConfigError for a file that cannot be read or parsed, an unknown key, or a bad value.
    """
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = sorted(set(tree) - {"ray", "http", "defaults", "models"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}; known: ray, http, defaults, models")
    ray_table = dict(tree.get("ray", {}))
    http_table = dict(tree.get("http", {}))
    defaults = dict(tree.get("defaults", {}))
    models_table = tree.get("models", {})
    if not isinstance(models_table, dict):
        raise ConfigError(f"{path}: models must be a table of [models.NAME]")
    models = tuple(
        RayModelSettings.from_arguments({**defaults, **dict(settings), "name": str(name)})
        for name, settings in models_table.items()
    )
    unknown = sorted(set(ray_table) - {"address", "num_cpus", "num_gpus", "object_store_memory_mb"}) + sorted(
        f"http.{key}" for key in set(http_table) - {"host", "port"}
    )
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    try:
        return RayServeConfig(
            models=models,
            http_host=str(http_table.get("host", "127.0.0.1")),
            http_port=int(http_table.get("port", DEFAULT_HTTP_PORT)),
            **ray_table,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


# -- the deployments ---------------------------------------------------------------------------


def _json_response(status: int, payload: Mapping[str, Any]) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type=v2.JSON_CONTENT_TYPE)


def _error_response(error: BaseException) -> Any:
    message = str(error) if isinstance(error, ChaoqingError) else "internal server error"
    return _json_response(http_error_for(error).status, {"error": message})


def _sub_path(request: Any) -> list[str]:
    """The request path below the application's route prefix, as segments."""
    path: str = request.scope.get("path", "/")
    root: str = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return [part for part in path.split("/") if part]


def _shape_key(array_by_name: Mapping[str, np.ndarray], batched: bool) -> tuple[object, ...]:
    return tuple(
        (name, array.dtype.str, array.shape[1:] if batched else array.shape)
        for name, array in sorted(array_by_name.items())
    )


class V2ModelDeployment:
    """One model's replica: its runner, loaded once, behind ``/v2/models/{model}``.

    Built by :func:`build_model_app` (which wraps it in ``serve.deployment``); Serve calls
    ``__call__`` with each HTTP request (a Starlette ``Request``).
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        """Load the runner. Raises RunnerError (Serve then marks the replica failed and retries)."""
        from chaoqing.modelserver.runners import RunnerSettings, check_runtimes, create_runner

        self.settings = RayModelSettings.from_arguments(arguments)
        runner_settings = RunnerSettings(**self.settings.runner_arguments())
        check_runtimes([self.settings.name], runner_settings)
        self.runner = create_runner(self.settings.name, runner_settings)
        self.spec = self.runner.spec
        self._batched = self.spec.max_batch_size > 0
        self._max_items = min(self.settings.max_batch_size, self.spec.max_batch_size) if self._batched else 1
        # a runner computes one batch at a time (Runner's contract); one that waits
        # cooperatively (the simulators) takes as many as it declares, at most one per request
        # this replica holds
        workers = 1
        if self.runner.runs_on_hub:
            workers = self.runner.max_concurrent_batches or min(MAX_WAITING_THREADS, self.settings.ongoing_requests_limit)
        self._compute = ThreadPoolExecutor(workers, thread_name_prefix=f"chaoqing-{self.settings.name}")
        from ray import serve

        # Serve's dynamic batching, wired to the runner's batch call: concurrent requests to this
        # replica are gathered into one list for _infer_batch, one batch at a time per compute
        # thread; while one computes, the next gathers what arrives
        self._batch_call = serve.batch(
            max_batch_size=self.settings.max_batch_size,
            batch_wait_timeout_s=self.settings.batch_wait_timeout_s,
            max_concurrent_batches=workers,
        )(self._infer_batch)

    async def __call__(self, request: Any) -> Any:
        try:
            return await self._route(request)
        except ChaoqingError as exc:
            return _error_response(exc)
        except Exception as exc:  # noqa: BLE001 - the error hook: a bug is a 500 with a traceback in the log
            _log.exception("unexpected error on %s %s", request.method, request.url.path)
            return _error_response(exc)

    async def _route(self, request: Any) -> Any:
        action = _sub_path(request)
        if len(action) >= 2 and action[0] == "versions":
            if action[1] != "1":
                raise UnknownModel(f"model {self.spec.name} has only version 1, not {action[1]!r}")
            action = action[2:]
        if action == [] and request.method == "GET":
            return _json_response(200, self.spec.as_metadata())
        if action == ["ready"] and request.method == "GET":
            return _json_response(200, {"name": self.spec.name, "ready": True})
        if action == ["infer"] and request.method == "POST":
            return await self._infer(request)
        status = 404 if request.method == "GET" else 405
        return _json_response(status, {"error": f"no route {request.method} {request.url.path}"})

    async def ready(self) -> bool:
        """For the ``/v2`` application's readiness: a replica that answers has loaded its runner."""
        return True

    async def _infer(self, request: Any) -> Any:
        from starlette.responses import Response

        from chaoqing.modelserver.app import decode_infer_call

        raw_length = request.headers.get("content-length", "")
        if raw_length.isdigit() and int(raw_length) > self.settings.max_request_bytes:
            raise BodyTooLarge(f"body of {raw_length} bytes exceeds this deployment's limit of "
                               f"{self.settings.max_request_bytes}")
        body = await request.body()
        raw_header = request.headers.get(v2.HEADER_LENGTH_HEADER)
        header_length: int | None = None
        if raw_header is not None:
            digits = raw_header.strip()
            if not (digits.isascii() and digits.isdigit()) or int(digits) > len(body):
                raise InvalidTensorRequest(f"{v2.HEADER_LENGTH_HEADER} must be an integer no larger than the body")
            header_length = int(digits)
        decoded, timeout_s = decode_infer_call(self.spec, body, header_length, self.settings.max_input_pixels)
        try:
            result = await asyncio.wait_for(self._batch_call(decoded.inputs), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"model {self.spec.name}: no result within {timeout_s:.3f} s") from None
        if isinstance(result, BaseException):
            raise result
        message = v2.encode_infer_response(self.spec.name, result, decoded)
        headers = message.http_headers()
        del headers["Content-Length"]  # Starlette sets it from the body
        return Response(message.join(), headers=headers, media_type=message.content_type)

    async def _infer_batch(
        self, requests: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | BaseException]:
        """One ``serve.batch`` batch (wrapped in ``__init__``): requests of one
        input shape stacked, at most the runner's batch of items per call; each request gets
        its outputs, or the InferenceFailed of its stack."""
        results: list[dict[str, np.ndarray] | BaseException] = [InferenceFailed("not computed")] * len(requests)
        for stack in self._stacks(requests):
            stacked = {
                name: np.concatenate([requests[index][name] for index in stack], axis=0) if len(stack) > 1
                else requests[stack[0]][name]
                for name in requests[stack[0]]
            }
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self._compute, self.runner.run, stacked)
            except Exception as exc:  # noqa: BLE001 - a runner failure is its requests' 500, not the replica's
                failure = InferenceFailed(f"model {self.spec.name} failed: {exc}")
                for index in stack:
                    results[index] = failure
                continue
            offset = 0
            for index in stack:
                if not self._batched:
                    results[index] = outputs
                    continue
                items = int(next(iter(requests[index].values())).shape[0])
                results[index] = {name: output[offset:offset + items] for name, output in outputs.items()}
                offset += items
        return results

    def _stacks(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[list[int]]:
        """Indices of ``requests`` grouped into calls: one input shape each, at most
        ``_max_items`` batch items (one request per call for a model without a batch dimension)."""
        stacks: list[list[int]] = []
        open_stacks: dict[tuple[object, ...], tuple[list[int], int]] = {}
        for index, inputs in enumerate(requests):
            if not self._batched:
                stacks.append([index])
                continue
            key = _shape_key(inputs, batched=True)
            items = int(next(iter(inputs.values())).shape[0])
            current = open_stacks.get(key)
            if current is not None and current[1] + items <= self._max_items:
                current[0].append(index)
                open_stacks[key] = (current[0], current[1] + items)
                continue
            stack = [index]
            stacks.append(stack)
            open_stacks[key] = (stack, items)
        return stacks

    def __del__(self) -> None:
        compute = getattr(self, "_compute", None)
        if compute is not None:
            compute.shutdown(wait=False, cancel_futures=True)


class V2ServerDeployment:
    """The ``/v2`` application: server metadata, health, and 404 for models not deployed here."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models = tuple(models)

    async def __call__(self, request: Any) -> Any:
        action = _sub_path(request)
        if request.method != "GET" and not (len(action) >= 2 and action[0] == "models"):
            return _json_response(405, {"error": f"no route {request.method} {request.url.path}"})
        if action == []:
            return _json_response(200, {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})
        if action == ["health", "live"]:
            return _json_response(200, {"live": True})
        if action == ["health", "ready"]:
            waiting = await self._not_ready()
            if waiting:
                return _json_response(503, {"ready": False, "models": waiting})
            return _json_response(200, {"ready": True})
        if len(action) >= 2 and action[0] == "models":
            return _error_response(
                UnknownModel(f"unknown model {action[1]!r}; this server has {', '.join(self.models)}")
            )
        return _json_response(404, {"error": f"no route {request.url.path}"})

    async def _not_ready(self) -> dict[str, str]:
        from ray import serve

        async def probe(model: str) -> str | None:
            try:
                handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=model)
                await asyncio.wait_for(handle.ready.remote(), READY_PROBE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure to reach a replica means not ready
                return f"not ready: {type(exc).__name__}"
            return None

        answers = await asyncio.gather(*(probe(model) for model in self.models))
        return {model: answer for model, answer in zip(self.models, answers, strict=True) if answer is not None}


# -- applications ------------------------------------------------------------------------------


def build_model_app(arguments: dict[str, Any]) -> Any:
    """Serve's application builder for one model (``import_path:
    chaoqing.modelserver.ray_serve:build_model_app``, ``args``: :meth:`RayModelSettings.as_arguments`).

    Raises ConfigError for bad arguments.
    """
    from ray import serve

    settings = RayModelSettings.from_arguments(arguments)
    deployment = serve.deployment(**settings.deployment_options())(V2ModelDeployment)
    return deployment.bind(settings.as_arguments())


def build_server_app(arguments: dict[str, Any]) -> Any:
    """Serve's application builder for ``/v2`` (``args``: ``{"models": [NAME, ...]}``)."""
    from ray import serve

    models = [str(name) for name in arguments.get("models", [])]
    deployment = serve.deployment(name=SERVER_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})(
        V2ServerDeployment
    )
    return deployment.bind(models)


def build_applications(config: RayServeConfig) -> list[tuple[str, str, Any]]:
    """``(name, route_prefix, application)`` for every application of ``config``: the models'
    first, then ``/v2``."""
    applications = [
        (model.name, f"/v2/models/{model.name}", build_model_app(model.as_arguments())) for model in config.models
    ]
    applications.append(
        (SERVER_APPLICATION, "/v2", build_server_app({"models": [model.name for model in config.models]}))
    )
    return applications


def serve_config(config: RayServeConfig) -> dict[str, Any]:
    """Serve's own config file for ``serve run`` / ``serve deploy``, equivalent to
    ``chaoqing ray deploy`` with ``config`` (its ``[ray]`` table aside: there the cluster is
    the one ``serve`` connects to)."""
    applications: list[dict[str, Any]] = [
        {
            "name": model.name,
            "route_prefix": f"/v2/models/{model.name}",
            "import_path": "chaoqing.modelserver.ray_serve:build_model_app",
            "args": model.as_arguments(),
        }
        for model in config.models
    ]
    applications.append({
        "name": SERVER_APPLICATION,
        "route_prefix": "/v2",
        "import_path": "chaoqing.modelserver.ray_serve:build_server_app",
        "args": {"models": [model.name for model in config.models]},
    })
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.http_host, "port": config.http_port},
        "applications": applications,
    }


# -- running -----------------------------------------------------------------------------------


def start_ray(config: RayServeConfig, *, temp_dir: str | None = None) -> None:
    """Start a local Ray instance in this process (``[ray] address`` empty) or join a cluster.

    Ray installs handlers of its own for SIGTERM; a caller that handles signals installs its
    own again after this. Raises whatever Ray raises when it cannot start or connect
    (``ConnectionError``, ``RuntimeError``).
    """
    import ray

    if config.address:
        ray.init(address=config.address)
        return
    ray.init(
        num_cpus=config.num_cpus or None,
        num_gpus=config.num_gpus or None,
        object_store_memory=config.object_store_memory_mb * MEGABYTE or None,
        include_dashboard=False,
        # a local instance serves this machine alone: on loopback, Ray needs no outside
        # address (finding one, it probes 8.8.8.8 and resolves the hostname: 20 s offline)
        _node_ip_address=LOOPBACK,
        _temp_dir=temp_dir,
    )


def run_applications(config: RayServeConfig) -> None:
    """Run every application of ``config`` on Serve (on the Ray this process started or
    joined); returns once each is running (Serve has loaded a replica of every model).

    Raises ``RuntimeError`` from Serve when a deployment fails to come up.
    """
    from ray import serve

    serve.start(http_options={"host": config.http_host, "port": config.http_port})
    # all at once: the replicas of every model start side by side (serve.run, one application
    # at a time, waits for each to be running before it deploys the next)
    serve.run_many([
        serve.RunTarget(application, name=name, route_prefix=route_prefix)
        for name, route_prefix, application in build_applications(config)
    ])


def start_applications(config: RayServeConfig, *, temp_dir: str | None = None) -> None:
    """:func:`start_ray`, then :func:`run_applications`; call :func:`stop_applications` in any
    case. Raises what they raise."""
    start_ray(config, temp_dir=temp_dir)
    run_applications(config)


def stop_applications() -> None:
    """Delete the applications and shut Serve and this process's Ray down (a local Ray
    instance's processes end with it; a joined cluster keeps running)."""
    import ray
    from ray import serve

    # both untyped in Ray
    shutdown_serve: Callable[[], None] = serve.shutdown
    shutdown_ray: Callable[[], None] = ray.shutdown
    if ray.is_initialized():
        try:
            shutdown_serve()
        finally:
            shutdown_ray()
