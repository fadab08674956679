"""The evaluation report's figures (matplotlib, Agg backend: files only, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def plot_cproj(cp: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, g in zip(axes, ("cls", "patches")):
        m = np.array(cp[g])
        im = ax.imshow(m, cmap="RdBu_r", vmin=-max(1e-6, np.abs(m).max()), vmax=max(1e-6, np.abs(m).max()))
        ax.set_title(f"C_proj ({g} tokens)")
        ax.set_xlabel("target layer j")
        ax.set_ylabel("source layer i")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]), [str(i) for i in range(m.shape[0] - 1)] + ["bias"])
        for (i, j), v in np.ndenumerate(m):
            if abs(v) >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_deletion(fa: dict[str, dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(fa), figsize=(5 * len(fa), 4))
    axes = np.atleast_1d(axes)
    for ax, (unit, f) in zip(axes, fa.items()):
        ks = range(len(f["deletion_attributed"]))
        ax.plot(ks, np.array(f["deletion_attributed"]) * 100, "o-", label="by attribution")
        ax.plot(ks, np.array(f["deletion_random"]) * 100, "s--", label=f"random (mean of {f['seeds']})")
        ax.set_xlabel(f"layers deleted (unit: {unit})")
        ax.set_ylabel("zero-shot top-1 (%)")
        ax.set_title(f"Deletion curve ({unit})")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_replacement(rep: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for t in ("cls", "patches", "all"):
        if t in rep:
            ax.plot(range(len(rep[t])), np.array(rep[t]) * 100, "o-", label=f"CLT replaces {t}")
    ax.axhline(rep["baseline"] * 100, color="k", ls=":", label="unmodified")
    ax.set_xlabel("first replaced layer s (layers s..L-1 replaced)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fidelity(fid: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for g in ("cls", "patches"):
        L = len(fid[g]["r2"])
        axes[0].plot(range(L), fid[g]["r2"], "o-", label=g)
        axes[1].plot(range(L), fid[g]["cosine"], "o-", label=g)
    for ax, name in zip(axes, ("R^2", "cosine")):
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("clt", "o-"), ("plt", "s--")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["l0"])
        if not rs:
            continue
        axes[0].plot([r["l0"] for r in rs], [r["r2"] for r in rs], marker, label=kind.upper())
        axes[1].plot([r["l0"] for r in rs], [100 * r["accuracy_all"] for r in rs], marker, label=kind.upper())
    if rows:
        axes[1].axhline(100 * rows[0]["accuracy_unmodified"], color="k", ls=":", label="unmodified")
    axes[0].set_ylabel("mean R^2 (all tokens)")
    axes[1].set_ylabel("top-1 %, all layers replaced at all tokens")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean L0 (active features per token per layer)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spatial_deletion(section: dict[str, Any], path: Path) -> None:
    """The deletion curves (normalised logit and accuracy) of every method as a PNG."""
    dl = section["deletion"]
    f = np.array(dl["fractions"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = ("o-", "s--", "^-", "v:", "d-.", "x-", "+--", "*:")
    for j, m in enumerate(section["deletion"]["methods"]):
        style = styles[j % len(styles)]
        c = dl["methods"][m]
        lg = np.array(c["logit"])
        axes[0].plot(f * 100, (lg - lg[-1]) / (lg[0] - lg[-1]), style, label=f"{m} (AUC {c['auc_logit']:.3f})")
        axes[1].plot(f * 100, np.array(c["accuracy"]) * 100, style, label=f"{m} (AUC {c['auc_accuracy']:.3f})")
    axes[0].set_ylabel("logit of the predicted class (normalised)")
    axes[1].set_ylabel("accuracy (%)")
    for ax in axes:
        ax.set_xlabel("patches deleted (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
