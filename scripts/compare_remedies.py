"""Compare remedies for the CLT's fidelity at the CLS token on the same activations (docs/fidelity.md).

Every variant trains the reference build's CLT (same CLIP, same seed, same evaluation images, the same
training tokens in the same order, read from the build's activation cache BUILD/activations: the CLIP's
MLP inputs/outputs over the training images in float16, written on first use, so the CLIP runs once for
all variants, not once per variant) with one change to the training recipe, then measures it
as the build's `seeds` stage does: zero-shot drops when every MLP is replaced (at the CLS token / at
all tokens), R^2 at the CLS token and over all tokens, the fraction of features dead at the CLS
token, L0, and the training time. Needs a build whose `clip` stage is done:

    python scripts/compare_remedies.py --build artifacts/reference-build --out artifacts/remedies
    python scripts/compare_remedies.py --build artifacts/reference-build --out artifacts/remedies --only baseline lr6e-3

Runs land in OUT/<variant>/ (a finished run is reused; the build's own recipe is retrained from the cache
like every variant, since the build's clt/ streamed float32 activations); the table goes to OUT/remedies.md and
OUT/remedies.json with the machine (CPU model, instruction set, threads, library versions).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bundle.atomic import write_text_atomic
from bundle.provenance import machine_info
from pipeline.reference import BuildConfig, _stage_inputs, activation_cache, budget, seed_row, train_reference_clt
from training.evaluation.metrics import measure_transcoder
from training.model.checkpoint import load_checkpoint

CACHED = "float16 cache"  # what the rows record as their activations' source (rows of earlier stream runs are redone)

# the reference recipe before this comparison, the starting point of every single change
BASELINE = dict(lr=1e-3, cls_copies=0, steps=1500, warmup_steps=100)
BASELINE_FT_LR = 2e-4

# name -> (what changes, clt_train overrides, fine-tuning lr[, BuildConfig overrides])
VARIANTS: dict[str, tuple[Any, ...]] = {
    "baseline": ("previous recipe: lr 1e-3, AuxK on features dead for 1M tokens, fine-tune lr 2e-4", {}, BASELINE_FT_LR),
    "no-aux": ("AuxK dead-feature loss off", dict(aux_coef=0.0), BASELINE_FT_LR),
    "aux-early": ("AuxK on features dead for 100k tokens, weight 1/8", dict(dead_after_tokens=100_000, aux_coef=1 / 8), BASELINE_FT_LR),
    "more-steps": ("3000 steps of 512 tokens (same tokens, twice the updates)", dict(steps=3000, batch_tokens=512, warmup_steps=200), BASELINE_FT_LR),
    "lr6e-3": ("learning rate 6e-3", dict(lr=6e-3), BASELINE_FT_LR),
    "cls4": ("4 extra copies of each CLS token in the buffer", dict(cls_copies=4), BASELINE_FT_LR),
    "lr6e-3+cls4": ("both", dict(lr=6e-3, cls_copies=4), BASELINE_FT_LR),
    "lr6e-3+cls4+ft5e-4": ("both, fine-tune lr 5e-4 (the build's recipe)", dict(lr=6e-3, cls_copies=4), 5e-4),
    "F384": ("the build's recipe with 384 features per layer (not 768)", dict(lr=6e-3, cls_copies=4), 5e-4, dict(n_features=384)),
    "F256": ("the build's recipe with 256 features per layer (not 768)", dict(lr=6e-3, cls_copies=4), 5e-4, dict(n_features=256)),
    "cls-aux": ("the build's recipe + CLS AuxK (features silent on 5,000 CLS rows), weight 1/8",
                dict(lr=6e-3, cls_copies=4, cls_aux_coef=1 / 8), 5e-4),
    "k15": ("the build's recipe with TopK k = 15 (not 16)", dict(lr=6e-3, cls_copies=4), 5e-4, dict(k=15)),
    "cls-aux-32": ("the build's recipe + CLS AuxK, weight 1/32", dict(lr=6e-3, cls_copies=4, cls_aux_coef=1 / 32), 5e-4),
    "cls-aux-16-k16": ("the build's recipe + CLS AuxK, weight 1/16, 16 features per CLS row",
                       dict(lr=6e-3, cls_copies=4, cls_aux_coef=1 / 16, cls_aux_k=16), 5e-4),
    "cls-aux-1": ("the build's recipe + CLS AuxK, weight 1", dict(lr=6e-3, cls_copies=4, cls_aux_coef=1.0), 5e-4),
    "batchtopk": ("the build's recipe with BatchTopK (k = 16 per token on average over the batch; threshold at inference)",
                  dict(lr=6e-3, cls_copies=4), 5e-4, dict(activation="batchtopk")),
    "batchtopk-k15": ("BatchTopK, k = 15 on average", dict(lr=6e-3, cls_copies=4), 5e-4, dict(activation="batchtopk", k=15)),
}


def _small_cls_aux(features: int, aux: int, steps: int | None = None, copies: int = 4,
                   ft_steps: int | None = None, ft_aux: int | None = None) -> tuple[str, tuple[Any, ...]]:
    """A variant with `features` per layer, TopK k = 15, CLS AuxK weight 1/`aux`, `steps` steps (warm-up 150;
    None: the 1500 of the starting point), `copies` extra CLS copies, `ft_steps` fine-tuning steps
    (None: the build's 200) and CLS AuxK weight 1/`ft_aux` in the fine-tuning (None: off)."""
    name = (f"F{features}-k15-cls-aux-{aux}" + (f"-{steps}" if steps else "") + ("" if copies == 4 else f"-cls{copies}")
            + ("" if ft_steps is None else f"-ft{ft_steps}") + ("" if ft_aux is None else f"-ft-cls-aux-{ft_aux}"))
    change = (f"{features} features per layer, k = 15, CLS AuxK weight 1/{aux}" + (f", {steps} steps" if steps else "")
              + ("" if copies == 4 else f", {copies} extra CLS copies (not 4)")
              + ("" if ft_steps is None else f", {ft_steps} fine-tuning steps (not 200)")
              + ("" if ft_aux is None else f", CLS AuxK weight 1/{ft_aux} in the fine-tuning too"))
    train = dict(lr=6e-3, cls_copies=copies, cls_aux_coef=1 / aux, **(dict(steps=steps, warmup_steps=150) if steps else {}))
    return name, (change, train, 5e-4, dict(n_features=features, k=15, **({} if ft_steps is None else dict(finetune_steps=ft_steps)),
                                      **({} if ft_aux is None else dict(finetune_cls_aux_coef=1 / ft_aux))))


# a 256-feature CLT trains in about 2/3 of the 768-feature one's time: the 2250-step variants spend the rest on steps
VARIANTS.update(_small_cls_aux(*a) for a in [
    (384, 32), (256, 32), (256, 32, 2250), (256, 64, 2250), (256, 48, 2250), (256, 32, 2250, 2), (256, 48, 2250, 2),
    (256, 64, 2250, 2), (256, 64, 2500, 2), (256, 48, 2500, 2), (256, 64, 2250, 2, 400), (256, 56, 2250, 2, 400),
    (256, 64, 2250, 2, 0), (256, 80, 2250, 2, 0), (256, 64, 2250, 2, None, 64), (256, 96, 2250, 2, None, 96), (256, 128, 2250, 2, None, 128)])


def variant_config(name: str) -> BuildConfig:
    _, overrides, ft_lr, *more = VARIANTS[name]
    cfg = budget("full")
    assert cfg.finetune is not None
    base = {k: v for k, v in cfg.clt_train.items() if k != "cls_aux_coef"}  # CLS AuxK only where a variant sets it
    build = dict(more[0]) if more else {}
    finetune = replace(cfg.finetune, lr=ft_lr, steps=build.pop("finetune_steps", cfg.finetune.steps),
                       cls_aux_coef=build.pop("finetune_cls_aux_coef", 0.0))
    # F = 768, TopK k = 16 (the starting point's) unless the variant sets them
    return replace(cfg, clt_train={**base, **BASELINE, **overrides}, finetune=finetune, **{"k": 16, "n_features": 768, **build})


def render(rows: list[dict[str, Any]], machine: dict[str, Any], images: int, fidelity_images: int | None) -> str:
    head = "| variant | change | CLS-only drop (pt) | all-token drop (pt) | R^2 CLS | R^2 all | dead at CLS | L0 | train + fine-tune (CPU s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['change']} | {r['drop_cls_pt']:+.2f} | {r['drop_all_pt']:+.2f} | {r['r2_cls']:.4f} | "
                     f"{r['r2_all']:.4f} | {r['dead_cls']:.3f} | {r['l0']:.2f} | {r['seconds']:.0f} |")
    return "\n".join([
        f"Same CLIP, same streamed activations, seed 0; drops on {images} test images, R^2 and dead fraction on the "
        f"first {fidelity_images or images}. Machine: {machine.get('cpu')} ({' '.join(machine.get('isa', []))}), {machine.get('threads')} "
        f"torch thread(s).", "", *lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare_remedies", description=__doc__.split("\n")[0])
    p.add_argument("--build", required=True, help="a reference build directory whose clip stage is done")
    p.add_argument("--out", required=True, help="directory for the runs and the table")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to run (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    build, out = Path(args.build).resolve(), Path(args.out).resolve()
    stage = build / "stages" / "clip.json"
    if not stage.is_file():
        p.error(f"argument --build: {build} has no finished clip stage ({stage} missing); run cltvit-reference build first")
    torch.set_num_threads(args.threads)
    cfg0 = budget("full")
    clip_rec = json.loads(stage.read_text())
    bb, train_ds, _, px, y, text = _stage_inputs(build, cfg0, None, "cpu", clip_rec)
    n_check = min(cfg0.finetune_check_images, len(y))
    machine = machine_info(threads=torch.get_num_threads())
    cache = None  # the build's activation cache, opened (written on first use) when a variant trains
    results_path = out / "remedies.json"
    done = {r["variant"]: r for r in json.loads(results_path.read_text())["rows"]} if results_path.is_file() else {}
    for name in args.only or list(VARIANTS):
        cfg = variant_config(name)
        if name in done and done[name]["clt_train"] == cfg.clt_train and done[name]["finetune_lr"] == cfg.finetune.lr \
                and done[name].get("finetune_steps", 200) == cfg.finetune.steps \
                and done[name].get("finetune_cls_aux_coef", 0.0) == cfg.finetune.cls_aux_coef \
                and done[name]["n_features"] == cfg.n_features and done[name].get("k", 16) == cfg.k \
                and done[name].get("activation", "topk") == cfg.activation \
                and done[name].get("activations") == CACHED:  # type: ignore[union-attr]
            print(f"{name}: done before", flush=True)
            continue
        run = out / name
        cache = cache or activation_cache(build, bb, train_ds, lambda m: print(m, flush=True))
        t0 = time.process_time()  # CPU time: other jobs on the machine stretch wall time, not this
        train_reference_clt(run, cfg, bb, train_ds, (px[:n_check], y[:n_check], text), cfg.seed, lambda m: print(m, flush=True),
                            activations=cache)
        seconds = time.process_time() - t0
        clt, _ = load_checkpoint(run, bb)
        row = seed_row(cfg.seed, measure_transcoder(bb, clt, px, y, text, cfg.eval.fidelity_images))
        done[name] = {"variant": name, "change": VARIANTS[name][0], **row, "seconds": seconds,
                      "clt_train": cfg.clt_train, "finetune_lr": cfg.finetune.lr,
                      "finetune_steps": cfg.finetune.steps, "finetune_cls_aux_coef": cfg.finetune.cls_aux_coef, "n_features": cfg.n_features, "k": cfg.k,
                      "activation": cfg.activation, "activations": CACHED}  # type: ignore[union-attr]
        print(f"{name}: " + json.dumps({k: round(v, 4) for k, v in row.items() if isinstance(v, float)}), flush=True)
        rows = [done[v] for v in VARIANTS if v in done]
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(results_path, json.dumps({"rows": rows, "machine": machine, "images": len(y),
                                                    "fidelity_images": cfg0.eval.fidelity_images}, indent=1))
        write_text_atomic(out / "remedies.md", render(rows, machine, len(y), cfg0.eval.fidelity_images))
    print((out / "remedies.md").read_text() if (out / "remedies.md").is_file() else "nothing run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
