"""`serving.Explainer` (the plain Python API) gives the HTTP service's results for the same image:
a real `cltvit-serve` process on loopback vs the in-process API, default and custom labels; every
input kind (path, bytes, PIL, array) gives the same answer; unreadable input is an error record."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
from _scoring import fashion_images

import serving
from serving.cli import running_server
from serving.runtime import LabelError

TIMEOUT = 60


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    out = []
    for img, _ in fashion_images(4, offset=10):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_server(bundle, log_path=log, extra_args=["--threads", "1"]) as url:
        yield url


def _post(url: str, endpoint: str, image: bytes, **fields) -> dict:
    data = {k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in fields.items()}
    r = requests.post(f"{url}/{endpoint}", files={"image": ("i.png", image, "image/png")}, data=data, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def test_python_api_equals_the_service(server, bundle, pngs):
    ex = serving.Explainer(bundle, top_k=3)
    results = ex.explain(pngs)
    records = ex.score(pngs)
    for data, res, rec in zip(pngs, results, records):
        http = _post(server, "explain", data, top_k=3)
        assert http["predicted"] == res.predicted == rec["label"]
        assert [t["label"] for t in http["top"]] == [t.label for t in res.top] == [t["label"] for t in rec["top"]]
        np.testing.assert_allclose([t["probability"] for t in http["top"]], [t.probability for t in res.top], rtol=1e-5)
        np.testing.assert_allclose([t["probability"] for t in http["top"]], [t["probability"] for t in rec["top"]], rtol=1e-5)
        np.testing.assert_allclose(http["term_shares"], res.term_shares, atol=1e-6)
        np.testing.assert_allclose(http["term_shares"], list(rec["shares"].values()), atol=1e-6)
        assert list(rec["shares"]) == http["term_names"]
        for h, l in zip(http["explanations"], res.explanations):
            np.testing.assert_allclose([t["value"] for t in h["terms"]], [t.value for t in l.terms], rtol=1e-4, atol=1e-6)
        assert [(f["layer"], f["index"]) for f in http["top_features"]] == [(f.layer, f.index) for f in res.top_features]


def test_a_record_is_the_image_result_flattened(bundle, pngs):
    """One answer, two shapes: a scoring record (serving.results.score_record) carries exactly the
    ImageResult's numbers for the same image: predicted label, top labels with probability and logit, term
    shares keyed by term, and the predicted label's maps without per-head grids."""
    ex = serving.Explainer(bundle, top_k=3, spatial=True)
    for res, rec in zip(ex.explain(pngs, detail=False), ex.score(pngs, paths=["p"] * len(pngs))):
        assert rec["label"] == res.predicted and rec["path"] == "p" and rec["error"] is None
        assert rec["top"] == [t.model_dump() for t in res.top]
        assert rec["shares"] == dict(zip(ex.term_names, res.term_shares))
        first = res.spatial.classes[0]
        if first.label == res.predicted:
            assert rec["spatial"] == {"grid": list(res.spatial.grid), "residual": res.spatial.residual,
                                      **first.model_dump(exclude={"heads", "heads_cls_cell"})}
        else:
            assert rec["spatial"] is None


def test_custom_labels_equal_the_service(server, bundle, pngs):
    labels = ["a sneaker", "a handbag", "a pair of trousers", "a shirt"]
    ex = serving.Explainer(bundle, labels=labels, top_k=4)
    for data, rec in zip(pngs, ex.score(pngs)):
        http = _post(server, "classify", data, labels=labels, top_k=4)
        assert [t["label"] for t in http["top"]] == [t["label"] for t in rec["top"]]
        np.testing.assert_allclose([t["probability"] for t in http["top"]], [t["probability"] for t in rec["top"]], rtol=1e-5)


def test_input_kinds_agree_and_errors_are_records(bundle, pngs, tmp_path):
    from PIL import Image

    ex = serving.Explainer(bundle)
    path = tmp_path / "a.png"
    path.write_bytes(pngs[0])
    pil = Image.open(io.BytesIO(pngs[0])).convert("RGB")
    recs = ex.score([path, str(path), pngs[0], pil, np.asarray(pil)], paths=["x"] * 5)
    for r in recs[1:]:
        assert r["label"] == recs[0]["label"] and r["shares"] == pytest.approx(recs[0]["shares"], abs=1e-7)
    bad = ex.score([b"not an image", tmp_path / "missing.png"])
    assert "not an image" in bad[0]["error"] and "missing.png" in bad[1]["error"]
    assert bad[1]["path"] == str(tmp_path / "missing.png")
    with pytest.raises(LabelError, match=r"duplicate label 'a' \(labels\[0\] and labels\[1\]\)"):
        serving.Explainer(bundle, labels=["a", "a"])
