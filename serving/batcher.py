"""An asyncio micro-batcher in front of a synchronous batch function (the ONNX Runtime session).

    batcher = MicroBatcher(run_batch, max_batch_size=16, max_queue=256)
    result = await batcher.submit(item)          # from any coroutine on the event loop

`run_batch(items) -> results` (one result, or an exception instance, per item, in order) runs in
the batcher's single worker thread, one batch at a time, so the model sees one caller and its
batches stay on one device. Batches form by themselves: when the worker is idle a request is
dispatched at once (no added latency for a lone client); while a batch runs, arriving requests
queue and all of them (up to `max_batch_size`) make the next batch. `max_wait_s` > 0 holds the
first request of a batch that long for company (useful when a model call costs much more than
the per-request work, e.g. a GPU at low load). `submit(item, inline_if_idle=True)` runs the item
right on the event loop's thread when nothing is queued or running: the caller says it is alone
(the HTTP engine: the only request in flight), so there is nobody to batch with, and the two
thread hand-offs, which cost the most on a busy CPU, are saved; the event loop is blocked for
that one model call, as it would have waited for it anyway.

Overload: `submit` raises `Overloaded` at once when `max_queue` requests are already waiting, and
a request that waited longer than `max_queue_wait_s` is failed with `Overloaded` instead of run;
both carry a Retry-After estimate. Requests whose caller went away (cancelled future) are dropped
before they reach the model. Nothing here is specific to images or to HTTP.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(Exception):
    """The batcher cannot take (or could not run in time) a request; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: "asyncio.Future[R]"
    # `time` is looked up at each call (not bound at import), so tests can drive the batcher with a fake clock
    enqueued: float = field(default_factory=lambda: time.perf_counter())


class MicroBatcher(Generic[T, R]):
    """See the module docstring. `on_batch(size, queue_waits_s)` is called for every batch run."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int,
        max_queue: int,
        max_wait_s: float = 0.0,
        max_queue_wait_s: float = math.inf,
        on_batch: Callable[[int, list[float]], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.max_queue_wait_s = max_queue_wait_s
        self.on_batch = on_batch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running = False  # a batch is in the worker thread (or inline)
        self._batch_seconds = 0.01  # running mean of a batch's wall time, for Retry-After

    def __len__(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """No batch is running and nothing is queued."""
        return not self._running and not self._queue

    def retry_after(self) -> int:
        """Seconds until the current queue should have drained (at least 1: HTTP's unit)."""
        batches = math.ceil((len(self._queue) + 1) / self.max_batch_size)
        return max(1, math.ceil(batches * self._batch_seconds))

    async def submit(self, item: T, *, inline_if_idle: bool = False) -> R:
        """Queue `item`, wait for its batch, return its result (or raise its exception / `Overloaded`)."""
        if inline_if_idle and self.idle:
            return self._run_inline(item)
        if self._task is None or self._task.done():
            self._start()
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"server overloaded: {len(self._queue)} requests are already queued", self.retry_after())
        pending: _Pending[T, R] = _Pending(item, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        return await pending.future

    def _run_inline(self, item: T) -> R:
        if self.on_batch is not None:
            self.on_batch(1, [0.0])
        self._running = True
        t0 = time.perf_counter()
        try:
            (result,) = self.run_batch([item])
        finally:
            self._running = False
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - t0)
        if isinstance(result, BaseException):
            raise result
        return result

    def _start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cltvit-batcher")

    async def close(self) -> None:
        """Stop the batcher: queued requests fail with `Overloaded`; the worker thread is released."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(Overloaded("server is shutting down", 1))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _gather_company(self) -> None:
        """With max_wait_s > 0: wait until the batch is full or its first request waited max_wait_s."""
        assert self._wakeup is not None
        deadline = self._queue[0].enqueued + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        now = time.perf_counter()
        while self._queue and len(batch) < self.max_batch_size:
            p = self._queue.popleft()
            if p.future.done():  # the caller went away
                continue
            if now - p.enqueued > self.max_queue_wait_s:
                p.future.set_exception(Overloaded(
                    f"server overloaded: the request waited {now - p.enqueued:.1f} s in the queue", self.retry_after()))
                continue
            batch.append(p)
        if batch and self.on_batch is not None:
            self.on_batch(len(batch), [now - p.enqueued for p in batch])
        return batch

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_wait_s > 0 and len(self._queue) < self.max_batch_size:
                await self._gather_company()
            batch = self._take_batch()
            if not batch:
                continue
            t0 = time.perf_counter()
            self._running = True
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(Overloaded("server is shutting down", 1))
                raise
            except Exception as exc:  # a failing batch fails its requests, never the batcher
                results = [exc] * len(batch)
            finally:
                self._running = False
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - t0)
            for p, r in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)
