"""Small bundles for tests: the `cltvit-tiny` backbone (random weights) with a random CLT."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from training.backbone import load_backbone
from training.clt import CLTConfig, CrossLayerTranscoder
from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES

from .bundle import export_bundle


def random_clt(n_layers: int, d_model: int, n_features: int = 128, k: int = 8, seed: int = 0, noise: float = 0.01) -> CrossLayerTranscoder:
    """A CLT with random decoders, small random encoder/decoder biases, eval mode."""
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, k=k)).eval()
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(noise * torch.randn_like(p))
    return clt


def make_tiny_bundle(
    out_dir: str | Path,
    *,
    mode: str = "cls",
    labels: Sequence[str] = FASHION_MNIST_CLASSES,
    templates: Sequence[str] = FASHION_MNIST_TEMPLATES[:2],
    n_features: int = 128,
    k: int = 8,
    top_k_features: int = 16,
    variants: Sequence[str] = (),
    seed: int = 0,
    overwrite: bool = True,
) -> Path:
    """Export a bundle of cltvit-tiny (32x32 input, L=4, d=64, D=32) + a random CLT; seconds on a CPU."""
    backbone = load_backbone("cltvit-tiny", None, device="cpu", seed=seed)
    clt = random_clt(backbone.n_layers, backbone.d_model, n_features, k, seed)
    return export_bundle(backbone, clt, mode, labels, templates, out_dir, top_k_features=top_k_features,
                         variants=variants, overwrite=overwrite)
