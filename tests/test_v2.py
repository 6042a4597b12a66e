"""The v2 tensor codec: round trips both ways, and every malformed message refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chaoqing.protocol import v2

pytestmark = pytest.mark.timeout(30)


def _image(height: int = 4, width: int = 5) -> np.ndarray:
    return np.arange(height * width * 3, dtype=np.uint8).reshape(1, height, width, 3)


def test_binary_request_round_trip_keeps_tensors_and_request_fields() -> None:
    image = _image()
    boxes = np.array([[1.5, 2.5, 3.5, 4.5]], dtype=np.float32)
    message = v2.encode_infer_request({"image": image, "boxes": boxes}, ["image"], request_id="r1")
    assert message.header_length is not None
    decoded = v2.decode_infer_request(message.join(), message.header_length)
    np.testing.assert_array_equal(decoded.inputs["image"], image)
    np.testing.assert_array_equal(decoded.inputs["boxes"], boxes)
    assert decoded.id == "r1"
    assert decoded.wants_binary("image")
    assert message.http_headers()[v2.HEADER_LENGTH_HEADER] == str(message.header_length)
    assert int(message.http_headers()["Content-Length"]) == len(message.join())


def test_json_request_round_trip() -> None:
    image = _image(2, 3)
    message = v2.encode_infer_request({"image": image}, ["image"], binary_inputs=False, binary_outputs=False)
    assert message.header_length is None
    decoded = v2.decode_infer_request(message.join(), None)
    np.testing.assert_array_equal(decoded.inputs["image"], image)
    assert not decoded.wants_binary("image")


def test_response_honours_per_output_binary_choice() -> None:
    request = v2.InferRequest(
        inputs={"image": _image()},
        outputs=(v2.RequestedOutput("boxes", False), v2.RequestedOutput("scores", True)),
    )
    outputs = {
        "boxes": np.ones((2, 4), np.float32),
        "scores": np.array([0.9, 0.5], np.float32),
        "landmarks": np.zeros((2, 5, 2), np.float32),
    }
    message = v2.encode_infer_response("face-detector", outputs, request)
    header = json.loads(message.join()[: message.header_length])
    by_name = {entry["name"]: entry for entry in header["outputs"]}
    assert set(by_name) == {"boxes", "scores"}, "only the requested outputs come back"
    assert "data" in by_name["boxes"] and "binary_data_size" in by_name["scores"]["parameters"]
    decoded = v2.decode_infer_response(message.join(), message.header_length)
    np.testing.assert_array_equal(decoded["boxes"], outputs["boxes"])
    np.testing.assert_array_equal(decoded["scores"], outputs["scores"])


def test_decoded_binary_tensors_are_read_only_views() -> None:
    message = v2.encode_infer_request({"image": _image()})
    decoded = v2.decode_infer_request(message.join(), message.header_length)
    assert not decoded.inputs["image"].flags.writeable


def test_every_datatype_round_trips() -> None:
    for name, dtype in v2.DATATYPES.items():
        array = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
        message = v2.encode_infer_request({"x": array})
        decoded = v2.decode_infer_request(message.join(), message.header_length)
        assert decoded.inputs["x"].dtype == dtype, name
        np.testing.assert_array_equal(decoded.inputs["x"], array)


def _binary_body(header: dict[str, object], payload: bytes) -> tuple[bytes, int]:
    header_bytes = json.dumps(header).encode()
    return header_bytes + payload, len(header_bytes)


def _input(shape: list[int], datatype: str = "UINT8", **parameters: object) -> dict[str, object]:
    return {"name": "image", "shape": shape, "datatype": datatype, "parameters": parameters}


@pytest.mark.parametrize(
    ("header", "payload", "needle"),
    [
        ({"inputs": [_input([1, 2, 2, 3], binary_data_size=12)]}, b"\x00" * 5, "ends"),
        ({"inputs": [_input([1, 2, 2, 3], binary_data_size=11)]}, b"\x00" * 11, "does not match"),
        ({"inputs": [_input([1, 2, 2, 3], binary_data_size=12)]}, b"\x00" * 20, "follow the last tensor"),
        ({"inputs": [_input([1, 2, 2, 3], "BYTES", binary_data_size=12)]}, b"\x00" * 12, "unsupported datatype"),
        ({"inputs": [_input([1, -2, 2, 3], binary_data_size=12)]}, b"\x00" * 12, "non-negative"),
        ({"inputs": [_input([1, "a"], binary_data_size=12)]}, b"\x00" * 12, "non-negative"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "UINT8", "data": [1, 2, 3]}]}, b"", "3 values"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "UINT8", "data": ["x", "y"]}]}, b"", "not UINT8"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "UINT8"}]}, b"", "neither"),
        ({"inputs": []}, b"", "no inputs"),
        ({"inputs": "image"}, b"", "must be a list"),
        ({"inputs": [_input([1], binary_data_size=1), _input([1], binary_data_size=1)]}, b"ab", "twice"),
        ({"inputs": [_input([1], binary_data_size=-1)]}, b"", "non-negative"),
        ({"inputs": [_input([1], binary_data_size=1)], "outputs": [{"nom": 1}]}, b"a", "needs a name"),
        ({"inputs": [_input([1], binary_data_size=1)], "id": 7}, b"a", "id must be"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(header: dict[str, object], payload: bytes, needle: str) -> None:
    body, header_length = _binary_body(header, payload)
    with pytest.raises(v2.MalformedMessage, match=needle):
        v2.decode_infer_request(body, header_length)


def test_non_json_header_and_lying_header_length_are_refused() -> None:
    with pytest.raises(v2.MalformedMessage, match="not valid JSON"):
        v2.decode_infer_request(b"\xff\xfe not json", 10)
    with pytest.raises(v2.MalformedMessage, match="not valid JSON"):
        v2.decode_infer_request(b"[1, 2", None)
    with pytest.raises(v2.MalformedMessage, match="only"):
        v2.decode_infer_request(b"{}", 1 << 30)
    with pytest.raises(v2.MalformedMessage, match="JSON object"):
        v2.decode_infer_request(b"[1, 2]", None)


def test_huge_shape_claim_without_data_is_refused_without_allocating() -> None:
    body, header_length = _binary_body({"inputs": [_input([100000, 100000, 100000, 3], binary_data_size=12)]}, b"\x00" * 12)
    with pytest.raises(v2.MalformedMessage, match="does not match"):
        v2.decode_infer_request(body, header_length)


def test_error_response_is_reported() -> None:
    with pytest.raises(v2.MalformedMessage, match="boom"):
        v2.decode_infer_response(b'{"error": "boom"}', None)
