"""Crash-safe writes: a reader (or a rerun after kill -9) sees the old file or directory or the new one,
never a half-written one. Used by every stage that writes artifacts (bundles, atlases, checkpoints,
training metrics, shipped weights, stage records, batch results). Torch-free and dependency-free.

- `replaced(path)`: the one way to write a file (or a directory with a fixed temporary name) in place:
  the caller writes a temporary sibling, which is renamed over `path` on a normal exit.
- `write_text_atomic(path, text)`: `replaced` for a text file.
- `staged_directory(dst)`: a whole directory written under a unique temporary name (served artifacts).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_tree(directory: str | Path, files: bool = True) -> None:
    """Flush `directory`'s files (with `files`) and the directory entry itself to disk, so that a
    rename that follows cannot be persisted before the data it points at (power loss, not just a kill)."""
    d = Path(directory)
    if files:
        for p in d.iterdir():
            if p.is_file():
                _fsync(p)
    _fsync(d)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced(path: str | Path, *, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """The temporary sibling `path.name + suffix` to write `path`'s new content into (a file, or a
    directory the caller creates); on a normal exit it is renamed over `path`, on an exception removed.

    A leftover of a killed writer under the temporary name is removed first. `fsync=True` flushes the
    new content (a file, or a directory's files) before the rename and the parent directory after it,
    so the rename survives a power loss too. A directory can replace only a missing or empty `path`
    (move an old one aside first). Kill points placed inside the `with` block stop the writer
    between writing and renaming (crash-safety tests, `bundle.killpoints`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    _remove(tmp)
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp) if tmp.is_dir() else _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """Write `text` to a sibling temporary file, then rename it over `path`."""
    with replaced(path, fsync=fsync) as tmp:
        tmp.write_text(text)


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
