"""The paper's evaluation suite for a backbone + CLT + labelled dataset (`cltvit-eval`, or `evaluate()`).

All hooking, splicing and decomposition goes through `training.vit` and `training.decompose`.
Sections of the report (report.json / report.md in the output directory, plus PNGs):

1. `fidelity`: per layer and mean, separately for CLS tokens, patch tokens, and all tokens, of the
   CLT reading the true MLP inputs ("open loop"): R^2 = 1 - sum||y - yhat||^2 / sum||y - mean y||^2,
   mean cosine(y, yhat) per token, MSE per element, L0 (active features per token), and the
   fraction of features that never fire on those tokens of the evaluated images ("dead").
2. `replacement`: zero-shot top-1 of the unmodified model, and with the CLT replacing the MLPs of
   layers s..L-1 for every start s (cascaded: every source layer's features are read from this
   spliced run, sources < s included) at token sets cls / patches / all; plus the agreement with the
   unmodified model's predictions.
3. `c_proj`: `C_proj[i -> j] = E_x[(1/T) sum_t <c_t(i->j), yhat_t(j)> / ||yhat_t(j)||^2]`, source i's
   raw write to target j projected on the full reconstruction of target j, computed with the CLT
   observing the unmodified model; one more source row `bias` (target j's decoder bias) makes each
   column sum to 1. Matrices [L+1, L] for CLS and patch tokens; JSON + heatmap PNG.
4. `faithfulness` (paper's Table 4): `decompose(mode="cls")` splits each image's logits into terms;
   the "layer" unit is either `clt` (layer l = the term `clt.l`: CLT source layer l's total write,
   summed over its targets) or `block` (layer l = `attn.l` + `clt.l`). Layers are ranked per image by
   their contribution to the predicted class's logit. Dropping a layer subtracts its term(s) from all
   logits (a direct-effect ablation at ln_post's frozen scale; the network is not re-run). Reported:
   accuracy of the CLS-spliced model, after dropping the top-1 layer, after dropping one random layer
   (mean over seeds), after keeping only the top-k layers (k = 0..L; the other terms stay), and the
   deletion curve (accuracy after deleting the k highest-ranked vs k random layers).
5. Optional `comparison` (CLT vs per-layer transcoder at k = 4, 8, 16, 32): see `compare_clt_plt`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .decompose import decompose, term_names
from .vit import TOKEN_SETS, CltSplice, FixedOutputs, MlpReplacement, capture, forward

GROUPS = ("cls", "patches", "all")
FAITHFULNESS_UNITS = ("clt", "block")
# make_replace(layers, tokens, pixels_batch) -> the MLP replacement for one batch
ReplaceFactory = Callable[[Sequence[int], str, torch.Tensor], MlpReplacement]


class EvaluationError(ValueError):
    """Inputs to the evaluation do not fit together (shapes, empty dataset, bad option)."""


@dataclass
class EvalConfig:
    """What to evaluate on. `limit`: images of the dataset used (None: all); the fidelity and C_proj
    sections use the first `fidelity_images` / `cproj_images` of those; `random_seeds` seeds of the
    random-layer baselines."""

    limit: int | None = None
    batch_size: int = 250
    fidelity_images: int | None = 2000
    cproj_images: int | None = 1000
    random_seeds: int = 10
    top_k_features: int = 16
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- data
def dataset_tensors(backbone: Any, dataset: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels float32 [N, 3, H, W] preprocessed as the backbone expects, labels int64 [N]).

    Datasets with uint8 `images` [N, H, W] already at the backbone's image size (Fashion-MNIST on
    the reference CLIP) are normalised in one tensor operation; others go through `preprocess`.
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise EvaluationError("the evaluation dataset is empty")
    images = getattr(dataset, "images", None)
    size = tuple(getattr(backbone, "image_size", ()))
    if isinstance(images, np.ndarray) and images.ndim == 3 and tuple(images.shape[1:]) == size:
        from .reference_clip import preprocess_stats, tensorise

        mean, std = preprocess_stats(backbone.preprocess)
        pixels = tensorise(images[:n], mean, std)
        labels = torch.as_tensor(np.asarray(dataset.labels[:n]), dtype=torch.long)
    else:
        items = [dataset[i] for i in range(n)]
        pixels = torch.stack([backbone.preprocess(im) for im, _ in items])
        labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    if (labels < 0).any():
        raise EvaluationError("the evaluation dataset is unlabelled (label -1); zero-shot accuracy needs labels")
    return pixels, labels


def _batches(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


# ---------------------------------------------------------------------- 1. fidelity
class _FidelityAcc:
    """Running sums for one token group over L layers."""

    def __init__(self, L: int, d: int, F: int) -> None:
        self.err = torch.zeros(L, dtype=torch.float64)
        self.sum_y = torch.zeros(L, d, dtype=torch.float64)
        self.sum_y2 = torch.zeros(L, dtype=torch.float64)
        self.cos = torch.zeros(L, dtype=torch.float64)
        self.l0 = torch.zeros(L, dtype=torch.float64)
        self.fired = torch.zeros(L, F, dtype=torch.bool)
        self.n = 0
        self.d = d

    def add(self, y: torch.Tensor, yhat: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
        """y, yhat [L, N, d]; idx, val [L, N, k] (sparse codes of those tokens)."""
        y, yhat = y.double(), yhat.double()
        self.err += (y - yhat).pow(2).sum(-1).sum(-1)
        self.sum_y += y.sum(1)
        self.sum_y2 += y.pow(2).sum(-1).sum(-1)
        self.cos += torch.nn.functional.cosine_similarity(y, yhat, dim=-1, eps=1e-12).sum(-1)
        active = val != 0
        self.l0 += active.sum(-1).double().sum(-1)
        for l in range(idx.shape[0]):
            self.fired[l, idx[l][active[l]]] = True
        self.n += y.shape[1]

    def result(self) -> dict[str, Any]:
        var = (self.sum_y2 - self.sum_y.pow(2).sum(-1) / self.n).clamp_min(1e-30)
        r2 = (1 - self.err / var).tolist()
        out = {
            "r2": r2,
            "cosine": (self.cos / self.n).tolist(),
            "mse": (self.err / (self.n * self.d)).tolist(),
            "l0": (self.l0 / self.n).tolist(),
            "dead_fraction": (1 - self.fired.float().mean(-1)).tolist(),
            "tokens": self.n,
        }
        out["mean"] = {k: float(np.mean(out[k])) for k in ("r2", "cosine", "mse", "l0", "dead_fraction")}
        return out


@torch.no_grad()
def fidelity(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, batch_size: int = 250) -> dict[str, Any]:
    """Open-loop reconstruction quality per layer for CLS / patch / all tokens (see module docstring)."""
    cfg = clt.cfg
    L, d, F = cfg.n_layers, cfg.d_model, cfg.n_features
    accs = {g: _FidelityAcc(L, d, F) for g in GROUPS}
    dev = next(clt.parameters()).device
    for sl in _batches(len(pixels), batch_size):
        cap = capture(visual, pixels[sl].to(dev), tokens="all")  # [L, B, T, d]
        _, B, T, _ = cap.mlp_in.shape
        recon, codes = clt(cap.mlp_in.reshape(L, B * T, d))
        recon = recon.reshape(L, B, T, d)
        idx = torch.stack([c.idx for c in codes]).reshape(L, B, T, -1)
        val = torch.stack([c.val for c in codes]).reshape(L, B, T, -1)
        for g, sel in (("cls", slice(0, 1)), ("patches", slice(1, T)), ("all", slice(0, T))):
            k = idx.shape[-1]
            accs[g].add(
                cap.mlp_out[:, :, sel].reshape(L, -1, d).cpu(),
                recon[:, :, sel].reshape(L, -1, d).cpu(),
                idx[:, :, sel].reshape(L, -1, k).cpu(),
                val[:, :, sel].reshape(L, -1, k).cpu(),
            )
    return {g: accs[g].result() for g in GROUPS}


# ---------------------------------------------------------------------- 2. replacement
def clt_replacement(clt: nn.Module) -> ReplaceFactory:
    """Replacement factory splicing `clt` at the given layers and tokens."""
    return lambda layers, tokens, px: CltSplice(clt, layers, tokens)  # type: ignore[arg-type]


def true_output_replacement(visual: nn.Module) -> ReplaceFactory:
    """An identity "CLT": writes the unmodified model's own MLP outputs (a consistency check)."""

    def make(layers: Sequence[int], tokens: str, px: torch.Tensor) -> MlpReplacement:
        return FixedOutputs(capture(visual, px, tokens=tokens).mlp_out, layers, tokens)  # type: ignore[arg-type]

    return make


@torch.no_grad()
def replacement_accuracy(
    visual: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    n_layers: int,
    make_replace: ReplaceFactory,
    batch_size: int = 250,
    token_sets: Sequence[str] = ("cls", "patches", "all"),
    starts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1 (fraction) of the unmodified model and of MLPs s..L-1 replaced, per token set.

    Returns {"baseline": acc, "<tokens>": [acc for s in starts], "agreement": {"<tokens>": [...]},
    "starts": starts (default 0..L-1), "images": N}; agreement = fraction of images predicted as
    the unmodified model predicts.
    """
    starts = list(range(n_layers)) if starts is None else list(starts)
    for t in token_sets:
        if t not in TOKEN_SETS:
            raise EvaluationError(f"token set must be one of {TOKEN_SETS}, got {t!r}")
    text = text_embeddings.to(next(visual.parameters()).device)
    correct = {t: torch.zeros(len(starts), dtype=torch.float64) for t in token_sets}
    agree = {t: torch.zeros(len(starts), dtype=torch.float64) for t in token_sets}
    base_correct = 0
    for sl in _batches(len(pixels), batch_size):
        px, y = pixels[sl].to(text.device), labels[sl].to(text.device)
        base = forward(visual, px).embedding @ text.T
        base_pred = base.argmax(-1)
        base_correct += int((base_pred == y).sum())
        for t in token_sets:
            for i, s in enumerate(starts):
                pred = (forward(visual, px, make_replace(range(s, n_layers), t, px)).embedding @ text.T).argmax(-1)
                correct[t][i] += int((pred == y).sum())
                agree[t][i] += int((pred == base_pred).sum())
    n = len(pixels)
    out: dict[str, Any] = {"baseline": base_correct / n, "images": n, "starts": starts}
    for t in token_sets:
        out[t] = (correct[t] / n).tolist()
    out["agreement"] = {t: (agree[t] / n).tolist() for t in token_sets}
    return out


# ---------------------------------------------------------------------- 3. C_proj
@torch.no_grad()
def c_proj(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, batch_size: int = 250) -> dict[str, Any]:
    """C_proj matrices [L + 1 sources (last: bias), L targets] for CLS and patch tokens (module docstring)."""
    cfg = clt.cfg
    L = cfg.n_layers
    dev = next(clt.parameters()).device
    sums = {g: torch.zeros(L + 1, L, dtype=torch.float64) for g in ("cls", "patches")}
    n_img = 0
    for sl in _batches(len(pixels), batch_size):
        splice = CltSplice(clt, tokens="all", observe=True)
        forward(visual, pixels[sl].to(dev), splice)
        for j in range(L):
            yhat = splice.recon[j].double()  # [B, T, d]
            den = yhat.pow(2).sum(-1).clamp_min(1e-30)  # [B, T]
            ratios = []
            for i in range(L):
                w = splice.writes[i]
                off = j - i
                if off < 0 or off >= w.shape[2]:
                    ratios.append(torch.zeros_like(den))
                    continue
                ratios.append((w[:, :, off].double() * yhat).sum(-1) / den)
            bias = (clt.b_dec[j] * clt.out_scale[j]).double()
            ratios.append((yhat * bias).sum(-1) / den)
            r = torch.stack(ratios)  # [L + 1, B, T]
            sums["cls"][:, j] += r[:, :, 0].sum(1).cpu()
            sums["patches"][:, j] += r[:, :, 1:].mean(2).sum(1).cpu()
        n_img += sl.stop - sl.start
    mats = {g: (s / n_img) for g, s in sums.items()}
    return {
        "sources": [*[f"clt.{i}" for i in range(L)], "bias"],
        "targets": [f"mlp.{j}" for j in range(L)],
        "cls": mats["cls"].tolist(),
        "patches": mats["patches"].tolist(),
        "column_sums": {g: m.sum(0).tolist() for g, m in mats.items()},
        "cross_layer_share": {g: _off_diagonal_share(m) for g, m in mats.items()},
        "images": n_img,
    }


def _off_diagonal_share(m: torch.Tensor) -> float:
    """Mean over targets of the C_proj mass from earlier source layers (strictly below the diagonal)."""
    L = m.shape[1]
    return float(np.mean([float(m[:j, j].sum()) for j in range(L)]))


# ---------------------------------------------------------------------- 4. faithfulness
@torch.no_grad()
def layer_contributions(
    visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text_embeddings: torch.Tensor,
    logit_scale: float, batch_size: int = 250,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], contributions [N, T, C]) of the CLS-spliced model, from `decompose(mode="cls")`."""
    dev = next(clt.parameters()).device
    text = text_embeddings.to(dev)
    logits, contribs = [], []
    for sl in _batches(len(pixels), batch_size):
        dec = decompose(visual, clt, pixels[sl].to(dev), text, logit_scale, mode="cls")
        logits.append(dec.logits.cpu())
        contribs.append(dec.contributions.cpu())
    return torch.cat(logits), torch.cat(contribs)


def unit_terms(n_layers: int, unit: str) -> list[list[int]]:
    """Indices (into `term_names(L)`) of the terms making up each layer for a faithfulness unit."""
    if unit not in FAITHFULNESS_UNITS:
        raise EvaluationError(f"faithfulness unit must be one of {FAITHFULNESS_UNITS}, got {unit!r}")
    names = term_names(n_layers)
    if unit == "clt":
        return [[names.index(f"clt.{l}")] for l in range(n_layers)]
    return [[names.index(f"attn.{l}"), names.index(f"clt.{l}")] for l in range(n_layers)]


def faithfulness(
    logits: torch.Tensor, contributions: torch.Tensor, labels: torch.Tensor, unit: str = "clt",
    seeds: int = 10, seed: int = 0,
) -> dict[str, Any]:
    """Table-4 style numbers from a decomposition: logits [N, C], contributions [N, T, C], labels [N]."""
    N, T, C = contributions.shape
    L = (T - 3) // 2
    groups = unit_terms(L, unit)
    U = torch.stack([contributions[:, g].sum(1) for g in groups], 1).double()  # [N, L, C]
    logits = logits.double()
    rest = logits - U.sum(1)  # terms outside the units (embed, bias, error, attn for unit "clt")
    pred = logits.argmax(-1)
    attribution = U[torch.arange(N), :, pred]  # [N, L]
    order = attribution.argsort(dim=1, descending=True)  # per image, most positive first
    rows = torch.arange(N)[:, None]
    gen = torch.Generator().manual_seed(seed)

    def acc(z: torch.Tensor) -> float:
        return float((z.argmax(-1) == labels).double().mean())

    def deleted(perm: torch.Tensor, k: int) -> torch.Tensor:
        return logits - U[rows, perm[:, :k]].sum(1) if k else logits

    def kept(perm: torch.Tensor, k: int) -> torch.Tensor:
        return rest + U[rows, perm[:, :k]].sum(1) if k else rest

    full = acc(logits)
    rand_perms = [torch.rand(N, L, generator=gen).argsort(1) for _ in range(seeds)]  # a random layer order per image
    drop_top1 = acc(deleted(order, 1))
    drop_random = [acc(deleted(p, 1)) for p in rand_perms]
    del_attr = [acc(deleted(order, k)) for k in range(L + 1)]
    del_rand = [float(np.mean([acc(deleted(p, k)) for p in rand_perms])) for k in range(L + 1)]
    keep_attr = [acc(kept(order, k)) for k in range(L + 1)]
    keep_rand = [float(np.mean([acc(kept(p, k)) for p in rand_perms])) for k in range(L + 1)]
    cost_top1, cost_rand = full - drop_top1, full - float(np.mean(drop_random))
    top1_counts = torch.bincount(order[:, 0], minlength=L).tolist()
    return {
        "unit": unit,
        "unit_terms": [[term_names(L)[i] for i in g] for g in groups],
        "accuracy": full,
        "drop_top1": drop_top1,
        "drop_random_mean": float(np.mean(drop_random)),
        "drop_random_std": float(np.std(drop_random)),
        "cost_top1": cost_top1,
        "cost_random": cost_rand,
        "cost_ratio": cost_top1 / cost_rand if abs(cost_rand) > 1e-12 else (math.inf if cost_top1 > 0 else float("nan")),
        "keep_top_k": keep_attr,
        "keep_random_k": keep_rand,
        "deletion_attributed": del_attr,
        "deletion_random": del_rand,
        "top1_layer_histogram": top1_counts,
        "mean_attribution": attribution.mean(0).tolist(),
        "seeds": seeds,
        "images": N,
    }


# ---------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cproj(cp: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, g in zip(axes, ("cls", "patches")):
        m = np.array(cp[g])
        im = ax.imshow(m, cmap="RdBu_r", vmin=-max(1e-6, np.abs(m).max()), vmax=max(1e-6, np.abs(m).max()))
        ax.set_title(f"C_proj ({g} tokens)")
        ax.set_xlabel("target layer j")
        ax.set_ylabel("source layer i")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]), [str(i) for i in range(m.shape[0] - 1)] + ["bias"])
        for (i, j), v in np.ndenumerate(m):
            if abs(v) >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_deletion(fa: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(fa), figsize=(5 * len(fa), 4))
    axes = np.atleast_1d(axes)
    for ax, (unit, f) in zip(axes, fa.items()):
        ks = range(len(f["deletion_attributed"]))
        ax.plot(ks, np.array(f["deletion_attributed"]) * 100, "o-", label="by attribution")
        ax.plot(ks, np.array(f["deletion_random"]) * 100, "s--", label=f"random (mean of {f['seeds']})")
        ax.set_xlabel(f"layers deleted (unit: {unit})")
        ax.set_ylabel("zero-shot top-1 (%)")
        ax.set_title(f"Deletion curve ({unit})")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_replacement(rep: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for t in ("cls", "patches", "all"):
        if t in rep:
            ax.plot(range(len(rep[t])), np.array(rep[t]) * 100, "o-", label=f"CLT replaces {t}")
    ax.axhline(rep["baseline"] * 100, color="k", ls=":", label="unmodified")
    ax.set_xlabel("first replaced layer s (layers s..L-1 replaced)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fidelity(fid: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for g in ("cls", "patches"):
        L = len(fid[g]["r2"])
        axes[0].plot(range(L), fid[g]["r2"], "o-", label=g)
        axes[1].plot(range(L), fid[g]["cosine"], "o-", label=g)
    for ax, name in zip(axes, ("R^2", "cosine")):
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    """report.json -> report.md (tables of every section)."""
    lines = ["# CLT evaluation report", ""]
    b, c = report.get("backbone", {}), report.get("clt", {})
    lines += [
        f"- backbone: `{b.get('model')}` (pretrained={b.get('pretrained')}, weights {b.get('weights_sha256_16')}, "
        f"L={b.get('n_layers')}, d={b.get('d_model')}, tokens={b.get('n_tokens')})",
        f"- CLT: {c.get('config')}",
        f"- data: {report.get('data')}",
        f"- seconds: {report.get('seconds', 0):.1f}",
        "",
    ]
    fid = report["fidelity"]
    L = len(fid["cls"]["r2"])
    lines += ["## 1. Fidelity (open loop: CLT reads the true MLP inputs)", ""]
    for g in GROUPS:
        m = fid[g]["mean"]
        lines.append(f"- **{g}** ({fid[g]['tokens']} tokens): mean R^2 {m['r2']:.4f}, cosine {m['cosine']:.4f}, "
                     f"MSE {m['mse']:.3g}, L0 {m['l0']:.2f}, dead {m['dead_fraction']:.3f}")
    lines += ["", "| layer | " + " | ".join(f"{g} R^2 | {g} cos | {g} MSE | {g} L0 | {g} dead" for g in ("cls", "patches")) + " |",
              "|---" * 11 + "|"]
    for l in range(L):
        cells = []
        for g in ("cls", "patches"):
            f = fid[g]
            cells += [f"{f['r2'][l]:.4f}", f"{f['cosine'][l]:.4f}", f"{f['mse'][l]:.3g}", f"{f['l0'][l]:.2f}", f"{f['dead_fraction'][l]:.3f}"]
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    rep = report["replacement"]
    lines += ["", "## 2. Cascaded replacement (zero-shot top-1 %, MLPs of layers s..L-1 replaced)", "",
              f"Unmodified model: **{_pct(rep['baseline'])}** on {rep['images']} images.", "",
              "| s | " + " | ".join(t for t in ("cls", "patches", "all") if t in rep) + " |", "|---" * 4 + "|"]
    for s in range(L):
        lines.append(f"| {s} | " + " | ".join(_pct(rep[t][s]) for t in ("cls", "patches", "all") if t in rep) + " |")
    cp = report["c_proj"]
    lines += ["", "## 3. C_proj (rows: source layer i, last row the decoder bias; columns: target j)", "",
              f"Share from earlier layers (mean over targets): CLS {cp['cross_layer_share']['cls']:.3f}, "
              f"patches {cp['cross_layer_share']['patches']:.3f}. Heatmap: `c_proj.png`.", ""]
    for g in ("cls", "patches"):
        lines += [f"**{g}**", "", "| i \\ j | " + " | ".join(str(j) for j in range(L)) + " |", "|---" * (L + 1) + "|"]
        for i, row in enumerate(cp[g]):
            lines.append(f"| {cp['sources'][i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    lines += ["## 4. Faithfulness (CLS-spliced model, logit-space ablation; curve: `deletion.png`)", "",
              "| unit | acc | drop top-1 | drop random (mean ± sd) | cost ratio | keep top-1 | keep top-2 | keep top-3 |",
              "|---|---|---|---|---|---|---|---|"]
    for unit, f in report["faithfulness"].items():
        k = f["keep_top_k"]
        lines.append(f"| {unit} | {_pct(f['accuracy'])} | {_pct(f['drop_top1'])} | {_pct(f['drop_random_mean'])} ± "
                     f"{_pct(f['drop_random_std'])} | {f['cost_ratio']:.2f} | {_pct(k[min(1, len(k) - 1)])} | "
                     f"{_pct(k[min(2, len(k) - 1)])} | {_pct(k[min(3, len(k) - 1)])} |")
    for unit, f in report["faithfulness"].items():
        lines.append(f"\n- unit `{unit}`: layer = {', '.join('+'.join(g) for g in f['unit_terms'][:2])}, ...; "
                     f"top-1 layer histogram {f['top1_layer_histogram']}")
    ft = report.get("finetune")
    if ft:
        b, a = ft["before"], ft["after"]
        lines += ["", f"## Fine-tuning through the replacement ({ft['config']['loss']}, {ft['config']['steps']} steps)", "",
                  f"On {ft['check_images']} test images: R^2 {b['r2']:.4f} -> {a['r2']:.4f}; top-1 with all layers replaced at "
                  f"CLS {_pct(b['accuracy_cls'])} -> {_pct(a['accuracy_cls'])}, at all tokens {_pct(b['accuracy_all'])} -> "
                  f"{_pct(a['accuracy_all'])} (unmodified {_pct(b['accuracy_unmodified'])})."]
    if "comparison" in report:
        lines += ["", render_comparison(report["comparison"])]
    return "\n".join(lines) + "\n"


def evaluate(
    backbone: Any,
    clt: nn.Module,
    dataset: Any,
    out_dir: str | Path,
    cfg: EvalConfig | None = None,
    *,
    pixels_labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run sections 1-4 and write report.json, report.md, fidelity.png, replacement.png, c_proj.png,
    c_proj.json, deletion.png into `out_dir`. Returns the report dict."""
    cfg = cfg or EvalConfig()
    if clt.cfg.n_layers != backbone.n_layers or clt.cfg.d_model != backbone.d_model:
        raise EvaluationError(
            f"CLT has L={clt.cfg.n_layers}, d={clt.cfg.d_model} but the backbone {backbone.spec.model} "
            f"has L={backbone.n_layers}, d={backbone.d_model}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    clt = clt.eval()
    pixels, labels = pixels_labels if pixels_labels is not None else dataset_tensors(backbone, dataset, cfg.limit)
    text = backbone.class_embeddings(dataset.class_names, dataset.templates)
    visual, L = backbone.visual, backbone.n_layers
    nf = len(pixels) if cfg.fidelity_images is None else min(cfg.fidelity_images, len(pixels))
    ncp = len(pixels) if cfg.cproj_images is None else min(cfg.cproj_images, len(pixels))
    log(f"eval: fidelity on {nf} images")
    fid = fidelity(visual, clt, pixels[:nf], cfg.batch_size)
    log(f"eval: replacement on {len(pixels)} images")
    rep = replacement_accuracy(visual, pixels, labels, text, L, clt_replacement(clt), cfg.batch_size)
    log(f"eval: C_proj on {ncp} images")
    cp = c_proj(visual, clt, pixels[:ncp], cfg.batch_size)
    log("eval: faithfulness")
    logits, contribs = layer_contributions(visual, clt, pixels, text, backbone.logit_scale, cfg.batch_size)
    fa = {u: faithfulness(logits, contribs, labels, u, cfg.random_seeds, cfg.seed) for u in FAITHFULNESS_UNITS}
    report: dict[str, Any] = {
        "backbone": backbone.identity(),
        "clt": {"config": clt.cfg.to_dict()},
        "data": {**(dataset.description() if hasattr(dataset, "description") else {}), "images": len(pixels)},
        "eval_config": cfg.to_dict(),
        "fidelity": fid,
        "replacement": rep,
        "c_proj": cp,
        "faithfulness": fa,
        **(extra or {}),
    }
    report["summary"] = summarise(report)
    report["seconds"] = time.time() - t0
    (out / "c_proj.json").write_text(json.dumps(cp, indent=1))
    plot_cproj(cp, out / "c_proj.png")
    plot_deletion(fa, out / "deletion.png")
    plot_replacement(rep, out / "replacement.png")
    plot_fidelity(fid, out / "fidelity.png")
    write_report(out, report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(render_markdown(report))


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers the issue's targets refer to (accuracies as fractions)."""
    fid, rep, fa = report["fidelity"], report["replacement"], report["faithfulness"]["clt"]
    return {
        "r2_mean": fid["all"]["mean"]["r2"],
        "cosine_mean": fid["all"]["mean"]["cosine"],
        "l0_mean": fid["all"]["mean"]["l0"],
        "r2_cls": fid["cls"]["mean"]["r2"],
        "r2_patches": fid["patches"]["mean"]["r2"],
        "dead_fraction": fid["all"]["mean"]["dead_fraction"],
        "accuracy_unmodified": rep["baseline"],
        "accuracy_cls_all_layers": rep["cls"][0],
        "accuracy_patches_all_layers": rep["patches"][0],
        "accuracy_all_tokens_all_layers": rep["all"][0],
        "drop_cls": rep["baseline"] - rep["cls"][0],
        "drop_all_tokens": rep["baseline"] - rep["all"][0],
        "faithfulness_cost_ratio": fa["cost_ratio"],
        "faithfulness_cost_ratio_block": report["faithfulness"]["block"]["cost_ratio"],
    }


# ---------------------------------------------------------------------- 5. CLT vs PLT
def measure_transcoder(
    backbone: Any, clt: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
    fidelity_images: int = 1000, batch_size: int = 250,
) -> dict[str, Any]:
    """Headline numbers of one transcoder: mean R^2 / cosine / L0 (all, CLS, patches) and accuracy
    with all layers replaced at CLS / all tokens."""
    fid = fidelity(backbone.visual, clt, pixels[:fidelity_images], batch_size)
    rep = replacement_accuracy(backbone.visual, pixels, labels, text, backbone.n_layers, clt_replacement(clt),
                               batch_size, token_sets=("cls", "all"), starts=[0])
    return {
        "r2": fid["all"]["mean"]["r2"], "cosine": fid["all"]["mean"]["cosine"], "l0": fid["all"]["mean"]["l0"],
        "r2_cls": fid["cls"]["mean"]["r2"], "r2_patches": fid["patches"]["mean"]["r2"],
        "dead_fraction": fid["all"]["mean"]["dead_fraction"],
        "accuracy_unmodified": rep["baseline"], "accuracy_cls": rep["cls"][0], "accuracy_all": rep["all"][0],
    }


def compare_clt_plt(
    backbone: Any,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    out_dir: str | Path,
    train_one: Callable[[bool, int, Path], nn.Module],
    ks: Sequence[int] = (4, 8, 16, 32),
    fidelity_images: int = 1000,
    batch_size: int = 250,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (via `train_one(cross_layer, k, run_dir) -> transcoder`) and measure a CLT and a PLT
    (decoder restricted to its diagonal) at each k; writes comparison.json and r2_vs_l0.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in ks:
        for cross in (True, False):
            name = f"{'clt' if cross else 'plt'}-k{k}"
            log(f"comparison: {name}")
            tc = train_one(cross, k, out / name)
            m = measure_transcoder(backbone, tc.eval(), pixels, labels, text, fidelity_images, batch_size)
            rows.append({"kind": "clt" if cross else "plt", "k": k, "n_features": tc.cfg.n_features, **m})
    result = {"rows": rows, "ks": list(ks), "images": len(pixels)}
    result["verdict"] = comparison_verdict(rows)
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    plot_comparison(rows, out / "r2_vs_l0.png")
    return result


def comparison_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per k: does the CLT beat the PLT on R^2 and on all-token replacement accuracy?"""
    by = {(r["kind"], r["k"]): r for r in rows}
    per_k = {}
    for k in sorted({r["k"] for r in rows}):
        if ("clt", k) in by and ("plt", k) in by:
            c, p = by[("clt", k)], by[("plt", k)]
            per_k[str(k)] = {"r2": c["r2"] > p["r2"], "accuracy_all": c["accuracy_all"] > p["accuracy_all"],
                             "r2_gap": c["r2"] - p["r2"], "accuracy_all_gap": c["accuracy_all"] - p["accuracy_all"]}
    return {"per_k": per_k,
            "clt_better_r2_everywhere": all(v["r2"] for v in per_k.values()) if per_k else None,
            "clt_better_accuracy_everywhere": all(v["accuracy_all"] for v in per_k.values()) if per_k else None}


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("clt", "o-"), ("plt", "s--")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["l0"])
        if not rs:
            continue
        axes[0].plot([r["l0"] for r in rs], [r["r2"] for r in rs], marker, label=kind.upper())
        axes[1].plot([r["l0"] for r in rs], [100 * r["accuracy_all"] for r in rs], marker, label=kind.upper())
    if rows:
        axes[1].axhline(100 * rows[0]["accuracy_unmodified"], color="k", ls=":", label="unmodified")
    axes[0].set_ylabel("mean R^2 (all tokens)")
    axes[1].set_ylabel("top-1 %, all layers replaced at all tokens")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean L0 (active features per token per layer)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_comparison(cmp: dict[str, Any]) -> str:
    lines = ["## 5. CLT vs per-layer transcoder (PLT) at equal k (curve: `r2_vs_l0.png`)", "",
             "| kind | k | L0 | R^2 | cosine | R^2 CLS | R^2 patches | top-1 CLS-replaced | top-1 all-replaced |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        lines.append(f"| {r['kind']} | {r['k']} | {r['l0']:.2f} | {r['r2']:.4f} | {r['cosine']:.4f} | {r['r2_cls']:.4f} | "
                     f"{r['r2_patches']:.4f} | {_pct(r['accuracy_cls'])} | {_pct(r['accuracy_all'])} |")
    v = cmp["verdict"]
    lines += ["", f"CLT better on R^2 at every k: **{v['clt_better_r2_everywhere']}**; on all-token replacement "
              f"accuracy at every k: **{v['clt_better_accuracy_everywhere']}**."]
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cltvit-eval", description="Evaluate a CLT on a backbone and a labelled dataset.")
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
    p.add_argument("--device")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", required=True, help="output directory for report.json / report.md / PNGs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .backbone import BackboneError, load_backbone
    from .checkpoint import CheckpointError, load_checkpoint, read_meta
    from .data import DatasetError, load_dataset

    try:
        if args.limit is not None and args.limit < 1:
            raise EvaluationError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise EvaluationError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.threads < 0:
            raise EvaluationError(f"--threads must be >= 0, got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        meta = read_meta(args.clt)
        recorded = meta.get("backbone", {})
        model = args.model or recorded.get("model")
        pretrained = args.pretrained if args.pretrained is not None else recorded.get("pretrained")
        if not model:
            raise EvaluationError("--model is needed: the checkpoint records no backbone")
        backbone = load_backbone(model, pretrained, device=args.device, seed=recorded.get("seed") or 0)
        clt, _ = load_checkpoint(args.clt, backbone, device=backbone.device)
        dataset = load_dataset(args.dataset, args.split, args.data_dir, args.class_list)
        cfg = EvalConfig(limit=args.limit, batch_size=args.batch_size, fidelity_images=args.fidelity_images,
                         cproj_images=args.cproj_images, random_seeds=args.seeds)
        report = evaluate(backbone, clt, dataset, args.out, cfg, extra={"checkpoint": str(args.clt)})
    except (EvaluationError, BackboneError, CheckpointError, DatasetError) as exc:
        print(f"cltvit-eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
