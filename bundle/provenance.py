"""Where a result was made: the CPU (model, the instruction sets that change numerics or speed), core
count, threads and library versions. Recorded in bundles, evaluation reports, shipped weights and
benchmark output, because the same code gives different figures on an AVX2 and an AVX-512 machine.
Torch-free: /proc/cpuinfo, `platform` and package metadata only.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path
from typing import Any

# CPU flags that select different kernels in torch / ONNX Runtime (and so move figures)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
DISTRIBUTIONS = ("cltvit", "torch", "open_clip_torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "bentoml")


def cpu_info() -> dict[str, Any]:
    """{"cpu": model name, "isa": [flags of ISA_FLAGS this CPU has], "cores": logical CPUs}."""
    model: str | None = None
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the platform module's guess
        pass
    model = model or platform.processor() or platform.machine()
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count()}


def versions(distributions: tuple[str, ...] = DISTRIBUTIONS) -> dict[str, str]:
    """Installed versions of the distributions that shape results (those not installed are left out)."""
    out = {}
    for dist in distributions:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """cpu_info() + `threads` (the compute threads used, when known) + Python and library versions."""
    info: dict[str, Any] = {**cpu_info(), "python": platform.python_version(), "versions": versions()}
    if threads is not None:
        info["threads"] = threads
    return info
