"""Reduced-precision variants (int8 and int8-clt for the CPU, fp16 for CUDA) against the fp32 graph.

Stated tolerances (vs fp32, same inputs):
- int8 (dynamic U8U8 quantization of the transformer blocks' matmuls): top-1 agreement >= 99% on
  the reference model's Fashion-MNIST test set; on the random tiny model (near-uniform logits, a
  much harder case) >= 95%, and in observe mode (logits are the backbone's, so the error is the
  quantization's alone) max |logit error| <= 0.15. In cls mode a CLT feature that flips at the CLS
  token moves a logit discontinuously (random CLT: a few percent of logits by up to ~1), so only
  agreement is bounded there.
- int8-clt (int8 plus the CLT encoders quantized): the same bounds as int8; in observe mode the CLT
  is not in the logit path, so its logits equal int8's (1e-6) while its contributions differ.
- int8-dec (int8-clt plus the CLT decoders stored 8-bit, weight-only, one scale per feature and
  block of columns, read by GatherBlockQuantized): the same bounds as int8; in observe mode its logits equal int8's (1e-6: the CLT is
  not in their path). Each dequantized decoder is within half a quantization step of the fp32 one,
  and its int8 weights plus scales take at most half the fp32 decoders' bytes in the graph file.
  On the reference model: >= 99% top-1 agreement on all 10,000 test images (slow test below).
- fp16 (transformer blocks in float16): top-1 agreement >= 99%, observe-mode logits (no CLT
  feature selection in the logit path) within 1e-2 max abs.
- all: contributions sum over terms to the variant's OWN logits to fp32 rounding (rel 1e-5).
- spatial maps: the blocks' attention runs in reduced precision, the split of its CLS output over
  heads and tokens uses the float32 weights, so the maps sum to the variant's own attn.l terms only
  to that precision: fp16 within 0.5% of the largest |attn term|, int8 / int8-clt within 5% (dynamic
  activation quantization is not linear, so no exact split exists); serving reports this residual.

fp16 is a CUDA variant; on the CPU it runs here only with ORT's NCHWc layout pass disabled (ORT
1.31 crashes in it on this graph), so these are correctness, not speed, checks.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from test_parity import assert_complete, spatial_residual

from bundle import load_bundle
from export.quantize import make_variant

N_TINY = 512


def session(path: Path, variant: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    disabled = ["NchwcTransformer"] if variant == "fp16" else None
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def fashion_pixels(manifest, n: int) -> tuple[np.ndarray, np.ndarray]:
    """First n Fashion-MNIST test images preprocessed as the bundle states (numpy + Pillow only)."""
    from PIL import Image

    from training.data import FashionMNIST

    ds = FashionMNIST("test", limit=n)
    pp = manifest.preprocess
    H, W = pp.image_size
    mean, std = np.array(pp.mean, np.float32)[:, None, None], np.array(pp.std, np.float32)[:, None, None]
    out = []
    for img in ds.images:
        im = Image.fromarray(img, mode="L").convert("RGB")
        if im.size != (W, H):
            s = max(H / im.height, W / im.width)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
            left, top = (im.width - W) // 2, (im.height - H) // 2
            im = im.crop((left, top, left + W, top + H))
        out.append((np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std)
    return np.stack(out).astype(np.float32), ds.labels


def run_all(sess: ort.InferenceSession, pixels: np.ndarray, text: np.ndarray, batch: int = 128) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    parts = [dict(zip(names, sess.run(None, {"pixels": pixels[i : i + batch], "text_embeddings": text})))
             for i in range(0, len(pixels), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in names}


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float((a["logits"].argmax(1) == b["logits"].argmax(1)).mean())


@pytest.fixture(scope="module", params=["cls", "observe"])
def tiny(request):
    root = request.getfixturevalue({"cls": "variant_bundle", "observe": "observe_variant_bundle"}[request.param])
    m, paths = load_bundle(root)
    assert m.mode == request.param
    pixels, _ = fashion_pixels(m, N_TINY)
    text = np.load(paths.labels)
    outs = {v: run_all(session(p, v), pixels, text) for v, p in paths.models.items()}
    return request.param, outs


@pytest.mark.parametrize("variant", ["int8", "int8-clt", "int8-dec", "fp16"])
def test_variant_contributions_sum_to_its_own_logits(tiny, variant):
    _, outs = tiny
    assert_complete(outs[variant])
    assert not np.array_equal(outs[variant]["logits"], outs["fp32"]["logits"])  # it is a different computation


@pytest.mark.parametrize("variant, rel", [("fp32", 1e-5), ("fp16", 5e-3), ("int8", 0.05), ("int8-clt", 0.05), ("int8-dec", 0.05)])
def test_variant_spatial_maps_follow_its_own_terms(tiny, variant, rel):
    _, outs = tiny
    err, scale = spatial_residual(outs[variant])
    print(f"{variant}: spatial residual {err:.3g} of max |attn term| {scale:.3g}")
    assert err <= rel * scale


@pytest.mark.parametrize("variant", ["int8", "int8-clt", "int8-dec"])
def test_int8_tolerance_tiny(tiny, variant):
    mode, outs = tiny
    assert agreement(outs[variant], outs["fp32"]) >= 0.95
    if mode == "observe":  # logits are the backbone's own: the quantization error alone
        assert np.abs(outs[variant]["logits"] - outs["fp32"]["logits"]).max() <= 0.15


def test_int8_clt_quantizes_the_clt_encoders_only(tiny):
    """int8-clt differs from int8 only through the CLT: the same logits where the CLT is not in their
    path (observe), other features and contributions."""
    mode, outs = tiny
    a, b = outs["int8"], outs["int8-clt"]
    if mode == "observe":
        assert np.abs(a["logits"] - b["logits"]).max() <= 1e-6
        assert np.abs(a["contributions"][:, 1:-1] - b["contributions"][:, 1:-1]).max() > 1e-4  # clt.* and error terms moved
    else:
        assert np.abs(a["logits"] - b["logits"]).max() > 0
    assert (a["top_feature_index"] != b["top_feature_index"]).any()  # features near the TopK boundary changed


def test_int8_dec_quantizes_the_clt_decoders_only(tiny):
    """int8-dec differs from int8-clt only through the CLT decoders: in observe mode (decoders not in the
    logits' path) the same logits as int8, other clt.* terms; in cls mode other logits."""
    mode, outs = tiny
    a, b = outs["int8-clt"], outs["int8-dec"]
    if mode == "observe":
        assert np.abs(outs["int8"]["logits"] - b["logits"]).max() <= 1e-6
        assert np.abs(a["contributions"][:, 1:-1] - b["contributions"][:, 1:-1]).max() > 1e-6
    else:
        assert np.abs(a["logits"] - b["logits"]).max() > 0


def graph_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every initializer and Constant node value of the ONNX file at `path` (weights read from the file)."""
    g = onnx.load(str(path)).graph
    out = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    out.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return out


def test_int8_dec_stores_the_decoders_int8_in_half_the_bytes_or_less(variant_bundle, tiny_clt):
    """Read from the graph files: each CLT decoder W_dec[i] (the torch CLT the tiny bundle was exported
    from, feature-major as the graph gathers it) is a float32 tensor of the fp32 graph and is absent from
    the int8-dec graph, which holds an 8-bit tensor (zero point 128) and float32 scales, one per row and
    block of columns, whose product is within half a quantization step (1/254 of its row-block's largest
    |weight|) of it, in at most half the bytes; the graph reads it through GatherBlockQuantized with that
    block size."""
    _, paths = load_bundle(variant_bundle)
    fp32, dec = graph_tensors(paths.model), graph_tensors(paths.model_for("int8-dec"))
    blocks_used = {a.i for n in onnx.load(str(paths.model_for("int8-dec"))).graph.node if n.op_type == "GatherBlockQuantized"
                   for a in n.attribute if a.name == "block_size"}
    assert len(blocks_used) == 1
    block = blocks_used.pop()
    fp32_bytes = dec_bytes = 0
    for w in tiny_clt.W_dec:
        t, f, d = w.shape
        ref = w.detach().transpose(0, 1).reshape(f, t * d).numpy()  # [F, n_t * d]
        assert any(a.shape == ref.shape and np.allclose(a, ref, atol=1e-7) for a in fp32.values())
        fp32_bytes += ref.nbytes
        assert not any(a.dtype == np.float32 and a.shape == ref.shape and np.allclose(a, ref, atol=1e-3) for a in dec.values())
        blocks = ref.reshape(f, t * d // block, block)
        step = np.abs(blocks).max(-1, keepdims=True) / 127
        match = [(q, s) for q in dec.values() if q.dtype == np.uint8 and q.shape == ref.shape
                 for s in dec.values() if s.dtype == np.float32 and s.shape == blocks.shape[:2]
                 and np.all(np.abs((q.reshape(blocks.shape).astype(np.float32) - 128) * s[..., None] - blocks) <= step / 2 + 1e-7)]
        assert match, f"no 8-bit tensor and scales reproduce the decoder of source {t} targets"
        q, s = match[0]
        dec_bytes += q.nbytes + s.nbytes
    print(f"decoders: fp32 {fp32_bytes} B, int8-dec {dec_bytes} B ({dec_bytes / fp32_bytes:.2f})")
    assert dec_bytes <= 0.5 * fp32_bytes


def test_fp16_tolerance_tiny(tiny):
    mode, outs = tiny
    assert agreement(outs["fp16"], outs["fp32"]) >= 0.99
    if mode == "observe":
        assert np.abs(outs["fp16"]["logits"] - outs["fp32"]["logits"]).max() <= 1e-2
        assert np.abs(outs["fp16"]["embedding"] - outs["fp32"]["embedding"]).max() <= 1e-2 * np.abs(outs["fp32"]["embedding"]).max()


@pytest.fixture(scope="module")
def reference_fp32(reference_bundle):
    """The reference bundle's paths, the Fashion-MNIST test images preprocessed, labels, label embeddings and
    the fp32 graph's outputs on them (computed once for all variants)."""
    m, paths = load_bundle(reference_bundle, verify_checksums=False)
    n = int(os.environ.get("CLTVIT_REFERENCE_N", "10000"))
    pixels, labels = fashion_pixels(m, n)
    text = np.load(paths.labels)
    return paths, pixels, labels, text, run_all(session(paths.model, "fp32"), pixels, text)


@pytest.mark.parametrize("variant", ["int8", "int8-clt", "fp16", pytest.param("int8-dec", marks=pytest.mark.slow)])
def test_reference_model_agreement(variant, reference_fp32, tmp_path):
    """>= 99% top-1 agreement with fp32 on the reference model's Fashion-MNIST test set (all 10,000), on the
    bundle exported from the shipped reference weights (int8-dec: made from its fp32 graph here, so the
    shared fixture's export stays as cheap as it was)."""
    paths, pixels, labels, text, ref = reference_fp32
    if variant in paths.models:
        graph = paths.models[variant]
    else:
        n_layers = load_bundle(paths.root, verify_checksums=False)[0].clt.config["n_layers"]
        graph = make_variant(paths.model, variant, tmp_path / f"model.{variant}.onnx", n_layers=n_layers)
    got = run_all(session(graph, variant), pixels, text)
    agree = agreement(got, ref)
    total = got["contributions"].astype(np.float64).sum(1)
    print(f"{variant}: agreement {agree:.4f} on {len(labels)} images, accuracy {np.mean(got['logits'].argmax(1) == labels):.4f} "
          f"(fp32 {np.mean(ref['logits'].argmax(1) == labels):.4f}), max |dlogit| {np.abs(got['logits'] - ref['logits']).max():.4f}, "
          f"completeness residual {np.abs(total - got['logits']).max():.2e}")
    assert agree >= 0.99
    assert_complete(got)
