"""Where in the image on the serving side (ONNX Runtime only): runtime results, the heatmap PNG, the
Python API, `cltvit-explain`, folder scoring and the stream with `--spatial`, format-1 bundles, and the
response size on the ViT-B-16 architecture (slow: a real bundle with a 14x14 grid)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import orjson
import pytest
from _scoring import fashion_images, make_image_folder, read_jsonl
from PIL import Image

import serving
from serving.cli import explain_main
from serving.engine import response_body
from serving.heatmap import overlay
from serving.jobs.cli import score_main
from serving.runtime import BundleRuntime, SpatialUnavailable
from serving.schemas import ImageResult
from serving.results import RawOutputs, image_result
from serving.schemas import SpatialExplanation
from serving.spatial import round_significant, spatial_maps


@pytest.fixture(scope="module")
def runtime(bundle) -> BundleRuntime:
    return BundleRuntime(bundle, device="cpu", threads=1)


def _image(w: int = 60, h: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def assert_maps_complete(result: ImageResult, term_names: list[str], rel: float = 1e-5) -> None:
    """Each map's parts add up, per layer, to its label's attn.l term in the same result."""
    sp = result.spatial
    assert sp is not None and sp.classes
    terms = {e.label: dict((t.term, t.value) for t in e.terms) for e in result.explanations}
    L = len(sp.layers)
    assert sp.layers == [t for t in term_names if t.startswith("attn.")]
    scale = max(abs(v) for t in terms.values() for k, v in t.items() if k.startswith("attn."))
    for c in sp.classes:
        layers = np.asarray(c.layers)
        assert layers.shape == (L, sp.grid[0] * sp.grid[1]) and len(c.total) == sp.grid[0] * sp.grid[1]
        np.testing.assert_allclose(np.asarray(c.total), layers.sum(0), atol=1e-6 * max(1.0, scale))
        parts = layers.sum(1) + np.asarray(c.cls_cell) + np.asarray(c.value_bias) + np.asarray(c.output_bias)
        want = np.array([terms[c.label][f"attn.{l}"] for l in range(L)])
        assert np.abs(parts - want).max() <= rel * max(1.0, scale), c.label
        assert c.attention == pytest.approx(want.sum(), abs=1e-5 * max(1.0, scale))
    assert sp.residual <= 1e-6 * max(1.0, scale)


def test_runtime_maps_sum_to_the_attention_terms(runtime):
    images = [img for img, _ in fashion_images(6)] + [_image()]
    results = runtime.explain(images, top_k=7, spatial=True, heads=True)
    for r in results:
        sp = r.spatial
        assert sp.grid == (4, 4)
        # maps for the first min(top_k, spatial top-k) labels, in the result's order
        assert [c.label for c in sp.classes] == [t.label for t in r.top][: runtime.spatial.top_k]
        assert_maps_complete(r, runtime.term_names)
        heads = np.asarray(sp.classes[0].heads)
        assert heads.shape == (4, 4, 16)  # layers, heads, rows * columns
        np.testing.assert_allclose(heads.sum(1), np.asarray(sp.classes[0].layers), atol=1e-6)
        np.testing.assert_allclose(np.asarray(sp.classes[0].heads_cls_cell).sum(1), sp.classes[0].cls_cell, atol=1e-6)
        assert all(c.heads == [] and c.heads_cls_cell == [] for c in sp.classes[1:])
    plain = runtime.explain(images[:1], top_k=7)[0]
    assert plain.spatial is None  # off unless asked
    assert runtime.explain(images[:1], top_k=2, spatial=True)[0].spatial.classes[0].heads == []


def test_results_without_validation_equal_the_validated_model(runtime):
    """`results` builds the maps' models without validating them (`schemas.trusted`): they must be what
    validating the same dicts gives, field types included, and a dict with a missing field is refused."""
    from serving.schemas import ClassMap, ImageResult, trusted

    px = runtime.normalize(np.stack([runtime.resize_crop(_image(seed=s)) for s in range(2)]))
    raw = runtime.run(px)
    results = runtime.results(raw, runtime.label_names, spatial=True, heads=True)
    dicts = runtime.spatial_maps(raw, runtime.label_names, 5, heads=True)
    for r, d in zip(results, dicts):
        want = SpatialExplanation.model_validate(d)
        assert r.spatial == want and r.spatial.model_dump_json() == want.model_dump_json()
        assert type(r.spatial.grid) is tuple and all(type(c) is ClassMap for c in r.spatial.classes)
        assert ImageResult.model_validate_json(r.model_dump_json()) == r
    partial = {k: v for k, v in dicts[0]["classes"][0].items() if k != "heads"}
    with pytest.raises(ValueError, match="heads"):
        trusted(ClassMap, partial)


def test_fewer_labels_than_the_spatial_top_k(runtime):
    names = ["a shoe", "a bag", "a shirt"]
    (r,) = runtime.explain([_image()], labels=names, top_k=3, spatial=True)
    assert [c.label for c in r.spatial.classes] == [t.label for t in r.top]
    assert_maps_complete(r, runtime.term_names)


def test_rounding_to_significant_digits():
    x = np.array([0.0, 1.23456789e-7, -98765.4321, 0.1 + 2e-17, 3.0], np.float32)
    r = round_significant(x)
    assert np.all(np.abs(r - x.astype(np.float64)) <= 5e-7 * np.abs(x.astype(np.float64)))
    assert json.dumps(r.tolist()) == "[0.0, 1.234568e-07, -98765.43, 0.1, 3.0]"


def test_http_form_writes_each_float32_exactly(runtime):
    """The arrays form (what /explain encodes with orjson) carries the graph's float32 values unrounded: the
    JSON reads back to the very same float32s; the list form (Python API) is the same numbers to 7 digits."""
    px = runtime.normalize(np.stack([runtime.resize_crop(_image(seed=s)) for s in range(3)]))
    raw = runtime.run(px)
    names = runtime.label_names
    arrays = runtime.spatial_maps(raw, names, k=[5, 2, 3], heads=[True, False, True], arrays=True)
    lists = runtime.spatial_maps(raw, names, k=[5, 2, 3], heads=[True, False, True])
    for b, (a, li) in enumerate(zip(arrays, lists)):
        back = json.loads(orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY))
        assert SpatialExplanation.model_validate(back) and [c["label"] for c in back["classes"]] == [c["label"] for c in li["classes"]]
        row_of = {int(c): s for s, c in enumerate(raw.spatial_class[b])}
        for got, want in zip(back["classes"], li["classes"]):
            s = row_of[names.index(got["label"])]
            tokens = raw.spatial_contributions[b, s]  # [L, N] float32, as the graph returned it
            assert np.array_equal(np.float32(got["layers"]), tokens[:, 1:]) and np.array_equal(np.float32(got["cls_cell"]), tokens[:, 0])
            assert np.array_equal(np.float32(got["value_bias"]), raw.spatial_bias[b, s, :, 0])
            assert np.array_equal(np.float32(got["total"]), tokens[:, 1:].sum(0, dtype=np.float64).astype(np.float32))
            for key in ("layers", "total", "cls_cell", "value_bias", "output_bias", "heads", "heads_cls_cell"):
                np.testing.assert_allclose(np.float64(got[key]), np.float64(want[key]), rtol=6e-7, atol=0)
            if got["heads"]:
                assert np.array_equal(np.float32(got["heads"]), raw.spatial_head_contributions[b][..., 1:])
        assert (b != 1) == bool(back["classes"][0]["heads"])


def test_format_1_bundle_serves_without_maps(v1_bundle):
    rt = BundleRuntime(v1_bundle, device="cpu", threads=1)
    assert rt.spatial is None and rt.describe()["spatial"] is None
    (r,) = rt.explain([_image()], spatial=True)
    assert r.spatial is None and r.explanations
    with pytest.raises(SpatialUnavailable, match="has no spatial maps .format 1.*re-export"):
        rt.explain([_image()], heads=True)
    with pytest.raises(SpatialUnavailable):
        serving.Explainer(v1_bundle, spatial=True)
    with pytest.raises(SpatialUnavailable):
        serving.Explainer(v1_bundle).heatmap(_image())


# ---------------------------------------------------------------------- heatmap
def test_overlay_colours_the_right_patches():
    """One positive cell top-left, one negative bottom-right of a 2x2 grid over a 40x20 box that starts
    at x = 10 of a 60x20 grey image: red there, blue there, untouched outside the box and at zero."""
    grey = Image.new("RGB", (60, 20), (128, 128, 128))
    out = np.asarray(overlay(grey, np.array([[1.0, 0.0], [0.0, -0.5]]), (10, 0, 50, 20), alpha=1.0)).astype(int)
    assert out.shape == (20, 60, 3)
    assert (out[:, :10] == 128).all() and (out[:, 50:] == 128).all()  # outside the model's view
    r, g, b = out[5, 15]
    assert r > 150 and b < 60  # +1: full red
    r, g, b = out[15, 45]
    assert b > r and b > 128  # -0.5: half-way to blue
    assert (out[5, 40] == 128).all() and (out[15, 15] == 128).all()  # zero cells leave the image


def test_heatmap_has_the_images_size_and_is_not_constant(bundle):
    ex = serving.Explainer(bundle)
    grey = Image.new("RGB", (90, 50), (128, 128, 128))
    img = ex.heatmap(grey)
    arr = np.asarray(img)
    assert img.size == (90, 50) and img.mode == "RGB"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 2  # patches coloured differently
    # torchvision: short side 50 -> 32, long side int(32 * 90 / 50) = 57, crop left round(12.5) = 12 of 57
    box = ex.runtime.preprocessor.view_box(90, 50)
    assert box == pytest.approx((12 * 90 / 57, 0.0, 44 * 90 / 57, 50.0))
    assert (arr[:, :18] == 128).all() and (arr[:, 70:] == 128).all()
    fashion = fashion_images(1)[0][0]
    (res,) = ex.explain([fashion], top_k=5)
    other = res.spatial.classes[2].label
    a, b = np.asarray(ex.heatmap(fashion, result=res)), np.asarray(ex.heatmap(fashion, label=other, layer=1))
    assert a.shape == b.shape == (28, 28, 3) and not np.array_equal(a, b)
    with pytest.raises(serving.explainer.LabelError, match="no spatial map"):
        ex.heatmap(fashion, label="not a label")
    with pytest.raises(serving.explainer.LabelError, match="layer 9 is out of range"):
        ex.heatmap(fashion, layer=9)


# ---------------------------------------------------------------------- cltvit-explain
def test_cli_explain(bundle, tmp_path, capsys):
    src = tmp_path / "in.png"
    _image(70, 45).save(src)
    png = tmp_path / "out.png"
    assert explain_main([str(src), "--bundle", str(bundle), "--heatmap", str(png), "--heads", "--json", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    result = ImageResult.model_validate_json(out)
    assert np.asarray(result.spatial.classes[0].heads).shape == (4, 4, 16)
    assert f"wrote {png} (70x45" in err
    heat = Image.open(png)
    assert heat.size == (70, 45) and heat.format == "PNG"
    page = tmp_path / "report.html"
    assert explain_main([str(src), "--bundle", str(bundle), "--html", str(page), "--threads", "1"]) == 0
    assert f"wrote {page}" in capsys.readouterr().err
    import re

    data = json.loads(re.search(r"window\.CLTVIT_REPORT = (\{.*?\});</script>", page.read_text(), re.S).group(1))
    report_map = data["result"]["spatial"]["classes"][0]
    assert report_map["label"] == result.predicted and np.asarray(report_map["heads"]).shape == (4, 4, 16)  # for the viewer
    assert explain_main([str(src), "--bundle", str(bundle), "--top-k", "3"]) == 0
    text = capsys.readouterr().out
    assert f"predicted: {result.predicted}" in text and "where in the image: 4x4 patches" in text
    assert len([line for line in text.splitlines() if line.startswith("    ") or line.startswith("   -")]) >= 4


def test_cli_explain_errors_name_the_argument(bundle, v1_bundle, tmp_path, capsys):
    src = tmp_path / "in.png"
    _image().save(src)
    cases = [
        ([str(src), "--bundle", str(tmp_path)], "argument --bundle"),
        ([str(tmp_path / "missing.png"), "--bundle", str(bundle)], "argument IMAGE"),
        ([str(src), "--bundle", str(bundle), "--top-k", "0"], "argument --top-k"),
        ([str(src), "--bundle", str(bundle), "--labels", "a", "a"], "argument --labels"),
        ([str(src), "--bundle", str(bundle), "--heatmap-label", "bag"], "needs --heatmap"),
        ([str(src), "--bundle", str(bundle), "--heatmap", str(tmp_path / "h.png"), "--heatmap-label", "zebra"],
         "argument --heatmap-label"),
        ([str(src), "--bundle", str(bundle), "--heatmap", str(tmp_path / "h.png"), "--heatmap-layer", "7"],
         "argument --heatmap-layer"),
        ([str(src), "--bundle", str(bundle), "--heatmap", str(tmp_path / "no" / "dir" / "h.png")], "argument --heatmap"),
        ([str(src), "--bundle", str(bundle), "--html", str(tmp_path / "no" / "dir" / "r.html")], "argument --html"),
        ([str(src), "--bundle", str(v1_bundle), "--heads"], "argument --heads: bundle"),
    ]
    for argv, words in cases:
        assert explain_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cltvit-explain: error: ") and words in err, (argv, err)


# ---------------------------------------------------------------------- batch jobs
def test_score_and_stream_with_spatial(bundle, v1_bundle, tmp_path, capsys):
    root = tmp_path / "imgs"
    good, broken = make_image_folder(root, n=12)
    out = tmp_path / "r.jsonl"
    assert score_main([str(root), "--bundle", str(bundle), "--out", str(out), "--spatial", "--quiet", "--threads", "1"]) == 0
    records = {r["path"]: r for r in read_jsonl(out)}
    ex = serving.Explainer(bundle, threads=1)
    for rel in good[:4]:
        rec = records[rel]
        (res,) = ex.explain([root / rel])
        want = res.spatial.classes[0]
        assert rec["spatial"]["label"] == rec["label"] == want.label and rec["spatial"]["grid"] == [4, 4]
        np.testing.assert_allclose(rec["spatial"]["total"], want.total, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rec["spatial"]["layers"], want.layers, rtol=1e-5, atol=1e-7)
    assert all("spatial" not in records[b] for b in broken)
    # a resume must use the same setting
    assert score_main([str(root), "--bundle", str(bundle), "--out", str(out), "--quiet"]) == 2
    assert "spatial=True" in capsys.readouterr().err
    assert score_main([str(root), "--bundle", str(v1_bundle), "--out", str(tmp_path / "v1.jsonl"), "--spatial"]) == 2
    assert "argument --spatial: bundle" in capsys.readouterr().err
    pq = tmp_path / "r.parquet"
    pytest.importorskip("pyarrow")
    from serving.jobs.score import read_parquet

    assert score_main([str(root), "--bundle", str(bundle), "--out", str(pq), "--spatial", "--quiet", "--threads", "1"]) == 0
    rows = {r["path"]: r for r in read_parquet(pq)}
    np.testing.assert_allclose(rows[good[0]]["spatial"]["total"], records[good[0]]["spatial"]["total"])
    cmd = [sys.executable, "-c", "import sys; from serving.jobs.cli import stream_main; sys.exit(stream_main())",
           "--bundle", str(bundle), "--spatial", "--threads", "1"]
    stream = subprocess.run(cmd, input="".join(f"{root / rel}\n" for rel in good[:3]), capture_output=True, text=True, timeout=120)
    assert stream.returncode == 0, stream.stderr
    lines = [json.loads(line) for line in stream.stdout.splitlines()]
    assert [r["spatial"]["total"] for r in lines] == [records[rel]["spatial"]["total"] for rel in good[:3]]


# ---------------------------------------------------------------------- response size
def test_response_size_is_bounded_for_vit_b16():
    """The largest spatial part of an /explain response for a ViT-B/16 bundle (S = 5 classes, L = 12, 12 heads,
    14x14 grid), with random float32 values of mixed magnitude and 1000 labels: below 200 kB, below 600 kB with
    per-head maps; the dicts validate as the response model."""
    rng = np.random.default_rng(0)
    S, L, H, N, C = 5, 12, 12, 197, 1000

    def noise(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 0, shape)).astype(np.float32)

    logits = noise(1, C)
    raw = RawOutputs(logits=logits, embedding=noise(1, 512), contributions=noise(1, 2 * L + 3, C),
                     top_feature_layer=np.zeros((1, 16), np.int64), top_feature_index=np.zeros((1, 16), np.int64),
                     top_feature_activation=noise(1, 16), top_feature_contribution=noise(1, 16),
                     spatial_class=np.argsort(-logits, axis=1)[:, :S], spatial_contributions=noise(1, S, L, N),
                     spatial_bias=noise(1, S, L, 2), spatial_head_contributions=noise(1, L, H, N))
    names = [f"label {i}" for i in range(C)]
    (small,) = spatial_maps(raw, names, (14, 14), k=C)
    (big,) = spatial_maps(raw, names, (14, 14), k=C, heads=True)
    small_m, big_m = SpatialExplanation.model_validate(small), SpatialExplanation.model_validate(big)
    assert len(small_m.classes) == S and np.asarray(big_m.classes[0].heads).shape == (L, H, 196)
    small_n, big_n = len(small_m.model_dump_json()), len(big_m.model_dump_json())
    # the HTTP form: float32 arrays, each value its shortest round-trip decimal (up to 9 digits)
    (small_a,) = spatial_maps(raw, names, (14, 14), k=C, arrays=True)
    (big_a,) = spatial_maps(raw, names, (14, 14), k=C, heads=True, arrays=True)
    small_h, big_h = (len(orjson.dumps(m, option=orjson.OPT_SERIALIZE_NUMPY)) for m in (small_a, big_a))
    print(f"ViT-B/16 spatial JSON: {small_n} bytes, with per-head maps {big_n} bytes (Python API's model); "
          f"{small_h} / {big_h} bytes as /explain writes it")
    assert small_n < 200_000 and big_n < 600_000 and small_h < 200_000 and big_h < 600_000


# ---------------------------------------------------------------------- a finer grid: ViT-B-16 (14x14)
@pytest.mark.slow
@pytest.mark.timeout(1200)  # exports a ViT-B-16 bundle (image and text graphs): minutes on a loaded machine
def test_vit_b16_bundle_end_to_end(tmp_path_factory):
    """A real ViT-B-16-architecture bundle (random weights, small random CLT): 14x14 maps per layer, complete
    against the terms, per-head maps, the heatmap at the image's size, and the /explain JSON size."""
    from export.writer import export_bundle
    from training.data import FASHION_MNIST_CLASSES
    from training.model.backbone import load_backbone
    from training.testing import random_clt

    backbone = load_backbone("ViT-B-16", None, device="cpu", seed=0)
    clt = random_clt(backbone.n_layers, backbone.d_model, n_features=256, k=8, seed=3)
    root = export_bundle(backbone, clt, "cls", FASHION_MNIST_CLASSES, ["a photo of a {}."],
                         tmp_path_factory.mktemp("vitb16") / "bundle")
    ex = serving.Explainer(root, threads=1)
    assert ex.runtime.spatial.grid == (14, 14) and ex.runtime.spatial.heads == 12
    photo = _image(320, 240, seed=4)
    (res,) = ex.explain([photo], heads=True)
    assert len(res.spatial.classes) == 5 and np.asarray(res.spatial.classes[0].layers).shape == (12, 196)
    assert np.asarray(res.spatial.classes[0].heads).shape == (12, 12, 196)
    assert_maps_complete(res, ex.term_names, rel=1e-4)
    heat = ex.heatmap(photo, result=res)
    assert heat.size == (320, 240) and len(np.unique(np.asarray(heat).reshape(-1, 3), axis=0)) > 100
    from serving.schemas import ExplainResponse

    body = ExplainResponse(predicted=res.predicted, top=res.top, term_names=ex.term_names, explanations=res.explanations,
                           top_features=res.top_features, completeness_residual=res.completeness_residual,
                           term_shares=res.term_shares, spatial=res.spatial)
    with_heads = len(body.model_dump_json())
    (plain,) = ex.explain([photo])
    without_heads = len(body.model_copy(update={"spatial": plain.spatial}).model_dump_json())
    # the bodies as the service writes them (serving.engine.response_body, maps as float32 arrays)
    rt = ex.runtime
    raw = rt.run(rt.normalize(rt.resize_crop(photo)[None]))
    http_without, http_with = (
        len(response_body("explain", image_result(raw, 0, rt.label_names, rt.term_names, k=5, detail=True, include_embedding=False),
                          rt.term_names, rt.spatial_maps(raw, rt.label_names, 5, heads=h, arrays=True)[0])) for h in (False, True))
    print(f"ViT-B/16 /explain JSON: {http_without} bytes, {http_with} with per-head maps "
          f"(Python API's model: {without_heads}, {with_heads})")
    assert without_heads < 250_000 and with_heads < 700_000 and http_without < 250_000 and http_with < 700_000
