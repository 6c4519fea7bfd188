"""Stage `prepare`: load, validate, split and fingerprint the dataset."""
from __future__ import annotations

import numpy as np

from pipeline.data.datasets import load_dataset
from pipeline.data.split import SPLITS, fingerprint, prepare
from pipeline.data.store import save_prepared
from pipeline.io import atomic_write, confine, write_json
from pipeline.threat import Domain, check_epsilon
from pipeline import results
from pipeline.workspace import Workspace


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.data
    path = confine(cfg.path, ws.root, "data.path") if cfg.path else None
    raw = load_dataset(cfg.dataset, path)
    data = prepare(raw, cfg.val_fraction, cfg.test_fraction, params.seed, cfg.max_samples)
    check_epsilon(params.threat.norm, params.threat.epsilon, Domain.from_arrays(data.lower, data.upper))
    digest = fingerprint(data)
    atomic_write(ws.prepared, lambda tmp: save_prepared(data, tmp))
    write_json(ws.metrics("prepare"), {
        "schema_version": results.SCHEMA_VERSION,
        "dataset": cfg.dataset,
        "fingerprint": digest,
        "seed": params.seed,
        "input_shape": list(data.x["train"].shape[1:]),
        "num_classes": data.num_classes,
        "samples": {s: int(len(data.y[s])) for s in SPLITS},
        "class_counts": {s: np.bincount(data.y[s], minlength=data.num_classes).tolist() for s in SPLITS},
        "domain": {"lower_min": float(data.lower.min()), "upper_max": float(data.upper.max())},
        "params": params.data.model_dump(mode="json"),
    })
    print(f"prepare: {cfg.dataset} {dict((s, len(data.y[s])) for s in SPLITS)} fingerprint {digest[:12]}")
    return 0
