"""Per-batch training objectives, by name.

Each method maps a batch to the loss whose gradient updates the weights. The
adversarial ones solve the inner maximisation of
min_θ E[max_{‖δ‖≤ε} L(f_θ(x+δ), y)] approximately with PGD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline.attacks.pgd import PGD
from pipeline.threat import Domain


@dataclass(frozen=True)
class BatchContext:
    epsilon: float  # this epoch's ε (after warm-up)
    norm: str
    domain: Domain
    pgd: PGD
    generator: torch.Generator
    noise_sigma: float = 0.25


def standard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """Empirical risk on clean inputs: the baseline of the accuracy-robustness trade-off."""
    return nn.functional.cross_entropy(model(x), y)


def pgd_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """Madry et al. 2018: cross-entropy on PGD points from a random start in the ε-ball."""
    if ctx.epsilon == 0:
        return standard(model, x, y, ctx)
    model.eval()
    x_adv = ctx.pgd.perturb(model, x, y, ctx.epsilon, ctx.norm, ctx.domain, ctx.generator).detach()
    model.train()
    return nn.functional.cross_entropy(model(x_adv), y)


def gaussian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """Gaussian-noise augmentation at σ: the base classifier randomized smoothing needs (Cohen et al. 2019)."""
    noise = torch.randn(x.shape, generator=ctx.generator) * ctx.noise_sigma
    return nn.functional.cross_entropy(model(x + noise), y)


METHODS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor, BatchContext], torch.Tensor]] = {
    "standard": standard,
    "pgd_at": pgd_at,
    "gaussian": gaussian,
}
