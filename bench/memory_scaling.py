"""Wall time and peak resident memory of each stage on MNIST at 2,000 and 10,000 images (the t10k
images in ../shared/data/mnist as the dataset), with a `cnn_medium`-sized model: memory must not grow
with the dataset beyond the model and a batch (prepared splits are memory-mapped, training streams
them through a DataLoader, evaluation reads batch-wise).

Peak RSS is `ru_maxrss` of the stage process (or its largest child); peak anonymous memory is the
process's RssAnon sampled every 5 ms (RSS also counts the pages of the memory-mapped files a stage
reads and writes, which the kernel reclaims under pressure). Reduced settings so that both
sizes run in about 5 minutes on 2 cores: standard training for 1 epoch, attacks fgsm + pgd (5 steps)
on the whole test split, IBP + CROWN on 20 samples, smoothing n = 100 on 10 samples; one torch thread.

    python bench/memory_scaling.py          # writes its section of bench/results/runtime.md
    python bench/memory_scaling.py --tiny   # smoke run at 500 and 1,000 images (figures not written)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from runtime_common import mnist_t10k, stage_memory, workspace, write_sections

STAGES = ("prepare", "train", "attack", "certify", "smooth")


def params(size: int, total: int, tiny: bool) -> dict:
    return {
        # 30% validation: at 2,000 images the validation split (600) already fills the validation batch of 512,
        # so both sizes run the same batch shapes and only the data size differs
        "data": {"val_fraction": 0.3, **({"max_samples": size} if size < total else {})},
        "model": {"name": "cnn_medium", "channels": [32, 64], "dense": 256},
        "runtime": {"threads": 1},
        "train": {"method": "standard", "epochs": 1, "batch_size": 128},
        "attack": {"attacks": ["fgsm", "pgd"], "pgd": {"steps": 2 if tiny else 5, "step_size": 0.04, "restarts": 1},
                   "batch_size": 256, "masking": {"enabled": False}, "sweep": {"points": 2, "max_samples": 100}},
        "certify": {"methods": ["ibp", "crown"], "max_samples": 10 if tiny else 20, "batch_size": 10,
                    "random_points": 2, "sweep": False},
        "smoothing": {"n0": 20, "n": 100, "max_samples": 4 if tiny else 10},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run at 500 and 1,000 images; writes nothing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each stage per size; medians are reported "
                        "(one run's peak varies by tens of MiB between identical runs here)")
    args = parser.parse_args()
    x, y = mnist_t10k()
    sizes = (500, 1000) if args.tiny else (2000, 10000)
    lines = ["## Wall time and peak memory against data size (MNIST)", "",
             f"MNIST t10k images as the dataset (split 45/30/25: train/validation/test) at {sizes[0]:,} and {sizes[1]:,} images, `cnn_medium` "
             "(channels 32, 64; dense 256: 3.3 M parameters), one torch thread; standard training for 1 epoch (batch "
             "128), attacks fgsm + pgd on the whole test split (batch 256), IBP + CROWN on 20 samples (batch 10), "
             "smoothing n = 100 on 10 samples. Wall seconds / peak RSS / peak anonymous memory (MiB) of the stage "
             f"process, each the median of {args.repeats} runs.", "",
             "| images | train / test split | " + " | ".join(f"{s} s / RSS / anon" for s in STAGES) + " |",
             "|---:|---|" + "---|" * len(STAGES)]
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            root = workspace(Path(tmp) / f"mnist{size}", x, y, params(size, len(y), args.tiny))
            cells = {name: tuple(statistics.median(v) for v in zip(*(stage_memory(root, name)
                                                                      for _ in range(args.repeats))))
                     for name in STAGES}
            peaks[size] = cells
            split = json.loads((root / "metrics" / "prepare.json").read_text())["samples"]
            lines.append(f"| {size:,} | {split['train']:,} / {split['test']:,} | "
                         + " | ".join(f"{s:.1f} / {m:.0f} / {a:.0f}" for s, m, a in cells.values()) + " |")
    growth = {name: (peaks[sizes[1]][name][1] - peaks[sizes[0]][name][1],
                     peaks[sizes[1]][name][2] - peaks[sizes[0]][name][2]) for name in STAGES}
    lines += ["", f"Growth from {sizes[0]:,} to {sizes[1]:,} images (×{sizes[1] // sizes[0]} data), peak RSS / peak "
              "anonymous: " + ", ".join(f"{name} {r:+.0f} / {a:+.0f} MiB" for name, (r, a) in growth.items())
              + ". For scale: one float32 copy of the larger training split is "
              f"{0.45 * sizes[1] * 784 * 4 / 2**20:.0f} MiB, of its test split {0.25 * sizes[1] * 784 * 4 / 2**20:.0f} MiB."]
    write_sections("memory_scaling.py", [lines], args.tiny)


if __name__ == "__main__":
    main()
