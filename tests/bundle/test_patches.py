"""bundle/patches.py (patch deletion and the total-effect map's rows and scores) checked by hand on small
constructed cases, and the manifest's `patches` block (the stated fill; bundles without it)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bundle import BundleError, read_manifest
from bundle.manifest import PREPROCESS_MEAN_FILL
from bundle.patches import fill_patches, patch_pixel_masks, total_effect_masks, total_effect_rows, total_effect_scores


def test_patch_masks_are_row_major_blocks():
    m = patch_pixel_masks((2, 3), (4, 9))  # 2 x 3 patches of 2 x 3 pixels
    assert m.shape == (6, 4, 9) and (m.sum(0) == 1).all()
    assert m[0, :2, :3].all() and m[1, :2, 3:6].all() and m[3, 2:, :3].all() and m[5, 2:, 6:].all()
    with pytest.raises(ValueError, match="does not tile"):
        patch_pixel_masks((3, 3), (4, 9))


def test_fill_patches_replaces_exactly_the_deleted_patches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    deleted = np.array([[True, False, False, True], [False, False, False, False]])  # a 2 x 2 grid of 2 x 2 patches
    fill = (0.5, -1.0, 2.0)
    out = fill_patches(x, deleted, fill, (2, 2))
    want = x.copy()
    for c, v in enumerate(fill):
        want[0, c, :2, :2] = v  # patch 0: top-left
        want[0, c, 2:, 2:] = v  # patch 3: bottom-right
    assert out.dtype == np.float32 and np.array_equal(out, want)
    assert np.array_equal(x, fill_patches(x, np.zeros((2, 4), bool), fill, (2, 2)))  # nothing deleted: the input, bit for bit
    with pytest.raises(ValueError, match="deleted must be"):
        fill_patches(x, deleted[:, :3], fill, (2, 2))
    with pytest.raises(ValueError, match="finite"):
        fill_patches(x, deleted, (0.0, float("nan"), 0.0), (2, 2))


def test_keep_one_rows_and_scores_by_hand():
    x = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    fill = (-1.0, -2.0, -3.0)
    rows = total_effect_rows(x, fill, (2, 2))  # 4 patches: 5 rows
    assert rows.shape == (5, 3, 4, 4)
    assert np.array_equal(rows[0], np.broadcast_to(np.array(fill, np.float32)[:, None, None], (3, 4, 4)))  # all fill
    assert np.array_equal(rows[2][:, :2, 2:], x[:, :2, 2:])  # row 1 + p keeps patch p = 1 (top-right) only
    assert (rows[2][:, 2:, :] == np.array(fill, np.float32)[:, None, None]).all()
    assert np.array_equal(total_effect_masks(4)[1:], np.eye(4, dtype=bool)) and not total_effect_masks(4)[0].any()
    # logits of the 5 copies for 2 classes: the all-fill row, then each patch alone
    logits = np.array([[1.0, 5.0], [3.0, 5.0], [0.5, 6.0], [1.0, 2.0], [4.0, 5.5]])
    np.testing.assert_array_equal(total_effect_scores(logits), [[2.0, -0.5, 0.0, 3.0], [0.0, 1.0, -3.0, 0.5]])


def test_delete_one_rows_and_scores_by_hand():
    x = np.ones((3, 2, 2), np.float32)
    rows = total_effect_rows(x, (0.0, 0.0, 0.0), (2, 2), "delete_one")
    assert np.array_equal(rows[0], x) and rows[3].sum() == 3 * 3 and rows[3][:, 1, 0].sum() == 0  # row 3 lacks patch 2
    logits = np.array([[4.0], [1.0], [4.5], [3.0], [4.0]])  # the image, then without each patch
    np.testing.assert_array_equal(total_effect_scores(logits, "delete_one"), [[3.0, -0.5, 1.0, 0.0]])
    with pytest.raises(ValueError, match="method"):
        total_effect_masks(4, "shapley")


def test_the_manifest_states_the_fill_and_old_bundles_still_load(bundle, tmp_path):
    m = read_manifest(bundle)
    assert m.patches is not None and m.patches.grid == (4, 4) and m.effective_patches() == m.patches
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    raw = json.loads((old / "bundle.json").read_text())
    del raw["patches"]  # as written before the block existed
    (old / "bundle.json").write_text(json.dumps(raw))
    eff = read_manifest(old).effective_patches()
    assert eff.grid == (4, 4) and eff.fill == (0.0, 0.0, 0.0) and eff.fill_source.startswith(PREPROCESS_MEAN_FILL)
    for bad, words in (({"grid": [3, 3]}, "tokens"), ({"fill": [0, "x", 0]}, "fill"), ({"fill": [0.0, float("inf"), 0.0]}, "finite")):
        raw2 = {**raw, "patches": {**json.loads((bundle / "bundle.json").read_text())["patches"], **bad}}
        (old / "bundle.json").write_text(json.dumps(raw2))
        with pytest.raises(BundleError, match=words):
            read_manifest(old)
