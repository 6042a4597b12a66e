"""``chaoqing bench runtimes``: the compact model on real runtimes at a tiny size, a runtime
that is not installed reported in its row, and the plan's defaults. No timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from chaoqing.bench.common import markdown_table
from chaoqing.bench.runtimes import COLUMNS, default_models, default_sizes, device_for, photo_crop
from chaoqing.config import PRESETS

COMPACT_X4 = "realesr-animevideov3-x4"
PLUS_X4 = "realesrgan-x4plus"
# tests/test_convert.py measured the converted compact model within 0.001/255 of ncnn; a
# hundredth of a level leaves room for another CPU's float rounding
FLOAT_TOLERANCE_255 = 0.01


def test_defaults_cover_the_presets_models_and_x4plus() -> None:
    models = default_models()
    for preset in PRESETS.values():
        assert preset.upscaler in models
        assert preset.face_model is None or preset.face_model in models
    assert PLUS_X4 in models and len(models) == len(set(models))
    assert default_sizes(PLUS_X4) == (128, 256)
    assert default_sizes(COMPACT_X4) == (256, 512) and default_sizes("span-kendata-x4") == (256, 512)


def test_each_runtime_gets_the_first_device_it_drives() -> None:
    devices = ["cuda:1", "vulkan:0", "cpu"]
    assert device_for("torch", devices) == "cuda:1"
    assert device_for("onnxruntime", devices) == "cuda:1"
    assert device_for("ncnn", devices) == "vulkan:0"
    assert device_for("openvino", devices) == "cpu"
    assert device_for("openvino", ["cuda:0"]) is None


def test_photo_crop_is_centred_and_resizes_a_small_photo_up() -> None:
    rgb = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    crop = photo_crop(rgb, 20)
    assert crop.shape == (20, 20, 3) and np.array_equal(crop, rgb[10:30, 20:40])
    assert photo_crop(rgb, 64).shape == (64, 64, 3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_compact_model_on_ncnn_and_onnxruntime_and_a_missing_runtime(tmp_path: Path) -> None:
    # openvino made "not installed" for this run: a package of that name that fails to import
    fake = tmp_path / "fake"
    (fake / "openvino").mkdir(parents=True)
    (fake / "openvino" / "__init__.py").write_text("raise ImportError('hidden by the test')\n", encoding="utf-8")
    python_path = os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH", "")]))
    completed = run_cli("bench", "runtimes", "--models", COMPACT_X4, "--runtimes", "ncnn,onnxruntime,openvino",
                        "--sizes", "32", "--rounds", "1", "--threads", "1", "--json", timeout=170,
                        env={"PYTHONPATH": python_path, "CHAOQING_CACHE_DIR": str(tmp_path / "cache")})
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    assert document["scenario"] == "runtimes" and document["command"].startswith("chaoqing bench runtimes")
    assert len(document["load_average_before"]) == 3 and len(document["machine"]["load_average"]) == 3
    assert document["settings"]["sizes"] == {COMPACT_X4: [32]} and document["settings"]["rounds"] == 1
    rows = {row["runtime"]: row for row in document["results"]}
    assert set(rows) == {"ncnn", "onnxruntime", "openvino"}
    assert "runtime openvino is not installed: pip install 'chaoqing[openvino]'" in rows["openvino"]["note"]
    assert "mp_per_s" not in rows["openvino"]
    for runtime in ("ncnn", "onnxruntime"):
        row = rows[runtime]
        assert row["model"] == COMPACT_X4 and row["size"] == 32 and row["batch"] == 1 and row["device"] == "cpu"
        assert len(row["runs_s"]) == 1 and row["seconds"] == row["best_s"] == row["runs_s"][0]
        assert row["mp_per_s"] == pytest.approx(32 * 32 / 1e6 / row["seconds"])
        assert row["first_call_s"] > 0 and row["peak_rss_mb"] > 10
    assert rows["ncnn"]["note"] == "reference" and rows["ncnn"]["speed_vs_ncnn"] == 1.0
    assert rows["onnxruntime"]["platform"] == "onnxruntime_onnx"
    assert 0 <= rows["onnxruntime"]["max_diff_255"] < FLOAT_TOLERANCE_255
    assert rows["onnxruntime"]["max_diff_levels"] <= 1
    assert rows["onnxruntime"]["speed_vs_ncnn"] == pytest.approx(rows["ncnn"]["seconds"] / rows["onnxruntime"]["seconds"])
    table = markdown_table(document["results"], COLUMNS).splitlines()
    assert table[0].startswith("| model | runtime | device | size | batch | MP/s | s/call | best s |") and len(table) == 2 + 3
