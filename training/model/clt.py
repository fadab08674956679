"""The cross-layer transcoder (CLT): sparse encoders per layer, decoders from each layer to all later ones.

Shapes (L layers, d = d_model, F features per layer, N tokens, k active features per token):

- `W_enc`  [L, d, F], `b_enc` [L, F]: the encoder of layer l reads that layer's MLP input (LN2 output).
- `W_dec[i]` [n_i, F, d] for source layer i, where n_i = L - i (cross-layer: targets i..L-1) or
  n_i = 1 (per-layer transcoder, `cross_layer=False`: target i only). `W_dec[i][j - i]` [F, d] is
  the decoder from source i to target j. Target-major, so every (source, target) block is a
  contiguous [F, d] matrix that stays in cache while the N*k active rows are gathered from it
  (checkpoints written with the earlier [F, n_i, d] layout are converted on load).
- `b_dec`  [L, d]: decoder bias of each target layer.
- `log_threshold` [L, F]: JumpReLU thresholds (log scale); `batchtopk_threshold` [L]: BatchTopK's
  per-token inference threshold, a running mean of the smallest activation kept in training. The
  activation rule itself is `self.sparsifier` (`training.model.sparsifiers`); these tensors are its
  per-layer state, kept on the CLT so that checkpoints hold them.
- `in_scale`, `out_scale` [L]: scalar normalisation estimated from data. The encoder sees
  `x / in_scale[l]`; decoded outputs are multiplied by `out_scale[j]`. All public methods take and
  return raw (unnormalised) activations; normalised space is internal (`decode_source`; the training
  loss, `training.model.loss`).

Reconstruction of target layer j: `mlp_out_j ~= out_scale[j] * (sum_{i<=j} a_i @ W_dec[i][j-i] + b_dec[j])`.
Decoding never forms a dense [N, F] x [F, d] product: active features are gathered (`sparse_decode`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from .sparse import sparse_decode
from .sparsifiers import BatchTopK, JumpReLU, ReLU, Selection, SparseCode, Sparsifier, TopK

Activation = Literal["topk", "batchtopk", "jumprelu", "relu"]


@dataclass
class CLTConfig:
    """Hyper-parameters that fix a CLT's architecture and activation rule."""

    n_layers: int
    d_model: int
    n_features: int
    activation: Activation = "topk"
    k: int = 32
    cross_layer: bool = True
    k_cap: int = 0  # inference cap on active features for batchtopk/jumprelu/relu (0: 4k, or F for relu)
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001

    def __post_init__(self) -> None:
        if self.activation not in ("topk", "batchtopk", "jumprelu", "relu"):
            raise ValueError(f"activation must be topk, batchtopk, jumprelu or relu, got {self.activation!r}")
        for name in ("n_layers", "d_model", "n_features", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.n_features:
            raise ValueError(f"k={self.k} exceeds n_features={self.n_features}")

    @property
    def inference_k(self) -> int:
        """Width of the padded sparse code at inference (fixed, so exported graphs have static shapes)."""
        if self.activation == "topk":
            return self.k
        if self.k_cap:
            return min(self.k_cap, self.n_features)
        return self.n_features if self.activation == "relu" else min(4 * self.k, self.n_features)

    def n_targets(self, source: int) -> int:
        return self.n_layers - source if self.cross_layer else 1

    def sparsifier(self) -> Sparsifier:
        """The activation rule's object (see `training.model.sparsifiers`)."""
        if self.activation == "topk":
            return TopK(self.k)
        if self.activation == "batchtopk":
            return BatchTopK(self.k, self.inference_k)
        if self.activation == "jumprelu":
            return JumpReLU(self.inference_k, self.jumprelu_bandwidth)
        return ReLU(self.inference_k)

    def to_dict(self) -> dict:
        return asdict(self)


def register_parameters(module: nn.Module, cfg: CLTConfig, n_features: int) -> None:
    """Register a CLT's parameters and buffers on `module`, with `n_features` features per layer (all
    of them, or one feature shard's): W_enc [L, d, F], b_enc [L, F], W_dec[i] [n_targets(i), F, d],
    b_dec [L, d], log_threshold [L, F] (trained under JumpReLU only); buffers batchtopk_threshold,
    in_scale, out_scale [L]. Registration order is the state dict's and the optimizer's order."""
    L, d = cfg.n_layers, cfg.d_model
    module.W_enc = nn.Parameter(torch.empty(L, d, n_features))
    module.b_enc = nn.Parameter(torch.zeros(L, n_features))
    module.W_dec = nn.ParameterList([nn.Parameter(torch.empty(cfg.n_targets(i), n_features, d)) for i in range(L)])
    module.b_dec = nn.Parameter(torch.zeros(L, d))
    module.log_threshold = nn.Parameter(
        torch.full((L, n_features), math.log(cfg.jumprelu_init_threshold)), requires_grad=cfg.activation == "jumprelu"
    )
    module.register_buffer("batchtopk_threshold", torch.zeros(L))
    module.register_buffer("in_scale", torch.ones(L))
    module.register_buffer("out_scale", torch.ones(L))


class CrossLayerTranscoder(nn.Module):
    """Sparse replacement for all MLP blocks of a ViT. See the module docstring for shapes."""

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sparsifier = cfg.sparsifier()
        register_parameters(self, cfg, cfg.n_features)
        self.export_gather = False  # decode with gather+einsum (set by the ONNX exporter)
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """Accept checkpoints saved with the earlier source-major decoder layout [F, n_i, d]."""
        for i, w in enumerate(self.W_dec):
            key = f"{prefix}W_dec.{i}"
            t = state_dict.get(key)
            if t is not None and t.shape != w.shape and t.dim() == 3 and t.transpose(0, 1).shape == w.shape:
                state_dict[key] = t.transpose(0, 1).contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ init / normalisation
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows of norm ~1 to their own layer, 0.1 to later layers; encoder = decoder^T."""
        cfg = self.cfg
        for i, w in enumerate(self.W_dec):
            nn.init.normal_(w, std=1.0 / math.sqrt(cfg.d_model))
            if w.shape[0] > 1:
                w[1:] *= 0.1
            self.W_enc[i].copy_(w[0].T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def fit_normalisation(self, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> None:
        """Estimate per-layer scalars from samples [L, N, d] so that E||x / s||^2 = d; init b_dec to the mean target."""
        d = self.cfg.d_model
        self.in_scale.copy_((mlp_in.float().pow(2).sum(-1).mean(-1) / d).sqrt().clamp_min(1e-8))
        self.out_scale.copy_((mlp_out.float().pow(2).sum(-1).mean(-1) / d).sqrt().clamp_min(1e-8))
        self.b_dec.copy_(mlp_out.float().mean(1) / self.out_scale[:, None])

    # ------------------------------------------------------------------ encoder
    def preactivations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[N, d] raw MLP input of `layer` -> [N, F] encoder pre-activations."""
        return (x / self.in_scale[layer]) @ self.W_enc[layer] + self.b_enc[layer]

    def rule_state(self, layer: int) -> torch.Tensor | None:
        """The sparsifier's state of `layer` (a view: BatchTopK's threshold [], JumpReLU's log threshold [F]), or None."""
        name = self.sparsifier.state_name
        return None if name is None else getattr(self, name)[layer]

    def activate(self, layer: int, z: torch.Tensor) -> SparseCode:
        """[N, F] pre-activations -> padded sparse code: the training rule in train mode, the inference
        rule in eval mode (see `training.model.sparsifiers`)."""
        return self.sparsifier.code(z, self.rule_state(layer), self.training)

    def select(self, layer: int, z: torch.Tensor) -> Selection:
        """The training rule's choice of active features from pre-activations z [N, F] (TopK and BatchTopK,
        without autograd; BatchTopK's inference threshold moves)."""
        return self.sparsifier.select(z, self.rule_state(layer))

    def encode(self, layer: int, x: torch.Tensor) -> SparseCode:
        """[N, d] raw MLP input -> sparse features of `layer`."""
        return self.activate(layer, self.preactivations(layer, x))

    def held_code(self, layer: int, x: torch.Tensor, code: SparseCode) -> SparseCode:
        """The code of x [N, d] (raw MLP input) with the active set of `code` [N, k] held: the
        pre-activations at `code.idx` where `code.val` is non-zero, zero elsewhere. Affine in x; equal to
        `encode(layer, x)` where `code` is x's own code and the activation is the identity on what it keeps
        (topk's, batchtopk's and relu's kept values are the pre-activations; jumprelu's too)."""
        z = self.preactivations(layer, x).gather(1, code.idx)
        return SparseCode(code.idx, z * (code.val != 0).to(z.dtype))

    # ------------------------------------------------------------------ decoder
    def decode_source(self, source: int, code: SparseCode) -> torch.Tensor:
        """Normalised writes of one source layer to each of its targets: [N, n_targets, d]."""
        w = self.W_dec[source]  # [n_t, F, d]
        if self.export_gather:  # one gather of whole feature rows from a feature-major [F, n_t * d] copy
            # (a constant in an exported graph; ONNX Runtime's Gather on axis 1 of [n_t, F, d] took 3-9 ms
            # per source for 32 rows: 24% of a ViT-B/32 call), indexed by the [N, k] code as it is (one ONNX
            # Gather, no reshapes around it), then one batched matrix-vector product per token (MatMul:
            # ONNX Runtime's Einsum transposes first). The sizes of w are Python ints, so the graph carries
            # constants, not shape arithmetic on the inputs (N and k stay dynamic: edits append entries).
            t, f, d = (int(s) for s in w.shape)
            rows = F.embedding(code.idx, w.transpose(0, 1).reshape(f, t * d))  # [N, k, n_t * d]
            return torch.matmul(code.val.unsqueeze(1), rows).reshape(-1, t, d)
        return torch.stack([sparse_decode(code.idx, code.val, w[t]) for t in range(w.shape[0])], dim=1)

    def decode_all(self, codes: list[torch.Tensor | SparseCode]) -> torch.Tensor:
        """Codes of all L layers (same N tokens) -> normalised reconstructions [L, N, d] (bias included)."""
        L = self.cfg.n_layers
        n = codes[0].idx.shape[0]  # type: ignore[union-attr]
        out = self.b_dec[:, None, :].expand(L, n, self.cfg.d_model).clone()
        for i, code in enumerate(codes):
            writes = self.decode_source(i, code)  # type: ignore[arg-type]
            out[i : i + writes.shape[1]] += writes.transpose(0, 1)
        return out

    def total_write_matrix(self, source: int) -> torch.Tensor:
        """[F, d] raw-unit sum over targets of source's decoder: the residual-stream write per unit activation."""
        w = self.W_dec[source]
        scales = self.out_scale[source : source + w.shape[0]]
        return torch.einsum("tfd,t->fd", w, scales)

    # ------------------------------------------------------------------ full pass
    def forward(self, mlp_in: torch.Tensor) -> tuple[torch.Tensor, list[SparseCode]]:
        """Raw MLP inputs [L, N, d] -> (raw reconstructed MLP outputs [L, N, d], codes per layer)."""
        codes = [self.encode(l, mlp_in[l]) for l in range(self.cfg.n_layers)]
        recon = self.decode_all(codes) * self.out_scale[:, None, None]
        return recon, codes

    def extra_repr(self) -> str:
        c = self.cfg
        return f"L={c.n_layers}, d={c.d_model}, F={c.n_features}, activation={c.activation}, k={c.k}, cross_layer={c.cross_layer}"
