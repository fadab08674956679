"""Console scripts of the training stage: `cltvit-train` (train a CLT; `--plan` prints its memory plan),
`cltvit-activations` (write an activation cache to train from), `cltvit-eval` (evaluate a CLT) and
`cltvit-eval-spatial` (faithfulness and cost of the spatial maps alone, docs/spatial.md).

`cltvit-train` example:
    cltvit-train --model ViT-B-32 --pretrained openai --dataset cifar100 --data-dir DIR \
        --features 6144 --k 32 --activation topk --steps 20000 --out runs/b32

Re-running the same command after an interruption resumes from the last checkpoint in --out.
Bad arguments print one line `cltvit-train: error: argument --X: ...` and exit with status 2.

Data parallel (docs/training.md): `torchrun --nproc-per-node N -m training.cli ARGS` or
`cltvit-train --nproc N ARGS` (which starts that torchrun, on a free port) trains one CLT on N ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn, Sequence

import open_clip
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from bundle.provenance import machine_info

from .cache import ActivationCache, CacheError, write_cache
from .data import DATASETS, DatasetError, load_dataset

from .evaluation import spatial as spatial_eval
from .evaluation.metrics import EvaluationError, dataset_tensors
from .evaluation.plots import plot_spatial_deletion
from .evaluation.report import EvalConfig, evaluate_clt
from .model.backbone import BackboneError, load_backbone, pick_device, register_project_configs
from .model.checkpoint import CheckpointError, load_checkpoint, read_meta
from .model.clt import CLTConfig
from .model.vit import UnsupportedModel
from .plan import PlanError, plan_memory, render_plan
from .testing import random_clt
from .distributed import World
from .trainer import TrainConfig, TrainingError, release_text_tower, train_clt

PROG = "cltvit-train"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def _float_at_least(lo: float, strict: bool = False):
    """argparse type: a float >= lo (> lo when strict), with a message naming the bound."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > lo if strict else value >= lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo:g}, got {value}")
        return value

    return parse


_positive_float = _float_at_least(0.0, strict=True)
_nonneg_float = _float_at_least(0.0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train a cross-layer transcoder (CLT) on the MLPs of an open_clip ViT.")
    g = p.add_argument_group("backbone")
    g.add_argument("--model", default=None, help="open_clip architecture, e.g. ViT-B-32, ViT-B-16, cltvit-tiny "
                   "(required, except with --activations: the cache records it)")
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag (e.g. openai) or a checkpoint file; default: random weights")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    g.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads for torch (default: torch's choice)")
    g = p.add_argument_group("data parallel (docs/training.md)")
    g.add_argument("--nproc", type=_int_at_least(1), default=None,
                   help="train on N ranks: starts `torchrun --standalone --nproc-per-node N` with the other arguments "
                        "(gloo on CPU, NCCL on CUDA: one GPU per rank); under torchrun, the world size it gives")
    g.add_argument("--data-shards", type=_int_at_least(1), default=None,
                   help="disjoint image shards, one batch of --batch-tokens from each per step (default: one per rank; "
                        "a multiple of the world size: e.g. 2 on one process reproduces a 2-rank run's batches)")
    g.add_argument("--shard-features", type=_int_at_least(1), nargs="?", const=-1, default=None, metavar="S",
                   help="feature sharding: each rank holds features/S of every layer (S: default all ranks); with N ranks, "
                        "N/S data-parallel replicas of S shards. The same CLT as one process, saved as one ordinary "
                        "clt.safetensors (docs/training.md). With --nproc N, or under torchrun")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=DATASETS, help="dataset kind (required unless --activations or --plan)")
    g.add_argument("--activations", default=None, metavar="DIR",
                   help="train from an activation cache written by cltvit-activations instead of running the ViT "
                        "(same order and batches as the stream, float16 values; --dataset not needed)")
    g.add_argument("--data-dir", default=None, help="dataset root (fashion-mnist: defaults to Debian's dataset-fashion-mnist files)")
    g.add_argument("--class-list", default=None, help="imagenet100: file with one synset folder per line")
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument("--limit", type=_int_at_least(1), default=None, help="use only the first N images")
    g.add_argument("--tokens", choices=("all", "cls", "patches"), default="all", help="token set to train on (default: all)")
    g.add_argument("--num-workers", type=_int_at_least(0), default=0, help="DataLoader workers for image decoding")
    g = p.add_argument_group("CLT")
    g.add_argument("--features", type=_int_at_least(1), default=6144, help="features per layer F (default 6144)")
    g.add_argument("--k", type=_int_at_least(1), default=32, help="active features per token (topk/batchtopk; default 32)")
    g.add_argument("--activation", choices=("topk", "batchtopk", "jumprelu", "relu"), default="topk")
    g.add_argument("--no-cross-layer", action="store_true", help="per-layer transcoders (each layer decodes only to itself)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_int_at_least(1), default=None, help="optimiser steps (required unless --plan)")
    g.add_argument("--batch-tokens", type=_int_at_least(1), default=4096, help="tokens per step (default 4096)")
    g.add_argument("--lr", type=_positive_float, default=2e-4, help="peak learning rate (default 2e-4)")
    g.add_argument("--warmup-steps", type=_int_at_least(0), default=None, help="linear warm-up steps (default: min(1000, steps/10))")
    g.add_argument("--decay", choices=("cosine", "linear"), default="cosine", help="decay to 0.1*lr (default cosine)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0)
    g.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--aux-coef", type=_nonneg_float, default=1 / 32, help="AuxK loss weight (topk/batchtopk)")
    g.add_argument("--sparsity-coef", type=_nonneg_float, default=0.0, help="tanh-L0 penalty weight (jumprelu)")
    g.add_argument("--dead-after-tokens", type=_int_at_least(1), default=10_000_000)
    g.add_argument("--buffer-tokens", type=_int_at_least(1), default=65536, help="shuffling buffer size in tokens")
    g.add_argument("--cls-copies", type=_int_at_least(0), default=0,
                   help="extra copies of each image's CLS token in the shuffling buffer (--tokens all; default 0)")
    g.add_argument("--cls-aux-coef", type=_nonneg_float, default=0.0,
                   help="CLS AuxK weight: features silent at the CLS token learn the CLS residual (--tokens all; "
                        "default 0: off; docs/fidelity.md has its trade-off)")
    g.add_argument("--cls-aux-k", type=_int_at_least(1), default=64, help="features per CLS row in CLS AuxK (default 64)")
    g.add_argument("--cls-dead-after", type=_int_at_least(1), default=5000,
                   help="CLS rows without firing on one after which a feature counts as silent at the CLS token (default 5000)")
    g.add_argument("--buffer-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    g.add_argument("--images-per-batch", type=_int_at_least(1), default=32, help="images per ViT forward when refilling")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run directory (checkpoints, metrics.jsonl, final clt.safetensors/clt.json; "
                   "required unless --plan)")
    g.add_argument("--checkpoint-every", type=_int_at_least(1), default=500)
    g.add_argument("--log-every", type=_int_at_least(1), default=10)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("memory plan (--plan: print it and exit; nothing is trained or loaded)")
    g.add_argument("--plan", action="store_true", help="print parameters, gradient, Adam and activation memory per rank "
                   "for --model, --features, --k, --batch-tokens and --world-size, from the architecture's config")
    g.add_argument("--world-size", type=_int_at_least(1), default=None, help="ranks of the planned run (default: --nproc, "
                   "else 1; data parallel: --batch-tokens per rank, from its own image shard)")
    g.add_argument("--device-memory", type=_positive_float, default=None, metavar="GIB",
                   help="memory of one device in GiB: the plan says whether a rank fits")
    return p


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run `cltvit-train argv` on `nproc` ranks under torchrun (standalone: one machine, a free port);
    returns torchrun's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "training.cli", *_without_nproc(argv)]
    return subprocess.call(cmd)


def _check_feature_shards(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The number of feature shards S of `--shard-features`; what it cannot run is refused before anything is loaded."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        parser.error("argument --shard-features: run with --nproc N or under torchrun (torchrun --nproc-per-node N -m "
                     "training.cli --shard-features ...); WORLD_SIZE and RANK are not set")
    world = int(os.environ["WORLD_SIZE"])
    shards = world if args.shard_features == -1 else args.shard_features
    if world % shards:
        parser.error(f"argument --shard-features: {world} ranks cannot be split into groups of {shards} feature shards")
    if args.features % shards:
        parser.error(f"argument --features: {args.features} features cannot be split evenly over {shards} shards")
    if args.cls_aux_coef:
        parser.error("argument --cls-aux-coef: CLS AuxK is not supported with --shard-features")
    replicas = world // shards
    if args.data_shards is not None and args.data_shards % replicas:
        parser.error(f"argument --data-shards: {args.data_shards} is not a multiple of the {replicas} data-parallel "
                     f"replicas ({world} ranks / {shards} feature shards)")
    return shards


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cltvit-train`; returns 0, or exits with status 2 on a bad argument."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.plan:  # prints and exits: nothing is launched or loaded
        if args.k > args.features:
            parser.error(f"argument --k: k={args.k} exceeds --features={args.features}")
        return _plan(parser, args)
    under_torchrun = "WORLD_SIZE" in os.environ
    if args.nproc is not None and under_torchrun and args.nproc != int(os.environ["WORLD_SIZE"]):
        parser.error(f"argument --nproc: {args.nproc}, but torchrun started {os.environ['WORLD_SIZE']} ranks")
    if args.nproc is not None and args.nproc > 1 and not under_torchrun:
        return launch_torchrun(args.nproc, argv)
    if args.k > args.features:
        parser.error(f"argument --k: k={args.k} exceeds --features={args.features}")
    for name in ("steps", "out"):
        if getattr(args, name) is None:
            parser.error(f"the following arguments are required: --{name}")
    if args.data_dir is not None and not Path(args.data_dir).exists():
        parser.error(f"argument --data-dir: {args.data_dir} does not exist")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {out} exists and is not a directory")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    register_project_configs()
    cache, backbone_seed = None, args.seed
    if args.activations is not None:
        if args.dataset is not None:
            parser.error("argument --activations: the cache fixes the images; leave out --dataset (--limit N uses its first N)")
        try:
            cache = ActivationCache(args.activations, limit=args.limit)
        except CacheError as exc:
            parser.error(f"argument --activations: {exc}")
        args.model, args.pretrained, backbone_seed = _cached_backbone(parser, args, cache)
    elif args.model is None or args.dataset is None:
        parser.error(f"the following arguments are required: {'--model' if args.model is None else '--dataset (or --activations DIR)'}")
    if args.model not in open_clip.list_models():
        parser.error(f"argument --model: unknown open_clip architecture {args.model!r} (e.g. ViT-B-32, ViT-B-16, cltvit-tiny)")
    shards = _check_feature_shards(parser, args) if args.shard_features is not None else 0
    try:
        device = pick_device(args.device)
    except (BackboneError, RuntimeError) as exc:
        parser.error(f"argument --device: {exc}")
    world = World.from_env(device)
    device = world.device(device)
    if shards and not dist.is_initialized():  # one rank: a group of one, so the sharded code runs as is
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not shards and args.data_shards is not None and args.data_shards % world.size:
        parser.error(f"argument --data-shards: {args.data_shards} is not a multiple of the world size {world.size}")
    dataset = None if cache is not None else _open_dataset(parser, args)
    try:
        backbone = load_backbone(args.model, args.pretrained, device=device, seed=backbone_seed)
    except BackboneError as exc:
        parser.error(f"argument --pretrained: {exc}")
    except UnsupportedModel as exc:
        parser.error(f"argument --model: {exc}")
    release_text_tower(backbone)  # training reads only the vision tower
    try:
        clt_cfg = CLTConfig(
            n_layers=backbone.n_layers,
            d_model=backbone.d_model,
            n_features=args.features,
            activation=args.activation,
            k=args.k,
            cross_layer=not args.no_cross_layer,
        )
        warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, args.steps // 10)
        if args.cls_copies and args.tokens != "all":
            parser.error(f"argument --cls-copies: copies of the CLS token need --tokens all, not --tokens {args.tokens}")
        if args.cls_aux_coef and args.tokens != "all":
            parser.error(f"argument --cls-aux-coef: CLS AuxK needs --tokens all, not --tokens {args.tokens}")
        train_cfg = TrainConfig(
            steps=args.steps,
            batch_tokens=args.batch_tokens,
            lr=args.lr,
            warmup_steps=warmup,
            decay=args.decay,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            seed=args.seed,
            tokens=args.tokens,
            buffer_tokens=args.buffer_tokens,
            buffer_dtype=args.buffer_dtype,
            cls_copies=args.cls_copies,
            cls_aux_coef=args.cls_aux_coef,
            cls_aux_k=args.cls_aux_k,
            cls_dead_after=args.cls_dead_after,
            images_per_batch=args.images_per_batch,
            num_workers=args.num_workers,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            dead_after_tokens=args.dead_after_tokens,
            aux_coef=args.aux_coef,
            sparsity_coef=args.sparsity_coef,
            data_shards=args.data_shards or 0,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        _, metrics = train_clt(backbone, dataset, clt_cfg, train_cfg, out, progress=not args.no_progress, world=world,
                               shard_features=shards, activations=cache)
    except TrainingError as exc:
        parser.error(f"argument {'--activations' if cache is not None and not (out / 'checkpoints').is_dir() else '--out'}: {exc}")
    except DatasetError as exc:
        parser.error(f"argument --dataset/--data-dir: {exc}")
    finally:
        world.close()
        if dist.is_initialized():  # the one-rank group of --shard-features
            dist.destroy_process_group()
    if world.is_main:
        summary = {k: metrics[k] for k in ("fvu_mean", "l0_mean", "dead_fraction", "steps", "tokens") if k in metrics}
        print(f"wrote {out / 'clt.safetensors'}; final metrics: {json.dumps(summary)}")
    return 0


def _open_dataset(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Dataset:
    """--dataset/--data-dir/--split/--class-list, restricted to the first --limit images."""
    try:
        dataset = load_dataset(args.dataset, args.split, args.data_dir, args.class_list)
    except DatasetError as exc:
        parser.error(f"argument --dataset/--data-dir: {exc}")
    if args.limit is not None and args.limit < len(dataset):
        full = dataset
        dataset = Subset(full, range(args.limit))
        dataset.description = lambda: {**full.description(), "size": args.limit, "limit": args.limit}  # type: ignore[attr-defined]
    return dataset


def _cached_backbone(parser: argparse.ArgumentParser, args: argparse.Namespace, cache: ActivationCache) -> tuple[str, str | None, int]:
    """(model, pretrained, seed) of the backbone to load for a cache: --model/--pretrained, else what the cache records.

    A cache made from a weights file records only the file's name: then --pretrained must give its path."""
    recorded = cache.backbone
    model = args.model or recorded["model"]
    pretrained = args.pretrained if args.pretrained is not None else recorded.get("pretrained")
    if args.pretrained is None and pretrained and not Path(pretrained).is_file() \
            and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        parser.error(f"argument --pretrained: the cache's backbone weights are the file {pretrained!r} (a name, not a "
                     f"path); pass that file's path with --pretrained")
    return model, pretrained, int(recorded.get("seed") or 0) if pretrained is None else args.seed


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`cltvit-train --plan`: print the memory plan (training.plan) and exit."""
    if args.model is None:
        parser.error("the following arguments are required: --model (the architecture to plan for)")
    try:
        plan = plan_memory(args.model, args.features, args.k, args.batch_tokens, world_size=args.world_size or args.nproc or 1,
                           shard_features=args.shard_features or 0, activation=args.activation, cross_layer=not args.no_cross_layer,
                           aux=args.aux_coef > 0, tokens=args.tokens, cls_copies=args.cls_copies,
                           buffer_tokens=args.buffer_tokens, buffer_dtype=args.buffer_dtype,
                           images_per_batch=args.images_per_batch, stream=args.activations is None,
                           device_memory_gib=args.device_memory)
    except PlanError as exc:
        parser.error(f"argument {'--shard-features' if 'divisible' in str(exc) else '--model'}: {exc}")
    print(render_plan(plan))
    return 0


# ---------------------------------------------------------------------- cltvit-activations
def build_activations_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cltvit-activations", description="Run the ViT once over an image source and write the MLP inputs and "
                "outputs of every layer as float16 shards with a manifest and checksums (cltvit-train --activations DIR "
                "trains from them). Rerunning the same command after an interruption finishes the cache.")
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-32, cltvit-tiny")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file; default: random weights (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of random backbone weights (as cltvit-train --seed)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads for torch")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset kind (as cltvit-train)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--class-list", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=_int_at_least(1), default=None, help="only the first N images")
    p.add_argument("--tokens", choices=("all", "cls", "patches"), default="all",
                   help="token set to store (default all: serves cltvit-train --tokens all, cls and patches)")
    p.add_argument("--num-workers", type=_int_at_least(0), default=0, help="DataLoader workers for image decoding")
    p.add_argument("--batch-images", type=_int_at_least(1), default=64, help="images per ViT forward (default 64)")
    p.add_argument("--shard-mb", type=_positive_float, default=256.0, help="target shard size in MiB (default 256)")
    p.add_argument("--shard-images", type=_int_at_least(1), default=None, help="images per shard (overrides --shard-mb)")
    p.add_argument("--out", required=True, help="cache directory (manifest.json + shard-XXXXX.npy)")
    p.add_argument("--no-progress", action="store_true")
    return p


def activations_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cltvit-activations`; returns 0, or exits with status 2 and one error line."""
    parser = build_activations_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None and not Path(args.data_dir).exists():
        parser.error(f"argument --data-dir: {args.data_dir} does not exist")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"argument --out: {args.out} exists and is not a directory")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    register_project_configs()
    if args.model not in open_clip.list_models():
        parser.error(f"argument --model: unknown open_clip architecture {args.model!r}")
    try:
        device = pick_device(args.device)
    except (BackboneError, RuntimeError) as exc:
        parser.error(f"argument --device: {exc}")
    dataset = _open_dataset(parser, args)
    try:
        backbone = load_backbone(args.model, args.pretrained, device=device, seed=args.seed)
    except BackboneError as exc:
        parser.error(f"argument --pretrained: {exc}")
    except UnsupportedModel as exc:
        parser.error(f"argument --model: {exc}")
    release_text_tower(backbone)
    try:
        manifest = write_cache(backbone, dataset, args.out, tokens=args.tokens, shard_images=args.shard_images,
                               shard_mb=args.shard_mb, batch_images=args.batch_images, num_workers=args.num_workers,
                               progress=not args.no_progress)
    except CacheError as exc:
        parser.error(f"argument --out: {exc}")
    except DatasetError as exc:
        parser.error(f"argument --dataset/--data-dir: {exc}")
    size = sum(s.bytes for s in manifest.shards)
    print(f"wrote {args.out}: {manifest.images} images x {manifest.tokens_per_image} tokens, {len(manifest.shards)} shards, "
          f"{size / 2**30:.2f} GiB float16, {manifest.seconds:.1f} s of ViT and writing")
    return 0


# ---------------------------------------------------------------------- cltvit-eval
def build_eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cltvit-eval", description="Evaluate a CLT on a backbone and a labelled dataset.")
    p.add_argument("--clt", required=True, help="CLT checkpoint directory (clt.json + clt.safetensors)")
    p.add_argument("--model", help="open_clip architecture (default: the one recorded in the checkpoint)")
    p.add_argument("--pretrained", help="open_clip tag or checkpoint file (default: the one recorded in the checkpoint)")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, folder, cifar100, imagenet100")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir")
    p.add_argument("--class-list")
    p.add_argument("--limit", type=int, help="evaluate on the first N images")
    p.add_argument("--fidelity-images", type=int, default=2000)
    p.add_argument("--cproj-images", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=10, help="seeds of the random-layer baselines")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--spatial-images", type=int, default=0,
                   help="also test the spatial maps' faithfulness on the first N images (deletion vs random patches and "
                        "Integrated Gradients; needs the eval extra); 0: skip")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", required=True, help="output directory for report.json / report.md / PNGs")
    return p


def _load_evaluated(args: argparse.Namespace) -> tuple:
    """(backbone, CLT) of `--clt` with the backbone it records (or `--model` / `--pretrained`)."""
    meta = read_meta(args.clt)
    recorded = meta.get("backbone", {})
    model = args.model or recorded.get("model")
    pretrained = args.pretrained if args.pretrained is not None else recorded.get("pretrained")
    if not model:
        raise EvaluationError("--model is needed: the checkpoint records no backbone")
    if args.pretrained is None and pretrained and not Path(pretrained).is_file() \
            and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise EvaluationError(f"argument --pretrained: the checkpoint records its backbone weights as the file "
                              f"{pretrained!r} (a name, not a path); pass that file's path with --pretrained")
    backbone = load_backbone(model, pretrained, device=args.device, seed=recorded.get("seed") or 0)
    clt, _ = load_checkpoint(args.clt, backbone, device=backbone.device)
    return backbone, clt


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cltvit-eval`; returns 0, or 2 with one error line."""
    args = build_eval_parser().parse_args(argv)

    try:
        if args.limit is not None and args.limit < 1:
            raise EvaluationError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.threads < 0:
            raise EvaluationError(f"--threads must be >= 0, got {args.threads}")
        if args.spatial_images < 0:
            raise EvaluationError(f"--spatial-images must be >= 0, got {args.spatial_images}")
        if args.threads:
            torch.set_num_threads(args.threads)
        backbone, clt = _load_evaluated(args)
        dataset = load_dataset(args.dataset, args.split, args.data_dir, args.class_list)
        cfg = EvalConfig(limit=args.limit, batch_size=args.batch_size, fidelity_images=args.fidelity_images,
                         cproj_images=args.cproj_images, random_seeds=args.seeds, spatial_images=args.spatial_images)
        report = evaluate_clt(backbone, clt, dataset, args.out, cfg, extra={"checkpoint": str(args.clt)})
    except (EvaluationError, BackboneError, CheckpointError, DatasetError) as exc:
        print(f"cltvit-eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0



# ---------------------------------------------------------------------- cltvit-eval-spatial
def build_spatial_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cltvit-eval-spatial", description="Faithfulness (deletion test against random patches and "
                "Integrated Gradients) and time per explanation of the spatial maps (docs/spatial.md).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--clt", help="CLT checkpoint directory; the backbone it records (or --model / --pretrained)")
    src.add_argument("--random", metavar="ARCH", help="random-weight open_clip ARCH and a random CLT: times only")
    p.add_argument("--model", help="open_clip architecture (default: the one recorded in the checkpoint)")
    p.add_argument("--pretrained", help="open_clip tag or weights file (default: the one recorded in the checkpoint)")
    p.add_argument("--n-features", type=_int_at_least(1), default=6144, help="features of the random CLT (--random)")
    p.add_argument("--k", type=_int_at_least(1), default=32, help="k of the random CLT (--random)")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, folder, cifar100, imagenet100")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir")
    p.add_argument("--class-list")
    p.add_argument("--images", type=_int_at_least(1), default=None, help="deletion test on the first N images (default all)")
    p.add_argument("--no-deletion", action="store_true", help="times only (no deletion test)")
    p.add_argument("--gap-analysis", action="store_true", help="also delete by four one-pass alternatives (the maps with the "
                   "CLT paths split over the patches, gradient x input, the fully linearised model's exact split, the maps "
                   "less the fill image's), to see where the maps fall behind IG (docs/spatial.md)")
    p.add_argument("--methods", nargs="+", choices=spatial_eval.METHODS + spatial_eval.EXTRA_METHODS,
                   default=list(spatial_eval.METHODS), help="deletion-test methods (default: %(default)s; delete_one: the "
                   "single-patch deletion total effect, measured against the served keep_one map)")
    p.add_argument("--mode", choices=("cls", "all", "observe"), default="cls", help="the model explained (as served)")
    p.add_argument("--ig-steps", type=_int_at_least(1), default=50)
    p.add_argument("--random-seeds", type=_int_at_least(1), default=3, help="seeds of the random-patch baseline")
    p.add_argument("--time-images", type=_int_at_least(1), default=50, help="images timed per method")
    p.add_argument("--time-images-ig", type=_int_at_least(1), default=20, help="images timed for Integrated Gradients")
    p.add_argument("--onnx", default=None, help="a fused graph (a bundle's model.onnx) to time in ONNX Runtime too")
    p.add_argument("--batch-size", type=_int_at_least(1), default=250)
    p.add_argument("--threads", type=_int_at_least(1), default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device")
    p.add_argument("--out", required=True, help="output directory for spatial.json / spatial.md / spatial_deletion.png")
    return p


def spatial_eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cltvit-eval-spatial`; returns 0, or 2 with one error line."""
    args = build_spatial_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = spatial_eval.SpatialEvalConfig(images=args.images, analysis=args.gap_analysis, methods=tuple(dict.fromkeys(args.methods)),
                                         batch_size=args.batch_size, random_seeds=args.random_seeds,
                                         ig_steps=args.ig_steps, mode=args.mode, time_images=args.time_images,
                                         time_images_ig=args.time_images_ig)
    try:
        if args.onnx is not None and not Path(args.onnx).is_file():
            raise EvaluationError(f"argument --onnx: {args.onnx} is not a file")
        if args.random:
            backbone = load_backbone(args.random, None, device=args.device, seed=0)
            clt = random_clt(backbone.n_layers, backbone.d_model, n_features=args.n_features, k=args.k, seed=0)
            n = max(cfg.time_images, cfg.time_images_ig)
            H, W = backbone.image_size
            pixels, labels = torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(0)), None
            g = torch.Generator().manual_seed(1)
            text = torch.nn.functional.normalize(torch.randn(10, backbone.embed_dim, generator=g), dim=-1)
        else:
            backbone, clt = _load_evaluated(args)
            dataset = load_dataset(args.dataset, args.split, args.data_dir, args.class_list)
            timed = max(cfg.time_images, cfg.time_images_ig)
            pixels, labels = dataset_tensors(backbone, dataset, timed if args.no_deletion else args.images)
            labels = None if args.no_deletion else labels
            text = backbone.class_embeddings(dataset.class_names, dataset.templates)
        section = spatial_eval.evaluate_spatial(backbone, clt, pixels, labels, text, cfg, onnx_model=args.onnx)
    except (EvaluationError, BackboneError, CheckpointError, DatasetError, UnsupportedModel) as exc:
        print(f"cltvit-eval-spatial: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    section["machine"] = machine_info(threads=args.threads)
    section["command"] = "cltvit-eval-spatial " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "spatial.json").write_text(json.dumps(section, indent=1))
    md = spatial_eval.render_markdown(section)
    mach = section["machine"]
    md += f"\nMachine: {mach['cpu']} ({', '.join(mach['isa'])}), {args.threads} thread(s). Command: `{section['command']}`\n"
    (out / "spatial.md").write_text(md)
    if "deletion" in section:
        plot_spatial_deletion(section, out / "spatial_deletion.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
