"""Memory and step time of a feature-sharded CLT per rank (printed figures, not a timed test).

Run under torchrun; every rank builds its `ShardedCLT` shard of a CLT of the given shape, runs
`--steps` training steps (`training.trainer.train_step`: loss, backward, clipping, AdamW) on the same
random batch, and reports what it holds: parameter, gradient and AdamW-state bytes (summed over its
tensors after the steps), peak RSS and the mean step time. Rank 0 prints one JSON line per rank and
the machine. Compare `--nproc-per-node 1` (the whole CLT in one rank) with 2, 4, ... on the same machine:

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 scripts/bench_sharded.py --layers 12 --d-model 768 --features 1536

Default shape: ViT-B-32's L = 12, d = 768 with F = 1536 (a quarter of the paper's 6144, so that
one process fits next to other jobs on a small machine).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.provenance import machine_info  # noqa: E402
from training.model.clt import CLTConfig  # noqa: E402
from training.model.sharded import ShardedCLT  # noqa: E402
from training.trainer import Batch, TrainConfig, make_optimizer, train_step  # noqa: E402


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--features", type=int, default=1536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--activation", default="topk")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--decoder-update", choices=("in_backward", "after"), default="after")
    args = p.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    cfg = CLTConfig(n_layers=args.layers, d_model=args.d_model, n_features=args.features, activation=args.activation, k=args.k)
    clt = ShardedCLT(cfg).to(device).train()
    tcfg = TrainConfig(steps=args.steps, decoder_update=args.decoder_update, aux_coef=0.0)
    opt = make_optimizer(clt, tcfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.layers, args.tokens, args.d_model, generator=g).to(device)
    y = torch.randn(args.layers, args.tokens, args.d_model, generator=g).to(device)
    dead = torch.zeros(args.layers, args.features, dtype=torch.bool, device=device)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(clt, opt, [Batch(x.clone(), y.clone())], dead, tcfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    params = list(clt.parameters())
    states = [v for o in ([opt.main, *opt.decoder] if hasattr(opt, "main") else [opt]) for s in o.state.values() for v in s.values()]
    row = {
        "rank": rank, "world": world, "features_here": clt.f_local,
        "param_bytes": nbytes(params), "grad_bytes_after_step": nbytes(q.grad for q in params),
        "adam_bytes": nbytes(v for v in states if v.dim() > 0),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s_mean": sum(times[1:]) / max(len(times) - 1, 1), "tokens": args.tokens,
        "shape": {"L": args.layers, "d": args.d_model, "F": args.features, "k": args.k, "activation": args.activation,
                  "decoder_update": args.decoder_update},
    }
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        for r in rows:
            print(json.dumps(r))
        print(json.dumps({"machine": machine_info(), "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
