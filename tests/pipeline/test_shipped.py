"""The reference weights shipped in pipeline/reference_weights/: intact, loadable, exportable in seconds,
and reproducing the figures their weights.json reports (zero-shot and replacement accuracy on the
10,000 Fashion-MNIST test images, measured again here, not read back)."""
from __future__ import annotations

import json
import shutil

import pytest

from bundle import load_bundle
from pipeline.cli import main
from pipeline.reference import BuildError
from pipeline.shipped import ATLAS_FILES, CLIP_FILE, FILES, MANIFEST, WEIGHTS_DIR, load_shipped, measure, read_manifest

# A few of the 10,000 test predictions may flip between CPUs (AVX2 vs AVX-512 summation order);
# 0.05 points = 5 images.
ACCURACY_TOLERANCE = 0.0005


def test_every_shipped_file_is_listed_and_intact():
    manifest = read_manifest()
    assert set(FILES) <= set(manifest["files"])
    assert manifest["dtype"] == "float16"
    total = sum((WEIGHTS_DIR / f).stat().st_size for f in manifest["files"])
    assert total < 16 * 2**20, f"shipped weights are {total / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.mark.slow  # measures the 10,000 test images twice over (~2.5 CPU-minutes)
def test_shipped_weights_reproduce_their_report(shipped):
    backbone, clt, manifest = shipped
    got = measure(backbone, clt)
    want = manifest["measured"]["float16"]
    assert got["images"] == want["images"] == 10_000
    for key in ("zero_shot_top1", "accuracy_cls", "accuracy_all"):
        assert abs(got[key] - want[key]) <= ACCURACY_TOLERANCE, (key, got[key], want[key])
    for key in ("r2", "r2_cls", "cosine"):
        assert abs(got[key] - want[key]) <= 1e-3, (key, got[key], want[key])
    # float16 storage costs (almost) nothing against the float32 build it was rounded from
    build = manifest["measured"]["float32_build"]
    for key in ("zero_shot_top1", "accuracy_cls", "accuracy_all"):
        assert abs(want[key] - build[key]) <= 0.002, (key, want[key], build[key])


def test_reference_bundle_exports_and_validates(reference_bundle, shipped):
    m, paths = load_bundle(reference_bundle)
    backbone, _, _ = shipped
    assert m.backbone.model == "cltvit-ref" and m.backbone.pretrained == CLIP_FILE
    assert m.backbone.weights_sha256_16 == backbone.fingerprint
    assert set(paths.models) == {"fp32", "int8", "int8-clt", "fp16"}


def test_reference_bundle_fill_is_the_test_set_mean_for_both_patch_deletions(reference_bundle):
    """The reference bundle's one patch spec (`patches`) holds the Fashion-MNIST test images' mean per channel
    (the deletion test's fill), and both users of it read it: the total-effect map and the intervention graph
    (whose manifest block names only its file). Reference: the raw uint8 test images averaged by hand (28x28
    grey images at a 28x28 input: resizing is the identity, and normalising is affine, so it commutes with the mean)."""
    import numpy as np

    from serving.runtime import BundleRuntime
    from training.data import FashionMNIST

    m, _ = load_bundle(reference_bundle, verify_checksums=False)
    assert m.patches is not None and m.patches.fill_source.startswith("dataset mean: the 10000 Fashion-MNIST test images")
    x = FashionMNIST("test").images.astype(np.float64).mean() / 255.0
    want = [(x - mu) / sd for mu, sd in zip(m.preprocess.mean, m.preprocess.std)]
    assert list(m.patches.fill) == pytest.approx(want, abs=1e-5)
    assert m.intervene is not None and m.intervene.model_dump() == {"file": "intervene.onnx"}
    rt = BundleRuntime(reference_bundle, device="cpu", threads=1, verify_checksums=False)
    assert rt.patches == m.patches and rt.intervene_session is not None
    assert rt.describe()["patches"]["fill"] == list(m.patches.fill)


def test_the_shipped_atlas_describes_the_shipped_clt(reference_bundle):
    """The atlas ships as statistics + training-set indices, tied to the shipped CLT; the exported bundle carries it
    with its thumbnails rebuilt."""
    manifest = read_manifest()
    assert set(ATLAS_FILES) <= set(manifest["files"])
    index = json.loads((WEIGHTS_DIR / "atlas" / "atlas.json").read_text())
    assert index["clt_sha256"] == manifest["files"]["clt/clt.safetensors"] and index["images"] == 60_000
    m, paths = load_bundle(reference_bundle)
    assert m.atlas is not None and m.atlas.clt_sha256 == m.clt.sha256
    assert json.loads(paths.atlas["index"].read_text())["clt_sha256"] == index["clt_sha256"]


def test_a_corrupt_shipped_file_is_named(tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, root)
    with open(root / CLIP_FILE, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BuildError, match=rf"{CLIP_FILE}: sha256 does not match {MANIFEST}"):
        read_manifest(root)
    (root / MANIFEST).unlink()
    with pytest.raises(BuildError, match="no shipped reference weights"):
        read_manifest(root)


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", "--out", str(out), "--gate-images", "50"]) == 0
    m, _ = load_bundle(out)
    assert m.variants == {"fp32": "model.onnx", "int8": "model.int8.onnx", "int8-dec": "model.int8-dec.onnx"}
    assert set(m.gate.variants) == set(m.variants) and m.gate.variants["int8"].images == 50  # the accuracy gate, measured
    assert "; gate: int8 top-1 agreement" in capsys.readouterr().out
    assert main(["export", "--out", str(out), "--gate-images", "50"]) == 2
    assert f"argument --out: {out} exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "b2"), "--weights", str(tmp_path / "none")]) == 2
    assert "no shipped reference weights" in capsys.readouterr().err


def test_weights_json_is_self_describing():
    manifest = json.loads((WEIGHTS_DIR / MANIFEST).read_text())
    assert manifest["machine"]["cpu"] and manifest["machine"]["isa"] is not None
    assert manifest["build"]["command"].startswith("cltvit-reference build")
    assert (WEIGHTS_DIR / "report.md").read_text().startswith("# Shipped reference weights")
