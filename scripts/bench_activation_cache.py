"""What the activation cache saves on the reference build's `seeds` stage (printed figures, not a timed test).

Runs the build's own `stage_clt` and `stage_seeds` (pipeline/reference.py) on the shipped reference CLIP
(`pipeline/reference_weights/clip.safetensors`: the clip stage is not retrained), twice in one process on
the same inputs: the seeds streamed from the CLIP (`seeds_from_cache=False`, the build before the cache)
and the seeds trained from the activation cache (`seeds_from_cache=True`, the build now), the cache written
inside the stage (its cost is in the stage's time). Every size of the full recipe is multiplied by
`--scale` (training images, CLT steps and warm-up, fine-tuning steps and check images, evaluation images),
so the shares of CLIP, CLT, fine-tuning and evaluation in a seed's time stay those of the full build;
`--scale 1` is the full stage.

    python scripts/bench_activation_cache.py --out artifacts/bench/activation-cache --scale 0.2 --seeds 3 --threads 1

Prints and writes OUT/bench.json: per mode the stage's wall and CPU seconds, the cache's writing time,
and the saving, with the machine (CPU model, instruction sets, threads). The machine is shared: the
CPU seconds (this process only) are the steadier figure; the wall seconds move with the other users' load.

`--supply-only` measures just the part the cache replaces, in one process: the CPU seconds to hand out
one seed's training tokens (steps x batch tokens, the recipe's buffer and CLS copies) from the CLIP
stream and from the cache (written first if missing), written to OUT/supply.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.checksums import file_sha256  # noqa: E402
from bundle.provenance import machine_info  # noqa: E402
from pipeline.reference import (BuildConfig, TensorImages, _train_cfg, activation_cache, budget, load_fashion_tensors,  # noqa: E402
                                stage_clt, stage_seeds)
from training.trainer import make_stream  # noqa: E402
from pipeline.shipped import CLIP_FILE, WEIGHTS_DIR, load_shipped  # noqa: E402
from training.cache import MANIFEST  # noqa: E402


def scaled(scale: float, seeds: int) -> BuildConfig:
    cfg = budget("full")
    n = lambda v: max(1, round(v * scale))  # noqa: E731
    train = dict(cfg.clt_train, steps=n(cfg.clt_train["steps"]), warmup_steps=n(cfg.clt_train["warmup_steps"]))
    assert cfg.finetune is not None
    return replace(cfg, clt_seeds=seeds, clt_train=train, clt_train_limit=n(60_000),
                   finetune=replace(cfg.finetune, steps=n(cfg.finetune.steps)), finetune_check_images=n(cfg.finetune_check_images),
                   eval=replace(cfg.eval, limit=n(10_000), fidelity_images=n(cfg.eval.fidelity_images)))


def supply(out: Path, cfg: BuildConfig, bb, train_ds: TensorImages, argv: list[str] | None) -> int:
    """CPU seconds to hand out one seed's training tokens from the stream and from the cache (see the docstring)."""
    tc = _train_cfg(cfg.clt_train, 1)
    cache = activation_cache(out, bb, train_ds, lambda m: print(m, flush=True))
    res = {}
    for mode in ("stream", "cache", "stream_again"):
        stream = make_stream(bb, None if mode == "cache" else train_ds, tc, cache if mode == "cache" else None)
        cpu0, wall0 = time.process_time(), time.time()
        for _ in range(tc.steps):
            stream.next_batch()
        res[mode] = {"cpu_s": time.process_time() - cpu0, "wall_s": time.time() - wall0}
        print(mode, res[mode], flush=True)
    summary = {"command": "python scripts/bench_activation_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "tokens": tc.steps * tc.batch_tokens, "results": res, "machine": machine_info(threads=torch.get_num_threads())}
    (out / "supply.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_activation_cache", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="work directory (a reduced build; reruns reuse its clt stage)")
    p.add_argument("--scale", type=float, default=0.2, help="fraction of the full recipe's sizes (default 0.2)")
    p.add_argument("--seeds", type=int, default=3, help="CLT seeds of the stage, seed 0 included (default 3, as the shipped build)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--supply-only", action="store_true", help="time only the token supply of one seed: stream vs cache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    bb, _, _ = load_shipped(WEIGHTS_DIR)
    cfg = scaled(args.scale, args.seeds)
    train, train_px, train_y = load_fashion_tensors(bb, "train", None, cfg.clt_train_limit)
    train_ds = TensorImages(train_px, train_y, {**train.description(), "tensorised": True})
    test, test_px, test_y = load_fashion_tensors(bb, "test", None)
    text = bb.class_embeddings(test.class_names, test.templates)
    if args.supply_only:
        return supply(out, cfg, bb, train_ds, argv)
    n_check = min(cfg.finetune_check_images, len(test_y))
    clip_rec = {"files": {CLIP_FILE: file_sha256(WEIGHTS_DIR / CLIP_FILE)}}  # the shipped CLIP stands in for the clip stage
    clt_rec = stage_clt(out, cfg, bb, train_ds, (test_px[:n_check], test_y[:n_check], text), clip_rec, log)
    results = {}
    for mode, from_cache in (("stream", False), ("cache", True)):
        (out / "stages" / "seeds.json").unlink(missing_ok=True)
        if from_cache:
            for f in (out / "activations").glob("*"):  # the stage writes its cache from scratch
                f.unlink()
        wall0, cpu0 = time.time(), time.process_time()
        rec = stage_seeds(out, replace(cfg, seeds_from_cache=from_cache), bb, train_ds, (test_px, test_y, text), clt_rec, log)
        results[mode] = {"wall_s": time.time() - wall0, "cpu_s": time.process_time() - cpu0, "worst": rec["worst"],
                         "load_avg_after": os.getloadavg()[0]}
        if from_cache:
            m = json.loads((out / "activations" / MANIFEST).read_text())
            results[mode]["cache_write_s"] = m["seconds"]
            results[mode]["cache_gib"] = sum(s["bytes"] for s in m["shards"]) / 2**30
        log(f"seeds stage ({mode}): {results[mode]['wall_s']:.0f} s wall, {results[mode]['cpu_s']:.0f} s CPU")
    s, c = results["stream"], results["cache"]
    summary = {
        "command": "python scripts/bench_activation_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "scale": args.scale, "seeds_retrained": args.seeds - 1, "train_images": cfg.clt_train_limit,
        "steps": cfg.clt_train["steps"], "results": results,
        "saved_wall_s": s["wall_s"] - c["wall_s"], "saved_cpu_s": s["cpu_s"] - c["cpu_s"],
        "cache_over_stream_wall": c["wall_s"] / s["wall_s"], "cache_over_stream_cpu": c["cpu_s"] / s["cpu_s"],
        "machine": machine_info(threads=torch.get_num_threads()),
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=float))
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1, default=float))
    mach = summary["machine"]
    print(f"machine: {mach['cpu']} ({', '.join(mach['isa'])}), {mach['cores']} logical CPUs, {mach['threads']} torch thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
