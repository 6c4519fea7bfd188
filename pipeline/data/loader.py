"""The prepared arrays as `torch.utils.data`: a map-style dataset over memory-mapped arrays, the
epoch's batches of indices as a batch sampler, and batch-wise iteration for evaluation.

Nothing here reads a split whole: a batch is one fancy-indexed read of the memory map, so a stage
holds the model and a batch per data-loader worker, whatever the size of the split. The training
order is drawn by the caller (:class:`EpochBatches.start_epoch`) from the run's generator at the
point where the loop drew it before, so one-process results are bit-identical to in-memory
training; under torchrun the order is the rank's share (pipeline.runtime.ShardedShuffle).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ArrayDataset(Dataset):
    """(x, y) pairs over two arrays (numpy memory maps or tensors), returned as float32 / int64 tensors.
    `__getitems__` reads a whole batch in one indexing operation (DataLoader uses it when present)."""

    def __init__(self, x, y):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __getitem__(self, index: int):
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self._take(indices)

    def _take(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.x, torch.Tensor):
            index = torch.as_tensor(indices, dtype=torch.int64, device=self.x.device)
        else:
            index = np.asarray(indices, dtype=np.int64)
        return (torch.as_tensor(self.x[index], dtype=torch.float32),
                torch.as_tensor(self.y[index], dtype=torch.int64))

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [start, stop) as tensors: a contiguous read (no index array)."""
        return (torch.as_tensor(self.x[start:stop], dtype=torch.float32),
                torch.as_tensor(self.y[start:stop], dtype=torch.int64))

    def __getstate__(self) -> dict:
        """A memory map travels to a spawned worker as its file and offset, not as a copy of its bytes."""
        state = dict(self.__dict__)
        for key in ("x", "y"):
            array = state[key]
            if isinstance(array, np.memmap) and array.filename is not None:
                state[key] = ("memmap", array.filename, array.dtype.str, array.shape, array.offset,
                              "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C")
        return state

    def __setstate__(self, state: dict) -> None:
        for key in ("x", "y"):
            value = state[key]
            if isinstance(value, tuple) and value and value[0] == "memmap":
                _, filename, dtype, shape, offset, order = value
                state[key] = np.memmap(filename, dtype=np.dtype(dtype), mode="c", shape=shape, offset=offset,
                                       order=order)
        self.__dict__.update(state)


class EpochBatches(Sampler):
    """Batches of indices of one epoch's order, drawn once per epoch by :meth:`start_epoch`.

    `shuffle` is pipeline.training.loop.Shuffle (one process: a permutation from the run's generator)
    or pipeline.runtime.ShardedShuffle (this rank's share of DistributedSampler's permutation)."""

    def __init__(self, shuffle, batch_size: int):
        self.shuffle, self.batch_size = shuffle, batch_size
        self.order: torch.Tensor | None = None

    def start_epoch(self, epoch: int, generator: torch.Generator) -> None:
        self.order = self.shuffle.order(epoch, generator)

    def __len__(self) -> int:
        return -(-len(self.shuffle) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.order is None:
            raise RuntimeError("EpochBatches: call start_epoch before iterating")
        order = self.order
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]


def _batch_as_is(batch):
    """The dataset's `__getitems__` already returns the batch as tensors: nothing to collate."""
    return batch


def training_loader(dataset: ArrayDataset, batches: EpochBatches, workers: int = 0,
                    pin_memory: bool = False) -> DataLoader:
    """The training DataLoader: `workers` processes read batches ahead (0: in this process)."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_batch_as_is,
                      pin_memory=pin_memory, persistent_workers=workers > 0)


def in_batches(dataset: ArrayDataset, batch_size: int, device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The dataset in order, `batch_size` samples at a time, on `device` (evaluation)."""
    for start in range(0, len(dataset), batch_size):
        x, y = dataset.slice(start, start + batch_size)
        yield x.to(device), y.to(device)


class DeviceRows:
    """The samples of an array (a memory map) read as they are indexed: `len`, `shape`, a slice or an
    index tensor give a float32 tensor of just those rows on `device`. Evaluation code that indexes a
    split the way it would index one tensor of it runs unchanged on a split it never holds whole."""

    def __init__(self, array, device="cpu"):
        self.array, self.device = array, torch.device(device)

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        return torch.from_numpy(np.array(self.array[key], dtype=np.float32)).to(self.device)  # a copy we own


def as_dataset(x, y=None) -> ArrayDataset:
    """`x` when it is a dataset already, else the dataset over the arrays (x, y)."""
    return x if isinstance(x, ArrayDataset) else ArrayDataset(x, y)
