"""How often an atlas's text labels name the class its features' top images show (docs/atlas.md).

    python scripts/atlas_labels.py --bundle artifacts/reference/bundle [--json out.json]

For every feature whose top images are mostly one class (at least --purity of its top images, and at least
--min-images of them), the best class-name match of its direct effect (argmax over the bundle's class
embeddings t_c of <direction, t_c>: the class name the text label would pick from the label set) is
compared with that class. Reported overall, per layer, and by direct-effect strength, next to chance
(1 / number of classes) and a permutation baseline (the same best matches against the majority classes
of randomly permuted features: chance given how unevenly both are spread over the classes). Also: the
label sources, the atlas build time and size. Numpy only; reads the bundle's atlas.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle import load_bundle  # noqa: E402
from bundle.atlas import LABEL_SOURCES  # noqa: E402
from serving.atlas import Atlas  # noqa: E402

STRENGTHS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def measure(bundle: str | Path, purity: float = 0.75, min_images: int = 8, seed: int = 0) -> dict[str, Any]:
    m, paths = load_bundle(bundle, verify_checksums=False, check_graphs=False)
    if not paths.atlas:
        raise SystemExit(f"{bundle} has no atlas (cltvit-atlas adds one)")
    atlas = Atlas(paths.atlas)
    a = atlas.arrays
    text = np.load(paths.labels, allow_pickle=False).astype(np.float64)  # [C, D]
    names = list(m.labels.names)
    if atlas.class_names != names:
        raise SystemExit("the atlas dataset's classes are not the bundle's labels: nothing to compare")
    best = (a["direction"].astype(np.float64) @ text.T).argmax(-1)  # [L, F]
    live = a["fire_count"] > 0
    n_top = (a["top_image"] >= 0).sum(-1)
    mostly = live & (n_top >= min_images) & (a["class_fraction"] >= purity)
    agree = best == a["class_index"]
    rng = np.random.default_rng(seed)
    perm = float(np.mean([(best[mostly] == rng.permutation(a["class_index"][mostly])).mean() for _ in range(1000)]))
    out: dict[str, Any] = {
        "bundle": str(Path(bundle)), "images": atlas.index.images, "classes": len(names), "purity": purity, "min_images": min_images,
        "live": int(live.sum()), "features": int(live.size), "mostly_one_class": int(mostly.sum()),
        "agreement": float(agree[mostly].mean()), "chance": 1 / len(names), "permutation_baseline": perm,
        "per_layer": [{"layer": l, "n": int(mostly[l].sum()), "agreement": float(agree[l][mostly[l]].mean()) if mostly[l].any() else None,
                       "median_strength": float(np.median(a["strength"][l][live[l]])) if live[l].any() else None}
                      for l in range(atlas.n_layers)],
        "by_strength": [{"at_least": s, "n": int((mostly & (a["strength"] >= s)).sum()),
                         "agreement": float(agree[mostly & (a["strength"] >= s)].mean()) if (mostly & (a["strength"] >= s)).any() else None,
                         "live_features": int((live & (a["strength"] >= s)).sum())} for s in STRENGTHS],
        "label_sources": {s: int(((a["label_source"] == i) & live).sum()) for i, s in enumerate(LABEL_SOURCES)},
        "low_confidence": int((a["low_confidence"] & live).sum()),
        "top_word_is_a_class_name": int(((a["text_index"][..., 0] < len(names)) & (a["text_index"][..., 0] >= 0) & live).sum()),
        "thresholds": atlas.index.thresholds.model_dump(),
        "vocab": {"source": atlas.index.vocab.source, "size": len(atlas.index.vocab.words)},
        "build": {k: atlas.index.build.get(k) for k in ("command", "stream_seconds", "label_seconds", "machine", "created")},
        "bytes": {name: p.stat().st_size for name, p in paths.atlas.items()},
    }
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Features whose top images are >= {100 * r['purity']:.0f}% one class (of >= {r['min_images']} top images): "
             f"{r['mostly_one_class']} of {r['live']} active features ({r['features']} in all).", "",
             "| features | n | best class-name match = their class | chance | permutation baseline |", "|---|---|---|---|---|",
             f"| all | {r['mostly_one_class']} | {100 * r['agreement']:.1f}% | {100 * r['chance']:.1f}% | {100 * r['permutation_baseline']:.1f}% |"]
    share = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines += [f"| layer {x['layer']} | {x['n']} | {share(x['agreement'])} | | |" for x in r["per_layer"]]
    lines += [f"| strength >= {x['at_least']} logits | {x['n']} | {share(x['agreement'])} | | |" for x in r["by_strength"] if x["at_least"] > 0]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--purity", type=float, default=0.75)
    ap.add_argument("--min-images", type=int, default=8)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    r = measure(args.bundle, args.purity, args.min_images)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    print(markdown(r))
    print(json.dumps({k: v for k, v in r.items() if k not in ("per_layer", "by_strength")}, indent=1))


if __name__ == "__main__":
    main()
