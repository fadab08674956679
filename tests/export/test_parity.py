"""Parity of the fused ONNX graph (ONNX Runtime, CPU provider) with the eager `decompose`, tiny model.

For every mode x batch (1, 7, 64) x class count (1, 10, 1000): logits, embedding and contributions
within 1e-4 max abs, identical top-1, the same top features, and completeness of the ONNX
contributions (they sum over terms to the ONNX logits). Also on real Fashion-MNIST test images.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bundle import MODEL_OUTPUTS
from training.model.decompose import MODES, decompose

ATOL = 1e-4


def random_text(n: int, dim: int, seed: int) -> torch.Tensor:
    t = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return t / t.norm(dim=-1, keepdim=True)


def eager_outputs(backbone, clt, pixels, text, mode, top_k) -> dict[str, np.ndarray]:
    with torch.no_grad():
        d = decompose(backbone.visual, clt, pixels, text, backbone.logit_scale, mode, top_k)
    vals = (d.logits, d.embedding, d.contributions, d.top_layer, d.top_index, d.top_activation, d.top_contribution)
    return {n: v.numpy() for n, v in zip(MODEL_OUTPUTS, vals)}


def onnx_outputs(sess: ort.InferenceSession, pixels: torch.Tensor, text: torch.Tensor) -> dict[str, np.ndarray]:
    out = sess.run(None, {"pixels": pixels.numpy(), "text_embeddings": text.numpy()})
    return dict(zip([o.name for o in sess.get_outputs()], out))


def assert_complete(got: dict[str, np.ndarray], rel: float = 1e-5) -> None:
    """The graph's own contributions sum over terms to its own logits, within `rel` of the largest magnitude."""
    total = got["contributions"].astype(np.float64).sum(1)
    scale = max(1.0, float(np.abs(got["logits"]).max()), float(np.abs(got["contributions"]).max()))
    err = np.abs(total - got["logits"]).max()
    assert err <= rel * scale, f"contributions miss the logits by {err:.3g} (> {rel} x {scale:.3g})"


def assert_parity(eager: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float = ATOL) -> None:
    """The checks every parity test makes (see the module docstring)."""
    assert list(got) == list(MODEL_OUTPUTS)
    for name in ("logits", "embedding", "contributions", "top_feature_activation", "top_feature_contribution"):
        assert got[name].shape == eager[name].shape, name
        err = np.abs(got[name] - eager[name]).max()
        assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"
    assert (got["logits"].argmax(1) == eager["logits"].argmax(1)).all(), "top-1 differs"
    assert_complete(got)
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
    return {mode: tiny_graphs.session(mode) for mode in MODES}


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
    assert_parity(eager_outputs(backbone, clt, pixels, text, mode, 16), got)


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
