"""torchrun worker of tests/training/test_sharded.py: every rank builds the same small CLT and batch
(`case`), keeps its feature shard in a `ShardedCLT`, and saves what the sharded model computed
(`OUT/<case>-rank<r>.pt`): the loss terms, this rank's gradients, the train- and eval-mode forward
output, and the active features each selected. The test compares them with an unsharded
`CrossLayerTranscoder` it runs itself.

    torchrun --nproc-per-node 2 sharded_worker.py OUT CASE [CASE ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from training.model.clt import CLTConfig, CrossLayerTranscoder
from training.model.loss import LossConfig
from training.model.sharded import ShardedCLT
from training.trainer import Batch, DecoderInBackwardAdamW, TrainConfig, make_optimizer, train_step

L, D, FEATURES, K, N = 3, 16, 64, 4, 40

LOSS = LossConfig(aux_k=6, sparsity_coef=0.1)
CASES = ("topk", "batchtopk", "jumprelu", "topk-ties", "batchtopk-ties")


def case(name: str) -> tuple[CrossLayerTranscoder, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unsharded CLT in train mode, mlp_in [L, N, d], mlp_out [L, N, d], dead [L, F] bool) of a case.

    The "-ties" cases have integer-valued encoders and inputs: the pre-activations are small integers,
    so many features tie at the k-th value of each token (and of the batch) and the tie rule decides.
    """
    activation = name.split("-")[0]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    torch.manual_seed(0)
    # a wide JumpReLU kernel, so that the thresholds' straight-through gradient is not almost empty
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=FEATURES, activation=activation, k=K, k_cap=12,  # type: ignore[arg-type]
                    jumprelu_bandwidth=0.5)
    clt = CrossLayerTranscoder(cfg).train()
    x = torch.randn(L, N, D, generator=g) * 3
    y = torch.randn(L, N, D, generator=g)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.2, generator=g)
        clt.b_dec.normal_(0, 0.1, generator=g)
        clt.in_scale.copy_(torch.tensor([3.0, 2.5, 3.5]))
        clt.out_scale.copy_(torch.tensor([1.0, 0.8, 1.2]))
        if activation == "jumprelu":
            clt.log_threshold.copy_(torch.empty(L, FEATURES).uniform_(-1.5, 0.0, generator=g))
        if name.endswith("-ties"):
            clt.W_enc.copy_(torch.randint(-1, 2, (L, D, FEATURES), generator=g).float())
            clt.b_enc.zero_()
            clt.in_scale.fill_(1.0)
            x = torch.randint(0, 2, (L, N, D), generator=g).float()
    dead = torch.rand(L, FEATURES, generator=g) < 0.3
    return clt, x, y, dead


def optimise(clt: CrossLayerTranscoder | ShardedCLT, name: str, decoder_update: str) -> None:
    """Two `train_step`s of the case's batch with a gradient clip tight enough to act (both optimizer layouts)."""
    _, x, y, dead = case(name)
    cfg = TrainConfig(steps=2, lr=1e-2, grad_clip=0.05, aux_k=6, sparsity_coef=0.1, decoder_update=decoder_update)  # type: ignore[arg-type]
    opt = make_optimizer(clt, cfg)
    for _ in range(2):
        train_step(clt, opt, [Batch(x.clone(), y.clone())], dead, cfg)
    if isinstance(opt, DecoderInBackwardAdamW):
        opt.close()


def active_pairs(code) -> list[tuple[int, int]]:
    """The (token, feature) pairs of a code's non-zero entries, sorted."""
    nz = code.val != 0
    return sorted(zip(nz.nonzero()[:, 0].tolist(), code.idx[nz].tolist()))


def run(name: str, out: Path) -> None:
    full, x, y, dead = case(name)
    sharded = ShardedCLT(full.cfg)
    sharded.load_full_state_dict(full.state_dict())
    sharded.train()
    result: dict = {}
    loss = sharded.loss(x.clone(), y.clone(), LOSS, dead=dead)
    loss.total.backward()
    result["loss"] = {k: getattr(loss, k).detach() for k in ("total", "fvu", "aux", "sparsity", "l0", "fired")}
    result["grads"] = {n: p.grad.clone() for n, p in sharded.named_parameters() if p.grad is not None}
    result["batchtopk_threshold"] = sharded.batchtopk_threshold.clone()
    for mode in ("train", "eval"):
        sharded.train(mode == "train")
        with torch.no_grad():
            recon, codes = sharded(x)
        result[mode] = {"recon": recon, "active": [active_pairs(c) for c in codes]}
    result["offset"], result["world"] = sharded.offset, sharded.world
    for update in ("in_backward", "after"):
        sharded.load_full_state_dict(full.state_dict())
        sharded.train()
        optimise(sharded, name, update)
        result[f"stepped_{update}"] = {n: t.clone() for n, t in sharded.state_dict().items()}
    torch.save(result, out / f"{name}-rank{dist.get_rank()}.pt")


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")
    try:
        for name in names:
            run(name, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
