"""The worst-case search's cost (issue 16, search cost vs floor): copies go through the model in full
batches, a sample leaves the random and gradient phases once it is broken (early exit), and the
descent once it returns to a point it already evaluated (from there it would only repeat itself).

The descent's gradient signs come from forward differences (the default) or a backward pass: the
difference tests pin that both give the same signs and verdicts. The exit test compares against
signed-gradient descent without any exit: the exit may save
copies, never change a verdict or a worst margin (exactly so only up to the last bits of batched
forwards over fewer samples; on this model it changes neither). The batching test pins that batching does not
change what the search finds (a regression guard for the batched grid, stated as such)."""
from __future__ import annotations

import pytest
import torch

from pipeline.conditions.search import search
from pipeline.conditions.threats import from_config
from pipeline.config import parse_params


def condition(spec: dict):
    params = parse_params({"conditions": {"threats": {"c": {"rationale": "test", **spec}}}})
    return from_config("c", params.conditions.threats["c"], (1, 8, 8)), params.conditions


@pytest.mark.parametrize("estimator", ["autograd", "differences"])
def test_broken_samples_leave_the_search_and_unbroken_ones_get_every_forward_copy(digits_model, estimator):
    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "brightness_contrast", "brightness": [-0.4, 0.4], "contrast": [0.5, 1.5]})
    cfg = settings.search.model_copy(update={"gradient": estimator})
    outcome = search(model, x, y, cond, domain, cfg, torch.Generator().manual_seed(0), 512)
    n, budget = len(y), outcome.copies_per_sample
    forward = cfg.grid ** 2 + cfg.random
    # a difference step adds a probe per axis (2 here); the first one reuses the known margin at its start
    per_step = 1 if estimator == "autograd" else 1 + cond.dims
    assert budget == forward + cfg.steps * per_step + 1 - (estimator == "differences")
    settled, robust = int((~outcome.robust).sum()), int(outcome.robust.sum())
    assert settled > 0
    assert outcome.copies_evaluated < n * budget  # the broken and the clean-wrong samples stopped early
    # every robust sample saw the whole grid, every draw and at least one descent step
    first_step = 1 if estimator == "autograd" else cond.dims
    assert outcome.copies_evaluated >= robust * (forward + first_step) + settled * cfg.grid ** 2
    if estimator == "autograd":
        assert robust <= outcome.gradient_copies <= outcome.copies_evaluated
    else:
        assert outcome.gradient_copies == 0  # forwards only


def test_forward_difference_signs_are_the_gradient_signs(digits_model):
    """The difference estimate takes the sign of d margin/dθ that a backward pass gives, also at the box's
    upper face, where it probes inwards; only components too small for the probe step may differ."""
    from pipeline.conditions.search import Evaluator, margin_and_prediction

    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "brightness_contrast", "brightness": [-0.4, 0.4], "contrast": [0.5, 1.5]})
    low, high = cond.box()
    theta = low + torch.rand(len(x), 2, generator=torch.Generator().manual_seed(1)) * (high - low)
    theta[: len(x) // 2, 0] = high[0]  # half the samples on the upper brightness face
    evaluate = Evaluator(model, cond, domain, 64, torch.Generator().manual_seed(0))
    margin, _, signs, copies = evaluate.difference_signs(x, y, torch.arange(len(x)), theta)
    reference, _, grad = evaluate.gradient(x, y, theta)
    assert torch.allclose(margin, reference, atol=1e-5)
    assert len(copies[0]) == 3 * len(x)  # the point and one probe per axis
    clear = grad.abs() > 1e-2 * grad.abs().max()
    assert clear[: len(x) // 2, 0].sum() > 20  # the upper-face case is exercised
    assert torch.equal(signs[clear], grad.sign()[clear])


@pytest.mark.parametrize("spec", [{"kind": "brightness", "range": [-0.3, 0.3]},
                                  {"kind": "rotation", "range": [-30, 30]},
                                  {"kind": "brightness_contrast", "brightness": [-0.4, 0.4], "contrast": [0.5, 1.5]}])
def test_the_difference_descent_finds_what_the_backpropagated_one_finds(digits_model, spec):
    model, x, y, domain = digits_model
    cond, settings = condition(spec)
    found = {}
    for estimator in ("autograd", "differences"):
        cfg = settings.search.model_copy(update={"gradient": estimator})
        found[estimator] = search(model, x, y, cond, domain, cfg, torch.Generator().manual_seed(3), 512,
                                  use=("gradient",), random_draws=0)
    by_autograd, by_differences = found["autograd"], found["differences"]
    assert int((~by_autograd.robust & by_autograd.clean_correct).sum()) > 0  # the descent breaks some
    assert torch.equal(by_differences.robust, by_autograd.robust)


def _plain_descent(model, x, y, cond, domain, cfg, generator):
    """Signed-gradient descent without any early exit, every sample for every step: the reference."""
    from pipeline.conditions.search import _uniform, margin_and_prediction

    low, high = cond.box()
    theta = _uniform(len(x), cond, generator, x.device)
    lowest = torch.full((len(x),), float("inf"))
    broken = torch.zeros(len(x), dtype=torch.bool)
    for step in range(cfg.steps + 1):
        t = theta.clone().requires_grad_(True)
        margin, prediction = margin_and_prediction(model(cond.transform(x, t, domain)), y)
        (grad,) = torch.autograd.grad(margin.sum(), t)
        lowest, broken = torch.minimum(lowest, margin.detach()), broken | (prediction != y)
        theta = torch.maximum(torch.minimum(theta - cfg.step_fraction * (high - low) * grad.sign(), high), low)
    return lowest, broken


@pytest.mark.parametrize("spec", [{"kind": "brightness", "range": [-0.3, 0.3]},
                                  {"kind": "rotation", "range": [-30, 30]}])
def test_the_descent_stops_only_where_it_would_repeat_itself(digits_model, spec):
    """Leaving the descent at a repeated point saves gradient copies and changes nothing the search finds:
    the same verdict and the same lowest margin as the descent that runs every step for every sample."""
    model, x, y, domain = digits_model
    cond, settings = condition(spec)
    cfg = settings.search.model_copy(update={"gradient": "autograd"})
    outcome = search(model, x, y, cond, domain, cfg, torch.Generator().manual_seed(3), 512,
                     use=("gradient",), random_draws=0)
    lowest, broken = _plain_descent(model, x, y, cond, domain, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(outcome.robust, outcome.clean_correct & ~broken)
    robust = outcome.robust
    assert torch.allclose(outcome.worst.margin[robust], lowest[robust], atol=1e-5)
    alive = int(outcome.clean_correct.sum())
    assert outcome.gradient_copies < alive * settings.search.steps  # repeats were left out


def test_batching_several_points_per_forward_finds_the_same_worst_case(digits_model):
    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "rotation", "range": [-25, 25]})
    one = search(model, x, y, cond, domain, settings.search, torch.Generator().manual_seed(0), len(y))
    many = search(model, x, y, cond, domain, settings.search, torch.Generator().manual_seed(0), 8 * len(y))
    assert torch.equal(one.robust, many.robust)
    assert (abs(one.grid_accuracy - many.grid_accuracy) < 1e-9).all()
    # robust samples saw the same points either way; broken ones may stop at another draw of a batch
    assert torch.allclose(one.worst.margin[one.robust], many.worst.margin[one.robust], atol=1e-4)


def test_a_nan_margin_does_not_hide_a_draw_that_breaks_the_sample():
    """Three draws of two samples: the second draw of sample 0 is NaN (non-finite logits), its first
    breaks it. `min` alone would return the NaN and the break would be lost."""
    from pipeline.conditions.search import Worst, _update_best

    worst = Worst.start(2, 1, "cpu")
    margin = torch.tensor([[-1.0, 2.0], [float("nan"), 1.0], [0.5, float("nan")]])
    prediction = torch.tensor([[3, 0], [0, 0], [0, 0]])
    theta = torch.tensor([[0.1], [0.2], [0.3]])
    _update_best(worst, None, margin, theta, prediction)
    assert worst.margin.tolist() == [-1.0, 1.0]
    assert worst.prediction.tolist() == [3, 0]
    assert torch.allclose(worst.theta.flatten(), torch.tensor([0.1, 0.2]))


class BatchSizes(torch.nn.Module):
    """The real model, recording the rows of every forward it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.model(x)


def test_the_random_phase_streams_full_batches_and_finds_what_every_draw_for_every_sample_finds(digits_model):
    """Random draws only: the streamed phase (blocks of whole batches, a block may end inside a draw)
    against the reference that evaluates every draw of every sample. The same verdicts, the same lowest
    margin of every sample left robust, and only the phase's last batch short."""
    from pipeline.conditions.search import _uniform, margin_and_prediction

    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "brightness_contrast", "brightness": [-0.4, 0.4], "contrast": [0.5, 1.5]})
    recorder, batch, draws = BatchSizes(model), 96, 20  # 96 does not divide the alive samples: draws split
    outcome = search(recorder, x, y, cond, domain, settings.search, torch.Generator().manual_seed(5), batch,
                     use=(), random_draws=draws)
    thetas = _uniform(len(x), cond, torch.Generator().manual_seed(5), x.device, draws)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        results = [margin_and_prediction(model(cond.transform(x, thetas[j], domain)), y) for j in range(draws)]
    margins = torch.stack([m for m, _ in results])
    broken = torch.stack([p != y for _, p in results]).any(0)
    assert torch.equal(outcome.robust, clean & ~broken)
    assert 0 < int(outcome.robust.sum()) < int(clean.sum())  # some samples broke and left early
    robust = outcome.robust
    assert torch.allclose(outcome.worst.margin[robust], margins.min(0).values[robust], atol=1e-5)
    random_batches = recorder.sizes[1:]  # after the clean forward
    assert all(size == batch for size in random_batches[:-1]) and 0 < random_batches[-1] <= batch
    assert sum(random_batches) == outcome.copies_evaluated < draws * int(clean.sum())
