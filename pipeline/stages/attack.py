"""Stage `attack`: clean and robust accuracy on the test split, per attack and worst case."""
from __future__ import annotations

import json
import sys

import numpy as np
from tqdm import tqdm

from pipeline.attacks import FGSM, PGD, Attack
from pipeline.attacks.suite import run_suite
from pipeline.io import atomic_write, write_json, write_text
from pipeline.stages.common import load_data, load_model_for, seed_everything, tensors
from pipeline.stats import proportion
from pipeline.workspace import SCHEMA_VERSION, Workspace


def build_attacks(cfg) -> list[Attack]:
    factories = {
        "fgsm": lambda: FGSM(),
        "pgd": lambda: PGD(cfg.pgd.steps, cfg.pgd.step_size, cfg.pgd.restarts),
    }
    return [factories[name]() for name in cfg.attacks]  # names validated by the config


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg, threat = params.attack, params.threat
    data, domain, data_fingerprint = load_data(ws, params)
    model, _ = load_model_for(ws, data_fingerprint)
    generator = seed_everything(params.seed)
    x, y = tensors(data, "test", cfg.max_samples)
    attacks = build_attacks(cfg)

    bar = tqdm(total=len(x) * len(attacks), desc="attack", unit="img", file=sys.stderr, mininterval=1.0)
    result = run_suite(model, attacks, x, y, threat.epsilon, threat.norm, domain, cfg.batch_size, generator,
                       progress=lambda name, count: (bar.set_postfix_str(name, refresh=False), bar.update(count)))
    bar.close()

    n = len(y)
    clean = proportion(int(result.clean_correct.sum()), n)
    robust = proportion(int(result.robust.sum()), n)
    per_attack = {}
    for attack in attacks:
        survived = int((result.clean_correct & ~result.broken[attack.name]).sum())
        per_attack[attack.name] = {"settings": attack.settings(), "robust_accuracy": proportion(survived, n)}
    names = [a.name for a in attacks]
    per_class = {}
    for label in range(data.num_classes):
        members = y == label
        count = int(members.sum())
        if count:
            per_class[str(label)] = {
                "n": count,
                "clean_accuracy": float(result.clean_correct[members].float().mean()),
                "robust_accuracy": float(result.robust[members].float().mean()),
            }
    confusion = np.zeros((data.num_classes, data.num_classes), dtype=int)
    np.add.at(confusion, (y.numpy(), result.adv_pred.numpy()), 1)
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "n": n,
        "epsilon": threat.epsilon,
        "norm": threat.norm,
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
        "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
    }

    def save_adversarial(tmp):
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                x=x.numpy(), x_adv=result.x_adv.numpy(), y=y.numpy(), adv_pred=result.adv_pred.numpy(),
                clean_correct=result.clean_correct.numpy(), robust=result.robust.numpy(),
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
    write_json(ws.metrics("attack"), metrics)
    print(f"attack: clean {clean['value']:.3f} robust {robust['value']:.3f} "
          f"[{robust['ci'][0]:.3f}, {robust['ci'][1]:.3f}] n={n} ({', '.join(names)}, {threat.norm} ε={threat.epsilon})")
    return 0
