"""The total-effect map on the serving side (ONNX Runtime only): the Python API against the same edited images
explained one call each, `cltvit-explain --total-effect` (summary, JSON, --heatmap), folder scoring and the
stream with `--total-effect`, and bundles that state no patch grid. Over real HTTP: tests/serving/test_service.py.

The tiny bundles' fill is mid-grey (export.testing.grey_fill), so an edited copy of a 32x32 image is an image
file too: the reference here is the runtime's ordinary explanation of images edited with PIL, never
`bundle.patches`."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from _scoring import make_image_folder, read_jsonl
from PIL import Image

import serving
from export.testing import GREY
from serving.cli import explain_main
from serving.jobs.cli import score_main, stream_main
from serving.runtime import BundleRuntime, TotalEffectUnavailable
from serving.schemas import ImageResult
from training.data import FashionMNIST

GRID, PATCH = 4, 8  # cltvit-tiny: 32x32 pixels in 8x8 patches


@pytest.fixture(scope="module")
def runtime(bundle) -> BundleRuntime:
    return BundleRuntime(bundle, device="cpu", threads=1)


def model_size_image(i: int = 0) -> Image.Image:
    """A Fashion-MNIST test image at the model's 32x32, so preprocessing neither resizes nor crops it."""
    return FashionMNIST("test", limit=i + 1)[i][0].convert("RGB").resize((32, 32), Image.BICUBIC)


def edited(image: Image.Image, keep: list[int]) -> Image.Image:
    """The image with every patch not in `keep` painted mid-grey (the tiny bundle's fill), with PIL."""
    a = np.asarray(image).copy()
    for p in range(GRID * GRID):
        if p not in keep:
            r, c = divmod(p, GRID)
            a[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = GREY
    return Image.fromarray(a)


def separate_call_map(ex: serving.Explainer, image: Image.Image, labels: list[str]) -> np.ndarray:
    """[len(labels), P]: the keep-one total effect, every edited copy explained in a call of its own."""
    def logits(im: Image.Image) -> dict[str, float]:
        (r,) = ex.explain([im], top_k=len(ex.label_names), detail=False, spatial=False)
        return {t.label: t.logit for t in r.top}

    base = logits(edited(image, []))
    alone = [logits(edited(image, [p])) for p in range(GRID * GRID)]
    return np.array([[a[lab] - base[lab] for a in alone] for lab in labels])


def test_total_effect_equals_the_edited_images_as_separate_calls(bundle, runtime):
    ex = serving.Explainer(bundle, threads=1)
    image = model_size_image(0)
    (res,) = ex.explain([image], top_k=3, total_effect=True)
    te = res.total_effect
    assert te is not None and te.grid == (GRID, GRID) and te.method == "keep_one" and te.rows == GRID * GRID + 1
    assert te.fill == tuple(runtime.patches.fill) and "mid-grey" in te.fill_source
    labels = [c.label for c in te.classes]
    assert labels == [t.label for t in res.top][:3]
    want = separate_call_map(ex, image, labels)
    got = np.array([c.total for c in te.classes])
    scale = max(1.0, float(np.abs([t.logit for t in res.top]).max()))
    assert np.abs(got - want).max() <= 1e-5 * scale, np.abs(got - want).max()
    (filled,) = ex.explain([edited(image, [])], top_k=len(ex.label_names), detail=False, spatial=False)
    fill_logits = {t.label: t.logit for t in filled.top}
    for c in te.classes:
        assert c.logit == pytest.approx(next(t.logit for t in res.top if t.label == c.label), abs=1e-6)
        assert c.fill_logit == pytest.approx(fill_logits[c.label], abs=1e-5 * scale)
    # the edited copies the runtime builds are the preprocessed PIL-edited images, bit for bit
    rows = runtime.total_effect_rows(runtime.preprocess(image))
    assert np.array_equal(rows[0], runtime.preprocess(edited(image, [])))
    assert np.array_equal(rows[1 + 6], runtime.preprocess(edited(image, [6])))
    # off unless asked; several images at once each get their own
    assert ex.explain([image])[0].total_effect is None
    two = ex.explain([model_size_image(1), image], top_k=3, total_effect=True)
    np.testing.assert_allclose([c.total for c in two[1].total_effect.classes], got, atol=1e-5 * scale)


def test_total_effect_heatmap_and_cli(bundle, tmp_path, capsys):
    src = tmp_path / "in.png"
    model_size_image(2).save(src)
    assert explain_main([str(src), "--bundle", str(bundle), "--total-effect", "--json", "--threads", "1"]) == 0
    result = ImageResult.model_validate_json(capsys.readouterr().out)
    te = result.total_effect
    assert te is not None and te.classes[0].label == result.predicted and len(te.classes[0].total) == GRID * GRID
    assert explain_main([str(src), "--bundle", str(bundle), "--total-effect", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "total effect: 4x4 patches" in text and "17 edited copies" in text
    direct, total = tmp_path / "direct.png", tmp_path / "total.png"
    assert explain_main([str(src), "--bundle", str(bundle), "--heatmap", str(direct)]) == 0
    assert explain_main([str(src), "--bundle", str(bundle), "--total-effect", "--heatmap", str(total)]) == 0
    assert "total effect" in capsys.readouterr().err
    ex = serving.Explainer(bundle, threads=1)
    want = ex.heatmap(src, result=result, total_effect=True)  # the same map drawn from the result
    assert np.array_equal(np.asarray(Image.open(total)), np.asarray(want))
    assert not np.array_equal(np.asarray(Image.open(total)), np.asarray(Image.open(direct)))
    assert explain_main([str(src), "--bundle", str(bundle), "--total-effect", "--heatmap", str(total), "--heatmap-layer", "1"]) == 2
    assert "argument --heatmap-layer" in capsys.readouterr().err


def test_bundles_without_a_patch_grid_refuse_it(bundle, v1_bundle, tmp_path, capsys):
    ex = serving.Explainer(v1_bundle, threads=1)
    with pytest.raises(TotalEffectUnavailable, match="no patch grid"):
        serving.Explainer(ex.runtime, total_effect=True)
    with pytest.raises(TotalEffectUnavailable, match="no patch grid"):
        ex.explain([model_size_image(0)], total_effect=True)
    src = tmp_path / "in.png"
    model_size_image(0).save(src)
    assert explain_main([str(src), "--bundle", str(v1_bundle), "--total-effect"]) == 2
    assert "argument --total-effect" in capsys.readouterr().err
    assert score_main([str(tmp_path), "--bundle", str(v1_bundle), "--out", str(tmp_path / "o.jsonl"), "--total-effect"]) == 2
    assert "argument --total-effect" in capsys.readouterr().err
    # a format-2 bundle written before `patches` existed: its spatial grid with the preprocessing mean as fill
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    raw = json.loads((old / "bundle.json").read_text())
    del raw["patches"]
    (old / "bundle.json").write_text(json.dumps(raw))
    (r,) = serving.Explainer(old, threads=1).explain([model_size_image(0)], total_effect=True)
    assert r.total_effect.fill == (0.0, 0.0, 0.0) and "states no fill" in r.total_effect.fill_source


def test_score_and_stream_with_total_effect(bundle, tmp_path, capsys, monkeypatch):
    root = tmp_path / "imgs"
    good, broken = make_image_folder(root, n=6)
    out = tmp_path / "r.jsonl"
    assert score_main([str(root), "--bundle", str(bundle), "--out", str(out), "--total-effect", "--quiet", "--threads", "1"]) == 0
    records = {r["path"]: r for r in read_jsonl(out)}
    ex = serving.Explainer(bundle, threads=1)
    for rel in good[:3]:
        (res,) = ex.explain([root / rel], total_effect=True)
        rec, want = records[rel]["total_effect"], res.total_effect.classes[0]
        assert rec["label"] == records[rel]["label"] == want.label and rec["grid"] == [GRID, GRID] and rec["rows"] == 17
        np.testing.assert_allclose(rec["total"], want.total, rtol=1e-5, atol=1e-6)
        assert rec["fill_logit"] == pytest.approx(want.fill_logit, abs=1e-5)
    assert all("total_effect" not in records[b] for b in broken)
    assert score_main([str(root), "--bundle", str(bundle), "--out", str(out), "--quiet"]) == 2  # a resume keeps the setting
    assert "total_effect=True" in capsys.readouterr().err
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{root / good[0]}\n"))
    assert stream_main(["--bundle", str(bundle), "--total-effect", "--threads", "1"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    np.testing.assert_allclose(line["total_effect"]["total"], records[good[0]]["total_effect"]["total"], rtol=1e-5, atol=1e-6)
