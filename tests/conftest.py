"""Shared fixtures: tiny open_clip backbones with random weights, small CLTs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# one intra-op thread: test tensors are small, and on a shared 2-core machine two OpenMP threads
# per process oversubscribe the cores (measured: a 150-step tiny training run 8 s -> 97 s).
torch.set_num_threads(int(os.environ.get("CLTVIT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The default tiny serving bundle (cltvit-tiny + a random CLT, cls mode), exported once per session.

    Read-only: a test that needs a damaged bundle copies it first.
    """
    from export.testing import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_backbone():
    from training.backbone import load_backbone

    return load_backbone("cltvit-tiny", None, device="cpu", seed=0)


@pytest.fixture()
def tiny_clt(tiny_backbone):
    from training.clt import CLTConfig, CrossLayerTranscoder

    torch.manual_seed(0)
    cfg = CLTConfig(n_layers=tiny_backbone.n_layers, d_model=tiny_backbone.d_model, n_features=128, k=8)
    clt = CrossLayerTranscoder(cfg).eval()
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return clt
