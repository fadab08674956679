"""CLT vs per-layer transcoder (PLT) at equal k: train both with the same trainer, measure, compare."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .metrics import measure_transcoder
from .plots import plot_comparison


def compare_clt_plt(
    backbone: Any,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    out_dir: str | Path,
    train_one: Callable[[bool, int, Path], nn.Module],
    ks: Sequence[int] = (4, 8, 16, 32),
    fidelity_images: int = 1000,
    batch_size: int = 250,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (via `train_one(cross_layer, k, run_dir) -> transcoder`) and measure a CLT and a PLT
    (decoder restricted to its diagonal) at each k; writes comparison.json and r2_vs_l0.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in ks:
        for cross in (True, False):
            name = f"{'clt' if cross else 'plt'}-k{k}"
            log(f"comparison: {name}")
            tc = train_one(cross, k, out / name)
            m = measure_transcoder(backbone, tc.eval(), pixels, labels, text, fidelity_images, batch_size)
            rows.append({"kind": "clt" if cross else "plt", "k": k, "n_features": tc.cfg.n_features, **m})
    result = {"rows": rows, "ks": list(ks), "images": len(pixels)}
    result["verdict"] = comparison_verdict(rows)
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    plot_comparison(rows, out / "r2_vs_l0.png")
    return result


def comparison_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per k: does the CLT beat the PLT on R^2 and on all-token replacement accuracy?"""
    by = {(r["kind"], r["k"]): r for r in rows}
    per_k = {}
    for k in sorted({r["k"] for r in rows}):
        if ("clt", k) in by and ("plt", k) in by:
            c, p = by[("clt", k)], by[("plt", k)]
            per_k[str(k)] = {"r2": c["r2"] > p["r2"], "accuracy_all": c["accuracy_all"] > p["accuracy_all"],
                             "r2_gap": c["r2"] - p["r2"], "accuracy_all_gap": c["accuracy_all"] - p["accuracy_all"]}
    return {"per_k": per_k,
            "clt_better_r2_everywhere": all(v["r2"] for v in per_k.values()) if per_k else None,
            "clt_better_accuracy_everywhere": all(v["accuracy_all"] for v in per_k.values()) if per_k else None}


def render_comparison(cmp: dict[str, Any]) -> str:
    lines = ["## 5. CLT vs per-layer transcoder (PLT) at equal k (curve: `r2_vs_l0.png`)", "",
             "| kind | k | L0 | R^2 | cosine | R^2 CLS | R^2 patches | top-1 CLS-replaced | top-1 all-replaced |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        lines.append(f"| {r['kind']} | {r['k']} | {r['l0']:.2f} | {r['r2']:.4f} | {r['cosine']:.4f} | {r['r2_cls']:.4f} | "
                     f"{r['r2_patches']:.4f} | {100 * r['accuracy_cls']:.2f} | {100 * r['accuracy_all']:.2f} |")
    v = cmp["verdict"]
    lines += ["", f"CLT better on R^2 at every k: **{v['clt_better_r2_everywhere']}**; on all-token replacement "
              f"accuracy at every k: **{v['clt_better_accuracy_everywhere']}**."]
    return "\n".join(lines)
