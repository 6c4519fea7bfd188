"""The epoch loop: seeded batches, ε warm-up, LR schedule, robust validation, best checkpoint,
early stopping, a guard against catastrophic overfitting, and exact resumption.

The best epoch is chosen by robust validation accuracy for the adversarial methods,
verified validation accuracy for the certified ones (clean accuracy for `standard` and
`gaussian`), because adversarially trained models overfit robustly (Rice et al. 2020):
the last epoch is often not the most robust one.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from pipeline.attacks.pgd import PGD
from pipeline.attacks.suite import predict
from pipeline.data.loader import ArrayDataset, EpochBatches, as_dataset, in_batches, training_loader
from pipeline.threat import Domain, LpBall
from pipeline.training.methods import CERTIFIED, METHODS, BatchContext

CLEAN_SELECTED = ("standard", "gaussian")


def selection_metric(method: str) -> str:
    """The validation figure that picks the kept epoch: what the method is trained to raise."""
    if method in CLEAN_SELECTED:
        return "val_clean_accuracy"
    return "val_verified_accuracy" if method in CERTIFIED else "val_robust_accuracy"


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
    threat: LpBall  # the threat model: validation attacks and certifies at its radius
    epsilon_warmup_epochs: int
    train_pgd: Optional[PGD]  # the inner maximisation; None for methods that do not run PGD
    val_pgd: PGD
    noise_sigma: float = 0.25
    lr_schedule: str = "constant"  # constant | cosine | piecewise
    early_stopping_patience: Optional[int] = None
    catastrophic_drop: float = 0.2  # fast_at: robust val accuracy falling this far below its best
    context: dict = field(default_factory=dict)  # method hyperparameters for BatchContext
    train_epsilon: Optional[float] = None  # ε of the inner maximisation / bounds; None: `epsilon`
    condition: Any = None  # train.threat naming a condition: trained and validated over its parameters
    condition_search: Any = None  # conditions.search: the validation worst case under the condition

    @property
    def target_epsilon(self) -> float:
        """The radius training ramps up to (certified training often trains above the threat's ε)."""
        return self.threat.epsilon if self.train_epsilon is None else self.train_epsilon


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_state: Optional[dict] = None
    stopped: str = "completed"  # completed | early_stopping | catastrophic_overfitting


def _optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: FitConfig, progress: float) -> float:
    """LR at `progress` in [0, 1) of training: constant, cosine to zero, or ×0.1 at 50% and 75%."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "piecewise":
        return cfg.lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
    return cfg.lr


def warmup_progress(cfg: FitConfig, epoch: int) -> float:
    """Fraction of the ε warm-up done after `epoch` (0-based): 1.0 once training is at full ε."""
    if cfg.epsilon_warmup_epochs == 0:
        return 1.0
    return min(1.0, (epoch + 1) / cfg.epsilon_warmup_epochs)


def epoch_epsilon(cfg: FitConfig, epoch: int) -> float:
    """Linear ε warm-up over the first `epsilon_warmup_epochs` epochs, up to the training ε."""
    return cfg.target_epsilon * warmup_progress(cfg, epoch)


def clean_accuracy(model, data: ArrayDataset, device, batch_size: int = 512) -> float:
    """Clean accuracy read batch-wise (the split is never held whole); the same figure, bit for bit,
    as the float32 mean over the whole split it replaces."""
    correct = [predict(model, x, batch_size) == y for x, y in in_batches(data, batch_size, device)]
    return float(torch.cat(correct).float().mean())


def robust_accuracy(model, pgd: PGD, data: ArrayDataset, threat: LpBall, domain, generator, device,
                    batch_size: int = 512) -> float:
    robust = 0
    for xb, yb in in_batches(data, batch_size, device):
        x_adv = pgd(model, xb, yb, threat, domain, generator)
        robust += int((predict(model, x_adv, batch_size) == yb).sum())
    return robust / len(data)


def condition_context(cfg: FitConfig, ramp: float) -> dict:
    """The condition for this epoch's batches: its range grows with the warm-up as ε does."""
    if cfg.condition is None:
        return {}
    return {"condition": cfg.condition if ramp == 1.0 else cfg.condition.scaled(ramp)}


def condition_robust_accuracy(model, data: ArrayDataset, cfg: FitConfig, domain, device,
                              batch_size: int = 512) -> float:
    """Share of validation samples the condition's worst-case search (conditions.search settings) does not
    break, batch-wise; its own generator, so validation does not shift the training stream."""
    from pipeline.conditions.search import search

    generator = torch.Generator().manual_seed(0)
    robust = 0
    for x, y in in_batches(data, batch_size, device):
        robust += int(search(model, x, y, cfg.condition, domain, cfg.condition_search, generator, batch_size)
                      .robust.sum())
    return robust / len(data)


def verified_accuracy(bounds, data: ArrayDataset, threat: LpBall, num_classes, device, batch_size: int = 256) -> float:
    """Fraction certified by IBP or CROWN-IBP (each sound, so either suffices): the selection
    score of certified training, whose goal is verified, not empirical, robustness. Full CROWN
    is left to the certify stage: on a conv net it costs 10-50x more, every epoch."""
    verified = 0
    with torch.no_grad():
        for x, y in in_batches(data, batch_size, device):
            both = torch.zeros(len(y), dtype=torch.bool, device=y.device)
            for method in ("ibp", "crown_ibp"):
                both |= bounds.certify(x, y, threat, method, num_classes, batch_size, 0.0).verified
            verified += int(both.sum())
    return verified / len(data)


class TrainingStep(nn.Module):
    """One batch's training objective as a module: forward(x, y, ctx) is the loss.

    This is what DistributedDataParallel wraps under torchrun. The objectives call the model several
    times per batch (PGD's inner maximisation through autograd.grad, TRADES'/MART's clean and
    adversarial forwards, AWP's weight perturbation, auto_LiRPA's bounds on the same parameters);
    DDP sees them all as one forward, and its reducer averages the gradients the one backward of the
    loss accumulates into the parameters. The inner passes (autograd.grad with respect to inputs or
    to AWP's weights) accumulate nothing into `.grad` and so never reach the reducer."""

    def __init__(self, model: nn.Module, objective: Callable):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        return self.objective(self.model, x, y, ctx)


class Shuffle:
    """The epoch's training order in one process: a permutation drawn from the run's generator.
    Data-parallel training passes pipeline.runtime.ShardedShuffle instead (this rank's share)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def order(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator)


@dataclass
class TrainState:
    """Everything needed to continue after the last finished epoch with identical results."""

    epoch: int
    model: dict
    optimizer: dict
    generator: torch.Tensor
    result: FitResult
    best_score: float
    stale: int

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "model": self.model, "optimizer": self.optimizer, "generator": self.generator,
                "history": self.result.history, "best_epoch": self.result.best_epoch,
                "best_state": self.result.best_state, "best_score": self.best_score, "stale": self.stale}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        result = FitResult(list(data["history"]), data["best_epoch"], data["best_state"])
        return cls(data["epoch"], data["model"], data["optimizer"], data["generator"], result,
                   data["best_score"], data["stale"])


def fit(
    model: nn.Module,
    x_train,
    y_train,
    x_val,
    y_val,
    domain: Domain,
    cfg: FitConfig,
    generator: torch.Generator,
    on_batch: Optional[Callable[[int, int, float], None]] = None,
    on_epoch: Optional[Callable[[dict], None]] = None,
    *,
    num_classes: int,
    save_state: Optional[Callable[[TrainState], None]] = None,
    resume: Optional[TrainState] = None,
    shuffle: Optional[Shuffle] = None,
    parallel: Optional[Callable[[nn.Module], nn.Module]] = None,
    agree: Optional[Callable[[dict], dict]] = None,
    autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    workers: int = 0,
) -> FitResult:
    """Train `model` in place; `num_classes` is the data's, never assumed (certified training
    builds its margin specification from it). The splits are arrays (numpy memory maps or tensors)
    or :class:`ArrayDataset`s (then `y_train`/`y_val` are None): training reads them batch by batch
    through a DataLoader with `workers` worker processes, evaluation batch-wise, never whole.
    Hooks for the runtime, none of which changes the algorithm: `shuffle` gives each epoch's order
    (this rank's share under torchrun), `parallel` wraps the :class:`TrainingStep` for data-parallel
    training (DistributedDataParallel), `agree` makes every rank take rank 0's epoch row (so all
    select and stop alike), `autocast`/`scaler` the training precision."""
    train_set, val_set = as_dataset(x_train, y_train), as_dataset(x_val, y_val)
    device = next(model.parameters()).device
    shuffle = shuffle or Shuffle(len(train_set))
    autocast = autocast or contextlib.nullcontext
    optimizer = _optimizer(model, cfg)
    result, best_score, stale, first_epoch = FitResult(), -1.0, 0, 0
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        result, best_score, stale, first_epoch = resume.result, resume.best_score, resume.stale, resume.epoch
    step = TrainingStep(model, METHODS[cfg.method])
    if parallel is not None:
        step = parallel(step)  # after a resume's load: DDP starts every rank from rank 0's weights
    batches = EpochBatches(shuffle, cfg.batch_size)
    loader = training_loader(train_set, batches, workers, pin_memory=device.type == "cuda")
    bounds = None
    if cfg.method in CERTIFIED:
        from pipeline.certify.bounds import BoundComputer

        bounds = BoundComputer(model, train_set.sample_shape, domain)
    batches_per_epoch = len(batches)
    for epoch in range(first_epoch, cfg.epochs):
        started = time.perf_counter()
        epsilon = epoch_epsilon(cfg, epoch)
        ramp = warmup_progress(cfg, epoch)
        ctx = BatchContext(cfg.threat.with_epsilon(epsilon), domain, cfg.train_pgd, generator, num_classes,
                           noise_sigma=cfg.noise_sigma, ramp=ramp, bounds=bounds, **cfg.context,
                           **condition_context(cfg, ramp))
        batches.start_epoch(epoch, generator)  # the epoch's order, drawn where it always was
        loss_sum, seen = 0.0, 0
        model.train()
        for batch, (xb, yb) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, (epoch * batches_per_epoch + batch) / (cfg.epochs * batches_per_epoch))
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with autocast():
                loss = step(xb, yb, ctx)
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, batch {batch + 1}")
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()  # DDP averages gradients here
            while ctx.after_backward:
                ctx.after_backward.pop()()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            loss_sum += loss.item() * len(yb)
            seen += len(yb)
            if on_batch is not None:
                on_batch(epoch, len(yb), loss_sum / seen)
        model.eval()
        train_clean = clean_accuracy(model, train_set, device)
        val_clean = clean_accuracy(model, val_set, device)
        val_robust = (robust_accuracy(model, cfg.val_pgd, val_set, cfg.threat, domain, generator, device)
                      if cfg.condition is None else condition_robust_accuracy(model, val_set, cfg, domain, device))
        row = {
            "epoch": epoch + 1,
            "epsilon": epsilon,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": loss_sum / seen,
            "train_clean_accuracy": train_clean,
            "val_clean_accuracy": val_clean,
            "val_robust_accuracy": val_robust,
        }
        if bounds is not None:
            row["val_verified_accuracy"] = verified_accuracy(bounds, val_set, cfg.threat, num_classes, device)
        row["seconds"] = time.perf_counter() - started
        if agree is not None:
            row = agree(row)
        result.history.append(row)
        if cfg.method == "fast_at" and best_score >= 0 and val_robust < best_score - cfg.catastrophic_drop:
            result.stopped = "catastrophic_overfitting"  # Wong et al. 2020: FGSM training collapsed
            if on_epoch is not None:
                on_epoch(row)
            break
        score = row[selection_metric(cfg.method)]
        # Only epochs at full ε are eligible: a warm-up epoch's robustness is not the target's.
        if ramp == 1.0 and score > best_score:
            best_score, result.best_epoch, stale = score, epoch + 1, 0
            result.best_state = copy.deepcopy(model.state_dict())
        elif ramp == 1.0:
            stale += 1
        if save_state is not None:
            state = TrainState(epoch + 1, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                               generator.get_state(), result, best_score, stale)
            save_state(state)
        if on_epoch is not None:
            on_epoch(row)
        if cfg.early_stopping_patience is not None and stale >= cfg.early_stopping_patience:
            result.stopped = "early_stopping"
            break
    if result.best_state is None:  # ε never reached full size (warm-up longer than training)
        result.best_epoch, result.best_state = len(result.history), copy.deepcopy(model.state_dict())
    return result

