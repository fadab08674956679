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

from .sparse import DecodeSourceInto, GatherPreactAll, JumpReLU, sparse_decode

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


@dataclass
class CLTLoss:
    """Loss terms of one batch (normalised space). `fvu` [L] is per-layer fraction of variance unexplained."""

    total: torch.Tensor
    fvu: torch.Tensor
    aux: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor  # [L] mean active features per token
    fired: torch.Tensor = field(repr=False)  # [L, F] bool: feature active on some token of the batch
    cls_aux: torch.Tensor | None = None  # the CLS-token auxiliary loss (None when not computed)
    fired_cls: torch.Tensor | None = field(default=None, repr=False)  # [L, F] bool: active on a CLS row (when rows are marked)


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
            dense = JumpReLU.apply(z, theta, cfg.jumprelu_bandwidth)
        else:
            dense = F.relu(z)
        if k is None:  # training: pad to the widest token of this batch
            k = max(int((dense != 0).sum(-1).max().item()), 1)
            val, idx = dense.topk(min(k, cfg.n_features), dim=-1)
            # padding slots (inactive features topk happened to pick) carry no gradient: through
            # JumpReLU's straight-through estimate they would move the thresholds of arbitrary features
            return SparseCode(idx, val * (val != 0).to(val.dtype))
        val, idx = dense.topk(min(k, cfg.n_features), dim=-1)
        return SparseCode(idx, val)

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
        cls_rows: torch.Tensor | None = None,
        cls_dead_mask: torch.Tensor | None = None,
        cls_aux_k: int = 64,
        cls_aux_coef: float = 0.0,
        inplace: bool = False,
    ) -> CLTLoss:
        """Training loss on raw samples [L, N, d].

        total = sum_l FVU_l + aux_coef * AuxK (topk/batchtopk, dead features reconstruct the residual)
                + cls_aux_coef * CLS AuxK + sparsity_coef * tanh-L0 penalty + preact_coef * pre-activation loss (jumprelu).

        CLS AuxK: `cls_rows` [N] bool marks the batch's CLS-token rows and `cls_dead_mask` [L, F] the
        features that have not fired on a CLS row for a while; on the CLS rows only, the top
        `cls_aux_k` of those features (by pre-activation) reconstruct the residual of the
        reconstruction, as AuxK does over all tokens. It targets features that fire on patches but
        never at the CLS token, which AuxK over all tokens does not see as dead. Its ReLU passes the
        gradient straight through (see `_cls_aux`).

        TopK/BatchTopK take a sparse path: pre-activations are computed without autograd, the
        active (and AuxK) entries are re-attached through `GatherPreactAll`, so backward costs
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
            vals = GatherPreactAll.apply(x, self.W_enc, self.b_enc, tuple(sel_idx), tuple(sel_z))
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
            recon, ap = DecodeSourceInto.apply(
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
        cls_aux = None
        if cls_rows is not None and cls_dead_mask is not None and cls_aux_coef > 0 and bool(cls_rows.any()):
            cls_aux = self._cls_aux(x, y, recon.detach(), cls_rows, cls_dead_mask, cls_aux_k)
            if cls_aux is not None:
                total = total + cls_aux_coef * cls_aux
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
            fired_cls = None
            if cls_rows is not None:
                fired_cls = torch.zeros_like(fired)
                for l, c in enumerate(codes):
                    ci, cv = c.idx[cls_rows], c.val[cls_rows]
                    fired_cls[l, ci[cv != 0]] = True
        return CLTLoss(total=total, fvu=fvu.detach(), aux=aux.detach(), sparsity=sparsity.detach(), l0=l0, fired=fired,
                       cls_aux=None if cls_aux is None else cls_aux.detach(), fired_cls=fired_cls)

    def _cls_aux(self, x: torch.Tensor, y: torch.Tensor, recon: torch.Tensor, rows: torch.Tensor, dead: torch.Tensor,
                 aux_k: int) -> torch.Tensor | None:
        """CLS AuxK on normalised x, y, recon [L, N, d], rows [N] bool, dead [L, F] bool: the sum over layers
        with dead features of ||aux prediction - residual||^2 / Var(residual) on the marked rows.

        Dense over the dead features of the n marked rows ([n, F_dead] pre-activations): those rows
        are a small part of a batch, so this is cheap next to the sparse main path.
        """
        terms = []
        for l in range(self.cfg.n_layers):
            feats = dead[l].nonzero().squeeze(1)
            if feats.numel() == 0:
                continue
            xr, resid = x[l][rows], (y[l] - recon[l])[rows]  # [n, d] each
            z = torch.addmm(self.b_enc[l][feats], xr, self.W_enc[l][:, feats])  # [n, F_dead]
            val, j = z.topk(min(aux_k, feats.numel()), dim=-1)  # [n, k']
            rows_w = self.W_dec[l][0].index_select(0, feats)[j]  # [n, k', d]: own-layer decoder rows
            # ReLU forward, identity backward: at the CLS token these features' pre-activations are
            # below zero (that is why they are silent there), so a plain ReLU would pass no gradient
            # back; this way the encoder raises them where their decoder row helps the residual
            act = val + (F.relu(val) - val).detach()
            pred = torch.einsum("nk,nkd->nd", act, rows_w)
            e_var = (resid - resid.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
            terms.append((pred - resid).pow(2).sum(-1).mean() / e_var)
        return torch.stack(terms).sum() if terms else None

    def extra_repr(self) -> str:
        c = self.cfg
        return f"L={c.n_layers}, d={c.d_model}, F={c.n_features}, activation={c.activation}, k={c.k}, cross_layer={c.cross_layer}"
