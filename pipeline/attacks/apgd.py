"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): PGD with momentum and a step size that
halves at checkpoints when progress stalls, so no step size has to be tuned.

`loss="ce"` is APGD-CE, `loss="dlr"` APGD-DLR; `APGDTargeted` runs the targeted DLR
loss against the `targets` most likely wrong classes (APGD-T). L∞ and L2, inside
the data domain. The best point found (first misclassifying, else highest loss) is
returned.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.attacks.base import Attack
from pipeline.attacks.losses import MIN_CLASSES, loss_and_gradient
from pipeline.threat import Domain, LpBall


def checkpoints(steps: int) -> set[int]:
    """Iterations at which the step size may halve: w_j = ceil(p_j * steps)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(round(q * steps, 9)) for q in p[1:]}  # round: 0.22 + 0.19 is not exactly 0.41
    return {m for m in marks if m < steps}


class APGD(Attack):
    def __init__(self, steps: int = 100, restarts: int = 1, loss: str = "ce", rho: float = 0.75,
                 momentum: float = 0.75):
        if steps < 1 or restarts < 1 or loss not in ("ce", "dlr"):
            raise ValueError("APGD needs steps >= 1, restarts >= 1 and loss 'ce' or 'dlr'")
        self.steps, self.restarts, self.loss, self.rho, self.momentum = steps, restarts, loss, rho, momentum
        self.name = f"apgd_{loss}"

    @property
    def min_classes(self) -> int:
        return MIN_CLASSES[self.loss]

    def settings(self) -> dict:
        return {"steps": self.steps, "restarts": self.restarts, "loss": self.loss, "rho": self.rho,
                "momentum": self.momentum, "initial_step": "2ε"}

    def _runs(self, model, x, y):
        """(loss, target) pairs to try; untargeted: one run with no target."""
        return [(self.loss, None)]

    def run(self, model: nn.Module, x, y, threat: LpBall, domain: Domain, generator: torch.Generator):
        runs = [(loss, target) for loss, target in self._runs(model, x, y) for _ in range(self.restarts)]
        schedule = iter(runs)

        def attempt(idx):
            loss, target = next(schedule)
            t = None if target is None else target[idx]
            return self.attack_once(model, x[idx], y[idx], threat, domain, generator, loss, t)

        return self.until_broken(x, len(runs), attempt)

    def attack_once(self, model, x, y, threat: LpBall, domain, generator, loss: str, target=None):
        batch = len(x)
        marks = checkpoints(self.steps)
        eta = torch.full((batch,), 2.0 * threat.epsilon, device=x.device)
        x_adv = threat.random_start(x, domain, generator)
        values, grad, logits = loss_and_gradient(model, x_adv, y, loss, target)
        found = logits.argmax(1) != y
        x_found = x_adv.clone()
        best_loss, x_best, grad_best = values.clone(), x_adv.clone(), grad.clone()
        previous_loss = values.clone()
        x_prev = x_adv.clone()
        increases = torch.zeros(batch, device=x.device)
        reduced_at_mark = torch.ones(batch, dtype=torch.bool, device=x.device)
        best_at_mark, last_mark = best_loss.clone(), 0
        x_next = threat.project(threat.ascent_step(x_adv, grad, eta), x, domain)
        for k in range(1, self.steps):
            x_prev, x_adv = x_adv, x_next
            values, grad, logits = loss_and_gradient(model, x_adv, y, loss, target)
            newly = (logits.argmax(1) != y) & ~found
            x_found[newly] = x_adv[newly]
            found |= newly
            increases += (values > previous_loss).float()
            previous_loss = values
            improved = values > best_loss
            best_loss[improved], x_best[improved], grad_best[improved] = values[improved], x_adv[improved], grad[improved]
            if k in marks:
                stalled = increases < self.rho * (k - last_mark)
                flat = ~reduced_at_mark & (best_at_mark >= best_loss)
                reduce = stalled | flat
                eta[reduce] /= 2.0
                x_adv[reduce], grad[reduce], x_prev[reduce] = x_best[reduce], grad_best[reduce], x_best[reduce]
                reduced_at_mark, best_at_mark, last_mark = reduce, best_loss.clone(), k
                increases.zero_()
            z = threat.project(threat.ascent_step(x_adv, grad, eta), x, domain)
            x_next = threat.project(x_adv + self.momentum * (z - x_adv) + (1 - self.momentum) * (x_adv - x_prev),
                                    x, domain)
        with torch.no_grad():
            last_found = (model(x_next).argmax(1) != y) & ~found
        x_found[last_found] = x_next[last_found]
        found |= last_found
        return torch.where(found.view(-1, *([1] * (x.dim() - 1))), x_found, x_best), found


class APGDTargeted(APGD):
    """APGD-T: targeted DLR loss against each of the `targets` most likely wrong classes."""

    def __init__(self, steps: int = 100, restarts: int = 1, targets: int = 3, rho: float = 0.75,
                 momentum: float = 0.75):
        super().__init__(steps, restarts, "ce", rho, momentum)
        if targets < 1:
            raise ValueError("APGD-T needs targets >= 1")
        self.loss, self.targets, self.name = "dlr_targeted", targets, "apgd_t"

    def settings(self) -> dict:
        return {**super().settings(), "loss": "dlr_targeted", "targets": self.targets}

    def _runs(self, model, x, y):
        with torch.no_grad():
            logits = model(x)
        logits[torch.arange(len(y), device=y.device), y] = float("-inf")
        ranked = logits.argsort(dim=1, descending=True)
        count = min(self.targets, logits.shape[1] - 1)
        return [("dlr_targeted", ranked[:, rank]) for rank in range(count)]
