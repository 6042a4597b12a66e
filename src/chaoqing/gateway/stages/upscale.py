"""The background branch: the whole photo, or its tiles, fanned out to the upscaler.

A photo no larger than a tile goes in one call and is resized to the asked size. A larger
one is planned into tiles (:mod:`chaoqing.gateway.stages.tiling`); one greenlet per tile, at most
``max_concurrent_tiles`` at a time per request, calls the model (replicas and retries are
the remote client's), and each tile is resampled and accumulated into one output canvas on
the threadpool as it arrives. The first tile that fails fails the branch and the others
are killed.

Tile geometry per model: the configured ``[tiles]`` settings, adjusted by the model's
metadata. A model that publishes ``parameters.tile_size`` (the bundled Real-ESRGAN runners
do: the longest side they run in one pass, 276 for the compact models, 172 for x4plus) gets
tiles no larger than that, because a server that split our tiles again would pay for a
second set of overlaps; one that publishes ``tile_overlap`` or ``tile_margin`` (input
pixels: what its receptive field needs) gets at least those. The tile never shrinks below
what the overlap needs.

A model that pads every input by replicating its edge (``parameters.prepadding``, 10 for
Real-ESRGAN) and lets the caller turn that off (``edge_padding`` among its
``optional_inputs``) gets each tile as a window with that many pixels of the photo around it
and ``edge_padding`` 0: the same pixels go through the network as before, but a tile's inner
sides see real context instead of a replica of their edge, so that context counts towards
the margin — with the defaults (margin 8, prepadding 10) the tiles need no margin, and
neighbours overlap by 16 pixels instead of 32. Where the photo ends, the gateway replicates
its edge, as the server would have.

Progress: ``on_tiles(done, total)`` hears the model calls, 0 of N once the tiles are planned
and again after each tile is on the canvas (a photo that fits one call counts as one tile).

Memory for a tiled photo: the output canvas (2 bytes per channel while stitching, released
as the 1-byte result is written) plus the tiles in flight; the native-scale image is never
held whole. Called from the pipeline's greenlets; the remote client is used only here on
the hub.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import numpy as np
import numpy.typing as npt
from gevent.lock import BoundedSemaphore

from chaoqing.config import TileSettings
from chaoqing.errors import BadModelResponse
from chaoqing.gateway.remote import RemoteModel
from chaoqing.gateway.stages.resize import resize_image
from chaoqing.gateway.stages.tiling import (
    TileCanvas,
    TilePlan,
    plan_tiles,
    tile_window,
    window_core,
)

__all__ = ["EDGE_PADDING_INPUT", "TileCounter", "TileGeometry", "geometry_from_parameters", "tile_geometry_for", "upscale_image"]

EDGE_PADDING_INPUT = "edge_padding"  # a model's optional input: pixels of edge it replicates around an image

T = TypeVar("T")
Offload = Callable[..., Any]
TileCounter = Callable[[int, int], None]  # (tiles done, tiles in all)


def _no_count(done: int, total: int) -> None:
    pass


def upscale_image(
    model: RemoteModel,
    rgb8: npt.NDArray[np.uint8],
    output_size: tuple[int, int],
    tiles: TileSettings,
    deadline: float,
    offload: Offload,
    request_id: str = "",
    on_tiles: TileCounter = _no_count,
) -> npt.NDArray[np.uint8]:
    """``rgb8`` [H, W, C] (C = 3) upscaled by ``model`` and resampled to ``output_size`` (w, h);
    ``on_tiles`` hears the tiles done (see the module notes).

    Returns a new uint8 array (writeable). Raises ModelServerError subclasses.
    """
    height, width = rgb8.shape[:2]
    output_width, output_height = output_size
    geometry = tile_geometry_for(model, tiles, deadline)
    tile_size = geometry.tile_size
    if tile_size <= 0 or (width <= tile_size and height <= tile_size):
        on_tiles(0, 1)
        native = _infer_one(model, rgb8, deadline, request_id)
        _check_native(model, native, width, height)
        on_tiles(1, 1)
        resized: npt.NDArray[np.uint8] = offload(resize_image, native, output_width, output_height)
        # the answer's buffer is this call's own (remote.py reads each body into a fresh
        # bytearray), so a writeable result is handed over as it is; a read-only one (JSON
        # tensors, or another client) is copied, off the hub
        return resized if resized.flags.writeable else offload(np.array, resized)
    plan = plan_tiles(width, height, output_width, output_height, tile_size, geometry.overlap, geometry.margin)
    return _upscale_tiles(model, rgb8, plan, geometry.context, tiles.max_concurrent_tiles, deadline, offload,
                          request_id, on_tiles)


@dataclass(frozen=True)
class TileGeometry:
    """Tile size (0: never tile), overlap and margin in input pixels, for one model; ``context``:
    pixels of the photo sent around each tile, with ``edge_padding`` 0 (0: plain tiles)."""

    tile_size: int
    overlap: int
    margin: int
    context: int = 0


def tile_geometry_for(model: RemoteModel, tiles: TileSettings, deadline: float) -> TileGeometry:
    """The configured tiles adjusted by ``model``'s metadata (see the module notes).

    Raises ModelServerError subclasses when the metadata cannot be read.
    """
    if tiles.tile_size <= 0:
        return TileGeometry(0, tiles.overlap, tiles.margin)
    return geometry_from_parameters(model.metadata(deadline).parameters, tiles)


def geometry_from_parameters(parameters: Mapping[str, Any], tiles: TileSettings) -> TileGeometry:
    """The configured tiles adjusted by a model's metadata ``parameters`` (see the module notes)."""
    if tiles.tile_size <= 0:
        return TileGeometry(0, tiles.overlap, tiles.margin)
    overlap = max(tiles.overlap, _published_pixels(parameters.get("tile_overlap")))
    margin = max(tiles.margin, _published_pixels(parameters.get("tile_margin")))
    tile_size = tiles.tile_size
    published = _published_pixels(parameters.get("tile_size"))
    if 0 < published < tile_size:
        tile_size = published
    optional = parameters.get("optional_inputs")
    context = 0
    if isinstance(optional, list) and EDGE_PADDING_INPUT in optional:
        context = _published_pixels(parameters.get("prepadding"))
        margin = max(0, margin - context)
    return TileGeometry(max(tile_size, 2 * (overlap + 2 * margin) + 1), overlap, margin, context)


def _published_pixels(value: Any) -> int:
    """A non-negative whole number of pixels from model metadata; 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _infer_one(model: RemoteModel, rgb8: npt.NDArray[np.uint8], deadline: float, request_id: str,
               edge_padding: int | None = None) -> npt.NDArray[np.uint8]:
    inputs = {"image": rgb8[None]}
    if edge_padding is not None:
        inputs[EDGE_PADDING_INPUT] = np.array([[edge_padding]], dtype=np.int32)
    output = model.infer(inputs, ["image"], deadline, request_id=request_id)["image"]
    if output.ndim != 4 or output.shape[0] != 1 or output.dtype != np.uint8:
        raise BadModelResponse(
            f"upscaler {model.name} returned {output.dtype} {list(output.shape)}, expected UINT8 [1,h,w,{rgb8.shape[2]}]",
            model=model.name,
        )
    result: npt.NDArray[np.uint8] = output[0]
    return result


def _check_native(model: RemoteModel, native: npt.NDArray[np.uint8], width: int, height: int) -> None:
    native_height, native_width, channels = native.shape
    if channels != 3 or native_height * width != native_width * height or native_width < width:
        raise BadModelResponse(
            f"upscaler {model.name} turned {width}×{height} into {native_width}×{native_height}×{channels}",
            model=model.name,
        )


def _upscale_tiles(
    model: RemoteModel,
    rgb8: npt.NDArray[np.uint8],
    plan: TilePlan,
    context: int,
    concurrency: int,
    deadline: float,
    offload: Offload,
    request_id: str,
    on_tiles: TileCounter,
) -> npt.NDArray[np.uint8]:
    canvas = TileCanvas(plan)
    total = len(plan.tiles)
    done = [0]
    on_tiles(0, total)

    def run_tile(index: int) -> None:
        tile = plan.tiles[index]
        window = tile_window(rgb8, tile, context)
        native = _infer_one(model, window, deadline, request_id, 0 if context else None)
        _check_native(model, native, window.shape[1], window.shape[0])
        try:
            core = window_core(native, tile, context)
        except ValueError as exc:
            raise BadModelResponse(f"upscaler {model.name}: {exc}", model=model.name) from None
        offload(canvas.add, tile, core)
        done[0] += 1
        on_tiles(done[0], total)

    gate = BoundedSemaphore(max(1, concurrency))

    def run_gated(index: int) -> None:
        with gate:
            run_tile(index)

    jobs = [gevent.spawn(run_gated, index) for index in range(len(plan.tiles))]
    try:
        gevent.joinall(jobs, raise_error=True)
    finally:
        gevent.killall([job for job in jobs if not job.dead], block=False)
    result: npt.NDArray[np.uint8] = offload(canvas.finish)
    return result
