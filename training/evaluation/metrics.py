"""The measurements of the paper's evaluation suite: fidelity, cascaded replacement, C_proj and
faithfulness (sections 1-4 of the report; `training.evaluation.report` describes each section and
assembles them), plus `measure_transcoder`, the headline numbers of one transcoder.

All splicing and decomposition goes through `training.model.vit` and `training.model.decompose`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..clip import preprocess_stats, tensorise
from ..model.decompose import decompose, term_names
from ..model.vit import TOKEN_SETS, CltSplice, FixedOutputs, MlpReplacement, capture, forward

GROUPS = ("cls", "patches", "all")
FAITHFULNESS_UNITS = ("clt", "block")
# make_replace(layers, tokens, pixels_batch) -> the MLP replacement for one batch
ReplaceFactory = Callable[[Sequence[int], str, torch.Tensor], MlpReplacement]


class EvaluationError(ValueError):
    """Inputs to the evaluation do not fit together (shapes, empty dataset, bad option)."""


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


# ---------------------------------------------------------------------- headline numbers of one transcoder
def measure_transcoder(
    backbone: Any, clt: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
    fidelity_images: int = 1000, batch_size: int = 250,
) -> dict[str, Any]:
    """Headline numbers of one transcoder: mean R^2 / cosine / L0 (all, CLS, patches), the fraction of
    features that never fire (all tokens, CLS token) on the first `fidelity_images` images, and
    accuracy with all layers replaced at CLS / all tokens on all of `pixels`."""
    fid = fidelity(backbone.visual, clt, pixels[:fidelity_images], batch_size)
    rep = replacement_accuracy(backbone.visual, pixels, labels, text, backbone.n_layers, clt_replacement(clt),
                               batch_size, token_sets=("cls", "all"), starts=[0])
    return {
        "r2": fid["all"]["mean"]["r2"], "cosine": fid["all"]["mean"]["cosine"], "l0": fid["all"]["mean"]["l0"],
        "r2_cls": fid["cls"]["mean"]["r2"], "r2_patches": fid["patches"]["mean"]["r2"],
        "dead_fraction": fid["all"]["mean"]["dead_fraction"], "dead_fraction_cls": fid["cls"]["mean"]["dead_fraction"],
        "accuracy_unmodified": rep["baseline"], "accuracy_cls": rep["cls"][0], "accuracy_all": rep["all"][0],
    }
