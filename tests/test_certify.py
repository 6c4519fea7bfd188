"""Certificates must be sound: never above what attacks leave robust, and monotone in ε."""
import pytest
import torch

from pipeline.attacks import PGD
from pipeline.attacks.suite import run_suite
from pipeline.certify.bounds import BoundComputer, margins_of, specification
from pipeline.threat import random_start


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
    cert = computer.certify(x, y, eps, "linf", method, 10, 64, 1e-4)
    suite = run_suite(model, [PGD(20, 0.005, 2)], x, y, eps, "linf", domain, 64, torch.Generator().manual_seed(0))
    assert cert.verified.any(), "a small ε should certify some samples"
    assert not (cert.verified & ~suite.robust).any()


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_contain_random_margins(digits_model, computer, method):
    model, x, y, domain = digits_model
    x, y = x[:50], y[:50]
    lower, upper = computer.margin_bounds(x, y, 0.03, "linf", method, 10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            margin = margins_of(model(random_start(x, 0.03, "linf", domain, gen)), y)
            assert (margin >= lower - 1e-4).all() and (margin <= upper + 1e-4).all()


def test_ibp_verified_accuracy_never_rises_with_epsilon(digits_model, computer):
    _, x, y, _ = digits_model
    verified = [computer.certify(x, y, eps, "linf", "ibp", 10, 64, 1e-4).verified for eps in (0.0, 0.01, 0.02, 0.04)]
    for smaller, larger in zip(verified, verified[1:]):
        assert not (larger & ~smaller).any()
    assert verified[0].sum() > verified[-1].sum()


def test_crown_is_at_least_as_tight_as_ibp_on_average(digits_model, computer):
    _, x, y, _ = digits_model
    ibp = computer.certify(x, y, 0.02, "linf", "ibp", 10, 64, 1e-4)
    crown = computer.certify(x, y, 0.02, "linf", "crown", 10, 64, 1e-4)
    assert crown.margin_lower.mean() >= ibp.margin_lower.mean()
