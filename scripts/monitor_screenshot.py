"""Picture of the monitoring dashboard's queries for docs/monitoring.md (docs/monitoring.png).

Grafana is not installable on this project's machines (not in Debian bookworm, no server on PyPI or
npm), so the picture is Prometheus's own graph UI (/graph) showing the dashboard's main PromQL
expressions, taken in Debian's Chromium through Playwright from a running `make monitor` (or
`scripts/monitor.py run`) that has seen traffic:

    python scripts/monitor_screenshot.py --prometheus http://127.0.0.1:9090 --out docs/monitoring.png [--range 15m]
"""
from __future__ import annotations

import argparse
import json
import urllib.parse
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
# dashboard panel titles whose first query is shown, and whether its graph is stacked
PANELS = [
    ("Throughput (answers/s)", False),
    ("Latency p50 / p95 (target 1 s)", False),
    ("Term shares over time (mean share of the predicted logit)", True),
    ("Drift score (max over terms and classes, 15m window)", False),
    ("Drift per term (reference std)", False),
    ("Class mix: served (15m) vs reference", False),
]


def graph_url(prometheus: str, job: str, range_: str) -> str:
    dash = json.loads((ROOT / "monitoring" / "grafana" / "cltvit-dashboard.json").read_text())
    panels = {p["title"]: p for p in dash["panels"] if p["type"] != "row"}
    params = {}
    for i, (title, stacked) in enumerate(PANELS):
        params.update({f"g{i}.expr": panels[title]["targets"][0]["expr"].replace("$job", job), f"g{i}.tab": "0",
                       f"g{i}.stacked": "1" if stacked else "0", f"g{i}.range_input": range_, f"g{i}.show_exemplars": "0"})
    return f"{prometheus}/graph?{urllib.parse.urlencode(params)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--job", default="cltvit")
    ap.add_argument("--range", default="15m")
    ap.add_argument("--out", default=str(ROOT / "docs" / "monitoring.png"))
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 1000}, device_scale_factor=1)
        page.goto(graph_url(args.prometheus, args.job, args.range))
        page.wait_for_load_state("networkidle", timeout=60_000)
        # the navigation bar is fixed to the viewport: in a full-page picture it would cover a graph
        page.add_style_tag(content=".navbar.fixed-top { position: static !important; } body { padding-top: 0 !important; }")
        page.wait_for_timeout(2000)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
