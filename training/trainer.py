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

from bundle.atomic import replaced, write_text_atomic
from bundle.killpoints import killpoint

from .activations import ActivationStream
from .cache import ActivationCache, CacheError, CachedActivationStream
from .model.backbone import Backbone, BackboneError
from .model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .model.clt import CLTConfig, CrossLayerTranscoder
from .model.loss import CLTLoss, LossConfig, clt_loss
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

    def loss_config(self) -> LossConfig:
        """The loss terms' coefficients and widths this run trains with."""
        return LossConfig(aux_k=self.aux_k, aux_coef=self.aux_coef, sparsity_coef=self.sparsity_coef,
                          preact_coef=self.preact_coef, cls_aux_k=self.cls_aux_k, cls_aux_coef=self.cls_aux_coef)

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
        loss = clt_loss(clt, x, y, cfg.loss_config(), dead=dead if cfg.aux_coef > 0 else None, cls_rows=cls_rows,
                        cls_dead=cls_dead if cfg.cls_aux_coef > 0 else None, inplace=True)
    opt.zero_grad(set_to_none=True)
    loss.total.float().backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in clt.parameters() if p.grad is not None], cfg.grad_clip)
    opt.step()
    return loss


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

    def update(self, loss: CLTLoss, n_tokens: int, cls_rows: torch.Tensor | None) -> None:
        """Count one batch of `n_tokens` tokens (`cls_rows` [N] bool marks its CLS rows) and reset what fired."""
        self.since += n_tokens
        self.since[loss.fired] = 0
        if cls_rows is not None and loss.fired_cls is not None:
            self.since_cls += int(cls_rows.sum())
            self.since_cls[loss.fired_cls] = 0

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


def resume(ckpt: Checkpointer, backbone: Backbone, clt: CrossLayerTranscoder, opt: Any, stream: ActivationStream,
           firing: FiringStats, cfg: TrainConfig) -> Position | None:
    """Restore a run from `ckpt`'s newest complete checkpoint into clt, opt, stream, firing statistics and
    the global RNGs; None when there is none. Refuses (TrainingError) a checkpoint made with another CLT
    config or other training settings (bookkeeping settings aside)."""
    latest = ckpt.latest()
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
    firing.load_state_dict(state)
    _set_rng_state(state["rng"])
    print(f"resuming from {latest} (step {int(state['step'])} of {cfg.steps})", flush=True)
    return Position(int(state["step"]), int(state["tokens"]))


def train_state(pos: Position, opt: Any, stream: ActivationStream, firing: FiringStats, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint's `train_state.pt` holds besides the weights (see `resume`)."""
    return {
        "step": pos.step,
        "tokens": pos.tokens,
        "optimizer": opt.state_dict(),
        "stream": stream.state_dict(),
        **firing.state_dict(),
        "rng": _rng_state(),
        "train_config": cfg.to_dict(),
    }


def make_stream(backbone: Backbone, dataset: Dataset | None, cfg: TrainConfig,
                activations: ActivationCache | None = None) -> ActivationStream:
    """The activation stream `cfg` describes over `dataset`, or over the cached rows of `activations`
    (`training.cache.CachedActivationStream`: the same order and batches, no ViT pass)."""
    kwargs: dict[str, Any] = dict(
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
            return CachedActivationStream(backbone, activations, **kwargs)
        except (CacheError, BackboneError) as exc:
            raise TrainingError(str(exc)) from None
    if dataset is None:
        raise TrainingError("training needs a dataset or an activation cache")
    return ActivationStream(backbone, dataset, **kwargs)


def data_description(dataset: Dataset | None, stream: ActivationStream, activations: ActivationCache | None = None) -> dict[str, Any]:
    """What a checkpoint records about the training data: the source's description and the stream's settings."""
    if activations is not None:
        source = activations.description()
    elif hasattr(dataset, "description"):
        source = dataset.description()  # type: ignore[union-attr]
    else:
        source = {"name": type(dataset).__name__, "size": len(dataset)}  # type: ignore[arg-type]
    return {**source, **stream.description()}


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
    stream = make_stream(backbone, dataset, cfg, activations)
    data_desc = data_description(dataset, stream, activations)
    firing = FiringStats(clt_cfg.n_layers, clt_cfg.n_features, device)
    ckpt = Checkpointer(out, cfg.keep_checkpoints)
    log = MetricsLog(out / METRICS)
    resumed = resume(ckpt, backbone, clt, opt, stream, firing, cfg)
    pos = resumed or Position()
    if resumed is None:
        x, y = stream.peek(cfg.norm_tokens)
        clt.fit_normalisation(x, y)
        del x, y
    log.start(None if resumed is None else pos.step)

    bar = tqdm(total=cfg.steps, initial=pos.step, disable=not progress, desc="train CLT", dynamic_ncols=True)
    t_start, tokens_start = time.perf_counter(), pos.tokens
    try:
        while pos.step < cfg.steps:
            lr = cfg.lr_at(pos.step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = stream.next_batch()
            dead = firing.dead(cfg.dead_after_tokens)
            cls_rows = stream.last_cls if cfg.tokens == "all" else None
            cls_dead = firing.cls_dead(cfg.cls_dead_after)
            loss = train_step(clt, opt, x, y, dead, cfg, cls_rows, cls_dead)
            firing.update(loss, x.shape[1], cls_rows)
            pos.step += 1
            pos.tokens += x.shape[1]
            killpoint("train.step")
            bar.update(1)
            if pos.step % cfg.log_every == 0 or pos.step == cfg.steps:
                speed = (pos.tokens - tokens_start) / max(time.perf_counter() - t_start, 1e-9)
                row = metrics_row(pos.step, pos.tokens, loss, dead, cls_dead if cls_rows is not None else None, lr, speed)
                log.write(row)
                bar.set_postfix(fvu=f"{row['fvu_mean']:.3f}", l0=f"{row['l0_mean']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if pos.step % cfg.checkpoint_every == 0 or pos.step == cfg.steps:
                ckpt.save(pos.step, clt, backbone, train_state(pos, opt, stream, firing, cfg), data=data_desc,
                          train_config=cfg.to_dict())
    finally:
        log.close()
        bar.close()
        if isinstance(opt, DecoderInBackwardAdamW):
            opt.close()

    eval_data = [stream.next_batch() for _ in range(cfg.eval_batches)]
    final = batch_metrics(clt, eval_data)
    final.update(steps=pos.step, tokens=pos.tokens, dead_fraction=float(firing.dead(cfg.dead_after_tokens).float().mean()))
    save_checkpoint(out, clt, backbone.identity(), data=data_desc, train_config=cfg.to_dict(), metrics=final, step=pos.step)
    return clt.eval(), final


def load_trained(out_dir: str | Path, backbone: Backbone | None = None) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """The final CLT of a finished run (a thin alias of `load_checkpoint`, checking the backbone)."""
    return load_checkpoint(out_dir, backbone)


__all__ = ["TrainConfig", "TrainingError", "train_clt", "train_step", "make_optimizer", "DecoderInBackwardAdamW", "release_text_tower", "batch_metrics", "load_trained", "Checkpointer"]
