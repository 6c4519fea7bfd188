"""The threat model as an object: what an adversary (or the world) may do to an input.

A :class:`Threat` owns its parameter set, how to sample it, how to project onto it and
what can be certified about it. Attacks, certificates and training take a threat, never an
`(epsilon, norm)` pair, so a new kind of input variation is one new class. :class:`LpBall`
is the ε-ball around an input intersected with the data domain box; parametric input
variations (brightness, rotation, ...) live in `pipeline/conditions/`.

Every tensor a threat creates is made on the device of the input it perturbs; random draws
come from the caller's generator (on its own device) and are moved there, so CPU results do
not depend on where a model would run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from pipeline.errors import UsageError

NORMS = ("linf", "l2")
NORM_LABELS = {"linf": "L∞", "l2": "L2"}


@dataclass(frozen=True)
class Domain:
    """Per-feature box every input must stay in (one input's shape, broadcast over the batch)."""

    lower: torch.Tensor
    upper: torch.Tensor

    @classmethod
    def from_arrays(cls, lower: np.ndarray, upper: np.ndarray) -> "Domain":
        return cls(torch.as_tensor(lower, dtype=torch.float32), torch.as_tensor(upper, dtype=torch.float32))

    def to(self, device) -> "Domain":
        return Domain(self.lower.to(device), self.upper.to(device))

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.upper.to(x.device)), self.lower.to(x.device))

    def contains(self, x: torch.Tensor, tol: float = 0.0) -> bool:
        return bool(((x >= self.lower.to(x.device) - tol) & (x <= self.upper.to(x.device) + tol)).all())

    def diameter(self, norm: str) -> float:
        width = (self.upper - self.lower).flatten()
        return float(width.max() if norm == "linf" else width.norm(p=2))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape (N,) to broadcast over one sample's dimensions."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _draw(shape, generator: torch.Generator, like: torch.Tensor, kind: str) -> torch.Tensor:
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(shape, generator=generator, device=generator.device).to(like.device)


class Threat:
    """What every threat tells the rest of the pipeline about itself."""

    name: str
    kind: str
    rationale: Optional[str]

    def record(self) -> dict:
        """The threat as the metrics state it."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for reports and logs."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class LpBall(Threat):
    """{x' : ‖(x' − x) / s‖_p ≤ ε} ∩ domain, for p ∈ {∞, 2}.

    `scale` (L∞ only; one input's shape) gives each feature its own radius ε·s_i, e.g. a
    measurement uncertainty in the feature's own units, with s_i = 0 for a feature that cannot
    change. Without it the ball is the usual one.

    `integer` (one input's shape, bool) marks features that only take integer values (declared
    integer; categorical ones are immutable already): an adversarial example is an input, so
    `to_lattice` rounds them into the integer points of the box before a candidate is judged.
    Without it nothing is rounded."""

    norm: str
    epsilon: float
    name: str = "lp"
    rationale: Optional[str] = None
    kind: str = "lp_ball"
    scale: Optional[torch.Tensor] = None
    integer: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.norm not in NORMS:
            raise UsageError(f"threat.norm = {self.norm!r}: allowed: {', '.join(NORMS)}")
        if not self.epsilon >= 0:
            raise UsageError(f"threat.epsilon = {self.epsilon}: must be >= 0")
        if self.scale is not None and (self.norm != "linf" or bool((self.scale < 0).any())):
            raise UsageError("a per-feature scale needs the L∞ norm and non-negative entries")
        if self.integer is not None and self.norm != "linf":
            raise UsageError("integer features need the L∞ norm (a box whose integer points can be enumerated)")

    def record(self) -> dict:
        return {"norm": self.norm, "epsilon": self.epsilon}

    def describe(self) -> str:
        per_feature = " per feature (scaled)" if self.scale is not None else ""
        lattice = "; integer features at integer values" if self.integer is not None else ""
        return f"{NORM_LABELS[self.norm]} ball of radius ε = {self.epsilon:g}{per_feature}{lattice}"

    def radius(self, like: torch.Tensor):
        """ε, or the per-feature radii ε·s on `like`'s device (L∞)."""
        return self.epsilon if self.scale is None else self.epsilon * self.scale.to(like.device)

    def with_epsilon(self, epsilon: float) -> "LpBall":
        """The same kind of ball at another radius (sweeps, sanity checks, training ramps)."""
        return replace(self, epsilon=float(epsilon))

    def check(self, domain: Domain, key: str = "threat.epsilon") -> None:
        """ε beyond the data range is a meaningless threat model: refuse it."""
        limit = domain.diameter(self.norm)
        if self.epsilon > limit:
            raise UsageError(f"{key} = {self.epsilon}: beyond the data range ({self.norm} diameter of the domain "
                             f"is {limit:.4g})")

    def distance(self, delta: torch.Tensor) -> torch.Tensor:
        """‖δ‖_p per sample."""
        return lp_norm(delta, self.norm)

    def box(self, x: torch.Tensor, domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
        """L∞ only: the ε-box met with the domain box is one box."""
        r = self.radius(x)
        return domain.clamp(x - r), domain.clamp(x + r)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, domain: Domain) -> torch.Tensor:
        """Nearest point (L∞) / radial projection (L2) into the ε-ball, then into the domain."""
        delta = x_adv - x
        if self.norm == "linf" and self.scale is None:
            delta = delta.clamp(-self.epsilon, self.epsilon)
        elif self.norm == "linf":
            r = self.radius(x)
            delta = torch.maximum(torch.minimum(delta, r), -r)
        else:
            norms = lp_norm(delta, "l2").clamp_min(1e-12)
            delta = delta * _per_sample((self.epsilon / norms).clamp(max=1.0), delta)
        return domain.clamp(x + delta)

    def to_lattice(self, x_adv: torch.Tensor, x: torch.Tensor, domain: Domain) -> torch.Tensor:
        """The integer features of `x_adv` rounded to the nearest integer of their box (x integer
        there, so the box holds one); the other features unchanged. The identity without `integer`."""
        if self.integer is None:
            return x_adv
        low, high = self.box(x, domain)
        rounded = torch.minimum(torch.maximum(torch.round(x_adv), torch.ceil(low)), torch.floor(high))
        return torch.where(self.integer.to(x_adv.device), rounded, x_adv)

    def random_start(self, x: torch.Tensor, domain: Domain, generator: torch.Generator) -> torch.Tensor:
        """Uniform point in the ε-ball (L∞ cube or L2 ball), clipped to the domain."""
        if self.norm == "linf":
            delta = (_draw(x.shape, generator, x, "uniform") * 2 - 1) * self.radius(x)
        else:
            direction = _draw(x.shape, generator, x, "normal")
            direction = direction / _per_sample(lp_norm(direction, "l2").clamp_min(1e-12), x)
            radius = _draw((len(x),), generator, x, "uniform") ** (1.0 / x[0].numel()) * self.epsilon
            delta = direction * _per_sample(radius, x)
        return domain.clamp(x + delta)

    def ascent_step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size) -> torch.Tensor:
        """Steepest ascent for the norm: sign of the gradient (L∞) or its direction (L2). `step_size`
        is a float or a per-sample tensor."""
        step = _per_sample(step_size, x_adv) if isinstance(step_size, torch.Tensor) else step_size
        if self.norm == "linf" and self.scale is not None:
            return x_adv + step * grad.sign() * self.scale.to(x_adv.device)
        if self.norm == "linf":
            return x_adv + step * grad.sign()
        return x_adv + step * grad / _per_sample(lp_norm(grad, "l2").clamp_min(1e-12), grad)

    def perturbation(self, x: torch.Tensor, domain: Domain):
        """The auto_LiRPA perturbation for certification. L2: the domain box is not used, which only
        loosens (never breaks) the bound."""
        from auto_LiRPA.perturbations import PerturbationLpNorm

        if self.norm == "linf":
            low, high = self.box(x, domain)
            return PerturbationLpNorm(norm=float("inf"), eps=self.epsilon, x_L=low, x_U=high)
        return PerturbationLpNorm(norm=2.0, eps=self.epsilon)


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)


def from_params(params, data=None) -> LpBall:
    """The Lp threat `params.yaml` names. For tabular data (`data`: the prepared data, with its
    feature names and training statistics) in L∞, every feature gets its own radius ε·s_i from
    the declared budgets (pipeline/budgets.py), one standard deviation when none are declared;
    integer features are marked to take integer values only."""
    cfg = params.threat
    if data is None or not getattr(data, "tabular", False):
        if cfg.features is not None:
            raise UsageError("threat.features: per-feature budgets need tabular data (breast_cancer or csv)")
        return LpBall(cfg.norm, cfg.epsilon, rationale=cfg.rationale)
    if cfg.norm != "linf":
        return LpBall(cfg.norm, cfg.epsilon, rationale=cfg.rationale)
    from pipeline.budgets import feature_radii

    radii = feature_radii(cfg, data.feature_names, data.feature_types, data.std, data.absmax)
    scale = torch.tensor([r.radius for r in radii], dtype=torch.float32)
    integer = torch.tensor([r.type == "integer" for r in radii])
    return LpBall(cfg.norm, cfg.epsilon, rationale=cfg.rationale, scale=scale,
                  integer=integer if bool(integer.any()) else None)
