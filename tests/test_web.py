"""The web page at ``/``: its files, and a real headless Chromium using it against a sim gateway:
a photo through a job (POST /v1/jobs, its event stream or GET, the result) with the progress
seen rising, the before/after comparison, the download, errors, cancel, and API keys.

The browser runs in a subprocess (tests/web_browser.py, Playwright's sync API) while this
monkey-patched process serves the gateway. Debian's Chromium is used (``apt-get install
chromium``; never ``playwright install``). Without it the browser test is skipped, except in
CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from conftest import SimGateway
from fakes import FakeV2Server
from PIL import Image

from chaoqing.config import JobSettings, TileSettings

StartGateway = Callable[..., SimGateway]

BROWSER_SCRIPT = Path(__file__).with_name("web_browser.py")
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
API_KEY = "web-page-test-key"
MAX_OUTPUT_PIXELS = 2_000_000  # the photo at ×2 (1 MP) passes, at ×4 (4.2 MP) does not
SCALE = 2
# tiles of at most 128 input pixels (the least the default overlap and margin allow is 65), two
# at a time, each batch TILE_LATENCY_MS: the 512×512 photo takes a few seconds in many steps
SMALL_TILES = TileSettings(tile_size=128, max_concurrent_tiles=2)
TILE_LATENCY_MS = 150
PROGRESS_TEXT = re.compile(r"^(\d+) of (\d+) (tiles|faces)$")


def _chromium() -> str | None:
    for path in CHROMIUM_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def _require_browser() -> str:
    chromium = _chromium()
    missing = []
    if chromium is None:
        missing.append("Chromium (/usr/bin/chromium: apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright (pip install -e '.[test]')")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must run it")
        pytest.skip(reason)
    assert chromium is not None
    return chromium


def _astronaut_png(side: int = 512) -> bytes:
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    if photo.width != side:
        photo = photo.resize((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    return buffer.getvalue()


def _counts(values: list[list[Any]], unit: str) -> list[tuple[int, int]]:
    """(done, total) of each value a bar showed, from its aria-valuetext ("3 of 12 tiles"),
    checked against the bar's own value and max."""
    counts = []
    for value, maximum, text in values:
        match = PROGRESS_TEXT.match(text or "")
        if match is None or match.group(3) != unit:
            continue
        done, total = int(match.group(1)), int(match.group(2))
        assert value == done and maximum == max(1, total), (value, maximum, text)
        counts.append((done, total))
    return counts


# -- the files --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_page_and_its_files_are_served_without_external_resources(start_sim_gateway: StartGateway) -> None:
    gateway = start_sim_gateway()
    page = requests.get(f"{gateway.url}/", timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Cache-Control"] == "no-cache"
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "web/app.js" in references and "web/style.css" in references
    for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = requests.get(f"{gateway.url}/web/{name}", timeout=5)
        assert response.status_code == 200 and response.headers["Content-Type"].startswith(media_type)
        assert not re.search(r"https?://", response.text), f"{name} must not load anything from elsewhere"
    assert not [reference for reference in references if reference.startswith(("http:", "https:", "//"))]
    assert requests.get(f"{gateway.url}/web/secret.py", timeout=5).status_code == 404
    assert requests.get(f"{gateway.url}/web/..%2Fgateway.py", timeout=5).status_code == 404


# -- the browser ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_web_page_enhances_a_photo_in_a_real_browser(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    chromium = _require_browser()
    # small, slow enough tiles that the job's progress rises in steps the page can show
    gateway = start_sim_gateway(upscale_ms=TILE_LATENCY_MS, detect_ms=20, face_ms=300, faces=2, tiles=SMALL_TILES,
                                jobs=JobSettings(spool_dir=str(tmp_path / "spool"), max_output_pixels=MAX_OUTPUT_PIXELS))
    keyed = start_sim_gateway(upscale_ms=20, detect_ms=5, face_ms=10, faces=1, api_keys=(API_KEY,))
    broken_upscaler = FakeV2Server("error_500", model="sim-upscale-x4")
    failing = start_sim_gateway(faces=0, endpoints={"sim-upscale-x4": (broken_upscaler.url,)})
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(_astronaut_png())
    not_a_photo = tmp_path / "notes.png"
    not_a_photo.write_bytes(b"these are notes, not a picture")
    output = tmp_path / "browser"
    scenario = {
        "url": f"{gateway.url}/", "keyed_url": f"{keyed.url}/", "api_key": API_KEY, "photo": str(photo),
        "not_a_photo": str(not_a_photo), "output": str(output), "chromium": chromium, "timeout_s": 30,
        "failing_url": f"{failing.url}/",
    }
    scenario_path = tmp_path / "scenario.json"
    scenario_path.write_text(json.dumps(scenario))

    try:
        completed = subprocess.run([sys.executable, str(BROWSER_SCRIPT), str(scenario_path)], check=False,
                                   capture_output=True, text=True, timeout=150)
    finally:
        broken_upscaler.stop()
    results_path = output / "results.json"
    assert results_path.exists(), f"the browser script wrote no results:\n{completed.stdout}\n{completed.stderr}"
    results = json.loads(results_path.read_text())
    assert "failure" not in results, (results.get("failure"), results.get("state_at_failure"), completed.stderr[-3000:])
    assert completed.returncode == 0, completed.stderr[-3000:]

    # the page as loaded: presets from the gateway's OpenAPI document, nothing from elsewhere
    assert results["title"].startswith("超清 chaoqing")
    assert results["presets"] == ["fast", "balanced", "quality"]
    assert results["initial_state"] == "idle" and results["enhance_disabled_before_choosing"]
    assert results["foreign_requests"] == [], "the page must work offline"
    assert results["console_errors"] == []
    assert results["chosen_info"].startswith("512 × 512")
    assert results["output_size_hint"] == "512 × 512 → 1024 × 1024 pixels"

    # the job's progress as the page showed it: the tiles bar rising through values between
    # 0 and the total, the faces counted, the stages named, an ETA, the elapsed time moving
    assert results["progress_visible"] and results["cancel_visible"]
    assert results["tiles_bar_by_role"] == 1 and results["faces_bar_by_role"] == 1
    seen = results["progress_seen"]
    tiles = _counts(seen["tiles"], "tiles")
    assert tiles, seen["tiles"]
    total = tiles[-1][1]
    assert tiles[-1] == (total, total) and total >= 6, tiles
    intermediate = sorted({done for done, _ in tiles if 0 < done < total})
    assert len(intermediate) >= 3, f"the tiles bar should rise in steps: {tiles}"
    assert [done for done, _ in tiles] == sorted(done for done, _ in tiles), "progress never goes back"
    faces = _counts(seen["faces"], "faces")
    assert faces[-1] == (2, 2), seen["faces"]
    assert "enhance" in seen["stages"] and seen["stages"][-1] == "download", seen["stages"]
    assert "Upscaling and enhancing faces" in seen["labels"], seen["labels"]
    assert any(eta.startswith("About ") and eta.endswith(" left") for eta in seen["etas"]), seen["etas"]
    first, second = (float(text.rstrip(" s")) for text in results["elapsed_moved"])
    assert second > first, results["elapsed_moved"]
    assert results["progress_hidden_after"]

    # the result: faces, sizes, Server-Timing stages, a download button
    assert results["faces_text"] == "2 of 2 enhanced"
    assert results["size_text"] == "512×512 → 1024×1024"
    for stage in ("decode", "upscale", "detect", "faces", "composite", "encode", "total"):
        assert stage in results["timing_stages"]
    assert results["download_text"].startswith("Download PNG")
    assert results["after_natural_size"] == [1024, 1024]
    compare, before = results["compare_box"], results["before_box"]
    assert abs(compare["width"] - compare["height"]) <= 1, "the photo keeps its shape"
    for key in ("x", "y", "width", "height"):
        assert abs(compare[key] - before[key]) <= 1, "the original is laid over the result at the same size"

    # the slider moves and changes what is shown on each side of it
    assert results["value_after_end"] == 100 and results["value_after_home"] == 0
    assert abs(results["value_after_drag"] - 70) <= 1.5
    assert abs(results["divider_fraction_after_drag"] - 0.70) <= 0.015
    assert results["range_focused_after_drag"] == "compare-range"
    assert abs(results["value_after_arrows"] - (results["value_after_drag"] - 5)) <= 0.01
    assert results["aria_valuetext"].endswith("% original")
    pixels = results["pixels"]
    assert pixels["before_vs_after"] > 4, pixels  # sim-face brightens faces by 16 levels
    assert pixels["split_left_vs_before"] < 1.0 and pixels["split_right_vs_after"] < 1.0, pixels
    assert pixels["split_left_vs_after"] > 4 and pixels["split_right_vs_before"] > 4, pixels
    assert abs(results["compare_width_at_100"] - 1024) <= 1

    # the download is the enhanced photo, the same as the API gives
    download = Path(results["download_path"]).read_bytes()
    assert results["download_name"] == "astronaut-chaoqing-2x.png"
    downloaded = Image.open(io.BytesIO(download))
    assert downloaded.format == "PNG" and downloaded.size == (1024, 1024)
    direct = requests.post(f"{gateway.url}/v1/enhance?preset=balanced&scale={SCALE}&faces=true", data=photo.read_bytes(),
                           headers={"Content-Type": "image/png"}, timeout=30)
    assert direct.status_code == 200
    np.testing.assert_array_equal(np.asarray(downloaded), np.asarray(Image.open(io.BytesIO(direct.content))))

    # errors: the JSON error body, shown with a hint
    assert results["error_visible"] and results["error_code"] == "invalid_image"
    assert results["error_message"] and results["error_hint"]
    assert results["limit_error_code"] == "image_too_large" and results["limit_uploads"] == 0
    assert results["limit_error_message"] == "the output would have 4.2 megapixels; this gateway makes at most 2.0"

    # the event stream refused: followed by GET, through two 503s and the same progress, to the result
    assert results["polls_without_stream"] >= 3
    polled = _counts(results["polled_progress_seen"]["tiles"], "tiles")
    assert polled[-1] == (total, total) and any(0 < done < total for done, _ in polled), polled
    assert results["polled_after_natural_size"] == [1024, 1024]
    assert "Lost contact with the gateway; trying again…" in results["polled_progress_seen"]["labels"]

    # cancel: one DELETE, the job cancelled with tiles left undone, the page ready for another go
    assert len(results["deletes"]) == 1, results["deletes"]
    cancelled = requests.get(f"{gateway.url}{urlsplit(results['deletes'][0]).path}", timeout=5).json()
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["progress"]["tiles"]["done"] < cancelled["progress"]["tiles"]["total"], cancelled
    assert results["cancelled_progress_hidden"] and results["cancelled_error_hidden"]
    assert results["enhance_enabled_after_cancel"]
    assert gateway.metrics.sample("chaoqing_jobs_submitted_total") == 3  # the main run, the polled one, the cancelled one

    # a gateway with keys: 401 asks for the key, which then works and is remembered
    assert results["key_details_open_at_start"]
    assert results["keyless_error_code"] == "unauthorized" and results["key_field_focused"] == "api-key"
    assert results["keyed_faces_text"] == "not enhanced"  # the fast preset has no face model
    assert results["keyed_event_streams"] == 0 and results["keyed_results"] == 1  # EventSource sends no key: GET
    assert results["key_after_reload"] == API_KEY

    # a job that failed shows its reason; one that vanished says it is gone
    failed = results["failed_job_error"]
    assert failed["code"] == "model_error" and "broke on purpose" in failed["message"], failed
    lost = results["lost_job_error"]
    assert lost["code"] == "job_not_found" and lost["message"].startswith("The job is gone"), lost
    assert lost["hint"] == "Enhance the photo again."

    screenshot = Image.open(output / "web-page.png")
    assert screenshot.width == 1280 and screenshot.height >= 700
