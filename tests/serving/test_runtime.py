"""BundleRuntime (ONNX Runtime, no torch) against open_clip / the torch reference."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from serving.runtime import MAX_LABELS, BundleRuntime, LabelCache, LabelError, RuntimeSetupError, validate_labels


@pytest.fixture(scope="module")
def runtime(bundle):
    return BundleRuntime(bundle, device="cpu", threads=1)


@pytest.fixture(scope="module")
def backbone():
    from training.model.backbone import load_backbone

    return load_backbone("cltvit-tiny", None, device="cpu", seed=0)


def _images():
    from training.data import FashionMNIST

    ds = FashionMNIST("test", limit=20)
    rng = np.random.RandomState(0)
    extra = [
        Image.fromarray(rng.randint(0, 255, (300, 517, 3), dtype=np.uint8)),  # landscape, downscale
        Image.fromarray(rng.randint(0, 255, (517, 301, 3), dtype=np.uint8)),  # portrait
        Image.fromarray(rng.randint(0, 255, (17, 45, 3), dtype=np.uint8)),  # upscale
        Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)),  # exact size
    ]
    return [ds[i][0] for i in range(20)] + extra


def test_preprocess_equals_open_clip_eval_transform(runtime, backbone):
    for img in _images():
        ours = runtime.preprocess(img)
        ref = backbone.preprocess(img).numpy()
        assert ours.shape == ref.shape == (3, *runtime.image_size) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() < 1e-6


def test_grayscale_input_preprocesses_like_its_rgb(runtime):
    img = _images()[0].convert("L")
    assert np.array_equal(runtime.preprocess(img), runtime.preprocess(img.convert("RGB")))


def test_extreme_aspect_ratio_is_refused(runtime):
    from serving.images import ImageError

    with pytest.raises(ImageError, match="aspect ratio"):
        runtime.preprocess(Image.new("RGB", (1, 1_000_000)))
    assert runtime.preprocess(Image.new("RGB", (3, 600))).shape == (3, *runtime.image_size)  # 1:200 is fine


def test_default_label_embeddings_are_the_bundle_file(runtime, bundle):
    assert np.array_equal(runtime.embed_labels(), np.load(bundle / "labels.npy"))
    assert np.array_equal(runtime.embed_labels(runtime.label_names), np.load(bundle / "labels.npy"))


def test_custom_label_embeddings_match_torch(runtime, backbone):
    names = ["a red sneaker", "a wool coat", "handbag"]
    ours = runtime.embed_labels(names)
    ref = backbone.class_embeddings(names, runtime.templates).numpy()
    assert ours.shape == (3, runtime.embed_dim)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert runtime.embed_labels(names) is ours  # cached


def test_label_cache_is_bounded(bundle):
    d = rt_embed_dim(bundle)
    row = d * 4 + LabelCache.ENTRY_OVERHEAD  # one label, float32
    budget = 64 * row
    rt = BundleRuntime(bundle, device="cpu", threads=1, label_cache_bytes=budget)
    for i in range(120):  # 240 distinct labels: more rows than the budget holds
        rt.embed_labels([f"thing {i}", f"other {i}"])
    assert rt.label_cache.nbytes <= budget
    assert len(rt.label_cache.rows) * row <= rt.label_cache.rows.max_bytes
    assert rt.label_cache.sets.nbytes <= rt.label_cache.sets.max_bytes


def test_label_sets_from_a_vocabulary_reuse_its_rows(bundle, monkeypatch):
    """Sets drawn from a vocabulary: the text encoder runs once per new word, not per new set, and the
    memory held is bounded by the vocabulary; every set equals its direct computation."""
    rt = BundleRuntime(bundle, device="cpu", threads=1, label_cache_bytes=1 << 20)
    encoded: list[str] = []
    real = rt.embed_texts
    monkeypatch.setattr(rt, "embed_texts", lambda prompts: encoded.extend(prompts) or real(prompts))
    vocab = [f"word {i}" for i in range(12)]
    rng = np.random.default_rng(0)
    sets = [[vocab[j] for j in rng.choice(len(vocab), size=int(rng.integers(2, 6)), replace=False)] for _ in range(60)]
    for names in sets:
        rt.embed_labels(names)
    assert len(encoded) == len(vocab) * len(rt.templates)  # each word's prompts once
    assert len(rt.label_cache.rows) == len(vocab)
    for names in sets[:5]:
        direct = real([t.format(n) for n in names for t in rt.templates]).astype(np.float64)
        mean = direct.reshape(len(names), len(rt.templates), -1).mean(1)
        np.testing.assert_allclose(rt.embed_labels(names), mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    fresh = vocab[::-1][:6]  # six labels: no drawn set has as many; known words, so no encoder run
    assert rt.label_cache.sets.get(LabelCache.key(fresh, rt.templates)) is None
    got = rt.cached_labels(fresh)
    assert got is not None and rt.cached_labels(fresh) is got and len(encoded) == len(vocab) * len(rt.templates)


def rt_embed_dim(bundle) -> int:
    return int(json.loads((bundle / "bundle.json").read_text())["backbone"]["embed_dim"])


def test_explain_results_are_consistent(runtime, backbone):
    images = _images()[:6]
    results = runtime.explain(images, top_k=4, detail=True, include_embedding=True)
    raw = runtime.run(np.stack([runtime.preprocess(im) for im in images]))
    for b, res in enumerate(results):
        logits = raw.logits[b]
        assert res.predicted == runtime.label_names[int(np.argmax(logits))]
        assert [t.label for t in res.top] == [runtime.label_names[i] for i in np.argsort(-logits, kind="stable")[:4]]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose([t.probability for t in res.top], np.sort(probs)[::-1][:4], rtol=1e-6)
        assert res.completeness_residual < 1e-4
        assert sum(res.term_shares) == pytest.approx(1.0) and min(res.term_shares) >= 0
        for ex in res.explanations:
            assert [t.term for t in ex.terms] == runtime.term_names
            assert sum(t.value for t in ex.terms) == pytest.approx(ex.logit, abs=1e-4)
            assert sum(t.share for t in ex.terms) == pytest.approx(1.0, abs=1e-3)
        assert len(res.top_features) == runtime.manifest.top_k_features
        assert all(0 <= f.layer < runtime.manifest.backbone.n_layers for f in res.top_features)
        np.testing.assert_allclose(res.embedding, raw.embedding[b], rtol=1e-6)
    assert len(results) == 6


def test_batch_equals_single(runtime):
    images = _images()[:4]
    batch = runtime.explain(images, top_k=3)
    single = [runtime.explain([im], top_k=3)[0] for im in images]
    for a, b in zip(batch, single):
        assert a.predicted == b.predicted
        np.testing.assert_allclose([t.logit for t in a.top], [t.logit for t in b.top], rtol=1e-5, atol=1e-6)


def test_validate_labels():
    assert validate_labels([" shoe ", "boot"]) == ["shoe", "boot"]
    for labels, match in [([], "empty"), (["a", "a"], "duplicate"), (["a", ""], r"labels\[1\] is an empty string"),
                          ([str(i) for i in range(MAX_LABELS + 1)], "too many labels"),
                          (["y" * 201], "200"), ("shoe", "not a single string"), ([3], "expected a string")]:
        with pytest.raises(LabelError, match=match):
            validate_labels(labels)


def test_top_k_and_shape_errors(runtime):
    img = _images()[0]
    with pytest.raises(LabelError, match="top_k=11"):
        runtime.explain([img], top_k=11)
    with pytest.raises(LabelError, match="top_k=0"):
        runtime.explain([img], top_k=0)
    assert len(runtime.explain([img], labels=["a", "b"])[0].top) == 2  # default top_k: min(5, C)
    with pytest.raises(ValueError, match="pixels must be"):
        runtime.run(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="text_embeddings must be"):
        runtime.run(np.zeros((1, 3, *runtime.image_size), np.float32), np.zeros((2, 5), np.float32))


def test_setup_errors(bundle, tmp_path):
    with pytest.raises(RuntimeSetupError, match="int8"):
        BundleRuntime(bundle, variant="int8")
    with pytest.raises(RuntimeSetupError, match="device"):
        BundleRuntime(bundle, device="tpu")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeSetupError, match="CUDA"):
            BundleRuntime(bundle, device="cuda")
    from bundle import BundleError

    with pytest.raises(BundleError, match="bundle.json missing"):
        BundleRuntime(tmp_path)


def test_io_binding_path_gives_the_same_outputs(bundle, runtime):
    bound = BundleRuntime(bundle, device="cpu", threads=1, io_binding=True, verify_checksums=False)
    assert bound.use_io_binding and not runtime.use_io_binding
    pixels = np.stack([runtime.preprocess(im) for im in _images()[:3]])
    text = runtime.embed_labels(["a", "b", "c"])
    a, b = runtime.run(pixels, text), bound.run(pixels, text)
    for name in ("logits", "embedding", "contributions", "top_feature_index"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-7)


def test_cuda_detection_agrees_with_torch():
    """`cuda_present` (driver files + ORT's provider list) says what torch, checked independently, says."""
    from serving.runtime import cuda_present

    assert cuda_present() == (torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers())


@pytest.mark.parametrize("has_cuda", [False, True])
def test_auto_device_asks_for_cuda_exactly_when_present(bundle, monkeypatch, has_cuda):
    """device='auto' requests the CUDA provider (and IO binding) if and only if CUDA is present, and
    device='cpu' never does: the providers each ONNX Runtime session is created with are recorded."""
    import serving.runtime as rt

    requested: list[list[str]] = []
    real = ort.InferenceSession

    def session(path, opts, providers, **kw):
        requested.append(list(providers))
        return real(path, opts, providers=["CPUExecutionProvider"], **kw)  # this machine may have no GPU

    monkeypatch.setattr(rt, "cuda_present", lambda: has_cuda)
    monkeypatch.setattr(rt.ort, "InferenceSession", session)
    BundleRuntime(bundle, device="auto", threads=1, verify_checksums=False)
    want = ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]
    assert requested == [want, want, want]  # image graph, text graph, intervention graph
    requested.clear()
    BundleRuntime(bundle, device="cpu", threads=1, verify_checksums=False)
    assert requested == [["CPUExecutionProvider"]] * 3


def test_auto_device_on_this_machine(bundle):
    auto = BundleRuntime(bundle, device="auto", threads=1, verify_checksums=False)
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    assert auto.provider == ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider")
    assert auto.use_io_binding == gpu


def test_fp16_variant_runs_on_the_cpu_provider(observe_variant_bundle):
    """fp16 graphs crash ORT's NCHWc pass on CPU unless the runtime disables it; outputs track fp32."""
    # observe mode: logits are the backbone's own (no TopK selection that fp16 noise could flip)
    b = observe_variant_bundle
    fp32 = BundleRuntime(b, device="cpu")
    fp16 = BundleRuntime(b, device="cpu", variant="fp16")
    pixels = np.stack([fp32.preprocess(im) for im in _images()])
    a, h = fp32.run(pixels), fp16.run(pixels)
    assert np.abs(a.logits - h.logits).max() <= 1e-2  # the tolerance tests/test_parity_quant.py states
    # the decomposition stays fp32 inside the fp16 graph: contributions sum to that graph's own logits
    np.testing.assert_allclose(h.contributions.sum(1), h.logits, rtol=1e-4, atol=1e-4)


def test_int8_dec_variant_serves_on_the_cpu_provider(variant_bundle):
    """The int8-dec graph (CLT decoders stored int8) opens in the serving runtime (ONNX Runtime, CPU) and
    answers: its top label is fp32's on Fashion-MNIST images, each answer's contributions sum to its logits."""
    fp32 = BundleRuntime(variant_bundle, device="cpu", threads=1)
    dec = BundleRuntime(variant_bundle, device="cpu", threads=1, variant="int8-dec")
    assert dec.provider == "CPUExecutionProvider" and dec.variant == "int8-dec"
    images = _images()[:20]  # the Fashion-MNIST ones
    a, b = fp32.explain(images), dec.explain(images)
    agree = np.mean([x.top[0].label == y.top[0].label for x, y in zip(a, b)])
    assert agree >= 0.9
    assert max(r.completeness_residual for r in b) <= 1e-4
