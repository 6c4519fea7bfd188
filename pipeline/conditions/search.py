"""The empirical worst case of a condition: search its parameter box for a misclassification.

Exhaustive enumeration where the set is finite (integer translations, patch positions), else a
grid, random draws and, where the transform is differentiable in its parameters, signed-gradient
descent on the margin from the worst points found. A sample counts as robust only when it is
classified correctly and no evaluated parameter changes the decision: an upper bound.

Cost: grid points and random draws of all samples share batched forwards (several parameter points
per forward when the samples are fewer than the batch), and a sample leaves the random and gradient
phases once it is broken or was wrong on the clean input (its verdict cannot change); the grid is
always evaluated in full, since the heat map needs every sample at every point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.conditions.threats import Condition, grid_points
from pipeline.threat import Domain


def margin_and_prediction(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f_y − max_{j≠y} f_j (negative: misclassified) and the predicted class."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values, logits.argmax(dim=1)


class Evaluator:
    """Transforms and classifies batches; counts the transformed copies it evaluated."""

    def __init__(self, model, condition: Condition, domain: Domain, batch_size: int, generator: torch.Generator):
        self.model, self.condition, self.domain = model, condition, domain
        self.batch_size, self.generator = batch_size, generator
        self.copies = 0

    def noise(self, x: torch.Tensor):
        if not self.condition.stochastic:
            return None
        return torch.randn(x.shape, generator=self.generator, device=self.generator.device).to(x.device)

    def __call__(self, x, y, theta) -> tuple[torch.Tensor, torch.Tensor]:
        margins, predictions = [], []
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                part = slice(start, start + self.batch_size)
                moved = self.condition.transform(x[part], theta[part], self.domain, self.noise(x[part]))
                margin, prediction = margin_and_prediction(self.model(moved), y[part])
                margins.append(margin)
                predictions.append(prediction)
        self.copies += len(x)
        return torch.cat(margins), torch.cat(predictions)

    def gradient(self, x, y, theta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Margins, predictions and d margin / d θ."""
        theta = theta.detach().requires_grad_(True)
        margin, prediction = margin_and_prediction(self.model(self.condition.transform(x, theta, self.domain)), y)
        (grad,) = torch.autograd.grad(margin.sum(), theta)
        self.copies += len(x)
        return margin.detach(), prediction, grad


@dataclass
class Worst:
    """The lowest margin seen per sample, where, and what the model said there."""

    margin: torch.Tensor
    theta: torch.Tensor
    prediction: torch.Tensor

    @classmethod
    def start(cls, n: int, dims: int, device) -> "Worst":
        return cls(torch.full((n,), float("inf"), device=device), torch.zeros(n, dims, device=device),
                   torch.full((n,), -1, dtype=torch.int64, device=device))

    def update(self, margin, theta, prediction) -> None:
        better = margin < self.margin
        self.margin = torch.where(better, margin, self.margin)
        self.theta = torch.where(better[:, None], theta, self.theta)
        self.prediction = torch.where(better, prediction, self.prediction)


@dataclass
class SearchOutcome:
    clean_correct: torch.Tensor  # (N,) bool
    robust: torch.Tensor  # (N,) bool: correct, and no evaluated parameter broke it
    worst: Worst
    copies_per_sample: int  # the budget: transformed copies a sample that is never broken gets
    exhaustive: bool
    grid: np.ndarray  # (M, d) grid points
    grid_accuracy: np.ndarray  # (M,) accuracy at each grid point
    copies_evaluated: int = 0  # transformed copies actually evaluated, all samples (early exit saves the rest)


def _uniform(n: int, condition: Condition, generator: torch.Generator, device) -> torch.Tensor:
    low, high = condition.box(device)
    draw = torch.rand((n, condition.dims), generator=generator, device=generator.device).to(device)
    return low + draw * (high - low)


def search(model, x, y, condition: Condition, domain: Domain, cfg, generator: torch.Generator, batch_size: int,
           use=("grid", "random", "gradient"), random_draws: int | None = None,
           gradient_steps: int | None = None) -> SearchOutcome:
    """Worst case over the condition's parameters for each sample of (x, y). `use` picks the search
    components (the sanity check compares gradient against random search at equal budget)."""
    evaluate = Evaluator(model, condition, domain, batch_size, generator)
    n, device = len(x), x.device
    with torch.no_grad():
        _, clean_prediction = margin_and_prediction(model(x), y)
    clean_correct = clean_prediction == y
    worst = Worst.start(n, condition.dims, device)
    finite = condition.finite_set()
    gridded = "grid" in use or finite is not None
    points = grid_points(condition, cfg.grid) if gridded else np.zeros((0, condition.dims))
    grid_accuracy = np.zeros(len(points))
    per_forward = max(1, batch_size // max(n, 1))  # parameter points per batched forward (small n: several)
    budget = len(points)
    for first in range(0, len(points), per_forward):
        chunk = torch.as_tensor(points[first:first + per_forward], device=device)  # (k, d)
        theta = chunk.repeat_interleave(n, dim=0)  # point-major: k blocks of n rows
        margin, prediction = evaluate(_tile(x, len(chunk)), y.repeat(len(chunk)), theta)
        for j in range(len(chunk)):
            rows = slice(j * n, (j + 1) * n)
            worst.update(margin[rows], theta[rows], prediction[rows])
            grid_accuracy[first + j] = float((prediction[rows] == y).float().mean())
    if finite is None:
        draws = cfg.random if random_draws is None else random_draws
        if draws:
            _random(evaluate, x, y, condition, worst, clean_correct, generator, draws, per_forward)
        budget += draws
        if condition.differentiable and "gradient" in use:
            steps = cfg.steps if gradient_steps is None else gradient_steps
            _descend(evaluate, x, y, condition, cfg, worst, generator, steps, clean_correct)
            budget += cfg.restarts * (steps + 1)
    broken = worst.prediction != y
    broken &= worst.prediction >= 0
    return SearchOutcome(clean_correct, clean_correct & ~broken, worst, budget, finite is not None, points,
                         grid_accuracy, evaluate.copies)


def _pair(result, theta):
    margin, prediction = result
    return margin, theta, prediction


def _tile(x: torch.Tensor, times: int) -> torch.Tensor:
    """`times` copies of the batch, one after the other (block j holds the j-th parameter point)."""
    return x.repeat(times, *([1] * (x.dim() - 1)))


def _alive(worst: Worst, y: torch.Tensor, clean_correct: torch.Tensor) -> torch.Tensor:
    """Samples the search has not settled: correct on clean inputs and not broken yet. The others are left
    out of the random and gradient phases (early exit): no further copy can change their verdict."""
    return torch.nonzero(clean_correct & ((worst.prediction == y) | (worst.prediction < 0))).flatten()


def _update_rows(worst: Worst, rows: torch.Tensor, margin, theta, prediction) -> None:
    """`Worst.update` for the samples `rows` only."""
    better = margin < worst.margin[rows]
    chosen = rows[better]
    worst.margin[chosen] = margin[better]
    worst.theta[chosen] = theta[better]
    worst.prediction[chosen] = prediction[better]


def _random(evaluate: Evaluator, x, y, condition: Condition, worst: Worst, clean_correct, generator,
            draws: int, per_forward: int) -> None:
    """`draws` uniform parameters per sample. Every draw is made (the random stream does not depend on which
    samples are left); the samples still alive are evaluated, several draws per batched forward."""
    n = len(x)
    for first in range(0, draws, per_forward):
        count = min(per_forward, draws - first)
        thetas = [_uniform(n, condition, generator, x.device) for _ in range(count)]
        alive = _alive(worst, y, clean_correct)
        if not len(alive):
            continue
        theta = torch.cat([t[alive] for t in thetas])
        margin, prediction = evaluate(_tile(x[alive], count), y[alive].repeat(count), theta)
        for j in range(count):
            rows = slice(j * len(alive), (j + 1) * len(alive))
            _update_rows(worst, alive, margin[rows], theta[rows], prediction[rows])


def _descend(evaluate: Evaluator, x, y, condition: Condition, cfg, worst: Worst, generator, steps: int,
             clean_correct: torch.Tensor | None = None) -> None:
    """Signed-gradient descent on the margin in parameter space, projected onto the box: the first
    restart from the worst point found so far (a random point when nothing was evaluated yet),
    the others from random points. A sample leaves the descent once it is broken (early exit)."""
    low, high = condition.box(x.device)
    step = cfg.step_fraction * (high - low)
    if clean_correct is None:
        clean_correct = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for restart in range(cfg.restarts):
        if restart == 0 and torch.isfinite(worst.margin).all():
            theta = worst.theta.clone()
        else:
            theta = _uniform(len(x), condition, generator, x.device)
        alive = _alive(worst, y, clean_correct)
        theta = theta[alive]
        for _ in range(steps):
            if not len(alive):
                break
            margin, prediction, grad = evaluate.gradient(x[alive], y[alive], theta)
            _update_rows(worst, alive, margin, theta, prediction)
            theta = torch.maximum(torch.minimum(theta - step * grad.sign(), high), low)
            still = prediction == y[alive]
            alive, theta = alive[still], theta[still]
        if len(alive):
            _update_rows(worst, alive, *_pair(evaluate(x[alive], y[alive], theta), theta))
