"""Stage `prepare`: load, validate, split and fingerprint the dataset.

Nothing is written until every output has been computed and checked (the data, its metrics,
and whether the params can run on this task at all), so a bad input leaves the previous
outputs in place.
"""
from __future__ import annotations

import json

import numpy as np

from pipeline import results
from pipeline.data.datasets import load_dataset
from pipeline.data.split import SPLITS, fingerprint, prepare
from pipeline.data.store import save_prepared
from pipeline.errors import UsageError
from pipeline.estimate import describe, estimate
from pipeline.feasibility import check_runnable
from pipeline.io import atomic_write, confine, write_json
from pipeline.clinical import check_clinical_params
from pipeline.threat import Domain, from_params
from pipeline.workspace import Workspace


def class_names(configured, from_loader, num_classes: int) -> list[str]:
    """params' data.class_names, else the loader's, else the label indices; one per class."""
    names = list(configured or from_loader or [str(k) for k in range(num_classes)])
    if len(names) != num_classes:
        raise UsageError(f"data.class_names lists {len(names)} names; the data has {num_classes} classes")
    return names


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.data
    path = confine(cfg.path, ws.root, "data.path") if cfg.path else None
    raw = load_dataset(cfg.dataset, path, ws.root, cfg.csv, **cfg.loader_options())
    data = prepare(raw, cfg.val_fraction, cfg.test_fraction, params.seed, cfg.max_samples)
    from_params(params, data).check(Domain.from_arrays(data.lower, data.upper))
    input_shape = list(data.x["train"].shape[1:])
    names = class_names(cfg.class_names, raw.class_names, data.num_classes)
    check_clinical_params(params, names, data.feature_names)
    notes = check_runnable(params, data.num_classes, input_shape)
    digest = fingerprint(data)
    metrics = {
        "schema_version": results.SCHEMA_VERSION,
        "dataset": cfg.dataset,
        "dataset_name": cfg.display_name(),
        "class_names": names,
        "fingerprint": digest,
        "seed": params.seed,
        "input_shape": input_shape,
        "num_classes": data.num_classes,
        "samples": {s: int(len(data.y[s])) for s in SPLITS},
        "class_counts": {s: np.bincount(data.y[s], minlength=data.num_classes).tolist() for s in SPLITS},
        "domain": {"lower_min": float(data.lower.min()), "upper_max": float(data.upper.max())},
        "params": params.data.model_dump(mode="json"),
    }
    try:
        json.dumps(metrics, allow_nan=False)
    except ValueError as error:
        raise UsageError(f"data: cannot describe the prepared data ({error}); check the input for NaN or inf") from None
    metrics = results.parse("prepare", metrics, "metrics/prepare.json")
    atomic_write(ws.prepared, lambda tmp: save_prepared(data, tmp))
    write_json(ws.metrics("prepare"), metrics)
    print(f"prepare: {metrics['dataset_name']} ({cfg.dataset}) {dict((s, len(data.y[s])) for s in SPLITS)} "
          f"fingerprint {digest[:12]}")
    for note in notes:
        print(f"prepare: note: {note}")
    times = estimate(params, metrics["samples"], input_shape)
    if times is not None:
        print(f"prepare: rough times on 2 CPU cores (bench/results/stage_times.md; ±50%, slower hardware more): "
              f"{describe(times)}")
    return 0
