"""The atlas part of the bundle contract (bundle/atlas.py): tied to the bundle's CLT, every file checksummed,
every array present with its shape; a damaged atlas is reported by load_bundle like any other problem."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bundle import BundleError, file_sha256, load_bundle
from bundle.atlas import ATLAS_FEATURES, ATLAS_INDEX, npz_headers


@pytest.fixture()
def copy(atlas_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(atlas_bundle, dst)
    return dst


def _rehash(root, name):
    raw = json.loads((root / "bundle.json").read_text())
    raw["files"][name] = file_sha256(root / name)
    (root / "bundle.json").write_text(json.dumps(raw))


def test_a_valid_atlas_loads(atlas_bundle):
    m, paths = load_bundle(atlas_bundle)
    assert m.atlas is not None and set(paths.atlas) == {"index", "features", "images"}
    heads = npz_headers(paths.atlas["features"])
    assert heads["direction"][1] == (4, 128, 32) and heads["top_image"][1][:2] == (4, 128)


def test_the_atlas_is_tied_to_the_clt(copy):
    raw = json.loads((copy / "bundle.json").read_text())
    raw["atlas"]["clt_sha256"] = "0" * 64
    (copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="describes another CLT"):
        load_bundle(copy)


def test_an_atlas_of_another_clt_is_refused(copy):
    p = copy / ATLAS_INDEX
    idx = json.loads(p.read_text())
    idx["clt_sha256"] = "f" * 64
    p.write_text(json.dumps(idx))
    _rehash(copy, ATLAS_INDEX)
    with pytest.raises(BundleError, match="atlas/atlas.json: clt_sha256 .* another CLT"):
        load_bundle(copy)


def test_atlas_files_are_checksummed(copy):
    with open(copy / ATLAS_FEATURES, "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError) as exc:
        load_bundle(copy)
    assert exc.value.problems == ["atlas/features.npz: sha256 does not match bundle.json (file corrupt or replaced)"]


def test_missing_or_misshapen_arrays_are_each_reported(copy):
    p = copy / ATLAS_FEATURES
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    del arrays["margin"]
    arrays["top_act"] = arrays["top_act"][..., :2]
    np.savez_compressed(p, **arrays)
    _rehash(copy, ATLAS_FEATURES)
    with pytest.raises(BundleError) as exc:
        load_bundle(copy)
    probs = exc.value.problems
    assert any("array 'margin' missing" in s for s in probs), probs
    assert any(s.startswith("atlas/features.npz: top_act is float32 [4, 128, 2]") for s in probs), probs
    assert len(probs) == 2, probs


def test_an_atlas_file_the_manifest_does_not_list_is_an_error(copy):
    raw = json.loads((copy / "bundle.json").read_text())
    del raw["files"][ATLAS_INDEX]
    (copy / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="atlas file atlas/atlas.json is referenced but has no sha256"):
        load_bundle(copy)
