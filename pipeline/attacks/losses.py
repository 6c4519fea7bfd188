"""Per-sample attack objectives (higher = closer to an adversarial example).

`ce` is the cross-entropy; `cw` the Carlini-Wagner margin max_{j≠y} z_j - z_y;
`dlr` the difference-of-logits ratio of Croce & Hein (2020), invariant to the
scale of the logits so that a model cannot hide behind saturated softmax.
"""
from __future__ import annotations

import torch
from torch import nn


def _others_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    masked = logits.clone()
    masked[torch.arange(len(y), device=y.device), y] = float("-inf")
    return masked.max(dim=1).values


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, target=None) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor, target=None) -> torch.Tensor:
    return _others_max(logits, y) - logits.gather(1, y[:, None]).squeeze(1)


def dlr(logits: torch.Tensor, y: torch.Tensor, target=None) -> torch.Tensor:
    """-(z_y - max_{j≠y} z_j) / (z_π1 - z_π3); needs at least 3 classes."""
    ordered = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - _others_max(logits, y)) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2); needs at least 4 classes."""
    ordered = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)


LOSSES = {"ce": cross_entropy, "cw": cw_margin, "dlr": dlr, "dlr_targeted": dlr_targeted}
MIN_CLASSES = {"ce": 2, "cw": 2, "dlr": 3, "dlr_targeted": 4}


def loss_and_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, target=None):
    """Per-sample loss values and the gradient of their sum with respect to the input."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    values = LOSSES[loss](logits, y, target)
    (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad, logits.detach()
