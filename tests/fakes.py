"""Fake v2 model servers that misbehave on purpose, for fault tests only.

Each one answers the health and metadata routes like a real server (so the gateway takes
it for a working upscaler) and breaks on ``infer`` in one chosen way.
"""

from __future__ import annotations

import json
from typing import Any

import gevent
import numpy as np
from gevent.pywsgi import WSGIServer

from chaoqing.protocol import v2
from chaoqing.protocol.listen import bound_port, create_listener

__all__ = ["BEHAVIOURS", "FakeV2Server"]

BEHAVIOURS = ("hang", "slow", "garbage", "wrong_shape", "wrong_dtype", "error_500", "slow_error_500", "close_mid_response")


class _Silent:
    def write(self, *_: Any) -> None:
        pass

    def flush(self) -> None:
        pass


_SILENT = _Silent()


class FakeV2Server:
    """A v2 'upscaler' (scale ``scale``) whose infer does ``behaviour``; ``parameters`` are added
    to its metadata's; ``port`` 0 picks a free one."""

    def __init__(self, behaviour: str, model: str = "fake-upscaler", scale: int = 4, delay_s: float = 0.5,
                 *, port: int = 0, parameters: dict[str, Any] | None = None) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(behaviour)
        self.behaviour = behaviour
        self.model = model
        self.scale = scale
        self.delay_s = delay_s
        self.calls = 0
        self.parameters = parameters or {}
        self._listener = create_listener("127.0.0.1", port)
        self.port = bound_port(self._listener)
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = WSGIServer(self._listener, self._app, log=None, error_log=_SILENT)
        self._server.start()

    def stop(self) -> None:
        self._server.stop(timeout=0.1)

    def _json(self, start_response: Any, status: str, payload: Any) -> list[bytes]:
        body = json.dumps(payload).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        if path.endswith("/ready") or path.startswith("/v2/health"):
            return self._json(start_response, "200 OK", {"ready": True})
        if path == "/v2":  # server metadata: the gateway reads which tensor encoding it takes
            return self._json(start_response, "200 OK", {"name": "fake", "version": "1",
                                                         "extensions": ["binary_tensor_data"]})
        if path == f"/v2/models/{self.model}":
            return self._json(start_response, "200 OK", {
                "name": self.model, "platform": "fake", "versions": ["1"],
                "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
                "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
                "parameters": {"scale": self.scale, "max_batch_size": 8, **self.parameters},
            })
        self.calls += 1
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        header_length = environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH")
        request = v2.decode_infer_request(body, int(header_length) if header_length else None)
        image = np.asarray(request.inputs["image"])
        if self.behaviour == "hang":
            gevent.sleep(3600)
        if self.behaviour == "slow":
            gevent.sleep(self.delay_s)
        if self.behaviour == "garbage":
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Inference-Header-Content-Length", "5"), ("Content-Length", "9")])
            return [b"{nope!!!!"]
        if self.behaviour == "slow_error_500":
            gevent.sleep(self.delay_s)
        if self.behaviour in ("error_500", "slow_error_500"):
            return self._json(start_response, "500 Internal Server Error", {"error": "the fake broke on purpose"})
        if self.behaviour == "close_mid_response":
            start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", "100000"),
                                      ("Inference-Header-Content-Length", "10")])

            def broken_body() -> Any:
                yield b"{" * 1000
                raise ConnectionAbortedError("the fake hangs up mid-response")

            return broken_body()
        upscaled = image.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        if self.behaviour == "wrong_shape":
            upscaled = upscaled[:, :-3]
        if self.behaviour == "wrong_dtype":
            upscaled = upscaled.astype(np.float32)
        message = v2.encode_infer_response(self.model, {"image": upscaled}, request)
        start_response("200 OK", list(message.http_headers().items()))
        return list(message.chunks)
