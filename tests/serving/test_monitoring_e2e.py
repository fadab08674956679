"""End to end with a real Prometheus (Debian's) scraping real `cltvit-serve` processes with a drift
reference: the kit's rules and dashboard against live data.

Two servers of the same bundle and reference, one with 1 worker and one with 2, get the same
traffic; a Prometheus started here scrapes both every second with the kit's recording rules and
alert rules (the drift alert's `for:` shortened to 2 s in a copy; threshold and window as in the kit).
Checked: Fashion-MNIST test images as they are leave the drift alert inactive, the same images
inverted make it pending or firing; the drift score and every term's window mean equal the values
recomputed by hand (numpy, from the reference JSON and the shares in the served /explain responses);
the 2-worker score equals the 1-worker score; custom label sets are counted apart; and every PromQL
expression of the Grafana dashboard returns data. And the stream's textfile through node_exporter
(the kit's `cltvit-stream` job) fires the same alert.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import ImageOps

from serving.cli import free_port, server_process

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "monitoring"
_spec = importlib.util.spec_from_file_location("cltvit_monitor", ROOT / "scripts" / "monitor.py")
monitor = importlib.util.module_from_spec(_spec)
sys.modules["cltvit_monitor"] = monitor
_spec.loader.exec_module(monitor)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
JOBS = {"cltvit-1w": 1, "cltvit-2w": 2}
N_SAME, N_INVERTED = 150, 300
DRIFT_FOR = "2s"


def query(prom: str, expr: str) -> list[dict]:
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def by_job(prom: str, expr: str) -> dict[str, float]:
    return {r["metric"]["job"]: float(r["value"][1]) for r in query(prom, expr)}


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def drift_alerts(prom: str) -> dict[str, str]:
    alerts = requests.get(f"{prom}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
    return {a["labels"]["job"]: a["state"] for a in alerts if a["labels"]["alertname"] == "CltvitExplanationDrift"}


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def explain_all(url: str, images: list[bytes]) -> list[dict]:
    """POST every image to /explain, 4 at a time, each on a new connection (so both workers of a
    2-worker server get some); the answers in order."""
    def one(data: bytes) -> dict:
        r = requests.post(f"{url}/explain", files={"image": ("i.png", data, "image/png")}, data={"spatial": "false"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, images))


def hand_scores(ref: dict, answers: list[dict]) -> tuple[dict[str, float], float]:
    """(window mean share per term, overall score) recomputed from the served answers and the
    reference JSON with numpy only: max over terms of |mean - ref mean| / max(ref std, 1e-3) and over
    labels of |fraction - q| / max(sqrt(q (1 - q)), 1e-3)."""
    terms = list(ref["terms"])
    shares = np.array([[a["term_shares"][a["term_names"].index(t)] for t in terms] for a in answers])
    mean = shares.mean(axis=0)
    ref_mean = np.array([ref["terms"][t]["mean"] for t in terms])
    ref_std = np.maximum([ref["terms"][t]["std"] for t in terms], 1e-3)
    term_score = np.abs(mean - ref_mean) / ref_std
    labels = list(ref["classes"])
    q = np.array([ref["classes"][c] for c in labels])
    frac = np.array([sum(a["predicted"] == c for a in answers) for c in labels]) / len(answers)
    class_score = np.abs(frac - q) / np.maximum(np.sqrt(q * (1 - q)), 1e-3)
    return dict(zip(terms, mean)), float(max(term_score.max(), class_score.max()))


@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("drift") / "ref.json"
    monitor.make_reference(bundle, path, images=600)
    return path


def test_drift_alert_scores_and_dashboard_against_a_real_prometheus(bundle, reference, tmp_path):
    ref = json.loads(reference.read_text())
    # the kit's alert rules with the drift alert's `for:` shortened (threshold, window, min images kept)
    alerts = yaml.safe_load((KIT / "rules" / "cltvit.alerts.yml").read_text())
    for rule in alerts["groups"][0]["rules"]:
        if rule["alert"] == "CltvitExplanationDrift":
            assert rule["for"] == "15m"
            rule["for"] = DRIFT_FOR
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    rules = [KIT / "rules" / "cltvit.rules.yml", tmp_path / "alerts.yml"]
    common = ["--reference", str(reference), "--threads", "1"]
    test_images = [im.convert("RGB") for im in monitor.fashion_mnist("t10k", N_SAME)]
    same = [png(im) for im in test_images]
    inverted = [png(ImageOps.invert(im)) for im in test_images] * (N_INVERTED // N_SAME)

    with server_process(bundle, extra_args=[*common, "--workers", "1"], log_path=tmp_path / "1w.log") as (url1, _), \
            server_process(bundle, extra_args=[*common, "--workers", "2"], log_path=tmp_path / "2w.log") as (url2, _):
        urls = {"cltvit-1w": url1, "cltvit-2w": url2}
        config = monitor.prometheus_config({job: [urllib.parse.urlparse(u).netloc] for job, u in urls.items()},
                                           interval="1s", rule_files=rules)
        with monitor.running_prometheus(config, tmp_path / "prometheus") as prom:
            # the zero counters scraped before any traffic, so the window starts from them
            wait_for(lambda: len(by_job(prom, 'count_over_time(cltvit_drift_images_total{label_set="default"}[1m]) >= 2')) == 2,
                     what="two scrapes of each server")

            # ---- phase 1: the test images as they are
            answers = {job: explain_all(u, same) for job, u in urls.items()}
            np.testing.assert_allclose([a["term_shares"] for a in answers["cltvit-1w"]],
                                       [a["term_shares"] for a in answers["cltvit-2w"]], atol=1e-6)
            for u in urls.values():  # counted apart: a custom label set, and one refused request
                r = requests.post(f"{u}/explain", files={"image": ("i.png", same[0], "image/png")},
                                  data={"labels": json.dumps(["a shoe", "a shirt"])}, timeout=60)
                assert r.status_code == 200, r.text
                assert requests.post(f"{u}/explain", files={"image": ("i.png", b"not an image", "image/png")}, timeout=60).status_code == 400
            # the scrape after all of it: the custom label set counted apart from the bundle's
            wait_for(lambda: by_job(prom, 'cltvit_drift_images_total{label_set="custom"}') == {j: 1 for j in JOBS},
                     what="the phase-1 scrape")
            assert by_job(prom, 'cltvit_drift_images_total{label_set="default"}') == {j: N_SAME for j in JOBS}
            # both workers of the 2-worker server answered some of it
            workers = query(prom, 'sum by (worker) (cltvit_batch_size_count{job="cltvit-2w"}) > 0')
            assert len(workers) == 2, workers

            time.sleep(3)  # a few rule evaluations on the complete counts
            means, score = hand_scores(ref, answers["cltvit-1w"])
            got = by_job(prom, 'cltvit:drift_score:15m{label_set="default"}')
            print(f"\ndrift score, test images as they are ({N_SAME}): by hand {score:.6f}, Prometheus {got}")
            for job in JOBS:
                assert got[job] == pytest.approx(score, rel=1e-6)
            assert got["cltvit-2w"] == pytest.approx(got["cltvit-1w"], rel=1e-9)
            for r in query(prom, 'cltvit:drift_share_mean:15m{label_set="default"}'):
                assert float(r["value"][1]) == pytest.approx(means[r["metric"]["term"]], rel=1e-6, abs=1e-12), r
            assert score < 0.5
            assert drift_alerts(prom) == {}

            # ---- phase 2: the same images inverted
            inv_answers = {job: explain_all(u, inverted) for job, u in urls.items()}
            wait_for(lambda: set(by_job(prom, 'cltvit_drift_images_total{label_set="default"}').values()) == {N_SAME + N_INVERTED},
                     what="the phase-2 scrape")
            time.sleep(3)
            _, score2 = hand_scores(ref, answers["cltvit-1w"] + inv_answers["cltvit-1w"])
            got2 = by_job(prom, 'cltvit:drift_score:15m{label_set="default"}')
            print(f"drift score after {N_INVERTED} inverted images: by hand {score2:.6f}, Prometheus {got2}")
            for job in JOBS:
                assert got2[job] == pytest.approx(score2, rel=1e-6)
            assert score2 > 0.5
            states = wait_for(lambda: (lambda s: s if set(s) == set(JOBS) else None)(drift_alerts(prom)), 30, "the drift alert")
            assert set(states.values()) <= {"pending", "firing"}, states
            wait_for(lambda: set(drift_alerts(prom).values()) == {"firing"}, 30, "the drift alert to fire")

            # ---- every PromQL expression of the dashboard returns data
            dash = json.loads((KIT / "grafana" / "cltvit-dashboard.json").read_text())
            exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
            exprs += [a["expr"] for a in dash["annotations"]["list"]]
            assert len(exprs) >= 20
            empty = [e for e in exprs if not query(prom, e.replace("$job", "cltvit-2w"))]
            assert not empty, empty
            var = dash["templating"]["list"][0]["query"]["query"]
            metric = var[len("label_values("):].split(",")[0]
            jobs = requests.get(f"{prom}/api/v1/label/job/values", params={"match[]": metric}, timeout=30).json()["data"]
            assert set(JOBS) <= set(jobs)


def test_stream_textfile_through_node_exporter_fires_the_drift_alert(bundle, reference, tmp_path):
    """The kit's `cltvit-stream` scrape job: cltvit-stream --metrics-file writes the textfile, Debian's
    node_exporter serves it (textfile collector), Prometheus keeps only cltvit_* series; inverted
    images over a window of 150 make the drift alert's stream branch pending or firing."""
    node_exporter = shutil.which("prometheus-node-exporter")
    if node_exporter is None:
        pytest.fail("prometheus-node-exporter is not installed: `make prometheus` installs it")
    alerts = yaml.safe_load((KIT / "rules" / "cltvit.alerts.yml").read_text())
    for rule in alerts["groups"][0]["rules"]:
        if rule["alert"] == "CltvitExplanationDrift":
            rule["for"] = DRIFT_FOR
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for i, im in enumerate(monitor.fashion_mnist("t10k", N_SAME)):
        ImageOps.invert(im).save(images / f"{i}.png")
        paths.append(str(images / f"{i}.png"))
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    out = subprocess.run([sys.executable, "-c", "from serving.jobs.cli import stream_main; raise SystemExit(stream_main())",
                          "--bundle", str(bundle), "--reference", str(reference), "--window", str(N_SAME),
                          "--metrics-file", str(textfiles / "cltvit.prom")],
                         input="\n".join(paths) + "\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.splitlines()[-1])["drift"]
    assert last["window"] == N_SAME and last["score"] > 0.5, last
    port = free_port()
    with open(tmp_path / "node.log", "wb") as log:
        node = subprocess.Popen([node_exporter, "--collector.disable-defaults", "--collector.textfile",
                                 f"--collector.textfile.directory={textfiles}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            config = monitor.prometheus_config({}, interval="1s", stream_targets=[f"127.0.0.1:{port}"],
                                               rule_files=[KIT / "rules" / "cltvit.rules.yml", tmp_path / "alerts.yml"])
            with monitor.running_prometheus(config, tmp_path / "prometheus") as prom:
                score = wait_for(lambda: by_job(prom, "cltvit_drift_max_score"), what="the textfile's scrape")
                assert score["cltvit-stream"] == pytest.approx(last["score"], rel=1e-5)
                assert by_job(prom, "cltvit_drift_window_images") == {"cltvit-stream": N_SAME}
                # node_exporter's own series are dropped by the kit's metric_relabel_configs (what Prometheus
                # makes itself, recording rules and ALERTS, may carry the job label too: the alert can be
                # pending already)
                assert query(prom, '{job="cltvit-stream", __name__!~"cltvit[_:].*|up|scrape_.*|ALERTS|ALERTS_FOR_STATE"}') == []
                states = wait_for(lambda: drift_alerts(prom) or None, 30, "the drift alert")
                assert set(states) == {"cltvit-stream"} and states["cltvit-stream"] in {"pending", "firing"}
        finally:
            node.terminate()
            node.wait(timeout=20)


def heartbeats(url: str) -> dict[str, float]:
    """{pid: last heartbeat (unix s)} from one /metrics answer; {} when the answering worker does not reply in 3 s."""
    try:
        text = requests.get(f"{url}/metrics", timeout=3).text
    except requests.RequestException:
        return {}
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^cltvit_worker_heartbeat_timestamp_seconds\{pid="(\d+)"\} (\S+)$', text, re.M)}


def test_a_stopped_worker_stops_beating_while_the_other_answers(bundle, tmp_path):
    """What CltvitWorkerStalled reads: SIGSTOP one of two workers; /metrics (answered by the other) shows
    its heartbeat frozen while the other's moves on; SIGCONT and it beats again."""
    with server_process(bundle, extra_args=["--workers", "2", "--threads", "1"], log_path=tmp_path / "s.log") as (url, _):
        beats = wait_for(lambda: (lambda b: b if len(b) == 2 else None)(heartbeats(url)), what="two workers' heartbeats")
        stopped, running = sorted(beats)
        os.kill(int(stopped), signal.SIGSTOP)
        try:
            time.sleep(12)  # over two heartbeat periods (5 s)
            now = time.time()
            seen = wait_for(lambda: heartbeats(url) or None, 30, "an answer from the running worker")
            assert now - seen[stopped] > 10, seen
            assert now - seen[running] < 7, seen
        finally:
            os.kill(int(stopped), signal.SIGCONT)
        time.sleep(6)
        seen = wait_for(lambda: heartbeats(url) or None, 30, "an answer")
        assert time.time() - seen[stopped] < 7, seen
