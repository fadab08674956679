"""The project's import graph, from the source (AST, nothing is imported).

    python scripts/import_graph.py            # mermaid diagram of the package-level graph (docs/architecture.md)
    python scripts/import_graph.py --modules  # every module -> the project modules it imports

`tests/test_layers.py` checks the same graph against the layering rules.
"""
from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bundle", "training", "export", "serving", "pipeline")


@dataclass(frozen=True)
class Import:
    """One import statement's target (absolute dotted name), where it is, and whether it sits inside a function."""

    module: str
    target: str
    line: int
    in_function: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute name of `from <level dots><name> import ...` inside `module`."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([name] if name else [])])


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import in one file; `from X import a` counts as importing X.a when X.a is a project module."""
    mod = module_name(path, root)
    tree = ast.parse(path.read_text(), str(path))
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(mod, a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", child.level, child.module) if child.level else child.module or ""
                if target == "__future__":
                    continue
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    is_mod = (root / Path(*sub.split("."))).with_suffix(".py").is_file() or (root / Path(*sub.split("."))).is_dir()
                    out.append(Import(mod, sub if is_mod else target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def project_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{package: packages it imports} over the project's top-level packages (self-edges dropped)."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for f in project_files(root):
        for imp in imports_of(f, root):
            src, dst = imp.module.split(".")[0], imp.target.split(".")[0]
            if dst in PACKAGES and dst != src:
                graph[src].add(dst)
    return graph


def mermaid(graph: dict[str, set[str]]) -> str:
    lines = ["flowchart LR"]
    for src in PACKAGES:
        for dst in sorted(graph[src], key=PACKAGES.index):
            lines.append(f"    {src} --> {dst}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", action="store_true", help="list module-level edges instead of the package diagram")
    args = ap.parse_args()
    if args.modules:
        for f in project_files():
            targets = sorted({i.target for i in imports_of(f) if i.target.split(".")[0] in PACKAGES})
            print(f"{module_name(f)} -> {', '.join(targets) or '-'}")
    else:
        print(mermaid(package_graph()))


if __name__ == "__main__":
    main()
