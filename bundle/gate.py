"""The accuracy gate of a bundle's precision variants: the figures, the threshold, the verdict.

A reduced-precision variant (`int8`, `int8-clt`, `fp16`, or any variant a later exporter adds) is a
different computation from `model.onnx`. Whether it may stand in for fp32 is measured by the exporter
on held-out images (export/gate.py: `cltvit-export --eval-data`, the reference build) and written to
`bundle.json`'s optional `gate` block: per variant its top-1 agreement with fp32 on those images, the
largest |logit difference| from fp32, its completeness residual and the image count, tied by sha256 to
the graph file they were measured on. `--variant auto` (serving/choice.py) serves fp32 or a variant
that passes `passes_gate`; a variant without figures (a bundle exported before the gate, or without
eval data) is never chosen automatically.

One home for the figures' definitions (`completeness_residual`, `GateTally`): the exporter measures with
them and serving's results report the same residual. Torch-free (numpy, pydantic).
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import Field, field_validator

from .strict import Strict

# The gate: a variant may replace fp32 automatically when its top-1 prediction agrees with fp32's on at
# least this fraction of the held-out images (and no image gave a non-finite logit).
GATE_MIN_AGREEMENT = 0.99


class VariantGate(Strict):
    """One variant's figures against fp32 on the gate's held-out images. Logit units are the graph's
    (logit_scale times a cosine). fp32's own entry has agreement 1 and difference 0 by definition; its
    residual is fp32's rounding."""

    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the graph file measured (its `files` entry)")
    images: int = Field(ge=1, description="held-out images measured")
    top1_agreement: float = Field(ge=0.0, le=1.0, description="fraction of images whose argmax logit equals fp32's")
    max_abs_logit_diff: float = Field(ge=0.0, description="max over images and labels of |logit - fp32 logit|")
    completeness_residual: float = Field(ge=0.0, description="max over images and labels of |sum of terms - logit|, "
                                                             "the variant's own logits")
    nonfinite_images: int = Field(default=0, ge=0, description="images with a NaN or infinite logit or term (counted as "
                                  "disagreeing)")
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0, description="top-1 against the images' labels, when the "
                                   "data's classes are the bundle's labels; null otherwise")

    def summary(self) -> str:
        """The figures in one phrase (logs, CLI output)."""
        acc = "" if self.accuracy is None else f", accuracy {100 * self.accuracy:.2f}%"
        return (f"top-1 agreement {100 * self.top1_agreement:.2f}%, max |logit diff| {self.max_abs_logit_diff:.4g}, "
                f"completeness residual {self.completeness_residual:.3g}{acc} on {self.images} images")

    @field_validator("max_abs_logit_diff", "completeness_residual")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v


class GateSpec(Strict):
    """`bundle.json`'s `gate` block: what the held-out images were (`data`), how many went through a graph call at
    once (`batch_size`), and each measured variant's figures (keys are variant names of the manifest's `variants`;
    fp32 included)."""

    data: str = Field(min_length=1, max_length=500)
    batch_size: int = Field(ge=1, description="images per graph call: dynamic int8 quantizes each call's activations with "
                            "one scale, so a variant's outputs depend on its batch; the figures hold for this one")
    variants: dict[str, VariantGate]


def passes_gate(gate: VariantGate | None) -> bool:
    """True when the figures let the variant replace fp32: agreement >= GATE_MIN_AGREEMENT, no non-finite logit."""
    return gate is not None and gate.nonfinite_images == 0 and gate.top1_agreement >= GATE_MIN_AGREEMENT


def gate_verdict(gate: VariantGate | None) -> str:
    """One phrase: why a variant may or may not be chosen automatically."""
    if gate is None:
        return "no gate figure"
    figures = f"agreement {100 * gate.top1_agreement:.2f}% on {gate.images} images"
    if gate.nonfinite_images:
        return f"fails the gate: {gate.nonfinite_images} image(s) with non-finite logits, {figures}"
    if gate.top1_agreement < GATE_MIN_AGREEMENT:
        return f"fails the gate: {figures} < {100 * GATE_MIN_AGREEMENT:.0f}%"
    return f"passes the gate: {figures}"


def gate_table(spec: GateSpec, variants: list[str] | None = None) -> list[str]:
    """The gate as a markdown table, one row per variant (`variants`: these, in this order; a missing one as
    "no gate figure"), with the verdict; printed by cltvit-export and scripts/bench_export.py."""
    lines = [f"accuracy gate ({spec.data}; batches of {spec.batch_size}; passes at >= {100 * GATE_MIN_AGREEMENT:.0f}% top-1 "
             f"agreement with fp32):", "| variant | top-1 agreement | max abs logit diff | completeness residual | accuracy | images | verdict |",
             "|---|---|---|---|---|---|---|"]
    for v in variants if variants is not None else list(spec.variants):
        g = spec.variants.get(v)
        if g is None:
            lines.append(f"| {v} | - | - | - | - | - | no gate figure |")
            continue
        acc = "-" if g.accuracy is None else f"{100 * g.accuracy:.2f}%"
        verdict = "reference" if v == "fp32" else gate_verdict(g).split(":")[0]
        lines.append(f"| {v} | {100 * g.top1_agreement:.2f}% | {g.max_abs_logit_diff:.4g} | {g.completeness_residual:.3g} | {acc} | "
                     f"{g.images} | {verdict} |")
    return lines


def completeness_residual(contributions: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per image, the largest gap between a label's logit and the sum of its terms, float64 [B].

    contributions [B, T, C], logits [B, C] (any float dtype; summed in float64)."""
    c = np.asarray(contributions, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    return np.abs(c.sum(axis=1) - z).max(axis=-1)


class GateTally:
    """Running gate figures of one variant over batches: `update` with fp32's logits [B, C], the variant's
    logits [B, C] and contributions [B, T, C] (and the images' labels [B] when they are the bundle's
    classes), then `figures(model_sha256)` -> `VariantGate`."""

    def __init__(self) -> None:
        self.images = 0
        self.agree = 0
        self.correct = 0
        self.labelled = 0
        self.nonfinite = 0
        self.max_diff = 0.0
        self.residual = 0.0

    def update(self, ref_logits: np.ndarray, logits: np.ndarray, contributions: np.ndarray, labels: np.ndarray | None = None) -> None:
        ref = np.asarray(ref_logits, dtype=np.float64)
        z = np.asarray(logits, dtype=np.float64)
        if ref.shape != z.shape or ref.ndim != 2:
            raise ValueError(f"logits must both be [B, C], got {list(ref.shape)} and {list(z.shape)}")
        with np.errstate(invalid="ignore", over="ignore"):
            res = completeness_residual(contributions, z)  # [B]
        ok = np.isfinite(z).all(axis=1) & np.isfinite(ref).all(axis=1) & np.isfinite(res)  # else: counted as disagreeing
        pred = z.argmax(axis=1)
        self.images += len(z)
        self.nonfinite += int((~ok).sum())
        self.agree += int(((pred == ref.argmax(axis=1)) & ok).sum())
        if ok.any():
            self.max_diff = max(self.max_diff, float(np.abs(z[ok] - ref[ok]).max()))
            self.residual = max(self.residual, float(res[ok].max()))
        if labels is not None:
            y = np.asarray(labels)
            self.correct += int(((pred == y) & ok).sum())
            self.labelled += len(y)

    def figures(self, model_sha256: str) -> VariantGate:
        if self.images < 1:
            raise ValueError("no images measured")
        return VariantGate(model_sha256=model_sha256, images=self.images, top1_agreement=self.agree / self.images,
                           max_abs_logit_diff=self.max_diff, completeness_residual=self.residual,
                           nonfinite_images=self.nonfinite,
                           accuracy=self.correct / self.labelled if self.labelled == self.images else None)
