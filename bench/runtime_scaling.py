"""Runtime benchmarks: evaluation shards, data-parallel training, memory against data size, cost curve.

Writes bench/results/runtime.md. Every stage runs as the CLI does, in a subprocess of its own
(so wall time includes process start-up, and its peak resident memory is its own). Ratios are
measured within one run, one configuration at a time; on a shared 2-core machine they are noisy.

    python bench/runtime_scaling.py             # all four parts (about 10 minutes on 2 cores)
    python bench/runtime_scaling.py --part shards   # one part: shards | ddp | memory | cost
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
RESULTS = REPO / "bench" / "results" / "runtime.md"
_WRAPPER = ("import resource, sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits resized to 28x28 (learnable in seconds, MNIST-shaped)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).numpy(), bunch.target.astype(np.int64)


def mnist_t10k() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return (x.astype(np.float32) / 255.0), y.astype(np.int64)


def workspace(root: Path, x, y, params: dict) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    np.savez(root / "data" / "set.npz", x=x, y=y)
    shutil.copytree(REPO / "reports" / "templates", root / "reports" / "templates", dirs_exist_ok=True)
    shutil.copytree(REPO / "policies", root / "policies", dirs_exist_ok=True)
    base = {"seed": 0, "data": {"dataset": "npz", "path": "data/set.npz"},
            "inputs": {"data": "data/set.npz", "model": "pipeline/models.py"},
            "threat": {"norm": "linf", "epsilon": 0.1}}
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(base, params)))
    return root


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_params(root: Path, changes: dict) -> None:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(_merge(yaml.safe_load(path.read_text()), changes)))


def stage(root: Path, name: str) -> tuple[float, float]:
    """Run one stage as a subprocess: (wall seconds, peak RSS in MiB of it or its largest child)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _WRAPPER, name, "--workspace", str(root)], env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
    line = next(l for l in run.stderr.splitlines() if l.startswith("MAXRSS_KB"))
    own, children = (int(v) for v in line.split()[1:])
    return seconds, max(own, children) / 1024


def part_shards(tmp: Path) -> list[str]:
    x, y = digits_28()
    root = workspace(tmp / "shards", x, y, {
        "model": {"name": "cnn_small"}, "train": {"method": "standard", "epochs": 3},
        "attack": {"attacks": ["fgsm", "pgd", "apgd_ce", "square"], "batch_size": 64, "max_samples": 448,
                   "sweep": {"max_samples": 200}}})
    for name in ("prepare", "train"):
        stage(root, name)
    lines = ["## Sharded attack evaluation (1 vs 2 processes)", "",
             "digits resized to 28x28, `cnn_small` (standard training, 3 epochs), 448 test images, attacks "
             "fgsm, pgd (50 steps × 2 restarts), apgd_ce (100 steps), square (1000 queries), batch 64. Wall time "
             "of the whole `robustgate attack` command, process start-up included.", "",
             "| masking checks | 1 process, s | 2 processes, s | speed-up | metrics identical |", "|---|---:|---:|---:|---|"]
    for masking in (True, False):
        seconds, metrics = {}, {}
        for processes in (1, 2):
            set_params(root, {"attack": {"masking": {"enabled": masking}}, "runtime": {"processes": processes}})
            seconds[processes] = stage(root, "attack")[0]
            metrics[processes] = (root / "metrics" / "attack.json").read_text()
        lines.append(f"| {'on' if masking else 'off'} | {seconds[1]:.1f} | {seconds[2]:.1f} | "
                     f"{seconds[1] / seconds[2]:.2f}× | {metrics[1] == metrics[2]} |")
    lines += ["", "The masking checks compare whole-set accuracies and run once, after the merge, in the parent "
              "process: with them on, that serial part bounds the speed-up (Amdahl)."]
    return lines


def part_ddp(tmp: Path) -> list[str]:
    x, y = digits_28()
    root = workspace(tmp / "ddp", x, y, {"model": {"name": "cnn_medium"},
                                         "train": {"method": "pgd_at", "epochs": 3, "batch_size": 64}})
    stage(root, "prepare")
    rows = {}
    for processes in (1, 2):
        set_params(root, {"runtime": {"processes": processes}})
        wall = stage(root, "train")[0]
        history = json.loads((root / "plots" / "train.json").read_text())
        metrics = json.loads((root / "metrics" / "train.json").read_text())
        rows[processes] = (wall, float(np.mean([h["seconds"] for h in history])), metrics["best_val_clean_accuracy"],
                           metrics["best_val_robust_accuracy"])
    return ["## Data-parallel training (torchrun, gloo, CPU)", "",
            "digits resized to 28x28 (1078 training images), `cnn_medium`, PGD-AT (7 steps), 3 epochs, global batch 64. "
            "Seconds per epoch are the loop's own (training + validation), from `plots/train.json`.", "",
            "| processes | wall, s | s / epoch | best val clean | best val robust |", "|---:|---:|---:|---:|---:|",
            *[f"| {p} | {r[0]:.1f} | {r[1]:.2f} | {r[2]:.3f} | {r[3]:.3f} |" for p, r in rows.items()],
            "", f"Per-epoch speed-up with 2 processes: {rows[1][1] / rows[2][1]:.2f}×."]


def part_memory(tmp: Path) -> list[str]:
    x, y = mnist_t10k()
    lines = ["## Wall time and peak memory against data size (MNIST t10k)", "",
             "The 10,000 MNIST test images as the dataset (split 60/15/25), and a 2,000-image stratified subsample; "
             "`cnn_medium`; reduced settings so the 2-core machine finishes: standard training for 1 epoch, attacks "
             "fgsm + pgd (10 steps), certify ibp + crown on 200 samples, smoothing n = 200 on 20 samples. Peak RSS "
             "of the stage process (MiB).", "",
             "| images | test split | prepare s / MiB | train s / MiB | attack s / MiB | certify s / MiB | smooth s / MiB |",
             "|---:|---:|---|---|---|---|---|"]
    for size in (2000, 10000):
        root = workspace(tmp / f"mem{size}", x, y, {
            "data": {"max_samples": size} if size < len(y) else {},
            "model": {"name": "cnn_medium"}, "train": {"method": "standard", "epochs": 1},
            "attack": {"attacks": ["fgsm", "pgd"], "pgd": {"steps": 10, "step_size": 0.025, "restarts": 1},
                       "masking": {"enabled": False}, "sweep": {"points": 3, "max_samples": 200}},
            "certify": {"methods": ["ibp", "crown"], "max_samples": 200, "random_points": 4},
            "smoothing": {"n0": 20, "n": 200, "max_samples": 20}})
        cells = [f"{s:.1f} / {m:.0f}" for s, m in (stage(root, n) for n in ("prepare", "train", "attack", "certify",
                                                                          "smooth"))]
        test_n = json.loads((root / "metrics" / "prepare.json").read_text())["samples"]["test"]
        lines.append(f"| {size} | {test_n} | " + " | ".join(cells) + " |")
    return lines


def part_cost(_: Path) -> list[str]:
    """In-process: PGD-50, CROWN and smoothing (n = 1000) as the samples and the model width double."""
    from pipeline.attacks import PGD
    from pipeline.certify.bounds import BoundComputer
    from pipeline.certify.smoothing import Smooth
    from pipeline.models import build_model
    from pipeline.threat import Domain, LpBall

    torch.manual_seed(0)
    domain = Domain.from_arrays(np.zeros(1, np.float32), np.ones(1, np.float32))
    threat = LpBall("linf", 0.1)
    lines = ["## Cost curve (in-process, untrained `cnn_small`-shaped models on 28x28 inputs)", "",
             "| channels, dense | samples | PGD-50, s | CROWN, s | smoothing n=1000, s |", "|---|---:|---:|---:|---:|"]
    for channels, dense in (([16, 32], 100), ([32, 64], 200)):
        model = build_model("cnn_small", [1, 28, 28], 10, {"channels": channels, "dense": dense}).eval()
        computer = BoundComputer(model, (1, 28, 28), domain)
        for n in (32, 64, 128):
            x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
            started = time.perf_counter()
            PGD(50, 0.01, 1)(model, x, y, threat, domain, torch.Generator().manual_seed(0))
            pgd = time.perf_counter() - started
            started = time.perf_counter()
            with torch.no_grad():
                computer.certify(x, y, threat, "crown", 10, 128, 0.0)
            crown = time.perf_counter() - started
            smooth = Smooth(model, 10, 0.25, torch.Generator().manual_seed(0), 1000)
            started = time.perf_counter()
            for i in range(min(n, 32)):
                smooth.counts(x[i], 1000)
            smoothing = (time.perf_counter() - started) * n / min(n, 32)
            lines.append(f"| {channels}, {dense} | {n} | {pgd:.2f} | {crown:.2f} | {smoothing:.2f} |")
    lines += ["", "Smoothing was timed on 32 samples and scaled to the row's count (its cost is linear in samples)."]
    return lines


PARTS = {"shards": part_shards, "ddp": part_ddp, "memory": part_memory, "cost": part_cost}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=list(PARTS), action="append")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    header = [f"# Runtime benchmarks", "",
              f"Measured by `python bench/runtime_scaling.py` on {os.cpu_count()} CPU core(s) ({platform.machine()}), "
              f"torch {torch.__version__}, no GPU, a machine shared with other jobs: expect ±30% and worse for ratios "
              "of multi-process runs (the other jobs take cores the second process needs).", ""]
    body = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.part or list(PARTS):
            print(f"== {name}", flush=True)
            body += PARTS[name](Path(tmp)) + [""]
            print("\n".join(body), flush=True)
    previous = RESULTS.read_text().split("\n## ") if RESULTS.is_file() and args.part else []
    kept = ["## " + p for p in previous[1:] if p.split("\n")[0] not in "\n".join(body)]
    RESULTS.write_text("\n".join(header + body + kept).rstrip() + "\n")


if __name__ == "__main__":
    main()
