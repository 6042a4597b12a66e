"""The KServe v2 / Open Inference Protocol tensor codec, with Triton's binary data extension.

Pure functions, no HTTP: the model server (:mod:`chaoqing.modelserver.app`) and the gateway's
client (:mod:`chaoqing.gateway.remote`) both build on them, so both sides agree byte for byte.

A binary message is a JSON header followed by raw little-endian tensors, in the order the
header lists them; the HTTP header ``Inference-Header-Content-Length`` says how long the
JSON part is, and each binary tensor carries ``parameters.binary_data_size``. Messages
without that header are plain JSON with ``data`` arrays.

Everything a peer sends is checked before it is trusted: sizes that lie, shapes that do not
match their data, unknown datatypes, non-JSON headers all raise :class:`MalformedMessage`
(the caller translates it: the server answers 400, the client raises BadModelResponse).
Decoded arrays are views over the received body (``np.frombuffer``) and therefore
read-only; copy before editing in place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chaoqing.errors import MalformedMessage

__all__ = [
    "BINARY_CONTENT_TYPE",
    "DATATYPES",
    "HEADER_LENGTH_HEADER",
    "JSON_CONTENT_TYPE",
    "EncodedMessage",
    "InferRequest",
    "RequestedOutput",
    "datatype_of",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
]

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

# v2 datatype name -> little-endian numpy dtype. BYTES and BF16 are not supported.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPE_BY_KIND = {(dtype.kind, dtype.itemsize): name for name, dtype in DATATYPES.items()}

MAX_DIMENSIONS = 8



@dataclass(frozen=True)
class RequestedOutput:
    """One entry of a request's ``outputs``: which tensor, and whether it should come back binary."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] = ()
    id: str | None = None
    binary_output_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, output_name: str) -> bool:
        """Whether ``output_name`` should be sent as binary data in the response."""
        for requested in self.outputs:
            if requested.name == output_name:
                return requested.binary
        return self.binary_output_default


@dataclass(frozen=True)
class EncodedMessage:
    """A v2 message ready to send: the JSON header and the buffers that follow it.

    ``header_length`` is None for a pure-JSON message (no binary part); otherwise it is the
    value for ``Inference-Header-Content-Length``. ``chunks`` is header first, then tensor
    buffers, so a server can hand it to WSGI as the body iterable without joining.
    """

    chunks: tuple[bytes | memoryview, ...]
    header_length: int | None

    @property
    def content_length(self) -> int:
        return sum(len(chunk) if isinstance(chunk, bytes) else chunk.nbytes for chunk in self.chunks)

    @property
    def content_type(self) -> str:
        return JSON_CONTENT_TYPE if self.header_length is None else BINARY_CONTENT_TYPE

    def http_headers(self) -> dict[str, str]:
        """Content-Type, Content-Length and, for binary messages, the header-length header."""
        headers = {"Content-Type": self.content_type, "Content-Length": str(self.content_length)}
        if self.header_length is not None:
            headers[HEADER_LENGTH_HEADER] = str(self.header_length)
        return headers

    def join(self) -> bytes:
        """The whole message as one bytes object (copies; for small messages and tests)."""
        return b"".join(bytes(chunk) for chunk in self.chunks)


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name for ``array``'s dtype; ValueError for dtypes v2 cannot carry."""
    name = _DATATYPE_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if name is None:
        raise ValueError(f"dtype {array.dtype} has no KServe v2 datatype")
    return name


def _tensor_buffer(array: np.ndarray) -> memoryview:
    """A little-endian, C-contiguous byte view of ``array`` (copies only when it must)."""
    name = datatype_of(array)
    wire = np.ascontiguousarray(array, dtype=DATATYPES[name])
    return memoryview(wire.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _encode(
    header: dict[str, Any],
    entry_key: str,
    tensors: Mapping[str, np.ndarray],
    binary_for: Mapping[str, bool],
) -> EncodedMessage:
    entries: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for name, array in tensors.items():
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array)}
        if binary_for.get(name, True):
            buffer = _tensor_buffer(array)
            entry["parameters"] = {"binary_data_size": buffer.nbytes}
            buffers.append(buffer)
        else:
            entry["data"] = np.asarray(array).reshape(-1).tolist()
        entries.append(entry)
    header[entry_key] = entries
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if not buffers:
        return EncodedMessage((header_bytes,), None)
    return EncodedMessage((header_bytes, *buffers), len(header_bytes))


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = (),
    *,
    binary_inputs: bool = True,
    binary_outputs: bool = True,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> EncodedMessage:
    """Encode an inference request; inputs go binary unless ``binary_inputs`` is False."""
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    request_parameters = dict(parameters or {})
    if binary_outputs:
        request_parameters["binary_data_output"] = True
    if request_parameters:
        header["parameters"] = request_parameters
    if outputs:
        header["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_outputs}} for name in outputs
        ]
    return _encode(header, "inputs", inputs, {name: binary_inputs for name in inputs})


def encode_infer_response(
    model_name: str,
    outputs: Mapping[str, np.ndarray],
    request: InferRequest,
    *,
    model_version: str = "1",
) -> EncodedMessage:
    """Encode a response to ``request``, binary for the outputs it asked to get binary."""
    requested = [item.name for item in request.outputs]
    chosen = {name: outputs[name] for name in requested if name in outputs} if requested else dict(outputs)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        header["id"] = request.id
    return _encode(header, "outputs", chosen, {name: request.wants_binary(name) for name in chosen})


def _split_body(body: bytes | bytearray | memoryview, header_length: int | None) -> tuple[Any, memoryview]:
    view = memoryview(body).cast("B") if not isinstance(body, memoryview) else body.cast("B")
    if header_length is None:
        header_length = len(view)
    if header_length < 0 or header_length > len(view):
        raise MalformedMessage(
            f"{HEADER_LENGTH_HEADER} is {header_length} but the body has only {len(view)} bytes"
        )
    try:
        header = json.loads(bytes(view[:header_length]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessage(f"the inference header is not valid JSON: {exc}") from None
    except RecursionError:  # '[' nested tens of thousands deep
        raise MalformedMessage("the inference header is nested too deeply") from None
    if not isinstance(header, dict):
        raise MalformedMessage("the inference header must be a JSON object")
    return header, view[header_length:]


def _parse_shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_DIMENSIONS:
        raise MalformedMessage(f"tensor {name!r}: shape must be a list of at most {MAX_DIMENSIONS} integers")
    shape: list[int] = []
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise MalformedMessage(f"tensor {name!r}: shape {raw!r} has a dimension that is not a non-negative integer")
        shape.append(dim)
    return tuple(shape)


def _decode_tensors(entries: Any, binary: memoryview, what: str) -> dict[str, np.ndarray]:
    if not isinstance(entries, list):
        raise MalformedMessage(f"{what} must be a list")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise MalformedMessage(f"each of the {what} must be an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise MalformedMessage(f"each of the {what} needs a name")
        if name in tensors:
            raise MalformedMessage(f"tensor {name!r} appears twice")
        datatype = entry.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list here is unhashable
            raise MalformedMessage(f"tensor {name!r}: unsupported datatype {datatype!r}")
        dtype = DATATYPES[datatype]
        shape = _parse_shape(entry.get("shape"), name)
        count = math.prod(shape)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise MalformedMessage(f"tensor {name!r}: parameters must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise MalformedMessage(f"tensor {name!r}: binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise MalformedMessage(
                    f"tensor {name!r}: binary_data_size {size} does not match shape {list(shape)} "
                    f"of {datatype} ({count * dtype.itemsize} bytes)"
                )
            if offset + size > len(binary):
                raise MalformedMessage(
                    f"tensor {name!r}: the body ends {offset + size - len(binary)} bytes early"
                )
            array = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        elif "data" in entry:
            try:
                array = np.asarray(entry["data"], dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise MalformedMessage(f"tensor {name!r}: data is not {datatype}: {exc}") from None
            if array.size != count:
                raise MalformedMessage(
                    f"tensor {name!r}: {array.size} values for shape {list(shape)} ({count} expected)"
                )
            array = array.reshape(shape)
        else:
            raise MalformedMessage(f"tensor {name!r} has neither data nor binary_data_size")
        tensors[name] = array
    if offset != len(binary):
        raise MalformedMessage(f"{len(binary) - offset} bytes of binary data follow the last tensor")
    return tensors


def decode_infer_request(body: bytes | bytearray | memoryview, header_length: int | None) -> InferRequest:
    """Decode a request body; ``header_length`` is the header-length HTTP header (None: JSON only)."""
    header, binary = _split_body(body, header_length)
    inputs = _decode_tensors(header.get("inputs"), binary, "inputs")
    if not inputs:
        raise MalformedMessage("the request has no inputs")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MalformedMessage("parameters must be an object")
    binary_default = parameters.get("binary_data_output", False) is True
    outputs: list[RequestedOutput] = []
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise MalformedMessage("outputs must be a list")
    for item in raw_outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise MalformedMessage("each requested output needs a name")
        item_parameters = item.get("parameters") or {}
        if not isinstance(item_parameters, dict):
            raise MalformedMessage("output parameters must be an object")
        outputs.append(RequestedOutput(item["name"], item_parameters.get("binary_data", binary_default) is True))
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise MalformedMessage("id must be a string")
    return InferRequest(inputs, tuple(outputs), request_id, binary_default, parameters)


def decode_infer_response(body: bytes | bytearray | memoryview, header_length: int | None) -> dict[str, np.ndarray]:
    """Decode a response body into its output tensors."""
    header, binary = _split_body(body, header_length)
    if "error" in header:
        raise MalformedMessage(f"the response is an error: {header['error']}")
    return _decode_tensors(header.get("outputs"), binary, "outputs")
