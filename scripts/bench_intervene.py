#!/usr/bin/env python
"""Benchmark: /intervene with 16 edit sets of one image against a 16-image /explain batch, same run.

Per model (the reference model from the shipped weights; `--models ViT-B-32` adds the architecture with
random weights and a random CLT, F = 6144, k = 32, as scripts/bench_spatial.py), one bundle with the
intervention graph and a copy of it without (`intervene` block and file removed; `model.onnx` is the
same file), and per round, alternating the order:

- intervene: what the server does for one POST /intervene with 16 edit sets (8 single-feature
  ablations of the image's top features, 4 term removals, 2 patch deletions, 2 dropped keys): decode
  nothing, preprocess the image, one call of intervene.onnx on 17 rows (the unedited row + 16),
  result dicts + differences, `orjson` body (`BundleRuntime.intervene_pixels`, as serving/engine.py);
- explain16: what the server does for a batch of 16 /explain requests: preprocess 16 images, one
  model.onnx call on 16 rows, the 16 response bodies with spatial maps (`serving.engine.response_body`);
- explain16 on the bundle without the intervention graph: /explain unchanged (ratio ~ 1).
Also the graph calls alone (intervene.onnx on 17 rows vs model.onnx on 16) and the Python API
(`Explainer.intervene` against `BundleRuntime.explain(16 images)`, validated pydantic results).

Times are the calling thread's CPU time with one ONNX Runtime thread (it runs on the caller), the
ratio of each round's pair, median over rounds. Target: intervene / explain16 <= 1.2.

With `--http`, the same comparison through a real `cltvit-serve`: the server process tree's CPU for one
POST /intervene with the 16 edit sets against 16 concurrent POST /explain of the same PNG (batched by
the server into one batch of 16), alternating, median of the per-round ratio.

  python scripts/bench_intervene.py [--work artifacts/bench] [--models reference[,ViT-B-32]] [--rounds 30] [--http]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle import BundleError, load_bundle  # noqa: E402
from bundle.provenance import machine_info  # noqa: E402
from serving import Explainer  # noqa: E402
from serving.engine import response_body  # noqa: E402
from serving.intervene import parse_edit_sets  # noqa: E402
from serving.results import check_top_k, image_result  # noqa: E402
from serving.runtime import BundleRuntime  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_spatial import graph_code_mtime, test_images  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def make_bundle(work: Path, model: str) -> Path:
    """A cls-mode bundle with intervene.onnx of `model`, exported when missing or older than the graph code."""
    path = work / f"intervene-{model.lower().replace('-', '')}"
    try:
        load_bundle(path, verify_checksums=False)
        if (path / "intervene.onnx").stat().st_mtime >= graph_code_mtime():
            log(f"reusing {path}")
            return path
    except (BundleError, FileNotFoundError):
        pass
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if model == "reference":
        from pipeline.shipped import export_shipped

        export_shipped(path, variants=(), overwrite=True, log=log)
    else:
        from export.writer import export_bundle
        from training.data import FASHION_MNIST_CLASSES
        from training.model.backbone import load_backbone
        from training.testing import random_clt

        backbone = load_backbone(model, None, device="cpu", seed=0)
        clt = random_clt(backbone.n_layers, backbone.d_model, n_features=6144, k=32, seed=0)
        export_bundle(backbone, clt, "cls", FASHION_MNIST_CLASSES, ["a photo of a {}."], path, overwrite=True)
    log(f"exported {path} in {time.perf_counter() - t0:.0f} s")
    return path


def without_intervene(bundle: Path) -> Path:
    """A copy of `bundle` without the intervention graph (the same model.onnx, hard-linked where possible)."""
    out = bundle.parent / (bundle.name + "-without")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out, copy_function=lambda s, d: _link_or_copy(s, d))
    (out / "intervene.onnx").unlink()
    raw = json.loads((out / "bundle.json").read_text())
    raw.pop("intervene")
    raw["files"].pop("intervene.onnx")
    (out / "bundle.json").unlink()  # a hard link to the original: replace, never write through it
    (out / "bundle.json").write_text(json.dumps(raw, indent=2))
    return out


def _link_or_copy(src: str, dst: str) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def edit_sets(rt: BundleRuntime, pixels: np.ndarray) -> list:
    """16 edit sets for the image: its 8 strongest top features ablated one at a time, 4 terms removed,
    2 patches deleted, 2 patches dropped as keys."""
    raw = rt.run(pixels[None])
    L = rt.manifest.backbone.n_layers
    P = rt.patches.n_patches  # the bundle's one patch grid (manifest `patches`)
    sets = [{"features": [{"layer": int(l), "index": int(i)}]} for l, i in zip(raw.top_feature_layer[0][:8], raw.top_feature_index[0][:8])]
    sets += [{"terms": [{"term": t}]} for t in (f"attn.{L - 1}", f"attn.{L // 2}", f"clt.{L - 1}", "embed")]
    sets += [{"delete_patches": [p]} for p in (P // 2, P // 2 + 1)]
    sets += [{"drop_keys": [p]} for p in (0, P - 1)]
    return parse_edit_sets(sets, rt.edit_space())


def bench(bundle: Path, rounds: int) -> dict[str, list[float]]:
    plain = without_intervene(bundle)
    rt = BundleRuntime(bundle, device="cpu", threads=1, spinning=False, verify_checksums=False)
    rt0 = BundleRuntime(plain, device="cpu", threads=1, spinning=False, verify_checksums=False)
    H, W = rt.image_size
    images = test_images(16, (H, W))
    names = rt.label_names
    k = check_top_k(None, len(names))
    one = rt.preprocess(images[0])
    sets = edit_sets(rt, one)
    ex = Explainer(rt)

    def intervene_server() -> None:
        body = rt.intervene_pixels(rt.preprocess(images[0]), rt.default_text, names, sets, k=k)
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    def explain_server(r: BundleRuntime) -> None:
        raw = r.run(np.stack([r.preprocess(im) for im in images]))
        maps = r.spatial_maps(raw, names, k, arrays=True)
        [response_body("explain", image_result(raw, b, names, r.term_names, k=k, detail=True, include_embedding=False),
                       r.term_names, maps[b]) for b in range(len(raw))]

    from serving.intervene import edit_arrays, run_rows

    feeds = edit_arrays([None, *sets], rt.edit_space(), rt.patches.fill)
    pix16 = np.stack([rt.preprocess(im) for im in images])
    calls = {
        "intervene": intervene_server,
        "explain16": lambda: explain_server(rt),
        "explain16_without": lambda: explain_server(rt0),
        "graph_intervene": lambda: run_rows(rt.intervene_session, one, rt.default_text, feeds),
        "graph_explain16": lambda: rt.run(pix16),
        "api_intervene": lambda: ex.intervene(images[0], sets),
        "api_explain16": lambda: rt.explain(images, spatial=True),
    }
    for fn in calls.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for rnd in range(rounds):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            c0 = time.thread_time()
            calls[name]()
            times[name].append(time.thread_time() - c0)
    shutil.rmtree(plain, ignore_errors=True)
    return times


def http_bench(bundle: Path, work: Path, rounds: int) -> dict[str, float]:
    """One `cltvit-serve` (1 ORT thread, batches of up to 16 formed within 50 ms): server process-tree CPU
    of one POST /intervene with the 16 edit sets against 16 concurrent POST /explain of the same PNG
    (the batcher runs them as one batch: the mean batch size is reported), alternating, per round."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from bench_serve import Server, tree_cpu_seconds
    from serving.cli import free_port

    rt = BundleRuntime(bundle, device="cpu", threads=1, verify_checksums=False)
    image = test_images(1, rt.image_size)[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = buf.getvalue()
    edits = json.dumps([s.model_dump(mode="json") for s in edit_sets(rt, rt.preprocess(image))])
    port = free_port()
    import os

    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "serving.cli", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port),
           "--threads", "1", "--max-batch-size", "16", "--batch-wait-ms", "50"]
    srv = Server("cltvit", cmd, env, f"http://127.0.0.1:{port}", work / "intervene-http.log")
    pool = ThreadPoolExecutor(16)

    def post(path: str, data: dict) -> None:
        r = requests.post(srv.url + path, files={"image": ("i.png", png, "image/png")}, data=data, timeout=300)
        r.raise_for_status()

    calls = {"intervene": lambda: post("/intervene", {"edits": edits}),
             "explain16": lambda: list(pool.map(lambda _: post("/explain", {}), range(16)))}
    try:
        for fn in calls.values():
            fn(), fn()
        srv.settle()
        cpu: dict[str, list[float]] = {k: [] for k in calls}
        batches = []
        for rnd in range(rounds):
            for name in (list(calls) if rnd % 2 == 0 else list(calls)[::-1]):
                m0 = srv.metrics() if name == "explain16" else None
                c0 = tree_cpu_seconds(srv.pid)
                calls[name]()
                cpu[name].append(tree_cpu_seconds(srv.pid) - c0)
                if m0 is not None:
                    m1 = srv.metrics()
                    n = m1["cltvit_batch_size_count"] - m0["cltvit_batch_size_count"]
                    batches.append((m1["cltvit_batch_size_sum"] - m0["cltvit_batch_size_sum"]) / max(n, 1))
                srv.settle()
    finally:
        pool.shutdown()
        srv.stop()
    return {"ratio": statistics.median(a / b for a, b in zip(cpu["intervene"], cpu["explain16"])),
            "intervene_ms": 1000 * statistics.median(cpu["intervene"]), "explain16_ms": 1000 * statistics.median(cpu["explain16"]),
            "mean_batch": statistics.median(batches)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="artifacts/bench")
    ap.add_argument("--models", default="reference")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--http", action="store_true", help="also over HTTP: server CPU of POST /intervene vs 16 POST /explain")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log(json.dumps(machine_info()))
    for model in args.models.split(","):
        times = bench(make_bundle(work, model), args.rounds)

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
        log(f"{model}: median CPU ms per call {json.dumps(ms)}")
        log(f"{model}: /intervene 16 edit sets / 16-image /explain batch = {ratio('intervene', 'explain16'):.3f} (target <= 1.2); "
            f"graphs alone {ratio('graph_intervene', 'graph_explain16'):.3f}; Python API {ratio('api_intervene', 'api_explain16'):.3f}; "
            f"/explain with / without the intervention graph in the bundle {ratio('explain16', 'explain16_without'):.3f}")
        if args.http:
            h = http_bench(make_bundle(work, model), work, max(args.rounds // 3, 5))
            log(f"{model} HTTP: server CPU of POST /intervene (16 edit sets) / 16 POST /explain = {h['ratio']:.3f} "
                f"({h['intervene_ms']:.1f} / {h['explain16_ms']:.1f} ms; /explain mean batch {h['mean_batch']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
