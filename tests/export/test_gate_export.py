"""The accuracy gate written into bundles (export/gate.py, bundle/gate.py) and `--variant auto` on them.

- The reference bundle's gate figures recomputed here, independently of the exporter's code: the Fashion-MNIST test
  images decoded and preprocessed by serving's numpy preprocessing (the exporter used torch), each variant run in
  sessions from serving's session factory, agreement / |logit difference| / completeness residual / accuracy by numpy in this file.
- A bundle with a deliberately broken variant (its weights perturbed, its gate really measured) and one whose gate
  figure is under 99 %: auto never picks (never even times) either; an explicit variant still wins.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import REFERENCE_GATE_IMAGES
from PIL import Image

from bundle import load_bundle
from bundle.gate import GATE_MIN_AGREEMENT, passes_gate
from serving import Explainer
from serving.choice import choose_variant
from serving.preprocess import Preprocessor
from serving.sessions import open_session, session_options
from serving.variant_bench import resolve_variant
from training.data import FashionMNIST


@pytest.mark.parametrize("variants", [pytest.param(("fp32", "int8"), id="int8"),  # the variant the reference ships
                                      pytest.param(("int8-clt", "fp16"), id="others", marks=pytest.mark.slow)])  # ~1 s per session
def test_reference_gate_recomputed_independently(reference_bundle, variants):
    m, paths = load_bundle(reference_bundle)
    gate = m.gate
    assert gate is not None and set(gate.variants) == set(m.variants) == {"fp32", "int8", "int8-clt", "fp16"}
    assert gate.data.startswith(f"Fashion-MNIST test split: {REFERENCE_GATE_IMAGES} drawn with numpy default_rng(0)")
    idx = np.sort(np.random.default_rng(0).choice(10_000, size=REFERENCE_GATE_IMAGES, replace=False))
    ds = FashionMNIST("test")
    preprocess, text = Preprocessor(m.preprocess), np.load(paths.labels)
    pixels = np.stack([preprocess(Image.fromarray(ds.images[i], mode="L").convert("RGB")) for i in idx])
    labels = np.asarray(ds.labels)[idx]
    B = gate.batch_size  # dynamic int8 scales each call's activations as a whole: the same batches as the gate

    def run(v: str) -> tuple[np.ndarray, np.ndarray]:  # serving's own session factory, numpy here
        sess = open_session(paths.model_for(v), session_options(1), False, v)
        outs = [sess.run(["logits", "contributions"], {"pixels": pixels[i : i + B], "text_embeddings": text})
                for i in range(0, len(pixels), B)]
        return np.concatenate([o[0] for o in outs]).astype(np.float64), np.concatenate([o[1] for o in outs]).astype(np.float64)

    ref, ref_terms = run("fp32")
    for v in variants:
        g = gate.variants[v]
        z, terms = (ref, ref_terms) if v == "fp32" else run(v)
        agree = float(np.mean(z.argmax(1) == ref.argmax(1)))
        print(f"{v}: agreement {agree:.4f} (bundle {g.top1_agreement:.4f}), max |dlogit| {np.abs(z - ref).max():.4g} "
              f"(bundle {g.max_abs_logit_diff:.4g}), residual {np.abs(terms.sum(1) - z).max():.3g} (bundle {g.completeness_residual:.3g})")
        assert g.images == REFERENCE_GATE_IMAGES and g.nonfinite_images == 0
        assert g.model_sha256 == m.files[m.variants[v]]
        # torch's and numpy's preprocessing differ by float rounding: an image on a near-tie may flip
        assert abs(agree - g.top1_agreement) <= 1 / REFERENCE_GATE_IMAGES
        assert g.max_abs_logit_diff == pytest.approx(np.abs(z - ref).max(), rel=0.05, abs=1e-3)
        assert g.completeness_residual == pytest.approx(np.abs(terms.sum(1) - z).max(), abs=2e-5)
        assert abs(float(np.mean(z.argmax(1) == labels)) - g.accuracy) <= 1 / REFERENCE_GATE_IMAGES
    assert gate.variants["fp32"].top1_agreement == 1.0 and gate.variants["fp32"].max_abs_logit_diff == 0.0
    assert passes_gate(gate.variants["int8"])  # the reference's own int8 variant keeps >= 99 %


def test_a_broken_variant_fails_its_measured_gate(gated_bundle):
    root, spec = gated_bundle
    m, _ = load_bundle(root)
    assert m.gate == spec and spec.variants["int8-clt"].images == 128
    broken = spec.variants["int8-clt"]
    print({v: round(g.top1_agreement, 4) for v, g in spec.variants.items()})
    assert broken.top1_agreement < 0.9 and not passes_gate(broken)
    assert spec.variants["fp32"].top1_agreement == 1.0
    assert spec.variants["fp32"].accuracy is not None  # the data's classes are the bundle's labels


def test_auto_never_times_or_serves_a_failing_variant(gated_bundle):
    root, _ = gated_bundle
    m, paths = load_bundle(root)
    opened = []

    def opener(v):
        opened.append(v)
        return open_session(paths.model_for(v), session_options(1), False, v)

    choice, sessions = resolve_variant(m, paths, "auto", opener, batch_sizes=(1, 4), budget_s=0.2, max_rounds=3)
    allowed = {v for v in m.variants if v == "fp32" or passes_gate(m.variant_gate(v))}
    assert "int8-clt" not in opened and set(opened) == allowed == set(sessions)
    assert choice.variant in allowed and 1 <= choice.rounds <= 3
    assert {c.variant: c.gated for c in choice.candidates}["int8-clt"] is False
    # whatever the timings: the broken variant, 100x faster, is still not chosen
    gates = {v: m.variant_gate(v) for v in m.variants}
    fast = {1: {"fp32": [1.0] * 3, "int8-clt": [0.01] * 3, **{v: [2.0] * 3 for v in allowed - {"fp32"}}}}
    assert choose_variant(gates, fast).variant == "fp32"


def test_a_figure_under_99_percent_is_never_chosen_but_explicit_wins(gated_bundle, tmp_path):
    root, _ = gated_bundle
    b = tmp_path / "b"
    shutil.copytree(root, b)
    raw = json.loads((b / "bundle.json").read_text())
    for v, g in raw["gate"]["variants"].items():  # every reduced variant just under the gate
        if v != "fp32":
            g.update(top1_agreement=GATE_MIN_AGREEMENT - 0.001, nonfinite_images=0)
    (b / "bundle.json").write_text(json.dumps(raw))
    ex = Explainer(b, device="cpu", threads=1)
    assert ex.runtime.variant == "fp32" and ex.runtime.variant_choice.rounds == 0
    reason = ex.runtime.variant_choice.reason
    assert reason.startswith("fp32 served: no variant passes the gate: ")
    assert all(f"{v} fails the gate: agreement 98.90% on 128 images < 99%" in reason for v in ("int8", "int8-clt", "fp16"))
    ex = Explainer(b, device="cpu", threads=1, variant="int8-clt")
    assert ex.runtime.variant == "int8-clt" and ex.runtime.variant_choice.requested == "int8-clt"
    assert "asked for explicitly; fails the gate" in ex.runtime.variant_choice.reason
