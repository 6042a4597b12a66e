"""What the interop tests with v2 servers chaoqing did not write share (tests/test_kserve.py,
tests/test_mlserver.py): the server as a subprocess on 127.0.0.1, gateways in front of it or of
chaoqing's own model server, and the photos and comparison both make."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from skimage import data

from chaoqing.config import Config, JobSettings, Preset, RemoteSettings
from chaoqing.gateway.metrics import GatewayMetrics
from chaoqing.gateway.remote import RemoteModels
from chaoqing.gateway.server import GatewayServer

UPSCALER = "realesr-animevideov3-x4"
# the compact model enhances the faces too: quick on 2 cores, and the face path (detection,
# metadata scale, crops, pastes) is exercised against the other server all the same
INTEROP_PRESET = Preset("interop", UPSCALER, UPSCALER, "compact model for background and faces")
START_TIMEOUT_S = 120.0
FACE_CROP = (slice(20, 236), slice(92, 308))  # rows, columns of astronaut(): her face


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def v2_server_process(name: str, command: Sequence[str], cwd: Path, log_path: Path, url: str) -> Iterator[str]:
    """``command`` run in its own session, its output in ``log_path``; yields ``url`` once
    ``/v2/health/ready`` answers 200, and stops the whole session afterwards."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        ends_at = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"{name} exited: {log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < ends_at, f"{name} not ready: {log_path.read_text()[-3000:]}"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def gateway_starter(tmp_path: Path, detector: str) -> Iterator[Callable[..., GatewayServer]]:
    """For a fixture to ``yield from``: ``start(url, **remote)`` runs a gateway with the interop
    preset and ``detector`` against the server at ``url``; all are stopped afterwards."""
    servers: list[GatewayServer] = []

    def start(url: str, **remote: object) -> GatewayServer:
        config = Config(
            port=0, detector=detector, presets={"interop": INTEROP_PRESET}, preset="interop",
            endpoints={UPSCALER: (url,), detector: (url,)}, remote=RemoteSettings(**remote),  # type: ignore[arg-type]
            jobs=JobSettings(spool_dir=str(tmp_path / f"spool-{len(servers)}")),
        )
        server = GatewayServer(config, RemoteModels.from_config(config, GatewayMetrics()), watch_hub=False)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=1.0)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def portrait() -> bytes:
    """The astronaut's face and shoulders at 200×200 (one face): the background in one tile."""
    return png(Image.fromarray(data.astronaut()[FACE_CROP]).resize((200, 200), Image.Resampling.LANCZOS))


def wide_photo() -> bytes:
    """The whole astronaut at 320×320: over the compact model's published tile size (276)."""
    return png(Image.fromarray(data.astronaut()).resize((320, 320), Image.Resampling.LANCZOS))


def enhance(server: GatewayServer, photo: bytes, scale: float = 2.0) -> tuple[np.ndarray, requests.Response]:
    response = requests.post(f"{server.url}/v1/enhance?scale={scale}", data=photo,
                             headers={"Content-Type": "image/png"}, timeout=240)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")), response


def max_difference(first: np.ndarray, second: np.ndarray) -> int:
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())
