#!/usr/bin/env python
"""What a finer reference model would cost: the reference CLIP with patch 4 instead of 7 on 28x28
images (a 7x7 grid, 50 tokens instead of 17), trained with the reference build's own settings.

1. CPU seconds per CLIP training step, 4x4 vs 7x7, same process (3 x 20 steps each, median).
2. The CLIP stage at 7x7 (2000 steps, batch 128) and its zero-shot top-1 on the 10,000 test images.
3. The CLT stage's training at 7x7 (the build's config, no fine-tuning) and what `cltvit-reference`
   measures: R^2 / cosine / L0 / dead fraction on 1000 test images, top-1 with the MLPs replaced at
   the CLS token and at all tokens on all 10,000.
Writes everything to --out/grid7.json (the CLIP weights to clip7.pt); docs/spatial.md has the figures.
About 20 CPU-minutes on one thread.

  python scripts/grid7_reference.py [--out artifacts/grid7]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.provenance import machine_info  # noqa: E402
from pipeline.reference import BuildConfig, TensorImages, _train_cfg, load_fashion_tensors  # noqa: E402
from training.clip import ClipTrainConfig, train_reference_clip, zero_shot_accuracy  # noqa: E402
from training.data import FashionMNIST  # noqa: E402
from training.evaluation.metrics import measure_transcoder  # noqa: E402
from training.model.backbone import PROJECT_CONFIG_DIR, load_backbone  # noqa: E402
from training.model.clt import CLTConfig  # noqa: E402
from training.trainer import train_clt  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts/grid7")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg_dir = Path(tempfile.mkdtemp())
    ref7 = json.loads((PROJECT_CONFIG_DIR / "cltvit-ref.json").read_text())
    ref7["vision_cfg"]["patch_size"] = 4
    (cfg_dir / "cltvit-ref7.json").write_text(json.dumps(ref7))
    open_clip.add_model_config(cfg_dir)
    rec: dict = {"machine": machine_info(threads=1), "config": ref7}
    train = FashionMNIST("train")

    def step_cpu(model: str, n: int, seed: int) -> float:
        bb = load_backbone(model, None, device="cpu", seed=seed)
        c0 = time.process_time()
        train_reference_clip(bb, train.images, train.labels, train.class_names, train.templates,
                             ClipTrainConfig(steps=n, warmup_steps=2), log=lambda s: None)
        return (time.process_time() - c0) / n

    per: dict[str, list[float]] = {"cltvit-ref": [], "cltvit-ref7": []}
    for r in range(3):
        for m in per:
            per[m].append(step_cpu(m, 20, r))
    rec["clip_step_cpu_s"] = {m: float(np.median(v)) for m, v in per.items()}
    rec["clip_step_ratio"] = rec["clip_step_cpu_s"]["cltvit-ref7"] / rec["clip_step_cpu_s"]["cltvit-ref"]
    log(f"CLIP step CPU s: {rec['clip_step_cpu_s']} ratio {rec['clip_step_ratio']:.2f}")

    bc = BuildConfig()
    bb = load_backbone("cltvit-ref7", None, device="cpu", seed=bc.clip.seed)
    t0, c0 = time.time(), time.process_time()
    stats = train_reference_clip(bb, train.images, train.labels, train.class_names, train.templates, bc.clip, log=log)
    rec["clip_stage"] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "stats": stats}
    test, px, y = load_fashion_tensors(bb, "test", None)
    rec["zero_shot_top1"] = zero_shot_accuracy(bb, px, y, test.class_names, test.templates)
    log(f"7x7 CLIP: zero-shot top-1 {rec['zero_shot_top1']:.4f}")
    torch.save(bb.model.state_dict(), out / "clip7.pt")

    tr, tpx, ty = load_fashion_tensors(bb, "train", None, bc.clt_train_limit)
    ds = TensorImages(tpx, ty, tr.description())
    clt_cfg = CLTConfig(n_layers=bb.n_layers, d_model=bb.d_model, n_features=bc.n_features, activation=bc.activation, k=bc.k)  # type: ignore[arg-type]
    t0, c0 = time.time(), time.process_time()
    clt, metrics = train_clt(bb, ds, clt_cfg, _train_cfg(bc.clt_train, bc.seed), out / "clt", progress=False)
    rec["clt_stage"] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
                        "fvu_mean": metrics.get("fvu_mean"), "l0_mean": metrics.get("l0_mean")}
    text = bb.class_embeddings(test.class_names, test.templates)
    c0 = time.process_time()
    rec["measured"] = measure_transcoder(bb, clt, px, y, text, 1000)
    rec["measure_cpu_s"] = time.process_time() - c0
    log(f"7x7 CLT: {rec['clt_stage']}; measured {rec['measured']}")
    (out / "grid7.json").write_text(json.dumps(rec, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
