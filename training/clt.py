"""The cross-layer transcoder (CLT): sparse encoders per layer, decoders from each layer to all later ones.

Shapes (L layers, d = d_model, F features per layer, N tokens, k active features per token):

- `W_enc`  [L, d, F], `b_enc` [L, F]: the encoder of layer l reads that layer's MLP input (LN2 output).
- `W_dec[i]` [F, n_i, d] for source layer i, where n_i = L - i (cross-layer: targets i..L-1) or
  n_i = 1 (per-layer transcoder, `cross_layer=False`: target i only). `W_dec[i][:, j - i]` is the
  decoder from source i to target j. Stored per source so that one source's writes to all of its
  targets are a single sparse gather over a contiguous [F, n_i * d] matrix.
- `b_dec`  [L, d]: decoder bias of each target layer.
- `log_threshold` [L, F]: JumpReLU thresholds (log scale); `batchtopk_threshold` [L]: BatchTopK's
  per-token inference threshold, a running mean of the smallest activation kept in training.
- `in_scale`, `out_scale` [L]: scalar normalisation estimated from data. The encoder sees
  `x / in_scale[l]`; decoded outputs are multiplied by `out_scale[j]`. All public methods take and
  return raw (unnormalised) activations; normalised space is internal (`encode_normalised`, `loss`).

Reconstruction of target layer j: `mlp_out_j ~= out_scale[j] * (sum_{i<=j} a_i @ W_dec[i][:, j-i] + b_dec[j])`.
Decoding never forms a dense [N, F] x [F, d] product: active features are gathered (`sparse_decode`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SparseCode:
    """Active features of N tokens in one layer, padded to width k: `idx` [N, k] int64, `val` [N, k] float.

    Padding entries have `val == 0` (their `idx` is arbitrary but valid).
    """

    idx: torch.Tensor
    val: torch.Tensor

    def dense(self, n_features: int) -> torch.Tensor:
        """[N, F] dense activations."""
        out = self.val.new_zeros(self.val.shape[0], n_features)
        return out.scatter_add(1, self.idx, self.val)

    def l0(self) -> torch.Tensor:
        """[N] number of non-zero features per token."""
        return (self.val != 0).sum(-1)


def sparse_decode(idx: torch.Tensor, val: torch.Tensor, weight: torch.Tensor, gather: bool = False) -> torch.Tensor:
    """sum_k val[n, k] * weight[idx[n, k]]: [N, k] x [F, M] -> [N, M] without a dense [N, F] product.

    Uses `embedding_bag` (fused gather-multiply-sum, sparse-aware backward) by default; `gather=True`
    spells the same sum with gather + einsum, which every ONNX exporter understands.
    """
    if gather:
        rows = weight.index_select(0, idx.reshape(-1)).reshape(*idx.shape, weight.shape[-1])  # [N, k, M]
        return torch.einsum("nk,nkm->nm", val, rows)
    return F.embedding_bag(idx, weight, per_sample_weights=val, mode="sum")


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta) with a straight-through (rectangle-kernel) estimate of d/dtheta."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        gate = (z > theta).to(z.dtype)
        kernel = ((z - theta).abs() < eps / 2).to(z.dtype) / eps
        grad_theta = -(theta * kernel * grad)
        grad_theta = grad_theta.reshape(-1, theta.shape[-1]).sum(0).reshape(theta.shape)
        return grad * gate, grad_theta, None


@dataclass
class CLTLoss:
    """Loss terms of one batch (normalised space). `fvu` [L] is per-layer fraction of variance unexplained."""

    total: torch.Tensor
    fvu: torch.Tensor
    aux: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor  # [L] mean active features per token
    fired: torch.Tensor = field(repr=False)  # [L, F] bool: feature active on some token of the batch


class CrossLayerTranscoder(nn.Module):
    """Sparse replacement for all MLP blocks of a ViT. See the module docstring for shapes."""

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, d, Fn = cfg.n_layers, cfg.d_model, cfg.n_features
        self.W_enc = nn.Parameter(torch.empty(L, d, Fn))
        self.b_enc = nn.Parameter(torch.zeros(L, Fn))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(Fn, cfg.n_targets(i), d)) for i in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.log_threshold = nn.Parameter(
            torch.full((L, Fn), math.log(cfg.jumprelu_init_threshold)), requires_grad=cfg.activation == "jumprelu"
        )
        self.register_buffer("batchtopk_threshold", torch.zeros(L))
        self.register_buffer("in_scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))
        self.export_gather = False  # decode with gather+einsum (set by the ONNX exporter)
        self.reset_parameters()

    # ------------------------------------------------------------------ init / normalisation
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows of norm ~1 to their own layer, 0.1 to later layers; encoder = decoder^T."""
        cfg = self.cfg
        for i, w in enumerate(self.W_dec):
            nn.init.normal_(w, std=1.0 / math.sqrt(cfg.d_model))
            if w.shape[1] > 1:
                w[:, 1:] *= 0.1
            self.W_enc[i].copy_(w[:, 0, :].T)
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

    def activate(self, layer: int, z: torch.Tensor) -> SparseCode:
        """[N, F] pre-activations -> padded sparse code, using the training rule in train mode.

        - topk: the k largest pre-activations per token, then ReLU (exactly k indices per token).
        - batchtopk: train: the N*k largest over the batch; eval: z > per-layer threshold, capped.
        - jumprelu: z * H(z - theta) with learned per-feature theta; capped at `inference_k`.
        - relu: max(z, 0); capped at `inference_k` (F unless `k_cap` is set).
        """
        cfg = self.cfg
        if cfg.activation == "topk":
            val, idx = z.topk(cfg.k, dim=-1)
            return SparseCode(idx, F.relu(val))
        if cfg.activation == "batchtopk" and self.training:
            zr = F.relu(z)
            n_keep = min(z.shape[0] * cfg.k, zr.numel())
            flat_val, flat_idx = zr.reshape(-1).topk(n_keep)
            with torch.no_grad():
                kept_min = flat_val[flat_val > 0].min() if (flat_val > 0).any() else flat_val.new_zeros(())
                self.batchtopk_threshold[layer].lerp_(kept_min, 0.01 if self.batchtopk_threshold[layer] > 0 else 1.0)
            mask = torch.zeros_like(zr).reshape(-1).index_fill_(0, flat_idx, 1.0).reshape(zr.shape)
            dense = zr * mask
            width = int((mask != 0).sum(-1).max().item()) if n_keep else 1
            val, idx = dense.topk(max(width, 1), dim=-1)
            return SparseCode(idx, val)
        k = cfg.inference_k if not self.training else None
        if cfg.activation == "batchtopk":
            dense = z * (z > self.batchtopk_threshold[layer]).to(z.dtype)
        elif cfg.activation == "jumprelu":
            theta = self.log_threshold[layer].exp()
            dense = _JumpReLU.apply(z, theta, cfg.jumprelu_bandwidth)
        else:
            dense = F.relu(z)
        if k is None:  # training: pad to the widest token of this batch
            k = max(int((dense != 0).sum(-1).max().item()), 1)
        val, idx = dense.topk(min(k, cfg.n_features), dim=-1)
        return SparseCode(idx, val)

    def encode(self, layer: int, x: torch.Tensor) -> SparseCode:
        """[N, d] raw MLP input -> sparse features of `layer`."""
        return self.activate(layer, self.preactivations(layer, x))

    # ------------------------------------------------------------------ decoder
    def decode_source(self, source: int, code: SparseCode) -> torch.Tensor:
        """Normalised writes of one source layer to each of its targets: [N, n_targets, d]."""
        w = self.W_dec[source]
        out = sparse_decode(code.idx, code.val, w.reshape(w.shape[0], -1), gather=self.export_gather)
        return out.reshape(code.idx.shape[0], w.shape[1], w.shape[2])

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
        scales = self.out_scale[source : source + w.shape[1]]
        return torch.einsum("ftd,t->fd", w, scales)

    # ------------------------------------------------------------------ full pass and loss
    def forward(self, mlp_in: torch.Tensor) -> tuple[torch.Tensor, list[SparseCode]]:
        """Raw MLP inputs [L, N, d] -> (raw reconstructed MLP outputs [L, N, d], codes per layer)."""
        codes = [self.encode(l, mlp_in[l]) for l in range(self.cfg.n_layers)]
        recon = self.decode_all(codes) * self.out_scale[:, None, None]
        return recon, codes

    def loss(
        self,
        mlp_in: torch.Tensor,
        mlp_out: torch.Tensor,
        *,
        dead_mask: torch.Tensor | None = None,
        aux_k: int = 256,
        aux_coef: float = 1 / 32,
        sparsity_coef: float = 0.0,
        sparsity_c: float = 4.0,
        preact_coef: float = 3e-6,
    ) -> CLTLoss:
        """Training loss on raw samples [L, N, d].

        total = sum_l FVU_l + aux_coef * AuxK (topk/batchtopk, dead features reconstruct the residual)
                + sparsity_coef * tanh-L0 penalty + preact_coef * pre-activation loss (jumprelu).
        """
        cfg = self.cfg
        L = cfg.n_layers
        x = mlp_in / self.in_scale[:, None, None]
        y = mlp_out / self.out_scale[:, None, None]
        zs = [x[l] @ self.W_enc[l] + self.b_enc[l] for l in range(L)]
        codes = [self.activate(l, zs[l]) for l in range(L)]
        recon = self.decode_all(codes)
        err = (recon - y).pow(2).sum(-1).mean(-1)  # [L]
        var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-8)
        fvu = err / var
        total = fvu.sum()
        zero = total.new_zeros(())
        aux = zero
        if dead_mask is not None and cfg.activation in ("topk", "batchtopk") and bool(dead_mask.any()):
            resid = (y - recon).detach()
            terms = []
            for l in range(L):
                if not bool(dead_mask[l].any()):
                    continue
                z_dead = zs[l].masked_fill(~dead_mask[l], float("-inf"))
                kk = min(aux_k, int(dead_mask[l].sum()))
                val, idx = z_dead.topk(kk, dim=-1)
                w = self.W_dec[l][:, 0, :]
                pred = sparse_decode(idx, F.relu(val), w)
                e_var = (resid[l] - resid[l].mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
                terms.append((pred - resid[l]).pow(2).sum(-1).mean() / e_var)
            if terms:
                aux = torch.stack(terms).sum()
                total = total + aux_coef * aux
        sparsity = zero
        if cfg.activation == "jumprelu":
            dec_norms = [self.W_dec[l].norm(dim=-1).sum(-1) for l in range(L)]  # [F] each
            pre = torch.stack(
                [(F.relu(self.log_threshold[l].exp() - zs[l]) * dec_norms[l]).sum(-1).mean() for l in range(L)]
            ).sum()
            total = total + preact_coef * pre
            if sparsity_coef > 0:
                sparsity = torch.stack(
                    [torch.tanh(sparsity_c * codes[l].dense(cfg.n_features) * dec_norms[l]).sum(-1).mean() for l in range(L)]
                ).sum()
                total = total + sparsity_coef * sparsity
        with torch.no_grad():
            l0 = torch.stack([c.l0().float().mean() for c in codes])
            fired = torch.zeros(L, cfg.n_features, dtype=torch.bool, device=x.device)
            for l, c in enumerate(codes):
                fired[l, c.idx[c.val != 0]] = True
        return CLTLoss(total=total, fvu=fvu.detach(), aux=aux.detach(), sparsity=sparsity.detach(), l0=l0, fired=fired)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"L={c.n_layers}, d={c.d_model}, F={c.n_features}, activation={c.activation}, k={c.k}, cross_layer={c.cross_layer}"
