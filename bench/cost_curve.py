"""Cost curve: time of an attack (PGD-50), of CROWN and of randomized smoothing as the number of samples and
the model width double, so a user can predict their run (all three are linear in samples; CROWN grows
fastest with width). In-process, untrained `cnn_small`-shaped models on 28x28 inputs (the cost of these
algorithms does not depend on the weights' values), on the device of `--device`; the device is
synchronised before every clock read.

About 2 minutes on 2 cores (estimated from a run on a loaded 2-core machine):

    python bench/cost_curve.py                 # writes its section of bench/results/runtime.md
    python bench/cost_curve.py --device cuda   # on a GPU
    python bench/cost_curve.py --tiny          # smoke run (figures not written)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from runtime_common import write_sections

NOISE_SAMPLES = 500  # smoothing: noisy copies per input (the pipeline's default n is 1000)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(device: torch.device, work) -> float:
    started = clock(device)
    work()
    return clock(device) - started


def main() -> None:
    from pipeline.attacks import PGD
    from pipeline.certify.bounds import BoundComputer
    from pipeline.certify.smoothing import Smooth
    from pipeline.models import build_model
    from pipeline.runtime import resolve_device
    from pipeline.threat import Domain, LpBall

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--tiny", action="store_true", help="smoke run; writes nothing")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = [([4, 8], 25), ([8, 16], 50)] if args.tiny else [([8, 16], 50), ([16, 32], 100), ([32, 64], 200)]
    sample_counts = (4, 8) if args.tiny else (16, 32, 64)
    domain = Domain.from_arrays(np.zeros(1, np.float32), np.ones(1, np.float32)).to(device)
    threat = LpBall("linf", 0.1)
    lines = ["## Cost curve: attack, CROWN and smoothing against samples and model width", "",
             f"In-process on {device} ({args.threads} torch thread(s) on CPU), untrained `cnn_small` models on 1x28x28 "
             f"inputs; PGD 50 steps × 1 restart (batch = all samples), CROWN (batch = all samples), smoothing with "
             f"n = {NOISE_SAMPLES} noisy copies per sample (batch 1000). Seconds; each cell measured once.", "",
             "| channels, dense | parameters | samples | PGD-50, s | CROWN, s | smoothing, s |",
             "|---|---:|---:|---:|---:|---:|"]
    cost = {}  # (width index, samples) -> (pgd, crown, smoothing)
    for w, (channels, dense) in enumerate(widths):
        model = build_model("cnn_small", [1, 28, 28], 10, {"channels": channels, "dense": dense}).to(device).eval()
        parameters = sum(p.numel() for p in model.parameters())
        computer = BoundComputer(model, (1, 28, 28), domain)
        for n in sample_counts:
            x = torch.rand(n, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (n,), device=device)
            pgd = timed(device, lambda: PGD(50, 0.01, 1)(model, x, y, threat, domain,
                                                         torch.Generator(device=device).manual_seed(0)))
            with torch.no_grad():
                crown = timed(device, lambda: computer.certify(x, y, threat, "crown", 10, n, 0.0))
            smooth = Smooth(model, 10, 0.25, torch.Generator(device=device).manual_seed(0), 1000)
            smoothing = timed(device, lambda: [smooth.counts(x[i], NOISE_SAMPLES) for i in range(n)])
            cost[w, n] = (pgd, crown, smoothing)
            lines.append(f"| {channels}, {dense} | {parameters:,} | {n} | {pgd:.2f} | {crown:.2f} | {smoothing:.2f} |")
            print(lines[-1], flush=True)
    def ratio(pairs) -> str:
        return " / ".join(f"×{np.mean([cost[b][k] / cost[a][k] for a, b in pairs]):.2f}" for k in range(3))

    samples = [((w, a), (w, b)) for w in range(len(widths)) for a, b in zip(sample_counts, sample_counts[1:])]
    width = [((a, n), (a + 1, n)) for a in range(len(widths) - 1) for n in sample_counts]
    lines += ["", f"Measured growth (PGD / CROWN / smoothing), mean over the table: doubling the samples {ratio(samples)}; "
              f"doubling the width {ratio(width)}. To predict a run, scale the nearest row by these factors."]
    write_sections("cost_curve.py", [lines], args.tiny)


if __name__ == "__main__":
    main()
