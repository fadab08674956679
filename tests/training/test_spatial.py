"""Where in the image (training/model/decompose.py, `spatial_top_k`): the per-head, per-source-token split
of the attention terms.

- Completeness, eager, for every mode, class and layer: the cells over heads and tokens plus the
  value-bias and output-bias parts equal that class's `attn.l` contribution.
- An independent reference for the per-head maps from open_clip's own modules: forward hooks on the
  real model (`visual(pixels)`, which is the `observe` mode's forward) record each attention module's
  input and output and ln_post's input; the maps are then computed by hand in float64 (softmax from
  the module's in_proj weights, full d-dimensional head outputs, the frozen ln_post and projection
  applied last), checked first against the module's own output, then compared with `decompose`.
  On the tiny model (4x4 grid) and, slow, on the ViT-B-16 architecture (14x14 grid).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.model import vit
from training.model.backbone import load_backbone
from training.model.decompose import MODES, decompose
from training.testing import random_clt


def _text(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _pixels(backbone, n: int, seed: int) -> torch.Tensor:
    H, W = backbone.image_size
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_classes", [3, 5])
@torch.no_grad()
def test_spatial_parts_sum_to_every_attention_term(tiny_backbone, tiny_clt, mode, n_classes):
    """S = 5 >= C: every class of every image has maps; each (image, class, layer) is complete. With C = 3
    the last two rows are padding (class -1, zero maps)."""
    S, L, T = 5, tiny_backbone.n_layers, tiny_backbone.n_tokens
    px = _pixels(tiny_backbone, 4, seed=1)
    d = decompose(tiny_backbone.visual, tiny_clt, px, _text(n_classes, tiny_backbone.embed_dim, 2),
                  tiny_backbone.logit_scale, mode, spatial_top_k=S)
    sp = d.spatial
    H = tiny_backbone.visual.transformer.resblocks[0].attn.num_heads
    assert sp.classes.shape == (4, S) and sp.tokens.shape == (4, S, L, T) and sp.bias.shape == (4, S, L, 2)
    assert sp.heads.shape == (4, L, H, T)
    assert (sp.classes[:, :n_classes].sort(1).values == torch.arange(n_classes)).all()  # every class once
    assert (sp.classes[:, n_classes:] == -1).all() and (sp.tokens[:, n_classes:] == 0).all()
    assert (sp.classes[:, 0] == d.logits.argmax(1)).all()
    scale = d.contributions[:, 1 : 1 + L].abs().max()
    for b in range(4):
        for s in range(n_classes):
            c = int(sp.classes[b, s])
            assert d.logits[b, c] == d.logits[b].sort(descending=True).values[s]  # ranked by logit
            for layer in range(L):
                total = sp.tokens[b, s, layer].sum() + sp.bias[b, s, layer].sum()
                assert abs(float(total - d.contributions[b, 1 + layer, c])) <= 1e-5 * float(scale), (b, s, layer)
    torch.testing.assert_close(sp.heads.sum(2), sp.tokens[:, 0], atol=1e-6, rtol=0)
    assert sp.tokens[:, :n_classes, :, 1:].abs().min(-1).values.max() > 0  # the patch cells carry something


@torch.no_grad()
def test_spatial_maps_do_not_change_the_decomposition(tiny_backbone, tiny_clt):
    """Recording the attention (written out, `vit.attention_recorded`) leaves logits and terms as they
    were (fp32 rounding), and the values it keeps are each head's W_V LN1(x) from the module's weights."""
    px, text = _pixels(tiny_backbone, 3, 3), _text(10, tiny_backbone.embed_dim, 3)
    for mode in MODES:
        a = decompose(tiny_backbone.visual, tiny_clt, px, text, tiny_backbone.logit_scale, mode)
        b = decompose(tiny_backbone.visual, tiny_clt, px, text, tiny_backbone.logit_scale, mode, spatial_top_k=5)
        assert a.spatial is None
        torch.testing.assert_close(a.contributions, b.contributions, atol=1e-5, rtol=0)
    res = vit.forward(tiny_backbone.visual, px, record_attention=True)
    torch.testing.assert_close(res.embedding, tiny_backbone.visual(px), atol=1e-5, rtol=0)
    L, H, d = tiny_backbone.n_layers, tiny_backbone.visual.transformer.resblocks[0].attn.num_heads, tiny_backbone.d_model
    assert res.attn_values.shape == (L, 3, tiny_backbone.n_tokens, d)
    blk = tiny_backbone.visual.transformer.resblocks[0]
    x0 = vit.embed(tiny_backbone.visual, px)
    want = blk.ln_1(x0) @ blk.attn.in_proj_weight[2 * d :].T
    torch.testing.assert_close(res.attn_values[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.attn_weights.sum(-1), torch.ones(res.attn_weights.shape[:-1]))


def hooked_reference(backbone, pixels: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """Per-head, per-token maps [B, C, L, H, T] (value bias excluded) of the unmodified model, by hand in
    float64 from what forward hooks on open_clip's own modules record (module docstring)."""
    visual = backbone.visual
    inputs, outputs, post = [], [], []
    handles = [visual.ln_post.register_forward_pre_hook(lambda m, args: post.append(args[0]))]
    for blk in visual.transformer.resblocks:
        handles.append(blk.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
        handles.append(blk.attn.register_forward_hook(lambda m, args, out: outputs.append(out[0])))
    try:
        with torch.no_grad():
            emb = visual(pixels).double()
    finally:
        for h in handles:
            h.remove()

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double()

    def split(t: torch.Tensor, H: int) -> torch.Tensor:  # [B, T, d] -> [B, H, T, d / H]
        return t.reshape(t.shape[0], t.shape[1], H, -1).transpose(1, 2)

    cls = f64(post[0][:, 0])  # final CLS residual [B, d]
    ln = visual.ln_post
    sigma = torch.sqrt(cls.var(-1, unbiased=False, keepdim=True) + ln.eps)  # [B, 1]
    proj = f64(visual.proj)

    def logit_of(r: torch.Tensor) -> torch.Tensor:
        """[B, ..., d] residual vectors -> [B, ..., C] their linear share of every logit (ln_post frozen)."""
        z = (r - r.mean(-1, keepdim=True)) / sigma.reshape(-1, *[1] * (r.dim() - 2), 1) * f64(ln.weight)
        e = z @ proj @ text.double().T
        return backbone.logit_scale * e / emb.norm(dim=-1).reshape(-1, *[1] * (r.dim() - 1))

    maps = []
    for blk, x, out in zip(visual.transformer.resblocks, inputs, outputs):
        attn = blk.attn
        d, H = attn.embed_dim, attn.num_heads
        dh = d // H
        W, bias = f64(attn.in_proj_weight), f64(attn.in_proj_bias)
        x = f64(x)  # [B, T, d]
        q, k, v = (x @ W[i * d : (i + 1) * d].T + bias[i * d : (i + 1) * d] for i in range(3))
        a = torch.softmax(split(q, H) @ split(k, H).transpose(-1, -2) / dh**0.5, -1)[:, :, 0]  # [B, H, T]
        W_O = f64(attn.out_proj.weight).reshape(d, H, dh)
        # full d-dim write of head h reading token m, value bias included: [B, H, T, d]
        per_head = a[..., None] * torch.einsum("dhe,bhte->bhtd", W_O, split(v, H))
        total = per_head.sum((1, 2)) + f64(attn.out_proj.bias)
        assert (total - f64(out[:, 0])).abs().max() <= 1e-4 * max(1.0, float(total.abs().max())), "hand reference is off"
        v_bias = split(torch.zeros_like(v) + bias[2 * d :], H)
        no_bias = per_head - a[..., None] * torch.einsum("dhe,bhte->bhtd", W_O, v_bias)
        gamma = f64(getattr(blk.ls_1, "gamma", torch.ones(d)))
        maps.append(logit_of(no_bias * gamma))  # [B, H, T, C]
    return torch.stack(maps, 1).permute(0, 4, 1, 2, 3).numpy()  # [B, C, L, H, T]


def check_against_hooks(backbone, clt, pixels: torch.Tensor, text: torch.Tensor, S: int) -> None:
    ref = hooked_reference(backbone, pixels, text)
    with torch.no_grad():
        d = decompose(backbone.visual, clt, pixels, text, backbone.logit_scale, "observe", spatial_top_k=S)
    sp = d.spatial
    scale = np.abs(ref).max()
    for b in range(len(pixels)):
        pred = int(sp.classes[b, 0])
        err = np.abs(sp.heads[b].numpy() - ref[b, pred]).max()
        assert err <= 1e-4 * scale, f"image {b}: per-head map off by {err:.3g} (scale {scale:.3g})"
        for s in range(S):
            c = int(sp.classes[b, s])
            err = np.abs(sp.tokens[b, s].numpy() - ref[b, c].sum(1)).max()
            assert err <= 1e-4 * scale, f"image {b}, class {c}: map off by {err:.3g}"


def test_per_head_maps_match_open_clip_hooks(tiny_backbone, tiny_clt):
    check_against_hooks(tiny_backbone, tiny_clt, _pixels(tiny_backbone, 3, 7), _text(10, tiny_backbone.embed_dim, 7), S=5)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a 12-layer ViT at 224 pixels, eager and hooked, in float64
def test_per_head_maps_match_open_clip_hooks_vitb16():
    """The ViT-B-16 architecture (random weights): 12 layers x 12 heads over a 14x14 grid + CLS."""
    backbone = load_backbone("ViT-B-16", None, device="cpu", seed=0)
    clt = random_clt(backbone.n_layers, backbone.d_model, n_features=256, k=8, seed=2)
    assert tuple(backbone.visual.grid_size) == (14, 14) and backbone.n_tokens == 197
    check_against_hooks(backbone, clt, _pixels(backbone, 2, 8), _text(20, backbone.embed_dim, 8), S=3)
