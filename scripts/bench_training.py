"""Benchmark of the CLT training pipeline (printed figures, not a timed test).

ViT-B-32 architecture with random weights (no download), F = 6144 features per layer, k = 32,
cross-layer decoders, batch 4096 tokens, all tokens. Prints:

- activation tokens/s streamed (ViT forward + capture into the shuffling buffer),
- CLT training tokens/s (one `training.trainer.train_step`: loss, backward, clipping, AdamW),
- peak RSS of the process (resource.getrusage),
- training FLOP/s against a dense fp32 matmul FLOP/s measured in the same run (torch.mm of
  [N, d] x [d, F], i.e. one encoder layer's product), taken right before and after the timed steps.

FLOPs per step, counted two ways (N tokens, d width, F features, L layers, k active, T = sum_i
n_targets(i) = L(L+1)/2 decoder blocks):
- "needed": what a sparse CLT step must compute: encoder forward 2NdFL (dense: it picks the top
  k), encoder weight gradient 2NkdL (only the k selected columns get gradient), decoder forward
  2NkTd, decoder backward 2 x 2NkTd (activation gradient and weight gradient).
- "nominal": the usual 3x-forward rule for the encoder (2NdFL forward + 2 x 2NdFL backward) plus
  the same sparse decoder FLOPs; this is the count the project brief uses.

The machine is shared: the matmul reference is measured under the same load, so the ratio is
the meaningful figure; absolute rates move with the other users' load. The CPU (model, instruction
sets, threads, versions: bundle.provenance) is printed and recorded, and the verdicts against the
targets (training >= 50% of the matmul rate, peak RSS <= 8 GiB) are computed from the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.provenance import machine_info  # noqa: E402
from training.activations import ActivationStream  # noqa: E402
from training.model.backbone import load_backbone  # noqa: E402
from training.model.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from training.trainer import Batch, TrainConfig, make_optimizer, release_text_tower, train_step  # noqa: E402


MIN_RATIO = 0.5  # target: training FLOP/s ("needed" count) >= this fraction of the dense matmul rate
MAX_RSS_GIB = 8.0  # target: peak resident memory


class RandomImages:
    """n seeded random preprocessed images [3, H, W], made on access (nothing held in memory)."""

    def __init__(self, n: int, size: tuple[int, int]) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.randn(3, *self.size, generator=torch.Generator().manual_seed(i)), 0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def rss_gib() -> float:
    """Current resident set size (Linux /proc), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def matmul_flops(n: int, d: int, f: int, reps: int = 3) -> float:
    """Dense fp32 torch.mm FLOP/s for [n, d] x [d, f]."""
    a, b = torch.randn(n, d), torch.randn(d, f)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n * d * f * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--features", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--buffer-tokens", type=int, default=8192)
    p.add_argument("--images-per-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    backbone = load_backbone(args.model, None, device="cpu", seed=0)
    release_text_tower(backbone)  # as cltvit-train does: training reads only the vision tower
    L, d = backbone.n_layers, backbone.d_model
    n_img = 2 * (args.buffer_tokens // backbone.n_tokens + args.images_per_batch)
    dataset = RandomImages(n_img, backbone.image_size)
    mem = {"backbone": rss_gib()}
    stream = ActivationStream(backbone, dataset, tokens="all", batch_tokens=args.batch_tokens,
                              buffer_tokens=args.buffer_tokens, images_per_batch=args.images_per_batch)
    t0 = time.perf_counter()
    stream.fill()
    fill_s = time.perf_counter() - t0
    act_tps = stream.stats.tokens_captured / fill_s
    mem["after_buffer_fill"] = rss_gib()
    mem["peak_after_fill"] = peak_rss_gib()

    clt_cfg = CLTConfig(L, d, args.features, activation="topk", k=args.k)
    cfg = TrainConfig(steps=args.steps + 1, batch_tokens=args.batch_tokens, lr=2e-4, warmup_steps=0)
    clt = CrossLayerTranscoder(clt_cfg).train()
    x, y = stream.peek(4096)
    clt.fit_normalisation(x, y)
    del x, y
    opt = make_optimizer(clt, cfg)
    dead = torch.zeros(L, args.features, dtype=torch.bool)
    n_params = sum(p.numel() for p in clt.parameters() if p.requires_grad)

    x, y = stream.next_batch()
    mem["clt_created"] = rss_gib()
    train_step(clt, opt, [Batch(x, y)], dead, cfg)  # warm-up: allocates gradients and Adam state
    mem["after_first_step"] = rss_gib()
    mm_before = matmul_flops(args.batch_tokens, d, args.features)
    step_s = []
    for _ in range(args.steps):
        x, y = stream.next_batch()
        t0 = time.perf_counter()
        loss = train_step(clt, opt, [Batch(x, y)], dead, cfg).loss
        step_s.append(time.perf_counter() - t0)
    mm_after = matmul_flops(args.batch_tokens, d, args.features)
    mm = (mm_before + mm_after) / 2

    N, Fn, k = args.batch_tokens, args.features, args.k
    T = sum(clt_cfg.n_targets(i) for i in range(L))
    enc_fwd = 2 * N * d * Fn * L
    dec = 2 * N * k * T * d
    needed = enc_fwd + 2 * N * k * d * L + 3 * dec
    nominal = 3 * enc_fwd + 3 * dec
    mean_s = sum(step_s) / len(step_s)
    out = {
        "config": {"model": args.model, "weights": "random", "L": L, "d_model": d, "features": Fn, "k": k,
                   "batch_tokens": N, "buffer_tokens": stream.buffer_tokens, "threads": args.threads,
                   "clt_parameters": n_params, "load_average": os.getloadavg()},
        "activation_tokens_per_s": act_tps,
        "train_step_s": step_s,
        "train_tokens_per_s": N / mean_s,
        "matmul_gflops": mm / 1e9,
        "train_gflops_needed": needed / mean_s / 1e9,
        "train_gflops_nominal": nominal / mean_s / 1e9,
        "ratio_needed": needed / mean_s / mm,
        "ratio_nominal": nominal / mean_s / mm,
        "peak_rss_gib": peak_rss_gib(),
        "rss_gib_at": mem,
        "fvu_mean_last_step": float(loss.fvu.mean()),
        "machine": machine_info(args.threads),
    }
    mach = out["machine"]
    out["meets"] = {"train_ratio_needed_ge_0.5": out["ratio_needed"] >= MIN_RATIO, "peak_rss_le_8_gib": out["peak_rss_gib"] <= MAX_RSS_GIB}
    print(f"[bench_training] {args.model} (random weights) L={L} d={d} F={Fn} k={k} batch={N} tokens, "
          f"{args.threads} threads, load average {out['config']['load_average'][0]:.1f} (shared machine)")
    print(f"  CPU                  : {mach['cpu']}, {mach['cores']} logical CPUs, {', '.join(mach['isa'])}; torch {mach['versions'].get('torch')}")
    print(f"  activations streamed : {act_tps:10.0f} tokens/s")
    print(f"  CLT training         : {out['train_tokens_per_s']:10.0f} tokens/s  ({mean_s:.2f} s/step over {args.steps} steps)")
    print(f"  dense fp32 matmul    : {mm / 1e9:10.1f} GFLOP/s (torch.mm {N}x{d} @ {d}x{Fn})")
    print(f"  training, needed     : {out['train_gflops_needed']:10.1f} GFLOP/s = {100 * out['ratio_needed']:.0f}% of matmul "
          f"({'meets' if out['meets']['train_ratio_needed_ge_0.5'] else 'misses'} the target >= {MIN_RATIO:.0%})")
    print(f"  training, nominal    : {out['train_gflops_nominal']:10.1f} GFLOP/s = {100 * out['ratio_nominal']:.0f}% of matmul (3x rule for the encoder)")
    print(f"  peak RSS             : {out['peak_rss_gib']:10.2f} GiB ({'meets' if out['meets']['peak_rss_le_8_gib'] else 'misses'} "
          f"the target <= {MAX_RSS_GIB} GiB); RSS at stages: "
          + ", ".join(f"{k} {v:.2f}" for k, v in mem.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
