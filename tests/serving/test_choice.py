"""`--variant auto`'s choice (serving/choice.py) as a pure function of gate figures and injected timings, and the
benchmark's rounds (serving/variant_bench.py) with an injected clock."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from bundle.gate import VariantGate, passes_gate
from serving.choice import FASTER, choose_variant, explicit_choice, gated_variants
from serving.variant_bench import time_runs

SHA = "b" * 64


def gate(agreement: float, images: int = 2000) -> VariantGate:
    return VariantGate(model_sha256=SHA, images=images, top1_agreement=agreement, max_abs_logit_diff=0.1, completeness_residual=1e-6)


def timings(per_call: dict[str, dict[int, float]], rounds: int = 5, noise: float = 0.0, seed: int = 0) -> dict[int, dict[str, list[float]]]:
    """Seconds per call: variant -> batch -> base time, times (1 + uniform noise) per round."""
    rng = random.Random(seed)
    batches = sorted({b for d in per_call.values() for b in d})
    return {b: {v: [d[b] * (1 + noise * rng.uniform(-1, 1)) for _ in range(rounds)] for v, d in per_call.items() if b in d}
            for b in batches}


GATES = {"fp32": None, "int8": gate(0.995), "int8-clt": gate(0.991), "fp16": gate(0.97), "int4": None}


def test_picks_the_fastest_variant_that_passes():
    t = timings({"fp32": {1: 10.0, 16: 100.0}, "int8": {1: 6.0, 16: 40.0}, "int8-clt": {1: 5.0, 16: 38.0}})
    c = choose_variant(GATES, t)
    assert c.variant == "int8-clt" and c.requested == "auto" and c.batch_sizes == [1, 16]
    scores = {x.variant: x.score for x in c.candidates}
    assert scores["int8-clt"] == pytest.approx(math.sqrt(2.0 * 100 / 38))
    assert scores["int8"] == pytest.approx(math.sqrt(10 / 6 * 100 / 40)) and scores["fp32"] == 1.0
    assert scores["fp16"] is None and scores["int4"] is None  # failing / ungated: never timed, never scored


def test_never_a_variant_without_or_failing_the_gate_however_fast():
    # fp16 (97 %) and int4 (no figures) are 100x faster; the passing ones are slower than fp32
    t = timings({"fp32": {1: 1.0}, "int8": {1: 1.2}, "int8-clt": {1: 1.1}, "fp16": {1: 0.01}, "int4": {1: 0.01}})
    c = choose_variant(GATES, t)
    assert c.variant == "fp32" and "no gated variant is at least 1.05x fp32" in c.reason


def test_all_failing_serves_fp32_and_says_so():
    c = choose_variant({"fp32": None, "int8": gate(0.98), "fp16": gate(0.5)}, {})
    assert c.variant == "fp32"
    assert c.reason.startswith("fp32 served: no variant passes the gate: int8 fails the gate: agreement 98.00%")
    c = choose_variant({"fp32": None, "int8": None}, {})
    assert c.variant == "fp32" and "no variant has gate figures" in c.reason
    assert choose_variant({"fp32": None}, {}).reason == "the bundle has no other variant"


def test_noise_margin_keeps_fp32():
    t = timings({"fp32": {1: 1.0, 16: 10.0}, "int8": {1: 1 / 1.04, 16: 10 / 1.04}})
    assert choose_variant(GATES, t).variant == "fp32"
    t = timings({"fp32": {1: 1.0, 16: 10.0}, "int8": {1: 1 / 1.06, 16: 10 / 1.06}})
    assert choose_variant(GATES, t).variant == "int8"


def test_paired_median_resists_a_loaded_round():
    # round 3: something else ran during fp32's call only; the median of the paired ratios ignores it
    t = {1: {"fp32": [1.0, 1.0, 50.0, 1.0, 1.0], "int8": [2.0, 2.0, 2.0, 2.0, 2.0]}}
    assert choose_variant(GATES, t).variant == "fp32"


def test_deterministic_given_the_timings():
    t = timings({"fp32": {1: 10.0, 32: 90.0}, "int8": {1: 7.0, 32: 60.0}, "int8-clt": {1: 7.0, 32: 60.0}}, noise=0.2, rounds=7)
    first = choose_variant(GATES, t)
    for _ in range(3):
        assert choose_variant(GATES, t) == first
    # equal speed: the higher agreement wins (int8, 99.5 %, over int8-clt, 99.1 %), whichever order the dict has
    same = {1: {"fp32": [2.0] * 3, "int8-clt": [1.0] * 3, "int8": [1.0] * 3}}
    assert choose_variant(dict(reversed(list(GATES.items()))), same).variant == "int8"


@pytest.mark.parametrize("seed", range(40))
def test_random_gates_and_timings(seed):
    """Whatever the figures and timings: the choice is fp32 or passes the gate, and no other passing variant scores higher."""
    rng = random.Random(seed)
    names = ["fp32", "a", "b", "c", "d"]
    gates = {n: None if n == "fp32" or rng.random() < 0.2 else gate(rng.choice([0.95, 0.985, 0.99, 0.995, 1.0])) for n in names}
    base = {n: {b: rng.uniform(0.2, 2.0) * b for b in (1, 8)} for n in names}
    c = choose_variant(gates, timings(base, rounds=3, noise=0.1, seed=seed))
    assert c.variant == "fp32" or passes_gate(gates[c.variant])
    scores = {x.variant: x.score for x in c.candidates if x.score is not None}
    assert set(scores) == set(gated_variants(gates))
    if c.variant != "fp32":
        assert scores[c.variant] >= FASTER and scores[c.variant] == max(scores.values())
    else:
        assert max(scores.values()) < FASTER


def test_explicit_wins_and_states_the_gate():
    c = explicit_choice("fp16", GATES)
    assert c.variant == "fp16" and c.requested == "fp16" and "fails the gate" in c.reason and c.batch_sizes == []


def test_benchmark_rounds_are_paired_rotated_and_bounded():
    calls = []
    now = itertools.count(0.0, 0.25)  # every clock read advances a quarter second
    runs = {v: (lambda px, v=v: calls.append((v, len(px)))) for v in ("fp32", "int8", "fp16")}
    t, rounds = time_runs(runs, {1: [0], 4: [0, 0, 0, 0]}, budget_s=2.0, max_rounds=100, clock=lambda: next(now))
    assert calls[:6] == [("fp32", 1), ("int8", 1), ("fp16", 1), ("fp32", 4), ("int8", 4), ("fp16", 4)]  # warm-up
    # each round reads the clock 2 x 6 times (+1 for the budget): the 2 s budget ends it after 1 round
    assert rounds == 1 and all(len(t[b][v]) == 1 for b in (1, 4) for v in runs)
    assert [v for v, _ in calls[6:9]] == ["fp32", "int8", "fp16"]
    calls.clear()
    t, rounds = time_runs(runs, {1: [0]}, budget_s=1e9, max_rounds=4, clock=lambda: next(now))
    assert rounds == 4 and all(len(x) == 4 for x in t[1].values())
    order = [v for v, _ in calls[3:]]
    assert order[3:6] == ["int8", "fp16", "fp32"] and order[6:9] == ["fp16", "fp32", "int8"]  # rotated each round
