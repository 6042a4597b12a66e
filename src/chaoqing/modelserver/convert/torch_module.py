"""An :class:`~.ncnn_graph.NcnnGraph` as a PyTorch module.

:func:`graph_to_torch` gives an :class:`NcnnModule`: ``forward(x)`` takes NCHW float RGB in
[0, 1] — a real batch, any height and width, fp32 or (after ``.half()``) fp16, contiguous or
channels_last — and returns NCHW of ``scale``× the size. Each ncnn layer is a small
:class:`torch.nn.Module` whose weights are registered parameters (convolutions, PReLU) or
buffers (MemoryData constants), so ``.to(device)``, ``.half()`` and ``state_dict()`` work as
for any module. The layers run in the file's order over a list of blobs, as ncnn runs them.

The layer semantics are ncnn's (see :mod:`.ncnn_graph` and :mod:`.onnx_export`): a
bilinear or bicubic resize passes :func:`torch.nn.functional.interpolate` the size
``int(side * scale)``, so it samples with ncnn's ratio in / out even where a float scale is
inexact; a nearest one passes the factor, as ncnn samples at ``floor(out / scale)``.

Importing this module imports :mod:`torch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

from chaoqing.errors import RunnerError
from chaoqing.modelserver.convert.ncnn_graph import (
    Activation,
    BinaryOpAttributes,
    ConcatAttributes,
    ConvolutionAttributes,
    EltwiseAttributes,
    InterpAttributes,
    NcnnGraph,
    NcnnLayer,
    PixelShuffleAttributes,
)

__all__ = ["NcnnModule", "graph_to_torch"]


def graph_to_torch(graph: NcnnGraph) -> NcnnModule:
    """Build the PyTorch module that computes ``graph`` (in eval mode, on the CPU, fp32).

    Raises RunnerError naming the layer when one has no PyTorch translation.
    """
    return NcnnModule(graph).eval()


class NcnnModule(nn.Module):
    """Runs an ncnn graph's layers in order; ``scale`` is the output / input side."""

    def __init__(self, graph: NcnnGraph) -> None:
        super().__init__()
        self.scale = graph.scale
        self.source_name = graph.name
        self.source_digest = graph.digest
        # blob name → slot in the list forward() keeps; a Split's outputs share its input's slot
        slots: dict[str, int] = {graph.input_blob: 0}
        slot_count = 1
        steps = nn.ModuleList()
        wiring: list[tuple[tuple[int, ...], int]] = []
        for layer in graph.layers:
            if layer.type == "Input":
                continue
            if layer.type == "Split":
                for blob in layer.outputs:
                    slots[blob] = slots[layer.inputs[0]]
                continue
            if len(layer.outputs) != 1:
                raise RunnerError(
                    f"{graph.name}: layer {layer.name!r} has {len(layer.outputs)} outputs, not 1"
                )
            steps.append(_layer_module(graph, layer))
            wiring.append((tuple(slots[blob] for blob in layer.inputs), slot_count))
            slots[layer.outputs[0]] = slot_count
            slot_count += 1
        self.steps = steps
        self._wiring = wiring
        self._slot_count = slot_count
        self._output_slot = slots[graph.output_blob]

    def forward(self, images: Tensor) -> Tensor:
        """[N,3,H,W] float in [0, 1] → [N,3,sH,sW] float, in the dtype and memory format given."""
        blobs: list[Tensor] = [images] * self._slot_count  # each slot is written before it is read
        for step, (inputs, output) in zip(self.steps, self._wiring, strict=True):
            blobs[output] = step(*(blobs[slot] for slot in inputs))
        return blobs[self._output_slot]

    def extra_repr(self) -> str:
        return f"source={self.source_name!r}, scale={self.scale}"


def _layer_module(graph: NcnnGraph, layer: NcnnLayer) -> nn.Module:
    """The module for one layer. Raises RunnerError naming it when its type has no translation."""
    attributes = layer.attributes
    if isinstance(attributes, ConvolutionAttributes):
        return _Convolution(layer, attributes)
    if isinstance(attributes, PixelShuffleAttributes):
        return _PixelShuffle(attributes)
    if isinstance(attributes, InterpAttributes):
        return _Interp(attributes)
    if isinstance(attributes, BinaryOpAttributes):
        return _BinaryOp(attributes)
    if isinstance(attributes, ConcatAttributes):
        return _Concat(attributes.axis + 1)
    if isinstance(attributes, EltwiseAttributes):
        return _Eltwise(attributes)
    plain: dict[str, type[nn.Module]] = {"Sigmoid": nn.Sigmoid, "Swish": nn.SiLU}
    if layer.type in plain:
        return plain[layer.type]()
    if layer.type == "PReLU":
        slopes = torch.from_numpy(layer.weights["slope"].copy())
        prelu = nn.PReLU(num_parameters=slopes.numel())
        with torch.no_grad():
            prelu.weight.copy_(slopes)
        return prelu
    if layer.type == "MemoryData":
        return _MemoryData(layer)
    raise RunnerError(
        f"{graph.name}: layer {layer.name!r} of type {layer.type!r} has no PyTorch translation"
    )


class _Convolution(nn.Module):
    """ncnn Convolution: padding (explicit, asymmetric, valued or SAME), conv, fused activation."""

    def __init__(self, layer: NcnnLayer, attributes: ConvolutionAttributes) -> None:
        super().__init__()
        self.attributes = attributes
        top, left, bottom, right = attributes.pads
        symmetric = (
            top == bottom
            and left == right
            and attributes.pad_value == 0.0
            and attributes.same is None
        )
        self.conv_padding = (top, left) if symmetric else (0, 0)
        self.explicit_pads = None if symmetric or attributes.same else (left, right, top, bottom)
        self.conv = nn.Conv2d(
            attributes.in_channels,
            attributes.out_channels,
            attributes.kernel,
            stride=attributes.stride,
            padding=self.conv_padding,
            dilation=attributes.dilation,
            bias=attributes.has_bias,
        )
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(layer.weights["weight"].copy()))
            if self.conv.bias is not None:
                self.conv.bias.copy_(torch.from_numpy(layer.weights["bias"].copy()))
        self.activation = _activation_module(attributes.activation)

    def forward(self, blob: Tensor) -> Tensor:
        attributes = self.attributes
        if attributes.same is not None:
            blob = functional.pad(blob, self._same_pads(blob), value=attributes.pad_value)
        elif self.explicit_pads is not None:
            blob = functional.pad(blob, self.explicit_pads, value=attributes.pad_value)
        result: Tensor = self.activation(self.conv(blob))
        return result

    def _same_pads(self, blob: Tensor) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) for SAME padding at this input size (ONNX's rule)."""
        pads: list[int] = []
        for axis in (3, 2):  # width first: functional.pad's order
            size = blob.shape[axis]
            stride = self.attributes.stride[axis - 2]
            extent = (self.attributes.kernel[axis - 2] - 1) * self.attributes.dilation[axis - 2] + 1
            total = max((math.ceil(size / stride) - 1) * stride + extent - size, 0)
            small, large = total // 2, total - total // 2
            pads += [small, large] if self.attributes.same == "SAME_UPPER" else [large, small]
        return pads[0], pads[1], pads[2], pads[3]


class _Clip(nn.Module):
    def __init__(self, minimum: float, maximum: float) -> None:
        super().__init__()
        self.minimum, self.maximum = minimum, maximum

    def forward(self, blob: Tensor) -> Tensor:
        return blob.clamp(self.minimum, self.maximum)


class _HardSwish(nn.Module):
    """ncnn's hardswish: x · clip(alpha·x + beta, 0, 1)."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, blob: Tensor) -> Tensor:
        return blob * (blob * self.alpha + self.beta).clamp(0.0, 1.0)


def _activation_module(activation: Activation) -> nn.Module:
    """The module for a Convolution's fused activation."""
    parameters = activation.parameters
    if activation.kind == "none":
        return nn.Identity()
    if activation.kind == "relu":
        return nn.ReLU()
    if activation.kind == "leaky_relu":
        return nn.LeakyReLU(parameters[0])
    if activation.kind == "clip":
        return _Clip(parameters[0], parameters[1])
    if activation.kind == "sigmoid":
        return nn.Sigmoid()
    if activation.kind == "mish":
        return nn.Mish()
    if activation.kind == "hardswish":
        return _HardSwish(parameters[0], parameters[1])
    raise RunnerError(f"activation {activation.kind!r} has no PyTorch translation")


class _PixelShuffle(nn.Module):
    def __init__(self, attributes: PixelShuffleAttributes) -> None:
        super().__init__()
        self.factor = attributes.factor
        self.mode = attributes.mode

    def forward(self, blob: Tensor) -> Tensor:
        if self.mode == "CRD":
            return functional.pixel_shuffle(blob, self.factor)
        # DCR: the channel index is (row offset · factor + column offset) · C + c
        batch, channels, height, width = blob.shape
        out_channels = channels // (self.factor * self.factor)
        grouped = blob.reshape(batch, self.factor, self.factor, out_channels, height, width)
        return grouped.permute(0, 3, 4, 1, 5, 2).reshape(
            batch, out_channels, height * self.factor, width * self.factor
        )


class _Interp(nn.Module):
    def __init__(self, attributes: InterpAttributes) -> None:
        super().__init__()
        self.attributes = attributes

    def forward(self, blob: Tensor) -> Tensor:
        attributes = self.attributes
        if attributes.mode == "nearest":
            # ncnn samples at floor(out / scale): interpolate does so when given the factor
            return functional.interpolate(
                blob, scale_factor=attributes.scale, mode="nearest", recompute_scale_factor=False
            )
        # ncnn interp.cpp: `oh = h * height_scale` in float, truncated; it samples with the
        # ratio in / out, as interpolate does when given the size
        height, width = blob.shape[2], blob.shape[3]
        size = (
            int(np.float32(height) * np.float32(attributes.scale[0])),
            int(np.float32(width) * np.float32(attributes.scale[1])),
        )
        return functional.interpolate(
            blob, size=size, mode=attributes.mode, align_corners=attributes.align_corners
        )


class _BinaryOp(nn.Module):
    def __init__(self, attributes: BinaryOpAttributes) -> None:
        super().__init__()
        self.operation = attributes.operation
        self.scalar = attributes.scalar

    def forward(self, first: Tensor, second: Tensor | None = None) -> Tensor:
        other: Tensor | float
        if self.scalar is not None:
            other = self.scalar
        elif second is not None:
            other = second
        else:
            raise RunnerError(f"binary operation {self.operation} needs two operands")
        return _BINARY_FUNCTIONS[self.operation](first, other)


def _maximum(first: Tensor, second: Tensor | float) -> Tensor:
    return (
        torch.clamp(first, min=second)
        if isinstance(second, float)
        else torch.maximum(first, second)
    )


def _minimum(first: Tensor, second: Tensor | float) -> Tensor:
    return (
        torch.clamp(first, max=second)
        if isinstance(second, float)
        else torch.minimum(first, second)
    )


_BINARY_FUNCTIONS: dict[str, Callable[[Tensor, Tensor | float], Tensor]] = {
    "add": lambda first, second: first + second,
    "sub": lambda first, second: first - second,
    "mul": lambda first, second: first * second,
    "div": lambda first, second: first / second,
    "max": _maximum,
    "min": _minimum,
    "pow": lambda first, second: torch.pow(first, second),
    "rsub": lambda first, second: second - first,
    "rdiv": lambda first, second: second / first,
    "rpow": lambda first, second: torch.pow(second, first),
}


class _Concat(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *blobs: Tensor) -> Tensor:
        return torch.cat(blobs, dim=self.axis)


class _Eltwise(nn.Module):
    def __init__(self, attributes: EltwiseAttributes) -> None:
        super().__init__()
        self.operation = attributes.operation
        self.coefficients = attributes.coefficients

    def forward(self, *blobs: Tensor) -> Tensor:
        if self.operation == "prod":
            result = blobs[0]
            for blob in blobs[1:]:
                result = result * blob
            return result
        if self.operation == "max":
            result = blobs[0]
            for blob in blobs[1:]:
                result = torch.maximum(result, blob)
            return result
        coefficients = self.coefficients or (1.0,) * len(blobs)
        result = blobs[0] * coefficients[0] if coefficients[0] != 1.0 else blobs[0]
        for blob, coefficient in zip(blobs[1:], coefficients[1:], strict=True):
            result = result + (blob * coefficient if coefficient != 1.0 else blob)
        return result


class _MemoryData(nn.Module):
    """A constant blob, a buffer shaped to broadcast like ncnn's (1-D along the channels)."""

    data: Tensor

    def __init__(self, layer: NcnnLayer) -> None:
        super().__init__()
        data = torch.from_numpy(layer.weights["data"].copy())
        shaped = data.unsqueeze(0) if data.dim() == 3 else data.reshape(1, -1, 1, 1)
        self.register_buffer("data", shaped)

    def forward(self) -> Tensor:
        return self.data
