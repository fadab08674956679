"""Small bundles for tests and benchmarks: the `cltvit-tiny` backbone (random weights) with a random CLT."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES
from training.model.backbone import load_backbone
from training.testing import random_clt

from .writer import export_bundle


def make_tiny_bundle(
    out_dir: str | Path,
    *,
    mode: str = "cls",
    labels: Sequence[str] = FASHION_MNIST_CLASSES,
    templates: Sequence[str] = FASHION_MNIST_TEMPLATES[:2],
    n_features: int = 128,
    k: int = 8,
    top_k_features: int = 16,
    spatial_top_k: int = 5,
    variants: Sequence[str] = (),
    seed: int = 0,
    overwrite: bool = True,
) -> Path:
    """Export a bundle of cltvit-tiny (32x32 input, L=4, d=64, D=32) + a random CLT; seconds on a CPU."""
    backbone = load_backbone("cltvit-tiny", None, device="cpu", seed=seed)
    clt = random_clt(backbone.n_layers, backbone.d_model, n_features, k, seed)
    return export_bundle(backbone, clt, mode, labels, templates, out_dir, top_k_features=top_k_features,
                         spatial_top_k=spatial_top_k, variants=variants, overwrite=overwrite)
