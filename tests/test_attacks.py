"""Attack properties that must hold for any model: threat model respected, robust <= clean."""
import pytest
import torch

from pipeline.attacks import FGSM, PGD
from pipeline.attacks.suite import predict, run_suite
from pipeline.threat import LpBall, lp_norm


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("attack", [FGSM(), PGD(steps=10, step_size=0.05, restarts=2)], ids=["fgsm", "pgd"])
def test_outputs_stay_in_ball_and_domain(digits_model, attack, norm, eps):
    model, x, y, domain = digits_model
    gen = torch.Generator().manual_seed(0)
    x_adv = attack(model, x, y, LpBall(norm, eps), domain, gen)
    assert x_adv.shape == x.shape
    assert (lp_norm(x_adv - x, norm) <= eps + 1e-5).all()
    assert domain.contains(x_adv)
    assert model.training is False


def test_model_mode_is_restored(digits_model):
    model, x, y, domain = digits_model
    model.train()
    FGSM()(model, x[:4], y[:4], LpBall("linf", 0.1), domain, torch.Generator().manual_seed(0))
    assert model.training
    model.eval()


def test_suite_worst_case_is_below_each_attack_and_clean(digits_model):
    model, x, y, domain = digits_model
    attacks = [FGSM(), PGD(steps=20, step_size=0.02, restarts=2)]
    result = run_suite(model, attacks, x, y, LpBall("linf", 0.1), domain, 64, torch.Generator().manual_seed(0))
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
    result = run_suite(model, [PGD(5, 0.01)], x, y, LpBall("linf", 0.0), domain, 64, torch.Generator().manual_seed(0))
    assert torch.equal(result.robust, result.clean_correct)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_and_random_start(digits_model, norm):
    _, x, _, domain = digits_model
    gen = torch.Generator().manual_seed(0)
    start = LpBall(norm, 0.3).random_start(x, domain, gen)
    assert (lp_norm(start - x, norm) <= 0.3 + 1e-5).all() and domain.contains(start)
    far = x + 5.0
    projected = LpBall(norm, 0.3).project(far, x, domain)
    assert (lp_norm(projected - x, norm) <= 0.3 + 1e-5).all() and domain.contains(projected)


def test_pgd_rejects_bad_settings():
    with pytest.raises(ValueError):
        PGD(steps=0, step_size=0.1)
    with pytest.raises(ValueError):
        PGD(steps=3, step_size=0.0)


from pipeline.attacks.apgd import APGD, APGDTargeted, checkpoints  # noqa: E402
from pipeline.attacks.square import Square, square_fraction  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from pipeline.stages.attack import check_model_outputs  # noqa: E402

STRONG = [PGD(10, 0.02, 1, loss="cw"), APGD(20, 1, "ce"), APGD(20, 1, "dlr"), APGDTargeted(20, 1, 2), Square(200)]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("attack", STRONG, ids=[a.name for a in STRONG])
def test_every_attack_respects_the_threat_model(digits_model, attack, norm, eps):
    model, x, y, domain = digits_model
    x_adv = attack(model, x[:64], y[:64], LpBall(norm, eps), domain, torch.Generator().manual_seed(0))
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
    suite = run_suite(model, [FGSM(), APGD(50, 1, "ce")], x, y, LpBall("linf", 0.05), domain, 128, gen)
    assert suite.broken["apgd_ce"].sum() >= suite.broken["fgsm"].sum()


def test_sequential_mode_gives_the_independent_verdict(digits_model):
    model, x, y, domain = digits_model
    attacks = [FGSM(), PGD(10, 0.01, 1, random_init=False)]  # deterministic, so verdicts are comparable
    independent = run_suite(model, attacks, x, y, LpBall("linf", 0.05), domain, 64, torch.Generator().manual_seed(0))
    sequential = run_suite(model, attacks, x, y, LpBall("linf", 0.05), domain, 64, torch.Generator().manual_seed(0),
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


def masking_checks(model, x, y, domain, epsilon: float, mode: str) -> dict:
    """The attack stage's own evaluation end to end (suite, ε sweep, the six checks), as the stage runs it."""
    from pipeline.config import parse_params
    from pipeline.stages.attack import evaluate

    params = parse_params({"threat": {"norm": "linf", "epsilon": epsilon}, "attack": {
        "attacks": ["fgsm", "pgd", "apgd_ce", "square"], "mode": mode, "batch_size": 128,
        "pgd": {"steps": 20, "step_size": epsilon / 5, "restarts": 1}, "apgd": {"steps": 20},
        "square": {"queries": 300}, "sweep": {"points": 5}}})
    result, _ = evaluate(model, params, x, y, domain, 10, torch.Generator().manual_seed(0),
                         model_sha256="0" * 64, data_fingerprint="test")
    return result.masking


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_masking_checks_pass_on_a_plain_model(digits_model, mode):
    """Every check runs and passes in both modes (before, `sequential` left the FGSM check not run,
    so `masking_all_passed` could never be 1 there)."""
    model, x, y, domain = digits_model
    checks = masking_checks(model, x, y, domain, 0.05, mode)
    assert len(checks) == 6
    assert all(c.status == "pass" for c in checks.values()), {n: c.detail for n, c in checks.items()}


@pytest.mark.parametrize("mode", ["independent", "sequential"])
def test_masking_checks_catch_a_model_that_masks_its_gradients(digits_model, mode):
    """A model whose forward rounds its input has zero input gradients: the white-box attacks stall
    while Square, which reads only logits, breaks most samples, and even ε = the whole domain does
    not break it. Both checks must say so, from the stage's real sweep and suite."""
    model, x, y, domain = digits_model
    masked = Quantised(model).eval()
    from pipeline.attacks.losses import loss_and_gradient

    assert not loss_and_gradient(masked, x, y, "ce")[1].any()  # the gradients really are masked
    checks = masking_checks(masked, x, y, domain, 0.15, mode)
    assert all(c.status != "not_run" for c in checks.values())
    assert checks["white_box_at_least_black_box"].status == "fail"
    assert checks["white_box_at_least_black_box"].values["broken_only_by_square"] > 0.5 * len(y)
    assert checks["large_epsilon_breaks_model"].status == "fail"


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


RAW = [FGSM(), PGD(5, 0.05, 2), PGD(5, 0.05, 1, loss="cw", schedule="cosine"), APGD(10, 1, "ce"), APGD(10, 1, "dlr"),
       APGDTargeted(10, 1, 2), Square(100)]


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("attack", RAW, ids=[f"{a.name}-{i}" for i, a in enumerate(RAW)])
def test_each_attack_itself_stays_in_ball_and_domain(digits_model, attack, norm, eps):
    """`Attack.__call__` projects whatever `run` returns, which would hide an attack whose own
    projection is broken: check `run`'s raw output. (FGSM's raw step left the domain wherever a
    pixel sat at 0 or 1, and only the base class's projection repaired it.)"""
    model, x, y, domain = digits_model
    x, y = x[:64], y[:64]
    raw = attack.run(model.eval(), x, y, LpBall(norm, eps), domain, torch.Generator().manual_seed(0))
    assert raw.shape == x.shape
    assert (lp_norm(raw - x, norm) <= eps + 1e-5).all()
    assert domain.contains(raw, tol=1e-6)
    assert (predict(model, raw, 64) != y).any()  # and it attacks: something breaks at this ε


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_perturb_as_adversarial_training_calls_it(digits_model, norm, eps):
    """Training calls `PGD.perturb` directly, past the base class's projection, with the PGD that
    `fit_config` builds from `train.pgd`: its iterate must stay in the ball and the domain, leave the
    model in training mode, and follow the configured step schedule. Checked against a plain
    reimplementation of the cosine schedule (before, `fit_config` dropped `train.pgd.schedule`)."""
    import math

    from pipeline.config import parse_params
    from pipeline.stages.train import fit_config
    from pipeline.training.methods import BatchContext, _adversarial

    model, x, y, domain = digits_model
    x, y = x[:64], y[:64]
    params = parse_params({"threat": {"norm": norm, "epsilon": eps},
                           "train": {"pgd": {"steps": 4, "step_size": eps / 2, "schedule": "cosine"}}})
    pgd = fit_config(params).train_pgd
    ctx = BatchContext(LpBall(norm, eps), domain, pgd, torch.Generator().manual_seed(1), 10)
    model.train()
    try:
        x_adv = _adversarial(model, x, y, ctx)
        assert model.training
    finally:
        model.eval()
    assert (lp_norm(x_adv - x, norm) <= eps + 1e-5).all() and domain.contains(x_adv, tol=1e-6)
    expected = LpBall(norm, eps).random_start(x, domain, torch.Generator().manual_seed(1))
    for step in range(4):
        expected = expected.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(expected), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, expected)
        size = eps / 2 * 0.5 * (1 + math.cos(math.pi * step / 4))
        threat = LpBall(norm, eps)
        expected = threat.project(threat.ascent_step(expected.detach(), grad, size), x, domain)
    assert torch.allclose(x_adv, expected, atol=1e-5)
    loss_adv = torch.nn.functional.cross_entropy(model(x_adv), y)
    assert loss_adv > torch.nn.functional.cross_entropy(model(x), y)  # it ascends the loss
