"""Randomized smoothing over a transform parameter, for conditions bound propagation does not reach
(rotation with bilinear interpolation): Cohen et al. 2019's CERTIFY applied to the angle, as in
Fischer et al. 2020 ("Certified defense to image transformations via randomized smoothing") and
Li et al. 2021 (TSS).

What is certified. For an input x let h_x(θ) = f(T(x, θ)) be the base classifier on x rotated by θ
(one resampling of x). The smoothed classifier over θ ~ N(0, σ²) shifted by an angle offset Δ is
    g(x; Δ) = argmax_c P_{θ~N(0,σ²)}[h_x(θ + Δ) = c].
CERTIFY draws n angles, bounds the top class's probability from below by p_A (one-sided
Clopper-Pearson at level α) and returns R = σ·Φ⁻¹(p_A) in degrees: with probability at least 1 − α
over the draws, g(x; Δ) = c_A for every |Δ| < R (Cohen et al.'s Theorem 1 on the one-dimensional
function θ ↦ h_x(θ), where shifting the parameter is exactly additive).

The gap, stated rather than hidden: the certificate speaks of rotating the original x by θ + Δ in one
resampling. A camera image that was already rotated by Δ and resampled is a different input:
T(T(x, Δ), θ) ≠ T(x, θ + Δ), because bilinear interpolation and the zero-filled corners do not
compose additively. So what is certified is the smoothed classifier over the idealised (continuous,
additive) rotation family of x, not g applied to a resampled image; `interpolation_gap` measures how
far apart the two inputs are on the evaluated samples (Fischer et al. close it with an L2 smoothing
bound on top; not done here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import binomtest, norm

from pipeline.certify.smoothing import ABSTAIN, SmoothedCertificate, lower_confidence_bound
from pipeline.conditions.threats import Condition
from pipeline.threat import Domain


class ParameterSmooth:
    """g(x; Δ) over θ ~ N(0, σ²) on the condition's single parameter (degrees for rotation)."""

    def __init__(self, base, condition: Condition, domain: Domain, num_classes: int, sigma: float,
                 generator: torch.Generator, batch_size: int = 1024):
        if condition.dims != 1 or sigma <= 0:
            raise ValueError("parameter smoothing needs a one-parameter condition and σ > 0")
        self.base, self.condition, self.domain = base.eval(), condition, domain
        self.num_classes, self.sigma, self.generator, self.batch_size = num_classes, sigma, generator, batch_size
        self.forward_passes = 0

    def counts(self, x: torch.Tensor, num: int, offset: float = 0.0) -> torch.Tensor:
        """Class counts of the base classifier on `num` copies of one input x rotated by offset + σ·N(0, 1)."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        with torch.no_grad():
            for start in range(0, num, self.batch_size):
                size = min(self.batch_size, num - start)
                theta = offset + self.sigma * torch.randn((size, 1), generator=self.generator).to(x.device)
                moved = self.condition.transform(x.unsqueeze(0).expand(size, *x.shape), theta, self.domain)
                counts += torch.bincount(self.base(moved).argmax(1), minlength=self.num_classes)
                self.forward_passes += size
        return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float) -> SmoothedCertificate:
        """Cohen et al.'s CERTIFY over the parameter: the class and the radius R (parameter units)."""
        guess = int(self.counts(x, n0).argmax())  # selection draws are not reused for estimation
        p_a = lower_confidence_bound(int(self.counts(x, n)[guess]), n, alpha)
        if p_a <= 0.5:
            return SmoothedCertificate(ABSTAIN, 0.0, p_a)
        return SmoothedCertificate(guess, self.sigma * float(norm.ppf(p_a)), p_a)

    def predict(self, x: torch.Tensor, n: int, alpha: float, offset: float = 0.0) -> int:
        """Cohen et al.'s PREDICT of g(x; offset): abstains unless a binomial test separates the top two."""
        top2 = self.counts(x, n, offset).topk(2)
        count_a, count_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(count_a, count_a + count_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])


@dataclass
class SmoothingOutcome:
    predictions: torch.Tensor  # (N,) class of g(x; 0) or ABSTAIN
    radii: torch.Tensor  # (N,) certified |Δ| (0 when abstaining)
    certified: torch.Tensor  # (N,) bool: correct and R ≥ the condition's radius
    radius: float  # the condition's radius max(|low|, |high|)
    offsets_checked: int  # certified samples re-predicted at the range's ends
    disagreements: int  # of those, a non-abstaining prediction ≠ the certified class
    gap_mean: float  # mean over samples of max |T(T(x, Δ), θ) − T(x, θ + Δ)| at Δ = radius
    gap_max: float
    forward_passes: int


def interpolation_gap(condition: Condition, x: torch.Tensor, domain: Domain, offset: float,
                      generator: torch.Generator, sigma: float) -> torch.Tensor:
    """Per sample, max pixel difference between the resampled-twice input T(T(x, Δ), θ) and the input the
    certificate speaks of, T(x, θ + Δ), at one angle θ ~ N(0, σ²): the non-additivity of discrete rotation."""
    theta = sigma * torch.randn((len(x), 1), generator=generator).to(x.device)
    delta = torch.full_like(theta, offset)
    with torch.no_grad():
        twice = condition.transform(condition.transform(x, delta, domain), theta, domain)
        once = condition.transform(x, theta + delta, domain)
    return (twice - once).abs().flatten(1).amax(1)


def smooth_condition(model, x, y, condition: Condition, domain: Domain, num_classes: int, cfg,
                     generator: torch.Generator, batch_size: int) -> SmoothingOutcome:
    """CERTIFY each sample; certified at the condition's radius when correct and R ≥ max(|low|, |high|).
    Each such certificate is cross-checked by PREDICT at Δ = low and Δ = high (a probabilistic check: a
    disagreement is either the α-event or a fault, so it is counted and reported, not raised)."""
    smooth = ParameterSmooth(model, condition, domain, num_classes, cfg.sigma, generator, batch_size)
    radius = max(abs(condition.low[0]), abs(condition.high[0]))
    predictions, radii = [], []
    for i in range(len(x)):
        certificate = smooth.certify(x[i], cfg.n0, cfg.n, cfg.alpha)
        predictions.append(certificate.prediction)
        radii.append(certificate.radius)
    predictions, radii = torch.tensor(predictions), torch.tensor(radii)
    certified = (predictions == y.cpu()) & (radii >= radius)
    checked = disagreements = 0
    for i in torch.nonzero(certified).flatten().tolist():
        for offset in (condition.low[0], condition.high[0]):
            checked += 1
            answer = smooth.predict(x[i], cfg.n, cfg.alpha, offset)
            disagreements += int(answer not in (ABSTAIN, int(predictions[i])))
    gap = interpolation_gap(condition, x, domain, radius, generator, cfg.sigma)
    return SmoothingOutcome(predictions, radii, certified, radius, checked, disagreements,
                            float(gap.mean()) if len(gap) else 0.0, float(gap.max()) if len(gap) else 0.0,
                            smooth.forward_passes)


def largest_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """R when all n draws agree: σ·Φ⁻¹(α^{1/n}), the most n draws can certify."""
    return sigma * float(norm.ppf(math.exp(math.log(alpha) / n)))
