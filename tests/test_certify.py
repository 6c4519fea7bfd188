"""Certificates must be sound: never above what attacks leave robust, and monotone in ε."""
import pytest
import torch

from pipeline.attacks import PGD
from pipeline.attacks.suite import run_suite
from pipeline.certify.bounds import BoundComputer, margins_of, specification
from pipeline.threat import LpBall


def assert_bounds_contain_random_points(model, x, y, lower, upper, eps, norm, domain, draws=20):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(draws):
            margin = margins_of(model(LpBall(norm, eps).random_start(x, domain, gen)), y)
            assert (margin >= lower - 1e-4).all() and (margin <= upper + 1e-4).all()


@pytest.fixture(scope="module")
def computer(digits_model):
    model, x, _, domain = digits_model
    return BoundComputer(model, tuple(x.shape[1:]), domain)


def test_specification_rows():
    c = specification(torch.tensor([2]), 4)
    assert c.shape == (1, 3, 4)
    assert torch.equal(c[0], torch.tensor([[-1.0, 0, 1, 0], [0, -1.0, 1, 0], [0, 0, 1, -1.0]]))
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert torch.equal(margins_of(logits, torch.tensor([2])), torch.tensor([[5.0, 4.0, 3.0]]))


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certified_samples_survive_the_attack(digits_model, computer, method):
    model, x, y, domain = digits_model
    eps = 0.02
    cert = computer.certify(x, y, LpBall("linf", eps), method, 10, 64, 1e-4)
    suite = run_suite(model, [PGD(20, 0.005, 2)], x, y, LpBall("linf", eps), domain, 64, torch.Generator().manual_seed(0))
    assert cert.verified.any(), "a small ε should certify some samples"
    assert not (cert.verified & ~suite.robust).any()


@pytest.mark.parametrize("norm,epsilon,count", [("linf", 0.03, 50), ("l2", 0.3, 30)])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_contain_random_margins(digits_model, computer, method, norm, epsilon, count):
    """Random points of the ε-ball (L∞ box, or L2 ball) have margins inside the bounds."""
    model, x, y, domain = digits_model
    x, y = x[:count], y[:count]
    lower, upper = computer.margin_bounds(x, y, LpBall(norm, epsilon), method, 10)
    assert_bounds_contain_random_points(model, x, y, lower, upper, epsilon, norm, domain)


def test_ibp_verified_accuracy_never_rises_with_epsilon(digits_model, computer):
    _, x, y, _ = digits_model
    verified = [computer.certify(x, y, LpBall("linf", eps), "ibp", 10, 64, 1e-4).verified for eps in (0.0, 0.01, 0.02, 0.04)]
    for smaller, larger in zip(verified, verified[1:]):
        assert not (larger & ~smaller).any()
    assert verified[0].sum() > verified[-1].sum()


def test_crown_is_at_least_as_tight_as_ibp_on_average(digits_model, computer):
    _, x, y, _ = digits_model
    ibp = computer.certify(x, y, LpBall("linf", 0.02), "ibp", 10, 64, 1e-4)
    crown = computer.certify(x, y, LpBall("linf", 0.02), "crown", 10, 64, 1e-4)
    assert crown.margin_lower.mean() >= ibp.margin_lower.mean()


def test_alpha_crown_is_sound_and_tighter_than_crown(digits_model, computer):
    model, x, y, domain = digits_model
    x, y = x[:40], y[:40]
    crown = computer.certify(x, y, LpBall("linf", 0.02), "crown", 10, 64, 1e-4)
    alpha = computer.certify(x, y, LpBall("linf", 0.02), "alpha_crown", 10, 64, 1e-4)
    assert alpha.margin_lower.mean() >= crown.margin_lower.mean() - 1e-4
    assert_bounds_contain_random_points(model, x, y, alpha.lower, alpha.upper, 0.02, "linf", domain, draws=10)


def test_time_budget_certifies_a_prefix(digits_model, computer):
    import time

    _, x, y, _ = digits_model
    cert = computer.certify(x, y, LpBall("linf", 0.02), "crown", 10, 16, 1e-4, deadline=time.monotonic() - 1)
    assert len(cert.margin_lower) == 16  # one batch, then the budget stops it


def test_unboundable_model_is_named():
    from pipeline.certify.bounds import NotBoundable
    from pipeline.threat import Domain
    from tests.conftest import spectral_net

    domain = Domain(torch.zeros(1, 8, 8), torch.ones(1, 8, 8))
    with pytest.raises(NotBoundable) as info:
        computer = BoundComputer(spectral_net().eval(), (1, 8, 8), domain)
        computer.certify(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), LpBall("linf", 0.01), "crown", 10, 2, 1e-4)
    assert str(info.value)


def test_certify_stage_sweep_is_below_attack_sweep(pipeline_workspace):
    import json

    certify = json.loads((pipeline_workspace / "metrics/certify.json").read_text())
    for point in certify["sweep"]["points"]:
        assert point["verified_accuracy"] <= point["attack_robust_accuracy"] + 1e-9
    verified = [p["verified_accuracy"] for p in certify["sweep"]["points"]]
    assert verified == sorted(verified, reverse=True)


def test_certify_stage_records_not_applicable(tmp_path):
    import json

    from tests.conftest import run_stage, spectral_workspace

    root = spectral_workspace(tmp_path)
    for stage in ("prepare", "train", "attack", "certify"):
        assert run_stage(stage, root) == 0, stage
    certify = json.loads((root / "metrics/certify.json").read_text())
    assert certify["status"] == "not_applicable" and "auto_LiRPA cannot bound" in certify["reason"]
    assert {m: v["status"] for m, v in certify["verified_accuracy"].items()} == {"ibp": "not_applicable",
                                                                               "crown": "not_applicable"}
    assert all("auto_LiRPA cannot bound" in v["reason"] for v in certify["verified_accuracy"].values())


class Deprecating(torch.nn.Module):
    """A network whose forward emits a DeprecationWarning, as a deprecated torch call in the
    traced path (or in auto_LiRPA's bridge) would."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        import warnings

        warnings.warn("deprecated call on the bound path", DeprecationWarning, stacklevel=2)
        return self.fc(x)


def test_warnings_on_the_bound_path_reach_the_caller():
    """Bound computation once ignored every warning raised while auto_LiRPA traced and bounded the
    model, so a deprecation announcing the bridge's next breakage never surfaced. Only the
    expected tracer warnings are muted now (the same filter guards `compute_bounds`)."""
    from pipeline.threat import Domain

    domain = Domain(torch.zeros(4), torch.ones(4))
    with pytest.warns(DeprecationWarning, match="bound path"):  # tracing runs the forward once
        computer = BoundComputer(Deprecating(), (4,), domain)
    lower, upper = computer.margin_bounds(torch.full((2, 4), 0.5), torch.tensor([0, 1]), LpBall("linf", 0.1), "crown", 3)
    assert (lower <= upper).all()
