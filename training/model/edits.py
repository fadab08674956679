"""Interventions on the explained model: per-row edits the forward applies while it runs (not a linear estimate).

`Edits` holds dense per-row tensors (B rows, each row its own image and edit set; shapes below);
`vit.forward` / `vit.CltSplice` apply them and `decompose.decompose(..., edits=...)` decomposes the
edited model, so the eager model and the exported intervention graph (`export.fused.export_intervener`,
`intervene.onnx`) share this one definition. Every edit changes what a later layer reads: the
downstream computation (attention, LayerNorms, the CLT's encoders of later layers) runs again.

- features: E entries per row (padded with layer -1): the CLT activation a of feature
  (feature_layer, feature_index) becomes feature_scale * a + feature_shift (ablate: 0, 0; scale s:
  s, 0; set v: 0, v) wherever the CLT replaces the MLP: at the CLS token in `cls` mode, at every
  token in `all` mode. A feature the CLT did not select gets its shift as activation.
- terms: term_scale [B, T] (T = 2L + 3, `bundle.format.term_names` order) multiplies the write of
  every term into the residual stream: `embed` (the embedded tokens after ln_pre), `attn.l` (block
  l's attention output), `clt.s` (all writes of CLT source layer s), `bias` (the CLT's decoder
  biases; ln_post's shift is not a residual write and stays); `error` is 0 in the modes with edits.
  At the CLS token only, or at every token where term_all_tokens [B] is true (`clt.s` and `bias`
  then at every token the CLT writes: only CLS in `cls` mode).
- patches (P = rows x columns, row-major like the spatial maps' tokens 1..P):
  patch_delete [B, P]: the patch's pixels become `fill` [3] (per channel, preprocessed units) before
  the patch embedding; patch_key_drop [B, P]: no token attends to the patch in any layer (its
  attention key is masked out; the CLS token is never dropped).

An all-identity row (layer -1 everywhere, term_scale 1, no patch flags) runs the unedited model.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .clt import SparseCode


@dataclass
class Edits:
    """Per-row edits (module docstring): feature_layer / feature_index int64 [B, E] (layer -1: no edit),
    feature_scale / feature_shift float [B, E]; term_scale float [B, T]; term_all_tokens bool [B];
    patch_delete / patch_key_drop bool [B, P]; fill float [3] (preprocessed units)."""

    feature_layer: torch.Tensor
    feature_index: torch.Tensor
    feature_scale: torch.Tensor
    feature_shift: torch.Tensor
    term_scale: torch.Tensor
    term_all_tokens: torch.Tensor
    patch_delete: torch.Tensor
    patch_key_drop: torch.Tensor
    fill: torch.Tensor

    @staticmethod
    def identity(batch: int, n_terms: int, n_patches: int, n_edits: int = 1, fill: torch.Tensor | None = None) -> "Edits":
        """`batch` rows of no edit (E = n_edits padding entries)."""
        return Edits(
            feature_layer=torch.full((batch, n_edits), -1, dtype=torch.long),
            feature_index=torch.zeros(batch, n_edits, dtype=torch.long),
            feature_scale=torch.ones(batch, n_edits),
            feature_shift=torch.zeros(batch, n_edits),
            term_scale=torch.ones(batch, n_terms),
            term_all_tokens=torch.zeros(batch, dtype=torch.bool),
            patch_delete=torch.zeros(batch, n_patches, dtype=torch.bool),
            patch_key_drop=torch.zeros(batch, n_patches, dtype=torch.bool),
            fill=torch.zeros(3) if fill is None else fill,
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in declaration order (the intervention graph's edit inputs, `bundle.format.EDIT_INPUTS`)."""
        return tuple(getattr(self, f.name) for f in fields(self))


def token_factors(edits: Edits, n_tokens: int) -> torch.Tensor:
    """[B, N, T] factor of each term's write at each token: term_scale at the CLS token (token 0), at the
    other tokens term_scale where term_all_tokens, else 1."""
    s = edits.term_scale  # [B, T]
    rest = torch.where(edits.term_all_tokens[:, None], s, torch.ones_like(s))  # [B, T]
    return torch.cat([s[:, None], rest[:, None].expand(-1, n_tokens - 1, -1)], 1)


def delete_patches(pixels: torch.Tensor, delete: torch.Tensor, fill: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """pixels [B, 3, H, W] with the pixels of the patches flagged in delete [B, P] (row-major over
    `grid` = (rows, columns)) replaced by fill [3]; H and W must be multiples of the grid.

    The in-graph (torch, traced into intervene.onnx) twin of numpy `bundle.patches.fill_patches`, which
    the total-effect map and the deletion test use: same patch order, same pixels, and serving feeds both
    the bundle's one fill (manifest `patches`). It lives here because the graph must delete patches per
    row from its `patch_delete` input; tests/serving/test_intervene_service.py checks the two agree."""
    gh, gw = grid
    H, W = int(pixels.shape[2]), int(pixels.shape[3])
    if H % gh or W % gw:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch grid {gh}x{gw}")
    ph, pw = H // gh, W // gw
    mask = delete.reshape(-1, gh, 1, gw, 1).expand(-1, gh, ph, gw, pw).reshape(-1, 1, H, W)
    return torch.where(mask, fill.to(pixels.dtype).reshape(1, 3, 1, 1), pixels)


def key_bias(drop: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention-score bias [B, 1, 1, N] from patch_key_drop [B, P]: -inf on dropped patch keys,
    0 on the others and on the CLS key (token 0, never dropped, so no softmax row is empty)."""
    keep_cls = torch.zeros_like(drop[:, :1])
    flags = torch.cat([keep_cls, drop], 1)  # [B, N]
    bias = torch.where(flags, torch.full_like(flags, float("-inf"), dtype=dtype), torch.zeros_like(flags, dtype=dtype))
    return bias[:, None, None, :]


def edit_code(code: SparseCode, layer: int, edits: Edits, tokens: int) -> SparseCode:
    """The code [B*t, k] of `layer` at `tokens` (t) tokens per row with the row's feature edits applied:
    [B*t, k + E]. An edited feature present in the code (value possibly 0) takes scale * a + shift in
    place; one absent is appended with value `shift`; every other appended entry is 0 (columns k.. of
    the result hold the E edit entries, value 0 where the entry is padding, for another layer or
    present in the code). Indices in a code row are distinct (top-k), and an edit set names a feature
    at most once (the API checks), so no feature is counted twice."""
    def per_token(x: torch.Tensor) -> torch.Tensor:  # [B, E] -> [B*t, E] (no size read: E stays dynamic in a graph)
        return x if tokens == 1 else x[:, None].expand(-1, tokens, -1).flatten(0, 1)

    hit = per_token(edits.feature_layer == layer)  # [N, E]
    index = per_token(edits.feature_index)
    scale, shift = per_token(edits.feature_scale).to(code.val.dtype), per_token(edits.feature_shift).to(code.val.dtype)
    match = (code.idx[:, :, None] == index[:, None, :]) & hit[:, None, :]  # [N, k, E]
    m = match.to(code.val.dtype)
    val = code.val * (1.0 + (m * (scale - 1.0)[:, None, :]).sum(-1)) + (m * shift[:, None, :]).sum(-1)
    present = match.any(1)  # [N, E]
    extra = torch.where(hit & ~present, shift, torch.zeros_like(shift))
    return SparseCode(torch.cat([code.idx, index], 1), torch.cat([val, extra], 1))
