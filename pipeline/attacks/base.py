"""The base class enforces the threat model so no attack has to be trusted to.

Following foolbox: `__call__` is the only entry point; it evaluates the model in
eval mode (restoring its mode after), and projects whatever `run` returns onto
the ε-ball intersected with the data domain.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from pipeline.threat import Domain, LpBall


class Attack(ABC):
    name: str = "attack"

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: LpBall,
        domain: Domain,
        generator: torch.Generator,
    ) -> torch.Tensor:
        if not domain.contains(x, tol=1e-6):
            raise ValueError(f"{self.name}: clean inputs lie outside the data domain")
        was_training = model.training
        model.eval()
        try:
            x_adv = self.run(model, x, y, threat, domain, generator)
        finally:
            model.train(was_training)
        return threat.project(x_adv.detach(), x, domain)

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: LpBall,
        domain: Domain,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Return candidate adversarial inputs (projected by the caller)."""

    def settings(self) -> dict:
        """Hyperparameters, for the metrics and the report."""
        return {}

    @staticmethod
    def until_broken(x: torch.Tensor, attempts: int, attempt) -> torch.Tensor:
        """Run `attempt(idx) -> (candidates, broken)` up to `attempts` times on the samples not yet
        broken; a sample keeps its first breaking point, else its last candidate."""
        best = x.clone()
        pending = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for _ in range(attempts):
            idx = pending.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            candidate, broken = attempt(idx)
            best[idx] = candidate
            pending[idx[broken]] = False
        return best

