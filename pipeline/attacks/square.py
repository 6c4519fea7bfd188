"""Square attack (Andriushchenko et al. 2020): score-based random search, no gradients.

Because it only reads the model's logits, gradient masking cannot hide from it: a
Square attack beating the gradient attacks is a red flag for the evaluation. L∞
follows the paper (vertical-stripe start, ±ε squares whose size shrinks on the
paper's schedule, accepted when the margin loss drops). For L2 this is a simpler
random search with the same square windows, projected onto the L2 ball; the report
names it as such. Inputs that are not images are treated as one row of pixels.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.attacks.base import Attack
from pipeline.attacks.losses import cw_margin
from pipeline.threat import Domain, LpBall

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # on a 10,000-query budget


def square_fraction(p_init: float, query: int, queries: int) -> float:
    scaled = int(query / queries * 10000)
    return p_init / 2 ** sum(scaled > t for t in _HALVINGS)


class Square(Attack):
    name = "square"

    def __init__(self, queries: int = 1000, p_init: float = 0.8, restarts: int = 1):
        if queries < 1 or not 0 < p_init <= 1 or restarts < 1:
            raise ValueError("Square needs queries >= 1, 0 < p_init <= 1 and restarts >= 1")
        self.queries, self.p_init, self.restarts = queries, p_init, restarts

    def settings(self) -> dict:
        return {"queries": self.queries, "p_init": self.p_init, "restarts": self.restarts, "loss": "margin",
                "gradient_free": True}

    def run(self, model: nn.Module, x, y, threat: LpBall, domain: Domain, generator: torch.Generator):
        def attempt(idx):
            candidate, margin = self.search(model, x[idx], y[idx], threat, domain, generator)
            return candidate, margin < 0

        return self.until_broken(x, self.restarts, attempt)

    def search(self, model, x, y, threat: LpBall, domain, generator):
        epsilon, norm = threat.epsilon, threat.norm
        shape = x.shape
        images = x.view(len(x), *self._grid(shape[1:]))
        _, channels, height, width = images.shape

        def sign(*size):
            return (torch.randint(0, 2, size, generator=generator, device=generator.device).float() * 2 - 1).to(x.device)

        radius = torch.as_tensor(threat.radius(x), dtype=x.dtype, device=x.device).expand(shape).reshape(images.shape)
        if norm == "linf":
            start = images + radius * sign(len(x), channels, 1, width)
        else:
            start = images + epsilon / math.sqrt(images[0].numel()) * sign(len(x), channels, 1, width)
        current = threat.project(start.view(shape), x, domain).view_as(images)
        margin = margin_of_subset(model, current, y, shape)
        for query in range(1, self.queries):
            active = (margin > 0).nonzero().squeeze(1)
            if len(active) == 0:
                break
            fraction = square_fraction(self.p_init, query, self.queries)
            side_h = max(1, min(height, round(math.sqrt(fraction * height * width)))) if height > 1 else 1
            side_w = max(1, min(width, round(fraction * width if height == 1 else math.sqrt(fraction * height * width))))
            top = int(torch.randint(0, height - side_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - side_w + 1, (1,), generator=generator))
            proposal = current[active].clone()
            window = (slice(None), slice(None), slice(top, top + side_h), slice(left, left + side_w))
            if norm == "linf":
                proposal[window] = images[active][window] + radius[active][window] * sign(len(active), channels, 1, 1)
            else:
                step = epsilon / math.sqrt(side_h * side_w * channels)
                proposal[window] = proposal[window] + step * sign(len(active), channels, 1, 1)
            proposal = threat.project(proposal.view(len(active), *shape[1:]), x[active], domain)
            proposal = proposal.view(len(active), channels, height, width)
            new_margin = margin_of_subset(model, proposal, y[active], shape)
            better = new_margin < margin[active]
            current[active[better]] = proposal[better]
            margin[active[better]] = new_margin[better]
        return current.view(shape), margin

    @staticmethod
    def _grid(features: tuple[int, ...]) -> tuple[int, int, int]:
        if len(features) == 3:
            return tuple(features)
        count = 1
        for size in features:
            count *= size
        return (1, 1, count)


def margin_of_subset(model, candidate, y, shape):
    """True-class logit minus the best other one: > 0 while the sample is still classified correctly."""
    with torch.no_grad():
        return -cw_margin(model(candidate.view(len(candidate), *shape[1:])), y)
