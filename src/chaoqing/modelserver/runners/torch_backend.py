"""The PyTorch backend: the converted module of a bundled model, on the CPU or a CUDA GPU.

The module comes from :func:`chaoqing.modelserver.convert.graph_to_torch` (built from the
installed ncnn files): NCHW float in and out, any batch. A batch the server gathers runs as
one forward (per tile position), which is where a GPU earns its keep: DESIGN.md measured
x4plus at 1.0 MP/s for one face and 3.2 for eight batched on an H200.

Precision and layout, from ``--device`` (:func:`torch_options`): on CUDA, fp16 weights and
activations (what tensor cores want); on the CPU, fp32. channels_last memory on both: oneDNN's
CPU convolutions are faster in it too (measured here, 2 threads, median of alternating rounds:
compact ×4 on a 296² tile 0.99 → 0.83 s and 2.11 → 1.90 s in two runs, SPAN ×4 0.93 → 0.68 s
and 2.38 → 1.94 s, x4plus on 84² 2.36 → 2.19 s). Either can be asked for on either device
(:class:`TorchOptions`), which is how the CUDA path's conversions are tested on machines
without a GPU. Inputs arrive as float32 and outputs leave as float32 whatever the precision
inside.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import Backend, Device
from chaoqing.modelserver.runners.catalog import UpscalerModel, model_files

__all__ = ["TorchBackend", "TorchOptions", "torch_device_name", "torch_options"]


@dataclass(frozen=True)
class TorchOptions:
    """``half``: fp16 weights and activations; ``channels_last``: NHWC memory layout."""

    half: bool = False
    channels_last: bool = False


def torch_options(device: Device) -> TorchOptions:
    """fp16 on a GPU (tensor cores), fp32 on the CPU (fp16 convolutions on a CPU are slower
    than fp32, where they exist at all); channels_last on both (see the module docstring)."""
    return TorchOptions(half=device.is_gpu, channels_last=True)


def torch_device_name(device: Device) -> str:
    """``cpu`` or ``cuda:N``, as torch names them."""
    return "cpu" if not device.is_gpu else f"cuda:{device.index}"


class TorchBackend(Backend):
    """One converted module on one torch device; up to ``max_items`` images per forward."""

    platform = "pytorch_libtorch"

    def __init__(self, module: Any, device: Device, options: TorchOptions, *, model_name: str, scale: int,
                 threads: int = 0, max_items: int = 8) -> None:
        """Move ``module`` (a ``torch.nn.Module``, NCHW float in and out) to ``device`` with
        ``options``; ``threads`` sets torch's CPU threads (0: every CPU).

        Raises RunnerError when torch cannot place the module on the device.
        """
        super().__init__(scale)
        import torch

        self._torch = torch
        self.model_name = model_name
        self.options = options
        self.max_items = max_items
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self._device = torch.device(torch_device_name(device))
        self._dtype = torch.float16 if options.half else torch.float32
        self._memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        try:
            self._module = module.eval().to(device=self._device, dtype=self._dtype, memory_format=self._memory_format)
        except (RuntimeError, AssertionError) as exc:  # torch's errors for a device it cannot use
            raise RunnerError(f"{model_name}: torch could not place the model on {device}: {exc}") from exc
        for parameter in self._module.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def for_model(cls, model: UpscalerModel, device: Device, options: TorchOptions, *, threads: int = 0,
                  max_items: int = 8) -> TorchBackend:
        """Convert ``model``'s installed ncnn files into a module and place it.

        Raises RunnerError when the files are missing or cannot be converted, or as
        :meth:`__init__`.
        """
        from chaoqing.modelserver.convert import graph_to_torch, parse_ncnn_model

        module = graph_to_torch(parse_ncnn_model(*model_files(model)))
        return cls(module, device, options, model_name=model.name, scale=model.scale, threads=threads,
                   max_items=max_items)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """One forward of ``batch``; raises RunnerError when torch fails (out of GPU memory too)."""
        torch = self._torch
        try:
            with torch.inference_mode():
                tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                tensor = tensor.to(device=self._device, dtype=self._dtype, memory_format=self._memory_format)
                output = self._module(tensor)
                result: np.ndarray = output.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
            raise RunnerError(f"{self.model_name}: torch failed on a batch of {len(batch)}: {exc}") from exc
        return result

    def close(self) -> None:
        """Drop the module and return the GPU memory it cached."""
        del self._module
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
