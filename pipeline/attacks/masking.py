"""Gradient-masking sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness";
the flags of fra31/auto-attack): an evaluation that fails one of them cannot be trusted,
whatever robust accuracy it reports. Each check is a named pass/fail with its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.attacks.fgsm import FGSM
from pipeline.attacks.pgd import PGD
from pipeline.attacks.suite import SuiteResult, robust_mask, share
from pipeline.threat import LpBall

MEANING = {
    "iterative_at_least_single_step": (
        "Iterative attacks must break at least what one FGSM step breaks. If FGSM is stronger, the loss "
        "surface is locally misleading (gradient masking or a broken attack): use more steps or restarts."
    ),
    "white_box_at_least_black_box": (
        "A gradient-free attack (Square) should not find adversarial examples the gradient attacks missed. "
        "If it does, gradients are obfuscated and every white-box figure overstates robustness."
    ),
    "large_epsilon_breaks_model": (
        "With ε as large as the whole input domain any input can be turned into any other, so accuracy must "
        "fall to near zero. If it does not, the attack cannot follow the model's gradients."
    ),
    "monotone_in_epsilon": (
        "Robust accuracy must not rise as ε grows: a larger ball contains the smaller one. A rise means the "
        "attack failed to converge at the larger ε."
    ),
    "converged": (
        "Doubling the steps and restarts must not lower robust accuracy materially; if it does, the reported "
        "figure is not the attack's converged value and overstates robustness."
    ),
    "noise_weaker_than_attacks": (
        "Random noise of size ε must be weaker than the optimised attacks. If noise breaks more samples, the "
        "gradient attacks are not working on this model."
    ),
}


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not run, with the reason in `detail`
    detail: str
    values: dict = field(default_factory=dict)

    def record(self) -> dict:
        status = "not_run" if self.passed is None else ("pass" if self.passed else "fail")
        return {"status": status, "pass": None if self.passed is None else float(self.passed),
                "detail": self.detail, "values": self.values, "meaning": MEANING[self.name]}


def run_checks(model, suite: SuiteResult, attacks, sweep: list[dict], x, y, threat: LpBall, domain, generator,
               batch_size: int, tolerance: float, large_epsilon: float, large_epsilon_max_accuracy: float,
               pgd: PGD) -> list[Check]:
    """The six checks, computable in both suite modes: where an `independent` suite already knows an
    attack's own robust accuracy it is read from there; a `sequential` suite only knows what each
    attack broke among the samples earlier attacks left, so the attack is run on its own here."""
    own = _OwnAccuracy(model, suite, attacks, x, y, threat, domain, batch_size, generator)
    worst = share(suite.robust)
    fgsm = next((a for a in attacks if a.name == "fgsm"), FGSM())  # one gradient step: cheap to add
    iterative = [a for a in attacks if a.name not in ("fgsm", "square")]
    if suite.sequential or not iterative:
        iterative = [pgd]  # run on its own below anyway (`converged`), so this costs nothing extra
    best = min(own(a) for a in iterative)
    checks = [Check("iterative_at_least_single_step", best <= own(fgsm) + tolerance,
                    f"best iterative {best:.4f} vs fgsm {own(fgsm):.4f} (tolerance {tolerance})",
                    {"fgsm_robust_accuracy": own(fgsm), "best_iterative_robust_accuracy": best})]
    checks.append(_white_box_check(model, suite, attacks, x, y, threat, domain, batch_size, generator,
                                   tolerance, pgd))
    strong = PGD(max(pgd.steps, 50), 2.5 * large_epsilon / max(pgd.steps, 50), 1)
    large = share(robust_mask(model, strong, x, y, threat.with_epsilon(large_epsilon), domain, batch_size,
                               generator))
    checks.append(Check("large_epsilon_breaks_model", large <= large_epsilon_max_accuracy,
                        f"robust accuracy {large:.4f} at ε={large_epsilon:g} (allowed {large_epsilon_max_accuracy})",
                        {"epsilon": large_epsilon, "robust_accuracy": large}))
    rises = [(a["epsilon"], b["epsilon"]) for a, b in zip(sweep, sweep[1:])
             if b["robust_accuracy"] > a["robust_accuracy"] + tolerance]
    checks.append(Check("monotone_in_epsilon", not rises,
                        "no rise beyond tolerance" if not rises else f"accuracy rises between ε pairs {rises}",
                        {"rises": len(rises), "points": len(sweep)}))
    stronger = PGD(pgd.steps * 2, pgd.step_size, pgd.restarts * 2, loss=pgd.loss, schedule=pgd.schedule)
    base = own(pgd)
    doubled = share(robust_mask(model, stronger, x, y, threat, domain, batch_size, generator))
    checks.append(Check("converged", base - doubled <= tolerance,
                        f"PGD {base:.4f} vs doubled steps and restarts {doubled:.4f} (tolerance {tolerance})",
                        {"robust_accuracy": base, "robust_accuracy_doubled": doubled}))
    with torch.no_grad():  # batch by batch: x may be read as it is indexed (pipeline.data.loader.DeviceRows)
        noisy_correct = torch.cat([model(threat.random_start(x[i:i + batch_size], domain, generator)).argmax(1)
                                   for i in range(0, len(y), batch_size)]) == y
        noise_robust = share(noisy_correct & suite.clean_correct)
    checks.append(Check("noise_weaker_than_attacks", noise_robust + tolerance >= worst,
                        f"accuracy under random noise {noise_robust:.4f} vs worst-case attack {worst:.4f}",
                        {"noise_accuracy": noise_robust, "worst_case_robust_accuracy": worst}))
    return checks


class _OwnAccuracy:
    """Robust accuracy of one attack run alone on every sample: read from an independent suite that
    ran this very attack, else computed once and remembered."""

    def __init__(self, model, suite: SuiteResult, attacks, x, y, threat, domain, batch_size, generator):
        self.model, self.suite, self.x, self.y = model, suite, x, y
        self.ran = set() if suite.sequential else {id(a) for a in attacks}
        self.args = (threat, domain, batch_size, generator)
        self.known: dict[int, float] = {}

    def __call__(self, attack) -> float:
        if id(attack) not in self.known:
            if id(attack) in self.ran:
                hit = self.suite.broken[attack.name]
                self.known[id(attack)] = share(self.suite.clean_correct & ~hit)
            else:
                threat, domain, batch_size, generator = self.args
                mask = robust_mask(self.model, attack, self.x, self.y, threat, domain, batch_size, generator)
                self.known[id(attack)] = share(mask)
        return self.known[id(attack)]


def _white_box_check(model, suite: SuiteResult, attacks, x, y, threat, domain, batch_size, generator,
                     tolerance: float, pgd: PGD) -> Check:
    """Samples Square broke that no white-box attack breaks. A sequential suite never showed the
    white-box attacks listed after Square what Square broke, so they get those samples here; with
    no white-box attack listed, the reference PGD does."""
    names = [a.name for a in attacks]
    if "square" not in names:
        return Check("white_box_at_least_black_box", None, "needs square in attack.attacks")
    white = [a for a in attacks if a.name != "square"]
    white_broken = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for attack in white:
        white_broken |= suite.broken[attack.name]
    only_square = suite.broken["square"] & ~white_broken
    unseen = [a for a in white if names.index(a.name) > names.index("square")] if suite.sequential else []
    for attack in unseen or ([] if white else [pgd]):
        idx = only_square.nonzero().squeeze(1)
        if len(idx):
            survived = robust_mask(model, attack, x[idx], y[idx], threat, domain, batch_size, generator)
            only_square[idx[~survived]] = False
    count = int(only_square.sum())
    return Check("white_box_at_least_black_box", count <= tolerance * len(y),
                 f"{count} sample(s) broken only by square (allowed {tolerance * len(y):.1f})",
                 {"broken_only_by_square": count})
