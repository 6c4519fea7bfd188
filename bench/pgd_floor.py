"""PGD-K attack cost against its floor: K forward+backward passes of a plain torch loop.

Both run in this one process on the same model, batch and thread count, interleaved,
so machine noise hits both alike; the ratio floor/ours is printed (goal >= 0.95).
Also reports images/second of the full robust-accuracy evaluation.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from pipeline.attacks import PGD
from pipeline.models import cnn_small
from pipeline.threat import Domain


def plain_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x_adv.detach() + 0.01 * grad.sign()).clamp(0, 1)
    return x_adv


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    for shape, batch in (((1, 8, 8), 256), ((1, 28, 28), 256)):
        model = cnn_small(shape, 10).eval()
        x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
        domain = Domain(torch.zeros(shape), torch.ones(shape))
        steps = 20
        attack = PGD(steps, 0.01, 1)
        gen = torch.Generator().manual_seed(0)
        ours = floor = float("inf")
        for _ in range(3):  # interleave
            floor = min(floor, best_of(lambda: plain_loop(model, x, y, steps), 2))
            ours = min(ours, best_of(lambda: attack.perturb(model, x, y, 0.1, "linf", domain, gen), 2))
        print(f"input {shape} batch {batch} PGD-{steps}: floor {floor * 1e3:.1f} ms, ours {ours * 1e3:.1f} ms, "
              f"floor/ours {floor / ours:.3f} (goal >= 0.95), {batch / ours:.0f} images/s")


if __name__ == "__main__":
    main()
