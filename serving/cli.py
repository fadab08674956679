"""`cltvit-serve --bundle DIR [--port 3000]`: validate a bundle, then serve it with BentoML.

The bundle is validated here first (manifest, checksums, graph signatures, variant), so a missing,
corrupt or mismatched bundle stops the start with one clear message and exit status 2 instead of
a crashing worker. Then the process becomes `bentoml serve serving.service:CltvitService` with
the settings passed as CLTVIT_* environment variables (see serving/service.py). The bearer token
is read from the environment only (CLTVIT_API_TOKEN), never from the command line.

`running_server(...)` starts the same command as a child process and waits until it is ready
(used by the tests and the load test).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from bundle import BundleError, load_bundle

SERVICE_IMPORT = "serving.service:CltvitService"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cltvit-serve",
        description="Serve a cltvit bundle over HTTP (BentoML + ONNX Runtime). "
        "Set CLTVIT_API_TOKEN to require 'Authorization: Bearer <token>' on every endpoint but the health probes.",
    )
    p.add_argument("--bundle", default=os.environ.get("CLTVIT_BUNDLE"),
                   help="bundle directory written by cltvit-export (default: $CLTVIT_BUNDLE)")
    p.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0; 127.0.0.1 for loopback only)")
    p.add_argument("--port", type=int, default=3000, help="TCP port (default 3000)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device (default auto: CUDA if present)")
    p.add_argument("--variant", default="fp32", help="graph variant from the bundle's 'variants' (fp32, int8, fp16)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    p.add_argument("--max-batch-size", type=int, default=16, help="adaptive batching: largest batch (default 16)")
    p.add_argument("--max-latency-ms", type=int, default=20_000,
                   help="adaptive batching latency budget in ms; requests predicted to exceed it get 503 (default 20000)")
    p.add_argument("--timeout", type=int, default=120, help="request timeout in seconds (default 120)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files at startup")
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
    if args.max_batch_size < 2:
        _fail(parser, f"--max-batch-size must be >= 2, got {args.max_batch_size}")
    if args.max_latency_ms < 10:
        _fail(parser, f"--max-latency-ms must be >= 10, got {args.max_latency_ms}")
    if args.timeout < 1:
        _fail(parser, f"--timeout must be >= 1, got {args.timeout}")
    try:
        _, paths = load_bundle(args.bundle, verify_checksums=not args.no_verify)
    except BundleError as exc:
        _fail(parser, str(exc))
        raise  # unreachable: parser.exit raises SystemExit
    if args.variant not in paths.models:
        _fail(parser, f"--variant {args.variant!r}: bundle {paths.root} has only {', '.join(sorted(paths.models))}")
    env = {
        "CLTVIT_BUNDLE": str(paths.root),
        "CLTVIT_DEVICE": args.device,
        "CLTVIT_VARIANT": args.variant,
        "CLTVIT_MAX_BATCH_SIZE": str(args.max_batch_size),
        "CLTVIT_MAX_LATENCY_MS": str(args.max_latency_ms),
        "CLTVIT_TIMEOUT_S": str(args.timeout),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    if args.threads is not None:
        env["CLTVIT_THREADS"] = str(args.threads)
    return env


def serve_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = {**os.environ, **validate_args(parser, args)}
    if args.no_verify:
        env["CLTVIT_NO_VERIFY"] = "1"
    print(f"cltvit-serve: serving {env['CLTVIT_BUNDLE']} on http://{args.host}:{args.port} "
          f"(auth {'on' if env.get('CLTVIT_API_TOKEN') else 'off'})", file=sys.stderr, flush=True)
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


@contextlib.contextmanager
def running_server(
    bundle: str | Path,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    ready_timeout: float = 180.0,
) -> Iterator[str]:
    """Run `cltvit-serve` on 127.0.0.1 as a child process; yield its base URL; stop it on exit."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving.cli", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port), *extra_args]
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, ready_timeout, proc)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()


if __name__ == "__main__":
    main()
