"""The monitoring kit (monitoring/) and drift on the service, the cheap parts: the profile's class mix
and bundle check against hand computations, `cltvit-serve --reference` refusing bad profiles with
one line, promtool's check and unit tests of every rule (each alert: series that fire it and series
that must not), and the dashboard's wiring. The end-to-end run against a real Prometheus is
tests/serving/test_monitoring_e2e.py (slow)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving.cli import main as serve_main
from serving.jobs.cli import drift_main
from serving.jobs.drift import CLASS_PRIOR, DriftError, DriftProfile

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "monitoring"
TERMS = ["embed", "attn.0", "clt.0", "bias", "error"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make prometheus` installs Debian's prometheus and prometheus-alertmanager")
    return path


# ---------------------------------------------------------------------- the profile
def test_class_mix_is_the_smoothed_fraction_and_scores_like_a_share(tmp_path: Path):
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(5), size=40)
    predicted = ["boot"] * 30 + ["bag"] * 10
    prof = DriftProfile.from_shares(shares, TERMS, predicted=predicted, classes=["boot", "bag", "coat"])
    # by hand: (count + 0.5) / (40 + 0.5 * 3)
    np.testing.assert_allclose(prof.class_mean, [30.5 / 41.5, 10.5 / 41.5, 0.5 / 41.5])
    back = DriftProfile.load(prof.save(tmp_path / "ref.json"))
    assert back.classes == ("boot", "bag", "coat")
    np.testing.assert_allclose(back.class_mean, prof.class_mean)
    # a window of 10 images, all "bag": |1 - q| / sqrt(q (1 - q)) for bag, |0 - q| / sqrt(...) for the others
    q = prof.class_mean
    np.testing.assert_allclose(back.class_scores(np.array([0, 10, 0])),
                               np.abs(np.array([0, 1, 0]) - q) / np.sqrt(q * (1 - q)))
    assert CLASS_PRIOR == 0.5
    with pytest.raises(DriftError, match="not in the label set"):
        DriftProfile.from_shares(shares, TERMS, predicted=["shoe"] * 40, classes=["boot"])
    bad = prof.to_dict()
    bad["classes"] = {"boot": 0.9, "bag": 0.3}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DriftError, match="summing to 1"):
        DriftProfile.load(tmp_path / "bad.json")


def test_check_bundle_names_the_mismatch():
    shares = np.random.default_rng(1).dirichlet(np.ones(5), size=10)
    prof = DriftProfile.from_shares(shares, TERMS, meta={"bundle": "a" * 64}, predicted=["x"] * 10, classes=["x", "y"])
    prof.check_bundle(TERMS, ["y", "x"], "a" * 64)  # same model, terms and label set (any order)
    with pytest.raises(DriftError, match=r"ref\.json was made for another bundle: its model is sha256 aaaaaaaaaaaa\.\.\., the served bundle's is bbbbbbbbbbbb"):
        prof.check_bundle(TERMS, ["x", "y"], "b" * 64, source="ref.json")
    with pytest.raises(DriftError, match=r"the bundle's terms \['clt.1'\] are not in it"):
        prof.check_bundle([*TERMS, "clt.1"], ["x", "y"], "a" * 64)
    with pytest.raises(DriftError, match=r"another label set: its classes \['y'\] are not the bundle's labels"):
        prof.check_bundle(TERMS, ["x", "z"], "a" * 64)
    old = DriftProfile.from_shares(shares, TERMS)  # a profile without bundle or class mix: terms only
    old.check_bundle(TERMS, ["anything"], "c" * 64)


def test_cltvit_drift_reference_takes_bundle_and_labels_from_cltvit_scores_meta(tmp_path: Path):
    rng = np.random.default_rng(2)
    with (tmp_path / "r.jsonl").open("w") as f:
        for i, row in enumerate(rng.dirichlet(np.ones(5), size=12)):
            f.write(json.dumps({"path": f"{i}.png", "error": None, "label": "boot" if i % 3 else "bag", "top": [],
                                "shares": dict(zip(TERMS, map(float, row)))}) + "\n")
    (tmp_path / "r.jsonl.meta.json").write_text(json.dumps({"bundle": "f" * 64, "labels": ["boot", "bag", "coat"]}))
    assert drift_main(["reference", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "ref.json")]) == 0
    prof = DriftProfile.load(tmp_path / "ref.json")
    assert prof.meta["bundle"] == "f" * 64 and prof.classes == ("boot", "bag", "coat")
    np.testing.assert_allclose(prof.class_mean, np.array([8.5, 4.5, 0.5]) / 13.5)


# ---------------------------------------------------------------------- cltvit-serve --reference
def _profile_for(bundle: Path, **change) -> dict:
    """A profile of the bundle written by hand from its manifest (no model run)."""
    m = json.loads((bundle / "bundle.json").read_text())
    terms, labels = m["term_names"], m["labels"]["names"]
    data = {"format": "cltvit-drift-profile", "version": 1, "count": 100,
            "terms": {t: {"mean": 1 / len(terms), "std": 0.05} for t in terms},
            "classes": {c: 1 / len(labels) for c in labels},
            "meta": {"bundle": m["files"]["model.onnx"], "labels": labels}}
    for key, value in change.items():
        value(data) if callable(value) else data.__setitem__(key, value)
    return data


@pytest.mark.parametrize("case, message", [
    ("missing", r"reference profile \S*missing\.json does not exist"),
    ("not-json", r"reference profile \S*not-json\.json is not valid JSON"),
    ("directory", r"reference profile \S*directory\.json is not a file"),
    ("binary", r"reference profile \S*binary\.json is unreadable"),
    ("not-a-profile", r"\S*not-a-profile\.json is not a drift profile"),
    ("other-model", r"reference profile \S*other-model\.json was made for another bundle: its model is sha256 000000000000"),
    ("other-terms", r"reference profile \S*other-terms\.json was made for another bundle: 3 terms against the bundle's \d+"),
    ("other-labels", r"reference profile \S*other-labels\.json was made for another label set: its classes \['zebra'\]"),
])
def test_serve_refuses_a_bad_reference_with_one_line(bundle, tmp_path: Path, capsys, case, message):
    path = tmp_path / f"{case}.json"
    if case == "not-json":
        path.write_text("{\"format\": ")
    elif case == "directory":
        path.mkdir()
    elif case == "binary":
        path.write_bytes(bytes(range(128, 256)))
    elif case == "not-a-profile":
        path.write_text(json.dumps({"terms": {}}))
    elif case == "other-model":
        path.write_text(json.dumps(_profile_for(bundle, meta=lambda d: d["meta"].update(bundle="0" * 64))))
    elif case == "other-terms":
        path.write_text(json.dumps(_profile_for(bundle, terms={t: {"mean": 0.3, "std": 0.1} for t in ("embed", "x", "y")})))
    elif case == "other-labels":
        path.write_text(json.dumps(_profile_for(bundle, classes={"zebra": 1.0})))
    with pytest.raises(SystemExit) as exc:
        serve_main(["--bundle", str(bundle), "--reference", str(path), "--no-verify"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("cltvit-serve: error: argument --reference: "), err
    assert re.search(message, err), err


def test_serve_accepts_the_bundles_own_profile(bundle, tmp_path: Path):
    from serving.cli import build_parser, validate_args

    (tmp_path / "ref.json").write_text(json.dumps(_profile_for(bundle)))
    parser = build_parser()
    env = validate_args(parser, parser.parse_args(["--bundle", str(bundle), "--reference", str(tmp_path / "ref.json"), "--no-verify"]))
    assert env["CLTVIT_DRIFT_REFERENCE"] == str((tmp_path / "ref.json").resolve())


def test_label_cache_reports_each_eviction():
    from serving.runtime import LabelCache

    cache = LabelCache(max_bytes=3 * (800 + LabelCache.ENTRY_OVERHEAD))
    evicted: list[int] = []
    cache.on_evict = evicted.append
    for i in range(5):  # room for three 800-byte entries: the 4th and 5th each push one out
        cache.get_or_compute(bytes([i]), lambda: np.zeros(100))
    assert evicted == [1, 1] and len(cache) == 3


# ---------------------------------------------------------------------- the kit's rules
def test_promtool_checks_the_rules_and_the_config():
    promtool = _tool("promtool")
    rules = sorted(str(p) for p in (KIT / "rules").glob("*.yml"))
    out = subprocess.run([promtool, "check", "rules", *rules], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "config", str(KIT / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([_tool("amtool"), "check-config", str(KIT / "alertmanager.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_fire_every_alert_and_spare_the_others():
    out = subprocess.run([_tool("promtool"), "test", "rules", str(KIT / "tests" / "cltvit.test.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_has_series_that_fire_it_and_series_that_must_not():
    """The unit tests' coverage: each alert of the kit is expected to fire in some test, and that test
    feeds series of at least one other job that the (exhaustive) expectation leaves out."""
    alerts = [r["alert"] for g in yaml.safe_load((KIT / "rules" / "cltvit.alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load((KIT / "tests" / "cltvit.test.yml").read_text())["tests"]
    assert len(alerts) == 9
    for alert in alerts:
        fired_jobs, fed_jobs = set(), set()
        for t in tests:
            cases = [c for c in t.get("alert_rule_test", []) if c["alertname"] == alert and c["exp_alerts"]]
            if not cases:
                continue
            fired_jobs |= {a["exp_labels"]["job"] for c in cases for a in c["exp_alerts"]}
            fed_jobs |= set(re.findall(r'job="([^"]+)"', " ".join(s["series"] for s in t["input_series"])))
        assert fired_jobs, f"no test expects {alert} to fire"
        assert fed_jobs - fired_jobs, f"{alert}: no series that must not fire it"


def test_dashboard_reads_the_kits_series():
    dash = json.loads((KIT / "grafana" / "cltvit-dashboard.json").read_text())
    ds = yaml.safe_load((KIT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    titles = " ".join(p["title"].lower() for p in panels)
    for needed in ("throughput", "latency", "batch size", "queue wait", "term shares", "drift per term", "class mix"):
        assert needed in titles, needed
    recorded = {r["record"] for g in yaml.safe_load((KIT / "rules" / "cltvit.rules.yml").read_text())["groups"] for r in g["rules"]}
    for p in panels:
        assert p["datasource"]["uid"] == uid and p["targets"], p["title"]
        for t in p["targets"]:
            assert '$job' in t["expr"], (p["title"], t["expr"])
            for name in re.findall(r"cltvit:[a-z0-9_:]+", t["expr"]):
                assert name in recorded, (p["title"], name)
