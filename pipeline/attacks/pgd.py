"""PGD (Madry et al. 2018): projected gradient ascent on the cross-entropy.

Random uniform start in the ε-ball, `steps` steps of size `step_size` (sign
gradient for L∞, normalised gradient for L2), projection onto the ε-ball and
the domain after every step. With `restarts` > 1 a sample counts as broken if
any restart breaks it; the first breaking point is kept.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.base import Attack, loss_gradient
from pipeline.threat import Domain, ascent_step, project, random_start


class PGD(Attack):
    name = "pgd"

    def __init__(self, steps: int, step_size: float, restarts: int = 1, random_init: bool = True):
        if steps < 1 or restarts < 1 or step_size <= 0:
            raise ValueError("PGD needs steps >= 1, restarts >= 1 and step_size > 0")
        self.steps, self.step_size, self.restarts, self.random_init = steps, step_size, restarts, random_init

    def settings(self) -> dict:
        return {"steps": self.steps, "step_size": self.step_size, "restarts": self.restarts, "loss": "ce"}

    def perturb(self, model: nn.Module, x, y, epsilon: float, norm: str, domain: Domain, generator: torch.Generator):
        """One restart: the raw PGD iterate (also used by adversarial training)."""
        x_adv = random_start(x, epsilon, norm, domain, generator) if self.random_init else x.clone()
        for _ in range(self.steps):
            x_adv = ascent_step(x_adv, loss_gradient(model, x_adv, y), self.step_size, norm)
            x_adv = project(x_adv, x, epsilon, norm, domain)
        return x_adv

    def run(self, model: nn.Module, x, y, epsilon: float, norm: str, domain: Domain, generator: torch.Generator):
        best = x.clone()
        pending = torch.ones(len(x), dtype=torch.bool)
        for _ in range(self.restarts):
            idx = pending.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            candidate = self.perturb(model, x[idx], y[idx], epsilon, norm, domain, generator)
            best[idx] = candidate
            with torch.no_grad():
                broken = model(candidate).argmax(1) != y[idx]
            pending[idx[broken]] = False
        return best
