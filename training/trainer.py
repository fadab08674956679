"""Train a cross-layer transcoder on activations streamed from an open_clip ViT.

`train_clt(backbone, dataset, clt_cfg, train_cfg, out_dir)` writes into `out_dir`:

- `metrics.jsonl`: one JSON line every `log_every` steps (`step`, `tokens`, `fvu` [L], `fvu_mean`,
  `l0` [L], `l0_mean`, `dead_fraction`, `lr`, `loss`, `aux`, `tokens_per_s`).
- `checkpoints/step-XXXXXXXX/`: periodic checkpoints, each a complete `training.model.checkpoint`
  directory plus `train_state.pt` (optimizer, step, RNG states, activation-stream position including
  the provenance of the buffered tokens, dead-feature counters). A checkpoint is written and fsynced
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
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from bundle.killpoints import killpoint

from .activations import ActivationStream
from .cache import ActivationCache, CacheError, CachedActivationStream
from .model.backbone import Backbone, BackboneError
from .model.checkpoint import CheckpointError, fsync_tree, load_checkpoint, save_checkpoint
from .model.clt import CLTConfig, CLTLoss, CrossLayerTranscoder
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
    # CLS AuxK (see CrossLayerTranscoder.loss): features that fired on no CLS row for `cls_dead_after`
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

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        positive = ("steps", "batch_tokens", "buffer_tokens", "images_per_batch", "checkpoint_every", "log_every", "norm_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "eval_batches", "dead_after_tokens", "aux_k", "cls_copies", "cls_dead_after"):
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.cls_aux_coef:  # off: its settings fix nothing, and runs recorded before it existed stay comparable
            for name in _CLS_AUX:
                del d[name]
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
    """

    def __init__(self, clt: CrossLayerTranscoder, cfg: "TrainConfig") -> None:
        enc = [p for n, p in clt.named_parameters() if p.requires_grad and n.startswith("W_enc")]
        other = [p for n, p in clt.named_parameters() if p.requires_grad and not n.startswith(("W_enc", "W_dec"))]
        self.main = _adamw(enc, cfg.weight_decay, cfg)
        self.main.add_param_group({"params": other, "weight_decay": 0.0})
        self.decoder = [_adamw([p], cfg.weight_decay, cfg) for p in clt.W_dec]
        self.grad_clip = cfg.grad_clip
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(o)) for p, o in zip(clt.W_dec, self.decoder)]

    def _make_hook(self, opt: torch.optim.Optimizer):
        def hook(p: torch.Tensor) -> None:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p], self.grad_clip)
            opt.step()
            p.grad = None

        return hook

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


def make_optimizer(clt: CrossLayerTranscoder, cfg: TrainConfig) -> torch.optim.Optimizer | DecoderInBackwardAdamW:
    """AdamW over the trainable parameters (weight decay on weight matrices only); see `decoder_update`."""
    if cfg.decoder_update == "in_backward":
        return DecoderInBackwardAdamW(clt, cfg)
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
        final, tmp = self.root / name, self.root / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, clt, backbone.identity(), step=step, **meta)
        torch.save(state, tmp / STATE_FILE)
        fsync_tree(tmp)
        killpoint("checkpoint.state_written")
        if final.exists():  # the same step saved before (a rerun of a finished run): move it aside first
            self._discard(final)
        os.replace(tmp, final)
        fsync_tree(self.root, files=False)
        killpoint("checkpoint.renamed")
        pointer_tmp = self.root / (LATEST + ".tmp")
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.root / LATEST)
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
        os.replace(path, trash)
        killpoint("checkpoint.pruning")
        shutil.rmtree(trash, ignore_errors=True)


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
def train_step(
    clt: CrossLayerTranscoder,
    opt: torch.optim.Optimizer | DecoderInBackwardAdamW,
    x: torch.Tensor,
    y: torch.Tensor,
    dead: torch.Tensor,
    cfg: TrainConfig,
    cls_rows: torch.Tensor | None = None,
    cls_dead: torch.Tensor | None = None,
) -> CLTLoss:
    """One optimiser step on raw activations x, y [L, N, d] (bf16 autocast on CUDA); returns the loss terms.

    `cls_rows` [N] bool marks the CLS-token rows and `cls_dead` [L, F] the features dead at the CLS
    token (for CLS AuxK, `cfg.cls_aux_coef` > 0).

    x and y are consumed: they are normalised in place.

    With `DecoderInBackwardAdamW` the decoder tensors are already updated when backward returns;
    clipping and `step()` here cover the remaining parameters (those that still hold a gradient).
    """
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        loss = clt.loss(
            x,
            y,
            dead_mask=dead if cfg.aux_coef > 0 else None,
            aux_k=cfg.aux_k,
            aux_coef=cfg.aux_coef,
            sparsity_coef=cfg.sparsity_coef,
            preact_coef=cfg.preact_coef,
            cls_rows=cls_rows,
            cls_dead_mask=cls_dead if cfg.cls_aux_coef > 0 else None,
            cls_aux_k=cfg.cls_aux_k,
            cls_aux_coef=cfg.cls_aux_coef,
            inplace=True,
        )
    opt.zero_grad(set_to_none=True)
    loss.total.float().backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in clt.parameters() if p.grad is not None], cfg.grad_clip)
    opt.step()
    return loss


def train_clt(
    backbone: Backbone,
    dataset: Dataset | None,
    clt_cfg: CLTConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    activations: ActivationCache | None = None,
) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """Train a CLT on `backbone`'s MLPs over `dataset`; resumes from `out_dir` if a run is there.

    With `activations` (an `ActivationCache` of `backbone`) the tokens are read from the cache instead
    of running the ViT over `dataset` (which may then be None): same order, same batches, the cached
    float16 values (training.cache).

    Returns (the trained CLT in eval mode, final metrics: eval-mode `fvu` [L], `fvu_mean`, `l0` [L],
    `l0_mean`, `dead_fraction`, `steps`, `tokens`).
    """
    cfg = train_cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (clt_cfg.n_layers, clt_cfg.d_model) != (backbone.n_layers, backbone.d_model):
        raise TrainingError(
            f"CLT config has L={clt_cfg.n_layers}, d_model={clt_cfg.d_model} but the backbone "
            f"{backbone.spec.model} has L={backbone.n_layers}, d_model={backbone.d_model}"
        )
    device = backbone.device
    seed_everything(cfg.seed)
    clt = CrossLayerTranscoder(clt_cfg).to(device).train()
    opt = make_optimizer(clt, cfg)
    stream_kwargs: dict[str, Any] = dict(
        tokens=cfg.tokens,
        batch_tokens=cfg.batch_tokens,
        buffer_tokens=cfg.buffer_tokens,
        images_per_batch=cfg.images_per_batch,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        dtype=_dtype(cfg.buffer_dtype),
        cls_copies=cfg.cls_copies,
    )
    if activations is not None:
        try:
            stream: ActivationStream = CachedActivationStream(backbone, activations, **stream_kwargs)
        except (CacheError, BackboneError) as exc:
            raise TrainingError(str(exc)) from None
        source = activations.description()
    elif dataset is None:
        raise TrainingError("train_clt needs a dataset or an activation cache")
    else:
        stream = ActivationStream(backbone, dataset, **stream_kwargs)
        source = dataset.description() if hasattr(dataset, "description") else {"name": type(dataset).__name__, "size": len(dataset)}  # type: ignore[arg-type]
    data_desc = {**source, **stream.description()}
    L, Fn = clt_cfg.n_layers, clt_cfg.n_features
    since_fired = torch.zeros(L, Fn, dtype=torch.long, device=device)
    since_fired_cls = torch.zeros(L, Fn, dtype=torch.long, device=device)  # CLS rows since the feature fired on one
    ckpt = Checkpointer(out, cfg.keep_checkpoints)
    metrics_path = out / METRICS
    step, tokens_seen = 0, 0

    latest = ckpt.latest()
    if latest is not None:
        try:
            saved, meta = load_checkpoint(latest, backbone, device=device)
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume from {latest}: {exc}") from None
        if saved.cfg.to_dict() != clt_cfg.to_dict():
            raise TrainingError(
                f"{out} holds a run with CLT config {saved.cfg.to_dict()}, not {clt_cfg.to_dict()}; "
                f"use another output directory"
            )
        clt.load_state_dict(saved.state_dict())
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
        was, now = (_recipe_fields(c) for c in (state.get("train_config", {}), cfg.to_dict()))
        if was != now:
            changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            raise TrainingError(f"{out} holds a run with other training settings ({', '.join(changed)} differ); "
                                f"use another output directory")
        opt.load_state_dict(state["optimizer"])
        try:
            stream.load_state_dict(state["stream"])
        except ValueError as exc:  # another data source (cache vs ViT stream), or a buffer this stream cannot hold
            raise TrainingError(f"cannot resume {out}: {exc}") from None
        since_fired.copy_(state["since_fired"].to(device))
        if "since_fired_cls" in state:
            since_fired_cls.copy_(state["since_fired_cls"].to(device))
        _set_rng_state(state["rng"])
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        lines = _read_metrics(metrics_path, step)
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, metrics_path)
        print(f"resuming from {latest} (step {step} of {cfg.steps})", flush=True)
    else:
        metrics_path.write_text("")
        x, y = stream.peek(cfg.norm_tokens)
        clt.fit_normalisation(x, y)
        del x, y

    def state_now() -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens_seen,
            "optimizer": opt.state_dict(),
            "stream": stream.state_dict(),
            "since_fired": since_fired.cpu(),
            "since_fired_cls": since_fired_cls.cpu(),
            "rng": _rng_state(),
            "train_config": cfg.to_dict(),
        }

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train CLT", dynamic_ncols=True)
    t_start, tokens_start = time.perf_counter(), tokens_seen
    log_file = open(metrics_path, "a")
    try:
        while step < cfg.steps:
            lr = cfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = stream.next_batch()
            dead = since_fired >= cfg.dead_after_tokens
            cls_rows = stream.last_cls if cfg.tokens == "all" else None
            cls_dead = since_fired_cls >= cfg.cls_dead_after
            loss = train_step(clt, opt, x, y, dead, cfg, cls_rows, cls_dead)
            since_fired += x.shape[1]
            since_fired[loss.fired] = 0
            if cls_rows is not None and loss.fired_cls is not None:
                since_fired_cls += int(cls_rows.sum())
                since_fired_cls[loss.fired_cls] = 0
            step += 1
            tokens_seen += x.shape[1]
            killpoint("train.step")
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                fvu = loss.fvu.float().tolist()
                l0 = loss.l0.float().tolist()
                elapsed = time.perf_counter() - t_start
                row = {
                    "step": step,
                    "tokens": tokens_seen,
                    "fvu": fvu,
                    "fvu_mean": float(np.mean(fvu)),
                    "l0": l0,
                    "l0_mean": float(np.mean(l0)),
                    "dead_fraction": float(dead.float().mean()),
                    "dead_fraction_cls": float(cls_dead.float().mean()) if cls_rows is not None else None,
                    "lr": lr,
                    "loss": float(loss.total.detach()),
                    "aux": float(loss.aux),
                    "cls_aux": None if loss.cls_aux is None else float(loss.cls_aux),
                    "tokens_per_s": (tokens_seen - tokens_start) / max(elapsed, 1e-9),
                }
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.set_postfix(fvu=f"{row['fvu_mean']:.3f}", l0=f"{row['l0_mean']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                ckpt.save(step, clt, backbone, state_now(), data=data_desc, train_config=cfg.to_dict())
    finally:
        log_file.close()
        bar.close()
        if isinstance(opt, DecoderInBackwardAdamW):
            opt.close()

    eval_data = [stream.next_batch() for _ in range(cfg.eval_batches)]
    final = batch_metrics(clt, eval_data)
    final.update(
        steps=step,
        tokens=tokens_seen,
        dead_fraction=float((since_fired >= cfg.dead_after_tokens).float().mean()),
    )
    save_checkpoint(out, clt, backbone.identity(), data=data_desc, train_config=cfg.to_dict(), metrics=final, step=step)
    return clt.eval(), final


def load_trained(out_dir: str | Path, backbone: Backbone | None = None) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """The final CLT of a finished run (a thin alias of `load_checkpoint`, checking the backbone)."""
    return load_checkpoint(out_dir, backbone)


__all__ = ["TrainConfig", "TrainingError", "train_clt", "train_step", "make_optimizer", "DecoderInBackwardAdamW", "release_text_tower", "batch_metrics", "load_trained", "Checkpointer"]
