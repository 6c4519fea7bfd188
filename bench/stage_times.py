"""Stage times against input size and model size, for the README's sizing table.

Runs the pipeline's own stages (in-process, one configuration at a time) on scikit-learn's digits
resized to each input shape (so models learn and attacks have correctly classified samples to
work on), three training epochs and capped sample counts, and reports the cost per unit of work
so a user can scale it to their run: seconds per 1000 training images per epoch
(standard and PGD-AT), and seconds per 100 test images for attack (default attacks), certify
(IBP + CROWN) and smoothing (n = 1000 noise samples). Writes bench/results/stage_times.md.

    python bench/stage_times.py            # 8x8, 28x28 x mlp, cnn_small, cnn_medium
    python bench/stage_times.py --quick    # 8x8 and 28x28 with cnn_small only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
TEST_N, SMOOTH_N, EPOCHS = 100, 20, 3


def digits_at(side: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits, bilinearly resized to side x side, in [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    if side != 8:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).numpy(), bunch.target.astype(np.int64)


def workspace(root: Path, side: int, model: str, method: str) -> Path:
    import shutil

    x, y = digits_at(side)
    (root / "data").mkdir(parents=True, exist_ok=True)
    np.savez(root / "data" / "digits.npz", x=x, y=y)
    shutil.copytree(REPO / "reports" / "templates", root / "reports" / "templates", dirs_exist_ok=True)
    shutil.copytree(REPO / "policies", root / "policies", dirs_exist_ok=True)
    params = {
        "data": {"dataset": "npz", "path": "data/digits.npz"},
        "model": {"name": model},
        "threat": {"norm": "linf", "epsilon": 0.1},
        "train": {"method": method, "epochs": EPOCHS, "batch_size": 64, "lr": 0.002},
        "attack": {"max_samples": TEST_N, "sweep": {"points": 2, "max_samples": 20}},
        "certify": {"methods": ["ibp", "crown"], "max_samples": TEST_N, "random_points": 4, "sweep": False},
        "smoothing": {"max_samples": SMOOTH_N},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def timed(stage: str, root: Path) -> float:
    started = time.perf_counter()
    code = cli([stage, "--workspace", str(root)])
    if code != 0:
        raise SystemExit(f"{stage} failed with exit {code} in {root}")
    return time.perf_counter() - started


def measure(side: int, model: str) -> dict:
    row = {"input": f"1x{side}x{side}", "model": model}
    for method in ("standard", "pgd_at"):
        with tempfile.TemporaryDirectory() as tmp:
            root = workspace(Path(tmp), side, model, method)
            timed("prepare", root)
            timed("train", root)
            train = json.loads((root / "metrics/train.json").read_text())
            samples = json.loads((root / "metrics/prepare.json").read_text())["samples"]["train"]
            row[f"train_{method}"] = train["seconds"] / (samples * EPOCHS) * 1000
            if method == "pgd_at":
                row["params"] = sum(p.numel() for p in torch.load(root / "models/model.pt", weights_only=True).values())
                row["clean"] = json.loads((root / "metrics/train.json").read_text())["best_val_clean_accuracy"]
                row["attack"] = timed("attack", root) / TEST_N * 100
                row["certify"] = timed("certify", root) / TEST_N * 100
                row["smooth"] = timed("smooth", root) / SMOOTH_N * 100
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    models = ("cnn_small",) if args.quick else ("mlp", "cnn_small", "cnn_medium")
    rows = []
    for side in (8, 28):
        for model in models:
            row = measure(side, model)
            print(json.dumps(row))
            rows.append(row)
    lines = [
        f"Measured by `python bench/stage_times.py` on {os.cpu_count()} CPU core(s) ({platform.processor() or platform.machine()}),"
        f" torch {torch.__version__}, {torch.get_num_threads()} thread(s), shared machine: expect ±30%.",
        f"Digits resized to each shape, 1078 training images, 10 classes, L∞ ε = 0.1, {EPOCHS} epochs, batch 64;",
        "attack, certify and smooth run on the PGD-AT model (val clean accuracy in the table); attack = the default five attacks",
        "(PGD 50 steps × 2 restarts, APGD-CE/T 100 steps, Square 1000 queries); certify = IBP + CROWN;",
        "smoothing = n 1000 noise samples per image.",
        "",
        "| input | model | parameters | PGD-AT val clean | train standard, s / 1000 img / epoch | train PGD-AT (7 steps), s / 1000 img / epoch "
        "| attack, s / 100 test img | certify, s / 100 test img | smooth, s / 100 test img |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['input']} | {r['model']} | {r['params']:,} | {r['clean']:.2f} | {r['train_standard']:.2f} "
                     f"| {r['train_pgd_at']:.2f} | {r['attack']:.2f} | {r['certify']:.2f} | {r['smooth']:.2f} |")
    out = REPO / "bench" / "results" / "stage_times.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
