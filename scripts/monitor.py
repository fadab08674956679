"""`make monitor`: the service and a Prometheus with the monitoring kit (monitoring/), on loopback.

    python scripts/monitor.py run --bundle B [--reference ref.json] [--port 3000] [--prometheus-port 9090] [--work DIR]
    python scripts/monitor.py reference --bundle B --out ref.json [--images 1000]
    python scripts/monitor.py traffic --url http://127.0.0.1:3000 [--images 300] [--invert] [--rate 20]

`run` starts `cltvit-serve --reference` and Debian's `prometheus` (monitoring/prometheus.yml with its
targets pointed at that service, the kit's recording and alert rules), prints their URLs, and stops
both on Ctrl-C. Without --reference it uses DIR/reference.json, made on first use (and again
when the bundle changes) from Fashion-MNIST training images. `traffic` sends Fashion-MNIST test
images (`--invert`: inverted, which drifts) so the dashboard's panels move. The tests reuse
`prometheus_config` and `running_prometheus` (tests/monitoring/).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import requests
import yaml
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle import load_bundle  # noqa: E402
from serving.cli import free_port, server_process, stop_process_group  # noqa: E402
from serving.explainer import Explainer  # noqa: E402
from serving.jobs.drift import DriftError, DriftProfile  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from load.fmnist import fashion_mnist_arrays  # noqa: E402

KIT = ROOT / "monitoring"


# ---------------------------------------------------------------------- Prometheus
def prometheus_config(services: dict[str, Sequence[str]], *, interval: str = "15s", rule_files: Sequence[Path] | None = None,
                      stream_targets: Sequence[str] = (), alertmanager: str | None = None) -> dict[str, Any]:
    """The kit's prometheus.yml with `services` ({job: [host:port, ...]}) as the service's scrape jobs,
    the rule files as absolute paths, and the given scrape/evaluation interval."""
    cfg = yaml.safe_load((KIT / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    cfg["rule_files"] = [str(p) for p in (rule_files or sorted((KIT / "rules").glob("*.yml")))]
    template = next(j for j in cfg["scrape_configs"] if j["job_name"] == "cltvit")
    stream = next(j for j in cfg["scrape_configs"] if j["job_name"] == "cltvit-stream")
    jobs = [{**template, "job_name": job, "static_configs": [{"targets": list(targets)}]} for job, targets in services.items()]
    if stream_targets:
        jobs.append({**stream, "static_configs": [{"targets": list(stream_targets)}]})
    cfg["scrape_configs"] = jobs
    if alertmanager:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    else:
        cfg.pop("alerting", None)
    return cfg


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise SystemExit("prometheus not found: `make prometheus` installs Debian's package (apt-get install -y prometheus)")
    return path


@contextlib.contextmanager
def running_prometheus(config: dict[str, Any], work: Path, port: int | None = None,
                       ready_timeout: float = 60.0) -> Iterator[str]:
    """Run Prometheus on 127.0.0.1 with `config` (its data and log in `work`); yield its base URL."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [prometheus_binary(), f"--config.file={cfg_path}", f"--storage.tsdb.path={work / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=2d", "--web.enable-lifecycle"]
    with open(work / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited with status {proc.returncode}; see {work / 'prometheus.log'}")
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus not ready after {ready_timeout:.0f} s; see {work / 'prometheus.log'}")
                time.sleep(0.2)
            yield url
        finally:
            stop_process_group(proc)


# ---------------------------------------------------------------------- images and reference
def fashion_mnist(split: str, n: int) -> list[Image.Image]:
    """The first n Fashion-MNIST images of `split` ('train' or 't10k') as grayscale PIL images (no torch)."""
    return [Image.fromarray(a, mode="L") for a in fashion_mnist_arrays(split, n)]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_reference(bundle: str | Path, out: Path, images: int = 1000) -> DriftProfile:
    """A drift reference profile of `bundle` over the first `images` Fashion-MNIST training images."""
    profile = Explainer(bundle).reference_profile([im.convert("RGB") for im in fashion_mnist("train", images)])
    profile = dataclasses.replace(profile, meta={**(profile.meta or {}), "source": f"Fashion-MNIST train[:{images}]"})
    profile.save(out)
    return profile


def ensure_reference(bundle: str | Path, path: Path) -> Path:
    """`path` if it holds a profile of this bundle, else a fresh one written there."""
    manifest, _ = load_bundle(bundle, verify_checksums=False)
    try:
        DriftProfile.load(path).check_bundle(manifest.term_names, manifest.labels.names, manifest.files.get("model.onnx"))
        return path
    except DriftError:
        print(f"monitor: making the drift reference {path} from 1000 Fashion-MNIST training images ...", file=sys.stderr)
        make_reference(bundle, path)
        return path


def send_traffic(url: str, images: int = 300, invert: bool = False, rate: float = 0.0, endpoint: str = "explain") -> int:
    """POST the first `images` Fashion-MNIST test images (inverted if asked) to `url`/`endpoint`; returns the 200s."""
    ok = 0
    for im in fashion_mnist("t10k", images):
        img = ImageOps.invert(im) if invert else im
        r = requests.post(f"{url}/{endpoint}", files={"image": ("i.png", png(img), "image/png")}, timeout=60)
        ok += r.status_code == 200
        if rate > 0:
            time.sleep(1.0 / rate)
    return ok


# ---------------------------------------------------------------------- commands
def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    # Ctrl-C (and a plain kill) end the wait below, and the context managers stop both children (each in
    # its own session, so the terminal's SIGINT reaches only this process); installed explicitly because
    # a shell that starts this in the background leaves SIGINT ignored
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    reference = Path(args.reference) if args.reference else ensure_reference(args.bundle, work / "reference.json")
    service_args = ["--reference", str(reference), *args.serve_args]
    config = prometheus_config({"cltvit": [f"127.0.0.1:{args.port}"]}, interval=args.interval)
    with server_process(args.bundle, port=args.port, extra_args=service_args, log_path=work / "service.log") as (url, _), \
            running_prometheus(config, work / "prometheus", port=args.prometheus_port) as prom:
        print(f"service:    {url}  (viewer {url}/ui/, metrics {url}/metrics; log {work / 'service.log'})")
        print(f"prometheus: {prom}  (alerts {prom}/alerts, rules {prom}/rules, targets {prom}/targets)")
        print(f"drift reference: {reference}")
        print(f"traffic:    python scripts/monitor.py traffic --url {url} [--invert]")
        print("Grafana: import monitoring/grafana/cltvit-dashboard.json (docs/monitoring.md). Ctrl-C stops both.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nmonitor: stopping the service and Prometheus", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="service + Prometheus with the kit, until Ctrl-C")
    r.add_argument("--bundle", required=True)
    r.add_argument("--reference", default=None, help="drift reference profile (default: WORK/reference.json, made on first use)")
    r.add_argument("--port", type=int, default=3000)
    r.add_argument("--prometheus-port", type=int, default=9090)
    r.add_argument("--interval", default="15s", help="scrape and rule evaluation interval")
    r.add_argument("--work", default="artifacts/monitor", help="Prometheus data, logs, the reference profile")
    r.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more cltvit-serve arguments (last)")
    f = sub.add_parser("reference", help="a drift reference profile from Fashion-MNIST training images")
    f.add_argument("--bundle", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--images", type=int, default=1000)
    t = sub.add_parser("traffic", help="send Fashion-MNIST test images to a running service")
    t.add_argument("--url", default="http://127.0.0.1:3000")
    t.add_argument("--images", type=int, default=300)
    t.add_argument("--invert", action="store_true", help="invert the images (the explanations drift)")
    t.add_argument("--rate", type=float, default=0.0, help="requests per second (0: as fast as answered)")
    t.add_argument("--endpoint", default="explain", choices=("classify", "explain", "embed"))
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "reference":
        p = make_reference(args.bundle, Path(args.out), args.images)
        print(f"wrote {args.out}: {p.count} images, {len(p.term_names)} terms, {len(p.classes)} classes", file=sys.stderr)
        return 0
    ok = send_traffic(args.url, args.images, args.invert, args.rate, args.endpoint)
    print(f"{ok} of {args.images} answered 200", file=sys.stderr)
    return 0 if ok == args.images else 1


if __name__ == "__main__":
    sys.exit(main())
