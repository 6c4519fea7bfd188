"""The epoch loop: seeded batches, ε warm-up, robust validation, best checkpoint.

The best epoch is chosen by robust validation accuracy (clean accuracy for
`standard`), because adversarially trained models overfit robustly (Rice et al.
2020): the last epoch is often not the most robust one.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.attacks.pgd import PGD
from pipeline.attacks.suite import predict
from pipeline.threat import Domain
from pipeline.training.methods import METHODS, BatchContext


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


@dataclass(frozen=True)
class FitConfig:
    method: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    epsilon: float
    norm: str
    epsilon_warmup_epochs: int
    train_pgd: PGD
    val_pgd: PGD
    noise_sigma: float = 0.25


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_state: Optional[dict] = None


def _optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def epoch_epsilon(cfg: FitConfig, epoch: int) -> float:
    """Linear ε warm-up over the first `epsilon_warmup_epochs` epochs (epoch is 0-based)."""
    if cfg.epsilon_warmup_epochs == 0:
        return cfg.epsilon
    return cfg.epsilon * min(1.0, (epoch + 1) / cfg.epsilon_warmup_epochs)


def robust_accuracy(model, pgd: PGD, x, y, epsilon, norm, domain, generator, batch_size: int = 512) -> float:
    robust = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        x_adv = pgd(model, xb, yb, epsilon, norm, domain, generator)
        robust += int((predict(model, x_adv, batch_size) == yb).sum())
    return robust / len(x)


def fit(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    domain: Domain,
    cfg: FitConfig,
    generator: torch.Generator,
    on_batch: Optional[Callable[[int, int, float], None]] = None,
    on_epoch: Optional[Callable[[dict], None]] = None,
) -> FitResult:
    objective = METHODS[cfg.method]
    optimizer = _optimizer(model, cfg)
    result = FitResult()
    best_score = -1.0
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        epsilon = epoch_epsilon(cfg, epoch)
        ctx = BatchContext(epsilon, cfg.norm, domain, cfg.train_pgd, generator, cfg.noise_sigma)
        order = torch.randperm(len(x_train), generator=generator)
        loss_sum, seen = 0.0, 0
        model.train()
        for batch, start in enumerate(range(0, len(order), cfg.batch_size)):
            idx = order[start:start + cfg.batch_size]
            loss = objective(model, x_train[idx], y_train[idx], ctx)
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, batch {batch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            if on_batch is not None:
                on_batch(epoch, len(idx), loss_sum / seen)
        model.eval()
        train_clean = float((predict(model, x_train, 512) == y_train).float().mean())
        val_clean = float((predict(model, x_val, 512) == y_val).float().mean())
        val_robust = robust_accuracy(model, cfg.val_pgd, x_val, y_val, cfg.epsilon, cfg.norm, domain, generator)
        row = {
            "epoch": epoch + 1,
            "epsilon": epsilon,
            "loss": loss_sum / seen,
            "train_clean_accuracy": train_clean,
            "val_clean_accuracy": val_clean,
            "val_robust_accuracy": val_robust,
            "seconds": time.perf_counter() - started,
        }
        result.history.append(row)
        score = val_robust if cfg.method == "pgd_at" else val_clean  # select on what the method optimises
        # Only epochs at full ε are eligible: a warm-up epoch's robustness is not the target's.
        if epsilon == cfg.epsilon and score > best_score:
            best_score, result.best_epoch = score, epoch + 1
            result.best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(row)
    if result.best_state is None:  # ε never reached full size (warm-up longer than training)
        result.best_epoch, result.best_state = cfg.epochs, copy.deepcopy(model.state_dict())
    return result
