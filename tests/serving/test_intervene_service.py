"""POST /intervene end to end on a real `cltvit-serve` (tiny bundle), and the Python API.

A row without edits equals /explain's answer for the image; edited rows carry their own complete
decomposition and their change from the unedited row; edit sets sent in one request equal the same
sets sent one at a time; the linearity check equals ablating each feature as its own edit set; every
bad input is a 400 naming the field, one INFO log line, nothing logged as ERROR; a bundle without an
intervention graph says so. (Exactness against open_clip: tests/export/test_intervene_parity.py.)
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import numpy as np
import pytest
import requests

from serving import Explainer
from serving.cli import running_server
from serving.engine import ServingEngine
from serving.inputs import ImageRequest, RequestError
from serving.intervene import MAX_EDIT_SETS, EditError, InterventionUnavailable
from serving.runtime import BundleRuntime
from training.data import FashionMNIST

TIMEOUT = 60
DEEP = "[" * 50_000 + "]" * 50_000


def fmnist_png(i: int) -> bytes:
    img, _ = FashionMNIST("test", limit=i + 1)[i]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("log") / "server.log"


@pytest.fixture(scope="module")
def server(bundle, server_log):
    with running_server(bundle, log_path=server_log, extra_args=["--threads", "1"]) as url:
        yield url


@pytest.fixture(scope="module")
def explainer(bundle) -> Explainer:
    return Explainer(BundleRuntime(bundle, device="cpu", threads=1))


def intervene(url: str, image: bytes, edits, **fields) -> requests.Response:
    data = {"edits": edits if isinstance(edits, str) else json.dumps(edits), **{k: str(v) for k, v in fields.items()}}
    return requests.post(f"{url}/intervene", files={"image": ("i.png", image, "image/png")}, data=data, timeout=TIMEOUT)


def close(a, b, rtol=1e-5, atol=1e-6) -> bool:
    """Every number of two JSON-like structures equal within tolerances, every other leaf equal."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= atol + rtol * abs(b)
    return a == b


EXPLAIN_FIELDS = ("predicted", "top", "explanations", "top_features", "completeness_residual", "term_shares")


def test_unedited_rows_equal_explain_and_edited_rows_are_complete(server, explainer):
    png = fmnist_png(0)
    ex = requests.post(f"{server}/explain", files={"image": ("i.png", png, "image/png")}, data={"spatial": "false"},
                       timeout=TIMEOUT).json()
    top = ex["top_features"][0]
    sets = [{}, {"name": "no top feature", "features": [{"layer": top["layer"], "index": top["index"]}]},
            {"terms": [{"term": "attn.1", "scale": 0}, {"term": "clt.0", "scale": 0.5}], "term_tokens": "all"},
            {"delete_patches": [[1, 1], 6], "drop_keys": [0, 15]}]
    r = intervene(server, png, sets)
    assert r.status_code == 200, r.text
    body = r.json()
    for field in EXPLAIN_FIELDS:
        assert close(body["baseline"][field], ex[field]), field
        assert close(body["edited"][0]["result"][field], ex[field]), field
    assert body["edited"][1]["edit"]["name"] == "no top feature"
    pred = ex["predicted"]
    for row in body["edited"]:
        res = row["result"]
        assert res["completeness_residual"] <= 1e-5 * max(1.0, max(abs(t["logit"]) for t in res["top"]))
        after = {e["label"]: e["logit"] for e in res["explanations"]}
        for ch in row["logit_changes"]:
            assert ch["change"] == pytest.approx(ch["after"] - ch["before"], abs=1e-6)
            if ch["label"] in after:
                assert ch["after"] == pytest.approx(after[ch["label"]], abs=1e-6)
        assert row["predicted_changed"] == (res["predicted"] != pred)
        assert len(row["term_changes"]) == len(body["term_names"])
    changes = [max(abs(c["change"]) for c in row["logit_changes"]) for row in body["edited"]]
    assert changes[0] == 0.0 and min(changes[1:]) > 1e-4, changes  # each edit moves the logits, the empty set none
    # the ablated feature's row: the predicted logit moved, and its term changes add up to that move
    row = body["edited"][1]
    moved = next(c["change"] for c in row["logit_changes"] if c["label"] == pred)
    assert sum(row["term_changes"]) == pytest.approx(moved, abs=1e-4)


def test_json_body_with_base64_image(server):
    png = fmnist_png(1)
    r = requests.post(f"{server}/intervene", json={"image": base64.b64encode(png).decode(), "edits": [{"drop_keys": [3]}],
                                                   "top_k": 2}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert len(r.json()["edited"]) == 1 and len(r.json()["baseline"]["top"]) == 2
    info = requests.get(f"{server}/info", timeout=TIMEOUT).json()
    assert info["intervene"] == {"file": "intervene.onnx"} and info["limits"]["max_edit_sets"] == MAX_EDIT_SETS
    # one patch spec: /intervene deletes patches to the fill that /info's `patches` (the total-effect map's) states
    assert info["patches"]["grid"] == [4, 4] and r.json()["fill"] == pytest.approx(info["patches"]["fill"], abs=1e-7)
    assert "/intervene" in requests.get(f"{server}/docs.json", timeout=TIMEOUT).json()["paths"]


def test_graph_patch_deletion_equals_numpy_fill_patches(explainer):
    """The intervention graph's patch deletion (training/model/edits.delete_patches, in the graph) and the
    total-effect map's (bundle.patches.fill_patches, numpy) are one operation with one fill (the manifest's
    `patches`): deleting patches in the graph gives the logits of the image graph on the numpy-edited pixels."""
    from PIL import Image

    from bundle.patches import fill_patches
    from serving.schemas import EditSet

    rt = explainer.runtime
    pixels = rt.preprocess(Image.open(io.BytesIO(fmnist_png(3))).convert("RGB"))
    text = rt.embed_labels()
    deleted = [1, 6, 11, 12]
    body = rt.intervene_pixels(pixels, text, rt.label_names, [EditSet(delete_patches=deleted)], k=len(rt.label_names))
    assert body["fill"] == pytest.approx(list(rt.patches.fill), abs=0)
    mask = np.zeros((1, rt.patches.n_patches), bool)
    mask[0, deleted] = True
    want = rt.run_logits(fill_patches(pixels[None], mask, rt.patches.fill, rt.patches.grid), text)[0]
    got = {t["label"]: t["logit"] for t in body["edited"][0]["result"]["top"]}
    assert len(got) == len(rt.label_names)
    for c, name in enumerate(rt.label_names):
        assert got[name] == pytest.approx(float(want[c]), abs=1e-4), name


def test_batched_edit_sets_equal_one_at_a_time(explainer):
    png = fmnist_png(2)
    sets = [{"features": [{"layer": 1, "index": 5, "set": 2.0}, {"layer": 3, "index": 7, "scale": 3.0}]},
            {"terms": [{"term": "embed", "scale": 0.5}]}, {"delete_patches": [[0, 0], [3, 3]]}, {"drop_keys": [5, 6, 9]}]
    together = explainer.intervene(png, sets)
    for s, row in zip(sets, together.edited):
        alone = explainer.intervene(png, [s]).edited[0]
        assert close(row.model_dump(), alone.model_dump())


def test_linearity_check_equals_ablating_each_feature_alone(explainer):
    png = fmnist_png(3)
    ans = explainer.intervene(png, [{}], check_linearity=True)
    checks = ans.feature_ablations
    assert checks and len(checks) <= len(ans.baseline.top_features)
    pred = ans.baseline.predicted
    for c in checks[:4]:
        row = explainer.intervene(png, [{"features": [{"layer": c.layer, "index": c.index}]}]).edited[0]
        change = next(x.change for x in row.logit_changes if x.label == pred)
        assert c.ablated_change == pytest.approx(change, abs=1e-5)
        assert np.isfinite(c.contribution) and c.activation != 0.0


def _result(pred: str, logit: float) -> dict:
    return {"predicted": pred, "top": [{"label": pred, "probability": 1.0, "logit": logit}], "explanations": None,
            "top_features": None, "completeness_residual": 0.0, "term_shares": [1.0, 0.0], "embedding": None, "spatial": None}


SAMPLE = json.dumps({
    "term_names": ["embed", "error"], "fill": [0, 0, 0], "baseline": _result("a", 2.0),
    "edited": [{"edit": {}, "result": _result("b", 1.5), "predicted_changed": True,
                "logit_changes": [{"label": "a", "before": 2.0, "after": 1.0, "change": -1.0}], "term_changes": [-1.0, 0.0]}],
    "feature_ablations": [{"layer": 3, "index": 7, "activation": 1.0, "contribution": 0.5, "ablated_change": -0.4}]})

BAD = [
    ([{"features": [{"layer": 4, "index": 0}]}], "edits[0].features[0].layer", "out of range"),
    ([{}, {"features": [{"layer": 0, "index": 128}]}], "edits[1].features[0].index", "out of range"),
    ([{"features": [{"layer": 0, "index": -1}]}], "edits[0].features[0].index", "greater than"),
    ([{"features": [{"layer": 0, "index": 1, "scale": 1, "set": 2}]}], "edits[0].features[0]", "not both"),
    ([{"features": [{"layer": 0, "index": 1}, {"layer": 0, "index": 1}]}], "edits[0].features[1]", "twice"),
    ([{"terms": [{"term": "attn.7"}]}], "edits[0].terms[0].term", "unknown term"),
    ([{"terms": [{"term": "error"}]}], "edits[0].terms[0].term", "unknown term"),
    ('[{"features": [{"layer": 0, "index": 1, "scale": NaN}]}]', "edits[0].features[0].scale", "finite"),
    ('[{"terms": [{"term": "embed", "scale": Infinity}]}]', "edits[0].terms[0].scale", "finite"),
    ([{"features": [{"layer": 0, "index": 1, "set": 1e300}]}], "edits[0].features[0].set", "less than"),
    ([{"delete_patches": [16]}], "edits[0].delete_patches[0]", "off the grid"),
    ([{"drop_keys": [[0, 4]]}], "edits[0].drop_keys[0]", "off the"),
    ([{"drop_keys": [2, 2]}], "edits[0].drop_keys[1]", "twice"),
    ([{}] * (MAX_EDIT_SETS + 1), "edits", "at most"),
    ([{"features": [{"layer": 0, "index": i} for i in range(257)]}], "edits[0].features", "at most 256"),
    ([{"terms": [{"term": "embed"}] * 257}], "edits[0].terms", "at most 256"),
    ([], "edits", "at least"),
    ([{"feature": []}], "edits[0].feature", "extra"),
    ('{"features": []}', "edits", "list"),
    ('[{"features": [', "edits", "json"),
    (DEEP, "edits", "json"),
]


@pytest.mark.parametrize("edits,field,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_edits_are_400_naming_the_field(server, edits, field, words):
    r = intervene(server, fmnist_png(0), edits)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == field, body
    assert words.lower() in body["error"].lower(), body


def test_missing_edits_and_bad_json_body(server):
    r = requests.post(f"{server}/intervene", files={"image": ("i.png", fmnist_png(0), "image/png")}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["field"] == "edits"
    r = requests.post(f"{server}/intervene", data=('{"image": "AAAA", "edits": ' + DEEP + "}").encode(),
                      headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "json" in r.json()["error"].lower()


def test_bad_edits_are_one_info_log_line_and_no_error(server, server_log):
    marker = f"m{time.time_ns()}"
    r = intervene(server, fmnist_png(0), [{"terms": [{"term": marker}]}])
    assert r.status_code == 400
    time.sleep(0.5)  # the worker's lines reach the file through the server's stdout
    lines = server_log.read_text(errors="replace").splitlines()
    mine = [l for l in lines if marker in l]
    assert len(mine) == 1 and "400 POST /intervene" in mine[0] and "[INFO]" in mine[0], mine
    assert not [l for l in lines if "Traceback" in l or "[ERROR]" in l], [l for l in lines if "ERROR" in l][:5]
    assert intervene(server, fmnist_png(0), [{}]).status_code == 200  # still serving


def test_bundle_without_intervention_graph(v1_bundle):
    """It loads and serves; /intervene's engine step answers 400 saying the bundle has no intervention graph."""
    rt = BundleRuntime(v1_bundle, device="cpu", threads=1)
    assert rt.intervene_session is None and rt.describe()["intervene"] is False
    engine = ServingEngine.__new__(ServingEngine)  # only the runtime is needed to check a request
    engine.runtime = rt
    req = ImageRequest(fmnist_png(0), None, None, edits=())
    with pytest.raises(RequestError) as err:
        asyncio.run(engine._job("intervene", req))
    assert err.value.status == 400 and "no intervention graph" in err.value.message
    with pytest.raises(InterventionUnavailable, match="no intervention graph"):
        Explainer(rt).intervene(fmnist_png(0), [{}])


def test_server_setting_switches_the_graph_off(bundle):
    from serving.settings import ServeSettings

    assert ServeSettings.from_env({"CLTVIT_NO_INTERVENE": "1"}).intervene is False
    assert ServeSettings.from_env({}).intervene is True
    rt = BundleRuntime(bundle, device="cpu", threads=1, verify_checksums=False, intervene=False)
    assert rt.intervene_session is None
    with pytest.raises(InterventionUnavailable, match="switched off on this server"):
        rt.edit_space()


def test_python_api_errors_name_the_field(explainer):
    with pytest.raises(EditError, match=r"edits\[0\]\.features\[0\]\.layer"):
        explainer.intervene(fmnist_png(0), [{"features": [{"layer": 9, "index": 0}]}])


def test_cli_edits(bundle, tmp_path, capsys):
    from serving.cli import explain_main

    src = tmp_path / "x.png"
    src.write_bytes(fmnist_png(0))
    assert explain_main([str(src), "--bundle", str(bundle), "--term", "attn.1=0", "--delete-patch", "2,3", "--ablate", "1:2",
                         "--set-feature", "0:3=1.5", "--drop-key", "1,1", "--check-linearity", "--json"]) == 0
    edit = json.loads(capsys.readouterr().out)["edited"][0]["edit"]
    assert edit["drop_keys"] == [[1, 1]] and edit["delete_patches"] == [[2, 3]] and edit["terms"][0]["term"] == "attn.1"
    assert [f.get("set") for f in edit["features"]] == [None, 1.5]
    for argv, words in ((["--ablate", "1"], "argument --ablate: expected L:I"),  # refused before the bundle loads
                        (["--drop-key", "0"], "argument --drop-key: expected R,C"),
                        (["--ablate", "0:1", "--total-effect"], "argument --total-effect: not with the edit options"),
                        (["--ablate", "0:1", "--scale-feature", "9:1=2"], "argument --scale-feature: edits[0].features[1].layer")):
        assert explain_main([str(src), "--bundle", str(bundle), *argv]) == 2
        assert words in capsys.readouterr().err


def test_cli_summary():
    from serving.cli import render_intervention
    from serving.schemas import InterveneResponse

    ans = InterveneResponse.model_validate(json.loads(SAMPLE))
    text = render_intervention(ans)
    assert "unedited: a (logit 2.000); edited: b (logit 1.500) - the prediction changed" in text
    assert "a 2.000 -> 1.000 (-1.000)" in text and "3:7  contribution +0.5000  ablated -0.4000" in text


def test_python_client(server):
    from serving.client import CltvitClient, ServiceError

    with CltvitClient(server) as client:
        ans = client.intervene(fmnist_png(4), [{"drop_keys": [[1, 1]]}], top_k=2)
        assert ans.edited[0].edit.drop_keys == [(1, 1)] and len(ans.baseline.top) == 2
        with pytest.raises(ServiceError, match=r"edits\[0\]\.terms\[0\]\.term"):
            client.intervene(fmnist_png(4), [{"terms": [{"term": "nope"}]}])
