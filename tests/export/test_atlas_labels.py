"""The atlas's label rules (export/atlas.py `finalise`, docs/atlas.md) on constructed features whose right
answer is known by hand, and the quantiles read off its histogram against a hand computation.

The model is a stand-in with identity pieces (ln_post with unit scale, `proj` = I, logit_scale 10), so a
feature's direction is 10 x its (zero-mean) residual write times its mean weight, and every cosine,
effect and margin below is worked out on paper:

    vocabulary / classes:  alpha = A = [1, -1, 0, 0] / sqrt 2,  beta = B = [0, 0, 1, -1] / sqrt 2,
                           gamma = C = [1, 1, -1, -1] / 2
    f0  never fires                      -> source none, low confidence
    f1  write [1, -1, 0, 0]              -> effects (A, B, C) = (14.14, 0, 0): strength 9.43; cosines
                                            (1, 0, 0): text "alpha", margin 1, confident
    f2  write [1, -1, 1, -1]             -> effects (14.14, 14.14, 0): strength 4.71; cosines
                                            (0.707, 0.707, 0): text, margin 0 < 0.01, low confidence
    f3  write 1e-4 x [1, -1, 0, 0]       -> strength 9.4e-4 < 0.05 (weak); top images of classes
                                            (2, 2, 2, 1): image-classes, class 2, fraction 0.75, confident
    f4  weak, top images (0, 1, 2, none) -> a three-way tie: the smallest class, 0, fraction 1/3 < 0.5: low
    f5  weak, its one top image unlabelled -> no class to name: text label, low confidence (weak effect)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bundle.atlas import LABEL_SOURCES, QUANTILE_LEVELS, hist_edges
from export.atlas import Accumulator, AtlasConfig, AtlasInputs, finalise, quantiles_from_hist

S2 = math.sqrt(2.0)
VOCAB = np.array([[1, -1, 0, 0], [0, 0, 1, -1], [1, 1, -1, -1]], np.float64) / np.array([[S2], [S2], [2.0]])
WRITES = torch.tensor([[0, 0, 0, 0], [1, -1, 0, 0], [1, -1, 1, -1], [1e-4, -1e-4, 0, 0], [1e-4, -1e-4, 0, 0],
                       [1e-4, -1e-4, 0, 0]], dtype=torch.float64)
IMAGE_CLASS = {0: 2, 1: 2, 2: 2, 3: 1, 4: 0, 5: 1, 6: 2, 7: -1}  # dataset image -> class (-1: unlabelled)
TOP_REF = [[-1, -1, -1, -1], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, -1], [7, -1, -1, -1]]


class Visual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_post = nn.LayerNorm(4)
        self.proj = torch.eye(4)


class Clt:
    def total_write_matrix(self, layer: int) -> torch.Tensor:
        return WRITES.float()


def constructed() -> tuple[dict, dict, dict]:
    acc = Accumulator(n_layers=1, n_features=6, top_n=4, patches=False)
    acc.fire_count[0] = torch.tensor([0, 1, 1, 1, 1, 1])
    acc.act_sum[0], acc.weighted_sum[0] = acc.fire_count[0].double(), acc.fire_count[0].double()  # mean weight 1
    acc.act_max[0] = acc.fire_count[0].float()
    acc.top_ref[0] = torch.tensor(TOP_REF)
    acc.top_act[0] = torch.where(acc.top_ref[0] >= 0, 1.0, 0.0)
    acc.thumbs = {r: np.zeros((2, 2, 3), np.uint8) for r in IMAGE_CLASS}
    acc.classes = dict(IMAGE_CLASS)
    acc.n_done = len(IMAGE_CLASS)
    inp = AtlasInputs(Visual(), Clt(), 10.0, ["A", "B", "C"], VOCAB.astype(np.float32), ["alpha", "beta", "gamma"], "test",
                      ["{}"], VOCAB.astype(np.float32))
    extra = {"clt_sha256": "0" * 64, "backbone_weights_sha256_16": "0" * 16, "mode": "cls", "dataset": {"name": "constructed"},
             "class_names": ["zero", "one", "two"], "patch_grid": None, "image_size": (2, 2), "build": {}}
    return finalise(acc, inp, AtlasConfig(label_matches=3), extra)


def test_label_rules_on_constructed_features():
    index, f, _ = constructed()
    assert index["thresholds"] == {"weak_effect": 0.05, "min_margin": 0.01, "min_class_fraction": 0.5}
    strength = f["strength"][0]
    np.testing.assert_allclose(strength[1:3], [20 * S2 / 3, 10 * S2 / 3], rtol=1e-6)  # 9.43, 4.71
    assert strength[0] == 0 and (strength[3:] < 1e-3).all()
    sources = [LABEL_SOURCES[s] for s in f["label_source"][0]]
    assert sources == ["none", "text", "text", "image-classes", "image-classes", "text"]
    assert f["low_confidence"][0].tolist() == [True, False, True, False, True, True]
    # text matches: best first, with their cosines and the top-1 - top-2 margin
    assert f["text_index"][0, 1].tolist() == [0, 1, 2] or f["text_index"][0, 1].tolist() == [0, 2, 1]
    np.testing.assert_allclose(f["text_score"][0, 1], [1, 0, 0], atol=1e-6)
    assert set(f["text_index"][0, 2, :2].tolist()) == {0, 1} and f["text_index"][0, 2, 2] == 2
    np.testing.assert_allclose(f["text_score"][0, 2], [1 / S2, 1 / S2, 0], atol=1e-6)
    np.testing.assert_allclose(f["margin"][0, 1:3], [1, 0], atol=1e-6)
    assert (f["text_index"][0, 0] == -1).all() and np.isnan(f["text_score"][0, 0]).all()  # dead: no matches
    # majority class of the top images and its share (a tie goes to the smallest class; unlabelled images
    # and empty slots do not count)
    assert f["class_index"][0].tolist() == [-1, 2, 2, 2, 0, -1]
    np.testing.assert_allclose(f["class_fraction"][0], [0, 0.75, 0.75, 0.75, 1 / 3, 0], rtol=1e-6)


@pytest.mark.parametrize("rule, change, feature, source, low", [
    ("weak_effect", {"weak_effect": 5.0}, 2, "image-classes", False),  # 4.71 is now weak: labelled by its images
    ("min_margin", {"min_margin": 1.5}, 1, "text", True),  # margin 1 is now too small
    ("min_class_fraction", {"min_class_fraction": 0.8}, 3, "image-classes", True),  # 0.75 is now too mixed
])
def test_each_threshold_moves_exactly_its_feature(monkeypatch, rule, change, feature, source, low):
    """Each threshold is the one that decides: moving it across a feature's hand-computed value flips that feature."""
    original = AtlasConfig.__init__

    def patched(self, *args, **kwargs):
        original(self, *args, **{**kwargs, **change})

    monkeypatch.setattr(AtlasConfig, "__init__", patched)
    _, f, _ = constructed()
    assert LABEL_SOURCES[f["label_source"][0, feature]] == source and bool(f["low_confidence"][0, feature]) == low


def test_quantiles_from_a_constructed_histogram():
    """Geometric interpolation inside the bin, by hand: 10 activations in one bin [e_b, e_b+1) and 10 in the
    next; the median is the top edge of the first bin, q = 0.25 half-way (geometrically) into it, and
    q = 0.99 is capped at the exact maximum. A quantile read this way lies in the bin of the true one, so
    its relative error is below one bin's ratio (10^(1/16) - 1 = 15.5 %), not half of it (docs/atlas.md
    once said < 7.5 %): a constructed case below reads 11.4 % high."""
    edges = hist_edges()
    b = 64  # the bin [edges[64], edges[65]): 1e0 .. 1.155
    hist = np.zeros(len(edges) - 1, np.int64)
    hist[b] = hist[b + 1] = 10
    act_max = np.float32(edges[b + 1] * 1.01)
    q = dict(zip(QUANTILE_LEVELS, quantiles_from_hist(hist[None], np.array([act_max]), QUANTILE_LEVELS)[0]))
    ratio = edges[b + 1] / edges[b]
    assert q[0.5] == pytest.approx(edges[b + 1], rel=1e-6)
    assert q[0.25] == pytest.approx(edges[b] * math.sqrt(ratio), rel=1e-6)
    assert q[0.01] == pytest.approx(edges[b] * ratio ** 0.02, rel=1e-6)
    assert q[0.99] == pytest.approx(act_max, rel=1e-6)  # the interpolated 1.3 would pass the maximum
    # nine values at a bin's bottom edge and one near its top: numpy's q = 0.75 is the bottom edge, the
    # histogram's reads 0.75 of the bin (geometrically) above it: 11.4 % high, more than 7.5 %, less than a bin
    assert ratio - 1 == pytest.approx(10 ** (1 / 16) - 1)
    values = np.array([edges[b]] * 9 + [edges[b + 1] * 0.999])
    hist[:] = 0
    hist[b] = 10
    read = quantiles_from_hist(hist[None], np.array([np.float32(values.max())]), QUANTILE_LEVELS)[0]
    error = read[QUANTILE_LEVELS.index(0.75)] / np.quantile(values, 0.75) - 1
    assert error == pytest.approx(ratio ** 0.75 - 1, rel=1e-5) and 0.075 < error < ratio - 1
    assert np.isnan(quantiles_from_hist(np.zeros((1, len(edges) - 1), np.int64), np.zeros(1, np.float32), QUANTILE_LEVELS)).all()
