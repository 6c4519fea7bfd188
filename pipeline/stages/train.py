"""Stage `train`: fit the model with the configured method, keep the best epoch."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from pipeline.attacks.pgd import PGD
from pipeline.errors import UsageError
from pipeline.io import write_json
from pipeline.models import build_model, save_checkpoint
from pipeline.stages.common import load_data, seed_everything, tensors
from pipeline.training.loop import FitConfig, TrainingDiverged, fit
from pipeline.workspace import SCHEMA_VERSION, Workspace


def fit_config(params) -> FitConfig:
    t = params.train
    return FitConfig(
        method=t.method,
        epochs=t.epochs,
        batch_size=t.batch_size,
        optimizer=t.optimizer,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        epsilon=params.threat.epsilon,
        norm=params.threat.norm,
        epsilon_warmup_epochs=t.epsilon_warmup_epochs,
        train_pgd=PGD(t.pgd.steps, t.pgd.step_size, 1),
        val_pgd=PGD(t.val_pgd.steps, t.val_pgd.step_size, t.val_pgd.restarts),
        noise_sigma=t.noise_sigma,
    )


def main(ws: Workspace) -> int:
    params = ws.params()
    data, domain, data_fingerprint = load_data(ws, params)
    generator = seed_everything(params.seed)
    input_shape = list(data.x["train"].shape[1:])
    options = params.model.factory_options()
    model = build_model(params.model.name, input_shape, data.num_classes, options)
    cfg = fit_config(params)
    x_train, y_train = tensors(data, "train")
    x_val, y_val = tensors(data, "val")

    bar = tqdm(total=cfg.epochs * len(x_train), desc=f"train {cfg.method}", unit="img",
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

    def on_batch(epoch: int, size: int, loss: float) -> None:
        bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f}", refresh=False)
        bar.update(size)

    def on_epoch(row: dict) -> None:
        bar.write(
            f"epoch {row['epoch']:>3}: loss {row['loss']:.4f} train {row['train_clean_accuracy']:.3f} "
            f"val clean {row['val_clean_accuracy']:.3f} val robust {row['val_robust_accuracy']:.3f} "
            f"({row['seconds']:.1f}s)"
        )

    started = time.perf_counter()
    try:
        result = fit(model, x_train, y_train, x_val, y_val, domain, cfg, generator, on_batch, on_epoch)
    except TrainingDiverged as error:
        raise UsageError(f"training diverged: {error}; lower train.lr or check the data") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    model.load_state_dict(result.best_state)
    best = result.history[result.best_epoch - 1]
    save_checkpoint(model, ws.model_dir, {
        "schema_version": SCHEMA_VERSION,
        "model": params.model.name,
        "model_options": options,
        "input_shape": input_shape,
        "num_classes": data.num_classes,
        "method": cfg.method,
        "epsilon": cfg.epsilon,
        "norm": cfg.norm,
        "noise_sigma": cfg.noise_sigma if cfg.method == "gaussian" else None,
        "best_epoch": result.best_epoch,
        "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
        "params_sha256": params.section_hash("seed", "data", "model", "threat", "train"),
    })
    write_json(ws.train_plot, result.history)
    write_json(ws.metrics("train"), {
        "schema_version": SCHEMA_VERSION,
        "method": cfg.method,
        "epochs": cfg.epochs,
        "best_epoch": result.best_epoch,
        "seconds": seconds,
        "best_val_clean_accuracy": best["val_clean_accuracy"],
        "best_val_robust_accuracy": best["val_robust_accuracy"],
        "val_robust_attack": {"name": "pgd", **cfg.val_pgd.settings()},
        "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
        "params": params.train.model_dump(mode="json"),
    })
    print(f"train: best epoch {result.best_epoch}/{cfg.epochs} val clean {best['val_clean_accuracy']:.3f} "
          f"val robust {best['val_robust_accuracy']:.3f} in {seconds:.1f}s")
    return 0
