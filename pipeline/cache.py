"""Cached stages of the reference build: each stage's record in DIR/stages/<name>.json holds its input
key, its output files with sha256, timings and whatever the stage reports; a stage whose key and
output checksums still match is skipped on the next call."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

from bundle.atomic import write_text_atomic
from bundle.checksums import file_sha256


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """Record of one stage in DIR/stages/<name>.json: input key, output files with sha256, info."""

    def __init__(self, root: Path, name: str, key_obj: Any) -> None:
        self.root, self.name, self.key = root, name, _key(key_obj)
        self.path = root / "stages" / f"{name}.json"
        self._cpu0 = time.process_time()

    def cached(self) -> dict[str, Any] | None:
        """The stage's record if its key matches and every output still has its recorded sha256."""
        if not self.path.is_file():
            return None
        try:
            rec = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            return None
        if rec.get("key") != self.key:
            return None
        for rel, digest in rec.get("files", {}).items():
            p = self.root / rel
            if not p.is_file() or file_sha256(p) != digest:
                return None
        return rec

    def finish(self, files: Sequence[Path], seconds: float, **info: Any) -> dict[str, Any]:
        rec = {"stage": self.name, "key": self.key, "seconds": seconds, "cpu_seconds": time.process_time() - self._cpu0,
               "files": {str(p.relative_to(self.root)): file_sha256(p) for p in files}, **info}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(rec, indent=1, default=float))
        return rec


def refresh_files(root: Path, name: str) -> dict[str, Any] | None:
    """Re-record the sha256 of stage `name`'s outputs after a later stage changed them on purpose (the atlas
    stage adds itself to the bundle the export stage wrote), so the next build still finds it cached.
    Returns the updated record (None when the stage has none)."""
    path = root / "stages" / f"{name}.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    rec["files"] = {rel: file_sha256(root / rel) for rel in rec.get("files", {}) if (root / rel).is_file()}
    write_text_atomic(path, json.dumps(rec, indent=1, default=float))
    return rec
