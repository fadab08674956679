"""The short, bounded benchmark behind `--variant auto`, and resolving a requested variant to a served one.

    choice, sessions = resolve_variant(manifest, paths, "auto", opener, batch_sizes=(1, 16))

`resolve_variant` times fp32 and every variant that passes the bundle's gate (serving/choice.py) on this
machine, with the sessions `opener` makes (the ones serving runs: serving/sessions.py), at the batch sizes
the caller will run, and returns the choice with the sessions it opened (the caller keeps the chosen one).
Without a passing variant nothing is timed (no cost). An explicit variant is returned as asked, untimed.

The benchmark: one untimed warm-up call per variant and batch size (ONNX Runtime allocates on the first
run), then rounds; in each round every variant runs once per batch size, back to back, in an order that
rotates between rounds. Rounds stop after `max_rounds`, or once `budget_s` is spent (at least one timed
round always runs: a model so large that one round exceeds the budget gets one round).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bundle import BundlePaths, Manifest

from .choice import AUTO, REFERENCE, VariantChoice, choose_variant, explicit_choice, gated_variants

BENCH_BUDGET_S = 3.0  # seconds of timed rounds at most (after warm-up), the service's default
BENCH_MAX_ROUNDS = 15
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 16)  # the Python API's default: one image and a batch

log = logging.getLogger("cltvit.serving")


def bench_pixels(batch: int, image_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Deterministic standard-normal pixels float32 [batch, 3, H, W] (the graphs' cost does not depend on content)."""
    H, W = image_size
    return np.random.default_rng(seed).standard_normal((batch, 3, H, W)).astype(np.float32)


def time_runs(runs: Mapping[str, Callable[[np.ndarray], Any]], pixels: Mapping[int, np.ndarray], *, budget_s: float = BENCH_BUDGET_S,
              max_rounds: int = BENCH_MAX_ROUNDS, clock: Callable[[], float] = time.perf_counter) -> tuple[dict[int, dict[str, list[float]]], int]:
    """({batch size: {name: [seconds per call, one per round]}}, rounds) of `runs` (name -> call on pixels)
    on `pixels` (batch size -> [B, 3, H, W]), paired per round as the module docstring says."""
    names = list(runs)
    for b, px in pixels.items():
        for name in names:
            runs[name](px)  # warm-up
    timings: dict[int, dict[str, list[float]]] = {b: {n: [] for n in names} for b in pixels}
    start, rounds = clock(), 0
    while rounds < max_rounds and (rounds == 0 or clock() - start < budget_s):
        order = names[rounds % len(names):] + names[: rounds % len(names)]
        for b, px in pixels.items():
            for name in order:
                t0 = clock()
                runs[name](px)
                timings[b][name].append(clock() - t0)
        rounds += 1
    return timings, rounds


def resolve_variant(manifest: Manifest, paths: BundlePaths, requested: str, opener: Callable[[str], Any], *,
                    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, text: np.ndarray | None = None,
                    budget_s: float = BENCH_BUDGET_S, max_rounds: int = BENCH_MAX_ROUNDS) -> tuple[VariantChoice, dict[str, Any]]:
    """(choice, {variant: session opened on the way}) for `requested` ('auto' or a variant of the bundle).

    `opener(variant)` opens that variant's session (an `ort.InferenceSession`); `text` [C, D] the label
    embeddings to time with (default: the bundle's labels.npy)."""
    gates = {v: manifest.variant_gate(v) for v in manifest.variants}
    if requested != AUTO:
        if requested not in manifest.variants:
            raise KeyError(f"bundle {paths.root} has no {requested!r} variant (available: {', '.join(sorted(manifest.variants))})")
        return explicit_choice(requested, gates), {}
    timed = gated_variants(gates)
    if timed == [REFERENCE]:
        return choose_variant(gates, {}), {}
    sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
    if not sizes:
        raise ValueError(f"batch_sizes must hold a size >= 1, got {list(batch_sizes)}")
    sessions = {v: opener(v) for v in timed}
    emb = np.load(paths.labels, allow_pickle=False) if text is None else text
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    image_size = (int(manifest.preprocess.image_size[0]), int(manifest.preprocess.image_size[1]))
    runs = {v: (lambda px, s=s: s.run(None, {"pixels": px, "text_embeddings": emb})) for v, s in sessions.items()}
    t0 = time.perf_counter()
    timings, rounds = time_runs(runs, {b: bench_pixels(b, image_size) for b in sizes}, budget_s=budget_s, max_rounds=max_rounds)
    return choose_variant(gates, timings, rounds=rounds, bench_seconds=time.perf_counter() - t0), sessions
