"""The viewer (/ui) in a real browser: Debian's Chromium driven by Playwright, against a real server (cltvit-serve)
on the tiny atlas bundle. Every test fails if the page sends a request anywhere but that server (or data:/blob:
URLs of its own making) or logs a console error. The HTML report (`cltvit-explain --html`) is checked the same
way, opened from disk. The server-side checks that need no browser (the page open and the atlas guarded under
auth, atlas labels over HTTP) are in test_service_auth.py, which runs where Chromium is missing."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

# A real server and Chromium per module: end to end, in `make test-slow`.
pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install 'cltvit[dev]')")

from serving.cli import running_server  # noqa: E402
from training.data import FashionMNIST  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TOKEN = "viewer-test-token"
TIMEOUT_MS = 60_000

if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (make setup installs it when run as root)", allow_module_level=True)


@pytest.fixture(scope="module")
def spatial(atlas_bundle) -> None:
    """The heatmap tests need a bundle with spatial maps (issue 12: bundle format 2, `spatial` in bundle.json)."""
    if "spatial" not in json.loads((atlas_bundle / "bundle.json").read_text()):
        pytest.skip("this checkout exports bundles without spatial maps (issue 12 not merged): no heatmap to test")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(atlas_bundle, tmp_path_factory):
    with running_server(atlas_bundle, log_path=tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    ds = FashionMNIST("test", limit=4)
    out = {}
    for i in range(4):
        p = d / f"test{i}.png"
        ds[i][0].resize((56, 56)).save(p)  # not the model's size: the server resizes, the page crops the same way
        out[f"test{i}"] = p
    bad = d / "broken.png"
    bad.write_bytes(b"this is not an image at all")
    out["bad"] = bad
    return out


class Page:
    """A browser page that records console errors and any request leaving the allowed origins."""

    def __init__(self, browser, base: str | None) -> None:
        self.context = browser.new_context(viewport={"width": 1200, "height": 1500})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.outside: list[str] = []
        allowed = urlparse(base).netloc if base else None

        def route(r):
            u = urlparse(r.request.url)
            if u.scheme in ("data", "blob") or (u.scheme == "file" and allowed is None) or (allowed and u.netloc == allowed):
                r.continue_()
            else:
                self.outside.append(r.request.url)
                r.abort()

        self.context.route("**/*", route)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def check(self, expected_errors: int = 0) -> None:
        assert not self.outside, f"requests left the server: {self.outside}"
        assert len(self.errors) == expected_errors, self.errors

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def page(browser, server):
    p = Page(browser, server)
    yield p
    p.close()


def _upload(pg, path: Path) -> None:
    pg.set_input_files("#file", str(path))
    pg.wait_for_selector("#result:not([hidden])")
    pg.wait_for_function("document.querySelector('#status').textContent === ''")


def _canvas(pg) -> np.ndarray:
    data = pg.evaluate("""() => { const c = document.querySelector('#heatmap');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
    return np.array(data, dtype=np.uint8)


def _api_explain(server: str, path: Path, headers: dict | None = None) -> requests.Response:
    with open(path, "rb") as f:
        return requests.post(f"{server}/explain", files={"image": f}, data={"top_k": "5"}, headers=headers or {}, timeout=60)


def test_upload_explains_like_the_api(page, server, images):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test0"])
    api = _api_explain(server, images["test0"]).json()
    assert pg.get_attribute("#top", "data-predicted") == api["predicted"]
    shown = pg.eval_on_selector_all("#top li", "els => els.map(e => e.dataset.label)")
    assert shown == [t["label"] for t in api["top"]]
    # the waterfall: every term of the predicted logit, visibly summing to it
    terms = pg.eval_on_selector_all(".wf-term", "els => els.map(e => [e.dataset.term, parseFloat(e.dataset.value)])")
    total = float(pg.get_attribute(".wf-total", "data-value"))
    assert [t for t, _ in terms] == api["term_names"]
    assert total == pytest.approx(api["top"][0]["logit"], abs=1e-6)
    assert sum(v for _, v in terms) == pytest.approx(total, abs=1e-4)
    # the header says which graph variant serves and how it was chosen (this bundle has fp32 alone)
    assert pg.text_content("#variant") == "variant fp32 (auto, the bundle has no other variant)"
    page.check()


def test_heatmap_changes_with_the_layer_and_head(page, server, images, spatial):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test1"])
    summed = _canvas(pg)
    assert len(np.unique(summed.reshape(-1, 4), axis=0)) > 8  # an image with a map on it, not a flat colour
    layers = pg.eval_on_selector_all("#map-layer option", "els => els.map(e => e.value)")
    assert layers[0] == "sum" and len(layers) == 1 + 4
    seen = [summed]
    for value in ("0", "3"):
        pg.select_option("#map-layer", value)
        seen.append(_canvas(pg))
        assert not np.array_equal(seen[-1], seen[-2]), f"the map did not change for layer {value}"
    heads = pg.eval_on_selector_all("#map-head option", "els => els.map(e => e.value)")
    assert heads[0] == "all" and len(heads) > 2
    pg.select_option("#map-head", heads[1])
    assert not np.array_equal(_canvas(pg), seen[-1])
    assert "map=3" in pg.evaluate("location.hash") and f"head={heads[1]}" in pg.evaluate("location.hash")
    page.check()


def _canvas_digest(pg) -> int:
    """A hash of the heatmap canvas's pixels computed in the page (transferring them costs seconds)."""
    return pg.evaluate("""() => { const c = document.querySelector('#heatmap');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let h = 0;
        for (let i = 0; i < d.length; i++) h = (Math.imul(h, 31) + d[i]) | 0; return h; }""")


def _drawn(pg) -> tuple[str, list[float]]:
    """(map kind, the cells the heatmap canvas shows, row-major) as the page records them on the canvas."""
    kind, cells = pg.evaluate("() => { const c = document.querySelector('#heatmap'); return [c.dataset.kind, c.dataset.cells]; }")
    return kind, json.loads(cells) if cells else []


def test_map_toggle_shows_the_total_effect(page, server, images, spatial):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test1"])
    with open(images["test1"], "rb") as f:
        api = requests.post(f"{server}/explain", files={"image": f}, data={"top_k": "5", "total_effect": "true"}, timeout=60).json()
    kind, cells = _drawn(pg)
    assert kind == "direct" and cells == pytest.approx(api["spatial"]["classes"][0]["total"], rel=1e-6, abs=1e-9)
    direct = _canvas_digest(pg)
    pg.select_option("#map-kind", "total")  # asks the server again, with total_effect=true
    pg.wait_for_function("document.querySelector('#heatmap').dataset.kind === 'total'")
    kind, cells = _drawn(pg)
    assert cells == pytest.approx(api["total_effect"]["classes"][0]["total"], rel=1e-6, abs=1e-9)
    assert _canvas_digest(pg) != direct  # the pixels changed, not only the recorded cells
    assert pg.is_disabled("#map-layer") and pg.is_disabled("#map-head") and "kind=total" in pg.evaluate("location.hash")
    assert "total effect" in pg.inner_text("#map-note") and "17 edited copies" in pg.inner_text("#map-note")
    pg.select_option("#map-class", "1")
    assert _drawn(pg)[1] == pytest.approx(api["total_effect"]["classes"][1]["total"], rel=1e-6, abs=1e-9)
    pg.select_option("#map-kind", "direct")  # the answer already holds both maps
    pg.wait_for_function("document.querySelector('#heatmap').dataset.kind === 'direct'")
    assert _drawn(pg)[1] == pytest.approx(api["spatial"]["classes"][1]["total"], rel=1e-6, abs=1e-9)
    assert not pg.is_disabled("#map-layer")
    page.check()


def test_feature_cards_link_to_their_atlas_pages(page, server, images):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test2"])
    api = _api_explain(server, images["test2"]).json()
    labelled = [f for f in api["top_features"] if f["label"]]
    assert labelled, "no labelled feature among the top features"
    f = labelled[0]
    card = pg.locator(f".card[data-layer='{f['layer']}'][data-index='{f['index']}']")
    assert card.locator(".label").inner_text() == f["label"]
    card.locator(".thumbs img").first.wait_for()
    assert pg.evaluate("img => img.naturalWidth > 0 && img.complete", card.locator(".thumbs img").first.element_handle())
    card.locator("a.atlas-page").click()
    pg.wait_for_selector("#feature-title")
    assert pg.inner_text("#feature-label") == f["label"]
    assert f"Layer {f['layer']} · feature {f['index']}" in pg.inner_text("#feature-title")
    atlas = requests.get(f"{server}/atlas/features/{f['layer']}/{f['index']}", timeout=30).json()
    assert pg.locator(".top-images img").count() == len(atlas["top_images"]) > 0
    assert pg.locator(".effect-row").count() == len(atlas["direct_effect"]["classes"])
    page.check()


def test_reload_restores_the_state(page, server, images, spatial):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test3"])
    pg.select_option("#map-class", "1")
    pg.select_option("#map-layer", "2")
    before = (pg.evaluate("location.hash"), pg.get_attribute("#top", "data-predicted"), _canvas(pg))
    assert re.search(r"img=[0-9a-f]{32}", before[0]) and "cls=1" in before[0] and "map=2" in before[0]
    pg.reload()
    pg.wait_for_selector("#result:not([hidden])")
    pg.wait_for_function("document.querySelector('#status').textContent === ''")
    assert pg.evaluate("location.hash") == before[0]
    assert pg.get_attribute("#top", "data-predicted") == before[1]
    assert pg.input_value("#map-class") == "1" and pg.input_value("#map-layer") == "2"
    assert np.array_equal(_canvas(pg), before[2])
    page.check()


def test_examples_and_custom_labels(page, server):
    pg = page.page
    pg.goto(f"{server}/ui/")
    pg.click("#examples button[data-example='4']")
    pg.wait_for_selector("#result:not([hidden])")
    example = requests.get(f"{server}/atlas/examples/4.png", timeout=30).content
    api = requests.post(f"{server}/explain", files={"image": ("e.png", example)}, timeout=60).json()
    assert pg.get_attribute("#top", "data-predicted") == api["predicted"]
    pg.fill("#labels", "sneaker, sandal, bag")
    pg.dispatch_event("#labels", "change")
    pg.wait_for_function("document.querySelectorAll('#top li').length === 3")
    assert sorted(pg.eval_on_selector_all("#top li", "els => els.map(e => e.dataset.label)")) == ["bag", "sandal", "sneaker"]
    assert "labels=sneaker%2Csandal%2Cbag" in pg.evaluate("location.hash")
    page.check()


def test_a_bad_upload_shows_the_servers_message(page, server, images):
    pg = page.page
    pg.goto(f"{server}/ui/")
    pg.set_input_files("#file", str(images["bad"]))
    pg.wait_for_selector("#error:not([hidden])")
    message = _api_explain(server, images["bad"]).json()["error"]
    assert pg.inner_text("#error") == message
    assert pg.locator("#result").is_hidden()
    page.check(expected_errors=1)  # the browser logs the 400 response itself


def test_with_a_token_the_page_asks_for_it(browser, atlas_bundle, images, tmp_path):
    with running_server(atlas_bundle, env={"CLTVIT_API_TOKEN": TOKEN}, log_path=tmp_path / "server.log") as url:
        # (the open page and the token-guarded atlas over plain HTTP: test_service_auth.py, which needs no browser)
        p = Page(browser, url)
        try:
            pg = p.page
            pg.goto(f"{url}/ui/")
            pg.wait_for_selector("#auth:not([hidden])")
            pg.fill("#token", TOKEN)
            pg.click("#auth button[type=submit]")
            pg.wait_for_selector("#auth", state="hidden")
            _upload(pg, images["test0"])
            api = _api_explain(url, images["test0"], {"Authorization": f"Bearer {TOKEN}"}).json()
            assert pg.get_attribute("#top", "data-predicted") == api["predicted"]
            p.check(expected_errors=1)  # the first, unauthenticated /info answered 401
        finally:
            p.close()


def test_html_report_is_self_contained(browser, atlas_bundle, images, tmp_path, spatial):
    from serving.cli import explain_main  # cltvit-explain comes with the spatial maps (issue 12)

    out = tmp_path / "report.html"
    assert explain_main([str(images["test0"]), "--bundle", str(atlas_bundle), "--html", str(out), "--total-effect"]) in (0, None)
    html = out.read_text()
    assert "http://" not in html and "https://" not in html and "<script src" not in html and 'rel="stylesheet"' not in html
    data = json.loads(re.search(r"window\.CLTVIT_REPORT = (\{.*?\});</script>", html, re.S).group(1))
    p = Page(browser, None)
    try:
        pg = p.page
        pg.goto(out.as_uri())
        pg.wait_for_selector("#result:not([hidden])")
        assert pg.get_attribute("#top", "data-predicted") == data["result"]["predicted"]
        terms = pg.eval_on_selector_all(".wf-term", "els => els.map(e => parseFloat(e.dataset.value))")
        assert sum(terms) == pytest.approx(float(pg.get_attribute(".wf-total", "data-value")), abs=1e-4)
        pg.select_option("#map-kind", "total")  # the report carries the total-effect map: no server to ask
        pg.wait_for_function("document.querySelector('#heatmap').dataset.kind === 'total'")
        assert _drawn(pg)[1] == pytest.approx(data["result"]["total_effect"]["classes"][0]["total"], rel=1e-6, abs=1e-9)
        pg.locator(".card .thumbs img").first.wait_for()
        assert pg.locator("#source").is_hidden()
        pg.locator(".card a.atlas-page").first.click()
        pg.wait_for_selector("#feature-title")
        assert pg.locator(".top-images img").count() > 0
        p.check()  # nothing but the file itself and its own data:/blob: URLs was requested
    finally:
        p.close()
    img = Image.open(io.BytesIO(base64.b64decode(data["image"].split(",", 1)[1])))
    assert img.size == (56, 56)


# ------------------------------------------------------------------ what if: edits rerun through POST /intervene
def _intervene(server: str, path: Path, edits: dict, top_k: int) -> dict:
    """The reference: the same edit set sent to the same server over HTTP, written by hand here (patches as
    [row, column] pairs where the page sends row-major indices)."""
    with open(path, "rb") as f:
        r = requests.post(f"{server}/intervene", files={"image": f}, data={"edits": json.dumps([edits]), "top_k": str(top_k)}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_edit(pg, check: str) -> dict:
    """Wait until the page shows an /intervene answer whose edit set satisfies the JS expression `check` (on `e`)."""
    pg.wait_for_function(f"(() => {{ const d = document.querySelector('#whatif').dataset.edit; if (!d) return false; const e = JSON.parse(d); return {check}; }})()")
    return json.loads(pg.get_attribute("#whatif", "data-edit"))


def _shown_after(pg) -> tuple[list[str], list[float]]:
    labels = pg.eval_on_selector_all("#top-edited li", "els => els.map(e => e.dataset.label)")
    logits = pg.eval_on_selector_all("#top-edited li", "els => els.map(e => parseFloat(e.dataset.logit))")
    return labels, logits


def _check_waterfall(pg, api_explain: dict, answer: dict) -> None:
    """Every waterfall bar's value after the edits and its change equal the HTTP answer's for the shown label."""
    label = api_explain["explanations"][0]["label"]
    after = next(e for e in answer["edited"][0]["result"]["explanations"] if e["label"] == label)
    rows = pg.eval_on_selector_all(".wf-row", "els => els.map(e => [e.dataset.term, parseFloat(e.dataset.value), parseFloat(e.dataset.edited), parseFloat(e.dataset.delta)])")
    before = {t["term"]: t["value"] for t in api_explain["explanations"][0]["terms"]} | {"logit": api_explain["explanations"][0]["logit"]}
    edited = {t["term"]: t["value"] for t in after["terms"]} | {"logit": after["logit"]}
    assert [r[0] for r in rows] == [*answer["term_names"], "logit"]
    for term, value, shown, delta in rows:
        assert value == pytest.approx(before[term], abs=1e-6)
        assert shown == pytest.approx(edited[term], rel=1e-6, abs=1e-7), term
        assert delta == pytest.approx(edited[term] - before[term], abs=1e-5), term
    assert any(abs(r[3]) > 1e-4 for r in rows), "the edits moved no bar of the waterfall"


@pytest.mark.slow
def test_ablate_a_feature_and_a_term_shows_what_intervene_returns(page, server, images):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test0"])
    n_labels = len(requests.get(f"{server}/info", timeout=30).json()["labels"])
    api = _api_explain(server, images["test0"]).json()
    f = api["top_features"][0]
    pg.locator(f".card[data-layer='{f['layer']}'][data-index='{f['index']}'] button.ablate").click()
    _wait_edit(pg, "e.features.length === 1 && e.terms.length === 0")
    ref = _intervene(server, images["test0"], {"features": [{"layer": f["layer"], "index": f["index"]}]}, n_labels)
    labels, logits = _shown_after(pg)
    top = ref["edited"][0]["result"]["top"][:len(api["top"])]
    assert labels == [t["label"] for t in top]
    assert logits == pytest.approx([t["logit"] for t in top], rel=1e-6, abs=1e-7)
    assert pg.locator(f".card[data-layer='{f['layer']}'][data-index='{f['index']}'] button.ablate").inner_text() == "restore"
    _check_waterfall(pg, api, ref)

    # a term as well: the two edits run as one edit set
    term = "attn.1"
    pg.locator(f".wf-row[data-term='{term}'] button.ablate").click()
    shown = _wait_edit(pg, "e.features.length === 1 && e.terms.length === 1")
    assert shown["terms"] == [{"term": term, "scale": 0.0}] and shown["features"][0]["layer"] == f["layer"]
    ref = _intervene(server, images["test0"], {"features": [{"layer": f["layer"], "index": f["index"], "scale": 0}],
                                               "terms": [{"term": term, "scale": 0}]}, n_labels)
    labels, logits = _shown_after(pg)
    top = ref["edited"][0]["result"]["top"][:len(api["top"])]
    assert labels == [t["label"] for t in top]
    assert logits == pytest.approx([t["logit"] for t in top], rel=1e-6, abs=1e-7)
    _check_waterfall(pg, api, ref)
    assert pg.get_attribute(f".wf-row[data-term='{term}']", "class").split().count("ablated") == 1
    assert "error" not in pg.eval_on_selector_all(".wf-row:has(button.ablate)", "els => els.map(e => e.dataset.term)")

    # restore the feature, then reset: the page is back to the plain explanation
    pg.locator(f".card[data-layer='{f['layer']}'][data-index='{f['index']}'] button.ablate").click()
    _wait_edit(pg, "!e.features.length && e.terms.length === 1")
    pg.click("#reset-edits")
    pg.wait_for_function("document.querySelector('#whatif').dataset.edit === '' && !document.querySelector('.wf-row[data-edited]')")
    assert pg.locator("#top-edited li").count() == 0 and "ablate=" not in pg.evaluate("location.hash")
    page.check()


@pytest.mark.slow
def test_click_patches_to_delete_them(page, server, images):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test1"])
    info = requests.get(f"{server}/info", timeout=30).json()
    rows, cols = info["patches"]["grid"]
    api = _api_explain(server, images["test1"]).json()
    size = pg.evaluate("() => { const c = document.querySelector('#heatmap'); return [c.clientWidth, c.clientHeight]; }")

    def click(r: int, c: int) -> None:
        pg.click("#heatmap", position={"x": (c + 0.5) * size[0] / cols, "y": (r + 0.5) * size[1] / rows})

    before = _canvas_digest(pg)
    click(1, 2)
    _wait_edit(pg, "e.delete_patches.length === 1")
    click(rows - 1, 0)
    shown = _wait_edit(pg, "e.delete_patches.length === 2")
    assert sorted(shown["delete_patches"]) == sorted([1 * cols + 2, (rows - 1) * cols])
    assert json.loads(pg.get_attribute("#heatmap", "data-deleted")) == [1 * cols + 2, (rows - 1) * cols]
    assert _canvas_digest(pg) != before  # the deleted patches are drawn
    ref = _intervene(server, images["test1"], {"delete_patches": [[1, 2], [rows - 1, 0]]}, len(info["labels"]))
    labels, logits = _shown_after(pg)
    top = ref["edited"][0]["result"]["top"][:len(api["top"])]
    assert labels == [t["label"] for t in top]
    assert logits == pytest.approx([t["logit"] for t in top], rel=1e-6, abs=1e-7)
    _check_waterfall(pg, api, ref)

    # the map toggle keeps the edits: the total-effect map of the unedited image, the deleted patches over it
    with open(images["test1"], "rb") as f:
        te = requests.post(f"{server}/explain", files={"image": f}, data={"top_k": "5", "total_effect": "true"}, timeout=60).json()
    pg.select_option("#map-kind", "total")
    pg.wait_for_function("document.querySelector('#heatmap').dataset.kind === 'total'")
    assert _drawn(pg)[1] == pytest.approx(te["total_effect"]["classes"][0]["total"], rel=1e-6, abs=1e-9)
    assert json.loads(pg.get_attribute("#heatmap", "data-deleted")) == [1 * cols + 2, (rows - 1) * cols]
    assert _shown_after(pg)[1] == pytest.approx(logits, rel=1e-6, abs=1e-7)
    pg.select_option("#map-kind", "direct")
    pg.wait_for_function("document.querySelector('#heatmap').dataset.kind === 'direct'")

    # the edits are in the URL: a reload reruns them; clicking a deleted patch brings it back
    pg.reload()
    _wait_edit(pg, "e.delete_patches.length === 2")
    assert _shown_after(pg)[1] == pytest.approx(logits, rel=1e-6, abs=1e-7)
    click(1, 2)
    shown = _wait_edit(pg, "e.delete_patches.length === 1")
    assert shown["delete_patches"] == [(rows - 1) * cols]
    ref = _intervene(server, images["test1"], {"delete_patches": [[rows - 1, 0]]}, len(info["labels"]))
    assert _shown_after(pg)[1] == pytest.approx([t["logit"] for t in ref["edited"][0]["result"]["top"][:len(api["top"])]], rel=1e-6, abs=1e-7)
    page.check()


@pytest.mark.slow
def test_each_feature_ablated_alone_shows_the_linearity_check(page, server, images):
    pg = page.page
    pg.goto(f"{server}/ui/")
    _upload(pg, images["test2"])
    assert pg.locator(".card .linearity").count() == 0
    pg.click("#check-linearity")
    pg.wait_for_selector(".card .linearity")
    shown = pg.eval_on_selector_all(".card:has(.linearity)", "els => els.map(e => [+e.dataset.layer, +e.dataset.index, parseFloat(e.querySelector('.linearity').dataset.change)])")
    with open(images["test2"], "rb") as f:
        ref = requests.post(f"{server}/intervene", files={"image": f}, data={"edits": "[{}]", "check_linearity": "true"}, timeout=60).json()
    want = {(a["layer"], a["index"]): a["ablated_change"] for a in ref["feature_ablations"]}
    assert len(shown) == len(want) > 0
    for layer, index, change in shown:
        assert change == pytest.approx(want[layer, index], rel=1e-6, abs=1e-7)
    page.check()
