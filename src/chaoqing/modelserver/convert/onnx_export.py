"""An :class:`~.ncnn_graph.NcnnGraph` as an ONNX model, built with :mod:`onnx.helper` (no torch).

The model: opset 17, input ``input`` float32 [N,3,H,W] RGB in [0, 1], output ``output``
float32 [N,3,sH,sW], with N, H and W dynamic. Weights become float32 initializers (fp16
weights are widened exactly, as ncnn does on load).

How each ncnn layer maps (the ncnn semantics are in :mod:`.ncnn_graph`):

- Convolution → Conv (a Pad first when ncnn pads with a value other than 0), then its fused
  activation: Relu, LeakyRelu, Clip, Sigmoid, Mish as x·tanh(softplus(x)) and HardSwish as
  x·HardSigmoid(x) with ncnn's alpha and beta (opset 17 has neither Mish nor a HardSwish
  with parameters);
- PReLU → PRelu; PixelShuffle → DepthToSpace (CRD or DCR); Sigmoid → Sigmoid; Swish →
  x·Sigmoid(x);
- Interp → Resize: nearest with ``asymmetric`` coordinates and ``floor`` rounding, bilinear
  and bicubic (a = -0.75, as ncnn's and PyTorch's) with ``half_pixel`` or ``align_corners``
  coordinates; nearest gets the ``scales``, the others the ``sizes`` floor(side × scale), so
  that ONNX samples with ncnn's ratio in / out;
- BinaryOp → Add, Sub, Mul, Div, Max, Min, Pow (the r-forms swap the operands); a scalar is
  a constant; Eltwise → Mul / Sum (after the coefficients) / Max; Concat → Concat on
  ncnn's axis + 1; Split → nothing (its outputs are its input); MemoryData → a constant
  that broadcasts like ncnn's (a 1-D one along the channels).

Importing this module imports :mod:`onnx`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from chaoqing.errors import RunnerError
from chaoqing.modelserver.convert.ncnn_graph import (
    BinaryOpAttributes,
    ConcatAttributes,
    ConvolutionAttributes,
    EltwiseAttributes,
    InterpAttributes,
    NcnnGraph,
    NcnnLayer,
    PixelShuffleAttributes,
)

__all__ = ["INPUT_NAME", "ONNX_OPSET", "OUTPUT_NAME", "graph_to_onnx"]

ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
IMAGE_CHANNELS = 3  # RGB in and out
# ONNX Resize's cubic coefficient for ncnn's bicubic (interp.cpp: A = -0.75)
CUBIC_COEFFICIENT = -0.75
PRODUCER_NAME = "chaoqing.modelserver.convert"

_BINARY_NODES = {
    "add": ("Add", False),
    "sub": ("Sub", False),
    "mul": ("Mul", False),
    "div": ("Div", False),
    "max": ("Max", False),
    "min": ("Min", False),
    "pow": ("Pow", False),
    "rsub": ("Sub", True),
    "rdiv": ("Div", True),
    "rpow": ("Pow", True),
}


def graph_to_onnx(graph: NcnnGraph) -> onnx.ModelProto:
    """Translate ``graph`` into a checked ONNX model (see the module docstring for the contract).

    Raises RunnerError naming the layer when one cannot be expressed, or when onnx's checker
    rejects the result.
    """
    builder = _OnnxBuilder(graph)
    for layer in graph.layers:
        builder.add_layer(layer)
    model = builder.model()
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise RunnerError(
            f"the ONNX form of {graph.name} does not pass onnx's checker: {exc}"
        ) from exc
    return model


_Attributes = TypeVar("_Attributes")


def _attributes(layer: NcnnLayer, kind: type[_Attributes]) -> _Attributes:
    """``layer.attributes`` as ``kind``, which :func:`~.ncnn_graph.parse_ncnn_model` made it.

    Raises RunnerError when the layer was built some other way.
    """
    if not isinstance(layer.attributes, kind):
        raise RunnerError(
            f"layer {layer.name!r} ({layer.type}) has attributes {layer.attributes!r}, not {kind.__name__}"
        )
    return layer.attributes


class _OnnxBuilder:
    """Collects nodes and initializers; maps ncnn blob names to ONNX value names."""

    def __init__(self, graph: NcnnGraph) -> None:
        self._graph = graph
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._names: dict[str, str] = {}
        self._counter = 0

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}:{self._counter}"

    def _value(self, blob: str) -> str:
        return self._names[blob]

    def _produce(self, blob: str) -> str:
        """The ONNX name a layer writes ``blob`` under: ``output`` for the graph's output."""
        name = OUTPUT_NAME if blob == self._graph.output_blob else f"blob:{blob}"
        self._names[blob] = name
        return name

    def _constant(self, hint: str, array: np.ndarray[Any, Any]) -> str:
        name = self._fresh(hint)
        self._initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name=name))
        return name

    def _node(
        self, op_type: str, inputs: list[str], output: str, layer: NcnnLayer, **attributes: Any
    ) -> str:
        self._nodes.append(
            helper.make_node(
                op_type, inputs, [output], name=self._fresh(f"{layer.name}/{op_type}"), **attributes
            )
        )
        return output

    def add_layer(self, layer: NcnnLayer) -> None:
        """Append the nodes that compute ``layer``.

        Raises RunnerError naming the layer when its type has no translation.
        """
        handler = getattr(self, f"_add_{layer.type.lower()}", None)
        if handler is None:
            raise RunnerError(
                f"{self._graph.name}: layer {layer.name!r} of type {layer.type!r} has no ONNX translation"
            )
        handler(layer)

    def _add_input(self, layer: NcnnLayer) -> None:
        self._names[layer.outputs[0]] = INPUT_NAME

    def _add_split(self, layer: NcnnLayer) -> None:
        source = self._value(layer.inputs[0])
        for blob in layer.outputs:
            if blob == self._graph.output_blob:
                self._node("Identity", [source], self._produce(blob), layer)
            else:
                self._names[blob] = source

    def _add_memorydata(self, layer: NcnnLayer) -> None:
        data = layer.weights["data"]
        # (c, h, w) → (1, c, h, w); a 1-D constant broadcasts along the channels, as in ncnn
        shaped = data[np.newaxis] if data.ndim == 3 else data.reshape(1, -1, 1, 1)
        self._names[layer.outputs[0]] = self._constant(
            f"{layer.name}/data", shaped.astype(np.float32)
        )
        if layer.outputs[0] == self._graph.output_blob:
            raise RunnerError(f"{self._graph.name}: the output blob is the constant {layer.name!r}")

    def _add_convolution(self, layer: NcnnLayer) -> None:
        attributes = _attributes(layer, ConvolutionAttributes)
        source = self._value(layer.inputs[0])
        pads = list(attributes.pads)
        if attributes.pad_value != 0.0 and attributes.same is None and any(pads):
            top, left, bottom, right = pads
            pad_amounts = np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64)
            source = self._node(
                "Pad",
                [source, self._constant(f"{layer.name}/pads", pad_amounts),
                 self._constant(f"{layer.name}/pad_value", np.array(attributes.pad_value, dtype=np.float32))],
                self._fresh(f"{layer.name}/padded"),
                layer,
                mode="constant",
            )  # fmt: skip
            pads = [0, 0, 0, 0]
        inputs = [source, self._constant(f"{layer.name}/weight", layer.weights["weight"])]
        if attributes.has_bias:
            inputs.append(self._constant(f"{layer.name}/bias", layer.weights["bias"]))
        top, left, bottom, right = pads
        convolution_attributes: dict[str, Any] = {
            "kernel_shape": list(attributes.kernel),
            "strides": list(attributes.stride),
            "dilations": list(attributes.dilation),
        }
        if attributes.same is not None:
            convolution_attributes["auto_pad"] = attributes.same
        else:
            convolution_attributes["pads"] = [top, left, bottom, right]
        output = layer.outputs[0]
        activation = attributes.activation
        if activation.kind == "none":
            self._node("Conv", inputs, self._produce(output), layer, **convolution_attributes)
            return
        convolved = self._node(
            "Conv", inputs, self._fresh(f"{layer.name}/conv"), layer, **convolution_attributes
        )
        self._activation(layer, convolved, self._produce(output))

    def _activation(self, layer: NcnnLayer, source: str, output: str) -> None:
        """The Convolution's fused activation from ``source`` into ``output``."""
        attributes = _attributes(layer, ConvolutionAttributes)
        kind, parameters = attributes.activation.kind, attributes.activation.parameters
        if kind == "relu":
            self._node("Relu", [source], output, layer)
        elif kind == "leaky_relu":
            self._node("LeakyRelu", [source], output, layer, alpha=parameters[0])
        elif kind == "clip":
            bounds = [
                self._constant(f"{layer.name}/clip", np.array(value, dtype=np.float32))
                for value in parameters[:2]
            ]
            self._node("Clip", [source, *bounds], output, layer)
        elif kind == "sigmoid":
            self._node("Sigmoid", [source], output, layer)
        elif kind == "mish":
            softplus = self._node(
                "Softplus", [source], self._fresh(f"{layer.name}/softplus"), layer
            )
            tanh = self._node("Tanh", [softplus], self._fresh(f"{layer.name}/tanh"), layer)
            self._node("Mul", [source, tanh], output, layer)
        elif kind == "hardswish":
            gate = self._node(
                "HardSigmoid", [source], self._fresh(f"{layer.name}/gate"), layer,
                alpha=parameters[0], beta=parameters[1],
            )  # fmt: skip
            self._node("Mul", [source, gate], output, layer)
        else:
            raise RunnerError(
                f"{self._graph.name}: layer {layer.name!r}: activation {kind!r} has no ONNX translation"
            )

    def _add_prelu(self, layer: NcnnLayer) -> None:
        slopes = layer.weights["slope"]
        slope_shape = (slopes.size, 1, 1) if slopes.size > 1 else (1,)
        slope = self._constant(f"{layer.name}/slope", slopes.reshape(slope_shape))
        self._node(
            "PRelu", [self._value(layer.inputs[0]), slope], self._produce(layer.outputs[0]), layer
        )

    def _add_pixelshuffle(self, layer: NcnnLayer) -> None:
        attributes = _attributes(layer, PixelShuffleAttributes)
        self._node(
            "DepthToSpace", [self._value(layer.inputs[0])], self._produce(layer.outputs[0]), layer,
            blocksize=attributes.factor, mode=attributes.mode,
        )  # fmt: skip

    def _add_interp(self, layer: NcnnLayer) -> None:
        attributes = _attributes(layer, InterpAttributes)
        source = self._value(layer.inputs[0])
        resize_attributes: dict[str, Any]
        if attributes.mode == "nearest":
            resize_attributes = {
                "mode": "nearest",
                "coordinate_transformation_mode": "asymmetric",
                "nearest_mode": "floor",
            }
        else:
            resize_attributes = {
                "mode": "linear" if attributes.mode == "bilinear" else "cubic",
                "coordinate_transformation_mode": "align_corners"
                if attributes.align_corners
                else "half_pixel",
            }
            if attributes.mode == "bicubic":
                resize_attributes["cubic_coeff_a"] = CUBIC_COEFFICIENT
        empty_roi = ""
        height_scale, width_scale = attributes.scale
        scales = np.array([1.0, 1.0, height_scale, width_scale], dtype=np.float32)
        if attributes.mode == "nearest":
            # ncnn samples at floor(out / scale): ONNX's asymmetric transform with the scales
            inputs = [source, empty_roi, self._constant(f"{layer.name}/scales", scales)]
        else:
            # ncnn samples with the ratio in / out: ONNX does so when given the sizes,
            # floor(side × scale) as ncnn computes them
            inputs = [source, empty_roi, "", self._output_sizes(layer, source, scales)]
        self._node("Resize", inputs, self._produce(layer.outputs[0]), layer, **resize_attributes)

    def _output_sizes(self, layer: NcnnLayer, source: str, scales: np.ndarray[Any, Any]) -> str:
        """[N, C, floor(H·scale), floor(W·scale)] as an int64 tensor computed from ``source``."""
        shape = self._node("Shape", [source], self._fresh(f"{layer.name}/shape"), layer)
        as_float = self._node(
            "Cast", [shape], self._fresh(f"{layer.name}/shape_float"), layer, to=TensorProto.FLOAT
        )
        scaled = self._node(
            "Mul",
            [as_float, self._constant(f"{layer.name}/scales", scales)],
            self._fresh(f"{layer.name}/scaled_shape"),
            layer,
        )
        floored = self._node("Floor", [scaled], self._fresh(f"{layer.name}/floored_shape"), layer)
        return self._node(
            "Cast", [floored], self._fresh(f"{layer.name}/sizes"), layer, to=TensorProto.INT64
        )

    def _add_binaryop(self, layer: NcnnLayer) -> None:
        attributes = _attributes(layer, BinaryOpAttributes)
        operands = [self._value(blob) for blob in layer.inputs]
        if attributes.scalar is not None:
            operands.append(
                self._constant(f"{layer.name}/b", np.array(attributes.scalar, dtype=np.float32))
            )
        op_type, reversed_operands = _BINARY_NODES[attributes.operation]
        if reversed_operands:
            operands.reverse()
        self._node(op_type, operands, self._produce(layer.outputs[0]), layer)

    def _add_eltwise(self, layer: NcnnLayer) -> None:
        attributes = _attributes(layer, EltwiseAttributes)
        operands = [self._value(blob) for blob in layer.inputs]
        output = self._produce(layer.outputs[0])
        if attributes.operation == "prod":
            self._chain("Mul", operands, output, layer)
        elif attributes.operation == "max":
            self._node("Max", operands, output, layer)
        else:
            if attributes.coefficients:
                operands = [
                    operand if coefficient == 1.0 else self._node(
                        "Mul",
                        [operand, self._constant(f"{layer.name}/coefficient", np.array(coefficient, dtype=np.float32))],
                        self._fresh(f"{layer.name}/scaled"),
                        layer,
                    )
                    for operand, coefficient in zip(operands, attributes.coefficients, strict=True)
                ]  # fmt: skip
            self._chain("Add", operands, output, layer)

    def _chain(self, op_type: str, operands: list[str], output: str, layer: NcnnLayer) -> None:
        """``operands[0] op operands[1] op ...`` left to right, as ncnn accumulates them."""
        if len(operands) == 1:
            self._node("Identity", operands, output, layer)
            return
        accumulated = operands[0]
        for index, operand in enumerate(operands[1:], 2):
            target = output if index == len(operands) else self._fresh(f"{layer.name}/partial")
            accumulated = self._node(op_type, [accumulated, operand], target, layer)

    def _add_concat(self, layer: NcnnLayer) -> None:
        attributes = _attributes(layer, ConcatAttributes)
        operands = [self._value(blob) for blob in layer.inputs]
        self._node(
            "Concat", operands, self._produce(layer.outputs[0]), layer, axis=attributes.axis + 1
        )

    def _add_sigmoid(self, layer: NcnnLayer) -> None:
        self._node(
            "Sigmoid", [self._value(layer.inputs[0])], self._produce(layer.outputs[0]), layer
        )

    def _add_swish(self, layer: NcnnLayer) -> None:
        source = self._value(layer.inputs[0])
        gate = self._node("Sigmoid", [source], self._fresh(f"{layer.name}/sigmoid"), layer)
        self._node("Mul", [source, gate], self._produce(layer.outputs[0]), layer)

    def model(self) -> onnx.ModelProto:
        """The ONNX model: ``input`` [N,3,H,W] → ``output`` [N,3,sH,sW], float32."""
        scale = self._graph.scale
        input_info = helper.make_tensor_value_info(
            INPUT_NAME, TensorProto.FLOAT, ["N", IMAGE_CHANNELS, "H", "W"]
        )
        output_info = helper.make_tensor_value_info(
            OUTPUT_NAME, TensorProto.FLOAT, ["N", IMAGE_CHANNELS, f"H*{scale}", f"W*{scale}"]
        )
        onnx_graph = helper.make_graph(
            self._nodes,
            self._graph.name,
            [input_info],
            [output_info],
            initializer=self._initializers,
        )
        model = helper.make_model(
            onnx_graph,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
            producer_name=PRODUCER_NAME,
            doc_string=f"{self._graph.name}, converted from ncnn (sha256 {self._graph.digest})",
        )
        # ONNX Runtime 1.17 reads IR version 9 at most; opset 17 needs no newer one
        model.ir_version = min(model.ir_version, 9)
        helper.set_model_props(
            model,
            {"source_digest": self._graph.digest, "scale": str(scale), "source": self._graph.name},
        )
        return model
