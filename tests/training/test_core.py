"""Basics of the explicit ViT forward (training/vit.py) and the decomposition (training/decompose.py)."""
from __future__ import annotations

import pytest
import torch

from training.model import vit
from training.model.decompose import MODES, decompose, final_ln_map, frozen_inv_sigma, frozen_ln_map, term_names


@pytest.fixture(scope="module")
def pixels(tiny_backbone) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    h, w = tiny_backbone.image_size
    return torch.randn(3, 3, h, w, generator=g)


@torch.no_grad()
def test_forward_equals_open_clip_exactly(tiny_backbone, pixels):
    ours = vit.forward(tiny_backbone.visual, pixels).embedding
    theirs = tiny_backbone.visual(pixels)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("explicit", [False, True])
@torch.no_grad()
def test_cls_only_last_block_keeps_open_clips_embedding(tiny_backbone, pixels, explicit):
    """The last block run for the CLS query and token only (open_clip's own attention module with the CLS
    query, or the written-out attention) still gives open_clip's embedding: nothing it holds reads the
    patch tokens after the last block's keys and values."""
    visual = tiny_backbone.visual
    res = vit.forward(visual, pixels, explicit_attention=explicit, cls_only_last=True)
    torch.testing.assert_close(res.embedding, visual(pixels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splice", ["none", "cls", "all", "observe"])
@torch.no_grad()
def test_cls_only_last_block_changes_nothing_the_result_holds(tiny_backbone, tiny_clt, pixels, splice):
    """With and without cls_only_last every field of the result (the CLS pieces, the recorded values and
    CLS-query weights of every block) and the CLT's CLS codes, writes and reconstructions agree; the
    last layer's code then has one row per image."""
    visual, L, B = tiny_backbone.visual, tiny_backbone.n_layers, pixels.shape[0]

    def run(trim: bool):
        rep = None if splice == "none" else vit.CltSplice(tiny_clt, tokens="cls" if splice == "observe" else splice,
                                                          observe=splice == "observe")
        return vit.forward(visual, pixels, rep, record_attention=True, cls_only_last=trim), rep

    (full, s_full), (trim, s_trim) = run(False), run(True)
    for name in ("embedding", "cls_resid", "embed_cls", "attn_cls", "mlp_cls", "attn_weights"):
        torch.testing.assert_close(getattr(trim, name), getattr(full, name), atol=1e-5, rtol=1e-5, msg=name)
    for v_trim, v_full in zip(trim.head_values, full.head_values, strict=True):
        torch.testing.assert_close(v_trim, v_full, atol=1e-5, rtol=1e-5)
    if s_full is None:
        return
    for layer in range(L):
        for a, b in zip(s_trim.cls_code(layer, B), s_full.cls_code(layer, B)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_trim.writes[layer][:, 0], s_full.writes[layer][:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_trim.recon[layer][:, 0], s_full.recon[layer][:, 0], atol=1e-5, rtol=1e-5)
    assert s_trim.codes[L - 1].idx.shape[0] == B  # the last layer encoded the CLS token only
    if splice == "observe":
        torch.testing.assert_close(s_trim.true[L - 1][:, 0], s_full.true[L - 1][:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", ["all", "cls", "patches"])
@torch.no_grad()
def test_captured_mlp_outputs_spliced_back_reproduce_embedding(tiny_backbone, pixels, tokens):
    visual = tiny_backbone.visual
    cap = vit.capture(visual, pixels, tokens)
    L, B, T = tiny_backbone.n_layers, pixels.shape[0], tiny_backbone.n_tokens
    expect_t = {"all": T, "cls": 1, "patches": T - 1}[tokens]
    assert cap.mlp_in.shape == (L, B, expect_t, tiny_backbone.d_model) == cap.mlp_out.shape
    res = vit.forward(visual, pixels, vit.FixedOutputs(cap.mlp_out, range(L), tokens))
    assert (res.embedding - visual(pixels)).abs().max() <= 1e-5
    # perturbing the spliced outputs must change the embedding (the splice is really used)
    noise = torch.randn(cap.mlp_out.shape, generator=torch.Generator().manual_seed(3))
    bumped = vit.forward(visual, pixels, vit.FixedOutputs(cap.mlp_out + noise, range(L), tokens))
    assert (bumped.embedding - res.embedding).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_decomposition_is_complete(tiny_backbone, tiny_clt, pixels, mode):
    C = 5
    text = torch.nn.functional.normalize(torch.randn(C, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    d = decompose(tiny_backbone.visual, tiny_clt, pixels, text, tiny_backbone.logit_scale, mode=mode, top_k_features=4)
    B, L = pixels.shape[0], tiny_backbone.n_layers
    assert d.contributions.shape == (B, len(term_names(L)), C)
    torch.testing.assert_close(d.contributions.sum(1), d.logits, atol=1e-4, rtol=1e-5)
    # the terms in embedding space add up to the (unnormalised) embedding
    torch.testing.assert_close(d.term_emb.sum(1), d.embedding, atol=1e-4, rtol=1e-5)
    if mode == "observe":  # the original model's logits, error term carries the CLT's miss
        torch.testing.assert_close(d.embedding, tiny_backbone.visual(pixels), atol=1e-5, rtol=0)
        assert d.term_resid[:, -1].abs().max() > 0
    else:
        assert d.term_resid[:, -1].abs().max() == 0
    assert d.top_layer.shape == d.top_index.shape == (B, 4)


@torch.no_grad()
def test_final_ln_map_is_open_clips_ln_post_and_proj_with_the_scale_held(tiny_backbone):
    """The one home of the final-LayerNorm map (decompose, atlas and the spatial evaluation all call it): at
    the input's own 1/sigma it is open_clip's ln_post then proj; with the scale held it is affine, so a sum
    of terms maps to the sum of their maps (shift once); `shift=False` is linear."""
    visual = tiny_backbone.visual
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, tiny_backbone.d_model, generator=g) * 3 + 0.5
    inv_sigma = frozen_inv_sigma(visual.ln_post, x)
    torch.testing.assert_close(final_ln_map(visual, x, inv_sigma), visual.ln_post(x) @ visual.proj, rtol=1e-5, atol=1e-6)
    parts = torch.randn(3, 4, tiny_backbone.d_model, generator=g)
    mapped = final_ln_map(visual, parts, inv_sigma, shift=False)
    torch.testing.assert_close(mapped.sum(0) + visual.ln_post.bias @ visual.proj, final_ln_map(visual, parts.sum(0), inv_sigma),
                               rtol=1e-5, atol=1e-5)
    terms, shift = frozen_ln_map(visual, x, parts.transpose(0, 1))  # [B, T', d] -> [B, T', D]
    torch.testing.assert_close(terms, mapped.transpose(0, 1))
    torch.testing.assert_close(shift, visual.ln_post.bias @ visual.proj)


@pytest.mark.parametrize("cross_layer", [True, False])
@pytest.mark.parametrize("tokens", ["cls", "all"])
@torch.no_grad()
def test_splice_reconstruction_is_the_clts_own_decode(tiny_backbone, pixels, cross_layer, tokens):
    """CltSplice's running sum of what each layer is owed (decoder biases + writes of earlier sources)
    equals the CLT's own reconstruction of that layer from the run's codes (`decode_all`, per target),
    for a cross-layer and a per-layer transcoder, and the reconstructions are what the MLPs were replaced by."""
    from training.model.clt import CLTConfig, CrossLayerTranscoder

    L, d = tiny_backbone.n_layers, tiny_backbone.d_model
    torch.manual_seed(4)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, n_features=64, k=4, cross_layer=cross_layer)).eval()
    for p in clt.parameters():
        p.add_(0.05 * torch.randn_like(p))
    clt.out_scale.copy_(torch.rand(L) + 0.5)
    splice = vit.CltSplice(clt, tokens=tokens)
    res = vit.forward(tiny_backbone.visual, pixels, splice)
    want = clt.decode_all(splice.codes) * clt.out_scale[:, None, None]  # [L, N, d] raw units
    for j in range(L):
        torch.testing.assert_close(splice.recon[j].reshape(-1, d), want[j], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.mlp_cls[j], splice.recon[j][:, 0], atol=0, rtol=0)
