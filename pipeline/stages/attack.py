"""Stage `attack`: clean and robust accuracy on the test split, per attack and worst case,
an ε sweep, per-class figures and the gradient-masking sanity checks."""
from __future__ import annotations

import json
import sys

import numpy as np
from tqdm import tqdm

from pipeline.attacks import FGSM, PGD, Attack
from pipeline.attacks.apgd import APGD, APGDTargeted
from pipeline.attacks.masking import run_checks
from pipeline.attacks.square import Square
from pipeline.attacks.suite import SuiteResult, robust_mask, run_suite, share
from pipeline.errors import UsageError
from pipeline.feasibility import apgd_targets, resolve_attacks
from pipeline.io import atomic_write, confine, sha256_file, write_json, write_text
from pipeline.policy import load_policy
from pipeline.results import (Accuracy, AttackRecord, AttackResult, AttackSweep, ClassRecord, NotApplicable,
                              ReferenceCoverage, ThreatRecord, dump)
from pipeline.stages.common import check_model_outputs, load_data, load_model_for, seed_everything, tensors
from pipeline.stats import proportion
from pipeline.threat import LpBall, from_params
from pipeline.workspace import Workspace


def build_attacks(cfg, names: list[str], num_classes: int) -> list[Attack]:
    """The attacks `names` (from `resolve_attacks`), APGD-T's targets clamped to the task's classes."""
    p = cfg.pgd
    targets = apgd_targets(cfg, num_classes)
    factories = {
        "fgsm": lambda: FGSM(),
        "pgd": lambda: PGD(p.steps, p.step_size, p.restarts, schedule=p.schedule),
        "pgd_cw": lambda: PGD(p.steps, p.step_size, p.restarts, loss="cw", schedule=p.schedule),
        "apgd_ce": lambda: APGD(cfg.apgd.steps, cfg.apgd.restarts, "ce"),
        "apgd_dlr": lambda: APGD(cfg.apgd.steps, cfg.apgd.restarts, "dlr"),
        "apgd_t": lambda: APGDTargeted(cfg.apgd.steps, cfg.apgd.restarts, targets),
        "square": lambda: Square(cfg.square.queries, cfg.square.p_init, cfg.square.restarts),
    }
    return [factories[name]() for name in names]  # validated by the config


def epsilon_sweep(model, cfg, x, y, threat: LpBall, domain, generator) -> list[dict]:
    """Robust accuracy against PGD (step size scaled with ε) from 0 to max_factor·ε."""
    limit = domain.diameter(threat.norm)
    epsilon = threat.epsilon
    grid = sorted({min(limit, float(f) * epsilon) for f in np.linspace(0.0, cfg.sweep.max_factor, cfg.sweep.points)})
    rows = []
    for eps in grid:
        scale = eps / epsilon if epsilon > 0 else 0.0
        pgd = PGD(cfg.pgd.steps, max(cfg.pgd.step_size * scale, 1e-12), cfg.pgd.restarts, schedule=cfg.pgd.schedule)
        mask = robust_mask(model, pgd, x, y, threat.with_epsilon(eps), domain, cfg.batch_size, generator)
        stats = proportion(int(mask.sum()), len(y))
        rows.append({"epsilon": eps, "robust_accuracy": stats["value"], "ci_low": stats["ci"][0],
                     "ci_high": stats["ci"][1], "n": stats["n"]})
    return rows


# AutoAttack's "standard" suite (Croce & Hein 2020), the reference a reader compares against.
AUTOATTACK_STANDARD = ("apgd_ce", "apgd_t", "fab_t", "square")


def reference_coverage(names: list[str]) -> ReferenceCoverage:
    return ReferenceCoverage(reference="AutoAttack's standard suite (Croce & Hein 2020)", attacks=list(AUTOATTACK_STANDARD),
                             run=[a for a in AUTOATTACK_STANDARD if a in names],
                             not_run=[a for a in AUTOATTACK_STANDARD if a not in names])


def evaluate(model, params, x, y, domain, num_classes: int, generator, *, model_sha256: str, data_fingerprint: str,
             progress=None, data=None) -> tuple[AttackResult, SuiteResult]:
    """The attack evaluation of one model on (x, y): worst case over the configured attacks, the ε
    sweep and the masking checks. Pure: the stage and `robustgate compare` both call it. `data`: the
    prepared data, whose tabular statistics turn per-feature budgets into radii."""
    cfg, threat = params.attack, from_params(params, data)
    names, task_notes = resolve_attacks(cfg, num_classes)
    attacks = build_attacks(cfg, names, num_classes)
    result = run_suite(model, attacks, x, y, threat, domain, cfg.batch_size, generator,
                       progress=progress, sequential=cfg.mode == "sequential")
    n = len(y)
    sweep_n = min(cfg.sweep.max_samples or n, n)
    sweep = epsilon_sweep(model, cfg, x[:sweep_n], y[:sweep_n], threat, domain, generator)
    masking = []
    if cfg.masking.enabled:
        reference = next((a for a in attacks if isinstance(a, PGD)), PGD(cfg.pgd.steps, cfg.pgd.step_size, 1))
        masking = run_checks(model, result, attacks, sweep, x, y, threat, domain, generator,
                             cfg.batch_size, cfg.masking.tolerance, domain.diameter(threat.norm),
                             cfg.masking.large_epsilon_max_accuracy, reference)
    names = [a.name for a in attacks]
    worst_case = f"worst case over {', '.join(names)} ({cfg.mode})"
    per_attack = {}
    for attack in attacks:
        survived = int((result.clean_correct & ~result.broken[attack.name]).sum())
        per_attack[attack.name] = AttackRecord(
            settings=attack.settings(),
            broken=int(result.broken[attack.name].sum()),
            # in sequential mode an attack only sees what earlier ones left, so its own figure is not defined
            robust_accuracy=NotApplicable(status="not_applicable",
                                          reason="sequential mode: this attack saw only the samples earlier ones left")
            if result.sequential else Accuracy.of(survived, n, "upper_bound", attack.name),
        )
    per_class = {}
    for label in range(num_classes):
        members = y == label
        if int(members.sum()):
            per_class[str(label)] = ClassRecord(
                n=int(members.sum()),
                clean_accuracy=share(result.clean_correct[members]),
                robust_accuracy=share(result.robust[members]))
    confusion = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(confusion, (y.numpy(), result.adv_pred.numpy()), 1)
    ran = [c for c in masking if c.passed is not None]
    metrics = AttackResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=model_sha256, n=n,
        threat=ThreatRecord(**threat.record()), mode=cfg.mode,
        clean_accuracy=Accuracy.of(int(result.clean_correct.sum()), n, "point", "clean inputs"),
        robust_accuracy=Accuracy.of(int(result.robust.sum()), n, "upper_bound", worst_case),
        attacks=per_attack,
        broken_by={name: result.broken_by.count(name) for name in ["clean", *names]},
        per_class=per_class,
        confusion_under_attack=confusion.tolist(),
        sweep=AttackSweep(attack="pgd (step size scaled with ε)", n=sweep_n, points=sweep),
        masking={c.name: c.record() for c in masking},
        masking_all_passed=float(bool(ran) and all(c.passed for c in ran) and len(ran) == len(masking)),
        masking_failed=[c.name for c in ran if not c.passed],
        reference_suite=reference_coverage(names),
        task_notes=task_notes,
    )
    return metrics, result


def refuse_clean_only(ws: Workspace, params) -> None:
    """ε = 0 measures clean accuracy only; it is refused unless the policy explicitly accepts that."""
    if params.threat.epsilon == 0 and not load_policy(confine(params.gate.policy, ws.root, "gate.policy")).allow_clean_only:
        raise UsageError(f"threat.epsilon = 0 is a clean-only evaluation, which policy {params.gate.policy} does not "
                         "accept (set allow_clean_only: true in the policy to evaluate clean accuracy only)")


def main(ws: Workspace) -> int:
    params = ws.params()
    refuse_clean_only(ws, params)
    data, domain, data_fingerprint = load_data(ws, params)
    cfg, threat = params.attack, from_params(params, data)
    model_sha = sha256_file(ws.checkpoint)
    model, _ = load_model_for(ws, params, data, data_fingerprint)
    generator = seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples)
    check_model_outputs(model, x, data.num_classes)
    bar = tqdm(total=len(x) * len(resolve_attacks(cfg, data.num_classes)[0]), desc="attack", unit="img", file=sys.stderr, mininterval=1.0)
    metrics, result = evaluate(
        model, params, x, y, domain, data.num_classes, generator, model_sha256=model_sha,
        data_fingerprint=data_fingerprint, data=data,
        progress=lambda name, count: (bar.set_postfix_str(name, refresh=False), bar.update(count)))
    bar.close()
    names = list(metrics.attacks)
    n = metrics.n

    def save_adversarial(tmp):
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                x=x.numpy(), x_adv=result.x_adv.numpy(), y=y.numpy(), adv_pred=result.adv_pred.numpy(),
                clean_correct=result.clean_correct.numpy(), robust=result.robust.numpy(),
                broken_by=np.array(result.broken_by, dtype="U16"),
                epsilon=np.float32(threat.epsilon), norm=np.str_(threat.norm), attacks=np.array(names),
                model_sha256=np.str_(model_sha),
            )

    rows = [
        json.dumps({"index": i, "label": int(y[i]), "clean_correct": bool(result.clean_correct[i]),
                    "adv_pred": int(result.adv_pred[i]), "robust": bool(result.robust[i]),
                    "broken_by": result.broken_by[i]})
        for i in range(n)
    ]
    atomic_write(ws.adversarial, save_adversarial)
    write_text(ws.attack_samples, "\n".join(rows) + "\n")
    write_json(ws.root / "plots" / "attack_sweep.json", [p.model_dump() for p in metrics.sweep.points])
    write_json(ws.metrics("attack"), dump(metrics))
    robust = metrics.robust_accuracy
    print(f"attack: clean {metrics.clean_accuracy.value:.3f} robust {robust.value:.3f} "
          f"[{robust.ci[0]:.3f}, {robust.ci[1]:.3f}] n={n} ({', '.join(names)}, {threat.norm} ε={threat.epsilon})")
    for name, check in metrics.masking.items():
        status = {"not_run": "not run", "pass": "pass", "fail": "FAIL"}[check.status]
        print(f"  masking check {name}: {status}: {check.detail}")
    return 0
