"""The empirical worst case of a condition: search its parameter box for a misclassification.

Exhaustive enumeration where the set is finite (integer translations, patch positions), else a
grid, random draws and, where the transform is differentiable in its parameters, signed-gradient
descent on the margin from the worst points found. The gradient's sign comes from forward differences
by default (`search.gradient: differences`: one more forward per parameter axis, at most two here)
or from a backward pass (`autograd`); the first is cheaper wherever a backward through the model costs
more than that many forwards (about five forwards on digits), and on the bench models both reach the
same per-sample verdicts (bench/results/conditions_cost_*.md). A sample counts as robust only when it is
classified correctly and no evaluated parameter changes the decision: an upper bound.

Cost: the (sample, parameter) copies of the grid and of the random draws go through the model in
full batches, gathered batch by batch as they are needed (the random draws stream: no batch is short
but the phase's last); a sample leaves the random and gradient phases once it is broken or was wrong
on the clean input (its verdict cannot change), and the descent once it comes back to a point it
already evaluated; the grid is always evaluated in full, since the heat map needs every sample at
every point. bench/conditions_cost.py measures the cost against plain batched forwards of the same
copies: a gradient copy costs a forward and a backward (about five forwards on digits), which no
batching removes; a difference probe is one more forward copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.conditions.threats import Condition, grid_points
from pipeline.threat import Domain
PACKED_BATCHES = 4  # random draws are evaluated in blocks of this many full batches
MARGIN_ROWS = 4096  # logits rows gathered before margins are taken (bounds their memory)
DIFFERENCE_FRACTION = 1e-3  # forward-difference step, as a share of each axis' range


def margin_and_prediction(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f_y − max_{j≠y} f_j (negative: misclassified) and the predicted class."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(dim=1), logits.argmax(dim=1)


class Evaluator:
    """Transforms and classifies (sample, parameter) pairs in full batches; counts the transformed
    copies it evaluated."""

    def __init__(self, model, condition: Condition, domain: Domain, batch_size: int, generator: torch.Generator):
        self.model, self.condition, self.domain = model, condition, domain
        self.batch_size, self.generator = batch_size, generator
        self.copies = 0
        self.gradient_copies = 0  # of which with a backward pass (each costs several forwards)

    def noise(self, x: torch.Tensor):
        if not self.condition.stochastic:
            return None
        return torch.randn(x.shape, generator=self.generator, device=self.generator.device).to(x.device)

    def __call__(self, x, y, theta) -> tuple[torch.Tensor, torch.Tensor]:
        """Margins and predictions, shaped (k, n), of the n samples (x, y) under k parameter sets:
        `theta` is (k, d), one point for every sample, or (k, n, d), a point per sample. The k·n
        copies go through the model point-major in batches of `batch_size` rows, each gathered
        from x as it is needed (the k copies are never held at once)."""
        n, k = len(x), len(theta)
        flat = theta.repeat_interleave(n, dim=0) if theta.dim() == 2 else theta.reshape(k * n, -1)

        def rows(start, stop):
            if start // n == (stop - 1) // n:  # inside one point's block: a view of the samples
                return x[start % n:(stop - 1) % n + 1]
            return x.index_select(0, torch.arange(start, stop, device=x.device) % n)

        def labels(start, stop):
            return y.index_select(0, torch.arange(start, stop, device=y.device) % n)

        margin, prediction = self._classify(rows, labels, flat)
        return margin.view(k, n), prediction.view(k, n)

    def pairs(self, x, y, samples, theta) -> tuple[torch.Tensor, torch.Tensor]:
        """Margins and predictions (m,) of the copies (x[samples[i]], theta[i]), gathered batch by batch."""
        return self._classify(lambda start, stop: x.index_select(0, samples[start:stop]),
                              lambda start, stop: y.index_select(0, samples[start:stop]), theta)

    def _classify(self, rows, labels, theta) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform and classify the copies rows(start, stop) under theta[start:stop] in batches; margins
        are taken over several batches' logits at once (fewer small operations, the same numbers)."""
        total = len(theta)
        margins, predictions, logits, first = [], [], [], 0
        with torch.no_grad():
            for start in range(0, total, self.batch_size):
                stop = min(start + self.batch_size, total)
                part = rows(start, stop)
                logits.append(self.model(self.condition.transform(part, theta[start:stop], self.domain,
                                                                  self.noise(part))))
                if stop - first >= MARGIN_ROWS or stop == total:
                    margin, prediction = margin_and_prediction(torch.cat(logits), labels(first, stop))
                    margins.append(margin)
                    predictions.append(prediction)
                    logits, first = [], stop
        self.copies += total
        return torch.cat(margins), torch.cat(predictions)

    def gradient(self, x, y, theta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Margins, predictions and d margin / d θ."""
        theta = theta.detach().requires_grad_(True)
        margin, prediction = margin_and_prediction(self.model(self.condition.transform(x, theta, self.domain)), y)
        (grad,) = torch.autograd.grad(margin.sum(), theta)
        self.copies += len(x)
        self.gradient_copies += len(x)
        return margin.detach(), prediction, grad

    def difference_signs(self, x, y, samples, theta, known=None):
        """Margins and predictions at theta (m, d) of the samples `samples` (m,), and the sign of each
        d margin / d θ_i from a forward difference: one more copy per axis, stepped inwards from the
        box's upper face, all in full batches. `known` (margin, prediction) at theta skips that copy.
        Also returns every copy evaluated (samples, margin, theta, prediction) for the worst-case record."""
        m, d = theta.shape
        low, high = self.condition.box(theta.device)
        h = DIFFERENCE_FRACTION * (high - low)
        inwards = torch.where(theta + h <= high, 1.0, -1.0).to(theta.dtype)  # (m, d)
        probes = theta[None] + (inwards * h)[None] * torch.eye(d, dtype=theta.dtype, device=theta.device)[:, None, :]
        points = probes.reshape(d * m, d) if known is not None else torch.cat([theta, probes.reshape(d * m, d)])
        rows = samples.repeat(len(points) // m)
        margins, predictions = self.pairs(x, y, rows, points)
        if known is None:
            margin, prediction, probed = margins[:m], predictions[:m], margins[m:]
        else:
            (margin, prediction), probed = known, margins
        signs = ((probed.view(d, m) - margin[None]).T * inwards).sign()
        return margin, prediction, signs, (rows, margins, points, predictions)


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
    copies_per_sample: int  # the budget: the most transformed copies one sample is given
    exhaustive: bool
    grid: np.ndarray  # (M, d) grid points
    grid_accuracy: np.ndarray  # (M,) accuracy at each grid point
    copies_evaluated: int = 0  # transformed copies actually evaluated, all samples (early exit saves the rest)
    gradient_copies: int = 0  # of which evaluated with a gradient


def _uniform(n: int, condition: Condition, generator: torch.Generator, device, draws: int | None = None) -> torch.Tensor:
    """n uniform parameter points (n, d), or `draws` sets of them (draws, n, d): the same numbers as
    `draws` calls of n points in turn."""
    low, high = condition.box(device)
    shape = (n, condition.dims) if draws is None else (draws, n, condition.dims)
    draw = torch.rand(shape, generator=generator, device=generator.device).to(device)
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
    budget = len(points)
    if len(points):
        grid = torch.as_tensor(points, device=device)
        margin, prediction = evaluate(x, y, grid)  # (points, n): the heat map needs every cell
        grid_accuracy = (prediction == y).double().mean(dim=1).cpu().numpy()
        _update_best(worst, None, margin, grid, prediction)
    if finite is None:
        draws = cfg.random if random_draws is None else random_draws
        if draws:
            _random(evaluate, x, y, condition, worst, clean_correct, generator, draws)
        budget += draws
        if condition.differentiable and "gradient" in use:
            steps = cfg.steps if gradient_steps is None else gradient_steps
            budget += _descend(evaluate, x, y, condition, cfg, worst, generator, steps, clean_correct)
    broken = worst.prediction != y
    broken &= worst.prediction >= 0
    return SearchOutcome(clean_correct, clean_correct & ~broken, worst, budget, finite is not None, points,
                         grid_accuracy, evaluate.copies, evaluate.gradient_copies)


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


def _update_best(worst: Worst, rows: torch.Tensor | None, margin, theta, prediction) -> None:
    """The best of k evaluations of the samples `rows` (None: all): margin and prediction (k, samples),
    theta (k, d) or (k, samples, d). The first of equal minima wins, as in evaluation order. A NaN margin
    (non-finite logits) counts as no evidence either way: `min` would return it and hide a breaking draw."""
    margin = torch.nan_to_num(margin, nan=float("inf"))
    if len(margin) == 1:
        margin, prediction = margin[0], prediction[0]
        theta = theta[0].expand(len(margin), -1) if theta.dim() == 2 else theta[0]
    else:
        margin, best = margin.min(dim=0)
        prediction = prediction.gather(0, best[None]).squeeze(0)
        theta = theta[best] if theta.dim() == 2 else theta[best, torch.arange(len(best), device=best.device)]
    if rows is None:
        worst.update(margin, theta, prediction)
    else:
        _update_rows(worst, rows, margin, theta, prediction)


def _random(evaluate: Evaluator, x, y, condition: Condition, worst: Worst, clean_correct, generator,
            draws: int) -> None:
    """`draws` uniform parameters per sample. Every draw is made, in order, before any is evaluated
    (the random stream does not depend on which samples are left). The (draw, sample) copies of the
    samples still alive are evaluated draw-major in blocks of whole batches: a block may end inside a
    draw, the next one starts where it stopped with the samples still alive, so no batch is short
    but the phase's last."""
    n = len(x)
    thetas = _uniform(n, condition, generator, x.device, draws)  # (draws, n, d)
    done = torch.zeros(n, dtype=torch.int64, device=x.device)  # draws evaluated, per sample
    block = PACKED_BATCHES * evaluate.batch_size
    while True:
        pending = _alive(worst, y, clean_correct)
        pending = pending[done[pending] < draws]
        if not len(pending):
            return
        # the pending samples are at most one draw apart: the lagging ones finish their draw first
        draw = int(done[pending].min())
        lagging = pending[done[pending] == draw]
        count = min(block, len(lagging) + len(pending) * (draws - draw - 1))
        rest = torch.arange(max(count - len(lagging), 0), device=x.device)
        samples = torch.cat([lagging, pending[rest % len(pending)]])[:count]
        drawn = torch.cat([torch.full_like(lagging, draw), draw + 1 + rest // len(pending)])[:count]
        theta = thetas[drawn, samples]
        margin, prediction = evaluate.pairs(x, y, samples, theta)
        _update_each(worst, samples, margin, theta, prediction)
        done += torch.bincount(samples, minlength=n)


def _update_each(worst: Worst, samples: torch.Tensor, margin, theta, prediction) -> None:
    """`Worst.update` from evaluations (m,) of the samples `samples` (m,), a sample possibly several
    times: its lowest margin counts, the first of equal minima in evaluation order."""
    n = len(worst.margin)
    margin = torch.nan_to_num(margin, nan=float("inf"))
    lowest = torch.full((n,), float("inf"), device=margin.device).scatter_reduce(0, samples, margin, "amin")
    order = torch.arange(len(samples), device=margin.device)
    candidates = torch.where(margin == lowest[samples], order, len(samples))
    first = torch.full((n,), len(samples), device=margin.device).scatter_reduce(0, samples, candidates, "amin")
    rows = torch.nonzero(first < len(samples)).flatten()
    chosen = first[rows]
    _update_rows(worst, rows, margin[chosen], theta[chosen], prediction[chosen])


def _descend(evaluate: Evaluator, x, y, condition: Condition, cfg, worst: Worst, generator, steps: int,
             clean_correct: torch.Tensor | None = None) -> int:
    """Signed-gradient descent on the margin in parameter space, projected onto the box, the signs by
    forward differences or a backward pass (`cfg.gradient`): the first restart from the worst point
    found so far (a random point when nothing was evaluated yet), the others from random points. A
    sample leaves the descent once it is broken (by a point or a difference probe: early exit), and
    once its next point is one its descent already evaluated: the transform and the model are
    deterministic, so from there the descent would repeat itself (a corner the gradient pushes out of,
    or a step that oscillates across a minimum). Only nearly: a forward over fewer samples may differ
    in the last bits, which can flip the sign of a gradient component that is almost zero. The same
    seed still gives the same result; the exit's equivalence to a descent without it is tested, not proven. On digits 97% of the samples that start
    at the worst grid point reach such a point within one step (bench/results/conditions_cost_digits.md).
    Returns the budget: the most transformed copies it can give one sample (each step the point, plus one
    probe per axis for differences; each descent's last point; a start with a known margin saves a copy)."""
    low, high = condition.box(x.device)
    step = cfg.step_fraction * (high - low)
    if clean_correct is None:
        clean_correct = torch.ones(len(x), dtype=torch.bool, device=x.device)
    differences = cfg.gradient == "differences"
    budget = cfg.restarts * (steps * (1 + condition.dims * differences) + 1)
    for restart in range(cfg.restarts):
        from_worst = restart == 0 and bool(torch.isfinite(worst.margin).all())
        if from_worst and differences and steps:
            budget -= 1  # the first difference step reuses the start's known margin
        theta = worst.theta.clone() if from_worst else _uniform(len(x), condition, generator, x.device)
        alive = _alive(worst, y, clean_correct)
        theta = theta[alive]
        # the worst point's margin is known: a difference estimate needs only the probes there
        known = (worst.margin[alive], worst.prediction[alive]) if from_worst else None
        visited = theta[None]  # (points so far, alive samples, d): this descent's evaluated points
        for _ in range(steps):
            if not len(alive):
                break
            if not differences:
                margin, prediction, grad = evaluate.gradient(x[alive], y[alive], theta)
                direction = grad.sign()
                _update_rows(worst, alive, margin, theta, prediction)
            else:
                margin, prediction, direction, copies = evaluate.difference_signs(x, y, alive, theta, known)
                _update_each(worst, *copies)  # a probe that breaks the sample counts
                known = None
            theta = torch.maximum(torch.minimum(theta - step * direction, high), low)
            unbroken = (prediction == y[alive]) & (worst.prediction[alive] == y[alive])
            new = unbroken & ~(visited == theta[None]).all(dim=2).any(dim=0)
            alive, theta, visited = alive[new], theta[new], torch.cat([visited[:, new], theta[new][None]])
        if len(alive):
            margin, prediction = evaluate(x[alive], y[alive], theta[None])
            _update_rows(worst, alive, margin[0], theta, prediction[0])
    return budget
