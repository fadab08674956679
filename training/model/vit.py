"""Explicit forward of an open_clip VisionTransformer: the one place that captures, splices and decomposes.

Instead of forward hooks, the blocks' own submodules (ln_1, attention, ls_1, ln_2, mlp, ls_2) are
called in order, so no fused fast path (nn.MultiheadAttention's native kernel, a fused block) can
skip a capture point; `forward(visual, pixels)` equals `visual(pixels)` exactly (tested).

Shapes: B images, T = 1 + n_patches tokens (CLS first), d = transformer width, D = embedding dim,
L = number of residual blocks, H = attention heads. "MLP input" is the LN2 output of a block, "MLP
output" is what the block adds to the residual stream after its MLP (layer scale included).

With `record_attention=True` the forward also keeps, per block, every token's value per head (before
the value bias) and the CLS query's per-head softmax weights. The attention is then written out from
the block's `nn.MultiheadAttention` parameters (`attention_recorded`, the arithmetic of its
`need_weights=True` path), so the weights and values kept are those that made the block's output and
the per-head, per-source-token split of the CLS output (`decompose.spatial_parts`) is exact up to
float rounding. `explicit_attention=True` runs the same written-out attention without keeping
anything: `decompose`, and so every exported graph, uses it where the model allows (a few ONNX nodes
per block where the module's own export has about a hundred; same values to fp32 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Protocol

import torch
from torch import nn

from .edits import Edits, delete_patches, edit_code, key_bias, token_factors

TokenSet = Literal["all", "cls", "patches"]
TOKEN_SETS: tuple[str, ...] = ("all", "cls", "patches")


class UnsupportedModel(ValueError):
    """The vision tower has a structure the additive decomposition does not cover."""


def check_supported(visual: nn.Module) -> None:
    """Raise `UnsupportedModel` unless `visual` is an open_clip ViT with CLS-token pooling."""
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise UnsupportedModel(f"{type(visual).__name__} is not an open_clip VisionTransformer (no transformer.resblocks)")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModel("attentional pooling is not supported: the embedding must be a function of the CLS token")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModel(f"pool_type={visual.pool_type!r} is not supported; only 'tok' (CLS token) pooling")
    for i, blk in enumerate(visual.transformer.resblocks):
        for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"):
            if not hasattr(blk, name):
                raise UnsupportedModel(f"block {i} ({type(blk).__name__}) has no {name}")


def blocks(visual: nn.Module) -> nn.ModuleList:
    return visual.transformer.resblocks


def embed(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] preprocessed pixels -> [B, T, d] tokens after patch+class+position embedding and ln_pre."""
    return visual._embeds(pixels)


def attention_out(block: nn.Module, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
    """What the attention sub-block adds to the residual stream [B, T, d] (with `queries` = n: at the
    first n tokens only, [B, n, d]; every token still serves as key and value)."""
    h = block.ln_1(x)
    if hasattr(block, "attention"):  # open_clip ResidualAttentionBlock (nn.MultiheadAttention)
        if queries is None:
            return block.ls_1(block.attention(q_x=h))
        return block.ls_1(block.attention(q_x=h[:, :queries], k_x=h, v_x=h))
    out = block.ls_1(block.ln_attn(block.attn(h)))  # CustomResidualAttentionBlock: no separate queries
    return out if queries is None else out[:, :queries]


def attention_recorded(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, queries: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what the attention sub-block adds [B, T, d] (at the first `queries` tokens: [B, queries, d]), every
    token's value before the value bias, per head (W_V[h] LN1(x_t)) [B, H, T, dh], the CLS query's softmax
    weights over source tokens [B, H, T]) from the residual stream x [B, T, d] (`self_attention`; `bias` and
    `queries` as there)."""
    a, v, w = self_attention(block, block.ln_1(x), bias=bias, queries=queries)
    return a, v, w[:, :, 0]


def self_attention(block: nn.Module, h: torch.Tensor, weights: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what the attention sub-block adds [B, T, d], the values before the value bias per head [B, H, T, dh],
    the softmax weights [B, H, T, T]) from the sub-block's input h = LN1(x) [B, T, d]. Given `weights`, those
    mix the values instead of the softmax of h's queries and keys (held at another input's values).
    `bias` [B, 1, 1, T] is added to the scores before the softmax (-inf: a key nobody attends to,
    `edits.key_bias`). With `queries` = n only the first n tokens query (every token is still a key and
    a value): the output is [B, n, d] and the weights [B, H, n, T], the rows of the full ones (`forward`'s
    last block, where only the CLS token's output is read).

    Self-attention written out from the block's `nn.MultiheadAttention` parameters in the order of
    its `need_weights=True` path (packed in-projection, q scaled by 1/sqrt(dh) before q k^T, one
    softmax, out-projection), so the output is the module's to fp32 rounding (tested against
    open_clip's own blocks) and the weights and values are those that made it. One change of order:
    the value bias b_V is added after the softmax mixes the values (every row of the weights sums to
    1, so weights (v + b_V) = weights v + b_V), so that the values the mixing reads are the unbiased
    ones the spatial maps split (`decompose.spatial_parts`), with no second copy of them.
    Needs `check_spatial_supported`."""
    attn = block.attn
    T, d = int(h.shape[1]), int(h.shape[2])  # static in a traced graph; the batch stays -1
    H = int(attn.num_heads)
    dh = d // H
    Tq = T if queries is None else int(queries)
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    if queries is None:
        qkv = nn.functional.linear(h, w_in)  # [B, T, 3d]
        if b_in is not None:  # q and k biases now, the value bias after the mixing
            qkv = qkv + torch.cat([b_in[: 2 * d], b_in.new_zeros(d)])
        q, k, v = qkv.reshape(-1, T, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, dh] each; v unbiased
    else:  # queries of the first Tq tokens only; keys and values of all
        q = nn.functional.linear(h[:, :Tq], w_in[:d], None if b_in is None else b_in[:d])
        q = q.reshape(-1, Tq, H, dh).transpose(1, 2)  # [B, H, Tq, dh]
        kv = nn.functional.linear(h, w_in[d:])  # [B, T, 2d]
        if b_in is not None:
            kv = kv + torch.cat([b_in[d : 2 * d], b_in.new_zeros(d)])
        k, v = kv.reshape(-1, T, 2, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
        if weights is not None:
            weights = weights[:, :, :Tq]
    if weights is None:
        scores = torch.matmul(q * (1.0 / float(dh) ** 0.5), k.transpose(-1, -2))  # [B, H, Tq, T]
        weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
    mixed = torch.matmul(weights, v)  # [B, H, Tq, dh]
    if b_in is not None:
        mixed = mixed + b_in[2 * d :].reshape(H, 1, dh)
    out = attn.out_proj(mixed.transpose(1, 2).reshape(-1, Tq, d))
    return block.ls_1(out), v, weights


def check_spatial_supported(visual: nn.Module) -> None:
    """Raise `UnsupportedModel` unless every block's attention is a batch-first `nn.MultiheadAttention`
    with packed q/k/v projections, no extra key/value biases, and an identity or diagonal layer scale:
    the structure the per-head, per-token decomposition (`decompose.spatial_parts`) is written for."""
    check_supported(visual)
    for i, blk in enumerate(blocks(visual)):
        attn = getattr(blk, "attn", None)
        if not hasattr(blk, "attention") or not isinstance(attn, nn.MultiheadAttention):
            raise UnsupportedModel(f"block {i} ({type(blk).__name__}) has no nn.MultiheadAttention: spatial maps need one")
        if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModel(f"block {i}: attention must be batch-first with packed q/k/v and no bias_k/bias_v/zero-attn")
        if not isinstance(blk.ls_1, nn.Identity) and not isinstance(getattr(blk.ls_1, "gamma", None), torch.Tensor):
            raise UnsupportedModel(f"block {i}: layer scale {type(blk.ls_1).__name__} is neither identity nor diagonal")


def layer_scale(block: nn.Module, d: int) -> torch.Tensor:
    """The attention sub-block's layer scale as a vector [d] (ones when it is the identity)."""
    gamma = getattr(block.ls_1, "gamma", None)
    return gamma if isinstance(gamma, torch.Tensor) else block.ln_1.weight.new_ones(d)


def mlp_in(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's input (LN2 output) [B, T, d] from the residual stream [B, T, d]."""
    return block.ln_2(x)


def mlp_out(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What the MLP sub-block adds to the residual stream, from its input h [.., d]."""
    return block.ls_2(block.mlp(h))


def final_layernorm(visual: nn.Module) -> nn.LayerNorm:
    return visual.ln_post


def project(visual: nn.Module, cls_resid: torch.Tensor) -> torch.Tensor:
    """Final CLS residual [B, d] -> image embedding [B, D] (ln_post, then proj). Not normalised."""
    pooled = visual.ln_post(cls_resid)
    return pooled @ visual.proj if visual.proj is not None else pooled


def split_tokens(tokens: TokenSet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, d] -> (tokens in the set, the others); CLS is token 0."""
    if tokens == "cls":
        return x[:, :1], x[:, 1:]
    if tokens == "patches":
        return x[:, 1:], x[:, :1]
    if tokens == "all":
        return x, x[:, :0]
    raise ValueError(f"token set must be one of {TOKEN_SETS}, got {tokens!r}")


def join_tokens(tokens: TokenSet, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_tokens`."""
    if tokens == "cls":
        return torch.cat([inside, outside], dim=1)
    if tokens == "patches":
        return torch.cat([outside, inside], dim=1)
    return inside


class MlpReplacement(Protocol):
    """Called at every block: (layer, MLP input h [B,T,d], the real MLP as a function) -> MLP output [B,T,d]."""

    def __call__(self, layer: int, h: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


@dataclass
class ForwardResult:
    """embedding [B, D]; CLS-token pieces of the final residual: embed_cls [B, d], attn_cls / mlp_cls [L, B, d].
    With `record_attention`: head_values, per block, every token's values before the value bias, per head
    [B, H, T, dh] (as the attention mixed them; `attn_values` stacks them heads concatenated), and
    attn_weights [L, B, H, T] (the CLS query's softmax weights per head and source token); None otherwise."""

    embedding: torch.Tensor
    cls_resid: torch.Tensor
    embed_cls: torch.Tensor
    attn_cls: torch.Tensor
    mlp_cls: torch.Tensor
    head_values: list[torch.Tensor] | None = None
    attn_weights: torch.Tensor | None = None

    @property
    def attn_values(self) -> torch.Tensor | None:
        """Every block's values before the value bias, heads concatenated: [L, B, T, d] (W_V[h] LN1(x_t) in
        columns h*dh..(h+1)*dh), or None without `record_attention`."""
        if self.head_values is None:
            return None
        B, H, T, dh = self.head_values[0].shape
        return torch.stack([v.transpose(1, 2).reshape(B, T, H * dh) for v in self.head_values])


def explicit_attention_supported(visual: nn.Module) -> bool:
    """Whether `attention_recorded` can stand in for every block's attention (`check_spatial_supported`)."""
    try:
        check_spatial_supported(visual)
    except UnsupportedModel:
        return False
    return True


def forward(visual: nn.Module, pixels: torch.Tensor, replace: MlpReplacement | None = None,
            record_attention: bool = False, explicit_attention: bool = False, edits: Edits | None = None,
            cls_only_last: bool = False) -> ForwardResult:
    """Run the ViT block by block; `replace` may substitute any MLP output (see `MlpReplacement`);
    `record_attention` keeps the attention values and CLS-query weights (module docstring);
    `explicit_attention` computes the attention as `record_attention` does without keeping anything
    (the exported graphs: fewer ONNX nodes than `nn.MultiheadAttention`'s export, same values to fp32
    rounding). Otherwise the blocks' own attention modules run.
    `edits` (training/model/edits.py) deletes patches, drops patch keys and scales the `embed` and
    `attn.l` writes here (written-out attention, `check_spatial_supported`); the CLT's feature and
    term edits are the replacement's (`CltSplice(..., edits=)`).
    `cls_only_last`: the last block runs its attention for the CLS query only (every token still a key
    and value) and its MLP (or `replace`, with h [B, 1, d]) at the CLS token only: everything the result
    holds is the CLS token's, and after the last block's keys and values nothing reads the patch tokens,
    so this leaves the result as it is (to fp32 rounding) and skips about 1/L of the blocks' arithmetic
    (`decompose`, so every exported graph). Off where a replacement records every token (`capture`)."""
    factors = bias = None
    if edits is not None:
        check_spatial_supported(visual)
        pixels = delete_patches(pixels, edits.patch_delete, edits.fill, tuple(int(g) for g in visual.grid_size))
    x = embed(visual, pixels)
    if edits is not None:
        factors = token_factors(edits, int(x.shape[1]))  # [B, N, T]
        bias = key_bias(edits.patch_key_drop, x.dtype)
        x = x * factors[:, :, :1]
    embed_cls = x[:, 0]
    attn_cls, mlp_cls, attn_values, attn_weights = [], [], [], []
    last = len(blocks(visual)) - 1
    for layer, block in enumerate(blocks(visual)):
        queries = 1 if cls_only_last and layer == last else None
        if record_attention or explicit_attention or edits is not None:
            a, v, w = attention_recorded(block, x, bias, queries=queries)
            if record_attention:
                attn_values.append(v)
                attn_weights.append(w)
        else:
            a = attention_out(block, x, queries=queries)
        if queries is not None:  # from here on only the CLS token
            x = x[:, :queries]
            factors = None if factors is None else factors[:, :queries]
        if factors is not None:
            a = a * factors[:, :, 1 + layer : 2 + layer]
        x = x + a
        h = mlp_in(block, x)
        fn = lambda t, b=block: mlp_out(b, t)  # noqa: E731
        m = fn(h) if replace is None else replace(layer, h, fn)
        x = x + m
        attn_cls.append(a[:, 0])
        mlp_cls.append(m[:, 0])
    cls = x[:, 0]
    recorded = (attn_values, torch.stack(attn_weights)) if record_attention else (None, None)
    return ForwardResult(project(visual, cls), cls, embed_cls, torch.stack(attn_cls), torch.stack(mlp_cls), *recorded)


@dataclass
class Capture:
    """Per-layer MLP inputs and outputs [L, B, T', d] at the requested tokens, and the embedding [B, D]."""

    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    embedding: torch.Tensor


@torch.no_grad()
def capture(visual: nn.Module, pixels: torch.Tensor, tokens: TokenSet = "all") -> Capture:
    """One forward pass recording every block's MLP input and output at the chosen tokens."""
    ins, outs = [], []

    def record(layer: int, h: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        m = mlp(h)
        ins.append(split_tokens(tokens, h)[0])
        outs.append(split_tokens(tokens, m)[0])
        return m

    res = forward(visual, pixels, record)
    return Capture(torch.stack(ins), torch.stack(outs), res.embedding)


class FixedOutputs:
    """Replacement that writes given MLP outputs [L, B, T', d] at the chosen tokens of the chosen layers."""

    def __init__(self, outputs: torch.Tensor, layers: Iterable[int], tokens: TokenSet = "all") -> None:
        self.outputs, self.layers, self.tokens = outputs, set(layers), tokens

    def __call__(self, layer: int, h: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if layer not in self.layers:
            return mlp(h)
        _, outside = split_tokens(self.tokens, h)
        return join_tokens(self.tokens, self.outputs[layer], mlp(outside))


class CltSplice:
    """Replacement by a CLT: at `layers`, the MLP output at `tokens` becomes the CLT reconstruction.

    Features of every layer are computed from this (spliced) run's own MLP inputs at `tokens`, and
    each source layer's decoded writes to later layers are summed into what those layers are owed
    until they run. With `observe=True` nothing is replaced: the real MLPs run and the reconstructions are only recorded.
    `encode` (layer, rows [N, d]) -> SparseCode stands in for `clt.encode` (e.g. with active sets held).
    `edits` (training/model/edits.py): each row's feature edits change its codes (`edit_code`: width
    k + E), its `clt.s` and `bias` term scales the writes, at the tokens replaced (`token_factors`).

    After a run: `codes[l]` (SparseCode over B*T' tokens), `writes[l]` raw-unit writes of source l
    [B, T', n_targets, d], `recon[l]` / `true[l]` [B, T', d] for every layer in `layers` (true only
    when observing).
    """

    def __init__(self, clt: nn.Module, layers: Iterable[int] | None = None, tokens: TokenSet = "cls", observe: bool = False,
                 encode: Callable[[int, torch.Tensor], Any] | None = None, edits: Edits | None = None) -> None:
        n = clt.cfg.n_layers
        if edits is not None and (observe or tokens == "patches"):
            raise ValueError("edits need a splice that replaces the MLPs at the CLS token or at every token (not observe)")
        self.clt, self.tokens, self.observe, self.edits = clt, tokens, observe, edits
        self.encode = encode or clt.encode
        self.layers = set(range(n)) if layers is None else set(layers)
        self.codes: list = []
        self.writes: list[torch.Tensor] = []
        self.recon: dict[int, torch.Tensor] = {}
        self.true: dict[int, torch.Tensor] = {}
        self._acc: torch.Tensor | None = None  # see `__call__`
        self._code_t: list[int] = []  # tokens per image inside the set, per entry of `codes` (static)

    def __call__(self, layer: int, h: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        clt = self.clt
        L = clt.cfg.n_layers
        inside, outside = split_tokens(self.tokens, h)
        t, d = int(inside.shape[1]), int(inside.shape[2])  # static in a traced graph (no shape arithmetic); the batch stays -1
        needed = any(j >= layer for j in self.layers)
        factors = None
        if self.edits is not None:
            # [B, t, T]; at the CLS token a term's factor is its scale
            factors = self.edits.term_scale[:, None] if self.tokens == "cls" else token_factors(self.edits, t)
        # The running sum of what is owed to layers layer..L-1: their decoder biases (raw units) and the
        # writes of the sources decoded so far, [.., L - layer, d]. One Add and one Slice per layer (in a
        # graph: a few nodes, not one Gather and one Add per (source, target) pair).
        acc = self._acc
        if acc is not None and acc.dim() == 4 and int(acc.shape[1]) > t:  # fewer tokens now (`forward`'s cls_only_last)
            acc = acc[:, :t]
        if layer == 0 or acc is None:
            acc = (clt.b_dec * clt.out_scale[:, None])[layer:]  # [L - layer, d]
            if factors is not None:  # the bias term's scale
                acc = acc * factors[:, :, 1 + 2 * L, None, None]
        if needed:
            code = self.encode(layer, inside.reshape(-1, d))
            if self.edits is not None:
                code = edit_code(code, layer, self.edits, t)
            w = clt.decode_source(layer, code)  # [N, n_t, d] normalised
            n_t = int(w.shape[1])
            w = (w * clt.out_scale[layer : layer + n_t, None]).reshape(-1, t, n_t, d)  # raw units
            if factors is not None:  # the clt.<layer> term's scale at each token
                w = w * factors[:, :, 1 + L + layer, None, None]
            self.codes.append(code)
            self._code_t.append(t)
            self.writes.append(w)
            if n_t == L - layer:
                acc = acc + w
            else:  # a per-layer transcoder: its source writes to its own layer only
                rest = acc[..., n_t:, :]
                acc = torch.cat([acc[..., :n_t, :] + w, rest.expand(*w.shape[:2], *rest.shape[-2:])], -2)
        recon, self._acc = acc[..., 0, :], acc[..., 1:, :]
        if layer not in self.layers:
            return mlp(h)
        recon = recon.expand_as(inside) if recon.dim() < 3 else recon
        self.recon[layer] = recon
        if self.observe:
            m = mlp(h)
            self.true[layer] = split_tokens(self.tokens, m)[0]
            return m
        return join_tokens(self.tokens, recon, mlp(outside) if outside.shape[1] else outside)

    def cls_code(self, layer: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) [B, k] of the CLT code of the CLS token at `layer` after a run (CLS is row 0 of
        each image's rows of `codes[layer]`)."""
        code, t = self.codes[layer], self._code_t[layer]
        if t == 1:  # one row per image (the CLS token's)
            return code.idx, code.val
        k = code.idx.shape[-1]
        return code.idx.reshape(batch, t, k)[:, 0], code.val.reshape(batch, t, k)[:, 0]


def spliced_forward(
    visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, layers: Iterable[int] | None = None, tokens: TokenSet = "all"
) -> ForwardResult:
    """Embedding of the ViT whose MLPs at `layers` (default: all) and `tokens` are replaced by the CLT."""
    return forward(visual, pixels, CltSplice(clt, layers, tokens))
