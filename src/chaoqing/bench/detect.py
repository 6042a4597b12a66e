"""``chaoqing bench detect PHOTOS...``: the face detectors side by side, per photo.

Each detector (``--detectors``, default CenterFace and dlib's HOG) is called directly (its
runner in this process, ``--threads`` threads) on the copy the gateway would send it (shrunk
to ``detection_max_side``), ``--repeats`` times each, the detectors alternating, and the
median time is kept. Faces are matched across detectors by box IoU ≥ :data:`MATCH_IOU` (the
two draw boxes differently: HOG's square around brows to chin, CenterFace's taller one from
forehead to chin), greedily, the best overlap first.

``--rotate DEGREES`` turns each photo about its centre first (on a canvas that holds all of
it, black around): heads tilted that much, which photos have and HOG's frontal model was not
trained on.

Recall is counted against the union of what the detectors found: a face is "found by all"
when every detector has a box on it; the faces only one found are listed with their score,
so a false one can be told from a missed one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

__all__ = ["detect", "match_boxes", "run_detect"]

DEFAULT_DETECTORS = ("centerface", "face-detector")
MATCH_IOU = 0.3
DETECTION_MAX_SIDE = 2048  # Config.detection_max_side: what the gateway sends a detector

COLUMNS = [
    ("photo", "photo", ""),
    ("detector", "detector", ""),
    ("faces", "faces", "d"),
    ("matched", "matched", "d"),
    ("only this one (scores)", "only_here", ""),
    ("median s", "median_s", ".3f"),
]


def box_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 when either is empty)."""
    width = max(0.0, min(first[2], second[2]) - max(first[0], second[0]))
    height = max(0.0, min(first[3], second[3]) - max(first[1], second[1]))
    intersection = width * height
    union = (first[2] - first[0]) * (first[3] - first[1]) + (second[2] - second[0]) * (second[3] - second[1]) - intersection
    return intersection / union if union > 0 else 0.0


def match_boxes(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]],
                threshold: float = MATCH_IOU) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of two box lists by IoU ≥ ``threshold``, best overlap first:
    the (index in ``first``, index in ``second``) pairs."""
    pairs = sorted(((box_iou(a, b), i, j) for i, a in enumerate(first) for j, b in enumerate(second)), reverse=True)
    used_first: set[int] = set()
    used_second: set[int] = set()
    matched = []
    for overlap, i, j in pairs:
        if overlap < threshold or i in used_first or j in used_second:
            continue
        used_first.add(i)
        used_second.add(j)
        matched.append((i, j))
    return sorted(matched)


def rotated(rgb: Any, degrees: float) -> Any:
    """``rgb`` turned ``degrees`` anticlockwise about its centre, on a canvas that holds it all."""
    import cv2
    import numpy as np

    if degrees == 0:
        return rgb
    height, width = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    cosine, sine = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_width, new_height = round(width * cosine + height * sine), round(width * sine + height * cosine)
    matrix[0, 2] += new_width / 2 - width / 2
    matrix[1, 2] += new_height / 2 - height / 2
    turned = cv2.warpAffine(rgb, matrix, (new_width, new_height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return np.ascontiguousarray(turned)


def run_detect(photos: Sequence[Path], detectors: Sequence[str], repeats: int, threads: int,
               progress: Callable[[str], None], rotate: float = 0.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per photo and detector) and a summary per detector. Raises BenchError and
    RunnerError (a detector that cannot load)."""
    import numpy as np

    from chaoqing.bench.models import _load_rgb
    from chaoqing.errors import BenchError
    from chaoqing.gateway.stages.detect import shrink_for_detection
    from chaoqing.modelserver.runners import RunnerSettings, create_runner

    if not photos:
        raise BenchError("no photos given")
    if len(detectors) != 2:
        raise BenchError(f"bench detect compares two detectors, got {len(detectors)}")
    runners = {name: create_runner(name, RunnerSettings(threads=threads)) for name in detectors}
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {name: {"faces": 0, "only_here": 0, "times_s": []} for name in detectors}
    matched_total = 0
    try:
        for path in photos:
            progress(f"{path.name}")
            rgb, _ = shrink_for_detection(rotated(np.ascontiguousarray(_load_rgb(path)), rotate), DETECTION_MAX_SIDE)
            times: dict[str, list[float]] = {name: [] for name in detectors}
            found: dict[str, dict[str, np.ndarray]] = {}
            for name in detectors:
                runners[name].run({"image": rgb[:64, :64]})  # first-call set-up
            for _ in range(repeats):
                for name in detectors:
                    started = time.perf_counter()
                    found[name] = runners[name].run({"image": rgb})
                    times[name].append(time.perf_counter() - started)
            first, second = detectors
            pairs = match_boxes(found[first]["boxes"].tolist(), found[second]["boxes"].tolist())
            matched_total += len(pairs)
            matched_indices = {first: {i for i, _ in pairs}, second: {j for _, j in pairs}}
            for name in detectors:
                scores = found[name]["scores"].tolist()
                only = [score for index, score in enumerate(scores) if index not in matched_indices[name]]
                median = statistics.median(times[name])
                summary[name]["faces"] += len(scores)
                summary[name]["only_here"] += len(only)
                summary[name]["times_s"].append(median)
                rows.append({"photo": f"{path.name} ({rgb.shape[1]}×{rgb.shape[0]})", "detector": name,
                             "faces": len(scores), "matched": len(pairs),
                             "only_here": ", ".join(f"{score:.2f}" for score in only) or "—",
                             "only_here_scores": only, "scores": scores, "median_s": median,
                             "times_s": times[name]})
    finally:
        for runner in runners.values():
            runner.close()
    union = matched_total + sum(summary[name]["only_here"] for name in detectors)
    for name in detectors:
        entry = summary[name]
        entry["recall_of_union"] = entry["faces"] / union if union else float("nan")
        entry["median_of_photo_medians_s"] = statistics.median(entry["times_s"])
        entry["total_s"] = sum(entry["times_s"])
    return rows, {"faces_in_union": union, "faces_found_by_both": matched_total, "detectors": summary}


@click.command()
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--detectors", default=",".join(DEFAULT_DETECTORS), show_default=True,
              help="the two detector models compared, comma-separated")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100),
              help="calls per photo and detector; the median is kept")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(0, 256),
              help="threads per runner (1: what a detector gets beside the upscalers; 0: every CPU)")
@click.option("--rotate", default=0.0, show_default=True, type=click.FloatRange(-180, 180),
              help="turn each photo this many degrees first (tilted heads)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document instead of the table")
def detect(photos: tuple[Path, ...], detectors: str, repeats: int, threads: int, rotate: float, as_json: bool) -> None:
    """Compare face detectors on PHOTOS (files or folders): faces found, matched, time."""
    from chaoqing.bench.common import Report, command_line, report
    from chaoqing.bench.models import _photos

    files = [file for path in photos for file in _photos(path)]
    names = [name.strip() for name in detectors.split(",") if name.strip()]
    rows, summary = run_detect(files, names, repeats, threads,
                               lambda text: click.echo(f"… {text}", err=True) if not as_json else None, rotate)
    result = Report("detect", command_line(), {"detectors": names, "repeats": repeats, "threads": threads,
                                               "rotate_degrees": rotate,
                                               "match_iou": MATCH_IOU, "detection_max_side": DETECTION_MAX_SIDE},
                    rows, extra={"summary": summary})
    report(result, COLUMNS, as_json=as_json)
    if not as_json:
        for name, entry in summary["detectors"].items():
            click.echo(f"{name}: {entry['faces']} of {summary['faces_in_union']} faces found by either "
                       f"({entry['only_here']} by it alone); median {entry['median_of_photo_medians_s']:.3f} s a photo, "
                       f"{entry['total_s']:.2f} s in all")
