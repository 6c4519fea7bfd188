"""The empirical worst case of a condition: search its parameter box for a misclassification.

Exhaustive enumeration where the set is finite (integer translations, patch positions), else a
grid, random draws and, where the transform is differentiable in its parameters, signed-gradient
descent on the margin from the worst points found. A sample counts as robust only when it is
classified correctly and no evaluated parameter changes the decision: an upper bound.
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
    copies_per_sample: int  # transformed copies evaluated per sample (the search's cost)
    exhaustive: bool
    grid: np.ndarray  # (M, d) grid points
    grid_accuracy: np.ndarray  # (M,) accuracy at each grid point


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
    for i, point in enumerate(points):
        theta = torch.as_tensor(point, device=device).expand(n, -1).contiguous()
        margin, prediction = evaluate(x, y, theta)
        worst.update(margin, theta, prediction)
        grid_accuracy[i] = float((prediction == y).float().mean())
    if finite is None:
        for _ in range(cfg.random if random_draws is None else random_draws):
            theta = _uniform(n, condition, generator, device)
            worst.update(*_pair(evaluate(x, y, theta), theta))
        if condition.differentiable and "gradient" in use:
            _descend(evaluate, x, y, condition, cfg, worst, generator,
                     cfg.steps if gradient_steps is None else gradient_steps)
    broken = worst.prediction != y
    broken &= worst.prediction >= 0
    return SearchOutcome(clean_correct, clean_correct & ~broken, worst, evaluate.copies // max(n, 1),
                         finite is not None, points, grid_accuracy)


def _pair(result, theta):
    margin, prediction = result
    return margin, theta, prediction


def _descend(evaluate: Evaluator, x, y, condition: Condition, cfg, worst: Worst, generator, steps: int) -> None:
    """Signed-gradient descent on the margin in parameter space, projected onto the box: the first
    restart from the worst point found so far (a random point when nothing was evaluated yet),
    the others from random points."""
    low, high = condition.box(x.device)
    step = cfg.step_fraction * (high - low)
    for restart in range(cfg.restarts):
        if restart == 0 and torch.isfinite(worst.margin).all():
            theta = worst.theta.clone()
        else:
            theta = _uniform(len(x), condition, generator, x.device)
        for _ in range(steps):
            margin, prediction, grad = evaluate.gradient(x, y, theta)
            worst.update(margin, theta, prediction)
            theta = torch.maximum(torch.minimum(theta - step * grad.sign(), high), low)
        worst.update(*_pair(evaluate(x, y, theta), theta))
