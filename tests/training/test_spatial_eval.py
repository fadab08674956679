"""The spatial maps' evaluation (training/evaluation/spatial.py, `cltvit-eval-spatial`) on the tiny model:
patch geometry, the deletion mechanics, the Integrated Gradients baseline wired to the right target and
baseline (its completeness axiom, an independent check of Captum's output), and the CLI's outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.cli import spatial_eval_main
from training.evaluation import spatial as se
from training.model.checkpoint import save_checkpoint

pytest.importorskip("captum")


@pytest.fixture(scope="module")
def data(tiny_backbone):
    from training.data import FashionMNIST
    from training.evaluation.metrics import dataset_tensors

    ds = FashionMNIST("test", limit=12)
    pixels, labels = dataset_tensors(tiny_backbone, ds)
    return pixels, labels, tiny_backbone.class_embeddings(ds.class_names, ds.templates)


def test_patch_masks_tile_the_image(tiny_backbone):
    masks = se.patch_masks(tiny_backbone.visual)
    assert masks.shape == (16, 32, 32)
    assert (masks.sum(0) == 1).all()  # every pixel in exactly one patch
    assert masks[1, 0, 8:16].all() and masks[4, 8:16, 0].all()  # row-major: patch 1 right of 0, patch 4 below
    assert se.deletion_steps(16) == list(range(17))
    assert se.deletion_steps(196) == [round(f * 196 / 20) for f in range(21)]


def test_deletion_curves_start_at_the_image_and_end_at_the_fill(tiny_backbone, tiny_clt, data):
    pixels, labels, text = data
    visual, scale = tiny_backbone.visual, tiny_backbone.logit_scale
    masks = se.patch_masks(visual)
    fill = pixels.mean(dim=(0, 2, 3))
    with torch.no_grad():
        logits = se.model_logits(visual, tiny_clt, pixels, text, scale, "cls")
        gone = se.model_logits(visual, tiny_clt, fill.view(1, 3, 1, 1).expand_as(pixels), text, scale, "cls")
    target = logits.argmax(1)
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(len(pixels))])
    logit, correct = se.deletion_curves(visual, tiny_clt, pixels, labels, text, scale, "cls", target, order, fill, masks,
                                        [0, 1, 16])
    np.testing.assert_allclose(logit[:, 0], logits.gather(1, target[:, None])[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(logit[:, 2], gone.gather(1, target[:, None])[:, 0].numpy(), atol=1e-5)
    assert (correct[:, 0] == (logits.argmax(1) == labels).numpy()).all()
    # deleting one patch changes exactly that patch's pixels: same as doing it by hand for image 0
    x = pixels[:1].clone()
    x[:, :, masks[order[0, 0]]] = fill.view(1, 3, 1)
    with torch.no_grad():
        by_hand = se.model_logits(visual, tiny_clt, x, text, scale, "cls")[0, target[0]]
    assert abs(float(by_hand) - logit[0, 1]) <= 1e-5


def test_total_effect_scores_are_each_patch_alone_on_the_fill(tiny_backbone, tiny_clt, data):
    """The deletion test's total-effect map (keep_one, and delete_one) against images edited here by hand in torch."""
    pixels, _, text = data
    visual, scale = tiny_backbone.visual, tiny_backbone.logit_scale
    masks = se.patch_masks(visual)
    fill = pixels.mean(dim=(0, 2, 3))
    px = pixels[:3]
    with torch.no_grad():
        target = se.model_logits(visual, tiny_clt, px, text, scale, "cls").argmax(1)
    keep = se.total_effect_scores_of(visual, tiny_clt, px, text, scale, "cls", target, fill, chunk=7)  # chunks split images
    drop = se.total_effect_scores_of(visual, tiny_clt, px, text, scale, "cls", target, fill, "delete_one")
    assert keep.shape == drop.shape == (3, 16)
    for b in range(3):
        on_fill = fill.view(3, 1, 1).expand_as(px[b]).clone()
        alone = torch.stack([torch.where(masks[p], px[b], on_fill) for p in range(16)])  # patch p alone on the fill
        without = torch.stack([torch.where(masks[p], on_fill, px[b]) for p in range(16)])  # the image without patch p
        with torch.no_grad():
            lg = lambda x: se.model_logits(visual, tiny_clt, x, text, scale, "cls")[:, target[b]]  # noqa: E731
            want_keep = lg(alone) - lg(on_fill[None])
            want_drop = lg(px[b : b + 1]) - lg(without)
        np.testing.assert_allclose(keep[b].numpy(), want_keep.numpy(), atol=1e-4)
        np.testing.assert_allclose(drop[b].numpy(), want_drop.numpy(), atol=1e-4)


def test_integrated_gradients_are_complete(tiny_backbone, tiny_clt, data):
    """IG's completeness axiom: the patch scores sum to logit(image) - logit(baseline) of the target class
    (up to the integral's error), so the baseline and the target are the ones meant."""
    pixels, _, text = data
    visual, scale = tiny_backbone.visual, tiny_backbone.logit_scale
    fill = pixels.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    baseline = fill.expand(1, 3, 32, 32)
    px = pixels[:4]
    with torch.no_grad():
        logits = se.model_logits(visual, tiny_clt, px, text, scale, "observe")
        base = se.model_logits(visual, tiny_clt, baseline, text, scale, "observe")
    target = logits.argmax(1)
    scores = se.ig_scores(visual, tiny_clt, px, text, scale, "observe", target, baseline, 50, se.patch_masks(visual))
    want = logits.gather(1, target[:, None])[:, 0] - base[0, target]
    assert scores.shape == (4, 16)
    np.testing.assert_allclose(scores.sum(1).numpy(), want.numpy(), rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("mode", ["cls", "all"])
def test_clt_path_cells_are_an_exact_affine_split(tiny_backbone, tiny_clt, data, mode):
    """The CLS stream with softmax weights, LN scales and active CLT features held is affine in the patch
    values: its logits equal the model's (a plain forward), and the cells sum exactly to
    logit(values) - logit(values = 0); cut after each attention block, the cells are `decompose`'s maps."""
    from training.model.clt import SparseCode
    from training.model.decompose import decompose, splice_for_mode
    from training.model.vit import forward

    pixels, _, text = data
    visual, scale = tiny_backbone.visual, float(tiny_backbone.logit_scale)
    px = pixels[:6]
    with torch.no_grad():
        want = se.model_logits(visual, tiny_clt, px, text, scale, mode)
        dec = decompose(visual, tiny_clt, px, text, scale, mode, spatial_top_k=1)
    target = want.argmax(1)
    cells = se.cls_stream_cells(visual, tiny_clt, px, text, scale, mode, target)
    assert cells.shape == (6, tiny_backbone.n_layers, 16)

    splice = splice_for_mode(tiny_clt, mode)
    with torch.no_grad():
        res = forward(visual, px, splice, record_attention=True)
        codes = [SparseCode(*splice.cls_code(l, 6)) for l in range(tiny_clt.cfg.n_layers)]
        values = res.attn_values[:, :, 1:]
        logits, frozen = se.cls_stream_logits(visual, tiny_clt, res.embed_cls, values, res.attn_weights, codes, text, scale)
        zero, _ = se.cls_stream_logits(visual, tiny_clt, res.embed_cls, torch.zeros_like(values), res.attn_weights, codes,
                                       text, scale, frozen=frozen)
    np.testing.assert_allclose(logits.numpy(), want.numpy(), atol=1e-4)
    pick = lambda t: t.gather(1, target[:, None])[:, 0].numpy()  # noqa: E731
    np.testing.assert_allclose(cells.sum((1, 2)).numpy(), pick(logits) - pick(zero), atol=1e-4)
    # the CLT paths change the map (a random CLT writes plenty), the direct cut is the maps as served
    direct = se.cls_stream_cells(visual, tiny_clt, px, text, scale, mode, target, through_clt=False)
    np.testing.assert_allclose(direct.numpy(), dec.spatial.tokens[:, 0, :, 1:].numpy(), atol=1e-5)
    assert (cells - direct).abs().max() > 1e-3
    with pytest.raises(se.EvaluationError, match="observe"):
        se.cls_stream_cells(visual, tiny_clt, px, text, scale, "observe", target)


def test_gradient_scores_pool_gradient_times_delta(tiny_backbone, tiny_clt, data):
    """Gradient x (image - fill) per patch, checked against a finite difference of the logit along
    (image - fill) restricted to one patch (first order)."""
    pixels, _, text = data
    visual, scale = tiny_backbone.visual, float(tiny_backbone.logit_scale)
    px, masks = pixels[:2].double(), se.patch_masks(visual)
    fill = pixels.mean(dim=(0, 2, 3)).double()
    visual64, clt64 = visual.double(), tiny_clt.double()
    try:
        with torch.no_grad():
            target = se.model_logits(visual64, clt64, px, text.double(), scale, "cls").argmax(1)
        scores = se.gradient_scores(visual64, clt64, px, text.double(), scale, "cls", target, fill, masks)
        eps, p = 1e-6, 5
        step = (px - fill.view(1, 3, 1, 1)) * masks[p].to(px.dtype)
        with torch.no_grad():
            up = se.model_logits(visual64, clt64, px + eps * step, text.double(), scale, "cls")
            down = se.model_logits(visual64, clt64, px - eps * step, text.double(), scale, "cls")
        fd = (up - down).gather(1, target[:, None])[:, 0] / (2 * eps)
        np.testing.assert_allclose(scores[:, p].numpy(), fd.numpy(), rtol=1e-5, atol=1e-8)
    finally:
        visual.float(), tiny_clt.float()


@pytest.mark.parametrize("mode", ["cls", "all", "observe"])
def test_linearised_model_is_the_model_and_affine(tiny_backbone, tiny_clt, data, mode):
    """With nothing held its logits are the model's (open_clip's own attention modules run there); held at
    the image, it is affine in the pixels: the patch scores sum exactly to logit(image) - logit(fill), both
    with the image's gates, which fails if any nonlinear part escaped holding."""
    pixels, _, text = data
    visual, scale = tiny_backbone.visual, float(tiny_backbone.logit_scale)
    px, masks = pixels[:6], se.patch_masks(visual)
    fill = pixels.mean(dim=(0, 2, 3))
    with torch.no_grad():
        want = se.model_logits(visual, tiny_clt, px, text, scale, mode)
        got, held = se.linearised_logits(visual, tiny_clt, px, text, scale, mode)
        at_fill, _ = se.linearised_logits(visual, tiny_clt, fill.view(1, 3, 1, 1).expand_as(px), text, scale, mode,
                                          held=se.Held(held.values))
        true_fill = se.model_logits(visual, tiny_clt, fill.view(1, 3, 1, 1).expand_as(px), text, scale, mode)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    target = want.argmax(1)
    scores = se.linearised_scores(visual, tiny_clt, px, text, scale, mode, target, fill, masks)
    pick = lambda t: t.gather(1, target[:, None])[:, 0].numpy()  # noqa: E731
    np.testing.assert_allclose(scores.sum(1).numpy(), pick(got) - pick(at_fill), atol=1e-4)
    assert np.abs(pick(at_fill) - pick(true_fill)).max() > 1e-3  # held gates are not the fill's own
    grad = se.gradient_scores(visual, tiny_clt, px, text, scale, mode, target, fill, masks)
    assert (scores - grad).abs().max() > 1e-3


def test_baseline_maps_are_the_fill_images_map_per_class(tiny_backbone, tiny_clt, data):
    """Row c of the table is the fill image's summed map of class c, whatever c's rank (decompose on c alone)."""
    from training.model.decompose import decompose

    pixels, _, text = data
    visual, scale = tiny_backbone.visual, float(tiny_backbone.logit_scale)
    baseline = pixels.mean(dim=(0, 2, 3)).view(1, 3, 1, 1).expand(1, 3, *pixels.shape[2:])
    table = se.baseline_maps(visual, tiny_clt, baseline, text, scale, "cls")
    assert table.shape == (len(text), 16)
    for c in (0, 3, len(text) - 1):
        with torch.no_grad():
            alone = decompose(visual, tiny_clt, baseline, text[c : c + 1], scale, "cls", spatial_top_k=1)
        np.testing.assert_allclose(table[c].numpy(), alone.spatial.tokens[0, 0, :, 1:].sum(0).numpy(), atol=1e-5)


def test_cli_writes_the_report(tiny_backbone, tiny_clt, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_clt, tiny_backbone.identity())
    out = tmp_path / "eval"
    rc = spatial_eval_main(["--clt", str(ckpt), "--model", "cltvit-tiny", "--images", "10", "--batch-size", "5",
                            "--ig-steps", "8", "--random-seeds", "2", "--time-images", "3", "--time-images-ig", "2",
                            "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "spatial.json").read_text())
    dl = report["deletion"]
    assert dl["images"] == 10 and dl["steps"] == list(range(17))
    for m in se.METHODS:
        c = dl["methods"][m]
        assert len(c["logit"]) == 17 and 0 <= c["auc_accuracy"] <= 1
    assert dl["methods"]["ours"]["logit"][0] == pytest.approx(dl["methods"]["ig"]["logit"][0])  # the same images
    assert dl["methods"]["ours"]["logit"][-1] == pytest.approx(dl["methods"]["random"]["logit"][-1], abs=1e-4)  # all gone
    assert set(report["times"]["methods"]) == {"forward", "ours", "ig", "total_effect"}
    assert report["times"]["ratios"]["total_effect_vs_ig"] > 0 and "Total-effect map / IG" in (out / "spatial.md").read_text()
    assert dl["methods"]["total_effect"]["logit"][0] == pytest.approx(dl["methods"]["ours"]["logit"][0])
    assert "total_effect_vs_ig_logit" in dl["ratios"] and "delete_one" not in dl["methods"]
    assert "clt_paths" not in dl["methods"]
    assert report["machine"]["threads"] == 1 and "cpu" in report["machine"]
    md = (out / "spatial.md").read_text()
    assert "| ours |" in md and "IG / ours (eager)" in md and (out / "spatial_deletion.png").stat().st_size > 0
    assert spatial_eval_main(["--random", "cltvit-tiny", "--n-features", "64", "--k", "4", "--time-images", "2",
                              "--time-images-ig", "1", "--ig-steps", "4", "--out", str(tmp_path / "r")]) == 0
    assert "deletion" not in json.loads((tmp_path / "r" / "spatial.json").read_text())
    assert spatial_eval_main(["--clt", str(ckpt), "--model", "cltvit-tiny", "--no-deletion", "--time-images", "2",
                              "--time-images-ig", "1", "--ig-steps", "4", "--out", str(tmp_path / "t")]) == 0
    timed = json.loads((tmp_path / "t" / "spatial.json").read_text())
    assert "deletion" not in timed and timed["times"]["methods"]["ours"]["images"] == 2
    rc = spatial_eval_main(["--clt", str(ckpt), "--model", "cltvit-tiny", "--images", "4", "--gap-analysis", "--ig-steps", "4",
                            "--random-seeds", "1", "--time-images", "1", "--time-images-ig", "1", "--out", str(tmp_path / "g")])
    assert rc == 0, capsys.readouterr().err
    gap = json.loads((tmp_path / "g" / "spatial.json").read_text())["deletion"]
    assert set(gap["methods"]) == set(se.METHODS + se.ANALYSIS_METHODS) and "clt_paths_vs_ig_logit" in gap["ratios"]
    assert gap["methods"]["clt_paths"]["logit"][0] == pytest.approx(gap["methods"]["ours"]["logit"][0])
    assert "Gap analysis" in (tmp_path / "g" / "spatial.md").read_text()
    capsys.readouterr()
    assert spatial_eval_main(["--clt", str(ckpt), "--model", "cltvit-tiny", "--gap-analysis", "--mode", "observe",
                              "--out", str(tmp_path / "o")]) == 2
    assert "observe" in capsys.readouterr().err
    assert spatial_eval_main(["--random", "cltvit-tiny", "--onnx", str(tmp_path / "none.onnx"), "--out", str(tmp_path)]) == 2
    assert "argument --onnx" in capsys.readouterr().err
