"""Resizing the gateway does itself: Lanczos to the asked scale, and back to 16 bits.

Models run at their native scale (×4); the asked scale (any value in [1, 4]) is reached with
a Lanczos filter whose kernel widens when it shrinks (Pillow's), so going from ×4 to ×2 does
not alias. Pillow releases the GIL while it resamples; call these from the threadpool.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["resize_lanczos", "restore_bit_depth"]

SIXTEEN_BIT_PER_EIGHT_BIT = 257  # 65535 / 255


def resize_lanczos(image: npt.NDArray[np.generic], width: int, height: int) -> npt.NDArray[np.generic]:
    """A new ``[height, width(, C)]`` array, Lanczos-resampled; uint8 or uint16, 1 or 3 channels.

    Returns ``image`` itself when the size already matches. Raises ValueError for other dtypes.
    """
    if image.shape[0] == height and image.shape[1] == width:
        return image
    if image.dtype == np.uint8:
        mode = "RGB" if image.ndim == 3 else "L"
        resized = Image.fromarray(np.ascontiguousarray(image), mode).resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(resized, dtype=np.uint8)
    if image.dtype == np.uint16:
        planes = [image] if image.ndim == 2 else [image[:, :, channel] for channel in range(image.shape[2])]
        resized_planes = []
        for plane in planes:
            floating = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), "F")
            resized_planes.append(np.asarray(floating.resize((width, height), Image.Resampling.LANCZOS)))
        stacked = resized_planes[0] if image.ndim == 2 else np.stack(resized_planes, axis=2)
        return np.clip(np.rint(stacked), 0, 65535).astype(np.uint16)
    raise ValueError(f"cannot resize {image.dtype} images")


def restore_bit_depth(
    model_output: npt.NDArray[np.uint8], original_16: npt.NDArray[Any], original_8: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint16]:
    """16-bit output for a 16-bit input, from a model that speaks 8 bits.

    The smooth part comes from the 16-bit original (Lanczos to the output size), the detail
    from the model: ``out = lanczos(original_16) + 257 · (model − lanczos(original_8))``. Flat
    gradients keep their 16-bit steps; edges get the model's sharpness.
    """
    height, width = model_output.shape[:2]
    smooth_16 = resize_lanczos(original_16, width, height).astype(np.int32)
    smooth_8 = resize_lanczos(original_8, width, height).astype(np.int32)
    detail = (model_output.astype(np.int32) - smooth_8) * SIXTEEN_BIT_PER_EIGHT_BIT
    return np.clip(smooth_16 + detail, 0, 65535).astype(np.uint16)
