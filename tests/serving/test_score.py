"""cltvit-score on a real folder of real Fashion-MNIST PNGs (nested, plus unreadable files):
every image scored exactly once, deterministic, Parquet, resume after a torn write and after a real
SIGKILL of a running process, argument errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _scoring import BROKEN, assert_same_records, make_image_folder, read_jsonl

from bundle.killpoints import kill_at
from serving.jobs.cli import score_main as main
from serving.jobs.score import discover, read_journal, read_parquet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("images")
    good, bad = make_image_folder(root, n=240)
    return root, good, bad


@pytest.fixture(scope="module")
def reference_run(bundle, folder, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ref") / "results.jsonl"
    assert main([str(folder[0]), "--bundle", str(bundle), "--out", str(out), "--batch-size", "16", "--quiet"]) == 0
    return read_jsonl(out)


def test_discovery_is_recursive_sorted_and_by_extension(folder):
    root, good, bad = folder
    found = discover(root)
    assert found == sorted(good + bad)
    assert "README.txt" not in found and any(p.count("/") == 2 for p in found)


def test_every_image_scored_exactly_once(reference_run, folder, bundle):
    root, good, bad = folder
    paths = [r["path"] for r in reference_run]
    assert len(paths) == len(set(paths)) == len(good) + len(bad)
    assert set(paths) == set(good) | set(bad)
    labels = json.loads((bundle / "bundle.json").read_text())["labels"]["names"]
    terms = json.loads((bundle / "bundle.json").read_text())["term_names"]
    for r in reference_run:
        if r["path"] in BROKEN:
            assert r["error"] and set(r) == {"path", "error"}
            continue
        assert r["error"] is None and r["label"] in labels and r["label"] == r["top"][0]["label"]
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
        assert list(r["shares"]) == terms
        assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    errors = {r["path"]: r["error"] for r in reference_run if r["error"]}
    assert "empty" in errors["broken/empty.png"] and "not an image" in errors["broken/not-an-image.jpg"]
    assert "truncated" in errors["coat/truncated.png"]


def test_results_match_the_explainer_on_the_same_images(reference_run, folder, bundle):
    from serving.explainer import Explainer

    root = folder[0]
    sample = [r for r in reference_run if not r["error"]][::37]
    direct = Explainer(bundle).score([root / r["path"] for r in sample], paths=[r["path"] for r in sample])
    assert_same_records(direct, sample)


def test_results_match_the_runtimes_raw_outputs(reference_run, folder, bundle):
    """Independent of the code that builds records: the ONNX graph's own logits and contributions for the
    same files, softmax and shares |contribution| / sum |contributions| at the top label worked out here."""
    from PIL import Image

    from serving.runtime import BundleRuntime

    rt = BundleRuntime(bundle, device="cpu", threads=1)
    sample = [r for r in reference_run if not r["error"]][::29]
    pixels = np.stack([rt.preprocess(Image.open(folder[0] / r["path"]).convert("RGB")) for r in sample])
    raw = rt.run(pixels)
    for r, logits, contrib in zip(sample, raw.logits.astype(np.float64), raw.contributions.astype(np.float64)):
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-logits)[:5]
        assert [t["label"] for t in r["top"]] == [rt.label_names[c] for c in order] and r["label"] == rt.label_names[order[0]]
        np.testing.assert_allclose([t["probability"] for t in r["top"]], probs[order], rtol=1e-6, atol=1e-9)
        picked = np.abs(contrib[:, order[0]])
        assert list(r["shares"]) == rt.term_names
        np.testing.assert_allclose(list(r["shares"].values()), picked / picked.sum(), rtol=1e-6, atol=1e-9)


def test_rerun_is_a_no_op_and_overwrite_is_deterministic(reference_run, folder, bundle, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = [str(folder[0]), "--bundle", str(bundle), "--out", str(out), "--batch-size", "7", "--workers", "3", "--quiet"]
    assert main(args) == 0
    first = out.read_bytes()
    assert main(args) == 0  # nothing left to do: the file is untouched
    assert out.read_bytes() == first
    assert "0 scored now" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert out.read_bytes() == first  # same order, same bytes
    assert_same_records(read_jsonl(out), reference_run)  # batch size 7 vs 16: same results


def test_resume_after_torn_write(reference_run, folder, bundle, tmp_path):
    out = tmp_path / "r.jsonl"
    args = [str(folder[0]), "--bundle", str(bundle), "--out", str(out), "--batch-size", "16", "--quiet"]
    assert main(args) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:100]) + lines[100][: len(lines[100]) // 2])  # died mid-line
    assert len(read_journal(out, repair=False)) == 100
    assert main(args) == 0
    records = read_jsonl(out)
    assert len(records) == len({r["path"] for r in records}) == len(reference_run)
    assert_same_records(records, reference_run)


def test_kill_and_resume_real_process(reference_run, folder, bundle, tmp_path):
    """SIGKILL a real cltvit-score right after its 3rd batch reached the disk, rerun, check the set.

    The process runs armed with a kill point (bundle.killpoints): it reports on a pipe when the batch
    is fsynced and waits to be killed; a process that dies earlier closes the pipe (end of file), so
    the test fails at once with its log instead of polling for a file."""
    out, log = tmp_path / "killed.jsonl", tmp_path / "killed.log"
    cmd = [str(Path(sys.executable).parent / "cltvit-score"), str(folder[0]), "--bundle", str(bundle), "--out", str(out),
           "--batch-size", "4", "--workers", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_at(cmd, "score.batch_written@3", log, env=env, cwd=REPO, wait_s=120)
    partial = read_journal(out, repair=False)
    assert len(partial) == 12  # exactly the three batches of 4 that were on disk
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out)
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == len(reference_run), "gaps or duplicates after resume"
    assert paths[: len(partial)] == [r["path"] for r in partial]
    assert_same_records(records, reference_run)


def test_parquet_output_and_resume(reference_run, folder, bundle, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "r.parquet"
    args = [str(folder[0]), "--bundle", str(bundle), "--out", str(out), "--quiet"]
    journal = out.with_name(out.name + ".partial.jsonl")
    journal.write_text("".join(json.dumps(r) + "\n" for r in reference_run[:50]) + '{"path": "x')
    out.with_name(out.name + ".meta.json").write_text(json.dumps({
        "root": str(folder[0].resolve()), "bundle": json.loads((bundle / "bundle.json").read_text())["files"]["model.onnx"],
        "variant": "fp32", "labels": json.loads((bundle / "bundle.json").read_text())["labels"]["names"], "top_k": 5}))
    assert main(args) == 0
    assert not journal.exists()
    records = read_parquet(out)
    assert [r["path"] for r in records] == sorted(r["path"] for r in reference_run)
    assert_same_records(records, reference_run)


def test_argument_errors(folder, bundle, tmp_path, capsys):
    root = str(folder[0])
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope"), "--bundle", str(bundle), "--out", out])
    assert e.value.code == 2 and "argument DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([root, "--bundle", str(bundle), "--out", out, "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
    assert main([root, "--bundle", str(tmp_path), "--out", out]) == 2
    assert "argument --bundle" in capsys.readouterr().err
    assert main([root, "--bundle", str(bundle), "--out", out, "--labels", "cat", "cat"]) == 2
    assert "argument --labels: duplicate" in capsys.readouterr().err
    Path(out).write_text("someone else's file\n")
    assert main([root, "--bundle", str(bundle), "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert Path(out).read_text() == "someone else's file\n"


def test_resume_refuses_different_labels(folder, bundle, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    sub = tmp_path / "few"
    sub.mkdir()
    for rel in sorted(discover(folder[0]))[:5]:
        (sub / Path(rel).name).write_bytes((folder[0] / rel).read_bytes())
    assert main([str(sub), "--bundle", str(bundle), "--out", str(out), "--quiet"]) == 0
    assert main([str(sub), "--bundle", str(bundle), "--out", str(out), "--labels", "shoe", "shirt", "--quiet"]) == 2
    assert "labels" in capsys.readouterr().err
    assert main([str(sub), "--bundle", str(bundle), "--out", str(out), "--labels", "shoe", "shirt", "--overwrite", "--quiet"]) == 0
    recs = read_jsonl(out)
    assert len(recs) == 5 and {r["label"] for r in recs if not r["error"]} <= {"shoe", "shirt"}
    assert all(len(r["top"]) == 2 for r in recs if not r["error"])
    assert np.all([abs(sum(t["probability"] for t in r["top"]) - 1) < 1e-6 for r in recs if not r["error"]])


def test_resumed_drift_windows_equal_an_uninterrupted_run(reference_run, folder, bundle, tmp_path):
    from serving.jobs.drift import DriftProfile

    names = list(next(r for r in reference_run if not r["error"])["shares"])
    ok = [r for r in reference_run if not r["error"]]
    DriftProfile.from_shares(np.array([[r["shares"][t] for t in names] for r in ok[:120]]), names).save(tmp_path / "ref.json")
    args = [str(folder[0]), "--bundle", str(bundle), "--batch-size", "16", "--quiet",
            "--reference", str(tmp_path / "ref.json"), "--window", "50"]
    assert main(args + ["--out", str(tmp_path / "full.jsonl")]) == 0
    full = read_jsonl(tmp_path / "full.jsonl")
    out = tmp_path / "resumed.jsonl"
    assert main(args + ["--out", str(out)]) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:90]) + lines[90][:20])
    assert main(args + ["--out", str(out)]) == 0
    resumed = read_jsonl(out)
    assert [r["path"] for r in resumed] == [r["path"] for r in full]
    for a, b in zip(full, resumed):
        assert ("drift" in a) == (a["error"] is None)
        if a["error"] is None:
            assert a["drift"]["window"] == b["drift"]["window"] and a["drift"]["worst_term"] == b["drift"]["worst_term"]
            assert a["drift"]["score"] == pytest.approx(b["drift"]["score"], abs=1e-9)
    assert full[-1]["drift"]["window"] == 50
