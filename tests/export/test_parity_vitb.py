"""Parity of the fused ONNX graph with eager `decompose` on full-size ViT-B-32 / ViT-B-16 architectures.

Random backbone weights and a small random CLT (F=256, k=8): the graph structure (12 layers,
d=768, 50 / 197 tokens) is what matters here. Each architecture is exported once per mode per
session (the `vitb_graphs` fixture, shared with test_parity_open_clip.py). Per (architecture, mode):
one batch of random pixels with 1000 classes and one batch of real Fashion-MNIST test images
(resized by open_clip's preprocess) with their 10 class names.
"""
from __future__ import annotations

import pytest
import torch
from test_parity import assert_parity, eager_outputs, onnx_outputs, random_text

from training.data import FASHION_MNIST_CLASSES, FashionMNIST
from training.model.decompose import MODES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # exports of 12-layer graphs: minutes
REAL_BATCH = {"ViT-B-32": 7, "ViT-B-16": 4}


@pytest.mark.parametrize("mode", MODES)
def test_vitb_parity(vitb_graphs, mode):
    backbone, clt = vitb_graphs.backbone, vitb_graphs.clt
    sess = vitb_graphs.session(mode)
    H, W = backbone.image_size
    pixels = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(11))
    text = random_text(1000, backbone.embed_dim, seed=12)
    got = onnx_outputs(sess, pixels, text)
    assert got["contributions"].shape == (1, 2 * 12 + 3, 1000)
    assert_parity(eager_outputs(backbone, clt, pixels, text, mode, 16), got)

    ds = FashionMNIST("test", limit=REAL_BATCH[backbone.spec.model])
    pixels = torch.stack([backbone.preprocess(ds[i][0]) for i in range(len(ds))])
    text = backbone.class_embeddings(FASHION_MNIST_CLASSES, ["a photo of a {}."]).float()
    got = onnx_outputs(sess, pixels, text)
    assert_parity(eager_outputs(backbone, clt, pixels, text, mode, 16), got)
