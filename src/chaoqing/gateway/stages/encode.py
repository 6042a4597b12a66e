"""Encode stage: RGB (+ alpha) arrays → PNG, JPEG or WebP bytes.

Pure functions, safe from many threads at once (gevent's native threadpool); the work runs
inside Pillow, OpenCV and numpy calls that release the GIL. Input arrays are never modified.

Decisions (sizes and times measured on a 2048×1536 upscaled photo, 2 CPU cores; "noisy" is
the same photo with σ=4 noise):

- **Default format** (:func:`choose_output_format`): JPEG (and MPO, how Pillow names camera
  JPEGs) input → jpeg; WebP → webp (a lossy WebP turned into a PNG would grow ~10×); anything
  16-bit or with alpha that is not WebP → png; everything else (PNG, GIF, BMP, TIFF) → png.
- **16 bits** are kept only by PNG, written with OpenCV (Pillow cannot write 16-bit RGB).
  Asking for jpeg or webp with 16-bit pixels is allowed: they are rounded to 8 bits.
  ``bit_depth=16`` with 8-bit pixels writes a 16-bit PNG (v × 257), so a 16-bit input whose
  upscale came back in 8 bits still leaves as the 16-bit PNG the user sent.
- **Alpha + jpeg**: JPEG has no alpha; when a caller explicitly asks for jpeg the image is
  composited onto white (what browsers and viewers show for transparent areas on a page).
  png and webp keep alpha.
- **JPEG**: quality 92 by default; chroma 4:4:4 at quality ≥ 90 (faces and red edges keep
  their colour detail), 4:2:0 below. Baseline, not optimized, not progressive: measured
  0.028 s / 597 kB baseline, 0.056 s / 590 kB optimize (−1 %), 0.130 s / 580 kB progressive
  (−3 %); both options make libjpeg buffer every DCT coefficient of the image (6 bytes per
  pixel at 4:4:4: measured on a 36-megapixel output, baseline peaks 4 MB above the pixels,
  optimize or progressive 210 MB, for 3–5 % smaller files), which a gateway bounded in
  memory should not pay.
- **WebP**: quality 90 by default, libwebp's default method 4 (method 2 is 1.6× faster but
  0.1–0.5 dB worse at the same size); quality 100 means lossless (effort 25: 1.2 s / 2.0 MB,
  against 0.3 s / 2.6 MB at effort 0 and 1.7 s / 2.0 MB at 50). WebP cannot exceed 16383
  pixels on a side and JPEG 65500; :func:`check_encodable` says so before the work is done.
- **PNG compress level 2** (``[encode] png_compress_level``), measured with ``chaoqing bench
  encode`` on three ×4 upscales by the compact model (15.6 MP in all; docs/benchmarks.md),
  Pillow 13 (which links zlib-ng 2.3): level 2 takes 0.14 s per output MP and writes 114 % of
  level 6's bytes; level 1 is as fast within noise (4–16 % less time) and 3 % larger; level 4,
  the old default, writes 99 % of level 6's bytes in 0.22–0.26 s per MP (1.6–1.9× level 2's
  time); level 6, zlib's default, 0.63–0.94 s per MP; 9 and ``optimize`` 2–3.5× that for 2–3 %
  fewer bytes; level 0 (stored) 286 %. Level 2 is zlib-ng's fastest strategy with dynamic
  Huffman trees (level 1 uses fixed ones). Against level 4 it saves ~0.1 s per output MP
  and costs ~0.15 MB per MP: it wins whenever the client's link is faster than ~12 Mbit/s.
  16-bit PNG takes the same level through OpenCV (libpng, zlib 1.2): on the same images (8-bit)
  its level 2 took 0.13–0.14 s per MP at 113 %, level 4 0.14–0.19 s at 108 %. fpng (PyPI ``fpng``) is 10–16× faster at 124 %,
  but it writes 8-bit only, is an alpha release, and is not a dependency.
- **ICC profiles** are written when given (PNG iCCP, JPEG APP2, WebP ICCP), 16-bit PNG too
  (the iCCP chunk is added to OpenCV's output).
- **EXIF and XMP** are written when given, as prepared by
  :func:`chaoqing.gateway.stages.metadata.output_metadata`: JPEG APP1 segments, PNG eXIf and
  iTXt ``XML:com.adobe.xmp`` chunks before the pixels (added to OpenCV's 16-bit output too),
  WebP EXIF and XMP chunks.
- **Stripping a profile** (``convert_to_srgb_from``): an image whose metadata is stripped loses
  its ICC profile, and a viewer then takes its pixels as sRGB. So that it still looks the
  same, 8-bit pixels are first converted from that profile to sRGB (LittleCMS, relative
  colorimetric). 16-bit pixels keep their values (Pillow's LittleCMS bindings have no 16-bit
  RGB mode), and so does a profile LittleCMS cannot open.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import IO, Final

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

from chaoqing.errors import InvalidParameter
from chaoqing.gateway.stages.decode import DecodedImage, PixelArray, row_blocks, to_8_bit

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "DEFAULT_WEBP_QUALITY",
    "FILE_EXTENSIONS",
    "MEDIA_TYPES",
    "OUTPUT_FORMATS",
    "PNG_COMPRESS_LEVEL",
    "check_encodable",
    "choose_output_format",
    "encode_image",
    "encode_image_to",
    "normalise_output_format",
]

OUTPUT_FORMATS: Final = ("png", "jpeg", "webp")
MEDIA_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
)
FILE_EXTENSIONS: Final[Mapping[str, str]] = MappingProxyType(
    {"png": "png", "jpeg": "jpg", "webp": "webp"}
)
_FORMAT_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "png": "png",
        "image/png": "png",
        "jpeg": "jpeg",
        "jpg": "jpeg",
        "image/jpeg": "jpeg",
        "image/jpg": "jpeg",
        "webp": "webp",
        "image/webp": "webp",
    }
)
_AUTOMATIC: Final = frozenset({"", "auto"})

DEFAULT_JPEG_QUALITY: Final = 92
DEFAULT_WEBP_QUALITY: Final = 90
MIN_QUALITY: Final = 1
MAX_QUALITY: Final = 100
JPEG_FULL_CHROMA_MIN_QUALITY: Final = 90
JPEG_SUBSAMPLING_444: Final = 0  # Pillow's JpegImagePlugin codes: 0 = 4:4:4, 2 = 4:2:0
JPEG_SUBSAMPLING_420: Final = 2
JPEG_MAX_DIMENSION: Final = 65500  # libjpeg jmorecfg.h JPEG_MAX_DIMENSION
WEBP_MAX_DIMENSION: Final = 16383  # libwebp encode.h WEBP_MAX_DIMENSION
WEBP_METHOD: Final = 4  # libwebp's default speed/size trade-off (0 fast … 6 slow)
WEBP_LOSSLESS_EFFORT: Final = 25  # Pillow passes `quality` as the lossless effort (0–100)
WEBP_LOSSLESS_QUALITY: Final = 100  # the quality that asks for lossless WebP
PNG_COMPRESS_LEVEL: Final = 2  # measured: see the module docstring (EncodeSettings' default)
PNG_MIN_COMPRESS_LEVEL: Final = 0  # zlib: 0 = stored … 9 = smallest
PNG_MAX_COMPRESS_LEVEL: Final = 9
WHITE_8_BIT: Final = 255
SIXTEEN_BIT_PER_EIGHT_BIT: Final = 257  # 255 × 257 = 65535
PNG_IHDR_END: Final = 33  # signature 8 + length 4 + "IHDR" 4 + data 13 + CRC 4
PNG_ICC_PROFILE_NAME: Final = b"ICC Profile"  # the name Pillow writes
PNG_XMP_KEYWORD: Final = "XML:com.adobe.xmp"  # XMP part 3 §1.1.5: an uncompressed iTXt chunk
EXIF_HEADER: Final = b"Exif\x00\x00"  # PNG's eXIf chunk holds the TIFF block without it


def normalise_output_format(requested: str | None) -> str | None:
    """``"JPG"`` → ``"jpeg"``; None, ``""`` or ``"auto"`` → None (let the image decide).

    Raises InvalidParameter for anything that is not png, jpeg/jpg or webp (or their media types).
    """
    if requested is None:
        return None
    key = requested.strip().lower()
    if key in _AUTOMATIC:
        return None
    fmt = _FORMAT_ALIASES.get(key)
    if fmt is None:
        raise InvalidParameter(f"format must be one of png, jpeg, webp, not {requested[:40]!r}")
    return fmt


def choose_output_format(requested: str | None, decoded: DecodedImage) -> str:
    """The output format for ``decoded``: the one requested, or a default that loses nothing.

    Defaults: JPEG/MPO input → jpeg; WebP → webp; anything else, and every 16-bit image,
    → png. An explicit request always wins: 16-bit pixels asked as jpeg/webp are rounded to
    8 bits, and alpha asked as jpeg is composited onto white (see :func:`encode_image`).
    Raises InvalidParameter for an unknown format.
    """
    fmt = normalise_output_format(requested)
    if fmt is not None:
        return fmt
    if decoded.bit_depth == 16:
        return "png"
    if decoded.source_format == "WEBP":
        return "webp"
    if decoded.source_format in ("JPEG", "MPO") and decoded.alpha is None:
        return "jpeg"
    return "png"


def check_encodable(fmt: str, width: int, height: int) -> None:
    """Raise InvalidParameter when ``fmt`` cannot hold a ``width``×``height`` image.

    Cheap: call it before upscaling, with the output size, to fail before the work.
    """
    fmt_name = normalise_output_format(fmt) or "png"
    limit = {"jpeg": JPEG_MAX_DIMENSION, "webp": WEBP_MAX_DIMENSION}.get(fmt_name)
    if limit is not None and max(width, height) > limit:
        raise InvalidParameter(
            f"{fmt_name} images are at most {limit} pixels on a side and the output is "
            f"{width}×{height}; ask for png"
        )


def _check_quality(quality: int | None) -> None:
    if quality is None:
        return
    if isinstance(quality, bool) or not isinstance(quality, int):
        raise InvalidParameter(
            f"quality must be a whole number from {MIN_QUALITY} to {MAX_QUALITY}"
        )
    if not MIN_QUALITY <= quality <= MAX_QUALITY:
        raise InvalidParameter(
            f"quality must be from {MIN_QUALITY} to {MAX_QUALITY}, not {quality}"
        )


def _check_arrays(rgb: PixelArray, alpha: PixelArray | None) -> None:
    """Caller bugs, not client faults: ValueError."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"rgb must be uint8 or uint16 [H, W, 3], not {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError("rgb has no pixels")
    if alpha is not None and (
        alpha.shape != rgb.shape[:2] or alpha.dtype not in (np.uint8, np.uint16)
    ):
        raise ValueError(
            f"alpha must be uint8 or uint16 {rgb.shape[:2]}, not {alpha.dtype} {alpha.shape}"
        )


def encode_image(
    rgb: PixelArray,
    alpha: PixelArray | None,
    fmt: str,
    quality: int | None = None,
    icc_profile: bytes | None = None,
    bit_depth: int | None = None,
    *,
    png_compress_level: int = PNG_COMPRESS_LEVEL,
    exif: bytes | None = None,
    xmp: bytes | None = None,
    convert_to_srgb_from: bytes | None = None,
) -> bytes:
    """Encode ``rgb`` [H, W, 3] (+ ``alpha`` [H, W]) as ``fmt`` ("png", "jpeg", "webp").

    ``quality`` (1–100) applies to jpeg (default 92) and webp (default 90; 100 = lossless)
    and is ignored by png. ``bit_depth`` is the output depth for png (None: that of ``rgb``);
    jpeg and webp are always 8-bit. ``icc_profile``, ``exif`` (``b"Exif\0\0"`` + TIFF block)
    and ``xmp`` are embedded when given. ``convert_to_srgb_from``: the profile the pixels are
    in, to convert 8-bit output to sRGB before it is written without one. rgb and alpha may
    have different dtypes; each is converted to the output depth.

    Raises InvalidParameter (unknown format, quality out of range, bit depth not 8/16,
    image too large for the format) and ValueError (arrays of the wrong shape or dtype).
    """
    buffer = io.BytesIO()
    encode_image_to(
        buffer,
        rgb,
        alpha,
        fmt,
        quality,
        icc_profile,
        bit_depth,
        png_compress_level=png_compress_level,
        exif=exif,
        xmp=xmp,
        convert_to_srgb_from=convert_to_srgb_from,
    )
    return buffer.getvalue()


def encode_image_to(
    stream: IO[bytes],
    rgb: PixelArray,
    alpha: PixelArray | None,
    fmt: str,
    quality: int | None = None,
    icc_profile: bytes | None = None,
    bit_depth: int | None = None,
    *,
    png_compress_level: int = PNG_COMPRESS_LEVEL,
    exif: bytes | None = None,
    xmp: bytes | None = None,
    convert_to_srgb_from: bytes | None = None,
) -> None:
    """Like :func:`encode_image`, writing to ``stream`` (a file, io.BytesIO, a socket's
    makefile("wb")) as the encoder produces bytes; raises the same errors."""
    fmt_name = normalise_output_format(fmt)
    if fmt_name is None:
        raise InvalidParameter("an output format must be chosen before encoding")
    _check_quality(quality)
    if bit_depth not in (None, 8, 16):
        raise InvalidParameter(f"bit depth must be 8 or 16, not {bit_depth}")
    if not PNG_MIN_COMPRESS_LEVEL <= png_compress_level <= PNG_MAX_COMPRESS_LEVEL:
        raise ValueError(f"png_compress_level must be 0–9, not {png_compress_level}")
    _check_arrays(rgb, alpha)
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    check_encodable(fmt_name, width, height)
    profile = icc_profile or None
    metadata: dict[str, bytes] = {}
    if exif:
        metadata["exif"] = exif
    if xmp and fmt_name != "png":
        metadata["xmp"] = xmp

    if fmt_name == "png":
        output_depth = bit_depth or (16 if rgb.dtype == np.uint16 else 8)
        if output_depth == 16:
            stream.write(_encode_png_16_bit(rgb, alpha, profile, png_compress_level, exif, xmp))
            return
        rgb8 = _to_srgb(to_8_bit(rgb), convert_to_srgb_from)
        image = _pillow_image(rgb8, None if alpha is None else to_8_bit(alpha))
        image.save(stream, "PNG", compress_level=png_compress_level, icc_profile=profile,
                   pnginfo=_png_xmp(xmp), **metadata)
        return

    rgb8 = _to_srgb(to_8_bit(rgb), convert_to_srgb_from)
    alpha8 = None if alpha is None else to_8_bit(alpha)
    if fmt_name == "jpeg":
        if alpha8 is not None:
            rgb8 = _flatten_onto_white(rgb8, alpha8)
        jpeg_quality = DEFAULT_JPEG_QUALITY if quality is None else quality
        subsampling = (
            JPEG_SUBSAMPLING_444
            if jpeg_quality >= JPEG_FULL_CHROMA_MIN_QUALITY
            else JPEG_SUBSAMPLING_420
        )
        _pillow_image(rgb8, None).save(
            stream, "JPEG", quality=jpeg_quality, subsampling=subsampling, icc_profile=profile, **metadata
        )
        return

    webp_quality = DEFAULT_WEBP_QUALITY if quality is None else quality
    image = _pillow_image(rgb8, alpha8)
    if webp_quality == WEBP_LOSSLESS_QUALITY:
        image.save(
            stream,
            "WEBP",
            lossless=True,
            quality=WEBP_LOSSLESS_EFFORT,
            method=WEBP_METHOD,
            exact=True,
            icc_profile=profile,
            **metadata,
        )
    else:
        image.save(stream, "WEBP", quality=webp_quality, method=WEBP_METHOD, icc_profile=profile, **metadata)


def _png_xmp(xmp: bytes | None) -> PngInfo | None:
    if not xmp:
        return None
    info = PngInfo()
    info.add_itxt(PNG_XMP_KEYWORD, xmp.decode("utf-8"), zip=False)
    return info


def _to_srgb(rgb8: npt.NDArray[np.uint8], profile: bytes | None) -> npt.NDArray[np.uint8]:
    """``rgb8`` converted from ``profile`` to sRGB; as it is without a profile, or with one
    LittleCMS cannot open."""
    if not profile:
        return rgb8
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(
            Image.fromarray(np.ascontiguousarray(rgb8)), source, _srgb_profile(),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB",
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return rgb8
    if converted is None:
        return rgb8
    result: npt.NDArray[np.uint8] = np.asarray(converted)
    return result


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _pillow_image(rgb8: npt.NDArray[np.uint8], alpha8: npt.NDArray[np.uint8] | None) -> Image.Image:
    if alpha8 is None:
        return Image.fromarray(np.ascontiguousarray(rgb8))  # [H, W, 3] uint8 → "RGB"
    rgba = np.empty((*alpha8.shape, 4), dtype=np.uint8)
    rgba[..., :3] = rgb8
    rgba[..., 3] = alpha8
    return Image.fromarray(rgba)  # [H, W, 4] uint8 → "RGBA"


def _flatten_onto_white(
    rgb8: npt.NDArray[np.uint8], alpha8: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """Composite onto white: round((rgb·a + 255·(255 − a)) / 255), in uint16 (max 65152).

    Row block by row block, so the uint16 scratch stays small.
    """
    flattened = np.empty(rgb8.shape, dtype=np.uint8)
    for rows in row_blocks(rgb8.shape):
        opacity = alpha8[rows].astype(np.uint16)[..., np.newaxis]
        blended = rgb8[rows].astype(np.uint16)
        blended *= opacity
        blended += WHITE_8_BIT * (WHITE_8_BIT - opacity)
        blended += WHITE_8_BIT // 2
        blended //= WHITE_8_BIT
        flattened[rows] = blended
    return flattened


def _encode_png_16_bit(
    rgb: PixelArray, alpha: PixelArray | None, icc_profile: bytes | None, compress_level: int,
    exif: bytes | None = None, xmp: bytes | None = None,
) -> bytes:
    """16-bit RGB(A) PNG through OpenCV (BGR(A) order), with iCCP, eXIf and iTXt (XMP)
    chunks when given, all before the pixels.

    8-bit input is widened (v × 257) in the one BGR(A) buffer OpenCV needs anyway.
    """
    channels = 3 if alpha is None else 4
    bgr16 = np.empty((*rgb.shape[:2], channels), dtype=np.uint16)
    bgr16[..., :3] = rgb[..., ::-1]
    if rgb.dtype == np.uint8:
        bgr16[..., :3] *= SIXTEEN_BIT_PER_EIGHT_BIT
    if alpha is not None:
        bgr16[..., 3] = alpha
        if alpha.dtype == np.uint8:
            bgr16[..., 3] *= SIXTEEN_BIT_PER_EIGHT_BIT
    succeeded, encoded = cv2.imencode(".png", bgr16, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not succeeded:
        raise ValueError("OpenCV could not encode the 16-bit PNG")
    png = encoded.tobytes()
    # each chunk goes right after IHDR, so the last inserted comes first: iCCP, eXIf, iTXt
    if xmp:
        png = _insert_png_chunk_after_header(png, b"iTXt", _xmp_chunk_data(xmp))
    if exif:
        tiff_block = exif.removeprefix(EXIF_HEADER)
        png = _insert_png_chunk_after_header(png, b"eXIf", tiff_block)
    if icc_profile:
        png = _insert_png_chunk_after_header(png, b"iCCP", _iccp_chunk_data(icc_profile))
    return png


def _xmp_chunk_data(xmp: bytes) -> bytes:
    """PNG spec §11.3.4.5 iTXt: keyword, NUL, not compressed (0, 0), empty language tag and
    translated keyword (each NUL-terminated), the UTF-8 text."""
    return PNG_XMP_KEYWORD.encode("latin-1") + b"\x00\x00\x00\x00\x00" + xmp


def _iccp_chunk_data(icc_profile: bytes) -> bytes:
    """PNG spec §11.3.3.3: name, NUL, compression method 0 (zlib), compressed profile."""
    return PNG_ICC_PROFILE_NAME + b"\x00\x00" + zlib.compress(icc_profile)


def _insert_png_chunk_after_header(png: bytes, chunk_type: bytes, chunk_data: bytes) -> bytes:
    if png[12:16] != b"IHDR":
        raise ValueError("the PNG does not start with IHDR")
    crc = zlib.crc32(chunk_type + chunk_data) & 0xFFFFFFFF
    chunk = struct.pack(">I", len(chunk_data)) + chunk_type + chunk_data + struct.pack(">I", crc)
    return png[:PNG_IHDR_END] + chunk + png[PNG_IHDR_END:]
