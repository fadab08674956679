#!/usr/bin/env python
"""Where the fused explainer graph spends its time: ONNX Runtime's per-node profile (CPU provider,
SessionOptions.enable_profiling), grouped by part of the graph, against the plain ONNX graph (open_clip's
encoder + logits, no explanation) at the same batch size.

Groups (from the exported node names, `export.fused.ENCODE_SCOPE` / `DECODE_SCOPE`, and the graph's data flow):
  vit            the transformer's own ops: patch embedding, ln_pre, the blocks' attention (with the
                 written-out q k^T / softmax / mixing between each block's own ln_1 and out_proj) and
                 MLP, the residual stream's sums, ln_post, proj (in the plain graph: everything under
                 open_clip's `/visual/` scope)
  clt encode     `/clt_encode*`: x / in_scale, the encoder matmul, bias, TopK, ReLU
  clt decode     `/clt_decode*`: the active rows' gather (and their int8 dequantization in int8-dec),
                 the weighted sum, out_scale
  spatial        nodes whose outputs reach only the spatial_* outputs (where in the image)
  decomposition  the rest: CLS-token split/join, the CLT writes' sums into the residual stream, the
                 additive terms through the frozen ln_post, logits, contributions, top features
                 (plain graph: the logits after the encoder)
Each graph runs `--runs` times, graphs interleaved (round-robin, one call each per round) so the load
of other processes hits all alike; per group the median over runs of the summed kernel time is printed,
and the median wall time of the runs. Fusions made by ONNX Runtime keep the name of one of their nodes
as prefix, which is how a profiled node is mapped back to a group.

  python scripts/profile_export.py --bundle DIR --plain PLAIN.onnx [--variants fp32,int8-dec] [--batch 1] [--runs 10]
      [--extra before-fp32=OLD/model.onnx ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle import SPATIAL_OUTPUTS, load_bundle  # noqa: E402
from export.fused import DECODE_SCOPE, ENCODE_SCOPE  # noqa: E402

GROUPS = ("vit", "clt encode", "clt decode", "spatial", "decomposition")
VIT_SCOPE = re.compile(r"^/(visual|conv1|ln_pre|ln_1|ln_2|attn|out_proj|mlp|ln_post)(_\d+)?/")
RESIDUAL_READERS = re.compile(r"^/(ln_1|ln_2|ln_post)(_\d+)?/")


def node_groups(path: str | Path) -> dict[str, str]:
    """Group (one of GROUPS) of every node of the graph at `path`, by name: see the module docstring."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    if any(n.name.startswith("/visual/") for n in nodes):  # the plain graph: open_clip's encoder, then the logits
        return {n.name: "vit" if n.name.startswith("/visual/") else "decomposition" for n in nodes}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers[x].append(i)

    def closure(start: list[int], step) -> set[int]:
        seen, stack = set(start), list(start)
        while stack:
            for j in step(stack.pop()):
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    down = lambda i: [j for o in nodes[i].output for j in consumers[o]]  # noqa: E731
    up = lambda i: [producer[x] for x in nodes[i].input if x in producer]  # noqa: E731
    def scoped(scope: str) -> dict[str, list[int]]:  # layer suffix ("", "_1", ...) -> the nodes of that scope
        out: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(nodes):
            m = re.match(rf"^/{scope}(_\d+)?/", n.name)
            if m:
                out[m.group(1) or ""].append(i)
        return out

    # the written-out attention of each block: between that block's ln_1 and its out_proj
    ln1, outp = scoped("ln_1"), scoped("out_proj")
    attention = set().union(*(closure(ln1[k], down) & closure(outp[k], up) for k in ln1 if k in outp))
    # the patch/class/position embedding before ln_pre, and the residual stream's sums (an Add read by
    # a block's ln_1 / ln_2 or by ln_post): the ViT's own arithmetic, as in the plain graph
    embedding = closure([i for i, n in enumerate(nodes) if n.name.startswith("/ln_pre/")], up)
    residual = {i for i, n in enumerate(nodes) if n.op_type == "Add"
                and any(RESIDUAL_READERS.match(nodes[j].name) for o in n.output for j in consumers[o])}
    attention |= embedding | residual
    outputs = {o.name for o in model.graph.output}
    spatial_out = [producer[o] for o in SPATIAL_OUTPUTS if o in producer]
    other_out = [producer[o] for o in outputs - set(SPATIAL_OUTPUTS) if o in producer]
    spatial_only = closure(spatial_out, up) - closure(other_out, up)
    groups = {}
    for i, n in enumerate(nodes):
        if n.name.startswith("/" + ENCODE_SCOPE):
            g = "clt encode"
        elif n.name.startswith("/" + DECODE_SCOPE):
            g = "clt decode"
        elif VIT_SCOPE.match(n.name) or i in attention:
            g = "vit"
        elif i in spatial_only:
            g = "spatial"
        else:
            g = "decomposition"
        groups[n.name] = g
    return groups


# nodes ONNX Runtime makes itself, named without the graph's scopes: the MLP's fused bias + GELU
# (`BiasGelu_token_<n>`) and the patch embedding's NCHWc layout conversions
ORT_VIT_OPS = ("BiasGelu", "FastGelu", "Gelu", "ReorderInput", "ReorderOutput")


def group_of(name: str, groups: dict[str, str], prefixes: list[str], op: str = "") -> str:
    """The group of a profiled node (`op`: its op type): its own, or that of the longest graph node name
    it starts with (ONNX Runtime's fused nodes keep one), else by op type or name scope."""
    if name in groups:
        return groups[name]
    for p in prefixes:  # longest first
        if name.startswith(p):
            return groups[p]
    if op in ORT_VIT_OPS or name.startswith(ORT_VIT_OPS):
        return "vit"
    if name.startswith("/" + ENCODE_SCOPE):
        return "clt encode"
    if name.startswith("/" + DECODE_SCOPE):
        return "clt decode"
    return "vit" if VIT_SCOPE.match(name) else "decomposition"


def profiled_session(path: str | Path, threads: int, prefix: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as bench_export's sessions
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def per_run(profile: str | Path, groups: dict[str, str], nodes: dict[str, list[float]] | None = None) -> list[dict[str, float]]:
    """Per model run (warm-up excluded by the caller): milliseconds per group, plus 'wall' (the run) and
    'nodes' (kernel count), from an ONNX Runtime profile file. `nodes`, if given, collects each profiled
    node's milliseconds per run under '<group>: <name> (<op>)'."""
    events = json.loads(Path(profile).read_text())
    prefixes = sorted(groups, key=len, reverse=True)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    out = [{"wall": r["dur"] / 1e3, "nodes": 0.0, **{g: 0.0 for g in GROUPS}} for r in runs]
    starts = [r["ts"] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        k = max((i for i, s in enumerate(starts) if s <= e["ts"]), default=None)
        if k is None:
            continue
        name, op = e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "")
        g = group_of(name, groups, prefixes, op)
        out[k][g] += e["dur"] / 1e3
        out[k]["nodes"] += 1
        if nodes is not None and k > 0:
            nodes.setdefault(f"{g}: {name} ({op})", []).append(e["dur"] / 1e3)
    return out


def profile_graphs(graphs: dict[str, Path], pixels: np.ndarray, text: np.ndarray, runs: int, threads: int,
                   top: int = 0, log=print) -> dict[str, dict[str, float]]:
    """Median per group (ms) and of the wall time over `runs` interleaved runs of each graph (after one warm-up);
    `top` > 0 also logs each graph's `top` costliest nodes outside the vit group (ms per run)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = {name: profiled_session(p, threads, os.path.join(tmp, name)) for name, p in graphs.items()}
        feeds = {"pixels": pixels, "text_embeddings": text}
        names = list(graphs)
        for rnd in range(runs + 1):
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                sess[name].run(None, feeds)
                time.sleep(0.1)  # let the last graph's idle threads go to sleep
        result = {}
        for name, s in sess.items():
            per_node: dict[str, list[float]] = {}
            rows = per_run(s.end_profiling(), node_groups(graphs[name]), per_node)[1:]  # the first run is the warm-up
            result[name] = {k: statistics.median(r[k] for r in rows) for k in ("wall", "nodes", *GROUPS)}
            if top:
                costly = sorted(((sum(v) / runs, n) for n, v in per_node.items() if not n.startswith("vit:")), reverse=True)[:top]
                log(f"{name}: costliest nodes outside vit, ms per run: " + "; ".join(f"{n} {ms:.2f}" for ms, n in costly))
    return result


def print_table(prof: dict[str, dict[str, float]], batch: int, log=print) -> None:
    names = list(prof)
    log(f"batch {batch}: median ms per call over interleaved runs (kernel time summed per group; wall = whole run)")
    log("| group | " + " | ".join(names) + " |")
    log("|---" * (len(names) + 1) + "|")
    for g in (*GROUPS, "wall"):
        log(f"| {g} | " + " | ".join(f"{prof[n][g]:.1f}" for n in names) + " |")
    log("| kernels | " + " | ".join(f"{prof[n]['nodes']:.0f}" for n in names) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--plain", required=True, help="the plain ONNX graph (export.fused.export_plain; bench_export writes one)")
    ap.add_argument("--variants", default="fp32", help="graphs of the bundle to profile, comma-separated")
    ap.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=0, help="also list each graph's N costliest nodes outside the vit group")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                    help="another graph with the bundle's inputs to profile in the same runs (e.g. one exported at another "
                         "commit: a before/after in one run); repeatable")
    args = ap.parse_args()
    manifest, paths = load_bundle(args.bundle, verify_checksums=False)
    graphs = {"plain": Path(args.plain), **{v: paths.model_for(v) for v in args.variants.split(",") if v}}
    for item in args.extra:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            ap.error(f"argument --extra: expected NAME=PATH of a graph file, got {item!r}")
        graphs[name] = Path(path)
    text = np.load(paths.labels)
    H, W = manifest.preprocess.image_size
    print(f"# profile_export: {args.bundle}, {args.threads} threads, load avg {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for bs in (int(b) for b in args.batch.split(",")):
        pixels = np.random.default_rng(bs).standard_normal((bs, 3, H, W), dtype=np.float32)
        print_table(profile_graphs(graphs, pixels, text, args.runs, args.threads, args.top), bs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
