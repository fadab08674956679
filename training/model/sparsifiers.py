"""Sparsifiers: the rule that turns one layer's encoder pre-activations into its sparse code.

One small object per rule, built from the `CLTConfig` by `make_sparsifier`: `TopK`, `BatchTopK`,
`JumpReLU`, `ReLU`. Shapes: z [N, F] pre-activations of N tokens in one layer (normalised space),
a code is a `SparseCode` [N, w] (w = k for TopK, the widest token otherwise, `cap` at inference).

Each object has one job, the activation rule:

- `code(z, state, training)` -> SparseCode: the training rule (`training=True`) or the inference rule
  (fixed width `cap`, so exported graphs have static shapes).
- `select(z, state)` -> Selection: the training rule's choice of active features, made without
  autograd. For the `trains_sparse` rules (TopK, BatchTopK) the loss (`training.model.loss`) recomputes
  only the selected pre-activations with a sparse backward, so no [N, F] tensor is kept for backward;
  JumpReLU and ReLU train on the dense path (JumpReLU's thresholds learn from the dense gradient).

`state` is the rule's per-layer tensor, which lives on the CLT (it is part of the checkpoint) and is
named by `state_name`: BatchTopK's inference threshold `batchtopk_threshold[l]` (0-d, updated in place
by `select`), JumpReLU's `log_threshold[l]` [F] (learned); TopK and ReLU have none.

Feature sharding: `select` is the seam where a feature-sharded CLT, holding a slice of the F
features on each rank, makes the selection global. `TopK.kth_value(z, k)` ([N, 1]: each token's k-th
largest pre-activation) and `BatchTopK.kth_value(values, n)` (0-d: the n-th largest of the batch)
are the only reductions over features; a sharded subclass overrides them to reduce across ranks
(e.g. all-gather every rank's local top k / top n values, take the k-th / n-th of those), and
`TopK.select_above` / `BatchTopK.select` then keep exactly the entries at or above that value on
each rank (`selection_from_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from .sparse import JumpReLU as JumpReLUStep


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
class Selection:
    """The training rule's choice of active features: `idx` [N, w] int64 and `keep` [N, w] bool (None: every
    slot is kept). Slots with `keep` False pad a token to the batch's widest; their value is zeroed."""

    idx: torch.Tensor
    keep: torch.Tensor | None = None

    def code(self, z: torch.Tensor) -> SparseCode:
        """The code of pre-activations z [N, F]: ReLU of the selected entries, padding zeroed."""
        return self.code_of_values(z.gather(1, self.idx))

    def code_of_values(self, val: torch.Tensor) -> SparseCode:
        """The code whose selected pre-activations are val [N, w] (already gathered, e.g. with gradient)."""
        val = F.relu(val)
        return SparseCode(self.idx, val * self.keep.to(val.dtype) if self.keep is not None else val)


def selection_from_mask(z: torch.Tensor, mask: torch.Tensor) -> Selection:
    """The entries of z [N, F] where mask [N, F] is True, padded to the widest token: idx ordered by z
    (largest first), `keep` False on padding slots."""
    width = max(int(mask.sum(-1).max().item()), 1)
    idx = z.masked_fill(~mask, float("-inf")).topk(width, dim=-1).indices
    return Selection(idx, mask.gather(1, idx))


def _widest(dense: torch.Tensor, cap: int | None) -> SparseCode:
    """Dense activations [N, F] -> their non-zero entries as a code of width `cap` (None: the widest token;
    then the padding slots, inactive features topk happened to pick, carry no gradient: through JumpReLU's
    straight-through estimate they would move the thresholds of arbitrary features)."""
    k = cap if cap is not None else max(int((dense != 0).sum(-1).max().item()), 1)
    val, idx = dense.topk(min(k, dense.shape[-1]), dim=-1)
    if cap is None:
        val = val * (val != 0).to(val.dtype)
    return SparseCode(idx, val)


class Sparsifier(Protocol):
    """What the CLT and its loss ask of an activation rule (see the module docstring)."""

    trains_sparse: ClassVar[bool]
    state_name: ClassVar[str | None]

    def code(self, z: torch.Tensor, state: torch.Tensor | None, training: bool) -> SparseCode: ...

    def select(self, z: torch.Tensor, state: torch.Tensor | None) -> Selection: ...


@dataclass
class TopK:
    """The k largest pre-activations of each token, then ReLU (exactly k indices per token), in training
    and at inference."""

    k: int
    trains_sparse: ClassVar[bool] = True
    state_name: ClassVar[str | None] = None

    def code(self, z: torch.Tensor, state: torch.Tensor | None = None, training: bool = True) -> SparseCode:
        val, idx = z.topk(self.k, dim=-1)
        return SparseCode(idx, F.relu(val))

    @torch.no_grad()
    def select(self, z: torch.Tensor, state: torch.Tensor | None = None) -> Selection:
        """Each token's k largest entries of z [N, F] -> Selection [N, k] (largest first)."""
        return Selection(z.topk(self.k, dim=-1).indices)

    @staticmethod
    def kth_value(z: torch.Tensor, k: int) -> torch.Tensor:
        """[N, 1]: each token's k-th largest entry of z [N, F]. Override to reduce across feature shards."""
        return z.topk(k, dim=-1).values[:, -1:]

    @torch.no_grad()
    def select_above(self, z: torch.Tensor) -> Selection:
        """The same choice as `select` (up to ties at the k-th value) spelled as a threshold, `z >= kth_value`:
        the form a feature-sharded CLT uses with a global `kth_value`."""
        return selection_from_mask(z, z >= self.kth_value(z, self.k))


@dataclass
class BatchTopK:
    """Training: the N*k largest (positive) pre-activations over the whole batch of N tokens, so a token
    may get more or fewer than k. Inference: z > a per-layer threshold (the running mean of the smallest
    pre-activation kept in training, `state`), capped at `cap` per token."""

    k: int
    cap: int
    trains_sparse: ClassVar[bool] = True
    state_name: ClassVar[str | None] = "batchtopk_threshold"
    threshold_momentum: ClassVar[float] = 0.01

    def code(self, z: torch.Tensor, state: torch.Tensor | None, training: bool) -> SparseCode:
        assert state is not None
        if training:
            return self.select(z, state).code(z)
        return _widest(z * (z > state).to(z.dtype), self.cap)

    @staticmethod
    def kth_value(values: torch.Tensor, n: int) -> torch.Tensor:
        """0-d: the n-th largest of values [M]. Override to reduce across feature shards."""
        return values.topk(n).values[-1]

    @torch.no_grad()
    def select(self, z: torch.Tensor, state: torch.Tensor | None) -> Selection:
        """The batch's N*k largest positive entries of z [N, F]; moves `state` (0-d, this layer's inference
        threshold) towards the smallest one kept (set to it on the first batch)."""
        assert state is not None
        zr = F.relu(z)
        n_keep = min(z.shape[0] * self.k, zr.numel())
        kth = self.kth_value(zr.reshape(-1), n_keep)
        mask = (zr >= kth) & (zr > 0)
        if bool(kth > 0):
            kept_min = kth
        else:  # fewer than n_keep positive entries: all of them are kept
            kept_min = zr[mask].min() if bool(mask.any()) else zr.new_zeros(())
        state.lerp_(kept_min.to(state.dtype), self.threshold_momentum if state > 0 else 1.0)
        return selection_from_mask(zr, mask)


@dataclass
class JumpReLU:
    """z * H(z - theta) with a learned per-feature threshold theta = exp(state) [F] (straight-through
    gradient of the step, bandwidth `bandwidth`); training codes are as wide as the widest token,
    inference codes `cap` wide."""

    cap: int
    bandwidth: float
    trains_sparse: ClassVar[bool] = False
    state_name: ClassVar[str | None] = "log_threshold"

    def code(self, z: torch.Tensor, state: torch.Tensor | None, training: bool) -> SparseCode:
        assert state is not None
        return _widest(JumpReLUStep.apply(z, state.exp(), self.bandwidth), None if training else self.cap)

    @torch.no_grad()
    def select(self, z: torch.Tensor, state: torch.Tensor | None) -> Selection:
        """The entries of z [N, F] above the thresholds exp(state) [F], padded to the widest token. (Training
        does not use it: the thresholds learn from the dense pre-activations' gradient.)"""
        assert state is not None
        return selection_from_mask(z, z > state.exp())


@dataclass
class ReLU:
    """max(z, 0); training codes as wide as the widest token, inference codes `cap` wide."""

    cap: int
    trains_sparse: ClassVar[bool] = False
    state_name: ClassVar[str | None] = None

    def code(self, z: torch.Tensor, state: torch.Tensor | None = None, training: bool = True) -> SparseCode:
        return _widest(F.relu(z), None if training else self.cap)

    @torch.no_grad()
    def select(self, z: torch.Tensor, state: torch.Tensor | None = None) -> Selection:
        """The positive entries of z [N, F], padded to the widest token (training takes the dense path)."""
        return selection_from_mask(z, z > 0)
