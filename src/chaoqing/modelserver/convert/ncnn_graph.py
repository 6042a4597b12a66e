"""Read an ncnn model (``.param`` text + ``.bin`` weights) into a typed, runtime-free graph.

The ``.param`` format (ncnn's docs, "param and model file structure"): a magic line
``7767517``, a line ``layer_count blob_count``, then one line per layer::

    Type  name  input_count output_count  inputs... outputs...  id=value ...

A value is an int, a float (it has a ``.``, ``e`` or ``E``), or an array written under the key
``-23300 - id`` as ``count,v0,v1,...``. The ``.bin`` file holds the layers' weights one after
another in layer order, each read the way the layer's ``load_model`` reads it (ncnn
``src/modelbin.cpp``):

- *tagged* (Convolution weights): a 4-byte tag, then the data — ``0x01306B47`` fp16 (padded
  to 4 bytes), all-zero fp32, ``0x0002C056`` fp32, ``0x000D4B38`` int8 (not supported here),
  any other non-zero tag an 8-bit index into a 256-entry fp32 table that follows the tag;
- *raw* (Convolution bias, PReLU slopes, MemoryData): plain fp32, no tag.

Every supported layer's parameters are read into an attributes object at parse time
(:class:`ConvolutionAttributes`, :class:`InterpAttributes`...), so an unsupported layer, or an
unsupported setting of a supported one, fails here and names the layer, and both exporters
(:mod:`.onnx_export`, :mod:`.torch_module`) translate the same checked description. Blobs are
ncnn's CHW without a batch; the exporters add the batch axis in front (NCHW).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from chaoqing.errors import RunnerError

__all__ = [
    "ACTIVATIONS",
    "BINARY_OPERATIONS",
    "SUPPORTED_LAYER_TYPES",
    "Activation",
    "BinaryOpAttributes",
    "ConcatAttributes",
    "ConvolutionAttributes",
    "EltwiseAttributes",
    "InterpAttributes",
    "LayerAttributes",
    "NcnnGraph",
    "NcnnLayer",
    "NoAttributes",
    "ParamValue",
    "PixelShuffleAttributes",
    "digest_files",
    "parse_ncnn_model",
]

PARAM_MAGIC = 7767517  # the first line of every .param file (ncnn net.cpp)
ARRAY_KEY_BASE = -23300  # an array parameter with id k is written under the key -23300 - k
SAME_UPPER_PAD = (
    -233
)  # Convolution pad_left -233: TensorFlow/ONNX SAME_UPPER (ncnn convolution.cpp)
SAME_LOWER_PAD = -234  # pad_left -234: SAME_LOWER

# The tags of a tagged weight blob (ncnn modelbin.cpp).
TAG_FLOAT16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FLOAT32_EXTRA_SCALING = 0x0002C056
QUANTIZATION_TABLE_SIZE = 256
BIN_ALIGNMENT = 4  # fp16 and 8-bit blobs are padded to a multiple of 4 bytes

ParamValue = int | float | tuple[int | float, ...]

# Convolution param 9 (activation_type) → name; the params in 10 are (ncnn convolution.cpp,
# create_activation_layer): leaky_relu (slope), clip (min, max), hardswish (alpha, beta).
ACTIVATIONS = {
    0: "none",
    1: "relu",
    2: "leaky_relu",
    3: "clip",
    4: "sigmoid",
    5: "mish",
    6: "hardswish",
}
# ncnn hardswish's defaults (hardswish.cpp): x * clip(alpha * x + beta, 0, 1)
HARDSWISH_DEFAULT_ALPHA = 0.2
HARDSWISH_DEFAULT_BETA = 0.5

# BinaryOp param 0 (op_type) → name (ncnn binaryop.h). atan2 / ratan2 (10, 11) have no
# counterpart in ONNX and are not supported.
BINARY_OPERATIONS = {
    0: "add",
    1: "sub",
    2: "mul",
    3: "div",
    4: "max",
    5: "min",
    6: "pow",
    7: "rsub",
    8: "rdiv",
    9: "rpow",
}
# Eltwise param 0 (op_type) → name (ncnn eltwise.h).
ELTWISE_OPERATIONS = {0: "prod", 1: "sum", 2: "max"}
# Interp param 0 (resize_type) → name (ncnn interp.cpp).
INTERP_MODES = {1: "nearest", 2: "bilinear", 3: "bicubic"}
# PixelShuffle param 1 (mode): 0 is PyTorch's order (ONNX DepthToSpace CRD), 1 is DCR.
PIXEL_SHUFFLE_MODES = {0: "CRD", 1: "DCR"}

SUPPORTED_LAYER_TYPES = (
    "Input", "Convolution", "PReLU", "PixelShuffle", "Interp", "BinaryOp", "Split", "Concat",
    "Eltwise", "Sigmoid", "Swish", "MemoryData",
)  # fmt: skip
# A blob is at most 3-D in these models (C, H, W); ncnn's axis 0 is the channel axis.
BLOB_DIMENSIONS = 3


@dataclass(frozen=True)
class Activation:
    """A Convolution's fused activation: ``kind`` is a value of :data:`ACTIVATIONS`."""

    kind: str = "none"
    parameters: tuple[float, ...] = ()


@dataclass(frozen=True)
class NoAttributes:
    """A layer whose behaviour has no settings (Input, Split, PReLU, Sigmoid, Swish, MemoryData)."""


@dataclass(frozen=True)
class ConvolutionAttributes:
    """A 2-D convolution; pads are (top, left, bottom, right), or ``same`` is ``SAME_UPPER`` /
    ``SAME_LOWER`` and the pads are computed from the input size."""

    out_channels: int
    in_channels: int
    kernel: tuple[int, int]  # (height, width)
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    same: str | None
    pad_value: float
    has_bias: bool
    activation: Activation


@dataclass(frozen=True)
class PixelShuffleAttributes:
    """Depth to space by ``factor``; ``mode`` is ``CRD`` (PyTorch's) or ``DCR``."""

    factor: int
    mode: str


@dataclass(frozen=True)
class InterpAttributes:
    """A resize by ``scale``: the output side is ``int(side * scale)``, as ncnn computes it.

    ncnn samples nearest at ``floor(out / scale)`` and bilinear / bicubic at half-pixel
    centres with the ratio in / out (or corner to corner with ``align_corners``)."""

    mode: str  # "nearest", "bilinear" or "bicubic"
    scale: tuple[float, float]  # (height, width)
    align_corners: bool


@dataclass(frozen=True)
class BinaryOpAttributes:
    """``a op b`` element-wise with broadcasting, or ``a op scalar`` when ``scalar`` is set."""

    operation: str  # a value of BINARY_OPERATIONS
    scalar: float | None


@dataclass(frozen=True)
class ConcatAttributes:
    """Concatenation along ncnn axis ``axis`` (0 = channels of a CHW blob)."""

    axis: int


@dataclass(frozen=True)
class EltwiseAttributes:
    """prod, sum (each input times its coefficient, when given) or max of all inputs."""

    operation: str
    coefficients: tuple[float, ...]


LayerAttributes = (
    NoAttributes
    | ConvolutionAttributes
    | PixelShuffleAttributes
    | InterpAttributes
    | BinaryOpAttributes
    | ConcatAttributes
    | EltwiseAttributes
)


@dataclass(frozen=True, eq=False)
class NcnnLayer:
    """One layer as the ``.param`` line gives it, its weights from the ``.bin``, and its
    checked attributes.

    ``weights``: Convolution ``weight`` (float32 [out, in, kh, kw]) and ``bias`` (float32
    [out]); PReLU ``slope`` (float32 [n]); MemoryData ``data`` (float32, ncnn's (c, h, w),
    (h, w) or (w,)).
    """

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: Mapping[int, ParamValue]
    weights: Mapping[str, np.ndarray[Any, np.dtype[np.float32]]]
    attributes: LayerAttributes = field(default_factory=NoAttributes)


@dataclass(frozen=True, eq=False)
class NcnnGraph:
    """A parsed ncnn model: layers in file order (each layer's inputs come before it).

    ``scale``: output side / input side, found by shape arithmetic over the graph.
    ``digest``: sha256 (hex) of the ``.param`` bytes followed by the ``.bin`` bytes.
    ``name``: the ``.param`` file's stem, for messages and file names.
    """

    layers: tuple[NcnnLayer, ...]
    input_blob: str
    output_blob: str
    scale: int
    digest: str
    name: str


def digest_files(param_path: Path, bin_path: Path) -> str:
    """sha256 (hex) of the ``.param`` file's bytes followed by the ``.bin`` file's.

    Raises RunnerError naming the file when one is missing or unreadable.
    """
    digest = hashlib.sha256()
    for path in (param_path, bin_path):
        digest.update(_read_bytes(path))
    return digest.hexdigest()


def parse_ncnn_model(param_path: Path, bin_path: Path) -> NcnnGraph:
    """Parse ``param_path`` and ``bin_path`` into an :class:`NcnnGraph`.

    Raises RunnerError naming the file when either is missing, unreadable or malformed (a
    bad line, a blob used before it is made, weights that end early or run past the
    layers), and naming the layer when its type or one of its settings is not supported.
    """
    param_bytes = _read_bytes(param_path)
    bin_bytes = _read_bytes(bin_path)
    digest = hashlib.sha256(param_bytes + bin_bytes).hexdigest()
    try:
        param_text = param_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunnerError(f"{param_path} is not an ncnn .param text file: {exc}") from exc
    lines = _parse_param_lines(param_text, param_path)
    reader = _WeightReader(bin_bytes, bin_path)
    layers = tuple(_build_layer(line, reader, param_path) for line in lines)
    if reader.remaining:
        raise RunnerError(
            f"{bin_path} has {reader.remaining} bytes after the last layer's weights: "
            f"it does not belong to {param_path}"
        )
    input_blob, output_blob = _check_wiring(layers, param_path)
    scale = _infer_scale(layers, input_blob, output_blob, param_path)
    return NcnnGraph(
        layers=layers,
        input_blob=input_blob,
        output_blob=output_blob,
        scale=scale,
        digest=digest,
        name=param_path.stem,
    )


def _read_bytes(path: Path) -> bytes:
    """The file's bytes. Raises RunnerError naming it when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise RunnerError(f"model file {path} does not exist") from exc
    except OSError as exc:
        raise RunnerError(f"cannot read model file {path}: {exc}") from exc


@dataclass(frozen=True)
class _ParamLine:
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, ParamValue]


def _parse_param_lines(text: str, param_path: Path) -> list[_ParamLine]:
    """The layer lines of a ``.param`` file. Raises RunnerError when it is malformed."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or lines[0].strip() != str(PARAM_MAGIC):
        raise RunnerError(f"{param_path} is not an ncnn .param file (no magic {PARAM_MAGIC})")
    header = lines[1].split()
    if len(header) != 2 or not all(token.isdigit() for token in header):
        raise RunnerError(
            f"{param_path}: line 2 must be 'layer_count blob_count', got {lines[1]!r}"
        )
    layer_count = int(header[0])
    if len(lines) - 2 != layer_count:
        raise RunnerError(
            f"{param_path} declares {layer_count} layers but has {len(lines) - 2} layer lines"
        )
    return [_parse_layer_line(line, number, param_path) for number, line in enumerate(lines[2:], 3)]


def _parse_layer_line(line: str, number: int, param_path: Path) -> _ParamLine:
    """One ``Type name n_in n_out inputs... outputs... k=v...`` line."""
    tokens = line.split()
    where = f"{param_path} line {number}"
    if len(tokens) < 4 or not tokens[2].isdigit() or not tokens[3].isdigit():
        raise RunnerError(f"{where}: not a layer line: {line!r}")
    input_count, output_count = int(tokens[2]), int(tokens[3])
    blob_end = 4 + input_count + output_count
    if len(tokens) < blob_end:
        raise RunnerError(
            f"{where}: {input_count} inputs and {output_count} outputs announced, fewer given"
        )
    params: dict[int, ParamValue] = {}
    for token in tokens[blob_end:]:
        key_text, equals, value_text = token.partition("=")
        try:
            key = int(key_text)
        except ValueError:
            key = None
        if not equals or key is None or not value_text:
            raise RunnerError(f"{where}: parameter {token!r} is not id=value")
        if key <= ARRAY_KEY_BASE:
            params[ARRAY_KEY_BASE - key] = _parse_array(value_text, where)
        else:
            params[key] = _parse_number(value_text, where)
    return _ParamLine(
        type=tokens[0],
        name=tokens[1],
        inputs=tuple(tokens[4 : 4 + input_count]),
        outputs=tuple(tokens[4 + input_count : blob_end]),
        params=params,
    )


def _parse_number(text: str, where: str) -> int | float:
    """An int, or a float when the text has ``.``, ``e`` or ``E`` (ncnn paramdict.cpp)."""
    try:
        if any(marker in text for marker in ".eE"):
            return float(text)
        return int(text)
    except ValueError as exc:
        raise RunnerError(f"{where}: {text!r} is not a number") from exc


def _parse_array(text: str, where: str) -> tuple[int | float, ...]:
    """``count,v0,v1,...`` → (v0, v1, ...)."""
    count_text, _, values_text = text.partition(",")
    count = _parse_number(count_text, where)
    values = (
        tuple(_parse_number(value, where) for value in values_text.split(","))
        if values_text
        else ()
    )
    if not isinstance(count, int) or count != len(values):
        raise RunnerError(
            f"{where}: array {text!r} announces {count_text} values, has {len(values)}"
        )
    return values


class _WeightReader:
    """Reads the ``.bin`` file front to back, the way the layers' ``load_model`` do."""

    def __init__(self, data: bytes, path: Path) -> None:
        self._data = data
        self._path = path
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def _take(self, size: int, layer_name: str) -> bytes:
        if size > self.remaining:
            raise RunnerError(
                f"{self._path} ends at byte {len(self._data)}, before the weights of layer "
                f"{layer_name!r} (it needs {size} bytes at offset {self._offset})"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def raw(self, count: int, layer_name: str) -> np.ndarray[Any, np.dtype[np.float32]]:
        """``count`` plain little-endian fp32 values (ncnn ModelBin load type 1)."""
        return np.frombuffer(self._take(4 * count, layer_name), dtype="<f4").astype(np.float32)

    def tagged(self, count: int, layer_name: str) -> np.ndarray[Any, np.dtype[np.float32]]:
        """``count`` values behind a 4-byte tag (ncnn ModelBin load type 0), as float32."""
        tag_bytes = self._take(4, layer_name)
        tag = int.from_bytes(tag_bytes, "little")
        if tag == TAG_FLOAT16:
            size = _aligned(2 * count)
            values = np.frombuffer(self._take(size, layer_name)[: 2 * count], dtype="<f2")
            return values.astype(np.float32)
        if tag == TAG_INT8:
            raise RunnerError(
                f"{self._path}: layer {layer_name!r} has int8-quantized weights, which the "
                "converter does not support"
            )
        if tag == TAG_FLOAT32_EXTRA_SCALING or tag == 0:
            return self.raw(count, layer_name)
        if tag_bytes[0] == 0:
            # ncnn leaves such a blob zero-filled without reading any data (modelbin.cpp)
            return np.zeros(count, dtype=np.float32)
        table = np.frombuffer(self._take(4 * QUANTIZATION_TABLE_SIZE, layer_name), dtype="<f4")
        indices = np.frombuffer(self._take(_aligned(count), layer_name)[:count], dtype=np.uint8)
        return table[indices].astype(np.float32)


def _aligned(size: int) -> int:
    """``size`` rounded up to :data:`BIN_ALIGNMENT`."""
    return (size + BIN_ALIGNMENT - 1) // BIN_ALIGNMENT * BIN_ALIGNMENT


def _build_layer(line: _ParamLine, reader: _WeightReader, param_path: Path) -> NcnnLayer:
    """Check one layer's type and settings, and read its weights."""
    where = f"{param_path}: layer {line.name!r} ({line.type})"
    builder = _LAYER_BUILDERS.get(line.type)
    if builder is None:
        raise RunnerError(
            f"{where}: layer type {line.type!r} is not supported by the converter "
            f"(supported: {', '.join(SUPPORTED_LAYER_TYPES)})"
        )
    expected_inputs, expected_outputs = _BLOB_COUNTS[line.type]
    if expected_inputs is not None and len(line.inputs) != expected_inputs:
        raise RunnerError(f"{where}: takes {expected_inputs} input blob(s), has {len(line.inputs)}")
    if expected_outputs is not None and len(line.outputs) != expected_outputs:
        raise RunnerError(
            f"{where}: gives {expected_outputs} output blob(s), has {len(line.outputs)}"
        )
    attributes, weights = builder(line, reader, where)
    return NcnnLayer(
        type=line.type,
        name=line.name,
        inputs=line.inputs,
        outputs=line.outputs,
        params=dict(line.params),
        weights=weights,
        attributes=attributes,
    )


Weights = dict[str, np.ndarray[Any, np.dtype[np.float32]]]


def _int_param(line: _ParamLine, key: int, default: int, where: str) -> int:
    value = line.params.get(key, default)
    if isinstance(value, tuple) or (isinstance(value, float) and not value.is_integer()):
        raise RunnerError(f"{where}: parameter {key} must be an integer, got {value!r}")
    return int(value)


def _float_param(line: _ParamLine, key: int, default: float, where: str) -> float:
    value = line.params.get(key, default)
    if isinstance(value, tuple):
        raise RunnerError(f"{where}: parameter {key} must be a number, got an array")
    return float(value)


def _array_param(line: _ParamLine, key: int, where: str) -> tuple[float, ...]:
    value = line.params.get(key, ())
    if not isinstance(value, tuple):
        raise RunnerError(f"{where}: parameter {key} must be an array, got {value!r}")
    return tuple(float(item) for item in value)


def _build_plain(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    return NoAttributes(), {}


def _build_convolution(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn Convolution: 0 num_output, 1/11 kernel w/h, 2/12 dilation, 3/13 stride, 4/14/15/16
    pad left/top/right/bottom, 18 pad value, 5 bias_term, 6 weight_data_size, 8 int8 scales,
    9/10 activation, 19 dynamic weight."""
    out_channels = _int_param(line, 0, 0, where)
    kernel_width = _int_param(line, 1, 0, where)
    kernel_height = _int_param(line, 11, kernel_width, where)
    dilation_width = _int_param(line, 2, 1, where)
    dilation_height = _int_param(line, 12, dilation_width, where)
    stride_width = _int_param(line, 3, 1, where)
    stride_height = _int_param(line, 13, stride_width, where)
    pad_left = _int_param(line, 4, 0, where)
    pad_right = _int_param(line, 15, pad_left, where)
    pad_top = _int_param(line, 14, pad_left, where)
    pad_bottom = _int_param(line, 16, pad_top, where)
    pad_value = _float_param(line, 18, 0.0, where)
    has_bias = _int_param(line, 5, 0, where) != 0
    weight_size = _int_param(line, 6, 0, where)
    if _int_param(line, 8, 0, where) != 0:
        raise RunnerError(f"{where}: int8 convolutions (parameter 8) are not supported")
    if _int_param(line, 19, 0, where) != 0:
        raise RunnerError(f"{where}: dynamic-weight convolutions (parameter 19) are not supported")
    sizes = (
        out_channels,
        kernel_width,
        kernel_height,
        dilation_width,
        dilation_height,
        stride_width,
        stride_height,
    )
    if min(sizes) <= 0:
        raise RunnerError(f"{where}: channels, kernel, dilation and stride must be positive")
    per_input_channel = out_channels * kernel_height * kernel_width
    if weight_size <= 0 or weight_size % per_input_channel:
        raise RunnerError(
            f"{where}: weight_data_size {weight_size} is not a multiple of "
            f"{out_channels}×{kernel_height}×{kernel_width}"
        )
    in_channels = weight_size // per_input_channel
    same: str | None = None
    if pad_left in (SAME_UPPER_PAD, SAME_LOWER_PAD):
        same = "SAME_UPPER" if pad_left == SAME_UPPER_PAD else "SAME_LOWER"
        pad_left = pad_right = pad_top = pad_bottom = 0
    elif min(pad_left, pad_right, pad_top, pad_bottom) < 0:
        raise RunnerError(
            f"{where}: negative padding {pad_left, pad_top, pad_right, pad_bottom} is not supported"
        )
    activation = _activation(line, where)
    weights: Weights = {
        "weight": reader.tagged(weight_size, line.name).reshape(
            out_channels, in_channels, kernel_height, kernel_width
        )
    }
    if has_bias:
        weights["bias"] = reader.raw(out_channels, line.name)
    attributes = ConvolutionAttributes(
        out_channels=out_channels,
        in_channels=in_channels,
        kernel=(kernel_height, kernel_width),
        stride=(stride_height, stride_width),
        dilation=(dilation_height, dilation_width),
        pads=(pad_top, pad_left, pad_bottom, pad_right),
        same=same,
        pad_value=pad_value,
        has_bias=has_bias,
        activation=activation,
    )
    return attributes, weights


def _activation(line: _ParamLine, where: str) -> Activation:
    """A Convolution's fused activation (params 9 and 10)."""
    activation_type = _int_param(line, 9, 0, where)
    kind = ACTIVATIONS.get(activation_type)
    if kind is None:
        raise RunnerError(f"{where}: activation type {activation_type} is not supported")
    parameters = _array_param(line, 10, where)
    needed = {"leaky_relu": 1, "clip": 2}.get(kind, 0)
    if len(parameters) < needed:
        raise RunnerError(f"{where}: activation {kind} needs {needed} parameter(s) in parameter 10")
    if kind == "hardswish" and len(parameters) < 2:
        parameters = (HARDSWISH_DEFAULT_ALPHA, HARDSWISH_DEFAULT_BETA)
    return Activation(kind, parameters)


def _build_prelu(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn PReLU: 0 num_slope; the slopes are raw fp32."""
    slope_count = _int_param(line, 0, 0, where)
    if slope_count <= 0:
        raise RunnerError(f"{where}: num_slope must be positive, got {slope_count}")
    return NoAttributes(), {"slope": reader.raw(slope_count, line.name)}


def _build_pixel_shuffle(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn PixelShuffle: 0 upscale_factor, 1 mode."""
    factor = _int_param(line, 0, 1, where)
    mode = PIXEL_SHUFFLE_MODES.get(_int_param(line, 1, 0, where))
    if factor <= 0 or mode is None:
        raise RunnerError(
            f"{where}: upscale factor {factor} / mode {line.params.get(1)} not supported"
        )
    return PixelShuffleAttributes(factor, mode), {}


def _build_interp(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn Interp: 0 resize_type, 1/2 height/width scale, 6 align_corner; 3/4 (a fixed output
    height/width) and 5 (dynamic_target_size, another blob's size) are refused."""
    resize_type = _int_param(line, 0, 0, where)
    mode = INTERP_MODES.get(resize_type)
    if mode is None:
        raise RunnerError(
            f"{where}: resize type {resize_type} is not supported (1 nearest, 2 bilinear, 3 bicubic)"
        )
    if _int_param(line, 5, 0, where) != 0 or len(line.inputs) != 1:
        raise RunnerError(
            f"{where}: a resize to another blob's size (dynamic_target_size) is not supported"
        )
    if _int_param(line, 3, 0, where) or _int_param(line, 4, 0, where):
        # a super-resolution network takes any size; a fixed output size defeats that
        raise RunnerError(f"{where}: a resize to a fixed output size is not supported")
    scale = (_float_param(line, 1, 1.0, where), _float_param(line, 2, 1.0, where))
    if min(scale) <= 0:
        raise RunnerError(f"{where}: scales must be positive, got {scale}")
    align_corners = _int_param(line, 6, 0, where) != 0
    return InterpAttributes(mode, scale, align_corners), {}


def _build_binary_op(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn BinaryOp: 0 op_type, 1 with_scalar, 2 b."""
    operation_type = _int_param(line, 0, 0, where)
    operation = BINARY_OPERATIONS.get(operation_type)
    if operation is None:
        raise RunnerError(f"{where}: binary operation type {operation_type} is not supported")
    with_scalar = _int_param(line, 1, 0, where) != 0
    if len(line.inputs) != (1 if with_scalar else 2):
        raise RunnerError(
            f"{where}: with_scalar={int(with_scalar)} needs {1 if with_scalar else 2} input blob(s), "
            f"has {len(line.inputs)}"
        )
    scalar = _float_param(line, 2, 0.0, where) if with_scalar else None
    return BinaryOpAttributes(operation, scalar), {}


def _build_concat(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn Concat: 0 axis (of the CHW blob; negative counts from the end)."""
    axis = _int_param(line, 0, 0, where)
    if not -BLOB_DIMENSIONS <= axis < BLOB_DIMENSIONS:
        raise RunnerError(f"{where}: axis {axis} is out of range for a CHW blob")
    return ConcatAttributes(axis % BLOB_DIMENSIONS), {}


def _build_eltwise(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn Eltwise: 0 op_type, 1 coefficients (sum only)."""
    operation_type = _int_param(line, 0, 0, where)
    operation = ELTWISE_OPERATIONS.get(operation_type)
    if operation is None:
        raise RunnerError(f"{where}: eltwise operation type {operation_type} is not supported")
    coefficients = _array_param(line, 1, where)
    if coefficients and len(coefficients) != len(line.inputs):
        raise RunnerError(
            f"{where}: {len(coefficients)} coefficients for {len(line.inputs)} inputs"
        )
    if operation != "sum":
        coefficients = ()
    return EltwiseAttributes(operation, coefficients), {}


def _build_memory_data(
    line: _ParamLine, reader: _WeightReader, where: str
) -> tuple[LayerAttributes, Weights]:
    """ncnn MemoryData: 0 w, 1 h, 2 c (11 d is not supported); raw fp32 in the .bin."""
    width = _int_param(line, 0, 0, where)
    height = _int_param(line, 1, 0, where)
    channels = _int_param(line, 2, 0, where)
    if _int_param(line, 11, 0, where) != 0:
        raise RunnerError(f"{where}: 4-D MemoryData (parameter 11) is not supported")
    if channels:
        shape: tuple[int, ...] = (channels, height, width)
    elif height:
        shape = (height, width)
    elif width:
        shape = (width,)
    else:
        # ncnn creates one uninitialised value and reads nothing (memorydata.cpp)
        raise RunnerError(f"{where}: MemoryData without a size is not supported")
    if min(shape) <= 0:
        raise RunnerError(f"{where}: sizes must be positive, got {shape}")
    if len(shape) == 2:
        raise RunnerError(f"{where}: 2-D MemoryData (h×w, no channels) is not supported")
    return NoAttributes(), {"data": reader.raw(math.prod(shape), line.name).reshape(shape)}


_Builder = Callable[[_ParamLine, _WeightReader, str], tuple[LayerAttributes, Weights]]
_LAYER_BUILDERS: dict[str, _Builder] = {
    "Input": _build_plain,
    "Convolution": _build_convolution,
    "PReLU": _build_prelu,
    "PixelShuffle": _build_pixel_shuffle,
    "Interp": _build_interp,
    "BinaryOp": _build_binary_op,
    "Split": _build_plain,
    "Concat": _build_concat,
    "Eltwise": _build_eltwise,
    "Sigmoid": _build_plain,
    "Swish": _build_plain,
    "MemoryData": _build_memory_data,
}
# (inputs, outputs) each layer type takes; None: any number of at least one.
_BLOB_COUNTS: dict[str, tuple[int | None, int | None]] = {
    "Input": (0, 1),
    "Convolution": (1, 1),
    "PReLU": (1, 1),
    "PixelShuffle": (1, 1),
    "Interp": (None, 1),
    "BinaryOp": (None, 1),
    "Split": (1, None),
    "Concat": (None, 1),
    "Eltwise": (None, 1),
    "Sigmoid": (1, 1),
    "Swish": (1, 1),
    "MemoryData": (0, 1),
}


def _check_wiring(layers: tuple[NcnnLayer, ...], param_path: Path) -> tuple[str, str]:
    """Every blob is made once, before it is used; one Input; one blob nobody uses (the output).

    Returns (input blob, output blob). Raises RunnerError naming what is wrong.
    """
    made: set[str] = set()
    used: set[str] = set()
    input_blobs = [layer.outputs[0] for layer in layers if layer.type == "Input"]
    if len(input_blobs) != 1:
        raise RunnerError(
            f"{param_path}: the converter needs exactly one Input layer, found {len(input_blobs)}"
        )
    for layer in layers:
        if not layer.outputs:
            raise RunnerError(
                f"{param_path}: layer {layer.name!r} ({layer.type}) has no output blob"
            )
        for blob in layer.inputs:
            if blob not in made:
                raise RunnerError(
                    f"{param_path}: layer {layer.name!r} uses blob {blob!r} before any layer makes it"
                )
            used.add(blob)
        for blob in layer.outputs:
            if blob in made:
                raise RunnerError(
                    f"{param_path}: blob {blob!r} is made twice (again by layer {layer.name!r})"
                )
            made.add(blob)
    unused = [blob for layer in layers for blob in layer.outputs if blob not in used]
    if len(unused) != 1:
        raise RunnerError(
            f"{param_path}: the converter needs exactly one output blob, found {unused}"
        )
    return input_blobs[0], unused[0]


# A float scale such as 0.333333 is read as the nearest fraction with a small denominator.
MAX_SCALE_DENOMINATOR = 64


def _infer_scale(
    layers: tuple[NcnnLayer, ...], input_blob: str, output_blob: str, param_path: Path
) -> int:
    """Output side / input side, by following each blob's (height, width) factor through the graph.

    Constants (MemoryData) have no factor and broadcast. Raises RunnerError when the factor is
    not one positive integer for both sides, or two inputs of one layer disagree.
    """
    factors: dict[str, tuple[Fraction, Fraction] | None] = {input_blob: (Fraction(1), Fraction(1))}
    for layer in layers:
        if layer.type == "Input":
            continue
        if layer.type == "MemoryData":
            factors[layer.outputs[0]] = None
            continue
        known = {factors[blob] for blob in layer.inputs} - {None}
        if len(known) > 1:
            raise RunnerError(
                f"{param_path}: layer {layer.name!r} combines blobs of different sizes "
                f"(relative to the input: {sorted(str(item) for item in known)})"
            )
        factor = known.pop() if known else None
        attributes = layer.attributes
        if factor is not None:
            height, width = factor
            if isinstance(attributes, ConvolutionAttributes):
                factor = (height / attributes.stride[0], width / attributes.stride[1])
            elif isinstance(attributes, PixelShuffleAttributes):
                factor = (height * attributes.factor, width * attributes.factor)
            elif isinstance(attributes, InterpAttributes):
                height_scale, width_scale = (
                    Fraction(value).limit_denominator(MAX_SCALE_DENOMINATOR)
                    for value in attributes.scale
                )
                factor = (height * height_scale, width * width_scale)
        for blob in layer.outputs:
            factors[blob] = factor
    scale = factors[output_blob]
    if scale is None or scale[0] != scale[1] or scale[0].denominator != 1 or scale[0] <= 0:
        found = (
            "only constants" if scale is None else f"{scale[0]}× the height, {scale[1]}× the width"
        )
        raise RunnerError(
            f"{param_path}: the output is not one whole multiple of the input's size (found {found})"
        )
    return int(scale[0])
