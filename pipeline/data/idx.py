"""Reader for MNIST-format IDX files (gzip or raw), strict about truncation."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError

_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Return the array stored in one IDX file; any size mismatch is an error."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise UsageError(f"{path}: corrupt or truncated gzip ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UsageError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _UBYTE:
        raise UsageError(f"{path}: IDX element type 0x{raw[2]:02x} unsupported (only unsigned bytes)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UsageError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise UsageError(
            f"{path}: truncated or padded IDX file: header promises {expected} bytes "
            f"for shape {shape}, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _inside(path: Path, root: Path | None) -> Path:
    """Refuse a file (typically a symlink) that resolves outside the workspace, as data.path is."""
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"{path}: resolves to {path.resolve()}, outside the workspace {root}; copy the file in")
    return path


def load_idx_directory(directory: Path, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load every `<prefix>-images-idx3-ubyte[.gz]` with its `<prefix>-labels-idx1-ubyte[.gz]`.
    With `root`, every file must resolve inside it (no symlinks out of the workspace)."""
    if not directory.is_dir():
        raise UsageError(f"data.path = {str(directory)!r}: the idx dataset needs a directory")
    image_files = sorted(directory.glob("*-images-idx3-ubyte*"))
    for file in image_files + sorted(directory.glob("*-labels-idx1-ubyte*")):
        _inside(file, root)
    if not image_files:
        raise UsageError(f"{directory}: no '*-images-idx3-ubyte[.gz]' file found")
    images, labels = [], []
    for image_file in image_files:
        prefix = image_file.name.split("-images-")[0]
        label_files = sorted(directory.glob(f"{prefix}-labels-idx1-ubyte*"))
        if len(label_files) != 1:
            raise UsageError(f"{image_file}: expected exactly one '{prefix}-labels-idx1-ubyte[.gz]' beside it")
        x, y = read_idx(image_file), read_idx(label_files[0])
        if x.ndim != 3 or y.ndim != 1:
            raise UsageError(f"{image_file}: images must be 3-D and labels 1-D, got {x.ndim}-D and {y.ndim}-D")
        if len(x) != len(y):
            raise UsageError(f"{image_file}: {len(x)} images but {len(y)} labels in {label_files[0].name}")
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)
