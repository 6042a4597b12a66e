"""The ONNX Runtime backend: the converted ONNX form of a bundled model, on the CPU, CUDA or TensorRT.

The ONNX file comes from :func:`chaoqing.modelserver.convert.converted_onnx_path` (built from
the installed ncnn files at first use, cached on disk): input ``input`` float32 [N,3,H,W],
output ``output`` [N,3,sH,sW], N, H and W dynamic, so a whole batch runs in one call.

Execution providers, from ``--device`` (:func:`onnxruntime_providers`):

- ``cpu`` → ``CPUExecutionProvider``, ``intra_op_num_threads`` = threads;
- ``cuda:N`` → ``CUDAExecutionProvider`` on device N, then the CPU one for what CUDA lacks;
- ``tensorrt:N`` → ``TensorrtExecutionProvider`` on device N (fp32, engines cached next to the
  ONNX file, one optimisation profile from a 1×1 image to ``max_items`` tiles of the largest
  side the runner sends), then CUDA, then CPU.

onnxruntime falls back to the CPU without an error when a GPU provider cannot start (a
missing CUDA or cuDNN library); the backend checks which provider the session really got and
refuses to serve on the wrong one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import (
    CPU,
    CUDA,
    ONNXRUNTIME_GPU_HINT,
    ONNXRUNTIME_PROVIDERS,
    TENSORRT,
    Backend,
    Device,
)
from chaoqing.modelserver.runners.catalog import UpscalerModel, model_files

if TYPE_CHECKING:
    from chaoqing.modelserver.runners.upscaler import UpscalerDescription

__all__ = ["CPU_PROVIDER", "OnnxruntimeBackend", "onnxruntime_providers", "tensorrt_profile"]

CPU_PROVIDER = "CPUExecutionProvider"
INPUT_NAME = "input"  # chaoqing.modelserver.convert's ONNX contract
OUTPUT_NAME = "output"
TENSORRT_CACHE_FOLDER = "tensorrt-engines"

ProviderList = list[str | tuple[str, dict[str, Any]]]


def tensorrt_profile(max_items: int, max_side: int, input_name: str = INPUT_NAME) -> dict[str, str]:
    """TensorRT's one optimisation profile for input ``input_name``: from one 1×1 image to
    ``max_items`` images of ``max_side``², tuned for one image of ``max_side``² (a tile)."""
    return {
        "trt_profile_min_shapes": f"{input_name}:1x3x1x1",
        "trt_profile_opt_shapes": f"{input_name}:1x3x{max_side}x{max_side}",
        "trt_profile_max_shapes": f"{input_name}:{max_items}x3x{max_side}x{max_side}",
    }


def onnxruntime_providers(device: Device, *, max_items: int, max_side: int, cache_folder: Path,
                          input_name: str = INPUT_NAME) -> ProviderList:
    """The execution providers, most wanted first, for ``device``.

    Raises RunnerError for a device kind onnxruntime does not drive.
    """
    if device.kind == CPU:
        return [CPU_PROVIDER]
    cuda = (ONNXRUNTIME_PROVIDERS[CUDA], {"device_id": device.index})
    if device.kind == CUDA:
        return [cuda, CPU_PROVIDER]
    if device.kind == TENSORRT:
        tensorrt_options: dict[str, Any] = {
            "device_id": device.index,
            "trt_fp16_enable": False,  # the bundled models' output stays within 1/255 of ncnn's
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_folder / TENSORRT_CACHE_FOLDER),
            **tensorrt_profile(max_items, max_side, input_name),
        }
        return [(ONNXRUNTIME_PROVIDERS[TENSORRT], tensorrt_options), cuda, CPU_PROVIDER]
    raise RunnerError(f"onnxruntime does not run on {device}")


# onnxruntime's own exceptions (pybind11 classes straight under Exception), and what its Python
# layer raises itself
_ONNXRUNTIME_ERROR_NAMES = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
                            "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")


def _onnxruntime_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = (getattr(state, name, None) for name in _ONNXRUNTIME_ERROR_NAMES)
    return (RuntimeError, ValueError, *(kind for kind in found if isinstance(kind, type)))


def _provider_name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


class OnnxruntimeBackend(Backend):
    """One ``InferenceSession`` of the converted model (or a user's ONNX file); up to
    ``max_items`` images per call."""

    platform = "onnxruntime_onnx"

    def __init__(self, model: UpscalerDescription, device: Device, *, threads: int = 0, max_items: int = 8,
                 max_side: int = 0, onnx_path: Path | None = None, input_name: str = INPUT_NAME,
                 output_name: str = OUTPUT_NAME) -> None:
        """Open a session of ``model``'s ONNX form (``onnx_path``, or the converter's cached
        file) on ``device``; ``max_side`` is the longest tile side the runner sends (0: the
        model's default tile with its context), which bounds TensorRT's profile;
        ``input_name`` and ``output_name`` are the graph's image tensors (a user's file names
        its own).

        Raises RunnerError when the files are missing, the conversion or the session fails,
        or the session did not get the provider ``device`` asks for.
        """
        super().__init__(model.scale)
        import onnxruntime

        if onnx_path is None:
            from chaoqing.modelserver.convert import converted_onnx_path

            if not isinstance(model, UpscalerModel):
                raise RunnerError(f"{model.name}: no ONNX file given")  # only the bundled models convert
            onnx_path = converted_onnx_path(*model_files(model))
        self.model_name = model.name
        self.max_items = max_items
        self.input_name, self.output_name = input_name, output_name
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        max_side = max_side or model.default_tile_size + 2 * model.tile_context
        providers = onnxruntime_providers(device, max_items=max_items, max_side=max_side,
                                          cache_folder=onnx_path.parent, input_name=input_name)
        self._errors = _onnxruntime_errors()
        try:
            self._session = onnxruntime.InferenceSession(str(onnx_path), options, providers=providers)
        except self._errors as exc:
            raise RunnerError(f"{model.name}: onnxruntime could not open {onnx_path}: {exc}") from exc
        wanted = _provider_name(providers[0])
        got = self._session.get_providers()
        if not got or got[0] != wanted:
            raise RunnerError(f"{model.name}: onnxruntime could not use {wanted} on {device} (it fell back to "
                              f"{', '.join(got)}); check the CUDA and cuDNN libraries, or {ONNXRUNTIME_GPU_HINT}")
        self.providers = tuple(got)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` through the session; raises RunnerError when onnxruntime fails."""
        try:
            outputs = self._session.run([self.output_name],
                                        {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        except self._errors as exc:
            raise RunnerError(f"{self.model_name}: onnxruntime failed: {exc}") from exc
        output: np.ndarray = outputs[0]
        return output

    def close(self) -> None:
        """Drop the session (its memory goes with it)."""
        del self._session
