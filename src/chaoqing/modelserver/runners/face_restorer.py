"""Face restorers of the user's own (``[models.NAME]`` with ``kind = "face-restorer"``):
GFPGAN, CodeFormer, GPEN, RestoreFormer++ as FaceFusion exports them to ONNX, or as .pth
files spandrel reads.

The tensor contract, the same for every file:

- ``image`` UINT8 [B,S,S,3] RGB: faces already aligned to the model's template (the gateway
  warps them; the metadata says which template and ``S``);
- ``weight`` FP32 [B,1] in [0, 1], optional, only for a model that takes a fidelity weight
  (CodeFormer's: 0 restores most, 1 keeps the input face closest); absent, the table's
  ``weight`` (FaceFusion's default 0.5);
- out ``image`` UINT8 [B,S,S,3] RGB: the restored face at the size it came in (scale 1).

Inside, FaceFusion's conventions (``face_enhancer`` ``prepare_crop_frame`` /
``normalize_crop_frame``): RGB NCHW float32 in [-1, 1] (``x / 127.5 - 1``), the output
clipped to [-1, 1] and mapped back as ``round((y + 1) · 127.5)``.

What a file must be, checked when the model server starts (:func:`create_face_restorer`),
each failure a :class:`RunnerError` in one line that starts with the config key and names the
file:

=================  =======================================================================
ONNX               one float32 input [N,3,S,S] (``input`` in FaceFusion's exports; N 1 or
                   dynamic, S fixed or dynamic, square), optionally a scalar ``weight``
                   (double [1] in CodeFormer's export, as FaceFusion feeds it; float taken
                   too), nothing else; its first output the face, [N,3,S,S]
.pth / .safetensors  a state dict spandrel recognises as a face model (purpose ``FaceSR``:
                   GFPGAN and RestoreFormer in spandrel 0.4.2, CodeFormer in
                   spandrel_extra_arches 0.2.0), RGB; the network called on [-1, 1] as its
                   own repository does (spandrel's descriptor call would clamp to [0, 1])
=================  =======================================================================

and one call on a grey face of the size served must give a face of that size back.

The size: ``input_size`` from the table; else what the ONNX file declares; else 512 (every
published restorer but GPEN-BFR-256/1024/2048 takes 512). The template comes from the table
only (``ffhq-512`` unless it says ``arcface-128``): no file says which alignment it was trained
on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from chaoqing.config import UserModel
from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import (
    CPU,
    CUDA,
    ONNXRUNTIME_GPU_HINT,
    ONNXRUNTIME_PROVIDERS,
    Device,
)
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec, image_batch
from chaoqing.modelserver.runners.catalog import ModelCard

__all__ = [
    "DEFAULT_FACE_SIZE",
    "FaceNetwork",
    "FaceRestorerRunner",
    "OnnxFaceNetwork",
    "TorchFaceNetwork",
    "create_face_restorer",
]

DEFAULT_FACE_SIZE = 512  # GFPGAN, CodeFormer, GPEN-BFR-512, RestoreFormer++ (FaceFusion's model set)
IMAGE_INPUT_NAME = "input"  # FaceFusion face_enhancer forward(): the crop goes to the input named so
WEIGHT_INPUT_NAME = "weight"  # ... and the fidelity weight, numpy double [1], to this one
RGB_CHANNELS = 3
HALF_RANGE = 127.5  # uint8 → [-1, 1]: x / 127.5 - 1, as (x / 255 - 0.5) / 0.5 is
ONNX_FLOAT = "tensor(float)"
ONNX_WEIGHT_TYPES = {"tensor(double)": np.float64, "tensor(float)": np.float32}
CODEFORMER = "CodeFormer"  # the spandrel architecture whose forward takes the fidelity weight

GREY_PROBE = 0.0  # the probe face: mid grey in [-1, 1]


class FaceNetwork(Protocol):
    """A face restorer's network on its runtime: float32 [N,3,S,S] in [-1, 1] (and a weight)
    → float32 [N,3,S,S], about [-1, 1]."""

    @property
    def platform(self) -> str: ...

    @property
    def architecture(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def takes_weight(self) -> bool: ...

    @property
    def max_items(self) -> int: ...

    def restore(self, batch: np.ndarray, weight: float) -> np.ndarray:
        """Restore ``batch``; raises RunnerError when the runtime fails."""
        ...

    def close(self) -> None: ...


def _where(model: UserModel) -> str:
    return f"models.{model.name}.path"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- ONNX (FaceFusion's exports) ---------------------------------------------------------------


@dataclass(frozen=True)
class _OnnxTensors:
    """What a face restorer's ONNX graph takes and gives, as checked."""

    image_name: str
    output_name: str
    size: int
    fixed_batch: int  # 0: dynamic
    weight_name: str  # "": no weight input
    weight_dtype: Any
    weight_shape: tuple[int, ...]


def _onnx_tensors(session: Any, model: UserModel) -> _OnnxTensors:
    """Check the session's inputs and outputs against the contract (module notes).

    Raises RunnerError naming the file and what was expected.
    """
    where, path = _where(model), model.path
    inputs, outputs = session.get_inputs(), session.get_outputs()
    images = [tensor for tensor in inputs if len(tensor.shape) == 4]
    if len(images) > 1:  # which is the face: FaceFusion's name says
        images = [tensor for tensor in images if tensor.name == IMAGE_INPUT_NAME] or images
    if len(images) != 1 or images[0].type != ONNX_FLOAT:
        found = ", ".join(f"{tensor.name} {tensor.type} {list(tensor.shape)}" for tensor in inputs) or "none"
        raise RunnerError(f"{where}: {path} has no single 4-D float input (it has {found}); a face restorer "
                          f"takes float32 [N,3,S,S] RGB in [-1, 1] ('{IMAGE_INPUT_NAME}' in FaceFusion's exports)")
    image = images[0]
    batch, channels, height, width = image.shape
    if isinstance(channels, int) and channels != RGB_CHANNELS:
        raise RunnerError(f"{where}: {path} takes {channels} channels ({list(image.shape)}); a face restorer "
                          f"takes RGB, [N,3,S,S]")
    if isinstance(batch, int) and batch > 1:
        raise RunnerError(f"{where}: {path} takes a fixed batch of {batch}; chaoqing sends 1 or a dynamic batch")
    fixed_sides = [side for side in (height, width) if isinstance(side, int) and side > 0]
    if len(fixed_sides) == 1 or len(set(fixed_sides)) > 1:
        raise RunnerError(f"{where}: {path} takes a {width}×{height} face; a face restorer takes a square S×S face")
    declared = fixed_sides[0] if fixed_sides else 0
    if declared and model.input_size and model.input_size != declared:
        raise RunnerError(f"models.{model.name}.input_size: {model.input_size}, but {path} takes "
                          f"{declared}×{declared} faces")
    weight_name = ""
    weight_dtype: Any = np.float32
    weight_shape: tuple[int, ...] = ()
    for tensor in inputs:
        if tensor is image:
            continue
        rank_ok = len(tensor.shape) <= 1 and all(not isinstance(side, int) or side == 1 for side in tensor.shape)
        if tensor.name != WEIGHT_INPUT_NAME or tensor.type not in ONNX_WEIGHT_TYPES or not rank_ok:
            raise RunnerError(f"{where}: {path} has an input {tensor.name} {tensor.type} {list(tensor.shape)}; "
                              f"a face restorer takes the face and at most a scalar double or float "
                              f"'{WEIGHT_INPUT_NAME}' (CodeFormer's fidelity)")
        weight_name, weight_dtype, weight_shape = tensor.name, ONNX_WEIGHT_TYPES[tensor.type], (1,) * len(tensor.shape)
    if not outputs:
        raise RunnerError(f"{where}: {path} has no output")
    return _OnnxTensors(image.name, outputs[0].name, model.input_size or declared or DEFAULT_FACE_SIZE,
                        batch if isinstance(batch, int) and batch > 0 else 0, weight_name, weight_dtype, weight_shape)


class OnnxFaceNetwork:
    """A face restorer's ONNX file in one onnxruntime session, on the CPU or a CUDA GPU."""

    platform = "onnxruntime_onnx"
    architecture = "ONNX"

    def __init__(self, model: UserModel, device: Device, *, threads: int = 0, max_items: int = 8) -> None:
        """Open ``model``'s file and check its tensors.

        Raises RunnerError naming the file when it does not open or is not a face restorer
        (module notes), and when the session did not get the device's provider.
        """
        import onnxruntime
        from onnxruntime.capi import onnxruntime_pybind11_state

        if device.kind not in (CPU, CUDA):
            raise RunnerError(f"models.{model.name}.runtime: face restorers on onnxruntime run on cpu or cuda:N, "
                              f"not {device}")
        self.model_name = model.name
        self._errors: tuple[type[BaseException], ...] = (
            RuntimeError, ValueError, onnxruntime_pybind11_state.Fail, onnxruntime_pybind11_state.InvalidArgument,
            onnxruntime_pybind11_state.RuntimeException)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.kind == CUDA:
            providers.insert(0, (ONNXRUNTIME_PROVIDERS[CUDA], {"device_id": device.index}))
        try:
            self._session = onnxruntime.InferenceSession(model.path, options, providers=providers)
        except Exception as exc:  # onnxruntime's pybind11 errors for an unreadable file
            raise RunnerError(f"{_where(model)}: {model.path} is not an ONNX model onnxruntime opens "
                              f"({_first_line(exc)})") from exc
        got = self._session.get_providers()
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if not got or got[0] != wanted:
            raise RunnerError(f"{model.name}: onnxruntime could not use {wanted} on {device} (it fell back to "
                              f"{', '.join(got)}); check the CUDA and cuDNN libraries, or {ONNXRUNTIME_GPU_HINT}")
        self._tensors = _onnx_tensors(self._session, model)
        self.size = self._tensors.size
        self.takes_weight = bool(self._tensors.weight_name)
        self.max_items = self._tensors.fixed_batch or max_items

    def restore(self, batch: np.ndarray, weight: float) -> np.ndarray:
        """One session run of ``batch``; raises RunnerError when onnxruntime fails."""
        tensors = self._tensors
        feeds: dict[str, np.ndarray] = {tensors.image_name: np.ascontiguousarray(batch, dtype=np.float32)}
        if tensors.weight_name:
            feeds[tensors.weight_name] = np.full(tensors.weight_shape, weight, dtype=tensors.weight_dtype)
        try:
            output: np.ndarray = self._session.run([tensors.output_name], feeds)[0]
        except self._errors as exc:
            raise RunnerError(f"{self.model_name}: onnxruntime failed: {_first_line(exc)}") from exc
        return output

    def close(self) -> None:
        """Drop the session."""
        del self._session


# --- PyTorch files through spandrel ------------------------------------------------------------


class TorchFaceNetwork:
    """A spandrel face-model descriptor's network on the CPU or a CUDA GPU (fp32; fp16 on a GPU
    only where spandrel says the architecture supports it)."""

    platform = "pytorch_libtorch"

    def __init__(self, descriptor: Any, model: UserModel, device: Device, *, threads: int = 0,
                 max_items: int = 8) -> None:
        """Place the network; the size is the table's ``input_size`` or 512.

        Raises RunnerError when the size is not one the architecture takes, or torch cannot
        place the network on the device.
        """
        import torch

        from chaoqing.modelserver.runners.torch_backend import torch_device_name

        self._torch = torch
        self.model_name = model.name
        self.architecture = str(descriptor.architecture.name)
        self._architecture_id = str(descriptor.architecture.id)
        self.size = model.input_size or DEFAULT_FACE_SIZE
        self.takes_weight = self._architecture_id == CODEFORMER
        self.max_items = max_items
        if not descriptor.size_requirements.check(self.size, self.size):
            raise RunnerError(f"models.{model.name}.input_size: {model.path} is a {self.architecture} model, which "
                              f"does not take {self.size}×{self.size} faces ({descriptor.size_requirements})")
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self._device = torch.device(torch_device_name(device))
        self._dtype = torch.float16 if device.is_gpu and descriptor.supports_half else torch.float32
        try:
            self._network = descriptor.model.eval().to(device=self._device, dtype=self._dtype)
        except (RuntimeError, AssertionError) as exc:  # torch's errors for a device it cannot use
            raise RunnerError(f"{model.name}: torch could not place the model on {device}: {exc}") from exc
        for parameter in self._network.parameters():
            parameter.requires_grad_(False)

    def restore(self, batch: np.ndarray, weight: float) -> np.ndarray:
        """One forward, the network's own call on [-1, 1] (its first output is the face).

        Raises RunnerError when torch fails (out of GPU memory too)."""
        torch = self._torch
        try:
            with torch.inference_mode():
                tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                tensor = tensor.to(device=self._device, dtype=self._dtype)
                if self.takes_weight:
                    output = self._network(tensor, weight=weight)[0]
                else:
                    output = self._network(tensor)[0]
                result: np.ndarray = output.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        except RuntimeError as exc:
            raise RunnerError(f"{self.model_name}: torch failed on a batch of {len(batch)}: {exc}") from exc
        return result

    def close(self) -> None:
        """Drop the network and return the GPU memory it cached."""
        del self._network
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()


# --- the runner -------------------------------------------------------------------------------


class FaceRestorerRunner(Runner):
    """A face restorer: ``image`` UINT8 [B,S,S,3] (and ``weight``) → ``image`` UINT8 [B,S,S,3]."""

    def __init__(self, card: ModelCard, network: FaceNetwork, *, template: str, default_weight: float,
                 runtime: str, device: str, max_batch_size: int = 8) -> None:
        """Serve ``network`` under ``card``; the metadata says the face size, the template the
        faces must be aligned to and, for a model with a fidelity weight, its default."""
        self.network = network
        self.size = network.size
        self.default_weight = default_weight
        side = network.size
        inputs = [TensorSpec("image", "UINT8", (-1, side, side, RGB_CHANNELS))]
        parameters: dict[str, Any] = {
            "scale": 1,
            "face_template": template,
            "input_size": side,
            "runtime": runtime,
            "device": device,
            **card.as_parameters(),
        }
        if network.takes_weight:
            inputs.append(TensorSpec("weight", "FP32", (-1, 1), optional=True, value_range=(0.0, 1.0)))
            parameters["fidelity_weight"] = default_weight
        self.spec = ModelSpec(
            name=card.name,
            platform=network.platform,
            inputs=tuple(inputs),
            outputs=(TensorSpec("image", "UINT8", (-1, side, side, RGB_CHANNELS)),),
            max_batch_size=max_batch_size,
            parameters=parameters,
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Restore every face of the batch, those with the same weight together.

        Raises RunnerError for a face of another size, a malformed weight, or when the network
        fails or gives a face of another shape.
        """
        images = image_batch(inputs)
        count, height, width, _ = images.shape
        if (height, width) != (self.size, self.size):
            raise RunnerError(f"input 'image' must be {self.size}×{self.size} faces, got {width}×{height}")
        weights = self._weights(inputs.get("weight"), count)
        planes = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        planes *= np.float32(1.0 / HALF_RANGE)
        planes -= np.float32(1.0)
        restored = np.empty_like(images)
        step = self.network.max_items
        for weight in np.unique(weights):
            indices = np.flatnonzero(weights == weight)
            for first in range(0, len(indices), step):
                chosen = indices[first : first + step]
                output = self.network.restore(planes[chosen], float(weight))
                if output.shape != (len(chosen), RGB_CHANNELS, self.size, self.size):
                    raise RunnerError(f"{self.spec.name}: the network gave {list(output.shape)} for "
                                      f"[{len(chosen)},3,{self.size},{self.size}]")
                restored[chosen] = _to_uint8(output).transpose(0, 2, 3, 1)
        return {"image": restored}

    def _weights(self, raw: np.ndarray | None, count: int) -> np.ndarray:
        if raw is None:
            return np.full(count, self.default_weight, dtype=np.float32)
        if not self.network.takes_weight:  # the server refuses an input the spec lacks; a direct call too
            raise RunnerError(f"{self.spec.name} takes no weight")
        if raw.shape != (count, 1) or not np.all(np.isfinite(raw)):
            raise RunnerError(f"input 'weight' must be numbers of shape [{count},1], got {list(raw.shape)}")
        return np.asarray(raw[:, 0], dtype=np.float32)

    def close(self) -> None:
        """Release the network."""
        self.network.close()


def _to_uint8(output: np.ndarray) -> np.ndarray:
    """[-1, 1] → uint8, FaceFusion's normalize_crop_frame: clip, (y + 1) / 2 · 255, rounded."""
    pixels = (np.clip(output, -1.0, 1.0) + 1.0) * HALF_RANGE
    result: np.ndarray = np.rint(pixels).astype(np.uint8)
    return result


def _probe(network: FaceNetwork, model: UserModel, default_weight: float) -> None:
    """One grey face through the network: it must come back at the size it went in.

    Raises RunnerError naming the file otherwise.
    """
    side = network.size
    probe = np.full((1, RGB_CHANNELS, side, side), GREY_PROBE, dtype=np.float32)
    try:
        output = network.restore(probe, default_weight)
    except RunnerError as exc:
        raise RunnerError(f"{_where(model)}: {model.path} failed on a {side}×{side} face ({exc})") from exc
    if tuple(output.shape) != (1, RGB_CHANNELS, side, side):
        raise RunnerError(f"{_where(model)}: {model.path} turned a [1,3,{side},{side}] face into "
                          f"{list(output.shape)}; a face restorer gives the face back at its size")


def create_face_restorer(model: UserModel, runtime: str, device: Device, card_for: Callable[[str], ModelCard], *,
                         threads: int = 0, max_batch_size: int = 8) -> FaceRestorerRunner:
    """Load ``model``'s face-restorer file on ``runtime`` (``onnxruntime`` or ``torch``) and
    ``device``, check it (module notes) with one probe call, and serve it under the card
    ``card_for`` gives for the architecture found.

    Raises RunnerError in one line naming the config key and the file.
    """
    network: FaceNetwork
    if runtime == "torch":
        from chaoqing.modelserver.runners.spandrel_backend import (
            check_face_restorer,
            load_descriptor,
        )

        descriptor = load_descriptor(Path(model.path), _where(model))
        check_face_restorer(descriptor, Path(model.path), _where(model))
        network = TorchFaceNetwork(descriptor, model, device, threads=threads, max_items=max_batch_size)
    elif runtime == "onnxruntime":
        network = OnnxFaceNetwork(model, device, threads=threads, max_items=max_batch_size)
    else:
        raise RunnerError(f"models.{model.name}.runtime: face restorers run on onnxruntime (.onnx) or torch "
                          f"(.pth, .safetensors), not {runtime}")
    _probe(network, model, model.weight)
    return FaceRestorerRunner(card_for(network.architecture), network, template=model.template, default_weight=model.weight,
                              runtime=runtime, device=str(device), max_batch_size=max_batch_size)
