"""The intervention graph in the bundle contract: declared, checksummed and signature-checked by
load_bundle; a bundle without it loads as before."""
from __future__ import annotations

import json
import shutil

import pytest

from bundle import BundleError, file_sha256, load_bundle


@pytest.fixture()
def copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _edit(root, fn):
    p = root / "bundle.json"
    raw = json.loads(p.read_text())
    fn(raw)
    p.write_text(json.dumps(raw))


def test_intervene_block_and_graph_load(bundle):
    """The block names the graph only; its patch grid and fill are the bundle's one `patches` block."""
    m, paths = load_bundle(bundle)
    assert m.intervene is not None and paths.intervene == paths.root / "intervene.onnx"
    assert m.intervene.model_dump() == {"file": "intervene.onnx"}
    assert m.effective_patches() == m.patches and m.patches.grid == (4, 4) and "mid-grey" in m.patches.fill_source


def test_bundle_without_the_graph_still_loads(copy):
    (copy / "intervene.onnx").unlink()

    def drop(raw):
        del raw["intervene"]
        del raw["files"]["intervene.onnx"]

    _edit(copy, drop)
    m, paths = load_bundle(copy)
    assert m.intervene is None and paths.intervene is None


def test_missing_or_wrong_graph_is_reported(copy):
    shutil.copyfile(copy / "model.onnx", copy / "intervene.onnx")  # a graph without the edit inputs
    _edit(copy, lambda r: r["files"].update({"intervene.onnx": file_sha256(copy / "intervene.onnx")}))
    with pytest.raises(BundleError, match=r"intervene.onnx: signature \['pixels', 'text_embeddings'\]"):
        load_bundle(copy)
    (copy / "intervene.onnx").unlink()
    with pytest.raises(BundleError, match="intervene.onnx: listed in bundle.json but missing"):
        load_bundle(copy)


@pytest.mark.parametrize("change,words", [
    (lambda r: r.update(mode="observe"), "needs mode cls or all"),
    (lambda r: r["intervene"].update(grid=[4, 4]), "intervene.grid: Extra inputs are not permitted"),  # one home: `patches`
    (lambda r: r["intervene"].update(fill=[0.0, 0.0, 0.0]), "intervene.fill: Extra inputs are not permitted"),
    (lambda r: r.update(spatial=None, patches=None), "an intervention graph needs a patch grid"),
    (lambda r: r["files"].pop("intervene.onnx"), "has no sha256"),
])
def test_manifest_block_is_validated(copy, change, words):
    _edit(copy, change)
    with pytest.raises(BundleError, match=words):
        load_bundle(copy, verify_checksums=False)
