"""Faithfulness and cost of the spatial maps (where in the image; docs/spatial.md).

Deletion test (`deletion_test`). For every image, the class c the model predicts (the model being
explained: the CLT-spliced ViT in `mode`, as served) and a ranking of the P patches by a method's
score for c, highest first. Patches are deleted in that order, replaced by the dataset mean (per
channel, in preprocessed pixels), and the model re-run: one patch at a time on grids of at most 16
patches, in steps of 5 % of the patches on finer grids. Recorded per step: the mean logit of c and the
accuracy (prediction == true label). Methods on the same images and the same deletion budget:
- `ours`: the spatial map of c summed over layers (`decompose(..., spatial_top_k=1)`, patch cells).
- `random`: a random order per image (mean curve over `random_seeds` seeds).
- `ig`: Captum's Integrated Gradients of c's logit w.r.t. the pixels (`ig_steps` steps, Gauss-Legendre,
  the dataset-mean image as baseline), summed over channels and each patch's pixels.
- `total_effect`: the total-effect map served by `/explain?total_effect=true` (`bundle.patches`, method
  `keep_one`): c's logit on the all-fill image with only patch p kept, less its logit on the all-fill
  image, for every p: P + 1 edited copies of the image, one batch, the same fill as the deletion.
- `delete_one` (only when asked for, `methods`): the other single-patch total effect, c's logit on the
  image less its logit without patch p (P + 1 copies); it measures why `keep_one` is the one served.
AUC: trapezoid over the deleted fraction in [0, 1] of the mean logit curve normalised to 1 before and
0 after deleting everything (every method ends at the same all-mean image), so a curve that falls at
once has AUC ~0 and a linear fall 0.5; lower is faster. Accuracy curves get the same trapezoid, raw.

Time per explanation (`explanation_times`): one image per call, median over images, CPU time of
this thread (robust to other processes on a shared machine) and wall time: `forward` (logits only,
the unexplained model), `ours` (the whole `decompose` with spatial maps, eager), `ours_onnx` (the
bundle's fused graph in ONNX Runtime, when given), `ig` (Integrated Gradients, the same steps),
`total_effect` (its P + 1 copies built and run as one batch in eager PyTorch, the scores combined) and
`total_effect_onnx` (the same rows through the bundle's graph, logits fetched, when given).
`ours` holds each CLT source layer's total write precomputed, as the exported graph does.

The maps are the direct path through attention: what each attention layer read from each patch
and wrote straight into the CLS token. Effects that reach the CLS token through later layers (a patch
changing what a later MLP/CLT or attention computes) are in other terms; Integrated Gradients sees
those total effects. `direct_share` reports how much of the predicted logit the attention terms carry.

Where the maps fall behind IG, four more methods on the same images say why (`analysis=True`,
`cltvit-eval-spatial --gap-analysis`):
- `clt_paths`: the maps plus every path through the CLT features at the CLS token. With the CLS
  query's softmax weights, every LayerNorm scale at the CLS token and the CLT's active features held
  at the image's values, the CLS stream is affine in the patch tokens' attention values, so each cell
  (layer, patch) is <value, d logit / d value> and the cells add up exactly to the logit less the
  part that reads no patch (`cls_stream_cells`; tested). It is ours with the CLT's share of the logit
  split over the patches too.
- `gradient`: gradient x (image - fill) of the logit at the pixels, per patch: a total effect to
  first order, one backward pass. IG is the same integrated along the path from the fill to the image.
- `linearised`: every path through every token, split exactly. With every nonlinear part held at the
  image's values (each LayerNorm's scale, every softmax weight, the CLT's active sets, the real MLPs'
  GELU gates z -> gelu(z)/z, the embedding's norm) the model is affine in the pixels
  (`linearised_logits`), so gradient x (image - fill) of that affine model splits
  logit(image) - logit(fill, everything held) exactly over the patches (the conservative propagation
  of Ali et al., ICML 2022, one backward pass).
- `baseline_relative`: ours minus the fill image's own map of the same class (`baseline_maps`): the
  direct path's split of the difference to the all-deleted image, a constant table per class.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from bundle.patches import fill_patches, patch_pixel_masks, total_effect_rows, total_effect_scores

from ..model.clt import SparseCode
from ..model.decompose import Mode, decompose, final_ln_map, frozen_inv_sigma, held_layernorm, splice_for_mode
from ..model.vit import blocks, check_spatial_supported, forward, self_attention
from .metrics import EvaluationError

METHODS = ("ours", "random", "ig", "total_effect")
EXTRA_METHODS = ("delete_one",)  # run only when `SpatialEvalConfig.methods` names them
ANALYSIS_METHODS = ("clt_paths", "gradient", "linearised", "baseline_relative")
TOTAL_EFFECT_CHUNK = 2048  # edited copies per forward pass of the deletion test (memory bound on 7x7 grids)


@dataclass
class SpatialEvalConfig:
    """`images`: how many of the given images the deletion test uses (None: all); `time_images` /
    `time_images_ig`: images timed per method; `ig_steps`: Integrated Gradients steps; `mode`: the
    model explained (as the bundle serves it)."""

    images: int | None = None
    analysis: bool = False  # also the `ANALYSIS_METHODS` (module docstring)
    methods: tuple[str, ...] = METHODS  # deletion-test methods of METHODS + EXTRA_METHODS (the analysis ones come with `analysis`)
    batch_size: int = 250
    random_seeds: int = 3
    ig_steps: int = 50
    ig_batch: int = 8
    mode: Mode = "cls"
    time_images: int = 50
    time_images_ig: int = 20
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- the model and its patches
def model_logits(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, scale: float,
                 mode: Mode) -> torch.Tensor:
    """Logits [B, C] of the model `decompose` explains in `mode` (differentiable; no decomposition)."""
    e = forward(visual, pixels, splice_for_mode(clt, mode)).embedding
    return scale * (e / e.norm(dim=-1, keepdim=True)) @ text.T


def patch_geometry(visual: nn.Module) -> tuple[int, int, int, int]:
    """(grid rows, grid columns, patch height, patch width) of an open_clip ViT."""
    gh, gw = (int(g) for g in visual.grid_size)
    ph, pw = (int(p) for p in visual.patch_size)
    return gh, gw, ph, pw


def patch_masks(visual: nn.Module) -> torch.Tensor:
    """bool [P, H, W]: the pixels of each patch (row-major, as the spatial maps' tokens 1..P; `bundle.patches`)."""
    gh, gw, ph, pw = patch_geometry(visual)
    return torch.from_numpy(patch_pixel_masks((gh, gw), (gh * ph, gw * pw)))


def deletion_steps(n_patches: int) -> list[int]:
    """Patches deleted at each step: every count up to 16 patches, else 0, 5 %, ..., 100 % of them."""
    if n_patches <= 16:
        return list(range(n_patches + 1))
    return sorted({int(round(f * n_patches / 20)) for f in range(21)})


# ---------------------------------------------------------------------- scores per method
def ig_scores(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, scale: float, mode: Mode,
              target: torch.Tensor, baseline: torch.Tensor, steps: int, masks: torch.Tensor) -> torch.Tensor:
    """Integrated Gradients (Captum) of the target logits w.r.t. pixels [B, 3, H, W], summed per patch: [B, P]."""
    try:
        from captum.attr import IntegratedGradients  # optional `eval` extra, needed only for this baseline
    except ImportError:
        raise EvaluationError("the Integrated Gradients baseline needs captum: pip install 'cltvit[eval]'") from None
    ig = IntegratedGradients(lambda x: model_logits(visual, clt, x, text, scale, mode))
    attr = ig.attribute(pixels, baselines=baseline.expand_as(pixels), target=target, n_steps=steps,
                        internal_batch_size=steps * len(pixels))
    per_pixel = attr.detach().sum(1)  # [B, H, W]
    return torch.einsum("bhw,phw->bp", per_pixel, masks.to(per_pixel.dtype))


@torch.no_grad()
def total_effect_scores_of(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, scale: float,
                           mode: Mode, target: torch.Tensor, fill: torch.Tensor, method: str = "keep_one",
                           chunk: int = TOTAL_EFFECT_CHUNK) -> torch.Tensor:
    """The total-effect map (`bundle.patches`, `method`) of the target classes [B] for pixels [B, 3, H, W]:
    each image's P + 1 edited copies (the per-channel `fill` [3]) through the model, combined: [B, P],
    logit units. The rows of all images run in batches of at most `chunk` copies."""
    gh, gw, _, _ = patch_geometry(visual)
    fill_np = fill.double().cpu().numpy()
    rows = np.concatenate([total_effect_rows(x, fill_np, (gh, gw), method) for x in pixels.cpu().numpy()])  # [B R, 3, H, W]
    R = len(rows) // len(pixels)
    logits = torch.cat([model_logits(visual, clt, torch.from_numpy(rows[i : i + chunk]).to(pixels.device), text, scale, mode)
                        for i in range(0, len(rows), chunk)])  # [B R, C]
    lg = logits.view(len(pixels), R, -1).gather(2, target.view(-1, 1, 1).expand(-1, R, 1))[..., 0].cpu()  # [B, R]
    return torch.stack([torch.from_numpy(total_effect_scores(lg[b, :, None].numpy(), method)[0]) for b in range(len(lg))])


def gradient_scores(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, scale: float, mode: Mode,
                    target: torch.Tensor, fill: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Gradient x (pixels - fill) of the target logits, pixels [B, 3, H, W], fill [3], summed per patch: [B, P]."""
    return _gradient_times_delta(lambda x: model_logits(visual, clt, x, text, scale, mode), pixels, target, fill, masks)


def linearised_scores(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, scale: float,
                      mode: Mode, target: torch.Tensor, fill: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Gradient x (pixels - fill) of the target logits of `linearised_logits` (held at `pixels`), summed
    per patch: [B, P]. The model being affine there, the scores sum to logit(pixels) - logit(fill, held)."""
    return _gradient_times_delta(lambda x: linearised_logits(visual, clt, x, text, scale, mode)[0], pixels, target, fill,
                                 masks)


def _gradient_times_delta(logits: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, target: torch.Tensor,
                          fill: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    x = pixels.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(logits(x).gather(1, target[:, None]).sum(), x)
    per_pixel = (grad * (pixels - fill.view(1, 3, 1, 1))).sum(1)  # [B, H, W]
    return torch.einsum("bhw,phw->bp", per_pixel, masks.to(per_pixel.dtype))


@torch.no_grad()
def baseline_maps(visual: nn.Module, clt: nn.Module, baseline: torch.Tensor, text: torch.Tensor, scale: float,
                  mode: Mode) -> torch.Tensor:
    """The spatial map summed over layers of the image `baseline` [1, 3, H, W] for every class: [C, P]."""
    C = int(text.shape[0])
    d = decompose(visual, clt, baseline, text, scale, mode, spatial_top_k=C)
    table = torch.zeros(C, d.spatial.tokens.shape[-1] - 1)
    table[d.spatial.classes[0]] = d.spatial.tokens[0, :, :, 1:].sum(1)
    return table


class Held:
    """The values of a forward pass's nonlinear parts (LayerNorm scales, softmax weights, active sets,
    gates), recorded in call order on one input (`values` None) or replayed in the same order on
    another (`values` a recording): with them held, the pass is affine in its input."""

    def __init__(self, values: list[Any] | None = None) -> None:
        self.values: list[Any] = [] if values is None else values
        self._replay = iter(values) if values is not None else None

    def __call__(self, compute: Callable[[], Any]) -> Any:
        if self._replay is not None:
            return next(self._replay)
        v = compute()
        v = v.detach() if isinstance(v, torch.Tensor) else SparseCode(v.idx, v.val.detach())
        self.values.append(v)
        return v


def linearised_logits(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, scale: float,
                      mode: Mode, held: Held | None = None) -> tuple[torch.Tensor, Held]:
    """The logits [B, C] of the model `decompose` explains in `mode`, from pixels [B, 3, H, W], with every
    nonlinear part held (`Held`; None: at this call's own values, so the logits are the model's): each
    LayerNorm's 1/sigma, the softmax weights [B, H, T, T], the CLT's active sets, each real MLP's gate
    gelu(z)/z per unit, the image embedding's norm. Affine in the pixels (module docstring, `linearised`)."""
    check_spatial_supported(visual)
    held = held or Held()

    def ln(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x if isinstance(mod, nn.Identity) else held_layernorm(mod, x, held(lambda: frozen_inv_sigma(mod, x)))

    def linear_mlp(l: int, blk: nn.Module, t: torch.Tensor) -> torch.Tensor:
        mlp = blk.mlp
        if not all(hasattr(mlp, name) for name in ("c_fc", "gelu", "c_proj")) or len(mlp) != 3:
            raise EvaluationError(f"block {l}: the linearised model needs open_clip's MLP (c_fc, gelu, c_proj)")
        z = mlp.c_fc(t)
        # a unit with z == 0 adds nothing whatever its gate: 0 avoids dividing by it
        gate = held(lambda: torch.where(z != 0, mlp.gelu(z) / torch.where(z != 0, z, torch.ones_like(z)), 0.0))
        return blk.ls_2(mlp.c_proj(z * gate))

    splice = splice_for_mode(clt, mode, encode=lambda l, rows: clt.held_code(l, rows, held(lambda: clt.encode(l, rows))))
    B = int(pixels.shape[0])
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, P, d]
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1).expand(B, 1, -1), x], 1) + visual.positional_embedding
    x = ln(visual.ln_pre, x)
    for l, blk in enumerate(blocks(visual)):
        h = ln(blk.ln_1, x)
        x = x + self_attention(blk, h, held(lambda: self_attention(blk, h)[2]))[0]
        x = x + splice(l, ln(blk.ln_2, x), lambda t, l=l, blk=blk: linear_mlp(l, blk, t))
    c = x[:, 0]
    e = final_ln_map(visual, c, held(lambda: frozen_inv_sigma(visual.ln_post, c)))
    norm = held(lambda: e.norm(dim=-1, keepdim=True))
    return scale * (e / norm) @ text.T, held


def cls_stream_logits(visual: nn.Module, clt: nn.Module, embed_cls: torch.Tensor, values: torch.Tensor,
                      weights: torch.Tensor, codes: list[SparseCode], text: torch.Tensor, scale: float,
                      frozen: list[torch.Tensor] | None = None, through_clt: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits [B, C] as an affine function of the patch tokens' attention values `values` [L, B, P, d]
    (before the value bias), everything else held at one image's values: the CLS embedding embed_cls
    [B, d], the CLS query's softmax weights [L, B, H, 1 + P], the CLT's active features at the CLS token
    (`codes`, one `SparseCode` [B, k] per layer: their indices, and which are non-zero), and every
    LayerNorm scale at the CLS token (`frozen`: the list this function returns, of 1/sigma [B, 1] in
    order LN1, LN2 per layer, ln_post, then ||e|| [B, 1]; None takes them from this call's own CLS
    stream, right when `values` are the image's). `through_clt=False` cuts the CLS stream after each
    attention block (later blocks and the CLT read it as a constant): only the direct path remains."""
    L = clt.cfg.n_layers
    held = Held(frozen)

    def scale_of(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return held(lambda: frozen_inv_sigma(ln, x))

    c = embed_cls
    pending: list[list[torch.Tensor]] = [[] for _ in range(L)]
    for l, blk in enumerate(blocks(visual)):
        attn = blk.attn
        d, H = attn.embed_dim, attn.num_heads
        src = c if through_clt else c.detach()
        v0 = nn.functional.linear(held_layernorm(blk.ln_1, src, scale_of(blk.ln_1, c)), attn.in_proj_weight[2 * d :])
        v = torch.cat([v0[:, None], values[l]], 1)  # [B, T, d]
        if attn.in_proj_bias is not None:
            v = v + attn.in_proj_bias[2 * d :]
        B, T = int(v.shape[0]), int(v.shape[1])
        mixed = torch.einsum("bht,bthe->bhe", weights[l], v.reshape(B, T, H, d // H)).reshape(B, d)
        c = c + blk.ls_1(attn.out_proj(mixed))
        h = held_layernorm(blk.ln_2, c if through_clt else c.detach(), scale_of(blk.ln_2, c))
        w = clt.decode_source(l, clt.held_code(l, h, codes[l]))  # [B, n_t, d], normalised
        w = w * clt.out_scale[l : l + int(w.shape[1])][None, :, None]
        for off in range(int(w.shape[1])):
            pending[l + off].append(w[:, off])
        c = c + clt.b_dec[l] * clt.out_scale[l] + sum(pending[l])
    e = final_ln_map(visual, c, scale_of(visual.ln_post, c))
    norm = held(lambda: e.norm(dim=-1, keepdim=True))
    return scale * (e / norm) @ text.T, held.values


def cls_stream_cells(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, scale: float,
                     mode: Mode, target: torch.Tensor, through_clt: bool = True) -> torch.Tensor:
    """Per layer and patch, the target logit's share through the CLS stream [B, L, P] (`clt_paths` of the
    module docstring): <value, d logit / d value> for `cls_stream_logits`, whose logits are affine in the
    values, so the cells sum to logit(values) - logit(values = 0) exactly. `through_clt=False` gives the
    direct-path cells, the spatial maps' patch cells (tested equal to `decompose`'s)."""
    if mode == "observe":
        raise EvaluationError("the CLT-path maps need mode cls or all: in observe mode the CLS token runs the real MLPs")
    check_spatial_supported(visual)
    splice = splice_for_mode(clt, mode)
    with torch.no_grad():
        res = forward(visual, pixels, splice, record_attention=True)
    codes = [SparseCode(*splice.cls_code(l, len(pixels))) for l in range(clt.cfg.n_layers)]
    values = res.attn_values[:, :, 1:].detach().clone().requires_grad_()
    logits, _ = cls_stream_logits(visual, clt, res.embed_cls, values, res.attn_weights, codes, text, scale,
                                  through_clt=through_clt)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), values)
    return (grad * values).sum(-1).permute(1, 0, 2).detach()


# ---------------------------------------------------------------------- deletion
@torch.no_grad()
def deletion_curves(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                    scale: float, mode: Mode, target: torch.Tensor, order: torch.Tensor, fill: torch.Tensor,
                    masks: torch.Tensor, steps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logit of `target` [B, S], correct [B, S] bool) after deleting the first k patches of `order`
    [B, P] for each k in `steps`; deleted pixels take the per-channel `fill` [3]."""
    logit, correct = [], []
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))  # rank of every patch
    grid = patch_geometry(visual)[:2]
    for k in steps:
        x = torch.from_numpy(fill_patches(pixels.cpu().numpy(), (rank < k).cpu().numpy(), fill.double().cpu().numpy(), grid))
        x = x.to(pixels.device)
        lg = model_logits(visual, clt, x, text, scale, mode)
        logit.append(lg.gather(1, target[:, None])[:, 0])
        correct.append(lg.argmax(1) == labels)
    return torch.stack(logit, 1).numpy(), torch.stack(correct, 1).numpy()


def normalised_auc(curve: np.ndarray, fractions: np.ndarray) -> float:
    """Trapezoid area over `fractions` of `curve` rescaled to 1 at the start and 0 at the end."""
    span = curve[0] - curve[-1]
    y = (curve - curve[-1]) / span if abs(span) > 1e-12 else np.ones_like(curve)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(fractions)) / 2)


def raw_auc(curve: np.ndarray, fractions: np.ndarray) -> float:
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(fractions)) / 2)


def deletion_test(backbone: Any, clt: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                  cfg: SpatialEvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The deletion test of the module docstring on `pixels` [N, 3, H, W] / `labels` [N]; text [C, D]
    normalised. Returns curves, AUCs, their ratios and the direct (attention) share of the logit."""
    visual, scale, mode = backbone.visual, float(backbone.logit_scale), cfg.mode
    n = len(pixels) if cfg.images is None else min(cfg.images, len(pixels))
    pixels, labels = pixels[:n], labels[:n]
    masks = patch_masks(visual)
    P = masks.shape[0]
    steps = deletion_steps(P)
    fractions = np.array(steps, dtype=np.float64) / P
    fill = pixels.mean(dim=(0, 2, 3))  # dataset mean per channel, preprocessed
    baseline = fill.view(1, 3, 1, 1).expand(1, 3, *pixels.shape[2:])
    gen = torch.Generator().manual_seed(cfg.seed)
    unknown = sorted(set(cfg.methods) - set(METHODS + EXTRA_METHODS))
    if unknown:
        raise EvaluationError(f"unknown deletion-test method(s) {unknown}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    methods = tuple(cfg.methods) + (ANALYSIS_METHODS if cfg.analysis else ())
    fill_maps = baseline_maps(visual, clt, baseline, text, scale, mode) if cfg.analysis else None
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in methods}
    direct = []
    t0 = time.perf_counter()
    for i in range(0, n, cfg.batch_size):
        px, y = pixels[i : i + cfg.batch_size], labels[i : i + cfg.batch_size]
        with torch.no_grad():
            d = decompose(visual, clt, px, text, scale, mode, spatial_top_k=1)
        target = d.spatial.classes[:, 0]  # the predicted class
        ours = d.spatial.tokens[:, 0, :, 1:].sum(1)  # [B, P]: its map summed over layers
        L = backbone.n_layers
        c = d.contributions.gather(2, target[:, None, None].expand(-1, d.contributions.shape[1], 1))[..., 0]  # [B, T]
        direct.append((c[:, 1 : 1 + L].abs().sum(1) / c.abs().sum(1)).numpy())
        orders = {"ours": ours.argsort(dim=1, descending=True, stable=True)} if "ours" in methods else {}
        if "ig" in methods:
            parts = []
            for j in range(0, len(px), cfg.ig_batch):
                sl = slice(j, j + cfg.ig_batch)
                scores = ig_scores(visual, clt, px[sl], text, scale, mode, target[sl], baseline, cfg.ig_steps, masks)
                parts.append(scores.argsort(dim=1, descending=True, stable=True))
            orders["ig"] = torch.cat(parts)
        for m, how in (("total_effect", "keep_one"), ("delete_one", "delete_one")):
            if m in methods:
                te = total_effect_scores_of(visual, clt, px, text, scale, mode, target, fill, how)
                orders[m] = te.argsort(dim=1, descending=True, stable=True)
        if cfg.analysis:
            cells = cls_stream_cells(visual, clt, px, text, scale, mode, target)
            orders["clt_paths"] = cells.sum(1).argsort(dim=1, descending=True, stable=True)
            grad = gradient_scores(visual, clt, px, text, scale, mode, target, fill, masks)
            orders["gradient"] = grad.argsort(dim=1, descending=True, stable=True)
            lin = linearised_scores(visual, clt, px, text, scale, mode, target, fill, masks)
            orders["linearised"] = lin.argsort(dim=1, descending=True, stable=True)
            orders["baseline_relative"] = (ours - fill_maps[target]).argsort(dim=1, descending=True, stable=True)
        for m in orders:
            curves[m].append(deletion_curves(visual, clt, px, y, text, scale, mode, target, orders[m], fill, masks, steps))
        for _ in range(cfg.random_seeds if "random" in methods else 0):
            rnd = torch.rand(len(px), P, generator=gen).argsort(1)
            curves["random"].append(deletion_curves(visual, clt, px, y, text, scale, mode, target, rnd, fill, masks, steps))
        log(f"spatial eval: deletion on {min(i + cfg.batch_size, n)}/{n} images ({time.perf_counter() - t0:.0f} s)")
    out: dict[str, Any] = {"images": n, "patches": P, "steps": steps, "fractions": fractions.tolist(), "methods": {}}
    for m, parts in curves.items():
        if m == "random":  # per batch, `random_seeds` consecutive runs: average them per image
            logit = _mean_over_seeds([p[0] for p in parts], cfg.random_seeds)
            correct = _mean_over_seeds([p[1].astype(np.float64) for p in parts], cfg.random_seeds)
        else:
            logit = np.concatenate([p[0] for p in parts])
            correct = np.concatenate([p[1] for p in parts]).astype(np.float64)
        mean_logit, accuracy = logit.mean(0), correct.mean(0)
        out["methods"][m] = {"logit": mean_logit.tolist(), "accuracy": accuracy.tolist(),
                             "auc_logit": normalised_auc(mean_logit, fractions), "auc_accuracy": raw_auc(accuracy, fractions)}
    ms = out["methods"]
    out["ratios"] = {}
    for m in ms:  # every method against random and IG, when both ran (e.g. `total_effect_vs_ig_logit`)
        for ref in ("random", "ig"):
            if ref in ms and m != ref:
                for unit in ("logit", "accuracy"):
                    out["ratios"][f"{m}_vs_{ref}_{unit}"] = ms[m][f"auc_{unit}"] / ms[ref][f"auc_{unit}"]
    share = np.concatenate(direct)
    out["direct_share"] = {"mean": float(share.mean()), "median": float(np.median(share))}
    out["seconds"] = time.perf_counter() - t0
    return out


def _mean_over_seeds(parts: list[np.ndarray], seeds: int) -> np.ndarray:
    """Per batch the `seeds` consecutive arrays [B, S] averaged, batches concatenated: [N, S]."""
    return np.concatenate([np.mean(parts[i : i + seeds], 0) for i in range(0, len(parts), seeds)])


# ---------------------------------------------------------------------- time per explanation
def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) of one call of fn."""
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def explanation_times(backbone: Any, clt: nn.Module, pixels: torch.Tensor, text: torch.Tensor, cfg: SpatialEvalConfig,
                      onnx_model: str | Path | None = None, spatial_top_k: int = 5,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Seconds per explanation, one image per call (module docstring), medians over images; the ratios
    ig / ours (eager) and ig / ours_onnx. `onnx_model`: a fused graph (a bundle's model.onnx) to time in
    ONNX Runtime with one thread, fed the same images."""
    visual, scale, mode = backbone.visual, float(backbone.logit_scale), cfg.mode
    fill = pixels.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    baseline = fill.expand(1, 3, *pixels.shape[2:])
    # each source layer's total write, summed over its targets once, as the exported graph holds it
    # (export.fused.FusedExplainer); eager `decompose` would otherwise re-sum every decoder per call
    with torch.no_grad():
        writes = [clt.total_write_matrix(i).detach().clone() for i in range(clt.cfg.n_layers)]

    def ours(x: torch.Tensor) -> Any:
        clt.total_write_matrix = writes.__getitem__  # instance attribute shadows the method for this call
        try:
            return decompose(visual, clt, x, text, scale, mode, spatial_top_k=spatial_top_k)
        finally:
            del clt.total_write_matrix

    runs: dict[str, Callable[[torch.Tensor], Any]] = {
        "forward": lambda x: model_logits(visual, clt, x, text, scale, mode),
        "ours": ours,
    }
    if onnx_model is not None:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(onnx_model), so, providers=["CPUExecutionProvider"])
        text_np = text.numpy().astype(np.float32)
        runs["ours_onnx"] = lambda x: sess.run(None, {"pixels": x.numpy(), "text_embeddings": text_np})

    def ig_one(x: torch.Tensor) -> Any:
        with torch.no_grad():
            target = model_logits(visual, clt, x, text, scale, mode).argmax(1)
        return ig_scores(visual, clt, x, text, scale, mode, target, baseline, cfg.ig_steps, patch_masks(visual))

    runs["ig"] = ig_one
    gh, gw, _, _ = patch_geometry(visual)
    fill_np = fill.view(3).double().numpy()

    def total_effect_one(x: torch.Tensor) -> Any:  # one image: its P + 1 copies as one batch, the predicted class's map
        rows = torch.from_numpy(total_effect_rows(x[0].numpy(), fill_np, (gh, gw)))
        lg = model_logits(visual, clt, torch.cat([x, rows]), text, scale, mode).numpy()
        return total_effect_scores(lg[1:, [int(lg[0].argmax())]])

    runs["total_effect"] = total_effect_one
    if onnx_model is not None:
        def total_effect_onnx(x: torch.Tensor) -> Any:  # the same rows through the graph, logits fetched
            rows = np.concatenate([x.numpy(), total_effect_rows(x[0].numpy(), fill_np, (gh, gw))])
            (lg,) = sess.run(["logits"], {"pixels": rows, "text_embeddings": text_np})
            return total_effect_scores(lg[1:, [int(lg[0].argmax())]])

        runs["total_effect_onnx"] = total_effect_onnx
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "ig_steps": cfg.ig_steps, "methods": {}}
    for name, fn in runs.items():
        n = min(len(pixels), cfg.time_images_ig if name in ("ig", "total_effect", "total_effect_onnx") else cfg.time_images)
        cpu, wall = [], []
        with torch.no_grad() if name != "ig" else torch.enable_grad():
            for _ in range(1 if name == "ig" else 3):  # warm-up (first-call allocations, ORT's arena)
                fn(pixels[:1])
            for i in range(n):
                c, w = _timed(lambda: fn(pixels[i : i + 1]))  # noqa: B023 (called at once)
                cpu.append(c)
                wall.append(w)
        out["methods"][name] = {"images": n, "cpu_s": float(np.median(cpu)), "wall_s": float(np.median(wall))}
        log(f"spatial eval: {name}: {out['methods'][name]['cpu_s'] * 1e3:.2f} ms CPU per image (median of {n})")
    m = out["methods"]
    out["ratios"] = {"ig_vs_ours": m["ig"]["cpu_s"] / m["ours"]["cpu_s"], "ours_vs_forward": m["ours"]["cpu_s"] / m["forward"]["cpu_s"],
                     "total_effect_vs_ig": m["total_effect"]["cpu_s"] / m["ig"]["cpu_s"]}
    if "ours_onnx" in m:
        out["ratios"]["ig_vs_ours_onnx"] = m["ig"]["cpu_s"] / m["ours_onnx"]["cpu_s"]
        out["ratios"]["total_effect_onnx_vs_ig"] = m["total_effect_onnx"]["cpu_s"] / m["ig"]["cpu_s"]
    return out


# ---------------------------------------------------------------------- report
def evaluate_spatial(backbone: Any, clt: nn.Module, pixels: torch.Tensor, labels: torch.Tensor | None, text: torch.Tensor,
                     cfg: SpatialEvalConfig | None = None, *, onnx_model: str | Path | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The deletion test (when `labels` are given; skipped for random-weight models) and the times per
    explanation, as one report section (`render_markdown` prints it)."""
    cfg = cfg or SpatialEvalConfig()
    if clt.cfg.n_layers != backbone.n_layers:
        raise EvaluationError(f"CLT has L={clt.cfg.n_layers}, the backbone L={backbone.n_layers}")
    if cfg.analysis and cfg.mode == "observe":
        raise EvaluationError("the gap analysis needs mode cls or all: in observe mode the CLS token runs the real MLPs")
    clt = clt.eval()
    gh, gw, ph, pw = patch_geometry(backbone.visual)
    out: dict[str, Any] = {"config": cfg.to_dict(), "grid": [gh, gw], "patch": [ph, pw], "model": backbone.spec.model}
    if labels is not None:
        out["deletion"] = deletion_test(backbone, clt, pixels, labels, text, cfg, log)
    out["times"] = explanation_times(backbone, clt, pixels, text, cfg, onnx_model=onnx_model, log=log)
    return out


def render_markdown(section: dict[str, Any], title: str = "Where in the image: faithfulness and cost") -> str:
    """An evaluation section (from `evaluate_spatial`) as Markdown tables."""
    cfg = section["config"]
    lines = [f"## {title}", "",
             f"Model `{section['model']}`, {section['grid'][0]}x{section['grid'][1]} patches of "
             f"{section['patch'][0]}x{section['patch'][1]} pixels, mode `{cfg['mode']}`.", ""]
    dl = section.get("deletion")
    if dl:
        ms, r = dl["methods"], dl["ratios"]
        lines += [f"Deletion test on {dl['images']} images ({len(dl['steps']) - 1} steps; deleted patches take the dataset "
                  f"mean; random: mean of {cfg['random_seeds']} seeds; IG: {cfg['ig_steps']} steps, mean-image baseline). "
                  "AUC of the normalised logit curve (1 = no drop until everything is deleted, lower falls faster) and of "
                  "the accuracy curve:", "",
                  "| method | AUC logit | AUC accuracy | logit after 1 / 2 / 4 patches | accuracy after 1 / 2 / 4 patches |",
                  "|---|---|---|---|---|"]
        steps = dl["steps"]
        at = [steps.index(k) if k in steps else None for k in (1, 2, 4)]
        for m in ms:
            c = ms[m]
            lg = " / ".join(f"{c['logit'][i]:.2f}" if i is not None else "-" for i in at)
            ac = " / ".join(f"{100 * c['accuracy'][i]:.1f}%" if i is not None else "-" for i in at)
            lines.append(f"| {m} | {c['auc_logit']:.3f} | {c['auc_accuracy']:.3f} | {lg} | {ac} |")
        first = next(iter(ms.values()))
        lines += ["", f"Before deletion: mean logit {first['logit'][0]:.2f}, accuracy {100 * first['accuracy'][0]:.2f}%. "
                  f"The attention terms carry {100 * dl['direct_share']['mean']:.1f}% of the predicted logit's |terms| on "
                  f"average (median {100 * dl['direct_share']['median']:.1f}%).", ""]
        said = [f"{m} / {ref} **{r[f'{m}_vs_{ref}_logit']:.3f}** (accuracy {r[f'{m}_vs_{ref}_accuracy']:.3f})"
                for m in ("ours", "total_effect", "delete_one") for ref in ("random", "ig") if f"{m}_vs_{ref}_logit" in r]
        if said:
            lines += ["AUC ratios, logit (accuracy): " + "; ".join(said) + ". Targets: ours / random <= 0.5, ours / IG <= 1, "
                      "total_effect / IG <= 1.", ""]
        if "clt_paths" in ms and "ig" in ms:
            lines += [f"Gap analysis, logit AUC / IG's: the maps with the paths through the CLT at the CLS token split "
                      f"over the patches too (clt_paths) {r['clt_paths_vs_ig_logit']:.3f}; gradient x (image - fill), a "
                      f"first-order total effect, {r['gradient_vs_ig_logit']:.3f}; every path split exactly with every "
                      f"nonlinearity held (linearised) {r['linearised_vs_ig_logit']:.3f}; the maps less the fill image's "
                      f"(baseline_relative) {r['baseline_relative_vs_ig_logit']:.3f}.", ""]
    tm = section["times"]
    lines += [f"Time per explanation, one image per call, median CPU time of one thread ({tm['threads']} torch thread(s)):", "",
              "| method | ms per image (CPU) | ms (wall) | images |", "|---|---|---|---|"]
    for name, m in tm["methods"].items():
        lines.append(f"| {name} | {m['cpu_s'] * 1e3:.2f} | {m['wall_s'] * 1e3:.2f} | {m['images']} |")
    rr = tm["ratios"]
    lines += ["", f"IG / ours (eager): **{rr['ig_vs_ours']:.0f}x**" + (f", IG / ours (ONNX Runtime): **{rr['ig_vs_ours_onnx']:.0f}x**"
              if "ig_vs_ours_onnx" in rr else "") + f" (target >= 50x); ours / unexplained forward: {rr['ours_vs_forward']:.2f}x. "
              f"Total-effect map / IG (eager): **{rr['total_effect_vs_ig']:.3f}**" + (
                  f", through ONNX Runtime: **{rr['total_effect_onnx_vs_ig']:.3f}**" if "total_effect_onnx_vs_ig" in rr else "")
              + " (target <= 0.5).", ""]
    return "\n".join(lines)
