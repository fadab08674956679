"""Exact additive decomposition of zero-shot logits into per-layer terms (eager reference).

The final CLS residual is a sum of terms (names in `term_names`):
  `embed` (patch+class+position embedding after ln_pre), `attn.l` (block l's attention output),
  `clt.i` (CLT source layer i's total write sum_{j>=i} W_dec[i->j] a_i), `bias` (decoder biases,
  plus ln_post's shift), `error` (observe mode: real MLP outputs minus CLT reconstructions; 0 else).
With ln_post's scale 1/sigma frozen at this image's value, each term r maps linearly to the
embedding, e_r = (gamma * (r - mean(r)) / sigma) @ proj, and to every logit,
  logit_c = logit_scale * <e / ||e||, t_c> = sum_r logit_scale * <e_r, t_c> / ||e||,
so contributions sum to the logits exactly (up to float rounding).

Modes: `cls` (CLT replaces the MLPs at the CLS token), `all` (at every token), `observe` (the model
runs unchanged; logits are the original model's and `error` carries what the CLT misses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bundle.format import MODES, term_names

from .vit import CltSplice, ForwardResult, forward

Mode = Literal["cls", "all", "observe"]
__all__ = ["MODES", "Decomposition", "Mode", "decompose", "frozen_ln_map", "splice_for_mode", "term_names"]


@dataclass
class Decomposition:
    """logits [B, C]; embedding [B, D] (unnormalised); term_resid [B, T, d]; term_emb [B, T, D];
    contributions [B, T, C]; top features of the predicted class: top_layer / top_index [B, K] int64,
    top_activation / top_contribution [B, K] float."""

    logits: torch.Tensor
    embedding: torch.Tensor
    term_resid: torch.Tensor
    term_emb: torch.Tensor
    contributions: torch.Tensor
    top_layer: torch.Tensor
    top_index: torch.Tensor
    top_activation: torch.Tensor
    top_contribution: torch.Tensor


def splice_for_mode(clt: nn.Module, mode: Mode) -> CltSplice:
    if mode == "cls":
        return CltSplice(clt, tokens="cls")
    if mode == "all":
        return CltSplice(clt, tokens="all")
    if mode == "observe":
        return CltSplice(clt, tokens="cls", observe=True)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def frozen_ln_map(visual: nn.Module, cls_resid: torch.Tensor, terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map residual-space terms [B, T', d] linearly to embedding space [B, T', D] with ln_post's scale
    frozen at `cls_resid` [B, d]. Returns (mapped terms, the embedding of ln_post's shift [D])."""
    ln = visual.ln_post
    var = cls_resid.var(dim=-1, unbiased=False, keepdim=True)  # [B, 1]
    inv_sigma = torch.rsqrt(var + ln.eps)[:, None, :]  # [B, 1, 1]
    centred = terms - terms.mean(dim=-1, keepdim=True)
    mapped = centred * inv_sigma * ln.weight
    shift = ln.bias
    if visual.proj is not None:
        mapped = mapped @ visual.proj
        shift = shift @ visual.proj
    return mapped, shift


def decompose(
    visual: nn.Module,
    clt: nn.Module,
    pixels: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor | float,
    mode: Mode = "cls",
    top_k_features: int = 16,
) -> Decomposition:
    """Run the (spliced) ViT on pixels [B, 3, H, W] and decompose its logits against L2-normalised
    text embeddings [C, D]. Trace-friendly: used as-is by the ONNX exporter."""
    splice = splice_for_mode(clt, mode)
    res: ForwardResult = forward(visual, pixels, splice)
    L = clt.cfg.n_layers
    B, d = res.cls_resid.shape
    # residual-space terms at the CLS token
    clt_terms = [w[:, 0].sum(dim=1) for w in splice.writes]  # each [B, d]
    bias = (clt.b_dec * clt.out_scale[:, None]).sum(0).expand(B, d)
    if mode == "observe":
        error = torch.stack([splice.true[l][:, 0] - splice.recon[l][:, 0] for l in range(L)]).sum(0)
    else:
        error = torch.zeros_like(bias)
    term_resid = torch.stack([res.embed_cls, *res.attn_cls.unbind(0), *clt_terms, bias, error], dim=1)  # [B, T, d]
    term_emb, shift = frozen_ln_map(visual, res.cls_resid, term_resid)
    bias_idx = 2 * L + 1
    term_emb = torch.cat([term_emb[:, :bias_idx], term_emb[:, bias_idx : bias_idx + 1] + shift, term_emb[:, bias_idx + 1 :]], 1)
    emb = res.embedding
    norm = emb.norm(dim=-1, keepdim=True)  # [B, 1]
    scale = torch.as_tensor(logit_scale, dtype=emb.dtype, device=emb.device)
    logits = scale * (emb / norm) @ text_embeddings.T  # [B, C]
    contributions = scale * (term_emb @ text_embeddings.T) / norm[:, :, None]  # [B, T, C]

    # feature level: contribution of each active CLS feature to the predicted logit
    pred = logits.argmax(dim=-1)
    t_pred = text_embeddings.index_select(0, pred)  # [B, D]
    layers, idxs, acts, contribs = [], [], [], []
    for i, code in enumerate(splice.codes):
        idx = code.idx.reshape(B, -1, code.idx.shape[-1])[:, 0]  # CLS row: [B, k]
        val = code.val.reshape(B, -1, code.val.shape[-1])[:, 0]
        rows = clt.total_write_matrix(i).index_select(0, idx.reshape(-1)).reshape(B, -1, d)  # [B, k, d]
        dirs, _ = frozen_ln_map(visual, res.cls_resid, rows)  # [B, k, D]
        c = scale * val * (dirs * t_pred[:, None, :]).sum(-1) / norm  # [B, k]
        layers.append(torch.full_like(idx, i))
        idxs.append(idx)
        acts.append(val)
        contribs.append(c)
    all_c = torch.cat(contribs, 1)
    kk = min(top_k_features, all_c.shape[1])
    _, order = all_c.abs().topk(kk, dim=1)
    pick = lambda t: torch.gather(torch.cat(t, 1), 1, order)  # noqa: E731
    return Decomposition(
        logits=logits,
        embedding=emb,
        term_resid=term_resid,
        term_emb=term_emb,
        contributions=contributions,
        top_layer=pick(layers),
        top_index=pick(idxs),
        top_activation=pick(acts),
        top_contribution=torch.gather(all_c, 1, order),
    )
