"""Bearer-token auth (CLTVIT_API_TOKEN) on a real server, and the startup checks of cltvit-serve.

The viewer's server side runs here too, without a browser (tests/serving/test_viewer.py drives the page
itself and is skipped where Chromium is missing): the page and its files are open, the atlas needs the
token, and /explain's top features carry the atlas's labels."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
import requests
from PIL import Image

from bundle import load_bundle
from serving.atlas import Atlas
from serving.cli import running_server
from serving.client import CltvitClient, ServiceError
from training.data import FashionMNIST

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(atlas_bundle):
    """The tiny bundle with an atlas (so the viewer's atlas routes are under auth too), token required."""
    with running_server(atlas_bundle, env={"CLTVIT_API_TOKEN": TOKEN}) as url:
        yield url


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}], ids=["missing", "wrong", "no-scheme", "basic"])
def test_requests_without_the_token_get_401(server, headers):
    for method, path in [("post", "/classify"), ("post", "/explain"), ("post", "/embed"), ("get", "/info"),
                         ("post", "/info"), ("get", "/metrics"), ("post", "/infer_batch"), ("get", "/docs.json")]:
        kw = {"files": {"image": ("a.png", _png(), "image/png")}} if path in ("/classify", "/explain", "/embed") else {}
        r = getattr(requests, method)(server + path, headers=headers, timeout=30, **kw)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert "token" in r.json()["error"] and r.headers["WWW-Authenticate"].startswith("Bearer")


def test_health_probes_are_open(server):
    for path in ("/livez", "/readyz", "/healthz"):  # the three docs/serving.md names as open under auth
        assert requests.get(server + path, timeout=30).status_code == 200, path


def test_the_viewer_page_is_open_and_the_atlas_needs_the_token(server):
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
    assert page["label"] == f["label"]


def test_right_token_is_served(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(server + "/explain", files={"image": ("a.png", _png(), "image/png")}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    assert requests.get(server + "/info", headers=auth, timeout=30).json()["auth"] is True
    assert "cltvit_requests_total" in requests.get(server + "/metrics", headers=auth, timeout=30).text


def test_client_helper_with_token(server):
    with CltvitClient(server, token=TOKEN) as client:
        assert client.info().auth is True
        res = client.classify(Image.new("RGB", (50, 50), (10, 200, 10)), labels=["green", "red", "blue"], top_k=2)
        assert len(res.top) == 2 and res.predicted in {"green", "red", "blue"}
        ex = client.explain(Image.new("RGB", (50, 50), (10, 200, 10)), top_k=2, heads=True)
        assert ex.spatial is not None and len(ex.spatial.classes[0].heads) == 4  # where in the image, per head (4 layers)
        assert client.explain(Image.new("RGB", (50, 50), (10, 200, 10)), spatial=False).spatial is None
        with pytest.raises(ServiceError) as err:
            client.classify(b"not an image")
        assert err.value.status == 400 and "not an image" in str(err.value)
    with pytest.raises(ServiceError) as err:
        CltvitClient(server, token="wrong")
    assert err.value.status == 401 and "token" in str(err.value)


# ---------------------------------------------------------------------- startup validation
def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_missing_bundle_stops_start(tmp_path):
    r = _serve("--bundle", str(tmp_path / "nope"), "--port", "1")
    assert r.returncode == 2
    assert "not a directory" in r.stderr and r.stderr.count("\n") <= 3


def test_corrupt_bundle_stops_start(bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "model.onnx").write_bytes(b"garbage")
    r = _serve("--bundle", str(bad))
    assert r.returncode == 2
    assert "model.onnx" in r.stderr and "sha256" in r.stderr


def test_mismatched_bundle_stops_start(bundle, tmp_path):
    bad = tmp_path / "mismatch"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "bundle.json").read_text())
    manifest["term_names"] = manifest["term_names"][:-1]
    (bad / "bundle.json").write_text(json.dumps(manifest))
    r = _serve("--bundle", str(bad))
    assert r.returncode == 2 and "term_names" in r.stderr


def test_bad_arguments(bundle, monkeypatch, capsys):
    """Each bad argument stops cltvit-serve with status 2 and a message naming it; in process (the parser and
    validation cltvit-serve runs before it starts BentoML; execve intercepted so nothing could start), and
    once as the real command."""
    from serving import cli

    monkeypatch.setattr(cli.os, "execve", lambda *a: pytest.fail(f"cltvit-serve started with bad arguments: {a[1]}"))
    for flag, value in [("--variant", "int4"), ("--max-batch-size", "0"), ("--workers", "0"), ("--max-queue", "0"),
                        ("--batch-wait-ms", "-1"), ("--label-cache-mb", "0"), ("--port", "70000")]:
        with pytest.raises(SystemExit) as exc:
            cli.main(["--bundle", str(bundle), flag, value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and flag in err and value in err, (flag, err)
    r = _serve()
    assert r.returncode == 2 and "--bundle" in r.stderr


def test_binds_loopback_by_default_and_warns_when_exposed_without_token():
    from serving.cli import build_parser, exposure_warning

    assert build_parser().parse_args(["--bundle", "b"]).host == "127.0.0.1"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, token_set=False) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        warning = exposure_warning(host, token_set=False)
        assert warning and host in warning and "CLTVIT_API_TOKEN" in warning, host
        assert exposure_warning(host, token_set=True) is None


def test_serve_prints_the_warning_before_starting(bundle, monkeypatch, capsys):
    """`cltvit-serve --host 0.0.0.0` without a token warns, then execs BentoML (intercepted here: nothing binds)."""
    from serving import cli

    started = []
    monkeypatch.delenv("CLTVIT_API_TOKEN", raising=False)
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: started.append((argv, env)))
    cli.main(["--bundle", str(bundle), "--host", "0.0.0.0", "--port", "3999"])
    err = capsys.readouterr().err
    assert "warning" in err and "0.0.0.0" in err and "CLTVIT_API_TOKEN" in err
    argv, env = started[0]
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and env["CLTVIT_BUNDLE"] == str(bundle.resolve())
    cli.main(["--bundle", str(bundle)])
    assert "warning" not in capsys.readouterr().err
    argv, _ = started[1]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
