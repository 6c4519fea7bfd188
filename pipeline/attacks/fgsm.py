"""FGSM / FGM (Goodfellow et al. 2015): one gradient step of size ε.

Distance: L∞ (sign of the gradient) or L2 (normalised gradient). Inputs in the
data domain box; no random start.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.base import Attack, loss_gradient
from pipeline.threat import Domain, ascent_step


class FGSM(Attack):
    name = "fgsm"

    def run(self, model: nn.Module, x, y, epsilon: float, norm: str, domain: Domain, generator: torch.Generator):
        return ascent_step(x, loss_gradient(model, x, y), epsilon, norm)
