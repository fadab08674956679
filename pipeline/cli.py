"""`cltvit-reference`: the reference model.

  cltvit-reference export --out artifacts/reference/bundle   # serving bundle from the shipped weights (seconds)
  cltvit-reference export --out DIR --variants int8,int8-clt,fp16 --gate-images 10000   # ... those variants' accuracy
                                                             # gate on all 10,000 test images
  cltvit-reference build --out artifacts/reference-build     # retrain everything (~18 min on 2 cores)
  cltvit-reference build --out artifacts/reference7 --model cltvit-ref7   # the same with a 7x7 patch grid (~2x the time)
  cltvit-reference ship --build artifacts/reference-build    # make the build's weights the shipped ones (atlas included)
  cltvit-reference atlas                                     # (re)measure the shipped weights' feature atlas (~2 min)

Errors print one line naming the argument and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from training.data import DatasetError
from training.model.backbone import BackboneError
from training.model.checkpoint import CheckpointError

from export.gate import DEFAULT_GATE_IMAGES
from export.quantize import REDUCED

from .reference import BUDGETS, REF_MODEL, REF_MODELS, STAGES, BuildError, budget, build, gate_summary
from .shipped import EXPORT_VARIANTS, WEIGHTS_DIR, export_shipped, ship, ship_atlas

BUILD_MINUTES = 18  # a full build on a 2-core CPU with --jobs 2 (docs/reference.md)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cltvit-reference", description="Build the reference CLIP, its CLT, the evaluation and the serving bundle.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run (or reuse) every stage into --out")
    b.add_argument("--out", required=True, help="artifact directory (e.g. artifacts/reference); cached stages are reused")
    b.add_argument("--budget", choices=BUDGETS, default="full", help="full (default) or smoke (seconds; for CI)")
    b.add_argument("--data-dir", help="directory with the Fashion-MNIST idx files (default: Debian's dataset-fashion-mnist)")
    b.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, else cpu)")
    b.add_argument("--skip", nargs="*", default=[], choices=[s for s in STAGES if s not in ("clip", "clt")], help="stages to leave out")
    b.add_argument("--force", nargs="*", default=[], choices=STAGES, help="stages to redo even if cached")
    b.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads were measured "
                        "up to 18x slower per step than one; 0 keeps torch's default)")
    b.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes: 2 (default on >= 2 cores) trains the CLT-vs-PLT comparison beside the CLT, "
                        "each process with --threads torch threads; 1 runs every stage in turn")
    b.add_argument("--clt-seeds", type=int, default=1,
                   help="N > 1: also retrain the CLT with seeds 1..N-1 and report every seed's fidelity with mean and worst "
                        "(seeds/seeds.md; about 5 more minutes per seed)")
    b.add_argument("--model", choices=REF_MODELS, default=REF_MODEL,
                   help="the CLIP: cltvit-ref (default; a 4x4 patch grid) or cltvit-ref7 (patch 4: a 7x7 grid for finer "
                        "spatial maps, about twice the build time; docs/spatial.md)")
    b.add_argument("--gate-images", type=int, default=None,
                   help=f"Fashion-MNIST test images the bundle's accuracy gate measures each variant on (default "
                        f"{DEFAULT_GATE_IMAGES}; 10000: all; docs/bundle.md)")
    b.add_argument("--no-finetune", action="store_true", help="skip the replacement-matching phase of the CLT stage")
    b.add_argument("--finetune-loss", choices=("kl", "cosine"), help="match loss of the fine-tuning phase (default kl)")
    e = sub.add_parser("export", help="write the serving bundle from the shipped weights (seconds)")
    e.add_argument("--out", required=True, help="bundle directory to write (e.g. artifacts/reference/bundle)")
    e.add_argument("--weights", default=str(WEIGHTS_DIR), help="shipped-weights folder (default: the project's)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--variants", default=",".join(EXPORT_VARIANTS),
                   help=f"reduced-precision variants beside fp32 (default {','.join(EXPORT_VARIANTS)}; any of {', '.join(REDUCED)})")
    e.add_argument("--gate-images", type=int, default=DEFAULT_GATE_IMAGES,
                   help=f"Fashion-MNIST test images the variants' accuracy gate is measured on (default {DEFAULT_GATE_IMAGES}; "
                        f"10000: all; 0: no gate, so `--variant auto` serves fp32; docs/bundle.md)")
    sh = sub.add_parser("ship", help="round a finished build's CLIP and CLT to float16 into the shipped-weights folder, measured")
    sh.add_argument("--build", required=True, help="directory of a finished `cltvit-reference build`")
    sh.add_argument("--to", default=str(WEIGHTS_DIR), help="shipped-weights folder to (re)write (default: the project's)")
    sh.add_argument("--data-dir", help="directory with the Fashion-MNIST idx files (default: Debian's dataset-fashion-mnist)")
    sh.add_argument("--limit", type=int, help="measure on the first N test images (default: all 10,000)")
    sh.add_argument("--atlas-limit", type=int, help="measure the atlas on the first N training images (default: all 60,000)")
    a = sub.add_parser("atlas", help="(re)measure the feature atlas of the shipped weights over the training images and add it to them")
    a.add_argument("--weights", default=str(WEIGHTS_DIR), help="shipped-weights folder (default: the project's)")
    a.add_argument("--data-dir", help="directory with the Fashion-MNIST idx files (default: Debian's dataset-fashion-mnist)")
    a.add_argument("--limit", type=int, help="measure on the first N training images (default: all 60,000)")
    return p


def _error(message: str) -> int:
    print(f"cltvit-reference: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            if Path(args.out).exists() and not args.overwrite:
                return _error(f"argument --out: {args.out} exists; pass --overwrite to replace it")
            if args.gate_images < 0:
                return _error(f"argument --gate-images: must be >= 0, got {args.gate_images}")
            variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
            if set(variants) - set(REDUCED):
                return _error(f"argument --variants: unknown {sorted(set(variants) - set(REDUCED))}; choose from {', '.join(REDUCED)}")
            t0 = time.time()
            out = export_shipped(args.out, args.weights, overwrite=args.overwrite, gate_images=args.gate_images, variants=variants)
            print(f"wrote the reference bundle {out} from {args.weights} in {time.time() - t0:.1f} s{gate_summary(Path(out))}")
            return 0
        if args.command == "atlas":
            t0 = time.time()
            manifest = ship_atlas(args.weights, data_dir=args.data_dir, limit=args.limit, log=lambda m: print(m, flush=True))
            print(f"added the atlas ({manifest['atlas']['images']} images) to {args.weights} in {time.time() - t0:.0f} s")
            return 0
        if args.command == "ship":
            manifest = ship(args.build, args.to, data_dir=args.data_dir, limit=args.limit, atlas_limit=args.atlas_limit,
                            command=f"cltvit-reference build --out {args.build}", log=lambda m: print(m, flush=True))
            print(json.dumps({"to": args.to, "float16": manifest["measured"]["float16"]}, indent=1, default=float))
            return 0
    except (BuildError, BackboneError, CheckpointError, DatasetError) as exc:
        return _error(str(exc))
    return _build(args)


def _build(args: argparse.Namespace) -> int:
    if args.threads < 0:
        print(f"cltvit-reference: error: --threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"cltvit-reference: error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.clt_seeds < 1:
        print(f"cltvit-reference: error: argument --clt-seeds: must be >= 1, got {args.clt_seeds}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gate_images is not None and args.gate_images < 1:
        print(f"cltvit-reference: error: argument --gate-images: must be >= 1, got {args.gate_images}", file=sys.stderr)
        return 2
    cfg = replace(budget(args.budget), clt_seeds=args.clt_seeds, model=args.model)
    if args.gate_images is not None:
        cfg.gate_images = args.gate_images
    if args.no_finetune:
        cfg.finetune = None
    elif args.finetune_loss and cfg.finetune is not None:
        cfg.finetune = replace(cfg.finetune, loss=args.finetune_loss)
    print(f"cltvit-reference: building the reference model into {args.out}; a full build takes about "
          f"{BUILD_MINUTES} minutes on a 2-core CPU (stages already finished there are reused)", flush=True)
    try:
        summary = build(args.out, cfg, data_dir=args.data_dir, device=args.device, skip=args.skip, force=args.force,
                        log=lambda s: print(s, flush=True), jobs=args.jobs)
    except (BuildError, BackboneError, CheckpointError, DatasetError) as exc:
        print(f"cltvit-reference: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"zero_shot_top1": summary["zero_shot_top1"], "evaluation": summary["evaluation"],
                      "targets": {k: v["met"] for k, v in summary["targets"].items()},
                      "seeds": summary["seeds"],
                      "seconds": summary["stage_seconds_total"]}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
