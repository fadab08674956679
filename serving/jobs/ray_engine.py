"""`cltvit-score --engine ray`: the folder scorer on Ray Data, for more images than one machine scores.

Pipeline (all Ray Data, no home-made distribution):
  1. `ray.data.read_binary_files` reads the files (local paths, or any pyarrow filesystem URI such as
     `s3://bucket/prefix` when the folder is remote),
  2. `map_batches(_decode)` tasks decode and preprocess them (numpy + Pillow; unreadable files become
     rows with `error`),
  3. `map_batches(_Scorer, concurrency=N)` runs an actor pool, each actor holding one `BundleRuntime`
     (loaded once per actor), and
  4. `write_json` / `write_parquet` write the records (the same fields as the local engine's JSONL)
     as shards in the `--out` directory.

Where it runs: `ray.init(address=...)` with `--ray-address`, else `$RAY_ADDRESS` when set (e.g.
`RAY_ADDRESS=ray://head:10001` or `auto` on a cluster node), else a local Ray instance on this
machine. On a cluster the bundle directory and the image folder must be readable by every worker
at the same path (a shared filesystem), or the folder must be a URI (`s3://...`, `gs://...`) and
the bundle shipped to the workers, e.g. with `runtime_env={"working_dir": ...}`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bundle import BundleError, read_manifest
from bundle.format import IMAGE_EXTENSIONS

from ..explainer import Explainer, read_image
from ..preprocess import Preprocessor
from .score import ScoreError, ScoreSummary, arrow_schema, discover, open_explainer, read_parquet


def _ray() -> Any:
    try:  # Ray is an optional extra (cltvit[ray]): imported only when the Ray engine runs
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ScoreError("argument --engine ray needs Ray Data: pip install 'cltvit[ray]'") from None
    return ray


def _rel(path: str, root: str) -> str:
    """Path relative to the scored root, POSIX style (the local engine's `path` field)."""
    if "://" in root:
        prefix = root.split("://", 1)[1].rstrip("/") + "/"
        return path.split(prefix, 1)[1] if prefix in path else path
    return Path(os.path.relpath(path, root)).as_posix()


def _decode(batch: dict[str, np.ndarray], root: str, preprocess: dict[str, Any], max_bytes: int) -> dict[str, np.ndarray]:
    """Ray task: file bytes -> `pixels [B,3,H,W]` (zeros for unreadable files), `path`, `error` ('' = none)."""
    pre = Preprocessor(preprocess)
    H, W = pre.image_size
    n = len(batch["path"])
    pixels = np.zeros((n, 3, H, W), dtype=np.float32)
    errors = []
    for i, data in enumerate(batch["bytes"]):
        try:
            pixels[i] = pre(read_image(bytes(data), max_bytes=max_bytes))
            errors.append("")
        except Exception as e:  # noqa: BLE001 - unreadable files never stop the job
            errors.append(str(e) if type(e).__name__ == "ImageError" else f"{type(e).__name__}: {e}")
    return {"path": np.array([_rel(str(p), root) for p in batch["path"]], dtype=object),
            "error": np.array(errors, dtype=object), "pixels": pixels}


class _Scorer:
    """Ray actor: one Explainer (BundleRuntime) per actor, records as an Arrow table."""

    def __init__(self, bundle: str, labels: list[str] | None, top_k: int, device: str, variant: str, threads: int | None) -> None:
        self.explainer = Explainer(bundle, labels=labels, top_k=top_k, device=device, variant=variant, threads=threads)
        self.schema = arrow_schema(self.explainer.term_names)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa  # comes with the ray extra; this runs on a Ray worker only

        errors = [e or None for e in batch["error"]]
        loaded = [None if e else batch["pixels"][i] for i, e in enumerate(errors)]
        records = self.explainer.assemble([str(p) for p in batch["path"]], loaded, errors)
        cols = [f.name for f in self.schema]
        return pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in records], schema=self.schema)


def score_with_ray(
    root: str | Path,
    out: str | Path,
    *,
    bundle: str | Path,
    fmt: str = "jsonl",
    batch_size: int = 32,
    concurrency: int = 1,
    labels: Sequence[str] | None = None,
    top_k: int = 5,
    address: str | None = None,
    device: str = "auto",
    variant: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
    max_bytes: int = 64 * 1024 * 1024,
    init_kwargs: dict[str, Any] | None = None,
) -> ScoreSummary:
    """Score every image below `root` with Ray Data into the directory `out` (JSONL or Parquet shards)."""
    ray = _ray()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ScoreError(f"argument --out: {out} exists and is not an empty directory (--engine ray writes "
                             f"shards into a directory); pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    # validate the bundle, labels and variant here, before any Ray worker starts
    try:
        manifest = read_manifest(bundle)
    except BundleError as e:
        raise ScoreError(f"argument --bundle: {e}") from None
    # `auto` is resolved here, on the driver, at the actors' batch size and threads: every actor serves that variant
    probe = open_explainer(bundle, labels=labels, top_k=top_k, device="cpu", variant=variant, threads=threads or 1,
                           bench_batches=(batch_size,))
    labels = probe.label_names if labels is not None else None
    top_k = probe.top_k
    variant = probe.runtime.variant
    del probe

    root_s = str(root)
    if "://" in root_s:
        sources: Any = root_s
        total = None
    else:
        root_s = str(Path(root).resolve())
        rels = discover(root_s)
        sources = [os.path.join(root_s, r) for r in rels]
        total = len(rels)
        if not sources:
            raise ScoreError(f"argument DIR: no images ({', '.join(IMAGE_EXTENSIONS)}) below {root}")
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, **(init_kwargs or {}))
    actor_cpus = float(threads or 1)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
    if concurrency * actor_cpus + 1 > cluster_cpus:
        # read and write tasks need a CPU beside the actors, else the pipeline waits forever
        raise ScoreError(f"argument --workers: {concurrency} inference actor(s) x {actor_cpus:g} CPU (--threads) plus one "
                         f"CPU for reading/writing need {concurrency * actor_cpus + 1:g} CPUs; the Ray cluster has {cluster_cpus:g}")
    start = time.perf_counter()
    # local folders are listed by `discover` (case-insensitive, same order as the local engine);
    # remote ones by Ray's filesystem listing, filtered by extension
    exts = None if isinstance(sources, list) else [e.lstrip(".") for e in IMAGE_EXTENSIONS]
    ds = ray.data.read_binary_files(sources, include_paths=True, file_extensions=exts)
    ds = ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"root": root_s, "preprocess": manifest.preprocess.model_dump(mode="json"),
                                   "max_bytes": max_bytes})
    ds = ds.map_batches(_Scorer, batch_size=batch_size, batch_format="numpy", num_cpus=actor_cpus,
                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                        fn_constructor_kwargs={"bundle": str(Path(bundle).resolve()), "labels": labels, "top_k": top_k,
                                               "device": device, "variant": variant, "threads": threads})
    if fmt == "parquet":
        ds.write_parquet(str(out))
    else:
        ds.write_json(str(out))
    seconds = time.perf_counter() - start
    records = read_ray_output(out, fmt)
    errors = sum(1 for r in records if r.get("error"))
    return ScoreSummary(total if total is not None else len(records), len(records), errors, 0, seconds, out)


def read_ray_output(out: str | Path, fmt: str = "jsonl") -> list[dict[str, Any]]:
    """All records written by `score_with_ray` into `out`, sorted by path, nulls dropped like the local JSONL."""
    out = Path(out)
    records: list[dict[str, Any]] = []
    if fmt == "parquet":
        records = read_parquet(out)
    else:
        for shard in sorted(out.glob("*.json*")):
            with shard.open() as f:
                records += [json.loads(line) for line in f if line.strip()]
    cleaned = []
    for r in records:
        if r.get("error"):
            cleaned.append({"path": r["path"], "error": r["error"]})
        else:
            cleaned.append({k: v for k, v in r.items() if k != "error" or v is not None} | {"error": None})
    return sorted(cleaned, key=lambda r: r["path"])
