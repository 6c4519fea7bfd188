"""Confidence intervals for accuracies estimated from a finite test set."""
from __future__ import annotations

from scipy.stats import beta


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval: covers the true rate with probability >= `confidence`."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    alpha = 1.0 - confidence
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lower, upper


def proportion(successes: int, trials: int, confidence: float = 0.95) -> dict:
    """An accuracy as the metrics files store it: point, interval, count, method."""
    lower, upper = clopper_pearson(successes, trials, confidence)
    return {
        "value": successes / trials,
        "ci": [lower, upper],
        "successes": int(successes),
        "n": int(trials),
        "ci_method": f"clopper-pearson {int(confidence * 100)}%",
    }
