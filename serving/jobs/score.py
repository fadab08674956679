"""Folder scoring (`cltvit-score`): score every image below a folder with a bundle, one JSON line per image.

    cltvit-score DIR --bundle B --out results.jsonl [--format jsonl|parquet] [--batch-size 32]
                 [--workers 4] [--labels a b c] [--top-k 5] [--reference ref.json] [--engine local|ray]
                 [--spatial] [--total-effect]

Local engine: images are discovered recursively (by extension, sorted by relative path), decoded and
preprocessed by a thread pool that runs `--prefetch` batches ahead of inference (PIL and ONNX
Runtime release the GIL, so decoding hides behind the model), run in batches by `BundleRuntime`,
and appended to the output, flushed and fsynced after every batch. Unreadable files get a record
with `error` and never stop the job.

Resume: re-running the same command continues where a killed run stopped. Paths already in the
output are skipped; a torn last line (the process died mid-write) is cut off and that image
re-scored, so every image ends up in the output exactly once. A sidecar `<out>.meta.json` records
the folder, bundle, labels and top-k; a rerun with different ones is refused (use --overwrite).
For `--format parquet` the run journals to `<out>.partial.jsonl` and writes the Parquet file (sorted
by path) when it completes.

With `--reference` (a profile from `cltvit-drift reference`) every record carries `drift`: the
mean-shift scores of the last `--window` images' contribution shares against the reference
(serving.jobs.drift); `--metrics-file` keeps a Prometheus textfile of them up to date.

With `--spatial` every record carries `spatial`: the predicted label's patch maps per attention layer
and summed (serving.results.spatial_record; local engine only). With `--total-effect` every record
carries `total_effect`: the predicted label's total-effect map, measured on P + 1 edited copies of the
image per image (serving.results.total_effect_record; local engine only; P + 1 times the model work).

`--engine ray` runs the same scoring on Ray Data (serving.jobs.ray_engine); `--out` is then a directory.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from bundle import BundleError
from bundle.atomic import replaced, write_text_atomic
from bundle.format import IMAGE_EXTENSIONS
from bundle.killpoints import killpoint

from ..explainer import Explainer
from ..runtime import LabelError, RuntimeSetupError, SpatialUnavailable, TotalEffectUnavailable

FORMATS = ("jsonl", "parquet")


class ScoreError(ValueError):
    """A user mistake or an unusable output file; the message names the argument or file."""


def discover(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Relative POSIX paths of all files below `root` with an image extension, sorted (deterministic)."""
    root = Path(root)
    if not root.is_dir():
        raise ScoreError(f"argument DIR: {root} is not a directory")
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(exts):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


# -- the output journal --------------------------------------------------------------------------
def read_journal(path: Path, repair: bool = True, fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL results file, read line by line (only `fields` of each kept, when given).

    A torn last line (no newline, or bad JSON at the end) is cut off when `repair`; a bad line
    elsewhere is an error (the file is not ours or was edited).
    """
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    good_end = 0
    torn = False
    with path.open("rb") as f:
        lineno = 0
        while True:
            line = f.readline()
            if not line:
                break
            lineno += 1
            try:
                rec = json.loads(line) if line.strip() else None
                if rec is not None and (not isinstance(rec, dict) or "path" not in rec):
                    raise ValueError("not a result record")
            except ValueError:
                if not f.read(1):  # the last line: torn by a kill mid-write
                    torn = True
                    break
                raise ScoreError(f"{path}: line {lineno} is not a result record; not a cltvit-score output? "
                                 f"(use --overwrite to replace it)") from None
            if not line.endswith(b"\n"):  # complete JSON but the newline was never written
                torn = True
                break
            if rec is not None:
                records.append({k: rec.get(k) for k in fields} if fields else rec)
            good_end += len(line)
    if torn and repair:
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


@dataclass
class RunMeta:
    """What a results file was made with; a resume must match it."""

    root: str
    bundle: str
    variant: str
    labels: list[str]
    top_k: int
    spatial: bool = False  # added later: meta files without it were written without spatial maps
    total_effect: bool = False  # added later: likewise, without total-effect maps

    def check(self, other: dict[str, Any], meta_path: Path) -> None:
        for key, value in self.__dict__.items():
            if other.get(key, getattr(type(self), key, None)) != value:
                raise ScoreError(
                    f"{meta_path}: the existing output was made with {key}={other.get(key)!r}, this run has "
                    f"{key}={value!r}; rerun with the same arguments to resume, or pass --overwrite"
                )


@dataclass
class ScoreSummary:
    """What a run did: images scored now, errors among them, skipped (already done), seconds."""

    total: int
    scored: int
    errors: int
    skipped: int
    seconds: float
    out: Path

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def _load_one(explainer: Any, path: Path) -> tuple[np.ndarray | None, str | None]:
    """Decode + preprocess one file in a worker thread; every failure becomes an error string."""
    try:
        return explainer.load(path), None
    except Exception as e:  # noqa: BLE001 - an unreadable file must never stop the job
        msg = str(e) or type(e).__name__
        return None, msg if type(e).__name__ == "ImageError" else f"{type(e).__name__}: {msg}"


def iter_loaded_batches(
    explainer: Any, root: Path, rels: Sequence[str], batch_size: int, workers: int, prefetch: int = 2
) -> Iterator[list[tuple[str, np.ndarray | None, str | None]]]:
    """Batches of (relative path, pixels [3,H,W] or None, error or None), in `rels` order.

    A thread pool keeps `prefetch` batches beyond the current one decoding while the caller runs it.
    """
    pending: deque[tuple[str, Future]] = deque()
    it = iter(rels)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cltvit-decode") as pool:

        def fill() -> None:
            while len(pending) < batch_size * (prefetch + 1):
                rel = next(it, None)
                if rel is None:
                    return
                pending.append((rel, pool.submit(_load_one, explainer, root / rel)))

        fill()
        while pending:
            batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            fill()
            yield [(rel, *fut.result()) for rel, fut in batch]


def score_folder(
    root: str | Path,
    explainer: Any,
    out: str | Path,
    *,
    fmt: str = "jsonl",
    batch_size: int = 32,
    workers: int = 4,
    prefetch: int = 2,
    overwrite: bool = False,
    monitor: Any = None,
    metrics_file: str | Path | None = None,
    progress: bool = True,
    bundle_id: str = "",
    variant: str = "fp32",
) -> ScoreSummary:
    """Score every image below `root` into `out` (resumable, see module doc) with an `Explainer`."""
    root, out = Path(root).resolve(), Path(out)
    if fmt not in FORMATS:
        raise ScoreError(f"argument --format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch_size < 1:
        raise ScoreError(f"argument --batch-size: must be >= 1, got {batch_size}")
    if workers < 1:
        raise ScoreError(f"argument --workers: must be >= 1, got {workers}")
    if out.is_dir():
        raise ScoreError(f"argument --out: {out} is a directory; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = out if fmt == "jsonl" else out.with_name(out.name + ".partial.jsonl")
    meta_path = out.with_name(out.name + ".meta.json")
    spatial = bool(getattr(explainer, "spatial", False))
    total_effect = bool(getattr(explainer, "total_effect", False))
    meta = RunMeta(str(root), bundle_id, variant, list(explainer.label_names), int(explainer.top_k), spatial, total_effect)
    if overwrite:
        for p in (out, journal, meta_path):
            p.unlink(missing_ok=True)
    if meta_path.exists() and (out.exists() or journal.exists()):
        try:
            previous = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ScoreError(f"{meta_path} is unreadable ({e}); pass --overwrite to start over") from None
        meta.check(previous if isinstance(previous, dict) else {}, meta_path)
    elif out.exists() or journal.exists():
        raise ScoreError(f"argument --out: {out} exists but was not written by cltvit-score (no {meta_path.name}); "
                         f"pass --overwrite to replace it")
    if fmt == "parquet" and out.exists() and not journal.exists():
        journal.write_text("".join(json.dumps(r) + "\n" for r in read_parquet(out)))
    write_text_atomic(meta_path, json.dumps(meta.__dict__, indent=2) + "\n")

    paths = discover(root)
    existing = read_journal(journal, fields=("path", "error", "shares") if monitor is not None else ("path",))
    done = {r["path"] for r in existing}
    if monitor is not None:
        for r in existing:
            if not r.get("error") and r.get("shares"):
                monitor.update(np.array([r["shares"][t] for t in monitor.term_names]))
    todo = [p for p in paths if p not in done]
    errors = 0
    start = time.perf_counter()
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), unit="img", desc="cltvit-score",
               disable=not progress, file=sys.stderr, smoothing=0.05, dynamic_ncols=True)
    with journal.open("a", encoding="utf-8") as f:
        for batch in iter_loaded_batches(explainer, root, todo, batch_size, workers, prefetch):
            rels, loaded, errs = zip(*batch)
            records = explainer.assemble(rels, loaded, errs)
            lines = []
            for rec in records:
                if rec["error"] is None and monitor is not None:
                    monitor.update(np.array([rec["shares"][t] for t in monitor.term_names]))
                    rec["drift"] = monitor.summary()
                lines.append(json.dumps(rec) + "\n")
            errors += sum(e is not None for e in errs)
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            killpoint("score.batch_written")  # crash-safety tests stop the process here (bundle.killpoints)
            if metrics_file is not None and monitor is not None:
                monitor.write_metrics(metrics_file)
            bar.update(len(batch))
            bar.set_postfix(errors=errors, refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    if fmt == "parquet":
        write_parquet(out, sorted(read_journal(journal), key=lambda r: r["path"]), explainer.term_names, explainer.top_k,
                      spatial=spatial, total_effect=total_effect)
        journal.unlink()
    return ScoreSummary(len(paths), len(todo), errors, len(paths) - len(todo), seconds, out)


# -- Parquet ---------------------------------------------------------------------------------------
def _pyarrow() -> Any:
    """pyarrow, an optional extra (cltvit[ray]) needed only for Parquet output."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ScoreError("argument --format parquet needs pyarrow: pip install 'cltvit[ray]' (or pyarrow)") from None
    return pyarrow


def arrow_schema(term_names: Sequence[str], spatial: bool = False, total_effect: bool = False) -> Any:
    """The Arrow schema of result records (shares as a struct with one float field per term; with
    `spatial` the predicted label's maps as a struct, see serving.results.spatial_record; with
    `total_effect` its total-effect map, serving.results.total_effect_record)."""
    pa = _pyarrow()
    fields = [
        ("path", pa.string()),
        ("error", pa.string()),
        ("label", pa.string()),
        ("top", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64()), ("logit", pa.float64())]))),
        ("shares", pa.struct([(t, pa.float64()) for t in term_names])),
    ]
    if spatial:
        f64, vec = pa.float64(), pa.list_(pa.float64())
        fields.append(("spatial", pa.struct([
            ("grid", pa.list_(pa.int64())), ("residual", f64), ("label", pa.string()), ("logit", f64), ("attention", f64),
            ("total", vec), ("layers", pa.list_(vec)), ("cls_cell", vec), ("value_bias", vec), ("output_bias", vec),
        ])))
    if total_effect:
        f64, vec = pa.float64(), pa.list_(pa.float64())
        fields.append(("total_effect", pa.struct([
            ("grid", pa.list_(pa.int64())), ("method", pa.string()), ("rows", pa.int64()), ("fill", vec),
            ("fill_source", pa.string()), ("label", pa.string()), ("logit", f64), ("fill_logit", f64), ("total", vec),
        ])))
    return pa.schema(fields)


def write_parquet(path: Path, records: list[dict[str, Any]], term_names: Sequence[str], top_k: int,
                  spatial: bool = False, total_effect: bool = False) -> None:
    """Write records (drift fields dropped) to `path` atomically."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    schema = arrow_schema(term_names, spatial, total_effect)
    cols = [f.name for f in schema]
    table = pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in records], schema=schema)
    with replaced(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    """Records of a Parquet results file (or a directory of them), error rows without null fields."""
    _pyarrow()
    import pyarrow.parquet as pq

    rows = pq.read_table(str(path)).to_pylist()
    return [{k: v for k, v in r.items() if v is not None or k in ("path", "error")} for r in rows]


def open_explainer(bundle: str | Path, *, labels: Sequence[str] | None, top_k: int, device: str = "auto",
                   variant: str = "fp32", threads: int | None = None, spatial: bool = False,
                   total_effect: bool = False) -> Any:
    """An `Explainer`; a bad bundle, variant, device, thread count or label set, or spatial (total-effect) maps
    asked of a bundle without them (without a patch grid), becomes a ScoreError naming the CLI argument. Shared by
    the local and the Ray engines."""
    try:
        return Explainer(bundle, labels=labels, top_k=top_k, device=device, variant=variant, threads=threads, spatial=spatial,
                         total_effect=total_effect)
    except SpatialUnavailable as e:
        raise ScoreError(f"argument --spatial: {e}") from None
    except TotalEffectUnavailable as e:
        raise ScoreError(f"argument --total-effect: {e}") from None
    except BundleError as e:
        raise ScoreError(f"argument --bundle: {e}") from None
    except RuntimeSetupError as e:
        raise ScoreError(f"argument --{'threads' if 'threads' in str(e) else 'variant' if 'variant' in str(e) else 'device'}: {e}") from None
    except LabelError as e:
        raise ScoreError(f"argument --{'top-k' if 'top_k' in str(e) else 'labels'}: {e}") from None


def bundle_identity(bundle: str | Path) -> str:
    """sha256 of the bundle's fp32 graph as listed in its manifest (identifies the model in meta files)."""
    try:
        manifest = json.loads((Path(bundle) / "bundle.json").read_text())
        return str(manifest["files"]["model.onnx"])
    except (OSError, ValueError, KeyError):
        return str(Path(bundle).resolve())
