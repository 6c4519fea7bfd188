"""Randomized smoothing: the radius formula, abstention, sampling and its bad inputs."""
import math

import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from pipeline.certify.smoothing import ABSTAIN, Smooth
from pipeline.config import parse_params
from pipeline.errors import UsageError


class Constant(nn.Module):
    """Always predicts class 2, whatever the noise: p_A is 1 and only the sample count limits R."""

    def forward(self, x):
        logits = torch.zeros(len(x), 4)
        logits[:, 2] = 1.0
        return logits


class CoinFlip(nn.Module):
    """Predicts from the sign of the first noisy feature: no class ever exceeds probability 1/2 by much."""

    def forward(self, x):
        first = x.flatten(1)[:, 0]
        return torch.stack([first, -first], dim=1)


def test_radius_matches_cohen_formula():
    smooth = Smooth(Constant(), 4, sigma=0.5, generator=torch.Generator().manual_seed(0), batch_size=300)
    cert = smooth.certify(torch.zeros(3), n0=50, n=1000, alpha=0.001)
    p_a = beta.ppf(0.001, 1000, 1)  # all 1,000 votes for class 2
    assert cert.prediction == 2
    assert cert.p_a_lower == pytest.approx(p_a)
    assert cert.radius == pytest.approx(0.5 * norm.ppf(p_a))
    assert smooth.forward_passes == 1050


def test_abstains_when_no_class_dominates():
    smooth = Smooth(CoinFlip(), 2, sigma=1.0, generator=torch.Generator().manual_seed(0))
    cert = smooth.certify(torch.zeros(5), n0=100, n=1000, alpha=0.001)
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    assert smooth.predict(torch.zeros(5), n=1000, alpha=0.001) == ABSTAIN


def test_seeded_and_radius_grows_with_sigma(digits_model):
    model, x, y, _ = digits_model
    first = Smooth(model, 10, 0.25, torch.Generator().manual_seed(1)).certify(x[0], 100, 500, 0.01)
    again = Smooth(model, 10, 0.25, torch.Generator().manual_seed(1)).certify(x[0], 100, 500, 0.01)
    assert first == again
    assert first.radius <= 0.25 * norm.ppf(beta.ppf(0.01, 500, 1)) + 1e-9  # never beyond the n-sample cap
    assert math.isfinite(first.radius)


@pytest.mark.parametrize("section,fragment", [
    ({"sigma": 0.0}, "smoothing.sigma = 0.0"),
    ({"n0": 500, "n": 100}, "n0 = 500 must not exceed n = 100"),
    ({"alpha": 1.0}, "smoothing.alpha = 1.0"),
    ({"alpha": 0.0}, "smoothing.alpha = 0.0"),
])
def test_bad_smoothing_params(section, fragment):
    with pytest.raises(UsageError, match="smoothing"):
        parse_params({"smoothing": section})
    try:
        parse_params({"smoothing": section})
    except UsageError as error:
        assert fragment in str(error)


def test_smooth_stage_metrics(pipeline_workspace):
    import json

    smooth = json.loads((pipeline_workspace / "metrics/smooth.json").read_text())
    assert smooth["status"] == "ok" and smooth["forward_passes"] == smooth["n"] * (smooth["n0"] + smooth["n_samples_per_input"])
    accuracies = [c["certified_accuracy"]["value"] for c in smooth["curve"]]
    assert all(c["certified_accuracy"]["kind"] == "probabilistic_certificate" for c in smooth["curve"])
    # n = 200, α = 0.01, σ = 0.25: no certificate can exceed σ·Φ⁻¹(α^(1/n))
    from scipy.stats import norm
    assert abs(smooth["max_certifiable_radius"] - 0.25 * norm.ppf(0.01 ** (1 / 200))) < 1e-12
    # tiny threat: L∞ ε = 0.05 on d = 64 inputs lies in an L2 ball of 0.4, inside the certifiable 0.5
    assert "a certificate can cover the whole threat" in smooth["threat_coverage"]
    assert accuracies == sorted(accuracies, reverse=True)  # certified accuracy never rises with the radius
    assert 0 <= smooth["abstention_rate"] <= 1
    assert smooth["base_training_method"] == "pgd_at" and smooth["base_trained_with_same_sigma"] is False


def test_smoothing_on_a_noise_trained_model(pipeline_workspace, tmp_path):
    import json
    import shutil

    import yaml

    from pipeline.config import train_section_for
    from tests.conftest import run_stage

    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"] = train_section_for({**params["train"], "noise_sigma": 0.25, "epochs": 3}, "gaussian")
    params["smoothing"] = {**params.get("smoothing", {}), "sigma": 0.25}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("train", root) == 0 and run_stage("smooth", root) == 0
    smooth = json.loads((root / "metrics/smooth.json").read_text())
    assert smooth["base_training_method"] == "gaussian" and smooth["base_trained_with_same_sigma"] is True
