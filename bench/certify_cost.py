"""Certification costs, each against its floor, measured in one run:
randomized-smoothing throughput against a plain batched forward loop over the same number of
noisy samples (goal >= 0.9), and our IBP/CROWN wrapper against a bare auto_LiRPA call on the
same model and batches (goal: overhead <= 1.1).
"""
from __future__ import annotations

import time

import torch

from pipeline import lirpa_compat
from pipeline.certify.bounds import BoundComputer, specification
from pipeline.certify.smoothing import Smooth
from pipeline.models import cnn_small
from pipeline.threat import Domain, LpBall


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def smoothing(model, x, n: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    smooth = Smooth(model, 10, 0.25, gen, batch)

    def ours():
        for sample in x:
            smooth.counts(sample, n)

    def floor():
        with torch.no_grad():
            for sample in x:
                for start in range(0, n, batch):
                    size = min(batch, n - start)
                    noisy = sample.expand(size, *sample.shape) + torch.randn(size, *sample.shape, generator=gen) * 0.25
                    model(noisy).argmax(1)

    best_ours = min(timed(ours) for _ in range(3))
    best_floor = min(timed(floor) for _ in range(3))
    total = len(x) * n
    print(f"smoothing: {total} noisy samples, ours {total / best_ours:.0f}/s, plain loop {total / best_floor:.0f}/s, "
          f"ratio {best_floor / best_ours:.3f} (goal >= 0.9)")


def bounds(model, x, y) -> None:
    domain = Domain(torch.zeros(1, 8, 8), torch.ones(1, 8, 8))
    computer = BoundComputer(model, (1, 8, 8), domain)
    lirpa = lirpa_compat.load()
    from auto_LiRPA.perturbations import PerturbationLpNorm

    bare_module = lirpa.BoundedModule(model, torch.zeros(1, 1, 8, 8), device="cpu")
    for method, name in (("ibp", "IBP"), ("crown", "CROWN")):
        def ours():
            computer.certify(x, y, LpBall("linf", 0.1), method, 10, 128, 1e-4)

        def bare():
            for start in range(0, len(x), 128):
                xb, yb = x[start:start + 128], y[start:start + 128]
                ptb = PerturbationLpNorm(norm=float("inf"), eps=0.1, x_L=(xb - 0.1).clamp(0, 1), x_U=(xb + 0.1).clamp(0, 1))
                bare_module.compute_bounds(x=(lirpa.BoundedTensor(xb, ptb),), C=specification(yb, 10), method=name)

        best_ours = min(timed(ours) for _ in range(3))
        best_bare = min(timed(bare) for _ in range(3))
        print(f"{name}: {len(x)} samples, ours {best_ours:.3f}s, bare auto_LiRPA {best_bare:.3f}s, "
              f"overhead {best_ours / best_bare:.3f} (goal <= 1.1)")


def main() -> None:
    torch.manual_seed(0)
    model = cnn_small((1, 8, 8), 10).eval()
    x = torch.rand(450, 1, 8, 8)
    y = torch.randint(0, 10, (450,))
    smoothing(model, x[:20], n=2000, batch=1000)
    bounds(model, x, y)


if __name__ == "__main__":
    main()
