"""serving/loopwatch.py: the lag it measures against stalls of known length, and the stacks it writes
during a stall, also one in which the stalled thread holds the GIL."""
from __future__ import annotations

import asyncio
import logging
import statistics
import time

import pytest

from serving.loopwatch import LoopWatch


def run_with_watch(watch: LoopWatch, stall) -> None:
    """Run `watch` on a fresh event loop for 0.2 s, call `stall()` on the loop, then 0.2 s more."""
    async def main() -> None:
        watch.start()
        await asyncio.sleep(0.2)
        stall()
        await asyncio.sleep(0.2)
        await watch.stop()

    asyncio.run(main())


def test_lag_measures_a_stall_of_known_length():
    lags: list[float] = []
    watch = LoopWatch(lags.append)
    run_with_watch(watch, lambda: time.sleep(0.3))
    # the stall began somewhere inside a 20 ms sleep: the tick spanning it is 0.3 s minus up to one tick late
    assert 0.3 - watch.tick_s - 0.005 <= max(lags) <= 0.3 + 0.1, max(lags)
    assert len(lags) >= 10
    assert statistics.median(lags) < 0.05  # the ticks around it came on time


def _held_by_time_sleep_in_this_test() -> None:
    time.sleep(0.4)


def test_a_stall_longer_than_the_bound_writes_every_stack_and_one_warning(tmp_path, caplog):
    out = tmp_path / "stacks.txt"
    with out.open("w") as f, caplog.at_level(logging.WARNING, logger="cltvit.serving"):
        run_with_watch(LoopWatch(lambda lag: None, report_after_s=0.15, file=f), _held_by_time_sleep_in_this_test)
    text = out.read_text()
    assert "_held_by_time_sleep_in_this_test" in text, text  # the loop thread's frame, caught during the stall
    assert "Timeout" in text
    warnings = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
    assert len(warnings) == 1 and int(warnings[0].split("stalled for ")[1].split(" ms")[0]) >= 150, warnings


def _holds_the_gil(seconds: float) -> None:
    n = 200_000
    t0 = time.perf_counter()
    sum(range(n))  # one C call that never lets go of the GIL
    per = (time.perf_counter() - t0) / n
    sum(range(int(seconds / per)))


def test_the_stacks_come_while_the_stalled_thread_holds_the_gil(tmp_path):
    out = tmp_path / "stacks.txt"
    with out.open("w") as f:
        run_with_watch(LoopWatch(lambda lag: None, report_after_s=0.1, file=f), lambda: _holds_the_gil(0.5))
    assert "_holds_the_gil" in out.read_text()


def test_a_short_stall_writes_nothing(tmp_path, caplog):
    out = tmp_path / "stacks.txt"
    with out.open("w") as f, caplog.at_level(logging.WARNING, logger="cltvit.serving"):
        run_with_watch(LoopWatch(lambda lag: None, report_after_s=0.3, file=f), lambda: time.sleep(0.05))
    assert out.read_text() == ""
    assert not [r for r in caplog.records if "stalled" in r.getMessage()]


def test_without_a_file_descriptor_the_lag_is_still_measured(caplog):
    import io

    lags: list[float] = []
    with caplog.at_level(logging.WARNING, logger="cltvit.serving"):
        watch = LoopWatch(lags.append, report_after_s=0.05, file=io.StringIO())
    assert watch.report_after_s == 0.0 and "no file descriptor" in caplog.text
    run_with_watch(watch, lambda: time.sleep(0.1))
    assert max(lags) >= 0.1 - watch.tick_s - 0.005


def test_cltvit_serve_names_a_bad_stall_report_bound(capsys):
    from serving.cli import build_parser, validate_args

    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        validate_args(parser, parser.parse_args(["--bundle", "no-such-bundle", "--stall-report-ms", "-5"]))
    assert exc.value.code == 2
    assert "--stall-report-ms must be in 0..60000, got -5" in capsys.readouterr().err
