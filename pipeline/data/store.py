"""Save and load the prepared splits (plain arrays, never pickles), memory-mapped.

`data.npz` is an uncompressed zip of `.npy` arrays, so each array lies in the file as raw bytes:
:func:`load_prepared` maps them (`np.memmap`) instead of reading them, and a stage touches only
the pages of the samples it uses. The split's fingerprint is computed once, by `prepare`, and
stored in the file: later stages read it (:func:`stored_fingerprint`) instead of rehashing every
array. A file written before that (no `fingerprint` member) is hashed as before.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from pipeline.data.split import SPLITS, PreparedData, fingerprint
from pipeline.errors import UsageError

_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def save_prepared(data: PreparedData, path: Path) -> None:
    arrays = {"lower": data.lower, "upper": data.upper, "num_classes": np.int64(data.num_classes),
              "fingerprint": np.str_(fingerprint(data))}
    for split in SPLITS:
        arrays[f"x_{split}"] = np.ascontiguousarray(data.x[split])
        arrays[f"y_{split}"] = np.ascontiguousarray(data.y[split])
        arrays[f"idx_{split}"] = data.indices[split]
    if data.tabular:
        arrays.update(mean=data.mean, std=data.std, absmax=data.absmax,
                      feature_names=np.array(data.feature_names), feature_types=np.array(data.feature_types))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)  # stored, not deflated: every member can be memory-mapped


def _mapped(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """Member `name`.npy as a memory map (a plain read for a compressed member)."""
    info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        name_length, extra_length = struct.unpack("<HH", handle.read(_LOCAL_HEADER)[26:30])
        handle.seek(info.header_offset + _LOCAL_HEADER + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0)(handle)
        if dtype.hasobject:
            raise UsageError(f"{path}: member {name} holds Python objects; prepared data is plain arrays only")
        offset = handle.tell()
    if not shape or 0 in shape:  # np.memmap cannot map zero bytes; tiny arrays are cheaper read
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    # copy-on-write: writable for torch.as_tensor (no warning), and a write never reaches the file
    return np.memmap(path, dtype=dtype, mode="c", shape=shape, order="F" if fortran else "C", offset=offset)


def load_prepared(path: Path) -> PreparedData:
    if not path.is_file():
        raise UsageError(f"missing {path}: run `robustgate prepare` first")
    try:
        with zipfile.ZipFile(path) as archive:
            get = lambda name: _mapped(path, archive, name)  # noqa: E731
            tabular = "mean.npy" in archive.namelist()
            stats = {} if not tabular else {
                "mean": np.asarray(get("mean")), "std": np.asarray(get("std")), "absmax": np.asarray(get("absmax")),
                "feature_names": tuple(str(n) for n in get("feature_names")),
                "feature_types": tuple(str(t) for t in get("feature_types"))}
            return PreparedData(
                x={s: get(f"x_{s}") for s in SPLITS},
                y={s: get(f"y_{s}") for s in SPLITS},
                lower=np.asarray(get("lower")),
                upper=np.asarray(get("upper")),
                num_classes=int(get("num_classes")),
                indices={s: get(f"idx_{s}") for s in SPLITS},
                **stats,
            )
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise UsageError(f"{path}: not a prepared data file ({error}); re-run `robustgate prepare`") from None


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint `prepare` stored with the split, None for a file written without one."""
    with np.load(path, allow_pickle=False) as archive:
        return str(archive["fingerprint"]) if "fingerprint" in archive.files else None
