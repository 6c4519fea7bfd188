"""Stage `attack`: clean and robust accuracy on the test split, per attack and worst case,
an ε sweep, per-class figures and the gradient-masking sanity checks."""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
from tqdm import tqdm

from pipeline.attacks import FGSM, PGD, Attack
from pipeline.attacks.apgd import APGD, APGDTargeted
from pipeline.attacks.masking import run_checks
from pipeline.attacks.square import Square
from pipeline.attacks.suite import robust_mask, run_suite
from pipeline.errors import UsageError
from pipeline.feasibility import resolve_attacks
from pipeline.io import atomic_write, write_json, write_text
from pipeline.stages.common import load_data, load_model_for, seed_everything, tensors
from pipeline.stats import proportion
from pipeline.workspace import SCHEMA_VERSION, Workspace


def build_attacks(cfg, epsilon: float, names=None) -> list[Attack]:
    p = cfg.pgd
    factories = {
        "fgsm": lambda: FGSM(),
        "pgd": lambda: PGD(p.steps, p.step_size, p.restarts, schedule=p.schedule),
        "pgd_cw": lambda: PGD(p.steps, p.step_size, p.restarts, loss="cw", schedule=p.schedule),
        "apgd_ce": lambda: APGD(cfg.apgd.steps, cfg.apgd.restarts, "ce"),
        "apgd_dlr": lambda: APGD(cfg.apgd.steps, cfg.apgd.restarts, "dlr"),
        "apgd_t": lambda: APGDTargeted(cfg.apgd.steps, cfg.apgd.restarts, cfg.apgd.targets),
        "square": lambda: Square(cfg.square.queries, cfg.square.p_init, cfg.square.restarts),
    }
    return [factories[name]() for name in (cfg.attacks if names is None else names)]  # validated by the config


def check_model_outputs(model, x: torch.Tensor, num_classes: int) -> None:
    """A model that returns NaN or the wrong number of logits makes every figure meaningless."""
    with torch.no_grad():
        out = model(x[:256])
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise UsageError(f"model returns shape {tuple(out.shape)} for {len(x[:256])} inputs; "
                         f"expected ({len(x[:256])}, {num_classes}) logits")
    if not torch.isfinite(out).all():
        raise UsageError("model returns NaN or inf logits on the test split; fix the model before attacking it")


def epsilon_sweep(model, cfg, x, y, epsilon, norm, domain, generator) -> list[dict]:
    """Robust accuracy against PGD (step size scaled with ε) from 0 to max_factor·ε."""
    limit = domain.diameter(norm)
    grid = sorted({min(limit, float(f) * epsilon) for f in np.linspace(0.0, cfg.sweep.max_factor, cfg.sweep.points)})
    rows = []
    for eps in grid:
        scale = eps / epsilon if epsilon > 0 else 0.0
        pgd = PGD(cfg.pgd.steps, max(cfg.pgd.step_size * scale, 1e-12), cfg.pgd.restarts, schedule=cfg.pgd.schedule)
        mask = robust_mask(model, pgd, x, y, eps, norm, domain, cfg.batch_size, generator)
        stats = proportion(int(mask.sum()), len(y))
        rows.append({"epsilon": eps, "robust_accuracy": stats["value"], "ci_low": stats["ci"][0],
                     "ci_high": stats["ci"][1], "n": stats["n"]})
    return rows


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg, threat = params.attack, params.threat
    data, domain, data_fingerprint = load_data(ws, params)
    model, _ = load_model_for(ws, data_fingerprint)
    generator = seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples)
    names, _notes = resolve_attacks(cfg, data.num_classes)  # _notes: for the report (integrator)
    check_model_outputs(model, x, data.num_classes)
    attacks = build_attacks(cfg, threat.epsilon, names)

    bar = tqdm(total=len(x) * len(attacks), desc="attack", unit="img", file=sys.stderr, mininterval=1.0)
    result = run_suite(model, attacks, x, y, threat.epsilon, threat.norm, domain, cfg.batch_size, generator,
                       progress=lambda name, count: (bar.set_postfix_str(name, refresh=False), bar.update(count)),
                       sequential=cfg.mode == "sequential")
    bar.close()
    n = len(y)
    sweep_n = cfg.sweep.max_samples or n
    sweep = epsilon_sweep(model, cfg, x[:sweep_n], y[:sweep_n], threat.epsilon, threat.norm, domain, generator)
    masking = []
    if cfg.masking.enabled:
        reference = next((a for a in attacks if isinstance(a, PGD)), PGD(cfg.pgd.steps, cfg.pgd.step_size, 1))
        masking = run_checks(model, result, attacks, sweep, x, y, threat.epsilon, threat.norm, domain, generator,
                             cfg.batch_size, cfg.masking.tolerance, domain.diameter(threat.norm),
                             cfg.masking.large_epsilon_max_accuracy, reference)

    clean = proportion(int(result.clean_correct.sum()), n)
    robust = proportion(int(result.robust.sum()), n)
    names = [a.name for a in attacks]
    per_attack = {}
    for attack in attacks:
        survived = int((result.clean_correct & ~result.broken[attack.name]).sum())
        per_attack[attack.name] = {
            "settings": attack.settings(),
            "broken": int(result.broken[attack.name].sum()),
            # in sequential mode an attack only sees what earlier ones left, so its own figure is not defined
            "robust_accuracy": None if result.sequential else proportion(survived, n),
        }
    per_class = {}
    for label in range(data.num_classes):
        members = y == label
        if int(members.sum()):
            per_class[str(label)] = {
                "n": int(members.sum()),
                "clean_accuracy": float(result.clean_correct[members].float().mean()),
                "robust_accuracy": float(result.robust[members].float().mean()),
            }
    confusion = np.zeros((data.num_classes, data.num_classes), dtype=int)
    np.add.at(confusion, (y.numpy(), result.adv_pred.numpy()), 1)
    ran = [c for c in masking if c.passed is not None]
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "n": n,
        "epsilon": threat.epsilon,
        "norm": threat.norm,
        "mode": cfg.mode,
        "clean_accuracy": clean["value"],
        "clean_accuracy_ci": clean["ci"],
        "robust_accuracy": robust["value"],
        "robust_accuracy_ci": robust["ci"],
        "ci_method": robust["ci_method"],
        "bound": f"upper bound on true robust accuracy: worst case over {', '.join(names)} only",
        "attacks": per_attack,
        "broken_by": {name: result.broken_by.count(name) for name in ["clean", *names]},
        "per_class": per_class,
        "confusion_under_attack": confusion.tolist(),
        "sweep": {"attack": "pgd (step size scaled with ε)", "n": min(sweep_n, n), "points": sweep},
        "masking": {c.name: c.record() for c in masking},
        "masking_all_passed": float(bool(ran) and all(c.passed for c in ran) and len(ran) == len(masking)),
        "masking_failed": [c.name for c in ran if not c.passed],
        "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
    }

    def save_adversarial(tmp):
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                x=x.numpy(), x_adv=result.x_adv.numpy(), y=y.numpy(), adv_pred=result.adv_pred.numpy(),
                clean_correct=result.clean_correct.numpy(), robust=result.robust.numpy(),
                broken_by=np.array(result.broken_by, dtype="U16"),
                epsilon=np.float32(threat.epsilon), norm=np.str_(threat.norm), attacks=np.array(names),
            )

    rows = [
        json.dumps({"index": i, "label": int(y[i]), "clean_correct": bool(result.clean_correct[i]),
                    "adv_pred": int(result.adv_pred[i]), "robust": bool(result.robust[i]),
                    "broken_by": result.broken_by[i]})
        for i in range(n)
    ]
    atomic_write(ws.adversarial, save_adversarial)
    write_text(ws.attack_samples, "\n".join(rows) + "\n")
    write_json(ws.root / "plots" / "attack_sweep.json", sweep)
    write_json(ws.metrics("attack"), metrics)
    print(f"attack: clean {clean['value']:.3f} robust {robust['value']:.3f} "
          f"[{robust['ci'][0]:.3f}, {robust['ci'][1]:.3f}] n={n} ({', '.join(names)}, {threat.norm} ε={threat.epsilon})")
    for check in masking:
        status = "not run" if check.passed is None else ("pass" if check.passed else "FAIL")
        print(f"  masking check {check.name}: {status}: {check.detail}")
    return 0
