"""One explanation as one self-contained HTML file (`cltvit-explain IMAGE --bundle B --html report.html`).

The file is the viewer of `/ui` (serving/ui/: its HTML, with the CSS and JS inlined) plus the data it
would have asked the server for, as JSON in `window.CLTVIT_REPORT`: what the bundle is, the result,
the image, and the atlas pages of the top features (thumbnails included); the total-effect map when the
result has one (`cltvit-explain --total-effect --html`), shown by the viewer's map toggle. It opens from disk in a
browser with no server and fetches nothing; share it, archive it for an audit.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from .runtime import BundleRuntime
from .schemas import ImageResult
from .web import UI_DIR

MAX_IMAGE_SIDE = 1024  # the embedded picture is downscaled to this (the model sees far less)


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</' (would end the element), no U+2028/2029."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def image_data_url(image: Image.Image, max_side: int = MAX_IMAGE_SIDE) -> str:
    """The image as a PNG data URL, downscaled (aspect kept) so its longer side is at most `max_side`."""
    im = image.convert("RGB")
    if max(im.size) > max_side:
        r = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def report_data(runtime: BundleRuntime, image: Image.Image, result: ImageResult, labels: list[str] | None = None) -> dict[str, Any]:
    """What the viewer reads from `window.CLTVIT_REPORT`: info (as GET /info), atlas summary, result, image, feature pages."""
    m = runtime.manifest
    names = list(labels) if labels is not None else runtime.label_names
    info = {"backbone": m.backbone.model_dump(), "clt": m.clt.model_dump(), "mode": m.mode, "labels": names,
            "term_names": runtime.term_names, "image_size": list(runtime.image_size), "variant": runtime.variant,
            "variant_choice": runtime.variant_choice.model_dump(mode="json"),
            "patches": None if runtime.patches is None else runtime.patches.model_dump(mode="json")}
    features: dict[str, Any] = {}
    atlas = None
    if runtime.atlas is not None:
        atlas = {**runtime.atlas.summary(), "example_list": []}
        text = runtime.embed_labels(labels) if labels is not None else runtime.default_text
        for f in result.top_features or []:
            features[f"{f.layer}:{f.index}"] = runtime.atlas.feature(f.layer, f.index, text, names)
    return {"info": info, "atlas": atlas, "result": {**result.model_dump(mode="json"), "term_names": runtime.term_names},
            "image": image_data_url(image), "features": features}


def render_report(data: dict[str, Any], ui_dir: Path = UI_DIR) -> str:
    """The viewer's index.html with style.css and app.js inlined and `data` embedded before the script."""
    html = (ui_dir / "index.html").read_text(encoding="utf-8")
    css = (ui_dir / "style.css").read_text(encoding="utf-8")
    js = (ui_dir / "app.js").read_text(encoding="utf-8")
    link, script = '<link rel="stylesheet" href="style.css">', '<script src="app.js"></script>'
    if link not in html or script not in html:
        raise RuntimeError(f"{ui_dir / 'index.html'} no longer links style.css / app.js as the report expects")
    js = js.replace("</script", "<\\/script")  # cannot end the inline element early
    html = html.replace(link, f"<style>\n{css}</style>")
    return html.replace(script, f"<script>window.CLTVIT_REPORT = {_script_json(data)};</script>\n<script>\n{js}</script>")


def write_report(path: str | Path, runtime: BundleRuntime, image: Image.Image, result: ImageResult, labels: list[str] | None = None) -> Path:
    """Write the self-contained report of one explanation to `path`; returns it."""
    p = Path(path)
    p.write_text(render_report(report_data(runtime, image, result, labels)), encoding="utf-8")
    return p
