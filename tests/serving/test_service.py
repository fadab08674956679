"""End to end: a real `cltvit-serve` process on a free loopback port, driven over HTTP.

One server (tiny bundle: cltvit-tiny + random CLT) serves the whole module. Checks every endpoint,
HTTP result == in-process runtime result, every bad input (4xx + JSON message naming the problem,
one short log line, server still serving), pathologically deep JSON, concurrent requests batched
in process (cltvit_batch_size shows mean > 1) with different label sets in the same batches, that
no internal batching API is reachable, and the Prometheus metrics.
"""
from __future__ import annotations

import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from serving.cli import running_server
from serving.images import decode_image
from serving.runtime import BundleRuntime

TIMEOUT = 60


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("log") / "server.log"


@pytest.fixture(scope="module")
def server(bundle, server_log):
    # --batch-wait-ms: the tests' Python clients on a busy shared machine can send so slowly that a
    # zero-wait batcher never sees two requests at once; a short window makes the batching tests
    # deterministic (lone requests still run at once). The zero-wait default is measured by bench_serve.
    args = ["--max-batch-size", "32", "--threads", "1", "--batch-wait-ms", "25"]
    with running_server(bundle, log_path=server_log, extra_args=args) as url:
        yield url


@pytest.fixture(scope="module")
def runtime(bundle) -> BundleRuntime:
    return BundleRuntime(bundle, device="cpu", threads=1)


def fmnist_png(i: int) -> bytes:
    from training.data import FashionMNIST

    img, _ = FashionMNIST("test", limit=i + 1)[i]
    return png_bytes(img)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def post(url: str, endpoint: str, image: bytes | None = None, **fields) -> requests.Response:
    files = {"image": ("image.png", image, "image/png")} if image is not None else None
    data = {k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in fields.items()}
    if files is None:
        return requests.post(f"{url}/{endpoint}", json=fields, timeout=TIMEOUT)
    return requests.post(f"{url}/{endpoint}", files=files, data=data, timeout=TIMEOUT)


def assert_client_error(resp: requests.Response, *words: str, status: int | tuple[int, ...] = 400) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in statuses, (resp.status_code, resp.text)
    body = resp.json()
    text = json.dumps(body).lower()
    for w in words:
        assert w.lower() in text, f"{w!r} not in {text}"
    return body


DEADLINE_S = 60.0  # for conditions that normally hold within a second; reaching it is a failure


def wait_for_lines(path, condition) -> list[str]:
    """The file's lines once `condition(lines)` holds (polled every 50 ms; fails after DEADLINE_S)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        lines = path.read_text(errors="replace").splitlines()
        if condition(lines):
            return lines
        assert time.monotonic() < deadline, f"log condition not met within {DEADLINE_S} s; last lines: {lines[-5:]}"
        time.sleep(0.05)


def until_batched(burst, condition, rounds: int = 5) -> None:
    """Run `burst()` (which checks every answer itself and returns counter deltas) until `condition(deltas)`
    holds. Whether two requests share a batch depends on how fast the client threads send on a loaded
    machine; each round has 30 concurrent clients and a 25 ms window, so one round nearly always suffices,
    and `rounds` rounds without any shared batch is a failure."""
    seen = []
    for _ in range(rounds):
        deltas = burst()
        seen.append(deltas)
        if condition(deltas):
            return
    raise AssertionError(f"no round batched as required: {seen}")


# ---------------------------------------------------------------------- endpoints
def test_classify_multipart(server, runtime):
    r = post(server, "classify", fmnist_png(0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predicted"] == body["top"][0]["label"]
    assert len(body["top"]) == 5
    assert {t["label"] for t in body["top"]} <= set(runtime.label_names)
    probs = [t["probability"] for t in body["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9


def test_explain_matches_in_process_runtime(server, runtime):
    data = fmnist_png(3)
    r = post(server, "explain", data, top_k=3)
    assert r.status_code == 200, r.text
    http = r.json()
    (local,) = runtime.explain([decode_image(data)], top_k=3, detail=True)
    assert http["predicted"] == local.predicted
    assert [t["label"] for t in http["top"]] == [t.label for t in local.top]
    np.testing.assert_allclose([t["probability"] for t in http["top"]], [t.probability for t in local.top], rtol=1e-5)
    assert http["term_names"] == runtime.term_names
    for h, l in zip(http["explanations"], local.explanations):
        assert h["label"] == l.label and [t["term"] for t in h["terms"]] == runtime.term_names
        np.testing.assert_allclose([t["value"] for t in h["terms"]], [t.value for t in l.terms], rtol=1e-4, atol=1e-6)
        # the terms add up to the class logit
        assert sum(t["value"] for t in h["terms"]) == pytest.approx(h["logit"], abs=1e-4)
    assert [(f["layer"], f["index"]) for f in http["top_features"]] == [(f.layer, f.index) for f in local.top_features]
    assert len(http["top_features"]) == runtime.manifest.top_k_features
    assert http["completeness_residual"] < 1e-3
    assert sum(http["term_shares"]) == pytest.approx(1.0, abs=1e-6)


def test_custom_labels_json_base64(server, runtime):
    data = fmnist_png(1)
    labels = ["a sneaker", "a handbag", "a pair of trousers"]
    r = requests.post(f"{server}/classify", json={"image": base64.b64encode(data).decode(), "labels": labels, "top_k": 3}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    (local,) = runtime.explain([decode_image(data)], labels=labels, top_k=3, detail=False)
    assert [t["label"] for t in r.json()["top"]] == [t.label for t in local.top]
    assert sum(t["probability"] for t in r.json()["top"]) == pytest.approx(1.0, abs=1e-6)
    # data: URL form and comma-separated multipart labels give the same answer
    r2 = requests.post(f"{server}/classify", json={"image": "data:image/png;base64," + base64.b64encode(data).decode(),
                                                   "labels": labels, "top_k": 3}, timeout=TIMEOUT)
    r3 = post(server, "classify", data, labels=",".join(labels), top_k=3)
    assert r2.json() == r.json() and r3.status_code == 200 and r3.json()["predicted"] == r.json()["predicted"]


def test_embed(server, runtime):
    data = fmnist_png(2)
    r = post(server, "embed", data)
    assert r.status_code == 200, r.text
    body = r.json()
    (local,) = runtime.explain([decode_image(data)], detail=False, include_embedding=True)
    assert body["dim"] == runtime.embed_dim == len(body["embedding"])
    np.testing.assert_allclose(body["embedding"], local.embedding, rtol=1e-4, atol=1e-5)
    assert body["term_names"] == runtime.term_names and len(body["term_shares"]) == len(runtime.term_names)
    # the shares, by hand from /explain's terms of the same image: |term| / sum |terms| at the predicted label
    explained = post(server, "explain", data, top_k=1).json()
    (predicted,) = explained["explanations"]
    assert predicted["label"] == body["predicted"] == explained["predicted"]
    magnitudes = [abs(t["value"]) for t in predicted["terms"]]
    np.testing.assert_allclose(body["term_shares"], [m / sum(magnitudes) for m in magnitudes], rtol=1e-12, atol=1e-15)


def test_info_get_and_post(server, runtime):
    g = requests.get(f"{server}/info", timeout=TIMEOUT)
    p = requests.post(f"{server}/info", json={}, timeout=TIMEOUT)
    assert g.status_code == 200 and p.status_code == 200
    assert g.json() == p.json()
    info = g.json()
    assert info["backbone"]["model"] == "cltvit-tiny" and info["mode"] == runtime.manifest.mode
    assert info["labels"] == runtime.label_names and info["term_names"] == runtime.term_names
    assert info["auth"] is False and info["provider"] == "CPUExecutionProvider"
    assert info["batching"]["max_batch_size"] == 32
    # --variant auto (the default) on a bundle with fp32 alone: fp32, saying why, nothing timed
    choice = info["variant_choice"]
    assert info["variant"] == choice["variant"] == "fp32" and choice["requested"] == "auto"
    assert choice["reason"] == "the bundle has no other variant" and choice["rounds"] == 0


def test_explain_returns_spatial_maps(server, runtime):
    """/explain carries where in the image (per top label, per layer and summed), per-head maps on request,
    equal to the in-process runtime's; spatial=false leaves them out."""
    data = fmnist_png(5)
    http = post(server, "explain", data, top_k=3).json()
    (local,) = runtime.explain([decode_image(data)], top_k=3, spatial=True)
    sp = http["spatial"]
    assert sp["grid"] == [4, 4] and sp["layers"] == [t for t in runtime.term_names if t.startswith("attn.")]
    assert [c["label"] for c in sp["classes"]] == [t["label"] for t in http["top"]]
    for h, l in zip(sp["classes"], local.spatial.classes):
        np.testing.assert_allclose(h["layers"], l.layers, rtol=1e-4, atol=1e-6)
        attn = [t["value"] for t in next(e for e in http["explanations"] if e["label"] == h["label"])["terms"]
                if t["term"].startswith("attn.")]
        parts = np.sum(h["layers"], axis=1) + np.add(h["cls_cell"], h["value_bias"]) + h["output_bias"]
        np.testing.assert_allclose(parts, attn, atol=1e-5)
        assert h["heads"] == [] and h["heads_cls_cell"] == []
    heads = post(server, "explain", data, top_k=3, heads=True).json()["spatial"]["classes"][0]["heads"]
    assert np.asarray(heads).shape == (4, 4, 16)
    json_body = requests.post(f"{server}/explain", json={"image": base64.b64encode(data).decode(), "heads": True},
                              timeout=TIMEOUT).json()
    assert np.asarray(json_body["spatial"]["classes"][0]["heads"]).shape == (4, 4, 16)
    assert post(server, "explain", data, spatial=False).json()["spatial"] is None
    info = requests.get(f"{server}/info", timeout=TIMEOUT).json()
    assert info["spatial"] == {"top_k": 5, "grid": [4, 4], "heads": 4}


def test_explain_total_effect_equals_the_edited_images_sent_one_by_one(server, runtime):
    """/explain with total_effect=true: its map equals the same edited images (patches painted the tiny bundle's
    mid-grey fill with PIL) sent as separate /classify calls, and the in-process runtime's; off by default."""
    from export.testing import GREY

    img = Image.open(io.BytesIO(fmnist_png(3))).convert("RGB").resize((32, 32), Image.BICUBIC)  # the model's size
    body = post(server, "explain", png_bytes(img), top_k=3, total_effect="true").json()
    te = body["total_effect"]
    assert te["grid"] == [4, 4] and te["rows"] == 17 and te["method"] == "keep_one"
    assert [c["label"] for c in te["classes"]] == [t["label"] for t in body["top"]]

    def logits(keep: list[int]) -> dict[str, float]:
        a = np.asarray(img).copy()
        for p in set(range(16)) - set(keep):
            a[(p // 4) * 8 : (p // 4 + 1) * 8, (p % 4) * 8 : (p % 4 + 1) * 8] = GREY
        top = post(server, "classify", png_bytes(Image.fromarray(a)), top_k=10).json()["top"]
        return {t["label"]: t["logit"] for t in top}

    base = logits([])
    alone = [logits([p]) for p in range(16)]
    scale = max(1.0, max(abs(t["logit"]) for t in body["top"]))
    for c in te["classes"]:
        want = [a[c["label"]] - base[c["label"]] for a in alone]
        assert np.abs(np.asarray(c["total"]) - want).max() <= 1e-5 * scale, c["label"]
        assert c["fill_logit"] == pytest.approx(base[c["label"]], abs=1e-5 * scale)
    (local,) = runtime.explain([img], top_k=3, total_effect=True)
    np.testing.assert_allclose([c["total"] for c in te["classes"]], [c.total for c in local.total_effect.classes],
                               rtol=1e-5, atol=1e-6)
    as_json = requests.post(f"{server}/explain", json={"image": base64.b64encode(png_bytes(img)).decode(), "top_k": 3,
                                                        "total_effect": True}, timeout=TIMEOUT).json()["total_effect"]
    np.testing.assert_allclose([c["total"] for c in as_json["classes"]], [c["total"] for c in te["classes"]], atol=1e-6)
    assert post(server, "explain", png_bytes(img)).json()["total_effect"] is None
    info = requests.get(f"{server}/info", timeout=TIMEOUT).json()
    assert info["patches"]["grid"] == [4, 4] and info["patches"]["fill"] == list(te["fill"])


def test_openapi_has_models(server):
    spec = requests.get(f"{server}/docs.json", timeout=TIMEOUT).json()
    for route in ("/classify", "/explain", "/embed", "/info"):
        assert route in spec["paths"], route
    schemas = spec["components"]["schemas"]
    for model in ("ClassifyResponse", "ExplainResponse", "EmbedResponse", "InfoResponse"):
        assert model + "IODescriptor" in schemas, model  # BentoML's name for a response model
    for model in ("LabelScore", "ClassExplanation", "TermContribution", "FeatureContribution", "SpatialExplanation", "ClassMap"):
        assert model in schemas, model
    assert "image" in schemas["classify__Input"]["properties"] and "top_k" in schemas["explain__Input"]["properties"]
    assert {"spatial", "heads"} <= set(schemas["explain__Input"]["properties"])
    # the response schema shows the spatial maps down to the grids' element type
    spatial = schemas["ExplainResponseIODescriptor"]["properties"]["spatial"]
    assert "#/components/schemas/SpatialExplanation" in json.dumps(spatial)
    assert schemas["SpatialExplanation"]["properties"]["classes"]["items"]["$ref"].endswith("/ClassMap")
    layers = schemas["ClassMap"]["properties"]["layers"]
    assert layers["type"] == "array" and layers["items"]["items"]["type"] == "number"
    assert {"grid", "layers", "classes", "residual"} <= set(schemas["SpatialExplanation"]["required"])


# ---------------------------------------------------------------------- converted image kinds
def _variants() -> dict[str, bytes]:
    rng = np.random.RandomState(0)
    rgb = Image.fromarray(rng.randint(0, 255, (40, 56, 3), dtype=np.uint8))
    gray16 = Image.fromarray((rng.randint(0, 65535, (40, 40))).astype(np.uint16))
    frames = [Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    anim = io.BytesIO()
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "cmyk-jpeg": png_bytes(rgb.convert("CMYK"), "JPEG"),
        "gray16-png": png_bytes(gray16),
        "palette-png": png_bytes(rgb.convert("P")),
        "rgba-png": png_bytes(rgb.convert("RGBA")),
        "grayscale-png": png_bytes(rgb.convert("L")),
        "animated-gif": anim.getvalue(),
        "webp": png_bytes(rgb, "WEBP"),
    }


@pytest.mark.parametrize("kind", list(_variants()))
def test_image_kinds_are_converted_and_answered(server, runtime, kind):
    data = _variants()[kind]
    r = post(server, "classify", data, top_k=3)
    assert r.status_code == 200, (kind, r.text)
    (local,) = runtime.explain([decode_image(data)], top_k=3, detail=False)
    assert r.json()["predicted"] == local.predicted


# ---------------------------------------------------------------------- bad input
def _truncated() -> bytes:
    data = png_bytes(Image.fromarray(np.random.RandomState(1).randint(0, 255, (64, 64, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


def _bomb() -> bytes:
    return png_bytes(Image.new("1", (8000, 7000)))  # 56 megapixels, a few kB compressed


BAD_UPLOADS = {
    "not-an-image": (b"this is a text file, not a picture\n" * 10, ("not an image",), 400),
    "truncated": (_truncated(), ("truncated",), 400),
    "zero-bytes": (b"", ("empty",), 400),
    "bomb-56MP": (_bomb(), ("pixels", "limit"), 400),
    "aspect-1x1000000": (png_bytes(Image.new("L", (1, 1_000_000))), ("aspect ratio",), 400),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads(server, case):
    data, words, status = BAD_UPLOADS[case]
    for endpoint in ("classify", "explain", "embed"):
        body = assert_client_error(post(server, endpoint, data), *words, status=status)
        assert body.get("field") == "image"


def test_upload_over_20mb(server):
    big = b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)
    assert_client_error(post(server, "classify", big), "limit", status=413)
    huge = bytes(30 * 1024 * 1024)  # over the whole-body limit: refused before BentoML reads it
    assert_client_error(post(server, "classify", huge), "limit", status=413)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"labels": []}, ("labels", "empty")),
        ({"labels": ["shoe", "boot", "shoe"]}, ("duplicate", "shoe")),
        ({"labels": ["shoe", "  "]}, ("labels[1]", "empty string")),
        ({"labels": [f"label {i}" for i in range(1001)]}, ("too many labels", "1000")),
        ({"labels": ["x" * 201, "shoe"]}, ("labels[0]", "200")),
        ({"top_k": 0}, ("top_k",)),
        ({"top_k": 11}, ("top_k", "10")),
        ({"top_k": 100000}, ("top_k",)),
        ({"labels": ["shoe", "boot"], "top_k": 3}, ("top_k", "2")),
        ({"top_k": "many"}, ("top_k",)),
        ({"total_effect": "maybe"}, ("total_effect", "boolean")),
        ({"total_effect": [1]}, ("total_effect", "boolean")),
        ({"total_effect": 2}, ("total_effect", "boolean")),
    ],
    ids=["empty-labels", "duplicate-labels", "empty-string-label", "1001-labels", "long-label",
         "top_k-0", "top_k-over-C", "top_k-huge", "top_k-over-custom-C", "top_k-not-int",
         "total_effect-word", "total_effect-list", "total_effect-2"],
)
def test_bad_fields(server, fields, words):
    data = fmnist_png(0)
    assert_client_error(post(server, "classify", data, **fields), *words)  # multipart
    body = {"image": base64.b64encode(data).decode(), **fields}
    assert_client_error(requests.post(f"{server}/explain", json=body, timeout=TIMEOUT), *words)  # JSON


def test_malformed_json_and_base64(server):
    r = requests.post(f"{server}/classify", data=b'{"image": "abc', headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert_client_error(r, "json")
    r = requests.post(f"{server}/classify", json={"image": "not base64 !!"}, timeout=TIMEOUT)
    assert_client_error(r, "image", "base64")
    r = requests.post(f"{server}/classify", json={"image": "data:image/png,rawtext"}, timeout=TIMEOUT)
    assert_client_error(r, "image", "base64")
    r = requests.post(f"{server}/classify", json={"labels": ["a"]}, timeout=TIMEOUT)
    assert_client_error(r, "no image")
    r = requests.post(f"{server}/classify", json=[1, 2], timeout=TIMEOUT)
    assert_client_error(r, "json object")


def test_image_url_is_not_fetched(server):
    r = requests.post(f"{server}/classify", files={"image": (None, "http://127.0.0.1:9/cat.png")}, timeout=TIMEOUT)
    assert_client_error(r, "image", "file part")


def test_malformed_multipart(server):
    r = requests.post(f"{server}/classify", data=b"--xyz\r\ngarbage", timeout=TIMEOUT,
                      headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


DEEP_JSON = b"[" * 50_000 + b"]" * 50_000  # 100 kB, 50,000 levels


@pytest.mark.parametrize("endpoint", ["classify", "explain", "embed", "info"])
def test_deeply_nested_json_is_refused_at_once(server, endpoint):
    for body in (DEEP_JSON, b'{"image": ' + DEEP_JSON + b"}", b'{"labels": ' + DEEP_JSON + b"}"):
        r = requests.post(f"{server}/{endpoint}", data=body, headers={"content-type": "application/json"}, timeout=30)
        assert_client_error(r, "json")
    # multipart: a deeply nested JSON list as the labels field
    r = post(server, endpoint, fmnist_png(0), labels=DEEP_JSON.decode())
    if endpoint != "info":
        assert_client_error(r, "labels")


def test_internal_batching_api_is_not_reachable(server):
    spec = requests.get(f"{server}/docs.json", timeout=TIMEOUT).json()
    assert set(spec["paths"]) & {"/infer_batch", "/run_batch", "/batch"} == set()
    for path in ("/infer_batch", "/run_batch", "/batch"):
        r = requests.post(f"{server}{path}", json={"items": []}, timeout=TIMEOUT)
        assert r.status_code in (404, 405), (path, r.status_code, r.text)


def test_client_errors_are_one_short_log_line(server, server_log):
    marker = "marker-" + str(time.time_ns())
    r = post(server, "classify", fmnist_png(0), labels=["shoe", marker, marker])
    assert_client_error(r, "duplicate")
    assert_client_error(post(server, "explain", b"not an image at all"), "not an image")
    assert_client_error(requests.post(f"{server}/embed", data=b"{", headers={"content-type": "application/json"},
                                      timeout=TIMEOUT), "json")
    # the worker's log lines reach the file through the server's stdout: wait for the last one to land
    lines = wait_for_lines(server_log, lambda ls: any("400 POST /embed" in l and "malformed JSON" in l for l in ls))
    mine = [l for l in lines if marker in l]
    assert len(mine) == 1 and "400 POST /classify" in mine[0] and "[ERROR]" not in mine[0], mine
    assert any("400 POST /explain" in l and "not an image" in l for l in lines)
    assert any("400 POST /embed" in l and "malformed JSON" in l for l in lines)
    assert not [l for l in lines if "Traceback" in l or "[ERROR]" in l], [l for l in lines if "ERROR" in l][:5]


def test_server_still_serving_after_bad_input(server, runtime):
    """A burst of every kind of bad request, sent here (not left to earlier tests), then a good one."""
    good = fmnist_png(0)
    bad = [
        lambda: post(server, "classify", good[: len(good) // 2]),  # truncated image
        lambda: post(server, "explain", b"not an image at all"),
        lambda: requests.post(f"{server}/classify", data=b'{"image": [' * 5000, timeout=TIMEOUT,
                              headers={"content-type": "application/json"}),  # deep JSON
        lambda: requests.post(f"{server}/explain", data=b"--x\r\nbroken", timeout=TIMEOUT,
                              headers={"content-type": "multipart/form-data; boundary=x"}),
        lambda: post(server, "classify", good, labels=[f"l{i}" for i in range(1001)]),
        lambda: post(server, "embed", good, labels=["a", "a"]),
    ]
    with ThreadPoolExecutor(6) as pool:
        codes = [r.status_code for r in pool.map(lambda f: f(), bad * 3)]
    assert all(400 <= c < 500 for c in codes), codes
    assert requests.get(f"{server}/readyz", timeout=TIMEOUT).status_code == 200
    r = post(server, "classify", good)
    assert r.status_code == 200
    assert r.json()["predicted"] == runtime.explain([decode_image(good)], detail=False)[0].predicted


# ---------------------------------------------------------------------- load and metrics
def batch_counters(url: str) -> tuple[float, float, float]:
    """(images, batches, ONNX Runtime calls) from cltvit_batch_size and cltvit_inference_seconds."""
    text = requests.get(f"{url}/metrics", timeout=TIMEOUT).text

    def value(name: str) -> float:  # summed over workers
        found = re.findall(rf"^{name}{{worker=\"[0-9]+\"}} ([0-9.e+]+)$", text, re.M)
        assert found, name
        return sum(float(v) for v in found)

    return value("cltvit_batch_size_sum"), value("cltvit_batch_size_count"), value("cltvit_inference_seconds_count")


def test_concurrent_requests_are_batched(server, runtime):
    images = [fmnist_png(i) for i in range(8)]
    expected = [runtime.explain([decode_image(d)], top_k=3, detail=False)[0].predicted for d in images]

    def one(i: int) -> tuple[int, str]:
        r = post(server, "classify", images[i % 8], top_k=3)
        return r.status_code, r.json().get("predicted", r.text)

    def burst() -> tuple[float, float]:
        total0, count0, _ = batch_counters(server)
        with ThreadPoolExecutor(32) as pool:
            out = list(pool.map(one, range(128)))
        assert all(code == 200 for code, _ in out), [o for o in out if o[0] != 200][:3]
        assert [p for _, p in out] == [expected[i % 8] for i in range(128)]
        total1, count1, _ = batch_counters(server)
        assert total1 - total0 == 128
        return total1 - total0, count1 - count0

    until_batched(burst, lambda d: d[0] / d[1] > 1.0)  # mean batch size > 1


LABEL_SETS = [
    None,
    ["a sneaker", "a handbag", "a pair of trousers"],
    ["shoe", "bag"],
    ["t-shirt", "coat", "dress", "sandal", "boot"],
    ["something red", "something blue", "something green", "something dark"],
]


def test_mixed_label_sets_in_one_batch_each_get_their_own_answer(server, runtime):
    """Concurrent requests with different label sets share batches; each answer equals the in-process result."""
    images = [fmnist_png(i) for i in range(6)]
    cases = [(i % len(images), LABEL_SETS[i % len(LABEL_SETS)], "explain" if i % 3 == 0 else "classify") for i in range(90)]
    expected = {}
    for img, labels, _ in cases:
        key = (img, None if labels is None else tuple(labels))
        if key not in expected:
            (expected[key],) = runtime.explain([decode_image(images[img])], labels=labels, top_k=2, detail=True)

    def one(case):
        img, labels, endpoint = case
        fields = {"top_k": 2} if labels is None else {"top_k": 2, "labels": labels}
        return post(server, endpoint, images[img], **fields)

    for labels in LABEL_SETS[1:]:  # embed each set once first, so the concurrent phase is about batching
        assert post(server, "classify", images[0], labels=labels).status_code == 200
    def burst() -> tuple[float, float, float]:
        total0, count0, calls0 = batch_counters(server)
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(one, cases))
        total1, count1, calls1 = batch_counters(server)
        for (img, labels, endpoint), r in zip(cases, answers):
            assert r.status_code == 200, r.text
            body, local = r.json(), expected[(img, None if labels is None else tuple(labels))]
            assert [t["label"] for t in body["top"]] == [t.label for t in local.top]
            np.testing.assert_allclose([t["probability"] for t in body["top"]], [t.probability for t in local.top], rtol=1e-5)
            np.testing.assert_allclose([t["logit"] for t in body["top"]], [t.logit for t in local.top], rtol=1e-5, atol=1e-6)
            if endpoint == "explain":
                assert [(f["layer"], f["index"]) for f in body["top_features"]] == [(f.layer, f.index) for f in local.top_features]
                np.testing.assert_allclose(body["term_shares"], local.term_shares, rtol=1e-4, atol=1e-6)
        assert total1 - total0 == len(cases)
        return total1 - total0, count1 - count0, calls1 - calls0

    # a batch holding several label sets runs one ONNX Runtime call per set: more calls than batches
    # means some batches mixed label sets (and the answers above are still each request's own)
    until_batched(burst, lambda d: d[1] < d[0] and d[2] > d[1])


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text scrape (summed over `worker`), 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_prometheus_metrics(server, runtime):
    """Exact increments for one answered /explain and one refused /embed (this module's requests run one at a time)."""
    image = fmnist_png(5)
    predicted = runtime.explain([decode_image(image)], detail=False)[0].predicted
    before = requests.get(f"{server}/metrics", timeout=TIMEOUT).text
    assert post(server, "explain", image).status_code == 200
    assert post(server, "embed", b"").status_code == 400
    for i in range(3):  # client-chosen paths must not become label values
        assert requests.post(f"{server}/no-such-path-{i}", data=b"{", timeout=TIMEOUT).status_code == 400
    after = requests.get(f"{server}/metrics", timeout=TIMEOUT).text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("cltvit_requests_total", endpoint="explain", status="200") == 1
    assert delta("cltvit_requests_total", endpoint="embed", status="400") == 1
    assert delta("cltvit_requests_total", endpoint="other", status="400") == 3
    assert delta("cltvit_predicted_label_total", label=predicted) == 1
    assert delta("cltvit_predicted_label_total") == 1
    for term in runtime.term_names:  # one share per term (layer) of the one answered image
        assert delta("cltvit_term_share_count", term=term) == 1, term
    assert delta("cltvit_batch_size_sum") == 1 and delta("cltvit_batch_size_count") == 1
    assert delta("cltvit_inference_seconds_count") == 1 and delta("cltvit_queue_wait_seconds_count") == 1
    assert delta("cltvit_model_cpu_seconds_total") > 0
    # (BentoML's own request metrics do label raw paths: docs/serving.md, "Known limits")
    assert not re.search(r'cltvit_[a-z_]+\{[^}]*no-such-path', after)
    assert 'bentoml_service_request_total' in after
    # a custom label set's prediction is counted as `custom`, never by its (client-chosen) label
    before = after
    custom = post(server, "classify", image, labels=["a red thing", "zz-client-label"])
    assert custom.status_code == 200 and custom.json()["predicted"] in ("a red thing", "zz-client-label")
    after = requests.get(f"{server}/metrics", timeout=TIMEOUT).text
    assert delta("cltvit_predicted_label_total", label="custom") == 1 and delta("cltvit_predicted_label_total") == 1
    assert "zz-client-label" not in after and "a red thing" not in after
