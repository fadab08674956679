#!/usr/bin/env python
"""Benchmark: explain with spatial maps against explain without, same machine, same run.

For each model, two bundles that differ only in the spatial maps (`spatial_top_k` 5 vs 0):
  - the reference model (exported from the shipped weights, pipeline/reference_weights/)
  - the ViT-B-32 architecture (random weights, random CLT with F = 6144, k = 32 as scripts/bench_export.py)
and for batch sizes 1 and 16, what explaining costs with / without the maps:

User-visible calls (the target, <= 1.15 at batch 1 and 16 on both models):
  - Python API: `BundleRuntime.explain(images, spatial=True)` on the spatial bundle against
    `explain(images)` on the other, the public call from PIL images (Fashion-MNIST test images
    resized to the model's input) to validated `ImageResult`s; CPU time of the calling thread.
  - HTTP (`--http`, reference model; `make bench` runs it): two `cltvit-serve` processes, one per
    bundle, loaded by `wrk` with the same multipart PNG upload on POST /explain (maps on by default)
    at 1 client (batch 1) and 16 clients (the batcher forms batches of ~16); the server process
    tree's CPU per request, phases alternating between the two servers.

The core of explain alone (context: the part the maps add to, without image decoding, preprocessing or
HTTP), alternating calls on the same pixels: the graph (`BundleRuntime.run`); `run` +
`BundleRuntime.results` (validated results, `spatial=True` on the spatial bundle); and `run` + the
/explain response bodies as the service builds them (per-image result dicts + the batch's spatial map
arrays + `orjson`, as `serving.engine.ServingEngine.run_batch` does). On the tiny reference model
(d = 64, 17 tokens) these core ratios are the strictest view: the maps are 840 numbers per image
against a few hundred in the rest of the answer.

In-process times are the CPU time of the calling thread (ONNX Runtime runs its single intra-op
thread on the caller, so this is the work done, less exposed to other processes on a shared
machine). Each round times both bundles back to back (alternating which goes first); each ratio is
the median over rounds of with / without.

Also checks that ONNX Runtime's graph optimisations do not change the spatial outputs (level ALL, as
served, against no optimisation) on one batch of each spatial bundle.

Bundles are kept in --work (exported when missing or not matching; the ViT-B-32 ones take minutes
and ~2 GB each).

  python scripts/bench_spatial.py [--work artifacts/bench] [--models reference,ViT-B-32] [--batches 1,16] [--http]
  python scripts/bench_spatial.py --models build:artifacts/reference7     # a 7x7 reference build (docs/spatial.md)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle import BundleError, load_bundle  # noqa: E402
from bundle.provenance import machine_info  # noqa: E402

from serving.engine import response_body  # noqa: E402
from serving.results import check_top_k, image_result  # noqa: E402
from serving.runtime import BundleRuntime  # noqa: E402


FMNIST = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")) / "t10k-images-idx3-ubyte.gz"


def log(msg: str) -> None:
    print(msg, flush=True)


def graph_code_mtime() -> float:
    """Newest modification time of the code a fused graph is traced from (training/model/, export/)."""
    return max(f.stat().st_mtime for d in ("training/model", "export") for f in (ROOT / d).rglob("*.py"))


def matching(bundle: Path, fingerprint: str, spatial: bool, clt: dict | None = None) -> bool:
    """A valid `cls`-mode bundle of these backbone weights, with or without spatial maps (and this CLT
    shape), exported after the graph code last changed (an older graph would time old code)."""
    try:
        m, _ = load_bundle(bundle, verify_checksums=False)
    except BundleError:
        return False
    if (bundle / "model.onnx").stat().st_mtime < graph_code_mtime():
        return False
    same_clt = clt is None or all(m.clt.config.get(k) == v for k, v in clt.items())
    return m.backbone.weights_sha256_16 == fingerprint and (m.spatial is not None) == spatial and m.mode == "cls" and same_clt


def make_bundles(work: Path, weights: Path, model: str) -> dict[str, Path]:
    """{"with": ..., "without": ...} bundles of `model` ("reference" or an open_clip architecture)."""
    import torch

    from export.writer import export_bundle
    from pipeline.shipped import load_shipped
    from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES
    from training.model.backbone import load_backbone
    from training.testing import random_clt

    torch.set_num_threads(1)
    name = "reference" if model == "reference" else model.lower().replace("-", "")
    out = {k: work / f"spatial-{name}-{k}" for k in ("with", "without")}
    shape = None
    if model == "reference":
        backbone, clt, _ = load_shipped(weights)
        labels, templates = FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES
    elif model.startswith("build:"):  # a `cltvit-reference build` directory (e.g. --model cltvit-ref7's)
        from training.model.checkpoint import load_checkpoint

        build_dir = Path(model[len("build:"):])
        arch = json.loads((build_dir / "clip" / "clip.json").read_text())["model"]
        backbone = load_backbone(arch, str(build_dir / "clip" / "model.pt"), device="cpu")
        clt, _ = load_checkpoint(build_dir / "clt", backbone, device="cpu")
        labels, templates = FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES
        name = arch.replace("-", "")
        out = {k: work / f"spatial-{name}-{k}" for k in ("with", "without")}
    else:
        backbone, clt = load_backbone(model, None, device="cpu", seed=0), None
        labels, templates = FASHION_MNIST_CLASSES, ["a photo of a {}."]
        shape = {"n_features": 6144, "k": 32}
        shared = work / f"{name}-bundle"  # scripts/bench_export.py's bundle (spatial maps by default): reuse it
        if matching(shared, backbone.fingerprint, True, shape):
            out["with"] = shared
    for key, path in out.items():
        spatial = key == "with"
        if matching(path, backbone.fingerprint, spatial, shape):
            log(f"reusing {path}")
            continue
        if clt is None:
            clt = random_clt(backbone.n_layers, backbone.d_model, n_features=6144, k=32, seed=0)
        t0 = time.perf_counter()
        export_bundle(backbone, clt, "cls", labels, templates, path, spatial_top_k=5 if spatial else 0, overwrite=True)
        log(f"exported {path} in {time.perf_counter() - t0:.0f} s")
    return out


def check_optimisations(bundle: Path, pixels: np.ndarray, text: np.ndarray) -> float:
    """max |output(ORT_ENABLE_ALL) - output(ORT_DISABLE_ALL)| over the float outputs, relative to each
    output's largest magnitude; the int64 outputs must be equal."""
    import onnxruntime as ort

    _, paths = load_bundle(bundle, verify_checksums=False)
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level, so.intra_op_num_threads, so.log_severity_level = level, 1, 3
        sess = ort.InferenceSession(str(paths.model), so, providers=["CPUExecutionProvider"])
        outs.append(dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixels": pixels, "text_embeddings": text}))))
    worst = 0.0
    for name, a in outs[0].items():
        b = outs[1][name]
        if a.dtype == np.int64:
            if not np.array_equal(a, b):
                raise AssertionError(f"{bundle.name}: {name} differs between optimisation levels")
        else:
            worst = max(worst, float(np.abs(a - b).max() / max(1e-12, float(np.abs(b).max()))))
    return worst


def explain_bodies(rt: BundleRuntime, raw, names: list[str], spatial: bool) -> list[bytes]:
    """The /explain response bodies of a batch, built as `serving.engine.ServingEngine` builds them."""
    k = check_top_k(None, len(names))
    maps = rt.spatial_maps(raw, names, k, arrays=True) if spatial else [None] * len(raw)
    return [response_body("explain", image_result(raw, b, names, rt.term_names, k=k, detail=True, include_embedding=False),
                          rt.term_names, maps[b]) for b in range(len(raw))]


def test_images(n: int, size: tuple[int, int]) -> list:
    """The first `n` Fashion-MNIST test images as RGB PIL images of `size` (H, W), bicubic-resized."""
    import gzip

    from PIL import Image

    with gzip.open(FMNIST, "rb") as f:
        arr = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 28 * 28].reshape(n, 28, 28)
    return [Image.fromarray(a, mode="L").resize((size[1], size[0]), Image.BICUBIC).convert("RGB") for a in arr]


def bench(bundles: dict[str, Path], batch: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per variant ("with", "without"), per round: CPU seconds of the Python API's `explain` on PIL
    images, of the graph, of graph + `results`, of graph + the /explain bodies (HTTP), and the wall
    seconds of building the bodies."""
    rts = {k: BundleRuntime(p, device="cpu", threads=1, spinning=False, verify_checksums=False) for k, p in bundles.items()}
    H, W = rts["with"].image_size
    images = test_images(batch, (H, W))
    pixels = np.stack([rts["with"].preprocess(im) for im in images])
    names = rts["with"].label_names
    times: dict[str, dict[str, list[float]]] = {k: {"api_cpu": [], "graph_cpu": [], "explain_cpu": [], "json_cpu": [],
                                                     "json_wall": []} for k in rts}
    for key, rt in rts.items():  # warm-up
        rt.explain(images, spatial=key == "with")
        rt.results(rt.run(pixels), names, spatial=key == "with")
        explain_bodies(rt, rt.run(pixels), names, key == "with")
    order = list(rts)
    for rnd in range(repeats):
        for key in order[rnd % 2 :] + order[: rnd % 2]:
            rt = rts[key]
            a0 = time.thread_time()
            rt.explain(images, spatial=key == "with")
            c0 = time.thread_time()
            times[key]["api_cpu"].append(c0 - a0)
            raw = rt.run(pixels)
            c1 = time.thread_time()
            rt.results(raw, names, spatial=key == "with")
            c2, w2 = time.thread_time(), time.perf_counter()
            explain_bodies(rt, raw, names, key == "with")
            c3, w3 = time.thread_time(), time.perf_counter()
            t = times[key]
            t["graph_cpu"].append(c1 - c0)
            t["explain_cpu"].append(c2 - c0)
            t["json_cpu"].append((c1 - c0) + (c3 - c2))  # the same graph call + the HTTP bodies
            t["json_wall"].append(w3 - w2)
    return times


def http_bench(bundles: dict[str, Path], work: Path, seconds: float, rounds: int) -> list[dict]:
    """POST /explain at 1 and 16 clients against one `cltvit-serve` per bundle (see the module
    docstring): per client count, the median over `rounds` of the per-round ratio of server CPU per
    request, with / without, and the phases' figures."""
    from scripts.bench_serve import Server, make_upload, phase, warm
    from serving.cli import free_port

    work.mkdir(parents=True, exist_ok=True)
    upload = work / "upload.png"
    H, _ = BundleRuntime(bundles["with"], device="cpu", threads=1, verify_checksums=False).image_size
    make_upload(upload, H)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    servers: dict[str, Server] = {}
    cells = []
    try:
        for key, path in bundles.items():
            port = free_port()
            cmd = [sys.executable, "-m", "serving.cli", "--bundle", str(path), "--host", "127.0.0.1", "--port", str(port),
                   "--threads", "1"]
            servers[key] = Server("cltvit", cmd, env, f"http://127.0.0.1:{port}", work / f"spatial-{key}.log")
        for srv in servers.values():
            warm(srv, "/explain", upload)
            srv.settle()
        order = list(servers)
        for clients in (1, 16):
            rows: dict[str, list[dict]] = {k: [] for k in servers}
            for rnd in range(rounds):
                for key in order[rnd % 2 :] + order[: rnd % 2]:
                    rows[key].append(phase(servers[key], "/explain", upload, clients, seconds, f"round {rnd}"))
            w, wo = rows["with"], rows["without"]
            cell = {
                "clients": clients,
                "cpu_ms_per_req": {k: statistics.median(r["server_cpu_ms_per_req"] for r in v) for k, v in rows.items()},
                "mean_batch": {k: statistics.median(r.get("mean_batch", float("nan")) for r in v) for k, v in rows.items()},
                "p50_ms": {k: statistics.median(r["p50_ms"] for r in v) for k, v in rows.items()},
                "failures": sum(r["failures"] for v in rows.values() for r in v),
                "ratio": statistics.median(a["server_cpu_ms_per_req"] / b["server_cpu_ms_per_req"] for a, b in zip(w, wo)),
            }
            cells.append(cell)
            log(f"HTTP /explain, {clients} client(s): server CPU per request x{cell['ratio']:.3f} "
                f"({cell['cpu_ms_per_req']['with']:.2f} / {cell['cpu_ms_per_req']['without']:.2f} ms), mean batch "
                f"{cell['mean_batch']['with']:.1f} / {cell['mean_batch']['without']:.1f}, {cell['failures']} failures")
    finally:
        for srv in servers.values():
            srv.stop()
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts/bench")
    ap.add_argument("--weights", type=Path, default=ROOT / "pipeline/reference_weights")
    ap.add_argument("--models", default="reference,ViT-B-32",
                    help="comma-separated: reference (the shipped weights), an open_clip architecture (random weights), "
                         "or build:DIR (a `cltvit-reference build` directory, e.g. the 7x7 one of --model cltvit-ref7)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--seconds", type=float, default=20.0, help="about this long per (model, batch) cell")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--http", action="store_true", help="also measure POST /explain over HTTP on the reference model (needs wrk)")
    ap.add_argument("--http-seconds", type=float, default=5.0, help="length of each HTTP load phase (default 5)")
    ap.add_argument("--http-rounds", type=int, default=3, help="HTTP phases per server and client count (default 3)")
    args = ap.parse_args()
    if args.http and shutil.which("wrk") is None:
        ap.error("--http needs wrk (Debian: apt-get install wrk; make bench installs it)")
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine_info(threads=1)
    log(f"# bench_spatial: {info['cpu']} ({', '.join(info['isa'])}), 1 ORT thread; load avg "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    record: dict = {"machine": info, "cells": []}
    for model in args.models.split(","):
        bundles = make_bundles(args.work, args.weights, model)
        rt = BundleRuntime(bundles["with"], device="cpu", threads=1, verify_checksums=False)
        H, W = rt.image_size
        px = np.random.default_rng(0).standard_normal((4, 3, H, W), dtype=np.float32)
        drift = check_optimisations(bundles["with"], px, rt.default_text)
        log(f"{model}: ORT optimisations ALL vs none: max relative output difference {drift:.2e}")
        record.setdefault("optimisation_check", {})[model] = drift
        for batch in (int(b) for b in args.batches.split(",")):
            t0 = time.perf_counter()
            rt.run(np.zeros((batch, 3, H, W), np.float32))
            per_call = time.perf_counter() - t0
            repeats = int(min(1000, max(5, args.seconds / (2 * max(per_call, 1e-4)))))
            t = bench(bundles, batch, repeats)
            w, wo = t["with"], t["without"]

            def ratio(key: str) -> float:  # median over rounds of the per-round ratio
                return statistics.median(a / b for a, b in zip(w[key], wo[key]))

            def ms(key: str) -> dict[str, float]:
                return {"with": statistics.median(w[key]) * 1e3, "without": statistics.median(wo[key]) * 1e3}

            cell = {
                "model": model, "batch": batch, "calls": repeats, "api_ms": ms("api_cpu"), "api_ratio": ratio("api_cpu"),
                "graph_ms": ms("graph_cpu"), "explain_ms": ms("explain_cpu"), "json_ms": ms("json_cpu"),
                "graph_ratio": ratio("graph_cpu"), "explain_ratio": ratio("explain_cpu"), "json_ratio": ratio("json_cpu"),
                "bodies_wall_ratio": ratio("json_wall"),
            }
            record["cells"].append(cell)
            log(f"{model} batch {batch}: Python API explain x{cell['api_ratio']:.3f}; core: graph x{cell['graph_ratio']:.3f}, "
                f"run + results x{cell['explain_ratio']:.3f}, run + /explain bodies x{cell['json_ratio']:.3f}; {repeats} rounds")
        if args.http and model == "reference":
            record["http"] = http_bench(bundles, args.work / "spatial-http", args.http_seconds, args.http_rounds)
    log("")
    log("| model | batch | Python API explain with / without (ms CPU) | ratio | core: graph | run + results | "
        "run + /explain bodies |")
    log("|---|---|---|---|---|---|---|")
    for c in record["cells"]:
        log(f"| {c['model']} | {c['batch']} | {c['api_ms']['with']:.2f} / {c['api_ms']['without']:.2f} | **{c['api_ratio']:.3f}** | "
            f"{c['graph_ratio']:.3f} ({c['graph_ms']['with']:.2f} / {c['graph_ms']['without']:.2f}) | "
            f"{c['explain_ratio']:.3f} ({c['explain_ms']['with']:.2f} / {c['explain_ms']['without']:.2f}) | "
            f"{c['json_ratio']:.3f} ({c['json_ms']['with']:.2f} / {c['json_ms']['without']:.2f}) |")
    visible = [c["api_ratio"] for c in record["cells"]]
    if record.get("http"):
        log("")
        log("| POST /explain (reference) | server CPU per request with / without (ms) | ratio | mean batch with / without | "
            "p50 with / without (ms) | failures |")
        log("|---|---|---|---|---|---|")
        for h in record["http"]:
            log(f"| {h['clients']} client(s) | {h['cpu_ms_per_req']['with']:.2f} / {h['cpu_ms_per_req']['without']:.2f} | "
                f"**{h['ratio']:.3f}** | {h['mean_batch']['with']:.1f} / {h['mean_batch']['without']:.1f} | "
                f"{h['p50_ms']['with']:.2f} / {h['p50_ms']['without']:.2f} | {h['failures']} |")
            visible.append(h["ratio"])
    core = max(max(c["explain_ratio"], c["json_ratio"]) for c in record["cells"])
    worst = max(visible)
    record["worst_user_visible_ratio"], record["worst_core_ratio"] = worst, core
    log(f"worst user-visible explain ratio {worst:.3f}: target <= 1.15 {'met' if worst <= 1.15 else 'MISSED'}; "
        f"worst core ratio (run + results / bodies, context) {core:.3f}; load avg at the end "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
