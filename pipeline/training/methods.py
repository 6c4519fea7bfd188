"""Per-batch training objectives, by name.

Each method maps a batch to the loss whose gradient updates the weights. The
adversarial ones approximately solve the inner maximisation of
min_θ E[max_{‖δ‖≤ε} L(f_θ(x+δ), y)]; the certified ones minimise an upper bound
on the worst-case loss computed by bound propagation. With a condition in the context
(`train.threat` naming one of `conditions.threats`), PGD-AT, TRADES and consistency maximise
over the condition's parameters instead of the ε-ball (pipeline/conditions/training.py), and
`worst_of_k` / `augmentation` train for the condition without gradient steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.losses import loss_and_gradient
from pipeline.attacks.pgd import PGD
from pipeline.threat import Domain, LpBall


@dataclass
class BatchContext:
    threat: LpBall  # at this epoch's ε (after warm-up)
    domain: Domain
    pgd: Optional[PGD]  # the inner maximisation of the PGD-based methods
    generator: torch.Generator
    num_classes: int  # the data's: the certified methods' margin specification has K-1 rows
    noise_sigma: float = 0.25
    beta: float = 6.0  # TRADES / MART regularisation weight
    awp_gamma: float = 0.005
    awp_base: str = "pgd_at"
    consistency_weight: float = 1.0
    consistency_temperature: float = 0.5
    fast_at_step_factor: float = 1.25
    ramp: float = 1.0  # fraction of the ε warm-up done: drives the κ and β schedules
    kappa_end: float = 0.5
    beta_end: float = 0.0  # crown_ibp: final weight of the CROWN-IBP bound (Zhang et al. 2020 end at 0)
    bounds: Any = None  # a BoundComputer-like object for certified training
    after_backward: list = field(default_factory=list)  # callbacks run between backward and step (AWP)
    condition: Any = None  # a pipeline.conditions Condition: the inner maximisation is over its parameters
    worst_of_k: int = 8  # random parameter draws per sample before the gradient steps (conditions)


def _no_threat(ctx: BatchContext) -> bool:
    """Nothing to maximise over: the Lp ball at ε = 0 (a condition always has its box)."""
    return ctx.condition is None and ctx.threat.epsilon == 0


def _condition_point(model: nn.Module, x, ctx: BatchContext, loss, steps: Optional[int] = None) -> torch.Tensor:
    """The inner maximisation over the condition's parameters: worst of k draws, then `pgd.steps` signed
    ascent steps of `pgd.step_size` × each axis' range (read as a share of the range, not input units)."""
    from pipeline.conditions.training import inner_max

    pgd = ctx.pgd
    steps = (pgd.steps if pgd is not None else 0) if steps is None else steps
    step_fraction = pgd.step_size if pgd is not None else 0.0
    return inner_max(model, x, ctx.condition, ctx.domain, ctx.generator, loss, ctx.worst_of_k, steps,
                     step_fraction).x


def _adversarial(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    if ctx.condition is not None:
        return _condition_point(model, x, ctx, lambda logits: F.cross_entropy(logits, y, reduction="none"))
    model.eval()
    try:
        return ctx.pgd.perturb(model, x, y, ctx.threat, ctx.domain, ctx.generator).detach()
    finally:
        model.train()


def standard(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Empirical risk on clean inputs: the baseline of the accuracy-robustness trade-off."""
    return F.cross_entropy(model(x), y)


def pgd_at(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Madry et al. 2018: cross-entropy on PGD points from a random start in the ε-ball."""
    if _no_threat(ctx):
        return standard(model, x, y, ctx)
    return F.cross_entropy(model(_adversarial(model, x, y, ctx)), y)


def _trades_point(model: nn.Module, x, ctx: BatchContext) -> torch.Tensor:
    """Inner maximisation of TRADES: ascend KL(f(x) ‖ f(x')) from a small random start."""
    if ctx.condition is not None:
        with torch.no_grad():
            log_clean = F.log_softmax(model(x), dim=1)
        return _condition_point(model, x, ctx, lambda logits: _kl_rows(log_clean, F.log_softmax(logits, dim=1)))
    model.eval()
    try:
        with torch.no_grad():
            clean = F.softmax(model(x), dim=1)
        noise = torch.randn(x.shape, generator=ctx.generator, device=ctx.generator.device).to(x.device)
        x_adv = ctx.domain.clamp(x + 0.001 * noise)
        for step in range(ctx.pgd.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = ctx.threat.project(ctx.threat.ascent_step(x_adv.detach(), grad, ctx.pgd.step_size_at(step)),
                                       x, ctx.domain)
        return x_adv.detach()
    finally:
        model.train()


def trades(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Zhang et al. 2019: CE on clean inputs + β·KL(f(x) ‖ f(x')), x' maximising the KL."""
    if _no_threat(ctx):
        return standard(model, x, y, ctx)
    x_adv = _trades_point(model, x, ctx)
    logits = model(x)
    return F.cross_entropy(logits, y) + ctx.beta * kl_divergence(logits, model(x_adv))


def mart(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Wang et al. 2020: boosted CE on x' + β·KL(f(x) ‖ f(x')) weighted by 1 − p_y(x)."""
    if ctx.threat.epsilon == 0:
        return standard(model, x, y, ctx)
    x_adv = _adversarial(model, x, y, ctx)
    adv_logits, clean_logits = model(x_adv), model(x)
    adv_prob = F.softmax(adv_logits, dim=1)
    others = adv_prob.clone()
    others[torch.arange(len(y), device=y.device), y] = 0.0
    boosted = F.cross_entropy(adv_logits, y) - torch.log(1.0001 - others.max(dim=1).values).mean()
    clean_prob = F.softmax(clean_logits, dim=1)
    kl = (clean_prob * (torch.log(clean_prob + 1e-12) - torch.log(adv_prob + 1e-12))).sum(dim=1)
    true_prob = clean_prob.gather(1, y[:, None]).squeeze(1)
    return boosted + ctx.beta * (kl * (1.0 - true_prob)).mean()


def fast_at(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Wong et al. 2020: one FGSM step of size 1.25ε from a uniform random start."""
    if ctx.threat.epsilon == 0:
        return standard(model, x, y, ctx)
    model.eval()
    try:
        start = ctx.threat.random_start(x, ctx.domain, ctx.generator)
        _, grad, _ = loss_and_gradient(model, start, y, "ce")
        step = ctx.fast_at_step_factor * ctx.threat.epsilon
        x_adv = ctx.threat.project(ctx.threat.ascent_step(start, grad, step), x, ctx.domain).detach()
    finally:
        model.train()
    return F.cross_entropy(model(x_adv), y)


def awp(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Wu et al. 2020: on top of PGD-AT or TRADES, move the weights by γ·‖w‖ (per layer) along the
    ascent direction of the adversarial loss, take the gradient there, and restore the weights
    before the optimiser step."""
    base = METHODS[ctx.awp_base]
    if ctx.threat.epsilon == 0:
        return base(model, x, y, ctx)
    x_adv = _adversarial(model, x, y, ctx) if ctx.awp_base == "pgd_at" else _trades_point(model, x, ctx)
    weights = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    adv_loss = F.cross_entropy(model(x_adv), y)
    grads = torch.autograd.grad(adv_loss, weights)
    originals = [weight.detach().clone() for weight in weights]
    with torch.no_grad():
        for weight, grad in zip(weights, grads):
            weight.add_(ctx.awp_gamma * weight.norm() * grad / (grad.norm() + 1e-12))

    def restore() -> None:
        # copied back, not subtracted: (w + o) - o is not w in floating point, and data-parallel ranks
        # (each with its own o) would drift apart
        with torch.no_grad():
            for weight, original in zip(weights, originals):
                weight.copy_(original)

    ctx.after_backward.append(restore)
    if ctx.awp_base == "pgd_at":
        return F.cross_entropy(model(x_adv), y)
    logits = model(x)
    return F.cross_entropy(logits, y) + ctx.beta * kl_divergence(logits, model(x_adv))


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random ±1-pixel translation per batch: a cheap second view of image data."""
    if x.dim() != 4:
        return x
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def consistency(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Tack et al. 2022 style: adversarial examples of two views, CE on both, plus a
    temperature-scaled Jensen-Shannon consistency between their predictions."""
    if _no_threat(ctx):
        return standard(model, x, y, ctx)
    views = [x, _shift(x, ctx.generator)]
    adversarial = [_adversarial(model, view, y, ctx) for view in views]
    logits = [model(a) for a in adversarial]
    ce = sum(F.cross_entropy(z, y) for z in logits) / 2
    return ce + ctx.consistency_weight * jensen_shannon(*(z / ctx.consistency_temperature for z in logits))


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """JS divergence of two softmax distributions, batch mean, computed in log space: with
    probabilities, a class whose probability underflows to 0 gets an infinite gradient
    (d/dp p·log p) and the loss turns NaN after a few epochs of confident training."""
    log_a, log_b = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
    log_mixture = torch.logaddexp(log_a, log_b) - math.log(2.0)
    return (_kl_rows(log_a, log_mixture) + _kl_rows(log_b, log_mixture)).mean() / 2


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)), batch mean, in log space so gradients stay finite when a
    probability underflows (`F.kl_div` with a probability target returns NaN gradients there)."""
    return _kl_rows(F.log_softmax(logits_p, dim=1), F.log_softmax(logits_q, dim=1)).mean()


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _certified(model: nn.Module, x, y, ctx: BatchContext, method: str) -> torch.Tensor:
    """Gowal et al. 2018 (IBP) / Zhang et al. 2020 (CROWN-IBP): κ·CE(clean) + (1−κ)·CE(worst-case
    logits from the margin lower bounds). κ falls from 1 to κ_end and CROWN-IBP's β from 1 to
    β_end along the ε ramp."""
    clean = F.cross_entropy(model(x), y)
    if ctx.threat.epsilon == 0:
        return clean
    kappa = 1.0 - (1.0 - ctx.kappa_end) * ctx.ramp
    lower_ibp, _ = ctx.bounds.margin_bounds(x, y, ctx.threat, "ibp", ctx.num_classes, True, upper=False)
    lower = lower_ibp
    if method == "crown_ibp":
        beta = 1.0 - (1.0 - ctx.beta_end) * ctx.ramp
        if beta > 0:
            lower_crown, _ = ctx.bounds.margin_bounds(x, y, ctx.threat, "crown_ibp", ctx.num_classes, True,
                                                      upper=False)
            lower = beta * lower_crown + (1.0 - beta) * lower_ibp
    worst = torch.cat([torch.zeros(len(y), 1, device=lower.device), -lower], dim=1)  # class 0: the true class
    robust = F.cross_entropy(worst, torch.zeros(len(y), dtype=torch.long, device=y.device))
    return kappa * clean + (1.0 - kappa) * robust


def ibp(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    return _certified(model, x, y, ctx, "ibp")


def crown_ibp(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    return _certified(model, x, y, ctx, "crown_ibp")


def gaussian(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Gaussian-noise augmentation at σ: the base classifier randomized smoothing needs (Cohen et al. 2019)."""
    noise = torch.randn(x.shape, generator=ctx.generator, device=ctx.generator.device).to(x.device) * ctx.noise_sigma
    return F.cross_entropy(model(x + noise), y)


def worst_of_k(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Engstrom et al. 2019: cross-entropy on the worst of k random parameters of the condition, per sample."""
    point = _condition_point(model, x, ctx, lambda logits: F.cross_entropy(logits, y, reduction="none"), steps=0)
    return F.cross_entropy(model(point), y)


def augmentation(model: nn.Module, x, y, ctx: BatchContext) -> torch.Tensor:
    """Plain augmentation: each sample under one random parameter of the condition (the baseline to beat)."""
    from pipeline.conditions.training import augmented

    return F.cross_entropy(model(augmented(model, x, y, ctx.condition, ctx.domain, ctx.generator)), y)


METHODS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor, BatchContext], torch.Tensor]] = {
    "standard": standard,
    "pgd_at": pgd_at,
    "trades": trades,
    "mart": mart,
    "fast_at": fast_at,
    "awp": awp,
    "consistency": consistency,
    "ibp": ibp,
    "crown_ibp": crown_ibp,
    "gaussian": gaussian,
    "worst_of_k": worst_of_k,
    "augmentation": augmentation,
}
CERTIFIED = ("ibp", "crown_ibp")
CONDITION_ONLY = ("worst_of_k", "augmentation")  # methods that train for a condition, never an Lp ball
