"""``chaoqing enhance`` shows each photo's progress (tiles, faces, stage, ETA) while it runs, in
a real terminal (a pty): against ``--server`` (as a job, its events) and with embedded model
servers (the pipeline's listener); plain lines without a terminal."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import SimGateway, run_cli
from PIL import Image
from test_cli import _run_in_terminal, _summary_line

from chaoqing.config import JobSettings, TileSettings

StartGateway = Callable[..., SimGateway]

# 120×90 input pixels in tiles of at most 48, one at a time: a 3×3 grid (overlaps and margins; the sim publishes no
# tile size of its own), each tile a model call of UPSCALE_MS
SMALL_TILES = TileSettings(tile_size=48, overlap=4, margin=2, max_concurrent_tiles=1)
UPSCALE_MS = 250
TILES_PER_PHOTO = re.compile(r"tiles (\d+)/(\d+)")


def _photo(path: Path, width: int = 120, height: int = 90) -> np.ndarray:
    from skimage import data

    pixels = np.ascontiguousarray(np.asarray(data.astronaut())[100:100 + height, 150:150 + width])
    Image.fromarray(pixels).save(path)
    return pixels


def _intermediate_tiles(text: str) -> list[tuple[int, int]]:
    """Every "tiles k/N" drawn with 0 < k < N, in order."""
    return [(int(done), int(total)) for done, total in TILES_PER_PHOTO.findall(text) if 0 < int(done) < int(total)]


@pytest.mark.timeout(120)
def test_enhance_with_server_shows_each_photos_tiles_faces_and_eta_in_a_terminal(
    start_sim_gateway: StartGateway, tmp_path: Path
) -> None:
    gateway = start_sim_gateway(upscale_ms=UPSCALE_MS, detect_ms=10, face_ms=400, faces=2, tiles=SMALL_TILES)
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = {name: _photo(photos / name) for name in ("first.png", "second.png")}
    output = tmp_path / "enhanced"

    status, text = _run_in_terminal(["enhance", str(photos), "-o", str(output), "--server", gateway.url,
                                     "-j", "2", "--scale", "2"])
    assert status == 0, text
    intermediate = _intermediate_tiles(text)
    assert intermediate, f"no tile count between 0 and the total was drawn:\n{text}"
    assert {total for _, total in intermediate} == {9}, intermediate
    assert len({done for done, _ in intermediate}) >= 3, f"the tiles rose in steps: {intermediate}"
    assert re.search(r"faces [01]/2", text), text
    assert re.search(r"· enhance · ETA \d\d:\d\d", text), text
    assert re.search(r"(first|second)\.png\s+\d+%\|", text), "each photo has a bar of its own"
    # the per-photo progress came before the photos were done
    assert text.index(f"tiles {intermediate[0][0]}/9") < text.index("2/2 photos"), text
    assert _summary_line(text).startswith("2 photo(s): 2 done, 0 skipped, 0 failed; faces 4/4 enhanced;")
    for name, pixels in sources.items():
        with Image.open(output / name) as image:
            assert image.size == (240, 180)
            # the sim upscaler repeats pixels: the seams of the tiles must not show
            shrunk = np.asarray(image.convert("RGB"))[::2, ::2].astype(int)
            background = np.abs(shrunk - pixels.astype(int))
            assert np.median(background) <= 2, f"{name}: not the photo, upscaled"
    # the jobs were deleted once their results were fetched: nothing is left in the spool
    assert gateway.metrics.sample("chaoqing_jobs_submitted_total") == 2
    assert gateway.server.gateway.jobs.spool.job_ids() == []


@pytest.mark.timeout(180)
def test_enhance_with_embedded_model_servers_shows_each_photos_tiles_in_a_terminal(tmp_path: Path) -> None:
    from chaoqing.bench.overload import SIM_PRESETS_TOML

    config = tmp_path / "chaoqing.toml"
    config.write_text(
        f"{SIM_PRESETS_TOML}\n[model_server]\nthreads = 1\nsim_latency_ms = {UPSCALE_MS}\nsim_faces = 1\n"
        f"[tiles]\ntile_size = {SMALL_TILES.tile_size}\noverlap = {SMALL_TILES.overlap}\n"
        f"margin = {SMALL_TILES.margin}\nmax_concurrent_tiles = 1\n"
    )
    photo = tmp_path / "photo.png"
    pixels = _photo(photo)
    written = tmp_path / "out.png"
    status, text = _run_in_terminal(["enhance", str(photo), "-o", str(written), "--config", str(config),
                                     "--preset", "fast", "--scale", "2"], timeout_s=150)
    assert status == 0, text
    assert "(starting model servers…)" in text
    intermediate = _intermediate_tiles(text)
    assert intermediate and {total for _, total in intermediate} == {9}, text
    assert text.index(f"tiles {intermediate[0][0]}/9") < text.index("1/1 photos"), text
    assert "faces" not in text.split("1/1 photos")[0].split("starting model servers")[1], "fast: no faces"
    assert _summary_line(text).startswith("1 photo(s): 1 done, 0 skipped, 0 failed")
    with Image.open(written) as image:
        assert image.size == (240, 180)
        assert np.median(np.abs(np.asarray(image.convert("RGB"))[::2, ::2].astype(int) - pixels.astype(int))) <= 2


@pytest.mark.timeout(120)
def test_enhance_without_a_terminal_writes_plain_progress_lines(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_sim_gateway(upscale_ms=100, detect_ms=10, face_ms=100, faces=1, tiles=SMALL_TILES)
    photo = tmp_path / "photo.png"
    _photo(photo)
    completed = run_cli("enhance", str(photo), "-o", str(tmp_path / "out.png"), "--server", gateway.url, timeout=90)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stderr.splitlines()
    assert "\r" not in completed.stderr and "\x1b[" not in completed.stderr, "no bars redrawn in a pipe"
    assert any(re.fullmatch(r"photo\.png: (tiles \d/9 · )?faces (…|\d/1) · enhance( · ETA \d\d:\d\d)?", line)
               for line in lines), lines
    assert any(re.fullmatch(r"photo\.png: done in [\d.]+ s \(1/1 photos, 0\.01 MP in → 0\.04 MP out\)", line)
               for line in lines), lines
    assert _summary_line(completed.stderr).startswith("1 photo(s): 1 done, 0 skipped, 0 failed; faces 1/1 enhanced;")


@pytest.mark.timeout(120)
def test_enhance_polls_a_job_whose_event_stream_is_refused(start_sim_gateway: StartGateway, tmp_path: Path) -> None:
    # one event stream per gateway process: the second photo's is refused (503), so it polls
    gateway = start_sim_gateway(upscale_ms=100, detect_ms=10, face_ms=50, faces=1, tiles=SMALL_TILES,
                                jobs=JobSettings(spool_dir=str(tmp_path / "spool"), max_event_streams=1, max_running=2))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("first.png", "second.png"):
        _photo(photos / name)
    completed = run_cli("enhance", str(photos), "-o", str(tmp_path / "out"), "--server", gateway.url, "-j", "2",
                        timeout=90)
    assert completed.returncode == 0, completed.stderr
    assert _summary_line(completed.stderr).startswith("2 photo(s): 2 done, 0 skipped, 0 failed")
    assert gateway.metrics.sample("chaoqing_requests_total",
                                  {"route": "/v1/jobs/{job_id}/events", "status": "503", "preset": ""}) >= 1
    assert gateway.metrics.sample("chaoqing_requests_total",
                                  {"route": "/v1/jobs/{job_id}", "status": "200", "preset": ""}) >= 1, "it polled"
    for name in ("first.png", "second.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.size == (240, 180)
