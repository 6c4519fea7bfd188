"""Attack properties that must hold for any model: threat model respected, robust <= clean."""
import pytest
import torch

from pipeline.attacks import FGSM, PGD
from pipeline.attacks.suite import predict, run_suite
from pipeline.threat import lp_norm, project, random_start


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("attack", [FGSM(), PGD(steps=10, step_size=0.05, restarts=2)], ids=["fgsm", "pgd"])
def test_outputs_stay_in_ball_and_domain(digits_model, attack, norm, eps):
    model, x, y, domain = digits_model
    gen = torch.Generator().manual_seed(0)
    x_adv = attack(model, x, y, eps, norm, domain, gen)
    assert x_adv.shape == x.shape
    assert (lp_norm(x_adv - x, norm) <= eps + 1e-5).all()
    assert domain.contains(x_adv)
    assert model.training is False


def test_model_mode_is_restored(digits_model):
    model, x, y, domain = digits_model
    model.train()
    FGSM()(model, x[:4], y[:4], 0.1, "linf", domain, torch.Generator().manual_seed(0))
    assert model.training
    model.eval()


def test_suite_worst_case_is_below_each_attack_and_clean(digits_model):
    model, x, y, domain = digits_model
    attacks = [FGSM(), PGD(steps=20, step_size=0.02, restarts=2)]
    result = run_suite(model, attacks, x, y, 0.1, "linf", domain, 64, torch.Generator().manual_seed(0))
    robust = result.robust.float().mean()
    assert robust <= result.clean_correct.float().mean()
    for hit in result.broken.values():
        assert robust <= (result.clean_correct & ~hit).float().mean()
    # the saved adversarial points reproduce every "broken" verdict
    adv_pred = predict(model, result.x_adv, 64)
    broken_any = result.clean_correct & ~result.robust
    assert (adv_pred[broken_any] != y[broken_any]).all()
    assert result.robust.sum() < result.clean_correct.sum()  # a standard model is not robust at 0.1
    # the iterative attack is at least as strong as the single step on a standard model
    assert result.broken["pgd"].sum() >= result.broken["fgsm"].sum()


def test_zero_epsilon_changes_nothing(digits_model):
    model, x, y, domain = digits_model
    result = run_suite(model, [PGD(5, 0.01)], x, y, 0.0, "linf", domain, 64, torch.Generator().manual_seed(0))
    assert torch.equal(result.robust, result.clean_correct)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_and_random_start(digits_model, norm):
    _, x, _, domain = digits_model
    gen = torch.Generator().manual_seed(0)
    start = random_start(x, 0.3, norm, domain, gen)
    assert (lp_norm(start - x, norm) <= 0.3 + 1e-5).all() and domain.contains(start)
    far = x + 5.0
    projected = project(far, x, 0.3, norm, domain)
    assert (lp_norm(projected - x, norm) <= 0.3 + 1e-5).all() and domain.contains(projected)


def test_pgd_rejects_bad_settings():
    with pytest.raises(ValueError):
        PGD(steps=0, step_size=0.1)
    with pytest.raises(ValueError):
        PGD(steps=3, step_size=0.0)
