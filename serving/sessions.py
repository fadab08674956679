"""ONNX Runtime sessions as serving opens them: the one place for providers, threads, spinning and the
fp16-on-CPU workaround, shared by `BundleRuntime` (the graphs it serves) and `serving.variant_bench`
(the variants it times for `--variant auto`), so that what is timed is what is served.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """Full graph optimisation, quiet logs; `threads` intra-op threads (None: ORT's default) and one inter-op
    thread; `spinning` False lets idle ORT threads sleep instead of busy-waiting (servers sharing the CPU)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def providers_for(use_cuda: bool) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]


def open_session(path: str | Path, opts: ort.SessionOptions, use_cuda: bool, variant: str = "fp32") -> ort.InferenceSession:
    """A session of the graph at `path` (an image graph of `variant`, or any other graph with variant fp32)."""
    # ORT 1.31's NCHWc layout pass crashes on fp16 graphs on the CPU provider: skip it there.
    disabled = ["NchwcTransformer"] if variant == "fp16" and not use_cuda else None
    return ort.InferenceSession(str(path), opts, providers=providers_for(use_cuda), disabled_optimizers=disabled)
