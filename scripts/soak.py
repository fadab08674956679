#!/usr/bin/env python
"""`make soak`: long mixed traffic against one `cltvit-serve`, with per-window figures and a verdict.

Traffic (each group in its own process, so a client's own pauses do not show up as the server's):
- `explain`: 4 keep-alive connections posting one Fashion-MNIST image to /explain back to back;
- `classify`: 2 keep-alive connections posting /classify with a custom label set of 3-8 words drawn
  from a pool of 400 (the label-set cache and the tokenizer's word cache churn);
- `bad`: one client every 0.2 s sending a bad request (undecodable image, malformed labels, top_k out of
  range, unknown field) or a GET of a random unknown path;
- `livez`: one client polling /livez every 10 ms; a "pause" is the longest /livez round trip of a window
  (the whole process stopped: a full garbage collection over a large heap, a blocked event loop);
- `probe`: one process that only sleeps 5 ms in a loop, beside the server: a window where it woke late by
  20 ms or more ("machine pause") had the whole machine (scheduler, hypervisor) stall, not only the server.
The traffic clients run at niceness +5 (`--client-nice`; 0: the same as the server): on a 2-core machine they
share the server's cores, which remote clients would not; the /livez poller keeps the soak's priority.
Per window (default 30 s): requests/s and p50/p99 per endpoint, the server's resident memory (its
process tree, from /proc), the longest /livez round trip, full (generation-2) garbage collections of
the server's workers and the bytes in its custom label-set cache (from /metrics:
`cltvit_gc_full_collections_total`, `cltvit_label_cache_bytes`: under label churn that bounded cache
fills towards --label-cache-mb, which shows as resident memory growth until it is full), how many of those
collections took 50 ms or more, how often a worker's event loop ran 100 ms or more late (`cltvit_event_loop_lag_seconds`;
the server runs with `--stall-report-ms 100`, so its log holds every thread's stack at each such stall), and, to tell
the machine's pauses from the server's, the CPU time the hypervisor stole and the kernel's memory-compaction stalls in
the window (/proc/stat, /proc/vmstat). At the end the verdict against the
targets of docs/serving.md ("Long runs"), measured on the first window after warm-up:
  p99 of every window <= 3x that window's p99 and <= 10x the window's own p50 (per endpoint);
  longest /livez round trip < 100 ms; resident memory over the last two thirds grows < 5 % and < 30 MB;
  0 failed valid requests, every bad request answered 4xx, the server alive at the end.
And, to say whose a slow /livez was: the server's event loop never 100 ms late, and every /livez round trip of
100 ms or more overlapped a machine pause (a probe sleep that woke 50 ms or more late; `slow_livez` in soak.json).

  python scripts/soak.py --bundle artifacts/reference/bundle [--minutes 30] [--window 30] [--workers 1]
Exit status 1 when a target is missed (--strict) or the server died.
"""
from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bundle.provenance import machine_info  # noqa: E402
from load.fmnist import fashion_mnist_pngs  # noqa: E402
from serving.cli import server_process  # noqa: E402

PROBE_SLEEP_S = 0.005  # the probe's sleep; its wake-up delay beyond this is the machine's, not the server's
MACHINE_PAUSE_S = 0.05  # a probe this late during a slow /livez round trip makes that round trip the machine's
LOOP_STALL_S = 0.1  # a worker's event loop this late counts as a stall (a bucket of cltvit_event_loop_lag_seconds);
# the server runs with --stall-report-ms at this bound, so its log holds every thread's stack of each stall
SLOW_GC_S = 0.05  # a full collection this long shows in the window's line (a bucket of cltvit_gc_full_pause_seconds)
# histograms whose observations over a bound each window counts (`above`): slow collections, loop stalls
COUNTED_OVER = {"cltvit_gc_full_pause_seconds": SLOW_GC_S, "cltvit_event_loop_lag_seconds": LOOP_STALL_S}
WARMUP_WINDOWS = 1  # the first window warms caches and allocators: the reference is the next one
P99_GROWTH, P99_OVER_P50, MAX_PAUSE_S = 3.0, 10.0, 0.100
RSS_GROWTH_FRACTION, RSS_GROWTH_MB = 0.05, 30.0
BAD_REQUESTS = ("image", "labels", "top_k", "field", "path")


def word_pool(n: int = 400, seed: int = 0) -> list[str]:
    """n distinct lowercase words: WordNet's nouns where Debian's wordnet-base is installed, else made up."""
    index = Path("/usr/share/wordnet/index.noun")
    rng = random.Random(seed)
    if index.exists():
        words = [line.split(" ", 1)[0] for line in index.read_text(errors="replace").splitlines() if line[:1].isalpha()]
        words = sorted({w.replace("_", " ") for w in words if len(w) <= 20})
        return rng.sample(words, n)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters) for _ in range(rng.randint(4, 9))))
    return sorted(out)


# ---------------------------------------------------------------------- clients (one process per group)
def _client(role: str, url: str, conns: int, start: Any, deadline: Any, queue: Any, seed: int, nice: int = 0) -> None:
    """Once loaded, put "ready" on `queue`, wait for `start` (an Event), then run `conns` threads of `role`
    until `deadline.value` (time.time()); put (role, t_end, seconds, ok) records on `queue` in chunks.
    ok: 2xx for valid requests, 4xx for bad ones. `nice`: added to the process's niceness first."""
    import threading

    if nice:
        os.nice(nice)

    rng = random.Random(seed)
    image = fashion_mnist_pngs(1)[0]
    pool = word_pool()
    buf: list[tuple[str, float, float, bool]] = []
    lock = threading.Lock()
    flushed = [time.time()]

    def record(name: str, t0: float, ok: bool) -> None:
        t1 = time.time()
        with lock:
            buf.append((name, t1, t1 - t0, ok))
            if len(buf) >= 200 or t1 - flushed[0] >= 1.0:  # at least once a second: the windows print on time
                queue.put(buf[:])
                buf.clear()
                flushed[0] = t1

    def explain(s: requests.Session) -> None:
        t0 = time.time()
        r = s.post(f"{url}/explain", files={"image": ("x.png", image, "image/png")}, timeout=60)
        record("explain", t0, r.status_code == 200)

    def classify(s: requests.Session) -> None:
        labels = rng.sample(pool, rng.randint(3, 8))
        t0 = time.time()
        r = s.post(f"{url}/classify", files={"image": ("x.png", image, "image/png")},
                   data={"labels": json.dumps(labels)}, timeout=60)
        record("classify", t0, r.status_code == 200)

    def bad(s: requests.Session) -> None:
        kind = rng.choice(BAD_REQUESTS)
        t0 = time.time()
        if kind == "path":
            r = s.get(f"{url}/no-such-{rng.getrandbits(48):012x}", timeout=60)
        elif kind == "image":
            r = s.post(f"{url}/classify", files={"image": ("x.png", b"not an image", "image/png")}, timeout=60)
        elif kind == "labels":
            r = s.post(f"{url}/classify", files={"image": ("x.png", image, "image/png")}, data={"labels": "[1, 2"}, timeout=60)
        elif kind == "top_k":
            r = s.post(f"{url}/explain", files={"image": ("x.png", image, "image/png")}, data={"top_k": "0"}, timeout=60)
        else:
            r = s.post(f"{url}/explain", json={"image": "", "unknown": 1}, timeout=60)
        record("bad", t0, 400 <= r.status_code < 500)
        time.sleep(max(0.0, 0.2 - (time.time() - t0)))

    def livez(s: requests.Session) -> None:
        t0 = time.time()
        r = s.get(f"{url}/livez", timeout=60)
        record("livez", t0, r.status_code == 200)
        time.sleep(0.01)

    def probe(s: requests.Session) -> None:  # no server involved: how late a 5 ms sleep wakes up on this machine
        t0 = time.time()
        time.sleep(PROBE_SLEEP_S)
        record("probe", t0, True)

    step = {"explain": explain, "classify": classify, "bad": bad, "livez": livez, "probe": probe}[role]
    queue.put("ready")
    start.wait()
    end = deadline.value

    def loop() -> None:
        s = requests.Session()
        while time.time() < end:
            try:
                step(s)
            except requests.RequestException:
                record(role, time.time(), False)
                time.sleep(0.1)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with lock:
        queue.put(buf[:])
    queue.put(None)


# ---------------------------------------------------------------------- the server
def cpu_steal_s() -> float | None:
    """CPU seconds the hypervisor took from this machine since boot (/proc/stat `steal`, all CPUs), or None where
    the kernel does not report it: a window whose steal rises had its pauses from outside the machine."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _delta(series: list[Any]) -> Any:
    """The last step of a cumulative series (this window's share), None before two readings or where one is missing."""
    return series[-1] - series[-2] if len(series) > 1 and series[-1] is not None and series[-2] is not None else None


def compaction_stalls() -> int | None:
    """Times since boot a process stopped in a page fault until the kernel compacted memory for a huge page
    (/proc/vmstat `compact_stall`, the whole machine), or None where not reported: a server pause in a window
    where this rises points at memory compaction, not at the server's own code."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "compact_stall":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def tree_rss_mb(root: int) -> float:
    """Resident memory (MiB) of process `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            total += int(open(f"/proc/{pid}/statm").read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def metrics_text(url: str) -> str | None:
    """The server's /metrics answer, None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
            return r.read().decode()
    except OSError:
        return None


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float | None]:
    """Each metric of `names` summed over its samples (workers), None where absent or unreachable."""
    text = metrics_text(url)
    if text is None:
        return dict.fromkeys(names)
    out: dict[str, float | None] = {}
    for name in names:
        metric, _, label = name.partition("{")  # 'metric{le="0.05"}': only the samples carrying that label
        labels = rf'\{{[^}}]*{re.escape(label[:-1])}[^}}]*\}}' if label else r'(?:\{[^}]*\})?'
        vals = re.findall(rf'^{metric}{labels} ([0-9.e+-]+)$', text, re.M)
        out[name] = sum(float(v) for v in vals) if vals else None
    return out


def above(m: dict[str, float | None], histogram: str, le: float) -> float | None:
    """Observations of `histogram` over its bucket bound `le` in a `scrape` answer (which asked for
    `{histogram}_count` and `{histogram}_bucket{le="..."}`), cumulative; None where either is missing."""
    total, under = m[f"{histogram}_count"], m[f'{histogram}_bucket{{le="{le}"}}']
    return None if total is None or under is None else total - under


def loop_lag_buckets(url: str) -> dict[str, float]:
    """The workers' `cltvit_event_loop_lag_seconds` histogram since start, summed over workers: {le: ticks <= le}
    (cumulative, as Prometheus writes it); {} when /metrics does not answer."""
    out: dict[str, float] = {}
    for le, v in re.findall(r'^cltvit_event_loop_lag_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+-]+)$', metrics_text(url) or "", re.M):
        out[le] = out.get(le, 0.0) + float(v)
    return out


def summarize_lag(buckets: dict[str, float]) -> str:
    """'N ticks; 99.9 % within X ms; the longest within Y ms' from `loop_lag_buckets`."""
    total = buckets.get("+Inf", 0.0)
    bounds = sorted((float(le), n) for le, n in buckets.items() if le != "+Inf")
    p999 = next((b for b, n in bounds if n >= 0.999 * total), float("inf"))
    longest = next((b for b, n in bounds if n >= total), float("inf"))
    return f"{total:.0f} ticks; 99.9 % within {p999 * 1e3:g} ms; the longest within {longest * 1e3:g} ms"


# ---------------------------------------------------------------------- figures
def window_row(records: list[tuple[str, float, float, bool]], w: int, window: float) -> dict[str, Any]:
    """Requests/s, failures and p50/p99/max latency per endpoint of window `w` from its (role, t_end,
    seconds, ok) records."""
    row: dict[str, Any] = {"window": w, "start_s": w * window}
    for name in ("explain", "classify", "bad", "livez", "probe"):
        lat = np.array([s for r, _, s, _ in records if r == name])
        fails = sum(1 for r, _, _, ok in records if r == name and not ok)
        row[name] = {"n": int(lat.size), "rps": lat.size / window, "failed": fails,
                     "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
                     "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else None,
                     "max_ms": float(lat.max() * 1e3) if lat.size else None}
    return row


def slow_livez(records: list[tuple[str, float, float, bool]], t0: float) -> list[dict[str, float]]:
    """Every /livez round trip of MAX_PAUSE_S or longer: when it ended (s from t0), how long it took and how late
    the probe's sleeps that overlapped it woke (ms, the latest of them; 0 when none overlapped)."""
    probes = sorted((t - s, t, s - PROBE_SLEEP_S) for role, t, s, _ in records if role == "probe")
    ends = [p[1] for p in probes]
    out = []
    for role, t, s, _ in records:
        if role != "livez" or s < MAX_PAUSE_S:
            continue
        i = bisect.bisect_left(ends, t - s)  # the first probe sleep that ended after this round trip began
        late = 0.0
        while i < len(probes) and probes[i][0] <= t:
            late = max(late, probes[i][2])
            i += 1
        out.append({"t_s": t - t0, "ms": s * 1e3, "probe_late_ms": late * 1e3})
    return sorted(out, key=lambda r: r["t_s"])


def verdict(rows: list[dict[str, Any]], rss: list[float], cache_mb: list[float | None], alive: bool,
            slow: list[dict[str, float]] | None = None) -> list[tuple[str, bool, str]]:
    """The checks against the targets. `slow`: `slow_livez` of the run, to tell the server's pauses from the machine's."""
    checks: list[tuple[str, bool, str]] = []
    ref = rows[WARMUP_WINDOWS] if len(rows) > WARMUP_WINDOWS else rows[0]
    for ep in ("explain", "classify"):
        base = ref[ep]["p99_ms"]
        worst_growth = max((r[ep]["p99_ms"] / base for r in rows[WARMUP_WINDOWS:] if r[ep]["p99_ms"] and base), default=0.0)
        worst_tail = max((r[ep]["p99_ms"] / r[ep]["p50_ms"] for r in rows[WARMUP_WINDOWS:] if r[ep]["p50_ms"]), default=0.0)
        checks.append((f"{ep} p99 / first window's p99 <= {P99_GROWTH:g}", worst_growth <= P99_GROWTH, f"worst {worst_growth:.2f}"))
        checks.append((f"{ep} p99 / p50 <= {P99_OVER_P50:g}", worst_tail <= P99_OVER_P50, f"worst {worst_tail:.2f}"))
    after = rows[WARMUP_WINDOWS:] if len(rows) > WARMUP_WINDOWS else []
    worst = max(after, key=lambda r: r["livez"]["max_ms"] or 0.0, default=None)
    pause = (worst["livez"]["max_ms"] or 0.0) if worst else float("nan")
    where = ""
    if worst and worst["probe"]["max_ms"] is not None:  # did the machine stall too, or only the server?
        where = (f" (window at {worst['start_s']:.0f} s; there the machine's probe woke "
                 f"{worst['probe']['max_ms'] - PROBE_SLEEP_S * 1e3:.0f} ms late"
                 + ("" if worst.get("loop_stalls") is None else
                    f", the server's event loop was {LOOP_STALL_S * 1e3:g} ms late {worst['loop_stalls']} time(s)") + ")")
    checks.append((f"longest /livez round trip < {MAX_PAUSE_S * 1e3:g} ms", pause < MAX_PAUSE_S * 1e3, f"{pause:.0f} ms{where}"))
    stalls = [r.get("loop_stalls") for r in rows]
    if any(v is not None for v in stalls):
        n = sum(v or 0 for v in stalls)
        checks.append((f"the server's event loop never {LOOP_STALL_S * 1e3:g} ms late (cltvit_event_loop_lag_seconds)", n == 0,
                       f"{n} time(s)" + (", in the windows at " + ", ".join(f"{r['start_s']:.0f}" for r in rows if r.get("loop_stalls")) + " s"
                                        if n else "")))
    if slow is not None:  # a round trip that a machine pause overlapped is the machine's, whatever the server did
        own = [r for r in slow if r["probe_late_ms"] < MACHINE_PAUSE_S * 1e3]
        checks.append((f"every /livez round trip >= {MAX_PAUSE_S * 1e3:g} ms overlapped a machine pause (probe >= "
                       f"{MACHINE_PAUSE_S * 1e3:g} ms late)", not own,
                       f"{len(slow) - len(own)} of {len(slow)} did" + "".join(
                           f"; {r['ms']:.0f} ms at {r['t_s']:.0f} s with the probe {r['probe_late_ms']:.0f} ms late" for r in slow[:5])))
    third = len(rss) // 3
    grow = rss[-1] - rss[third] if rss else float("nan")
    frac = grow / rss[third] if rss and rss[third] else float("nan")
    cache = f"; of it the label-set cache {cache_mb[-1] - cache_mb[third]:+.1f} MB" if cache_mb and None not in (
        cache_mb[-1], cache_mb[third]) else ""
    checks.append((f"RSS growth over the last two thirds < {RSS_GROWTH_FRACTION:.0%} and < {RSS_GROWTH_MB:g} MB",
                   grow < RSS_GROWTH_MB and frac < RSS_GROWTH_FRACTION, f"{grow:+.1f} MB ({frac:+.1%}){cache}"))
    if cache:  # the label-set cache fills towards its bound by design; what grows besides it is what leaks
        net = grow - (cache_mb[-1] - cache_mb[third])  # type: ignore[operator]
        checks.append(("the same less the label cache's growth (bounded by --label-cache-mb)",
                       net < RSS_GROWTH_MB and net / rss[third] < RSS_GROWTH_FRACTION, f"{net:+.1f} MB ({net / rss[third]:+.1%})"))
    failed = sum(r[ep]["failed"] for r in rows for ep in ("explain", "classify", "livez"))
    checks.append(("0 failed valid requests", failed == 0, str(failed)))
    bad_failed = sum(r["bad"]["failed"] for r in rows)
    checks.append(("every bad request 4xx", bad_failed == 0, f"{bad_failed} not 4xx of {sum(r['bad']['n'] for r in rows)}"))
    checks.append(("server alive at the end", alive, ""))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--serve-args", default="", help="more cltvit-serve arguments, e.g. '--label-cache-mb 16'")
    p.add_argument("--out", default="artifacts/soak", help="folder for the server log and soak.json")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--client-nice", type=int, default=5, help="niceness added to the traffic clients' processes (not the "
                   "/livez poller's): they share this machine's cores with the server, remote clients would not; 0: equal")
    args = p.parse_args(argv)
    if not (Path(args.bundle) / "bundle.json").exists():
        p.error(f"--bundle: no bundle.json in {args.bundle}")
    if args.minutes <= 0 or args.window <= 0:
        p.error("--minutes and --window must be > 0")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the server and the clients too (finally, daemons)
    serve_args = ["--workers", str(args.workers), "--stall-report-ms", f"{LOOP_STALL_S * 1e3:g}", *shlex.split(args.serve_args)]
    with server_process(args.bundle, port=args.port or None, extra_args=serve_args, log_path=out / "server.log",
                        ready_timeout=300) as (url, server):
        return soak(args, out, url, server)


def soak(args: argparse.Namespace, out: Path, url: str, server: subprocess.Popen) -> int:
    """Run the traffic of `args` against the server at `url` (process `server`), print and save the figures."""
    info = machine_info()
    print(f"soak: {args.minutes:g} min, {args.workers} worker(s), bundle {args.bundle}, {url}; "
          f"CPU {info['cpu']} ({', '.join(info['isa'])}; {info['cores']} logical CPUs)", flush=True)
    for _ in range(3):  # first answers load the label cache and ONNX Runtime's arenas
        requests.post(f"{url}/explain", files={"image": ("x.png", fashion_mnist_pngs(1)[0], "image/png")}, timeout=120)
    ctx = mp.get_context("spawn")
    queue, start, deadline = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    groups = [("explain", 4), ("classify", 2), ("bad", 1), ("livez", 1), ("probe", 1)]
    # the traffic clients run at --client-nice: on a small machine they share the server's cores, where
    # remote clients would not; the instruments (the /livez poller, the machine's wake-up probe) keep the soak's priority
    procs = [ctx.Process(target=_client, args=(role, url, n, start, deadline, queue, i, 0 if role in ("livez", "probe") else args.client_nice),
                         daemon=True) for i, (role, n) in enumerate(groups)]
    for pr in procs:
        pr.start()
    for _ in procs:  # client processes start slowly on a busy machine: the clock starts when all are loaded
        assert queue.get(timeout=300) == "ready"
    t0 = time.time()
    deadline.value = t0 + args.minutes * 60
    start.set()
    n_windows = int(args.minutes * 60 // args.window)
    by_window: list[list[tuple[str, float, float, bool]]] = [[] for _ in range(n_windows)]  # records by window
    rss: list[float] = []
    gcs: list[float | None] = []
    cache_mb: list[float | None] = []
    steal: list[float | None] = [cpu_steal_s()]
    stalls: list[int | None] = [compaction_stalls()]
    slow_gcs: list[float | None] = []  # full collections of SLOW_GC_S or longer, cumulative
    loop_stalls: list[float | None] = []  # the workers' event-loop ticks LOOP_STALL_S or later, cumulative
    rows_stalls: dict[int, int] = {}  # window -> its loop stalls
    done, w = 0, 0
    while done < len(procs):
        while w < n_windows and time.time() >= t0 + (w + 1) * args.window + 3.0:  # + the clients' last second
            rss.append(tree_rss_mb(server.pid))
            steal.append(cpu_steal_s())
            stolen = _delta(steal)
            stalls.append(compaction_stalls())
            compacted = _delta(stalls)
            m = scrape(url, ("cltvit_gc_full_collections_total", "cltvit_label_cache_bytes",
                             *(n for h, le in COUNTED_OVER.items() for n in (f"{h}_count", f'{h}_bucket{{le="{le}"}}'))))
            gcs.append(m["cltvit_gc_full_collections_total"])
            slow_gcs.append(above(m, "cltvit_gc_full_pause_seconds", SLOW_GC_S))
            slow = _delta(slow_gcs)
            loop_stalls.append(above(m, "cltvit_event_loop_lag_seconds", LOOP_STALL_S))
            stalled = _delta(loop_stalls)
            if stalled is not None:
                rows_stalls[w] = int(stalled)
            cache_mb.append(None if m["cltvit_label_cache_bytes"] is None else m["cltvit_label_cache_bytes"] / (1 << 20))
            row = window_row(by_window[w], w, args.window)
            g = _delta(gcs)
            print(f"[{row['start_s']:6.0f} s] " + "  ".join(
                f"{ep} {row[ep]['rps']:.0f}/s p50 {row[ep]['p50_ms'] or 0:.0f} p99 {row[ep]['p99_ms'] or 0:.0f} ms"
                for ep in ("explain", "classify")) + f"  livez max {row['livez']['max_ms'] or 0:.0f} ms"
                f"  RSS {rss[-1]:.0f} MB" + (f" (label cache {cache_mb[-1]:.1f})" if cache_mb[-1] is not None else "")
                + (f"  full GCs {g:.0f}" if g is not None else "")
                + (f" ({slow:.0f} >= {SLOW_GC_S * 1e3:g} ms)" if g is not None and slow else "")
                + (f"  loop stalls {stalled:.0f} (>= {LOOP_STALL_S * 1e3:g} ms)" if stalled else "")
                + (f"  CPU stolen {stolen:.2f} s" if stolen else "")
                + (f"  compaction stalls {compacted}" if compacted else "")
                + (f"  machine pause {late:.0f} ms" if (late := (row['probe']['max_ms'] or 0) - PROBE_SLEEP_S * 1e3) >= 20 else ""),
                flush=True)
            w += 1
        try:
            chunk = queue.get(timeout=1.0)
        except Exception:  # queue.Empty: nothing arrived this second
            continue
        if chunk is None:
            done += 1
        else:
            for rec in chunk:
                w_of = int((rec[1] - t0) // args.window)
                if 0 <= w_of < n_windows:
                    by_window[w_of].append(rec)
    for pr in procs:
        pr.join(timeout=30)
    alive = server.poll() is None
    if alive:
        alive = requests.get(f"{url}/livez", timeout=30).status_code == 200
    rows = [window_row(by_window[w], w, args.window) | {"loop_stalls": rows_stalls.get(w)} for w in range(n_windows)]
    slow_trips = slow_livez([rec for recs in by_window for rec in recs], t0)
    lag = loop_lag_buckets(url) if alive else {}
    if lag:
        print(f"event-loop lag over the run: {summarize_lag(lag)}")
    checks = verdict(rows, rss, cache_mb, alive, slow_trips)
    print("verdict:")
    for name, ok, detail in checks:
        print(f"  {'met ' if ok else 'MISS'} {name}: {detail}")
    (out / "soak.json").write_text(json.dumps({"args": vars(args), "machine": machine_info(), "windows": rows,
                                                "rss_mb": rss, "label_cache_mb": cache_mb, "full_gcs": gcs, "cpu_steal_s": steal,
                                                "compact_stall": stalls, "slow_full_gcs": slow_gcs, "loop_stalls": loop_stalls, "slow_livez": slow_trips,
                                                "loop_lag_buckets": lag,
                                                "checks": [{"name": n, "met": ok, "value": d} for n, ok, d in checks]},
                                               indent=1))
    return 1 if (not alive or (args.strict and not all(ok for _, ok, _ in checks))) else 0


if __name__ == "__main__":
    sys.exit(main())
