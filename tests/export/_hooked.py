"""An independent reference for the fused graph: open_clip's own VisionTransformer.forward, with
forward hooks, and the CLT computed densely from its parameters.

Nothing here calls the project's ViT forward (`training/model/vit.py`), its decomposition
(`training/model/decompose.py`) or the CLT's own encode/decode methods: open_clip runs its blocks as
it always does, and hooks on each block's submodules

- read the residual stream's pieces at the CLS token: `ln_pre`'s output (the `embed` term), `ls_1`'s
  output (block l's attention write, `attn.l`), `ln_post`'s input (the final CLS residual);
- replace block l's MLP write (`ls_2`'s output) by the CLT's reconstruction, at the CLS token
  (`cls`), at every token (`all`) or nowhere (`observe`, where it is only recorded), reading the
  features of layer l from `ln_2`'s output in this very (spliced) run.

The CLT in dense form (L layers, F features, d width; every tensor float64):
  a_l = act((x_l / in_scale[l]) @ W_enc[l] + b_enc[l])                        [N, F]
  recon_j = out_scale[j] * (b_dec[j] + sum_{i<=j} a_i @ W_dec[i][j - i])      [N, d]
with `act` the CLT's inference rule (topk, batchtopk threshold, jumprelu, relu; capped at
cfg.inference_k active features). The CLS residual is then the sum of `embed`, `attn.l`,
`clt.i` = sum_{j>=i} out_scale[j] * a_i @ W_dec[i][j - i], `bias` = sum_j out_scale[j] * b_dec[j]
and, in observe mode, `error` = sum_l (true MLP write - recon_l); each term r maps to the embedding as
(ln_post.weight * (r - mean r) / sigma) @ proj, sigma being ln_post's scale for the final CLS residual
(plus ln_post.bias @ proj on the bias term), and to logit c as logit_scale * <e_r, t_c> / ||e||.

Interventions (`RefEdit`, one row's edits) are applied by hand in the same run: deleted patches'
pixel squares are overwritten with the fill before open_clip sees the image; dropped patches are
masked out as keys by passing `key_padding_mask` to every block's nn.MultiheadAttention (a forward
pre-hook); a term's scale multiplies `ln_pre`'s output (`embed`), `ls_1`'s output (`attn.l`), the
writes of CLT source layer s (`clt.s`) or the decoder biases (`bias`); a feature edit rewrites the
dense activation column a[:, index] = scale * a + shift before its writes are decoded.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

F64 = torch.float64


def dense_code(clt: nn.Module, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Inference-rule activations [N, F] (float64) of `layer` for raw MLP inputs x [N, d]."""
    cfg = clt.cfg
    z = (x.to(F64) / clt.in_scale[layer].to(F64)) @ clt.W_enc[layer].to(F64) + clt.b_enc[layer].to(F64)
    if cfg.activation == "topk":
        val, idx = z.topk(cfg.k, dim=-1)
        return torch.zeros_like(z).scatter(1, idx, val.clamp_min(0))
    if cfg.activation == "batchtopk":
        dense = torch.where(z > clt.batchtopk_threshold[layer].to(F64), z, 0.0)
    elif cfg.activation == "jumprelu":
        dense = torch.where(z > clt.log_threshold[layer].to(F64).exp(), z, 0.0)
    else:
        dense = z.clamp_min(0)
    val, idx = dense.topk(min(cfg.inference_k, cfg.n_features), dim=-1)
    return torch.zeros_like(z).scatter(1, idx, val)


def source_writes(clt: nn.Module, source: int, a: torch.Tensor) -> dict[int, torch.Tensor]:
    """Raw-unit writes {target j: [N, d]} of source layer `source` with activations a [N, F]."""
    w = clt.W_dec[source].to(F64)  # [n_targets, F, d]
    return {source + t: clt.out_scale[source + t].to(F64) * (a @ w[t]) for t in range(w.shape[0])}


@dataclass
class Reference:
    """What the hooked run gives for B images and C classes (float64 unless said otherwise):
    logits [B, C], embedding [B, D] (the model's own output, float32), terms {name: [B, d]} (CLS
    residual pieces), contributions [B, T, C] in bundle term order, final CLS residual [B, d],
    feature contributions [(layer, index, activation [B], contribution to the predicted class [B])]
    for every feature active at the CLS token of some image."""

    logits: torch.Tensor
    embedding: torch.Tensor
    terms: dict[str, torch.Tensor]
    contributions: torch.Tensor
    final_resid: torch.Tensor
    cls_codes: list[torch.Tensor]  # [B, F] per layer: CLS activations
    feature_contribution: torch.Tensor  # [B, L, F]: contribution of each CLS feature to the predicted logit


@dataclass
class RefEdit:
    """One row's interventions, as plain Python (the reference applies them by hand):
    features: (layer, index, scale, shift): a -> scale * a + shift at the tokens the CLT replaces;
    terms: {term name: factor} on that term's residual write, at the CLS token or, with all_tokens, at
    every token; delete: patches (row-major) whose pixels become `fill` [3]; drop: patches no token
    attends to (masked out as attention keys through nn.MultiheadAttention's key_padding_mask)."""

    features: list[tuple[int, int, float, float]] = field(default_factory=list)
    terms: dict[str, float] = field(default_factory=dict)
    all_tokens: bool = False
    delete: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)

    def factor(self, term: str, n_tokens: int) -> torch.Tensor:
        """[n_tokens] float64 factor of `term`'s write at each token (CLS first)."""
        s = float(self.terms.get(term, 1.0))
        out = torch.full((n_tokens,), s if self.all_tokens else 1.0, dtype=F64)
        out[0] = s
        return out


def delete_pixels(visual: nn.Module, pixels: torch.Tensor, patches: list[int], fill: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] with each listed patch's pixel square set to fill [3], patch by patch."""
    out = pixels.clone()
    ph, pw = (int(p) for p in visual.patch_size)
    gw = int(visual.grid_size[1])
    for p in patches:
        r, c = divmod(int(p), gw)
        out[:, :, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = fill.to(out.dtype)[:, None, None]
    return out


class _Hooks:
    def __init__(self, visual: nn.Module, clt: nn.Module, mode: str, edit: RefEdit | None = None) -> None:
        self.visual, self.clt, self.mode, self.edit = visual, clt, mode, edit
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        L = len(visual.transformer.resblocks)
        self.mlp_in: dict[int, torch.Tensor] = {}
        self.codes: dict[int, torch.Tensor] = {}  # layer -> [B, T', F] (T' = 1 for cls/observe)
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.attn_cls: dict[int, torch.Tensor] = {}
        self.true_cls: dict[int, torch.Tensor] = {}
        self.recon_cls: dict[int, torch.Tensor] = {}
        self.embed_cls: torch.Tensor | None = None
        self.final_cls: torch.Tensor | None = None
        self.handles: list = []

    def btd(self, t: torch.Tensor) -> torch.Tensor:
        """A block's [B, T, d] view of a transformer tensor (open_clip may run [T, B, d])."""
        return t if self.batch_first else t.transpose(0, 1)

    def install(self) -> None:
        v = self.visual
        self.handles.append(v.ln_pre.register_forward_hook(self._embed))
        self.handles.append(v.ln_post.register_forward_pre_hook(self._final))
        for l, blk in enumerate(v.transformer.resblocks):
            self.handles.append(blk.ls_1.register_forward_hook(lambda m, i, o, l=l: self._attn(l, o)))
            if self.edit is not None and self.edit.drop:
                self.handles.append(blk.attn.register_forward_pre_hook(self._drop_keys, with_kwargs=True))
            self.handles.append(blk.ln_2.register_forward_hook(lambda m, i, o, l=l: self.mlp_in.__setitem__(l, self.btd(o))))
            self.handles.append(blk.ls_2.register_forward_hook(lambda m, i, o, l=l: self._mlp(l, o)))

    def _scaled(self, term: str, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, d] with `term`'s factor applied per token (the edit's terms)."""
        f = self.edit.factor(term, o.shape[1]).to(o.dtype)  # type: ignore[union-attr]
        return o * f[None, :, None]

    def _embed(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        # ln_pre runs on [B, T, d] before the transformer (open_clip permutes after it, if at all)
        new = self._scaled("embed", out) if self.edit is not None else None
        self.embed_cls = (out if new is None else new)[:, 0].to(F64)
        return new

    def _attn(self, layer: int, out: torch.Tensor) -> torch.Tensor | None:
        o = self.btd(out)
        if self.edit is not None:
            o = self._scaled(f"attn.{layer}", o)
        self.attn_cls[layer] = o[:, 0].to(F64)
        if self.edit is None:
            return None
        return o if self.batch_first else o.transpose(0, 1)

    def _drop_keys(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        q = self.btd(args[0])
        mask = torch.zeros(q.shape[0], q.shape[1], dtype=torch.bool)
        mask[:, [1 + p for p in self.edit.drop]] = True  # type: ignore[union-attr]
        return args, {**kwargs, "key_padding_mask": mask}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _final(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        self.final_cls = (x[:, 0] if x.dim() == 3 else x).to(F64)

    def _mlp(self, layer: int, out: torch.Tensor) -> torch.Tensor | None:
        clt, h, o = self.clt, self.mlp_in[layer], self.btd(out)
        B, _, d = h.shape
        rows = h if self.mode == "all" else h[:, :1]  # tokens the CLT reads (and, unless observing, writes)
        t = rows.shape[1]
        a = dense_code(clt, layer, rows.reshape(B * t, d))
        ed = self.edit
        f_clt = torch.ones(t, dtype=F64) if ed is None else ed.factor(f"clt.{layer}", t)  # per token
        f_bias = torch.ones(t, dtype=F64) if ed is None else ed.factor("bias", t)
        for (fl, fi, fs, fb) in (ed.features if ed is not None else []):
            if fl == layer:
                a[:, fi] = fs * a[:, fi] + fb
        self.codes[layer] = a.reshape(B, t, -1)
        for j, w in source_writes(clt, layer, a).items():
            self.pending[j].append(w.reshape(B, t, d) * f_clt[None, :, None])
        bias = clt.out_scale[layer].to(F64) * clt.b_dec[layer].to(F64) * f_bias[None, :, None]
        recon = bias + sum(self.pending[layer])  # [B, t, d]
        self.recon_cls[layer] = recon[:, 0]
        self.true_cls[layer] = o[:, 0].to(F64)
        if self.mode == "observe":
            return None
        new = o.clone()
        new[:, :t] = recon.to(o.dtype)
        return new if self.batch_first else new.transpose(0, 1)


@contextmanager
def hooked(visual: nn.Module, clt: nn.Module, mode: str, edit: RefEdit | None = None) -> Iterator[_Hooks]:
    hooks = _Hooks(visual, clt, mode, edit)
    hooks.install()
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # key_padding_mask on the fast path zeroes masked queries' outputs
    try:
        yield hooks
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        hooks.remove()


def frozen_ln(visual: nn.Module, final_cls: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Residual-space vectors r [B, ..., d] -> embedding space [B, ..., D] with ln_post's scale frozen
    at final_cls [B, d] (no shift)."""
    ln = visual.ln_post
    var = final_cls.var(dim=-1, unbiased=False)
    inv = torch.rsqrt(var + ln.eps).reshape(-1, *([1] * (r.dim() - 1)))
    mapped = (r - r.mean(-1, keepdim=True)) * inv * ln.weight.to(F64)
    return mapped @ visual.proj.to(F64) if visual.proj is not None else mapped


@torch.no_grad()
def reference(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, logit_scale: float,
              mode: str, edit: RefEdit | None = None, fill: torch.Tensor | None = None) -> Reference:
    """Run open_clip's visual(pixels) with the CLT hooked in as `mode` says; decompose by hand. With
    `edit`, every image gets that row's interventions (deleted patches take `fill` [3])."""
    L = len(visual.transformer.resblocks)
    if edit is not None and edit.delete:
        pixels = delete_pixels(visual, pixels, edit.delete, fill)
    with hooked(visual, clt, mode, edit) as h:
        emb = visual(pixels)  # open_clip's own forward: [B, D]
    B = emb.shape[0]
    f = (lambda name: 1.0) if edit is None else (lambda name: float(edit.terms.get(name, 1.0)))  # at the CLS token
    clt_terms = []
    for i in range(L):
        a = h.codes[i][:, 0]  # [B, F] CLS activations of source i (edited)
        clt_terms.append(sum(source_writes(clt, i, a).values()) * f(f"clt.{i}"))
    bias = sum(clt.out_scale[j].to(F64) * clt.b_dec[j].to(F64) for j in range(L)).expand(B, -1) * f("bias")
    error = sum(h.true_cls[l] - h.recon_cls[l] for l in range(L)) if mode == "observe" else torch.zeros_like(bias)
    terms = {"embed": h.embed_cls, **{f"attn.{l}": h.attn_cls[l] for l in range(L)},
             **{f"clt.{l}": clt_terms[l] for l in range(L)}, "bias": bias, "error": error}
    stacked = torch.stack(list(terms.values()), 1)  # [B, T, d]
    mapped = frozen_ln(visual, h.final_cls, stacked)  # [B, T, D]
    ln = visual.ln_post
    shift = ln.bias.to(F64) @ visual.proj.to(F64) if visual.proj is not None else ln.bias.to(F64)
    mapped[:, list(terms).index("bias")] += shift
    e = emb.to(F64)
    norm = e.norm(dim=-1, keepdim=True)
    t = text.to(F64)
    logits = logit_scale * (e / norm) @ t.T
    contributions = logit_scale * (mapped @ t.T) / norm[:, :, None]
    # each CLS feature's contribution to the predicted class: activation x its total write, mapped
    pred = logits.argmax(-1)
    t_pred = t[pred]  # [B, D]
    feat = []
    for i in range(L):
        w = clt.W_dec[i].to(F64)
        total = sum(clt.out_scale[i + k].to(F64) * w[k] for k in range(w.shape[0]))  # [F, d]
        dirs = frozen_ln(visual, h.final_cls, total.expand(B, -1, -1))  # [B, F, D]
        feat.append(logit_scale * h.codes[i][:, 0] * (dirs * t_pred[:, None]).sum(-1) / norm * f(f"clt.{i}"))
    return Reference(logits=logits, embedding=emb, terms=terms, contributions=contributions, final_resid=h.final_cls,
                     cls_codes=[h.codes[i][:, 0] for i in range(L)], feature_contribution=torch.stack(feat, 1))


def max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
