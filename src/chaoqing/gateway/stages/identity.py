"""The identity guard: is the restored face still the person in the photo?

Face restorers repaint faces, and can change who a person looks like. After the face model
answers, :func:`guard_identity` compares dlib's 128-D face descriptors (the model server's
``face-descriptor``; the gateway never imports dlib) of the input face and of the restored
face, and when they are more than the threshold apart, finds the largest strength at which
the restored face, blended back toward the background's face, passes.

Where the faces are compared. Both faces are aligned to the detector's template at the face's
own size in the input (:func:`describe_side`: the restored face is *shrunk back to the input's
resolution*, as ``chaoqing bench faces`` measures it), and described at *the same 5 points*:
dlib's shape predictor places them on the input face (inside :data:`DLIB_BOX_512`, where
dlib's HOG box sits on an aligned face), and every candidate reuses them.

What the candidates blend toward. The guard runs in the face's own greenlet, while the
background is still being upscaled, so the background's face is not there yet. A candidate at
strength ``w`` is ``w · restored + (1 − w) · input face``, both at the input's resolution:
the background's face, shrunk back, is the input face, to the upscaler's consistency (``bench
faces`` on the sample photos: Lanczos 0.003-0.055, the compact model 0.09-0.21 apart). The
strength found is then the face's ``face_strength`` when it is composited onto the real
background (:mod:`chaoqing.gateway.stages.face_match`), so checking costs no time after the
background is done; colour matching afterwards moves the face further toward the photo.

The search. One descriptor call describes the input face (and places the points); a second
describes the restored face at the requested strength. When that is within the threshold,
nothing changes. Otherwise each further round (at most ``max_rounds``) describes
``candidates_per_round`` strengths spread evenly inside the interval still open, side by side
in one image (the descriptor takes one image and N boxes), and keeps the largest that passes:
with the defaults (2 rounds of 4), the strength is found to 1/25 of the requested one in
4 calls. Strength 0 is the input face itself, so a passing strength always exists.

Pure but for ``describe`` (the remote call) and ``offload`` (the threadpool), which the caller
passes in, as :func:`chaoqing.gateway.stages.upscale.upscale_image` takes its model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from chaoqing.config import IdentityGuardSettings
from chaoqing.errors import BadModelResponse
from chaoqing.gateway.stages.composite import EnhancedFace
from chaoqing.gateway.stages.face_geometry import (
    TEMPLATE_SIZE,
    PasteBox,
    create_resize_matrix,
    warp_face_by_landmarks,
    warp_face_into_box,
)

__all__ = [
    "DESCRIBE_MAX_SIDE",
    "DESCRIPTOR_OUTPUTS",
    "DLIB_BOX_512",
    "Describe",
    "IdentityCheck",
    "IdentityTiles",
    "blend_candidates",
    "describe_side",
    "descriptor_distance",
    "guard_identity",
    "identity_tiles",
    "side_by_side",
]

# Where dlib's HOG box sits on an FFHQ-aligned 512 px crop, mean of the 18 faces both detectors
# found on the sample photos and skimage's astronaut (std ~25 px): the box dlib's shape
# predictor is given, whatever detector found the face (measured for `chaoqing bench faces`).
DLIB_BOX_512 = (98.7, 150.6, 405.6, 455.1)
# The aligned faces are described at most this large: dlib cuts a 150 px chip with 0.25
# padding from the box (307 of 512 px), so a 256 px crop already gives it every pixel it uses.
DESCRIBE_MAX_SIDE = 256
DESCRIBE_MIN_SIDE = 64  # smaller faces are enlarged (bilinear) to this; they hold no more detail
DESCRIPTOR_OUTPUTS = ("descriptors", "landmarks")

# describe(image [H, W, 3] uint8, boxes [N, 4] float32, landmarks [N, 5, 2] float32 or None)
# → (descriptors [N, 128], landmarks [N, 5, 2]): the face-descriptor model's call
Describe = Callable[[npt.NDArray[np.uint8], npt.NDArray[np.float32], "npt.NDArray[np.float32] | None"],
                    tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]
Offload = Callable[..., Any]


@dataclass(frozen=True)
class IdentityCheck:
    """What the guard found for one face.

    ``distance_before``: the restored face at the requested strength against the input face;
    ``distance_after``: at ``strength``, the strength it is composited with (the requested one
    when it passed); ``descriptor_calls``: remote calls it took."""

    threshold: float
    requested_strength: float
    strength: float
    distance_before: float
    distance_after: float
    descriptor_calls: int

    @property
    def guarded(self) -> bool:
        """Whether the face was blended back (its strength lowered)."""
        return self.strength < self.requested_strength

    def as_dict(self, face_index: int) -> dict[str, Any]:
        """The per-face report of responses and jobs (docs/faces.md)."""
        return {
            "face": face_index, "guarded": self.guarded, "distance_before": round(self.distance_before, 4),
            "distance_after": round(self.distance_after, 4), "strength": round(self.strength, 4),
            "requested_strength": round(self.requested_strength, 4),
        }


@dataclass(frozen=True, eq=False)
class IdentityTiles:
    """The input face and the restored face, aligned alike at one size: uint8 [side, side, 3]."""

    reference: npt.NDArray[np.uint8]
    restored: npt.NDArray[np.uint8]

    @property
    def side(self) -> int:
        return int(self.reference.shape[0])


def describe_side(face_side_in_image: float) -> int:
    """The side at which a face whose 512 px template crop is ``face_side_in_image`` input
    pixels is described: its own size, within [DESCRIBE_MIN_SIDE, DESCRIBE_MAX_SIDE]."""
    return int(min(max(math.ceil(face_side_in_image), DESCRIBE_MIN_SIDE), DESCRIBE_MAX_SIDE))


def identity_tiles(
    rgb: npt.NDArray[np.uint8], landmarks: npt.NDArray[np.float64], template_512: npt.NDArray[np.float64],
    restored: EnhancedFace, side: int,
) -> IdentityTiles:
    """Threadpool: the input face aligned to the detector's template at ``side`` (antialiased),
    and the restored face warped onto the same grid through its paste-back matrix, so a face
    model that aligned its own way (arcface 128) is compared at the same geometry.

    Raises DegenerateLandmarks; ValueError for arrays that are not images."""
    reference, image_to_tile = warp_face_by_landmarks(rgb, landmarks, template_512, side)
    background_to_image = np.vstack([create_resize_matrix(1.0 / restored.background_scale), [0.0, 0.0, 1.0]])
    crop_to_background = np.vstack([restored.inverse_affine_matrix, [0.0, 0.0, 1.0]])
    crop_to_tile = np.vstack([image_to_tile, [0.0, 0.0, 1.0]]) @ background_to_image @ crop_to_background
    warped = warp_face_into_box(np.ascontiguousarray(restored.enhanced_crop), crop_to_tile[:2], PasteBox(0, 0, side, side))
    return IdentityTiles(np.ascontiguousarray(reference[:, :, :3]), np.ascontiguousarray(warped[:, :, :3]))


def blend_candidates(tiles: IdentityTiles, strengths: Sequence[float]) -> list[npt.NDArray[np.uint8]]:
    """Threadpool: ``w · restored + (1 − w) · reference`` for each strength ``w``, rounded."""
    reference = tiles.reference.astype(np.float32)
    difference = tiles.restored.astype(np.float32) - reference
    return [np.asarray(np.clip(np.rint(reference + np.float32(strength) * difference), 0, 255), dtype=np.uint8)
            for strength in strengths]


def side_by_side(
    images: Sequence[npt.NDArray[np.uint8]], landmarks: npt.NDArray[np.float32] | None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Threadpool: equal square tiles in one row, with one dlib box per tile (and the tile's
    copy of ``landmarks`` [5, 2], given in tile pixels), for one descriptor call."""
    side = int(images[0].shape[0])
    scale = side / TEMPLATE_SIZE
    left, top, right, bottom = (value * scale for value in DLIB_BOX_512)
    offsets = np.arange(len(images), dtype=np.float32) * side
    boxes = np.stack([offsets + left, np.full_like(offsets, top), offsets + right, np.full_like(offsets, bottom)], axis=1)
    points = None
    if landmarks is not None:
        points = np.repeat(np.asarray(landmarks, dtype=np.float32)[None], len(images), axis=0)
        points[:, :, 0] += offsets[:, None]
    return np.ascontiguousarray(np.concatenate(images, axis=1)), boxes.astype(np.float32), points


def descriptor_distance(first: npt.NDArray[Any], second: npt.NDArray[Any]) -> float:
    """Euclidean distance between two descriptors (dlib: the same person < 0.6)."""
    return float(np.linalg.norm(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)))


def _checked(answer: tuple[npt.NDArray[Any], npt.NDArray[Any]], count: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    descriptors, landmarks = np.asarray(answer[0]), np.asarray(answer[1])
    if descriptors.ndim != 2 or descriptors.shape[0] != count or landmarks.shape[:1] != (count,) \
            or not np.all(np.isfinite(descriptors)):
        raise BadModelResponse(f"the face descriptor returned {list(descriptors.shape)} descriptors for {count} faces")
    return descriptors, landmarks


def guard_identity(
    tiles: IdentityTiles, strength: float, settings: IdentityGuardSettings, describe: Describe, offload: Offload,
) -> IdentityCheck:
    """The largest strength up to ``strength`` at which the restored face passes (see the
    module notes). Raises what ``describe`` raises (ModelServerError subclasses) and
    BadModelResponse for an answer of the wrong shape."""
    image, boxes, _ = offload(side_by_side, [tiles.reference], None)
    described, placed = _checked(describe(image, boxes, None), 1)
    reference, points = described[0], placed[0]

    def distances(strengths: Sequence[float]) -> list[float]:
        candidates = offload(blend_candidates, tiles, strengths)
        image, boxes, landmarks = offload(side_by_side, candidates, points)
        descriptors, _ = _checked(describe(image, boxes, landmarks), len(strengths))
        return [descriptor_distance(descriptor, reference) for descriptor in descriptors]

    before = distances([strength])[0]
    calls, passing, passing_distance, failing = 2, 0.0, 0.0, strength
    if before <= settings.threshold:
        passing, passing_distance = strength, before
    else:
        for _ in range(settings.max_rounds):
            step = (failing - passing) / (settings.candidates_per_round + 1)
            strengths = [passing + step * (index + 1) for index in range(settings.candidates_per_round)]
            calls += 1
            for candidate, distance in zip(strengths, distances(strengths), strict=True):
                if distance <= settings.threshold and candidate > passing:
                    passing, passing_distance = candidate, distance
            failing = min((candidate for candidate in [*strengths, failing] if candidate > passing), default=failing)
    return IdentityCheck(settings.threshold, strength, passing, before, passing_distance, calls)
