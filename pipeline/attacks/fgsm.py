"""FGSM / FGM (Goodfellow et al. 2015): one gradient step of size ε.

Distance: L∞ (sign of the gradient) or L2 (normalised gradient). Inputs in the
data domain box; no random start.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.base import Attack
from pipeline.attacks.losses import loss_and_gradient
from pipeline.threat import Domain, LpBall


class FGSM(Attack):
    name = "fgsm"

    def run(self, model: nn.Module, x, y, threat: LpBall, domain: Domain, generator: torch.Generator):
        _, grad, _ = loss_and_gradient(model, x, y, "ce")
        # A full ε step leaves the domain where a pixel is already at its bound: project it back here,
        # so FGSM itself returns a point of the threat model (the base class projects again only as a net).
        return threat.project(threat.ascent_step(x, grad, threat.epsilon), x, domain)
