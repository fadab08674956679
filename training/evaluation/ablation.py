"""Faithfulness through real ablations: the predicted logit's drop when the model is rerun without its
top-1 unit, against a random unit, with bootstrap confidence intervals over images.

The paper's Table 4 (`metrics.faithfulness`) subtracts a layer's term from the logits (a direct-effect
ablation, the network not rerun) and counts accuracy flips, so its cost ratio rests on the few images
whose prediction flips. Here every unit is removed with the same edits `/intervene` serves
(training/model/edits.py through `decompose(..., edits=)`; the downstream layers rerun) and the
figure is the mean drop of the predicted logit over all images, which every image moves:

- units: `clt` (layer l = term `clt.l`, CLT source layer l's whole write), `block` (`attn.l` + `clt.l`),
  `feature` (one CLT feature at the CLS token);
- top-1: the unit with the largest contribution to the predicted logit (most positive, as Table 4
  ranks layers); random: a uniformly random layer, or a uniformly random active CLS feature;
- per image: drop = logit_pred(unedited) - logit_pred(edited), the class fixed at the unedited
  prediction; also the direct estimate (the unit's own contribution: what a linear explanation
  predicts the drop to be) and the share of images whose prediction flips;
- reported: mean drops (top-1, random, direct), their difference and ratio, each with a percentile
  bootstrap 95% interval over images (`bootstrap` resamples).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from bundle.format import term_names
from training.model.decompose import decompose
from training.model.edits import Edits

ABLATION_UNITS = ("clt", "block", "feature")


def _unit_terms(L: int, unit: str) -> list[list[int]]:
    names = term_names(L)
    if unit == "clt":
        return [[names.index(f"clt.{l}")] for l in range(L)]
    return [[names.index(f"attn.{l}"), names.index(f"clt.{l}")] for l in range(L)]


@torch.no_grad()
def ablation_drops(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, logit_scale: float,
                   mode: str = "cls", batch_size: int = 100, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per unit (`ABLATION_UNITS`) and image of pixels [N, 3, H, W] against text [C, D] (normalised):
    {"top1", "random", "direct"}: drops of the predicted logit [N] (direct: the top-1 unit's contribution),
    {"flip_top1", "flip_random"}: bool [N], the prediction changed."""
    L, k = clt.cfg.n_layers, clt.cfg.inference_k
    T = len(term_names(L))
    P = int(visual.grid_size[0]) * int(visual.grid_size[1])
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {u: {"top1": [], "random": [], "direct": [], "flip_top1": [], "flip_random": []}
                                                  for u in ABLATION_UNITS}
    groups = {u: _unit_terms(L, u) for u in ("clt", "block")}
    for start in range(0, len(pixels), batch_size):
        px = pixels[start : start + batch_size]
        B = len(px)
        d = decompose(visual, clt, px, text, logit_scale, mode, top_k_features=L * k)
        pred = d.logits.argmax(-1)
        rows = torch.arange(B)
        c_pred = d.contributions[rows, :, pred]  # [B, T]
        # the rows to rerun: per image, per unit, the top-1 and the random unit
        e = Edits.identity(B * 2 * len(ABLATION_UNITS), T, P)
        direct = {}
        for u_i, unit in enumerate(ABLATION_UNITS):
            top_r, rnd_r = rows * 2 * len(ABLATION_UNITS) + 2 * u_i, rows * 2 * len(ABLATION_UNITS) + 2 * u_i + 1
            if unit in groups:
                U = torch.stack([c_pred[:, g].sum(1) for g in groups[unit]], 1)  # [B, L]
                top = U.argmax(1)
                rnd = torch.randint(0, L, (B,), generator=gen)
                for r, layer in ((top_r, top), (rnd_r, rnd)):
                    for j in range(len(groups[unit][0])):
                        cols = torch.tensor([groups[unit][l][j] for l in layer.tolist()])
                        e.term_scale[r, cols] = 0.0
                direct[unit] = U[rows, top]
            else:
                c, act = d.top_contribution, d.top_activation  # [B, L*k]: every CLS feature, by |contribution|
                top = c.masked_fill(act == 0, float("-inf")).argmax(1)
                weights = (act != 0).double()
                weights[weights.sum(1) == 0] = 1.0
                rnd = torch.multinomial(weights, 1, generator=gen)[:, 0]
                for r, j in ((top_r, top), (rnd_r, rnd)):
                    e.feature_layer[r, 0], e.feature_index[r, 0] = d.top_layer[rows, j], d.top_index[rows, j]
                    e.feature_scale[r, 0] = 0.0
                direct[unit] = c[rows, top]
        reps = 2 * len(ABLATION_UNITS)
        edited = decompose(visual, clt, px.repeat_interleave(reps, 0), text, logit_scale, mode, top_k_features=1, edits=e)
        lg = edited.logits.reshape(B, reps, -1)
        base = d.logits[rows, pred]
        for u_i, unit in enumerate(ABLATION_UNITS):
            for key, col in (("top1", 2 * u_i), ("random", 2 * u_i + 1)):
                after = lg[:, col]
                out[unit][key].append((base - after[rows, pred]).double().numpy())
                out[unit][f"flip_{key}"].append((after.argmax(-1) != pred).numpy())
            out[unit]["direct"].append(direct[unit].double().numpy())
    return {u: {k: np.concatenate(v) for k, v in d.items()} for u, d in out.items()}


def bootstrap_interval(values: np.ndarray, stat: Any = np.mean, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over the rows of `values` ([N] or [N, ...]: resampled together)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = np.array([stat(values[rng.integers(0, n, n)]) for _ in range(resamples)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ablation_faithfulness(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, logit_scale: float,
                          mode: str = "cls", batch_size: int = 100, seed: int = 0, resamples: int = 1000) -> dict[str, Any]:
    """The report section (module docstring): per unit, mean drops with 95% bootstrap intervals over images."""
    drops = ablation_drops(visual, clt, pixels, text, logit_scale, mode, batch_size, seed)
    out: dict[str, Any] = {"images": len(pixels), "mode": mode, "resamples": resamples, "units": {}}
    for unit, d in drops.items():
        both = np.stack([d["top1"], d["random"]], 1)
        ratio = lambda x: float(x[:, 0].mean() / x[:, 1].mean()) if abs(x[:, 1].mean()) > 1e-12 else float("nan")  # noqa: E731
        out["units"][unit] = {
            "drop_top1": float(d["top1"].mean()), "drop_top1_ci": bootstrap_interval(d["top1"], seed=seed, resamples=resamples),
            "drop_random": float(d["random"].mean()), "drop_random_ci": bootstrap_interval(d["random"], seed=seed, resamples=resamples),
            "direct_top1": float(d["direct"].mean()), "direct_top1_ci": bootstrap_interval(d["direct"], seed=seed, resamples=resamples),
            "difference": float((d["top1"] - d["random"]).mean()),
            "difference_ci": bootstrap_interval(d["top1"] - d["random"], seed=seed, resamples=resamples),
            "ratio": ratio(both), "ratio_ci": bootstrap_interval(both, stat=ratio, seed=seed, resamples=resamples),
            "flip_top1": float(d["flip_top1"].mean()), "flip_random": float(d["flip_random"].mean()),
        }
    return out


def render_ablation(section: dict[str, Any], title: str = "Faithfulness through real ablations") -> str:
    """The report's markdown table of `ablation_faithfulness`."""
    def ci(x: tuple[float, float]) -> str:
        return f"[{x[0]:.3f}, {x[1]:.3f}]"

    lines = [f"## {title}", "",
             f"The predicted logit's drop when the model is rerun without its top-1 unit vs a random unit ({section['mode']} mode, "
             f"{section['images']} images; mean, 95% bootstrap interval over images, {section['resamples']} resamples; "
             "direct: the top-1 unit's own contribution, the drop a linear explanation predicts).", "",
             "| unit | drop top-1 | drop random | difference | ratio | direct top-1 | flips top-1 / random |", "|---|---|---|---|---|---|---|"]
    for unit, u in section["units"].items():
        lines.append(f"| {unit} | {u['drop_top1']:.3f} {ci(u['drop_top1_ci'])} | {u['drop_random']:.3f} {ci(u['drop_random_ci'])} | "
                     f"{u['difference']:.3f} {ci(u['difference_ci'])} | {u['ratio']:.2f} {ci(u['ratio_ci'])} | "
                     f"{u['direct_top1']:.3f} {ci(u['direct_top1_ci'])} | {100 * u['flip_top1']:.1f} % / {100 * u['flip_random']:.1f} % |")
    return "\n".join(lines)
