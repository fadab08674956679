#!/usr/bin/env python
"""How much an idle gap before a model call costs on this machine (docs/serving.md, one-client latency).

Calls the bundle's ONNX Runtime session on one preprocessed image, one thread, back to back and then
after sleeping 1, 3 and 10 ms before each call; prints the median wall and CPU time per call. On VMs
whose idle vCPU sleeps (and on CPUs that drop their clock when idle) the calls after a gap cost
more: that is what a server's model thread sees between one client's requests.

  python scripts/bench_idle_gap.py --bundle artifacts/reference/bundle [--calls 300]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.provenance import machine_info  # noqa: E402
from serving.runtime import BundleRuntime  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_idle_gap", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    rt = BundleRuntime(args.bundle, device="cpu", threads=1, spinning=False, verify_checksums=False)
    px = np.random.default_rng(0).standard_normal((1, 3, *rt.image_size), dtype=np.float32)
    m = machine_info(threads=1)
    print(f"# {m.get('cpu')} ({' '.join(m.get('isa', []))}), ONNX Runtime 1 thread, {args.calls} calls per row")
    base = None
    for gap_ms in (0, 1, 3, 10):
        walls, cpus = [], []
        rt.run(px)
        for _ in range(args.calls):
            if gap_ms:
                time.sleep(gap_ms / 1e3)
            w, c = time.perf_counter(), time.thread_time()
            rt.run(px)
            cpus.append(time.thread_time() - c)
            walls.append(time.perf_counter() - w)
        wall, cpu = 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)
        base = base or wall
        print(f"idle {gap_ms:>2} ms before each call: {wall:.2f} ms wall, {cpu:.2f} ms CPU per call ({wall / base:.2f}x back to back)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
