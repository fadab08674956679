"""The reference build (`cltvit-reference build --out DIR`): the project's own CLIP, its CLT, the evaluation, the bundle.

No network is needed: the CLIP (`cltvit-ref`, training/model/model_configs/cltvit-ref.json: 8 blocks,
width 64, patch 7 on 28x28 -> 17 tokens) is trained contrastively on the 60,000 Fashion-MNIST
training images (`training.clip`), then a CLT is trained on its MLPs (`training.trainer.train_clt`),
optionally fine-tuned through the replacement (`training.finetune`), compared with per-layer
transcoders (`training.evaluation.comparison`), evaluated (`training.evaluation.report`) on the
10,000 test images, and exported as the serving bundle (`export.writer.export_bundle`).

Stages and their outputs under DIR (seeds fixed; each stage's record in DIR/stages/<stage>.json
holds its input key, outputs with sha256 and timings; a stage whose key and output checksums still
match is skipped on the next call):

- `clip`: clip/model.pt (open_clip state dict; load with `load_backbone("cltvit-ref", "DIR/clip/model.pt")`), clip/clip.json
- `clt`: clt/clt.safetensors + clt/clt.json (final CLT), clt/train/ (trainer run)
- `seeds` (only with `clt_seeds` > 1): seeds/seed<s>/ (the CLT retrained with seed s = 1, 2, ...),
  seeds/seeds.json + seeds/seeds.md (fidelity of every seed, seed 0 being clt/, with mean and worst);
  with `seeds_from_cache` (the default) the seeds train from activations/ (`training.cache`: the CLIP's
  MLP inputs/outputs over the training images, float16, written once) instead of re-running the CLIP
- `comparison`: comparison/comparison.json, comparison/r2_vs_l0.png (CLT vs PLT, k = 4, 8, 16, 32)
- `eval`: eval/report.json, eval/report.md, eval/*.png, eval/c_proj.json
- `export`: bundle/ (docs/bundle.md)
- `atlas`: atlas/ (the feature atlas over the training images, docs/atlas.md), attached to bundle/
DIR/build.json summarises the build and the issue's targets.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from bundle import read_manifest
from bundle.atomic import replaced, write_text_atomic
from export.atlas import AtlasConfig, TensorSource, attach_atlas, build_atlas
from export.gate import DEFAULT_GATE_IMAGES, GateImages, gate_indices
from export.writer import export_bundle
from training.clip import ClipTrainConfig, preprocess_stats, tensorise, train_reference_clip, zero_shot_accuracy
from training.data import FashionMNIST
from training.evaluation.comparison import compare_clt_plt
from training.evaluation.metrics import measure_transcoder
from training.evaluation.report import EvalConfig, evaluate_clt
from training.finetune import FinetuneConfig, finetune_clt
from training.model.backbone import PROJECT_CONFIG_DIR, Backbone, load_backbone
from training.model.checkpoint import load_checkpoint, save_checkpoint
from training.model.clt import CLTConfig
from training.cache import ActivationCache, CacheError, write_cache
from training.trainer import TrainConfig, train_clt

from .cache import Stage, refresh_files

REF_MODEL = "cltvit-ref"
REF_MODELS = (REF_MODEL, "cltvit-ref7")  # the 4x4-grid reference and the same CLIP with a 7x7 grid
STAGES = ("clip", "clt", "seeds", "comparison", "eval", "export", "atlas")
BUDGETS = ("full", "smoke")


class BuildError(RuntimeError):
    """The build cannot proceed (bad option, missing data, a stage failed)."""


class TensorImages(Dataset):
    """Pre-tensorised images: item i = (pixels[i] [3, H, W] float32, label)."""

    name = "fashion-mnist"

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, description: dict[str, Any]) -> None:
        self.pixels, self.labels, self._desc = pixels, labels, description

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.pixels[i], int(self.labels[i])

    def description(self) -> dict[str, Any]:
        return dict(self._desc)


@dataclass
class BuildConfig:
    """Everything that fixes the build's results (a stage's key hashes the parts it depends on)."""

    # the CLIP architecture: cltvit-ref (28x28 images in 7x7-pixel patches, a 4x4 grid) or cltvit-ref7 (the same
    # with 4x4-pixel patches, a 7x7 grid: finer spatial maps at about twice the build time, docs/spatial.md)
    model: str = REF_MODEL
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    zero_shot_limit: int | None = None  # test images for the CLIP's zero-shot accuracy (None: all 10,000)
    # 256 features per layer, TopK 15, lr 6e-3, 2 extra CLS copies per image, CLS AuxK 1/96 in training and
    # fine-tuning: the recipe of docs/fidelity.md whose worst of 3 seeds meets every fidelity target
    n_features: int = 256
    k: int = 15
    activation: str = "topk"
    clt_train: dict[str, Any] = field(default_factory=lambda: dict(
        steps=2250, batch_tokens=1024, lr=6e-3, warmup_steps=150, buffer_tokens=16384, images_per_batch=64,
        norm_tokens=8192, checkpoint_every=500, log_every=50, dead_after_tokens=1_000_000, eval_batches=4, cls_copies=2,
        cls_aux_coef=1 / 96))
    clt_train_limit: int | None = None  # training images streamed to the CLT (None: all 60,000)
    clt_seeds: int = 1  # > 1: the `seeds` stage retrains the CLT with seeds 1..clt_seeds-1 and reports mean and worst
    # the seeds train from an activation cache (DIR/activations, float16, written once) instead of re-running the CLIP
    # per seed; the `clt` stage (seed 0, the shipped weights) keeps streaming float32 activations
    seeds_from_cache: bool = True
    finetune: FinetuneConfig | None = field(default_factory=lambda: FinetuneConfig(steps=200, batch_images=64, lr=5e-4, loss="kl",
                                                                                    cls_aux_coef=1 / 96))
    finetune_check_images: int = 2000  # test images to measure the fine-tuning's effect on
    comparison_ks: tuple[int, ...] = (4, 8, 16, 32)
    comparison_features: int = 512
    comparison_train: dict[str, Any] = field(default_factory=lambda: dict(
        steps=300, batch_tokens=1024, lr=1e-3, warmup_steps=30, buffer_tokens=16384, images_per_batch=64,
        norm_tokens=8192, checkpoint_every=10_000, log_every=50, dead_after_tokens=1_000_000, eval_batches=2))
    comparison_images: int = 2000
    eval: EvalConfig = field(default_factory=EvalConfig)
    export_variants: tuple[str, ...] = ("int8", "int8-dec")  # int8-dec: 99.55% top-1 agreement with fp32 (docs/export.md)
    gate_images: int | None = DEFAULT_GATE_IMAGES  # held-out test images the variants' accuracy gate is measured on (None: all)
    atlas: AtlasConfig = field(default_factory=AtlasConfig)
    atlas_limit: int | None = None  # training images the atlas is measured on (None: all 60,000)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def budget(name: str) -> BuildConfig:
    """`full`: the reference build, sized for the issue's 20-minute budget on one CPU thread (the
    README records what was measured). `smoke`: every stage on a few hundred images with a handful
    of steps (CI; results meaningless)."""
    if name == "full":
        return BuildConfig()
    if name == "smoke":
        small = dict(batch_tokens=256, lr=1e-3, warmup_steps=2, buffer_tokens=1024, images_per_batch=16,
                     norm_tokens=512, checkpoint_every=10_000, log_every=5, eval_batches=1)
        return BuildConfig(
            clip=ClipTrainConfig(steps=8, batch_size=64, warmup_steps=2, train_limit=1024),
            zero_shot_limit=200,
            n_features=64, k=4,
            clt_train=dict(small, steps=6, cls_copies=4, cls_aux_coef=1 / 96, cls_dead_after=16),
            clt_train_limit=512,
            clt_seeds=2,
            finetune=FinetuneConfig(steps=2, batch_images=8, lr=1e-4, loss="kl", cls_aux_coef=1 / 96, cls_dead_after=8),
            finetune_check_images=32,
            comparison_ks=(2, 4), comparison_features=32, comparison_train=dict(small, steps=3), comparison_images=32,
            eval=EvalConfig(limit=48, batch_size=48, fidelity_images=16, cproj_images=16, random_seeds=2),
            export_variants=(),
            gate_images=64,
            atlas=AtlasConfig(top_n=4, batch_size=64, max_examples=10, examples_per_class=1),
            atlas_limit=256,
        )
    raise BuildError(f"budget must be one of {BUDGETS}, got {name!r}")


# ---------------------------------------------------------------------- data
def load_fashion_tensors(backbone: Backbone, split: str, data_dir: str | None, limit: int | None = None
                         ) -> tuple[FashionMNIST, torch.Tensor, torch.Tensor]:
    """(dataset, pixels [N, 3, 28, 28], labels [N]) of a Fashion-MNIST split, normalised in one go."""
    ds = FashionMNIST(split, data_dir, limit=limit)
    mean, std = preprocess_stats(backbone.preprocess)
    return ds, tensorise(ds.images, mean, std), torch.as_tensor(ds.labels, dtype=torch.long)


# ---------------------------------------------------------------------- stages
def stage_clip(out: Path, cfg: BuildConfig, data_dir: str | None, device: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    model_cfg = json.loads((PROJECT_CONFIG_DIR / f"{cfg.model}.json").read_text())
    st = Stage(out, "clip", {"model": model_cfg, "clip": asdict(cfg.clip), "zero_shot_limit": cfg.zero_shot_limit})
    rec = st.cached()
    if rec:
        log(f"clip: cached (zero-shot top-1 {100 * rec['zero_shot_top1']:.2f}%)")
        return rec
    t0 = time.time()
    bb = load_backbone(cfg.model, None, device=device, seed=cfg.clip.seed)
    train = FashionMNIST("train", data_dir)
    stats = train_reference_clip(bb, train.images, train.labels, train.class_names, train.templates, cfg.clip, log=log)
    d = out / "clip"
    d.mkdir(parents=True, exist_ok=True)
    with replaced(d / "model.pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in bb.model.state_dict().items()}, tmp)
    test, px, y = load_fashion_tensors(bb, "test", data_dir, cfg.zero_shot_limit)
    acc = zero_shot_accuracy(bb, px, y, test.class_names, test.templates)
    log(f"clip: zero-shot top-1 on {len(y)} test images {100 * acc:.2f}%")
    info = {"model": cfg.model, "config": model_cfg, "train": cfg.clip.to_dict(), "train_stats": stats,
            "zero_shot_top1": acc, "test_images": len(y), "templates": list(test.templates),
            "weights_sha256_16": load_backbone(cfg.model, str((d / "model.pt").resolve()), device="cpu").fingerprint}
    (d / "clip.json").write_text(json.dumps(info, indent=1))
    return st.finish([d / "model.pt", d / "clip.json"], time.time() - t0, **info)


def _train_cfg(kw: dict[str, Any], seed: int) -> TrainConfig:
    return TrainConfig(**{**kw, "seed": seed, "tokens": "all"})


def _clt_config(cfg: BuildConfig, bb: Backbone) -> CLTConfig:
    return CLTConfig(n_layers=bb.n_layers, d_model=bb.d_model, n_features=cfg.n_features, activation=cfg.activation, k=cfg.k)  # type: ignore[arg-type]


def _clt_key(cfg: BuildConfig, bb: Backbone, seed: int) -> dict[str, Any]:
    """The settings one CLT of the build is trained, fine-tuned and checked with (part of stage keys)."""
    ft = cfg.finetune
    return {"clt": _clt_config(cfg, bb).to_dict(), "train": _train_cfg(cfg.clt_train, seed).to_dict(),
            "limit": cfg.clt_train_limit, "finetune": ft.to_dict() if ft else None, "check": cfg.finetune_check_images}


def _recipe(cfg: BuildConfig, bb: Backbone, train_ds: TensorImages, seed: int, cached: bool = False) -> dict[str, Any]:
    """What fixes one CLT run of the build (as JSON would give it back); `cached`: trained from the activation cache."""
    source = {"activations": "float16 cache"} if cached else {}
    return json.loads(json.dumps({**_clt_key(cfg, bb, seed), "data": train_ds.description(), **source}, default=str))


def activation_cache(out: Path, bb: Backbone, train_ds: TensorImages, log: Callable[[str], None]) -> ActivationCache:
    """The activation cache of the build's CLIP over its training images in out/activations (all tokens, float16):
    written on first use, finished if a kill interrupted it, rewritten if it holds another CLIP's or image set's."""
    d = out / "activations"
    t0 = time.time()
    try:
        manifest = write_cache(bb, train_ds, d, tokens="all", batch_images=256, progress=False, log=log)
    except CacheError as exc:
        log(f"activations: {exc}; rewriting it")
        shutil.rmtree(d)
        manifest = write_cache(bb, train_ds, d, tokens="all", batch_images=256, progress=False, log=log)
    cache = ActivationCache(d)
    log(f"activations: {manifest.images} images in {d} ({sum(s.bytes for s in manifest.shards) / 2**30:.2f} GiB), "
        f"ready in {time.time() - t0:.0f}s")
    return cache


def _same_recipe(d: Path, recipe: dict[str, Any]) -> bool:
    marker = d / "recipe.json"
    return marker.is_file() and json.loads(marker.read_text()) == recipe


def train_reference_clt(d: Path, cfg: BuildConfig, bb: Backbone, train_ds: TensorImages,
                        check: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seed: int, log: Callable[[str], None],
                        activations: ActivationCache | None = None) -> dict[str, Any]:
    """Train (d/train/), fine-tune and save (d/clt.safetensors, d/clt.json) one CLT of the build's recipe with `seed`.
    Returns what the stage records: train metrics, configs, the fine-tuning's before/after on `check`.
    With `activations` (the cache of `bb` over `train_ds`) the CLT trains from it instead of running the CLIP."""
    clt_cfg, train_cfg, ft = _clt_config(cfg, bb), _train_cfg(cfg.clt_train, seed), cfg.finetune
    marker, recipe = d / "recipe.json", _recipe(cfg, bb, train_ds, seed, cached=activations is not None)
    if d.exists() and not _same_recipe(d, recipe):
        shutil.rmtree(d)  # a run of another recipe (or of unknown recipe): resuming it would mix the two
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(recipe, indent=1))
    t0 = time.time()
    clt, metrics = train_clt(bb, train_ds, clt_cfg, train_cfg, d / "train", progress=False, activations=activations)
    log(f"clt (seed {seed}): trained, fvu_mean {metrics.get('fvu_mean', float('nan')):.4f} l0_mean {metrics.get('l0_mean', float('nan')):.2f} "
        f"({time.time() - t0:.0f}s)")
    info: dict[str, Any] = {"train_metrics": metrics, "clt_config": clt_cfg.to_dict(), "train_config": train_cfg.to_dict()}
    if ft is not None and ft.steps > 0:
        px, y, text = check
        before = measure_transcoder(bb, clt, px, y, text, min(500, len(px)))
        ft_stats = finetune_clt(bb.visual, clt, train_ds.pixels, replace(ft, seed=seed), text_embeddings=text,
                                logit_scale=bb.logit_scale, log=log)
        after = measure_transcoder(bb, clt, px, y, text, min(500, len(px)))
        info["finetune"] = {**ft_stats, "before": before, "after": after, "check_images": len(px)}
        log(f"clt (seed {seed}): fine-tuned ({ft.loss}); all-token replacement top-1 {100 * before['accuracy_all']:.2f}% -> "
            f"{100 * after['accuracy_all']:.2f}%, R^2 {before['r2']:.4f} -> {after['r2']:.4f}")
    save_checkpoint(d, clt, bb.identity(), data=activations.description() if activations else train_ds.description(),
                    train_config=train_cfg.to_dict(),
                    metrics=metrics, finetune=info.get("finetune"))
    return info


def stage_clt(out: Path, cfg: BuildConfig, bb: Backbone, train_ds: TensorImages, check: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              clip_rec: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    st = Stage(out, "clt", {"clip": clip_rec["files"], **_clt_key(cfg, bb, cfg.seed)})
    rec = st.cached()
    if rec:
        log("clt: cached")
        return rec
    t0 = time.time()
    d = out / "clt"
    info = train_reference_clt(d, cfg, bb, train_ds, check, cfg.seed, log)
    return st.finish([d / "clt.safetensors", d / "clt.json"], time.time() - t0, **info)


# the fidelity targets every CLT seed must meet (issue 14); values: (metric, "max" | "min", bound)
SEED_TARGETS: dict[str, tuple[str, str, float]] = {
    "drop_cls_pt": ("drop_cls_pt", "max", 0.2),
    "drop_all_pt": ("drop_all_pt", "max", 0.5),
    "r2_cls": ("r2_cls", "min", 0.97),
    "r2_all": ("r2_all", "min", 0.98),
    "dead_cls": ("dead_cls", "max", 0.3),
}
SEED_METRICS = ("drop_cls_pt", "drop_all_pt", "r2_cls", "r2_all", "dead_cls", "l0")
_WORSE_IS_HIGHER = {"drop_cls_pt": True, "drop_all_pt": True, "r2_cls": False, "r2_all": False, "dead_cls": True, "l0": True}


def seed_row(seed: int, m: dict[str, Any]) -> dict[str, Any]:
    """One seed's fidelity from `measure_transcoder`'s numbers: drops in percentage points (unmodified
    minus replaced top-1, positive = the replacement loses accuracy), R^2, dead fraction at the CLS token, L0."""
    return {"seed": seed, "drop_cls_pt": 100 * (m["accuracy_unmodified"] - m["accuracy_cls"]),
            "drop_all_pt": 100 * (m["accuracy_unmodified"] - m["accuracy_all"]), "r2_cls": m["r2_cls"], "r2_all": m["r2"],
            "dead_cls": m["dead_fraction_cls"], "l0": m["l0"], "accuracy_unmodified": m["accuracy_unmodified"]}


def summarise_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and worst (the larger drop, dead fraction and L0; the smaller R^2) over the seeds' rows, and
    each target of SEED_TARGETS judged on the worst seed."""
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in SEED_METRICS}
    worst = {k: (max if _WORSE_IS_HIGHER[k] else min)(r[k] for r in rows) for k in SEED_METRICS}
    targets = {name: {"worst": worst[key], "target": f"{'<=' if kind == 'max' else '>='} {bound}",
                      "met": worst[key] <= bound if kind == "max" else worst[key] >= bound}
               for name, (key, kind, bound) in SEED_TARGETS.items()}
    return {"seeds": rows, "mean": mean, "worst": worst, "targets": targets}


def render_seeds(summary: dict[str, Any], images: int, fidelity_images: int) -> str:
    head = ["seed", "CLS-only drop (pt)", "all-token drop (pt)", "R^2 CLS", "R^2 all", "dead at CLS", "L0"]
    fmt = {"drop_cls_pt": "{:+.2f}", "drop_all_pt": "{:+.2f}", "r2_cls": "{:.4f}", "r2_all": "{:.4f}", "dead_cls": "{:.3f}", "l0": "{:.2f}"}

    def line(label: str, r: dict[str, Any]) -> str:
        return "| " + " | ".join([label, *(fmt[k].format(r[k]) for k in SEED_METRICS)]) + " |"

    lines = [f"# CLT seeds: fidelity of the reference recipe over {len(summary['seeds'])} seeds", "",
             f"Drops: zero-shot top-1 on {images} test images, unmodified minus with every layer's MLP replaced by the CLT "
             f"(at the CLS token / at all tokens), in points. R^2 and dead fraction on the first {fidelity_images}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [line(str(r["seed"]), r) for r in summary["seeds"]]
    lines += [line("mean", summary["mean"]), line("worst", summary["worst"]), "", "Targets (worst seed):", ""]
    lines += [f"- {k}: {v['worst']:.4g} (target {v['target']}): {'met' if v['met'] else 'NOT met'}" for k, v in summary["targets"].items()]
    return "\n".join(lines) + "\n"


def stage_seeds(out: Path, cfg: BuildConfig, bb: Backbone, train_ds: TensorImages, test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                clt_rec: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The CLT recipe retrained with seeds 1 .. clt_seeds-1 (seed 0 is the `clt` stage's), every seed measured
    on the same test images: seeds/seeds.json, seeds/seeds.md."""
    cached = {"activations": "float16 cache"} if cfg.seeds_from_cache else {}
    st = Stage(out, "seeds", {"clt_files": clt_rec["files"], "n": cfg.clt_seeds, **_clt_key(cfg, bb, cfg.seed), "eval": cfg.eval.to_dict(),
                              **cached})
    rec = st.cached()
    if rec:
        log("seeds: cached")
        return rec
    t0 = time.time()
    d = out / "seeds"
    px, y, text = test
    n = len(px) if cfg.eval.limit is None else min(cfg.eval.limit, len(px))
    n_check = min(cfg.finetune_check_images, len(y))
    rows = []
    cache: ActivationCache | None = None
    for s in range(cfg.clt_seeds):
        run = out / "clt" if s == 0 else d / f"seed{s}"
        if s and not ((run / "clt.safetensors").is_file() and _same_recipe(run, _recipe(cfg, bb, train_ds, s, cfg.seeds_from_cache))):
            if cfg.seeds_from_cache and cache is None:
                cache = activation_cache(out, bb, train_ds, log)
            train_reference_clt(run, cfg, bb, train_ds, (px[:n_check], y[:n_check], text), s, log, activations=cache)
        clt, _ = load_checkpoint(run, bb)
        rows.append(seed_row(s, measure_transcoder(bb, clt, px[:n], y[:n], text, cfg.eval.fidelity_images)))
        log(f"seeds: seed {s}: " + ", ".join(f"{k} {rows[-1][k]:.4g}" for k in SEED_METRICS))
    summary = summarise_seeds(rows)
    d.mkdir(parents=True, exist_ok=True)
    (d / "seeds.json").write_text(json.dumps({**summary, "images": n, "fidelity_images": cfg.eval.fidelity_images}, indent=1))
    (d / "seeds.md").write_text(render_seeds(summary, n, cfg.eval.fidelity_images))
    return st.finish([d / "seeds.json", d / "seeds.md"], time.time() - t0, mean=summary["mean"], worst=summary["worst"],
                     targets=summary["targets"])


def stage_comparison(out: Path, cfg: BuildConfig, bb: Backbone, train_ds: TensorImages, test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     clip_rec: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    train_cfg = _train_cfg(cfg.comparison_train, cfg.seed)
    st = Stage(out, "comparison", {"clip": clip_rec["files"], "ks": list(cfg.comparison_ks), "F": cfg.comparison_features,
                                   "train": train_cfg.to_dict(), "limit": cfg.clt_train_limit, "images": cfg.comparison_images})
    rec = st.cached()
    if rec:
        log("comparison: cached")
        return rec
    t0 = time.time()
    d = out / "comparison"

    def train_one(cross: bool, k: int, run_dir: Path) -> torch.nn.Module:
        c = CLTConfig(n_layers=bb.n_layers, d_model=bb.d_model, n_features=cfg.comparison_features, k=k, cross_layer=cross)
        clt, _ = train_clt(bb, train_ds, c, train_cfg, run_dir, progress=False)
        return clt

    px, y, text = test
    n = min(cfg.comparison_images, len(px))
    res = compare_clt_plt(bb, px[:n], y[:n], text, d, train_one, cfg.comparison_ks, min(1000, n), log=log)
    return st.finish([d / "comparison.json", d / "r2_vs_l0.png"], time.time() - t0, verdict=res["verdict"])


def stage_eval(out: Path, cfg: BuildConfig, bb: Backbone, test_ds: FashionMNIST, test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               clt_rec: dict[str, Any], cmp_rec: dict[str, Any] | None, log: Callable[[str], None]) -> dict[str, Any]:
    st = Stage(out, "eval", {"clt": clt_rec["files"], "cmp": cmp_rec["files"] if cmp_rec else None, "eval": cfg.eval.to_dict()})
    rec = st.cached()
    if rec:
        log("eval: cached")
        return rec
    t0 = time.time()
    d = out / "eval"
    clt, meta = load_checkpoint(out / "clt", bb)
    px, y, _ = test
    n = len(px) if cfg.eval.limit is None else min(cfg.eval.limit, len(px))
    extra: dict[str, Any] = {"checkpoint": "clt", "finetune": meta.get("finetune")}
    if cmp_rec:
        extra["comparison"] = json.loads((out / "comparison" / "comparison.json").read_text())
    report = evaluate_clt(bb, clt, test_ds, d, cfg.eval, pixels_labels=(px[:n], y[:n]), extra=extra, log=log)
    files = [d / f for f in ("report.json", "report.md", "c_proj.json", "c_proj.png", "deletion.png", "replacement.png", "fidelity.png")]
    return st.finish(files, time.time() - t0, summary=report["summary"])


def dataset_fill(test_px: torch.Tensor) -> tuple[list[float], str]:
    """The bundle's patch fill (docs/bundle.md, `patches`): the per-channel mean of the preprocessed test images
    [N, 3, H, W], the fill of the deletion test (training/evaluation/spatial.py) on all of them, and its description."""
    fill = test_px.double().mean(dim=(0, 2, 3)).tolist()
    return fill, f"dataset mean: the {len(test_px)} Fashion-MNIST test images, per channel, preprocessed (the deletion test's fill)"


def fashion_gate_images(test_px: torch.Tensor, test_y: torch.Tensor, n: int | None) -> GateImages:
    """The accuracy gate's held-out images (export/gate.py): `n` of the preprocessed Fashion-MNIST test images
    [N, 3, H, W] (`gate_indices`; None or >= N: all), with their labels (the bundle's labels are the dataset's
    classes, in order). Neither the CLIP nor the CLT saw the test split in training."""
    idx = gate_indices(len(test_px), n)
    what = "all" if len(idx) == len(test_px) else f"{len(idx)} drawn with numpy default_rng(0) from the"
    return GateImages(test_px[torch.as_tensor(idx)].numpy().astype("float32"), test_y[torch.as_tensor(idx)].numpy().astype("int64"),
                      f"Fashion-MNIST test split: {what} {len(test_px)} images (held out: the CLIP and the CLT trained on the training split)")


def stage_export(out: Path, cfg: BuildConfig, bb: Backbone, clt_rec: dict[str, Any], log: Callable[[str], None],
                 fill: tuple[list[float], str] | None = None, gate: GateImages | None = None) -> dict[str, Any]:
    st = Stage(out, "export", {"clt": clt_rec["files"], "variants": list(cfg.export_variants), "fill": fill,
                               "gate_images": cfg.gate_images})
    rec = st.cached()
    if rec and (out / "bundle" / "bundle.json").is_file():
        log("export: cached")
        return rec
    t0 = time.time()
    clt, meta = load_checkpoint(out / "clt", bb)
    test = FashionMNIST.class_names, FashionMNIST.templates
    path = export_bundle(bb, clt, "cls", list(test[0]), list(test[1]), out / "bundle", variants=cfg.export_variants,
                         checkpoint="clt", clt_sha256=meta.get("sha256"), overwrite=True,
                         fill=fill[0] if fill else None, fill_source=fill[1] if fill else None, gate_images=gate)
    files = sorted(p for p in path.iterdir() if p.is_file())
    log(f"export: bundle in {path}" + gate_summary(path))
    return st.finish(files, time.time() - t0)


def gate_summary(bundle_dir: Path) -> str:
    """'; gate: int8 top-1 agreement 99.60%, ...' for a log line (empty without a gate block)."""
    gate = read_manifest(bundle_dir).gate
    if gate is None:
        return ""
    return "; gate: " + "; ".join(f"{v} {g.summary()}" for v, g in gate.variants.items() if v != "fp32")


def stage_atlas(out: Path, cfg: BuildConfig, bb: Backbone, train_ds: TensorImages, clt_rec: dict[str, Any], log: Callable[[str], None],
                vocab_file: str | None = None) -> dict[str, Any]:
    """The feature atlas of the CLT over the training images (atlas/), attached to the bundle of the export stage."""
    st = Stage(out, "atlas", {"clt": clt_rec["files"], "atlas": cfg.atlas.to_dict(), "limit": cfg.atlas_limit, "vocab": vocab_file})
    rec = st.cached()
    if rec is None:
        t0 = time.time()
        clt, meta = load_checkpoint(out / "clt", bb)
        source = TensorSource(train_ds.pixels, train_ds.labels.numpy(), FashionMNIST.class_names, train_ds.description())
        index = build_atlas(bb, clt, out / "bundle", source, clt_sha256=meta.get("sha256"), cfg=cfg.atlas, limit=cfg.atlas_limit,
                            vocab_file=vocab_file, work_dir=out / "atlas-work", out_dir=out, progress=False, log=log,
                            command=f"cltvit-reference build --out {out.name}")
        rec = st.finish(sorted((out / "atlas").iterdir()), time.time() - t0, images=index["images"], build=index["build"])
        log(f"atlas: {index['images']} images in {time.time() - t0:.0f}s, attached to {out / 'bundle'}")
    else:
        log("atlas: cached")
    attach_atlas(out / "bundle", out / "atlas")  # the export stage may have rewritten the bundle: attach every time (a copy)
    return rec


# ---------------------------------------------------------------------- build
TARGETS = {
    "zero_shot_top1": ">= 0.85",
    "r2_mean": ">= 0.97 at l0_mean <= 16",
    "cosine_mean": ">= 0.98",
    "drop_cls": "|unmodified - replaced| <= 0.002 (0.2 points)",
    "drop_all_tokens": "|unmodified - replaced| <= 0.005 (0.5 points)",
    "faithfulness_cost_ratio": ">= 3",
}


def check_targets(clip_rec: dict[str, Any], summary: dict[str, Any] | None, cmp_rec: dict[str, Any] | None) -> dict[str, Any]:
    """Measured value and met/not met for each of issue 3's targets."""
    out: dict[str, Any] = {"zero_shot_top1": {"value": clip_rec["zero_shot_top1"], "met": clip_rec["zero_shot_top1"] >= 0.85}}
    if summary:
        s = summary
        out["r2_mean"] = {"value": s["r2_mean"], "l0_mean": s["l0_mean"], "met": s["r2_mean"] >= 0.97 and s["l0_mean"] <= 16}
        out["cosine_mean"] = {"value": s["cosine_mean"], "met": s["cosine_mean"] >= 0.98 and s["l0_mean"] <= 16}
        out["drop_cls"] = {"value": s["drop_cls"], "met": abs(s["drop_cls"]) <= 0.002}
        out["drop_all_tokens"] = {"value": s["drop_all_tokens"], "met": abs(s["drop_all_tokens"]) <= 0.005}
        out["faithfulness_cost_ratio"] = {"value": s["faithfulness_cost_ratio"], "met": s["faithfulness_cost_ratio"] >= 3}
    if cmp_rec:
        v = cmp_rec["verdict"]
        out["clt_beats_plt"] = {"r2_every_k": v["clt_better_r2_everywhere"], "accuracy_all_every_k": v["clt_better_accuracy_everywhere"],
                                "met": bool(v["clt_better_r2_everywhere"] and v["clt_better_accuracy_everywhere"])}
    return {k: {**v, "target": TARGETS.get(k, "CLT > PLT on R^2 and all-token accuracy at every k")} for k, v in out.items()}


def _stage_inputs(out: Path, cfg: BuildConfig, data_dir: str | None, device: str | None, clip_rec: dict[str, Any]
                  ) -> tuple[Backbone, TensorImages, FashionMNIST, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the stages after `clip` read: (backbone, train set, test set, test pixels, test labels, class text embeddings)."""
    bb = load_backbone(cfg.model, str(out / "clip" / "model.pt"), device=device)
    if bb.fingerprint != clip_rec["weights_sha256_16"]:
        raise BuildError(f"{out / 'clip' / 'model.pt'} does not load to the recorded weights; rerun with --force clip")
    train, train_px, train_y = load_fashion_tensors(bb, "train", data_dir, cfg.clt_train_limit)
    train_ds = TensorImages(train_px, train_y, {**train.description(), "tensorised": True})
    test_ds, test_px, test_y = load_fashion_tensors(bb, "test", data_dir)
    text = bb.class_embeddings(test_ds.class_names, test_ds.templates)
    return bb, train_ds, test_ds, test_px, test_y, text


def _comparison_worker(out: str, cfg: BuildConfig, data_dir: str | None, device: str | None, threads: int,
                       clip_rec: dict[str, Any]) -> None:
    """Child process of `build`: the CLT-vs-PLT comparison stage on the other core (writes its stage record)."""
    torch.set_num_threads(max(threads, 1))
    bb, train_ds, _, test_px, test_y, text = _stage_inputs(Path(out), cfg, data_dir, device, clip_rec)
    stage_comparison(Path(out), cfg, bb, train_ds, (test_px, test_y, text), clip_rec, lambda m: print(m, flush=True))


def build(out_dir: str | Path, cfg: BuildConfig | None = None, *, data_dir: str | None = None, device: str | None = None,
          skip: Sequence[str] = (), force: Sequence[str] = (), log: Callable[[str], None] = print,
          jobs: int = 1) -> dict[str, Any]:
    """Run (or reuse) every stage not in `skip`; stages in `force` are redone. Returns build.json's content.

    `jobs` > 1 runs the comparison stage in a second process beside the CLT stage (both need only the CLIP).
    """
    cfg = cfg or budget("full")
    for s in (*skip, *force):
        if s not in STAGES:
            raise BuildError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    if "clip" in skip or "clt" in skip:
        raise BuildError("the clip and clt stages cannot be skipped (every later stage needs them)")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for s in force:
        (out / "stages" / f"{s}.json").unlink(missing_ok=True)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    recs: dict[str, Any] = {}
    recs["clip"] = stage_clip(out, cfg, data_dir, device, log)
    worker = None
    if "comparison" not in skip and jobs > 1:  # the comparison needs only the CLIP: run it beside the CLT stage
        worker = mp.get_context("spawn").Process(
            target=_comparison_worker, name="cltvit-comparison",
            args=(str(out), cfg, data_dir, device, torch.get_num_threads(), recs["clip"]),
        )
        worker.start()
    try:
        bb, train_ds, test_ds, test_px, test_y, text = _stage_inputs(out, cfg, data_dir, device, recs["clip"])
        n_check = min(cfg.finetune_check_images, len(test_y))
        recs["clt"] = stage_clt(out, cfg, bb, train_ds, (test_px[:n_check], test_y[:n_check], text), recs["clip"], log)
        if cfg.clt_seeds > 1 and "seeds" not in skip:
            recs["seeds"] = stage_seeds(out, cfg, bb, train_ds, (test_px, test_y, text), recs["clt"], log)
    finally:
        if worker is not None:
            worker.join()
    if worker is not None and worker.exitcode != 0:
        log(f"comparison: the parallel worker exited with code {worker.exitcode}; running the stage here")
    if "comparison" not in skip:  # cached when the worker finished it
        recs["comparison"] = stage_comparison(out, cfg, bb, train_ds, (test_px, test_y, text), recs["clip"], log)
    if "eval" not in skip:
        recs["eval"] = stage_eval(out, cfg, bb, test_ds, (test_px, test_y, text), recs["clt"], recs.get("comparison"), log)
    if "export" not in skip:
        recs["export"] = stage_export(out, cfg, bb, recs["clt"], log, dataset_fill(test_px),
                                      fashion_gate_images(test_px, test_y, cfg.gate_images))
        if "atlas" not in skip:
            recs["atlas"] = stage_atlas(out, cfg, bb, train_ds, recs["clt"], log)
            recs["export"] = refresh_files(out, "export") or recs["export"]  # the bundle now lists the atlas
    elif "atlas" not in skip:
        log("atlas: skipped (it is stored in the bundle, and the export stage was skipped)")
    summary = {
        "out": str(out),
        "config": cfg.to_dict(),
        "stages": {k: {"seconds": v["seconds"], "cpu_seconds": v.get("cpu_seconds"), "key": v["key"], "files": v["files"]}
                   for k, v in recs.items()},
        "stage_seconds_total": sum(v["seconds"] for v in recs.values()),
        "stage_cpu_seconds_total": sum(v.get("cpu_seconds", float("nan")) for v in recs.values()),
        "wall_seconds_this_call": time.time() - t0,
        "zero_shot_top1": recs["clip"]["zero_shot_top1"],
        "evaluation": recs.get("eval", {}).get("summary"),
        "targets": check_targets(recs["clip"], recs.get("eval", {}).get("summary"), recs.get("comparison")),
        "seeds": {k: recs["seeds"][k] for k in ("mean", "worst", "targets")} if "seeds" in recs else None,
        "torch_threads": torch.get_num_threads(),
    }
    write_text_atomic(out / "build.json", json.dumps(summary, indent=1, default=float))
    return summary
