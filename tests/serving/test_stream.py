"""cltvit-stream through a real pipe: paths, JSON lines with ids and base64 images, bad lines; one
answer per line in order, equal to the in-process Explainer; answers before EOF; drift fields."""
from __future__ import annotations

import base64
import json
import selectors
import subprocess
import sys
from pathlib import Path

import pytest
from _scoring import assert_same_records, make_image_folder

from serving.jobs.stream import parse_line

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("images")
    return (root, *make_image_folder(root, n=40))


def _cmd(bundle: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "cltvit-stream"), "--bundle", str(bundle), "--batch-size", "8", *extra]


def test_parse_line():
    assert parse_line("a/b.png\n") == ("a/b.png", {"path": "a/b.png"})
    assert parse_line('{"path": "x.png", "id": 7}') == ("x.png", {"path": "x.png", "id": 7})
    assert parse_line('{"image": "aGk=", "id": "q"}') == (b"hi", {"path": None, "id": "q"})
    assert parse_line("[1, 2]") == ("[1, 2]", {"path": "[1, 2]"})  # not an object: a (strange) file name
    for bad, msg in [('{"path": ', "malformed JSON"), ('{"image": "@@"}', "not valid base64"),
                     ('{"id": 1}', "needs a non-empty"), ('{"path": ""}', "needs a non-empty")]:
        with pytest.raises(ValueError, match=msg):
            parse_line(bad)


def test_pipe_in_order_equal_to_explainer(bundle, folder):
    from serving.explainer import Explainer

    root, good, bad = folder
    paths = [str(root / p) for p in good]
    lines = [p for p in paths[:20]]
    lines += [json.dumps({"path": p, "id": i}) for i, p in enumerate(paths[20:30])]
    lines += [json.dumps({"image": base64.b64encode(Path(p).read_bytes()).decode(), "id": f"b64-{i}"})
              for i, p in enumerate(paths[30:])]
    lines += [str(root / b) for b in bad] + [str(root / "missing.png"), '{"path": ', ""]
    proc = subprocess.run(_cmd(bundle), input="\n".join(lines) + "\n", capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(l) for l in proc.stdout.splitlines()]
    assert len(out) == len(lines) - 1  # the blank line is skipped
    assert [r.get("path") for r in out[:30]] == paths[:30]
    assert [r.get("id") for r in out[20:30]] == list(range(10))
    assert [r.get("id") for r in out[30:40]] == [f"b64-{i}" for i in range(10)]
    assert all(r["error"] is None for r in out[:40])
    assert all(r["error"] for r in out[40:]), out[40:]
    assert "malformed JSON" in out[-1]["error"] and "missing.png" in out[-2]["error"]
    expected = Explainer(bundle).score(paths, paths=paths)
    got = [dict(r, path=paths[i]) for i, r in enumerate(out[:40])]
    for r in got:
        r.pop("id", None)
    assert_same_records(got, expected)


def test_answers_before_eof(bundle, folder, tmp_path):
    """A line written to the pipe is answered while stdin stays open (a pipeline stage, not a batch job)."""
    root, good, _ = folder
    log = tmp_path / "stderr.log"
    with log.open("w") as err:  # a file, not a pipe nobody reads (a chatty process would block on it)
        proc = subprocess.Popen(_cmd(bundle), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=REPO, bufsize=1)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        for rel in good[:3]:
            proc.stdin.write(str(root / rel) + "\n")
            proc.stdin.flush()
            assert sel.select(timeout=60), f"no answer within 60 s while stdin is open: {log.read_text()}"
            line = proc.stdout.readline()
            assert line, f"cltvit-stream exited: {log.read_text()}"
            rec = json.loads(line)
            assert rec["path"] == str(root / rel) and rec["error"] is None
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()
    assert proc.stdout.read() == ""  # no answer left over once stdin is closed


def test_drift_fields_and_metrics(bundle, folder, tmp_path):
    from serving.explainer import Explainer

    root, good, _ = folder
    ex = Explainer(bundle)
    ex.reference_profile([root / p for p in good]).save(tmp_path / "ref.json")
    metrics = tmp_path / "drift.prom"
    lines = "".join(str(root / p) + "\n" for p in good[:12])
    proc = subprocess.run(_cmd(bundle, "--reference", str(tmp_path / "ref.json"), "--window", "5",
                               "--metrics-file", str(metrics)),
                          input=lines, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r["drift"]["window"] for r in out] == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5]
    assert set(out[-1]["drift"]["scores"]) == set(ex.term_names)
    assert "cltvit_drift_images_total 12" in metrics.read_text()


def test_argument_errors(bundle, tmp_path):
    proc = subprocess.run(_cmd(tmp_path), input="", capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "argument --bundle" in proc.stderr
    proc = subprocess.run(_cmd(bundle, "--reference", str(tmp_path / "none.json")), input="", capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "argument --reference" in proc.stderr
    proc = subprocess.run(_cmd(bundle, "--top-k", "0"), input="", capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "--top-k" in proc.stderr
