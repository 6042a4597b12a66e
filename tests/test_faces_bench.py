"""dlib's face descriptor as a served model, the face metrics, and ``chaoqing bench faces`` on a
real face (skimage's astronaut) with a real model."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from skimage import data

from chaoqing.bench.faces import (
    CROP_LABEL_PX,
    CROP_SIDE_PX,
    boundary_texture_ratio,
    mean_delta_e,
    psnr,
)
from chaoqing.config import RemoteSettings
from chaoqing.gateway.remote import RemoteModel

ASTRONAUT_BOX = np.array([[175, 76, 266, 167]], dtype=np.float32)  # dlib's HOG box for her face


def test_psnr_and_delta_e_measure_what_they_say() -> None:
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    assert psnr(image, image) == math.inf
    assert psnr(image, image + 1) == pytest.approx(10 * math.log10(255**2))
    assert mean_delta_e(image, image) == 0.0
    grey, lighter = np.full((4, 4, 3), 119, dtype=np.uint8), np.full((4, 4, 3), 145, dtype=np.uint8)
    assert mean_delta_e(grey, lighter) == pytest.approx(10.0, abs=0.3)  # L* 50 → 60, a* = b* = 0
    where = np.zeros((4, 4), dtype=bool)
    assert math.isnan(mean_delta_e(grey, lighter, where))


def test_boundary_ratio_is_one_where_the_texture_goes_on_and_shows_a_smooth_patch() -> None:
    random = np.random.default_rng(0)
    noise = np.clip(128 + random.normal(0, 20, (120, 120, 1)), 0, 255).astype(np.uint8).repeat(3, axis=2)
    mask = np.zeros((120, 120), dtype=np.float32)
    mask[30:90, 30:90] = 1.0
    mask = cv2.GaussianBlur(mask, (0, 0), 3)
    assert boundary_texture_ratio(noise, mask, 6) == pytest.approx(1.0, abs=0.1)
    smoothed = noise.copy()
    smoothed[25:95, 25:95] = cv2.GaussianBlur(noise, (0, 0), 3)[25:95, 25:95]
    assert boundary_texture_ratio(smoothed, mask, 6) < 0.2  # a waxy face pasted on a grainy photo


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_face_descriptor_is_served_and_compares_faces_at_the_same_points(
    start_model_server: Callable[..., Any],
) -> None:
    server = start_model_server(["face-descriptor"])
    descriptor = RemoteModel("face-descriptor", [server.url], RemoteSettings())
    try:
        astronaut = data.astronaut()
        deadline = time.monotonic() + 60
        first = descriptor.infer({"image": astronaut, "boxes": ASTRONAUT_BOX}, ["descriptors", "landmarks"], deadline)
        assert first["descriptors"].shape == (1, 128) and first["landmarks"].shape == (1, 5, 2)
        assert np.all(np.isfinite(first["descriptors"])) and float(np.linalg.norm(first["descriptors"][0])) > 0.5
        assert first["landmarks"][0, 0, 0] > first["landmarks"][0, 2, 0]  # dlib's order: image-right eye first
        again = descriptor.infer({"image": astronaut, "boxes": ASTRONAUT_BOX, "landmarks": first["landmarks"]},
                                 ["descriptors"], deadline)
        np.testing.assert_allclose(again["descriptors"], first["descriptors"], atol=1e-5)
        # her face at half the size and back: still her
        small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
        back = np.asarray(Image.fromarray(small).resize((512, 512), Image.Resampling.LANCZOS))
        resized = descriptor.infer({"image": back, "boxes": ASTRONAUT_BOX, "landmarks": first["landmarks"]},
                                   ["descriptors"], deadline)
        distance = float(np.linalg.norm(resized["descriptors"][0] - first["descriptors"][0]))
        assert 0 < distance < 0.2
        metadata = descriptor.metadata(deadline).parameters
        assert metadata["same_person_distance"] == 0.6 and metadata["landmark_convention"] == "dlib-5"
    finally:
        descriptor.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_faces_measures_lanczos_and_a_face_model_on_a_real_face(tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()[20:236, 92:308]).save(photo)  # her face, hair and collar: 216 px
    completed = run_cli("bench", "faces", str(photo), "--preset", "fast", "--face-models", "realesr-animevideov3-x4",
                        "--scale", "2", "--threads", "2", "--crops", str(tmp_path / "crops"),
                        "--strengths", "0,0.5", "--crop-sides", "64", "--json", timeout=280)
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    assert document["scenario"] == "faces" and document["settings"]["detector"] == "centerface"
    model_name = "realesr-animevideov3-x4"
    names = ["lanczos", *(f"{run}{blend}" for run in (model_name, f"{model_name} crop 64") for blend in ("", " @0", " @0.5"))]
    with Image.open(tmp_path / "crops" / "faces-astronaut.png") as crops:  # input, then each row's; 1 face
        assert crops.size == ((1 + len(names)) * CROP_SIDE_PX, CROP_SIDE_PX + CROP_LABEL_PX)
    assert document["settings"]["face_models"] == [model_name]
    rows = {row["model"]: row for row in document["results"]}
    assert list(rows) == names
    for row in rows.values():
        assert row["photo"] == "astronaut.png" and row["face"] == 0 and row["enhanced"]
        for key in ("identity", "psnr_db", "delta_e_face", "delta_e_eyes", "boundary_ratio", "boundary_vs_lanczos"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
    lanczos = rows["lanczos"]
    assert lanczos["identity"] < 0.1 and lanczos["psnr_db"] > 30 and lanczos["delta_e_face"] < 2
    assert lanczos["boundary_vs_lanczos"] == 1.0
    model = rows[model_name]
    assert model["identity"] < 0.6 and model["face_model_s"] > 0  # the same person
    # strength 0 is the background's own face, whatever the crop: the two rows measure one image
    metrics = ("identity", "psnr_db", "delta_e_face", "delta_e_eyes")
    assert [rows[f"{model_name} @0"][key] for key in metrics] == [rows[f"{model_name} crop 64 @0"][key] for key in metrics]
    # the gateway's crop for this 216 px face at ×2 is 112 px: a 64 px crop gives another face
    assert rows[f"{model_name} crop 64"]["psnr_db"] != model["psnr_db"]
    assert rows[f"{model_name} @0.5"]["psnr_db"] not in (model["psnr_db"], rows[f"{model_name} @0"]["psnr_db"])
    targets = {target["name"]: target for target in document["targets"]}
    assert set(targets) == {f"{row} {name}" for row in names[1:] for name in (
        "worst identity distance", "worst consistency", "lowest boundary ratio", "highest boundary ratio")}
    assert all(isinstance(target["met"], bool) for target in targets.values())
    assert set(document["summary"]) == set(names)
    assert document["summary"]["lanczos"]["faces"] == 1


def test_boxes_are_matched_one_to_one_by_overlap() -> None:
    from chaoqing.bench.detect import box_iou, match_boxes

    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    first = [(0, 0, 10, 10), (100, 100, 140, 150)]
    second = [(102, 110, 138, 150), (1, 1, 11, 11), (0, 0, 9, 10), (300, 300, 310, 310)]
    assert match_boxes(first, second) == [(0, 2), (1, 0)]  # the best overlap wins each box once


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_detect_compares_both_detectors_on_a_real_face(tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    completed = run_cli("bench", "detect", str(photo), "--repeats", "1", "--rotate", "10", "--json", timeout=100)
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(completed.stdout)
    assert document["settings"]["detectors"] == ["centerface", "face-detector"]
    assert document["settings"]["rotate_degrees"] == 10.0
    rows = {row["detector"]: row for row in document["results"]}
    assert set(rows) == {"centerface", "face-detector"}
    for row in rows.values():  # turned 10°: on a canvas that holds the whole 512 px photo
        assert row["photo"] == "astronaut.png (593×593)" and row["matched"] == 1 and row["median_s"] > 0
    # her face, and nothing else (HOG also takes the mission patch for a face here, score 0.39)
    assert rows["centerface"]["faces"] == 1 and rows["centerface"]["only_here_scores"] == []
    summary = document["summary"]
    assert summary["faces_found_by_both"] == 1
    assert summary["detectors"]["centerface"]["faces"] == 1
