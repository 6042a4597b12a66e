"""Upscalers: every bundled image model, on any runtime, behind one tensor contract.

``image`` UINT8 [B,H,W,3] RGB → ``image`` UINT8 [B,sH,sW,3], plus the optional input
``edge_padding``; the metadata (scale, tile size, batch limit, license, source, purpose) is
the same whatever computes it. Only "run this float32 NCHW batch" differs per runtime, and
that is a :class:`~chaoqing.modelserver.runners.backends.Backend`.

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
difference 1 level, on 1 pixel in 10⁵; context 10 gives max 6); SPAN's is 21 (21 3×3
convolutions), and it gets 24. RRDBNet's receptive field spans hundreds of pixels and its
output depends on far context weakly but visibly. Measured on the astronaut (downscaled to
128×128), tiled against whole, max / mean abs difference in levels:

=======  ==========================  ============================
context  64×64 crop, 32-pixel tiles  128×128 crop, 64-pixel tiles
=======  ==========================  ============================
10       71 / 1.30                   (not run)
24       31 / 0.63                   18 / 0.34
32       18 / 0.52                   14 / 0.15
=======  ==========================  ============================

so x4plus uses 32 (10 is what realesrgan-ncnn-vulkan uses, and where its seams come from).
``tests/test_runners.py`` pins these tolerances.

Batches: the images of a batch share a shape (the server batches equal shapes), so those with
the same edge padding are cut into the same tiles; each tile position runs as one call of up to
``backend.max_items`` images (a real batch on OpenVINO, ONNX Runtime and PyTorch; one image at
a time on ncnn, which has no batch dimension).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from chaoqing.errors import RunnerError
from chaoqing.modelserver.runners.backends import Backend
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec, image_batch
from chaoqing.modelserver.runners.catalog import ModelCard

__all__ = ["EDGE_PADDING_PX", "MAX_EDGE_PADDING_PX", "UpscalerDescription", "UpscalerRunner", "one_pass_size"]

# realesrgan-ncnn-vulkan (src/main.cpp): prepadding = 10 for every Real-ESRGAN model, filled
# by replicating the image border (its preprocessing clamps coordinates into the image).
EDGE_PADDING_PX = 10
# A caller that sends its own context around a tile (the gateway) may ask for less, down to none,
# never more: one_pass_size's memory bound counts on at most this much.
MAX_EDGE_PADDING_PX = EDGE_PADDING_PX

# Largest value an 8-bit channel takes; the networks work on [0, 1].
UINT8_MAX = 255.0


def one_pass_size(tile_size: int, tile_context: int) -> int:
    """The longest side run in one pass of the network, which the runner publishes as ``tile_size``.

    Padded by the edge on both sides, such a side feeds the network exactly as many pixels as an
    inner tile of ``tile_size`` with ``tile_context`` on both sides: the same memory bound, and a
    gateway's tile of this size is never split again.
    """
    return tile_size + 2 * (max(tile_context, EDGE_PADDING_PX) - EDGE_PADDING_PX)


class UpscalerDescription(Protocol):
    """What the runner needs to know of a model: a bundled
    :class:`~chaoqing.modelserver.runners.catalog.UpscalerModel`, or a user's file
    (:class:`~chaoqing.modelserver.runners.user_models.UserUpscaler`)."""

    @property
    def name(self) -> str: ...

    @property
    def scale(self) -> int: ...

    @property
    def card(self) -> ModelCard: ...

    @property
    def default_tile_size(self) -> int: ...

    @property
    def tile_context(self) -> int: ...


def _split_evenly(length: int, max_part: int) -> list[tuple[int, int]]:
    """Cut [0, length) into the fewest near-equal parts no longer than ``max_part``."""
    part_count = max(1, math.ceil(length / max_part))
    part_length = math.ceil(length / part_count)
    return [(start, min(start + part_length, length)) for start in range(0, length, part_length)]


class UpscalerRunner(Runner):
    """An upscaler on one backend: ``image`` UINT8 [B,H,W,3] RGB → ``image`` UINT8 [B,sH,sW,3].

    :meth:`run` keeps its state in its own call: batches may run at once on several threads (the
    batcher starts one per free compute slot), as far as the backend allows (every one does).
    """

    def __init__(
        self,
        model: UpscalerDescription,
        backend: Backend,
        *,
        runtime: str,
        device: str,
        tile_size: int = 0,
        tile_context: int = 0,
        max_batch_size: int = 8,
    ) -> None:
        """Serve ``model`` computed by ``backend`` (loaded on ``runtime`` and ``device``, which
        the metadata names).

        ``tile_size`` and ``tile_context`` 0 mean the model's defaults (a context below
        :data:`EDGE_PADDING_PX` is raised to it).

        Raises RunnerError for negative sizes or a batch limit below 1.
        """
        if min(tile_size, tile_context) < 0 or max_batch_size < 1:
            raise RunnerError("tile_size, tile_context must be >= 0, max_batch_size >= 1")
        self.model = model
        self.backend = backend
        self.tile_size = tile_size or model.default_tile_size
        self.edge_padding = EDGE_PADDING_PX
        self.tile_context = max(tile_context or model.tile_context, self.edge_padding)
        self.one_pass_size = one_pass_size(self.tile_size, self.tile_context)
        self.spec = ModelSpec(
            name=model.name,
            platform=backend.platform,
            inputs=(
                TensorSpec("image", "UINT8", (-1, -1, -1, 3)),
                TensorSpec("edge_padding", "INT32", (-1, 1), optional=True, value_range=(0, MAX_EDGE_PADDING_PX)),
            ),
            outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            max_batch_size=max_batch_size,
            parameters={
                "scale": model.scale,
                "tile_size": self.one_pass_size,
                "prepadding": self.edge_padding,
                "tile_context": self.tile_context,
                "runtime": runtime,
                "device": device,
                **model.card.as_parameters(),
            },
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Upscale every image of the batch ``inputs["image"]`` (UINT8 [B,H,W,3] RGB).

        Raises RunnerError when the input is missing or malformed, or the backend fails.
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
        edge_per_image = edges[:, 0]
        for edge in np.unique(edge_per_image):
            indices = np.flatnonzero(edge_per_image == edge)
            self._upscale_into(images[indices], upscaled, indices, int(edge))
        return {"image": upscaled}

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()

    def _upscale_into(self, images: np.ndarray, destination: np.ndarray, indices: np.ndarray, edge: int) -> None:
        """Upscale same-shaped images (NHWC) tile by tile into ``destination[indices]``, written in place.

        ``edge``: pixels of edge replication around each image (the inner tiles' context stays
        ``tile_context``).
        """
        count, height, width, _ = images.shape
        context = self.tile_context
        scale = self.model.scale
        step = self.backend.max_items
        # Channels first, [0, 1], edges replicated: the one float copy of the images.
        planes = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        planes *= 1.0 / UINT8_MAX
        padded = np.pad(planes, ((0, 0), (0, 0), (edge, edge), (edge, edge)), mode="edge")
        _, _, padded_height, padded_width = padded.shape
        for top, bottom in self._pieces(height):
            # Rows [top, bottom) of an image are rows [top + edge, bottom + edge) of `padded`;
            # the tile reads `context` more on each side, as far as `padded` goes.
            input_top = max(top + edge - context, 0)
            input_bottom = min(bottom + edge + context, padded_height)
            crop_top = (top + edge - input_top) * scale
            for left, right in self._pieces(width):
                input_left = max(left + edge - context, 0)
                input_right = min(right + edge + context, padded_width)
                crop_left = (left + edge - input_left) * scale
                for first in range(0, count, step):
                    tiles = padded[first : first + step, :, input_top:input_bottom, input_left:input_right]
                    output = self.backend.infer(tiles)
                    core = output[
                        :,
                        :,
                        crop_top : crop_top + (bottom - top) * scale,
                        crop_left : crop_left + (right - left) * scale,
                    ]
                    pixels = np.clip(core * UINT8_MAX, 0.0, UINT8_MAX)
                    np.rint(pixels, out=pixels)
                    destination[
                        indices[first : first + step],
                        top * scale : bottom * scale,
                        left * scale : right * scale,
                    ] = pixels.transpose(0, 2, 3, 1)

    def _pieces(self, length: int) -> list[tuple[int, int]]:
        """How one side is cut: whole when it fits one pass, else into near-equal tiles."""
        if length <= self.one_pass_size:
            return [(0, length)]
        return _split_evenly(length, self.tile_size)
