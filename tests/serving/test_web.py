"""The atlas and viewer routes (serving/web.py) on their own (Starlette's test client); the service mounts the
same routes (tests/serving/test_viewer.py drives them through a real server and a real browser)."""
from __future__ import annotations

import io

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.testclient import TestClient

from serving.runtime import BundleRuntime
from serving.web import UI_ASSETS, is_ui_path, web_routes


@pytest.fixture(scope="module")
def client(atlas_bundle):
    rt = BundleRuntime(atlas_bundle, device="cpu", threads=1)
    with TestClient(Starlette(routes=web_routes(lambda: rt))) as c:
        yield c


@pytest.fixture(scope="module")
def plain_client(bundle):
    rt = BundleRuntime(bundle, device="cpu", threads=1)
    with TestClient(Starlette(routes=web_routes(lambda: rt))) as c:
        yield c


def test_atlas_index_lists_and_filters(client):
    r = client.get("/atlas", params={"layer": 1, "limit": 3, "sort": "strength"})
    assert r.status_code == 200
    body = r.json()
    assert body["n_layers"] == 4 and body["images"] == 256 and len(body["example_list"]) == 20
    assert len(body["features"]) == 3 and {f["layer"] for f in body["features"]} == {1}
    strengths = [f["strength"] for f in body["features"]]
    assert strengths == sorted(strengths, reverse=True)
    for params, word in (({"layer": 9}, "layer 9 is out of range"), ({"limit": 0}, "limit must be in 1..5000"),
                         ({"sort": "x"}, "sort must be"), ({"offset": "a"}, "offset must be an integer")):
        r = client.get("/atlas", params=params)
        assert r.status_code == 400 and word in r.json()["error"], r.json()


def test_feature_page_and_errors(client):
    listing = client.get("/atlas", params={"limit": 1}).json()["features"][0]
    r = client.get(f"/atlas/features/{listing['layer']}/{listing['index']}")
    assert r.status_code == 200
    page = r.json()
    assert page["label"] == listing["label"] and page["top_images"][0]["thumbnail"].startswith("data:image/png;base64,")
    assert len(page["direct_effect"]["classes"]) == 10
    r = client.get("/atlas/features/0/128")
    assert r.status_code == 404 and "features 0..127" in r.json()["error"]
    assert client.get("/atlas/features/x/1").status_code in (400, 404)


def test_examples_are_pngs(client):
    r = client.get("/atlas/examples/3.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    assert client.get("/atlas/examples/99.png").status_code == 404


def test_a_bundle_without_an_atlas_says_so(plain_client):
    for path in ("/atlas", "/atlas/features/0/0", "/atlas/examples/0.png"):
        r = plain_client.get(path)
        assert r.status_code == 404 and "no feature atlas" in r.json()["error"], path


def test_viewer_files(client):
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/ui/")
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, ctype in UI_ASSETS.items():
        r = client.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == ctype and r.content
    assert client.get("/ui/../bundle.json").status_code == 404
    assert client.get("/ui/secret.txt").status_code == 404
    # nothing in the viewer points outside the server it comes from
    for name in UI_ASSETS:
        text = client.get(f"/ui/{name}").text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    assert is_ui_path("/ui/") and is_ui_path("/ui/app.js") and not is_ui_path("/ui/x.js") and not is_ui_path("/atlas")
