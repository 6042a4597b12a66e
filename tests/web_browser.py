"""Drives the gateway's web page in headless Chromium (Playwright) and reports what it saw.

Run by tests/test_web.py in a subprocess of its own: the test process is gevent
monkey-patched and serves the gateway on its hub, while Playwright's sync API runs its own
event loop. Usage::

    python tests/web_browser.py SCENARIO.json

SCENARIO.json names the page ``url``, the ``photo`` and ``not_a_photo`` files to upload, the
``output`` folder, optionally ``keyed_url`` + ``api_key`` (a gateway that requires a key),
``failing_url`` (a gateway whose upscaler fails),
``chromium`` (the executable) and ``timeout_s``. Writes ``results.json``, ``web-page.png``,
the downloaded file and screenshots of the comparison into ``output``. Every check is the
caller's: this script only records.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from playwright.sync_api import BrowserContext, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1280, "height": 860}
DIVIDER_MARGIN_PX = 28  # columns this close to the divider (its line and handle) are not compared
SPLIT_AFTER_DRAG = 0.7  # the mouse drags the divider from 30% to 70% of the photo's width
JOB_URL = re.compile(r"/v1/jobs/[0-9a-f]{32}$")  # GET (or DELETE) one job


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _band(array: np.ndarray) -> np.ndarray:
    """The rows compared: the faces' band, below the labels."""
    height = array.shape[0]
    return array[int(height * 0.40): int(height * 0.65)]


def _mean_difference(first: np.ndarray, second: np.ndarray, columns: slice) -> float:
    return float(np.abs(_band(first)[:, columns] - _band(second)[:, columns]).mean())


# records every value the page's progress shows, as it shows it (a MutationObserver, so no
# value between two looks is missed): the bars' value/max/aria-valuetext, the stage, the ETA
RECORD_PROGRESS = """() => {
  const seen = { tiles: [], faces: [], stages: [], labels: [], etas: [] };
  window.progressSeen = seen;
  const push = (list, item) => {
    if (JSON.stringify(list[list.length - 1]) !== JSON.stringify(item)) list.push(item);
  };
  const bar = (id) => {
    const element = document.getElementById(id);
    return [element.hasAttribute('value') ? element.value : null, element.max, element.getAttribute('aria-valuetext')];
  };
  const record = () => {
    push(seen.tiles, bar('progress-bar'));
    if (!document.getElementById('faces-meter').hidden) push(seen.faces, bar('faces-bar'));
    push(seen.stages, document.getElementById('progress').dataset.stage || '');
    push(seen.labels, document.getElementById('progress-label').textContent);
    const eta = document.getElementById('eta').textContent;
    if (eta) push(seen.etas, eta);
  };
  new MutationObserver(record).observe(document.getElementById('progress'),
    { attributes: true, childList: true, subtree: true, characterData: true });
}"""


def _state(page: Page) -> str:
    return str(page.evaluate("document.body.dataset.state"))


def _wait_state(page: Page, wanted: str, timeout_s: float) -> None:
    page.wait_for_function(f"document.body.dataset.state === {json.dumps(wanted)}", timeout=timeout_s * 1000)


def _run_main_flow(page: Page, scenario: dict[str, Any], output: Path, results: dict[str, Any]) -> None:
    timeout_s = float(scenario.get("timeout_s", 30))
    page.goto(scenario["url"])
    page.wait_for_function("document.querySelectorAll('#preset option').length > 0")
    page.wait_for_timeout(300)  # openapi.json fills the presets and defaults
    results["title"] = page.title()
    results["presets"] = page.eval_on_selector_all("#preset option", "options => options.map(o => o.value)")
    results["initial_state"] = _state(page)
    results["enhance_disabled_before_choosing"] = page.is_disabled("#enhance-button")

    page.set_input_files("#file-input", scenario["photo"])
    page.wait_for_function("document.getElementById('chosen-info').textContent.includes('×')")
    results["chosen_info"] = page.inner_text("#chosen-info")
    page.select_option("#preset", "balanced")
    page.fill("#scale", "2")
    results["output_size_hint"] = page.inner_text("#output-size-hint")
    page.evaluate(RECORD_PROGRESS)
    page.click("#enhance-button")

    # while the job runs: the bars (found by role and name, as a screen reader would), the
    # stage, an elapsed time that moves, an ETA
    _wait_state(page, "working", timeout_s)
    page.wait_for_function("/^[1-9]\\d* of /.test(document.getElementById('tiles-text').textContent)",
                           timeout=timeout_s * 1000)
    results["progress_visible"] = page.is_visible("#progress")
    results["tiles_bar_by_role"] = page.get_by_role("progressbar", name="Tiles").count()
    results["faces_bar_by_role"] = page.get_by_role("progressbar", name="Faces").count()
    first_elapsed = page.inner_text("#elapsed")
    page.wait_for_timeout(350)
    results["elapsed_moved"] = [first_elapsed, page.inner_text("#elapsed")]
    results["cancel_visible"] = page.is_visible("#cancel-button")
    results["eta_text"] = page.inner_text("#eta")
    page.evaluate("document.activeElement.blur()")
    page.mouse.move(0, 0)
    page.screenshot(path=str(output / "web-page-progress.png"), full_page=True)

    _wait_state(page, "done", timeout_s)
    results["progress_seen"] = page.evaluate("window.progressSeen")
    page.wait_for_function(
        "document.getElementById('after-image').complete && document.getElementById('before-image').complete"
    )
    results["progress_hidden_after"] = not page.is_visible("#progress")
    results["faces_text"] = page.inner_text("#faces-result")
    results["size_text"] = page.inner_text("#size-result")
    results["bytes_text"] = page.inner_text("#bytes-result")
    results["timing_stages"] = page.eval_on_selector_all("#timings .stage", "items => items.map(i => i.textContent)")
    results["download_text"] = page.inner_text("#download-link")
    results["after_natural_size"] = page.evaluate(
        "[document.getElementById('after-image').naturalWidth, document.getElementById('after-image').naturalHeight]"
    )
    compare = page.locator("#compare")
    box = compare.bounding_box()
    assert box is not None
    results["compare_box"] = box
    before_box = page.locator("#before-image").bounding_box()
    results["before_box"] = before_box

    # the slider: keyboard to both ends, then a mouse drag, then arrow keys
    page.focus("#compare-range")
    page.keyboard.press("End")
    all_before = _image(compare.screenshot())
    results["value_after_end"] = float(page.input_value("#compare-range"))
    page.keyboard.press("Home")
    all_after = _image(compare.screenshot())
    results["value_after_home"] = float(page.input_value("#compare-range"))
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * SPLIT_AFTER_DRAG, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    results["value_after_drag"] = float(page.input_value("#compare-range"))
    split = _image(compare.screenshot())
    divider = page.locator("#divider").bounding_box()
    assert divider is not None
    results["divider_fraction_after_drag"] = (divider["x"] + divider["width"] / 2 - box["x"]) / box["width"]
    results["range_focused_after_drag"] = page.evaluate("document.activeElement.id")
    width = split.shape[1]
    divider_column = int(width * SPLIT_AFTER_DRAG)
    left = slice(0, divider_column - DIVIDER_MARGIN_PX)
    right = slice(divider_column + DIVIDER_MARGIN_PX, width)
    results["pixels"] = {
        "before_vs_after": _mean_difference(all_before, all_after, slice(0, width)),
        "split_left_vs_before": _mean_difference(split, all_before, left),
        "split_left_vs_after": _mean_difference(split, all_after, left),
        "split_right_vs_after": _mean_difference(split, all_after, right),
        "split_right_vs_before": _mean_difference(split, all_before, right),
    }
    for _ in range(5):
        page.keyboard.press("ArrowLeft")
    results["value_after_arrows"] = float(page.input_value("#compare-range"))
    results["aria_valuetext"] = page.get_attribute("#compare-range", "aria-valuetext")

    # zoom: 100% shows one photo pixel per CSS pixel
    page.click(".zoom-button[data-zoom='1']")
    results["compare_width_at_100"] = page.evaluate("document.getElementById('compare').getBoundingClientRect().width")
    page.click(".zoom-button[data-zoom='fit']")

    # the download is the enhanced photo
    with page.expect_download() as download_info:
        page.click("#download-link")
    download = download_info.value
    download_path = output / "download.bin"
    download.save_as(download_path)
    results["download_name"] = download.suggested_filename
    results["download_path"] = str(download_path)

    # the picture for the docs: the divider in the middle
    page.focus("#compare-range")
    page.keyboard.press("Home")
    for _ in range(5):
        page.keyboard.press("PageUp")
    results["value_for_screenshot"] = float(page.input_value("#compare-range"))
    page.evaluate("document.activeElement.blur()")
    page.mouse.move(0, 0)
    page.screenshot(path=str(output / "web-page.png"), full_page=True)

    # a file that is not a photo: the gateway's JSON error, shown
    page.set_input_files("#file-input", scenario["not_a_photo"])
    page.click("#enhance-button")
    _wait_state(page, "error", timeout_s)
    results["error_visible"] = page.is_visible("#error")
    results["error_code"] = page.inner_text("#error-code")
    results["error_message"] = page.inner_text("#error-message")
    results["error_hint"] = page.inner_text("#error-hint")
    page.screenshot(path=str(output / "web-page-error.png"), full_page=True)

    # over the gateway's output limit (from its OpenAPI document): said before uploading
    enhance_calls = sum("/v1/jobs?" in url for url in results["requests"])
    page.set_input_files("#file-input", scenario["photo"])
    page.wait_for_function("document.getElementById('chosen-info').textContent.includes('×')")
    page.fill("#scale", "4")
    page.click("#enhance-button")
    _wait_state(page, "error", timeout_s)
    results["limit_error_code"] = page.inner_text("#error-code")
    results["limit_error_message"] = page.inner_text("#error-message")
    results["limit_uploads"] = sum("/v1/jobs?" in url for url in results["requests"]) - enhance_calls

    # the event stream refused: the page follows the job by GET instead, to the result, through
    # two GETs answered 503 (as a gateway that restarts may)
    page.fill("#scale", "2")
    page.route("**/events", lambda route: route.abort())
    unavailable = {"left": 2}

    def restarting(route: Any) -> None:
        if unavailable["left"] > 0:
            unavailable["left"] -= 1
            route.fulfill(status=503, content_type="application/json",
                          body=json.dumps({"error": {"code": "shutting_down", "message": "restarting"}}))
        else:
            route.continue_()

    page.route(JOB_URL, restarting)
    polls_before = len(_job_polls(results))
    page.evaluate(RECORD_PROGRESS)
    page.click("#enhance-button")
    _wait_state(page, "done", timeout_s)
    page.wait_for_function("document.getElementById('after-image').complete")
    page.unroute("**/events")
    page.unroute(JOB_URL)
    results["polled_progress_seen"] = page.evaluate("window.progressSeen")
    results["polls_without_stream"] = len(_job_polls(results)) - polls_before
    results["polled_after_natural_size"] = page.evaluate(
        "[document.getElementById('after-image').naturalWidth, document.getElementById('after-image').naturalHeight]"
    )

    # cancel while the tiles are being done: a DELETE, and the page ready again
    page.click("#enhance-button")
    page.wait_for_function("/^[1-9]\\d* of /.test(document.getElementById('tiles-text').textContent)",
                           timeout=timeout_s * 1000)
    page.click("#cancel-button")
    _wait_state(page, "cancelled", timeout_s)
    results["cancelled_progress_hidden"] = not page.is_visible("#progress")
    results["cancelled_error_hidden"] = not page.is_visible("#error")
    results["enhance_enabled_after_cancel"] = page.is_enabled("#enhance-button")


def _job_polls(results: dict[str, Any]) -> list[str]:
    return [url for url in results["requests"] if JOB_URL.search(url)]


def _run_api_key_flow(context: BrowserContext, scenario: dict[str, Any], results: dict[str, Any]) -> None:
    timeout_s = float(scenario.get("timeout_s", 30))
    page = context.new_page()
    page.goto(scenario["keyed_url"])
    page.wait_for_timeout(300)
    results["key_details_open_at_start"] = page.evaluate("document.getElementById('api-key-details').open")
    page.set_input_files("#file-input", scenario["photo"])
    page.select_option("#preset", "fast")
    page.click("#enhance-button")
    _wait_state(page, "error", timeout_s)
    results["keyless_error_code"] = page.inner_text("#error-code")
    results["key_field_focused"] = page.evaluate("document.activeElement.id")
    page.fill("#api-key", scenario["api_key"])
    page.click("#enhance-button")
    _wait_state(page, "done", timeout_s)
    results["keyed_faces_text"] = page.inner_text("#faces-result")
    keyed_host = urlsplit(scenario["keyed_url"]).netloc
    keyed = [url for url in results["requests"] if urlsplit(url).netloc == keyed_host]
    results["keyed_event_streams"] = sum(url.endswith("/events") for url in keyed)
    results["keyed_results"] = sum(url.endswith("/result") for url in keyed)
    page.reload()
    page.wait_for_timeout(300)
    results["key_after_reload"] = page.input_value("#api-key")
    page.close()


def _error_shown(page: Page) -> dict[str, str]:
    return {"code": page.inner_text("#error-code"), "message": page.inner_text("#error-message"),
            "hint": page.inner_text("#error-hint")}


def _run_failure_flow(context: BrowserContext, scenario: dict[str, Any], results: dict[str, Any]) -> None:
    """A gateway whose upscaler fails: the failed job's reason shown; then a job that vanishes
    (its GET answers 404 job_not_found, made so here) shown as gone."""
    timeout_s = float(scenario.get("timeout_s", 30))
    page = context.new_page()
    page.goto(scenario["failing_url"])
    page.wait_for_timeout(300)
    page.set_input_files("#file-input", scenario["photo"])
    page.select_option("#preset", "fast")
    page.click("#enhance-button")
    _wait_state(page, "error", timeout_s)
    results["failed_job_error"] = _error_shown(page)

    page.route("**/events", lambda route: route.abort())
    page.route(JOB_URL, lambda route: route.fulfill(
        status=404, content_type="application/json",
        body=json.dumps({"error": {"code": "job_not_found", "message": "no such job"}})))
    page.click("#enhance-button")
    _wait_state(page, "error", timeout_s)
    results["lost_job_error"] = _error_shown(page)
    page.close()


def main(scenario_path: str) -> int:
    scenario = json.loads(Path(scenario_path).read_text())
    output = Path(scenario["output"])
    output.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"console_errors": [], "requests": [], "deletes": []}
    allowed_hosts = {urlsplit(scenario["url"]).netloc}
    for name in ("keyed_url", "failing_url"):
        if scenario.get(name):
            allowed_hosts.add(urlsplit(scenario[name]).netloc)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaoqing-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=scenario.get("chromium", "/usr/bin/chromium"), headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT, accept_downloads=True, device_scale_factor=1,
        )
        context.set_default_timeout(float(scenario.get("timeout_s", 30)) * 1000)

        def on_console(message: Any) -> None:
            # a 4xx answer is logged as a failed resource load; the page shows those itself
            if message.type == "error" and "Failed to load resource" not in message.text:
                results["console_errors"].append(message.text)

        def on_request(request: Any) -> None:
            results["requests"].append(request.url)
            if request.method == "DELETE":
                results["deletes"].append(request.url)

        context.on("console", on_console)
        context.on("request", on_request)
        page = context.new_page()
        page.on("pageerror", lambda error: results["console_errors"].append(str(error)))
        try:
            _run_main_flow(page, scenario, output, results)
            if scenario.get("keyed_url"):
                _run_api_key_flow(context, scenario, results)
            if scenario.get("failing_url"):
                _run_failure_flow(context, scenario, results)
        # a step that failed (Playwright's errors and timeouts, a missing element, a download
        # that is no image, a value that is no number): recorded for the test to show, with a
        # picture of the moment; anything else is a bug here and ends the script with a traceback
        except (PlaywrightError, AssertionError, OSError, ValueError) as exc:
            results["failure"] = f"{type(exc).__name__}: {exc}"
            try:
                page.screenshot(path=str(output / "failure.png"), full_page=True)
                results["state_at_failure"] = _state(page)
            except PlaywrightError as screenshot_error:  # the page itself is gone
                results["state_at_failure"] = f"unavailable ({screenshot_error})"
        finally:
            context.close()
    results["foreign_requests"] = [
        url for url in results["requests"]
        if not url.startswith(("blob:", "data:")) and urlsplit(url).netloc not in allowed_hosts
    ]
    results["seconds"] = round(time.monotonic() - started, 2)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if "failure" not in results else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
