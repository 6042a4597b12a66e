"""Hostile input through the real HTTP gateway (sim model servers) and the model server.

The corpus is built here, in memory. Every case gets either a correct image (its size and
orientation checked) or the documented 4xx JSON error, quickly: never a 5xx, a crash or a
hang. docs/reliability.md lists the corpus with what each case gets.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import SimGateway
from PIL import Image

from chaoqing.config import Limits
from chaoqing.modelserver.app import ModelServer
from chaoqing.protocol import v2

pytestmark = pytest.mark.timeout(60)

StartGateway = Callable[..., SimGateway]

# Small limits make "over the limits" cheap to build and to send.
LIMITS = Limits(max_body_bytes=2_000_000, max_input_pixels=4_000_000, max_output_pixels=16_000_000)
# Generous for a busy 2-core machine, and still far below what a hang would take (the 300 s
# request deadline, the 60 s body read timeout): what they catch is a request that waited on
# a timeout, or a refusal that decoded the pixels it refuses.
ANSWER_WITHIN_S = 10.0
ERROR_WITHIN_S = 5.0  # a refusal is quick: nothing was computed
DOCUMENTED_CODES = {
    400: {"invalid_image", "invalid_parameter"},
    401: {"unauthorized"},
    408: {"request_timeout"},
    413: {"image_too_large"},
    415: {"unsupported_media_type"},
}
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# -- builders ------------------------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _smooth(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 64 + 96], axis=2).astype(np.uint8)


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _handmade_png(width: int, height: int, rows: bytes = b"\x00" * 16) -> bytes:
    """A PNG header saying ``width``×``height`` (correct CRCs) and a token of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.fromarray(_noise(16, 16)), "JPEG"))
    start = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, height, width
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen descriptor
    return bytes(data)


def _sixteen_bit_png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 65536, (height, width, 3), dtype=np.uint16)
    succeeded, encoded = cv2.imencode(".png", pixels)
    assert succeeded
    return encoded.tobytes()


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (40, 30), 0)
    image.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 * 3 - 9))
    image.paste(1, (20, 0, 40, 30))
    return _save(image, "PNG", transparency=0)  # left half transparent, right half green


def _animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (30, 20), colour) for colour in (RED, GREEN, BLUE)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


# What ImageOps.exif_transpose applies for each orientation; stored = its inverse of the upright card
UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}


def _upright_card() -> Image.Image:
    """64×40, white, red block top left, blue block bottom right: asymmetric under all 8."""
    card = Image.new("RGB", (64, 40), WHITE)
    card.paste(RED, (0, 0, 24, 16))
    card.paste(BLUE, (40, 24, 64, 40))
    return card


def _exif_jpeg(orientation: int) -> bytes:
    card = _upright_card()
    if orientation != 1:
        undo = UNDO_ORIENTATION[orientation]
        card = card.transpose(INVERSE.get(undo, undo))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(card, "JPEG", quality=95, exif=exif.tobytes())


def _multipart(fields: list[tuple[str, str | None, bytes, str | None]], boundary: str = "chaoqingboundary") -> tuple[bytes, str]:
    parts = []
    for name, filename, data, content_type in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        parts.append(head.encode() + b"\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# -- the corpus ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile (or merely odd) request and what it must get."""

    body: bytes
    content_type: str | None = "image/png"
    query: str = ""
    status: int = 200
    code: str = ""  # the error code for a 4xx
    size: tuple[int, int] | None = None  # (width, height) of a 200's image
    check: Callable[[bytes], None] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _colour_at(image: np.ndarray, x_fraction: float, y_fraction: float) -> np.ndarray:
    height, width = image.shape[:2]
    return image[int(height * y_fraction), int(width * x_fraction), :3].astype(int)


def _check_upright(data: bytes) -> None:
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(_colour_at(image, 0.1, 0.1) - RED).max() < 40, "red block not top left"
    assert np.abs(_colour_at(image, 0.9, 0.9) - BLUE).max() < 40, "blue block not bottom right"
    assert np.abs(_colour_at(image, 0.9, 0.1) - WHITE).max() < 40
    assert np.abs(_colour_at(image, 0.1, 0.9) - WHITE).max() < 40


def _check_first_frame_red(data: bytes) -> None:
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(image.reshape(-1, 3).mean(axis=0) - RED).max() < 2


def _check_transparency_kept(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGBA", image.mode
    pixels = np.asarray(image)
    assert pixels[:, : pixels.shape[1] // 2 - 4, 3].max() == 0, "the transparent half stays transparent"
    assert pixels[:, pixels.shape[1] // 2 + 4 :, 3].min() == 255
    assert np.abs(_colour_at(pixels, 0.9, 0.5) - GREEN).max() < 2


def _check_sixteen_bit(data: bytes) -> None:
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint16, "16-bit in, 16-bit PNG out"


def _check_cmyk_red(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 80 and blue < 80, (red, green, blue)


def _corpus() -> dict[str, Case]:
    png = _save(Image.fromarray(_smooth(40, 30)), "PNG")
    jpeg = _save(Image.fromarray(_noise(120, 90)), "JPEG", quality=90)
    webp = _save(Image.fromarray(_noise(120, 90)), "WEBP", quality=80)
    gif = _save(Image.fromarray(_smooth(40, 30)).convert("P"), "GIF")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    html = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
    cases: dict[str, Case] = {
        # not images at all
        "empty body": Case(b"", status=400, code="invalid_image"),
        "text named .jpg": Case(b"just some text, honest", "image/jpeg", status=400, code="invalid_image"),
        "HTML named .jpg": Case(html, "image/jpeg", status=400, code="invalid_image"),
        "SVG named .jpg": Case(svg, "image/jpeg", status=400, code="invalid_image"),
        "SVG as image/svg+xml": Case(svg, "image/svg+xml", status=415, code="unsupported_media_type"),
        "EPS (Pillow would run Ghostscript)": Case(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "image/jpeg",
                                                   status=400, code="invalid_image"),
        "JPEG magic only": Case(b"\xff\xd8\xff", "image/jpeg", status=400, code="invalid_image"),
        "PNG signature only": Case(b"\x89PNG\r\n\x1a\n", status=400, code="invalid_image"),
        # truncated
        "truncated JPEG (60%)": Case(jpeg[: len(jpeg) * 6 // 10], "image/jpeg", status=400, code="invalid_image"),
        "truncated PNG (50%)": Case(png[: len(png) // 2], status=400, code="invalid_image"),
        "truncated WebP (50%)": Case(webp[: len(webp) // 2], "image/webp", status=400, code="invalid_image"),
        "truncated GIF (50%)": Case(gif[: len(gif) // 2], "image/gif", status=400, code="invalid_image"),
        "truncated 16-bit PNG": Case(_sixteen_bit_png(64, 64)[:4000], status=400, code="invalid_image"),
        # headers that lie about the size
        "PNG header claiming 60000x60000 (bomb)": Case(_handmade_png(60000, 60000), status=413, code="image_too_large"),
        "JPEG header claiming 65500x65500": Case(_jpeg_claiming(65500, 65500), "image/jpeg", status=413, code="image_too_large"),
        "GIF header claiming 65535x65535": Case(_gif_claiming(65535, 65535), "image/gif", status=413, code="image_too_large"),
        "PNG with zero width": Case(_handmade_png(0, 10), status=400, code="invalid_image"),
        "PNG with zero height": Case(_handmade_png(10, 0), status=400, code="invalid_image"),
        # valid, but over the limits
        "valid PNG over the input pixel limit": Case(_save(Image.new("RGB", (2100, 2000)), "PNG"), status=413, code="image_too_large"),
        "body over the byte limit": Case(b"\x89PNG\r\n\x1a\n" + bytes(LIMITS.max_body_bytes), status=413, code="image_too_large"),
        "output over the output pixel limit": Case(_save(Image.new("RGB", (1500, 1500)), "PNG"), query="?scale=4",
                                                   status=413, code="image_too_large"),
        # valid and odd: a correct image back
        "1x1 PNG": Case(_save(Image.new("RGB", (1, 1), RED), "PNG"), query="?scale=2", size=(2, 2)),
        "3x2 PNG": Case(_save(Image.fromarray(_noise(3, 2)), "PNG"), query="?scale=4", size=(12, 8)),
        "2x3 JPEG": Case(_save(Image.fromarray(_noise(2, 3)), "JPEG"), "image/jpeg", query="?scale=3", size=(6, 9)),
        "1x3000 PNG (extreme aspect)": Case(_save(Image.fromarray(_noise(1, 3000)), "PNG"), query="?scale=2", size=(2, 6000)),
        "3000x1 PNG (extreme aspect)": Case(_save(Image.fromarray(_noise(3000, 1)), "PNG"), query="?scale=2", size=(6000, 2)),
        "4x1999 WebP (extreme aspect)": Case(_save(Image.fromarray(_noise(4, 1999)), "WEBP", lossless=True), "image/webp",
                                             query="?scale=1.5", size=(6, 2998)),
        "large valid photo under the limits": Case(_save(Image.fromarray(_smooth(1600, 1200)), "JPEG", quality=85), "image/jpeg",
                                                   query="?scale=2", size=(3200, 2400)),
        "CMYK JPEG": Case(_save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), "image/jpeg", query="?scale=2",
                          size=(80, 60), check=_check_cmyk_red),
        "16-bit RGB PNG": Case(_sixteen_bit_png(40, 30), query="?scale=2", size=(80, 60), check=_check_sixteen_bit),
        "16-bit grayscale PNG": Case(_save(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"), query="?scale=2",
                                     size=(80, 60), check=_check_sixteen_bit),
        "palette PNG with transparency": Case(_palette_with_transparency(), query="?scale=2", size=(80, 60),
                                              check=_check_transparency_kept),
        "animated GIF": Case(_animation("GIF"), "image/gif", query="?scale=2", size=(60, 40), check=_check_first_frame_red),
        "animated PNG (APNG)": Case(_animation("PNG"), query="?scale=2", size=(60, 40), check=_check_first_frame_red),
        "grayscale PNG": Case(_save(Image.fromarray(_smooth(40, 30)).convert("L"), "PNG"), query="?scale=2", size=(80, 60)),
        "1-bit PNG": Case(_save(Image.fromarray(_smooth(40, 30)).convert("1"), "PNG"), query="?scale=2", size=(80, 60)),
        "BMP": Case(_save(Image.fromarray(_smooth(40, 30)), "BMP"), "image/bmp", query="?scale=2", size=(80, 60)),
        "TIFF": Case(_save(Image.fromarray(_smooth(40, 30)), "TIFF"), "image/tiff", query="?scale=2", size=(80, 60)),
        # Content-Type that does not match, or is missing
        "PNG declared image/jpeg (the bytes decide)": Case(png, "image/jpeg", query="?scale=2", size=(80, 60)),
        "PNG as application/octet-stream": Case(png, "application/octet-stream", query="?scale=2", size=(80, 60)),
        "PNG as IMAGE/PNG; charset=utf-8": Case(png, "IMAGE/PNG; charset=utf-8", query="?scale=2", size=(80, 60)),
        "PNG as text/plain": Case(png, "text/plain", status=415, code="unsupported_media_type"),
        "PNG as application/x-www-form-urlencoded": Case(png, "application/x-www-form-urlencoded", status=415,
                                                         code="unsupported_media_type"),
        "PNG without Content-Type": Case(png, None, status=415, code="unsupported_media_type"),
        # absurd query values (test_gateway.py covers nan, -1, 1e9, 0, inf, quality 0/101, ...)
        "scale=1e309": Case(png, query="?scale=1e309", status=400, code="invalid_parameter"),
        "scale=0x2": Case(png, query="?scale=0x2", status=400, code="invalid_parameter"),
        "scale=-0": Case(png, query="?scale=-0", status=400, code="invalid_parameter"),
        "scale=2e0": Case(png, query="?scale=2e0", size=(80, 60)),
        "scale= 3 (spaces)": Case(png, query="?scale=%203%20", size=(120, 90)),
        "quality=² (a digit int() refuses)": Case(png, query="?format=jpeg&quality=%C2%B2", status=400, code="invalid_parameter"),
        "quality of 5000 digits": Case(png, query="?format=jpeg&quality=" + "9" * 5000, status=400, code="invalid_parameter"),
        "quality=-5": Case(png, query="?format=jpeg&quality=-5", status=400, code="invalid_parameter"),
        "quality=+50": Case(png, query="?format=jpeg&quality=%2B50&scale=2", size=(80, 60)),
        "format=../../etc/passwd": Case(png, query="?format=../../etc/passwd", status=400, code="invalid_parameter"),
        "preset=NUL byte": Case(png, query="?preset=%00", status=400, code="invalid_parameter"),
        "faces=TRUE": Case(png, query="?faces=TRUE&scale=2", size=(80, 60)),
        "unknown parameters are ignored": Case(png, query="?colour=blue&scale=2", size=(80, 60)),
        "X-Request-Id of 1000 characters": Case(png, query="?scale=2", size=(80, 60), headers={"X-Request-Id": "a" * 1000}),
    }
    for orientation in range(1, 9):
        cases[f"EXIF orientation {orientation}"] = Case(
            _exif_jpeg(orientation), "image/jpeg", query="?scale=2&faces=false", size=(128, 80), check=_check_upright
        )
    multipart_cases = {
        "multipart without the image field": (
            [("photo", "a.png", png, "image/png")], 400, "invalid_parameter", None),
        "multipart with an empty image field": ([("image", "a.png", b"", "image/png")], 400, "invalid_image", None),
        "multipart: text named photo.jpg": (
            [("image", "photo.jpg", b"hello", "image/jpeg")], 400, "invalid_image", None),
        "multipart: SVG named photo.jpg": ([("image", "photo.jpg", svg, "image/jpeg")], 400, "invalid_image", None),
        "multipart: PNG with other fields around it": (
            [("note", None, b"x" * 1000, None), ("image", "a.png", png, "image/png"), ("more", None, b"y", None)],
            200, "", (80, 60)),
        "multipart: two image fields (the first wins)": (
            [("image", "a.png", png, "image/png"), ("image", "b.png", b"junk", "image/png")], 200, "", (80, 60)),
    }
    for label, (fields, status, code, size) in multipart_cases.items():
        body, content_type = _multipart(fields)
        cases[label] = Case(body, content_type, query="?scale=2", status=status, code=code, size=size)
    body, _ = _multipart([("image", "a.png", png, "image/png")])
    cases["multipart without a boundary"] = Case(body, "multipart/form-data", status=400, code="invalid_parameter")
    cases["multipart that is not multipart"] = Case(b"\x00\x01garbage", "multipart/form-data; boundary=x", status=400,
                                                    code="invalid_parameter")
    cases["multipart never closed"] = Case(body[: len(body) // 2], "multipart/form-data; boundary=chaoqingboundary",
                                           status=400, code="invalid_parameter")
    return cases


CORPUS = _corpus()


@pytest.fixture
def hostile_gateway(start_sim_gateway: StartGateway) -> SimGateway:
    return start_sim_gateway(upscale_ms=5, detect_ms=2, face_ms=5, faces=2, limits=LIMITS)


def _assert_documented_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}, payload
    assert payload["error"]["code"] == code, payload
    assert code in DOCUMENTED_CODES[status]
    assert "Traceback" not in response.text and 'File "' not in response.text


@pytest.mark.parametrize("label", list(CORPUS))
def test_hostile_input_gets_an_image_or_its_documented_error(hostile_gateway: SimGateway, label: str) -> None:
    case = CORPUS[label]
    headers = dict(case.headers)
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    started = time.monotonic()
    response = requests.post(f"{hostile_gateway.url}/v1/enhance{case.query}", data=case.body, headers=headers, timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
    if case.status != 200:
        _assert_documented_error(response, case.status, case.code)
        assert elapsed < ERROR_WITHIN_S, f"{label}: refused after {elapsed:.2f} s"
        return
    assert response.status_code == 200, f"{label}: {response.text[:300]}"
    assert elapsed < ANSWER_WITHIN_S
    assert response.headers["Content-Type"] in ("image/png", "image/jpeg", "image/webp")
    output = Image.open(io.BytesIO(response.content))
    assert output.size == case.size, f"{label}: {output.size}"
    assert response.headers["X-Output-Size"] == f"{case.size[0]}x{case.size[1]}" if case.size else True
    if case.check is not None:
        case.check(response.content)
    if "X-Request-Id" in case.headers:
        assert response.headers["X-Request-Id"] != case.headers["X-Request-Id"] and len(response.headers["X-Request-Id"]) == 32


def test_after_the_whole_corpus_the_gateway_is_clean(hostile_gateway: SimGateway) -> None:
    for label, case in CORPUS.items():
        headers = {"Content-Type": case.content_type} if case.content_type else {}
        response = requests.post(f"{hostile_gateway.url}/v1/enhance{case.query}", data=case.body, headers=headers, timeout=30)
        assert response.status_code == case.status, label
    assert hostile_gateway.server.gateway.in_flight == 0
    metrics = requests.get(f"{hostile_gateway.url}/metrics", timeout=5).text
    assert 'status="500"' not in metrics
    photo = _save(Image.fromarray(_smooth(40, 30)), "PNG")
    assert requests.post(f"{hostile_gateway.url}/v1/enhance", data=photo, headers={"Content-Type": "image/png"},
                         timeout=30).status_code == 200


# -- the model server ----------------------------------------------------------------------


def _infer_bytes(header: Any, binary: bytes = b"", *, header_length: str | None = "auto", raw_header: bytes | None = None) -> tuple[bytes, dict[str, str]]:
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if header_length == "auto":
        headers["Inference-Header-Content-Length"] = str(len(encoded))
    elif header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    return encoded + binary, headers


def _image_entry(shape: list[Any], size: Any = None, datatype: str = "UINT8") -> dict[str, Any]:
    return {"name": "image", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


MODEL_SERVER_CORPUS: dict[str, tuple[bytes, dict[str, str], int]] = {
    "header claims 100000x100000 with 48 bytes": (
        *_infer_bytes({"inputs": [_image_entry([1, 100000, 100000, 3], 48)]}, b"\0" * 48), 400),
    "shape with a negative dimension": (*_infer_bytes({"inputs": [_image_entry([1, -4, 4, 3], 48)]}, b"\0" * 48), 400),
    "shape of floats": (*_infer_bytes({"inputs": [_image_entry([1, 4.0, 4, 3], 48)]}, b"\0" * 48), 400),
    "shape of 2^62 dimensions": (*_infer_bytes({"inputs": [_image_entry([2**62, 2**62, 1, 3], 48)]}, b"\0" * 48), 400),
    "shape of nine dimensions": (*_infer_bytes({"inputs": [_image_entry([1] * 9, 1)]}, b"\0"), 400),
    "binary_data_size negative": (*_infer_bytes({"inputs": [_image_entry([1, 4, 4, 3], -48)]}, b"\0" * 48), 400),
    "binary_data_size a string": (*_infer_bytes({"inputs": [_image_entry([1, 4, 4, 3], "48")]}, b"\0" * 48), 400),
    "unsupported datatype BYTES": (*_infer_bytes({"inputs": [_image_entry([1, 4, 4, 3], 48, "BYTES")]}, b"\0" * 48), 400),
    "header is a JSON list": (*_infer_bytes([1, 2, 3]), 400),
    "header is JSON null": (*_infer_bytes(None), 400),
    "header nested 100000 deep": (*_infer_bytes(None, raw_header=b"[" * 100000), 400),
    "header not UTF-8": (*_infer_bytes(None, raw_header=b'{"inputs": "\xff\xfe"}'), 400),
    "header length negative": (*_infer_bytes({"inputs": []}, header_length="-1"), 400),
    "header length '²'": (*_infer_bytes({"inputs": []}, header_length="\xb2"), 400),
    "header length of 5000 digits": (*_infer_bytes({"inputs": []}, header_length="9" * 5000), 400),
    "header length beyond the body": (*_infer_bytes({"inputs": []}, header_length="99999"), 400),
    "JSON data with NaN for UINT8": (
        *_infer_bytes(None, raw_header=b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,1,1,3],"data":[NaN,1,2]}]}',
                      header_length=None), 400),
    "JSON data out of range for UINT8": (
        *_infer_bytes({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [300, 1, 2]}]},
                      header_length=None), 400),
    "JSON data that is a dict": (
        *_infer_bytes({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": {"a": 1}}]},
                      header_length=None), 400),
    "timeout parameter NaN": (
        *_infer_bytes(None, raw_header=b'{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,1,1,3],"data":[1,1,2]}],'
                                       b'"parameters":{"timeout":NaN}}', header_length=None), 400),
    "timeout parameter a string": (
        *_infer_bytes({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 1, 2]}],
                       "parameters": {"timeout": "soon"}}, header_length=None), 400),
    "batch over max_batch_size": (*_infer_bytes({"inputs": [_image_entry([9, 1, 1, 3], 27)]}, b"\0" * 27), 400),
    "bytes after the last tensor": (*_infer_bytes({"inputs": [_image_entry([1, 1, 1, 3], 3)]}, b"\0" * 10), 400),
}


@pytest.mark.parametrize("label", list(MODEL_SERVER_CORPUS))
def test_hostile_v2_requests_get_400(start_model_server: Callable[..., ModelServer], label: str) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1, max_batch_size=8)
    body, headers, status = MODEL_SERVER_CORPUS[label]
    started = time.monotonic()
    response = requests.post(f"{server.url}/v2/models/sim-upscale-x2/infer", data=body, headers=headers, timeout=10)
    assert response.status_code == status, f"{label}: {response.status_code} {response.text[:300]}"
    assert time.monotonic() - started < ERROR_WITHIN_S
    assert isinstance(response.json()["error"], str) and "Traceback" not in response.text
    good = v2.encode_infer_request({"image": np.zeros((1, 2, 2, 3), np.uint8)}, ["image"])
    after = requests.post(f"{server.url}/v2/models/sim-upscale-x2/infer", data=good.join(), headers=good.http_headers(), timeout=10)
    assert after.status_code == 200


def test_a_chunked_v2_request_is_refused_and_the_connection_closed(start_model_server: Callable[..., ModelServer]) -> None:
    server = start_model_server(["sim-upscale-x2"], sim_latency_ms=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(b"POST /v2/models/sim-upscale-x2/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"10000\r\n" + b"\0" * 4096)
        received = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, head
    assert "Content-Length" in json.loads(body)["error"]


# -- nothing imports on a worker thread ------------------------------------------------------

IMPORT_CHECK = """
import pickle, sys
from gevent import monkey
monkey.patch_all()
import chaoqing.gateway.pipeline
from chaoqing.config import Limits
from chaoqing.gateway.stages.decode import decode_image
from chaoqing.gateway.stages.encode import encode_image
with open(sys.argv[1], "rb") as file:
    bodies = pickle.load(file)
loaded = set(sys.modules)
for body in bodies:
    try:
        image = decode_image(body, Limits())
    except Exception:
        continue
    for output_format in ("png", "jpeg", "webp"):
        encode_image(image.rgb, image.alpha, output_format, 90, image.icc_profile, image.bit_depth)
print(sorted(set(sys.modules) - loaded))
"""


def test_decoding_and_encoding_import_nothing_once_loaded(tmp_path: Any) -> None:
    # Decode and encode run on gevent's threadpool. Once monkey-patched, importlib's module locks
    # are gevent locks and workers importing at the same time deadlock (Pillow loads its format
    # plugins on first use: four concurrent first requests hung a fresh gateway forever).
    import pickle
    import subprocess
    import sys

    corpus = tmp_path / "corpus.pickle"
    corpus.write_bytes(pickle.dumps([case.body for case in CORPUS.values()]))
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(corpus)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"imported while decoding/encoding: {result.stdout}"
