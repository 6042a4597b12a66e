"""A dynamic batcher per model: a bounded queue in front of the model's instances.

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

Every runner is treated alike: the batcher knows nothing of simulators, whose latency is
waited inside their own ``run`` (:mod:`chaoqing.modelserver.runners.sim`). Where a runner
runs is a capability it declares. One that sets :attr:`Runner.runs_on_hub` (its ``run``
waits cooperatively and blocks neither the hub nor a thread) is called in the batch's
greenlet rather than on an instance thread, and the batcher starts as many batches at once
as its :attr:`Runner.max_concurrent_batches` says (0: no limit) in place of ``instances``.
A declared flag rather than a hook: the only difference is where ``run`` is called and how
many at once, so the queue, batching, deadlines and abandonment above stay one code path.

A compute budget (:class:`~chaoqing.modelserver.compute.ComputeBudget`, the slots the model
servers on one machine share) changes three things for a runner that
:attr:`~chaoqing.modelserver.runners.base.Runner.holds_compute_slot`:

- each batch holds a slot while it computes. The scheduler takes the slot once a request
  is queued and before it gathers the batch, so requests that arrive while it waits join
  that batch, and it gives the wait up when every queued request is abandoned or expired
  (nothing is computed for nobody, and no slot is held idle). The slot is released when the
  runner returns or raises; a request killed while its batch computes frees it when the
  computation ends (native code cannot be interrupted).
- the batcher starts up to ``max(instances, slots)`` batches at once: the slots bound what
  the machine computes, so any model may use any free slot.
- the queue is shared among the instances free at the moment: a batch takes at most its
  share, ⌈queued items / free instances⌉. On a CPU a batch of N crops runs as N calls in
  turn (ncnn has no batch dimension), so two faces in one batch would run on one slot while
  the other stays idle; as two batches they run side by side.
"""

from __future__ import annotations

import logging
import math
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
from chaoqing.modelserver.compute import ComputeBudget, ComputeSlot
from chaoqing.modelserver.runners.base import Runner

__all__ = ["BatchRecord", "BatchSettings", "Batcher"]

_log = logging.getLogger("chaoqing.modelserver.batcher")

UNLIMITED_BATCHES = 10**6  # a runner on the hub with max_concurrent_batches 0: no limit of its own


@dataclass(frozen=True)
class BatchSettings:
    """How one model's batcher behaves."""

    instances: int = 1
    max_batch_size: int = 8
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 256


@dataclass(frozen=True)
class BatchRecord:
    """What one executed batch looked like (for metrics and tests)."""

    size: int
    queue_wait_s: float
    compute_s: float
    slot_wait_s: float = 0.0  # how long it waited for a compute slot (0 without a budget)


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
        budget: ComputeBudget | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self._on_batch = on_batch
        # a runner that declares itself light (the detector, the simulators) runs beside the budget
        self.budget = budget if budget is not None and runner.holds_compute_slot else None
        self._batched = runner.spec.max_batch_size > 0
        self._max_items = min(settings.max_batch_size, runner.spec.max_batch_size) if self._batched else 1
        self._queue: deque[_Queued] = deque()
        self._arrived = Event()
        # one native thread per model instance, and as many batches at once; a runner on the
        # hub needs no thread and says itself how many batches it takes
        self._threads: ThreadPool | None = None
        if runner.runs_on_hub:
            slots = runner.max_concurrent_batches or UNLIMITED_BATCHES
        else:
            slots = max(1, settings.instances, self.budget.slots if self.budget is not None else 0)
            self._threads = ThreadPool(slots)
        self._free_instances = Semaphore(slots)
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
        if self._threads is not None:
            self._threads.kill()
        self.runner.close()

    # -- scheduling -------------------------------------------------------------------------

    def _schedule_forever(self) -> None:
        while True:
            self._free_instances.acquire()
            slot = None
            try:
                if self.budget is not None:
                    slot = self._take_slot()
                batch = self._gather_batch()
            except BaseException:
                if slot is not None and self.budget is not None:
                    self.budget.release(slot)
                self._free_instances.release()
                raise
            gevent.spawn(self._run_batch, batch, slot)

    def _has_live_work(self) -> bool:
        now = time.monotonic()
        return any(not item.abandoned and not _expired(item, now) for item in self._queue)

    def _take_slot(self) -> ComputeSlot:
        """Wait for a queued request, then for a compute slot while one is still wanted."""
        assert self.budget is not None
        while True:
            self._wait_for_work()
            slot = self.budget.acquire(self._has_live_work)
            if slot is not None:
                if self._has_live_work():
                    return slot
                self.budget.release(slot)
            elif self.budget.closed:
                raise gevent.GreenletExit  # closing: the scheduler ends

    def _wait_for_work(self) -> None:
        while True:
            self._drop_dead()
            if self._queue:
                return
            self._arrived.clear()
            self._arrived.wait()

    def _drop_dead(self) -> None:
        now = time.monotonic()
        while self._queue and (self._queue[0].abandoned or _expired(self._queue[0], now)):
            item = self._queue.popleft()
            if not item.abandoned:
                item.result.set_exception(DeadlineExceeded("deadline passed while queued"))

    def _batch_limit(self) -> int:
        """Items this batch may take: all it may, or under a budget its share of the queue."""
        free_instances = int(self._free_instances.counter) + 1  # this batch's instance and those still free
        if self.budget is None or free_instances <= 1:
            return self._max_items
        queued_items = sum(item.batch_items for item in self._queue if not item.abandoned)
        return max(1, min(self._max_items, math.ceil(queued_items / free_instances)))

    def _gather_batch(self) -> list[_Queued]:
        self._wait_for_work()
        limit = self._batch_limit()
        head = self._queue.popleft()
        batch = [head]
        items = head.batch_items
        closes_at = time.monotonic() + self.settings.max_queue_delay_s
        while items < limit:
            items += self._take_matching(batch, head.shape_key, limit - items)
            remaining = closes_at - time.monotonic()
            if items >= limit or remaining <= 0:
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

    def _run_batch(self, batch: list[_Queued], slot: ComputeSlot | None = None) -> None:
        started = time.monotonic()
        try:
            live = [item for item in batch if not item.abandoned]
            if not live:
                return
            stacked = _stack([item.inputs for item in live], self._batched)
            computing = time.monotonic()
            try:
                if self._threads is None:
                    outputs = self.runner.run(stacked)
                else:
                    outputs = self._threads.apply(self.runner.run, (stacked,))
            except Exception as exc:  # noqa: BLE001 - a runner failure is the request's error, not the server's
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
                        slot_wait_s=slot.waited_s if slot is not None else 0.0,
                    )
                )
        finally:
            if slot is not None and self.budget is not None:
                self.budget.release(slot)
            self._free_instances.release()


def _expired(item: _Queued, now: float) -> bool:
    return item.deadline is not None and now >= item.deadline


def _stack(inputs: list[Mapping[str, np.ndarray]], batched: bool) -> dict[str, np.ndarray]:
    if len(inputs) == 1:
        return dict(inputs[0])
    if not batched:
        raise AssertionError("unbatched models run one request at a time")
    return {name: np.concatenate([item[name] for item in inputs], axis=0) for name in inputs[0]}
