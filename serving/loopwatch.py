"""How late a worker's event loop runs: its lag, and every thread's stack when it stalls.

    watch = LoopWatch(observe=metrics.loop_lag.observe, report_after_s=0.25)
    watch.start()          # on the running event loop (the service's startup hook)
    await watch.stop()

A task sleeps `TICK_S` in a loop and passes `observe` how much later than asked it woke up
(seconds): time in which the event loop ran nothing else, and which every request on the worker
waited too (a blocking call on the loop, a long garbage collection, the process not scheduled).

With `report_after_s` > 0, Python's `faulthandler` is armed before each sleep to write the stack of
every thread of the process to `file` (stderr) if the loop has not come back `report_after_s`
later. faulthandler's watchdog is a C thread that needs no GIL, so the stacks are written *during*
the stall even when the stalled thread holds the GIL (a collection, a C call that keeps it); a
Python watchdog thread could only look afterwards. When the loop comes back, one WARNING line says
how long it was away. faulthandler has one such timer per process: while a watch reports, nothing
else in the worker may use `faulthandler.dump_traceback_later`. Re-arming starts a short-lived
C thread per tick (tens of microseconds, `1 / TICK_S` times a second), which is why reporting is
opt-in (`cltvit-serve --stall-report-ms`) and the lag histogram is not.
"""
from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
from typing import IO, Callable

log = logging.getLogger("cltvit.serving")
TICK_S = 0.02  # a stall shorter than this can hide between two ticks; one of 2 x TICK_S or more cannot


class LoopWatch:
    """See the module docstring. `observe(lag_s)`: called once per tick, on the event loop's thread.
    `report_after_s`: 0 (off) or the loop's absence, seconds, after which every thread's stack is written
    to `file` (default: the process's stderr)."""

    def __init__(self, observe: Callable[[float], None], report_after_s: float = 0.0, file: IO[str] | None = None,
                 tick_s: float = TICK_S) -> None:
        if report_after_s < 0:
            raise ValueError(f"report_after_s must be >= 0, got {report_after_s}")
        self.observe = observe
        self.file = file if file is not None else sys.__stderr__
        try:
            self.file.fileno()  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):  # no stderr (a detached process): the lag alone
            if report_after_s:
                log.warning("cltvit: no file descriptor to write stall reports to; the loop lag is still measured")
            report_after_s = 0.0
        self.report_after_s = report_after_s
        self.tick_s = tick_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start watching the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cltvit-loopwatch")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self.report_after_s:
                    # the timer counts from here: a stall anywhere before the next tick (the sleep
                    # included) longer than report_after_s fires it
                    faulthandler.dump_traceback_later(self.report_after_s + self.tick_s, file=self.file)
                asked = loop.time() + self.tick_s
                await asyncio.sleep(self.tick_s)
                lag = max(0.0, loop.time() - asked)
                if self.report_after_s:
                    faulthandler.cancel_dump_traceback_later()
                    if lag >= self.report_after_s:
                        log.warning("cltvit: the event loop stalled for %.0f ms (every thread's stack was written to stderr "
                                    "after %.0f ms)", lag * 1e3, self.report_after_s * 1e3)
                self.observe(lag)
        finally:
            if self.report_after_s:
                faulthandler.cancel_dump_traceback_later()
