"""The memory-plan table of docs/training.md: `training.plan.plan_memory` (what `cltvit-train --plan` prints) for
ViT-B/32, B/16, L/14 and H/14 at several F, one rank, with cltvit-train's defaults (k = 32, TopK, cross-layer,
batch 4096 tokens, buffer 65,536 tokens fp32, 32 images per ViT batch, streaming), and for each the smallest
feature-sharded world (`--shard-features`) whose ranks fit a device of `--device-memory` GiB.

    python scripts/memory_plan.py --device-memory 80
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.plan import GiB, VitShape, plan_memory  # noqa: E402

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14")
FEATURES = (6144, 16384, 20480)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memory_plan", description=__doc__.split("\n")[0])
    p.add_argument("--device-memory", type=float, default=80.0, help="GiB per device (default 80)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=4096)
    args = p.parse_args(argv)
    g = lambda n: f"{n / GiB:,.1f}"  # noqa: E731
    print("| model (L, d, T) | F | CLT parameters | parameters | gradients | Adam | activations | buffer | ViT | total, 1 rank "
          f"| fits {args.device_memory:g} GiB | smallest --shard-features world that fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        s = VitShape.from_open_clip(model)
        for F in FEATURES:
            plan = plan_memory(s, F, args.k, args.batch_tokens, device_memory_gib=args.device_memory)
            b = plan.bytes
            world = next((w for w in (1, 2, 4, 8, 16, 32, 64) if F % w == 0 and plan_memory(
                s, F, args.k, args.batch_tokens, world_size=w, shard_features=w > 1, device_memory_gib=args.device_memory).fits), None)
            print(f"| {model} ({s.layers}, {s.width}, {s.tokens}) | {F:,} | {plan.clt_parameters / 1e9:.2f} B | {g(b['parameters'])} "
                  f"| {g(b['gradients'])} | {g(b['adam'])} | {g(b['activations'])} | {g(b['buffer'])} | {g(b['vit'])} "
                  f"| **{g(plan.total)}** | {'yes' if plan.fits else 'no'} | {world if world else '> 64'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
