"""The ncnn backend: the bundled ``.param``/``.bin`` files as they ship, on the CPU or a Vulkan GPU.

ncnn has no batch dimension: one image per call (:attr:`NcnnBackend.max_items` is 1), so a
batch runs item by item. Its convolutions release the GIL. Memory per input pixel of a tile
(ncnn's default options, CPU): ≈ 3.2 KB for the compact model, ≈ 50 KB for x4plus.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import Backend, Device
from chaoqing.modelserver.runners.catalog import UpscalerModel, model_files

if TYPE_CHECKING:
    from chaoqing.modelserver.runners.upscaler import UpscalerDescription

__all__ = ["INPUT_BLOB", "OUTPUT_BLOB", "NcnnBackend", "check_vulkan_device"]

INPUT_BLOB = "data"  # every bundled .param file: `Input input.1 0 1 data`
OUTPUT_BLOB = "output"  # last layer's top blob in every bundled .param file
VULKAN_LOADER = "libvulkan.so.1"  # what ncnn dlopens for its GPUs


def _vulkan_loader_found() -> bool:
    try:
        ctypes.CDLL(VULKAN_LOADER)
    except OSError:
        return False
    return True


def check_vulkan_device(ncnn: Any, index: int) -> None:
    """Raises RunnerError unless ncnn sees Vulkan GPU ``index`` (none without libvulkan.so.1)."""
    # without the loader ncnn would only print its dlopen failures (8 lines) and count none
    gpu_count = ncnn.get_gpu_count() if _vulkan_loader_found() else 0
    if gpu_count == 0:
        reason = "" if _vulkan_loader_found() else f" ({VULKAN_LOADER} not found: install a Vulkan driver)"
        raise RunnerError(f"Vulkan device {index} requested but ncnn sees no GPU; use --device cpu{reason}")
    if index >= gpu_count:
        raise RunnerError(
            f"Vulkan device {index} requested but ncnn sees only {gpu_count} "
            f"GPU(s), numbered 0 to {gpu_count - 1}"
        )


class NcnnBackend(Backend):
    """One ncnn ``Net`` holding the model; one image per call."""

    platform = "ncnn"
    max_items = 1

    def __init__(self, model: UpscalerDescription, device: Device, *, threads: int = 0,
                 files: tuple[Path, Path] | None = None, input_blob: str = INPUT_BLOB,
                 output_blob: str = OUTPUT_BLOB) -> None:
        """Load the model's files (``files``: a user's .param and .bin; else the bundled
        model's) into ncnn on ``device`` (cpu or vulkan:N).

        Raises RunnerError for missing files, a Vulkan GPU ncnn does not see, or files ncnn
        cannot load or whose blobs are not ``input_blob`` → ``output_blob``.
        """
        super().__init__(model.scale)
        if files is None:
            if not isinstance(model, UpscalerModel):
                raise RunnerError(f"{model.name}: no ncnn files given")
            files = model_files(model)
        param_path, weights_path = files
        self.input_blob, self.output_blob = input_blob, output_blob
        import ncnn  # lazy: only a process that serves this model pays for it

        self.model_name = model.name
        self._ncnn = ncnn
        self._net = ncnn.Net()
        self._net.opt.num_threads = threads or os.cpu_count() or 1
        if device.is_gpu:
            check_vulkan_device(ncnn, device.index)
            self._net.opt.use_vulkan_compute = True
            self._net.set_vulkan_device(device.index)
        else:
            self._net.opt.use_vulkan_compute = False
        if self._net.load_param(str(param_path)) != 0:
            raise RunnerError(f"ncnn could not load {param_path}")
        if self._net.load_model(str(weights_path)) != 0:
            raise RunnerError(f"ncnn could not load {weights_path}")
        if input_blob not in self._net.input_names() or output_blob not in self._net.output_names():
            raise RunnerError(
                f"{param_path} does not have input blob {input_blob!r} and output blob "
                f"{output_blob!r} (it has {self._net.input_names()} → {self._net.output_names()})"
            )

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the one image of ``batch`` ([1,3,H,W]); returns [1,3,sH,sW].

        Raises RunnerError when ncnn reports a failure.
        """
        # ncnn.Mat(array) wraps the array's memory without owning it: keep `tile` referenced
        # until the extraction is done.
        tile = np.ascontiguousarray(batch[0])
        extractor = self._net.create_extractor()
        try:
            extractor.input(self.input_blob, self._ncnn.Mat(tile))
            status, output_mat = extractor.extract(self.output_blob)
            if status != 0:
                raise RunnerError(f"{self.model_name}: ncnn extract failed with status {status}")
            output = np.array(output_mat, dtype=np.float32, copy=True)
        finally:
            extractor.clear()
        return output[np.newaxis]

    def close(self) -> None:
        """Free the network's weights and blobs."""
        self._net.clear()
