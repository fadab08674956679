"""Named points where a test can stop a real process: the crash-safety tests of training and scoring.

Long-running commands call `killpoint("name")` at the moments a crash matters (after a training step,
between the files of a checkpoint, after a batch of results is on disk). Nothing happens unless the
environment asks for it:

- `CLTVIT_KILLPOINT=name` or `name@n`: act the n-th time (default: the first) the process reaches `name`.
- `CLTVIT_KILLPOINT_FD=fd` (optional): at that moment write one line `name@n pid` to file descriptor
  `fd` (the write end of a pipe the test passed down) and wait there until killed, so the test
  SIGKILLs the process itself and knows exactly where it stood. The test reads the pipe: a process
  that crashes earlier closes it, so the test sees end-of-file instead of hanging or polling.
- Without `CLTVIT_KILLPOINT_FD`, the process sends itself SIGKILL at that moment.
- `CLTVIT_KILLPOINT_RANK=r` (optional): only the process whose `RANK` (torchrun's environment; 0 when
  unset) is r acts, so a test can stop one rank of a data-parallel run (whose workers torchrun starts,
  without the test's pipe: they kill themselves).

`kill_at` is the other side: it runs a command armed at a point, SIGKILLs it there and returns
how far it got (the crash-safety tests drive every long-running command through it).

Torch-free and dependency-free, so that every stage (training, serving jobs) can use it.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

ENV_POINT = "CLTVIT_KILLPOINT"
ENV_FD = "CLTVIT_KILLPOINT_FD"
ENV_RANK = "CLTVIT_KILLPOINT_RANK"

_reached: dict[str, int] = {}  # per-process counts of the armed point (the only state; tests set it via env)


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_POINT)
    if not spec:
        return None
    rank = os.environ.get(ENV_RANK)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return None
    name, _, count = spec.partition("@")
    return name, int(count) if count else 1


def killpoint(name: str) -> None:
    """Mark that the process reached `name`; stops the process here if `CLTVIT_KILLPOINT` names it."""
    target = _target()
    if target is None or target[0] != name:
        return
    n = _reached[name] = _reached.get(name, 0) + 1
    if n != target[1]:
        return
    fd = os.environ.get(ENV_FD)
    if fd is None:
        os.kill(os.getpid(), signal.SIGKILL)
    os.write(int(fd), f"{name}@{n} {os.getpid()}\n".encode())
    while True:  # wait for the test's SIGKILL
        signal.pause()


class KillPointNotReached(AssertionError):
    """`kill_at`'s command exited, or ran past the wait, before reaching its kill point (message: its log)."""


def kill_at(cmd: Sequence[str], point: str, log: Path, *, env: Mapping[str, str], cwd: str | Path | None = None,
            wait_s: float = 240.0) -> str:
    """Run `cmd` armed at kill point `point` (`name` or `name@n`), SIGKILL it when it gets there.

    stdout and stderr are appended to `log`. Returns the line the process reported (`name@n pid`).
    Raises `KillPointNotReached` with the log when the process exits first (end of file on the pipe)
    or has not reached the point within `wait_s` seconds (it is killed either way)."""
    read_fd, write_fd = os.pipe()
    armed = {k: v for k, v in env.items() if k not in (ENV_POINT, ENV_FD)}
    armed.update({ENV_POINT: point, ENV_FD: str(write_fd)})
    with Path(log).open("ab") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=armed, stdout=out, stderr=subprocess.STDOUT, pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as pipe:
            ready, _, _ = select.select([pipe], [], [], wait_s)
            line = pipe.readline() if ready else ""
        if not line.startswith(point.partition("@")[0]):
            if ready:
                proc.wait(timeout=60)
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"still running after {wait_s:.0f} s"
            raise KillPointNotReached(f"{Path(cmd[0]).name} never reached {point} ({state}):\n{Path(log).read_text(errors='replace')}")
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        raise KillPointNotReached(f"{Path(cmd[0]).name} ended with {proc.returncode}, not SIGKILL, at {point}")
    return line.strip()
