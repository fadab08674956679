"""The layering of the packages, checked on the source: data flows one way.

    pipeline -> export -> training -> bundle        serving -> bundle

`bundle` is the torch-free contract, `training.model` the core that export compiles, `serving` runs
on ONNX Runtime only, and nothing imports `pipeline`. Imports sit at module level, except a short
list of optional or order-sensitive ones, and there is no import cycle between project modules.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = graph
_spec.loader.exec_module(graph)

ALLOWED = {  # package -> project packages it may import
    "bundle": {"bundle"},
    "training": {"bundle", "training"},
    "export": {"bundle", "training", "export"},
    "serving": {"bundle", "serving"},
    "pipeline": {"bundle", "training", "export", "pipeline"},
}
TORCH_FREE = ("bundle", "serving")
TORCH = {"torch", "torchvision", "open_clip", "safetensors"}
# imports allowed inside functions: optional extras, and prometheus_client, which must not load
# before a BentoML worker has set up its multiprocess metrics
LATE_OK = {"ray", "ray.data", "pyarrow", "pyarrow.parquet", "prometheus_client", "prometheus_client.core", "serving.explainer",
           "captum.attr"}

IMPORTS = [imp for f in graph.project_files() for imp in graph.imports_of(f)]


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_scan_sees_the_project():
    modules = {i.module for i in IMPORTS}
    assert {"bundle.validate", "training.model.decompose", "export.fused", "serving.runtime", "pipeline.reference"} <= modules
    assert any(i.module == "export.fused" and i.target == "training.model.decompose" for i in IMPORTS)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_from_a_later_stage(package):
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS
           if _top(i.module) == package and _top(i.target) in ALLOWED and _top(i.target) not in ALLOWED[package]]
    assert not bad, bad


def test_model_core_imports_no_trainer_data_or_evaluation():
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS
           if i.module.startswith("training.model") and _top(i.target) == "training" and not i.target.startswith("training.model")]
    assert not bad, bad


@pytest.mark.parametrize("package", TORCH_FREE)
def test_torch_free_packages(package):
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS if _top(i.module) == package and _top(i.target) in TORCH]
    assert not bad, bad


def test_imports_at_module_level():
    bad = [f"{i.module}:{i.line} imports {i.target} inside a function" for i in IMPORTS if i.in_function and i.target not in LATE_OK]
    assert not bad, bad


def test_no_import_cycle():
    edges: dict[str, set[str]] = {}
    modules = {i.module for i in IMPORTS}
    for i in IMPORTS:
        if i.target in modules and i.target != i.module and not i.in_function:
            edges.setdefault(i.module, set()).add(i.target)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, path: list[str]) -> bool:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycle.extend([*path[path.index(n):], n] if n in path else [m, n])
                return True
            if state.get(n) is None and visit(n, [*path, n]):
                return True
        state[m] = 2
        return False

    for m in sorted(modules):
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def test_a_planted_violation_is_caught(tmp_path):
    """The scanner itself: a serving module importing torch and training inside a function is seen as such."""
    pkg = tmp_path / "serving"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("import numpy\n\ndef f():\n    import torch\n    from training.model import vit\n")
    (tmp_path / "training" / "model").mkdir(parents=True)
    (tmp_path / "training" / "model" / "vit.py").write_text("")
    found = graph.imports_of(pkg / "bad.py", tmp_path)
    assert [(i.target, i.in_function) for i in found] == [("numpy", False), ("torch", True), ("training.model.vit", True)]


FRESH_IMPORT = r"""
import importlib, json, pkgutil, sys
import numpy as np
from PIL import Image
import bundle, serving
skipped = {"serving.jobs.ray_engine"}  # the optional ray extra
names = [m.name for pkg in (bundle, serving) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
         if m.name not in skipped]
for name in names:
    importlib.import_module(name)
from serving.explainer import Explainer
(result,) = Explainer(sys.argv[1], device="cpu", threads=1).explain([Image.new("RGB", (40, 30), (200, 10, 10))])
print(json.dumps({"imported": names, "modules": sorted(sys.modules), "predicted": result.predicted}))
"""


def test_serving_never_imports_torch_in_a_fresh_interpreter(bundle):
    """The static scan above reads `import` statements; this runs them: a fresh interpreter imports every
    module of bundle/ and serving/ (the optional ray extra aside), explains an image, and then holds no
    torch, open_clip or safetensors module and nothing from training/, export/ or pipeline/."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", FRESH_IMPORT, str(bundle)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"serving.service", "serving.engine", "serving.runtime", "serving.jobs.score", "bundle.manifest"} <= set(report["imported"])
    loaded = report["modules"]
    bad = [m for m in loaded if _top(m) in TORCH | {"training", "export", "pipeline"}]
    assert not bad, bad
    assert report["predicted"]
