"""`--variant auto`: which image-graph variant to serve, as a pure function of the bundle's gate figures
(bundle/gate.py) and timings measured on this machine (serving/variant_bench.py). No clock, no ONNX
Runtime here, so a test can inject the timings.

The rule:
1. Candidates are fp32 (the reference, always allowed) and every variant whose gate figures pass
   `bundle.gate.passes_gate` (>= 99 % top-1 agreement with fp32 on held-out images). A variant without
   figures, or failing them, is never chosen; when no variant passes, fp32 is served and the reason says why.
2. Speed: per batch size b the benchmark ran every candidate once per round, back to back; a variant's
   speed-up at b is the median over rounds of time(fp32) / time(variant) (paired per round, so load from
   other processes hits both alike), and its score the geometric mean over the batch sizes served.
3. The highest score wins if it is at least `FASTER` (5 %) above fp32's 1.0: a smaller gap is within a
   shared machine's noise, and then the exact graph is served. Ties: higher agreement, then name.
"""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from bundle.gate import VariantGate, gate_verdict, passes_gate

AUTO = "auto"
REFERENCE = "fp32"
FASTER = 1.05  # a gated variant must beat fp32 by this factor (score) to be served instead of it


class Candidate(BaseModel):
    """One variant of the bundle as auto saw it: its gate figures and verdict, its measured speed-up over fp32."""

    model_config = ConfigDict(frozen=True)
    variant: str
    gated: bool = Field(description="passes the gate (fp32: always, it is the reference)")
    verdict: str
    top1_agreement: float | None = None
    max_abs_logit_diff: float | None = None
    completeness_residual: float | None = None
    gate_images: int | None = None
    speedup: dict[int, float] | None = Field(default=None, description="batch size -> median paired time(fp32) / time(variant)")
    score: float | None = Field(default=None, description="geometric mean of `speedup` over the batch sizes")


class VariantChoice(BaseModel):
    """What is served and why (logged at start, on /info as `variant_choice`, in the viewer's header)."""

    model_config = ConfigDict(frozen=True)
    requested: str = Field(description="'auto' or the variant asked for explicitly")
    variant: str = Field(description="the variant served")
    reason: str
    batch_sizes: list[int] = Field(default_factory=list, description="batch sizes benchmarked (empty: no benchmark ran)")
    rounds: int = 0
    bench_seconds: float = 0.0
    candidates: list[Candidate] = Field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: the variant, how it was chosen and the figures behind it."""
        figures = "; ".join(
            f"{c.variant}: {c.verdict}" + ("" if c.score is None else f", {c.score:.2f}x fp32 ("
                                           + ", ".join(f"batch {b} {s:.2f}x" for b, s in (c.speedup or {}).items()) + ")")
            for c in self.candidates if c.variant != REFERENCE)
        bench = f"; benchmark {self.rounds} rounds in {self.bench_seconds:.2f} s" if self.rounds else ""
        return f"variant {self.variant} ({self.requested}: {self.reason}){bench}" + (f"; {figures}" if figures else "")


def paired_speedup(fp32: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of fp32's time / the other's time (seconds per call, round i paired with round i)."""
    pairs = [a / b for a, b in zip(fp32, other) if b > 0]
    if not pairs:
        raise ValueError("no paired timings")
    return float(statistics.median(pairs))


def _candidate(variant: str, gate: VariantGate | None) -> Candidate:
    gated = variant == REFERENCE or passes_gate(gate)
    verdict = "the reference" if variant == REFERENCE else gate_verdict(gate)
    if gate is None:
        return Candidate(variant=variant, gated=gated, verdict=verdict)
    return Candidate(variant=variant, gated=gated, verdict=verdict, top1_agreement=gate.top1_agreement,
                     max_abs_logit_diff=gate.max_abs_logit_diff, completeness_residual=gate.completeness_residual,
                     gate_images=gate.images)


def gated_variants(gates: Mapping[str, VariantGate | None]) -> list[str]:
    """The variants auto may time and serve: fp32 and those passing the gate, in the order given."""
    return [v for v in gates if v == REFERENCE or passes_gate(gates[v])]


def explicit_choice(variant: str, gates: Mapping[str, VariantGate | None]) -> VariantChoice:
    """An explicitly requested variant: served as asked, whatever its gate says (the reason states it)."""
    c = _candidate(variant, gates.get(variant))
    return VariantChoice(requested=variant, variant=variant, reason=f"asked for explicitly; {c.verdict}", candidates=[c])


def choose_variant(gates: Mapping[str, VariantGate | None], timings: Mapping[int, Mapping[str, Sequence[float]]],
                   rounds: int = 0, bench_seconds: float = 0.0) -> VariantChoice:
    """The `auto` choice. `gates`: every variant of the bundle (fp32 included) -> its gate figures or None;
    `timings`: batch size -> variant -> seconds per call, one entry per benchmark round (only the variants
    of `gated_variants` need timings; fp32's are required for any other to be scored)."""
    if REFERENCE not in gates:
        raise ValueError("the variants must include fp32")
    cands = {v: _candidate(v, g) for v, g in gates.items()}
    batches = sorted(timings)
    scored: dict[str, Candidate] = {}
    for v, c in cands.items():
        if v == REFERENCE or not c.gated or not batches or any(v not in timings[b] or REFERENCE not in timings[b] for b in batches):
            continue
        speed = {b: paired_speedup(timings[b][REFERENCE], timings[b][v]) for b in batches}
        score = math.exp(sum(math.log(s) for s in speed.values()) / len(speed))
        scored[v] = cands[v] = c.model_copy(update={"speedup": speed, "score": score})
    if batches and all(REFERENCE in timings[b] for b in batches):
        cands[REFERENCE] = cands[REFERENCE].model_copy(update={"speedup": {b: 1.0 for b in batches}, "score": 1.0})
    out = dict(requested=AUTO, batch_sizes=batches, rounds=rounds, bench_seconds=bench_seconds, candidates=list(cands.values()))
    others = [c for v, c in cands.items() if v != REFERENCE]
    passing = [c for c in others if c.gated]
    if not others:
        return VariantChoice(variant=REFERENCE, reason="the bundle has no other variant", **out)
    if not passing:
        if all(c.top1_agreement is None for c in others):
            why = "no variant has gate figures (export with --eval-data to measure them)"
        else:
            why = "no variant passes the gate: " + "; ".join(f"{c.variant} {c.verdict}" for c in others)
        return VariantChoice(variant=REFERENCE, reason=f"fp32 served: {why}", **out)
    if not scored:
        return VariantChoice(variant=REFERENCE, reason="fp32 served: the gated variants were not timed", **out)
    best = max(scored.values(), key=lambda c: (c.score, c.top1_agreement or 0.0, [-ord(ch) for ch in c.variant]))
    assert best.score is not None
    if best.score >= FASTER:
        return VariantChoice(variant=best.variant, reason=f"the fastest variant that passes the gate ({best.score:.2f}x fp32, "
                                                          f"{100 * (best.top1_agreement or 0):.2f}% agreement)", **out)
    return VariantChoice(variant=REFERENCE, reason=f"fp32 served: no gated variant is at least {FASTER:.2f}x fp32 here "
                                                   f"(best {best.variant} {best.score:.2f}x)", **out)
