"""Shared fixtures: tiny open_clip backbones with random weights, small random CLTs, tiny bundles.

Tests mirror the packages (tests/bundle, tests/training, tests/export, tests/serving, tests/pipeline);
every fixture that exports a bundle is session-scoped, so each kind of bundle is exported once per run.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from bundle import file_sha256, load_bundle
from export.fused import export_explainer
from export.gate import GateImages, attach_gate
from export.testing import make_atlas_bundle, make_tiny_bundle
from pipeline.shipped import export_shipped
from training.data import FashionMNIST
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
def atlas_bundle(tmp_path_factory) -> Path:
    """The tiny bundle with its CLT saved as a checkpoint and an atlas over 256 Fashion-MNIST training images
    (a 20-word vocabulary). Read-only."""
    return make_atlas_bundle(tmp_path_factory.mktemp("bundle") / "atlas")


@pytest.fixture(scope="session")
def variant_bundle(tmp_path_factory) -> Path:
    """The tiny bundle with its reduced-precision variants (int8, int8-clt, int8-dec, fp16). Read-only."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny-variants", variants=("int8", "int8-clt", "int8-dec", "fp16"),
                            intervene=False)


@pytest.fixture(scope="session")
def observe_variant_bundle(tmp_path_factory) -> Path:
    """The tiny model in observe mode (logits are the backbone's own) with int8, int8-clt, int8-dec and fp16. Read-only."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny-observe", mode="observe",
                            variants=("int8", "int8-clt", "int8-dec", "fp16"))


FORMAT1_FIXTURE = Path(__file__).parent / "fixtures" / "format1-tiny"


@pytest.fixture(scope="session")
def v1_bundle(bundle, tmp_path_factory) -> Path:
    """A real format-1 bundle, written by the exporter before bundle format 2 and kept unedited in
    tests/fixtures/format1-tiny (README there): its manifest, fused graph and label embeddings, plus the
    text tower and BPE vocabulary copied from `bundle` (byte-identical; the manifest's checksums say so).
    Read-only."""
    root = tmp_path_factory.mktemp("bundle") / "tiny-v1"
    shutil.copytree(FORMAT1_FIXTURE, root, ignore=shutil.ignore_patterns("README.md"))
    manifest = json.loads((root / "bundle.json").read_text())
    for name in ("text.onnx", manifest["tokenizer"]["vocab_file"]):
        shutil.copyfile(bundle / name, root / name)
    return root


@pytest.fixture(scope="session")
def reference_bundle(tmp_path_factory) -> Path:
    """The reference model's bundle (fp32 + int8 + int8-clt + fp16), exported from the shipped weights (seconds), with
    the variants' accuracy gate on REFERENCE_GATE_IMAGES Fashion-MNIST test images. Read-only."""
    return export_shipped(tmp_path_factory.mktemp("bundle") / "reference", variants=("int8", "int8-clt", "fp16"),
                          gate_images=REFERENCE_GATE_IMAGES)


REFERENCE_GATE_IMAGES = 200  # the fixture's gate (cltvit-reference export measures 2000 by default): cheaper, same code


def break_variant(root, variant: str, seed: int = 0) -> None:
    """Scramble every large float weight of `variant`'s graph (x N(0, 1): signs and sizes at random) and re-list its sha256."""
    m, _ = load_bundle(root)
    path = root / m.variants[variant]
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size >= 256:
            init.CopyFrom(numpy_helper.from_array((w * rng.standard_normal(w.shape)).astype(np.float32), init.name))
    onnx.save(model, str(path))
    raw = json.loads((root / "bundle.json").read_text())
    raw["files"][m.variants[variant]] = file_sha256(path)
    (root / "bundle.json").write_text(json.dumps(raw, indent=2))


@pytest.fixture(scope="session")
def gated_bundle(variant_bundle, tmp_path_factory):
    """(bundle, its GateSpec): the tiny variant bundle with int8-clt deliberately broken (`break_variant`), the gate of
    every variant measured on 128 Fashion-MNIST test images (export.gate.attach_gate). Read-only."""
    root = tmp_path_factory.mktemp("gated") / "b"
    shutil.copytree(variant_bundle, root)
    break_variant(root, "int8-clt")
    backbone = load_backbone("cltvit-tiny", None, device="cpu", seed=0)
    m, _ = load_bundle(root)
    images = GateImages.from_dataset(FashionMNIST("test"), backbone.preprocess, list(m.labels.names), limit=128)
    spec = attach_gate(root, images, threads=1)
    return root, spec


@pytest.fixture(scope="session")
def tiny_backbone():
    return load_backbone("cltvit-tiny", None, device="cpu", seed=0)


@pytest.fixture()
def tiny_clt(tiny_backbone):
    """A random CLT fitting `tiny_backbone` (F=128, k=8), the same one `make_tiny_bundle` exports."""
    return random_clt(tiny_backbone.n_layers, tiny_backbone.d_model, n_features=128, k=8, seed=0)


def ort_session(path: str | Path, threads: int = 1, variant: str = "fp32") -> ort.InferenceSession:
    """An ONNX Runtime CPU session, quiet, `threads` intra-op threads (fp16: without the NCHWc pass ORT
    1.31 crashes in on this graph)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    disabled = ["NchwcTransformer"] if variant == "fp16" else None
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


@dataclass
class Graphs:
    """A backbone, a CLT and their fused explainer graphs, one per mode, exported on first use."""

    backbone: Any
    clt: Any
    root: Path
    top_k: int = 16
    _sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)

    def path(self, mode: str) -> Path:
        path = self.root / f"{mode}.onnx"
        if not path.is_file():
            export_explainer(self.backbone.visual, self.clt, path, logit_scale=self.backbone.logit_scale,
                             embed_dim=self.backbone.embed_dim, mode=mode, top_k_features=self.top_k)
        return path

    def session(self, mode: str) -> ort.InferenceSession:
        if mode not in self._sessions:
            self._sessions[mode] = ort_session(self.path(mode), threads=2)
        return self._sessions[mode]


@pytest.fixture(scope="session")
def tiny_graphs(tiny_backbone, tmp_path_factory) -> Graphs:
    """cltvit-tiny + a random CLT (F=128, k=8, seed 1) as fused graphs in every mode (shared by the parity tests)."""
    clt = random_clt(tiny_backbone.n_layers, tiny_backbone.d_model, n_features=128, k=8, seed=1)
    return Graphs(tiny_backbone, clt, tmp_path_factory.mktemp("tiny-graphs"))


@pytest.fixture(scope="session", params=["ViT-B-32", "ViT-B-16"])
def vitb_graphs(request, tmp_path_factory) -> Graphs:
    """A full-size architecture with random weights + a small random CLT (F=256, k=8); graphs exported on
    first use per mode, once per session (the slow parity tests share them)."""
    backbone = load_backbone(request.param, None, device="cpu", seed=0)
    clt = random_clt(backbone.n_layers, backbone.d_model, n_features=256, k=8, seed=2)
    return Graphs(backbone, clt, tmp_path_factory.mktemp(request.param))
