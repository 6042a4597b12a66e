"""Decode stage: request body bytes → upright RGB (+ alpha) arrays.

Pure functions, safe to call from many threads at once (gevent's native threadpool): no
module-level mutable state, no Pillow global settings touched (``Image.MAX_IMAGE_PIXELS``
and ``ImageFile.LOAD_TRUNCATED_IMAGES`` keep their defaults), and the heavy work happens
inside Pillow, OpenCV and numpy calls that release the GIL.

Order of checks, cheapest first, so that hostile input costs almost nothing::

    empty body                     → InvalidImage
    more than max_body_bytes       → ImageTooLarge
    header not JPEG/PNG/WebP/GIF/BMP/TIFF, or corrupt → InvalidImage
    header dimensions zero         → InvalidImage
    header dimensions over max_input_pixels (or Pillow's decompression-bomb cap)
                                   → ImageTooLarge      (nothing decoded yet)
    pixel data truncated/corrupt   → InvalidImage       (LOAD_TRUNCATED_IMAGES stays off)

Decisions worth knowing:

- **Orientation.** The EXIF orientation tag (all 8 values, ``ImageOps.exif_transpose``
  semantics) is applied, so arrays are upright; ``DecodedImage.exif_orientation_applied``
  says which value was undone.
- **EXIF and XMP** are read into ``DecodedImage.metadata`` by
  :func:`chaoqing.gateway.stages.metadata.read_metadata` (bounded by
  ``limits.max_metadata_bytes``; a block that is too large or does not parse is left out with
  a note, never an error); the pipeline makes them true of the output (orientation 1, its
  size) and the encode stage writes them.
- **Alpha.** RGBA, LA, PA, P/L/RGB with a ``tRNS`` transparency, and 16-bit alpha are kept
  as ``alpha``; an opaque alpha channel is kept as it is, not dropped.
- **Grayscale, 1-bit, palette, YCbCr** become RGB.
- **CMYK** (including Adobe's inverted JPEG CMYK, which Pillow undoes) is converted to sRGB
  through its embedded ICC profile with LittleCMS when there is one, otherwise with Pillow's
  plain formula; the result carries no ICC profile (sRGB is implied).
- **16 bits.** Pillow reads 16-bit grayscale PNG as ``I;16`` but truncates 16-bit-per-channel
  RGB / RGBA / gray+alpha PNG and 16-bit RGB TIFF to 8 bits. Those are decoded with
  ``cv2.imdecode(IMREAD_UNCHANGED)`` instead (after Pillow has checked the header), so
  16-bit input stays ``uint16`` and can be written back as a 16-bit PNG. Pillow's ``I``
  (32-bit integer) mode is clipped to 0–65535; ``F`` (float) is clipped to 0–255 and
  rounded to 8 bits.
- **ICC profiles** of RGB images are carried (``icc_profile``); a gray profile is dropped,
  because the output is RGB and a gray profile cannot describe it.
- **Animations** (GIF, APNG, animated WebP) and multi-image files (MPO, multi-page TIFF):
  the first frame.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, cast

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageCms, UnidentifiedImageError

from chaoqing.config import Limits
from chaoqing.errors import ImageTooLarge, InvalidImage, InvalidParameter, UnsupportedMediaType
from chaoqing.gateway.stages.metadata import NO_METADATA, PhotoMetadata, read_metadata

__all__ = [
    "ACCEPTED_MEDIA_TYPES",
    "PILLOW_FORMATS",
    "DecodedImage",
    "ImageInfo",
    "PixelArray",
    "check_media_type",
    "check_output_size",
    "decode_image",
    "normalise_media_type",
    "probe_image",
    "row_blocks",
    "sniff_media_type",
    "to_8_bit",
]

PixelArray = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]  # what the stages pass around

# Pillow plugins we let parse a body; every other plugin (EPS runs Ghostscript, and many
# rarely used parsers) is never tried. The JPEG plugin also opens MPO (how Pillow names
# most camera and phone JPEGs, which carry a second, preview image).
PILLOW_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

ACCEPTED_MEDIA_TYPES: Final = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff"}
)

# Spellings seen in the wild for the types above (browsers, old Windows, curl guesses).
MEDIA_TYPE_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "image/jpg": "image/jpeg",
        "image/pjpeg": "image/jpeg",
        "image/x-png": "image/png",
        "image/x-ms-bmp": "image/bmp",
        "image/x-bmp": "image/bmp",
        "image/tif": "image/tiff",
        "image/x-tiff": "image/tiff",
    }
)

# Declared types that say nothing about the content; the bytes decide.
GENERIC_MEDIA_TYPES: Final = frozenset({"application/octet-stream", "binary/octet-stream"})

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"  # PNG spec §5.2

# Magic numbers: JPEG (ITU T.81 SOI + marker), PNG, GIF87a/89a, BMP "BM",
# TIFF little/big endian (TIFF 6.0 §2) and BigTIFF (version 43); WebP is RIFF....WEBP.
_MAGIC_PREFIXES: Final = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (PNG_SIGNATURE, "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"II+\x00", "image/tiff"),
    (b"MM\x00+", "image/tiff"),
    (b"BM", "image/bmp"),
)

EXIF_ORIENTATION_TAG: Final = 0x0112  # EXIF 2.32 §4.6.4, "Orientation"
UPRIGHT: Final = 1
# Orientations 5–8 store the image transposed: width and height swap when it is applied.
TRANSPOSING_ORIENTATIONS: Final = frozenset({5, 6, 7, 8})

PNG_IHDR_BIT_DEPTH_OFFSET: Final = 24  # signature 8 + length 4 + "IHDR" 4 + width 4 + height 4
PNG_IHDR_COLOUR_TYPE_OFFSET: Final = 25
PNG_COLOUR_TYPES_PILLOW_TRUNCATES: Final = frozenset({2, 4, 6})  # RGB, gray+alpha, RGBA
PNG_CHUNK_OVERHEAD: Final = 12  # PNG spec §5.3: length 4 + type 4 + CRC 4 around the data
PNG_CHUNK_LENGTH: Final = struct.Struct(">I")
TIFF_BITS_PER_SAMPLE_TAG: Final = 258  # TIFF 6.0
TIFF_PHOTOMETRIC_TAG: Final = 262
TIFF_PHOTOMETRIC_RGB: Final = 2
SIXTEEN_BIT_MAX: Final = 65535
EIGHT_BIT_MAX: Final = 255
ROW_BLOCK_ELEMENTS: Final = 1 << 20  # scratch per block in to_8_bit & co: 4 MB of uint32
ICC_HEADER_SIZE: Final = 128  # ICC.1:2022 §7.2
ICC_COLOUR_SPACE_SLICE: Final = slice(16, 20)

# Pillow imports its format plugins on first use (Image.open, Image.save). In a monkey-patched
# process importlib's module locks are gevent locks, and threadpool workers importing at the
# same time deadlock: four concurrent first requests to a fresh gateway hung until killed.
# Import every plugin now, on the thread importing this module, so no worker ever imports.
Image.init()


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded.

    ``width`` and ``height`` are as displayed, i.e. after the EXIF orientation (swapped for
    orientations 5–8). ``frames`` is 1 for still images.
    """

    format: str
    width: int
    height: int
    mode: str
    frames: int
    orientation: int

    @property
    def pixels(self) -> int:
        """Width × height."""
        return self.width * self.height


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An upright image ready for the pipeline.

    rgb: ``uint8`` or ``uint16`` array, shape [H, W, 3], RGB order, C-contiguous, writeable,
        owned by this object (no other reference to its memory exists).
    alpha: None, or an array [H, W] of the same dtype (0 = transparent).
    bit_depth: 8 or 16, matching the dtype.
    source_format: Pillow's name for the container: "JPEG", "MPO", "PNG", "WEBP", "GIF",
        "BMP" or "TIFF".
    source_mode: the pixel layout before conversion (Pillow's mode, e.g. "P", "CMYK",
        "I;16"; "RGB;16", "RGBA;16", "LA;16" for the 16-bit files read with OpenCV).
    icc_profile: the embedded RGB ICC profile to carry to the output, or None.
    exif_orientation_applied: the EXIF orientation (1–8) that was undone; 1 = none.
    metadata: the upload's EXIF and XMP (still with its orientation), and notes on what was
        left out.
    """

    rgb: PixelArray
    alpha: PixelArray | None
    bit_depth: int
    source_format: str
    source_mode: str
    icc_profile: bytes | None
    exif_orientation_applied: int
    metadata: PhotoMetadata = NO_METADATA

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None


# ---------------------------------------------------------------------------- media types


def sniff_media_type(data: bytes) -> str | None:
    """The media type the first bytes announce (one of ACCEPTED_MEDIA_TYPES), or None."""
    head = bytes(data[:16])
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for prefix, media_type in _MAGIC_PREFIXES:
        if head.startswith(prefix):
            return media_type
    return None


def normalise_media_type(declared: str) -> str:
    """``"Image/JPG; q=1"`` → ``"image/jpeg"``: lower case, no parameters, aliases resolved."""
    bare = declared.split(";", 1)[0].strip().lower()
    return MEDIA_TYPE_ALIASES.get(bare, bare)


def check_media_type(declared: str | None, data: bytes) -> str:
    """Check a declared Content-Type against the body; return the body's real media type.

    A declared type outside ACCEPTED_MEDIA_TYPES (generic octet-stream and no type at all
    are fine) raises UnsupportedMediaType. Bytes that are none of the accepted formats raise
    InvalidImage. A declared accepted type that differs from the bytes (a PNG sent as
    image/jpeg, a common renaming accident) is not an error: the bytes decide.
    """
    if declared is not None and declared.strip():
        media_type = normalise_media_type(declared)
        if media_type not in ACCEPTED_MEDIA_TYPES and media_type not in GENERIC_MEDIA_TYPES:
            accepted = ", ".join(sorted(ACCEPTED_MEDIA_TYPES))
            raise UnsupportedMediaType(
                f"{media_type[:60]!r} is not accepted; send one of {accepted}"
            )
    sniffed = sniff_media_type(data)
    if sniffed is None:
        raise InvalidImage("the body is not a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    return sniffed


# ---------------------------------------------------------------------------- limits


def check_output_size(width: int, height: int, scale: float, limits: Limits) -> None:
    """Refuse work whose output would exceed ``limits.max_output_pixels``.

    Raises InvalidParameter when ``scale`` is not positive, ImageTooLarge when
    ``width * height * scale²`` is over the limit.
    """
    if not scale > 0:
        raise InvalidParameter(f"scale must be positive, not {scale}")
    output_pixels = width * height * scale * scale
    if output_pixels > limits.max_output_pixels:
        raise ImageTooLarge(
            f"the output would be {round(width * scale)}×{round(height * scale)} pixels; "
            f"at most {limits.max_output_pixels} pixels are produced"
        )


def _check_body_size(data: bytes, limits: Limits) -> None:
    if len(data) == 0:
        raise InvalidImage("the request body is empty")
    if len(data) > limits.max_body_bytes:
        raise ImageTooLarge(
            f"the body is {len(data)} bytes; at most {limits.max_body_bytes} are accepted"
        )


def _check_dimensions(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}×{height})")
    if width * height > limits.max_input_pixels:
        raise ImageTooLarge(
            f"the image is {width}×{height} pixels; "
            f"at most {limits.max_input_pixels} pixels are accepted"
        )


# ---------------------------------------------------------------------------- opening


def _open_image(data: bytes, limits: Limits) -> Image.Image:
    """Parse the header only (Pillow is lazy) and apply every check that needs no pixels."""
    _check_body_size(data, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own cap (2 × MAX_IMAGE_PIXELS, or 1 × when warnings are errors).
        raise ImageTooLarge("the image's dimensions are too large to decode") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage("the body is not a JPEG, PNG, WebP, GIF, BMP or TIFF image") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow parsers raise many types (SyntaxError, struct.error, ...)
        raise InvalidImage("the image header is corrupt") from exc
    width, height = image.size
    _check_dimensions(width, height, limits)
    return image


def _read_orientation(image: Image.Image, *, pixels_loaded: bool) -> int:
    """The EXIF orientation (1–8) Pillow's exif_transpose would use; 1 when absent or broken.

    Never decodes pixels itself: before loading, a PNG whose eXIf chunk comes after its
    pixel data (Pillow's PNG getexif() would load the image to find it) counts as upright.
    """
    if image.format == "PNG" and "exif" not in image.info and not pixels_loaded:
        return UPRIGHT
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, UPRIGHT)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the user the image
        # Pillow's EXIF parser has no documented error set: on hostile bytes it raises
        # SyntaxError, struct.error, ValueError, OSError, its warnings under -W error, ...
        return UPRIGHT
    return value if isinstance(value, int) and 1 <= value <= 8 else UPRIGHT


def probe_image(data: bytes, limits: Limits) -> ImageInfo:
    """Read the header and check the limits, without decoding any pixels.

    Raises InvalidImage (empty, unrecognised or corrupt header, zero dimensions) and
    ImageTooLarge (over ``max_body_bytes`` or ``max_input_pixels``). A PNG header claiming
    60000×60000 is refused here having allocated nothing.
    """
    image = _open_image(data, limits)
    with image:
        orientation = _read_orientation(image, pixels_loaded=False)
        try:
            frames = int(getattr(image, "n_frames", 1))
        except MemoryError:
            raise
        except Exception as exc:  # GIF counts frames by walking the file
            raise InvalidImage("the image's frames are corrupt") from exc
        width, height = image.size
        if orientation in TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        return ImageInfo(image.format or "", width, height, image.mode, frames, orientation)


# ---------------------------------------------------------------------------- decoding


def decode_image(data: bytes, limits: Limits) -> DecodedImage:
    """Decode ``data`` into an upright RGB array (+ alpha), first frame of animations.

    Raises InvalidImage (empty, not an accepted format, corrupt, truncated, zero-sized) and
    ImageTooLarge (bytes or pixels over ``limits``, checked before pixels are decoded).
    See the module docstring for how modes, 16 bits, CMYK, ICC and EXIF are handled.
    """
    image = _open_image(data, limits)
    with image:
        source_format = image.format or ""
        if _needs_sixteen_bit_decoder(image, data):
            try:
                return _decode_sixteen_bit_colour(image, data, source_format, limits)
            except InvalidImage:
                if source_format != "TIFF":
                    raise
                # OpenCV reads fewer TIFF layouts than Pillow: settle for Pillow's 8 bits.
        try:
            image.load()
            orientation = _read_orientation(image, pixels_loaded=True)
            rgb, alpha, icc_profile = _pixels_from_pillow(image)
            metadata = read_metadata(image, limits.max_metadata_bytes)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge("the image's dimensions are too large to decode") from exc
        except MemoryError:
            raise
        except Exception as exc:  # OSError "image file is truncated", ValueError for odd modes, ...
            raise InvalidImage(
                f"the {source_format} image is truncated, corrupt or in an unsupported pixel format"
            ) from exc
        return _finish(rgb, alpha, orientation, source_format, image.mode, icc_profile, metadata)


def _finish(
    rgb: PixelArray,
    alpha: PixelArray | None,
    orientation: int,
    source_format: str,
    source_mode: str,
    icc_profile: bytes | None,
    metadata: PhotoMetadata,
) -> DecodedImage:
    upright_rgb = _owned_contiguous(_orient(rgb, orientation))
    upright_alpha = None if alpha is None else _owned_contiguous(_orient(alpha, orientation))
    return DecodedImage(
        rgb=upright_rgb,
        alpha=upright_alpha,
        bit_depth=16 if upright_rgb.dtype == np.uint16 else 8,
        source_format=source_format,
        source_mode=source_mode,
        icc_profile=icc_profile,
        exif_orientation_applied=orientation,
        metadata=metadata,
    )


def _orient(array: PixelArray, orientation: int) -> PixelArray:
    """Undo EXIF ``orientation`` as views (no copy); same table as ImageOps.exif_transpose."""
    if orientation == 2:  # mirrored horizontally → FLIP_LEFT_RIGHT
        return array[:, ::-1]
    if orientation == 3:  # rotated 180° → ROTATE_180
        return array[::-1, ::-1]
    if orientation == 4:  # mirrored vertically → FLIP_TOP_BOTTOM
        return array[::-1]
    if orientation == 5:  # mirrored along the main diagonal → TRANSPOSE
        return array.swapaxes(0, 1)
    if orientation == 6:  # needs 90° clockwise → ROTATE_270
        return array.swapaxes(0, 1)[:, ::-1]
    if orientation == 7:  # mirrored along the anti-diagonal → TRANSVERSE
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:  # needs 90° counter-clockwise → ROTATE_90
        return array.swapaxes(0, 1)[::-1]
    return array


def _owned_contiguous(array: PixelArray) -> PixelArray:
    """A C-contiguous, writeable array that owns its memory (a copy unless it already is)."""
    flags = array.flags
    if flags.c_contiguous and flags.writeable and flags.owndata:
        return array
    return array.copy(order="C")


def _eight_bit_array(image: Image.Image) -> npt.NDArray[np.uint8]:
    """The pixels of an RGB or RGBA Pillow image (read-only; copied later by _finish)."""
    return cast(npt.NDArray[np.uint8], np.asarray(image))


def _pixels_from_pillow(image: Image.Image) -> tuple[PixelArray, PixelArray | None, bytes | None]:
    """Pillow image (loaded) → (rgb, alpha, icc_profile to carry)."""
    mode = image.mode
    icc_profile = _rgb_icc_profile(image.info.get("icc_profile"))
    transparency = image.info.get("transparency")

    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray: npt.NDArray[np.integer[Any]] = np.asarray(image)
        if mode == "I":  # 32-bit integers; 16-bit PNG in older Pillow versions
            gray = np.clip(gray, 0, SIXTEEN_BIT_MAX)
        gray16 = gray.astype(np.uint16)
        alpha16 = None
        if isinstance(transparency, int):
            alpha16 = np.where(gray16 == transparency, 0, SIXTEEN_BIT_MAX).astype(np.uint16)
        return _gray_to_rgb(gray16), alpha16, None
    if mode == "F":
        finite = np.nan_to_num(np.asarray(image, dtype=np.float32))
        gray8 = np.rint(np.clip(finite, 0, EIGHT_BIT_MAX)).astype(np.uint8)
        return _gray_to_rgb(gray8), None, None
    if mode == "CMYK":
        return _eight_bit_array(_cmyk_to_srgb(image)), None, None

    has_alpha = mode in ("RGBA", "LA", "La", "PA", "RGBa") or transparency is not None
    if mode in ("L", "1", "LA", "La"):
        # A gray profile cannot describe RGB output (and an RGB profile on gray is malformed).
        icc_profile = None
    if has_alpha:
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        rgba_array = _eight_bit_array(rgba)
        return rgba_array[..., :3], rgba_array[..., 3], icc_profile
    rgb_image = image if mode == "RGB" else image.convert("RGB")
    return _eight_bit_array(rgb_image), None, icc_profile


def _gray_to_rgb(gray: PixelArray) -> PixelArray:
    rgb = np.empty((*gray.shape, 3), dtype=gray.dtype)
    rgb[...] = gray[..., np.newaxis]
    return rgb


def _rgb_icc_profile(profile: object) -> bytes | None:
    """The profile when it is a plausible RGB ICC profile, else None."""
    if not isinstance(profile, bytes) or len(profile) < ICC_HEADER_SIZE:
        return None
    return profile if profile[ICC_COLOUR_SPACE_SLICE] == b"RGB " else None


def _cmyk_to_srgb(image: Image.Image) -> Image.Image:
    """CMYK → sRGB with the embedded profile (LittleCMS), else Pillow's plain formula."""
    profile = image.info.get("icc_profile")
    if isinstance(profile, bytes) and profile[ICC_COLOUR_SPACE_SLICE] == b"CMYK":
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            target = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            converted = ImageCms.profileToProfile(image, source, target, outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a broken profile: fall back to the plain conversion below
    return image.convert("RGB")


# ---------------------------------------------------------------------------- 16 bits


def _needs_sixteen_bit_decoder(image: Image.Image, data: bytes) -> bool:
    """True for 16-bit colour files that Pillow would truncate to 8 bits."""
    if image.format == "PNG":
        return (
            data.startswith(PNG_SIGNATURE)
            and len(data) > PNG_IHDR_COLOUR_TYPE_OFFSET
            and data[PNG_IHDR_BIT_DEPTH_OFFSET] == 16
            and data[PNG_IHDR_COLOUR_TYPE_OFFSET] in PNG_COLOUR_TYPES_PILLOW_TRUNCATES
        )
    if image.format == "TIFF":
        tags = getattr(image, "tag_v2", {})
        bits = tags.get(TIFF_BITS_PER_SAMPLE_TAG)
        bits_tuple = bits if isinstance(bits, tuple) else (bits,)
        return (
            tags.get(TIFF_PHOTOMETRIC_TAG) == TIFF_PHOTOMETRIC_RGB
            and len(bits_tuple) >= 3
            and all(value == 16 for value in bits_tuple)
        )
    return False


def _decode_sixteen_bit_colour(image: Image.Image, data: bytes, source_format: str, limits: Limits) -> DecodedImage:
    """Decode a 16-bit RGB(A)/gray+alpha PNG or RGB TIFF with OpenCV, keeping 16 bits.

    The header (size, limits, ICC, orientation) was read by Pillow; OpenCV only decodes.
    OpenCV returns BGR(A) and ignores EXIF orientation with IMREAD_UNCHANGED, so both are
    handled here.
    """
    if source_format == "PNG":
        _check_png_chunk_lengths(data, source_format)
    try:
        opencv_pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise InvalidImage(f"the {source_format} image is truncated or corrupt") from exc
    width, height = image.size
    if (
        opencv_pixels is None
        or opencv_pixels.shape[:2] != (height, width)
        or opencv_pixels.dtype not in (np.uint8, np.uint16)
    ):
        raise InvalidImage(f"the {source_format} image is truncated or corrupt")
    decoded = cast(PixelArray, opencv_pixels)
    channels = 1 if decoded.ndim == 2 else int(decoded.shape[2])
    alpha: PixelArray | None = None
    if channels == 1:
        rgb: PixelArray = _gray_to_rgb(decoded)
        source_mode = "I;16"
    elif channels == 3:
        rgb = decoded[..., ::-1]
        source_mode = "RGB;16"
    elif channels == 4:
        rgb = decoded[..., 2::-1]
        alpha = decoded[..., 3]
        gray_alpha = source_format == "PNG" and data[PNG_IHDR_COLOUR_TYPE_OFFSET] == 4
        source_mode = "LA;16" if gray_alpha else "RGBA;16"
    else:
        raise InvalidImage(f"the {source_format} image has {channels} channels")
    orientation = _read_orientation(image, pixels_loaded=False)
    icc_profile = _rgb_icc_profile(image.info.get("icc_profile"))
    if source_mode == "LA;16":
        icc_profile = None
    # Pillow has read the chunks before the pixels (a PNG's eXIf after IDAT is not seen)
    metadata = read_metadata(image, limits.max_metadata_bytes)
    return _finish(rgb, alpha, orientation, source_format, source_mode, icc_profile, metadata)


def _check_png_chunk_lengths(data: bytes, source_format: str) -> None:
    """Refuse a PNG whose chunks claim more bytes than the body holds.

    OpenCV 5's PNG reader allocates each chunk's declared length before reading it: a
    100-byte file whose IDAT claims 2 GB made it allocate 2–3 GB (found by fuzzing). This
    walk is cheap (one step per chunk) and bounds every allocation by the body size.
    """
    position = len(PNG_SIGNATURE)
    while position + PNG_CHUNK_OVERHEAD <= len(data):
        (chunk_length,) = PNG_CHUNK_LENGTH.unpack_from(data, position)
        chunk_type = data[position + 4 : position + 8]
        position += PNG_CHUNK_OVERHEAD + chunk_length
        if position > len(data):
            break
        if chunk_type == b"IEND":
            return
    raise InvalidImage(f"the {source_format} image is truncated or corrupt")


def to_8_bit(array: PixelArray) -> npt.NDArray[np.uint8]:
    """uint16 → uint8 with rounding (round(v / 257)); uint8 is returned as it is, not copied.

    Works through row blocks so that its scratch memory stays at a few megabytes whatever
    the image size (a 64-megapixel RGB image widened at once would need 768 MB).
    """
    if array.dtype == np.uint8:
        return cast(npt.NDArray[np.uint8], array)
    result = np.empty(array.shape, dtype=np.uint8)
    for rows in row_blocks(array.shape):
        # (v + 128) // 257 == round(v / 257) for 0..65535, in integers.
        widened = array[rows].astype(np.uint32)
        widened += 128
        widened //= 257
        result[rows] = widened
    return result


def row_blocks(shape: tuple[int, ...]) -> list[slice]:
    """Slices over the first axis holding about ROW_BLOCK_ELEMENTS elements each."""
    elements_per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    rows_per_block = max(1, ROW_BLOCK_ELEMENTS // elements_per_row)
    return [slice(start, start + rows_per_block) for start in range(0, shape[0], rows_per_block)]
