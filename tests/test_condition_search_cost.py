"""The worst-case search's cost (issue 16, search cost vs floor): several parameter points share one
batched forward, and a sample leaves the random and gradient phases once it is broken (early exit).

Before this change SearchOutcome had no `copies_evaluated` and every sample received the whole
budget: the first test fails on the old code. The second pins that batching does not change what
the search finds (a regression guard for the batched grid, stated as such)."""
from __future__ import annotations

import torch

from pipeline.conditions.search import search
from pipeline.conditions.threats import from_config
from pipeline.config import parse_params


def condition(spec: dict):
    params = parse_params({"conditions": {"threats": {"c": {"rationale": "test", **spec}}}})
    return from_config("c", params.conditions.threats["c"], (1, 8, 8)), params.conditions


def test_broken_samples_leave_the_search_and_unbroken_ones_get_the_whole_budget(digits_model):
    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "brightness_contrast", "brightness": [-0.4, 0.4], "contrast": [0.5, 1.5]})
    outcome = search(model, x, y, cond, domain, settings.search, torch.Generator().manual_seed(0), 512)
    n, budget = len(y), outcome.copies_per_sample
    assert budget == settings.search.grid ** 2 + settings.search.random + settings.search.steps + 1
    settled = int((~outcome.robust).sum())
    assert settled > 0
    assert outcome.copies_evaluated < n * budget  # the broken and the clean-wrong samples stopped early
    assert outcome.copies_evaluated >= int(outcome.robust.sum()) * budget + settled * settings.search.grid ** 2


def test_batching_several_points_per_forward_finds_the_same_worst_case(digits_model):
    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "rotation", "range": [-25, 25]})
    one = search(model, x, y, cond, domain, settings.search, torch.Generator().manual_seed(0), len(y))
    many = search(model, x, y, cond, domain, settings.search, torch.Generator().manual_seed(0), 8 * len(y))
    assert torch.equal(one.robust, many.robust)
    assert (abs(one.grid_accuracy - many.grid_accuracy) < 1e-9).all()
    # robust samples saw the same points either way; broken ones may stop at another draw of a batch
    assert torch.allclose(one.worst.margin[one.robust], many.worst.margin[one.robust], atol=1e-4)
