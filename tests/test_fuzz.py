"""Fuzzing with hypothesis, a bounded number of examples per run (CI included), the same
examples every run (conftest.py's "repeatable" profile), so a failure reproduces; for a deeper
run by hand, ``HYPOTHESIS_PROFILE=explore CHAOQING_FUZZ_EXAMPLES=5000`` draws fresh ones.

Targets: the decode path (raw bytes and mutated real images of every accepted format), the
v2 request/response parser and the model server's request handling, and the gateway's query
parameter parsers. Each may answer only with chaoqing's own client errors, never anything
else; what it accepts must be well formed.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from chaoqing.config import Limits
from chaoqing.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidParameter,
    InvalidTensorRequest,
    UnsupportedMediaType,
)
from chaoqing.gateway import app as gateway
from chaoqing.gateway.stages.decode import check_media_type, decode_image
from chaoqing.modelserver.app import (
    ModelServerApp,
    ModelServerOptions,
    _Metrics,
    _Model,
    validate_inputs,
)
from chaoqing.modelserver.runners import RunnerSettings, create_runner
from chaoqing.protocol import v2

pytestmark = pytest.mark.timeout(180)

EXAMPLES = int(os.environ.get("CHAOQING_FUZZ_EXAMPLES", "300"))  # raise it for a deeper run by hand
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = Limits(max_body_bytes=1_000_000, max_input_pixels=2_000_000, max_output_pixels=8_000_000)


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    succeeded, sixteen_bit = cv2.imencode(".png", rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16))
    assert succeeded
    return [
        _save(rgb, "PNG"),
        _save(rgb, "JPEG", quality=80, exif=exif.tobytes()),
        _save(rgb, "JPEG", progressive=True),
        _save(rgb, "WEBP", quality=70),
        _save(rgb.convert("RGBA"), "WEBP", lossless=True),
        _save(rgb.convert("P"), "GIF"),
        _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        _save(rgb, "BMP"),
        _save(rgb, "TIFF"),
        _save(rgb, "TIFF", compression="tiff_lzw"),
        _save(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG"),
        _save(rgb.convert("LA"), "PNG"),
        sixteen_bit.tobytes(),
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A real file with bytes overwritten, inserted, deleted, and maybe cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["overwrite", "insert", "delete", "extreme"]))
        if action == "overwrite" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete" and data:
            del data[position : position + draw(st.integers(1, 16))]
        elif action == "extreme" and len(data) >= position + 4:
            data[position : position + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"]))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _check_decoded(data: bytes) -> None:
    try:
        decoded = decode_image(data, LIMITS)
    except (InvalidImage, ImageTooLarge):
        return
    assert decoded.rgb.ndim == 3 and decoded.rgb.shape[2] == 3
    assert decoded.rgb.dtype in (np.uint8, np.uint16) and decoded.rgb.flags.c_contiguous
    assert decoded.width * decoded.height <= LIMITS.max_input_pixels
    if decoded.alpha is not None:
        assert decoded.alpha.shape == decoded.rgb.shape[:2] and decoded.alpha.dtype == decoded.rgb.dtype


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
def test_decode_of_arbitrary_bytes(data: bytes) -> None:
    _check_decoded(data)


@FUZZ
@given(mutated(SEEDS))
def test_decode_of_mutated_images(data: bytes) -> None:
    _check_decoded(data)


@FUZZ
@given(st.one_of(st.none(), st.text(max_size=80)), st.binary(max_size=64))
@example("image/png; charset=utf-8", b"\x89PNG\r\n\x1a\n")
def test_media_type_check(declared: str | None, data: bytes) -> None:
    try:
        media_type = check_media_type(declared, data)
    except (UnsupportedMediaType, InvalidImage):
        return
    assert media_type.startswith("image/")


# -- the v2 parser -------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
DATATYPES = st.sampled_from([*v2.DATATYPES, "BYTES", "BF16", "uint8", ""]) | JSON_VALUES


@st.composite
def tensor_entries(draw: st.DrawFn) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": draw(st.sampled_from(["image", "other", ""]) | JSON_VALUES),
        "datatype": draw(DATATYPES),
        "shape": draw(st.lists(st.integers(-2, 6), max_size=5) | JSON_VALUES),
    }
    if draw(st.booleans()):
        entry["parameters"] = {"binary_data_size": draw(st.integers(-1, 400) | JSON_VALUES)}
    else:
        entry["data"] = draw(st.lists(st.integers(-1, 300) | st.floats(), max_size=40) | JSON_VALUES)
    return entry


@st.composite
def infer_messages(draw: st.DrawFn) -> tuple[bytes, int | None]:
    header: dict[str, Any] = {"inputs": draw(st.lists(tensor_entries(), max_size=3))}
    if draw(st.booleans()):
        header["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=3) | JSON_VALUES)
    if draw(st.booleans()):
        header["parameters"] = draw(st.dictionaries(st.sampled_from(["timeout", "binary_data_output", "x"]), JSON_VALUES, max_size=3))
    if draw(st.booleans()):
        header["id"] = draw(JSON_VALUES)
    encoded = json.dumps(header).encode()
    binary = draw(st.binary(max_size=512))
    header_length = draw(st.sampled_from([len(encoded), None]) | st.integers(-5, len(encoded) + 600))
    return encoded + binary, header_length


def _good_messages() -> list[bytes]:
    image = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    binary = v2.encode_infer_request({"image": image}, ["image"], request_id="r")
    return [binary.join()]


GOOD_HEADER_LENGTH = v2.encode_infer_request(
    {"image": np.zeros((2, 3, 4, 3), np.uint8)}, ["image"], request_id="r"
).header_length


def _sim_spec() -> Any:
    return create_runner("sim-upscale-x2", RunnerSettings()).spec


SIM_SPEC = _sim_spec()


def _check_request(body: bytes, header_length: int | None) -> None:
    try:
        request = v2.decode_infer_request(body, header_length)
    except v2.MalformedMessage:
        return
    assert request.inputs and all(isinstance(array, np.ndarray) for array in request.inputs.values())
    try:
        validate_inputs(SIM_SPEC, request.inputs, 4096 * 4096)
    except InvalidTensorRequest:
        return
    assert request.inputs["image"].dtype == np.uint8 and request.inputs["image"].ndim == 4


@FUZZ
@given(infer_messages())
def test_v2_request_parser_on_structured_messages(message: tuple[bytes, int | None]) -> None:
    _check_request(*message)


@FUZZ
@given(mutated(_good_messages()), st.one_of(st.none(), st.just(GOOD_HEADER_LENGTH), st.integers(-3, 400)))
def test_v2_request_parser_on_mutated_messages(body: bytes, header_length: int | None) -> None:
    _check_request(body, header_length)


@FUZZ
@given(st.binary(max_size=1024), st.one_of(st.none(), st.integers(-3, 1100)))
@example(b"[" * 50000, None)
def test_v2_response_parser_on_arbitrary_bytes(body: bytes, header_length: int | None) -> None:
    try:
        outputs = v2.decode_infer_response(body, header_length)
    except v2.MalformedMessage:
        return
    assert all(isinstance(array, np.ndarray) for array in outputs.values())


# -- the model server's request handling, whole (no sockets) -------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status, self.headers = status, headers
        return lambda data: None


class _ImmediateBatcher:
    """Stands in for the batcher: runs the sim runner inline (the HTTP handling is the target)."""

    def __init__(self) -> None:
        self.runner = create_runner("sim-upscale-x2", RunnerSettings())

    def infer(self, inputs: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        return self.runner.run(inputs)


MODEL_APP = ModelServerApp(
    ModelServerOptions(models=("sim-upscale-x2",), max_request_bytes=100_000),
    {"sim-upscale-x2": _Model("sim-upscale-x2", "ready", "", SIM_SPEC, _ImmediateBatcher())},  # type: ignore[arg-type]
    _Metrics(),
)


@FUZZ
@given(
    st.one_of(infer_messages(), st.tuples(mutated(_good_messages()), st.just(GOOD_HEADER_LENGTH))),
    st.one_of(st.none(), st.text(alphabet=st.characters(max_codepoint=255), max_size=8)),
    st.sampled_from(["/v2/models/sim-upscale-x2/infer", "/v2/models/sim-upscale-x2/versions/1/infer",
                     "/v2/models/nope/infer", "/v2/models/sim-upscale-x2/versions/2/infer"]),
)
def test_model_server_answers_every_request_with_a_json_4xx_or_200(
    message: tuple[bytes, int | None], header_override: str | None, path: str
) -> None:
    body, header_length = message
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
    }
    if header_override is not None:
        environ["HTTP_INFERENCE_HEADER_CONTENT_LENGTH"] = header_override
    elif header_length is not None:
        environ["HTTP_INFERENCE_HEADER_CONTENT_LENGTH"] = str(header_length)
    recorder = _Recorder()
    chunks = MODEL_APP(environ, recorder)
    status = int(recorder.status.split()[0])
    assert status in (200, 400, 404, 413), (status, b"".join(bytes(chunk) for chunk in chunks)[:300])
    if status != 200:
        assert isinstance(json.loads(b"".join(bytes(chunk) for chunk in chunks))["error"], str)


# -- the gateway's query parameters --------------------------------------------------------

QUERY_TEXT = st.one_of(
    st.none(), st.text(max_size=30), st.from_regex(r"\A[+-]?[0-9]{0,6}(\.[0-9]{0,4})?([eE][+-]?[0-9]{1,4})?\Z"),
    st.sampled_from(["9" * 5000, "1" * 4301, "+" + "0" * 4400 + "5"]),  # past int()'s 4300-digit limit
)


@FUZZ
@given(QUERY_TEXT, QUERY_TEXT, QUERY_TEXT, QUERY_TEXT)
@example("²", "²", "²", "²")
def test_query_parameter_parsers(scale: str | None, quality: str | None, faces: str | None, output_format: str | None) -> None:
    try:
        parsed_scale = gateway._parse_scale(scale, 2.0)
        assert math.isfinite(parsed_scale) and 1.0 <= parsed_scale <= 4.0
    except InvalidParameter:
        pass
    try:
        parsed_quality = gateway._parse_quality(quality)
        assert parsed_quality is None or 1 <= parsed_quality <= 100
    except InvalidParameter:
        pass
    try:
        assert gateway._parse_bool(faces, "faces", True) in (True, False)
    except InvalidParameter:
        pass
    try:
        assert gateway._parse_choice(output_format, "format", gateway.OUTPUT_FORMATS) in (None, *gateway.OUTPUT_FORMATS)
    except InvalidParameter:
        pass
