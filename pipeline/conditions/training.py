"""Training for a condition (issue 16 §4), as batch transforms a training loop can call.

`augmented` is the baseline: every sample under one random parameter of the condition.
`worst_of_k` draws k parameters per sample and keeps, per sample, the one with the highest loss
(Engstrom et al. 2019's worst-of-k for spatial transforms); `adversarial` refines the worst
of k by signed-gradient ascent on the loss in parameter space (differentiable kinds only).
They take a condition, so any loop that trains on `batch_fn(model, x, y)` trains for brightness
or rotation as it does for an Lp ball. Not yet wired into `train.method` (pipeline/training is
the integrator's): bench/conditions_training.py compares them on digits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.conditions.threats import Condition
from pipeline.threat import Domain


def _uniform(n: int, condition: Condition, generator: torch.Generator, device) -> torch.Tensor:
    low, high = condition.box(device)
    theta = low + torch.rand((n, condition.dims), generator=generator).to(device) * (high - low)
    return theta.round() if condition.finite_set() is not None else theta


def _noise(x, condition, generator):
    return torch.randn(x.shape, generator=generator).to(x.device) if condition.stochastic else None


def augmented(model, x, y, condition: Condition, domain: Domain, generator: torch.Generator) -> torch.Tensor:
    """Each sample under one random parameter (plain augmentation)."""
    return condition.transform(x, _uniform(len(x), condition, generator, x.device), domain,
                               _noise(x, condition, generator)).detach()


def worst_of_k(model, x, y, condition: Condition, domain: Domain, generator: torch.Generator, k: int = 8,
               steps: int = 0, step_fraction: float = 0.25) -> torch.Tensor:
    """Per sample, the highest-loss input among k random parameters, optionally refined by `steps` of
    signed-gradient ascent on the loss in parameter space."""
    was_training = model.training
    model.eval()
    best_x, best_loss, best_theta = x.clone(), torch.full((len(x),), -float("inf"), device=x.device), None
    best_theta = torch.zeros(len(x), condition.dims, device=x.device)
    with torch.no_grad():
        for _ in range(k):
            theta = _uniform(len(x), condition, generator, x.device)
            moved = condition.transform(x, theta, domain, _noise(x, condition, generator))
            loss = F.cross_entropy(model(moved), y, reduction="none")
            better = loss > best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_x[better], best_theta[better] = moved[better], theta[better]
    if steps and condition.differentiable:
        low, high = condition.box(x.device)
        theta = best_theta
        for _ in range(steps):
            theta = theta.detach().requires_grad_(True)
            loss = F.cross_entropy(model(condition.transform(x, theta, domain)), y, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), theta)
            theta = torch.maximum(torch.minimum(theta + step_fraction * (high - low) * grad.sign(), high), low)
            with torch.no_grad():
                moved = condition.transform(x, theta, domain)
                loss = F.cross_entropy(model(moved), y, reduction="none")
                better = loss > best_loss
                best_loss = torch.where(better, loss, best_loss)
                best_x[better] = moved[better]
    model.train(was_training)
    return best_x.detach()
