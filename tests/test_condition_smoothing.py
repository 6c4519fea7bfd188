"""Randomized smoothing over the rotation angle (issue 16 §3): where bounds do not reach bilinear
rotation, the angle-smoothed classifier is certified with a Clopper-Pearson bound, and the report
states what that certifies and the interpolation gap it leaves.

Before this change `pipeline.conditions.smoothing` did not exist, a rotation condition had no
`smoothing` option (an unknown key, exit 2) and no record had `smoothed`: every test here fails on
the old code.
"""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import norm

from pipeline.config import parse_params
from pipeline.conditions.smoothing import ParameterSmooth, largest_certifiable_radius, smooth_condition
from pipeline.conditions.threats import from_config
from tests.conftest import TINY_PARAMS, make_workspace, run_stage


def _rotation(low=-10.0, high=10.0):
    params = parse_params({"conditions": {"threats": {"turn": {"kind": "rotation", "range": [low, high],
                                                               "rationale": "roll", "smoothing": {"sigma": 6}}}}})
    return from_config("turn", params.conditions.threats["turn"], (1, 8, 8)), params.conditions.threats["turn"]


def test_the_radius_is_sigma_times_the_inverse_normal_of_the_clopper_pearson_bound(digits_model):
    """CERTIFY over the angle follows Cohen et al.: R = σ·Φ⁻¹(p_A), p_A the one-sided Clopper-Pearson
    lower bound of the top class's count; all n draws agreeing gives the largest radius n and α allow."""
    from pipeline.certify.smoothing import lower_confidence_bound

    model, x, y, domain = digits_model
    turn, _ = _rotation()
    smooth = ParameterSmooth(model, turn, domain, 10, 6.0, torch.Generator().manual_seed(0))
    certificate = smooth.certify(x[0], 16, 200, 0.01)
    replay = ParameterSmooth(model, turn, domain, 10, 6.0, torch.Generator().manual_seed(0))
    guess = int(replay.counts(x[0], 16).argmax())
    n_a = int(replay.counts(x[0], 200)[guess])
    p_a = lower_confidence_bound(n_a, 200, 0.01)
    assert certificate.p_a_lower == pytest.approx(p_a)
    if p_a > 0.5:
        assert certificate.prediction == guess and certificate.radius == pytest.approx(6.0 * norm.ppf(p_a))
    assert largest_certifiable_radius(6.0, 200, 0.01) == pytest.approx(6.0 * norm.ppf(0.01 ** (1 / 200)))
    assert largest_certifiable_radius(6.0, 2000, 0.01) > largest_certifiable_radius(6.0, 200, 0.01)


def test_certified_samples_keep_their_class_at_the_ends_of_the_range_and_the_gap_is_measured(digits_model):
    """A sample counts as certified at ±10° only when g is correct and R ≥ 10; the PREDICT cross-check at
    Δ = ±10° agrees with every certified class; the resampled-twice input differs from the one-resampling
    input the certificate speaks of (the interpolation gap is not zero, so it must be stated)."""
    model, x, y, domain = digits_model
    turn, spec = _rotation()
    cfg = SimpleNamespace(sigma=6.0, n0=16, n=256, alpha=0.001)
    out = smooth_condition(model, x[:40], y[:40], turn, domain, 10, cfg, torch.Generator().manual_seed(0), 512)
    assert torch.equal(out.certified, (out.predictions == y[:40]) & (out.radii >= 10.0))
    assert out.certified.any() and out.offsets_checked == 2 * int(out.certified.sum())
    assert out.disagreements == 0
    assert out.gap_max > 0.01 and out.gap_mean <= out.gap_max
    too_narrow = SimpleNamespace(sigma=2.0, n0=16, n=256, alpha=0.001)  # R ≤ 2·Φ⁻¹(0.001^(1/256)) < 10
    assert not smooth_condition(model, x[:10], y[:10], turn, domain, 10, too_narrow,
                                torch.Generator().manual_seed(0), 512).certified.any()


def test_the_stage_records_a_probabilistic_certificate_and_the_report_says_what_it_certifies(tmp_path):
    params = copy.deepcopy(TINY_PARAMS)
    params["conditions"]["threats"] = {"turn": {"kind": "rotation", "range": [-8, 8], "rationale": "roll",
                                                "smoothing": {"sigma": 5.0, "n0": 16, "n": 128, "alpha": 0.01}}}
    root = make_workspace(tmp_path / "ws", params)
    for stage in ("prepare", "train", "conditions"):
        assert run_stage(stage, root) == 0
    record = json.loads((root / "metrics/conditions.json").read_text())["turn"]
    smooth = record["smoothed"]
    assert smooth["certified_accuracy"]["kind"] == "probabilistic_certificate"
    assert smooth["radius"] == 8 and smooth["forward_passes"] >= record["n"] * (16 + 128)
    assert record["certified_accuracy"]["status"] == "not_applicable"  # the model itself is not certified
    from pipeline import claims
    from pipeline.results import metric_kind

    text = " ".join(claims.condition_scope(record, "turn"))
    assert f"for {smooth['certified_accuracy']['value']:.1%} of the samples" in text
    assert "not of the model f" in text and "That gap is not covered" in text
    assert f"up to {smooth['interpolation_gap_max']:.3f}" in text
    assert ("raise n or σ" in text) == (smooth["largest_certifiable_radius"] < 8)  # 5·Φ⁻¹(0.01^(1/128)) ≈ 9.0
    short = {**smooth, "largest_certifiable_radius": 7.0}
    assert "no sample can be certified beyond 7" in " ".join(claims.parameter_smoothing_scope(short, record["axes"]))
    assert metric_kind("conditions.turn.smoothed.certified_accuracy") == "accuracy"


def test_smoothing_is_an_option_of_rotation_only():
    with pytest.raises(Exception, match="smoothing"):
        parse_params({"conditions": {"threats": {"g": {"kind": "brightness", "range": [-0.1, 0.1], "rationale": "r",
                                                       "smoothing": {"sigma": 1.0}}}}})
