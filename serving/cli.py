"""`cltvit-serve --bundle DIR [--host 127.0.0.1] [--port 3000]`: validate a bundle, then serve it with BentoML.
`cltvit-explain IMAGE --bundle DIR [--heatmap out.png] [--html report.html] [--json]`: explain one image in process;
with `--ablate L:I`, `--term attn.5=0`, `--delete-patch R,C` ... (docs/intervene.md) run it edited too.

The bundle is validated here first (manifest, checksums, graph signatures, variant), so a missing,
corrupt or mismatched bundle stops the start with one clear message and exit status 2 instead of
a crashing worker. Then the process becomes `bentoml serve serving.service:CltvitService` with
the settings passed as CLTVIT_* environment variables (serving/settings.py, docs/serving.md).
The bearer token is read from the environment only (CLTVIT_API_TOKEN), never from the command line.

The server listens on loopback (127.0.0.1) unless told otherwise: `--host 0.0.0.0` (or another
address) opts in to being reachable from the network, and doing so without a token prints a
warning.

`running_server(...)` starts the same command as a child process and waits until it is ready
(used by the tests and the load test).

`cltvit-explain` runs the bundle in this process (serving.Explainer, no server) and prints a summary
(top labels, the largest terms of the predicted logit, the summed patch map) or, with `--json`, the
whole `ImageResult`; `--heatmap PNG` writes the image with the predicted label's map laid over it;
`--html FILE` writes the /ui viewer with this explanation as one self-contained page (serving/report.py).
Its outputs are independent steps after one explanation (`explain_outputs`), so a new output format
is one more argument and one more function.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bundle import BundleError, load_bundle

from .choice import AUTO, VariantChoice
from .explainer import Explainer, read_image
from .images import ImageError
from .intervene import EditError, InterventionUnavailable
from .jobs.drift import DriftError, DriftProfile
from .report import write_report
from .runtime import LabelError, RuntimeSetupError, SpatialUnavailable, TotalEffectUnavailable, cuda_present
from .schemas import ImageResult, InterveneResponse
from .sessions import open_session, session_options
from .variant_bench import BENCH_BUDGET_S, resolve_variant

SERVICE_IMPORT = "serving.service:CltvitService"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cltvit-serve",
        description="Serve a cltvit bundle over HTTP (BentoML + ONNX Runtime). "
        "Set CLTVIT_API_TOKEN to require 'Authorization: Bearer <token>' on every endpoint but the health probes.",
    )
    p.add_argument("--bundle", default=os.environ.get("CLTVIT_BUNDLE"),
                   help="bundle directory written by cltvit-export (default: $CLTVIT_BUNDLE)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1, loopback only; 0.0.0.0 serves every interface)")
    p.add_argument("--port", type=int, default=3000, help="TCP port (default 3000)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device (default auto: CUDA if present)")
    p.add_argument("--variant", default=AUTO,
                   help="graph variant from the bundle's 'variants' (fp32, int8, int8-clt, fp16), or auto (default): the fastest "
                        "that passes the bundle's accuracy gate, timed here at start at batch sizes 1 and --max-batch-size; "
                        "fp32 when none passes (docs/serving.md)")
    p.add_argument("--variant-bench-s", type=float, default=BENCH_BUDGET_S,
                   help=f"seconds of auto's start-up benchmark rounds at most (default {BENCH_BUDGET_S:g})")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, each with its own ONNX Runtime session and batcher (default 1)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per worker (default: ORT's choice)")
    p.add_argument("--ort-spinning", action="store_true",
                   help="let idle ONNX Runtime threads busy-wait (lower latency, burns CPU the HTTP side may need)")
    p.add_argument("--max-batch-size", type=int, default=16, help="largest batch of images per model call (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="hold the first image of a batch this long for company when the model is idle (default 0)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="queued images per worker beyond which requests get 503 + Retry-After (default 256)")
    p.add_argument("--max-latency-ms", type=int, default=20_000,
                   help="an image that waited this long in the queue gets 503 + Retry-After instead of a late answer (default 20000)")
    p.add_argument("--timeout", type=int, default=120, help="request timeout in seconds (default 120)")
    p.add_argument("--label-cache-mb", type=float, default=64.0, help="memory bound of the custom label embeddings per worker (rows per label, recent sets), MiB (default 64)")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default: it costs CPU per request)")
    p.add_argument("--stall-report-ms", type=float, default=0.0, metavar="MS",
                   help="when a worker's event loop serves nothing for MS milliseconds, write every thread's stack to the "
                        "server's stderr, then log how long the stall lasted (default 0: off; /metrics always carries "
                        "cltvit_event_loop_lag_seconds)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files at startup")
    p.add_argument("--reference", default=os.environ.get("CLTVIT_DRIFT_REFERENCE"), metavar="REF_JSON",
                   help="drift reference profile (cltvit-drift reference) made with this bundle: /metrics then carries "
                   "the drift statistics of the served explanations (docs/monitoring.md; default: $CLTVIT_DRIFT_REFERENCE)")
    p.add_argument("--no-intervene", action="store_true",
                   help="do not open the bundle's intervention graph: POST /intervene answers 400, and each worker saves "
                        "its memory (a second copy of the model's weights)")
    return p


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Check the arguments and the bundle; return the CLTVIT_* environment for the service."""
    if not args.bundle:
        _fail(parser, "--bundle DIR is required (or set CLTVIT_BUNDLE)")
    if not 1 <= args.port <= 65535:
        _fail(parser, f"--port must be in 1..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        _fail(parser, f"--threads must be >= 1, got {args.threads}")
    if args.workers < 1:
        _fail(parser, f"--workers must be >= 1, got {args.workers}")
    if args.max_batch_size < 1:
        _fail(parser, f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not 0 <= args.batch_wait_ms <= 1000:
        _fail(parser, f"--batch-wait-ms must be in 0..1000, got {args.batch_wait_ms}")
    if args.max_queue < 1:
        _fail(parser, f"--max-queue must be >= 1, got {args.max_queue}")
    if args.label_cache_mb <= 0:
        _fail(parser, f"--label-cache-mb must be > 0, got {args.label_cache_mb}")
    if args.max_latency_ms < 10:
        _fail(parser, f"--max-latency-ms must be >= 10, got {args.max_latency_ms}")
    if args.timeout < 1:
        _fail(parser, f"--timeout must be >= 1, got {args.timeout}")
    if not 0 <= args.stall_report_ms <= 60_000:
        _fail(parser, f"--stall-report-ms must be in 0..60000, got {args.stall_report_ms}")
    try:
        manifest, paths = load_bundle(args.bundle, verify_checksums=not args.no_verify)
    except BundleError as exc:
        _fail(parser, str(exc))
        raise  # unreachable: parser.exit raises SystemExit
    if args.variant != AUTO and args.variant not in paths.models:
        _fail(parser, f"--variant {args.variant!r}: bundle {paths.root} has only {AUTO}, {', '.join(sorted(paths.models))}")
    if not 0 <= args.variant_bench_s <= 60:
        _fail(parser, f"--variant-bench-s must be in 0..60, got {args.variant_bench_s}")
    # one worker chooses for itself and keeps the chosen session open; several get one choice made here, timed once
    choice = choose_served_variant(manifest, paths, args) if args.variant != AUTO or args.workers > 1 else None
    if args.reference:
        try:
            DriftProfile.load(args.reference).check_bundle(manifest.term_names, manifest.labels.names,
                                                           manifest.files.get("model.onnx"),
                                                           source=f"reference profile {args.reference}")
        except DriftError as exc:
            _fail(parser, f"argument --reference: {exc}")
    env = {
        "CLTVIT_BUNDLE": str(paths.root),
        "CLTVIT_DEVICE": args.device,
        "CLTVIT_VARIANT": AUTO if choice is None else choice.variant,
        "CLTVIT_VARIANT_BENCH_S": str(args.variant_bench_s),
        "CLTVIT_WORKERS": str(args.workers),
        "CLTVIT_MAX_BATCH_SIZE": str(args.max_batch_size),
        "CLTVIT_BATCH_WAIT_MS": str(args.batch_wait_ms),
        "CLTVIT_MAX_QUEUE": str(args.max_queue),
        "CLTVIT_MAX_LATENCY_MS": str(args.max_latency_ms),
        "CLTVIT_TIMEOUT_S": str(args.timeout),
        "CLTVIT_LABEL_CACHE_MB": str(args.label_cache_mb),
        "CLTVIT_ORT_SPINNING": "1" if args.ort_spinning else "0",
        "CLTVIT_ACCESS_LOG": "1" if args.access_log else "0",
        "CLTVIT_NO_INTERVENE": "1" if args.no_intervene else "0",
        "CLTVIT_STALL_REPORT_MS": str(args.stall_report_ms),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    if args.reference:
        env["CLTVIT_DRIFT_REFERENCE"] = str(Path(args.reference).resolve())
    if choice is not None:
        env["CLTVIT_VARIANT_CHOICE"] = choice.model_dump_json()
    if args.threads is not None:
        env["CLTVIT_THREADS"] = str(args.threads)
    return env


def choose_served_variant(manifest: Any, paths: Any, args: argparse.Namespace) -> VariantChoice:
    """The variant every worker will serve: `--variant` as given, or auto's choice, timed here once before the
    workers start (so that several workers all serve the same graph), with the sessions a worker would open."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and cuda_present())
    opts = session_options(args.threads, args.ort_spinning)
    choice, _ = resolve_variant(manifest, paths, args.variant, lambda v: open_session(paths.model_for(v), opts, use_cuda, v),
                                batch_sizes=(1, args.max_batch_size), budget_s=args.variant_bench_s)
    return choice


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address or 'localhost' (reachable from this machine only)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, token_set: bool) -> str | None:
    """The warning printed when the server would be reachable from the network without a token."""
    if is_loopback(host) or token_set:
        return None
    return (f"cltvit-serve: warning: binding {host} (reachable from the network) without a token: anyone who can "
            "reach this port can use the service; set CLTVIT_API_TOKEN to require a bearer token")


def serve_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = {**os.environ, **validate_args(parser, args)}
    if args.no_verify:
        env["CLTVIT_NO_VERIFY"] = "1"
    warning = exposure_warning(args.host, bool(env.get("CLTVIT_API_TOKEN")))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    drift = f", drift against {env['CLTVIT_DRIFT_REFERENCE']}" if env.get("CLTVIT_DRIFT_REFERENCE") else ""
    variant = (VariantChoice.model_validate_json(env["CLTVIT_VARIANT_CHOICE"]).summary() if "CLTVIT_VARIANT_CHOICE" in env
               else "variant auto: the worker times the gated variants at start and logs its choice")
    print(f"cltvit-serve: serving {env['CLTVIT_BUNDLE']} on http://{args.host}:{args.port} "
          f"(auth {'on' if env.get('CLTVIT_API_TOKEN') else 'off'}{drift}); {variant}", file=sys.stderr, flush=True)
    cmd = serve_command(args.host, args.port)
    os.execve(cmd[0], cmd, env)


# ---------------------------------------------------------------------- for tests and load runs
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `url`/readyz until it answers 200; raise RuntimeError on timeout or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f}s")


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), SIGKILL it after
    `timeout` seconds, and reap `proc`; nothing if it has exited already."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def server_process(
    bundle: str | Path,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    ready_timeout: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `cltvit-serve` on 127.0.0.1 as a child process group; yield (base URL, process); stop it on exit.

    The server gets a BentoML home of its own: every `bentoml serve` empties its home's Prometheus
    directory at start, which would wipe the metrics of other servers running on the same machine.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port), *extra_args]
    home = tempfile.mkdtemp(prefix="cltvit-bentoml-home-")
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": home, **(env or {})}
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, ready_timeout, proc)
        yield url, proc
    finally:
        stop_process_group(proc)
        if log is not subprocess.DEVNULL:
            log.close()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def running_server(bundle: str | Path, **kwargs: object) -> Iterator[str]:
    """`server_process` yielding only the base URL (arguments as there)."""
    with server_process(bundle, **kwargs) as (url, _):  # type: ignore[arg-type]
        yield url


# ---------------------------------------------------------------------- cltvit-explain
def build_explain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cltvit-explain",
        description="Explain one image with a bundle, in this process (no server): top labels, which layers made "
        "the prediction, and where in the image.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file (any format Pillow reads)")
    p.add_argument("--bundle", default=os.environ.get("CLTVIT_BUNDLE"),
                   help="bundle directory written by cltvit-export (default: $CLTVIT_BUNDLE)")
    p.add_argument("--labels", nargs="+", default=None, help="class names (default: the bundle's labels)")
    p.add_argument("--top-k", type=int, default=5, help="labels reported (default 5)")
    p.add_argument("--heads", action="store_true", help="also per-head maps of the predicted label (in --json)")
    p.add_argument("--total-effect", action="store_true",
                   help="also the total-effect map: the model run on patches + 1 edited copies of the image (each patch "
                   "alone on the bundle's fill), in logit units; --heatmap then draws it instead of the direct map")
    p.add_argument("--heatmap", metavar="PNG", default=None,
                   help="write the image (its own size) with the predicted label's patch map laid over it")
    p.add_argument("--heatmap-label", default=None, help="the label whose map --heatmap draws (default: the predicted one)")
    p.add_argument("--heatmap-layer", type=int, default=None, help="draw one attention layer's map instead of the sum")
    p.add_argument("--html", metavar="FILE", default=None,
                   help="write the explanation as one self-contained HTML page (the /ui viewer with its data, per-head maps included)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON instead of a summary")
    e = p.add_argument_group("what if (docs/intervene.md): the edits below make one edit set, run through the real model")
    e.add_argument("--ablate", metavar="L:I", action="append", default=[], help="ablate CLT feature I of layer L (repeatable)")
    e.add_argument("--scale-feature", metavar="L:I=S", action="append", default=[], help="multiply feature L:I's activation by S")
    e.add_argument("--set-feature", metavar="L:I=V", action="append", default=[], help="set feature L:I's activation to V")
    e.add_argument("--term", metavar="NAME=S", action="append", default=[],
                   help="multiply a term's residual write by S (embed, attn.l, clt.s, bias; S=0 removes it)")
    e.add_argument("--term-tokens", choices=("cls", "all"), default="cls", help="term edits at the CLS token (default) or every token")
    e.add_argument("--delete-patch", metavar="R,C", action="append", default=[], help="replace patch (row R, column C) by the bundle's fill")
    e.add_argument("--drop-key", metavar="R,C", action="append", default=[], help="no token attends to patch (R, C)")
    e.add_argument("--check-linearity", action="store_true",
                   help="also ablate each top feature alone: its logit change next to its direct contribution")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--variant", default=AUTO, help="graph variant from the bundle's 'variants' (fp32, int8, int8-clt, fp16), "
                   "or auto (default): the fastest at batch 1 that passes the bundle's accuracy gate, else fp32")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    return p


def format_grid(cells: list[float], grid: tuple[int, int], indent: str = "  ") -> str:
    """A row-major map of rows x columns cells as aligned signed numbers, one row per line."""
    rows, cols = grid
    return "\n".join(indent + " ".join(f"{v:+9.4f}" for v in cells[r * cols : (r + 1) * cols]) for r in range(rows))


def render_text(result: ImageResult, term_names: list[str], n_terms: int = 6) -> str:
    """The human summary `cltvit-explain` prints without --json."""
    top = result.top[0]
    lines = [f"predicted: {result.predicted} (probability {top.probability:.3f}, logit {top.logit:.3f})",
             "top: " + ", ".join(f"{t.label} {t.probability:.3f}" for t in result.top)]
    if result.explanations:
        terms = sorted(result.explanations[0].terms, key=lambda t: -abs(t.value))[:n_terms]
        lines.append(f"largest terms of the {result.predicted!r} logit: "
                     + ", ".join(f"{t.term} {t.value:+.3f} ({t.share:+.0%})" for t in terms))
    sp = result.spatial
    if sp is not None and sp.classes and sp.classes[0].label == result.predicted:
        c = sp.classes[0]
        rows, cols = sp.grid
        lines.append(f"where in the image: {rows}x{cols} patches, attention layers summed, logit units "
                     f"(all attention {c.attention:+.3f} = patches {float(np.sum(c.total)):+.3f} + CLS->CLS "
                     f"{sum(c.cls_cell):+.3f} + biases {sum(c.value_bias) + sum(c.output_bias):+.3f}):")
        lines.append(format_grid(c.total, sp.grid))
    elif sp is None:
        lines.append("where in the image: this bundle has no spatial maps (re-export it with cltvit-export)")
    te = result.total_effect
    if te is not None and te.classes and te.classes[0].label == result.predicted:
        c = te.classes[0]
        lines.append(f"total effect: {te.grid[0]}x{te.grid[1]} patches, each alone on the fill ({te.rows} edited copies, one "
                     f"batch), logit units (logit {c.logit:+.3f}, on the all-fill image {c.fill_logit:+.3f}; the cells sum "
                     f"to {float(np.sum(c.total)):+.3f}):")
        lines.append(format_grid(c.total, te.grid))
    return "\n".join(lines)


def write_heatmap(args: argparse.Namespace, explainer: Explainer, image: Any, result: ImageResult) -> str:
    """--heatmap: the overlay PNG; returns a line for stderr."""
    label, te = args.heatmap_label, bool(args.total_effect)
    maps = result.total_effect if te else result.spatial
    have = {c.label for c in maps.classes} if maps is not None else set()
    img = explainer.heatmap(image, result=result if label is None or label in have else None, label=label,
                            layer=args.heatmap_layer, total_effect=te)
    img.save(args.heatmap, format="PNG")
    what = ("total effect, each patch alone on the fill" if te else
            f"layer {args.heatmap_layer}" if args.heatmap_layer is not None else "attention layers summed")
    return f"wrote {args.heatmap} ({img.width}x{img.height}, {label or result.predicted}, {what}; red raised the logit, blue lowered it)"


def explain_outputs(args: argparse.Namespace, explainer: Explainer, image: Any, result: ImageResult) -> None:
    """Everything `cltvit-explain` writes after the explanation, in order."""
    if args.heatmap:
        print(write_heatmap(args, explainer, image, result), file=sys.stderr)
    if args.html:
        labels = explainer.label_names if explainer.text_embeddings is not None else None
        print(f"wrote {write_report(args.html, explainer.runtime, image, result, labels)}", file=sys.stderr)
    if args.json:
        print(result.model_dump_json(indent=1))
    else:
        print(render_text(result, explainer.term_names))


FEATURE_OPTIONS = ("ablate", "scale_feature", "set_feature")


def edit_set_from_args(args: argparse.Namespace) -> tuple[dict[str, Any] | None, list[str]]:
    """The edit options as one edit set dict (None when there are none) and, per feature edit, the option
    it came from. Raises ValueError('argument --x: ...') on a malformed value."""
    features, origin = [], []
    for opt in FEATURE_OPTIONS:
        flag = "--" + opt.replace("_", "-")
        for raw in getattr(args, opt):
            where, _, value = raw.partition("=")
            layer, sep, index = where.partition(":")
            try:
                if not sep or (opt != "ablate") != bool(value):
                    raise ValueError
                f: dict[str, Any] = {"layer": int(layer), "index": int(index)}
                if opt == "scale_feature":
                    f["scale"] = float(value)
                elif opt == "set_feature":
                    f["set"] = float(value)
            except ValueError:
                form = "L:I" if opt == "ablate" else "L:I=S" if opt == "scale_feature" else "L:I=V"
                raise ValueError(f"argument {flag}: expected {form}, got {raw!r}") from None
            features.append(f)
            origin.append(flag)
    terms = []
    for raw in args.term:
        name, sep, value = raw.partition("=")
        try:
            terms.append({"term": name.strip(), "scale": float(value) if sep else 0.0})
        except ValueError:
            raise ValueError(f"argument --term: expected NAME=S, got {raw!r}") from None
    patches: dict[str, list[list[int]]] = {}
    for opt, key in (("delete_patch", "delete_patches"), ("drop_key", "drop_keys")):
        for raw in getattr(args, opt):
            try:
                r, c = (int(v) for v in raw.split(","))
            except ValueError:
                raise ValueError(f"argument --{opt.replace('_', '-')}: expected R,C (row, column), got {raw!r}") from None
            patches.setdefault(key, []).append([r, c])
    if not (features or terms or patches):
        return None, []
    return {"features": features, "terms": terms, "term_tokens": args.term_tokens, **patches}, origin


def edit_error_argument(field: str, origin: list[str]) -> str:
    """The command-line option behind an edit set's field (edits[0].features[2].layer -> --scale-feature)."""
    m = re.match(r"edits\[0\]\.(features|terms|delete_patches|drop_keys)(?:\[(\d+)\])?", field)
    if not m:
        return "--ablate"
    kind, j = m.group(1), m.group(2)
    if kind == "features":
        return origin[int(j)] if j is not None and int(j) < len(origin) else "--ablate"
    return {"terms": "--term", "delete_patches": "--delete-patch", "drop_keys": "--drop-key"}[kind]


def render_intervention(answer: InterveneResponse, n_terms: int = 6) -> str:
    """The human summary of `cltvit-explain` with edits: the labels before and after, the terms that moved."""
    base, row = answer.baseline, answer.edited[0]
    after = row.result
    lines = [f"unedited: {base.predicted} (logit {base.top[0].logit:.3f}); edited: {after.predicted} "
             f"(logit {after.top[0].logit:.3f}){' - the prediction changed' if row.predicted_changed else ''}",
             "logits of the unedited top labels: " + ", ".join(f"{c.label} {c.before:.3f} -> {c.after:.3f} ({c.change:+.3f})"
                                                               for c in row.logit_changes)]
    moved = sorted(zip(answer.term_names, row.term_changes), key=lambda t: -abs(t[1]))[:n_terms]
    lines.append(f"terms of the {base.predicted!r} logit that changed most: " + ", ".join(f"{n} {v:+.3f}" for n, v in moved))
    if answer.feature_ablations:
        lines.append("top features: direct contribution vs logit change when ablated (linear: change = -contribution)")
        lines += [f"  {f.layer}:{f.index}  contribution {f.contribution:+.4f}  ablated {f.ablated_change:+.4f}"
                  for f in answer.feature_ablations]
    return "\n".join(lines)


def explain_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cltvit-explain`; 0, or 2 with one error line naming the argument."""
    parser = build_explain_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2

    if not args.bundle:
        return fail("argument --bundle: required (or set CLTVIT_BUNDLE)")
    if args.top_k < 1:
        return fail(f"argument --top-k: must be >= 1, got {args.top_k}")
    if args.threads is not None and args.threads < 1:
        return fail(f"argument --threads: must be >= 1, got {args.threads}")
    if (args.heatmap_label is not None or args.heatmap_layer is not None) and not args.heatmap:
        return fail("argument --heatmap-label/--heatmap-layer: needs --heatmap PNG")
    if args.heatmap_layer is not None and args.total_effect:
        return fail("argument --heatmap-layer: the total-effect map has no layers (leave it out with --total-effect)")
    try:
        edit, origin = edit_set_from_args(args)
    except ValueError as e:
        return fail(str(e))
    if args.total_effect and (edit is not None or args.check_linearity):
        return fail("argument --total-effect: not with the edit options (--ablate, --term, --delete-patch, ..., --check-linearity), "
                    "which print the intervention instead; run them separately")
    try:
        explainer = Explainer(args.bundle, labels=args.labels, top_k=args.top_k, device=args.device,
                              variant=args.variant, threads=args.threads, bench_batches=(1,))
    except BundleError as e:
        return fail(f"argument --bundle: {e}")
    except RuntimeSetupError as e:
        return fail(f"argument --{'threads' if 'threads' in str(e) else 'variant' if 'variant' in str(e) else 'device'}: {e}")
    except LabelError as e:
        return fail(f"argument --labels: {e}")
    if explainer.runtime.spatial is None:
        for flag, on in (("--heads", args.heads), ("--heatmap", args.heatmap and not args.total_effect)):
            if on:
                return fail(f"argument {flag}: {explainer.runtime.spatial_unavailable_message()}")
    if args.total_effect and explainer.runtime.patches is None:
        return fail(f"argument --total-effect: {explainer.runtime.total_effect_unavailable_message()}")
    try:
        image = read_image(args.image)
    except (ImageError, TypeError) as e:
        return fail(f"argument IMAGE: {e}")
    if edit is not None or args.check_linearity:
        try:
            answer = explainer.intervene(image, [edit or {}], check_linearity=args.check_linearity)
        except InterventionUnavailable as e:
            return fail(f"argument --bundle: {e}")
        except EditError as e:
            return fail(f"argument {edit_error_argument(e.field, origin)}: {e.message}")
        print(answer.model_dump_json(indent=1) if args.json else render_intervention(answer))
        return 0
    (result,) = explainer.explain([image], heads=args.heads or (bool(args.html) and explainer.runtime.spatial is not None),
                                  total_effect=args.total_effect)
    try:
        explain_outputs(args, explainer, image, result)
    except (LabelError, SpatialUnavailable, TotalEffectUnavailable) as e:
        return fail(f"argument --heatmap-{'layer' if 'layer' in str(e) else 'label'}: {e}")
    except OSError as e:
        which = "--html" if args.html and Path(args.html).name in str(e) else "--heatmap"
        return fail(f"argument {which}: cannot write {e.filename or ''}: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    main()
