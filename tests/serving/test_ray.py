"""`cltvit-score --engine ray` on a local Ray instance started here: the same records as the local
engine for the same real Fashion-MNIST folder (with unreadable files), as JSONL and as Parquet."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cltvit[ray]')")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

from _scoring import assert_same_records, make_image_folder, read_jsonl  # noqa: E402

from serving.jobs.cli import score_main as main  # noqa: E402
from serving.jobs.ray_engine import read_ray_output, score_with_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 1024 * 1024)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good, bad = make_image_folder(root, n=120)
    local = tmp_path_factory.mktemp("local") / "results.jsonl"
    assert main([str(root), "--bundle", str(bundle), "--out", str(local), "--batch-size", "16", "--quiet"]) == 0
    return bundle, root, good, bad, read_jsonl(local)


def test_ray_jsonl_equals_local_engine(local_ray, setup, tmp_path):
    bundle, root, good, bad, local = setup
    out = tmp_path / "ray-out"
    assert main([str(root), "--bundle", str(bundle), "--out", str(out), "--engine", "ray", "--workers", "1",
                 "--batch-size", "16", "--quiet"]) == 0
    assert list(out.glob("*.json*")), "Ray wrote no JSON shards"
    records = read_ray_output(out, "jsonl")
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == len(good) + len(bad)
    assert {r["path"] for r in records if r["error"]} == set(bad)
    assert_same_records(records, local)


def test_ray_parquet_equals_local_engine(local_ray, setup, tmp_path):
    bundle, root, good, bad, local = setup
    out = tmp_path / "ray-parquet"
    summary = score_with_ray(root, out, bundle=bundle, fmt="parquet", batch_size=32, concurrency=1)
    assert summary.total == len(good) + len(bad) and summary.errors == len(bad)
    assert list(out.glob("*.parquet"))
    assert_same_records(read_ray_output(out, "parquet"), local)


def test_ray_refuses_non_empty_output_and_drift_reference(local_ray, setup, tmp_path, capsys):
    bundle, root, *_ = setup
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x.json").write_text("{}\n")
    assert main([str(root), "--bundle", str(bundle), "--out", str(out), "--engine", "ray", "--quiet"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main([str(root), "--bundle", str(bundle), "--out", str(tmp_path / "o"), "--engine", "ray",
                 "--reference", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert "argument --reference" in capsys.readouterr().err
    # 2 actors on a 2-CPU Ray would leave no CPU for the read/write tasks: refused, not a hang
    assert main([str(root), "--bundle", str(bundle), "--out", str(tmp_path / "o2"), "--engine", "ray",
                 "--workers", "2", "--quiet"]) == 2
    assert "argument --workers" in capsys.readouterr().err
