"""Every edited row of the intervention graph (`intervene.onnx`) against the independent reference in
tests/export/_hooked.py: open_clip's own VisionTransformer.forward with hooks applying the same edits
(term scales on ln_pre / ls_1 outputs, dropped keys through nn.MultiheadAttention's key_padding_mask,
deleted patches written into the pixels by hand, feature edits on the dense CLT code computed from the
raw parameters), never the project's ViT, decomposition or CLT code.

Per row: max |logit difference| <= 1e-5 x max(1, |logit|); the contributions equal the reference's
hand decomposition (and sum to the graph's logits: completeness of the edited model); the top features
are the reference's largest |contribution| features with their activations and contributions.
Edits: features (ablate, scale, set an inactive one), terms (CLS only and every token), patches
(deleted, dropped as keys) and all at once; `cls` and `all` modes; the tiny model, the reference
model, and (slow) the ViT-B-32 architecture.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _hooked import RefEdit, reference
from conftest import ort_session
from test_parity_open_clip import fashion_pixels

from bundle import INTERVENE_OUTPUTS, load_bundle
from export.fused import export_intervener
from pipeline.shipped import load_shipped
from serving.intervene import EditSpace, edit_arrays
from serving.schemas import EditSet
from training.data import FASHION_MNIST_CLASSES
from training.model.backbone import load_backbone
from training.testing import random_clt

LOGIT_REL = 1e-5  # of max(1, |logit|), per logit (the target)
REL = 2e-5  # contributions and top features, of the largest magnitude (as test_parity_open_clip)
FILL = torch.tensor([0.3, -0.2, 0.1])


def edit_set(e: RefEdit) -> EditSet:
    """The API's form of a reference edit (scale s with shift 0, or set v with scale 0)."""
    feats = []
    for layer, index, scale, shift in e.features:
        feats.append({"layer": layer, "index": index, **({"set": shift} if shift else {"scale": scale})})
    return EditSet.model_validate({"features": feats, "terms": [{"term": t, "scale": s} for t, s in e.terms.items()],
                                   "term_tokens": "all" if e.all_tokens else "cls", "delete_patches": e.delete,
                                   "drop_keys": e.drop})


def edits_for(backbone, clt, pixels, text, mode) -> list[RefEdit]:
    """Edits that change something on these images: image 0's two strongest CLS features, an inactive one."""
    ref = reference(backbone.visual, clt, pixels[:1], text, backbone.logit_scale, mode)
    L = backbone.n_layers
    fc = ref.feature_contribution[0].abs()  # [L, F]
    order = fc.flatten().argsort(descending=True)
    (l0, i0), (l1, i1) = [divmod(int(j), fc.shape[1]) for j in order[:2]]
    inactive = divmod(int(order[-1]), fc.shape[1])
    P = int(backbone.visual.grid_size[0]) * int(backbone.visual.grid_size[1])
    return [
        RefEdit(),
        RefEdit(features=[(l0, i0, 0.0, 0.0)]),
        RefEdit(features=[(l1, i1, 2.5, 0.0), (inactive[0], inactive[1], 0.0, 3.0), (l0, i0, 0.0, 0.0)]),
        RefEdit(terms={"attn.1": 0.0, f"clt.{L - 2}": 0.5}),
        RefEdit(terms={"embed": 0.7, f"attn.{L - 1}": 0.0, "bias": 2.0, "clt.0": 0.0}, all_tokens=True),
        RefEdit(delete=[0, P // 2, P - 1]),
        RefEdit(drop=[1, 2, P - 2]),
        RefEdit(features=[(l1, i1, 0.0, 0.0)], terms={"attn.0": 0.5}, all_tokens=True, delete=[3], drop=[P - 1, 4]),
    ]


def check(backbone, clt, session, space: EditSpace, pixels: torch.Tensor, text: torch.Tensor, mode: str) -> dict[str, float]:
    """Assert every (edit, image) row of the graph equals the hooked reference; returns the max errors."""
    edits = edits_for(backbone, clt, pixels, text, mode)
    n = len(pixels)
    feeds = edit_arrays([edit_set(e) for e in edits for _ in range(n)], space, FILL.tolist())
    px = pixels.repeat(len(edits), 1, 1, 1).numpy()
    got = dict(zip(INTERVENE_OUTPUTS, session.run(list(INTERVENE_OUTPUTS), {"pixels": px, "text_embeddings": text.numpy(), **feeds})))
    worst = {"logits": 0.0, "contributions": 0.0, "completeness": 0.0, "top_features": 0.0, "changed": 0.0}
    base = None
    for j, e in enumerate(edits):
        ref = reference(backbone.visual, clt, pixels, text, backbone.logit_scale, mode, edit=e, fill=FILL)
        rows = slice(j * n, (j + 1) * n)
        lg, rl = got["logits"][rows].astype(np.float64), ref.logits.numpy()
        err = np.abs(lg - rl) / np.maximum(1.0, np.abs(rl))
        assert err.max() <= LOGIT_REL, (j, e, err.max())
        scale = max(1.0, float(np.abs(rl).max()), float(ref.contributions.abs().max()))
        c_err = np.abs(got["contributions"][rows] - ref.contributions.numpy()).max() / scale
        complete = np.abs(got["contributions"][rows].astype(np.float64).sum(1) - lg).max() / max(1.0, float(np.abs(lg).max()))
        assert c_err <= REL and complete <= 1e-5, (j, e, c_err, complete)
        fc = ref.feature_contribution.numpy()  # [B, L, F] of the edited model
        layer, index = got["top_feature_layer"][rows], got["top_feature_index"][rows]
        K = layer.shape[1]
        b = np.arange(n)[:, None]
        top_ref = -np.sort(-np.abs(fc.reshape(n, -1)), axis=1)[:, :K]
        f_err = max(np.abs(np.abs(got["top_feature_contribution"][rows]) - top_ref).max(),
                    np.abs(got["top_feature_contribution"][rows] - fc[b, layer, index]).max()) / scale
        act_ref = np.stack([c.numpy() for c in ref.cls_codes], 1)[b, layer, index]
        a_err = np.abs(got["top_feature_activation"][rows] - act_ref).max() / max(1.0, float(np.abs(act_ref).max()))
        assert f_err <= REL and a_err <= REL, (j, e, f_err, a_err)
        if j == 0:
            base = rl
        else:
            worst["changed"] = max(worst["changed"], float(np.abs(rl - base).max()))
        worst.update(logits=max(worst["logits"], float(err.max())), contributions=max(worst["contributions"], c_err),
                     completeness=max(worst["completeness"], complete), top_features=max(worst["top_features"], f_err, a_err))
    assert worst["changed"] > 1e-3  # the edits do something (not a test of identity rows only)
    return worst


def tiny_space(backbone, clt) -> EditSpace:
    from bundle import term_names
    g = tuple(int(x) for x in backbone.visual.grid_size)
    return EditSpace(backbone.n_layers, clt.cfg.n_features, tuple(term_names(backbone.n_layers)), g)


@pytest.fixture(scope="module")
def tiny_intervene(tiny_graphs, tmp_path_factory):
    """cltvit-tiny + the parity tests' random CLT as intervention graphs, per mode, exported on first use."""
    root, sessions = tmp_path_factory.mktemp("tiny-intervene"), {}

    def session(mode: str):
        if mode not in sessions:
            b = tiny_graphs.backbone
            path = export_intervener(b.visual, tiny_graphs.clt, root / f"{mode}.onnx", logit_scale=b.logit_scale,
                                     embed_dim=b.embed_dim, mode=mode, top_k_features=16)
            sessions[mode] = ort_session(path, threads=2)
        return sessions[mode]

    return session


@pytest.mark.parametrize("mode", ["cls", "all"])
def test_tiny_intervene_graph_equals_hooked_open_clip(tiny_graphs, tiny_intervene, mode):
    backbone, clt = tiny_graphs.backbone, tiny_graphs.clt
    text = backbone.class_embeddings(FASHION_MNIST_CLASSES, ["a photo of a {}."]).float()
    worst = check(backbone, clt, tiny_intervene(mode), tiny_space(backbone, clt), fashion_pixels(backbone, 3), text, mode)
    print(f"cltvit-tiny {mode}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


@pytest.mark.parametrize("mode", ["cls", pytest.param("all", marks=pytest.mark.slow)])  # all: an export of its own
def test_reference_intervene_graph_equals_hooked_open_clip(reference_bundle, tmp_path, mode):
    """The reference bundle's own intervene.onnx (cls mode) and an all-token graph of the same shipped weights."""
    backbone, clt, _ = load_shipped()
    m, paths = load_bundle(reference_bundle, verify_checksums=False)
    assert paths.intervene is not None and m.intervene is not None and m.effective_patches().grid == (4, 4)
    path = paths.intervene if mode == m.mode else export_intervener(
        backbone.visual, clt, tmp_path / "all.onnx", logit_scale=backbone.logit_scale, embed_dim=backbone.embed_dim,
        mode=mode, top_k_features=m.top_k_features)
    text = torch.from_numpy(np.load(paths.labels))
    worst = check(backbone, clt, ort_session(path, threads=2), EditSpace.of(m), fashion_pixels(backbone, 4), text, mode)
    print(f"reference {mode}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


@pytest.mark.slow
@pytest.mark.timeout(1500)  # exports the architecture's intervention graph per mode (minutes)
@pytest.mark.parametrize("mode", ["cls", "all"])
def test_vitb32_intervene_graph_equals_hooked_open_clip(tmp_path, mode):
    backbone = load_backbone("ViT-B-32", None, device="cpu", seed=0)
    clt = random_clt(backbone.n_layers, backbone.d_model, n_features=256, k=8, seed=2)
    path = export_intervener(backbone.visual, clt, tmp_path / f"{mode}.onnx", logit_scale=backbone.logit_scale,
                             embed_dim=backbone.embed_dim, mode=mode, top_k_features=16)
    text = backbone.class_embeddings(FASHION_MNIST_CLASSES, ["a photo of a {}."]).float()
    worst = check(backbone, clt, ort_session(path, threads=2), tiny_space(backbone, clt), fashion_pixels(backbone, 1), text, mode)
    print(f"ViT-B-32 {mode}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
