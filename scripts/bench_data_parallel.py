"""Data-parallel training throughput: `cltvit-train` on 1 process vs `cltvit-train --nproc N` (torchrun),
measured in one run of this script (printed figures, not a timed test).

Both runs use the same per-rank settings (model with random weights, F, k, --batch-tokens per rank,
buffer, --threads per rank), so N ranks train on N times the tokens per step. Figures per run: the
trainer's own `tokens_per_s` of the last logged step (tokens of all ranks over the training loop's
wall time, ViT streaming included, start-up and the first buffer fill excluded) and the command's wall
time; then the ratio N-rank / 1-rank. The CPU (model, instruction sets, cores) and the load average
before each run are recorded: on a machine with fewer cores than ranks x threads, expect no gain.

    python scripts/bench_data_parallel.py --work /tmp/bench-dp --json /tmp/bench-dp/result.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.provenance import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(work: Path, name: str, common: list[str], extra: list[str]) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    exe = str(Path(sys.executable).parent / "cltvit-train")
    load = os.getloadavg()
    t0 = time.perf_counter()
    done = subprocess.run([exe, *common, *extra, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"command": " ".join(["cltvit-train", *common, *extra, "--out", str(out)]), "load_average_before": load,
            "wall_s": wall, "steps": rows[-1]["step"], "tokens": rows[-1]["tokens"], "tokens_per_s": rows[-1]["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--features", type=int, default=1536)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=1024, help="per rank")
    p.add_argument("--buffer-tokens", type=int, default=4096, help="per rank")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--images", type=int, default=2000, help="Fashion-MNIST training images used")
    p.add_argument("--work", default="/tmp/bench-data-parallel")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--dataset", "fashion-mnist", "--limit", str(args.images), "--features", str(args.features),
              "--k", str(args.k), "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
              "--buffer-tokens", str(args.buffer_tokens), "--images-per-batch", "16", "--warmup-steps", "2",
              "--checkpoint-every", str(args.steps), "--log-every", "1", "--threads", str(args.threads), "--no-progress"]
    one = run(work, "ranks-1", common, [])
    many = run(work, f"ranks-{args.nproc}", common, ["--nproc", str(args.nproc)])
    result = {"config": vars(args), "ranks_1": one, f"ranks_{args.nproc}": many,
              "ratio_tokens_per_s": many["tokens_per_s"] / one["tokens_per_s"],
              "ratio_wall_per_token": (many["wall_s"] / many["tokens"]) / (one["wall_s"] / one["tokens"]),
              "machine": machine_info(args.threads)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
