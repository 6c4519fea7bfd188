"""The threat model in tensors: the ε-ball intersected with the data domain box."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import UsageError

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Domain:
    """Per-feature box every input must stay in (one input's shape, broadcast over the batch)."""

    lower: torch.Tensor
    upper: torch.Tensor

    @classmethod
    def from_arrays(cls, lower: np.ndarray, upper: np.ndarray) -> "Domain":
        return cls(torch.as_tensor(lower, dtype=torch.float32), torch.as_tensor(upper, dtype=torch.float32))

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.upper), self.lower)

    def contains(self, x: torch.Tensor, tol: float = 0.0) -> bool:
        return bool(((x >= self.lower - tol) & (x <= self.upper + tol)).all())

    def diameter(self, norm: str) -> float:
        width = (self.upper - self.lower).flatten()
        return float(width.max() if norm == "linf" else width.norm(p=2))


def check_epsilon(norm: str, epsilon: float, domain: Domain, key: str = "threat.epsilon") -> None:
    """ε beyond the data range is a meaningless threat model: refuse it."""
    if norm not in NORMS:
        raise UsageError(f"threat.norm = {norm!r}: allowed: {', '.join(NORMS)}")
    if epsilon < 0:
        raise UsageError(f"{key} = {epsilon}: must be >= 0")
    limit = domain.diameter(norm)
    if epsilon > limit:
        raise UsageError(f"{key} = {epsilon}: beyond the data range ({norm} diameter of the domain is {limit:.4g})")


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float, norm: str, domain: Domain) -> torch.Tensor:
    """Nearest point (L∞) / radial projection (L2) into the ε-ball, then into the domain."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-epsilon, epsilon)
    else:
        norms = lp_norm(delta, "l2").clamp_min(1e-12)
        factor = (epsilon / norms).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
        delta = delta * factor
    return domain.clamp(x + delta)


def random_start(x: torch.Tensor, epsilon: float, norm: str, domain: Domain, generator: torch.Generator) -> torch.Tensor:
    """Uniform point in the ε-ball (L∞ cube or L2 ball), clipped to the domain."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * epsilon
    else:
        direction = torch.randn(x.shape, generator=generator)
        direction = direction / lp_norm(direction, "l2").clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        dims = x[0].numel()
        radius = torch.rand(len(x), generator=generator) ** (1.0 / dims) * epsilon
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return domain.clamp(x + delta)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    """Steepest ascent for the norm: sign of the gradient (L∞) or its direction (L2)."""
    if norm == "linf":
        return x_adv + step_size * grad.sign()
    scale = lp_norm(grad, "l2").clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return x_adv + step_size * grad / scale
