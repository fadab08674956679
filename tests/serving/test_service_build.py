"""`bentoml build` succeeds with the project's bentofile.yaml and makes a small, code-only Bento."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_bentoml_build(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("CLTVIT_BUNDLE", None)  # building must not need a bundle
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    bentos = [p for p in (tmp_path / "bentoml" / "bentos" / "cltvit").iterdir() if p.name != "latest"]
    assert len(bentos) == 1
    bento = bentos[0]
    files = [p.relative_to(bento).as_posix() for p in bento.rglob("*") if p.is_file()]
    assert "src/serving/service.py" in files and "src/serving/runtime.py" in files
    assert not [f for f in files if f.startswith(("src/artifacts", "src/.venv", "src/tests", "src/training", "src/export"))]
    size = sum((bento / f).stat().st_size for f in files)
    assert size < 2_000_000, f"bento is {size} bytes"
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    routes = {r["route"] for r in meta["schema"]["routes"]}
    assert {"/classify", "/explain", "/embed", "/info"} <= routes
    assert "/infer_batch" not in routes  # batching is in process: no internal API in the Bento
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch" not in requirements and "onnxruntime" in requirements
