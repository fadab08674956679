"""Screenshot of the viewer for the README (docs/viewer.png): serve a bundle, open /ui in Debian's Chromium
(Playwright), explain one of the atlas's example images, pick an attention layer, save the page.

    python scripts/viewer_screenshot.py --bundle artifacts/reference/bundle --out docs/viewer.png [--example 7] [--layer 6]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlparse

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.cli import running_server  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", default=str(ROOT / "docs" / "viewer.png"))
    ap.add_argument("--example", type=int, default=7, help="atlas example image to explain")
    ap.add_argument("--layer", default="sum", help="heatmap layer to show (sum or a number)")
    ap.add_argument("--width", type=int, default=1200)
    args = ap.parse_args()
    with running_server(args.bundle) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 1000}, device_scale_factor=1)
        host = urlparse(url).netloc
        page.route("**/*", lambda r: r.continue_() if urlparse(r.request.url).scheme in ("data", "blob")
                   or urlparse(r.request.url).netloc == host else r.abort())
        page.goto(f"{url}/ui/#view=explain&example={args.example}&map={args.layer}")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('.card .thumbs img').length > 0", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
