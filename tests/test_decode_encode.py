"""Unit tests of the decode and encode stages (pure functions, inputs built in memory)."""

from __future__ import annotations

import io
import resource
import struct
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageOps
from skimage import data as skimage_data

from chaoqing.config import Limits
from chaoqing.errors import ImageTooLarge, InvalidImage, InvalidParameter, UnsupportedMediaType
from chaoqing.gateway.stages.decode import (
    ACCEPTED_MEDIA_TYPES,
    DecodedImage,
    PixelArray,
    check_media_type,
    check_output_size,
    decode_image,
    probe_image,
    sniff_media_type,
    to_8_bit,
)
from chaoqing.gateway.stages.encode import (
    MEDIA_TYPES,
    OUTPUT_FORMATS,
    check_encodable,
    choose_output_format,
    encode_image,
    encode_image_to,
    normalise_output_format,
)

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits()
EXIF_ORIENTATION_TAG = 0x0112
RED = (255, 0, 0)
WHITE = (255, 255, 255)

# What ImageOps.exif_transpose applies for each orientation, and its inverse (used to build
# the stored image that displays upright once the orientation is applied).
TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE_TRANSPOSE = {
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
}


# ---------------------------------------------------------------------------- builders


def save_with_pillow(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(chunk_type: bytes, chunk_data: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + chunk_data) & 0xFFFFFFFF
    return struct.pack(">I", len(chunk_data)) + chunk_type + chunk_data + struct.pack(">I", crc)


def handmade_png(
    width: int,
    height: int,
    bit_depth: int,
    colour_type: int,
    raw_rows: bytes,
    extra_chunks: bytes = b"",
) -> bytes:
    """A PNG written byte by byte: signature, IHDR (correct CRC), extra chunks, IDAT, IEND."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + extra_chunks
        + png_chunk(b"IDAT", zlib.compress(raw_rows))
        + png_chunk(b"IEND", b"")
    )


def rows_with_filter_byte(pixels: npt.NDArray[Any]) -> bytes:
    """Scanlines for IDAT: filter type 0, then the row's big-endian samples."""
    big_endian = pixels.astype(pixels.dtype.newbyteorder(">"))
    return b"".join(b"\x00" + big_endian[row].tobytes() for row in range(big_endian.shape[0]))


def insert_after_png_header(png: bytes, chunk: bytes) -> bytes:
    header_end = 8 + 8 + 13 + 4
    return png[:header_end] + chunk + png[header_end:]


def encode_with_opencv(extension: str, pixels_bgr: npt.NDArray[Any]) -> bytes:
    succeeded, encoded = cv2.imencode(extension, pixels_bgr)
    assert succeeded
    return encoded.tobytes()


def random_pixels(
    shape: tuple[int, ...], dtype: type[np.unsignedinteger[Any]], seed: int = 0
) -> npt.NDArray[Any]:
    maximum = int(np.iinfo(dtype).max)
    return np.random.default_rng(seed).integers(0, maximum, shape, endpoint=True).astype(dtype)


def astronaut(width: int = 128, height: int = 96) -> npt.NDArray[np.uint8]:
    photo: npt.NDArray[np.uint8] = skimage_data.astronaut()  # type: ignore[no-untyped-call]
    return np.ascontiguousarray(cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA))


def upright_test_card() -> Image.Image:
    """48×32, white, a red 16×16 block top left: asymmetric under all 8 orientations."""
    card = Image.new("RGB", (48, 32), WHITE)
    card.paste(RED, (0, 0, 16, 16))
    return card


def srgb_profile() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert isinstance(profile, bytes)
    return profile


def psnr(reference: npt.NDArray[Any], candidate: npt.NDArray[Any]) -> float:
    error = np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def assert_well_formed(decoded: DecodedImage) -> None:
    assert decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3
    assert decoded.rgb.dtype in (np.uint8, np.uint16)
    assert decoded.rgb.flags.c_contiguous and decoded.rgb.flags.writeable
    assert decoded.bit_depth == (16 if decoded.rgb.dtype == np.uint16 else 8)
    if decoded.alpha is not None:
        assert decoded.alpha.shape == decoded.rgb.shape[:2]
        assert decoded.alpha.dtype == decoded.rgb.dtype
        assert decoded.alpha.flags.c_contiguous and decoded.alpha.flags.writeable


# ---------------------------------------------------------------------------- orientation


@pytest.mark.timeout(30)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = upright_test_card()
    stored = upright
    if orientation != 1:
        method = TRANSPOSE_FOR_ORIENTATION[orientation]
        stored = upright.transpose(INVERSE_TRANSPOSE.get(method, method))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    data = save_with_pillow(stored, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())

    decoded = decode_image(data, LIMITS)

    assert_well_formed(decoded)
    assert decoded.exif_orientation_applied == orientation
    assert (decoded.width, decoded.height) == (48, 32)
    red_corner = decoded.rgb[4:12, 4:12].mean(axis=(0, 1))
    assert red_corner[0] > 200 and red_corner[1] < 60 and red_corner[2] < 60
    for corner in (
        decoded.rgb[4:12, -12:-4],
        decoded.rgb[-12:-4, 4:12],
        decoded.rgb[-12:-4, -12:-4],
    ):
        assert corner.min() > 200  # the other three corners are white
    # Same pixels as Pillow's own exif_transpose of the same bytes.
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    np.testing.assert_array_equal(decoded.rgb, expected)


@pytest.mark.timeout(30)
def test_probe_reports_displayed_size_and_frames() -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    data = save_with_pillow(upright_test_card(), "JPEG", exif=exif.tobytes())
    info = probe_image(data, LIMITS)
    assert (info.format, info.width, info.height, info.orientation, info.frames) == (
        "JPEG",
        32,
        48,
        6,
        1,
    )
    assert info.pixels == 48 * 32


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_broken_exif_counts_as_upright() -> None:
    data = save_with_pillow(upright_test_card(), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    decoded = decode_image(data, LIMITS)
    assert decoded.exif_orientation_applied == 1
    assert decoded.rgb.shape == (32, 48, 3)


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("error")
def test_pillow_warnings_raised_as_errors_do_not_escape() -> None:
    # Under -W error, Pillow's "Corrupt EXIF data" warning is raised while the header is
    # parsed; it must come out as one of ours (catch_warnings is not thread-safe, so we
    # do not switch warnings off around Pillow).
    broken_exif = save_with_pillow(upright_test_card(), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    with pytest.raises(InvalidImage):
        decode_image(broken_exif, LIMITS)


# ---------------------------------------------------------------------------- modes


@pytest.mark.timeout(30)
def test_rgba_png_keeps_alpha() -> None:
    rgba = random_pixels((7, 9, 4), np.uint8)
    decoded = decode_image(save_with_pillow(Image.fromarray(rgba, "RGBA"), "PNG"), LIMITS)
    assert_well_formed(decoded)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.rgb, rgba[..., :3])
    np.testing.assert_array_equal(decoded.alpha, rgba[..., 3])
    assert (decoded.source_format, decoded.source_mode, decoded.bit_depth) == ("PNG", "RGBA", 8)


@pytest.mark.timeout(30)
def test_gray_alpha_png_becomes_rgb_with_alpha() -> None:
    gray_alpha = random_pixels((5, 6, 2), np.uint8)
    decoded = decode_image(save_with_pillow(Image.fromarray(gray_alpha, "LA"), "PNG"), LIMITS)
    assert decoded.alpha is not None
    for channel in range(3):
        np.testing.assert_array_equal(decoded.rgb[..., channel], gray_alpha[..., 0])
    np.testing.assert_array_equal(decoded.alpha, gray_alpha[..., 1])


@pytest.mark.timeout(30)
def test_palette_with_transparency_becomes_alpha() -> None:
    palette_image = Image.new("P", (4, 3))
    palette_image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette_image.putdata([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    data = save_with_pillow(palette_image, "PNG", transparency=1)
    decoded = decode_image(data, LIMITS)
    assert decoded.alpha is not None and decoded.source_mode == "P"
    indices = np.asarray(palette_image)
    np.testing.assert_array_equal(decoded.alpha, np.where(indices == 1, 0, 255))
    np.testing.assert_array_equal(decoded.rgb[0, 0], RED)


@pytest.mark.timeout(30)
def test_palette_without_transparency_has_no_alpha() -> None:
    palette_image = Image.fromarray(astronaut(32, 24)).convert("P")
    decoded = decode_image(save_with_pillow(palette_image, "PNG"), LIMITS)
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, np.asarray(palette_image.convert("RGB")))


@pytest.mark.timeout(30)
def test_rgb_png_with_trns_becomes_alpha() -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (10, 20, 30)
    data = save_with_pillow(Image.fromarray(rgb), "PNG", transparency=(10, 20, 30))
    decoded = decode_image(data, LIMITS)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.alpha, [[0, 255], [255, 255]])


@pytest.mark.timeout(30)
def test_grayscale_becomes_rgb() -> None:
    gray = random_pixels((6, 5), np.uint8)
    decoded = decode_image(save_with_pillow(Image.fromarray(gray, "L"), "PNG"), LIMITS)
    assert decoded.alpha is None and decoded.source_mode == "L"
    np.testing.assert_array_equal(decoded.rgb, np.repeat(gray[..., np.newaxis], 3, axis=2))


@pytest.mark.timeout(30)
def test_one_bit_becomes_black_and_white_rgb() -> None:
    bits = Image.new("1", (8, 3), 0)
    bits.putpixel((2, 1), 1)
    decoded = decode_image(save_with_pillow(bits, "PNG"), LIMITS)
    assert decoded.source_mode == "1"
    assert set(np.unique(decoded.rgb)) == {0, 255}
    np.testing.assert_array_equal(decoded.rgb[1, 2], WHITE)
    np.testing.assert_array_equal(decoded.rgb[0, 0], (0, 0, 0))


@pytest.mark.timeout(30)
def test_cmyk_jpeg_becomes_rgb() -> None:
    # Pillow writes CMYK JPEGs Adobe-style (inverted, APP14); its decoder undoes that.
    cyan_magenta = Image.new(
        "CMYK", (16, 8), (0, 255, 255, 0)
    )  # no cyan, full magenta + yellow = red
    data = save_with_pillow(cyan_magenta, "JPEG", quality=95)
    decoded = decode_image(data, LIMITS)
    assert decoded.source_mode == "CMYK" and decoded.alpha is None and decoded.icc_profile is None
    mean = decoded.rgb.reshape(-1, 3).mean(axis=0)
    assert mean[0] > 230 and mean[1] < 30 and mean[2] < 30


@pytest.mark.timeout(30)
def test_float_mode_is_clipped_to_8_bit() -> None:
    values = np.array([[-5.0, 0.4, 127.6, 300.0]], dtype=np.float32)
    decoded = decode_image(save_with_pillow(Image.fromarray(values, "F"), "TIFF"), LIMITS)
    assert decoded.bit_depth == 8
    np.testing.assert_array_equal(decoded.rgb[..., 0], [[0, 0, 128, 255]])


@pytest.mark.timeout(30)
def test_32_bit_integer_mode_is_clipped_to_16_bit() -> None:
    values = np.array([[-5, 1000, 70000]], dtype=np.int32)
    decoded = decode_image(save_with_pillow(Image.fromarray(values, "I"), "TIFF"), LIMITS)
    assert decoded.bit_depth == 16
    np.testing.assert_array_equal(decoded.rgb[..., 1], [[0, 1000, 65535]])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "GIF"])
def test_other_containers_decode(fmt: str) -> None:
    pixels = astronaut(40, 30)
    options: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(save_with_pillow(Image.fromarray(pixels), fmt, **options), LIMITS)
    assert_well_formed(decoded)
    assert decoded.source_format == fmt and decoded.rgb.shape == (30, 40, 3)
    if fmt != "GIF":  # GIF quantises to 256 colours
        np.testing.assert_array_equal(decoded.rgb, pixels)


@pytest.mark.timeout(30)
def test_mpo_decodes_its_first_image() -> None:
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), (0, 0, 255))
    data = save_with_pillow(first, "MPO", save_all=True, append_images=[second])
    decoded = decode_image(data, LIMITS)
    assert decoded.source_format == "MPO"
    assert decoded.rgb[..., 0].mean() > 230
    assert choose_output_format(None, decoded) == "jpeg"


# ---------------------------------------------------------------------------- 16 bits


@pytest.mark.timeout(30)
def test_16_bit_grayscale_png_stays_16_bit() -> None:
    gray16 = random_pixels((5, 7), np.uint16)
    decoded = decode_image(encode_with_opencv(".png", gray16), LIMITS)
    assert decoded.bit_depth == 16 and decoded.alpha is None
    for channel in range(3):
        np.testing.assert_array_equal(decoded.rgb[..., channel], gray16)


@pytest.mark.timeout(30)
def test_16_bit_grayscale_png_with_trns_becomes_alpha() -> None:
    gray16 = random_pixels((3, 4), np.uint16)
    gray16[gray16 == 1234] = 1235
    gray16[0, 0] = 1234
    data = handmade_png(
        4, 3, 16, 0, rows_with_filter_byte(gray16), png_chunk(b"tRNS", struct.pack(">H", 1234))
    )
    decoded = decode_image(data, LIMITS)
    assert decoded.alpha is not None and decoded.alpha.dtype == np.uint16
    assert decoded.alpha[0, 0] == 0 and int(decoded.alpha.reshape(-1)[1:].min()) == 65535


@pytest.mark.timeout(30)
def test_16_bit_rgb_png_round_trips_losslessly() -> None:
    rgb16 = random_pixels((9, 11, 3), np.uint16)
    data = encode_with_opencv(".png", rgb16[..., ::-1].copy())
    assert Image.open(io.BytesIO(data)).mode == "RGB"  # what Pillow alone would make of it: 8 bits

    decoded = decode_image(data, LIMITS)
    assert_well_formed(decoded)
    assert (decoded.bit_depth, decoded.source_mode, decoded.alpha) == (16, "RGB;16", None)
    np.testing.assert_array_equal(decoded.rgb, rgb16)

    assert choose_output_format(None, decoded) == "png"
    encoded = encode_image(decoded.rgb, decoded.alpha, "png", bit_depth=decoded.bit_depth)
    reread = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert reread is not None and reread.dtype == np.uint16
    np.testing.assert_array_equal(reread[..., ::-1], rgb16)
    np.testing.assert_array_equal(decode_image(encoded, LIMITS).rgb, rgb16)


@pytest.mark.timeout(30)
def test_16_bit_rgba_png_round_trips_losslessly() -> None:
    rgba16 = random_pixels((6, 4, 4), np.uint16, seed=1)
    bgra16 = np.concatenate([rgba16[..., 2::-1], rgba16[..., 3:]], axis=2)
    decoded = decode_image(encode_with_opencv(".png", bgra16), LIMITS)
    assert decoded.alpha is not None and decoded.source_mode == "RGBA;16"
    np.testing.assert_array_equal(decoded.rgb, rgba16[..., :3])
    np.testing.assert_array_equal(decoded.alpha, rgba16[..., 3])
    encoded = encode_image(decoded.rgb, decoded.alpha, "png")
    again = decode_image(encoded, LIMITS)
    assert again.alpha is not None
    np.testing.assert_array_equal(again.rgb, rgba16[..., :3])
    np.testing.assert_array_equal(again.alpha, rgba16[..., 3])


@pytest.mark.timeout(30)
def test_16_bit_gray_alpha_png_stays_16_bit() -> None:
    gray_alpha16 = random_pixels((3, 4, 2), np.uint16, seed=2)
    data = handmade_png(4, 3, 16, 4, rows_with_filter_byte(gray_alpha16))
    decoded = decode_image(data, LIMITS)
    assert decoded.source_mode == "LA;16" and decoded.alpha is not None
    np.testing.assert_array_equal(decoded.rgb[..., 1], gray_alpha16[..., 0])
    np.testing.assert_array_equal(decoded.alpha, gray_alpha16[..., 1])


@pytest.mark.timeout(30)
def test_16_bit_rgb_tiff_stays_16_bit() -> None:
    rgb16 = random_pixels((5, 6, 3), np.uint16, seed=3)
    decoded = decode_image(encode_with_opencv(".tiff", rgb16[..., ::-1].copy()), LIMITS)
    assert (decoded.source_format, decoded.bit_depth) == ("TIFF", 16)
    np.testing.assert_array_equal(decoded.rgb, rgb16)


@pytest.mark.timeout(30)
def test_16_bit_png_orientation_and_icc_profile_are_read_from_the_header() -> None:
    rgb16 = random_pixels((2, 3, 3), np.uint16, seed=4)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    exif_chunk = png_chunk(b"eXIf", exif.tobytes()[len(b"Exif\x00\x00") :])
    profile = srgb_profile()
    icc_chunk = png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(profile))
    data = insert_after_png_header(
        encode_with_opencv(".png", rgb16[..., ::-1].copy()), icc_chunk + exif_chunk
    )
    decoded = decode_image(data, LIMITS)
    assert decoded.exif_orientation_applied == 6 and decoded.bit_depth == 16
    np.testing.assert_array_equal(decoded.rgb, np.rot90(rgb16, k=-1))  # 90° clockwise
    assert decoded.icc_profile == profile


@pytest.mark.timeout(30)
def test_to_8_bit_rounds() -> None:
    values = np.array([0, 128, 129, 257, 65535], dtype=np.uint16)
    np.testing.assert_array_equal(to_8_bit(values), [0, 0, 1, 1, 255])
    eight = np.array([3], dtype=np.uint8)
    assert to_8_bit(eight) is eight
    many_blocks = random_pixels((700, 1000, 3), np.uint16, seed=6)  # 2.1 M values, 3 blocks
    expected = np.floor(many_blocks / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(to_8_bit(many_blocks), expected)


# ---------------------------------------------------------------------------- animations


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_decodes_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (12, 10), colour) for colour in (RED, (0, 255, 0), (0, 0, 255))]
    options: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        options["lossless"] = True
    data = save_with_pillow(frames[0], fmt, **options)
    assert probe_image(data, LIMITS).frames == 3
    decoded = decode_image(data, LIMITS)
    np.testing.assert_array_equal(decoded.rgb.reshape(-1, 3).mean(axis=0).round(), RED)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
@pytest.mark.parametrize("kept_fraction", [0.2, 0.6, 0.95])
def test_truncated_image_is_invalid(fmt: str, kept_fraction: float) -> None:
    data = save_with_pillow(Image.fromarray(astronaut()), fmt)
    with pytest.raises(InvalidImage):
        decode_image(data[: int(len(data) * kept_fraction)], LIMITS)


@pytest.mark.timeout(30)
def test_truncated_16_bit_png_is_invalid() -> None:
    data = encode_with_opencv(".png", random_pixels((64, 64, 3), np.uint16))
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], LIMITS)


@pytest.mark.timeout(30)
def test_16_bit_png_chunk_claiming_more_than_the_body_is_invalid() -> None:
    # OpenCV 5 allocates a chunk's declared length up front: 2 GB here, for a 100-byte body.
    data = bytearray(encode_with_opencv(".png", random_pixels((16, 24, 3), np.uint16)))
    idat_length_position = 8 + 8 + 13 + 4
    assert data[idat_length_position + 4 : idat_length_position + 8] == b"IDAT"
    data[idat_length_position : idat_length_position + 4] = struct.pack(">I", 0x8300_0000)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidImage):
        decode_image(bytes(data), LIMITS)
    peak_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert peak_growth_kib < 256 * 1024


@pytest.mark.timeout(30)
def test_empty_body_is_invalid() -> None:
    with pytest.raises(InvalidImage):
        decode_image(b"", LIMITS)
    with pytest.raises(InvalidImage):
        probe_image(b"", LIMITS)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>not an image</body></html>",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS: Pillow would run Ghostscript
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"RIFF\x00\x00\x00\x00WEBP",
    ],
)
def test_non_images_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidImage):
        decode_image(body, LIMITS)


@pytest.mark.timeout(30)
def test_decompression_bomb_header_is_refused_without_allocating() -> None:
    data = handmade_png(60000, 60000, 8, 2, b"\x00" * 16)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            probe_image(data, LIMITS)
        with pytest.raises(ImageTooLarge):
            decode_image(data, LIMITS)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 50 * 1024 * 1024


@pytest.mark.timeout(30)
def test_over_our_pixel_limit_is_refused_before_decoding() -> None:
    data = handmade_png(5000, 5000, 8, 2, b"\x00" * 16)  # 25 M pixels: under Pillow's own cap
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge):
            decode_image(data, LIMITS)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 50 * 1024 * 1024


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_is_translated() -> None:
    data = handmade_png(10000, 10000, 8, 2, b"\x00" * 16)  # over MAX_IMAGE_PIXELS, under 2×
    with pytest.raises(ImageTooLarge):
        decode_image(data, LIMITS)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [(0, 3), (3, 0)])
def test_zero_sized_image_is_invalid(size: tuple[int, int]) -> None:
    with pytest.raises(InvalidImage):
        decode_image(handmade_png(*size, 8, 2, b""), LIMITS)


@pytest.mark.timeout(30)
def test_over_the_byte_limit_is_too_large() -> None:
    data = save_with_pillow(Image.fromarray(astronaut()), "PNG")
    small_limits = Limits(max_body_bytes=len(data) - 1)
    with pytest.raises(ImageTooLarge):
        probe_image(data, small_limits)
    with pytest.raises(ImageTooLarge):
        decode_image(data, small_limits)
    assert decode_image(data, Limits(max_body_bytes=len(data))).rgb.shape == (96, 128, 3)


@pytest.mark.timeout(30)
def test_pixel_limit_counts_the_pixels() -> None:
    data = save_with_pillow(Image.new("RGB", (30, 20)), "PNG")
    assert decode_image(data, Limits(max_input_pixels=600)).rgb.shape == (20, 30, 3)
    with pytest.raises(ImageTooLarge):
        decode_image(data, Limits(max_input_pixels=599))


# ---------------------------------------------------------------------------- small and odd sizes


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [(1, 1), (3, 2), (1, 4000), (4000, 1)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_small_and_extreme_sizes_round_trip(size: tuple[int, int], fmt: str) -> None:
    width, height = size
    pixels = random_pixels((height, width, 3), np.uint8)
    decoded = decode_image(save_with_pillow(Image.fromarray(pixels), fmt), LIMITS)
    assert_well_formed(decoded)
    assert decoded.rgb.shape == (height, width, 3)
    for output_format in OUTPUT_FORMATS:
        encoded = encode_image(decoded.rgb, None, output_format)
        assert decode_image(encoded, LIMITS).rgb.shape == (height, width, 3)


@pytest.mark.timeout(30)
def test_output_size_check() -> None:
    limits = Limits(max_output_pixels=1600)
    check_output_size(10, 10, 4, limits)  # exactly 1600
    with pytest.raises(ImageTooLarge):
        check_output_size(10, 11, 4, limits)
    with pytest.raises(ImageTooLarge):
        check_output_size(4000, 4000, 4.0, Limits())
    check_output_size(2000, 2000, 4.0, Limits())
    for scale in (0, -2, float("nan")):
        with pytest.raises(InvalidParameter):
            check_output_size(10, 10, scale, limits)


# ---------------------------------------------------------------------------- media types


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_sniff_media_type(fmt: str, media_type: str) -> None:
    data = save_with_pillow(Image.new("RGB", (4, 4)), fmt)
    assert sniff_media_type(data) == media_type
    assert media_type in ACCEPTED_MEDIA_TYPES
    assert check_media_type(media_type, data) == media_type
    assert check_media_type(None, data) == media_type
    assert check_media_type("application/octet-stream", data) == media_type


@pytest.mark.timeout(30)
def test_check_media_type() -> None:
    jpeg = save_with_pillow(Image.new("RGB", (4, 4)), "JPEG")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
    assert sniff_media_type(svg) is None and sniff_media_type(b"") is None
    assert check_media_type("Image/JPG; charset=binary", jpeg) == "image/jpeg"
    assert check_media_type("image/png", jpeg) == "image/jpeg"  # mislabelled: the bytes decide
    with pytest.raises(UnsupportedMediaType):
        check_media_type("image/svg+xml", svg)
    with pytest.raises(UnsupportedMediaType):
        check_media_type("text/html", jpeg)
    with pytest.raises(InvalidImage):
        check_media_type("image/jpeg", svg)  # an SVG named .jpg


# ---------------------------------------------------------------------------- encoding


@pytest.mark.timeout(30)
def test_png_round_trip_is_exact() -> None:
    pixels = astronaut()
    encoded = encode_image(pixels, None, "png")
    assert encoded.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(encoded, LIMITS).rgb, pixels)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fmt", "minimum_psnr"), [("jpeg", 36.0), ("webp", 34.0)])
def test_lossy_round_trips_are_close(fmt: str, minimum_psnr: float) -> None:
    pixels = astronaut(256, 192)
    encoded = encode_image(pixels, None, fmt)
    assert sniff_media_type(encoded) == MEDIA_TYPES[fmt]
    decoded = decode_image(encoded, LIMITS)
    assert psnr(pixels, decoded.rgb) > minimum_psnr
    worse = decode_image(encode_image(pixels, None, fmt, quality=10), LIMITS)
    assert psnr(pixels, worse.rgb) < psnr(pixels, decoded.rgb)


@pytest.mark.timeout(30)
def test_webp_quality_100_is_lossless_and_keeps_alpha() -> None:
    rgba = random_pixels((10, 12, 4), np.uint8, seed=5)
    encoded = encode_image(rgba[..., :3], rgba[..., 3], "webp", quality=100)
    decoded = decode_image(encoded, LIMITS)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.rgb, rgba[..., :3])
    np.testing.assert_array_equal(decoded.alpha, rgba[..., 3])


@pytest.mark.timeout(30)
def test_jpeg_flattens_alpha_onto_white() -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (0, 0, 255)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 255
    decoded = decode_image(encode_image(rgb, alpha, "jpeg", quality=100), LIMITS)
    assert decoded.alpha is None
    assert decoded.rgb[:, :6].min() > 245  # transparent → white
    blue = decoded.rgb[:, 10:].reshape(-1, 3).mean(axis=0)
    assert blue[2] > 240 and blue[0] < 15 and blue[1] < 15


@pytest.mark.timeout(30)
def test_16_bit_pixels_as_jpeg_and_webp_are_rounded_to_8_bits() -> None:
    rgb16 = astronaut().astype(np.uint16) * 257
    for fmt in ("jpeg", "webp"):
        decoded = decode_image(encode_image(rgb16, None, fmt, bit_depth=16), LIMITS)
        assert decoded.bit_depth == 8
        assert psnr(astronaut(), decoded.rgb) > 30


@pytest.mark.timeout(30)
def test_png_bit_depth_can_be_raised_or_lowered() -> None:
    pixels = astronaut(20, 10)
    raised = decode_image(encode_image(pixels, None, "png", bit_depth=16), LIMITS)
    assert raised.bit_depth == 16
    np.testing.assert_array_equal(raised.rgb, pixels.astype(np.uint16) * 257)
    lowered = decode_image(encode_image(raised.rgb, None, "png", bit_depth=8), LIMITS)
    np.testing.assert_array_equal(lowered.rgb, pixels)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("quality", [0, 101, -1, 1.5, True, "90"])
def test_quality_out_of_range_is_invalid(quality: object) -> None:
    for fmt in OUTPUT_FORMATS:
        with pytest.raises(InvalidParameter):
            encode_image(astronaut(8, 8), None, fmt, quality=quality)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("quality", [1, 100])
def test_quality_bounds_are_accepted(quality: int) -> None:
    for fmt in OUTPUT_FORMATS:
        assert encode_image(astronaut(8, 8), None, fmt, quality=quality)


@pytest.mark.timeout(30)
def test_encode_refuses_bad_parameters_and_arrays() -> None:
    pixels = astronaut(8, 8)
    with pytest.raises(InvalidParameter):
        encode_image(pixels, None, "gif")
    with pytest.raises(InvalidParameter):
        encode_image(pixels, None, "png", bit_depth=12)
    with pytest.raises(ValueError):
        encode_image(pixels[..., :2], None, "png")
    with pytest.raises(ValueError):
        encode_image(pixels.astype(np.float32), None, "png")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_image(pixels, np.zeros((4, 4), np.uint8), "png")


@pytest.mark.timeout(30)
def test_format_size_limits() -> None:
    check_encodable("webp", 16383, 100)
    check_encodable("png", 100000, 10)
    check_encodable("jpeg", 65500, 10)
    with pytest.raises(InvalidParameter):
        check_encodable("webp", 100, 16384)
    with pytest.raises(InvalidParameter):
        check_encodable("jpeg", 65501, 10)


@pytest.mark.timeout(30)
def test_encode_does_not_modify_its_inputs() -> None:
    rgb = astronaut(32, 16)
    alpha = random_pixels((16, 32), np.uint8)
    rgb_before, alpha_before = rgb.copy(), alpha.copy()
    for fmt in OUTPUT_FORMATS:
        encode_image(rgb, alpha, fmt)
        encode_image(rgb, alpha, fmt, bit_depth=16)
    np.testing.assert_array_equal(rgb, rgb_before)
    np.testing.assert_array_equal(alpha, alpha_before)


@pytest.mark.timeout(30)
def test_encode_image_to_stream_matches_bytes() -> None:
    pixels = astronaut(32, 16)
    for fmt in OUTPUT_FORMATS:
        stream = io.BytesIO()
        encode_image_to(stream, pixels, None, fmt)
        assert stream.getvalue() == encode_image(pixels, None, fmt)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_icc_profile_is_preserved(fmt: str, bit_depth: int) -> None:
    profile = srgb_profile()
    pixels = astronaut(16, 8)
    decoded = decode_image(
        save_with_pillow(Image.fromarray(pixels), "PNG", icc_profile=profile), LIMITS
    )
    assert decoded.icc_profile == profile
    encoded = encode_image(
        decoded.rgb, None, fmt, icc_profile=decoded.icc_profile, bit_depth=bit_depth
    )
    with Image.open(io.BytesIO(encoded)) as reread:
        assert reread.info.get("icc_profile") == profile
    assert decode_image(encoded, LIMITS).icc_profile == profile


@pytest.mark.timeout(30)
def test_gray_icc_profile_is_not_carried_to_rgb_output() -> None:
    gray_profile = bytearray(srgb_profile())
    gray_profile[16:20] = b"GRAY"
    data = save_with_pillow(Image.new("L", (4, 4), 100), "PNG", icc_profile=bytes(gray_profile))
    assert decode_image(data, LIMITS).icc_profile is None


# ---------------------------------------------------------------------------- format choice


def decoded_like(
    source_format: str, *, bit_depth: int = 8, with_alpha: bool = False
) -> DecodedImage:
    rgb: PixelArray = np.zeros((2, 2, 3), np.uint8)
    if bit_depth == 16:
        rgb = np.zeros((2, 2, 3), np.uint16)
    return DecodedImage(
        rgb=rgb,
        alpha=np.zeros_like(rgb[..., 0]) if with_alpha else None,
        bit_depth=bit_depth,
        source_format=source_format,
        source_mode="RGB",
        icc_profile=None,
        exif_orientation_applied=1,
    )


@pytest.mark.timeout(30)
def test_choose_output_format_defaults() -> None:
    assert choose_output_format(None, decoded_like("JPEG")) == "jpeg"
    assert choose_output_format(None, decoded_like("MPO")) == "jpeg"
    assert choose_output_format(None, decoded_like("PNG")) == "png"
    assert choose_output_format(None, decoded_like("PNG", with_alpha=True)) == "png"
    assert choose_output_format(None, decoded_like("WEBP")) == "webp"
    assert choose_output_format(None, decoded_like("WEBP", with_alpha=True)) == "webp"
    for source_format in ("GIF", "BMP", "TIFF"):
        assert choose_output_format(None, decoded_like(source_format)) == "png"
    assert choose_output_format(None, decoded_like("PNG", bit_depth=16)) == "png"
    assert choose_output_format(None, decoded_like("TIFF", bit_depth=16, with_alpha=True)) == "png"
    assert choose_output_format("auto", decoded_like("JPEG")) == "jpeg"
    assert choose_output_format("", decoded_like("GIF")) == "png"


@pytest.mark.timeout(30)
def test_choose_output_format_honours_requests() -> None:
    assert choose_output_format("JPG", decoded_like("PNG", with_alpha=True)) == "jpeg"
    assert choose_output_format("jpeg", decoded_like("PNG", bit_depth=16)) == "jpeg"
    assert choose_output_format("webp", decoded_like("JPEG")) == "webp"
    assert choose_output_format("image/png", decoded_like("JPEG")) == "png"
    with pytest.raises(InvalidParameter):
        choose_output_format("tiff", decoded_like("JPEG"))
    assert normalise_output_format(None) is None
    assert set(MEDIA_TYPES) == set(OUTPUT_FORMATS)


# ---------------------------------------------------------------------------- concurrency


@pytest.mark.timeout(60)
def test_concurrent_decodes_and_encodes_do_not_mix() -> None:
    inputs = [
        save_with_pillow(Image.fromarray(astronaut(64 + index, 48)), fmt)
        for index, fmt in enumerate(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"] * 4)
    ]
    inputs.append(encode_with_opencv(".png", random_pixels((40, 30, 3), np.uint16)))

    def round_trip(data: bytes) -> tuple[bytes, bytes]:
        decoded = decode_image(data, LIMITS)
        return decoded.rgb.tobytes(), encode_image(decoded.rgb, decoded.alpha, "png")

    serial = [round_trip(data) for data in inputs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(round_trip, inputs * 3))
    assert concurrent == serial * 3


# ---------------------------------------------------------------------------- fuzzing


def seed_images() -> list[bytes]:
    pixels = astronaut(24, 16)
    rgba = Image.fromarray(np.dstack([pixels, pixels[..., 0]]), "RGBA")
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, (0, 0, 255))]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    return [
        save_with_pillow(Image.fromarray(pixels), "PNG"),
        save_with_pillow(rgba, "PNG"),
        save_with_pillow(Image.fromarray(pixels), "JPEG", exif=exif.tobytes()),
        save_with_pillow(Image.fromarray(pixels), "JPEG", progressive=True),
        save_with_pillow(Image.fromarray(pixels), "GIF"),
        save_with_pillow(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        save_with_pillow(Image.fromarray(pixels), "WEBP"),
        save_with_pillow(rgba, "WEBP", lossless=True),
        save_with_pillow(Image.fromarray(pixels), "BMP"),
        save_with_pillow(Image.fromarray(pixels), "TIFF"),
        save_with_pillow(Image.fromarray(pixels).convert("CMYK"), "JPEG"),
        save_with_pillow(Image.fromarray(pixels).convert("P"), "PNG", transparency=0),
        save_with_pillow(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        save_with_pillow(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        encode_with_opencv(".png", random_pixels((16, 24, 3), np.uint16)),
        encode_with_opencv(".png", random_pixels((16, 24, 4), np.uint16)),
        encode_with_opencv(".png", random_pixels((16, 24), np.uint16)),
        encode_with_opencv(".tiff", random_pixels((16, 24, 3), np.uint16)),
    ]


SEEDS = seed_images()
FUZZ_LIMITS = Limits(max_body_bytes=1 << 20, max_input_pixels=1 << 20)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed image with 1–4 bit flips, truncations, insertions or overwrites."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "header"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[position : position + len(chunk)] = chunk
        elif kind == "header" and len(data) > 32:
            data[draw(st.integers(0, 32))] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt TIFF/EXIF tags
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_images())
def test_fuzzed_bytes_raise_only_our_errors(data: bytes) -> None:
    try:
        probe_image(data, FUZZ_LIMITS)
    except (InvalidImage, ImageTooLarge, UnsupportedMediaType):
        pass
    try:
        decoded = decode_image(data, FUZZ_LIMITS)
    except (InvalidImage, ImageTooLarge, UnsupportedMediaType):
        return
    assert_well_formed(decoded)
    assert decoded.width * decoded.height <= FUZZ_LIMITS.max_input_pixels
