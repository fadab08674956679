"""`make load`: start the service, run Locust headless on loopback for a bounded time, judge the result.

Steps, all in one run on the same machine:
1. Raw bundle throughput: BundleRuntime.run on preprocessed Fashion-MNIST batches of size
   `--max-batch-size` (before and after the service run) and of the service's observed mean batch size, with
   the same ONNX Runtime thread setting as the server; best of `--raw-repeats` timed passes.
2. Start `cltvit-serve` on 127.0.0.1:<free port>, warm it up, run Locust (`--users` closed-loop users,
   `--duration`), CSV written under `--out`.
3. Report service images/s, p50/p95, failures, the service's mean batch size (cltvit_batch_size), and the ratio
   service images/s / raw images/s at the same batch size as served (the mean batch, rounded; also
   against `--max-batch-size`, raw measured before and after the run). Exit status 1 on any failed
   request, p95 over `--p95-ms`, or (when `--min-ratio` is given) a same-batch ratio below it.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from serving.cli import running_server  # noqa: E402
from serving.images import decode_image  # noqa: E402
from serving.runtime import BundleRuntime  # noqa: E402

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_load", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle directory to serve")
    p.add_argument("--users", type=int, default=16, help="concurrent Locust users (default 16)")
    p.add_argument("--duration", type=int, default=60, help="Locust run time in seconds (default 60)")
    p.add_argument("--endpoint", default="classify", choices=("classify", "explain", "embed"))
    p.add_argument("--max-batch-size", type=int, default=16, help="server's largest batch (default 16)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for server and raw run (default: ORT's)")
    p.add_argument("--p95-ms", type=float, default=10_000.0, help="fail when p95 latency exceeds this (ms, default 10000)")
    p.add_argument("--min-ratio", type=float, default=None, help="fail when service/raw images/s is below this")
    p.add_argument("--raw-repeats", type=int, default=3, help="timed passes of the raw measurement (best is kept)")
    p.add_argument("--out", default="artifacts/load", help="directory for Locust CSV and the summary JSON")
    args = p.parse_args(argv)
    if args.users < 1 or args.duration < 5 or args.max_batch_size < 2:
        p.error("--users >= 1, --duration >= 5 and --max-batch-size >= 2 are required")
    if not Path(args.bundle, "bundle.json").is_file():
        p.error(f"--bundle {args.bundle}: no bundle.json there (build one with cltvit-export / cltvit-reference)")
    return args


def fmnist_images(n: int) -> list[bytes]:
    """The very images Locust uploads (scripts/load/fmnist.py)."""
    sys.path.insert(0, str(LOCUSTFILE.parent))
    from fmnist import fashion_mnist_pngs

    return fashion_mnist_pngs(n)


def raw_images_per_second(rt: BundleRuntime, pixels: np.ndarray, batch: int, repeats: int) -> float:
    """Best-of-`repeats` images/s of the bare graph on batches of `batch` preprocessed images."""
    batch = max(1, min(batch, len(pixels)))
    n_batches = max(2, (4 * 16) // batch)
    rt.run(pixels[:batch])  # warm-up for this shape
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n_batches):
            start = (i * batch) % (len(pixels) - batch + 1)
            rt.run(pixels[start : start + batch])
        best = max(best, n_batches * batch / (time.perf_counter() - t0))
    return best


def batch_histogram(url: str, headers: dict[str, str]) -> tuple[float, float, float]:
    """(sum, count) of the service's batch-size histogram (cltvit_batch_size, one observation per
    ONNX Runtime batch), and the total seconds spent in ONNX Runtime (cltvit_inference_seconds_sum)."""
    text = requests.get(f"{url}/metrics", headers=headers, timeout=30).text
    total = count = seconds = 0.0
    for line in text.splitlines():
        if line.startswith("cltvit_inference_seconds_sum"):
            seconds += float(line.rsplit(" ", 1)[1])
        elif line.startswith("cltvit_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("cltvit_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count, seconds


def read_locust_stats(prefix: Path) -> dict[str, float]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    return {
        "requests": float(agg["Request Count"]),
        "failures": float(agg["Failure Count"]),
        "rps": float(agg["Requests/s"]),
        "p50_ms": float(agg["50%"]),
        "p95_ms": float(agg["95%"]),
        "mean_ms": float(agg["Average Response Time"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = fmnist_images(256)

    print(f"[load] raw bundle throughput ({args.bundle})", flush=True)
    # --variant auto resolved once here (at the server's batch sizes) and pinned for the server and the raw runs
    rt = BundleRuntime(args.bundle, device="auto", threads=args.threads, variant="auto", bench_batches=(1, args.max_batch_size))
    variant = rt.variant
    print(f"[load] {rt.variant_choice.summary()}", flush=True)
    pixels = np.stack([rt.preprocess(decode_image(b)) for b in images[:64]])
    raw_before = raw_images_per_second(rt, pixels, args.max_batch_size, args.raw_repeats)
    print(f"[load] raw: {raw_before:.2f} images/s at batch {args.max_batch_size} ({rt.provider})", flush=True)

    manifest = rt.manifest
    del rt  # free its memory while the server holds its own copy of the graph
    gc.collect()

    token = os.environ.get("CLTVIT_API_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    extra = ["--max-batch-size", str(args.max_batch_size), "--no-verify", "--variant", variant]  # checksums were verified just above
    if args.threads:
        extra += ["--threads", str(args.threads)]
    prefix = out / f"locust_{args.endpoint}_u{args.users}"
    with running_server(args.bundle, extra_args=extra, log_path=out / "server.log") as url:
        # warm-up: lets BentoML's dispatcher calibrate before the measured run
        def one(i: int) -> int:
            files = {"image": ("w.png", images[i % len(images)], "image/png")}
            return requests.post(f"{url}/{args.endpoint}", files=files, headers=headers, timeout=120).status_code

        with ThreadPoolExecutor(args.users) as pool:
            codes = list(pool.map(one, range(max(40, 3 * args.users))))
        if any(c != 200 for c in codes):
            print(f"[load] warm-up failed: statuses {sorted(set(codes))}", file=sys.stderr)
            return 1
        before = batch_histogram(url, headers)
        print(f"[load] locust: {args.users} users, {args.duration}s, POST /{args.endpoint} on {url}", flush=True)
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
               "-r", str(args.users), "-t", f"{args.duration}s", "--host", url, "--csv", str(prefix),
               "--only-summary", "--stop-timeout", "30", "--exit-code-on-error", "0"]
        env = {**os.environ, "LOAD_ENDPOINT": args.endpoint}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.duration + 180)
        (out / "locust.log").write_text(proc.stdout + proc.stderr)
        after = batch_histogram(url, headers)

    stats = read_locust_stats(prefix)
    n_batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / n_batches if n_batches else float("nan")
    ort_seconds = after[2] - before[2]
    ort_busy = ort_seconds / args.duration if ort_seconds > 0 else float("nan")  # share of the run inside ONNX Runtime
    ort_rate = (after[0] - before[0]) / ort_seconds if ort_seconds > 0 else float("nan")
    rt = BundleRuntime(args.bundle, device="auto", threads=args.threads, verify_checksums=False, variant=variant)
    mean_b = int(round(mean_batch)) if n_batches else 1
    raw_at_mean = raw_images_per_second(rt, pixels, mean_b, args.raw_repeats)
    raw_after = raw_images_per_second(rt, pixels, args.max_batch_size, args.raw_repeats)
    raw_at_max = (raw_before + raw_after) / 2  # before and after the Locust run: drift on a shared machine averages out
    ratio_max = stats["rps"] / raw_at_max if raw_at_max else float("nan")
    ratio = stats["rps"] / raw_at_mean if raw_at_mean else float("nan")  # the gate: same batch size as served
    summary = {
        "bundle": str(args.bundle), "backbone": manifest.backbone.model, "provider": rt.provider,
        "endpoint": args.endpoint, "users": args.users, "duration_s": args.duration,
        **stats, "mean_batch_size": mean_batch, "server_ort_busy_fraction": ort_busy,
        "server_ort_images_per_s": ort_rate,
        "raw_images_per_s_at_max_batch": raw_at_max, "raw_at_max_batch_before_after": [raw_before, raw_after],
        "max_batch_size": args.max_batch_size,
        "raw_images_per_s_at_mean_batch": raw_at_mean, "mean_batch_rounded": mean_b,
        "ratio_vs_raw_at_max_batch": ratio_max,
        "ratio_vs_raw_at_mean_batch": ratio,
        "p95_bound_ms": args.p95_ms, "min_ratio": args.min_ratio,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[load] {manifest.backbone.model}: {stats['requests']:.0f} requests, {stats['failures']:.0f} failed, "
        f"{stats['rps']:.2f} images/s, p50 {stats['p50_ms']:.0f} ms, p95 {stats['p95_ms']:.0f} ms, "
        f"mean batch {mean_batch:.2f}\n"
        f"[load] inside the server: ONNX Runtime busy {100 * ort_busy:.0f}% of the run, {ort_rate:.2f} images/s while busy\n"
        f"[load] raw bundle: {raw_at_mean:.2f} images/s at batch {mean_b} (the served mean batch); "
        f"{raw_at_max:.2f} at batch {args.max_batch_size} (mean of {raw_before:.2f} before, {raw_after:.2f} after)\n"
        f"[load] service / raw images/s = {ratio:.3f} at the same batch size ({mean_b}); "
        f"{ratio_max:.3f} against batch {args.max_batch_size}\n"
        f"[load] CSV: {prefix}_stats.csv, summary: {out / 'summary.json'}",
        flush=True,
    )
    problems = []
    if stats["requests"] == 0:
        problems.append("no request completed")
    if stats["failures"] > 0:
        problems.append(f"{stats['failures']:.0f} failed requests (see {out / 'locust.log'})")
    if stats["p95_ms"] > args.p95_ms:
        problems.append(f"p95 {stats['p95_ms']:.0f} ms over the bound of {args.p95_ms:.0f} ms")
    if args.min_ratio is not None and not ratio >= args.min_ratio:
        problems.append(f"service/raw ratio {ratio:.3f} below {args.min_ratio}")
    for p in problems:
        print(f"[load] FAIL: {p}", file=sys.stderr)
    if not problems:
        print("[load] PASS", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
