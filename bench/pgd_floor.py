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
from pipeline.threat import Domain, LpBall


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
            ours = min(ours, best_of(lambda: attack.perturb(model, x, y, LpBall("linf", 0.1), domain, gen), 2))
        print(f"input {shape} batch {batch} PGD-{steps}: floor {floor * 1e3:.1f} ms, ours {ours * 1e3:.1f} ms, "
              f"floor/ours {floor / ours:.3f} (goal >= 0.95), {batch / ours:.0f} images/s")


def sequential_speedup() -> None:
    """AutoAttack-style sequential evaluation against attacking every sample: same verdict, less work."""
    from pathlib import Path

    from pipeline.attacks import FGSM
    from pipeline.attacks.suite import run_suite
    from pipeline.config import load_params
    from pipeline.data.store import load_prepared
    from pipeline.models import load_checkpoint

    root = Path(__file__).resolve().parents[1]
    if not (root / "models" / "model.pt").is_file():
        print("sequential speed-up: run `make repro` first (needs the default model)")
        return
    data = load_prepared(root / "data" / "prepared" / "data.npz")
    params = load_params(root / "params.yaml", root)
    model, _ = load_checkpoint(root / "models", params.model.name, params.model.factory_options(),
                               data.x["test"].shape[1:], data.num_classes)
    x, y = torch.as_tensor(data.x["test"]), torch.as_tensor(data.y["test"])
    domain = Domain.from_arrays(data.lower, data.upper)
    # deterministic attacks (no random start), so the two verdicts must match exactly
    attacks = [FGSM(), PGD(50, 0.01, 1, random_init=False), PGD(50, 0.01, 1, random_init=False, loss="cw")]
    timings, verdicts = {}, {}
    for sequential in (False, True, False, True):
        start = time.perf_counter()
        result = run_suite(model, attacks, x, y, LpBall("linf", 0.1), domain, 512, torch.Generator().manual_seed(0),
                           sequential=sequential)
        elapsed = time.perf_counter() - start
        timings[sequential] = min(timings.get(sequential, float("inf")), elapsed)
        verdicts[sequential] = result.robust.float().mean().item()
    print(f"default model, {len(y)} test samples, fgsm+pgd-50+pgd-cw-50: independent {timings[False]:.2f}s, "
          f"sequential {timings[True]:.2f}s, speed-up {timings[False] / timings[True]:.2f}x; robust accuracy "
          f"{verdicts[False]:.4f} vs {verdicts[True]:.4f}")


if __name__ == "__main__":
    main()
    sequential_speedup()
