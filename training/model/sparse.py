"""Sparse autograd kernels of the CLT: decoding and encoder gradients that touch only active features.

N tokens, k active features per token, F features, d = d_model. None of these ever forms a dense
[N, F] x [F, d] product or keeps a dense [N, F] pre-activation alive for backward; the weight
gradients are `scatter_rows` (one `embedding_bag` whose bags are the features, 2*N*k*M FLOPs).
`CrossLayerTranscoder` (clt.py) is their only user; `sparse_decode(..., gather=True)` is the
exportable spelling the ONNX graph uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


class GatherPreactAll(torch.autograd.Function):
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


class DecodeSourceInto(torch.autograd.Function):
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


class JumpReLU(torch.autograd.Function):
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
