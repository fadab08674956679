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
  per-token inference threshold, a running mean of the smallest activation kept in training.
- `in_scale`, `out_scale` [L]: scalar normalisation estimated from data. The encoder sees
  `x / in_scale[l]`; decoded outputs are multiplied by `out_scale[j]`. All public methods take and
  return raw (unnormalised) activations; normalised space is internal (`loss`, `decode_source`).

Reconstruction of target layer j: `mlp_out_j ~= out_scale[j] * (sum_{i<=j} a_i @ W_dec[i][j-i] + b_dec[j])`.
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


def _bags_by_feature(idx: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regroup the N*k entries of idx [N, k] by the row they select (counting sort).

    Returns (order [N*k]: flat positions sorted by idx value, token [N*k]: idx's row n of each sorted
    entry, offsets [n_rows]: start of each value's run in the sorted order).
    """
    flat = idx.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=n_rows)
    offsets = torch.cumsum(counts, 0) - counts
    return order, torch.div(order, idx.shape[1], rounding_mode="floor"), offsets


def scatter_rows(
    idx: torch.Tensor,
    coef: torch.Tensor,
    rows: torch.Tensor,
    n_rows: int,
    bags: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transpose of `sparse_decode`: out[f] = sum_{(n, j): idx[n, j] = f} coef[n, j] * rows[n].

    [N, k] int64, [N, k], [N, M] -> [n_rows, M]. One `embedding_bag` whose bags are the features
    (built by a counting sort of idx), so the cost is 2*N*k*M FLOPs with no [N*k, M] temporary and
    no dense [N, F] matrix. Used for the weight gradients of the sparse decoder and encoder.
    `bags` (from `_bags_by_feature(idx, n_rows)`) can be passed to reuse the sort across calls;
    `out` (contiguous [n_rows, M]) receives the result without a copy.
    """
    order, token, offsets = bags if bags is not None else _bags_by_feature(idx, n_rows)
    w = coef.reshape(-1)[order].to(rows.dtype)
    if out is None:
        return F.embedding_bag(token, rows.contiguous(), offsets, per_sample_weights=w, mode="sum")
    e = token.new_empty(0)
    torch.ops.aten._embedding_bag_forward_only.out(rows.contiguous(), token, offsets, False, 0, False, w, False, -1, out0=out, out1=e, out2=e.clone(), out3=e.clone())
    return out


class _SparseDecode(torch.autograd.Function):
    """out[n] = sum_j val[n, j] * weight[idx[n, j]] with sparse-aware gradients for val and weight.

    Backward: d val[n, j] = <grad[n], weight[idx[n, j]]> (a gather-dot), d weight = scatter_rows(idx,
    val, grad) (2*N*k*M FLOPs). autograd's own embedding_bag backward computes the same but several
    times slower on CPU.
    """

    @staticmethod
    def forward(ctx, idx: torch.Tensor, val: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, k = idx.shape
        flat = idx.reshape(-1)
        offsets = torch.arange(0, n * k, k, device=idx.device)
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(weight, flat, offsets, False, 0, False, val.reshape(-1).to(weight.dtype))
        ctx.save_for_backward(flat, offsets, offset2bag, idx, val, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        flat, offsets, offset2bag, idx, val, weight = ctx.saved_tensors
        grad = grad.contiguous().to(weight.dtype)
        d_val = d_weight = None
        if ctx.needs_input_grad[1]:
            d_val = torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, weight, flat, offsets, offset2bag, 0, -1)
            d_val = d_val.reshape(idx.shape).to(val.dtype)
        if ctx.needs_input_grad[2]:
            d_weight = scatter_rows(idx, val.detach(), grad, weight.shape[0])
        return None, d_val, d_weight


def _psw_backward(grad: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """d/d val of sum_j val[n, j] * weight[idx[n, j]] given grad [N, M]: <grad[n], weight[idx[n, j]]>, [N, k]."""
    n, k = idx.shape
    offsets = torch.arange(0, n * k, k, device=idx.device)
    offset2bag = torch.arange(n, device=idx.device).repeat_interleave(k)
    flat = idx.reshape(-1).contiguous()
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(grad.contiguous(), weight, flat, offsets, offset2bag, 0, -1)
    return out.reshape(n, k)


class _GatherPreactAll(torch.autograd.Function):
    """Selected encoder pre-activations of all layers, with a sparse backward into W_enc [L, d, F], b_enc [L, F].

    Inputs: normalised x [L, N, d] (no gradient), W_enc, b_enc, and per layer the chosen indices
    idx[l] [N, k_l] with the values z_at[l] = (x[l] @ W_enc[l] + b_enc[l]).gather(1, idx[l]) that the
    caller computed without autograd (it needed the full z to choose idx). Returns z_at (tuple).
    Backward touches only the selected columns: dW[l] = scatter_rows(idx, g, x[l])^T (2*N*k*d
    FLOPs), db[l] = index_add of g; a dense path would run a [d, N] x [N, F] matmul per layer and
    keep every [N, F] pre-activation alive until backward.
    """

    @staticmethod
    def forward(ctx, x, W, b, idx: tuple, z_at: tuple):  # type: ignore[override]
        ctx.save_for_backward(x, W)
        ctx.idx = idx
        ctx.set_materialize_grads(False)
        return tuple(z.clone() for z in z_at)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        x, W = ctx.saved_tensors
        L, d, Fn = W.shape
        d_W = torch.zeros_like(W) if ctx.needs_input_grad[1] else None
        d_b = W.new_zeros(L, Fn) if ctx.needs_input_grad[2] else None
        for l, (idx, g) in enumerate(zip(ctx.idx, grads)):
            if g is None:
                continue
            g = g.to(W.dtype)
            if d_W is not None:
                d_W[l] = scatter_rows(idx, g, x[l].to(W.dtype), Fn).t()
            if d_b is not None:
                d_b[l].index_add_(0, idx.reshape(-1), g.reshape(-1))
        return None, d_W, d_b, None, None


class _DecodeSourceInto(torch.autograd.Function):
    """Add source layer i's decoded writes into the normalised reconstructions, in place; plus AuxK.

    Forward: recon[i + t] += sum_j val[n, j] * W[t][idx[n, j]] for every target block t (W = W_dec[i],
    [n_t, F, d]: each contiguous [F, d] block stays in cache while N*k rows are gathered from it);
    aux [N, d] (or an empty tensor): the auxiliary code decoded by the own-target block W[0].
    Backward: recon's gradient passes through; d val = gather-dots; d W = scatter_rows per block
    (2*N*k*d FLOPs each; AuxK's part added into block 0). One node per source, so each W_dec[i]'s
    gradient is complete (and can be consumed and freed by an in-backward optimizer step) before
    the next source's is computed; no full-size zero tensors or strided-view backward nodes.
    """

    @staticmethod
    def forward(ctx, source: int, recon, idx, val, W, aux_idx, aux_val):  # type: ignore[override]
        v = val.to(W.dtype)
        for t in range(W.shape[0]):
            recon[source + t] += F.embedding_bag(idx, W[t], per_sample_weights=v, mode="sum")
        ctx.mark_dirty(recon)
        if aux_idx is None:
            aux = recon.new_zeros(0)
        else:
            aux = F.embedding_bag(aux_idx, W[0], per_sample_weights=aux_val.to(W.dtype), mode="sum")
        ctx.source = source
        ctx.save_for_backward(idx, val, W, aux_idx, aux_val)
        return recon, aux

    @staticmethod
    def backward(ctx, g_recon, g_aux):  # type: ignore[override]
        idx, val, W, aux_idx, aux_val = ctx.saved_tensors
        i = ctx.source
        n_t, Fn, d = W.shape
        d_val = d_W = d_aux_val = None
        if ctx.needs_input_grad[3]:
            d_val = sum(_psw_backward(g_recon[i + t].to(W.dtype), W[t], idx) for t in range(n_t)).to(val.dtype)
        if ctx.needs_input_grad[4]:
            bags = _bags_by_feature(idx, Fn)
            d_W = torch.empty_like(W)
            for t in range(n_t):
                scatter_rows(idx, val, g_recon[i + t].to(W.dtype), Fn, bags, out=d_W[t])
        if aux_idx is not None and g_aux is not None and g_aux.numel():
            G = g_aux.to(W.dtype).contiguous()
            if ctx.needs_input_grad[6]:
                d_aux_val = _psw_backward(G, W[0], aux_idx).to(aux_val.dtype)
            if d_W is not None:
                d_W[0] += scatter_rows(aux_idx, aux_val, G, Fn)
        return None, g_recon, None, d_val, d_W, None, d_aux_val


def sparse_decode(idx: torch.Tensor, val: torch.Tensor, weight: torch.Tensor, gather: bool = False) -> torch.Tensor:
    """sum_k val[n, k] * weight[idx[n, k]]: [N, k] x [F, M] -> [N, M] without a dense [N, F] product.

    Uses `embedding_bag` (fused gather-multiply-sum) with a sparse-aware backward when gradients are
    needed; `gather=True` spells the same sum with gather + einsum, which every ONNX exporter understands.
    """
    if gather:
        rows = weight.index_select(0, idx.reshape(-1)).reshape(*idx.shape, weight.shape[-1])  # [N, k, M]
        return torch.einsum("nk,nkm->nm", val, rows)
    if torch.is_grad_enabled() and (val.requires_grad or weight.requires_grad):
        return _SparseDecode.apply(idx, val, weight.contiguous())
    return F.embedding_bag(idx, weight, per_sample_weights=val.to(weight.dtype), mode="sum")


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
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(cfg.n_targets(i), Fn, d)) for i in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.log_threshold = nn.Parameter(
            torch.full((L, Fn), math.log(cfg.jumprelu_init_threshold)), requires_grad=cfg.activation == "jumprelu"
        )
        self.register_buffer("batchtopk_threshold", torch.zeros(L))
        self.register_buffer("in_scale", torch.ones(L))
        self.register_buffer("out_scale", torch.ones(L))
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
            idx, keep = self._select(layer, z)
            val = F.relu(z.gather(1, idx))
            return SparseCode(idx, val * keep.to(val.dtype) if keep is not None else val)
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
        w = self.W_dec[source]  # [n_t, F, d]
        if self.export_gather:  # one gather of whole feature rows from a feature-major [F, n_t * d] copy
            n, k = code.idx.shape  # (a constant in an exported graph; ONNX Runtime's Gather on axis 1 of
            t, f, d = w.shape      # [n_t, F, d] took 3-9 ms per source for 32 rows: 24% of a ViT-B/32 call)
            rows = w.transpose(0, 1).reshape(f, t * d).index_select(0, code.idx.reshape(-1)).reshape(n, k, t, d)
            return torch.einsum("nk,nktd->ntd", code.val, rows)
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

    # ------------------------------------------------------------------ full pass and loss
    def forward(self, mlp_in: torch.Tensor) -> tuple[torch.Tensor, list[SparseCode]]:
        """Raw MLP inputs [L, N, d] -> (raw reconstructed MLP outputs [L, N, d], codes per layer)."""
        codes = [self.encode(l, mlp_in[l]) for l in range(self.cfg.n_layers)]
        recon = self.decode_all(codes) * self.out_scale[:, None, None]
        return recon, codes

    @torch.no_grad()
    def _select(self, layer: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training-rule choice of active features from pre-activations z [N, F] (topk / batchtopk).

        Returns (idx [N, w], keep [N, w] bool or None when every slot is kept). Updates batchtopk's
        inference threshold (running mean of the smallest kept pre-activation).
        """
        cfg = self.cfg
        if cfg.activation == "topk":
            return z.topk(cfg.k, dim=-1).indices, None
        zr = F.relu(z)
        n_keep = min(z.shape[0] * cfg.k, zr.numel())
        flat_val, flat_idx = zr.reshape(-1).topk(n_keep)
        positive = flat_val > 0
        kept_min = flat_val[positive].min() if bool(positive.any()) else flat_val.new_zeros(())
        self.batchtopk_threshold[layer].lerp_(kept_min.to(self.batchtopk_threshold.dtype), 0.01 if self.batchtopk_threshold[layer] > 0 else 1.0)
        mask = torch.zeros(zr.numel(), dtype=torch.bool, device=z.device)
        mask[flat_idx[positive]] = True
        mask = mask.reshape(zr.shape)
        width = max(int(mask.sum(-1).max().item()), 1)
        masked = zr.masked_fill(~mask, -1.0)
        vals, idx = masked.topk(width, dim=-1)
        return idx, vals >= 0

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
        inplace: bool = False,
    ) -> CLTLoss:
        """Training loss on raw samples [L, N, d].

        total = sum_l FVU_l + aux_coef * AuxK (topk/batchtopk, dead features reconstruct the residual)
                + sparsity_coef * tanh-L0 penalty + preact_coef * pre-activation loss (jumprelu).

        TopK/BatchTopK take a sparse path: pre-activations are computed without autograd, the
        active (and AuxK) entries are re-attached through `_GatherPreactAll`, so backward costs
        O(N*k*d) per layer instead of a dense [d, N] x [N, F] matmul and no [N, F] tensor is kept.
        `inplace=True` normalises mlp_in / mlp_out in place (saves two batch-sized copies; the
        caller must not reuse them).
        """
        cfg = self.cfg
        L = cfg.n_layers
        if inplace:
            x = mlp_in.div_(self.in_scale[:, None, None])
            y = mlp_out.div_(self.out_scale[:, None, None])
        else:
            x = mlp_in / self.in_scale[:, None, None]
            y = mlp_out / self.out_scale[:, None, None]
        sparse_path = cfg.activation in ("topk", "batchtopk")
        use_aux = dead_mask is not None and sparse_path and aux_coef > 0 and bool(dead_mask.any())
        codes: list[SparseCode] = []
        zs: list[torch.Tensor] = []
        sel_idx: list[torch.Tensor] = []
        sel_z: list[torch.Tensor] = []
        keeps: list[torch.Tensor | None] = []
        aux_width: dict[int, int] = {}
        for l in range(L):
            if sparse_path:
                with torch.no_grad():
                    z = torch.addmm(self.b_enc[l], x[l], self.W_enc[l])
                    idx, keep = self._select(l, z)
                    if use_aux and bool(dead_mask[l].any()):  # type: ignore[index]
                        kk = min(aux_k, int(dead_mask[l].sum()))  # type: ignore[index]
                        aux_idx = z.masked_fill(~dead_mask[l], float("-inf")).topk(kk, dim=-1).indices  # type: ignore[index]
                        aux_width[l] = kk
                        idx = torch.cat([idx, aux_idx], 1)
                    sel_idx.append(idx)
                    sel_z.append(z.gather(1, idx))
                    keeps.append(keep)
                    del z
            else:
                z = x[l] @ self.W_enc[l] + self.b_enc[l]
                zs.append(z)
                codes.append(self.activate(l, z))
        aux_codes: list[SparseCode] = []
        if sparse_path:
            vals = _GatherPreactAll.apply(x, self.W_enc, self.b_enc, tuple(sel_idx), tuple(sel_z))
            for l in range(L):
                kk = aux_width.get(l, 0)
                w = sel_idx[l].shape[1] - kk
                val = F.relu(vals[l][:, :w])
                keep = keeps[l]
                codes.append(SparseCode(sel_idx[l][:, :w].contiguous(), val * keep.to(val.dtype) if keep is not None else val))
                if kk:
                    aux_codes.append(SparseCode(sel_idx[l][:, w:].contiguous(), F.relu(vals[l][:, w:])))
        aux_layers = tuple(aux_width)
        aux_by_layer = dict(zip(aux_layers, aux_codes))
        recon = self.b_dec[:, None, :].expand(L, x.shape[1], cfg.d_model).clone()
        aux_pred = []
        for i, c in enumerate(codes):
            a_code = aux_by_layer.get(i)
            recon, ap = _DecodeSourceInto.apply(
                i, recon, c.idx, c.val, self.W_dec[i], a_code.idx if a_code else None, a_code.val if a_code else None
            )
            if a_code is not None:
                aux_pred.append(ap)
        err = (recon - y).pow(2).sum(-1).mean(-1)  # [L]
        var = (y - y.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-8)
        fvu = err / var
        total = fvu.sum()
        zero = total.new_zeros(())
        aux = zero
        if aux_layers:
            resid = (y - recon).detach()
            terms = []
            for a, l in enumerate(aux_layers):
                e_var = (resid[l] - resid[l].mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
                terms.append((aux_pred[a] - resid[l]).pow(2).sum(-1).mean() / e_var)
            aux = torch.stack(terms).sum()
            total = total + aux_coef * aux
        sparsity = zero
        if cfg.activation == "jumprelu":
            dec_norms = [self.W_dec[l].norm(dim=-1).sum(0) for l in range(L)]  # [F] each
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
