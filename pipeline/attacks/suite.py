"""Run several attacks and keep the worst case per sample.

A sample counts as robust only if it is classified correctly and every attack
failed on it; the first attack that broke it is recorded. Robust accuracy is
therefore an upper bound on true robust accuracy, valid for these attacks only.

`independent` runs every attack on every correctly classified sample, so each
attack's own robust accuracy is known; `sequential` runs each attack only on the
samples still robust, as AutoAttack does: the same worst-case verdict for less
work (the gradient-masking checks then run the few attacks they compare on their own).
Every final candidate passes through the threat's `to_lattice` (integer features rounded; the
identity when none are declared), so an adversarial example is a point of the threat's domain.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.attacks.base import Attack
from pipeline.threat import Domain, LpBall


@dataclass(frozen=True)
class SuiteResult:
    clean_correct: torch.Tensor  # bool (N,)
    broken: dict[str, torch.Tensor]  # attack name -> bool (N,): correct on clean, wrong on adversarial
    robust: torch.Tensor  # bool (N,): correct and unbroken by every attack
    broken_by: list[str]  # per sample: first attack that broke it, "clean" if misclassified, "" if robust
    x_adv: torch.Tensor  # per sample: the breaking point, else the last attack's point
    adv_pred: torch.Tensor  # model prediction on x_adv
    sequential: bool = False  # broken[...] then counts only samples no earlier attack broke


def share(mask: torch.Tensor) -> float:
    """The fraction of True entries, exactly k/n (a float32 mean would print 0.47999998 for 0.48)."""
    return int(mask.sum()) / len(mask)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).argmax(1)


def run_suite(
    model: nn.Module,
    attacks: list[Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    threat: LpBall,
    domain: Domain,
    batch_size: int,
    generator: torch.Generator,
    progress=None,
    sequential: bool = False,
) -> SuiteResult:
    model.eval()
    clean_correct = predict(model, x, batch_size) == y
    x_adv = x.clone()
    adv_pred = predict(model, x, batch_size)
    broken: dict[str, torch.Tensor] = {}
    broken_any = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for attack in attacks:
        hit = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        eligible = clean_correct & ~broken_any if sequential else clean_correct
        targets = eligible.nonzero().squeeze(1)
        if progress is not None:
            progress(attack.name, len(x) - len(targets))  # nothing to attack there
        for start in range(0, len(targets), batch_size):
            idx = targets[start:start + batch_size]
            candidate = threat.to_lattice(attack(model, x[idx], y[idx], threat, domain, generator), x[idx], domain)
            pred = predict(model, candidate, batch_size)
            hit[idx] = pred != y[idx]
            keep = ~broken_any[idx]  # keep the first breaking point, else the latest candidate
            x_adv[idx[keep]] = candidate[keep]
            adv_pred[idx[keep]] = pred[keep]
            if progress is not None:
                progress(attack.name, len(idx))
        broken[attack.name] = hit
        broken_any |= hit
    broken_by = []
    for i in range(len(x)):
        if not clean_correct[i]:
            broken_by.append("clean")
        else:
            broken_by.append(next((a.name for a in attacks if broken[a.name][i]), ""))
    return SuiteResult(clean_correct, broken, clean_correct & ~broken_any, broken_by, x_adv, adv_pred, sequential)


def robust_mask(model, attack: Attack, x, y, threat: LpBall, domain, batch_size, generator) -> torch.Tensor:
    """Correct and unbroken by this one attack, per sample."""
    keep = predict(model, x, batch_size) == y
    if threat.epsilon == 0:
        return keep
    for start in range(0, len(x), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(x)), device=x.device)
        idx = idx[keep[idx]]
        if len(idx):
            candidate = threat.to_lattice(attack(model, x[idx], y[idx], threat, domain, generator), x[idx], domain)
            keep[idx] = predict(model, candidate, batch_size) == y[idx]
    return keep
