"""Contrastive training of the reference CLIP (`cltvit-ref`) on Fashion-MNIST, with no network.

The images are tensorised once (uint8 [N, 28, 28] -> normalised float [B, 3, 28, 28] per batch, no
PIL per step); `tensorise` equals open_clip's eval transform for 28x28 inputs (tested).

Loss (UniCL / supervised CLIP): every step encodes all C*M captions (C classes x M templates) and a
batch of B images. Image->text: softmax over the C*M captions, positives = the M captions of the
image's class (targets uniform over them). Text->image: softmax over the B images, positives = the
images of the caption's class. The loss is the mean of both cross-entropies, with CLIP's learnable
temperature (logit_scale, clamped at 100). Plain CLIP would count same-class images in a batch as
negatives, which with 10 classes is almost every pair.

Augmentation: random horizontal flip and a random shift of up to `shift` pixels (zero padding in
normalised space = the dataset's mean colour).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .model.backbone import Backbone


@dataclass
class ClipTrainConfig:
    """Optimisation settings of the reference CLIP (steps are optimiser steps of `batch_size` images)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    text_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    shift: int = 1
    seed: int = 0
    train_limit: int | None = None  # use only the first N training images (smoke tests)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensorise(images: np.ndarray | torch.Tensor, mean: Sequence[float] = OPENAI_DATASET_MEAN, std: Sequence[float] = OPENAI_DATASET_STD) -> torch.Tensor:
    """uint8 grayscale [N, H, W] -> float32 [N, 3, H, W], scaled to [0, 1] then normalised per channel."""
    x = torch.as_tensor(np.array(images, dtype=np.uint8) if isinstance(images, np.ndarray) else images).float().div_(255.0)[:, None].expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s


def preprocess_stats(preprocess: Callable) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the Normalize step of an open_clip transform (OpenAI's values if absent)."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def augment(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and integer shift (|dx|, |dy| <= shift) per image of [B, 3, H, W]."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift <= 0:
        return x
    pad = F.pad(x, (shift, shift, shift, shift))  # zero = mean colour after normalisation
    dx = torch.randint(0, 2 * shift + 1, (B,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(H)[None, :])  # [B, H]
    cols = (dx[:, None] + torch.arange(W)[None, :])  # [B, W]
    bidx = torch.arange(B)[:, None, None]
    out = pad.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # [B, H, W, 3]
    return out.permute(0, 3, 1, 2).contiguous()


def _lr_factor(step: int, cfg: ClipTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def unicl_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, caption_class: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive contrastive loss. img [B, D], txt [M, D] L2-normalised; labels [B];
    caption_class [M]; scale: logit scale (not log)."""
    logits = scale * img @ txt.T  # [B, M]
    pos = (labels[:, None] == caption_class[None, :]).float()  # [B, M]
    i2t = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    has = pos.sum(0) > 0
    pos_t = pos.T[has]
    t2i = -(pos_t / pos_t.sum(1, keepdim=True) * logits.T[has].log_softmax(1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


@torch.no_grad()
def zero_shot_accuracy(backbone: Backbone, pixels: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                       templates: Sequence[str], batch_size: int = 1000) -> float:
    """Top-1 accuracy (fraction) of the zero-shot classifier built from text prompts only."""
    model = backbone.model
    was_training = model.training
    model.eval()
    text = backbone.class_embeddings(class_names, templates)
    correct = 0
    for i in range(0, len(labels), batch_size):
        e = model.encode_image(pixels[i : i + batch_size].to(backbone.device)).float()
        pred = (e @ text.T).argmax(-1).cpu()
        correct += int((pred == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)


def train_reference_clip(
    backbone: Backbone,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[str],
    cfg: ClipTrainConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `backbone.model` in place (then eval mode, frozen) on uint8 images [N, 28, 28] with labels [N].

    Returns training statistics (final loss, steps, seconds, images seen, logit scale).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = backbone.model.train().requires_grad_(True)
    dev = backbone.device
    mean, std = preprocess_stats(backbone.preprocess)
    if cfg.train_limit:
        images, labels = images[: cfg.train_limit], labels[: cfg.train_limit]
    imgs = torch.from_numpy(np.array(images, dtype=np.uint8))  # uint8 [N, H, W]; normalised per batch
    labs = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    captions = [t.format(c) for c in class_names for t in templates]
    caption_class = torch.arange(len(class_names)).repeat_interleave(len(templates)).to(dev)
    tokens = backbone.tokenizer(captions).to(dev)
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]
    decay = lambda p: p.ndim >= 2  # noqa: E731
    groups = [
        {"params": [p for p in model.visual.parameters() if decay(p)], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.visual.parameters() if not decay(p)], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [p for p in text_params if decay(p)], "lr": cfg.text_lr, "weight_decay": cfg.weight_decay},
        {"params": [p for p in text_params if not decay(p)] + [model.logit_scale], "lr": cfg.text_lr, "weight_decay": 0.0},
    ]
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    n = len(labs)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    t0 = time.time()
    losses: list[float] = []
    for step in range(cfg.steps):
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x = augment(tensorise(imgs[idx], mean, std), cfg.shift, gen).to(dev)
        y = labs[idx].to(dev)
        f = _lr_factor(step, cfg)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = unicl_loss(img, txt, y, caption_class, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"clip step {step}/{cfg.steps} loss {np.mean(losses[-100:]):.4f} "
                f"scale {model.logit_scale.exp().item():.1f} {time.time() - t0:.0f}s")
    model.eval().requires_grad_(False)
    return {
        "steps": cfg.steps,
        "images_seen": cfg.steps * cfg.batch_size,
        "epochs": cfg.steps * cfg.batch_size / n,
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "seconds": time.time() - t0,
        "logit_scale": float(model.logit_scale.exp()),
    }
