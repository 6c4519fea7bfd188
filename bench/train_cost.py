"""Epoch cost of each training method relative to a `standard` epoch on the same model and data,
measured in one run (goals: PGD-AT with K steps within 1.1·(K+1), Fast-AT within 2.5, TRADES
within 1.1·(K+2)). Prints a table."""
from __future__ import annotations

import time

import torch

from pipeline.attacks.pgd import PGD
from pipeline.data.datasets import load_dataset
from pipeline.data.split import prepare
from pipeline.models import cnn_small
from pipeline.threat import Domain, LpBall
from pipeline.training.loop import FitConfig, fit
from pipeline.training.methods import METHODS

K = 7
GOALS = {"pgd_at": 1.1 * (K + 1), "fast_at": 2.5, "trades": 1.1 * (K + 2)}


def epoch_seconds(method: str, x, y, xv, yv, domain) -> float:
    torch.manual_seed(0)
    model = cnn_small((1, 8, 8), 10)
    cfg = FitConfig(method, 1, 64, "adam", 1e-3, 0.9, 0.0, LpBall("linf", 0.1), 0, PGD(K, 0.025), PGD(1, 0.1))
    start = time.perf_counter()
    fit(model, x, y, xv[:1], yv[:1], domain, cfg, torch.Generator().manual_seed(0), num_classes=10)
    return time.perf_counter() - start


def main() -> None:
    data = prepare(load_dataset("digits"), 0.15, 0.25, seed=0)
    x, y = torch.as_tensor(data.x["train"]), torch.as_tensor(data.y["train"])
    xv, yv = torch.as_tensor(data.x["val"]), torch.as_tensor(data.y["val"])
    domain = Domain.from_arrays(data.lower, data.upper)
    times = {m: float("inf") for m in METHODS}
    for _ in range(2):  # interleaved repeats; keep each method's best
        for method in METHODS:
            times[method] = min(times[method], epoch_seconds(method, x, y, xv, yv, domain))
    base = times["standard"]
    print(f"{'method':<12} {'epoch s':>8} {'× standard':>11} {'goal':>8}")
    for method, seconds in times.items():
        goal = f"<= {GOALS[method]:.1f}" if method in GOALS else ""
        print(f"{method:<12} {seconds:>8.3f} {seconds / base:>11.2f} {goal:>8}")


if __name__ == "__main__":
    main()
