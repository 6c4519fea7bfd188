"""Stratified train/val/test split by seed, tabular statistics for the model's standardisation, fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.data.datasets import RawDataset
from pipeline.errors import UsageError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedData:
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    lower: np.ndarray  # one input's shape
    upper: np.ndarray
    num_classes: int
    indices: dict[str, np.ndarray]  # rows of the raw dataset in each split
    # Tabular data only (None for images): x stays in raw units; the model standardises with these.
    mean: Optional[np.ndarray] = None  # train-split mean per feature
    std: Optional[np.ndarray] = None  # train-split standard deviation (1 where constant)
    absmax: Optional[np.ndarray] = None  # largest |value| in the train split (relative budgets)
    feature_names: Optional[tuple[str, ...]] = None
    feature_types: Optional[tuple[str, ...]] = None

    @property
    def tabular(self) -> bool:
        return self.mean is not None


def split_indices(y: np.ndarray, val: float, test: float, seed: int, max_samples: int | None) -> dict[str, np.ndarray]:
    index = np.arange(len(y))
    try:
        if max_samples is not None and max_samples < len(y):
            index, _ = train_test_split(index, train_size=max_samples, stratify=y, random_state=seed)
        rest, test_idx = train_test_split(index, test_size=test, stratify=y[index], random_state=seed)
        train_idx, val_idx = train_test_split(
            rest, test_size=val / (1.0 - test), stratify=y[rest], random_state=seed + 1
        )
    except ValueError as error:
        raise UsageError(f"cannot split stratified: {error}") from None
    return {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}


def prepare(raw: RawDataset, val: float, test: float, seed: int, max_samples: int | None = None) -> PreparedData:
    idx = split_indices(raw.y, val, test, seed, max_samples)
    x = {s: raw.x[idx[s]] for s in SPLITS}
    stats: dict = {}
    if raw.standardize:  # raw units kept; the statistics go into the model's first layer
        std = x["train"].std(axis=0)
        std[std == 0] = 1.0
        names = raw.feature_names or tuple(f"x{j}" for j in range(raw.x.shape[1]))
        stats = {"mean": x["train"].mean(axis=0).astype(np.float32), "std": std.astype(np.float32),
                 "absmax": np.abs(x["train"]).max(axis=0).astype(np.float32), "feature_names": tuple(names),
                 "feature_types": raw.feature_types or ("continuous",) * len(names)}
        stacked = np.concatenate(list(x.values()))
        lower, upper = stacked.min(axis=0), stacked.max(axis=0)
    elif raw.lower is not None:
        shape = raw.x.shape[1:]
        lower = np.broadcast_to(raw.lower, shape).astype(np.float32).copy()
        upper = np.broadcast_to(raw.upper, shape).astype(np.float32).copy()
    else:  # no declared domain: the observed per-feature range
        lower, upper = raw.x.min(axis=0), raw.x.max(axis=0)
    return PreparedData(
        x=x,
        y={s: raw.y[idx[s]] for s in SPLITS},
        lower=lower.astype(np.float32),
        upper=upper.astype(np.float32),
        num_classes=int(raw.y.max()) + 1,
        indices=idx,
        **stats,
    )


def fingerprint(data: PreparedData) -> str:
    """SHA-256 over every split's arrays, the split indices and the domain box."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for array in (data.x[split], data.y[split], data.indices[split]):
            digest.update(f"{split}:{array.dtype}:{array.shape};".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    for array in (data.lower, data.upper):
        digest.update(np.ascontiguousarray(array).tobytes())
    if data.feature_names is not None:  # the same numbers under other column names are other data
        digest.update("\x1f".join(data.feature_names + data.feature_types).encode())
    return digest.hexdigest()
