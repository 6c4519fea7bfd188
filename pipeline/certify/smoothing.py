"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019).

The smoothed classifier g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I). CERTIFY
returns, with probability at least 1 - α over the noise, the class g predicts at x
and a radius R = σ·Φ⁻¹(p_A) such that g predicts that class everywhere within L2
distance R, where p_A is a one-sided Clopper-Pearson lower bound on the top-class
probability. When p_A ≤ 1/2 it abstains. PREDICT abstains unless a two-sided
binomial test separates the top two classes at level α.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

ABSTAIN = -1


@dataclass(frozen=True)
class SmoothedCertificate:
    prediction: int  # ABSTAIN when p_A is not above 1/2
    radius: float  # L2 radius; 0.0 when abstaining
    p_a_lower: float


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound on a probability from n_a successes in n draws, level 1 - α."""
    return float(beta.ppf(alpha, n_a, n - n_a + 1)) if n_a > 0 else 0.0


class Smooth:
    def __init__(self, base: nn.Module, num_classes: int, sigma: float, generator: torch.Generator,
                 batch_size: int = 1000):
        if sigma <= 0:
            raise ValueError("sigma must be > 0")
        self.base, self.num_classes, self.sigma = base.eval(), num_classes, sigma
        self.generator, self.batch_size = generator, batch_size
        self.forward_passes = 0  # noisy samples classified so far

    def counts(self, x: torch.Tensor, num: int) -> torch.Tensor:
        """How often the base classifier predicts each class on `num` noisy copies of one input."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        remaining = num
        with torch.no_grad():
            while remaining > 0:
                size = min(self.batch_size, remaining)
                batch = x.unsqueeze(0).expand(size, *x.shape)
                # drawn on the generator's device (CPU draws stay bit-identical), then moved to the input's
                noise = torch.randn(batch.shape, generator=self.generator, device=self.generator.device).to(x.device)
                noise = noise * self.sigma
                counts += torch.bincount(self.base(batch + noise).argmax(1), minlength=self.num_classes)
                remaining -= size
                self.forward_passes += size
        return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float) -> SmoothedCertificate:
        guess = int(self.counts(x, n0).argmax())  # selection samples are not reused for estimation
        n_a = int(self.counts(x, n)[guess])
        p_a = lower_confidence_bound(n_a, n, alpha)
        if p_a <= 0.5:
            return SmoothedCertificate(ABSTAIN, 0.0, p_a)
        return SmoothedCertificate(guess, self.sigma * float(norm.ppf(p_a)), p_a)

    def predict(self, x: torch.Tensor, n: int, alpha: float) -> int:
        counts = self.counts(x, n)
        top2 = counts.topk(2)
        count_a, count_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(count_a, count_a + count_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])
