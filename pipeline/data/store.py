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
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_prepared(path: Path) -> PreparedData:
    if not path.is_file():
        raise UsageError(f"missing {path}: run `robustgate prepare` first")
    with np.load(path, allow_pickle=False) as archive:
        return PreparedData(
            x={s: archive[f"x_{s}"] for s in SPLITS},
            y={s: archive[f"y_{s}"] for s in SPLITS},
            lower=archive["lower"],
            upper=archive["upper"],
            num_classes=int(archive["num_classes"]),
            indices={s: archive[f"idx_{s}"] for s in SPLITS},
        )
