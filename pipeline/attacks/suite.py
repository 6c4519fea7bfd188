"""Run several attacks and keep the worst case per sample.

A sample counts as robust only if it is classified correctly and every attack
failed on it; the first attack that broke it is recorded. Robust accuracy is
therefore an upper bound on true robust accuracy, valid for these attacks only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.attacks.base import Attack
from pipeline.threat import Domain


@dataclass(frozen=True)
class SuiteResult:
    clean_correct: torch.Tensor  # bool (N,)
    broken: dict[str, torch.Tensor]  # attack name -> bool (N,): correct on clean, wrong on adversarial
    robust: torch.Tensor  # bool (N,): correct and unbroken by every attack
    broken_by: list[str]  # per sample: first attack that broke it, "clean" if misclassified, "" if robust
    x_adv: torch.Tensor  # per sample: the breaking point, else the last attack's point
    adv_pred: torch.Tensor  # model prediction on x_adv


def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).argmax(1)


def run_suite(
    model: nn.Module,
    attacks: list[Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    norm: str,
    domain: Domain,
    batch_size: int,
    generator: torch.Generator,
    progress=None,
) -> SuiteResult:
    model.eval()
    clean_correct = predict(model, x, batch_size) == y
    x_adv = x.clone()
    adv_pred = predict(model, x, batch_size)
    broken: dict[str, torch.Tensor] = {}
    broken_any = torch.zeros(len(x), dtype=torch.bool)
    for attack in attacks:
        hit = torch.zeros(len(x), dtype=torch.bool)
        targets = clean_correct.nonzero().squeeze(1)  # each attack alone on every correct sample
        if progress is not None:
            progress(attack.name, len(x) - len(targets))  # misclassified: nothing to attack
        for start in range(0, len(targets), batch_size):
            idx = targets[start:start + batch_size]
            candidate = attack(model, x[idx], y[idx], epsilon, norm, domain, generator)
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
    return SuiteResult(clean_correct, broken, clean_correct & ~broken_any, broken_by, x_adv, adv_pred)
