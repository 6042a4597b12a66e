"""Smoke test of ``chaoqing bench presets`` with simulated models: a real ``chaoqing serve``
subprocess answers each preset with faces and without, and the table's seconds per megapixel
and per face are those medians' arithmetic. No timing is asserted: benchmarks are programs
that print numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, tiny_photos_and_config

SIM_CONFIG = """detector = "sim-detector"

[model_server]
sim_latency_ms = 5
sim_faces = 2

[presets.balanced]
upscaler = "sim-upscale-x4"
face_model = "sim-face"

[presets.plain]
upscaler = "sim-upscale-x4"
face_model = ""
"""


@pytest.mark.timeout(240)
def test_presets_gives_seconds_per_megapixel_and_per_face(tmp_path: Path) -> None:
    photos, config = tiny_photos_and_config(tmp_path, SIM_CONFIG)
    completed = run_cli("bench", "presets", "--photos", str(photos), "--config", str(config), "--faces", "2",
                        "--presets", "balanced,plain", "--rounds", "2", "--json", timeout=200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    assert document["scenario"] == "presets" and document["photos"] == [{"photo": "tiny.png", "size": "96×64",
                                                                          "faces": 2}]
    balanced, plain = document["results"]
    assert (balanced["preset"], balanced["face_model"], balanced["faces"]) == ("balanced", "sim-face", 2)
    assert (plain["preset"], plain["face_model"], plain["faces"], plain["seconds_per_face"]) == \
        ("plain", "—", 0, None)
    for row in (balanced, plain):
        assert len(row["without_faces_runs_s"]) == len(row["with_faces_runs_s"]) == 2
        assert row["input_megapixels"] == pytest.approx(96 * 64 / 1e6)
        assert row["seconds_per_megapixel"] == pytest.approx(row["without_faces_s"] / row["input_megapixels"])
        assert all("upscale" in timing for timing in row["without_faces_server_timing"])
        assert not any("faces" in timing.split(",")[0] for timing in row["without_faces_server_timing"])
    assert balanced["seconds_per_face"] == pytest.approx(
        (balanced["with_faces_s"] - balanced["without_faces_s"]) / 2)


def test_presets_names_an_unknown_preset(tmp_path: Path) -> None:
    photos, config = tiny_photos_and_config(tmp_path, SIM_CONFIG)
    completed = run_cli("bench", "presets", "--photos", str(photos), "--config", str(config), "--faces", "2",
                        "--presets", "nope", timeout=120)
    assert completed.returncode != 0 and "unknown preset(s) nope" in completed.stderr, completed.stderr
