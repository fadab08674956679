"""The CLT's training loss, beside the model (`clt.py`) rather than inside it.

`clt_loss(clt, mlp_in, mlp_out, cfg, dead=..., cls_rows=..., cls_dead=...)` on raw samples [L, N, d]:

    total = sum_l FVU_l
            + aux_coef * AuxK            (TopK/BatchTopK: dead features reconstruct the residual)
            + cls_aux_coef * CLS AuxK     (the same on the CLS rows, over features silent there)
            + preact_coef * pre-activation loss + sparsity_coef * tanh-L0 penalty   (JumpReLU)

All terms in normalised space (x / in_scale, y / out_scale). Rules that train sparsely
(`sparsifier.trains_sparse`: TopK, BatchTopK) choose their active (and AuxK) features without autograd
and re-attach only those through `GatherPreactAll`, so backward costs O(N*k*d) per layer instead of a
dense [d, N] x [N, F] matmul, and no [N, F] tensor is kept; the others (JumpReLU, ReLU) run dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .clt import CrossLayerTranscoder
from .sparse import DecodeSourceInto, GatherPreactAll
from .sparsifiers import JumpReLU, SparseCode


@dataclass(frozen=True)
class LossConfig:
    """Coefficients and widths of the auxiliary terms (see the module docstring)."""

    aux_k: int = 256  # AuxK: dead features per token that reconstruct the residual
    aux_coef: float = 1 / 32
    sparsity_coef: float = 0.0  # JumpReLU tanh-L0 penalty
    sparsity_c: float = 4.0
    preact_coef: float = 3e-6  # JumpReLU pre-activation loss
    cls_aux_k: int = 64
    cls_aux_coef: float = 0.0


@dataclass
class CLTLoss:
    """Loss terms of one batch (normalised space). `fvu` [L] is per-layer fraction of variance unexplained."""

    total: torch.Tensor
    fvu: torch.Tensor
    aux: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor  # [L] mean active features per token
    fired: torch.Tensor = field(repr=False)  # [L, F] bool: feature active on some token of the batch
    cls_aux: torch.Tensor | None = None  # the CLS-token auxiliary loss (None when not computed)
    fired_cls: torch.Tensor | None = field(default=None, repr=False)  # [L, F] bool: active on a CLS row (when rows are marked)


@dataclass
class _Encoded:
    """Codes of all L layers with gradient; AuxK codes of the layers that have dead features; the dense
    pre-activations [N, F] per layer (dense path only, for JumpReLU's penalties)."""

    codes: list[SparseCode]
    aux: dict[int, SparseCode]
    preacts: list[torch.Tensor]


def _encode_sparse(clt: CrossLayerTranscoder, x: torch.Tensor, dead: torch.Tensor | None, aux_k: int) -> _Encoded:
    """Sparse path on normalised x [L, N, d]: each layer's selection (and the top `aux_k` dead features,
    `dead` [L, F]) chosen without autograd, their pre-activations re-attached in one `GatherPreactAll`."""
    selections, sel_idx, sel_z, aux_width = [], [], [], {}
    for l in range(clt.cfg.n_layers):
        with torch.no_grad():
            z = torch.addmm(clt.b_enc[l], x[l], clt.W_enc[l])
            sel = clt.select(l, z)
            idx = sel.idx
            if dead is not None and bool(dead[l].any()):
                kk = min(aux_k, int(dead[l].sum()))
                aux_idx = z.masked_fill(~dead[l], float("-inf")).topk(kk, dim=-1).indices
                aux_width[l] = kk
                idx = torch.cat([idx, aux_idx], 1)
            selections.append(sel)
            sel_idx.append(idx)
            sel_z.append(z.gather(1, idx))
            del z
    vals = GatherPreactAll.apply(x, clt.W_enc, clt.b_enc, tuple(sel_idx), tuple(sel_z))
    codes, aux = [], {}
    for l, sel in enumerate(selections):
        w = sel.idx.shape[1]
        codes.append(sel.code_of_values(vals[l][:, :w]))
        if l in aux_width:
            aux[l] = SparseCode(sel_idx[l][:, w:].contiguous(), F.relu(vals[l][:, w:]))
    return _Encoded(codes, aux, [])


def _encode_dense(clt: CrossLayerTranscoder, x: torch.Tensor) -> _Encoded:
    """Dense path on normalised x [L, N, d]: full pre-activations with autograd, the training rule on them."""
    zs = [x[l] @ clt.W_enc[l] + clt.b_enc[l] for l in range(clt.cfg.n_layers)]
    return _Encoded([clt.activate(l, z) for l, z in enumerate(zs)], {}, zs)


def _decode(clt: CrossLayerTranscoder, n_tokens: int, enc: _Encoded) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Normalised reconstructions [L, N, d] (decoder bias included) and each AuxK layer's prediction [N, d]
    (its own-layer decoder), one `DecodeSourceInto` node per source layer."""
    L, d = clt.cfg.n_layers, clt.cfg.d_model
    recon = clt.b_dec[:, None, :].expand(L, n_tokens, d).clone()
    aux_pred = {}
    for i, c in enumerate(enc.codes):
        a = enc.aux.get(i)
        recon, pred = DecodeSourceInto.apply(i, recon, c.idx, c.val, clt.W_dec[i], a.idx if a else None, a.val if a else None)
        if a is not None:
            aux_pred[i] = pred
    return recon, aux_pred


def _normalised_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 / Var(target), both [n, d], averaged over rows."""
    e_var = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return (pred - target).pow(2).sum(-1).mean() / e_var


def aux_loss(aux_pred: dict[int, torch.Tensor], resid: torch.Tensor) -> torch.Tensor:
    """AuxK: the sum over layers with dead features of the normalised error of their prediction [N, d] of
    the (detached) residual resid [L, N, d]."""
    return torch.stack([_normalised_mse(pred, resid[l]) for l, pred in aux_pred.items()]).sum()


def cls_aux_loss(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, recon: torch.Tensor, rows: torch.Tensor,
                 dead: torch.Tensor, aux_k: int) -> torch.Tensor | None:
    """CLS AuxK on normalised x, y, recon [L, N, d], rows [N] bool, dead [L, F] bool: the sum over layers
    with dead features of ||aux prediction - residual||^2 / Var(residual) on the marked rows (None: no layer).

    On the CLS rows only, the top `aux_k` of the features that have not fired on a CLS row for a while
    (by pre-activation) reconstruct the residual of the reconstruction, as AuxK does over all tokens. It
    targets features that fire on patches but never at the CLS token, which AuxK over all tokens does not
    see as dead. Dense over the dead features of the n marked rows ([n, F_dead] pre-activations): those
    rows are a small part of a batch, so this is cheap next to the sparse main path.
    """
    terms = []
    for l in range(clt.cfg.n_layers):
        feats = dead[l].nonzero().squeeze(1)
        if feats.numel() == 0:
            continue
        xr, resid = x[l][rows], (y[l] - recon[l])[rows]  # [n, d] each
        z = torch.addmm(clt.b_enc[l][feats], xr, clt.W_enc[l][:, feats])  # [n, F_dead]
        val, j = z.topk(min(aux_k, feats.numel()), dim=-1)  # [n, k']
        rows_w = clt.W_dec[l][0].index_select(0, feats)[j]  # [n, k', d]: own-layer decoder rows
        # ReLU forward, identity backward: at the CLS token these features' pre-activations are
        # below zero (that is why they are silent there), so a plain ReLU would pass no gradient
        # back; this way the encoder raises them where their decoder row helps the residual
        act = val + (F.relu(val) - val).detach()
        pred = torch.einsum("nk,nkd->nd", act, rows_w)
        terms.append(_normalised_mse(pred, resid))
    return torch.stack(terms).sum() if terms else None


def jumprelu_penalties(log_threshold: torch.Tensor, W_dec: list[torch.Tensor] | nn.ParameterList,
                       preacts: list[torch.Tensor], codes: list[SparseCode] | None, c: float
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pre-activation loss, tanh-L0 penalty or None when `codes` is None), each summed over layers:
    sum_f ReLU(theta_f - z_f) * ||d_f|| and sum_f tanh(c * a_f * ||d_f||) per token, averaged over tokens
    (||d_f||: feature f's decoder norm summed over its targets). log_threshold [L, F], W_dec[l] [n_targets, F, d],
    preacts[l] [N, F], codes[l] the layer's active features; F may be one shard's features."""
    L, Fn = log_threshold.shape
    dec_norms = [W_dec[l].norm(dim=-1).sum(0) for l in range(L)]  # [F] each
    pre = torch.stack(
        [(F.relu(log_threshold[l].exp() - preacts[l]) * dec_norms[l]).sum(-1).mean() for l in range(L)]
    ).sum()
    if codes is None:
        return pre, None
    sparsity = torch.stack(
        [torch.tanh(c * codes[l].dense(Fn) * dec_norms[l]).sum(-1).mean() for l in range(L)]
    ).sum()
    return pre, sparsity


def normalise_samples(in_scale: torch.Tensor, out_scale: torch.Tensor, mlp_in: torch.Tensor, mlp_out: torch.Tensor,
                      inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) = (mlp_in / in_scale, mlp_out / out_scale), samples [L, N, d], scales [L]; `inplace` divides
    the given tensors (saves two batch-sized copies; the caller must not reuse them)."""
    if inplace:
        return mlp_in.div_(in_scale[:, None, None]), mlp_out.div_(out_scale[:, None, None])
    return mlp_in / in_scale[:, None, None], mlp_out / out_scale[:, None, None]


def fvu(recon: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[L] fraction of variance unexplained per layer: ||recon - y||^2 / Var(y) over tokens, both [L, N, d]."""
    err = (recon - y).pow(2).sum(-1).mean(-1)
    var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-8)
    return err / var


@torch.no_grad()
def fired_features(codes: list[SparseCode], n_features: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[L, F] bool: the feature is active on some token (of the rows marked by `rows` [N] bool, when given)."""
    fired = torch.zeros(len(codes), n_features, dtype=torch.bool, device=codes[0].idx.device)
    for l, c in enumerate(codes):
        idx, val = (c.idx, c.val) if rows is None else (c.idx[rows], c.val[rows])
        fired[l, idx[val != 0]] = True
    return fired


def clt_loss(
    clt: CrossLayerTranscoder,
    mlp_in: torch.Tensor,
    mlp_out: torch.Tensor,
    cfg: LossConfig = LossConfig(),
    *,
    dead: torch.Tensor | None = None,
    cls_rows: torch.Tensor | None = None,
    cls_dead: torch.Tensor | None = None,
    inplace: bool = False,
) -> CLTLoss:
    """Training loss of `clt` on raw samples mlp_in, mlp_out [L, N, d] (see the module docstring).

    `dead` [L, F] bool: features for AuxK (TopK/BatchTopK). `cls_rows` [N] bool marks the CLS-token rows
    and `cls_dead` [L, F] the features silent at the CLS token for a while (CLS AuxK). `inplace=True`
    normalises mlp_in / mlp_out in place (saves two batch-sized copies; the caller must not reuse them).
    """
    x, y = normalise_samples(clt.in_scale, clt.out_scale, mlp_in, mlp_out, inplace)
    sparse = clt.sparsifier.trains_sparse
    use_aux = dead is not None and sparse and cfg.aux_coef > 0 and bool(dead.any())
    enc = _encode_sparse(clt, x, dead if use_aux else None, cfg.aux_k) if sparse else _encode_dense(clt, x)
    recon, aux_pred = _decode(clt, x.shape[1], enc)
    per_layer = fvu(recon, y)
    total = per_layer.sum()
    zero = total.new_zeros(())
    aux = zero
    if aux_pred:
        aux = aux_loss(aux_pred, (y - recon).detach())
        total = total + cfg.aux_coef * aux
    cls_aux = None
    if cls_rows is not None and cls_dead is not None and cfg.cls_aux_coef > 0 and bool(cls_rows.any()):
        cls_aux = cls_aux_loss(clt, x, y, recon.detach(), cls_rows, cls_dead, cfg.cls_aux_k)
        if cls_aux is not None:
            total = total + cfg.cls_aux_coef * cls_aux
    sparsity = zero
    if isinstance(clt.sparsifier, JumpReLU):
        pre, penalty = jumprelu_penalties(clt.log_threshold, clt.W_dec, enc.preacts,
                                          enc.codes if cfg.sparsity_coef > 0 else None, cfg.sparsity_c)
        total = total + cfg.preact_coef * pre
        if penalty is not None:
            sparsity = penalty
            total = total + cfg.sparsity_coef * sparsity
    with torch.no_grad():
        l0 = torch.stack([c.l0().float().mean() for c in enc.codes])
    fired = fired_features(enc.codes, clt.cfg.n_features)
    fired_cls = fired_features(enc.codes, clt.cfg.n_features, cls_rows) if cls_rows is not None else None
    return CLTLoss(total=total, fvu=per_layer.detach(), aux=aux.detach(), sparsity=sparsity.detach(), l0=l0, fired=fired,
                   cls_aux=None if cls_aux is None else cls_aux.detach(), fired_cls=fired_cls)
