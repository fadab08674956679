"""Random models for tests and benchmarks (no training): a CLT with random weights."""
from __future__ import annotations

import torch

from .model.clt import CLTConfig, CrossLayerTranscoder


def random_clt(n_layers: int, d_model: int, n_features: int = 128, k: int = 8, seed: int = 0, noise: float = 0.01) -> CrossLayerTranscoder:
    """A CLT with random decoders, small random encoder/decoder biases, eval mode."""
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, k=k)).eval()
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(noise * torch.randn_like(p))
    return clt
