"""Atomic file writes, hashing and workspace confinement.

Stages write every output through these helpers so a crash or a rejected input
never leaves a half-written file behind for DVC, the report or the gate to trust.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from pipeline.errors import UsageError

_UMASK = os.umask(0)
os.umask(_UMASK)


def confine(path: str | Path, root: Path, what: str) -> Path:
    """Resolve `path` against `root` and refuse anything that escapes the workspace."""
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UsageError(f"{what} = {str(path)!r}: path must stay inside the workspace {root}")
    return resolved


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    """`np.savez`, streamed and reproducible: each array (a memory map too) is written into its member
    in chunks (numpy.lib.format.write_array buffers 16 MiB of a non-file stream), so an output the
    size of the test split is never held in memory; members are stored uncompressed (so
    :func:`npz_member` can map them) with a fixed timestamp, so equal arrays give equal bytes."""
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    atomic_write(path, write)


def npz_member(path: Path, name: str) -> np.ndarray:
    """Array `name` of an .npz file, memory-mapped when the member is stored uncompressed (as
    :func:`write_npz` and `np.savez` store them): a consumer reads only the rows it indexes. The map is
    copy-on-write (writable for torch, never written back), like the prepared split's. A compressed
    member is read whole."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the local file header: its name and extra field lengths end it
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: member {name}.npy has no local header at its offset")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: member {name}.npy holds Python objects; refusing to load it")
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c", shape=shape, offset=offset, order="F" if fortran else "C")


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """Text lines written as they come (a JSONL sidecar of every sample is never one string), atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line + "\n")

    atomic_write(path, write)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"refusing to write non-finite number {value} to JSON")
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    text = json.dumps(_json_ready(payload), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"missing input {path}: run the upstream stage first (dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not valid JSON ({error}): the file is truncated or was edited; "
                         "re-run the stage that writes it") from None
