"""Tiles for large photos: plan them, resample each to the output grid, stitch without seams.

Pure pixel code; the fan-out over model servers is :mod:`chaoqing.gateway.stages.upscale`'s.

Plan. Along each axis of length ``L`` tiles are ``T`` input pixels long (``L`` itself when
the photo is shorter than a tile: all tiles of a request share one shape, so model servers
can batch them). Neighbouring tiles overlap by at least ``blend + 2·margin`` pixels; the
first tile starts at 0, the last ends at ``L``, the rest are spread evenly between, so edge
tiles need no padding. Between two neighbours a seam sits in the middle of their overlap:
``margin`` pixels of context on each side are never shown (the model sees past the tile's
edge poorly), and the ``blend`` pixels around the seam are cross-faded.

Resampling. A tile comes back from the model at its native scale ``S``; the photo is asked
for at scale ``s``. Each tile is resampled straight onto the output grid with Pillow's
Lanczos and an exact fractional source box, so the result equals resampling the whole
native image (edges map to edges, as in :func:`chaoqing.gateway.stages.resize.resize_image`), and the
native-scale image is never held whole.

Stitching. Weights are products of per-axis linear ramps quantised to ``RAMP_LEVELS`` steps,
whose two sides of every seam add up exactly, so the four weights at a corner sum to
``RAMP_LEVELS²`` = 256. Tiles are accumulated as ``weight × value`` into a uint16 canvas
(255 × 256 fits), in any order, and the canvas is divided once at the end: the result does
not depend on which tile finished first, and the canvas costs 2 bytes per channel.

Memory. The uint16 canvas lives in a private anonymous memory map, so its pages are only
resident once a tile touches them, and :meth:`TileCanvas.finish` hands them back to the
kernel (``MADV_DONTNEED``) band by band as it narrows them into the uint8 result: the peak of
the finish is the canvas plus one band, not the canvas plus the result (for a 48 MP output,
288 MB + 4 MB instead of 288 MB + 144 MB). Private, because Python's default anonymous map
is shared memory, whose pages ``MADV_DONTNEED`` only unmaps (they leave the process's RSS
but stay allocated until the map is closed).
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from gevent import monkey
from PIL import Image

from chaoqing.gateway.stages.resize import whole_reduction

__all__ = ["RAMP_LEVELS", "Tile", "TileCanvas", "TilePlan", "plan_tiles", "tile_window", "window_core"]

RAMP_LEVELS = 16  # ramp steps per seam: 16 × 16 = 256 per pixel, so 255 × 256 fits a uint16
WEIGHT_TOTAL = RAMP_LEVELS * RAMP_LEVELS
WEIGHT_BITS = 8  # dividing by WEIGHT_TOTAL is a shift by this many bits
FINISH_BAND_BYTES = 4 * 1024 * 1024  # canvas narrowed and released this much at a time
# Linux frees the pages of a private map at once; without the constant they go with the map
_RELEASE_ADVICE: int | None = getattr(mmap, "MADV_DONTNEED", None)
_PRIVATE_ANONYMOUS: int | None = (
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS") else None
)

# Threadpool workers are native threads; a gevent lock would not exclude them from each other.
_NativeLock = monkey.get_original("threading", "Lock")


@dataclass(frozen=True)
class _Span:
    """One tile along one axis, in input pixels, and the output pixels it is responsible for."""

    start: int  # input
    length: int  # input
    seam_before: float | None  # input coordinate of the seam with the previous tile
    seam_after: float | None


@dataclass(frozen=True)
class Tile:
    """One tile: where to cut it from the input (``x``, ``y``, ``width``, ``height``)."""

    index: int
    x: int
    y: int
    width: int
    height: int
    x_span: _Span
    y_span: _Span


@dataclass(frozen=True)
class TilePlan:
    """All tiles of one photo, and the geometry they share."""

    input_size: tuple[int, int]  # width, height
    output_size: tuple[int, int]
    tiles: tuple[Tile, ...]
    blend: int
    margin: int

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(height, width) shared by every tile."""
        return self.tiles[0].height, self.tiles[0].width

    def seam_windows(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Output columns and rows near the seams, for measuring them: around every seam,
        each position within ``blend / 2 + margin`` input pixels of it (where two tiles are
        cross-faded, and where their pixels came from nearest their edges). Positions are
        at least 1, so each has a neighbour before it."""
        reach = self.blend / 2 + self.margin
        windows = []
        for length, output_length, spans in (
            (self.input_size[0], self.output_size[0], {tile.x_span for tile in self.tiles}),
            (self.input_size[1], self.output_size[1], {tile.y_span for tile in self.tiles}),
        ):
            ratio = output_length / length
            positions: set[int] = set()
            for span in spans:
                if span.seam_after is not None:
                    first = max(1, round(ratio * (span.seam_after - reach)))
                    stop = min(output_length, round(ratio * (span.seam_after + reach)) + 1)
                    positions.update(range(first, stop))
            windows.append(tuple(sorted(positions)))
        return windows[0], windows[1]


def _plan_axis(length: int, tile: int, blend: int, margin: int) -> list[_Span]:
    if length <= tile:
        return [_Span(0, length, None, None)]
    minimum_overlap = blend + 2 * margin
    if tile <= 2 * minimum_overlap:
        raise ValueError(f"tile size {tile} is too small for blend {blend} and margin {margin}")
    count = math.ceil((length - minimum_overlap) / (tile - minimum_overlap))
    # as many tiles as a full-size tile needs, each shrunk to just cover the axis with the
    # minimum overlap: a 1632 px side takes 8 tiles of 232 rather than 8 of 256, 14 % fewer
    # pixels for the model (tiles of one request still share one shape)
    tile = min(tile, math.ceil((length + (count - 1) * minimum_overlap) / count))
    starts = [round(index * (length - tile) / (count - 1)) for index in range(count)]
    seams = [((starts[index + 1]) + (starts[index] + tile)) / 2 for index in range(count - 1)]
    return [
        _Span(start, tile, seams[index - 1] if index > 0 else None, seams[index] if index < count - 1 else None)
        for index, start in enumerate(starts)
    ]


def plan_tiles(
    width: int, height: int, output_width: int, output_height: int, tile_size: int, blend: int, margin: int
) -> TilePlan:
    """Tiles for a ``width``×``height`` photo going to ``output_width``×``output_height``.

    Raises ValueError when ``tile_size`` cannot hold the overlap (``> 2·(blend + 2·margin)``).
    """
    x_spans = _plan_axis(width, tile_size, blend, margin)
    y_spans = _plan_axis(height, tile_size, blend, margin)
    tiles = tuple(
        Tile(index=row * len(x_spans) + column, x=x_span.start, y=y_span.start, width=x_span.length,
             height=y_span.length, x_span=x_span, y_span=y_span)
        for row, y_span in enumerate(y_spans)
        for column, x_span in enumerate(x_spans)
    )
    return TilePlan((width, height), (output_width, output_height), tiles, blend, margin)


def _responsibility(span: _Span, blend: int, ratio: float, output_length: int) -> tuple[int, int, int, int]:
    """Output range [first, stop) this tile writes, and its fade-in / fade-out window bounds."""
    if span.seam_before is None:
        first = fade_in_end = 0
    else:
        first = round(ratio * (span.seam_before - blend / 2))
        fade_in_end = round(ratio * (span.seam_before + blend / 2))
    if span.seam_after is None:
        stop = fade_out_start = output_length
    else:
        fade_out_start = round(ratio * (span.seam_after - blend / 2))
        stop = round(ratio * (span.seam_after + blend / 2))
    return first, stop, fade_in_end, fade_out_start


def _ramp(first: int, stop: int, fade_in_end: int, fade_out_start: int) -> npt.NDArray[np.uint16]:
    """Integer weights in [0, RAMP_LEVELS] over [first, stop): rising, flat, falling.

    A seam's falling side and the next tile's rising side are computed from the same window
    with the same rounding, so they add up to RAMP_LEVELS exactly.
    """
    positions = np.arange(first, stop, dtype=np.float64) + 0.5
    weights = np.full(stop - first, RAMP_LEVELS, dtype=np.float64)
    if fade_in_end > first:
        rising = np.floor(RAMP_LEVELS * (positions - first) / (fade_in_end - first) + 0.5)
        weights = np.where(positions < fade_in_end, rising, weights)
    if stop > fade_out_start:
        rising_next = np.floor(RAMP_LEVELS * (positions - fade_out_start) / (stop - fade_out_start) + 0.5)
        weights = np.where(positions >= fade_out_start, RAMP_LEVELS - rising_next, weights)
    return np.clip(weights, 0, RAMP_LEVELS).astype(np.uint16)


def tile_window(rgb: npt.NDArray[np.uint8], tile: Tile, context: int) -> npt.NDArray[np.uint8]:
    """``tile`` of ``rgb`` with ``context`` pixels around it (a contiguous copy); where the photo
    ends, its edge is replicated, as a model server pads a whole image."""
    height, width = rgb.shape[:2]
    top, left = tile.y - context, tile.x - context
    bottom, right = tile.y + tile.height + context, tile.x + tile.width + context
    inner = rgb[max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    padding = ((max(0, -top), max(0, bottom - height)), (max(0, -left), max(0, right - width)), (0, 0))
    if any(before or after for before, after in padding):
        return np.pad(inner, padding[: rgb.ndim], mode="edge")
    return np.ascontiguousarray(inner)


def window_core(native_window: npt.NDArray[np.uint8], tile: Tile, context: int) -> npt.NDArray[np.uint8]:
    """The tile's own part (a view) of a model's output for :func:`tile_window`'s window.

    Raises ValueError when the output is not a whole-number multiple of the window.
    """
    window_height, window_width = tile.height + 2 * context, tile.width + 2 * context
    native_height, native_width = native_window.shape[:2]
    scale, remainder = divmod(native_width, window_width)
    if remainder or scale < 1 or native_height != scale * window_height:
        raise ValueError(f"{native_width}×{native_height} is not a whole-number multiple of the "
                         f"{window_width}×{window_height} window")
    edge = context * scale
    return native_window[edge : native_height - edge, edge : native_width - edge]


class TileCanvas:
    """One request's output canvas; tiles are added from threadpool workers in any order.

    Memory: a uint16 accumulator of the output's size (2 bytes per channel) in an anonymous
    memory map, released band by band by :meth:`finish`, which returns the uint8 image.
    """

    def __init__(self, plan: TilePlan, channels: int = 3) -> None:
        self.plan = plan
        output_width, output_height = plan.output_size
        shape = (output_height, output_width, channels)
        self._memory: mmap.mmap | None = _anonymous_map(math.prod(shape) * np.dtype(np.uint16).itemsize)
        self._accumulator: npt.NDArray[np.uint16] | None = np.frombuffer(
            self._memory, dtype=np.uint16, count=math.prod(shape)
        ).reshape(shape)
        self._lock = _NativeLock()
        self._added = 0

    def add(self, tile: Tile, native_output: npt.NDArray[np.uint8]) -> None:
        """Resample one tile's model output onto the output grid and accumulate it.

        ``native_output`` is [height·S, width·S, channels] for the tile. Thread-safe.
        Raises ValueError when its shape does not fit the tile.
        """
        input_width, input_height = self.plan.input_size
        output_width, output_height = self.plan.output_size
        native_height, native_width = native_output.shape[:2]
        if native_height * tile.width != native_width * tile.height:
            raise ValueError(f"tile output {native_width}×{native_height} does not match tile {tile.width}×{tile.height}")
        native_scale = native_width / tile.width
        ratio_x = output_width / input_width
        ratio_y = output_height / input_height
        x_first, x_stop, x_in, x_out = _responsibility(tile.x_span, self.plan.blend, ratio_x, output_width)
        y_first, y_stop, y_in, y_out = _responsibility(tile.y_span, self.plan.blend, ratio_y, output_height)
        # source box in the tile's native pixels covering output pixels [first, stop) (edges)
        per_output_x = native_scale / ratio_x
        per_output_y = native_scale / ratio_y
        box = (
            x_first * per_output_x - tile.x * native_scale,
            y_first * per_output_y - tile.y * native_scale,
            x_stop * per_output_x - tile.x * native_scale,
            y_stop * per_output_y - tile.y * native_scale,
        )
        size = (x_stop - x_first, y_stop - y_first)
        region = _resample(native_output, box, size)
        weights = _ramp(y_first, y_stop, y_in, y_out)[:, None] * _ramp(x_first, x_stop, x_in, x_out)[None, :]
        weighted = region.astype(np.uint16) * weights[:, :, None]
        with self._lock:
            if self._accumulator is None:
                raise ValueError("the canvas is already finished")
            self._accumulator[y_first:y_stop, x_first:x_stop] += weighted
            self._added += 1

    def finish(self) -> npt.NDArray[np.uint8]:
        """The stitched uint8 image (a new array); the canvas is released as it is read.

        Raises ValueError when tiles are missing or the canvas was already finished.
        """
        with self._lock:
            if self._added != len(self.plan.tiles) or self._accumulator is None or self._memory is None:
                raise ValueError(f"{self._added} of {len(self.plan.tiles)} tiles were added")
            accumulator, self._accumulator = self._accumulator, None
            memory, self._memory = self._memory, None
        height = accumulator.shape[0]
        row_bytes = accumulator[0].nbytes
        rows_per_band = max(1, FINISH_BAND_BYTES // max(1, row_bytes))
        result = np.empty(accumulator.shape, dtype=np.uint8)
        released = 0
        for top in range(0, height, rows_per_band):
            band = accumulator[top : top + rows_per_band] + WEIGHT_TOTAL // 2  # round: 255·256 + 128 fits
            band >>= WEIGHT_BITS
            result[top : top + rows_per_band] = band
            released = _release(memory, released, min(height, top + rows_per_band) * row_bytes)
        del accumulator
        try:
            memory.close()
        except BufferError:  # a view still exists somewhere; its pages were released already
            pass
        return result


def _anonymous_map(size: int) -> mmap.mmap:
    """``size`` bytes of private memory, zero-filled by the kernel, resident only where written."""
    if _PRIVATE_ANONYMOUS is None:  # not a POSIX system: whatever anonymous memory it gives
        return mmap.mmap(-1, max(1, size))
    return mmap.mmap(-1, max(1, size), flags=_PRIVATE_ANONYMOUS)


def _release(memory: mmap.mmap, released: int, upto: int) -> int:
    """Hand the whole pages of ``memory`` in [released, upto) back to the kernel; returns
    the new released offset (page-aligned)."""
    end = upto // mmap.PAGESIZE * mmap.PAGESIZE
    if _RELEASE_ADVICE is not None and end > released:
        memory.madvise(_RELEASE_ADVICE, released, end - released)
        return end
    return released


def _resample(native: npt.NDArray[np.uint8], box: tuple[float, float, float, float], size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """``box`` (fractional, tile-native pixels) resampled to ``size``: a slice when it is 1:1,
    a k×k block average when it is a whole-number reduction on whole pixels (as
    :func:`chaoqing.gateway.stages.resize.resize_image` does for the whole photo), Pillow's Lanczos otherwise."""
    native_height, native_width = native.shape[:2]
    left, top = max(0.0, box[0]), max(0.0, box[1])
    right, bottom = min(float(native_width), box[2]), min(float(native_height), box[3])
    box = (left, top, right, bottom)
    width, height = size
    if (
        right - left == width and bottom - top == height
        and float(left).is_integer() and float(top).is_integer()
    ):
        return native[int(top) : int(bottom), int(left) : int(right)]
    aligned = all(float(edge).is_integer() for edge in box)
    if aligned and whole_reduction(right - left, bottom - top, width, height):
        region = np.ascontiguousarray(native[int(top) : int(bottom), int(left) : int(right)])
        return np.asarray(cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    mode = "RGB" if native.shape[2] == 3 else "RGBA"
    image = Image.fromarray(np.ascontiguousarray(native), mode)
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS, box=box))
