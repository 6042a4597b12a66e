"""Runtimes: which engines can compute an upscaler, on which devices, and what each one does.

Everything an upscaler needs is shared (:mod:`chaoqing.modelserver.runners.upscaler`: the
tensor contract, edge padding, tiles, metadata); a :class:`Backend` only runs a float32 NCHW
batch of RGB in [0, 1] and returns the network's float32 NCHW output. One per runtime:

==============  ==============================  =========================  =======================
runtime         devices                         module                     install
==============  ==============================  =========================  =======================
``ncnn``        ``cpu``, ``vulkan:N``           :mod:`.ncnn_backend`       (a dependency)
``openvino``    ``cpu``                         :mod:`.openvino_backend`   ``chaoqing[openvino]``
``onnxruntime`` ``cpu``, ``cuda:N``,            :mod:`.onnxruntime_backend` ``chaoqing[onnx]``
                ``tensorrt:N``                                             (GPUs: onnxruntime-gpu)
``torch``       ``cpu``, ``cuda:N``             :mod:`.torch_backend`      ``chaoqing[torch]``
==============  ==============================  =========================  =======================

The ONNX and PyTorch forms of the bundled ncnn weights come from
:mod:`chaoqing.modelserver.convert` (built from the installed packages' files at first use,
cached on disk). A runtime that is not installed, or a device that is not there, is found by
:func:`check_runtime` before a model server listens, and said in one line that names what to
install: ``runtime openvino is not installed: pip install 'chaoqing[openvino]'``.

Importing this module imports no runtime.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import logging
import re
import types
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from chaoqing.errors import RunnerError

if TYPE_CHECKING:
    from chaoqing.modelserver.runners.catalog import UpscalerModel

__all__ = [
    "AUTO",
    "RUNTIMES",
    "Backend",
    "Device",
    "Runtime",
    "check_device",
    "check_runtime",
    "create_backend",
    "cuda_device_count",
    "import_runtime",
    "parse_device",
    "resolve_runtime",
    "runtime_installed",
]

_log = logging.getLogger("chaoqing.modelserver.runners")

CPU = "cpu"
CUDA = "cuda"
TENSORRT = "tensorrt"
VULKAN = "vulkan"
_DEVICE_PATTERN = re.compile(r"(cpu)|(cuda|tensorrt|vulkan)(?::(\d+))?")


@dataclass(frozen=True)
class Device:
    """``cpu``, or an accelerator kind and its index: ``cuda:0``, ``tensorrt:1``, ``vulkan:0``."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return CPU if self.kind == CPU else f"{self.kind}:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind != CPU


def parse_device(text: str) -> Device:
    """``"cpu"`` → cpu; ``"cuda"`` / ``"cuda:N"``, ``"tensorrt[:N]"``, ``"vulkan[:N]"`` → that
    kind, index N (0 when left out).

    Raises RunnerError for anything else.
    """
    match = _DEVICE_PATTERN.fullmatch(text.strip().lower())
    if match is None:
        raise RunnerError(f"device {text!r} is not cpu, cuda:N, tensorrt:N or vulkan:N")
    if match.group(1):
        return Device(CPU)
    return Device(match.group(2), int(match.group(3) or 0))


@dataclass(frozen=True)
class Runtime:
    """One runtime: its name, the module that must import, the devices it drives and what to
    install for it (``extra``: chaoqing's optional dependency group, empty for ncnn)."""

    name: str
    module: str
    device_kinds: tuple[str, ...]
    extra: str
    platform: str  # the v2 metadata ``platform`` (Triton's names where Triton has one)

    def install_hint(self) -> str:
        return f"pip install 'chaoqing[{self.extra}]'" if self.extra else f"pip install {self.module}"


RUNTIMES: Mapping[str, Runtime] = types.MappingProxyType({
    "ncnn": Runtime("ncnn", "ncnn", (CPU, VULKAN), "", "ncnn"),
    "openvino": Runtime("openvino", "openvino", (CPU,), "openvino", "openvino"),
    "onnxruntime": Runtime("onnxruntime", "onnxruntime", (CPU, CUDA, TENSORRT), "onnx", "onnxruntime_onnx"),
    "torch": Runtime("torch", "torch", (CPU, CUDA), "torch", "pytorch_libtorch"),
})

# What the error says when onnxruntime lacks a GPU provider: the CPU wheel ships only the CPU one.
ONNXRUNTIME_GPU_HINT = "pip uninstall onnxruntime && pip install onnxruntime-gpu (CUDA 12, cuDNN 9)"
ONNXRUNTIME_PROVIDERS = {CUDA: "CUDAExecutionProvider", TENSORRT: "TensorrtExecutionProvider"}
TORCH_CUDA_HINT = "install a CUDA build of torch 2.13 (https://pytorch.org/get-started/locally/)"
CUDA_DRIVER_LIBRARY = "libcuda.so.1"  # the NVIDIA driver's API; present wherever a driver is
CUDA_SUCCESS = 0


# ``--runtime auto`` (the default): on the CPU, each model's measured default
# (:attr:`~chaoqing.modelserver.runners.catalog.UpscalerModel.cpu_runtime`, docs/model-server.md
# "Runtimes"), ncnn when that one is not installed; on a GPU, the runtime that drives it best:
# ncnn on Vulkan (the only one there), PyTorch on CUDA (fp16 and real batches), ONNX Runtime on
# TensorRT (the only one there).
AUTO = "auto"
FALLBACK_RUNTIME = "ncnn"  # a dependency: always installed
GPU_RUNTIMES = types.MappingProxyType({VULKAN: "ncnn", CUDA: "torch", TENSORRT: "onnxruntime"})


def runtime_named(name: str) -> Runtime:
    """The :class:`Runtime` called ``name``; raises RunnerError naming the known ones."""
    runtime = RUNTIMES.get(name)
    if runtime is None:
        raise RunnerError(f"unknown runtime {name!r}; choose {', '.join(RUNTIMES)}")
    return runtime


def check_device(runtime_name: str, device_text: str) -> Device:
    """``device_text`` parsed, and checked to be a kind ``runtime_name`` drives (cheap: nothing
    is imported).

    Raises RunnerError for an unknown runtime, a malformed device or a pair that does not go
    together (``ncnn`` on ``cuda:0``).
    """
    device = parse_device(device_text)
    if runtime_name == AUTO:
        return device  # every device kind has a runtime that drives it (GPU_RUNTIMES)
    runtime = runtime_named(runtime_name)
    if device.kind not in runtime.device_kinds:
        kinds = ", ".join(kind if kind == CPU else f"{kind}:N" for kind in runtime.device_kinds)
        raise RunnerError(f"runtime {runtime.name} does not run on {device}; it takes --device {kinds}")
    return device


def runtime_installed(runtime_name: str) -> bool:
    """Whether the runtime's module is installed (located, not imported: cheap)."""
    try:
        return importlib.util.find_spec(runtime_named(runtime_name).module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module set to None
        return False


@functools.cache
def _log_fallback(model_name: str, runtime_name: str) -> None:
    """Say once per process and model that its default runtime is missing and ncnn runs it."""
    _log.warning("%s: its default CPU runtime %s is not installed (%s); running it on %s",
                 model_name, runtime_name, runtime_named(runtime_name).install_hint(), FALLBACK_RUNTIME)


def resolve_runtime(model: UpscalerModel, runtime_name: str, device_text: str) -> str:
    """The runtime that computes ``model`` on ``device_text`` when ``runtime_name`` is asked for:
    itself, unless it is ``auto`` (:data:`AUTO`): then ``model.cpu_runtime`` on the CPU, or
    ncnn when that is not installed (logged once), and :data:`GPU_RUNTIMES`' choice on a GPU.

    Raises RunnerError as :func:`check_device` does.
    """
    device = check_device(runtime_name, device_text)
    if runtime_name != AUTO:
        return runtime_name
    if device.is_gpu:
        return GPU_RUNTIMES[device.kind]
    if model.cpu_runtime != FALLBACK_RUNTIME and not runtime_installed(model.cpu_runtime):
        _log_fallback(model.name, model.cpu_runtime)
        return FALLBACK_RUNTIME
    return model.cpu_runtime


def import_runtime(runtime_name: str) -> types.ModuleType:
    """Import the runtime's module.

    Raises RunnerError saying what to install when it is missing or fails to import.
    """
    runtime = runtime_named(runtime_name)
    try:
        return importlib.import_module(runtime.module)
    except ImportError as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" (importing it failed: {exc})"
        raise RunnerError(f"runtime {runtime.name} is not installed: {runtime.install_hint()}{detail}") from exc


def cuda_device_count() -> tuple[int, str]:
    """How many CUDA GPUs the NVIDIA driver sees, and why none when 0.

    Asks the driver itself (``cuInit``, ``cuDeviceGetCount`` in ``libcuda.so.1``), so the
    answer needs no runtime and is the same for torch and onnxruntime.
    """
    try:
        driver = ctypes.CDLL(CUDA_DRIVER_LIBRARY)
    except OSError:
        return 0, f"no NVIDIA driver ({CUDA_DRIVER_LIBRARY} not found)"
    status = driver.cuInit(0)
    if status != CUDA_SUCCESS:
        return 0, f"the NVIDIA driver did not start (cuInit error {status})"
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != CUDA_SUCCESS:
        return 0, f"the NVIDIA driver could not count GPUs (error {status})"
    return count.value, "" if count.value else "the NVIDIA driver sees no GPU"


def _check_cuda_index(device: Device) -> None:
    count, reason = cuda_device_count()
    if count == 0:
        raise RunnerError(f"device {device} requested but there is no CUDA GPU: {reason}; use --device cpu")
    if device.index >= count:
        raise RunnerError(f"device {device} requested but the driver sees only {count} GPU(s), "
                          f"numbered 0 to {count - 1}")


def check_runtime(runtime_name: str, device_text: str) -> None:
    """Check, before any model loads, that ``runtime_name`` is installed and ``device_text``
    exists: the runtime is imported and asked (ncnn for its Vulkan GPUs, onnxruntime for the
    execution provider, torch for CUDA), the NVIDIA driver for its GPUs.

    Raises RunnerError saying what is missing and what to install.
    """
    device = check_device(runtime_name, device_text)
    module: Any = import_runtime(runtime_name)
    if runtime_name == "ncnn" and device.kind == VULKAN:
        from chaoqing.modelserver.runners.ncnn_backend import check_vulkan_device

        check_vulkan_device(module, device.index)
    elif runtime_name == "onnxruntime" and device.is_gpu:
        provider = ONNXRUNTIME_PROVIDERS[device.kind]
        if provider not in module.get_available_providers():
            raise RunnerError(f"this onnxruntime has no {provider} (it has "
                              f"{', '.join(module.get_available_providers())}): {ONNXRUNTIME_GPU_HINT}")
        _check_cuda_index(device)
    elif runtime_name == "torch" and device.is_gpu:
        if not module.backends.cuda.is_built():
            raise RunnerError(f"this torch ({module.__version__}) was built without CUDA: {TORCH_CUDA_HINT}")
        _check_cuda_index(device)


class Backend(ABC):
    """Runs one network on one device: float32 [N,3,H,W] RGB in [0, 1] → float32 [N,3,sH,sW].

    ``max_items`` is how many images one call takes (1 for a runtime without a batch
    dimension, ncnn); ``forward_calls`` counts the calls to the network (for metrics and
    tests: a batch of N in one forward adds 1; exact while calls do not overlap). Calls may
    come from several threads at once (the batcher runs a batch per free compute slot), so a
    backend keeps no per-call state of its own.
    """

    platform: str
    max_items: int = 1

    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.forward_calls = 0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on ``batch`` (float32 [N,3,H,W], N ≤ :attr:`max_items`; may be a
        strided view).

        Raises RunnerError when the runtime fails or answers with the wrong shape.
        """
        count, _, height, width = batch.shape
        output = self._forward(batch)
        self.forward_calls += 1
        expected = (count, 3, height * self.scale, width * self.scale)
        if output.shape != expected:
            raise RunnerError(f"{self.platform} returned shape {list(output.shape)}, expected {list(expected)}")
        return output

    @abstractmethod
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """The runtime's own call; raises RunnerError when it fails."""

    def close(self) -> None:
        """Release the runtime's memory. Default: nothing to release."""


def create_backend(model: UpscalerModel, runtime_name: str, device_text: str, *, threads: int,
                   max_items: int, max_side: int) -> Backend:
    """Load ``model`` on ``runtime_name`` and ``device_text``; ``threads`` are compute threads
    (0 is every CPU), ``max_items`` the largest batch one call gets, ``max_side`` the longest
    tile side it gets (TensorRT builds its engine for it).

    Raises RunnerError when the runtime or device is missing (as :func:`check_runtime`), the
    files are missing, or the runtime cannot load them.
    """
    check_runtime(runtime_name, device_text)
    device = parse_device(device_text)
    if runtime_name == "ncnn":
        from chaoqing.modelserver.runners.ncnn_backend import NcnnBackend

        return NcnnBackend(model, device, threads=threads)
    if runtime_name == "openvino":
        from chaoqing.modelserver.runners.openvino_backend import OpenvinoBackend

        return OpenvinoBackend(model, threads=threads, max_items=max_items)
    if runtime_name == "onnxruntime":
        from chaoqing.modelserver.runners.onnxruntime_backend import OnnxruntimeBackend

        return OnnxruntimeBackend(model, device, threads=threads, max_items=max_items, max_side=max_side)
    from chaoqing.modelserver.runners.torch_backend import TorchBackend, torch_options

    return TorchBackend.for_model(model, device, torch_options(device), threads=threads, max_items=max_items)
