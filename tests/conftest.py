"""Shared fixtures: tiny open_clip backbones with random weights, small random CLTs, tiny bundles.

Tests mirror the packages (tests/bundle, tests/training, tests/export, tests/serving, tests/pipeline);
every fixture that exports a bundle is session-scoped, so each kind of bundle is exported once per run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from export.testing import make_tiny_bundle
from pipeline.shipped import export_shipped
from training.model.backbone import load_backbone
from training.testing import random_clt

# one intra-op thread: test tensors are small, and on a shared 2-core machine two OpenMP threads
# per process oversubscribe the cores (measured: a 150-step tiny training run 8 s -> 97 s).
torch.set_num_threads(int(os.environ.get("CLTVIT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The default tiny serving bundle (cltvit-tiny + a random CLT, cls mode), exported once per session.

    Read-only: a test that needs a damaged bundle copies it first.
    """
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def variant_bundle(tmp_path_factory) -> Path:
    """The tiny bundle with its reduced-precision variants (int8, fp16). Read-only."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny-variants", variants=("int8", "fp16"))


@pytest.fixture(scope="session")
def v1_bundle(tmp_path_factory) -> Path:
    """A format-1 bundle as older cltvit versions wrote it: the tiny model without spatial outputs and
    a manifest with `format_version` 1 and no `spatial` key. Read-only."""
    root = make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny-v1", spatial_top_k=0)
    raw = json.loads((root / "bundle.json").read_text())
    raw["format_version"] = 1
    del raw["spatial"]
    (root / "bundle.json").write_text(json.dumps(raw, indent=2))
    return root


@pytest.fixture(scope="session")
def reference_bundle(tmp_path_factory) -> Path:
    """The reference model's bundle (fp32 + int8 + fp16), exported from the shipped weights (seconds). Read-only."""
    return export_shipped(tmp_path_factory.mktemp("bundle") / "reference", variants=("int8", "fp16"))


@pytest.fixture(scope="session")
def tiny_backbone():
    return load_backbone("cltvit-tiny", None, device="cpu", seed=0)


@pytest.fixture()
def tiny_clt(tiny_backbone):
    """A random CLT fitting `tiny_backbone` (F=128, k=8), the same one `make_tiny_bundle` exports."""
    return random_clt(tiny_backbone.n_layers, tiny_backbone.d_model, n_features=128, k=8, seed=0)
