"""The composite stage: blend enhanced faces onto the upscaled background.

Split in two so that the costly part runs per face, concurrently, as each face returns:

- :func:`prepare_face_paste` — one face's inverse warp and soft mask, computed only inside
  the face's box in the background (a threadpool job; cv2 releases the GIL);
- :func:`composite_face_pastes` — one copy of the background, then a cheap box-local blend
  per face, in order (later faces on top where faces overlap);
- :func:`composite_face_pastes_in_place` — the same blends into a background the caller
  owns, without the copy (3 bytes per output pixel: 144 MB for a 48 MP photo).

:func:`composite_faces` does both in sequence. Everything here but the in-place function is
pure: inputs are never written (they may be read-only ``np.frombuffer`` views), results are
new arrays.

Errors: :class:`ValueError` for arrays that do not fit together (programming errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from chaoqing.gateway.stages.face_geometry import (
    PasteBox,
    blend_patch_into,
    compute_paste_box,
    create_soft_mask,
    warp_face_into_box,
)

__all__ = [
    "EnhancedFace",
    "FacePaste",
    "composite_face_pastes",
    "composite_face_pastes_in_place",
    "composite_faces",
    "prepare_face_paste",
]


def _read_only_view(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A read-only view of ``array``: the dataclasses below cannot be edited through."""
    view = array.view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False)
class EnhancedFace:
    """One face back from the face model, with what it takes to paste it.

    Attributes:
        enhanced_crop: the model's output, uint8 (or uint16) [h, w, 3] RGB.
        inverse_affine_matrix: 2x3, enhanced-crop pixels → background pixels
            (:func:`chaoqing.gateway.stages.face_geometry.invert_affine_matrix`).
        background_scale: background size over original image size (sizes the mask).
        face_index: the face's position in the detector's output, for logs and errors.

    Raises:
        ValueError: on construction, when the crop or matrix has the wrong shape.
    """

    enhanced_crop: npt.NDArray[Any]
    inverse_affine_matrix: npt.NDArray[np.float64]
    background_scale: float = 1.0
    face_index: int = 0

    def __post_init__(self) -> None:
        if self.enhanced_crop.ndim != 3:
            raise ValueError(f"enhanced crop must be [h, w, c], got {self.enhanced_crop.shape}")
        matrix = np.array(self.inverse_affine_matrix, dtype=np.float64)
        if matrix.shape != (2, 3):
            raise ValueError(f"inverse affine matrix must be 2x3, got {matrix.shape}")
        object.__setattr__(self, "enhanced_crop", _read_only_view(self.enhanced_crop))
        object.__setattr__(self, "inverse_affine_matrix", _read_only_view(matrix))


@dataclass(frozen=True, eq=False)
class FacePaste:
    """One face ready to blend: a box-sized patch, its soft mask and the box.

    Attributes:
        box: where in the background the patch goes (may be empty: face wholly outside).
        patch: the face warped onto the background's grid, [box.height, box.width, c],
            in the enhanced crop's dtype.
        soft_mask: float32 [box.height, box.width] blend weights in [0, 1].
        face_index: as in :class:`EnhancedFace`.
    """

    box: PasteBox
    patch: npt.NDArray[Any]
    soft_mask: npt.NDArray[np.float32]
    face_index: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch", _read_only_view(self.patch))
        object.__setattr__(self, "soft_mask", _read_only_view(self.soft_mask))


def prepare_face_paste(face: EnhancedFace, background_shape: tuple[int, ...]) -> FacePaste:
    """Warp one face and build its soft mask inside its box of a background of this shape.

    The per-face part of compositing; safe to run for many faces at once (no shared state).
    Its cost follows the face's area in the background, not the background's.

    Raises:
        ValueError: the crop is not uint8/uint16 [h, w, c] or the matrix is not finite.
    """
    box = compute_paste_box(face.inverse_affine_matrix, face.enhanced_crop.shape, background_shape)
    patch = warp_face_into_box(face.enhanced_crop, face.inverse_affine_matrix, box)
    soft_mask = create_soft_mask(
        face.inverse_affine_matrix, face.enhanced_crop.shape, box, face.background_scale
    )
    return FacePaste(box=box, patch=patch, soft_mask=soft_mask, face_index=face.face_index)


def composite_face_pastes(
    background: npt.NDArray[Any], pastes: Sequence[FacePaste]
) -> npt.NDArray[Any]:
    """A new copy of ``background`` with each prepared face blended in, in order.

    Raises:
        ValueError: a paste does not fit the background (box outside it, channels, dtype).
    """
    canvas = background.copy()
    composite_face_pastes_in_place(canvas, pastes)
    return canvas


def composite_face_pastes_in_place(canvas: npt.NDArray[Any], pastes: Sequence[FacePaste]) -> None:
    """Blend each prepared face into ``canvas`` itself, in order; channels past the faces'
    (alpha) are kept. For a canvas the caller owns and nobody else reads while it runs.

    Raises:
        ValueError: ``canvas`` is read-only, or a paste does not fit it.
    """
    for paste in pastes:
        blend_patch_into(canvas, paste.patch, paste.soft_mask, paste.box)


def composite_faces(
    background: npt.NDArray[Any], faces: Sequence[EnhancedFace]
) -> npt.NDArray[Any]:
    """A new copy of ``background`` with every face blended in; later faces on top.

    Raises:
        ValueError: a face does not fit the background.
    """
    pastes = [prepare_face_paste(face, background.shape) for face in faces]
    return composite_face_pastes(background, pastes)
