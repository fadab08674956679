"""The paper's evaluation suite as one report: `evaluate_clt(backbone, clt, dataset, out_dir)` (`cltvit-eval`).

The measurements are in `metrics` (sections 1-4) and `comparison` (5), the figures in `plots`.
Sections of the report (report.json / report.md in the output directory, plus PNGs):

1. `fidelity`: per layer and mean, separately for CLS tokens, patch tokens, and all tokens, of the
   CLT reading the true MLP inputs ("open loop"): R^2 = 1 - sum||y - yhat||^2 / sum||y - mean y||^2,
   mean cosine(y, yhat) per token, MSE per element, L0 (active features per token), and the
   fraction of features that never fire on those tokens of the evaluated images ("dead").
2. `replacement`: zero-shot top-1 of the unmodified model, and with the CLT replacing the MLPs of
   layers s..L-1 for every start s (cascaded: every source layer's features are read from this
   spliced run, sources < s included) at token sets cls / patches / all; plus the agreement with the
   unmodified model's predictions.
3. `c_proj`: `C_proj[i -> j] = E_x[(1/T) sum_t <c_t(i->j), yhat_t(j)> / ||yhat_t(j)||^2]`, source i's
   raw write to target j projected on the full reconstruction of target j, computed with the CLT
   observing the unmodified model; one more source row `bias` (target j's decoder bias) makes each
   column sum to 1. Matrices [L+1, L] for CLS and patch tokens; JSON + heatmap PNG.
4. `faithfulness` (paper's Table 4): `decompose(mode="cls")` splits each image's logits into terms;
   the "layer" unit is either `clt` (layer l = the term `clt.l`: CLT source layer l's total write,
   summed over its targets) or `block` (layer l = `attn.l` + `clt.l`). Layers are ranked per image by
   their contribution to the predicted class's logit. Dropping a layer subtracts its term(s) from all
   logits (a direct-effect ablation at ln_post's frozen scale; the network is not re-run). Reported:
   accuracy of the CLS-spliced model, after dropping the top-1 layer, after dropping one random layer
   (mean over seeds), after keeping only the top-k layers (k = 0..L; the other terms stay), and the
   deletion curve (accuracy after deleting the k highest-ranked vs k random layers).
5. Optional `comparison` (CLT vs per-layer transcoder at k = 4, 8, 16, 32): see `compare_clt_plt`.
6. Optional `spatial` (`EvalConfig.spatial_images` > 0): where in the image, the spatial maps'
   deletion test against random patches and Integrated Gradients and the time per explanation
   (`evaluation.spatial`; needs captum, the `eval` extra).
7. `ablation` (`EvalConfig.ablation_images`, default the first 2000 images): section 4 through real
   ablations, the edits /intervene serves (the network rerun): the predicted logit's mean drop when
   the top-1 unit (`clt` term, `block` = attn + clt term, one CLT `feature`) is removed against a
   random unit, with 95% bootstrap intervals over images (`evaluation.ablation`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bundle.provenance import machine_info

from .ablation import ablation_faithfulness, render_ablation
from .comparison import render_comparison
from .metrics import (
    FAITHFULNESS_UNITS,
    GROUPS,
    EvaluationError,
    c_proj,
    clt_replacement,
    dataset_tensors,
    faithfulness,
    fidelity,
    layer_contributions,
    replacement_accuracy,
)
from .plots import plot_cproj, plot_deletion, plot_fidelity, plot_replacement, plot_spatial_deletion
from .spatial import SpatialEvalConfig, evaluate_spatial, render_markdown as render_spatial


@dataclass
class EvalConfig:
    """What to evaluate on. `limit`: images of the dataset used (None: all); the fidelity and C_proj
    sections use the first `fidelity_images` / `cproj_images` of those; `random_seeds` seeds of the
    random-layer baselines."""

    limit: int | None = None
    batch_size: int = 250
    fidelity_images: int | None = 2000
    cproj_images: int | None = 1000
    random_seeds: int = 10
    top_k_features: int = 16
    seed: int = 0
    spatial_images: int = 0
    ablation_images: int | None = 2000  # section 7: real ablations on the first N images (None: all; 0: skip)
    ablation_resamples: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    """report.json -> report.md (tables of every section)."""
    lines = ["# CLT evaluation report", ""]
    b, c = report.get("backbone", {}), report.get("clt", {})
    lines += [
        f"- backbone: `{b.get('model')}` (pretrained={b.get('pretrained')}, weights {b.get('weights_sha256_16')}, "
        f"L={b.get('n_layers')}, d={b.get('d_model')}, tokens={b.get('n_tokens')})",
        f"- CLT: {c.get('config')}",
        f"- data: {report.get('data')}",
        f"- seconds: {report.get('seconds', 0):.1f}",
    ]
    mach = report.get("machine")
    if mach:  # figures differ between CPUs (AVX2 vs AVX-512 kernels), so say where these were made
        lines.append(f"- machine: {mach['cpu']} ({', '.join(mach['isa']) or 'no listed ISA extensions'}), {mach['cores']} cores, "
                     f"{mach.get('threads')} torch thread(s); " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()))
    lines.append("")
    fid = report["fidelity"]
    L = len(fid["cls"]["r2"])
    lines += ["## 1. Fidelity (open loop: CLT reads the true MLP inputs)", ""]
    for g in GROUPS:
        m = fid[g]["mean"]
        lines.append(f"- **{g}** ({fid[g]['tokens']} tokens): mean R^2 {m['r2']:.4f}, cosine {m['cosine']:.4f}, "
                     f"MSE {m['mse']:.3g}, L0 {m['l0']:.2f}, dead {m['dead_fraction']:.3f}")
    lines += ["", "| layer | " + " | ".join(f"{g} R^2 | {g} cos | {g} MSE | {g} L0 | {g} dead" for g in ("cls", "patches")) + " |",
              "|---" * 11 + "|"]
    for l in range(L):
        cells = []
        for g in ("cls", "patches"):
            f = fid[g]
            cells += [f"{f['r2'][l]:.4f}", f"{f['cosine'][l]:.4f}", f"{f['mse'][l]:.3g}", f"{f['l0'][l]:.2f}", f"{f['dead_fraction'][l]:.3f}"]
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    rep = report["replacement"]
    lines += ["", "## 2. Cascaded replacement (zero-shot top-1 %, MLPs of layers s..L-1 replaced)", "",
              f"Unmodified model: **{_pct(rep['baseline'])}** on {rep['images']} images.", "",
              "| s | " + " | ".join(t for t in ("cls", "patches", "all") if t in rep) + " |", "|---" * 4 + "|"]
    for s in range(L):
        lines.append(f"| {s} | " + " | ".join(_pct(rep[t][s]) for t in ("cls", "patches", "all") if t in rep) + " |")
    cp = report["c_proj"]
    lines += ["", "## 3. C_proj (rows: source layer i, last row the decoder bias; columns: target j)", "",
              f"Share from earlier layers (mean over targets): CLS {cp['cross_layer_share']['cls']:.3f}, "
              f"patches {cp['cross_layer_share']['patches']:.3f}. Heatmap: `c_proj.png`.", ""]
    for g in ("cls", "patches"):
        lines += [f"**{g}**", "", "| i \\ j | " + " | ".join(str(j) for j in range(L)) + " |", "|---" * (L + 1) + "|"]
        for i, row in enumerate(cp[g]):
            lines.append(f"| {cp['sources'][i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    lines += ["## 4. Faithfulness (CLS-spliced model, logit-space ablation; curve: `deletion.png`)", "",
              "| unit | acc | drop top-1 | drop random (mean ± sd) | cost ratio | keep top-1 | keep top-2 | keep top-3 |",
              "|---|---|---|---|---|---|---|---|"]
    for unit, f in report["faithfulness"].items():
        k = f["keep_top_k"]
        lines.append(f"| {unit} | {_pct(f['accuracy'])} | {_pct(f['drop_top1'])} | {_pct(f['drop_random_mean'])} ± "
                     f"{_pct(f['drop_random_std'])} | {f['cost_ratio']:.2f} | {_pct(k[min(1, len(k) - 1)])} | "
                     f"{_pct(k[min(2, len(k) - 1)])} | {_pct(k[min(3, len(k) - 1)])} |")
    for unit, f in report["faithfulness"].items():
        lines.append(f"\n- unit `{unit}`: layer = {', '.join('+'.join(g) for g in f['unit_terms'][:2])}, ...; "
                     f"top-1 layer histogram {f['top1_layer_histogram']}")
    ft = report.get("finetune")
    if ft:
        b, a = ft["before"], ft["after"]
        lines += ["", f"## Fine-tuning through the replacement ({ft['config']['loss']}, {ft['config']['steps']} steps)", "",
                  f"On {ft['check_images']} test images: R^2 {b['r2']:.4f} -> {a['r2']:.4f}; top-1 with all layers replaced at "
                  f"CLS {_pct(b['accuracy_cls'])} -> {_pct(a['accuracy_cls'])}, at all tokens {_pct(b['accuracy_all'])} -> "
                  f"{_pct(a['accuracy_all'])} (unmodified {_pct(b['accuracy_unmodified'])})."]
    if "comparison" in report:
        lines += ["", render_comparison(report["comparison"])]
    if "spatial" in report:
        lines += ["", render_spatial(report["spatial"], title="6. Where in the image: faithfulness and cost (`spatial_deletion.png`)")]
    if "ablation" in report:
        lines += ["", render_ablation(report["ablation"], title="7. Faithfulness through real ablations (the model rerun)")]
    return "\n".join(lines) + "\n"


def evaluate_clt(
    backbone: Any,
    clt: nn.Module,
    dataset: Any,
    out_dir: str | Path,
    cfg: EvalConfig | None = None,
    *,
    pixels_labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run sections 1-4 and write report.json, report.md, fidelity.png, replacement.png, c_proj.png,
    c_proj.json, deletion.png into `out_dir`. Returns the report dict."""
    cfg = cfg or EvalConfig()
    if clt.cfg.n_layers != backbone.n_layers or clt.cfg.d_model != backbone.d_model:
        raise EvaluationError(
            f"CLT has L={clt.cfg.n_layers}, d={clt.cfg.d_model} but the backbone {backbone.spec.model} "
            f"has L={backbone.n_layers}, d={backbone.d_model}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    clt = clt.eval()
    pixels, labels = pixels_labels if pixels_labels is not None else dataset_tensors(backbone, dataset, cfg.limit)
    text = backbone.class_embeddings(dataset.class_names, dataset.templates)
    visual, L = backbone.visual, backbone.n_layers
    nf = len(pixels) if cfg.fidelity_images is None else min(cfg.fidelity_images, len(pixels))
    ncp = len(pixels) if cfg.cproj_images is None else min(cfg.cproj_images, len(pixels))
    log(f"eval: fidelity on {nf} images")
    fid = fidelity(visual, clt, pixels[:nf], cfg.batch_size)
    log(f"eval: replacement on {len(pixels)} images")
    rep = replacement_accuracy(visual, pixels, labels, text, L, clt_replacement(clt), cfg.batch_size)
    log(f"eval: C_proj on {ncp} images")
    cp = c_proj(visual, clt, pixels[:ncp], cfg.batch_size)
    log("eval: faithfulness")
    logits, contribs = layer_contributions(visual, clt, pixels, text, backbone.logit_scale, cfg.batch_size)
    fa = {u: faithfulness(logits, contribs, labels, u, cfg.random_seeds, cfg.seed) for u in FAITHFULNESS_UNITS}
    ablation = None
    na = len(pixels) if cfg.ablation_images is None else min(cfg.ablation_images, len(pixels))
    if na > 0:
        log(f"eval: real ablations on {na} images")
        ablation = ablation_faithfulness(visual, clt, pixels[:na], text, backbone.logit_scale, "cls", cfg.batch_size, cfg.seed,
                                         cfg.ablation_resamples)
    spatial = None
    if cfg.spatial_images > 0:
        log(f"eval: spatial maps on {min(cfg.spatial_images, len(pixels))} images")
        scfg = SpatialEvalConfig(images=cfg.spatial_images, batch_size=cfg.batch_size, seed=cfg.seed)
        spatial = evaluate_spatial(backbone, clt, pixels, labels, text, scfg, log=log)
    report: dict[str, Any] = {
        "backbone": backbone.identity(),
        "clt": {"config": clt.cfg.to_dict()},
        "data": {**(dataset.description() if hasattr(dataset, "description") else {}), "images": len(pixels)},
        "eval_config": cfg.to_dict(),
        "fidelity": fid,
        "replacement": rep,
        "c_proj": cp,
        "faithfulness": fa,
        **({"spatial": spatial} if spatial is not None else {}),
        **({"ablation": ablation} if ablation is not None else {}),
        "machine": machine_info(torch.get_num_threads()),
        **(extra or {}),
    }
    report["summary"] = summarise(report)
    report["seconds"] = time.time() - t0
    (out / "c_proj.json").write_text(json.dumps(cp, indent=1))
    plot_cproj(cp, out / "c_proj.png")
    plot_deletion(fa, out / "deletion.png")
    plot_replacement(rep, out / "replacement.png")
    plot_fidelity(fid, out / "fidelity.png")
    if spatial is not None:
        plot_spatial_deletion(spatial, out / "spatial_deletion.png")
    write_report(out, report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(render_markdown(report))


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers the issue's targets refer to (accuracies as fractions)."""
    fid, rep, fa = report["fidelity"], report["replacement"], report["faithfulness"]["clt"]
    return {
        "r2_mean": fid["all"]["mean"]["r2"],
        "cosine_mean": fid["all"]["mean"]["cosine"],
        "l0_mean": fid["all"]["mean"]["l0"],
        "r2_cls": fid["cls"]["mean"]["r2"],
        "r2_patches": fid["patches"]["mean"]["r2"],
        "dead_fraction": fid["all"]["mean"]["dead_fraction"],
        "dead_fraction_cls": fid["cls"]["mean"]["dead_fraction"],
        "accuracy_unmodified": rep["baseline"],
        "accuracy_cls_all_layers": rep["cls"][0],
        "accuracy_patches_all_layers": rep["patches"][0],
        "accuracy_all_tokens_all_layers": rep["all"][0],
        "drop_cls": rep["baseline"] - rep["cls"][0],
        "drop_all_tokens": rep["baseline"] - rep["all"][0],
        "faithfulness_cost_ratio": fa["cost_ratio"],
        "faithfulness_cost_ratio_block": report["faithfulness"]["block"]["cost_ratio"],
    }
