"""Speed-up of the runtime's two parallel paths, 2 processes against 1, with one torch thread per process
on both sides (`runtime.threads: 1`), so the ratio is that of processes, not of thread counts:

- sharded attack evaluation (`robustgate attack` with `runtime.processes` 1 and 2; the metrics must be
  identical; the gradient-masking checks, which run once, serially, after the merge, are off);
- data-parallel training (`robustgate train` under torchrun, DistributedDataParallel, gloo on CPU):
  seconds per epoch from the loop's own rows (plots/train.json).

Writes its two sections of bench/results/runtime.md. About 4 minutes on 2 idle cores (5 minutes on a
2-core machine with a load average of 3, where 2 processes were no faster than 1: run it on an idle
machine, other jobs take the core the second process needs):

    python bench/runtime_scaling.py            # both parts
    python bench/runtime_scaling.py --part ddp # one part: shards | ddp
    python bench/runtime_scaling.py --tiny     # smoke run (seconds; figures not written)
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from runtime_common import digits_28, set_params, stage, workspace, write_sections

ONE_THREAD = {"threads": 1}


def part_shards(tmp: Path, tiny: bool) -> list[str]:
    x, y = digits_28()
    # sized so the attacks' work (about a minute in one process) outweighs starting the shard processes
    samples, batch = (64, 32) if tiny else (768, 64)
    attacks = {"attacks": ["fgsm", "pgd", "apgd_ce", "square"], "batch_size": batch, "max_samples": samples,
               "pgd": {"steps": 5 if tiny else 100, "step_size": 0.01, "restarts": 1 if tiny else 2},
               "apgd": {"steps": 10 if tiny else 200}, "square": {"queries": 50 if tiny else 1000},
               "sweep": {"points": 3, "max_samples": batch}, "masking": {"enabled": False}}
    root = workspace(tmp / "shards", x, y, {"data": {"test_fraction": 0.45}, "model": {"name": "cnn_medium"},
                                            "train": {"method": "standard", "epochs": 1 if tiny else 3},
                                            "attack": attacks})
    for name in ("prepare", "train"):
        stage(root, name)
    test_n = json.loads((root / "metrics" / "prepare.json").read_text())["samples"]["test"]
    lines = ["## Sharded attack evaluation (1 vs 2 processes, one thread each)", "",
             f"digits resized to 28x28 (test split: {test_n} images), `cnn_medium` (standard training), {samples} test "
             f"images in batches of {batch}; "
             f"attacks fgsm, pgd ({attacks['pgd']['steps']} steps × {attacks['pgd']['restarts']} restarts), apgd_ce ({attacks['apgd']['steps']} steps), "
             f"square ({attacks['square']['queries']} queries), ε sweep of 3 points on {batch} images. "
             "`runtime.threads: 1` on both sides. Wall time of the whole `robustgate attack` command, process "
             "start-up included.", "",
             "| 1 process, s | 2 processes, s | speed-up | metrics identical |", "|---:|---:|---:|---|"]
    seconds, metrics = {}, {}
    for processes in (1, 2):
        set_params(root, {"runtime": {**ONE_THREAD, "processes": processes}})
        seconds[processes] = stage(root, "attack")[0]
        metrics[processes] = json.loads((root / "metrics" / "attack.json").read_text())
        metrics[processes].pop("seconds", None)
        metrics[processes].pop("runtime", None)  # names the process count
    lines.append(f"| {seconds[1]:.1f} | {seconds[2]:.1f} | {seconds[1] / seconds[2]:.2f}× | {metrics[1] == metrics[2]} |")
    lines += ["", "The gradient-masking checks are off here: they compare whole-set accuracies and run once, after the "
              "merge, in the parent process, so with them on that serial part bounds the speed-up (Amdahl). "
              "Goal: ≥ 1.6× with 2 processes."]
    return lines


def part_ddp(tmp: Path, tiny: bool) -> list[str]:
    x, y = digits_28()
    if tiny:
        x, y = x[:400], y[:400]
    epochs = 1 if tiny else 3
    root = workspace(tmp / "ddp", x, y, {
        "data": {"val_fraction": 0.05},
        "model": {"name": "cnn_medium"},
        "train": {"method": "pgd_at", "epochs": epochs, "batch_size": 64,
                  "pgd": {"steps": 2 if tiny else 7, "step_size": 0.03, "restarts": 1},
                  "val_pgd": {"steps": 2, "step_size": 0.05, "restarts": 1}}})
    stage(root, "prepare")
    rows = {}
    for processes in (1, 2):
        set_params(root, {"runtime": {**ONE_THREAD, "processes": processes}})
        wall = stage(root, "train")[0]
        history = json.loads((root / "plots" / "train.json").read_text())
        metrics = json.loads((root / "metrics" / "train.json").read_text())
        rows[processes] = (wall, float(np.mean([h["seconds"] for h in history])), metrics["best_val_clean_accuracy"],
                           metrics["best_val_robust_accuracy"])
    train_n = json.loads((root / "metrics" / "prepare.json").read_text())["samples"]["train"]
    return ["## Data-parallel training (torchrun, DistributedDataParallel, gloo, CPU, one thread per process)", "",
            f"digits resized to 28x28 ({train_n} training images), `cnn_medium`, PGD-AT "
            f"({2 if tiny else 7} steps), {epochs} epoch(s), global batch 64 (32 per rank with 2 processes), "
            "`runtime.threads: 1` on both sides. Seconds per epoch are the loop's own (training, then validation: "
            "train-clean accuracy and PGD-2 on a 5% validation split, which every rank runs whole), from "
            "`plots/train.json`; wall time includes process start-up and torchrun's rendezvous.", "",
            "| processes | wall, s | s / epoch | best val clean | best val robust |", "|---:|---:|---:|---:|---:|",
            *[f"| {p} | {r[0]:.1f} | {r[1]:.2f} | {r[2]:.3f} | {r[3]:.3f} |" for p, r in rows.items()],
            "", f"Per-epoch speed-up with 2 processes: {rows[1][1] / rows[2][1]:.2f}× (goal ≥ 1.5×)."]


PARTS = {"shards": part_shards, "ddp": part_ddp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=list(PARTS), action="append")
    parser.add_argument("--tiny", action="store_true", help="smoke run at a tiny size; writes nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sections = [PARTS[name](Path(tmp), args.tiny) for name in args.part or list(PARTS)]
    write_sections("runtime_scaling.py", sections, args.tiny)


if __name__ == "__main__":
    main()
