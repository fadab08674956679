"""Memory plan of a CLT training run (`cltvit-train --plan`): what one rank holds, from the architecture's
config alone (open_clip model configs; no weights are loaded or allocated).

For a ViT with L blocks of width d and T tokens, a CLT with F features per layer, N_r tokens per step
on a rank and S feature shards (S = world size with `--shard-features`, else 1), in bytes per rank:

- parameters (fp32, 4 bytes each), the same tensors `CrossLayerTranscoder` allocates:
  `W_enc` L*d*F, `b_enc` L*F, `log_threshold` L*F, `W_dec` sum_i n_i*F*d (n_i = L - i cross-layer,
  so L(L+1)/2 blocks; 1 per-layer), `b_dec` L*d; feature-sharded tensors hold F/S features per rank,
  `b_dec` and the 3L buffer scalars are replicated.
- gradients (fp32) of the trainable parameters (`log_threshold` only with JumpReLU). With
  `decoder_update="in_backward"` (the default) each decoder tensor `W_dec[i]` is stepped and its
  gradient freed as soon as it is complete, so at most the largest one, `W_dec[0]` (n_0*F/S*d), is
  held at a time; with `"after"` every gradient is.
- Adam (AdamW) moments: 2 fp32 values per trainable parameter.
- training activations (fp32, an estimate of the live tensors at the peak of one step):
  the batch x, y (2*L*N_r*d), the reconstruction, its residual and gradient (3*L*N_r*d), one layer's
  pre-activations (N_r*F/S, made and freed per layer; with S > 1 also the all-gathered top-k
  candidates N_r*k*S), and the selected features of every layer (L*N_r*(k + aux_k) entries of
  20 bytes: int64 index, value, activation, gradient; aux_k counts when AuxK is on, the worst case
  where every layer has dead features).
- the shuffling buffer (`training.activations`, on the training device): (buffer_tokens +
  images_per_batch * tokens per image) rows of 2*L*d values in the buffer dtype.
- the ViT (streaming only; none when training from an activation cache): its vision-tower weights
  (fp32) and one no-grad forward over images_per_batch images (the widest live tensors of a block,
  the attention scores, and the captured MLP inputs/outputs of every layer, twice: capture and copy).

Not counted: the CUDA context and allocator slack (budget ~1-2 GiB per GPU), the optimiser's
per-tensor step counters, the host-side copies of checkpoints.

Data parallel (no feature sharding; `cltvit-train --nproc N`): each rank holds the whole CLT, its own
image shard's shuffling buffer, and trains on a batch of `--batch-tokens` tokens from that shard (the
global batch is N x batch_tokens). Feature sharding (`--shard-features`): every rank holds F/world
features and sees the whole batch of batch_tokens tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import open_clip

from .model.backbone import register_project_configs

GiB = 2**30
SELECTED_BYTES = 20  # per selected (token, feature): int64 index + value + activation + gradient (fp32)
_BUFFER_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ValueError):
    """The plan cannot be made (unknown architecture, a config this estimate does not model)."""


@dataclass(frozen=True)
class VitShape:
    """The vision tower's shape as its open_clip config gives it."""

    model: str
    layers: int
    width: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    embed_dim: int

    @property
    def tokens(self) -> int:
        """T: patches plus the CLS token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_open_clip(cls, model: str) -> "VitShape":
        register_project_configs()
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise PlanError(f"unknown open_clip architecture {model!r} (e.g. ViT-B-32, ViT-L-14, cltvit-tiny)")
        v = cfg.get("vision_cfg", {})
        if v.get("timm_model_name") or not isinstance(v.get("layers", 12), int):
            raise PlanError(f"{model} is not a plain open_clip ViT (timm or ResNet vision tower)")
        unsupported = [k for k in ("attentional_pool", "ls_init_value", "no_ln_pre", "block_type") if v.get(k)]
        if unsupported:
            raise PlanError(f"{model}: the plan does not model {', '.join(unsupported)}")
        width = int(v.get("width", 768))
        size = v.get("image_size", 224)
        if not isinstance(size, int):
            if size[0] != size[1]:
                raise PlanError(f"{model}: non-square images {size} are not modelled")
            size = size[0]
        return cls(model=model, layers=int(v.get("layers", 12)), width=width, heads=width // int(v.get("head_width", 64)),
                   mlp_width=int(width * float(v.get("mlp_ratio", 4.0))), patch_size=int(v.get("patch_size", 16)),
                   image_size=int(size), embed_dim=int(cfg["embed_dim"]))

    def parameters(self) -> int:
        """Parameters of open_clip's VisionTransformer with this shape (patch conv without bias, CLS and
        position embeddings, ln_pre, L residual attention blocks, ln_post, projection)."""
        d, h = self.width, self.mlp_width
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
        return 3 * self.patch_size**2 * d + d + self.tokens * d + 2 * d + self.layers * block + 2 * d + d * self.embed_dim


def clt_parameter_counts(layers: int, d_model: int, n_features: int, cross_layer: bool = True) -> dict[str, int]:
    """Elements of each parameter tensor family of a `CrossLayerTranscoder` (all ranks together)."""
    L, d, F = layers, d_model, n_features
    blocks = L * (L + 1) // 2 if cross_layer else L
    return {"W_enc": L * d * F, "b_enc": L * F, "log_threshold": L * F, "W_dec": blocks * F * d, "b_dec": L * d}


@dataclass
class MemoryPlan:
    """Bytes per rank of one training run (see the module docstring for what each term counts)."""

    model: str
    layers: int
    d_model: int
    tokens_per_image: int
    n_features: int
    k: int
    activation: str
    cross_layer: bool
    batch_tokens: int
    world_size: int
    shard_features: int  # feature shards S (0: none); N / S data-parallel replicas
    tokens_per_rank: int
    features_per_rank: int
    clt_parameters: int  # all ranks together
    parameters_per_rank: int
    trainable_per_rank: int
    bytes: dict[str, int] = field(default_factory=dict)  # parameters, gradients, adam, activations, buffer, vit
    device_memory_gib: float | None = None

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_gib is None else self.total <= self.device_memory_gib * GiB

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def plan_memory(
    model: str | VitShape,
    n_features: int,
    k: int,
    batch_tokens: int,
    *,
    world_size: int = 1,
    shard_features: bool | int = False,
    activation: Literal["topk", "batchtopk", "jumprelu", "relu"] = "topk",
    cross_layer: bool = True,
    aux_k: int = 512,
    aux: bool = True,
    decoder_update: Literal["in_backward", "after"] = "in_backward",
    tokens: Literal["all", "cls", "patches"] = "all",
    cls_copies: int = 0,
    buffer_tokens: int = 65536,
    buffer_dtype: str = "float32",
    images_per_batch: int = 32,
    stream: bool = True,
    device_memory_gib: float | None = None,
) -> MemoryPlan:
    """The memory plan of a run; `stream=False` for a run from an activation cache (no ViT on the device)."""
    shape = model if isinstance(model, VitShape) else VitShape.from_open_clip(model)
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")
    # True or -1 (the CLI's bare --shard-features): every rank is a shard; S: N / S data-parallel replicas of S shards
    shards = (world_size if shard_features is True or shard_features == -1 else int(shard_features)) if shard_features else 1
    if world_size % shards:
        raise PlanError(f"--shard-features {shards}: the world size {world_size} is not divisible by it")
    if n_features % shards:
        raise PlanError(f"--shard-features over {shards} ranks needs F divisible by {shards}, got F={n_features}")
    if buffer_dtype not in _BUFFER_BYTES:
        raise PlanError(f"buffer dtype must be one of {', '.join(_BUFFER_BYTES)}, got {buffer_dtype!r}")
    L, d, T = shape.layers, shape.width, shape.tokens
    F_r = n_features // shards
    N_r = batch_tokens  # data parallel: a batch from each rank's own shard; feature-sharded: the whole batch on every rank
    counts = clt_parameter_counts(L, d, n_features, cross_layer)
    sharded = {name: n // shards for name, n in counts.items() if name != "b_dec"}
    per_rank = sum(sharded.values()) + counts["b_dec"]
    trainable = per_rank - (0 if activation == "jumprelu" else sharded["log_threshold"])
    largest_decoder = (L if cross_layer else 1) * F_r * d
    held_grads = trainable if decoder_update == "after" else trainable - sharded["W_dec"] + largest_decoder
    sparse = activation in ("topk", "batchtopk")
    selected = k + (aux_k if sparse and aux else 0) if sparse else F_r  # dense rules keep every pre-activation
    activations = 4 * (5 * L * N_r * d + N_r * F_r + (N_r * k * shards if shards > 1 else 0)) + SELECTED_BYTES * L * N_r * selected
    tpi = {"all": T, "cls": 1, "patches": T - 1}[tokens] + cls_copies
    capacity = max(buffer_tokens, 2 * N_r) + images_per_batch * tpi
    buffer = capacity * 2 * L * d * _BUFFER_BYTES[buffer_dtype]
    vit = 0
    if stream:
        B = images_per_batch
        forward = 4 * (B * T * (4 * d + shape.mlp_width) + B * shape.heads * T * T)
        captured = 2 * (2 * L * B * (tpi - cls_copies) * d * 4)
        vit = 4 * shape.parameters() + forward + captured
    nbytes = {
        "parameters": 4 * per_rank + 4 * 3 * L,
        "gradients": 4 * held_grads,
        "adam": 8 * trainable,
        "activations": activations,
        "buffer": buffer,
        "vit": vit,
    }
    return MemoryPlan(model=shape.model, layers=L, d_model=d, tokens_per_image=T, n_features=n_features, k=k,
                      activation=activation, cross_layer=cross_layer, batch_tokens=batch_tokens, world_size=world_size,
                      shard_features=shards if shards > 1 else 0, tokens_per_rank=N_r, features_per_rank=F_r,
                      clt_parameters=sum(counts.values()), parameters_per_rank=per_rank, trainable_per_rank=trainable,
                      bytes=nbytes, device_memory_gib=device_memory_gib)


_LABELS = {
    "parameters": "CLT parameters (fp32)",
    "gradients": "gradients (fp32)",
    "adam": "Adam moments (fp32)",
    "activations": "training activations",
    "buffer": "shuffling buffer",
    "vit": "ViT weights + forward",
}


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def render_plan(p: MemoryPlan, decoder_update: str = "in_backward") -> str:
    """The plan as the CLI prints it."""
    mode = (f"features sharded over {p.shard_features} ranks ({p.features_per_rank} per rank), the whole batch on each"
            + (f"; {p.world_size // p.shard_features} data-parallel replicas" if p.world_size > p.shard_features else "")
            if p.shard_features else
            f"data parallel over {p.world_size} ranks, {p.tokens_per_rank} tokens per rank per step (global batch "
            f"{p.world_size * p.tokens_per_rank})" if p.world_size > 1 else "one rank")
    lines = [
        f"{p.model}: L={p.layers}, d={p.d_model}, T={p.tokens_per_image}; CLT F={p.n_features}, k={p.k}, {p.activation}, "
        f"{'cross-layer' if p.cross_layer else 'per-layer'}; --batch-tokens {p.batch_tokens}; {mode}",
        f"CLT parameters: {p.clt_parameters:,} in all, {p.parameters_per_rank:,} per rank ({p.trainable_per_rank:,} trainable)",
        "",
        "per rank:",
    ]
    notes = {"gradients": "decoder stepped in backward: at most W_dec[0]'s gradient" if decoder_update == "in_backward" else "all at once",
             "vit": "none: trained from an activation cache" if not p.bytes["vit"] else "streaming"}
    for key, label in _LABELS.items():
        note = f"  ({notes[key]})" if key in notes else ""
        lines.append(f"  {label:<24} {_gib(p.bytes[key]):>14}{note}")
    lines.append(f"  {'total':<24} {_gib(p.total):>14}")
    if p.device_memory_gib is not None:
        spare = p.device_memory_gib * GiB - p.total
        verdict = (f"fits ({_gib(int(spare))} to spare; CUDA context and allocator slack not counted)" if p.fits
                   else f"does NOT fit (short by {_gib(int(-spare))})")
        lines.append(f"device memory {p.device_memory_gib:g} GiB: {verdict}")
    return "\n".join(lines)


__all__ = ["MemoryPlan", "PlanError", "VitShape", "clt_parameter_counts", "plan_memory", "render_plan"]
