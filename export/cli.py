"""`cltvit-export`: write a serving bundle (docs/bundle.md) from an open_clip backbone and a CLT checkpoint.

  cltvit-export --backbone ViT-B-32 --pretrained openai --clt runs/clt --mode cls \\
      --labels classes.txt [--templates templates.txt] [--variants int8,fp16] --out BUNDLE_DIR
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bundle import BundleError
from training.model.backbone import BackboneError, load_backbone
from training.model.checkpoint import CheckpointError, load_checkpoint

from .quantize import REDUCED
from .writer import ExportError, export_bundle


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (lines starting with '#' are comments)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--{what} file {path} does not exist")
    lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    if not lines:
        raise ValueError(f"--{what} file {path} has no entries (one per line)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cltvit-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="open_clip architecture, e.g. ViT-B-32, cltvit-tiny")
    ap.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file (default: random weights)")
    ap.add_argument("--seed", type=int, default=0, help="seed of random backbone weights (only without --pretrained)")
    ap.add_argument("--clt", required=True, help="CLT checkpoint directory (clt.json + clt.safetensors)")
    ap.add_argument("--mode", default="cls", choices=("cls", "all", "observe"), help="where the CLT replaces the MLPs")
    ap.add_argument("--labels", required=True, help="text file: one class name per line")
    ap.add_argument("--templates", default=None, help="text file: one prompt template with '{}' per line (default: 'a photo of a {}.')")
    ap.add_argument("--top-k-features", type=int, default=16, help="top CLT features reported per image")
    ap.add_argument("--spatial-top-k", type=int, default=5,
                    help="classes per image with spatial maps (where in the image; docs/spatial.md); 0: none")
    ap.add_argument("--variants", default="", help="comma-separated reduced-precision variants: int8, int8-clt (CPU), fp16 (CUDA)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in REDUCED]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {', '.join(REDUCED)}")
    if args.top_k_features < 1:
        ap.error("--top-k-features must be >= 1")
    if args.spatial_top_k < 0:
        ap.error("--spatial-top-k must be >= 0 (0: no spatial maps)")
    if args.opset < 17:
        ap.error("--opset must be >= 17")
    t0 = time.perf_counter()
    try:
        labels = read_lines(args.labels, "labels")
        templates = read_lines(args.templates, "templates") if args.templates else None
        backbone = load_backbone(args.backbone, args.pretrained, device="cpu", seed=args.seed)
        clt, meta = load_checkpoint(args.clt, backbone)
        out = export_bundle(backbone, clt, args.mode, labels, templates, args.out, top_k_features=args.top_k_features,
                            spatial_top_k=args.spatial_top_k, variants=variants, checkpoint=Path(args.clt).resolve().name, clt_sha256=meta.get("sha256"),
                            opset=args.opset, overwrite=args.overwrite)
    except (BackboneError, CheckpointError, ExportError, BundleError, FileNotFoundError, ValueError) as exc:
        print(f"cltvit-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {out} ({args.mode} mode, {len(labels)} labels, variants fp32{''.join(',' + v for v in variants)}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
