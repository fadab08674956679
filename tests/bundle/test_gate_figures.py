"""The accuracy gate's figures (bundle/gate.py) against hand computations, its threshold, and the manifest's
`gate` block: tied to the variants and their files, optional (older bundles stay readable)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bundle import BundleError, load_bundle, read_manifest
from bundle.gate import GATE_MIN_AGREEMENT, GateTally, VariantGate, gate_verdict, passes_gate

SHA = "a" * 64


def test_tally_figures_by_hand():
    # 3 images, 2 labels; fp32 predicts 0, 1, 0; the variant 0, 0, 0 (image 1 flips)
    ref = np.array([[2.0, 1.0], [0.5, 1.5], [3.0, -1.0]], np.float32)
    z = np.array([[2.1, 1.0], [1.2, 1.0], [3.0, -1.25]], np.float32)
    contrib = np.zeros((3, 4, 2), np.float32)
    contrib[:, 0] = z  # terms sum to the logits exactly ...
    contrib[2, 1, 1] = 0.01  # ... but on image 2, label 1, by 0.01
    t = GateTally()
    t.update(ref[:2], z[:2], contrib[:2], np.array([0, 1]))
    t.update(ref[2:], z[2:], contrib[2:], np.array([1]))
    g = t.figures(SHA)
    assert g.images == 3
    assert g.top1_agreement == pytest.approx(2 / 3)
    assert g.max_abs_logit_diff == pytest.approx(0.7, abs=1e-6)  # |1.2 - 0.5|
    assert g.completeness_residual == pytest.approx(0.01, abs=1e-7)
    assert g.accuracy == pytest.approx(1 / 3)  # labels 0, 1, 1 against predictions 0, 0, 0
    assert g.nonfinite_images == 0


def test_a_nonfinite_image_disagrees_and_fails_the_gate():
    ref = np.ones((100, 3), np.float32)
    ref[:, 0] = 2
    z = ref.copy()
    z[7, 1] = np.nan
    contrib = np.stack([z, np.zeros_like(z)], axis=1)
    t = GateTally()
    t.update(ref, z, contrib)
    g = t.figures(SHA)
    assert g.nonfinite_images == 1 and g.top1_agreement == pytest.approx(0.99) and g.accuracy is None
    assert np.isfinite(g.max_abs_logit_diff) and np.isfinite(g.completeness_residual)
    assert not passes_gate(g) and "non-finite" in gate_verdict(g)


def test_threshold_is_99_percent():
    assert GATE_MIN_AGREEMENT == 0.99
    gate = lambda a: VariantGate(model_sha256=SHA, images=1000, top1_agreement=a, max_abs_logit_diff=0.1, completeness_residual=1e-6)
    assert passes_gate(gate(0.99)) and passes_gate(gate(1.0))
    assert not passes_gate(gate(0.989)) and not passes_gate(None)
    assert gate_verdict(None) == "no gate figure"
    assert gate_verdict(gate(0.989)).startswith("fails the gate: agreement 98.90% on 1000 images")


def _with_gate(variant_bundle, tmp_path, gate: dict) -> object:
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(variant_bundle, dst)
    raw = json.loads((dst / "bundle.json").read_text())
    raw["gate"] = gate
    (dst / "bundle.json").write_text(json.dumps(raw))
    return dst


def _figures(sha: str, agreement: float = 0.995) -> dict:
    return {"model_sha256": sha, "images": 64, "top1_agreement": agreement, "max_abs_logit_diff": 0.2, "completeness_residual": 1e-6}


def test_manifest_gate_block_is_checked_against_the_variants(variant_bundle, tmp_path):
    files = json.loads((variant_bundle / "bundle.json").read_text())["files"]
    ok = _with_gate(variant_bundle, tmp_path / "ok", {"data": "test", "batch_size": 16, "variants": {"int8": _figures(files["model.int8.onnx"])}})
    m, _ = load_bundle(ok)
    assert m.variant_gate("int8").top1_agreement == 0.995 and m.variant_gate("fp16") is None
    stale = _with_gate(variant_bundle, tmp_path / "stale", {"data": "test", "batch_size": 16, "variants": {"int8": _figures(files["model.onnx"])}})
    with pytest.raises(BundleError, match="gate.variants.int8 was measured on another graph"):
        read_manifest(stale)
    unknown = _with_gate(variant_bundle, tmp_path / "unknown", {"data": "test", "batch_size": 16, "variants": {"bf16": _figures(files["model.onnx"])}})
    with pytest.raises(BundleError, match="figures for 'bf16', which is not among the bundle's variants"):
        read_manifest(unknown)
    bad = _with_gate(variant_bundle, tmp_path / "bad", {"data": "test", "batch_size": 16, "variants": {"int8": _figures(files["model.int8.onnx"], 1.5)}})
    with pytest.raises(BundleError, match="top1_agreement"):
        read_manifest(bad)


def test_bundles_without_a_gate_still_load(variant_bundle, v1_bundle):
    for b in (variant_bundle, v1_bundle):
        m, _ = load_bundle(b)
        assert m.gate is None and all(m.variant_gate(v) is None for v in m.variants)
