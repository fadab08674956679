"""The torch-free atlas reader (serving/atlas.py) and the labels of /explain's top features (Python API)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from export.testing import SMALL_VOCAB
from serving import Explainer
from serving.atlas import Atlas, AtlasLookupError
from training.data import FashionMNIST


@pytest.fixture(scope="module")
def explainer(atlas_bundle):
    return Explainer(atlas_bundle, device="cpu", threads=1)


def _png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_top_features_carry_their_atlas_labels(explainer):
    atlas = explainer.runtime.atlas
    images = [FashionMNIST("test", limit=3)[i][0] for i in range(3)]
    seen = 0
    for res in explainer.explain(images):
        for f in res.top_features:
            lab = atlas.label(f.layer, f.index)
            assert (f.label, f.label_source, f.low_confidence) == (lab.label, lab.source, lab.low_confidence)
            seen += f.label is not None
    assert seen > 0


def test_no_atlas_no_labels(bundle):
    res = Explainer(bundle, device="cpu", threads=1).explain([np.full((32, 32, 3), 90, np.uint8)])[0]
    assert all(f.label is None and f.label_source is None for f in res.top_features)


def test_feature_page(explainer):
    rt = explainer.runtime
    atlas: Atlas = rt.atlas
    a = atlas.arrays
    l, f = np.unravel_index(np.argmax(a["fire_count"]), a["fire_count"].shape)
    page = atlas.feature(int(l), int(f), rt.default_text, rt.label_names)
    effect = rt.default_text.astype(np.float64) @ a["direction"][l, f].astype(np.float64)
    assert [c["label"] for c in page["direct_effect"]["classes"]] == [rt.label_names[c] for c in np.argsort(-effect, kind="stable")]
    np.testing.assert_allclose([c["logit"] for c in page["direct_effect"]["classes"]], np.sort(effect)[::-1], rtol=1e-6)
    assert page["direct_effect"]["top"][0] == page["direct_effect"]["classes"][0]
    assert page["direct_effect"]["bottom"][0] == page["direct_effect"]["classes"][-1]
    assert page["firing_rate"] == pytest.approx(a["fire_count"][l, f] / 256)
    assert sum(page["activation"]["histogram"]["counts"]) == page["fire_count"]
    assert len(page["activation"]["histogram"]["edges"]) == len(page["activation"]["histogram"]["counts"]) + 1
    tops = page["top_images"]
    assert len(tops) == min(8, page["fire_count"]) and [t["activation"] for t in tops] == sorted((t["activation"] for t in tops), reverse=True)
    ds = FashionMNIST("train", limit=256)
    for t in tops[:3]:
        thumb = _png(t["thumbnail"])
        assert thumb.shape == (32, 32)  # grayscale data, the tiny model's 32x32 input
        assert t["class"] == ds.class_names[ds.labels[t["image"]]]
    words = atlas.words
    assert [m["word"] for m in page["text"]["matches"]] == [words[i] for i in a["text_index"][l, f]]
    if page["label_source"] == "text":
        assert page["label"] == page["text"]["matches"][0]["word"]
    with pytest.raises(AtlasLookupError, match="layers 0..3"):
        atlas.feature(4, 0, rt.default_text, rt.label_names)
    with pytest.raises(AtlasLookupError, match="features 0..127"):
        atlas.label(0, 128)


def test_feature_list_filters_sorts_and_pages(explainer):
    atlas = explainer.runtime.atlas
    everything = atlas.list_features(live_only=False, sort="index", limit=5000)
    assert everything["total"] == 4 * 128 and [(x["layer"], x["index"]) for x in everything["features"][:2]] == [(0, 0), (0, 1)]
    live = atlas.list_features(limit=5000)
    assert live["total"] == int((atlas.arrays["fire_count"] > 0).sum())
    rates = [x["firing_rate"] for x in live["features"]]
    assert rates == sorted(rates, reverse=True) and min(rates) > 0
    page = atlas.list_features(layer=2, offset=3, limit=4, sort="strength")
    assert len(page["features"]) == 4 and {x["layer"] for x in page["features"]} == {2}
    word = next(x["label"] for x in live["features"] if x["label"])
    found = atlas.list_features(query=word.upper(), limit=5000)["features"]
    assert found and all(word.lower() in x["label"].lower() for x in found)
    with pytest.raises(AtlasLookupError):
        atlas.list_features(layer=9)
    with pytest.raises(ValueError, match="limit"):
        atlas.list_features(limit=0)


def test_examples_are_model_input_images(explainer):
    atlas = explainer.runtime.atlas
    ex = atlas.example_list()
    assert len(ex) == 20 and {e["class"] for e in ex} == set(FashionMNIST.class_names)
    img = Image.open(io.BytesIO(atlas.example_png(0)))
    assert img.size == (32, 32)
    with pytest.raises(AtlasLookupError):
        atlas.example_png(20)
    summary = atlas.summary()
    assert summary["images"] == 256 and len(summary["layers"]) == 4 and summary["vocab"]["size"] == len({w.lower() for w in (*FashionMNIST.class_names, *SMALL_VOCAB)})
