"""Console scripts of the batch jobs: `cltvit-score` (folder scoring, local or Ray), `cltvit-stream`
(JSONL in, JSONL out) and `cltvit-drift` (reference profiles and drift reports).

Bad arguments print one line naming the argument (`cltvit-score: error: argument --bundle: ...`)
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from .drift import DriftError, DriftMonitor, DriftProfile, read_result_shares, read_results
from .ray_engine import score_with_ray
from ..choice import AUTO
from .score import FORMATS, ScoreError, bundle_identity, open_explainer, resume_variant, score_folder
from .stream import run_stream

TOTAL_EFFECT_HELP = ("records carry the predicted label's total-effect map: the model run on patches + 1 edited copies of "
                     "each image (each patch alone on the bundle's fill), in logit units; patches + 1 times the model work")


def load_explainer(args: argparse.Namespace, prog: str, bench_batches: Sequence[int], variant: str | None = None) -> tuple[Any, Any]:
    """(Explainer, DriftMonitor or None) from the CLI arguments; ScoreError names the bad argument.

    Shared by cltvit-score and cltvit-stream (`bundle`, `labels`, `top_k`, `device`, `variant`,
    `threads`, `reference`, `window`, `spatial`, `total_effect`); `variant` overrides `args.variant`, `auto`
    is timed at `bench_batches` (the batch sizes the job runs) and the choice printed to stderr.
    """
    explainer = open_explainer(args.bundle, labels=args.labels, top_k=args.top_k, device=args.device,
                               variant=variant or args.variant, threads=args.threads, spatial=args.spatial,
                               total_effect=args.total_effect, bench_batches=bench_batches)
    print(f"{prog}: {explainer.runtime.variant_choice.summary()}", file=sys.stderr)
    try:
        monitor = explainer.monitor(args.reference, window=args.window) if args.reference else None
    except DriftError as e:
        raise ScoreError(f"argument --reference: {e}") from None
    return explainer, monitor


# ---------------------------------------------------------------------- cltvit-score
def build_score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cltvit-score", description="Score every image below a folder with a bundle, one JSON line per image (resumable).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (cltvit-export)")
    p.add_argument("--out", type=Path, required=True, help="results file (.jsonl or .parquet); a directory for --engine ray")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from --out's extension, else jsonl")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding threads (local) or inference actors (ray)")
    p.add_argument("--prefetch", type=int, default=2, help="batches decoded ahead of inference (local)")
    p.add_argument("--labels", nargs="+", default=None, help="class names (default: the bundle's labels)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--variant", default=AUTO, help="graph variant in the bundle (fp32, int8, int8-clt, int8-dec, fp16), or auto (default): "
                   "the fastest at --batch-size that passes the bundle's accuracy gate, else fp32; a resumed run keeps the "
                   "variant it started with")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--reference", type=Path, default=None, help="drift reference profile (cltvit-drift reference)")
    p.add_argument("--window", type=int, default=500, help="drift window (images)")
    p.add_argument("--metrics-file", type=Path, default=None, help="Prometheus textfile for drift metrics")
    p.add_argument("--spatial", action="store_true",
                   help="records carry the predicted label's patch maps (where in the image; local engine)")
    p.add_argument("--total-effect", action="store_true", help=TOTAL_EFFECT_HELP + " (local engine)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def score_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cltvit-score`."""
    parser = build_score_parser()
    args = parser.parse_args(argv)
    fmt = args.format or ("parquet" if args.out.suffix == ".parquet" else "jsonl")
    for name in ("batch_size", "top_k", "window", "prefetch"):
        if getattr(args, name) < (0 if name == "prefetch" else 1):
            parser.error(f"argument --{name.replace('_', '-')}: must be >= {0 if name == 'prefetch' else 1}, got {getattr(args, name)}")
    if args.metrics_file is not None and args.reference is None:
        parser.error("argument --metrics-file: needs --reference (the metrics are drift scores)")
    if args.workers is not None and args.workers < 1:
        parser.error(f"argument --workers: must be >= 1, got {args.workers}")
    if not args.dir.is_dir() and not (args.engine == "ray" and "://" in str(args.dir)):
        parser.error(f"argument DIR: {args.dir} is not a directory")
    try:
        if args.engine == "ray":
            if args.reference is not None:
                raise ScoreError("argument --reference: drift windows need one ordered stream; use --engine local, "
                                 "or run `cltvit-drift compare` on the results")
            if args.spatial:
                raise ScoreError("argument --spatial: spatial maps are written by --engine local only")
            if args.total_effect:
                raise ScoreError("argument --total-effect: total-effect maps are written by --engine local only")
            summary = score_with_ray(
                args.dir, args.out, bundle=args.bundle, fmt=fmt, batch_size=args.batch_size,
                concurrency=args.workers or 1, labels=args.labels, top_k=args.top_k, address=args.ray_address,
                device=args.device, variant=args.variant, threads=args.threads, overwrite=args.overwrite,
            )
        else:
            explainer, monitor = load_explainer(args, "cltvit-score", (args.batch_size,), resume_variant(args.out, args.variant, args.overwrite))
            summary = score_folder(
                args.dir, explainer, args.out, fmt=fmt, batch_size=args.batch_size,
                workers=args.workers or min(4, os.cpu_count() or 1), prefetch=args.prefetch,
                overwrite=args.overwrite, monitor=monitor, metrics_file=args.metrics_file,
                progress=not args.quiet, bundle_id=bundle_identity(args.bundle),
            )
            if monitor is not None:
                print(json.dumps({"drift": monitor.summary()}), file=sys.stderr)
    except ScoreError as e:
        print(f"cltvit-score: error: {e}", file=sys.stderr)
        return 2
    print(f"cltvit-score: {summary.total} images, {summary.scored} scored now ({summary.errors} unreadable), "
          f"{summary.skipped} already in {summary.out}; {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- cltvit-stream
def stream_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cltvit-stream`."""
    p = argparse.ArgumentParser(prog="cltvit-stream", description="Image paths or JSON lines on stdin -> one JSON result per line on stdout, in order.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (cltvit-export)")
    p.add_argument("--labels", nargs="+", default=None, help="class names (default: the bundle's labels)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="most lines run together")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--variant", default=AUTO, help="graph variant in the bundle, or auto (default): the fastest at batch "
                   "sizes 1 and --batch-size that passes the bundle's accuracy gate, else fp32")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--reference", type=Path, default=None, help="drift reference profile (cltvit-drift reference)")
    p.add_argument("--window", type=int, default=500, help="drift window (images)")
    p.add_argument("--metrics-file", type=Path, default=None, help="Prometheus textfile for drift metrics")
    p.add_argument("--spatial", action="store_true", help="records carry the predicted label's patch maps (where in the image)")
    p.add_argument("--total-effect", action="store_true", help=TOTAL_EFFECT_HELP)
    args = p.parse_args(argv)
    for name in ("top_k", "batch_size", "workers", "window"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.metrics_file is not None and args.reference is None:
        p.error("argument --metrics-file: needs --reference (the metrics are drift scores)")

    try:
        explainer, monitor = load_explainer(args, "cltvit-stream", (1, args.batch_size))
    except ScoreError as e:
        print(f"cltvit-stream: error: {e}", file=sys.stderr)
        return 2
    try:
        run_stream(explainer, sys.stdin, sys.stdout, batch_size=args.batch_size, workers=args.workers,
                   monitor=monitor, metrics_file=args.metrics_file)
    except BrokenPipeError:  # the consumer went away: stop quietly, like other pipeline tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


# ---------------------------------------------------------------------- cltvit-drift
def _cmd_reference(args: argparse.Namespace) -> int:
    names, shares, predicted = read_results(args.results)
    meta: dict[str, Any] = {"source": str(args.results)}
    # cltvit-score's sidecar says which bundle and label set made the results: the profile then
    # carries the class mix and refuses to serve another bundle (cltvit-serve --reference)
    run = _run_meta(args.results)
    classes = None
    if run is not None:
        meta.update(bundle=run.get("bundle"), labels=run.get("labels"))
        classes = run.get("labels")
    profile = DriftProfile.from_shares(shares, names, meta=meta, predicted=predicted if classes else None, classes=classes)
    profile.save(args.out)
    mix = f", class mix over {len(profile.classes)} labels" if profile.classes else " (no class mix: no cltvit-score .meta.json beside the results)"
    print(f"wrote reference profile of {profile.count} images, {len(names)} terms{mix}, to {args.out}", file=sys.stderr)
    return 0


def _run_meta(results: Path) -> dict[str, Any] | None:
    """The `<results>.meta.json` cltvit-score wrote beside a results file, if any."""
    path = results.with_name(results.name + ".meta.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("labels"), list) else None


def _cmd_compare(args: argparse.Namespace) -> int:
    ref = DriftProfile.load(args.reference)
    names, shares = read_result_shares(args.results)
    ref.check_terms(names)
    mon = DriftMonitor(ref, window=args.window or max(1, shares.shape[0]))
    mon.update(shares)
    print(json.dumps(mon.summary(), indent=2))
    if args.metrics_file:
        mon.write_metrics(args.metrics_file)
    return 0


def drift_main(argv: Iterable[str] | None = None) -> int:
    """`cltvit-drift reference|compare`: save a reference profile or score drift of a results file."""
    p = argparse.ArgumentParser(prog="cltvit-drift", description="Drift monitoring on per-layer contribution shares: save a reference profile, or score a results file against one.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference", help="save a reference profile from cltvit-score results (JSONL)")
    r.add_argument("results", type=Path, help="results JSONL written by cltvit-score or cltvit-stream")
    r.add_argument("--out", type=Path, required=True, help="where to write the profile (JSON)")
    c = sub.add_parser("compare", help="mean-shift drift of a results file against a reference profile")
    c.add_argument("results", type=Path)
    c.add_argument("--reference", type=Path, required=True, help="profile saved by `cltvit-drift reference`")
    c.add_argument("--window", type=int, default=None, help="score only the last N results (default: all)")
    c.add_argument("--metrics-file", type=Path, default=None, help="also write Prometheus text metrics here")
    args = p.parse_args(list(argv) if argv is not None else None)
    if getattr(args, "window", None) is not None and args.window < 1:
        p.error(f"argument --window: must be >= 1, got {args.window}")
    try:
        return _cmd_reference(args) if args.cmd == "reference" else _cmd_compare(args)
    except DriftError as e:
        print(f"cltvit-drift: error: {e}", file=sys.stderr)
        return 2
