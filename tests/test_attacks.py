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


from pipeline.attacks.apgd import APGD, APGDTargeted, checkpoints  # noqa: E402
from pipeline.attacks.masking import run_checks  # noqa: E402
from pipeline.attacks.square import Square, square_fraction  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from pipeline.stages.attack import check_model_outputs  # noqa: E402

STRONG = [PGD(10, 0.02, 1, loss="cw"), APGD(20, 1, "ce"), APGD(20, 1, "dlr"), APGDTargeted(20, 1, 2), Square(200)]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("attack", STRONG, ids=[a.name for a in STRONG])
def test_every_attack_respects_the_threat_model(digits_model, attack, norm, eps):
    model, x, y, domain = digits_model
    x_adv = attack(model, x[:64], y[:64], eps, norm, domain, torch.Generator().manual_seed(0))
    assert (lp_norm(x_adv - x[:64], norm) <= eps + 1e-5).all()
    assert domain.contains(x_adv)
    assert (predict(model, x_adv, 64) != y[:64]).sum() > 0  # each attack breaks something at this ε


def test_apgd_checkpoints_follow_the_paper():
    assert sorted(checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_square_schedule_halves():
    assert square_fraction(0.8, 0, 10000) == 0.8
    assert square_fraction(0.8, 11, 10000) == 0.4
    assert square_fraction(0.8, 2, 1000) == 0.4  # same schedule, scaled to 1,000 queries
    assert square_fraction(0.8, 999, 1000) == 0.8 / 2 ** 9


def test_apgd_is_at_least_as_strong_as_fgsm(digits_model):
    model, x, y, domain = digits_model
    gen = torch.Generator().manual_seed(0)
    suite = run_suite(model, [FGSM(), APGD(50, 1, "ce")], x, y, 0.05, "linf", domain, 128, gen)
    assert suite.broken["apgd_ce"].sum() >= suite.broken["fgsm"].sum()


def test_sequential_mode_gives_the_independent_verdict(digits_model):
    model, x, y, domain = digits_model
    attacks = [FGSM(), PGD(10, 0.01, 1, random_init=False)]  # deterministic, so verdicts are comparable
    independent = run_suite(model, attacks, x, y, 0.05, "linf", domain, 64, torch.Generator().manual_seed(0))
    sequential = run_suite(model, attacks, x, y, 0.05, "linf", domain, 64, torch.Generator().manual_seed(0),
                           sequential=True)
    assert torch.equal(independent.robust, sequential.robust)
    assert independent.broken_by == sequential.broken_by
    assert sequential.broken["pgd"].sum() <= independent.broken["pgd"].sum()


class Quantised(torch.nn.Module):
    """Rounds its input first: zero gradients everywhere, a textbook case of gradient masking."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def test_masking_checks_pass_on_a_plain_model(digits_model):
    model, x, y, domain = digits_model
    gen = torch.Generator().manual_seed(0)
    pgd = PGD(20, 0.01, 1)
    attacks = [FGSM(), pgd, Square(300)]
    suite = run_suite(model, attacks, x, y, 0.05, "linf", domain, 128, gen)
    sweep = [{"epsilon": e, "robust_accuracy": a} for e, a in ((0.0, 0.9), (0.05, 0.5), (0.1, 0.2))]
    checks = {c.name: c for c in run_checks(model, suite, attacks, sweep, x, y, 0.05, "linf", domain, gen, 128,
                                            0.02, 1.0, 0.1, pgd)}
    assert all(c.passed for c in checks.values()), {n: c.detail for n, c in checks.items()}


def test_masking_checks_catch_zero_gradients(digits_model):
    model, x, y, domain = digits_model
    masked = Quantised(model).eval()
    gen = torch.Generator().manual_seed(0)
    pgd = PGD(20, 0.01, 1)
    attacks = [FGSM(), pgd, Square(300)]
    suite = run_suite(masked, attacks, x, y, 0.15, "linf", domain, 128, gen)
    sweep = [{"epsilon": 0.0, "robust_accuracy": 0.9}, {"epsilon": 0.15, "robust_accuracy": 0.95}]
    checks = {c.name: c for c in run_checks(masked, suite, attacks, sweep, x, y, 0.15, "linf", domain, gen, 128,
                                            0.02, 1.0, 0.1, pgd)}
    assert checks["white_box_at_least_black_box"].passed is False  # Square finds what gradients cannot
    assert checks["monotone_in_epsilon"].passed is False
    assert checks["large_epsilon_breaks_model"].passed is False


def test_model_output_checks(digits_model):
    model, x, _, _ = digits_model
    check_model_outputs(model, x, 10)
    with pytest.raises(UsageError, match="expected"):
        check_model_outputs(model, x, 3)

    class NaNModel(torch.nn.Module):
        def forward(self, inputs):
            return model(inputs) * float("nan")

    with pytest.raises(UsageError, match="NaN"):
        check_model_outputs(NaNModel(), x, 10)
