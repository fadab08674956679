"""A feature-sharded cross-layer transcoder on torch.distributed: each rank of a process group holds F/N
features of every layer, and the whole group computes exactly what one `CrossLayerTranscoder` computes.

Layout (N ranks, rank r owns the global features [r*F_r, (r+1)*F_r) of every layer, F_r = F / N):

- sharded (feature axis): `W_enc` [L, d, F_r] (encoder columns), `b_enc` [L, F_r], `log_threshold`
  [L, F_r], `W_dec[i]` [n_i, F_r, d] (decoder rows); their gradients and optimizer state follow.
- replicated (every rank holds the same values): `b_dec` [L, d] and the buffers `batchtopk_threshold`,
  `in_scale`, `out_scale` [L]. They are computed from all-reduced quantities on every rank alike, so
  they stay equal without being broadcast.

Parameter and buffer names equal `CrossLayerTranscoder`'s: `full_state_dict()` gathers an ordinary
CLT state dict on rank 0 (saved as one ordinary `clt.safetensors`), `load_full_state_dict()` takes one
and keeps this rank's slice.

One pass on rank r: pre-activations of its own features [N, F_r]; the active features are chosen
globally (`global_topk`, below); the rank decodes its own active features into a partial
reconstruction; one all_reduce (sum) gives every rank the full reconstruction, and the loss is then
computed identically on every rank. The backward of that all_reduce is the identity: each rank's loss
is the same function of the sum, so d loss / d partial_r = d loss / d sum.

Global selection (TopK per token, BatchTopK per batch, AuxK, the inference caps): every rank takes
its local top-K candidate values, the candidates are all-gathered and the K-th largest of them is the
global threshold t (exact: a rank's share of the global top K is among its own top K). Entries > t
are selected; ties at t are broken by the lower global key (the feature index for a per-token
selection, token * F + feature for BatchTopK's batch-wide one), so the selection does not depend on the
number of ranks. The tie keys are exchanged only when ties at t outnumber the free slots (rare with
continuous values). JumpReLU and ReLU are elementwise and need no exchange in training. The rules are
the sparsifier objects of `training.model.sparsifiers`, subclassed to select across the shards
(`ShardedTopK`, `ShardedBatchTopK`, `ShardedJumpReLU`, `ShardedReLU`; `sharded_sparsifier`).

`ShardedCLT.loss` is `training.model.loss.clt_loss` term for term with the sums over features done
across the shards; a change to one must be made in the other (tests/training/test_sharded.py compares
them on every rule).

Works with any backend that has all_gather, all_reduce and gather (gloo on CPU, NCCL on GPU).
Not supported: CLS AuxK (`cls_aux_coef` > 0) and the ONNX export path (export the gathered CLT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .clt import CLTConfig, CrossLayerTranscoder, register_parameters
from .loss import CLTLoss, LossConfig, aux_loss, fired_features, fvu, jumprelu_penalties, normalise_samples
from .sparse import DecodeSourceInto, GatherPreactAll, sparse_decode
from .sparsifiers import BatchTopK, JumpReLU, ReLU, Selection, SparseCode, Sparsifier, TopK

_KEY_MAX = torch.iinfo(torch.int64).max


# ---------------------------------------------------------------------- collectives
def _all_gather(t: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on all ranks), in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


class _SumOverShards(torch.autograd.Function):
    """all_reduce(sum) whose backward is the identity: the caller computes the same loss from the sum on
    every rank, so each rank's partial receives d loss / d sum unchanged (no second all_reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def sum_over_shards(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The sum of every rank's `x` (same shape everywhere), differentiable as described in `_SumOverShards`."""
    return _SumOverShards.apply(x, group)


def global_topk(
    v: torch.Tensor, K: int, keys: Callable[[], torch.Tensor], group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which of this rank's entries belong to the top K of each row across all ranks.

    v [R, M]: this rank's part of R rows (every rank the same R and M); `keys()` -> [R, M] int64, the
    global position of each entry (unique across ranks), asked for only when ties must be broken.
    Returns (idx [R, w] int64 and keep [R, w] bool, w = min(K, M): the selected entries of this rank
    are idx where keep, i.e. the entries among the K largest of their global row, ties at the K-th value
    going to the smaller key; top [R, K]: the K largest values of each global row, descending, the
    same on every rank). K must not exceed the global row length (M * world size).
    """
    R, M = v.shape
    cand, cand_idx = v.topk(min(K, M), dim=1)  # [R, w]
    top = torch.cat(_all_gather(cand, group), dim=1).topk(K, dim=1).values  # [R, K]
    t = top[:, -1:]  # [R, 1] the global K-th value
    need = K - (top > t).sum(1)  # [R] slots left for entries equal to t (>= 1)
    eq = v == t
    ties = torch.stack(_all_gather(eq.sum(1), group)).sum(0)  # [R] entries equal to t over all ranks
    if not bool((ties > need).any()):
        # every entry >= t is selected; there are at most K of them on this rank, so all are candidates
        return cand_idx, cand >= t, top
    # more entries equal t than slots: the `need` smallest keys among them win (every rank sends its
    # own smallest `m` tied keys; the need-th smallest of all of them is the cut)
    key = keys()
    m = min(int(need.max()), M)
    first = key.masked_fill(~eq, _KEY_MAX).topk(m, dim=1, largest=False).values  # [R, m]
    every = torch.cat(_all_gather(first, group), dim=1).sort(dim=1).values  # [R, world * m]
    cut = every.gather(1, (need - 1).clamp_max(every.shape[1] - 1)[:, None])  # [R, 1]
    mask = (v > t) | (eq & (key <= cut))
    idx, keep = _code_from_mask(v, mask, cand.shape[1])
    return idx, keep, top


def _as_mask(idx: torch.Tensor, keep: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[R, w] selected positions -> [R, M] bool mask."""
    return torch.zeros(shape, dtype=torch.bool, device=idx.device).scatter_(1, idx, keep)


def _code_from_mask(z: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded local code of the selected entries: (idx [N, width] local feature indices, keep [N, width] bool).

    Every row must hold at most `width` selected entries; the padding slots have keep False.
    """
    idx = z.masked_fill(~mask, float("-inf")).topk(width, dim=1).indices
    return idx, mask.gather(1, idx)


# ---------------------------------------------------------------------- the rules, selecting across shards
@dataclass(frozen=True)
class FeatureShard:
    """This rank's features [offset, offset + size) of F per layer, in process group `group`."""

    offset: int
    size: int
    n_features: int
    group: dist.ProcessGroup | None = None

    def feature_keys(self, z: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Tie keys of a per-token selection on z [N, size]: the global feature index."""
        return lambda: (self.offset + torch.arange(self.size, device=z.device)).expand(z.shape[0], -1)

    def batch_keys(self, z: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Tie keys of a batch-wide selection on z [N, size] flattened: token * F + global feature index."""
        def keys() -> torch.Tensor:
            f = self.offset + torch.arange(self.size, device=z.device)
            return (torch.arange(z.shape[0], device=z.device)[:, None] * self.n_features + f).reshape(1, -1)

        return keys

    def top(self, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's k largest entries across the shards: this rank's (idx [N, w], keep [N, w])."""
        idx, keep, _ = global_topk(z, k, self.feature_keys(z), self.group)
        return idx, keep

    def capped(self, dense: torch.Tensor, cap: int) -> SparseCode:
        """An elementwise rule's inference code: the `cap` largest non-zero entries of each token across the
        shards (the sharded spelling of `sparsifiers._widest(dense, cap)`)."""
        idx, keep = self.top(dense, min(cap, self.n_features))
        val = dense.gather(1, idx)
        return SparseCode(idx, val * (keep & (val != 0)).to(val.dtype))


@dataclass
class ShardedTopK(TopK):
    """`TopK` on one feature shard: each token's k largest pre-activations across all shards."""

    shard: FeatureShard | None = None

    def code(self, z: torch.Tensor, state: torch.Tensor | None = None, training: bool = True) -> SparseCode:
        return self.select(z, state).code(z)

    @torch.no_grad()
    def select(self, z: torch.Tensor, state: torch.Tensor | None = None) -> Selection:
        assert self.shard is not None
        return Selection(*self.shard.top(z, self.k))


@dataclass
class ShardedBatchTopK(BatchTopK):
    """`BatchTopK` on one feature shard: the batch's N*k largest positive pre-activations across all shards;
    the inference cap across all shards too. The threshold `state` moves identically on every rank."""

    shard: FeatureShard | None = None

    def code(self, z: torch.Tensor, state: torch.Tensor | None, training: bool) -> SparseCode:
        assert state is not None and self.shard is not None
        if training:
            return self.select(z, state).code(z)
        return self.shard.capped(z * (z > state).to(z.dtype), self.cap)

    @torch.no_grad()
    def select(self, z: torch.Tensor, state: torch.Tensor | None) -> Selection:
        assert state is not None and self.shard is not None
        zr = F.relu(z)
        flat = zr.reshape(1, -1)
        n_keep = z.shape[0] * self.k  # <= N * F
        idx, keep, top = global_topk(flat, n_keep, self.shard.batch_keys(z), self.shard.group)
        mask = (_as_mask(idx, keep, flat.shape) & (flat > 0)).reshape(zr.shape)
        positive = top[0][top[0] > 0]  # the batch's kept values, the same on every rank
        kept_min = positive.min() if positive.numel() else top.new_zeros(())
        state.lerp_(kept_min.to(state.dtype), self.threshold_momentum if state > 0 else 1.0)
        width = max(int(mask.sum(-1).max().item()), 1)
        return Selection(*_code_from_mask(zr, mask, width))


@dataclass
class ShardedJumpReLU(JumpReLU):
    """`JumpReLU` on one feature shard: elementwise in training; the inference cap across all shards."""

    shard: FeatureShard | None = None

    def code(self, z: torch.Tensor, state: torch.Tensor | None, training: bool) -> SparseCode:
        if training:
            return super().code(z, state, training)
        assert state is not None and self.shard is not None
        return self.shard.capped(z * (z > state.exp()).to(z.dtype), self.cap)


@dataclass
class ShardedReLU(ReLU):
    """`ReLU` on one feature shard: elementwise in training; the inference cap across all shards."""

    shard: FeatureShard | None = None

    def code(self, z: torch.Tensor, state: torch.Tensor | None = None, training: bool = True) -> SparseCode:
        if training:
            return super().code(z, state, training)
        assert self.shard is not None
        return self.shard.capped(F.relu(z), self.cap)


def sharded_sparsifier(cfg: CLTConfig, shard: FeatureShard) -> Sparsifier:
    """`cfg.sparsifier()`'s rule, selecting across the shards."""
    rule = cfg.sparsifier()
    kind = {TopK: ShardedTopK, BatchTopK: ShardedBatchTopK, JumpReLU: ShardedJumpReLU, ReLU: ShardedReLU}[type(rule)]
    return kind(**{**rule.__dict__, "shard": shard})


# ---------------------------------------------------------------------- the model
class ShardedCLT(nn.Module):
    """This rank's feature shard of a `CrossLayerTranscoder` (see the module docstring).

    Construct it on every rank of `group` in the same order (the constructor draws the full model's
    initial weights from the global torch RNG block by block, exactly as `CrossLayerTranscoder` does,
    and keeps its own rows: the same seed gives the same model as the unsharded CLT; peak host memory
    one decoder block of the full model). `F` must be divisible by the group size.
    """

    def __init__(self, cfg: CLTConfig, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ShardedCLT needs torch.distributed to be initialised (run under torchrun)")
        self.cfg = cfg
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if cfg.n_features % self.world:
            raise ValueError(f"n_features={cfg.n_features} is not divisible by the {self.world} feature shards")
        self.f_local = cfg.n_features // self.world
        self.offset = self.rank * self.f_local
        Fl = self.f_local
        register_parameters(self, cfg, Fl)
        self.shard = FeatureShard(self.offset, Fl, cfg.n_features, group)
        self.sparsifier = sharded_sparsifier(cfg, self.shard)
        self.reset_parameters()

    # ------------------------------------------------------------------ layout
    @staticmethod
    def shard_dim(name: str) -> int | None:
        """The feature axis of a state-dict entry, or None for a replicated one."""
        if name.startswith("W_dec."):
            return 1
        return {"W_enc": 2, "b_enc": 1, "log_threshold": 1}.get(name)

    def local_slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor `name` (a view; replicated entries unchanged)."""
        dim = self.shard_dim(name)
        return full if dim is None else full.narrow(dim, self.offset, self.f_local)

    def gather_full(self, name: str, local: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """The full tensor `name` on group rank `dst` (CPU; None on the other ranks); collective."""
        dim = self.shard_dim(name)
        if dim is None:
            return local.detach().cpu().clone() if self.rank == dst else None
        parts = [torch.empty_like(local) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(local.detach().contiguous(), parts, dst=dist.get_global_rank(self.group, dst) if self.group else dst,
                    group=self.group)
        return torch.cat([p.cpu() for p in parts], dim=dim) if parts is not None else None

    def full_state_dict(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The ordinary `CrossLayerTranscoder` state dict on rank `dst` (CPU), None elsewhere; collective."""
        out = {name: self.gather_full(name, t, dst) for name, t in self.state_dict().items()}
        return out if self.rank == dst else None

    def full_clt(self, dst: int = 0) -> CrossLayerTranscoder | None:
        """The gathered model as one `CrossLayerTranscoder` (CPU, this module's train/eval mode) on rank
        `dst`, None elsewhere; collective. Built on the meta device, so no RNG is drawn for it."""
        state = self.full_state_dict(dst)
        if state is None:
            return None
        with torch.device("meta"):
            clt = CrossLayerTranscoder(self.cfg)
        clt.load_state_dict(state, assign=True)
        return clt.train(self.training)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load an ordinary (unsharded) CLT state dict, keeping this rank's slice of each sharded entry."""
        own = self.state_dict()
        if set(own) != set(state):
            raise ValueError(f"state dict does not fit: missing {sorted(set(own) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(own))}")
        for name, t in own.items():
            t.copy_(self.local_slice(name, state[name]))

    # ------------------------------------------------------------------ init / normalisation
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """`CrossLayerTranscoder.reset_parameters` on the full model, keeping this rank's rows (same RNG draws)."""
        cfg = self.cfg
        for i, w in enumerate(self.W_dec):
            full = torch.empty(w.shape[0], cfg.n_features, cfg.d_model, dtype=w.dtype)
            nn.init.normal_(full, std=1.0 / math.sqrt(cfg.d_model))
            if full.shape[0] > 1:
                full[1:] *= 0.1
            w.copy_(full.narrow(1, self.offset, self.f_local))
            self.W_enc[i].copy_(w[0].T)
            del full
        self.b_enc.zero_()
        self.b_dec.zero_()

    def fit_normalisation(self, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> None:
        """`CrossLayerTranscoder.fit_normalisation` (replicated buffers; every rank must pass the same samples)."""
        CrossLayerTranscoder.fit_normalisation(self, mlp_in, mlp_out)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ selection
    def rule_state(self, layer: int) -> torch.Tensor | None:
        """The sparsifier's state of `layer` (as `CrossLayerTranscoder.rule_state`; JumpReLU's is this rank's slice)."""
        name = self.sparsifier.state_name
        return None if name is None else getattr(self, name)[layer]

    def activate(self, layer: int, z: torch.Tensor) -> SparseCode:
        """Local pre-activations [N, F_r] -> this rank's part of the code (local indices, padding val 0):
        the rule of `CrossLayerTranscoder.activate`, selecting across all shards."""
        return self.sparsifier.code(z, self.rule_state(layer), self.training)

    def select(self, layer: int, z: torch.Tensor) -> Selection:
        """The training rule's choice (TopK, BatchTopK) from local pre-activations [N, F_r], across all shards."""
        return self.sparsifier.select(z, self.rule_state(layer))

    def preactivations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[N, d] raw MLP input of `layer` -> [N, F_r] this rank's encoder pre-activations."""
        return (x / self.in_scale[layer]) @ self.W_enc[layer] + self.b_enc[layer]

    def global_code(self, code: SparseCode) -> SparseCode:
        """This rank's code with local indices -> the full code (global indices, every rank's slots
        concatenated in rank order, padding val 0) on every rank; collective."""
        width = torch.tensor([code.idx.shape[1]], device=code.idx.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
        pad = int(width) - code.idx.shape[1]
        idx = F.pad(code.idx + self.offset, (0, pad), value=self.offset)
        val = F.pad(code.val.detach(), (0, pad))
        return SparseCode(torch.cat(_all_gather(idx, self.group), 1), torch.cat(_all_gather(val, self.group), 1))

    # ------------------------------------------------------------------ forward and loss
    def forward(self, mlp_in: torch.Tensor) -> tuple[torch.Tensor, list[SparseCode]]:
        """Raw MLP inputs [L, N, d] (the same on every rank) -> (raw reconstructed MLP outputs [L, N, d],
        the full codes per layer with global indices), as `CrossLayerTranscoder.forward`; collective."""
        L, n, d = mlp_in.shape
        codes = [self.activate(l, self.preactivations(l, mlp_in[l])) for l in range(L)]
        partial = mlp_in.new_zeros(L, n, d, dtype=self.b_dec.dtype)
        for i, code in enumerate(codes):
            w = self.W_dec[i]
            writes = torch.stack([sparse_decode(code.idx, code.val, w[t]) for t in range(w.shape[0])], dim=0)
            partial = partial.index_add(0, torch.arange(i, i + w.shape[0], device=partial.device), writes)
        recon = (sum_over_shards(partial, self.group) + self.b_dec[:, None, :]) * self.out_scale[:, None, None]
        return recon, [self.global_code(c) for c in codes]

    def loss(
        self,
        mlp_in: torch.Tensor,
        mlp_out: torch.Tensor,
        loss_cfg: LossConfig = LossConfig(),
        *,
        dead: torch.Tensor | None = None,
        cls_rows: torch.Tensor | None = None,
        cls_dead: torch.Tensor | None = None,
        inplace: bool = False,
    ) -> CLTLoss:
        """`training.model.loss.clt_loss` across the shards: every rank passes the same batch [L, N, d] and the
        full `dead` [L, F], and gets the same loss terms; `fired` / `fired_cls` are full [L, F]. Collective.
        CLS AuxK (`cls_aux_coef` > 0 with `cls_dead`) is not supported."""
        if loss_cfg.cls_aux_coef > 0 and cls_dead is not None:
            raise ValueError("CLS AuxK (cls_aux_coef > 0) is not supported with feature sharding")
        aux_k, aux_coef, sparsity_coef = loss_cfg.aux_k, loss_cfg.aux_coef, loss_cfg.sparsity_coef
        sparsity_c, preact_coef, dead_mask = loss_cfg.sparsity_c, loss_cfg.preact_coef, dead
        group = self.group
        L, n, d = mlp_in.shape
        lo, hi = self.offset, self.offset + self.f_local
        x, y = normalise_samples(self.in_scale, self.out_scale, mlp_in, mlp_out, inplace)
        sparse_path = self.sparsifier.trains_sparse
        use_aux = dead_mask is not None and sparse_path and aux_coef > 0 and bool(dead_mask.any())
        codes: list[SparseCode] = []
        zs: list[torch.Tensor] = []
        sel_idx: list[torch.Tensor] = []
        sel_z: list[torch.Tensor] = []
        keeps: list[torch.Tensor] = []
        aux_width: dict[int, int] = {}
        for l in range(L):
            if sparse_path:
                with torch.no_grad():
                    z = torch.addmm(self.b_enc[l], x[l], self.W_enc[l])  # [N, F_r]
                    sel = self.select(l, z)
                    idx = sel.idx
                    keep = sel.keep if sel.keep is not None else torch.ones_like(idx, dtype=torch.bool)
                    if use_aux and bool(dead_mask[l].any()):  # type: ignore[index]
                        kk = min(aux_k, int(dead_mask[l].sum()))  # type: ignore[index]
                        zm = z.masked_fill(~dead_mask[l, lo:hi], float("-inf"))  # type: ignore[index]
                        aidx, akeep = self.shard.top(zm, kk)
                        aux_width[l] = aidx.shape[1]
                        idx, keep = torch.cat([idx, aidx], 1), torch.cat([keep, akeep], 1)
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
                val = F.relu(vals[l]) * keeps[l].to(vals[l].dtype)
                codes.append(SparseCode(sel_idx[l][:, :w].contiguous(), val[:, :w]))
                if kk:
                    aux_codes.append(SparseCode(sel_idx[l][:, w:].contiguous(), val[:, w:]))
        aux_layers = tuple(aux_width)
        aux_by_layer = dict(zip(aux_layers, aux_codes))
        partial = x.new_zeros(L, n, d, dtype=self.b_dec.dtype)
        aux_pred = []
        for i, c in enumerate(codes):
            a_code = aux_by_layer.get(i)
            partial, ap = DecodeSourceInto.apply(
                i, partial, c.idx, c.val, self.W_dec[i], a_code.idx if a_code else None, a_code.val if a_code else None
            )
            if a_code is not None:
                aux_pred.append(ap)
        # everything that sums over features goes through one all_reduce
        pieces = [partial.reshape(-1), *(a.reshape(-1) for a in aux_pred)]
        if isinstance(self.sparsifier, JumpReLU):
            pre, sp = jumprelu_penalties(self.log_threshold, self.W_dec, zs, codes if sparsity_coef > 0 else None,
                                         sparsity_c)
            pieces.append(pre.reshape(1))
            if sp is not None:
                pieces.append(sp.reshape(1))
        summed = sum_over_shards(torch.cat(pieces), group)
        recon = summed[: L * n * d].reshape(L, n, d) + self.b_dec[:, None, :]
        at = L * n * d
        aux_full = []
        for _ in aux_pred:
            aux_full.append(summed[at : at + n * d].reshape(n, d))
            at += n * d
        per_layer = fvu(recon, y)
        total = per_layer.sum()
        zero = total.new_zeros(())
        aux = sparsity = zero
        if aux_layers:
            aux = aux_loss(dict(zip(aux_layers, aux_full)), (y - recon).detach())
            total = total + aux_coef * aux
        if isinstance(self.sparsifier, JumpReLU):
            total = total + preact_coef * summed[at]
            if sparsity_coef > 0:
                sparsity = summed[at + 1]
                total = total + sparsity_coef * sparsity
        with torch.no_grad():
            active = torch.stack([(c.val != 0).sum().float() for c in codes])
            dist.all_reduce(active, group=group)
            l0 = active / n
            fired = torch.cat(_all_gather(fired_features(codes, self.f_local), group), 1)
            fired_cls = None
            if cls_rows is not None:
                fired_cls = torch.cat(_all_gather(fired_features(codes, self.f_local, cls_rows), group), 1)
        return CLTLoss(total=total, fvu=per_layer.detach(), aux=aux.detach(), sparsity=sparsity.detach(), l0=l0, fired=fired,
                       cls_aux=None, fired_cls=fired_cls)

    # ------------------------------------------------------------------ optimisation helpers
    @torch.no_grad()
    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the full model's gradients of `params` (the same list of
        this module's parameters on every rank): sharded gradients' squares are summed over the ranks,
        replicated ones counted once. Collective; returns the total norm."""
        sharded = {id(q) for name, q in self.named_parameters() if self.shard_dim(name) is not None}
        grads = [p.grad for p in params if p.grad is not None]
        dev = grads[0].device if grads else self.b_dec.device
        sq = torch.zeros(2, device=dev, dtype=torch.float32)
        for p in params:
            if p.grad is not None:
                sq[0 if id(p) in sharded else 1] += p.grad.float().pow(2).sum()
        part = sq[0].clone()
        dist.all_reduce(part, group=self.group)
        total = (part + sq[1]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"L={c.n_layers}, d={c.d_model}, F={c.n_features} (this rank: {self.offset}..{self.offset + self.f_local - 1}"
                f" of {self.world} shards), activation={c.activation}, k={c.k}, cross_layer={c.cross_layer}")
