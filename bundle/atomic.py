"""Crash-safe writes: a reader (or a rerun after kill -9) sees the old file or directory or the new one,
never a half-written one. Used by every stage that writes artifacts (bundles, atlases, checkpoints,
shipped weights, stage records). Torch-free and dependency-free."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a sibling temporary file, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_directory(dst: str | Path) -> Iterator[Path]:
    """A fresh temporary sibling of `dst` to write a whole directory into. On a normal exit it becomes
    readable by everyone (directories 0755, files 0644: artifacts are meant to be served) and replaces
    `dst`; on an exception it is removed and `dst` is left as it was."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
