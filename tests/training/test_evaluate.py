"""The evaluation suite on a tiny random backbone: consistency properties, files and fields."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import eval_main as main
from training.data import FashionMNIST
from training.evaluation.comparison import comparison_verdict
from training.evaluation.metrics import (
    EvaluationError,
    c_proj,
    clt_replacement,
    dataset_tensors,
    faithfulness,
    fidelity,
    replacement_accuracy,
    true_output_replacement,
)
from training.evaluation.report import EvalConfig, evaluate_clt
from training.model.checkpoint import save_checkpoint
from training.model.clt import CLTConfig, CrossLayerTranscoder
from training.model.vit import capture


@pytest.fixture(scope="module")
def data(tiny_backbone):
    ds = FashionMNIST("test", limit=32)
    pixels, labels = dataset_tensors(tiny_backbone, ds)
    return ds, pixels, labels


def _fitted_clt(backbone, pixels, cross_layer=True, k=8):
    torch.manual_seed(0)
    cfg = CLTConfig(n_layers=backbone.n_layers, d_model=backbone.d_model, n_features=96, k=k, cross_layer=cross_layer)
    clt = CrossLayerTranscoder(cfg)
    cap = capture(backbone.visual, pixels[:16])
    L, B, T, d = cap.mlp_in.shape
    clt.fit_normalisation(cap.mlp_in.reshape(L, -1, d), cap.mlp_out.reshape(L, -1, d))
    with torch.no_grad():
        clt.b_enc.add_(0.05 * torch.randn_like(clt.b_enc))
    return clt.eval()


def test_dataset_tensors_match_preprocess(tiny_backbone, data):
    ds, pixels, labels = data
    assert pixels.shape == (32, 3, *tiny_backbone.image_size)
    im, y = ds[3]
    assert torch.allclose(pixels[3], tiny_backbone.preprocess(im))
    assert labels[3] == y


def test_identity_replacement_reproduces_baseline(tiny_backbone, data):
    _, pixels, labels = data
    text = tiny_backbone.class_embeddings(FashionMNIST.class_names, FashionMNIST.templates[:2])
    L = tiny_backbone.n_layers
    rep = replacement_accuracy(tiny_backbone.visual, pixels, labels, text, L, true_output_replacement(tiny_backbone.visual), 16)
    for t in ("cls", "patches", "all"):
        assert rep[t] == [rep["baseline"]] * L
        assert rep["agreement"][t] == [1.0] * L
    # a CLT at init is no identity: all-token replacement of every layer changes predictions
    clt = _fitted_clt(tiny_backbone, pixels)
    rep2 = replacement_accuracy(tiny_backbone.visual, pixels, labels, text, L, clt_replacement(clt), 16, ("all",))
    assert rep2["baseline"] == rep["baseline"]
    assert rep2["agreement"]["all"][0] < 1.0


@pytest.mark.parametrize("cross_layer", [True, False])
def test_cproj_columns_sum_to_one(tiny_backbone, data, cross_layer):
    _, pixels, _ = data
    clt = _fitted_clt(tiny_backbone, pixels, cross_layer)
    cp = c_proj(tiny_backbone.visual, clt, pixels[:24], batch_size=10)
    L = tiny_backbone.n_layers
    for g in ("cls", "patches"):
        m = torch.tensor(cp[g])
        assert m.shape == (L + 1, L)
        assert torch.allclose(m.sum(0), torch.ones(L, dtype=m.dtype), atol=1e-5)
        for j in range(L):  # nothing from later layers
            assert all(m[i, j] == 0 for i in range(j + 1, L))
        if not cross_layer:  # a PLT only writes to its own layer
            off = m[:L] - torch.diag(torch.diagonal(m[:L]))
            assert torch.count_nonzero(off) == 0


def test_fidelity_matches_direct_computation(tiny_backbone, data):
    _, pixels, _ = data
    clt = _fitted_clt(tiny_backbone, pixels, k=8)
    fid = fidelity(tiny_backbone.visual, clt, pixels[:20], batch_size=7)
    cap = capture(tiny_backbone.visual, pixels[:20])
    L, B, T, d = cap.mlp_in.shape
    with torch.no_grad():
        recon, codes = clt(cap.mlp_in.reshape(L, -1, d))
    y = cap.mlp_out.reshape(L, -1, d).double()
    yhat = recon.double()
    r2 = 1 - (y - yhat).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))
    assert torch.allclose(torch.tensor(fid["all"]["r2"], dtype=torch.float64), r2, atol=1e-6)
    cls_y, cls_h = cap.mlp_out[:, :, 0].double(), recon.reshape(L, B, T, d)[:, :, 0].double()
    mse = (cls_y - cls_h).pow(2).mean((1, 2))
    assert torch.allclose(torch.tensor(fid["cls"]["mse"], dtype=torch.float64), mse, rtol=1e-6)
    assert fid["patches"]["tokens"] == B * (T - 1) and fid["cls"]["tokens"] == B
    for g in ("cls", "patches", "all"):
        assert all(0 < v <= 8 for v in fid[g]["l0"])
        assert all(0 <= v <= 1 for v in fid[g]["dead_fraction"])


def test_faithfulness_on_a_constructed_decomposition():
    torch.manual_seed(0)
    N, L, C = 400, 4, 5
    T = 2 * L + 3
    labels = torch.randint(0, C, (N,))
    contrib = 0.1 * torch.randn(N, T, C)
    clt2 = 1 + L + 2  # term index of clt.2: carries the decision
    contrib[torch.arange(N), clt2, labels] += 5.0
    logits = contrib.sum(1)
    f = faithfulness(logits, contrib, labels, "clt", seeds=5)
    assert f["accuracy"] == 1.0
    assert f["top1_layer_histogram"][2] == N
    assert f["drop_top1"] < 0.4
    assert f["drop_random_mean"] > 0.7  # a random layer is the decisive one 1 time in 4
    assert f["cost_ratio"] > 2
    assert f["deletion_attributed"][L] == pytest.approx(f["deletion_random"][L])  # all deleted either way
    assert f["keep_top_k"][L] == f["accuracy"] and f["keep_top_k"][1] == 1.0
    b = faithfulness(logits, contrib, labels, "block", seeds=5)
    assert b["unit_terms"][0] == ["attn.0", "clt.0"]
    with pytest.raises(EvaluationError):
        faithfulness(logits, contrib, labels, "neuron")


def test_evaluate_writes_report_and_cli(tiny_backbone, data, tmp_path, capsys):
    ds, pixels, labels = data
    clt = _fitted_clt(tiny_backbone, pixels)
    cfg = EvalConfig(batch_size=16, fidelity_images=16, cproj_images=16, random_seeds=3)
    rep = evaluate_clt(tiny_backbone, clt, ds, tmp_path / "run", cfg, pixels_labels=(pixels[:32], labels[:32]), log=lambda s: None)
    for f in ("report.json", "report.md", "c_proj.json", "c_proj.png", "deletion.png", "replacement.png", "fidelity.png"):
        assert (tmp_path / "run" / f).stat().st_size > 0, f
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(saved) >= {"fidelity", "replacement", "c_proj", "faithfulness", "summary", "backbone"}
    assert set(saved["summary"]) >= {"r2_mean", "cosine_mean", "l0_mean", "accuracy_unmodified", "drop_all_tokens",
                                    "faithfulness_cost_ratio"}
    assert len(saved["replacement"]["all"]) == tiny_backbone.n_layers
    assert rep["faithfulness"]["clt"]["images"] == 32
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Cascaded replacement" in md and "C_proj" in md
    assert saved["ablation"]["images"] == 32 and set(saved["ablation"]["units"]) == {"clt", "block", "feature"}
    assert "7. Faithfulness through real ablations" in md
    # where the figures were made: CPU model and instruction sets (as /proc/cpuinfo lists them), threads, versions
    mach = saved["machine"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    flags = set(next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")))
    assert mach["cpu"] == model and mach["cores"] == os.cpu_count() and mach["threads"] == torch.get_num_threads()
    assert set(mach["isa"]) == flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
                                        "amx_bf16", "amx_int8"}
    assert mach["versions"]["torch"] == torch.__version__.split("+")[0] and mach["versions"]["open_clip_torch"]
    assert f"- machine: {model}" in md

    save_checkpoint(tmp_path / "ckpt", clt, tiny_backbone.identity())
    rc = main(["--clt", str(tmp_path / "ckpt"), "--limit", "12", "--batch-size", "6", "--fidelity-images", "6",
               "--cproj-images", "6", "--seeds", "2", "--spatial-images", "6", "--out", str(tmp_path / "cli")])
    assert rc == 0 and (tmp_path / "cli" / "report.md").exists()
    assert "6. Where in the image" in (tmp_path / "cli" / "report.md").read_text()  # the optional spatial section
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["spatial"]["deletion"]["images"] == 6
    assert (tmp_path / "cli" / "spatial_deletion.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["--clt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"cltvit-eval: error: {tmp_path / 'nothing'} is not a CLT checkpoint: clt.json missing\n"
    assert main(["--clt", str(tmp_path / "ckpt"), "--limit", "0", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "cltvit-eval: error: --limit must be >= 1, got 0\n"


def test_comparison_verdict_per_k():
    row = lambda kind, k, r2, acc: {"kind": kind, "k": k, "r2": r2, "accuracy_all": acc}  # noqa: E731
    rows = [row("clt", 4, 0.9, 0.80), row("plt", 4, 0.8, 0.79), row("clt", 8, 0.95, 0.80), row("plt", 8, 0.9, 0.81)]
    v = comparison_verdict(rows)
    assert v["per_k"]["4"] == {"r2": True, "accuracy_all": True, "r2_gap": pytest.approx(0.1), "accuracy_all_gap": pytest.approx(0.01)}
    assert v["per_k"]["8"]["accuracy_all"] is False
    assert v["clt_better_r2_everywhere"] is True and v["clt_better_accuracy_everywhere"] is False


def test_real_ablations_equal_the_hooked_open_clip_reference(tiny_backbone, data):
    """Section 7's drops are the predicted logit's change when open_clip's own forward (tests/export/_hooked.py,
    not the project's ViT or CLT code) runs without the unit; the bootstrap interval brackets the mean."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    from _hooked import RefEdit, reference

    from training.evaluation.ablation import ablation_drops, ablation_faithfulness, bootstrap_interval

    ds, pixels, labels = data
    clt = _fitted_clt(tiny_backbone, pixels).eval()
    text = tiny_backbone.class_embeddings(ds.class_names, ds.templates).float()
    px = pixels[:4]
    d = ablation_drops(tiny_backbone.visual, clt, px, text, tiny_backbone.logit_scale, batch_size=3)
    L = tiny_backbone.n_layers
    for i in range(len(px)):
        r0 = reference(tiny_backbone.visual, clt, px[i : i + 1], text, tiny_backbone.logit_scale, "cls")
        pred = int(r0.logits.argmax())
        c = r0.contributions[0, :, pred]
        top = int(c[1 + L : 1 + 2 * L].argmax())
        r1 = reference(tiny_backbone.visual, clt, px[i : i + 1], text, tiny_backbone.logit_scale, "cls",
                       edit=RefEdit(terms={f"clt.{top}": 0.0}))
        assert d["clt"]["top1"][i] == pytest.approx(float(r0.logits[0, pred] - r1.logits[0, pred]), abs=1e-4)
        assert d["clt"]["direct"][i] == pytest.approx(float(c[1 + L + top]), abs=1e-4)
        fc = r0.feature_contribution[0]
        layer, index = divmod(int(fc.flatten().argmax()), fc.shape[1])
        r2 = reference(tiny_backbone.visual, clt, px[i : i + 1], text, tiny_backbone.logit_scale, "cls",
                       edit=RefEdit(features=[(layer, index, 0.0, 0.0)]))
        assert d["feature"]["top1"][i] == pytest.approx(float(r0.logits[0, pred] - r2.logits[0, pred]), abs=1e-4)
    sec = ablation_faithfulness(tiny_backbone.visual, clt, pixels[:16], text, tiny_backbone.logit_scale, resamples=200)
    for u in sec["units"].values():
        lo, hi = u["drop_top1_ci"]
        assert lo <= u["drop_top1"] <= hi
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)
