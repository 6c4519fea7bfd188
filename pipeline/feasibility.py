"""Refuse, before any stage does work, a params combination that cannot run on this task.

`prepare` (which learns the class count and input shape) and `train` call `check_runnable`
before they write anything, so a binary task does not train for minutes and then stop at the
attack stage. Defaults that depend on the task adapt instead of failing:

- `attack.attacks` left out of params.yaml means "every default attack that the task allows":
  APGD-DLR needs 3 classes and APGD-T 4 (the DLR loss uses the 3rd-largest logit), so a binary
  task runs FGSM, PGD, APGD-CE and Square and the notes say why APGD-T was dropped. An attack the
  user listed explicitly is never dropped: it is refused with one line.
- `attack.apgd.targets` left out is clamped to K-1 (there are only K-1 wrong classes to target);
  given explicitly and larger than K-1 it is refused.

`resolve_attacks(attack_cfg, num_classes) -> (names, notes)` is what the attack stage runs;
`notes` are sentences for the report.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pipeline.attacks.losses import MIN_CLASSES
from pipeline.errors import UsageError

NEEDS_CLASSES = {"apgd_dlr": MIN_CLASSES["dlr"], "apgd_t": MIN_CLASSES["dlr_targeted"]}


def attacks_explicit(attack_cfg) -> bool:
    """Whether params.yaml names `attack.attacks` (else the task-dependent default applies)."""
    return "attacks" in attack_cfg.model_fields_set


def resolve_attacks(attack_cfg, num_classes: int) -> tuple[list[str], list[str]]:
    """The attacks to run on a task with `num_classes` classes, and notes on what was adapted.
    Raises UsageError when an explicitly listed attack cannot run on this task."""
    names, notes = [], []
    for name in attack_cfg.attacks:
        needed = NEEDS_CLASSES.get(name, 2)
        if num_classes >= needed:
            names.append(name)
        elif attacks_explicit(attack_cfg):
            raise UsageError(f"attack.attacks: {name} needs at least {needed} classes; the data has {num_classes} "
                             f"(remove it, or leave attack.attacks out to get the attacks this task allows)")
        else:
            notes.append(f"{name} was left out of the default attacks: it needs at least {needed} classes "
                         f"and the data has {num_classes}.")
    if "apgd_t" in names:
        targets = apgd_targets(attack_cfg, num_classes)
        if targets < attack_cfg.apgd.targets:
            notes.append(f"APGD-T targets the {targets} most likely wrong classes "
                         f"(attack.apgd.targets = {attack_cfg.apgd.targets} clamped to K-1 = {num_classes - 1}).")
    return names, notes


def apgd_targets(attack_cfg, num_classes: int) -> int:
    """APGD-T's number of target classes: the configured one, clamped to K-1 when left at its default."""
    targets = attack_cfg.apgd.targets
    if targets <= num_classes - 1:
        return targets
    if "targets" in attack_cfg.apgd.model_fields_set:
        raise UsageError(f"attack.apgd.targets = {targets}: the data has {num_classes} classes, so at most "
                         f"{num_classes - 1} wrong classes to target")
    return num_classes - 1


def check_runnable(params, num_classes: int, input_shape: Sequence[int]) -> list[str]:
    """Raise UsageError (one line, exit 2) when these params cannot run end to end on data with
    `num_classes` classes and inputs of `input_shape`; return the notes on adapted defaults.
    Builds the model once (milliseconds) so a model/data mismatch is caught here too."""
    from pipeline.models import build_model

    _, notes = resolve_attacks(params.attack, num_classes)
    with torch.random.fork_rng(devices=[]):  # a trial build must not move the caller's seeded initialisation
        build_model(params.model.name, list(input_shape), num_classes, params.model.factory_options())
    return notes
