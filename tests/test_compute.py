"""The compute budget: never more heavy batches at once than slots, across models and model
server processes; light work (detection) beside them; slots back after errors, abandoned and
killed requests, and dead processes. Counters and events, not timings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import gevent
import numpy as np
import psutil
import pytest
import requests
from conftest import eventually
from gevent import monkey

from chaoqing.config import ModelServerSettings, load_config
from chaoqing.errors import ConfigError, InferenceFailed, RunnerError
from chaoqing.gateway.supervisor import ModelServerSupervisor
from chaoqing.modelserver.batcher import Batcher, BatchSettings
from chaoqing.modelserver.compute import ComputeBudget, create_slot_files
from chaoqing.modelserver.runners.base import ModelSpec, Runner, TensorSpec
from chaoqing.protocol import v2

pytestmark = pytest.mark.timeout(90)


class _Gate:
    """Holds every native thread that reaches it until :meth:`open` (a native lock: runners
    run on native threads, and monkey-patching made threading's locks gevent's)."""

    def __init__(self) -> None:
        self._lock = monkey.get_original("_thread", "allocate_lock")()
        self._lock.acquire()

    def pass_through(self) -> None:
        self._lock.acquire()
        self._lock.release()

    def open(self) -> None:
        self._lock.release()


class _Census:
    """How many runs are inside a runner now and at most, across every runner that shares it."""

    def __init__(self) -> None:
        self._lock = monkey.get_original("_thread", "allocate_lock")()
        self.running = 0
        self.peak = 0
        self.started = 0
        self.finished = 0

    def enter(self) -> None:
        with self._lock:
            self.running += 1
            self.started += 1
            self.peak = max(self.peak, self.running)

    def leave(self) -> None:
        with self._lock:
            self.running -= 1
            self.finished += 1


class _CountingRunner(Runner):
    """Counts itself in ``census`` while it runs on its native thread, waits at ``gate`` (when
    given), then echoes its input or fails."""

    def __init__(self, census: _Census, gate: _Gate | None = None, *, heavy: bool = True, fail: bool = False,
                 max_batch_size: int = 1) -> None:
        self.census = census
        self.gate = gate
        self.fail = fail
        self.holds_compute_slot = heavy
        self.batch_sizes: list[int] = []
        self.spec = ModelSpec(
            name="counting", platform="test",
            inputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),
            max_batch_size=max_batch_size, parameters={"scale": 1},
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.census.enter()
        try:
            self.batch_sizes.append(int(inputs["image"].shape[0]))
            if self.gate is not None:
                self.gate.pass_through()
            if self.fail:
                raise RunnerError("the test runner fails on purpose")
            return {"image": np.array(inputs["image"])}
        finally:
            self.census.leave()


def _image(seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)}


@pytest.fixture
def slots_folder(tmp_path: Path) -> Callable[[int], Path]:
    def make(slots: int) -> Path:
        folder = tmp_path / f"slots-{slots}"
        create_slot_files(folder, slots)
        return folder

    return make


@pytest.fixture
def batchers() -> Iterator[Callable[..., Batcher]]:
    made: list[Batcher] = []
    budgets: list[ComputeBudget] = []

    def make(runner: Runner, folder: Path | None, **settings: object) -> Batcher:
        budget = ComputeBudget(folder) if folder is not None else None
        if budget is not None:
            budgets.append(budget)
        batcher = Batcher(runner, BatchSettings(**settings), budget=budget)  # type: ignore[arg-type]
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()
    for budget in budgets:
        budget.close()


def test_slots_exclude_each_other_across_budgets(slots_folder: Callable[[int], Path]) -> None:
    folder = slots_folder(2)
    first, second = ComputeBudget(folder), ComputeBudget(folder)  # two open file descriptions: two processes
    try:
        assert first.slots == second.slots == 2
        taken = [first.try_acquire(), second.try_acquire()]
        assert sorted(index for index in taken if index is not None) == [0, 1]
        assert first.try_acquire() is None and second.try_acquire() is None, "a third heavy batch got a slot"
        first.release(taken[0] if taken[0] is not None else 0)
        assert first.held == 0
        assert second.try_acquire() is not None, "a released slot was not free again"
        assert first.try_acquire() is None
    finally:
        first.close()
        second.close()


def test_a_killed_process_does_not_keep_its_slot(slots_folder: Callable[[int], Path]) -> None:
    folder = slots_folder(1)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         ("import time\nfrom chaoqing.modelserver.compute import ComputeBudget\n"
          f"budget = ComputeBudget({str(folder)!r})\nprint(budget.try_acquire(), flush=True)\ntime.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True,
    )
    budget = ComputeBudget(folder)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0", "the child took no slot"
        assert budget.try_acquire() is None, "the slot the child holds was taken again"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert budget.try_acquire() == 0, "the slot of a killed process stayed taken"
    finally:
        holder.kill()
        holder.wait()
        budget.close()


def test_a_folder_without_slots_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no slot-N files"):
        ComputeBudget(tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        ComputeBudget(tmp_path / "missing")
    with pytest.raises(ConfigError, match="model_server.compute_slots"):
        load_config(environ={"CHAOQING_MODEL_SERVER__COMPUTE_SLOTS": "-1"})
    assert load_config(environ={"CHAOQING_MODEL_SERVER__COMPUTE_SLOTS": "0"}).model_server.compute_slots == 0


def test_two_models_never_compute_more_batches_than_slots(
    slots_folder: Callable[[int], Path], batchers: Callable[..., Batcher]
) -> None:
    folder = slots_folder(2)
    census, gate = _Census(), _Gate()
    # two models, each with a budget of its own over the same files, as two processes have
    upscaler = batchers(_CountingRunner(census, gate), folder, max_batch_size=1)
    face_model = batchers(_CountingRunner(census, gate), folder, max_batch_size=1)
    assert upscaler.budget is not None and face_model.budget is not None
    calls = [gevent.spawn(batcher.infer, _image(index), 60.0) for index in range(3) for batcher in (upscaler, face_model)]
    try:
        assert eventually(lambda: census.running == 2, 20.0), census.running
        # the other four are queued, and a scheduler with an instance free waits for a slot
        assert eventually(lambda: upscaler.queue_depth + face_model.queue_depth == 4
                          and upscaler.budget.waiting + face_model.budget.waiting >= 1, 20.0)  # type: ignore[union-attr]
        assert census.running == 2 and census.started == 2
    finally:
        gate.open()
    gevent.joinall(calls, raise_error=True, timeout=30)
    assert all(call.successful() for call in calls)
    assert census.finished == 6 and census.peak == 2, census.peak
    assert upscaler.budget.held == 0 and face_model.budget.held == 0  # type: ignore[union-attr]


def test_light_work_runs_while_every_slot_is_held(
    slots_folder: Callable[[int], Path], batchers: Callable[..., Batcher]
) -> None:
    folder = slots_folder(1)
    heavy_census, light_census, gate = _Census(), _Census(), _Gate()
    upscaler = batchers(_CountingRunner(heavy_census, gate), folder)
    detector = batchers(_CountingRunner(light_census, heavy=False), folder)
    assert detector.budget is None, "a light runner was put under the budget"
    upscaling = gevent.spawn(upscaler.infer, _image(), 60.0)
    try:
        assert eventually(lambda: heavy_census.running == 1, 20.0)
        detected = detector.infer(_image(1), 20.0)  # answered while the only slot is held
        assert detected["image"].shape == (1, 4, 4, 3) and light_census.finished == 1
        assert heavy_census.finished == 0, "the heavy batch had finished: nothing was tested"
    finally:
        gate.open()
    upscaling.get(timeout=30)


def test_a_failing_batch_gives_its_slot_back(
    slots_folder: Callable[[int], Path], batchers: Callable[..., Batcher]
) -> None:
    folder = slots_folder(1)
    census = _Census()
    failing = batchers(_CountingRunner(census, fail=True), folder)
    working = batchers(_CountingRunner(census), folder)
    with pytest.raises(InferenceFailed, match="fails on purpose"):
        failing.infer(_image(), 20.0)
    assert working.infer(_image(), 20.0)["image"].shape == (1, 4, 4, 3), "the failed batch kept the only slot"
    assert eventually(lambda: failing.budget.held == 0 and working.budget.held == 0)  # type: ignore[union-attr]


def test_an_abandoned_request_is_not_computed_and_holds_no_slot(
    slots_folder: Callable[[int], Path], batchers: Callable[..., Batcher]
) -> None:
    folder = slots_folder(1)
    census = _Census()
    other_process = ComputeBudget(folder)
    try:
        assert other_process.try_acquire() == 0
        batcher = batchers(_CountingRunner(census), folder)
        assert batcher.budget is not None
        waiting = gevent.spawn(batcher.infer, _image(), 60.0)
        assert eventually(lambda: batcher.budget.waiting == 1)  # type: ignore[union-attr]
        waiting.kill()  # the client went away while its batch waited for a slot
        assert eventually(lambda: batcher.budget.waiting == 0), "the scheduler kept waiting for nobody"  # type: ignore[union-attr]
        other_process.release(0)
        assert batcher.infer(_image(1), 20.0)["image"].shape == (1, 4, 4, 3)
        assert census.started == 1, "the abandoned request was computed"
        assert eventually(lambda: batcher.budget.held == 0)  # type: ignore[union-attr]
    finally:
        other_process.close()


def test_a_request_killed_while_computing_frees_the_slot_when_the_computation_ends(
    slots_folder: Callable[[int], Path], batchers: Callable[..., Batcher]
) -> None:
    folder = slots_folder(1)
    census, gate = _Census(), _Gate()
    batcher = batchers(_CountingRunner(census, gate), folder)
    assert batcher.budget is not None
    computing = gevent.spawn(batcher.infer, _image(), 60.0)
    assert eventually(lambda: census.running == 1, 20.0)
    computing.kill()
    assert batcher.budget.held == 1, "native code cannot be stopped: its slot stays held while it runs"
    gate.open()
    assert eventually(lambda: census.finished == 1 and batcher.budget.held == 0, 20.0)
    assert batcher.infer(_image(1), 20.0)["image"].shape == (1, 4, 4, 3)


def test_requests_that_arrive_together_share_the_free_slots(
    slots_folder: Callable[[int], Path], batchers: Callable[..., Batcher]
) -> None:
    folder = slots_folder(2)
    census, gate = _Census(), _Gate()
    runner = _CountingRunner(census, gate, max_batch_size=8)
    # a 50 ms batching window: without the share, both requests would be one batch on one slot
    batcher = batchers(runner, folder, max_batch_size=8, max_queue_delay_s=0.05)
    calls = [gevent.spawn(batcher.infer, _image(index), 60.0) for index in range(2)]
    try:
        assert eventually(lambda: census.running == 2, 20.0), runner.batch_sizes
    finally:
        gate.open()
    gevent.joinall(calls, raise_error=True, timeout=30)
    assert runner.batch_sizes == [1, 1]


def test_without_a_budget_the_batcher_batches_as_before(batchers: Callable[..., Batcher]) -> None:
    census, gate = _Census(), _Gate()
    runner = _CountingRunner(census, gate, max_batch_size=8)
    batcher = batchers(runner, None, max_batch_size=8, max_queue_delay_s=0.0)
    first = gevent.spawn(batcher.infer, _image(0), 60.0)
    assert eventually(lambda: census.running == 1, 20.0)
    queued = [gevent.spawn(batcher.infer, _image(index), 60.0) for index in range(1, 4)]
    assert eventually(lambda: batcher.queue_depth == 3)
    gate.open()
    gevent.joinall([first, *queued], raise_error=True, timeout=30)
    assert runner.batch_sizes == [1, 3], "requests queued behind a busy instance form one batch"


def _post(url: str, model: str, timeout_s: float = 60.0) -> requests.Response:
    image = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    if model == "face-detector":
        image = image[0]
    message = v2.encode_infer_request({"image": image}, [])
    return requests.post(f"{url}/v2/models/{model}/infer", data=message.join(), headers=dict(message.http_headers()),
                         timeout=timeout_s)


def _metric(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in {url}/metrics")


@pytest.mark.slow
def test_model_server_processes_share_one_budget(slots_folder: Callable[[int], Path]) -> None:
    """Real model servers in processes of their own, one slot for all: the test holds it, the
    upscalers wait (their metrics say so), the detector answers; released, both answer."""
    folder = slots_folder(1)
    settings = ModelServerSettings(threads=1, compute_slots=0)
    supervisor = ModelServerSupervisor(["realesr-animevideov3-x2", "realesr-animevideov3-x4", "face-detector"],
                                       settings, log_level="error")
    # no budget of its own: every child gets the test's folder instead
    for child in supervisor._children.values():
        child.extra_arguments = ("--compute-slots", str(folder))
    test_process = ComputeBudget(folder)
    supervisor.start()
    try:
        urls = {model: supervisor.endpoints[model][0] for model in supervisor.endpoints}
        for url in urls.values():
            assert eventually(lambda url=url: requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200, 60.0)
        assert test_process.try_acquire() == 0
        upscales = [gevent.spawn(_post, urls[model], model) for model in ("realesr-animevideov3-x2", "realesr-animevideov3-x4")]
        for model in ("realesr-animevideov3-x2", "realesr-animevideov3-x4"):
            assert eventually(lambda model=model: _metric(urls[model], "chaoqing_compute_slots_waiting") == 1, 30.0), model
        assert _post(urls["face-detector"], "face-detector").status_code == 200, "detection waited for a slot"
        assert not any(upscale.ready() for upscale in upscales), "an upscaler computed without a slot"
        test_process.release(0)
        gevent.joinall(upscales, timeout=60)
        assert [upscale.value.status_code for upscale in upscales if upscale.ready()] == [200, 200]
        for model in ("realesr-animevideov3-x2", "realesr-animevideov3-x4"):
            assert _metric(urls[model], "chaoqing_compute_slots_held") == 0
    finally:
        supervisor.stop(grace_s=5.0)
        test_process.close()


def test_the_supervisor_makes_the_slots_and_splits_the_cores() -> None:
    settings = ModelServerSettings(compute_slots=2, sim_latency_ms=1.0)
    supervisor = ModelServerSupervisor(["sim-upscale-x2"], settings, log_level="error")
    supervisor.start()
    try:
        folder = supervisor.compute_slots_directory
        assert folder is not None and sorted(path.name for path in folder.iterdir()) == ["slot-0", "slot-1"]
        command = psutil.Process(supervisor.pids()["sim-upscale-x2"]).cmdline()
        assert command[command.index("--compute-slots") + 1] == str(folder)
        assert command[command.index("--threads") + 1] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    finally:
        supervisor.stop(grace_s=5.0)
    assert not folder.exists(), "the slots outlived the supervisor"
    off = ModelServerSupervisor(["sim-upscale-x2"], ModelServerSettings(compute_slots=0, threads=0), log_level="error")
    assert off.compute_slots == 0 and off.threads_per_model == 0
    gpu = ModelServerSupervisor(["sim-upscale-x2"], ModelServerSettings(compute_slots=2, device="vulkan:0"))
    assert gpu.compute_slots == 0, "a GPU device was given the CPU's budget"


def test_model_server_refuses_a_folder_without_slots(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chaoqing", "model-server", "--model", "sim-upscale-x2", "--port", "0",
         "--compute-slots", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "--compute-slots" in result.stderr and "no slot-N files" in result.stderr, result.stderr
