"""`cltvit-export`: write a serving bundle (docs/bundle.md) from an open_clip backbone and a CLT checkpoint.
`cltvit-atlas`: measure the feature atlas of a bundle's CLT over a dataset and add it to the bundle (docs/atlas.md).

  cltvit-export --backbone ViT-B-32 --pretrained openai --clt runs/clt --mode cls \\
      --labels classes.txt [--templates templates.txt] [--variants int8,fp16] --out BUNDLE_DIR \\
      [--eval-data held-out/ [--eval-images 2000]]
  cltvit-atlas --bundle BUNDLE_DIR --clt runs/clt [--pretrained FILE] [--dataset folder --data-dir DIR] \\
      [--limit N] [--vocab words.txt]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import open_clip
import torch

from bundle import BundleError, read_manifest
from bundle.gate import gate_table
from training.data import DATASETS, DatasetError, ImageFolder, load_dataset
from training.model.backbone import BackboneError, load_backbone
from training.model.checkpoint import CheckpointError, load_checkpoint

from .atlas import AtlasConfig, AtlasError, DatasetSource, build_atlas
from .gate import DEFAULT_GATE_IMAGES, GateError, GateImages
from .quantize import REDUCED
from .vocab import DEFAULT_MIN_COUNT, VocabError
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
    ap.add_argument("--variants", default="", help="comma-separated reduced-precision variants: int8, int8-clt, int8-dec (CPU), fp16 (CUDA)")
    ap.add_argument("--no-intervene", action="store_true",
                    help="leave out the intervention graph intervene.onnx (written by default in cls and all modes; docs/intervene.md)")
    ap.add_argument("--fill", default=None,
                    help="r,g,b: the value a deleted patch's pixels take, in preprocessed units (the manifest's patches block, "
                         "read by the total-effect map and by intervene.onnx's patch deletions; default 0,0,0: the preprocessing mean)")
    ap.add_argument("--fill-source", default=None, help="what --fill is (written next to it; default: 'given to cltvit-export --fill')")
    ap.add_argument("--eval-data", default=None, metavar="DIR",
                    help="held-out labelled images (one subfolder per class) on which every variant is measured against fp32: "
                         "top-1 agreement, max |logit difference|, completeness residual go to bundle.json's gate, which "
                         "`--variant auto` needs before it serves a reduced-precision variant (docs/bundle.md)")
    ap.add_argument("--eval-images", type=int, default=DEFAULT_GATE_IMAGES,
                    help=f"images of --eval-data to measure (default {DEFAULT_GATE_IMAGES}, drawn with a fixed seed; "
                         f"all when the folder has fewer)")
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
    if args.eval_images < 1:
        ap.error(f"--eval-images must be >= 1, got {args.eval_images}")
    t0 = time.perf_counter()
    try:
        labels = read_lines(args.labels, "labels")
        templates = read_lines(args.templates, "templates") if args.templates else None
        backbone = load_backbone(args.backbone, args.pretrained, device="cpu", seed=args.seed)
        clt, meta = load_checkpoint(args.clt, backbone)
        gate_images = None
        if args.eval_data is not None:
            try:
                gate_images = GateImages.from_dataset(ImageFolder(args.eval_data), backbone.preprocess, labels, args.eval_images,
                                                      what=f"image folder {Path(args.eval_data).name}")
            except (DatasetError, GateError) as exc:
                raise ValueError(f"argument --eval-data: {exc}") from None
        out = export_bundle(backbone, clt, args.mode, labels, templates, args.out, top_k_features=args.top_k_features,
                            spatial_top_k=args.spatial_top_k, variants=variants, checkpoint=Path(args.clt).resolve().name, clt_sha256=meta.get("sha256"),
                            opset=args.opset, overwrite=args.overwrite, intervene=False if args.no_intervene else None,
                            fill=None if args.fill is None else [float(v) for v in args.fill.split(",")],
                            fill_source=None if args.fill is None else (args.fill_source or "given to cltvit-export --fill"),
                            gate_images=gate_images)
    except (BackboneError, CheckpointError, ExportError, BundleError, FileNotFoundError, ValueError) as exc:
        print(f"cltvit-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote bundle {out} ({args.mode} mode, {len(labels)} labels, variants fp32{''.join(',' + v for v in variants)}) "
          f"in {time.perf_counter() - t0:.1f} s")
    gate = read_manifest(out).gate
    for line in [] if gate is None else gate_table(gate):
        print(line)
    return 0


def build_atlas_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cltvit-atlas", description="Measure every CLT feature of a bundle over a dataset "
                                 "(firing rate, quantiles, top images, direct effect, text labels) and store it in the bundle. "
                                 "Resumable: rerun the same command after an interruption.")
    ap.add_argument("--bundle", required=True, help="bundle directory to add the atlas to")
    ap.add_argument("--clt", required=True, help="the bundle's CLT checkpoint directory (its sha256 must be the bundle's)")
    ap.add_argument("--backbone", help="open_clip architecture (default: the bundle's)")
    ap.add_argument("--pretrained", help="backbone weights: open_clip tag or file (default: the bundle's tag; a file must be given)")
    ap.add_argument("--dataset", default="fashion-mnist", choices=DATASETS, help="images to measure on (default fashion-mnist)")
    ap.add_argument("--split", default="train", choices=("train", "test", "val"), help="dataset split (default train)")
    ap.add_argument("--data-dir", help="dataset directory (an image folder: one subfolder per class; default for fashion-mnist: Debian's)")
    ap.add_argument("--class-list", help="imagenet100 class list")
    ap.add_argument("--limit", type=int, help="measure on the first N images only")
    ap.add_argument("--vocab", help="text file of label candidates, one per line (default: the labels plus WordNet words)")
    ap.add_argument("--vocab-min-count", type=int, default=DEFAULT_MIN_COUNT, help="WordNet words tagged at least this often in SemCor")
    ap.add_argument("--top-n", type=int, default=AtlasConfig.top_n, help="top images kept per feature")
    ap.add_argument("--weak-effect", type=float, default=AtlasConfig.weak_effect,
                    help="logits: features with a weaker mean direct effect are labelled by their top images' classes (default 0.05)")
    ap.add_argument("--batch-size", type=int, default=AtlasConfig.batch_size)
    ap.add_argument("--checkpoint-every", type=int, default=AtlasConfig.checkpoint_every, help="images between resume checkpoints")
    ap.add_argument("--work", help="resume state directory (default: BUNDLE.atlas-work next to the bundle)")
    ap.add_argument("--out", help="write the atlas files into this directory instead of the bundle")
    ap.add_argument("--overwrite", action="store_true", help="discard an unfinished run's state and start over")
    ap.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 keeps torch's default)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _atlas_backbone(args: argparse.Namespace, manifest: object) -> tuple[str, str | None, int]:
    """(model, pretrained, seed) to load: the arguments, else what the bundle records (a weights file must be given)."""
    bb = manifest.backbone  # type: ignore[attr-defined]
    model = args.backbone or bb.model
    pretrained = args.pretrained or bb.pretrained
    if args.pretrained is None and bb.pretrained is not None and bb.pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise AtlasError(f"argument --pretrained: the bundle's backbone was loaded from the file {bb.pretrained!r}; pass its path")
    seed = int(getattr(bb, "seed", None) or 0)
    return model, pretrained, seed


def atlas_main(argv: list[str] | None = None) -> int:
    ap = build_atlas_parser()
    args = ap.parse_args(argv)
    for name in ("limit", "top_n", "batch_size", "checkpoint_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0, got {args.threads}")
    if not args.weak_effect >= 0:
        ap.error(f"--weak-effect must be >= 0, got {args.weak_effect}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        manifest = read_manifest(args.bundle)
        model, pretrained, seed = _atlas_backbone(args, manifest)
        backbone = load_backbone(model, pretrained, device=args.device, seed=seed)
        clt, meta = load_checkpoint(args.clt, backbone)
        dataset = load_dataset(args.dataset, args.split, args.data_dir, args.class_list)
        cfg = AtlasConfig(top_n=args.top_n, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                          vocab_min_count=args.vocab_min_count, weak_effect=args.weak_effect)
        build_atlas(backbone, clt, args.bundle, DatasetSource(dataset, backbone.preprocess), clt_sha256=meta.get("sha256"), cfg=cfg,
                    limit=args.limit, vocab_file=args.vocab, work_dir=args.work, out_dir=args.out, overwrite=args.overwrite,
                    progress=not args.no_progress, command=" ".join(["cltvit-atlas", *(argv if argv is not None else sys.argv[1:])]))
    except (AtlasError, VocabError, BundleError, BackboneError, CheckpointError, DatasetError) as exc:
        print(f"cltvit-atlas: error: {exc}", file=sys.stderr)
        return 2
    print(f"cltvit-atlas: wrote the atlas {'into ' + args.out if args.out else 'into the bundle ' + args.bundle} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
