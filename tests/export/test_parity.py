"""Parity of the fused ONNX graph (ONNX Runtime, CPU provider) with the eager `decompose`, tiny model.

For every mode x batch (1, 7, 64) x class count (1, 10, 1000): logits, embedding, contributions and
the spatial maps within 1e-4 max abs, identical top-1, the same top features and spatial classes,
completeness of the ONNX contributions (they sum over terms to the ONNX logits) and of the ONNX
spatial maps (per class and layer they sum to the ONNX `attn.l` term). Also on real Fashion-MNIST
test images, and with ONNX Runtime's graph optimisations off (they must not change the outputs).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bundle import model_outputs
from export.fused import export_explainer
from training.model.decompose import MODES, decompose

ATOL = 1e-4
SPATIAL_TOP_K = 5


def unoptimised_session(path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with every graph optimisation off."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def random_text(n: int, dim: int, seed: int) -> torch.Tensor:
    t = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return t / t.norm(dim=-1, keepdim=True)


def eager_outputs(backbone, clt, pixels, text, mode, top_k, spatial_top_k: int = SPATIAL_TOP_K) -> dict[str, np.ndarray]:
    with torch.no_grad():
        d = decompose(backbone.visual, clt, pixels, text, backbone.logit_scale, mode, top_k, spatial_top_k)
    vals = [d.logits, d.embedding, d.contributions, d.top_layer, d.top_index, d.top_activation, d.top_contribution]
    if d.spatial is not None:
        vals += [d.spatial.classes, d.spatial.tokens, d.spatial.bias, d.spatial.heads]
    return {n: v.numpy() for n, v in zip(model_outputs(d.spatial is not None), vals)}


def onnx_outputs(sess: ort.InferenceSession, pixels: torch.Tensor, text: torch.Tensor) -> dict[str, np.ndarray]:
    out = sess.run(None, {"pixels": pixels.numpy(), "text_embeddings": text.numpy()})
    return dict(zip([o.name for o in sess.get_outputs()], out))


def assert_complete(got: dict[str, np.ndarray], rel: float = 1e-5) -> None:
    """The graph's own contributions sum over terms to its own logits, within `rel` of the largest magnitude."""
    total = got["contributions"].astype(np.float64).sum(1)
    scale = max(1.0, float(np.abs(got["logits"]).max()), float(np.abs(got["contributions"]).max()))
    err = np.abs(total - got["logits"]).max()
    assert err <= rel * scale, f"contributions miss the logits by {err:.3g} (> {rel} x {scale:.3g})"


def spatial_residual(out: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max |attn.l term - (its spatial cells + bias parts)| over images, spatial classes and layers,
    max |attn.l term|): how exactly a graph's spatial maps decompose its own layer terms."""
    cls = out["spatial_class"]
    L = out["spatial_contributions"].shape[2]
    attn = out["contributions"][:, 1 : 1 + L].astype(np.float64)  # [B, L, C]
    want = np.take_along_axis(attn, np.maximum(cls, 0)[:, None, :], 2).transpose(0, 2, 1)  # [B, S, L]
    got = out["spatial_contributions"].astype(np.float64).sum(-1) + out["spatial_bias"].astype(np.float64).sum(-1)
    valid = (cls >= 0)[:, :, None]
    assert (np.abs(out["spatial_contributions"]) * ~valid[..., None]).max(initial=0) == 0, "padding rows must be zero"
    return float(np.abs(np.where(valid, got - want, 0)).max()), float(np.abs(attn).max())


def assert_spatial_complete(got: dict[str, np.ndarray], rel: float = 1e-5) -> None:
    """The graph's spatial maps sum, per image, class and layer, to its own attn.l terms; per-head maps sum
    to the predicted class's map."""
    err, scale = spatial_residual(got)
    assert err <= rel * max(1.0, scale), f"spatial maps miss the attention terms by {err:.3g} (> {rel} x {scale:.3g})"
    heads = got["spatial_head_contributions"].astype(np.float64).sum(2)
    assert np.abs(heads - got["spatial_contributions"][:, 0]).max() <= rel * max(1.0, scale)
    C = got["logits"].shape[1]  # the first min(C, S) rows are classes, the rest padding
    assert (got["spatial_class"][:, :C] >= 0).all() and (got["spatial_class"][:, C:] == -1).all()


def assert_parity(eager: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float = ATOL) -> None:
    """The checks every parity test makes (see the module docstring)."""
    assert list(got) == list(eager)
    spatial = "spatial_class" in got
    floats = ["logits", "embedding", "contributions", "top_feature_activation", "top_feature_contribution"]
    for name in floats + (["spatial_contributions", "spatial_bias", "spatial_head_contributions"] if spatial else []):
        assert got[name].shape == eager[name].shape, name
        err = np.abs(got[name] - eager[name]).max()
        assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"
    assert (got["logits"].argmax(1) == eager["logits"].argmax(1)).all(), "top-1 differs"
    assert_complete(got)
    if spatial:
        assert_spatial_complete(got)
        assert (got["spatial_class"] == eager["spatial_class"]).all(), "spatial classes differ"
    # top features: same (layer, index) wherever the ranking is not a near tie
    c = np.abs(eager["top_feature_contribution"])
    clear = np.abs(c[:, :-1] - c[:, 1:]) > 10 * atol
    clear = np.concatenate([clear, np.zeros_like(clear[:, :1])], 1) & np.concatenate([np.ones_like(clear[:, :1]), clear], 1)
    for key in ("top_feature_layer", "top_feature_index"):
        assert got[key].dtype == np.int64
        assert (got[key][clear] == eager[key][clear]).all(), key


@pytest.fixture(scope="module")
def tiny_setup(tiny_graphs):
    return tiny_graphs.backbone, tiny_graphs.clt


@pytest.fixture(scope="module")
def sessions(tiny_graphs):
    out = {mode: tiny_graphs.session(mode) for mode in MODES}
    out.update({mode + "-unoptimised": unoptimised_session(tiny_graphs.path(mode)) for mode in MODES})
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("n_classes", [1, 10, 1000])
def test_random_inputs(tiny_setup, sessions, mode, batch, n_classes):
    backbone, clt = tiny_setup
    H, W = backbone.image_size
    pixels = torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(batch * 7 + n_classes))
    text = random_text(n_classes, backbone.embed_dim, seed=n_classes)
    got = onnx_outputs(sessions[mode], pixels, text)
    assert got["contributions"].shape == (batch, 2 * backbone.n_layers + 3, n_classes)
    assert got["top_feature_index"].shape == (batch, 16)
    assert got["spatial_contributions"].shape == (batch, SPATIAL_TOP_K, backbone.n_layers, backbone.n_tokens)
    assert_parity(eager_outputs(backbone, clt, pixels, text, mode, 16), got)


@pytest.mark.parametrize("mode", MODES)
def test_graph_optimisations_do_not_change_outputs(tiny_setup, sessions, mode):
    """ONNX Runtime's graph optimisations (level ALL, as served) against none: same outputs to fp32 rounding."""
    backbone, _ = tiny_setup
    H, W = backbone.image_size
    pixels = torch.randn(16, 3, H, W, generator=torch.Generator().manual_seed(5))
    text = random_text(10, backbone.embed_dim, seed=5)
    opt, plain = onnx_outputs(sessions[mode], pixels, text), onnx_outputs(sessions[mode + "-unoptimised"], pixels, text)
    for name in opt:
        if opt[name].dtype == np.int64:
            assert (opt[name] == plain[name]).all(), name
        else:
            assert np.abs(opt[name] - plain[name]).max() <= 1e-5 * max(1.0, float(np.abs(plain[name]).max())), name
    assert_spatial_complete(plain)


def test_graph_without_spatial_maps(tiny_setup, tmp_path):
    """spatial_top_k=0: the format-1 outputs only, identical to the spatial graph's."""
    backbone, clt = tiny_setup
    path = export_explainer(backbone.visual, clt, tmp_path / "plain.onnx", logit_scale=backbone.logit_scale,
                            embed_dim=backbone.embed_dim, mode="cls", top_k_features=16, spatial_top_k=0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    H, W = backbone.image_size
    pixels = torch.randn(4, 3, H, W, generator=torch.Generator().manual_seed(6))
    text = random_text(10, backbone.embed_dim, seed=6)
    got = onnx_outputs(sess, pixels, text)
    assert list(got) == list(model_outputs(False))
    assert_parity(eager_outputs(backbone, clt, pixels, text, "cls", 16, spatial_top_k=0), got)


@pytest.fixture(scope="module")
def fmnist_pixels(tiny_backbone):
    from training.data import FashionMNIST

    ds = FashionMNIST("test", limit=64)
    return torch.stack([tiny_backbone.preprocess(ds[i][0]) for i in range(len(ds))])


@pytest.mark.parametrize("mode", MODES)
def test_fashion_mnist_images(tiny_setup, sessions, fmnist_pixels, mode):
    backbone, clt = tiny_setup
    from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES

    text = backbone.class_embeddings(FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES).float()
    got = onnx_outputs(sessions[mode], fmnist_pixels, text)
    assert_parity(eager_outputs(backbone, clt, fmnist_pixels, text, mode, 16), got)


def test_observe_mode_logits_are_the_original_models(tiny_setup, sessions, fmnist_pixels):
    """observe: the ONNX logits are the unmodified open_clip model's, the error term is non-zero."""
    backbone, _ = tiny_setup
    text = random_text(10, backbone.embed_dim, seed=3)
    got = onnx_outputs(sessions["observe"], fmnist_pixels[:8], text)
    with torch.no_grad():
        e = backbone.model.encode_image(fmnist_pixels[:8])
        ref = backbone.logit_scale * (e / e.norm(dim=-1, keepdim=True)) @ text.T
    assert np.abs(got["logits"] - ref.numpy()).max() <= ATOL
    assert np.abs(got["contributions"][:, -1]).max() > 1e-3  # error term carries the CLT's miss
    cls_err = onnx_outputs(sessions["cls"], fmnist_pixels[:8], text)["contributions"][:, -1]
    assert np.abs(cls_err).max() == 0.0
