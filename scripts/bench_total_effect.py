"""What the total-effect map costs a served explanation: `Explainer.explain` of one image per call with and
without `total_effect=True`, alternating, median CPU time of this thread, one ONNX Runtime thread; prints the
ratio measured in this run (docs/spatial.md, "Total effect").

    python scripts/bench_total_effect.py --bundle artifacts/reference/bundle [--images 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.provenance import machine_info  # noqa: E402
from serving import Explainer  # noqa: E402
from training.data import FashionMNIST  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--images", type=int, default=64, help="Fashion-MNIST test images, one per call")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ex = Explainer(args.bundle, threads=1)
    ds = FashionMNIST("test", limit=args.images)
    images = [ds[i][0] for i in range(len(ds))]
    for im in images[:4]:  # warm-up: ORT's first-call allocations at both batch sizes
        ex.explain([im])
        ex.explain([im], total_effect=True)
    plain, total = [], []
    for _ in range(args.rounds):
        for im in images:
            c = time.thread_time()
            ex.explain([im])
            plain.append(time.thread_time() - c)
            c = time.thread_time()
            ex.explain([im], total_effect=True)
            total.append(time.thread_time() - c)
    a, b = float(np.median(plain)), float(np.median(total))
    rows = ex.runtime.patches.n_patches + 1 if ex.runtime.patches else 0
    print(json.dumps({"bundle": args.bundle, "calls": len(plain), "explain_ms": a * 1e3, "explain_total_effect_ms": b * 1e3,
                      "ratio": b / a, "extra_rows": rows, "machine": machine_info(threads=1)}, indent=1))


if __name__ == "__main__":
    main()
