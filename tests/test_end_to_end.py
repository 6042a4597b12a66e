"""The whole service for real: `chaoqing serve` with its embedded model servers and the
bundled models, on a group photo built from scikit-image's astronaut (4 real faces)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from PIL import Image
from skimage import data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FACE_CROP = (slice(20, 236), slice(92, 308))  # rows, columns of astronaut(): her face with hair and collar


def group_photo() -> np.ndarray:
    """Four copies of the astronaut's portrait in a 2×2 grid, each tinted differently."""
    portrait = data.astronaut()[FACE_CROP]
    tiles = []
    for index, gain in enumerate((1.0, 0.9, 1.05, 0.95)):
        tinted = np.clip(portrait.astype(np.float32) * gain + index * 3, 0, 255).astype(np.uint8)
        tiles.append(tinted)
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    command = [sys.executable, "-m", "chaoqing", "serve", "--port", "0", "--log-format", "json", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "CHAOQING_REQUEST_DEADLINE_S": "500"})
    assert process.stdout is not None
    started = time.monotonic()
    line = process.stdout.readline()
    assert "chaoqing serving on http://" in line, line
    url = line.split("serving on ")[1].split()[0]
    assert time.monotonic() - started < 30, "ready within 30 s"
    yield url
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    assert process.returncode == 0


def _enhance(url: str, photo: np.ndarray, query: str) -> requests.Response:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    return requests.post(f"{url}/v1/enhance{query}", data=buffer.getvalue(), headers={"Content-Type": "image/png"},
                         timeout=550)


def _boundary_steps(image: np.ndarray, top: int, left: int, bottom: int, right: int, inset: int) -> float:
    """Mean absolute step across the four edges of a box shrunk by ``inset``, on grey levels."""
    grey = image.astype(np.float64).mean(axis=2)
    top, left, bottom, right = top + inset, left + inset, bottom - inset, right - inset
    steps = [
        np.abs(grey[top, left:right] - grey[top - 1, left:right]),
        np.abs(grey[bottom - 1, left:right] - grey[bottom, left:right]),
        np.abs(grey[top:bottom, left] - grey[top:bottom, left - 1]),
        np.abs(grey[top:bottom, right - 1] - grey[top:bottom, right]),
    ]
    return float(np.concatenate(steps).mean())


def test_group_photo_gets_every_face_enhanced_without_visible_boxes(service: str) -> None:
    photo = group_photo()
    with_faces = _enhance(service, photo, "?scale=2&preset=balanced")
    assert with_faces.status_code == 200, with_faces.text
    assert with_faces.headers["X-Faces-Detected"] == "4"
    assert with_faces.headers["X-Faces-Enhanced"] == "4"
    background_only = _enhance(service, photo, "?scale=2&preset=balanced&faces=false")
    assert background_only.status_code == 200
    enhanced = np.asarray(Image.open(io.BytesIO(with_faces.content)).convert("RGB"))
    plain = np.asarray(Image.open(io.BytesIO(background_only.content)).convert("RGB"))
    assert enhanced.shape == plain.shape == (photo.shape[0] * 2, photo.shape[1] * 2, 3)

    difference = np.abs(enhanced.astype(np.int16) - plain.astype(np.int16)).max(axis=2)
    half_height, half_width = enhanced.shape[0] // 2, enhanced.shape[1] // 2
    for row in range(2):
        for column in range(2):
            quadrant = difference[row * half_height:(row + 1) * half_height, column * half_width:(column + 1) * half_width]
            changed = np.argwhere(quadrant > 2)
            assert len(changed) > 0.05 * quadrant.size, f"face {row},{column} was not changed by its face model"
            top, left = changed.min(axis=0)
            bottom, right = changed.max(axis=0) + 1
            top, bottom = top + row * half_height, bottom + row * half_height
            left, right = left + column * half_width, right + column * half_width
            # the pasted region's outer boundary, and rings inside it where the mask ramps
            for inset in range(0, 12, 2):
                if min(top, left) - 1 < 0 or bottom + 1 > enhanced.shape[0] or right + 1 > enhanced.shape[1]:
                    continue
                across_face = _boundary_steps(enhanced, top, left, bottom, right, inset)
                same_box_without_faces = _boundary_steps(plain, top, left, bottom, right, inset)
                assert across_face <= same_box_without_faces + 1.5, (
                    f"face {row},{column}: a visible edge {inset} px inside the pasted box "
                    f"({across_face:.2f} vs {same_box_without_faces:.2f} grey levels)"
                )


def test_fast_preset_and_service_pages(service: str) -> None:
    photo = group_photo()[:200, :200]
    fast = _enhance(service, photo, "?scale=1.5&preset=fast&format=jpeg&quality=85")
    assert fast.status_code == 200 and fast.headers["Content-Type"] == "image/jpeg"
    assert fast.headers["X-Face-Detection"] == "skipped" and "X-Faces-Detected" not in fast.headers
    assert Image.open(io.BytesIO(fast.content)).size == (300, 300)
    ready = requests.get(f"{service}/readyz", timeout=10)
    assert ready.status_code == 200 and all(ready.json()["models"].values())
    spec = requests.get(f"{service}/openapi.json", timeout=10).json()
    assert "/v1/enhance" in spec["paths"]
