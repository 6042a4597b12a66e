"""The OpenVINO backend: the converted ONNX form of a bundled model (or a user's ONNX file),
compiled for the CPU.

``openvino.Core().compile_model`` on the ONNX file from
:func:`chaoqing.modelserver.convert.converted_onnx_path`, with ``INFERENCE_NUM_THREADS`` =
threads, one stream (a model server runs one batch per instance), the latency hint, and fp32
inference precision — OpenVINO would otherwise pick bf16 on CPUs that have it (AVX-512 BF16,
AMX), which moves the output by more than 1/255.

Shapes: compiled once, with N, H and W dynamic. Measured here (2 cores, CPU time per call,
median of alternating rounds), compiling again for each input shape was no faster — compact
×4 on 148² 0.395 s dynamic / 0.396 s static, SPAN ×4 0.326 / 0.305 s, x4plus on 64²
2.59 / 2.70 s — and costs 0.3–0.4 s for every new shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import Backend
from chaoqing.modelserver.runners.catalog import UpscalerModel, model_files

if TYPE_CHECKING:
    from chaoqing.modelserver.runners.upscaler import UpscalerDescription

__all__ = ["OpenvinoBackend"]

CPU_DEVICE = "CPU"


class OpenvinoBackend(Backend):
    """The converted model compiled by OpenVINO for the CPU; up to ``max_items`` images per call."""

    platform = "openvino"

    def __init__(self, model: UpscalerDescription, *, threads: int = 0, max_items: int = 8,
                 onnx_path: Path | None = None) -> None:
        """Read ``model``'s ONNX form (``onnx_path``, or the converter's cached file) and compile it.

        Raises RunnerError when the files are missing, or the conversion or compilation fails.
        """
        super().__init__(model.scale)
        import openvino

        if onnx_path is None:
            from chaoqing.modelserver.convert import converted_onnx_path

            if not isinstance(model, UpscalerModel):
                raise RunnerError(f"{model.name}: no ONNX file given")  # only the bundled models convert
            onnx_path = converted_onnx_path(*model_files(model))
        self.model_name = model.name
        self.max_items = max_items
        self._core = openvino.Core()
        self._config = {
            "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        try:
            self._model = self._core.read_model(str(onnx_path))
            self._compiled = self._core.compile_model(self._model, CPU_DEVICE, self._config)
        except RuntimeError as exc:  # OpenVINO's C++ exceptions arrive as RuntimeError
            raise RunnerError(f"{model.name}: OpenVINO could not compile {onnx_path}: {exc}") from exc
        # one infer request per batch computing at once (the batcher may run several, one per
        # compute slot); list.pop and list.append are atomic, so taking one needs no lock
        self._idle_requests: list[Any] = [self._compiled.create_infer_request()]

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch``; raises RunnerError when OpenVINO fails."""
        contiguous = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            request = self._idle_requests.pop()
        except IndexError:
            request = self._compiled.create_infer_request()
        try:
            request.infer({0: contiguous})
            output: np.ndarray = request.get_output_tensor(0).data.copy()
        except RuntimeError as exc:
            raise RunnerError(f"{self.model_name}: OpenVINO failed: {exc}") from exc
        finally:
            self._idle_requests.append(request)
        return output

    def close(self) -> None:
        """Drop the compiled model and its request."""
        self._idle_requests.clear()
        del self._compiled
