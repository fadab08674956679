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

Where in the image (`spatial_top_k` = S > 0). Block l's attention writes to the CLS token
  attn_cls_l = g_l * ( sum_h sum_m a[l,h,0,m] W_O[h] (W_V[h] LN1(x_m) + b_V[h]) + b_O ),
with a the CLS query's softmax weights, g_l the layer scale. Each class logit reads a residual
vector r linearly, logit_c(r) = <r, u_c>, with u_c = logit_scale / ||e|| / sigma *
centre(gamma_post * proj t_c) (ln_post's scale frozen, as for the terms above). So the `attn.l` term
of class c splits exactly into one scalar per head h and source token m,
  a[l,h,0,m] * <LN1(x_m), W_V[h]^T W_O[h]^T (g_l * u_c)>,
plus the value-bias part <W_O b_V, g_l * u_c> (softmax rows sum to 1) and the output-bias part
<b_O, g_l * u_c>. The class direction is folded through W_O^T first, so each (head, token) cell is one
dot product of size d / H with the value the attention mixed (W_V[h] LN1(x_m), kept per head): the
cost is O(S L d (d + T)) per image, not a [L, T, H, d] tensor.
Token 0 is the CLS->CLS cell; tokens 1.. are the patches in row-major grid order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from bundle.format import MODES, term_names

from .edits import Edits
from .vit import CltSplice, ForwardResult, blocks, check_spatial_supported, explicit_attention_supported, forward, layer_scale

Mode = Literal["cls", "all", "observe"]
__all__ = ["MODES", "Decomposition", "Mode", "SpatialDecomposition", "class_directions", "decompose", "direction_scale",
           "final_ln_map", "frozen_ln_map", "text_to_residual",
           "feature_writes", "spatial_parts", "spatial_weights", "splice_for_mode", "term_names"]


@dataclass
class SpatialDecomposition:
    """Where in the image, for the S top classes of each image (by logit, best first; rows past the
    class count C are padding: class -1 and zeros), in logit units:
    classes [B, S] int64; tokens [B, S, L, T] (heads summed; token 0 = CLS->CLS, 1.. = patches,
    row-major); bias [B, S, L, 2] (value-bias part, output-bias part); heads [B, L, H, T] (the
    per-head split of `tokens` for the first class, the prediction).
    For every class and layer, tokens.sum(T) + bias.sum(2) == that class's `attn.l` contribution."""

    classes: torch.Tensor
    tokens: torch.Tensor
    bias: torch.Tensor
    heads: torch.Tensor


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
    spatial: SpatialDecomposition | None = None


def splice_for_mode(clt: nn.Module, mode: Mode, encode: Callable[[int, torch.Tensor], Any] | None = None,
                    edits: Edits | None = None) -> CltSplice:
    """The CLT splice of `mode`; `encode` as `CltSplice`'s (None: the CLT's own); `edits` (cls and all
    modes only) as `CltSplice`'s."""
    if mode == "cls":
        return CltSplice(clt, tokens="cls", encode=encode, edits=edits)
    if mode == "all":
        return CltSplice(clt, tokens="all", encode=encode, edits=edits)
    if edits is not None:
        raise ValueError(f"edits need mode 'cls' or 'all' (the CLT must replace the MLPs it is edited in), got {mode!r}")
    if mode == "observe":
        return CltSplice(clt, tokens="cls", observe=True, encode=encode)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def frozen_inv_sigma(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The scale 1/sigma [B, 1] of LayerNorm `ln` at its input x [B, d] (e.g. ln_post at the final CLS
    residual), held as a constant by the decomposition."""
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    return torch.rsqrt(var + ln.eps)


def held_layernorm(ln: nn.LayerNorm, x: torch.Tensor, inv_sigma: torch.Tensor | float, shift: bool = True) -> torch.Tensor:
    """LayerNorm `ln` of x [..., d] with its scale 1/sigma [..., 1] given (held constant): affine in x;
    `shift=False` leaves out ln's bias, so that the map is linear (what a term of a sum goes through)."""
    out = (x - x.mean(dim=-1, keepdim=True)) * inv_sigma * ln.weight
    return out + ln.bias if shift else out


def final_ln_map(visual: nn.Module, x: torch.Tensor, inv_sigma: torch.Tensor | float, shift: bool = True) -> torch.Tensor:
    """The image embedding's map from the final residual: ln_post with its scale 1/sigma [..., 1] held,
    then proj; x [..., d] -> [..., D]. `shift=False`: without ln_post's bias (linear, for terms); an
    `inv_sigma` of 1 leaves the image's scale out (a direction per unit of 1/sigma, as the atlas keeps)."""
    out = held_layernorm(visual.ln_post, x, inv_sigma, shift)
    return out @ visual.proj if visual.proj is not None else out


def frozen_ln_map(visual: nn.Module, cls_resid: torch.Tensor, terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map residual-space terms [B, T', d] linearly to embedding space [B, T', D] with ln_post's scale
    frozen at `cls_resid` [B, d]. Returns (mapped terms, the embedding of ln_post's shift [D])."""
    ln = visual.ln_post
    inv_sigma = frozen_inv_sigma(ln, cls_resid)[:, None, :]  # [B, 1, 1]
    shift = ln.bias @ visual.proj if visual.proj is not None else ln.bias
    return final_ln_map(visual, terms, inv_sigma, shift=False), shift


def text_to_residual(visual: nn.Module) -> torch.Tensor:
    """A [D, d]: a text embedding t's residual-space direction t @ A before the image's own scale (proj^T,
    then ln_post's weight, centred over d as ln_post centres its input; linear in t, so a constant)."""
    ln = visual.ln_post
    A = visual.proj.T if visual.proj is not None else torch.eye(ln.weight.shape[0], dtype=ln.weight.dtype, device=ln.weight.device)
    A = A * ln.weight
    return A - A.mean(dim=-1, keepdim=True)


def direction_scale(visual: nn.Module, cls_resid: torch.Tensor, norm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The image's factor [B, 1] of its class directions: logit scale x ln_post's frozen 1/sigma at
    `cls_resid` [B, d] / ||e|| (`norm` [B, 1])."""
    return scale * frozen_inv_sigma(visual.ln_post, cls_resid) / norm


def class_directions(visual: nn.Module, cls_resid: torch.Tensor, norm: torch.Tensor, scale: torch.Tensor,
                     text: torch.Tensor) -> torch.Tensor:
    """The residual-space vectors u [B, S, d] with logit_c(r) = <r, u_c> for any residual term r
    (ln_post's scale frozen at `cls_resid` [B, d]; `norm` [B, 1] = ||e||; `text` [B, S, D] normalised)."""
    return (text @ text_to_residual(visual)) * direction_scale(visual, cls_resid, norm, scale)[:, :, None]


def spatial_weights(visual: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every block's attention weights, layer scale g_l folded in, laid out for `spatial_parts`: A =
    `text_to_residual` [D, d] (a text embedding t's class direction is u = (t @ A) * f), O [d, L*d]
    (column block l is g_l * W_O[l], so u @ O stacks W_O[l]^T (g_l * u) for all layers, heads
    concatenated) and the bias directions [d, 2L]: column l is g_l * W_O[l] b_V[l] (what the value
    biases add: the CLS query's weights sum to 1 over the tokens), column L + l is g_l * b_O[l]."""
    check_spatial_supported(visual)
    outs, vbias, obias = [], [], []
    for blk in blocks(visual):
        attn = blk.attn
        d = attn.embed_dim
        g = layer_scale(blk, d)
        outs.append(g[:, None] * attn.out_proj.weight)
        b_in = attn.in_proj_bias if attn.in_proj_bias is not None else attn.in_proj_weight.new_zeros(3 * d)
        vbias.append(g * (attn.out_proj.weight @ b_in[2 * d :]))
        b_out = attn.out_proj.bias if attn.out_proj.bias is not None else attn.in_proj_weight.new_zeros(d)
        obias.append(g * b_out)
    return text_to_residual(visual), torch.cat(outs, 1), torch.stack(vbias + obias, 1)


def spatial_parts(
    res: ForwardResult, text: torch.Tensor, factor: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split every layer's attention term, for the classes of the text embeddings [B, S, D] (class directions
    u = (text @ A) * factor, `class_directions`; `factor` [B, 1] = `direction_scale`), into (cells
    [L, B, S, T] per source token, heads summed; the first class's cells per head [L, B, H, T]; bias
    parts [B, S, 2L]: each layer's value biases (heads summed), then its output bias); `res` must come
    from `forward(..., record_attention=True)`, `weights` from `spatial_weights`.

    Cell (l, s, h, t) is a[l,h,t] * (W_O[l,h]^T g_l u_s) . (W_V[l,h] LN1(x_t)). One GEMM folds W_O^T
    into the class directions (o, [dh] per layer, head and class): in an ONNX export from the text side,
    t @ (A @ O), where A @ O is a product of the graph's constants that ONNX Runtime folds into one [D, L*d]
    constant when a session starts (a call then reads D x L*d numbers instead of d x L*d: ViT-B-32 18.9
    instead of 28.3 MB); eagerly (t @ A) @ O, with no [D, d] x [d, L*d] product per call. Then per layer one batched product o . v over the values as the attention mixed them
    ([B, H, T, dh], no copy of them) gives every (class, head, token) dot product [B, H, S, T], and the CLS
    query's weights scale those (S x T numbers per head, not the T x d values): summed over heads, the cells
    of all S classes; for the first class, the per-head cells.

    Every size but B is a Python int (from the weights' and the text's static shapes), so that a traced graph
    carries constants, not shape arithmetic on the inputs: on small models that arithmetic costs as
    much as the products."""
    A, O, bias_dirs = weights
    d, L = int(O.shape[0]), int(bias_dirs.shape[1]) // 2
    H, S = int(res.attn_weights.shape[2]), int(text.shape[1])
    dh = d // H
    if torch.onnx.is_in_onnx_export():
        O, bias_dirs = A @ O, A @ bias_dirs  # [D, L*d] and [D, 2L]: folded by ONNX Runtime's constant folding
    else:
        text = torch.matmul(text, A)  # [B, S, d]
    o = (torch.matmul(text, O) * factor[:, :, None]).reshape(-1, S, L, H, dh).permute(2, 0, 3, 1, 4)  # [L, B, H, S, dh]
    dots = torch.stack([torch.matmul(o_l, v.transpose(-1, -2)) for o_l, v in zip(o.unbind(0), res.head_values)])  # [L, B, H, S, T]
    cells = dots * res.attn_weights.unsqueeze(3)  # [L, B, H, S, T]
    bias = torch.matmul(text, bias_dirs) * factor[:, :, None]  # [B, S, 2L]
    return cells.sum(2), cells[:, :, :, 0], bias


def _spatial(
    visual: nn.Module, res: ForwardResult, logits: torch.Tensor, text_embeddings: torch.Tensor, norm: torch.Tensor,
    scale: torch.Tensor, top: int,
) -> SpatialDecomposition:
    """`SpatialDecomposition` of the `top` best classes of each image (padded past C, see there)."""
    D = int(text_embeddings.shape[1])  # static in a traced graph (C is the dynamic axis)
    # pad with -inf columns so that topk(top) works for any class count C (also C < top)
    pad = torch.full_like(logits[:, :1], float("-inf")).expand(-1, top)
    vals, idx = torch.cat([logits, pad], 1).topk(top, dim=1)  # [B, S]
    text = torch.cat([text_embeddings, text_embeddings.new_zeros(top, D)], 0)
    t_sel = text.index_select(0, idx.reshape(-1)).reshape(-1, top, D)  # [B, S, D]; zeros for padding
    factor = direction_scale(visual, res.cls_resid, norm, scale)  # [B, 1]
    tokens, heads, bias = spatial_parts(res, t_sel, factor, spatial_weights(visual))
    L = int(tokens.shape[0])
    return SpatialDecomposition(
        classes=torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1)),
        tokens=tokens.permute(1, 2, 0, 3),  # [B, S, L, T]
        bias=bias.reshape(-1, int(bias.shape[1]), 2, L).transpose(2, 3),  # [B, S, L, 2]
        heads=heads.transpose(0, 1),  # [B, L, H, T]
    )


def feature_writes(clt: nn.Module, idx: torch.Tensor, layer_of: torch.Tensor, per_layer: list[torch.Tensor]) -> torch.Tensor:
    """The total residual writes [B, K, d] (`total_write_matrix`, raw units) of the features idx [B, K]
    of layers `layer_of` ([K] or [B, K]); `per_layer`: idx split by layer ([B, k_i] each). In an ONNX
    export one Gather from all layers' writes stacked [L * F, d] (a constant of the graph, folded at
    export); eagerly one gather per layer (no per-call copy of all the writes)."""
    if torch.onnx.is_in_onnx_export():
        table = torch.cat([clt.total_write_matrix(i) for i in range(clt.cfg.n_layers)])  # [L * F, d]
        return nn.functional.embedding(idx + layer_of * clt.cfg.n_features, table)
    return torch.cat([nn.functional.embedding(ix, clt.total_write_matrix(i)) for i, ix in enumerate(per_layer)], 1)


def decompose(
    visual: nn.Module,
    clt: nn.Module,
    pixels: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor | float,
    mode: Mode = "cls",
    top_k_features: int = 16,
    spatial_top_k: int = 0,
    edits: Edits | None = None,
) -> Decomposition:
    """Run the (spliced) ViT on pixels [B, 3, H, W] and decompose its logits against L2-normalised
    text embeddings [C, D]; with `spatial_top_k` S > 0 also split the attention terms of the S best
    classes over heads and source tokens (`Decomposition.spatial`). With `edits` (one row per image,
    training/model/edits.py; cls and all modes) the edited model runs and is decomposed: its terms
    are the edited writes, so they still sum to its logits, and its top features are ranked among the
    edited codes. Trace-friendly: used as-is by the ONNX exporter."""
    splice = splice_for_mode(clt, mode, edits=edits)
    res: ForwardResult = forward(visual, pixels, splice, record_attention=spatial_top_k > 0,
                                 explicit_attention=explicit_attention_supported(visual), edits=edits, cls_only_last=True)
    L = clt.cfg.n_layers
    B, d = res.cls_resid.shape
    cls_factors = None if edits is None else edits.term_scale  # [B, T]: each term's factor at the CLS token
    # residual-space terms at the CLS token
    clt_terms = torch.stack([w[:, 0].sum(dim=1) for w in splice.writes], 1)  # [B, L, d]
    bias = (clt.b_dec * clt.out_scale[:, None]).sum(0).expand_as(res.cls_resid)
    if cls_factors is not None:
        bias = bias * cls_factors[:, 2 * L + 1 : 2 * L + 2]
    if mode == "observe":
        error = torch.stack([splice.true[l][:, 0] - splice.recon[l][:, 0] for l in range(L)]).sum(0)
    else:
        error = torch.zeros_like(bias)
    term_resid = torch.cat([res.embed_cls[:, None], res.attn_cls.transpose(0, 1), clt_terms, bias[:, None], error[:, None]], 1)  # [B, T, d]
    term_emb, shift = frozen_ln_map(visual, res.cls_resid, term_resid)
    # ln_post's shift belongs to the bias term: added as a [T, D] constant row (in a graph: one Add)
    bias_idx, n_terms, D = 2 * L + 1, int(term_resid.shape[1]), int(shift.shape[0])
    term_emb = term_emb + torch.cat([shift.new_zeros(bias_idx, D), shift[None], shift.new_zeros(n_terms - bias_idx - 1, D)])
    emb = res.embedding
    norm = emb.norm(dim=-1, keepdim=True)  # [B, 1]
    scale = torch.as_tensor(logit_scale, dtype=emb.dtype, device=emb.device)
    logits = scale * (emb / norm) @ text_embeddings.T  # [B, C]
    contributions = scale * (term_emb @ text_embeddings.T) / norm[:, :, None]  # [B, T, C]

    # feature level: contribution of each active CLS feature to the predicted logit, a * <w_f, u_pred>
    # with w_f the feature's total residual write and u_pred the predicted class's residual-space
    # direction (`class_directions`: ln_post's scale held), so that no [B, K, D] map through ln_post and
    # proj is formed; all layers' K = sum_i k_i active features at once
    pred = logits.argmax(dim=-1)
    u_pred = class_directions(visual, res.cls_resid, norm, scale, text_embeddings.index_select(0, pred)[:, None])  # [B, 1, d]
    codes = [splice.cls_code(i, B) for i in range(len(splice.codes))]  # (indices, values) [B, k_i] each
    all_idx, all_a = torch.cat([c[0] for c in codes], 1), torch.cat([c[1] for c in codes], 1)  # [B, K]
    if edits is None:  # every layer's code is inference_k wide: the layer of each column is a constant [K]
        layer_of = torch.arange(len(codes), device=all_idx.device).repeat_interleave(clt.cfg.inference_k)
    else:  # k + E columns per layer (E is dynamic in a graph)
        layer_of = torch.cat([torch.full_like(c[0], i) for i, c in enumerate(codes)], 1)  # [B, K]
    rows = feature_writes(clt, all_idx, layer_of, [c[0] for c in codes])  # [B, K, d]
    all_c = all_a * torch.matmul(rows, u_pred.transpose(1, 2))[..., 0]  # [B, K]
    if cls_factors is not None:  # the clt.i term's scale; appended edit columns (k0..) that set nothing never rank
        factors = torch.cat([cls_factors[:, 1 + L + i, None].expand_as(c[1]) for i, c in enumerate(codes)], 1)
        appended = torch.cat([torch.ones_like(c[1]).cumsum(1) > clt.cfg.inference_k for c in codes], 1)
        all_c = all_c * factors
        keys = torch.where(appended & (all_a == 0), torch.full_like(all_c, -1.0), all_c.abs())
    kk = min(top_k_features, all_c.shape[1] if edits is None else L * clt.cfg.inference_k)
    _, order = (all_c.abs() if edits is None else keys).topk(kk, dim=1)
    top_layer = layer_of[order] if edits is None else torch.gather(layer_of, 1, order)
    return Decomposition(
        logits=logits,
        embedding=emb,
        term_resid=term_resid,
        term_emb=term_emb,
        contributions=contributions,
        top_layer=top_layer,
        top_index=torch.gather(all_idx, 1, order),
        top_activation=torch.gather(all_a, 1, order),
        top_contribution=torch.gather(all_c, 1, order),
        spatial=_spatial(visual, res, logits, text_embeddings, norm, scale, spatial_top_k) if spatial_top_k > 0 else None,
    )
