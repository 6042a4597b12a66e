"""chaoqing's runners as a Seldon MLServer model: ``pip install 'chaoqing[mlserver]'``.

MLServer (a KServe v2 server chaoqing did not write) loads :class:`ChaoqingModel` from a folder
of settings files; the gateway then calls it like any v2 endpoint (docs/scale-out.md)::

    chaoqing-models/
      settings.json                          {"http_port": 9100, "grpc_port": 9101,
                                              "metrics_port": 9102, "parallel_workers": 0}
      realesr-animevideov3-x4/model-settings.json
          {"name": "realesr-animevideov3-x4",
           "implementation": "chaoqing.interop.mlserver_model.ChaoqingModel",
           "parameters": {"extra": {"threads": 2, "runtime": "ncnn", "device": "cpu"}}}

    mlserver start chaoqing-models

:func:`write_repository` writes such a folder. The model's MLServer name is the chaoqing
model it serves (``parameters.extra.model`` may name another); ``extra`` takes the
:class:`~chaoqing.modelserver.runners.RunnerSettings` fields ``threads``, ``runtime``,
``device``, ``tile_size``, ``max_batch_size``, ``detector_upsample``, ``detector_threshold``
and, for the ``sim-*`` simulators, ``model_options``.

What MLServer gives and what it does not (the gateway copes with both: docs/model-server.md,
"What the gateway needs from a v2 server"):

- Its REST side takes JSON tensors only (no binary tensor data extension), and lists no
  extensions in ``GET /v2``; the gateway then sends and asks for JSON.
- The metadata is chaoqing's own: :meth:`ChaoqingModel.metadata` publishes the runner's
  inputs, outputs and ``parameters`` (scale, tile size, edge padding, ...), so the gateway
  tiles and pads as it does against chaoqing's model server, and the images agree.
- The request's inputs are checked against that metadata as chaoqing's server checks them
  (400 for a wrong datatype, shape or value range); a runner failure answers 500.
- No dynamic batching across requests (MLServer's adaptive batching concatenates along the
  first dimension, which photos of different sizes do not share): one call, one runner
  batch, one at a time per model on a thread of its own, so that MLServer's event loop keeps
  answering health checks while a photo computes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataModelResponse,
    MetadataTensor,
    Parameters,
    RequestInput,
    ResponseOutput,
)

from chaoqing.errors import ChaoqingError, InvalidTensorRequest
from chaoqing.interop.hosted import MODEL_SETTING, build_runner, check_inputs, chosen_outputs
from chaoqing.modelserver.runners.base import Runner
from chaoqing.protocol import v2

__all__ = ["IMPLEMENTATION", "ChaoqingModel", "write_repository"]

_log = logging.getLogger("chaoqing.interop.mlserver")

IMPLEMENTATION = f"{__name__}.ChaoqingModel"  # model-settings.json's "implementation"
HTTP_BAD_REQUEST = 400
HTTP_INTERNAL_ERROR = 500


class ChaoqingModel(MLModel):  # type: ignore[misc]
    """One chaoqing runner (an upscaler, the face detector, a simulator) as an MLServer model."""

    _runner: Runner | None = None
    _executor: ThreadPoolExecutor | None = None

    async def load(self) -> bool:
        """Build the runner named by the settings (on a thread: a model loads for seconds).

        Raises RunnerError when it cannot be built (MLServer 1.7 then stops at start-up: "Some
        of the models failed to load during startup!", with this error's traceback).
        """
        parameters = self.settings.parameters
        extra = dict((parameters.extra if parameters is not None else None) or {})
        model = str(extra.get(MODEL_SETTING, self.name))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"chaoqing-{model}")
        loop = asyncio.get_running_loop()
        self._runner = await loop.run_in_executor(self._executor, build_runner, self.name, extra)
        _log.info("chaoqing model %s loaded as %s", model, self.name)
        self.ready = True
        return True

    async def unload(self) -> bool:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        return True

    def _loaded(self) -> tuple[Runner, ThreadPoolExecutor]:
        if self._runner is None or self._executor is None:
            raise MLServerError(f"model {self.name} is not loaded", status_code=503)
        return self._runner, self._executor

    async def metadata(self) -> MetadataModelResponse:
        """chaoqing's metadata for the runner: its tensors and ``parameters``."""
        runner, _ = self._loaded()
        published = runner.spec.as_metadata()

        def tensors(key: str) -> list[MetadataTensor]:
            return [MetadataTensor(name=item["name"], datatype=item["datatype"], shape=item["shape"])
                    for item in published[key]]

        return MetadataModelResponse(
            name=self.name, platform=published["platform"], versions=self.settings.versions or [],
            inputs=tensors("inputs"), outputs=tensors("outputs"), parameters=Parameters(**published["parameters"]),
        )

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Decode the v2 inputs, run the runner's batch call on its thread, encode the outputs
        asked for (all of them when none are named).

        Raises MLServerError: 400 for inputs that do not fit the metadata, 500 when the runner fails.
        """
        runner, executor = self._loaded()
        try:
            inputs = {item.name: _decode_input(item) for item in payload.inputs}
        except (TypeError, ValueError, OverflowError) as exc:
            raise MLServerError(f"malformed input: {exc}", status_code=HTTP_BAD_REQUEST) from None
        try:
            check_inputs(runner, inputs)
        except InvalidTensorRequest as exc:
            raise MLServerError(str(exc), status_code=HTTP_BAD_REQUEST) from None
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(executor, runner.run, inputs)
        except ChaoqingError as exc:
            raise MLServerError(f"model {self.name} failed: {exc}", status_code=HTTP_INTERNAL_ERROR) from None
        try:
            wanted = chosen_outputs(self.name, outputs, [item.name for item in payload.outputs or []])
        except InvalidTensorRequest as exc:
            raise MLServerError(str(exc), status_code=HTTP_BAD_REQUEST) from None
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[_encode_output(name, outputs[name]) for name in wanted],
        )


def _decode_input(tensor: RequestInput) -> np.ndarray:
    """A v2 input as the array its datatype and shape say (flat or nested ``data``).

    Raises ValueError for a datatype chaoqing does not take or data that does not fill the shape.
    """
    dtype = v2.DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise ValueError(f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
    array = np.asarray(tensor.data.root if hasattr(tensor.data, "root") else tensor.data, dtype=dtype)
    return array.reshape(tensor.shape)


def _encode_output(name: str, array: np.ndarray) -> ResponseOutput:
    """An output with the runner's own shape. (MLServer's NumpyCodec turns a 1-D array into
    [N, 1], taking the first dimension for a batch: the detector's scores are [N].)"""
    return ResponseOutput(name=name, shape=list(array.shape), datatype=v2.datatype_of(array),
                          data=np.asarray(array).reshape(-1).tolist())


def write_repository(directory: Path, models: Iterable[str], *, http_port: int, grpc_port: int,
                     metrics_port: int, host: str = "127.0.0.1",
                     runner: Mapping[str, Any] | None = None) -> None:
    """Write the folder ``mlserver start DIRECTORY`` serves ``models`` from: HTTP on
    ``host:http_port``, gRPC and metrics on the ports given (MLServer always opens them),
    inference in MLServer's own process (``parallel_workers`` 0), ``runner`` as every
    model's ``parameters.extra``.

    Raises OSError when the files cannot be written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    server_settings = {
        "host": host, "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
        "parallel_workers": 0, "load_models_at_startup": True,
    }
    (directory / "settings.json").write_text(json.dumps(server_settings, indent=2) + "\n")
    for model in models:
        folder = directory / model
        folder.mkdir(exist_ok=True)
        model_settings = {
            "name": model, "implementation": IMPLEMENTATION, "parameters": {"extra": dict(runner or {})},
        }
        (folder / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
