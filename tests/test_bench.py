"""Smoke tests of ``chaoqing bench``: every scenario runs at a tiny size and says what the
issue asks for. No timing is asserted — benchmarks are programs that print numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from PIL import Image

from chaoqing.bench.common import Target, markdown_table, parse_server_timing, summarize
from chaoqing.bench.load import _metrics_value

TINY_SIMS = ["--upscale-ms", "30", "--detect-ms", "5", "--face-ms", "10"]


def _bench(*arguments: str, timeout: float) -> dict[str, Any]:
    completed = run_cli("bench", *arguments, "--json", timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    document: dict[str, Any] = json.loads(completed.stdout)
    assert document["machine"]["cores"] >= 1
    assert document["command"].startswith("chaoqing")
    return document


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
def test_helpers_read_and_judge_numbers() -> None:
    assert parse_server_timing("decode;dur=1.5, upscale;dur=300.25, bad;dur=x") == {"decode": 1.5, "upscale": 300.25}
    summary = summarize([1.0, 2.0, 3.0, 4.0])
    assert summary["p50"] == 2.5 and summary["count"] == 4 and math.isnan(summarize([])["p50"])
    assert Target("ratio", 1.02, 1.05).met and not Target("speedup", 6.0, 6.5, at_most=False).met
    assert "MISSED by 7.7%" in Target("speedup", 6.0, 6.5, at_most=False).describe()
    table = markdown_table([{"a": 1.234, "b": float("nan")}], [("A", "a", ".1f"), ("B", "b", ".1f")])
    assert table.splitlines()[-1] == "| 1.2 | — |"
    exposition = 'chaoqing_hub_blocked_total 3.0\nchaoqing_bench_hub_longest_hold_seconds{where="x"} 0.012\n'
    assert _metrics_value(exposition, "chaoqing_hub_blocked_total") == 3.0
    assert _metrics_value(exposition, "chaoqing_bench_hub_longest_hold_seconds") == 0.012
    assert math.isnan(_metrics_value(exposition, "chaoqing_hub_blocked"))


@pytest.mark.timeout(240)
def test_fanout_reports_each_face_count_against_the_critical_path(tmp_path: Path) -> None:
    plot = tmp_path / "fanout.png"
    document = _bench("fanout", "--faces", "0,2", "--requests", "2", "--sequential-requests", "1", *TINY_SIMS,
                      "--width", "96", "--height", "96", "--plot", str(plot), timeout=200)
    rows = document["results"]
    assert [row["faces"] for row in rows] == [0, 2]
    for row in rows:
        for key in ("latency_ms_p50", "critical_path_ms", "sequential_ms_p50", "ratio_to_critical_path",
                    "speedup_vs_sequential"):
            assert row[key] > 0, key
    assert rows[1]["sequential_sum_ms"] == 30 + 5 + 2 * 10
    assert {target["name"].split(" at ")[0] for target in document["targets"]} == {
        "ratio_to_critical_path", "speedup_vs_sequential"}
    assert _is_png(plot)


@pytest.mark.timeout(240)
def test_fanout_measures_another_server_at_the_faces_its_detector_publishes(start_model_server_process: Any) -> None:
    url = start_model_server_process("sim-upscale-x4", "sim-face", "sim-detector", "--model-option", "latency_ms=10",
                                     "--model-option", "faces=2", "--max-batch-size", "1")
    document = _bench("fanout", "--faces", "0,2", "--requests", "2", "--sequential-requests", "1",
                      "--upscale-ms", "10", "--detect-ms", "10", "--face-ms", "10", "--width", "96", "--height", "96",
                      "--server", f"other={url}", timeout=200)
    rows = document["results"]
    assert [(row["faces"], row["server"]) for row in rows] == [(0, "built-in"), (2, "built-in"), (2, "other")]
    assert all(row["latency_ms_p50"] > 0 and row["speedup_vs_sequential"] > 0 for row in rows)


@pytest.mark.timeout(300)
def test_load_runs_the_gateway_process_and_gunicorn(tmp_path: Path) -> None:
    plot = tmp_path / "load.png"
    document = _bench("load", "--clients", "2,4", "--sweep", "0.5,0.8", "--duration", "1", "--saturation-duration", "1",
                      "--saturation-clients", "4", "--single-duration", "0.5", *TINY_SIMS, "--width", "64",
                      "--height", "64", "--plot", str(plot), timeout=280)
    rows = document["results"]
    phases = {(row["target"], row["phase"], row["clients"]) for row in rows}
    assert {("gateway", "single", 1), ("gateway", "saturation", 4), ("gateway", "level", 2), ("gateway", "level", 4),
            ("gateway", "sweep", 4), ("gunicorn", "single", 1), ("gunicorn", "level", 4)} <= phases
    for row in rows:
        assert row["requests"] > 0 and row["peak_rss_mb"] > 0
        if row["target"] == "gateway":
            assert row["longest_hub_hold_ms"] >= 0 and row["hub_blocked_reports"] >= 0
    assert document["saturation_rps"]["gateway"] > 0 and document["single_p50_ms"]["gateway"] > 0
    assert len(document["targets"]) == 4
    assert _is_png(plot)


@pytest.mark.timeout(200)
def test_load_runs_serve_with_workers(tmp_path: Path) -> None:
    document = _bench("load", "--targets", "workers", "--workers", "2", "--clients", "4", "--sweep", "0.8",
                      "--duration", "1", "--saturation-duration", "1", "--saturation-clients", "4",
                      "--single-duration", "0.5", *TINY_SIMS, "--width", "64", "--height", "64", timeout=180)
    rows = document["results"]
    assert {(row["target"], row["phase"]) for row in rows} == {("workers", "single"), ("workers", "saturation"),
                                                               ("workers", "level")}
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in rows)


@pytest.mark.timeout(120)
def test_overhead_compares_servers_with_a_target(start_model_server_process: Any) -> None:
    other = start_model_server_process("sim-upscale-x2", "sim-face", "--model-option", "latency_ms=0")
    document = _bench("overhead", "--calls", "4", "--rounds", "2", "--target", f"other={other}", timeout=100)
    rows = document["results"]
    assert {row["client"] for row in rows} == {"chaoqing model server", "chaoqing model server, JSON", "other"}
    assert all(row["us_per_call_p50"] > 0 and row["calls"] == 4 for row in rows)


@pytest.mark.timeout(120)
def test_overhead_compares_the_clients_on_the_same_payloads() -> None:
    document = _bench("overhead", "--calls", "6", "--rounds", "2", timeout=100)
    rows = document["results"]
    assert {row["client"] for row in rows} == {"chaoqing", "tritonclient", "requests", "urllib3"}
    assert len({row["payload"] for row in rows}) == 3
    assert all(row["us_per_call_p50"] > 0 and row["calls"] == 6 for row in rows)


@pytest.mark.timeout(120)
def test_overhead_compares_another_server_side_by_side(start_model_server_process: Any) -> None:
    url = start_model_server_process("sim-upscale-x2", "sim-face", "--model-option", "latency_ms=0",
                                     "--max-batch-size", "1")
    document = _bench("overhead", "--calls", "4", "--rounds", "1", "--clients", "chaoqing,requests",
                      "--server", f"other={url}", timeout=100)
    rows = document["results"]
    assert {(row["server"], row["client"]) for row in rows} == {
        (server, client) for server in ("built-in", "other") for client in ("chaoqing", "requests")}
    assert all(row["ratio_to_built_in"] > 0 for row in rows)
    assert all(row["ratio_to_built_in"] == 1.0 for row in rows if row["server"] == "built-in")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_models_measures_runners_and_presets_on_real_models(tmp_path: Path) -> None:
    from skimage import data

    portrait = Image.fromarray(data.astronaut()[0:256, 96:352])  # her face, about 100 px wide
    portrait.save(tmp_path / "astronaut.png")
    document = _bench("models", "--photos", str(tmp_path), "--megapixels", "0.02", "--presets", "fast,balanced",
                      timeout=850)
    rows = {row["what"]: row for row in document["results"]}
    assert rows["runner realesr-animevideov3-x4"]["direct_mp_per_s"] > 0
    assert rows["runner span-kendata-x4"]["server_mp_per_s"] > 0  # the balanced preset's face model
    assert rows["preset fast"]["efficiency"] > 0 and rows["preset balanced"]["faces"] >= 1
    assert document["targets"][0]["name"].startswith("fast preset efficiency")


@pytest.mark.timeout(60)
def test_bench_commands_are_listed() -> None:
    completed = run_cli("bench", "--help", timeout=50)
    assert completed.returncode == 0
    for name in ("fanout", "load", "models", "overhead", "presets", "quality", "local"):
        assert name in completed.stdout


@pytest.mark.timeout(240)
def test_encode_reports_each_setting_against_png_level_6() -> None:
    document = _bench("encode", "--upscaler", "lanczos", "--scale", "2", "--rounds", "1", "--png-levels", "1,6",
                      "--webp-methods", "4", timeout=200)
    rows = {row["setting"]: row for row in document["results"]}
    assert rows["png-pillow level 6"]["bytes_vs_reference"] == 1.0 and rows["png-pillow level 6"]["time_vs_reference"] == 1.0
    for setting in ("png-pillow level 1", "png-opencv level 1", "png-pillow optimize", "jpeg q92 4:4:4",
                    "webp q90 method 4", "webp lossless effort 25"):
        assert rows[setting]["bytes"] > 0 and rows[setting]["seconds"] > 0, setting
    assert rows["png-pillow level 1"]["bytes"] > rows["png-pillow optimize"]["bytes"]  # a faster level is larger
    assert document["settings"]["images"] == [{"name": "astronaut", "width": 1024, "height": 1024}]
