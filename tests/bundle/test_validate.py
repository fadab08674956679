"""The bundle contract's validating loader (bundle.load_bundle): every problem of a damaged bundle is
reported, one line each, before any ONNX Runtime session is made."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pydantic
import pytest

from bundle import BundleError, Manifest, file_sha256, load_bundle
from bundle import atlas as atlas_models
from bundle import manifest as manifest_models
from bundle.strict import Strict


@pytest.fixture()
def copy(variant_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(variant_bundle, dst)
    return dst


def _edit_manifest(root, fn):
    p = root / "bundle.json"
    raw = json.loads(p.read_text())
    fn(raw)
    p.write_text(json.dumps(raw))


def test_missing_manifest(tmp_path):
    with pytest.raises(BundleError, match="bundle.json missing"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "nope")


def test_corrupt_and_missing_files_each_reported(copy):
    (copy / "text.onnx").unlink()
    with open(copy / "model.int8.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError) as exc:
        load_bundle(copy)
    probs = exc.value.problems
    assert any(p.startswith("text.onnx: listed in bundle.json but missing") for p in probs), probs
    assert any(p.startswith("model.int8.onnx: sha256 does not match") for p in probs), probs
    assert len(probs) == 2, probs
    assert "2 problem(s)" in str(exc.value)


def test_unsupported_format_version(copy):
    _edit_manifest(copy, lambda r: r.update(format_version=3))
    with pytest.raises(BundleError, match="format_version 3 is not supported by this installation .supports 1, 2.*upgrade"):
        load_bundle(copy)


def test_format_1_bundle_still_loads(v1_bundle):
    """A version-1 bundle (no spatial outputs, no `spatial` key) loads as it is."""
    m, _ = load_bundle(v1_bundle)
    assert m.format_version == 1 and m.spatial is None
    assert "spatial" not in json.loads((v1_bundle / "bundle.json").read_text())


def test_spatial_declaration_must_match_the_graph(copy, v1_bundle, tmp_path):
    """bundle.json declaring spatial maps the graph lacks (or the reverse) is one clear problem per graph."""
    _edit_manifest(copy, lambda r: r.update(spatial=None))
    with pytest.raises(BundleError) as exc:
        load_bundle(copy)
    assert len(exc.value.problems) == 5  # fp32, int8, int8-clt, int8-dec, fp16
    assert "outputs are" in exc.value.problems[0] and "declares a graph without spatial maps" in exc.value.problems[0]
    old = tmp_path / "v1"
    shutil.copytree(v1_bundle, old)
    _edit_manifest(old, lambda r: r.update(format_version=2, spatial={"top_k": 5, "grid": [4, 4], "heads": 4}))
    with pytest.raises(BundleError, match="declares a graph with spatial maps"):
        load_bundle(old)
    _edit_manifest(old, lambda r: r.update(format_version=1))
    with pytest.raises(BundleError, match="'spatial' needs format_version 2"):
        load_bundle(old)


def test_spatial_grid_and_shapes_checked(copy):
    _edit_manifest(copy, lambda r: r.update(spatial={"top_k": 5, "grid": [3, 4], "heads": 4}))
    with pytest.raises(BundleError, match="spatial grid \\[3, 4\\] gives 13 tokens, the backbone has 17"):
        load_bundle(copy)
    _edit_manifest(copy, lambda r: r.update(spatial={"top_k": 3, "grid": [4, 4], "heads": 2}))
    with pytest.raises(BundleError) as exc:
        load_bundle(copy)
    text = "\n".join(exc.value.problems)
    assert "spatial_class axis 1 is 5, expected 3" in text and "spatial_head_contributions axis 2 is 4, expected 2" in text


def test_term_names_must_fit_the_model(copy):
    _edit_manifest(copy, lambda r: r["term_names"].pop())
    with pytest.raises(BundleError, match="term_names"):
        load_bundle(copy)


def test_labels_shape_checked(copy):
    np.save(copy / "labels.npy", np.eye(3, 32, dtype=np.float32))

    def fix(raw):
        raw["files"]["labels.npy"] = file_sha256(copy / "labels.npy")

    _edit_manifest(copy, fix)
    with pytest.raises(BundleError, match=r"labels.npy: shape \[3, 32\], expected \[10, 32\]"):
        load_bundle(copy)


def test_graph_signature_checked(copy):
    """A graph whose text input has the wrong embedding width is caught before any session is made."""
    _edit_manifest(copy, lambda r: r["backbone"].update(embed_dim=48))
    with pytest.raises(BundleError) as exc:
        load_bundle(copy)
    text = "\n".join(exc.value.problems)
    assert "text_embeddings axis 1 is 32, expected 48" in text and "labels.npy: shape" in text


def test_opset_must_match_the_graph(copy):
    _edit_manifest(copy, lambda r: r.update(opset=18))
    with pytest.raises(BundleError, match="graph opset 17 differs from bundle.json opset 18"):
        load_bundle(copy)


def test_manifest_model_rejects_unknown_keys(variant_bundle):
    raw = json.loads((variant_bundle / "bundle.json").read_text())
    Manifest.model_validate(raw)
    with pytest.raises(ValueError, match="extra"):
        Manifest.model_validate({**raw, "surprise": 1})


def test_every_bundle_file_model_is_strict_and_frozen(variant_bundle):
    """bundle.json's and atlas.json's models share one strict base (bundle/strict.py): a misspelt key is
    refused by name at any depth, in either file's models, and a parsed model cannot be changed."""
    raw = json.loads((variant_bundle / "bundle.json").read_text())
    with pytest.raises(pydantic.ValidationError, match="preprocess.resise"):
        Manifest.model_validate({**raw, "preprocess": {**raw["preprocess"], "resise": "shortest"}})
    with pytest.raises(pydantic.ValidationError, match="min_margn"):
        atlas_models.Thresholds.model_validate({"weak_effect": 0.05, "min_margin": 0.01, "min_class_fraction": 0.5, "min_margn": 1})
    m = Manifest.model_validate(raw)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        m.mode = "all"
    for module in (atlas_models, manifest_models):
        models = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, pydantic.BaseModel)
                  and v.__module__ == module.__name__]
        assert models and all(issubclass(v, Strict) or v.model_config.get("extra") == "allow" for v in models), module
