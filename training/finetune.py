"""Optional final phase: fine-tune a trained CLT through the replacement model (`finetune_clt`).

Per-layer MSE training reconstructs each MLP in isolation, but when the CLT replaces all MLPs at all
tokens, errors compound through attention and later layers. This phase runs the spliced ViT
(`training.vit.CltSplice`, tokens `cfg.tokens`, every layer replaced), backpropagates into the CLT
only (the backbone stays frozen), and minimises

    loss = recon_coef * sum_l FVU_l  (the CLT's own training loss on the true MLP activations)
         + match_coef * match

where `match` is either
- `kl`: KL(p_true || p_spliced) between zero-shot class distributions, p = softmax(logit_scale *
  <e/|e|, t_c> / temperature) over the given text embeddings t_c (needs class embeddings), or
- `cosine`: 1 - cos(e_spliced, e_true) of the image embeddings (no labels or text needed).
The FVU term keeps the per-layer reconstruction (and so the fidelity numbers) from drifting.

With `cls_aux_coef` > 0 the reconstruction term also carries the CLT's CLS AuxK
(`CrossLayerTranscoder.loss`): features that fired on no CLS token for `cls_dead_after` CLS tokens of
this phase reconstruct the residual at the CLS tokens. Without it, matching the replacement's logits
silences features at the CLS token that the training's CLS AuxK had revived (docs/fidelity.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from .model.clt import CrossLayerTranscoder
from .model.loss import LossConfig, clt_loss
from .model.vit import TOKEN_SETS, CltSplice, TokenSet, capture, forward

MATCH_LOSSES = ("kl", "cosine")


@dataclass
class FinetuneConfig:
    """Settings of the replacement-matching phase (steps are optimiser steps of `batch_images` images)."""

    steps: int = 300
    batch_images: int = 64
    lr: float = 1e-4
    loss: Literal["kl", "cosine"] = "kl"
    tokens: TokenSet = "all"
    match_coef: float = 1.0
    recon_coef: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    # CLS AuxK during this phase (see the module docstring); 0 turns it off
    cls_aux_coef: float = 0.0
    cls_aux_k: int = 64
    cls_dead_after: int = 1280  # CLS tokens (images): 20 steps of 64 images

    def __post_init__(self) -> None:
        if self.loss not in MATCH_LOSSES:
            raise ValueError(f"finetune loss must be one of {MATCH_LOSSES}, got {self.loss!r}")
        if self.tokens not in TOKEN_SETS:
            raise ValueError(f"finetune tokens must be one of {TOKEN_SETS}, got {self.tokens!r}")
        if self.steps < 0 or self.batch_images < 1 or not self.lr > 0:
            raise ValueError("finetune needs steps >= 0, batch_images >= 1 and lr > 0")
        if self.cls_aux_coef < 0 or self.cls_aux_k < 1 or self.cls_dead_after < 1:
            raise ValueError("finetune needs cls_aux_coef >= 0, cls_aux_k >= 1 and cls_dead_after >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.cls_aux_coef:  # off: its settings fix nothing, and runs recorded before it existed stay comparable
            for name in ("cls_aux_coef", "cls_aux_k", "cls_dead_after"):
                del d[name]
        return d


def match_loss(e_spliced: torch.Tensor, e_true: torch.Tensor, cfg: FinetuneConfig,
               text: torch.Tensor | None, logit_scale: float) -> torch.Tensor:
    """The `match` term for embeddings [B, D] (see module docstring)."""
    if cfg.loss == "cosine":
        return (1 - F.cosine_similarity(e_spliced, e_true, dim=-1)).mean()
    if text is None:
        raise ValueError("the kl match loss needs text embeddings of the classes")
    s = logit_scale / cfg.temperature
    log_p = (s * F.normalize(e_true, dim=-1) @ text.T).log_softmax(-1)
    log_q = (s * F.normalize(e_spliced, dim=-1) @ text.T).log_softmax(-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def finetune_clt(
    visual: torch.nn.Module,
    clt: CrossLayerTranscoder,
    pixels: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    text_embeddings: torch.Tensor | None = None,
    logit_scale: float = 100.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune `clt` in place on preprocessed images [N, 3, H, W]; returns first/last loss values.

    `text_embeddings` [C, D] (L2-normalised) are required for `loss="kl"`.
    """
    if cfg.loss == "kl" and text_embeddings is None:
        raise ValueError("finetune loss 'kl' needs text_embeddings (class embeddings); use loss='cosine' without them")
    dev = next(clt.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    text = text_embeddings.to(dev) if text_embeddings is not None else None
    params = [p for n, p in clt.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    L, Fn = clt.cfg.n_layers, clt.cfg.n_features
    clt.eval()  # inference activation rule (the one the replacement uses); gradients still flow
    since_fired_cls = torch.zeros(L, Fn, dtype=torch.long, device=dev)  # CLS tokens since the feature fired on one
    hist: list[dict[str, float]] = []
    t0 = time.time()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(pixels), (cfg.batch_images,), generator=gen)
        px = pixels[idx].to(dev)
        with torch.no_grad():
            cap = capture(visual, px, tokens="all")
        n_img, T, d = cap.mlp_in.shape[1:]
        if cfg.cls_aux_coef > 0:
            cls_rows = (torch.arange(n_img * T, device=dev) % T) == 0  # token 0 of each image, rows image-major
            out = clt_loss(clt, cap.mlp_in.reshape(L, -1, d), cap.mlp_out.reshape(L, -1, d),
                           LossConfig(cls_aux_k=cfg.cls_aux_k, cls_aux_coef=cfg.cls_aux_coef), cls_rows=cls_rows,
                           cls_dead=since_fired_cls >= cfg.cls_dead_after, inplace=True)
            recon, l0 = out.total, float(out.l0.mean())
            assert out.fired_cls is not None
            since_fired_cls += n_img
            since_fired_cls[out.fired_cls] = 0
        else:
            recon, l0 = _fvu_with_grad(clt, cap.mlp_in.reshape(L, -1, d), cap.mlp_out.reshape(L, -1, d))
        res = forward(visual, px, CltSplice(clt, tokens=cfg.tokens))
        match = match_loss(res.embedding, cap.embedding, cfg, text, logit_scale)
        loss = cfg.recon_coef * recon + cfg.match_coef * match
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        hist.append({"fvu_sum": float(recon.detach()), "match": float(match.detach()), "l0": l0})
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"finetune step {step}/{cfg.steps} fvu_sum {hist[-1]['fvu_sum']:.4f} {cfg.loss} {hist[-1]['match']:.5f} "
                f"{time.time() - t0:.0f}s")
    clt.eval()
    first = hist[: max(1, len(hist) // 10)]
    last = hist[-max(1, len(hist) // 10):]
    mean = lambda rows, k: float(sum(r[k] for r in rows) / len(rows)) if rows else float("nan")  # noqa: E731
    return {
        "config": cfg.to_dict(),
        "seconds": time.time() - t0,
        "match_first": mean(first, "match"),
        "match_last": mean(last, "match"),
        "fvu_sum_first": mean(first, "fvu_sum"),
        "fvu_sum_last": mean(last, "fvu_sum"),
    }


def _fvu_with_grad(clt: CrossLayerTranscoder, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(sum_l FVU_l of the CLT's raw reconstruction of [L, N, d] targets (differentiable), mean L0)."""
    recon, codes = clt(mlp_in)
    l0 = float(torch.stack([c.l0().float().mean() for c in codes]).mean())
    err = (recon - mlp_out).pow(2).sum(-1).mean(-1)
    var = (mlp_out - mlp_out.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-12)
    return (err / var).sum(), l0
