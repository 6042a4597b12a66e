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
        self._queue: deque[_Queued] = deque()
        self._arrived = Event()
        # one native thread per model instance, and as many batches at once; a runner on the
        # hub needs no thread and says itself how many batches it takes
        self._threads: ThreadPool | None = None
        if runner.runs_on_hub:
            slots = runner.max_concurrent_batches or UNLIMITED_BATCHES
        else:
            slots = max(1, settings.instances)
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
