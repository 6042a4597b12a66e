"""chaoqing's runners in KServe's Python model server: ``pip install 'chaoqing[kserve]'``.

KServe's ``ModelServer`` (a KServe v2 server chaoqing did not write: FastAPI on uvicorn) serves
one :class:`ChaoqingKServeModel` per chaoqing model; the gateway then calls it like any v2
endpoint (docs/scale-out.md)::

    python -m chaoqing.interop.kserve_model --model realesr-animevideov3-x4 --model centerface \\
        --http-port 9200 --threads 2

or, from Python, :func:`serve`. The model's KServe name is the chaoqing model it serves.

What KServe 0.21 gives and what it does not (docs/model-server.md, "What the gateway needs
from a v2 server"):

- Its REST v2 side takes and gives Triton's binary tensor data extension (the
  ``Inference-Header-Content-Length`` header, ``binary_data_size`` and ``binary_data``
  parameters), but its ``GET /v2`` lists only ``model_repository_extension``, so a client
  that asks (the gateway's ``tensor_encoding = "auto"``) would send JSON. :func:`serve` adds
  ``binary_tensor_data`` to the list it answers, which is true of this server.
- Its model metadata has no ``parameters``: ``ModelMetadataResponse`` keeps name, versions,
  platform, inputs and outputs only. chaoqing's parameters (scale, tile size, edge padding, ...)
  are what make the gateway tile and pad as it does against chaoqing's own server, so
  :func:`serve` answers ``GET /v2/models/{name}`` for its models with chaoqing's metadata,
  KServe's fields included. The other routes (health, ready, infer) are KServe's own.
- KServe's uvicorn listens on 0.0.0.0 whatever it is told; :func:`serve` makes it listen on
  the host given (127.0.0.1 by default). gRPC is off.
- The request's inputs are checked against the runner's metadata as chaoqing's server checks
  them (400 for a wrong datatype, shape or value range); a runner failure answers 500.
- One call, one runner batch, one at a time per model on a thread of its own, so that KServe's
  event loop keeps answering health checks while a photo computes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from kserve import Model, ModelServer
from kserve.errors import InferenceError, InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from chaoqing.errors import ChaoqingError, InvalidTensorRequest
from chaoqing.interop.hosted import RUNNER_SETTING_NAMES, build_runner, check_inputs, chosen_outputs
from chaoqing.modelserver.runners.base import Runner
from chaoqing.protocol import v2

__all__ = ["ChaoqingKServeModel", "main", "serve"]

_log = logging.getLogger("chaoqing.interop.kserve")

DEFAULT_HOST = "127.0.0.1"
BINARY_EXTENSION = "binary_tensor_data"  # Triton's name, which the gateway's "auto" encoding looks for


class ChaoqingKServeModel(Model):  # type: ignore[misc]
    """One chaoqing runner (an upscaler, a face detector, a simulator) as a KServe model.

    ``options`` are the :class:`~chaoqing.modelserver.runners.RunnerSettings` fields
    (:data:`chaoqing.interop.hosted.RUNNER_SETTING_NAMES`), and ``model`` for a chaoqing model
    whose name differs from ``name``.
    """

    def __init__(self, name: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name)
        self._options = dict(options or {})
        self._runner: Runner | None = None
        self._executor: ThreadPoolExecutor | None = None

    def load(self) -> bool:
        """Build the runner (seconds; KServe calls this before its server starts).

        Raises RunnerError when it cannot be built.
        """
        self._runner = build_runner(self.name, self._options)
        # one batch at a time, as one instance of chaoqing's model server computes; a runner that
        # only waits (the simulators: runs_on_hub) takes as many as it declares, as there
        threads = (self._runner.max_concurrent_batches or UNLIMITED_WAITING_THREADS) if self._runner.runs_on_hub else 1
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"chaoqing-{self.name}")
        self.ready = True
        _log.info("chaoqing model %s loaded", self.name)
        return True

    def stop(self) -> None:
        """Close the runner (KServe calls this when it unloads the model)."""
        self.ready = False
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _loaded(self) -> tuple[Runner, ThreadPoolExecutor]:
        if self._runner is None or self._executor is None:
            raise ModelNotReady(self.name)
        return self._runner, self._executor

    def chaoqing_metadata(self) -> dict[str, Any]:
        """chaoqing's metadata for the runner (inputs, outputs, ``parameters``) under this
        model's name. Raises ModelNotReady (KServe's 503) before :meth:`load`."""
        runner, _ = self._loaded()
        return {**runner.spec.as_metadata(), "name": self.name, "versions": []}

    def get_input_types(self) -> list[dict[str, Any]]:
        """The inputs KServe's own metadata route lists."""
        return list(self.chaoqing_metadata()["inputs"])

    def get_output_types(self) -> list[dict[str, Any]]:
        """The outputs KServe's own metadata route lists."""
        return list(self.chaoqing_metadata()["outputs"])

    async def predict(self, payload: InferRequest, headers: Mapping[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        """Decode the v2 inputs (JSON or binary), run the runner's batch call on its thread,
        encode the outputs asked for (all of them when none are named), binary where the
        request asks for binary.

        Raises InvalidInput (400) for inputs that do not fit the metadata, InferenceError (500)
        when the runner fails, ModelNotReady (503) before the model is loaded.
        """
        runner, executor = self._loaded()
        try:
            inputs = {item.name: item.as_numpy() for item in payload.inputs}
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput(f"malformed input: {exc}") from None
        try:
            check_inputs(runner, inputs)
        except InvalidTensorRequest as exc:
            raise InvalidInput(str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(executor, runner.run, inputs)
        except ChaoqingError as exc:
            raise InferenceError(f"model {self.name} failed: {exc}") from None
        requested = payload.request_outputs or []
        try:
            wanted = chosen_outputs(self.name, outputs, [item.name for item in requested])
        except InvalidTensorRequest as exc:
            raise InvalidInput(str(exc)) from None
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
            infer_outputs=[_output(name, outputs[name]) for name in wanted],
            use_binary_outputs=payload.use_binary_outputs, requested_outputs=requested or None,
        )


def _output(name: str, array: np.ndarray) -> InferOutput:
    """An output with the runner's own shape and datatype; KServe encodes it as asked."""
    contiguous = np.ascontiguousarray(array)
    return InferOutput(name=name, shape=list(contiguous.shape), datatype=v2.datatype_of(contiguous),
                       data=contiguous)


UNLIMITED_WAITING_THREADS = 64  # "no limit" for a runner that only waits: more than a gateway sends at once


class _LocalModelServer(ModelServer):  # type: ignore[misc]
    """KServe's ModelServer, listening on ``host`` instead of the 0.0.0.0 its RESTServer sets."""

    def __init__(self, host: str, **options: Any) -> None:
        super().__init__(**options)
        self._host = host

    def setup_event_loop(self) -> None:
        # start() builds the REST server, then calls this, then runs uvicorn: the last moment
        # the uvicorn config can be told which address to bind
        if self._rest_server is not None:
            self._rest_server.config.host = self._host
        super().setup_event_loop()


def _add_chaoqing_routes(server: ModelServer, models: Sequence[ChaoqingKServeModel]) -> None:
    """Routes that go before KServe's own on its FastAPI app (``kserve.model_server.app``, the
    app KServe documents for custom routes): ``GET /v2`` listing the binary extension KServe
    speaks, and each model's metadata with chaoqing's ``parameters``."""
    from fastapi import Response
    from kserve.model_server import app

    by_name = {model.name: model for model in models}

    def json_response(payload: Mapping[str, Any], status: int = 200) -> Response:
        return Response(json.dumps(payload), status_code=status, media_type="application/json")

    async def server_metadata() -> Response:
        metadata = dict(server.dataplane.metadata())
        metadata["extensions"] = [*metadata.get("extensions", []), BINARY_EXTENSION]
        return json_response(metadata)

    async def model_metadata(model_name: str) -> Response:
        model = by_name.get(model_name)
        if model is None:
            return json_response({"error": f"Model with name {model_name} does not exist."}, 404)
        if not model.ready:
            return json_response({"error": f"Model with name {model_name} is not ready."}, 503)
        return json_response(model.chaoqing_metadata())

    app.add_api_route("/v2", server_metadata, methods=["GET"])
    app.add_api_route("/v2/models/{model_name}", model_metadata, methods=["GET"])


def serve(models: Sequence[str], *, http_port: int, host: str = DEFAULT_HOST,
          options: Mapping[str, Any] | None = None,
          model_options: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Serve ``models`` (chaoqing model names) from KServe's ModelServer on ``host:http_port``
    (HTTP only, one process) until SIGTERM or SIGINT; ``options`` go to every model's runner,
    ``model_options`` (model → its own model options, e.g. a simulator's latency) to one's.

    Raises RunnerError when a model cannot be built, OSError when the port cannot be bound.
    """
    def options_of(name: str) -> dict[str, Any]:
        own = dict(options or {})
        if model_options and name in model_options:
            own["model_options"] = {**own.get("model_options", {}), **model_options[name]}
        return own

    hosted = [ChaoqingKServeModel(name, options_of(name)) for name in models]
    for model in hosted:
        model.load()
    server = _LocalModelServer(host, http_port=http_port, enable_grpc=False, workers=1,
                               enable_docs_url=False)
    _add_chaoqing_routes(server, hosted)
    server.start(hosted)


def _option(text: str) -> tuple[str, Any]:
    """``--option NAME=VALUE`` as (NAME, VALUE parsed as JSON where it parses); raises
    ArgumentTypeError for a NAME that is not a runner setting."""
    name, equals, value = text.partition("=")
    if not equals or name not in RUNNER_SETTING_NAMES:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(RUNNER_SETTING_NAMES)}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _model_option(text: str) -> tuple[str, str, str]:
    """``--model-option MODEL:NAME=VALUE`` as (MODEL, NAME, VALUE); raises ArgumentTypeError."""
    model, colon, rest = text.partition(":")
    name, equals, value = rest.partition("=")
    if not (colon and equals and model and name):
        raise argparse.ArgumentTypeError("expected MODEL:NAME=VALUE, e.g. sim-face:latency_ms=120")
    return model, name, value


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m chaoqing.interop.kserve_model --model NAME [--model NAME ...] --http-port P``.

    Raises SystemExit for arguments it does not take (argparse), RunnerError when a model cannot
    be built, OSError when the port cannot be bound.
    """
    parser = argparse.ArgumentParser(prog="python -m chaoqing.interop.kserve_model",
                                     description="Serve chaoqing models from KServe's model server.")
    parser.add_argument("--model", action="append", required=True, help="a chaoqing model to serve (repeatable)")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--threads", type=int, help="the runner's threads")
    parser.add_argument("--option", action="append", type=_option, default=[], metavar="NAME=VALUE",
                        help='a runner setting, VALUE as JSON where it parses: runtime=ncnn, model_options={"latency_ms": "0"}')
    parser.add_argument("--model-option", action="append", type=_model_option, default=[],
                        metavar="MODEL:NAME=VALUE",
                        help="one model's own option, e.g. sim-face:latency_ms=120 (a simulator's latency)")
    arguments = parser.parse_args(argv)
    options = dict(arguments.option)
    if arguments.threads is not None:
        options["threads"] = arguments.threads
    per_model: dict[str, dict[str, str]] = {}
    for model, name, value in arguments.model_option:
        per_model.setdefault(model, {})[name] = value
    serve(arguments.model, http_port=arguments.http_port, host=arguments.host, options=options,
          model_options=per_model)


if __name__ == "__main__":
    main()
