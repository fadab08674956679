#!/usr/bin/env python
"""Benchmark of `cltvit-score` against the raw bundle, same batch size, same run.

  raw:    `BundleRuntime.run` over preprocessed pixels already in memory (inference alone)
  score:  `serving.score.score_folder` on a folder of JPEG files: discovery, reading, decoding and
          preprocessing in the thread pool, inference, result building, JSONL append + fsync per batch

Both use the same loaded runtime (ONNX Runtime, CPU here), alternating raw/score (and which goes
first) for `--repeats` rounds so that load from other processes hits both alike; the ratio reported is best score
images/s over best raw images/s (and the per-round ratios). Target on the ViT-B-32-architecture
bundle (artifacts/bench/vitb32-bundle, written by scripts/bench_export.py): >= 0.9; the verdict is
computed from the run. `--variant` scores with a reduced-precision graph of the bundle (the one
scripts/bench_export.py recommends for this CPU, say). The CPU is printed and recorded.

The folder holds `--images` real Fashion-MNIST test images, upscaled to `--image-size` pixels and
saved as JPEG (quality 90), so that decoding costs about what a photo of that size costs.

  python scripts/bench_score.py [--bundle DIR] [--images 192] [--batch-size 32] [--workers 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.provenance import machine_info  # noqa: E402
from serving.explainer import Explainer  # noqa: E402
from serving.jobs.score import ScoreSummary, discover, score_folder  # noqa: E402
from serving.runtime import BundleRuntime, RuntimeSetupError  # noqa: E402


TARGET = 0.9  # cltvit-score images/s over raw inference images/s


def write_images(folder: Path, n: int, size: int) -> None:
    """`n` Fashion-MNIST test images as `size`x`size` JPEGs in 4 subfolders (kept between runs)."""
    from PIL import Image

    from training.data import FashionMNIST

    stamp = folder / f".made-{n}-{size}"
    if stamp.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    ds = FashionMNIST("test", limit=n)
    for i in range(n):
        img, _ = ds[i]
        (folder / str(i % 4)).mkdir(parents=True, exist_ok=True)
        img.resize((size, size), Image.BICUBIC).save(folder / str(i % 4) / f"{i:05d}.jpg", quality=90)
    stamp.touch()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "artifacts/bench/vitb32-bundle")
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding threads of the scorer")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    p.add_argument("--variant", default="fp32", help="graph variant of the bundle to score with (fp32, int8, int8-clt, int8-dec, fp16)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--min-ratio", type=float, default=None, help="exit 1 when score/raw is below this")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts/bench/bench_score.json")
    args = p.parse_args()
    for name in ("images", "image_size", "batch_size", "workers", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if not (args.bundle / "bundle.json").is_file():
        p.error(f"argument --bundle: no bundle at {args.bundle} (make one with `python scripts/bench_export.py`)")

    folder = args.out.parent / "score-images"
    write_images(folder, args.images, args.image_size)
    rels = discover(folder)
    mach = machine_info(args.threads or os.cpu_count())
    print(f"CPU {mach['cpu']} ({', '.join(mach['isa'])}), {mach['cores']} logical CPUs; "
          + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()), flush=True)
    print(f"bundle {args.bundle} ({args.variant}) | {len(rels)} JPEGs {args.image_size}x{args.image_size} | batch {args.batch_size} | "
          f"decode workers {args.workers} | cpus {os.cpu_count()} | load {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    try:
        runtime = BundleRuntime(args.bundle, threads=args.threads, variant=args.variant, verify_checksums=False)
    except RuntimeSetupError as exc:
        p.error(f"argument --variant: {exc}")
    explainer = Explainer(runtime)
    print(f"loaded in {time.perf_counter() - t0:.1f} s on {runtime.provider}", flush=True)
    pixels = np.stack([explainer.load(folder / r) for r in rels])
    bs = args.batch_size
    runtime.run(pixels[:bs])  # warm-up

    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))

    def run_raw() -> float:
        t = time.perf_counter()
        for i in range(0, len(pixels), bs):
            runtime.run(pixels[i : i + bs])
        return len(pixels) / (time.perf_counter() - t)

    def run_score() -> tuple[float, ScoreSummary]:
        t = time.perf_counter()
        s = score_folder(folder, explainer, tmp / "results.jsonl", batch_size=bs, workers=args.workers,
                         overwrite=True, progress=False)
        return s.scored / (time.perf_counter() - t), s

    rounds = []
    try:
        for r in range(args.repeats):
            if r % 2 == 0:  # alternate the order so that neither side always runs first
                raw = run_raw()
                score, summary = run_score()
            else:
                score, summary = run_score()
                raw = run_raw()
            assert summary.scored == len(rels) and summary.errors == 0
            rounds.append({"raw_images_per_s": raw, "score_images_per_s": score, "ratio": score / raw})
            print(f"round {r + 1}: raw {raw:.2f} images/s | cltvit-score {score:.2f} images/s | ratio {score / raw:.3f} "
                  f"| load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best_raw = max(x["raw_images_per_s"] for x in rounds)
    best_score = max(x["score_images_per_s"] for x in rounds)
    ratio = best_score / best_raw
    meets = ratio >= TARGET
    print(f"best: raw {best_raw:.2f} images/s, cltvit-score {best_score:.2f} images/s, ratio {ratio:.3f}: "
          f"{'meets' if meets else 'misses'} the target >= {TARGET}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bundle": str(args.bundle), "images": len(rels), "image_size": args.image_size, "batch_size": bs,
        "workers": args.workers, "threads": args.threads, "variant": args.variant, "provider": runtime.provider, "rounds": rounds,
        "best_raw_images_per_s": best_raw, "best_score_images_per_s": best_score, "ratio": ratio, "meets_target": meets,
        "target": TARGET, "machine": mach,
    }, indent=2) + "\n")
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"FAIL: ratio {ratio:.3f} < --min-ratio {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
