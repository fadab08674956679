#!/usr/bin/env python
"""Section 7 of the evaluation report (training/evaluation/ablation.py) on the shipped reference weights:
the predicted logit's drop when the top-1 unit vs a random unit is ablated (the model rerun), over the
Fashion-MNIST test images, with 95% bootstrap intervals. Prints the markdown table and the machine.

  python scripts/ablation_reference.py [--images 10000] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.provenance import machine_info  # noqa: E402
from pipeline.shipped import load_shipped  # noqa: E402
from training.clip import preprocess_stats, tensorise  # noqa: E402
from training.data import FashionMNIST  # noqa: E402
from training.evaluation.ablation import ablation_faithfulness, render_ablation  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backbone, clt, _ = load_shipped()
    ds = FashionMNIST("test", limit=args.images)
    mean, std = preprocess_stats(backbone.preprocess)
    pixels = tensorise(ds.images[: args.images], mean, std)
    text = backbone.class_embeddings(FashionMNIST.class_names, FashionMNIST.templates).float()
    t0 = time.perf_counter()
    section = ablation_faithfulness(backbone.visual, clt.eval(), pixels, text, backbone.logit_scale, batch_size=250)
    print(render_ablation(section))
    print(f"\n{len(pixels)} images in {time.perf_counter() - t0:.0f} s; machine: {json.dumps(machine_info(args.threads))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
