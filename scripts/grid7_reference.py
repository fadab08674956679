#!/usr/bin/env python
"""What a finer reference model costs per CLIP training step: the reference CLIP (`cltvit-ref`, 28x28
images in 7x7-pixel patches, a 4x4 grid, 17 tokens) against `cltvit-ref7` (4x4-pixel patches, a 7x7
grid, 50 tokens), same process, 3 x 20 steps each alternating, median CPU seconds per step on one thread.

The whole 7x7 build (its CLIP, CLT, fine-tuning, evaluation and bundle, with every figure the reference
build reports) is `cltvit-reference build --out DIR --model cltvit-ref7`; docs/spatial.md has both.
Writes --out/grid7_steps.json.

  python scripts/grid7_reference.py [--out artifacts/grid7]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.provenance import machine_info  # noqa: E402
from training.clip import ClipTrainConfig, train_reference_clip  # noqa: E402
from training.data import FashionMNIST  # noqa: E402
from training.model.backbone import load_backbone  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts/grid7")
    ap.add_argument("--steps", type=int, default=20, help="CLIP steps per timing (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="timings per model (default 3)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    train = FashionMNIST("train")

    def step_cpu(model: str, seed: int) -> float:
        bb = load_backbone(model, None, device="cpu", seed=seed)
        c0 = time.process_time()
        train_reference_clip(bb, train.images, train.labels, train.class_names, train.templates,
                             ClipTrainConfig(steps=args.steps, warmup_steps=2), log=lambda s: None)
        return (time.process_time() - c0) / args.steps

    per: dict[str, list[float]] = {"cltvit-ref": [], "cltvit-ref7": []}
    for r in range(args.rounds):
        for m in per:
            per[m].append(step_cpu(m, r))
    rec = {"machine": machine_info(threads=1), "steps": args.steps, "rounds": args.rounds,
           "clip_step_cpu_s": {m: float(np.median(v)) for m, v in per.items()}}
    rec["clip_step_ratio"] = rec["clip_step_cpu_s"]["cltvit-ref7"] / rec["clip_step_cpu_s"]["cltvit-ref"]
    print(f"CLIP step CPU seconds: {rec['clip_step_cpu_s']}; 7x7 / 4x4 = {rec['clip_step_ratio']:.2f}")
    (args.out / "grid7_steps.json").write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
