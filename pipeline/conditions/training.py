"""Training for a condition (issue 16 §4): the inner maximisation over a condition's parameters.

`augmented` is the baseline: every sample under one random parameter of the condition.
`inner_max` draws k parameters per sample and keeps, per sample, the one with the highest loss
(Engstrom et al. 2019's worst-of-k for spatial transforms), then refines it by signed-gradient
ascent on the loss in parameter space (differentiable kinds only), projected onto the box. The
loss is a per-sample function of the logits, so PGD-AT (cross-entropy), TRADES (KL to the clean
prediction) and consistency training all take a condition as they take an Lp ball; the training
methods call these through `pipeline.training.methods`. Every returned input is T(x, θ) for a θ
returned with it, inside the condition's box: the training inputs lie in the parameter set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pipeline.conditions.threats import Condition
from pipeline.threat import Domain

PerSampleLoss = Callable[[torch.Tensor], torch.Tensor]  # logits -> (N,) loss


@dataclass
class Perturbed:
    """Training inputs under a condition and the parameters that produced them (T(x, θ) = x)."""

    x: torch.Tensor
    theta: torch.Tensor


def uniform(n: int, condition: Condition, generator: torch.Generator, device) -> torch.Tensor:
    """Parameters drawn uniformly from the box, or from the finite set when there is one; drawn on the
    generator's device (CPU draws stay bit-identical wherever the model runs), then moved."""
    low, high = condition.box(device)
    finite = condition.finite_set()
    if finite is not None:
        index = torch.randint(len(finite), (n,), generator=generator, device=generator.device)
        return torch.as_tensor(finite, device=device)[index.to(device)]
    draw = torch.rand((n, condition.dims), generator=generator, device=generator.device)
    return low + draw.to(device) * (high - low)


def _noise(x, condition, generator):
    if not condition.stochastic:
        return None
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)


def augmented(model, x, y, condition: Condition, domain: Domain, generator: torch.Generator) -> torch.Tensor:
    """Each sample under one random parameter (plain augmentation)."""
    return augment(x, condition, domain, generator).x


def augment(x, condition: Condition, domain: Domain, generator: torch.Generator) -> Perturbed:
    theta = uniform(len(x), condition, generator, x.device)
    return Perturbed(condition.transform(x, theta, domain, _noise(x, condition, generator)).detach(), theta)


def cross_entropy(y: torch.Tensor) -> PerSampleLoss:
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def inner_max(model, x, condition: Condition, domain: Domain, generator: torch.Generator, loss: PerSampleLoss,
              k: int = 8, steps: int = 0, step_fraction: float = 0.25) -> Perturbed:
    """Per sample, the highest-loss input among k random parameters, refined by `steps` of signed-gradient
    ascent of `step_fraction` of each axis' range (differentiable kinds), projected onto the box."""
    was_training = model.training
    model.eval()
    try:
        best_x, best_theta = x.clone(), torch.zeros(len(x), condition.dims, device=x.device)
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)

        def keep(moved, theta, value):
            nonlocal best_loss
            better = value > best_loss
            best_loss = torch.where(better, value, best_loss)
            best_x[better], best_theta[better] = moved[better], theta[better]

        with torch.no_grad():
            for _ in range(k):
                theta = uniform(len(x), condition, generator, x.device)
                moved = condition.transform(x, theta, domain, _noise(x, condition, generator))
                keep(moved, theta, loss(model(moved)))
        if steps and condition.differentiable and not condition.stochastic:
            low, high = condition.box(x.device)
            theta = best_theta.clone()
            for _ in range(steps):
                theta = theta.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(loss(model(condition.transform(x, theta, domain))).sum(), theta)
                theta = torch.maximum(torch.minimum(theta + step_fraction * (high - low) * grad.sign(), high), low)
                with torch.no_grad():
                    moved = condition.transform(x, theta, domain)
                    keep(moved, theta.detach(), loss(model(moved)))
    finally:
        model.train(was_training)
    return Perturbed(best_x.detach(), best_theta.detach())


def worst_of_k(model, x, y, condition: Condition, domain: Domain, generator: torch.Generator, k: int = 8,
               steps: int = 0, step_fraction: float = 0.25, loss: Optional[PerSampleLoss] = None) -> torch.Tensor:
    """The inputs of :func:`inner_max` under cross-entropy (or `loss`)."""
    return inner_max(model, x, condition, domain, generator, loss or cross_entropy(y), k, steps, step_fraction).x
