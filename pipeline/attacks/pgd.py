"""PGD (Madry et al. 2018): projected gradient ascent on the cross-entropy or the CW margin.

Random uniform start in the ε-ball, `steps` steps (sign gradient for L∞,
normalised gradient for L2), projection onto the ε-ball and the domain after
every step, a constant or cosine-decayed step size. With `restarts` > 1 a
sample counts as broken if any restart breaks it; the first breaking point is kept.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.attacks.base import Attack
from pipeline.attacks.losses import loss_and_gradient
from pipeline.threat import Domain, LpBall

SCHEDULES = ("constant", "cosine")


class PGD(Attack):
    name = "pgd"

    def __init__(self, steps: int, step_size: float, restarts: int = 1, random_init: bool = True,
                 loss: str = "ce", schedule: str = "constant"):
        if steps < 1 or restarts < 1 or step_size <= 0:
            raise ValueError("PGD needs steps >= 1, restarts >= 1 and step_size > 0")
        if schedule not in SCHEDULES or loss not in ("ce", "cw"):
            raise ValueError(f"PGD: unknown schedule {schedule!r} or loss {loss!r}")
        self.steps, self.step_size, self.restarts = steps, step_size, restarts
        self.random_init, self.loss, self.schedule = random_init, loss, schedule
        if loss == "cw":
            self.name = "pgd_cw"

    def settings(self) -> dict:
        return {"steps": self.steps, "step_size": self.step_size, "restarts": self.restarts,
                "loss": self.loss, "schedule": self.schedule}

    def step_size_at(self, step: int) -> float:
        if self.schedule == "cosine":
            return self.step_size * 0.5 * (1 + math.cos(math.pi * step / self.steps))
        return self.step_size

    def perturb(self, model: nn.Module, x, y, threat: LpBall, domain: Domain, generator: torch.Generator):
        """One restart: the raw PGD iterate (also used by adversarial training)."""
        x_adv = threat.random_start(x, domain, generator) if self.random_init else x.clone()
        if threat.norm == "linf":  # the ε-box meets the domain box in one box: one clamp per step
            low, high = threat.box(x, domain)
        for step in range(self.steps):
            _, grad, _ = loss_and_gradient(model, x_adv, y, self.loss)
            if threat.norm == "linf":
                x_adv = torch.clamp(threat.ascent_step(x_adv, grad, self.step_size_at(step)), low, high)
            else:
                x_adv = threat.project(threat.ascent_step(x_adv, grad, self.step_size_at(step)), x, domain)
        return x_adv

    def run(self, model: nn.Module, x, y, threat: LpBall, domain: Domain, generator: torch.Generator):
        def attempt(idx):
            candidate = self.perturb(model, x[idx], y[idx], threat, domain, generator)
            with torch.no_grad():
                return candidate, model(candidate).argmax(1) != y[idx]

        return self.until_broken(x, self.restarts, attempt)
