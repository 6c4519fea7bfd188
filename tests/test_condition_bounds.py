"""Folded bound propagation for conditions affine in their parameters (issue 16, the MNIST gap):
brightness, contrast, both, and fog are clip(W θ + c) per input, so the parameter-to-image map is
one linear layer and forward-mode bounds cost d + 1 coefficients per neuron.

Before this change Condition had no `affine_design` and `conditions.certify.method` did not exist
(an unknown key): every test here fails on the old code.
"""
from __future__ import annotations


import pytest
import torch

from pipeline.conditions.certify import branch_and_bound
from pipeline.config import parse_params
from pipeline.conditions.threats import from_config
from tests.test_conditions import assert_certified_on_a_dense_grid

AFFINE = [{"kind": "brightness", "range": [-0.2, 0.2]}, {"kind": "contrast", "range": [0.6, 1.4]},
          {"kind": "brightness_contrast", "brightness": [-0.15, 0.15], "contrast": [0.7, 1.3]},
          {"kind": "fog", "range": [0.0, 0.4]}]


def condition(spec: dict, method: str = "forward_crown"):
    params = parse_params({"conditions": {"certify": {"method": method, "max_boxes": 16},
                                          "threats": {"c": {"rationale": "test", **spec}}}})
    return from_config("c", params.conditions.threats["c"], (1, 8, 8)), params.conditions


@pytest.mark.parametrize("spec", AFFINE)
def test_the_affine_design_is_the_transform(spec, digits_model):
    """clip(W θ + c) equals the transform the search attacks, at random parameters: what is bounded is
    what is attacked."""
    _, x, _, domain = digits_model
    cond, _ = condition(spec)
    low, high = cond.box()
    theta = low + torch.rand(len(x), cond.dims, generator=torch.Generator().manual_seed(0)) * (high - low)
    weight, offset = cond.affine_design(x, domain)
    folded = domain.clamp((torch.einsum("npd,nd->np", weight, theta) + offset).view_as(x))
    assert torch.allclose(folded, cond.transform(x, theta, domain), atol=1e-6)
    assert from_config("r", parse_params({"conditions": {"threats": {"r": {
        "kind": "rotation", "range": [-5, 5], "rationale": "r"}}}}).conditions.threats["r"], (1, 8, 8)) \
        .affine_design(x, domain) is None


@pytest.mark.parametrize("spec", AFFINE)
def test_folded_certificates_hold_on_a_dense_grid_and_match_crown(spec, digits_model):
    """Soundness of the folded path: no certified sample is misclassified anywhere on a dense grid over the
    box; and it certifies at least 90% of what CROWN on the unfolded module certifies (same budget)."""
    model, x, y, domain = digits_model
    x, y = x[:60], y[:60]
    cond, settings = condition(spec)
    folded = branch_and_bound(model, x, y, cond, domain, 10, settings.certify)
    crown = branch_and_bound(model, x, y, cond, domain, 10, condition(spec, "crown")[1].certify)
    assert folded.verified.any()
    assert int(folded.verified.sum()) >= 0.9 * int(crown.verified.sum())
    assert_certified_on_a_dense_grid(model, x, y, cond, domain, folded.verified)


def test_forward_crown_refuses_a_transform_that_is_not_affine(digits_model):
    from pipeline.certify.bounds import NotBoundable

    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "gamma", "range": [0.8, 1.25]})
    with pytest.raises(NotBoundable, match="affine"):
        branch_and_bound(model, x[:4], y[:4], cond, domain, 10, settings.certify)
