"""Train a cross-layer transcoder on activations streamed from an open_clip ViT.

`train_clt(backbone, dataset, clt_cfg, train_cfg, out_dir)` writes into `out_dir`:

- `metrics.jsonl`: one JSON line every `log_every` steps (`step`, `tokens`, `fvu` [L], `fvu_mean`,
  `l0` [L], `l0_mean`, `dead_fraction`, `lr`, `loss`, `aux`, `tokens_per_s`).
- `checkpoints/step-XXXXXXXX/`: periodic checkpoints, each a complete `training.model.checkpoint`
  directory plus `train_state.pt` (optimizer, step, world size, every rank's RNG states, every data
  shard's activation-stream position including the provenance of its buffered tokens, dead-feature
  counters). A checkpoint is written and fsynced
  under `step-XXXXXXXX.tmp`, then renamed; only complete `step-*` directories count, so a kill at any
  moment (mid-write, mid-rename, mid-cleanup) leaves the last complete checkpoint loadable. `LATEST`
  names the newest for people and scripts; old checkpoints are renamed away before being deleted.
- `clt.safetensors` + `clt.json`: the final CLT (with data description, train config and final metrics).

Re-running the same call after a kill resumes from the newest complete checkpoint and ends with the
same CLT, metrics and optimizer state as a run that was never interrupted (same machine, same thread
count; tested with real SIGKILLs in tests/training/test_resume.py). Kill points for those tests
(`bundle.killpoints`): `train.step` after every optimiser step, `checkpoint.weights_written` (in
`save_checkpoint`, between the weights and their JSON), `checkpoint.state_written` (before the
rename), `checkpoint.renamed` (before `LATEST`), `checkpoint.pruning` (an old checkpoint half gone).

Data parallel (`world`, a `training.distributed.World` of N ranks started by torchrun): the images
are split into S = `data_shards` (default N) disjoint shards, each streamed into its own shuffling
buffer; rank r owns shards r*S/N .. (r+1)*S/N - 1. A step trains on one batch from every shard (the
loss is their mean): each rank backpropagates its shards' share, gradients are summed over ranks
(explicit all-reduce: gloo on CPU, NCCL on CUDA), so every rank keeps the same weights; firing
statistics and BatchTopK thresholds are combined over shards. Rank 0 logs and writes; a checkpoint
gathers every shard's stream and every rank's RNG state. A run resumes only with the world size it
was trained with (tests/training/test_data_parallel.py: real torchrun processes, kills included).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from bundle.atomic import replaced, write_text_atomic
from bundle.killpoints import killpoint

from .activations import ActivationStream
from .cache import ActivationCache, CacheError, CachedActivationStream
from .distributed import World
from .model.backbone import Backbone, BackboneError
from .model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .model.clt import CLTConfig, CrossLayerTranscoder
from .model.loss import CLTLoss, LossConfig, clt_loss
from .model.sharded import ShardedCLT
from .model.vit import TOKEN_SETS, TokenSet

STATE_FILE = "train_state.pt"
LATEST = "LATEST"
METRICS = "metrics.jsonl"


class TrainingError(RuntimeError):
    """A run cannot start or resume (bad configuration, an out dir holding a different run)."""


@dataclass
class TrainConfig:
    """Optimisation and data-streaming settings of one CLT training run.

    Units: `*_tokens` count activation tokens (one token = one image position at all L layers);
    `*_every` and `*_steps` count optimiser steps.
    """

    steps: int
    batch_tokens: int = 4096
    lr: float = 2e-4
    warmup_steps: int = 100
    decay: Literal["cosine", "linear"] = "cosine"
    final_lr_fraction: float = 0.1  # lr decays to this fraction of `lr` at the last step
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    tokens: TokenSet = "all"
    buffer_tokens: int = 65536  # shuffling buffer size
    cls_copies: int = 0  # extra copies of each image's CLS token in the buffer (tokens "all"; see training.activations)
    images_per_batch: int = 32  # images fed to the ViT per refill step
    num_workers: int = 0  # DataLoader workers decoding/preprocessing images
    norm_tokens: int = 16384  # tokens sampled to estimate the normalisation scalars
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    dead_after_tokens: int = 10_000_000  # a feature is dead after not firing for this many tokens
    aux_coef: float = 1 / 32
    aux_k: int = 512
    # CLS AuxK (see training.model.loss): features that fired on no CLS row for `cls_dead_after`
    # CLS rows get an auxiliary loss on the CLS rows; 0 turns it off
    cls_aux_coef: float = 0.0
    cls_aux_k: int = 64
    cls_dead_after: int = 5_000
    sparsity_coef: float = 0.0  # JumpReLU tanh-L0 penalty
    preact_coef: float = 3e-6  # JumpReLU pre-activation loss
    eval_batches: int = 4  # fresh batches scored in eval mode for the final metrics
    buffer_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "in_backward": each decoder tensor is clipped on its own and updated by AdamW as soon as its
    # gradient is complete, then the gradient is freed (saves the decoder's gradient memory, 1.5 GB
    # for ViT-B-32 at F=6144); the other parameters are clipped jointly. "after": one global clip
    # and one AdamW step after backward.
    decoder_update: Literal["in_backward", "after"] = "in_backward"
    # data parallel: the images are split into `data_shards` disjoint shards, each streamed into its own
    # shuffling buffer; one step trains on a batch of `batch_tokens` from every shard (the loss is their
    # mean). 0: one shard per rank. A run with more shards than ranks gives each rank several (so one
    # process can reproduce an N-rank run's global batches).
    data_shards: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        positive = ("steps", "batch_tokens", "buffer_tokens", "images_per_batch", "checkpoint_every", "log_every", "norm_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "eval_batches", "dead_after_tokens", "aux_k", "cls_copies", "cls_dead_after",
                     "data_shards"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be cosine or linear, got {self.decay!r}")
        if self.tokens not in TOKEN_SETS:
            raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {self.tokens!r}")
        if self.cls_copies and self.tokens != "all":
            raise ValueError(f"cls_copies needs tokens='all', got tokens={self.tokens!r}")
        if self.decoder_update not in ("in_backward", "after"):
            raise ValueError(f"decoder_update must be in_backward or after, got {self.decoder_update!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.cls_aux_coef < 0 or self.cls_aux_k < 1:
            raise ValueError(f"cls_aux_coef must be >= 0 and cls_aux_k >= 1, got {self.cls_aux_coef}, {self.cls_aux_k}")
        if self.cls_aux_coef and self.tokens != "all":
            raise ValueError(f"cls_aux_coef needs tokens='all', got tokens={self.tokens!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based): linear warm-up, then decay to final_lr_fraction*lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)
        lo = self.final_lr_fraction * self.lr
        if self.decay == "linear":
            return self.lr + (lo - self.lr) * t
        return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * t))

    def loss_config(self) -> LossConfig:
        """The loss terms' coefficients and widths this run trains with."""
        return LossConfig(aux_k=self.aux_k, aux_coef=self.aux_coef, sparsity_coef=self.sparsity_coef,
                          preact_coef=self.preact_coef, cls_aux_k=self.cls_aux_k, cls_aux_coef=self.cls_aux_coef)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.cls_aux_coef:  # off: its settings fix nothing, and runs recorded before it existed stay comparable
            for name in _CLS_AUX:
                del d[name]
        if not self.data_shards:  # one per rank (the world size is checked on its own on resume)
            del d["data_shards"]
        return d


_CLS_AUX = ("cls_aux_coef", "cls_aux_k", "cls_dead_after")


# ---------------------------------------------------------------------- helpers
# settings a resumed run may change: they decide what is written and when, not what is learned
_BOOKKEEPING = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "num_workers"})


def _recipe_fields(train_config: dict[str, Any]) -> dict[str, Any]:
    """The training settings that fix the result (a JSON round trip, so tuples and lists compare equal)."""
    return {k: v for k, v in json.loads(json.dumps(train_config)).items() if k not in _BOOKKEEPING}


def release_text_tower(backbone: Backbone) -> int:
    """Drop the CLIP text tower's weights (CLT training reads only `backbone.visual`); returns bytes freed.

    Afterwards `backbone.encode_text` / `class_embeddings` no longer work. For training jobs that own
    their backbone (the CLI, the benchmark): about 0.25 GiB for ViT-B-32.
    """
    model = backbone.model
    names = ["text"] if isinstance(getattr(model, "text", None), torch.nn.Module) else [
        "transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection"
    ]
    freed = 0
    for name in names:
        obj = getattr(model, name, None)
        if isinstance(obj, torch.nn.Module):
            freed += sum(p.numel() * p.element_size() for p in obj.parameters())
        elif isinstance(obj, torch.Tensor):
            freed += obj.numel() * obj.element_size()
        else:
            continue
        setattr(model, name, None)
    return freed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _clip_fn(clt: CrossLayerTranscoder | ShardedCLT):
    """Gradient-norm clipping over the full model: a sharded CLT sums its shards' squares over the ranks."""
    return clt.clip_grad_norm_ if isinstance(clt, ShardedCLT) else torch.nn.utils.clip_grad_norm_


def _adamw(params: list[torch.nn.Parameter], weight_decay: float, cfg: "TrainConfig") -> torch.optim.AdamW:
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(params, foreach=True, **kwargs)


class DecoderInBackwardAdamW:
    """AdamW where each decoder tensor W_dec[i] steps inside backward, as soon as its gradient is complete.

    A post-accumulate-grad hook clips that gradient to norm `grad_clip` (per tensor), applies that
    tensor's own AdamW step and frees the gradient, so the decoder's gradients (as large as the
    decoder) never coexist. The other parameters use one AdamW, stepped by `step()` after the
    caller's (joint) clipping. Looks like an optimizer to the trainer: `param_groups`, `zero_grad`,
    `step`, `state_dict`, `load_state_dict`; `close()` removes the hooks.

    Data parallel (`reduce_grad`, summing a gradient over ranks in place): every rank must reduce the
    decoder tensors in the same order, but the order in which backward completes them can differ
    between ranks (their graphs differ where, say, one rank's batch has no CLS row). So tensors are
    reduced and stepped in a fixed order, W_dec[L-1] down to W_dec[0] (the order backward usually
    completes them in): a hook whose tensor is not next keeps its gradient until it is; `finish()`
    (after backward) steps any still waiting.
    """

    def __init__(self, clt: CrossLayerTranscoder | ShardedCLT, cfg: "TrainConfig",
                 reduce_grad: Callable[[torch.Tensor], Any] | None = None) -> None:
        enc = [p for n, p in clt.named_parameters() if p.requires_grad and n.startswith("W_enc")]
        other = [p for n, p in clt.named_parameters() if p.requires_grad and not n.startswith(("W_enc", "W_dec"))]
        self.main = _adamw(enc, cfg.weight_decay, cfg)
        self.main.add_param_group({"params": other, "weight_decay": 0.0})
        self.decoder = [_adamw([p], cfg.weight_decay, cfg) for p in clt.W_dec]
        self.grad_clip = cfg.grad_clip
        self.reduce_grad = reduce_grad
        self._clip = _clip_fn(clt)  # a sharded CLT's per-tensor norm is over all ranks (each runs the hooks in the same order)
        self._params = list(clt.W_dec)
        self._ready = [False] * len(self._params)
        self._next = len(self._params) - 1  # the next decoder tensor to reduce and step (data parallel)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(clt.W_dec)]

    def _step_decoder(self, i: int) -> None:
        p = self._params[i]
        if self.reduce_grad is not None:
            self.reduce_grad(p.grad)
        if self.grad_clip > 0:
            self._clip([p], self.grad_clip)
        self.decoder[i].step()
        p.grad = None

    def _make_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if self.reduce_grad is None:
                self._step_decoder(i)
                return
            self._ready[i] = True
            while self._next >= 0 and self._ready[self._next]:
                self._step_decoder(self._next)
                self._next -= 1

        return hook

    def finish(self) -> None:
        """After backward: step the decoder tensors still waiting for their turn (data parallel only)."""
        if self.reduce_grad is not None:
            while self._next >= 0:
                p = self._params[self._next]
                if p.grad is None:  # every rank takes part in every reduction, in the same order
                    p.grad = torch.zeros_like(p)
                self._step_decoder(self._next)
                self._next -= 1
            self._ready = [False] * len(self._params)
            self._next = len(self._params) - 1

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.main.param_groups, *(g for o in self.decoder for g in o.param_groups)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main.zero_grad(set_to_none=set_to_none)
        for o in self.decoder:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.main.step()

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "decoder": [o.state_dict() for o in self.decoder]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"main", "decoder"}:
            raise TrainingError("the checkpoint's optimizer state was written with decoder_update='after'")
        self.main.load_state_dict(state["main"])
        for o, s in zip(self.decoder, state["decoder"]):
            o.load_state_dict(s)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def make_optimizer(clt: CrossLayerTranscoder | ShardedCLT, cfg: TrainConfig, reduce_grad: Callable[[torch.Tensor], Any] | None = None
                   ) -> torch.optim.Optimizer | DecoderInBackwardAdamW:
    """AdamW over the trainable parameters (weight decay on weight matrices only); see `decoder_update`.
    `reduce_grad` (data parallel): sums a gradient over ranks, for the decoder steps taken inside backward."""
    if cfg.decoder_update == "in_backward":
        return DecoderInBackwardAdamW(clt, cfg, reduce_grad)
    decay, no_decay = [], []
    for name, p in clt.named_parameters():
        if not p.requires_grad:
            continue
        (decay if name.startswith(("W_enc", "W_dec")) else no_decay).append(p)
    opt = _adamw(decay, cfg.weight_decay, cfg)
    opt.add_param_group({"params": no_decay, "weight_decay": 0.0})
    return opt


class Checkpointer:
    """Periodic checkpoints under `out_dir/checkpoints`: `step-XXXXXXXX/` directories, each complete
    (written under a `.tmp` name, fsynced, renamed); `LATEST` names the newest (see the module docstring)."""

    PREFIX = "step-"

    def __init__(self, out_dir: Path, keep: int) -> None:
        self.root = out_dir / "checkpoints"
        self.keep = max(keep, 1)

    def complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            digits = p.name[len(self.PREFIX):]
            if p.is_dir() and p.name.startswith(self.PREFIX) and len(digits) == 8 and digits.isdigit() and (p / STATE_FILE).is_file():
                found.append(p)
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, clt: CrossLayerTranscoder, backbone: Backbone, state: dict[str, Any], **meta: Any) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{self.PREFIX}{step:08d}"
        final = self.root / name
        with replaced(final, fsync=True) as tmp:  # written as step-XXXXXXXX.tmp, fsynced, renamed
            save_checkpoint(tmp, clt, backbone.identity(), step=step, **meta)
            torch.save(state, tmp / STATE_FILE)
            killpoint("checkpoint.state_written")
            if final.exists():  # the same step saved before (a rerun of a finished run): move it aside first
                self._discard(final)
        killpoint("checkpoint.renamed")
        write_text_atomic(self.root / LATEST, name)
        for p in self.complete()[: -self.keep]:
            self._discard(p)
        for p in [*self.root.glob("*.tmp"), *self.root.glob("*.deleting")]:  # leftovers of an interrupted run
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        return final

    def _discard(self, path: Path) -> None:
        """Delete a checkpoint: renamed out of the `step-*` namespace first, so a kill midway never
        leaves a half-deleted directory that looks like a checkpoint."""
        trash = path.with_name(path.name + ".deleting")
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)  # a rename out of the namespace, not a write
        killpoint("checkpoint.pruning")
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------- feature sharding (training/model/sharded.py)
class SharedStream:
    """The activation stream of a feature-sharded run: rank 0 streams, every rank gets the same batches
    (broadcast), so the ViT runs once per batch and the ranks cannot drift apart. Delegates the rest
    (`state_dict`, `description`, ...) to rank 0's stream."""

    def __init__(self, stream: ActivationStream, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.stream, self.device, self.group = stream, torch.device(device), group
        self.lead = dist.get_rank(group) == 0
        self.src = 0 if group is None else dist.get_global_rank(group, 0)
        self.last_cls: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def _broadcast(self, pair: tuple[torch.Tensor, torch.Tensor] | None, cls: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        meta = torch.tensor([*pair[0].shape, cls is not None] if pair is not None else [0, 0, 0, 0], device=self.device)
        dist.broadcast(meta, self.src, group=self.group)
        L, n, d, has_cls = meta.tolist()
        x, y = pair if pair is not None else (torch.empty(L, n, d, device=self.device) for _ in range(2))
        for t in (x, y):
            dist.broadcast(t, self.src, group=self.group)
        if has_cls:
            flag = cls.to(torch.uint8) if cls is not None else torch.empty(n, dtype=torch.uint8, device=self.device)
            dist.broadcast(flag, self.src, group=self.group)
            self.last_cls = flag.bool()
        return x, y

    def peek(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._broadcast(self.stream.peek(n_tokens) if self.lead else None, None)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.stream.next_batch() if self.lead else None
        return self._broadcast(pair, self.stream.last_cls if self.lead else None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.lead:  # restoring refills the buffer through the ViT: only the rank that streams needs it
            self.stream.load_state_dict(state)


def feature_shard_mesh(shards: int) -> tuple[dist.ProcessGroup | None, World]:
    """The 2-D mesh of a feature-sharded run on the N ranks of the default group: N / `shards` replicas of
    `shards` feature shards each. Rank g holds shard g % shards of replica g // shards. Returns (its
    feature-shard group: the ranks of its replica; the data-parallel World of its shard: the same shard
    in every replica, its rank the replica index). Collective (every rank creates every group)."""
    n, g = dist.get_world_size(), dist.get_rank()
    if shards < 1 or n % shards:
        raise TrainingError(f"{n} ranks cannot be split into groups of {shards} feature shards")
    replicas = n // shards
    if replicas == 1:
        return None, World()
    shard_groups = [dist.new_group(list(range(q * shards, (q + 1) * shards))) for q in range(replicas)]
    replica_groups = [dist.new_group(list(range(s, n, shards))) for s in range(shards)]
    return shard_groups[g // shards], World(rank=g // shards, size=replicas, group=replica_groups[g % shards])


def _torch_optimizers(opt: torch.optim.Optimizer | DecoderInBackwardAdamW) -> list[torch.optim.Optimizer]:
    return [opt.main, *opt.decoder] if isinstance(opt, DecoderInBackwardAdamW) else [opt]


def map_optimizer_state(opt: torch.optim.Optimizer | DecoderInBackwardAdamW, state: dict[str, Any],
                        clt: CrossLayerTranscoder | ShardedCLT, fn) -> dict[str, Any]:
    """`state` (an `opt.state_dict()`, or a saved one of the same structure) with every per-parameter state
    tensor t (Adam's moments, not the scalar step) replaced by fn(parameter name, t), in the same order on
    every rank (fn may be a collective)."""
    names = {id(p): n for n, p in clt.named_parameters()}
    is_split = isinstance(opt, DecoderInBackwardAdamW)
    parts = [state["main"], *state["decoder"]] if is_split else [state]
    out = []
    for o, sd in zip(_torch_optimizers(opt), parts):
        order = [names[id(p)] for g in o.param_groups for p in g["params"]]
        new = {i: {k: fn(order[int(i)], v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in per.items()}
               for i, per in sd["state"].items()}
        out.append({**sd, "state": new})
    return {"main": out[0], "decoder": out[1:]} if is_split else out[0]


def _read_metrics(path: Path, upto_step: int) -> list[str]:
    """Lines of metrics.jsonl with step <= upto_step (drops lines logged after the resumed checkpoint)."""
    if not path.is_file():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a half-written last line from a kill
    return keep


@torch.no_grad()
def batch_metrics(clt: CrossLayerTranscoder, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """FVU and L0 per layer of `clt` in eval mode (inference activation rule) on held-out batches."""
    was_training = clt.training
    clt.eval()
    err = var = l0 = None
    n = 0
    for x, y in batches:
        recon, codes = clt(x)
        yc = y - y.mean(1, keepdim=True)
        e, v = (recon - y).pow(2).sum(-1).sum(-1), yc.pow(2).sum(-1).sum(-1)
        z = torch.stack([c.l0().float().sum() for c in codes])
        err, var, l0 = (e, v, z) if err is None else (err + e, var + v, l0 + z)
        n += x.shape[1]
    clt.train(was_training)
    if err is None:
        return {}
    fvu = (err / var.clamp_min(1e-12)).tolist()
    l0s = (l0 / n).tolist()
    return {"fvu": fvu, "fvu_mean": float(np.mean(fvu)), "l0": l0s, "l0_mean": float(np.mean(l0s)), "eval_tokens": n}


# ---------------------------------------------------------------------- training loop
class Batch(NamedTuple):
    """One shard's batch: raw activations x, y [L, N, d] and `cls_rows` [N] bool (None: no CLS marking)."""

    x: torch.Tensor
    y: torch.Tensor
    cls_rows: torch.Tensor | None = None


@dataclass
class StepResult:
    """One optimiser step over every shard's batch: the loss terms (means over shards; `fired` and
    `fired_cls` over all of them), and the tokens and CLS rows it trained on (all ranks together)."""

    loss: CLTLoss
    tokens: int
    cls_rows: int


def _trained_buffer(clt: CrossLayerTranscoder) -> torch.Tensor | None:
    """The buffer the training rule updates as it selects (BatchTopK's thresholds [L]), or None."""
    name = clt.sparsifier.state_name
    return None if name is None or name not in dict(clt.named_buffers()) else getattr(clt, name)


def train_step(
    clt: CrossLayerTranscoder | ShardedCLT,
    opt: torch.optim.Optimizer | DecoderInBackwardAdamW,
    batches: Sequence[Batch],
    dead: torch.Tensor,
    cfg: TrainConfig,
    cls_dead: torch.Tensor | None = None,
    world: World = World(),
    n_shards: int = 1,
) -> StepResult:
    """One optimiser step on this rank's shard batches (bf16 autocast on CUDA).

    `dead` [L, F] marks the features for AuxK, `cls_dead` [L, F] those dead at the CLS token (CLS AuxK,
    `cfg.cls_aux_coef` > 0). The batches' x and y are consumed: they are normalised in place.

    One shard in all (`n_shards` == 1): the loss of that batch, backward, clipping, AdamW, exactly the
    single-process step. Several (data parallel, or one process reproducing it): the loss is the mean
    over all `n_shards` shards; this rank backpropagates its shards' share, the gradients are summed
    over ranks (`world`) before clipping and stepping, BatchTopK's thresholds become the mean of each
    shard's update from the same start, and the returned statistics cover every shard. So all ranks
    hold the same weights and statistics after every step.

    With `DecoderInBackwardAdamW` the decoder tensors are already updated when backward returns;
    clipping and `step()` here cover the remaining parameters (those that still hold a gradient).
    """
    lcfg = cfg.loss_config()
    several = n_shards > 1
    rule = _trained_buffer(clt) if several else None
    start = rule.clone() if rule is not None else None
    ends, losses = [], []
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=batches[0].x.device.type == "cuda"):
        for b in batches:
            if start is not None:
                rule.copy_(start)  # type: ignore[union-attr]
            loss_fn = clt.loss if isinstance(clt, ShardedCLT) else lambda *a, **kw: clt_loss(clt, *a, **kw)
            losses.append(loss_fn(b.x, b.y, lcfg, dead=dead if cfg.aux_coef > 0 else None, cls_rows=b.cls_rows,
                                  cls_dead=cls_dead if cfg.cls_aux_coef > 0 else None, inplace=True))
            if start is not None:
                ends.append(rule.clone())  # type: ignore[union-attr]
    opt.zero_grad(set_to_none=True)
    total = losses[0].total if not several else torch.stack([l.total for l in losses]).sum() / n_shards
    total.float().backward()
    if several:
        if isinstance(opt, DecoderInBackwardAdamW):
            opt.finish()
        for p in clt.parameters():  # a fixed order on every rank
            if p.requires_grad and p.grad is not None:
                world.all_reduce_(p.grad)
        if rule is not None:
            rule.copy_(world.all_reduce_(torch.stack(ends).sum(0)) / n_shards)
    if cfg.grad_clip > 0:
        _clip_fn(clt)([p for p in clt.parameters() if p.grad is not None], cfg.grad_clip)
    opt.step()
    if not several:
        b, loss = batches[0], losses[0]
        return StepResult(loss, b.x.shape[1], int(b.cls_rows.sum()) if b.cls_rows is not None else 0)
    return _combined(losses, batches, world, n_shards)


@torch.no_grad()
def _combined(losses: list[CLTLoss], batches: Sequence[Batch], world: World, n_shards: int) -> StepResult:
    """The step's statistics over every shard of every rank: one all-reduce of the packed sums."""
    L, Fn = losses[0].fired.shape
    dev = losses[0].fired.device
    with_cls = losses[0].fired_cls is not None
    scalars = torch.tensor([[float(l.total.detach()), float(l.aux), float(l.sparsity),
                             float(l.cls_aux) if l.cls_aux is not None else 0.0, float(l.cls_aux is not None),
                             float(b.x.shape[1]), float(b.cls_rows.sum()) if b.cls_rows is not None else 0.0]
                            for l, b in zip(losses, batches)], dtype=torch.float64, device=dev).sum(0)
    parts = [scalars, torch.stack([l.fvu.double() for l in losses]).sum(0), torch.stack([l.l0.double() for l in losses]).sum(0),
             torch.stack([l.fired for l in losses]).any(0).double().reshape(-1)]
    if with_cls:
        parts.append(torch.stack([l.fired_cls for l in losses]).any(0).double().reshape(-1))  # type: ignore[misc]
    packed = world.all_reduce_(torch.cat(parts))
    total, aux, sparsity, cls_aux, n_cls_aux, tokens, cls_rows = packed[:7].tolist()
    fvu, l0 = packed[7 : 7 + L] / n_shards, packed[7 + L : 7 + 2 * L] / n_shards
    fired = packed[7 + 2 * L : 7 + 2 * L + L * Fn].reshape(L, Fn) > 0
    fired_cls = packed[7 + 2 * L + L * Fn :].reshape(L, Fn) > 0 if with_cls else None
    loss = CLTLoss(total=torch.tensor(total / n_shards), fvu=fvu.float(), aux=torch.tensor(aux / n_shards),
                   sparsity=torch.tensor(sparsity / n_shards), l0=l0.float(), fired=fired,
                   cls_aux=torch.tensor(cls_aux / n_cls_aux) if n_cls_aux else None, fired_cls=fired_cls)
    return StepResult(loss, int(tokens), int(cls_rows))


class FiringStats:
    """Firing statistics: tokens since each feature last fired, over all rows and over CLS rows.

    `since` [L, F] counts tokens, `since_cls` [L, F] CLS rows (token set `all`); a feature is dead for
    AuxK after `dead_after_tokens` tokens without firing, dead at the CLS token (CLS AuxK) after
    `cls_dead_after` CLS rows.
    """

    def __init__(self, n_layers: int, n_features: int, device: torch.device) -> None:
        self.since = torch.zeros(n_layers, n_features, dtype=torch.long, device=device)
        self.since_cls = torch.zeros(n_layers, n_features, dtype=torch.long, device=device)

    def dead(self, after_tokens: int) -> torch.Tensor:
        """[L, F] bool."""
        return self.since >= after_tokens

    def cls_dead(self, after_rows: int) -> torch.Tensor:
        """[L, F] bool."""
        return self.since_cls >= after_rows

    def update(self, step: StepResult) -> None:
        """Count one step's tokens and CLS rows, and reset the counters of the features that fired."""
        self.since += step.tokens
        self.since[step.loss.fired] = 0
        if step.loss.fired_cls is not None:
            self.since_cls += step.cls_rows
            self.since_cls[step.loss.fired_cls] = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"since_fired": self.since.cpu(), "since_fired_cls": self.since_cls.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.since.copy_(state["since_fired"].to(self.since.device))
        if "since_fired_cls" in state:
            self.since_cls.copy_(state["since_fired_cls"].to(self.since_cls.device))


class MetricsLog:
    """`metrics.jsonl`: one JSON row per logged step, appended and flushed as it is written. A resumed run
    first drops the rows logged after its checkpoint (atomically), so the file ends as an uninterrupted
    run's would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def start(self, resumed_step: int | None) -> None:
        """Open for appending: empty for a fresh run, cut back to `resumed_step` for a resumed one."""
        lines = [] if resumed_step is None else _read_metrics(self.path, resumed_step)
        write_text_atomic(self.path, "".join(line + "\n" for line in lines))
        self._file = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def metrics_row(step: int, tokens: int, loss: CLTLoss, dead: torch.Tensor, cls_dead: torch.Tensor | None, lr: float,
                tokens_per_s: float) -> dict[str, Any]:
    """One `metrics.jsonl` row (see the module docstring) from the last batch's loss terms."""
    fvu = loss.fvu.float().tolist()
    l0 = loss.l0.float().tolist()
    return {
        "step": step,
        "tokens": tokens,
        "fvu": fvu,
        "fvu_mean": float(np.mean(fvu)),
        "l0": l0,
        "l0_mean": float(np.mean(l0)),
        "dead_fraction": float(dead.float().mean()),
        "dead_fraction_cls": float(cls_dead.float().mean()) if cls_dead is not None else None,
        "lr": lr,
        "loss": float(loss.total.detach()),
        "aux": float(loss.aux),
        "cls_aux": None if loss.cls_aux is None else float(loss.cls_aux),
        "tokens_per_s": tokens_per_s,
    }


@dataclass
class Position:
    """Where a run stands: optimiser steps done and tokens trained on."""

    step: int = 0
    tokens: int = 0


def _shard_states(state: dict[str, Any]) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """(world size, stream state per shard, RNG state per rank) of a `train_state.pt` (a single-process
    run's from before data parallel holds one stream and one RNG state)."""
    if "streams" in state:
        return int(state["world_size"]), list(state["streams"]), list(state["rng"])
    return 1, [state["stream"]], [state["rng"]]


def resume(ckpt: Checkpointer, backbone: Backbone, clt: CrossLayerTranscoder | ShardedCLT, opt: Any,
           streams: dict[int, ActivationStream | SharedStream], firing: FiringStats, cfg: TrainConfig,
           world: World = World()) -> Position | None:
    """Restore a run from `ckpt`'s newest complete checkpoint (the one rank 0 sees) into clt, opt, this
    rank's shard streams (`streams`: shard -> stream), firing statistics and this rank's global RNGs;
    None when there is none. Refuses (TrainingError) a checkpoint made with another CLT config, other
    training settings (bookkeeping settings aside) or another world size."""
    latest = world.broadcast_object(ckpt.latest())
    if latest is None:
        return None
    out = ckpt.root.parent
    try:
        saved, _ = load_checkpoint(latest, backbone, device=clt.b_dec.device)
    except CheckpointError as exc:
        raise TrainingError(f"cannot resume from {latest}: {exc}") from None
    if saved.cfg.to_dict() != clt.cfg.to_dict():
        raise TrainingError(
            f"{out} holds a run with CLT config {saved.cfg.to_dict()}, not {clt.cfg.to_dict()}; "
            f"use another output directory"
        )
    state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
    was, now = (_recipe_fields(c) for c in (state.get("train_config", {}), cfg.to_dict()))
    if was != now:
        changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        raise TrainingError(f"{out} holds a run with other training settings ({', '.join(changed)} differ); "
                            f"use another output directory")
    saved_world, stream_states, rng_states = _shard_states(state)
    if saved_world != world.size:
        raise TrainingError(f"{out} holds a run trained with world size {saved_world}, but this run has world size "
                            f"{world.size}: resume it with {saved_world} processes (torchrun --nproc-per-node "
                            f"{saved_world}) or use another output directory")
    if isinstance(clt, ShardedCLT):  # every rank keeps its slice of the full weights and Adam moments
        clt.load_full_state_dict(saved.state_dict())
        state["optimizer"] = map_optimizer_state(opt, state["optimizer"], clt, lambda n, t: clt.local_slice(n, t).clone())
    else:
        clt.load_state_dict(saved.state_dict())
    opt.load_state_dict(state["optimizer"])
    for shard, stream in streams.items():
        try:
            stream.load_state_dict(stream_states[shard])
        except ValueError as exc:  # another data source (cache vs ViT stream), or a buffer this stream cannot hold
            raise TrainingError(f"cannot resume {out}: {exc}") from None
    firing.load_state_dict(state)
    _set_rng_state(rng_states[world.rank])
    if world.is_main and (not isinstance(clt, ShardedCLT) or clt.rank == 0):
        print(f"resuming from {latest} (step {int(state['step'])} of {cfg.steps})", flush=True)
    return Position(int(state["step"]), int(state["tokens"]))


def train_state(pos: Position, opt: Any, streams: dict[int, ActivationStream | SharedStream], firing: FiringStats,
                cfg: TrainConfig, world: World = World(), clt: CrossLayerTranscoder | ShardedCLT | None = None
                ) -> dict[str, Any] | None:
    """What a checkpoint's `train_state.pt` holds besides the weights (see `resume`): on rank 0, with every
    shard's stream position and every rank's RNG state (gathered: every rank must call this); None elsewhere.
    With a sharded `clt` also a collective of its group: the Adam moments gathered in the unsharded layout."""
    optimizer = opt.state_dict()
    if isinstance(clt, ShardedCLT):
        optimizer = map_optimizer_state(opt, optimizer, clt, clt.gather_full)
    mine = {"streams": {s: stream.state_dict() for s, stream in streams.items()}, "rng": _rng_state()}
    gathered = world.all_gather_object(mine)
    if not world.is_main:
        return None
    shards = {s: st for g in gathered for s, st in g["streams"].items()}
    return {
        "step": pos.step,
        "tokens": pos.tokens,
        "optimizer": optimizer,
        "world_size": world.size,
        "streams": [shards[s] for s in range(len(shards))],
        **firing.state_dict(),
        "rng": [g["rng"] for g in gathered],
        "train_config": cfg.to_dict(),
    }


def shard_of(dataset: Dataset, shard: int, n_shards: int) -> Dataset:
    """Images shard, shard + n_shards, shard + 2 n_shards, ... of `dataset` (the whole of it for one shard)."""
    if n_shards == 1:
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    if n < n_shards:
        raise TrainingError(f"the dataset has {n} images, fewer than the {n_shards} data shards")
    return Subset(dataset, range(shard, n, n_shards))


def make_stream(backbone: Backbone, dataset: Dataset | None, cfg: TrainConfig, shard: int = 0, n_shards: int = 1,
                activations: ActivationCache | None = None) -> ActivationStream:
    """The activation stream `cfg` describes over shard `shard` of `n_shards` of `dataset` (its own seed), or
    over the same shard of the cached images of `activations` (`training.cache.CachedActivationStream`: the
    same order and batches, no ViT pass)."""
    kwargs: dict[str, Any] = dict(
        tokens=cfg.tokens,
        batch_tokens=cfg.batch_tokens,
        buffer_tokens=cfg.buffer_tokens,
        images_per_batch=cfg.images_per_batch,
        seed=cfg.seed + 7919 * shard,
        num_workers=cfg.num_workers,
        dtype=_dtype(cfg.buffer_dtype),
        cls_copies=cfg.cls_copies,
    )
    if activations is not None:
        n = activations.n_images
        if n < n_shards:
            raise TrainingError(f"the activation cache has {n} images, fewer than the {n_shards} data shards")
        try:
            return CachedActivationStream(backbone, activations, images=range(shard, n, n_shards), **kwargs)
        except (CacheError, BackboneError) as exc:
            raise TrainingError(str(exc)) from None
    if dataset is None:
        raise TrainingError("training needs a dataset or an activation cache")
    return ActivationStream(backbone, shard_of(dataset, shard, n_shards), **kwargs)


def train_clt(
    backbone: Backbone,
    dataset: Dataset | None,
    clt_cfg: CLTConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    world: World = World(),
    shard_features: int = 0,
    activations: ActivationCache | None = None,
) -> tuple[CrossLayerTranscoder | ShardedCLT, dict[str, Any]]:
    """Train a CLT on `backbone`'s MLPs over `dataset`; resumes from `out_dir` if a run is there.

    With `activations` (an `ActivationCache` of `backbone`) the tokens are read from the cache instead
    of running the ViT over `dataset` (which may then be None): same order, same batches, the cached
    float16 values (training.cache).

    Data parallel when `world` has several ranks (every rank calls this with the same arguments; see
    the module docstring): rank r streams its data shards, gradients are summed over ranks, rank 0 logs
    and writes. Returns (the trained CLT in eval mode, final metrics: eval-mode `fvu` [L], `fvu_mean`,
    `l0` [L], `l0_mean`, `dead_fraction`, `steps`, `tokens`), on every rank.

    `shard_features` = S > 0: a feature-sharded CLT on the N ranks of the initialised default process
    group (`world` is then ignored): N / S data-parallel replicas of S feature shards each
    (`feature_shard_mesh`). Each rank holds F / S features of every layer (`ShardedCLT`); within a
    replica the first rank streams and broadcasts the batches (`SharedStream`); across replicas the
    data-parallel step above runs within each shard's replica group. Checkpoints hold the model and
    the Adam moments gathered in the unsharded layout, so they resume with any S dividing F and the
    same number of replicas, or (one replica) in one process. Rank 0 alone writes and returns the
    gathered CLT; the others return their `ShardedCLT`.
    """
    cfg = train_cfg
    out = Path(out_dir)
    if shard_features:
        if not dist.is_initialized():
            raise TrainingError("feature sharding needs torch.distributed initialised (run under torchrun)")
        if cfg.cls_aux_coef > 0:
            raise TrainingError("CLS AuxK (cls_aux_coef > 0) is not supported with feature sharding")
        if clt_cfg.n_features % shard_features:
            raise TrainingError(f"{clt_cfg.n_features} features cannot be split evenly over {shard_features} shards")
        lead = dist.get_rank() == 0
        shard_group, world = feature_shard_mesh(shard_features)  # world: the replicas of this rank's shard
    else:
        lead = world.is_main
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    if (clt_cfg.n_layers, clt_cfg.d_model) != (backbone.n_layers, backbone.d_model):
        raise TrainingError(
            f"CLT config has L={clt_cfg.n_layers}, d_model={clt_cfg.d_model} but the backbone "
            f"{backbone.spec.model} has L={backbone.n_layers}, d_model={backbone.d_model}"
        )
    n_shards = cfg.data_shards or world.size
    if n_shards % world.size:
        raise TrainingError(f"data_shards={n_shards} is not a multiple of the world size {world.size}")
    per_rank = n_shards // world.size
    device = backbone.device
    seed_everything(cfg.seed)
    clt = (ShardedCLT(clt_cfg, shard_group) if shard_features else CrossLayerTranscoder(clt_cfg)).to(device).train()
    opt = make_optimizer(clt, cfg, world.all_reduce_ if world.distributed else None)
    streams = {s: make_stream(backbone, dataset, cfg, s, n_shards, activations)
               for s in range(world.rank * per_rank, (world.rank + 1) * per_rank)}
    if activations is not None:
        source, n_images = activations.description(), activations.n_images
    else:
        source = dataset.description() if hasattr(dataset, "description") else {"name": type(dataset).__name__, "size": len(dataset)}  # type: ignore[union-attr, arg-type]
        n_images = len(dataset)  # type: ignore[arg-type]
    if shard_features:
        streams = {s: SharedStream(st, device, shard_group) for s, st in streams.items()}  # type: ignore[misc]
        dist.barrier()  # rank 0 made out_dir; every rank reads the same checkpoints (a shared file system)
    data_desc = {
        **source,
        **next(iter(streams.values())).description(),
        **({"data_shards": n_shards, "images": n_images} if n_shards > 1 else {}),
    }
    firing = FiringStats(clt_cfg.n_layers, clt_cfg.n_features, device)
    ckpt = Checkpointer(out, cfg.keep_checkpoints)
    resumed = resume(ckpt, backbone, clt, opt, streams, firing, cfg, world)
    pos = resumed or Position()
    if resumed is None:
        if world.is_main:  # from shard 0's tokens, whatever the world size
            x, y = streams[0].peek(cfg.norm_tokens)
            clt.fit_normalisation(x, y)
            del x, y
        for t in clt.state_dict().values():  # every rank starts from rank 0's weights
            world.broadcast_(t)
    log = MetricsLog(out / METRICS) if lead else None
    if log is not None:
        log.start(None if resumed is None else pos.step)

    bar = tqdm(total=cfg.steps, initial=pos.step, disable=not progress or not lead, desc="train CLT", dynamic_ncols=True)
    t_start, tokens_start = time.perf_counter(), pos.tokens
    try:
        while pos.step < cfg.steps:
            lr = cfg.lr_at(pos.step)
            for group in opt.param_groups:
                group["lr"] = lr
            batches = []
            for stream in streams.values():
                x, y = stream.next_batch()
                batches.append(Batch(x, y, stream.last_cls if cfg.tokens == "all" else None))
            dead = firing.dead(cfg.dead_after_tokens)
            cls_dead = firing.cls_dead(cfg.cls_dead_after)
            done = train_step(clt, opt, batches, dead, cfg, cls_dead, world, n_shards)
            firing.update(done)
            pos.step += 1
            pos.tokens += done.tokens
            killpoint("train.step")
            bar.update(1)
            if log is not None and (pos.step % cfg.log_every == 0 or pos.step == cfg.steps):
                speed = (pos.tokens - tokens_start) / max(time.perf_counter() - t_start, 1e-9)
                row = metrics_row(pos.step, pos.tokens, done.loss, dead, cls_dead if cfg.tokens == "all" else None, lr, speed)
                log.write(row)
                bar.set_postfix(fvu=f"{row['fvu_mean']:.3f}", l0=f"{row['l0_mean']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if pos.step % cfg.checkpoint_every == 0 or pos.step == cfg.steps:
                state = train_state(pos, opt, streams, firing, cfg, world, clt)
                model = clt.full_clt() if isinstance(clt, ShardedCLT) else clt  # collective when sharded
                if state is not None and lead:
                    ckpt.save(pos.step, model, backbone, state, data=data_desc, train_config=cfg.to_dict())
                if shard_features:
                    dist.barrier()  # no rank runs ahead of a checkpoint that is not yet complete
    finally:
        if log is not None:
            log.close()
        bar.close()
        if isinstance(opt, DecoderInBackwardAdamW):
            opt.close()

    final: dict[str, Any] | None = None
    if world.is_main:  # shard 0's next batches, whatever the world size
        eval_data = [streams[0].next_batch() for _ in range(cfg.eval_batches)]
        final = batch_metrics(clt, eval_data)
        final.update(steps=pos.step, tokens=pos.tokens, dead_fraction=float(firing.dead(cfg.dead_after_tokens).float().mean()))
        model = clt.full_clt() if isinstance(clt, ShardedCLT) else clt  # collective when sharded
        if model is not None:
            save_checkpoint(out, model, backbone.identity(), data=data_desc, train_config=cfg.to_dict(), metrics=final, step=pos.step)
            clt = model
    final = world.broadcast_object(final)
    return clt.eval(), final


def load_trained(out_dir: str | Path, backbone: Backbone | None = None) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """The final CLT of a finished run (a thin alias of `load_checkpoint`, checking the backbone)."""
    return load_checkpoint(out_dir, backbone)


__all__ = ["SharedStream", "map_optimizer_state", "TrainConfig", "TrainingError", "train_clt", "train_step", "make_optimizer", "DecoderInBackwardAdamW", "release_text_tower", "batch_metrics", "load_trained", "Checkpointer"]
