"""Save and load the prepared splits (plain arrays, never pickles)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.split import SPLITS, PreparedData
from pipeline.errors import UsageError


def save_prepared(data: PreparedData, path: Path) -> None:
    arrays = {"lower": data.lower, "upper": data.upper, "num_classes": np.int64(data.num_classes)}
    for split in SPLITS:
        arrays[f"x_{split}"] = data.x[split]
        arrays[f"y_{split}"] = data.y[split]
        arrays[f"idx_{split}"] = data.indices[split]
    if data.tabular:
        arrays.update(mean=data.mean, std=data.std, absmax=data.absmax,
                      feature_names=np.array(data.feature_names), feature_types=np.array(data.feature_types))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_prepared(path: Path) -> PreparedData:
    if not path.is_file():
        raise UsageError(f"missing {path}: run `robustgate prepare` first")
    with np.load(path, allow_pickle=False) as archive:
        tabular = "mean" in archive.files
        stats = {} if not tabular else {
            "mean": archive["mean"], "std": archive["std"], "absmax": archive["absmax"],
            "feature_names": tuple(str(n) for n in archive["feature_names"]),
            "feature_types": tuple(str(t) for t in archive["feature_types"])}
        return PreparedData(
            x={s: archive[f"x_{s}"] for s in SPLITS},
            y={s: archive[f"y_{s}"] for s in SPLITS},
            lower=archive["lower"],
            upper=archive["upper"],
            num_classes=int(archive["num_classes"]),
            indices={s: archive[f"idx_{s}"] for s in SPLITS},
            **stats,
        )
