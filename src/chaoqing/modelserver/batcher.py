"""A dynamic batcher per model: a bounded queue in front of one native thread per instance.

Requests (greenlets of the model server) call :meth:`Batcher.infer` and wait. A scheduling
greenlet waits for a free model instance, takes the oldest queued request, gathers queued
requests of the same input shape until ``max_batch_size`` or until ``max_queue_delay_s``
has passed, stacks them along the batch dimension and runs the runner on the instance's
thread (ncnn and dlib release the GIL, so the hub keeps answering health checks). While an
instance is busy, requests accumulate, so batches grow with load without waiting longer.

Limits: the queue holds at most ``max_queue_size`` requests; past that :class:`Overloaded`
is raised at once (the server answers 503 with Retry-After). A request whose own deadline
passes while it is queued is answered with :class:`DeadlineExceeded` and never computed; a
waiting greenlet that is killed (client gone) is dropped from the queue.

Simulators (``runner.simulated_latency_s`` > 0) wait their latency per batch cooperatively.
By default they have no instance limit, as if each batch had hardware of its own;
``sim_concurrency`` N > 0 lets only N batches of a simulated model run at once, so one sim
server behaves like one accelerator (``sim_concurrency=1, max_batch_size=1``: one call at a
time, each taking the latency) and a fleet of them can be measured.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import gevent
import numpy as np
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from gevent.threadpool import ThreadPool

from chaoqing.errors import DeadlineExceeded, InferenceFailed, Overloaded
from chaoqing.modelserver.runners.base import Runner

__all__ = ["BatchRecord", "BatchSettings", "Batcher"]

_log = logging.getLogger("chaoqing.modelserver.batcher")

SIMULATOR_THREADS = 4  # cheap nearest-neighbour outputs of simulators; they rarely all run at once
UNLIMITED_SIMULATED_BATCHES = 10**6  # sim_concurrency 0: every batch as if on hardware of its own


@dataclass(frozen=True)
class BatchSettings:
    """How one model's batcher behaves."""

    instances: int = 1
    max_batch_size: int = 8
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 256
    sim_concurrency: int = 0  # simulators only: batches run at once; 0 = unlimited


@dataclass(frozen=True)
class BatchRecord:
    """What one executed batch looked like (for metrics and tests)."""

    size: int
    queue_wait_s: float
    compute_s: float


@dataclass(eq=False)
class _Queued:
    inputs: Mapping[str, np.ndarray]
    shape_key: tuple[object, ...]
    batch_items: int
    deadline: float | None
    enqueued_at: float
    result: AsyncResult = field(default_factory=AsyncResult)
    abandoned: bool = False


def _shape_key(inputs: Mapping[str, np.ndarray], batched: bool) -> tuple[object, ...]:
    return tuple(
        (name, array.dtype.str, array.shape[1:] if batched else array.shape) for name, array in sorted(inputs.items())
    )


class Batcher:
    """Queue, group and run one model's requests. Use only from greenlets of one hub."""

    def __init__(
        self,
        runner: Runner,
        settings: BatchSettings,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self._on_batch = on_batch
        self._batched = runner.spec.max_batch_size > 0
        self._max_items = min(settings.max_batch_size, runner.spec.max_batch_size) if self._batched else 1
        self._simulated = runner.simulated_latency_s > 0
        self._queue: deque[_Queued] = deque()
        self._arrived = Event()
        instances = max(1, settings.instances)
        # one native thread per model instance; simulators share a small pool for their cheap outputs
        self._threads = ThreadPool(SIMULATOR_THREADS if self._simulated else instances)
        if self._simulated:
            instances = settings.sim_concurrency if settings.sim_concurrency > 0 else UNLIMITED_SIMULATED_BATCHES
        self._free_instances = Semaphore(instances)
        self._scheduler = gevent.spawn(self._schedule_forever)
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def infer(self, inputs: Mapping[str, np.ndarray], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue ``inputs`` (already validated), wait for their batch, return this request's outputs.

        Raises Overloaded when the queue is full, DeadlineExceeded when ``timeout_s`` passes
        first, InferenceFailed when the runner raises.
        """
        if self._closed:
            raise Overloaded("the model is shutting down")
        if len(self._queue) >= self.settings.max_queue_size:
            raise Overloaded(f"model {self.runner.spec.name}: queue full ({self.settings.max_queue_size} waiting)")
        now = time.monotonic()
        first = next(iter(inputs.values()))
        item = _Queued(
            inputs=inputs,
            shape_key=_shape_key(inputs, self._batched),
            batch_items=int(first.shape[0]) if self._batched else 1,
            deadline=None if timeout_s is None else now + timeout_s,
            enqueued_at=now,
        )
        self._queue.append(item)
        self._arrived.set()
        try:
            outputs: dict[str, np.ndarray] = item.result.get(timeout=timeout_s)
            return outputs
        except gevent.Timeout:
            raise DeadlineExceeded(f"model {self.runner.spec.name}: no result within {timeout_s:.3f} s") from None
        finally:
            item.abandoned = True

    def close(self) -> None:
        """Stop scheduling; queued requests fail with Overloaded. Running batches finish."""
        self._closed = True
        self._scheduler.kill()
        while self._queue:
            self._queue.popleft().result.set_exception(Overloaded("the model is shutting down"))
        self._threads.kill()
        self.runner.close()

    # -- scheduling -------------------------------------------------------------------------

    def _schedule_forever(self) -> None:
        while True:
            self._free_instances.acquire()
            try:
                batch = self._gather_batch()
            except BaseException:
                self._free_instances.release()
                raise
            gevent.spawn(self._run_batch, batch)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        while self._queue and (self._queue[0].abandoned or _expired(self._queue[0], now)):
            item = self._queue.popleft()
            if not item.abandoned:
                item.result.set_exception(DeadlineExceeded("deadline passed while queued"))

    def _gather_batch(self) -> list[_Queued]:
        while True:
            self._drop_dead()
            if self._queue:
                break
            self._arrived.clear()
            self._arrived.wait()
        head = self._queue.popleft()
        batch = [head]
        items = head.batch_items
        closes_at = time.monotonic() + self.settings.max_queue_delay_s
        while items < self._max_items:
            items += self._take_matching(batch, head.shape_key, self._max_items - items)
            remaining = closes_at - time.monotonic()
            if items >= self._max_items or remaining <= 0:
                break
            self._arrived.clear()
            self._arrived.wait(remaining)
        return batch

    def _take_matching(self, batch: list[_Queued], shape_key: tuple[object, ...], room: int) -> int:
        taken = 0
        now = time.monotonic()
        kept: deque[_Queued] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.abandoned:
                continue
            if _expired(item, now):
                item.result.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            if item.shape_key == shape_key and item.batch_items <= room - taken:
                batch.append(item)
                taken += item.batch_items
            else:
                kept.append(item)
        self._queue = kept
        return taken

    def _run_batch(self, batch: list[_Queued]) -> None:
        started = time.monotonic()
        try:
            live = [item for item in batch if not item.abandoned]
            if not live:
                return
            stacked = _stack([item.inputs for item in live], self._batched)
            if self._simulated:
                gevent.sleep(self.runner.simulated_latency_s)
            computing = time.monotonic()
            try:
                outputs = self._threads.apply(self.runner.run, (stacked,))
            except Exception as exc:  # a runner failure is the request's error, not the server's
                _log.exception("model %s failed on a batch of %d", self.runner.spec.name, len(live))
                failure = InferenceFailed(f"model {self.runner.spec.name} failed: {exc}")
                for item in live:
                    item.result.set_exception(failure)
                return
            finished = time.monotonic()
            offset = 0
            for item in live:
                if self._batched:
                    item.result.set({name: out[offset : offset + item.batch_items] for name, out in outputs.items()})
                    offset += item.batch_items
                else:
                    item.result.set(outputs)
            if self._on_batch is not None:
                self._on_batch(
                    BatchRecord(
                        size=sum(item.batch_items for item in live),
                        queue_wait_s=started - min(item.enqueued_at for item in live),
                        compute_s=finished - computing,
                    )
                )
        finally:
            self._free_instances.release()


def _expired(item: _Queued, now: float) -> bool:
    return item.deadline is not None and now >= item.deadline


def _stack(inputs: list[Mapping[str, np.ndarray]], batched: bool) -> dict[str, np.ndarray]:
    if len(inputs) == 1:
        return dict(inputs[0])
    if not batched:
        raise AssertionError("unbatched models run one request at a time")
    return {name: np.concatenate([item[name] for item in inputs], axis=0) for name in inputs[0]}
