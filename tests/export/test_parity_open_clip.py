"""Parity of the fused ONNX graph with open_clip's own modules (tests/export/_hooked.py), not with the
project's decomposition code the graph is traced from.

For each model and mode: the real open_clip model with its MLPs replaced by the CLT through forward
hooks (`cls`: at the CLS token, `all`: at every token; `observe`: not replaced) gives the logits and
embedding of the graph; the residual pieces the hooks capture at the CLS token (embedding, each
attention write, each CLT source layer's write, decoder biases, the error in observe mode) add up to
the residual ln_post receives, and mapped through the frozen final LayerNorm and projection they give
the graph's contribution of every term to every logit; the graph's top features are the features
with the largest contributions to the predicted class, with their activations and contributions.

Models: cltvit-tiny (random weights), ViT-B-32 and ViT-B-16 (random weights, `slow`), and the
reference model (the shipped weights and the bundle exported from them).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _hooked import max_abs, reference
from conftest import Graphs, ort_session
from test_parity import onnx_outputs, random_text

from bundle import MODES, load_bundle, term_names
from pipeline.shipped import load_shipped
from training.data import FASHION_MNIST_CLASSES, FashionMNIST

REL = 2e-5  # of the largest logit / contribution magnitude: float32 rounding over 2L+3 terms


def fashion_pixels(backbone, n: int) -> torch.Tensor:
    ds = FashionMNIST("test", limit=n)
    return torch.stack([backbone.preprocess(ds[i][0]) for i in range(n)])


def check(backbone, clt, session, pixels: torch.Tensor, text: torch.Tensor, mode: str) -> dict[str, float]:
    """Assert the graph's outputs equal the hooked open_clip reference; returns the max differences."""
    ref = reference(backbone.visual, clt, pixels, text, backbone.logit_scale, mode)
    got = onnx_outputs(session, pixels, text)
    L = backbone.n_layers
    assert list(ref.terms) == term_names(L) == ["embed", *[f"attn.{l}" for l in range(L)], *[f"clt.{l}" for l in range(L)],
                                                "bias", "error"]
    scale = max(1.0, float(ref.logits.abs().max()), float(ref.contributions.abs().max()))
    resid_scale = float(ref.final_resid.abs().max())
    diffs = {
        # the hooks see the whole residual stream: their pieces add up to what ln_post receives
        "residual_sum": max_abs(sum(ref.terms.values()), ref.final_resid) / resid_scale,
        "logits": max_abs(got["logits"], ref.logits) / scale,
        "embedding": max_abs(got["embedding"], ref.embedding) / float(ref.embedding.abs().max()),
        "contributions": max_abs(got["contributions"], ref.contributions) / scale,
    }
    assert diffs["residual_sum"] <= 1e-5, diffs
    for key in ("logits", "embedding", "contributions"):
        assert diffs[key] <= REL, (key, diffs)
    assert (got["logits"].argmax(1) == ref.logits.argmax(1).numpy()).all()
    if mode != "observe":
        assert np.abs(got["contributions"][:, -1]).max() == 0.0  # no error term when the CLT replaces the MLPs
    else:
        assert float(ref.terms["error"].abs().max()) > 0  # the CLT misses something of the real MLPs

    # top features: the largest |contribution| to the predicted class among all CLS features
    fc = ref.feature_contribution.numpy()  # [B, L, F]
    B, K = got["top_feature_index"].shape
    top_ref = -np.sort(-np.abs(fc.reshape(B, -1)), axis=1)[:, :K]
    feat_err = float(np.abs(np.abs(got["top_feature_contribution"]) - top_ref).max()) / scale
    layer, index = got["top_feature_layer"], got["top_feature_index"]
    rows = np.arange(B)[:, None]
    act_ref = np.stack([c.numpy() for c in ref.cls_codes], 1)[rows, layer, index]  # [B, K]
    diffs["top_features"] = max(feat_err, max_abs(got["top_feature_contribution"], fc[rows, layer, index]) / scale)
    diffs["top_activations"] = max_abs(got["top_feature_activation"], act_ref) / max(1.0, float(np.abs(act_ref).max()))
    assert diffs["top_features"] <= REL and diffs["top_activations"] <= REL, diffs
    return diffs


def report(name: str, mode: str, diffs: dict[str, float]) -> None:
    print(f"{name} {mode}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


@pytest.mark.parametrize("mode", MODES)
def test_tiny_graph_equals_hooked_open_clip(tiny_graphs, mode):
    backbone, clt = tiny_graphs.backbone, tiny_graphs.clt
    session = tiny_graphs.session(mode)
    H, W = backbone.image_size
    pixels = torch.randn(7, 3, H, W, generator=torch.Generator().manual_seed(5))
    report("cltvit-tiny random", mode, check(backbone, clt, session, pixels, random_text(10, backbone.embed_dim, 6), mode))
    text = backbone.class_embeddings(FASHION_MNIST_CLASSES, ["a photo of a {}."]).float()
    report("cltvit-tiny fmnist", mode, check(backbone, clt, session, fashion_pixels(backbone, 32), text, mode))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # may export the architecture's graph for this mode (minutes)
@pytest.mark.parametrize("mode", MODES)
def test_vitb_graph_equals_hooked_open_clip(vitb_graphs, mode):
    backbone, clt = vitb_graphs.backbone, vitb_graphs.clt
    text = backbone.class_embeddings(FASHION_MNIST_CLASSES, ["a photo of a {}."]).float()
    diffs = check(backbone, clt, vitb_graphs.session(mode), fashion_pixels(backbone, 3), text, mode)
    report(backbone.spec.model, mode, diffs)


@pytest.fixture(scope="module")
def shipped_model():
    backbone, clt, _ = load_shipped()
    return backbone, clt


@pytest.mark.parametrize("mode", ["cls", "all"])
def test_reference_bundle_equals_hooked_open_clip(reference_bundle, shipped_model, tmp_path_factory, mode):
    """The reference bundle's graph (cls mode) and an all-token graph of the same shipped weights."""
    backbone, clt = shipped_model
    m, paths = load_bundle(reference_bundle, verify_checksums=False)
    if mode == m.mode:
        session = ort_session(paths.model, threads=2)
    else:
        session = Graphs(backbone, clt, tmp_path_factory.mktemp("ref-graphs"), top_k=m.top_k_features).session(mode)
    text = torch.from_numpy(np.load(paths.labels))
    report("reference", mode, check(backbone, clt, session, fashion_pixels(backbone, 64), text, mode))
