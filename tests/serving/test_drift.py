"""Drift monitoring: share computation, profile I/O, mean-shift scores, metrics, CLI; and on a real
bundle with real Fashion-MNIST images, near-zero drift on like data and high drift on shifted data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving.jobs.cli import drift_main as main
from serving.jobs.drift import DriftError, DriftMonitor, DriftProfile, mean_shift
from serving.shares import term_shares

TERMS = ["embed", "attn.0", "clt.0", "bias", "error"]


def test_term_shares_sum_to_one_and_pick_the_explained_class():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(4, 5, 3))
    s = term_shares(c, np.array([0, 1, 2, 0]))
    np.testing.assert_allclose(s.sum(axis=1), 1.0)
    np.testing.assert_allclose(s[1], np.abs(c[1, :, 1]) / np.abs(c[1, :, 1]).sum())
    default = term_shares(c)  # argmax of summed logits
    np.testing.assert_allclose(default, term_shares(c, c.sum(axis=1).argmax(axis=1)))
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        term_shares(np.zeros((4, 5)))


def test_profile_round_trip_and_validation(tmp_path: Path):
    rng = np.random.default_rng(1)
    shares = rng.dirichlet(np.ones(5), size=300)
    prof = DriftProfile.from_shares(shares, TERMS, meta={"note": "x"})
    path = prof.save(tmp_path / "ref.json")
    back = DriftProfile.load(path)
    assert back.term_names == tuple(TERMS) and back.count == 300
    np.testing.assert_allclose(back.mean, shares.mean(axis=0))
    np.testing.assert_allclose(back.std, shares.std(axis=0, ddof=1))
    with pytest.raises(DriftError, match="do not match"):
        back.check_terms(TERMS[:-1])
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(DriftError, match="not a drift profile"):
        DriftProfile.load(tmp_path / "bad.json")
    with pytest.raises(DriftError, match="does not exist"):
        DriftProfile.load(tmp_path / "missing.json")
    with pytest.raises(DriftError, match="at least 2"):
        DriftProfile.from_shares(shares[:1], TERMS)
    with pytest.raises(DriftError, match=r"\[N, 5\]"):
        DriftProfile.from_shares(shares[:, :4], TERMS)


def test_mean_shift_small_on_same_distribution_large_on_shift():
    rng = np.random.default_rng(2)
    alpha = np.array([5.0, 2.0, 2.0, 1.0, 1.0])
    ref = DriftProfile.from_shares(rng.dirichlet(alpha, size=2000), TERMS)
    same = mean_shift(rng.dirichlet(alpha, size=400), ref)
    shifted = mean_shift(rng.dirichlet(alpha[::-1], size=400), ref)
    assert same.max() < 0.2, same
    assert shifted.max() > 1.0, shifted


def test_monitor_window_matches_direct_computation_and_exports_metrics(tmp_path: Path):
    rng = np.random.default_rng(3)
    ref = DriftProfile.from_shares(rng.dirichlet(np.ones(5), size=500), TERMS)
    mon = DriftMonitor(ref, window=50)
    data = rng.dirichlet(np.arange(1, 6), size=173)
    for chunk in np.array_split(data, 7):
        mon.update(chunk)
    assert len(mon) == 50 and mon.total == 173
    np.testing.assert_allclose(mon.scores(), mean_shift(data[-50:], ref), rtol=1e-9)
    # by hand: |mean over the window - mean of the reference| / std of the reference (ddof 1)
    ref_shares = np.random.default_rng(3).dirichlet(np.ones(5), size=500)
    np.testing.assert_allclose(mon.scores(), np.abs(data[-50:].mean(0) - ref_shares.mean(0)) / ref_shares.std(0, ddof=1),
                               rtol=1e-9)
    summary = mon.summary()
    assert summary["window"] == 50 and summary["worst_term"] == TERMS[int(mon.scores().argmax())]
    assert summary["score"] == pytest.approx(mon.scores().max())
    text = mon.prometheus()
    assert f'cltvit_drift_score{{term="attn.0"}} {mon.scores()[1]:.6g}' in text
    assert "cltvit_drift_images_total 173" in text and "# TYPE cltvit_drift_max_score gauge" in text
    mon.write_metrics(tmp_path / "m.prom")
    assert (tmp_path / "m.prom").read_text() == text
    with pytest.raises(DriftError, match="window"):
        DriftMonitor(ref, window=0)


def test_prometheus_client_collector_matches_the_text():
    from prometheus_client import CollectorRegistry, generate_latest

    rng = np.random.default_rng(5)
    mon = DriftMonitor(DriftProfile.from_shares(rng.dirichlet(np.ones(5), size=100), TERMS), window=20)
    mon.update(rng.dirichlet(np.ones(5), size=30))
    registry = CollectorRegistry()
    registry.register(mon.collector())
    text = generate_latest(registry).decode()
    for term, score in zip(TERMS, mon.scores()):
        line = next(l for l in text.splitlines() if l.startswith(f'cltvit_drift_score{{term="{term}"}}'))
        assert float(line.split()[-1]) == pytest.approx(score)
    assert "cltvit_drift_images_total 30.0" in text and "cltvit_drift_window_images 20.0" in text
    mon.update(rng.dirichlet(np.ones(5), size=5))  # live: the next scrape sees the new window
    assert "cltvit_drift_images_total 35.0" in generate_latest(registry).decode()


def _write_results(path: Path, shares: np.ndarray) -> None:
    with path.open("w") as f:
        f.write(json.dumps({"path": "bad.png", "error": "cannot identify image file"}) + "\n")
        for i, row in enumerate(shares):
            f.write(json.dumps({"path": f"{i}.png", "error": None, "label": "x", "top": [],
                                "shares": dict(zip(TERMS, map(float, row)))}) + "\n")


def test_cli_reference_and_compare(tmp_path: Path, capsys):
    rng = np.random.default_rng(4)
    _write_results(tmp_path / "ref.jsonl", rng.dirichlet(np.ones(5), size=400))
    _write_results(tmp_path / "new.jsonl", rng.dirichlet(np.ones(5) * np.array([1, 1, 1, 1, 6]), size=200))
    assert main(["reference", str(tmp_path / "ref.jsonl"), "--out", str(tmp_path / "ref.json")]) == 0
    assert DriftProfile.load(tmp_path / "ref.json").count == 400
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "new.jsonl"), "--reference", str(tmp_path / "ref.json"),
                 "--metrics-file", str(tmp_path / "m.prom")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["window"] == 200 and report["worst_term"] == "error" and report["score"] > 1.0
    assert "cltvit_drift_max_score" in (tmp_path / "m.prom").read_text()
    assert main(["compare", str(tmp_path / "new.jsonl"), "--reference", str(tmp_path / "nope.json")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "new.jsonl"), "--reference", str(tmp_path / "ref.json"), "--window", "0"])
    assert e.value.code == 2 and "argument --window: must be >= 1, got 0" in capsys.readouterr().err


# -- on a real bundle with real images ------------------------------------------------------------
def _write_pngs(root: Path, images) -> Path:
    for i, im in enumerate(images):
        (root / f"{i % 4}").mkdir(parents=True, exist_ok=True)
        im.save(root / f"{i % 4}" / f"{i:05d}.png")
    return root


def test_drift_near_zero_on_like_data_and_high_on_shifted_data(bundle, tmp_path):
    """Reference: 600 Fashion-MNIST train images, via cltvit-score + cltvit-drift reference. Windows of
    300 held-out test images: as they are, inverted, rotated by 90 degrees, via cltvit-score --reference."""
    from _scoring import fashion_images, read_jsonl
    from PIL import ImageOps

    from serving.jobs.cli import score_main as score
    from training.data import FashionMNIST

    train = FashionMNIST("train", limit=600)
    _write_pngs(tmp_path / "ref", (train[i][0] for i in range(len(train))))
    test_imgs = [im for im, _ in fashion_images(300)]
    _write_pngs(tmp_path / "same", test_imgs)
    _write_pngs(tmp_path / "inverted", (ImageOps.invert(im) for im in test_imgs))
    _write_pngs(tmp_path / "rotated", (im.rotate(90) for im in test_imgs))
    common = ["--bundle", str(bundle), "--batch-size", "64", "--quiet"]
    assert score([str(tmp_path / "ref"), "--out", str(tmp_path / "ref.jsonl"), *common]) == 0
    assert main(["reference", str(tmp_path / "ref.jsonl"), "--out", str(tmp_path / "ref.json")]) == 0
    final = {}
    for name in ("same", "inverted", "rotated"):
        out = tmp_path / f"{name}.jsonl"
        assert score([str(tmp_path / name), "--out", str(out), "--reference", str(tmp_path / "ref.json"),
                      "--window", "300", "--metrics-file", str(tmp_path / f"{name}.prom"), *common]) == 0
        records = read_jsonl(out)
        assert [r["drift"]["window"] for r in records[:3]] == [1, 2, 3] and records[-1]["drift"]["window"] == 300
        final[name] = records[-1]["drift"]
        # the scores by hand from the two JSONL files' own shares: |mean_window - mean_ref| / std_ref
        ref_shares = np.array([list(r["shares"].values()) for r in read_jsonl(tmp_path / "ref.jsonl") if not r.get("error")])
        window = np.array([list(r["shares"].values()) for r in records[-300:]])
        by_hand = np.abs(window.mean(0) - ref_shares.mean(0)) / np.maximum(ref_shares.std(0, ddof=1), 1e-3)
        np.testing.assert_allclose(list(final[name]["scores"].values()), by_hand, rtol=1e-4, atol=2e-6)
        assert final[name]["score"] == pytest.approx(by_hand.max(), rel=1e-4, abs=2e-6)
        prom = (tmp_path / f"{name}.prom").read_text()
        assert f"cltvit_drift_max_score {final[name]['score']:.6g}" in prom
    same, inv, rot = (final[n]["score"] for n in ("same", "inverted", "rotated"))
    print(f"drift scores (max over terms): same {same:.3f}, inverted {inv:.3f}, rotated {rot:.3f}")
    assert same < 0.25, final["same"]
    assert inv > 0.4 and inv > 3 * same, (same, inv)
    assert rot > 2 * same, (same, rot)
