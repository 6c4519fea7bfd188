"""A rough time for each long stage, printed by `prepare` before any of them starts.

On 28x28 data a user cannot otherwise tell whether a run takes ten minutes or four hours. The
costs per unit of work come from bench/results/stage_times.md (bench/stage_times.py, 2 CPU
cores); they are interpolated linearly in the number of input values and scaled by the run's
sizes (epochs, training images, PGD steps, test samples, noise samples). Custom models get no
estimate. It is an order of magnitude, not a promise: other hardware, other widths, other
methods differ.
"""
from __future__ import annotations

from typing import Optional

# (model, input values): seconds for train standard and PGD-AT (7 steps) per 1000 images per
# epoch, and attack (five default attacks), certify (IBP + CROWN), smooth (n = 1000) per 100 images.
MEASURED = {
    ("mlp", 64): (0.01, 0.03, 0.42, 0.15, 0.12),
    ("mlp", 784): (0.02, 0.06, 0.57, 0.07, 0.41),
    ("cnn_small", 64): (0.04, 0.12, 1.12, 0.25, 0.18),
    ("cnn_small", 784): (0.11, 0.31, 2.37, 1.88, 1.05),
    ("cnn_medium", 64): (0.06, 0.13, 1.30, 0.74, 0.32),
    ("cnn_medium", 784): (0.36, 0.82, 5.82, 7.29, 6.37),
}
ATTACK_STEPS = {"pgd_at", "trades", "mart", "awp", "consistency"}


def unit_costs(model: str, values: int) -> Optional[tuple[float, ...]]:
    if (model, 64) not in MEASURED:
        return None
    low, high = MEASURED[(model, 64)], MEASURED[(model, 784)]
    t = (values - 64) / (784 - 64)
    return tuple(max(a + t * (b - a), 0.1 * a) for a, b in zip(low, high))


def estimate(params, samples: dict[str, int], input_shape) -> Optional[dict[str, float]]:
    """Seconds per long stage for these params and split sizes; None for a custom model."""
    values = 1
    for size in input_shape:
        values *= int(size)
    costs = unit_costs(params.model.name, values)
    if costs is None:
        return None
    standard, pgd_at, attack, certify, smooth = costs
    t = params.train
    if t.method in ATTACK_STEPS:
        per_epoch = pgd_at * (t.pgd.steps + 1) / 8
    elif t.method in ("ibp", "crown_ibp"):
        per_epoch = pgd_at * 2  # bound propagation: a few forward passes, coarser than the rest
    elif t.method == "fast_at":
        per_epoch = standard * 2
    else:
        per_epoch = standard
    test = samples["test"]
    attack_n = min(test, params.attack.max_samples or test)
    certify_n = min(test, params.certify.max_samples or test)
    smooth_n = min(test, params.smoothing.max_samples or test) if params.smoothing.enabled else 0
    return {
        "train": per_epoch * t.epochs * samples["train"] / 1000,
        "attack": attack * attack_n / 100 * len(params.attack.attacks) / 5,
        "certify": certify * certify_n / 100 * len(params.certify.methods) / 2,
        "smooth": smooth * smooth_n / 100 * params.smoothing.n / 1000,
    }


def describe(seconds: dict[str, float]) -> str:
    def fmt(s: float) -> str:
        return "<1 s" if s < 1 else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"

    return ", ".join(f"{stage} ~{fmt(s)}" for stage, s in seconds.items())
