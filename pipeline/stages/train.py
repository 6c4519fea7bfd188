"""Stage `train`: fit the model with the configured method, keep the best epoch."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch

from tqdm import tqdm

from pipeline import results
from pipeline.attacks.pgd import PGD
from pipeline.config import LP_THREAT
from pipeline.data.loader import ArrayDataset
from pipeline.errors import UsageError
from pipeline.feasibility import check_runnable
from pipeline.io import atomic_write, confine, sha256_bytes, sha256_file, write_json
from pipeline.models import build_model, load_weights, save_checkpoint, set_input_statistics
from pipeline.results import TrainResult, dump
from pipeline.runtime import ShardedShuffle, join, release_freed_memory, rank_seed, torchrun_command, under_torchrun
from pipeline.stages.common import load_data, seed_everything, start_runtime
from pipeline.stages.train_threat import training_threat
from pipeline.threat import Domain, from_params
from pipeline.training.loop import CLEAN_SELECTED, FitConfig, TrainingDiverged, TrainState, fit, selection_metric
from pipeline.workspace import Workspace


def fit_config(params, data=None) -> FitConfig:
    """The training loop's settings: the shared ones, and the chosen method's own (`train` holds
    only the settings of its method, see :data:`pipeline.config.TRAIN_SETTINGS`)."""
    t = params.train
    own = {name: getattr(t, name) for name in t.own_settings()}
    pgd = own.pop("pgd", None)
    loop_settings = {key: own.pop(key) for key in ("noise_sigma", "catastrophic_drop") if key in own}
    condition = training_condition(params, data, own.pop("threat", LP_THREAT))
    if own.get("worst_of_k") is None:  # an Lp-trained method: the setting is not in effect
        own.pop("worst_of_k", None)
    return FitConfig(
        method=t.method,
        epochs=t.epochs,
        batch_size=t.batch_size,
        optimizer=t.optimizer,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        threat=from_params(params, data),
        epsilon_warmup_epochs=own.pop("epsilon_warmup_epochs", 0),
        train_epsilon=own.pop("epsilon", None),
        train_pgd=None if pgd is None else PGD(pgd.steps, pgd.step_size, pgd.restarts, schedule=pgd.schedule),
        val_pgd=PGD(t.val_pgd.steps, t.val_pgd.step_size, t.val_pgd.restarts, schedule=t.val_pgd.schedule),
        lr_schedule=t.lr_schedule,
        early_stopping_patience=t.early_stopping_patience,
        context=own,  # what is left: the method's hyperparameters (beta, awp_gamma, kappa_end, ...)
        condition=condition,
        condition_search=params.conditions.search if condition is not None else None,
        **loop_settings,
    )


def training_condition(params, data, name: str):
    """The condition `train.threat` names (None: the Lp ball), refused in one line when it does not apply
    to the data (rotation of tabular features) or its range lies outside the data domain."""
    if name == LP_THREAT:
        return None
    from pipeline.conditions.threats import from_config

    shape = tuple(data.x["train"].shape[1:]) if data is not None else ()
    condition = from_config(name, params.conditions.threats[name], shape)
    if data is not None:
        condition.check(Domain.from_arrays(data.lower, data.upper), shape,
                        f"train.threat = {name!r}: conditions.threats.{name}")
    return condition


def selection_rule(cfg: FitConfig, selected_by: str) -> str:
    rule = f"the epoch with the highest {selected_by.replace('_', ' ')} among the epochs trained at "
    if cfg.condition is not None:
        return rule + (f"the full range of condition {cfg.condition.name!r} (validation: the worst case of the "
                       "conditions.search settings under it)")
    return rule + "the full training ε" + (f" (validation attack: {cfg.val_pgd.name} {cfg.val_pgd.settings()})"
                                           if selected_by == "val_robust_accuracy" else "")


def trained_for(cfg: FitConfig) -> dict | None:
    """What the model was trained to resist, as the train metrics record it (claims.py words it); None for
    the methods that train on clean or noisy inputs and resist no threat (standard, gaussian)."""
    if cfg.method in CLEAN_SELECTED:
        return None
    if cfg.condition is None:
        return {"name": LP_THREAT, "kind": cfg.threat.kind, "description": cfg.threat.describe()}
    return {"name": cfg.condition.name, "kind": cfg.condition.kind, "description": cfg.condition.describe()}


def start_from_checkpoint(model, params, root) -> None:
    """Fine-tuning: load the initial weights (architecture must match) and freeze all but the head."""
    t = params.train
    if t.init_checkpoint is None:
        return
    directory = confine(t.init_checkpoint, root, "train.init_checkpoint")
    state = load_weights(directory / "model.pt")  # plain tensors only; a pickle is refused in one line
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UsageError(f"train.init_checkpoint: checkpoint does not match model {params.model.name!r}: "
                         f"{str(error).splitlines()[0]}") from None
    if t.finetune == "head":
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in head.parameters():
            parameter.requires_grad_(True)


def launch_torchrun(ws: Workspace, params, resume: bool) -> int:
    """`runtime.processes: N` outside torchrun: re-run this command as N torchrun processes."""
    if params.train.batch_size < params.runtime.processes:
        raise UsageError(f"runtime.processes = {params.runtime.processes}: more processes than train.batch_size = "
                         f"{params.train.batch_size} (each process takes a share of every batch)")
    argv = ["train", "--workspace", str(ws.root), "--params", ws.params_file.name] + (["--resume"] if resume else [])
    print(f"train: data-parallel in {params.runtime.processes} processes (torchrun)")
    return subprocess.run(torchrun_command(params.runtime.processes, argv), check=False).returncode


def main(ws: Workspace, resume: bool = False) -> int:
    params = ws.params()
    if params.model.supplied:  # nothing to train: import the supplied file in this stage's place
        print(f"train: model.source = {params.model.source!r}: importing {params.model.path}, not training")
        from pipeline.stages import import_model

        return import_model.main(ws)
    runtime = start_runtime(params)  # an unavailable device is refused here, before any work
    if params.runtime.processes > 1 and not under_torchrun():
        return launch_torchrun(ws, params, resume)
    distributed, runtime = join(start_runtime(params, int(os.environ.get("WORLD_SIZE", "1"))))
    main_rank = distributed is None or distributed.is_main
    data, domain, data_fingerprint = load_data(ws, params)
    if params.train.epsilon is not None:
        from_params(params, data).with_epsilon(params.train.epsilon).check(domain, key="train.epsilon")
    # every rank draws its own random stream (seed, rank); the data order is shared (ShardedShuffle)
    generator = seed_everything(params.seed if distributed is None else rank_seed(params.seed, distributed.rank))
    input_shape = list(data.x["train"].shape[1:])
    check_runnable(params, data.num_classes, input_shape)  # before training, not at the attack stage
    options = params.model.factory_options()
    model = build_model(params.model.name, input_shape, data.num_classes, options)
    if data.tabular and not set_input_statistics(model, data.mean, data.std):
        print("train: note: the model has no Standardize layer; it receives tabular inputs in raw units")
    start_from_checkpoint(model, params, ws.root)
    model = model.to(runtime.device)
    domain = domain.to(runtime.device)
    cfg = fit_config(params, data)
    hooks = {"autocast": runtime.autocast, "scaler": runtime.grad_scaler(), "workers": runtime.workers}
    if distributed is not None:  # DistributedDataParallel: rank 0's weights everywhere, gradients averaged
        cfg = replace(cfg, batch_size=max(1, cfg.batch_size // distributed.world))  # train.batch_size is global
        hooks.update(shuffle=ShardedShuffle(len(data.y["train"]), distributed, params.seed),
                     parallel=distributed.data_parallel, agree=distributed.from_main)
    state_file = ws.model_dir / "train_state.pt"
    # threat.rationale is report prose: editing it must not invalidate the model (nor a resume)
    fingerprint_now = params.section_hash("seed", "data", "model", "threat", "train",
                                          exclude={"threat": {"rationale"}})
    if cfg.condition is not None:  # what training uses of the condition (train_threat's record) must match too
        fingerprint_now = sha256_bytes((fingerprint_now + json.dumps(training_threat(params), sort_keys=True))
                                       .encode())
    previous = None
    if resume:
        previous = load_state(state_file, fingerprint_now, distributed)
        if main_rank:
            print(f"train: resuming after epoch {previous.epoch} of {cfg.epochs}")
    # the splits stay memory-mapped: fit streams them batch by batch (pipeline/data/loader.py)
    train_set, val_set = ArrayDataset(data.x["train"], data.y["train"]), ArrayDataset(data.x["val"], data.y["val"])

    samples_per_epoch = len(hooks["shuffle"]) if "shuffle" in hooks else len(train_set)  # this rank's share
    bar = tqdm(total=cfg.epochs * samples_per_epoch, desc=f"train {cfg.method}", unit="img",
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True, disable=not main_rank)

    def on_batch(epoch: int, size: int, loss: float) -> None:
        bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f}", refresh=False)
        bar.update(size)
        release_freed_memory()  # the batch's activations back to the OS, or the heap grows batch by batch

    def on_epoch(row: dict) -> None:
        bar.write(
            f"epoch {row['epoch']:>3}: loss {row['loss']:.4f} train {row['train_clean_accuracy']:.3f} "
            f"val clean {row['val_clean_accuracy']:.3f} val robust {row['val_robust_accuracy']:.3f} "
            + (f"val verified {row['val_verified_accuracy']:.3f} " if "val_verified_accuracy" in row else "")
            + f"({row['seconds']:.1f}s)"
        )

    def save_state(state: TrainState) -> None:
        payload = {**state.to_dict(), "params_sha256": fingerprint_now}
        if distributed is not None:  # each rank's own random stream, so that a resume continues every one
            payload["rank_generators"] = distributed.gather(state.generator)
            if not main_rank:
                return  # rank 0 alone writes
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write(state_file, lambda tmp: tmp.write_bytes(buffer.getvalue()))

    started = time.perf_counter()
    try:
        result = fit(model, train_set, None, val_set, None, domain, cfg, generator, on_batch,
                     on_epoch if main_rank else None, save_state=save_state, resume=previous,
                     num_classes=data.num_classes, **hooks)
    except TrainingDiverged as error:
        kept = f"; the last good epoch is kept in {state_file.relative_to(ws.root)}" if state_file.is_file() else ""
        raise UsageError(f"training diverged: {error}{kept}; lower train.lr or check the data") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    if not main_rank:  # rank 0 alone writes the checkpoint, the metrics and the log
        distributed.barrier()
        return 0
    if result.stopped != "completed":
        print(f"train: stopped early ({result.stopped.replace('_', ' ')}) after epoch {len(result.history)}; "
              f"keeping epoch {result.best_epoch}")
    model.load_state_dict(result.best_state)
    model = model.cpu()  # the checkpoint is device-independent
    best = result.history[result.best_epoch - 1]
    save_checkpoint(model, ws.model_dir, {
        "schema_version": results.SCHEMA_VERSION,
        "model": params.model.name,
        "model_options": options,
        "input_shape": input_shape,
        "num_classes": data.num_classes,
        "method": cfg.method,
        "epsilon": cfg.threat.epsilon,
        "train_epsilon": cfg.target_epsilon,
        "norm": cfg.threat.norm,
        "noise_sigma": cfg.noise_sigma if cfg.method == "gaussian" else None,
        "best_epoch": result.best_epoch,
        "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
        "params_sha256": fingerprint_now,
    })
    state_file.unlink(missing_ok=True)  # finished: nothing to resume
    write_json(ws.train_plot, result.history)
    selected_by = selection_metric(cfg.method)
    write_json(ws.metrics("train"), dump(TrainResult(
        model_sha256=sha256_file(ws.checkpoint),
        selected_by=selected_by,
        selection_rule=selection_rule(cfg, selected_by),
        method=cfg.method,
        epochs=cfg.epochs,
        epochs_run=len(result.history),
        stopped=result.stopped,
        best_epoch=result.best_epoch,
        seconds=seconds,
        best_val_clean_accuracy=best["val_clean_accuracy"],
        best_val_robust_accuracy=best["val_robust_accuracy"],
        best_val_verified_accuracy=best.get("val_verified_accuracy"),
        train_epsilon=cfg.target_epsilon,
        val_robust_attack=({"name": "pgd", **cfg.val_pgd.settings()} if cfg.condition is None else
                           {"name": "condition_search", **cfg.condition_search.model_dump(mode="json")}),
        trained_for=trained_for(cfg),
        seed=params.seed,
        dataset_fingerprint=data_fingerprint,
        params=params.train.model_dump(mode="json"),
        runtime=runtime.record(),
    )))
    verified = f" val verified {best['val_verified_accuracy']:.3f}" if "val_verified_accuracy" in best else ""
    print(f"train: best epoch {result.best_epoch}/{cfg.epochs} val clean {best['val_clean_accuracy']:.3f} "
          f"val robust {best['val_robust_accuracy']:.3f}{verified} in {seconds:.1f}s")
    if distributed is not None:
        distributed.barrier()
    return 0


def load_state(path, params_sha256: str, distributed=None) -> TrainState:
    """The state of the last finished epoch, refused when the params or the number of processes
    changed since; under torchrun each rank continues its own random stream."""
    if not path.is_file():
        raise UsageError(f"nothing to resume: {path} does not exist (the last run finished or never started)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("params_sha256") != params_sha256:
        raise UsageError(f"{path} was written with other params (seed, data, model, threat or train changed); "
                         "run `robustgate train` without --resume")
    generators = payload.pop("rank_generators", None)
    world = 1 if distributed is None else distributed.world
    if (generators is None and world > 1) or (generators is not None and len(generators) != world):
        raise UsageError(f"{path} was written by {1 if generators is None else len(generators)} training "
                         f"process(es), this run has {world}: set runtime.processes back or train without --resume")
    if generators is not None:
        payload["generator"] = generators[distributed.rank]
    return TrainState.from_dict(payload)
