"""Make a pasted face belong to its photo: strength, colour and texture.

A face model returns a face cleaner and differently coloured than the photo around it: a
restorer paints its own skin tone and irises, and it removes the grain that the rest of the
photo keeps, so the face reads as a clean patch pasted on. Once the background is upscaled,
each prepared paste (:class:`~chaoqing.gateway.stages.composite.FacePaste`) is matched to
the background under it, before it is blended:

- **strength** (``face_strength`` in [0, 1]): the soft mask is multiplied by it, so the
  result is ``strength · face + (1 − strength) · background face`` — the background's own
  upscaled face, as FaceFusion's face enhancer blend does. 0 leaves the background alone.
- **colour**: in YCrCb, the difference background − face is low-pass filtered inside the
  face and added to the face. Luma gets a wide filter (σ = face side / 6: the photo's
  exposure and shading, the face model's detail kept), chroma a narrow one (σ = face side /
  96, at least 1 px: the photo's own colours, down to the iris — a restorer's brown or black
  "doll eyes" take the photo's blue back). The filter is normalised by the face's support,
  so nothing outside the face leaks in. Global colour statistics (Reinhard's transfer)
  cannot restore a small region such as an iris; this can.
- **texture**: the photo's grain and detail continue across the mask's edge. The level of
  fine detail is the RMS of the luma's high-frequency residual (luma − Gaussian(σ = max(1,
  background scale / 2)): the finest detail at the output's resolution), measured in a band
  just inside the face's edge, on the face and on the background's own upscaled face at
  the same pixels. Where the mask fades, the two are blended, so they must carry the same
  detail there for the edge to vanish. When the face is cleaner, the background's own
  residual is added inside the face, scaled so that the levels meet; when it is busier, its
  residual is scaled down, to no less than :data:`MIN_TEXTURE_GAIN`. The target is the
  background *inside* the edge, not just outside it: a face's edge often runs along hair or
  a collar that is busier or smoother than the skin within, and the background's upscale
  already carries that change as the photo does (matching the level outside instead, and
  with a robust σ rather than the RMS, left the boundary measure of ``chaoqing bench
  faces`` within [0.8, 1.25] of Lanczos's on 4 of 17 sample faces; this, on 13).

The bands are :data:`BAND_FRACTION` of the face's side wide, so the paste is matched over
a box grown by that much around its own (clipped to the background). Pure: inputs are never
written; the result is a new paste, in the background's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from chaoqing.gateway.stages.composite import FacePaste
from chaoqing.gateway.stages.face_geometry import PasteBox

__all__ = [
    "BAND_FRACTION",
    "MIN_TEXTURE_GAIN",
    "FaceMatchSettings",
    "TextureMeasure",
    "match_paste_to_background",
    "measure_texture",
]

LUMA_SIGMA_FRACTION = 1 / 6  # of the face's side: exposure and shading, wider than an eye or a mouth
CHROMA_SIGMA_FRACTION = 1 / 96  # of the face's side: an iris is about 1/10 of it
MIN_CHROMA_SIGMA_PX = 1.0
BAND_FRACTION = 1 / 10  # of the face's side: the bands where noise is compared
MIN_TEXTURE_GAIN = 0.5  # a busier face keeps at least this much of its own fine detail
SUPPORT_THRESHOLD = 1e-3  # mask values above this are the face
INSIDE_THRESHOLD = 0.999  # ... and above this, wholly the face
DIRECT_BLUR_MAX_SIGMA = 3.0  # wider blurs run on a shrunk grid (a low-pass loses nothing there)
MIN_BAND_PIXELS = 32  # fewer pixels in a band: too few to measure noise; texture is left alone


@dataclass(frozen=True)
class FaceMatchSettings:
    """How a face is matched to its photo (``face_strength``, ``face_colour``, ``face_texture``)."""

    strength: float = 1.0
    colour: bool = True
    texture: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            raise ValueError(f"face strength must be in [0, 1], got {self.strength!r}")

    @property
    def changes_nothing(self) -> bool:
        return self.strength == 1.0 and not self.colour and not self.texture


@dataclass(frozen=True)
class TextureMeasure:
    """Fine detail just outside a face and just inside it (RMS of the luma's fine residual, in
    [0, 1] units), and what matching did: the share of the background's residual added inside
    the face, and the share of the face's own residual kept (0.0 and 1.0: nothing changed).
    From matching, ``outside`` is the background's level inside the face's edge: the target."""

    outside: float
    inside: float
    added: float = 0.0
    kept: float = 1.0


def _unit_float(image: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    maximum = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    return image.astype(np.float32) * np.float32(1.0 / maximum)


def _from_unit_float(image: npt.NDArray[np.float32], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Scaled, rounded half up and clipped to ``dtype`` (in place on ``image``: it is scratch)."""
    maximum = np.float32(np.iinfo(dtype).max)
    np.multiply(image, maximum, out=image)
    np.add(image, np.float32(0.5), out=image)
    np.clip(image, 0, maximum, out=image)
    return np.asarray(image.astype(dtype))


def _grow(box: PasteBox, margin: int, shape: tuple[int, ...]) -> PasteBox:
    return PasteBox(max(0, box.left - margin), max(0, box.top - margin),
                    min(shape[1], box.right + margin), min(shape[0], box.bottom + margin))


def _convert(image: npt.NDArray[np.float32], code: int) -> npt.NDArray[np.float32]:
    """cv2.cvtColor on float32 [h, w, 3] (RGB ⇄ YCrCb), as a float32 array."""
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(image), code), dtype=np.float32)


def _place(values: npt.NDArray[np.float32], box: PasteBox, grown: PasteBox,
           fill: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``fill`` (grown-box sized) with ``values`` (box sized) written at the box's place."""
    placed = fill.copy()
    top, left = box.top - grown.top, box.left - grown.left
    placed[top: top + box.height, left: left + box.width] = values
    return placed


def _masked_blur(values: npt.NDArray[np.float32], weight: npt.NDArray[np.float32],
                 sigma: float) -> npt.NDArray[np.float32]:
    """Gaussian blur of ``values`` normalised by the blurred ``weight`` (normalised convolution):
    only weighted pixels contribute."""
    numerator = _blur(values * weight, sigma)
    denominator = _blur(weight, sigma)
    return np.asarray(numerator / np.maximum(denominator, np.float32(1e-6)), dtype=np.float32)


def _blur(values: npt.NDArray[np.float32], sigma: float) -> npt.NDArray[np.float32]:
    """A Gaussian blur; a wide one runs on a grid shrunk to :data:`DIRECT_BLUR_MAX_SIGMA`
    (a full-size kernel costs area × σ: 16 s for a 1000 px face here)."""
    values = np.ascontiguousarray(values)
    if sigma <= DIRECT_BLUR_MAX_SIGMA:
        return np.asarray(cv2.GaussianBlur(values, (0, 0), sigma, borderType=cv2.BORDER_REFLECT), dtype=np.float32)
    factor = sigma / DIRECT_BLUR_MAX_SIGMA
    height, width = values.shape[:2]
    small_size = (max(1, round(width / factor)), max(1, round(height / factor)))
    small = cv2.resize(values, small_size, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), DIRECT_BLUR_MAX_SIGMA, borderType=cv2.BORDER_REFLECT)
    return np.asarray(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR), dtype=np.float32)


def _fine_residual(luma: npt.NDArray[np.float32], sigma: float) -> npt.NDArray[np.float32]:
    return np.asarray(luma - _blur(luma, sigma), dtype=np.float32)


def _detail_level(values: npt.NDArray[np.float32]) -> float:
    """RMS of a residual's values (NaN for a band too small to measure)."""
    if values.size < MIN_BAND_PIXELS:
        return float("nan")
    return float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))


def _bands(mask: npt.NDArray[np.float32], width_px: float) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(just outside the face, just inside it), each ``width_px`` wide."""
    support = (mask > SUPPORT_THRESHOLD).astype(np.uint8)
    inside = (mask >= INSIDE_THRESHOLD).astype(np.uint8)
    distance_outside = cv2.distanceTransform(1 - support, cv2.DIST_L2, 3)
    distance_inside = cv2.distanceTransform(inside, cv2.DIST_L2, 3)
    outside_band = (support == 0) & (distance_outside <= width_px)
    inside_band = (inside == 1) & (distance_inside <= width_px)
    return outside_band, inside_band


def _face_side(mask: npt.NDArray[np.float32]) -> float:
    return math.sqrt(max(1.0, float(np.count_nonzero(mask > SUPPORT_THRESHOLD))))


def _residual_sigma(background_scale: float) -> float:
    return max(1.0, background_scale / 2)


def measure_texture(image: npt.NDArray[Any], mask: npt.NDArray[np.float32], background_scale: float = 1.0,
                    reference: npt.NDArray[Any] | None = None) -> TextureMeasure:
    """Fine detail just outside the face in ``reference`` (default ``image``) and just inside it
    in ``image``: both [h, w, ≥3] RGB of the same box, ``mask`` the face's soft mask there.
    NaN where a band is too small to measure."""
    side = _face_side(mask)
    outside_band, inside_band = _bands(mask, max(2.0, side * BAND_FRACTION))
    sigma = _residual_sigma(background_scale)
    luma = _convert(_unit_float(image[..., :3]), cv2.COLOR_RGB2YCrCb)[..., 0]
    reference_luma = luma if reference is None else _convert(_unit_float(reference[..., :3]),
                                                             cv2.COLOR_RGB2YCrCb)[..., 0]
    return TextureMeasure(outside=_detail_level(_fine_residual(reference_luma, sigma)[outside_band]),
                          inside=_detail_level(_fine_residual(luma, sigma)[inside_band]))


def match_paste_to_background(paste: FacePaste, background: npt.NDArray[Any], settings: FaceMatchSettings,
                              background_scale: float = 1.0) -> tuple[FacePaste, TextureMeasure | None]:
    """The paste matched to ``background`` (the upscaled photo, before any face is blended in)
    by ``settings``, and the texture measured (None when texture matching is off or the
    face is too small to measure). See the module notes.

    Raises:
        ValueError: the paste does not fit the background.
    """
    box = paste.box
    if box.is_empty or settings.changes_nothing:
        return paste, None
    if box.right > background.shape[1] or box.bottom > background.shape[0]:
        raise ValueError(f"paste box {box} lies outside the background {background.shape}")
    mask = paste.soft_mask
    if not (settings.colour or settings.texture):
        return FacePaste(box, paste.patch, (mask * np.float32(settings.strength)).astype(np.float32),
                         paste.face_index), None
    side = _face_side(mask)
    band_px = max(2.0, side * BAND_FRACTION)
    grown = _grow(box, math.ceil(band_px) + 1, background.shape)
    region = _unit_float(background[grown.slices][..., :3])
    grown_mask = _place(mask, box, grown, np.zeros(region.shape[:2], dtype=np.float32))
    face = _place(_unit_float(paste.patch[..., :3]), box, grown, region)
    support = (grown_mask > SUPPORT_THRESHOLD).astype(np.float32)
    face_ycc = _convert(face, cv2.COLOR_RGB2YCrCb)
    region_ycc = _convert(region, cv2.COLOR_RGB2YCrCb)
    if settings.colour:
        difference = region_ycc - face_ycc
        luma_sigma = max(MIN_CHROMA_SIGMA_PX, side * LUMA_SIGMA_FRACTION)
        chroma_sigma = max(MIN_CHROMA_SIGMA_PX, side * CHROMA_SIGMA_FRACTION)
        face_ycc[..., 0] += _masked_blur(np.ascontiguousarray(difference[..., 0]), support, luma_sigma)
        for channel in (1, 2):
            face_ycc[..., channel] += _masked_blur(np.ascontiguousarray(difference[..., channel]), support,
                                                   chroma_sigma)
    measure = None
    if settings.texture:
        residual_sigma = _residual_sigma(background_scale)
        _, inside_band = _bands(grown_mask, band_px)
        region_residual = _fine_residual(np.ascontiguousarray(region_ycc[..., 0]), residual_sigma)
        face_residual = _fine_residual(np.ascontiguousarray(face_ycc[..., 0]), residual_sigma)
        target = _detail_level(region_residual[inside_band])  # the background's own face, there
        inside = _detail_level(face_residual[inside_band])
        if math.isfinite(target) and math.isfinite(inside) and target > 0:
            added, kept = 0.0, 1.0
            if inside < target:
                # under 1 by construction: at most the background's whole residual
                added = math.sqrt(target**2 - inside**2) / target
                face_ycc[..., 0] += np.float32(added) * region_residual
            elif inside > target:
                kept = max(MIN_TEXTURE_GAIN, target / inside)
                face_ycc[..., 0] -= np.float32(1.0 - kept) * face_residual
            measure = TextureMeasure(target, inside, added, kept)
    matched = _convert(face_ycc, cv2.COLOR_YCrCb2RGB)
    patch = _from_unit_float(matched, background.dtype)
    return FacePaste(grown, patch, (grown_mask * np.float32(settings.strength)).astype(np.float32),
                     paste.face_index), measure
