"""Datasets by name. Each loader returns raw arrays plus the input domain box.

Images live in [0, 1] and carry that box. Tabular data stays in its raw units (the
units a laboratory reports): its box is the observed per-feature range, and the
standardisation (training-split mean and standard deviation) is the first layer of
the model, so attacks, certificates and the ONNX file all see the same raw inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.data.idx import load_idx_directory
from pipeline.data.image_folder import load_image_folder
from pipeline.errors import UsageError


@dataclass(frozen=True)
class RawDataset:
    x: np.ndarray  # float32, (N, *input_shape)
    y: np.ndarray  # int64, (N,)
    standardize: bool  # tabular: the model standardises with train statistics, box from the data
    lower: Optional[np.ndarray] = None  # domain box for images, broadcastable to one input
    upper: Optional[np.ndarray] = None
    class_names: Optional[tuple[str, ...]] = None  # what the loader knows; else params or indices
    feature_names: Optional[tuple[str, ...]] = None  # tabular: one per column, in order
    feature_types: Optional[tuple[str, ...]] = None  # tabular: continuous | integer | categorical


def _digits(_: Optional[Path], __: Optional[Path] = None) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return RawDataset(x, bunch.target.astype(np.int64), False, np.zeros(1, np.float32), np.ones(1, np.float32),
                      tuple(str(c) for c in bunch.target_names))


def _breast_cancer(_: Optional[Path], __: Optional[Path] = None) -> RawDataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = tuple(str(f) for f in bunch.feature_names)
    return RawDataset(bunch.data.astype(np.float32), bunch.target.astype(np.int64), True,
                      class_names=tuple(str(c) for c in bunch.target_names),
                      feature_names=names, feature_types=("continuous",) * len(names))


def _idx(path: Optional[Path], root: Optional[Path] = None) -> RawDataset:
    images, labels = load_idx_directory(path, root)
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return RawDataset(x, labels.astype(np.int64), False, np.zeros(1, np.float32), np.ones(1, np.float32))


def _npz(path: Optional[Path], _: Optional[Path] = None) -> RawDataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError) as error:
        raise UsageError(f"{path}: not a readable .npz without pickles ({error})") from None
    missing = {"x", "y"} - set(arrays)
    if missing:
        raise UsageError(f"{path}: missing array(s) {sorted(missing)}; an npz dataset needs 'x' and 'y'")
    x, y = arrays["x"], arrays["y"]
    if x.size == 0 or y.size == 0:
        raise UsageError(f"{path}: empty arrays (x has shape {x.shape}, y has shape {y.shape}); need N > 0 samples")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UsageError(f"{path}: x has dtype {x.dtype}; expected numbers")
    if not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{path}: y has dtype {y.dtype}; expected integer class labels")
    x = x.astype(np.float32)
    lower, upper = arrays.get("lower"), arrays.get("upper")
    if (lower is None) != (upper is None):
        raise UsageError(f"{path}: give both 'lower' and 'upper' domain bounds, or neither")
    if lower is None and np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0:
        lower, upper = np.zeros(1, np.float32), np.ones(1, np.float32)
    if lower is not None:
        if not (np.issubdtype(lower.dtype, np.number) and np.issubdtype(upper.dtype, np.number)):
            raise UsageError(f"{path}: 'lower' and 'upper' must be numeric arrays")
        lower, upper = lower.astype(np.float32), upper.astype(np.float32)
    return RawDataset(x, y.astype(np.int64), False, lower, upper)


# Each loader takes (path, workspace root); the root confines files a directory holds.
DATASETS: dict[str, Callable[[Optional[Path], Optional[Path]], RawDataset]] = {
    "digits": _digits,
    "breast_cancer": _breast_cancer,
    "idx": _idx,
    "npz": _npz,
    "image_folder": load_image_folder,
    "csv": None,  # needs its column settings: see load_dataset
}


def load_dataset(name: str, path: Optional[Path] = None, root: Optional[Path] = None, csv=None,
                 **options) -> RawDataset:
    """`csv`: the CsvSettings (label column, feature types) a `csv` dataset is read with; `options`:
    the other loaders' own settings (image_folder: image_size, channels)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if name == "csv":
        from pipeline.data.csv_table import load_csv

        dataset = load_csv(path, csv)
    else:
        dataset = DATASETS[name](path, root, **options)
    validate(dataset, name)
    return dataset


def validate(dataset: RawDataset, name: str) -> None:
    """Refuse data that would make every later figure meaningless."""
    x, y = dataset.x, dataset.y
    if x.ndim < 2 or x.size == 0:
        raise UsageError(f"{name}: x must have shape (N, features...) with N > 0 and features > 0, got {x.shape}")
    if y.shape != (len(x),):
        raise UsageError(f"{name}: {len(x)} samples but labels of shape {y.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise UsageError(f"{name}: {bad} sample(s) contain NaN or inf")
    if y.min() < 0:
        raise UsageError(f"{name}: negative class label {int(y.min())}")
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise UsageError(f"{name}: need at least two classes, found {len(present)}")
    if len(present) != len(counts):
        raise UsageError(f"{name}: labels must be 0..K-1; class(es) {sorted(set(range(len(counts))) - set(present))} missing")
    if dataset.lower is not None:
        lower = np.broadcast_to(dataset.lower, x.shape[1:]) if dataset.lower.size == 1 else dataset.lower
        upper = np.broadcast_to(dataset.upper, x.shape[1:]) if dataset.upper.size == 1 else dataset.upper
        if lower.shape != x.shape[1:] or upper.shape != x.shape[1:]:
            raise UsageError(f"{name}: domain bounds of shape {lower.shape} do not match inputs {x.shape[1:]}")
        if not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            raise UsageError(f"{name}: domain bounds 'lower'/'upper' contain NaN or inf")
        if (lower > upper).any():
            bad = int((lower > upper).sum())
            raise UsageError(f"{name}: domain bounds inverted: lower > upper in {bad} feature(s)")
        if (x < lower).any() or (x > upper).any():
            raise UsageError(f"{name}: samples lie outside the declared domain bounds")
