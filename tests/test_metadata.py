"""EXIF, XMP and ICC through the real HTTP gateway (sim model servers): kept by default in
JPEG, PNG and WebP, made true of the output (orientation 1 with the pixels turned, the output's
size), stripped on request (all of it, or only GPS), bounded against hostile input. Also the
headers that say face detection was skipped, and the default output format.

Every photo is built here with Pillow: an EXIF block with Make/Model, DateTimeOriginal, a GPS
IFD and Orientation 6; an XMP packet; an ICC profile (Pillow's sRGB, or a matrix profile built
here whose red and green primaries are swapped, to see colours converted when it is stripped).
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import SimGateway
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

from chaoqing.batch import BatchJob, plan_outputs, run_batch
from chaoqing.config import Config, EncodeSettings, Limits, load_config
from chaoqing.errors import ConfigError
from chaoqing.gateway.stages.decode import decode_image
from chaoqing.gateway.stages.encode import choose_output_format
from chaoqing.gateway.stages.metadata import (
    NO_METADATA,
    OutputMetadata,
    PhotoMetadata,
    output_metadata,
    read_metadata,
)

pytestmark = pytest.mark.timeout(120)

StartGateway = Callable[..., SimGateway]

ORIENTATION, MAKE, MODEL, DATE_TIME_ORIGINAL = 0x0112, 0x010F, 0x0110, 0x9003
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
PIXEL_X, PIXEL_Y = 0xA002, 0xA003
GPS_LATITUDE = 2
STORED_WIDTH, STORED_HEIGHT = 64, 40  # as stored; orientation 6 shows it 40 wide, 64 high
SCALE = 2
RED, BLUE = (230, 20, 20), (20, 20, 230)
UPLOAD_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
OUTPUT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
CREATOR_TOOL = "chaoqing metadata test"

XMP_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
    'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/" '
    f'xmp:CreatorTool="{CREATOR_TOOL}" tiff:Orientation="6" exif:PixelXDimension="{STORED_WIDTH}" '
    'exif:GPSLatitude="52,22.125N">'
    f"<exif:PixelYDimension>{STORED_HEIGHT}</exif:PixelYDimension>"
    "<exif:GPSLongitude>4,53.5E</exif:GPSLongitude>"
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
    '<?xpacket end="w"?>'
)


# -- building the photos ---------------------------------------------------------------------


def _camera_exif(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[MAKE] = "Chaoqing Optics"
    exif[MODEL] = "Test Camera 1"
    exif[ORIENTATION] = orientation
    exif[EXIF_IFD] = {DATE_TIME_ORIGINAL: "2026:05:01 12:34:56", PIXEL_X: STORED_WIDTH, PIXEL_Y: STORED_HEIGHT}
    exif[GPS_IFD] = {1: "N", GPS_LATITUDE: (52.0, 22.0, 7.5), 3: "E", 4: (4.0, 53.0, 30.0)}
    return exif.tobytes()


# LittleCMS stamps a profile with the time it was made: make it once, compare with that
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _srgb_profile() -> bytes:
    return SRGB_PROFILE


def _s15_fixed_16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _swapped_primaries_profile() -> bytes:
    """An ICC v2 RGB matrix/TRC display profile whose red primary is sRGB's green and whose
    green primary is sRGB's red (D50-adapted colorants, linear curves): a pixel that is pure
    red in it is pure green in sRGB. Built byte by byte (ICC.1:2001-04 §6)."""
    colorants = {b"rXYZ": (0.3851, 0.7169, 0.0971), b"gXYZ": (0.4361, 0.2225, 0.0139),
                 b"bXYZ": (0.1431, 0.0606, 0.7141), b"wtpt": (0.9642, 1.0, 0.8249)}
    tags: list[tuple[bytes, bytes]] = []
    description = b"swapped red and green\x00"
    tags.append((b"desc", b"desc" + b"\x00" * 4 + struct.pack(">I", len(description)) + description
                 + b"\x00" * 8 + b"\x00" * 3 + b"\x00" * 67))
    for signature, xyz in colorants.items():
        tags.append((signature, b"XYZ " + b"\x00" * 4 + b"".join(_s15_fixed_16(value) for value in xyz)))
    linear = b"curv" + b"\x00" * 4 + struct.pack(">I", 1) + struct.pack(">H", 0x0100) + b"\x00\x00"
    tags += [(b"rTRC", linear), (b"gTRC", linear), (b"bTRC", linear)]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, data = [struct.pack(">I", len(tags))], b""
    for signature, body in tags:
        table.append(signature + struct.pack(">II", offset + len(data), len(body)))
        data += body + b"\x00" * (-len(body) % 4)
    size = 128 + table_size + len(data)
    header = (struct.pack(">I", size) + b"\x00" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\x00" * 24
              + struct.pack(">I", 0) + b"".join(_s15_fixed_16(value) for value in (0.9642, 1.0, 0.8249))
              + b"\x00" * 48)
    assert len(header) == 128
    return header + b"".join(table) + data


def _stored_card() -> Image.Image:
    """The photo as a camera held sideways stores it: red on the left, blue on the right. With
    orientation 6 (turn 90° clockwise to view), red is on top."""
    card = np.zeros((STORED_HEIGHT, STORED_WIDTH, 3), np.uint8)
    card[:, : STORED_WIDTH // 2] = RED
    card[:, STORED_WIDTH // 2 :] = BLUE
    return Image.fromarray(card)


def _photo(fmt: str, *, exif: bytes | None = None, xmp: str | None = XMP_PACKET, icc: bytes | None = None,
           image: Image.Image | None = None) -> bytes:
    options: dict[str, Any] = {"exif": _camera_exif() if exif is None else exif}
    options["icc_profile"] = _srgb_profile() if icc is None else icc
    if fmt == "PNG":
        if xmp is not None:
            info = PngInfo()
            info.add_itxt("XML:com.adobe.xmp", xmp, zip=False)
            options["pnginfo"] = info
    elif xmp is not None:
        options["xmp"] = xmp.encode("utf-8")
    if fmt == "JPEG":
        options["quality"] = 95
    if fmt == "WEBP":
        options["lossless"] = True
    buffer = io.BytesIO()
    (image or _stored_card()).save(buffer, fmt, **options)
    return buffer.getvalue()


# -- reading the answers ---------------------------------------------------------------------


def _post(gateway: SimGateway, body: bytes, media_type: str, query: str = "") -> requests.Response:
    separator = "&" if query else ""
    return requests.post(f"{gateway.url}/v1/enhance?scale={SCALE}&faces=false{separator}{query}", data=body,
                         headers={"Content-Type": media_type}, timeout=60)


def _open(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text[:300]
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def _xmp_text(image: Image.Image) -> str:
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
    return xmp.decode("utf-8") if isinstance(xmp, bytes) else str(xmp)


def _mean_colour(image: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    left, top, right, bottom = box
    return pixels[int(top * height) : int(bottom * height), int(left * width) : int(right * width)].mean(axis=(0, 1))


def _check_upright(image: Image.Image) -> None:
    """Orientation 6 applied: 40×64 shown, ×2; red on top, blue below."""
    assert image.size == (STORED_HEIGHT * SCALE, STORED_WIDTH * SCALE)
    assert np.allclose(_mean_colour(image, (0.1, 0.1, 0.9, 0.4)), RED, atol=12)
    assert np.allclose(_mean_colour(image, (0.1, 0.6, 0.9, 0.9)), BLUE, atol=12)


@pytest.fixture
def gateway(start_sim_gateway: StartGateway) -> SimGateway:
    return start_sim_gateway(upscale_ms=5, detect_ms=5, face_ms=5, faces=1)


# -- kept by default -------------------------------------------------------------------------


@pytest.mark.parametrize("upload", ["JPEG", "PNG", "WEBP"])
def test_exif_xmp_and_icc_round_trip_with_the_orientation_applied(gateway: SimGateway, upload: str) -> None:
    profile = _srgb_profile()
    response = _post(gateway, _photo(upload, icc=profile), UPLOAD_TYPES[upload])
    image = _open(response)
    assert response.headers["Content-Type"] == OUTPUT_TYPES[upload.lower()]  # the default: the same format
    _check_upright(image)
    exif = image.getexif()
    assert exif[ORIENTATION] == 1
    assert (exif[MAKE], exif[MODEL]) == ("Chaoqing Optics", "Test Camera 1")
    exif_ifd = exif.get_ifd(EXIF_IFD)
    assert exif_ifd[DATE_TIME_ORIGINAL] == "2026:05:01 12:34:56"
    assert (exif_ifd[PIXEL_X], exif_ifd[PIXEL_Y]) == image.size
    assert exif.get_ifd(GPS_IFD)[GPS_LATITUDE] == (52.0, 22.0, 7.5)
    xmp = _xmp_text(image)
    assert CREATOR_TOOL in xmp and 'tiff:Orientation="1"' in xmp and "GPSLongitude" in xmp
    assert f'exif:PixelXDimension="{image.width}"' in xmp
    assert f"<exif:PixelYDimension>{image.height}</exif:PixelYDimension>" in xmp
    assert image.info.get("icc_profile") == profile


@pytest.mark.parametrize("output_format", ["jpeg", "png", "webp"])
def test_metadata_crosses_formats(gateway: SimGateway, output_format: str) -> None:
    image = _open(_post(gateway, _photo("JPEG"), "image/jpeg", f"format={output_format}"))
    assert image.getexif()[MODEL] == "Test Camera 1" and CREATOR_TOOL in _xmp_text(image)
    assert image.info.get("icc_profile") == _srgb_profile()


def test_a_sixteen_bit_png_keeps_its_metadata(gateway: SimGateway) -> None:
    import cv2

    from chaoqing.gateway.stages.encode import encode_image

    card = np.asarray(_stored_card()).astype(np.uint16) * 257
    data = encode_image(card, None, "png", icc_profile=_srgb_profile(), bit_depth=16, exif=_camera_exif(),
                        xmp=XMP_PACKET.encode("utf-8"))
    response = _post(gateway, data, "image/png")
    image = _open(response)
    pixels = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels.dtype == np.uint16
    _check_upright(image)
    assert image.getexif()[ORIENTATION] == 1 and image.getexif().get_ifd(GPS_IFD)
    assert 'tiff:Orientation="1"' in _xmp_text(image) and image.info.get("icc_profile") == _srgb_profile()


# -- stripped on request ---------------------------------------------------------------------


@pytest.mark.parametrize("upload", ["JPEG", "PNG", "WEBP"])
def test_strip_metadata_removes_exif_xmp_and_icc(gateway: SimGateway, upload: str) -> None:
    image = _open(_post(gateway, _photo(upload), UPLOAD_TYPES[upload], "strip_metadata=true"))
    _check_upright(image)  # the orientation is still applied to the pixels
    assert "exif" not in image.info and _xmp_text(image) == "" and "icc_profile" not in image.info


def test_strip_metadata_converts_the_colours_to_srgb(gateway: SimGateway) -> None:
    """Without its profile a viewer takes the pixels as sRGB: stripped, they are converted first."""
    profile = _swapped_primaries_profile()
    red_card = Image.new("RGB", (32, 32), (255, 0, 0))
    body = _photo("PNG", icc=profile, image=red_card)
    kept = _open(_post(gateway, body, "image/png"))
    assert kept.info["icc_profile"] == profile
    assert np.allclose(_mean_colour(kept, (0, 0, 1, 1)), (255, 0, 0), atol=2)
    stripped = _open(_post(gateway, body, "image/png", "strip_metadata=true"))
    assert "icc_profile" not in stripped.info
    red, green, blue = _mean_colour(stripped, (0, 0, 1, 1))
    assert green > 200 and red < 60 and blue < 60  # this profile's red is sRGB's green


@pytest.mark.parametrize("upload", ["JPEG", "PNG", "WEBP"])
def test_strip_gps_removes_only_the_positions(gateway: SimGateway, upload: str) -> None:
    image = _open(_post(gateway, _photo(upload), UPLOAD_TYPES[upload], "strip_gps=true"))
    exif = image.getexif()
    assert GPS_IFD not in exif and not exif.get_ifd(GPS_IFD)
    assert exif[MODEL] == "Test Camera 1" and exif.get_ifd(EXIF_IFD)[DATE_TIME_ORIGINAL] == "2026:05:01 12:34:56"
    xmp = _xmp_text(image)
    assert "GPS" not in xmp and CREATOR_TOOL in xmp and 'tiff:Orientation="1"' in xmp
    assert image.info.get("icc_profile") == _srgb_profile()


def test_bad_strip_values_are_refused(gateway: SimGateway) -> None:
    for query in ("strip_metadata=maybe", "strip_gps=2"):
        response = _post(gateway, _photo("JPEG"), "image/jpeg", query)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_parameter"


def test_the_config_sets_the_defaults_and_the_png_level(start_sim_gateway: StartGateway) -> None:
    stored = EncodeSettings(png_compress_level=0, strip_metadata=True, strip_gps=True)
    gateway = start_sim_gateway(upscale_ms=5, detect_ms=5, face_ms=5, faces=1, encode=stored)
    stripped = _open(_post(gateway, _photo("PNG"), "image/png"))
    assert "exif" not in stripped.info and "icc_profile" not in stripped.info
    kept = _open(_post(gateway, _photo("PNG"), "image/png", "strip_metadata=false"))
    assert kept.getexif()[MODEL] == "Test Camera 1" and GPS_IFD not in kept.getexif()  # strip_gps from the config
    raw_bytes = kept.width * kept.height * 3
    assert len(_post(gateway, _photo("PNG"), "image/png").content) >= raw_bytes  # level 0: stored, not deflated


def test_encode_settings_load_from_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "chaoqing.toml"
    path.write_text("[encode]\npng_compress_level = 6\nstrip_gps = true\n", encoding="utf-8")
    config = load_config(str(path), environ={"CHAOQING_ENCODE__STRIP_METADATA": "true"})
    assert config.encode == EncodeSettings(png_compress_level=6, strip_metadata=True, strip_gps=True)
    assert Config().encode == EncodeSettings()
    with pytest.raises(ConfigError, match="png_compress_level"):
        EncodeSettings(png_compress_level=10)


# -- hostile metadata ------------------------------------------------------------------------


def test_garbage_exif_is_dropped_and_the_photo_enhanced(gateway: SimGateway) -> None:
    rng = np.random.default_rng(15)
    for exif in (b"Exif\x00\x00" + rng.bytes(4000), b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + rng.bytes(200)):
        response = _post(gateway, _photo("JPEG", exif=exif, xmp=XMP_PACKET.replace('tiff:Orientation="6" ', "")),
                         "image/jpeg")
        image = _open(response)
        assert image.size == (STORED_WIDTH * SCALE, STORED_HEIGHT * SCALE)  # no orientation could be read
        assert "exif" not in image.info and CREATOR_TOOL in _xmp_text(image)  # the rest is still carried


def test_oversized_metadata_is_dropped_quickly(gateway: SimGateway) -> None:
    limit = Limits().max_metadata_bytes
    tiff_block = _camera_exif()[6:]
    oversized_exif = tiff_block + b"\x00" * (limit + 1000)  # valid EXIF, padded past the limit
    started = time.monotonic()
    response = _post(gateway, _photo("PNG", exif=oversized_exif), "image/png")
    image = _open(response)
    _check_upright(image)  # its orientation is still read and applied; the block is not carried
    assert "exif" not in image.info and CREATOR_TOOL in _xmp_text(image)
    # an XMP packet built to make a careless pattern match take quadratic time, under the limit
    hostile_xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/">' + " exif:GPSa=\"" * 60000 + "<exif:GPSb>" * 60000
    response = _post(gateway, _photo("PNG", xmp=hostile_xmp), "image/png", "strip_gps=true")
    assert _open(response).getexif()[MODEL] == "Test Camera 1"
    assert time.monotonic() - started < 20.0  # linear work: well under a second each on this machine


def test_metadata_limits_apply_when_reading() -> None:
    body = _photo("PNG", xmp="x" * 5000)
    with Image.open(io.BytesIO(body)) as image:
        image.load()
        small = read_metadata(image, max_bytes=1000)
        assert small.xmp is None and small.exif is not None
        assert any("XMP of 5000" in note for note in small.notes)
    latin_1 = _photo("JPEG", xmp=None)
    with Image.open(io.BytesIO(latin_1)) as image:
        image.info["xmp"] = "caf\xe9".encode("latin-1")
        assert read_metadata(image, max_bytes=1000).notes == ("XMP is not UTF-8 text: not carried",)
    assert output_metadata(NO_METADATA, 10, 10, "jpeg") == OutputMetadata()
    big_xmp = PhotoMetadata(xmp=b"<x>" + b" " * 70000 + b"</x>")
    for_jpeg = output_metadata(big_xmp, 10, 10, "jpeg")
    assert for_jpeg.xmp is None and "does not fit JPEG" in for_jpeg.notes[0]
    assert output_metadata(big_xmp, 10, 10, "png").xmp is not None


# -- headers that don't mislead, and the default format --------------------------------------


def test_skipped_detection_is_said_not_counted_as_zero(gateway: SimGateway) -> None:
    body = _photo("JPEG")
    for query in ("preset=fast", "faces=false"):
        response = requests.post(f"{gateway.url}/v1/enhance?{query}", data=body,
                                 headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200
        assert response.headers["X-Face-Detection"] == "skipped"
        assert "X-Faces-Detected" not in response.headers and "X-Faces-Enhanced" not in response.headers
        assert "X-Face-Detection" in response.headers["Access-Control-Expose-Headers"]
    looked = requests.post(f"{gateway.url}/v1/enhance", data=body, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert looked.headers["X-Face-Detection"] == "done" and looked.headers["X-Faces-Detected"] == "1"


@pytest.mark.parametrize(("upload", "media_type", "expected"), [
    ("JPEG", "image/jpeg", "image/jpeg"), ("WEBP", "image/webp", "image/webp"), ("PNG", "image/png", "image/png"),
    ("GIF", "image/gif", "image/png"), ("BMP", "image/bmp", "image/png"), ("TIFF", "image/tiff", "image/png"),
])
def test_the_default_format_follows_the_input(gateway: SimGateway, upload: str, media_type: str, expected: str) -> None:
    buffer = io.BytesIO()
    _stored_card().save(buffer, upload)
    response = _post(gateway, buffer.getvalue(), media_type)
    assert response.status_code == 200 and response.headers["Content-Type"] == expected


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp", ".png", ".gif", ".bmp", ".tif"])
def test_the_cli_plans_the_suffix_the_gateway_chooses(tmp_path: Path, suffix: str) -> None:
    pillow_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".png": "PNG", ".gif": "GIF",
                     ".bmp": "BMP", ".tif": "TIFF"}[suffix]
    photo = tmp_path / f"photo{suffix}"
    _stored_card().save(photo, pillow_format)
    planned = plan_outputs([photo], tmp_path / "out", None)
    chosen = choose_output_format(None, decode_image(photo.read_bytes(), Limits()))
    assert planned[0].target.suffix == {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}[chosen]


def test_the_cli_summary_says_detection_was_skipped(gateway: SimGateway, tmp_path: Path) -> None:
    photo = tmp_path / "photo.webp"
    photo.write_bytes(_photo("WEBP"))
    job = BatchJob(config=Config(), preset="fast", scale=2.0, server=gateway.url, strip_gps=True)
    report = io.StringIO()
    summary = run_batch(plan_outputs([photo], tmp_path / "out", None), job, stream=report)
    outcome = summary.outcomes[0]
    assert outcome.status == "done" and outcome.faces_detected is None
    assert outcome.written is not None and outcome.written.suffix == ".webp"
    with Image.open(outcome.written) as written:
        assert written.getexif()[MODEL] == "Test Camera 1" and GPS_IFD not in written.getexif()
    text = report.getvalue()
    assert "skipped" in text and "faces not looked for (detection skipped)" in text
