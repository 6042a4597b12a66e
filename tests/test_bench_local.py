"""Smoke test of ``chaoqing bench local`` with simulated models: the script and a real
``chaoqing serve`` subprocess on a tiny generated photo, every side measured, the target
judged. No timing is asserted: benchmarks are programs that print numbers."""

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
"""


@pytest.mark.timeout(240)
def test_local_runs_the_script_and_the_service_alternately(tmp_path: Path) -> None:
    photos, config = tiny_photos_and_config(tmp_path, SIM_CONFIG)
    (photos / "notes.txt").write_text("not a photo", encoding="utf-8")
    completed = run_cli("bench", "local", "--photos", str(photos), "--config", str(config), "--faces", "2",
                        "--scales", "4,2", "--rounds", "2", "--compute-slots", "2,0", "--batching", "--json",
                        timeout=200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    assert document["scenario"] == "local" and len(document["machine"]["load_average"]) == 3
    assert document["photos"] == [{"photo": "tiny.png", "size": "96×64", "faces": 2}]
    assert document["preset_models"] == {"upscaler": "sim-upscale-x4", "face_model": "sim-face",
                                         "detector": "sim-detector"}
    rows = document["results"]
    assert [(row["scale"], row["compute_slots"]) for row in rows] == [(4.0, 2), (4.0, 0), (2.0, 2), (2.0, 0)]
    for row in rows:
        assert len(row["script_runs_s"]) == len(row["service_runs_s"]) == 2
        assert len(row["script_loads"]) == len(row["service_loads"]) == 2
        assert row["ratio"] == pytest.approx(row["service_s"] / row["script_s"])
        assert len(row["crop_sides"]) == 2, "both faces were enhanced by the script"
        assert {"decode", "upscale", "detect", "faces", "composite", "encode"} <= set(row["script_stages_s"])
        assert all("upscale" in timing for timing in row["service_server_timing"])
    # the target is judged on the first budget only, once per photo and scale
    assert [target["name"].endswith("compute_slots 2") for target in document["targets"]] == [True, True]
    [batching] = document["batching"]
    assert batching["crops"] == 2 and batching["slots"] == 2
    assert batching["in_turn_s"] > 0 and batching["one_batch_s"] > 0 and batching["side_by_side_s"] > 0


def test_local_says_which_face_count_or_photo_it_lacks(tmp_path: Path) -> None:
    photos, config = tiny_photos_and_config(tmp_path, SIM_CONFIG)
    completed = run_cli("bench", "local", "--photos", str(photos), "--config", str(config), "--faces", "3",
                        timeout=120)
    assert completed.returncode != 0
    assert "exactly 3 face(s)" in completed.stderr and "2: 1" in completed.stderr, completed.stderr
    completed = run_cli("bench", "local", "--photos", str(photos), "--config", str(config), "--photo", "nope.png",
                        timeout=120)
    assert completed.returncode != 0 and "not a photo" in completed.stderr and "nope.png" in completed.stderr
