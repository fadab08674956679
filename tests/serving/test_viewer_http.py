"""The viewer's server side over real HTTP, without a browser (so it runs where Chromium is missing;
tests/serving/test_viewer.py drives the page itself): one `cltvit-serve` with a token on the tiny atlas
bundle. The page and its files are open, the atlas (which holds data) needs the token, and /explain's
top features carry the atlas's labels."""
from __future__ import annotations

import io

import pytest
import requests

from bundle import load_bundle
from serving.atlas import Atlas
from serving.cli import running_server
from training.data import FashionMNIST

TOKEN = "viewer-http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(atlas_bundle, tmp_path_factory):
    with running_server(atlas_bundle, env={"CLTVIT_API_TOKEN": TOKEN}, log_path=tmp_path_factory.mktemp("log") / "server.log") as url:
        yield url


def test_the_page_is_open_and_the_atlas_needs_the_token(server):
    for path in ("/ui/", "/ui/app.js"):  # the page itself holds no data
        r = requests.get(f"{server}{path}", timeout=30)
        assert r.status_code == 200 and r.content, path
    for path in ("/atlas", "/atlas/features/0/0"):
        r = requests.get(f"{server}{path}", timeout=30)
        assert r.status_code == 401 and "token" in r.json()["error"], path
        assert requests.get(f"{server}{path}", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        assert requests.get(f"{server}{path}", headers=AUTH, timeout=30).status_code == 200, path


def test_explain_over_http_carries_the_atlas_labels(server, atlas_bundle):
    atlas = Atlas(load_bundle(atlas_bundle)[1].atlas)
    buf = io.BytesIO()
    FashionMNIST("test", limit=2)[1][0].resize((56, 56)).save(buf, format="PNG")
    r = requests.post(f"{server}/explain", files={"image": ("t.png", buf.getvalue(), "image/png")}, data={"top_k": "5"},
                      headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    features = r.json()["top_features"]
    assert features
    for f in features:
        lab = atlas.label(f["layer"], f["index"])
        assert (f["label"], f["label_source"], f["low_confidence"]) == (lab.label, lab.source, lab.low_confidence)
    # the feature page over HTTP names the same label
    f = features[0]
    page = requests.get(f"{server}/atlas/features/{f['layer']}/{f['index']}", headers=AUTH, timeout=30).json()
    assert page["label"] == f["label"], page.keys()
