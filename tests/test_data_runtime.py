"""Prepared data memory-mapped with its fingerprint stored once; the image-folder dataset.

Before this change `data.npz` was read whole (no memory map, no stored fingerprint: every stage
rehashed every array) and there was no `image_folder` dataset (params naming it were refused).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import load_dataset
from pipeline.data.loader import ArrayDataset, EpochBatches
from pipeline.data.split import fingerprint, prepare
from pipeline.data.store import load_prepared, save_prepared, stored_fingerprint
from pipeline.errors import UsageError
from tests.conftest import TINY_PARAMS, make_workspace, run_stage


def test_prepared_arrays_are_memory_mapped_and_the_fingerprint_is_stored(tmp_path):
    data = prepare(load_dataset("digits"), 0.15, 0.25, seed=0, max_samples=200)
    save_prepared(data, tmp_path / "data.npz")
    loaded = load_prepared(tmp_path / "data.npz")
    assert isinstance(loaded.x["train"], np.memmap) and isinstance(loaded.x["test"], np.memmap)
    assert np.array_equal(loaded.x["test"], data.x["test"]) and np.array_equal(loaded.y["val"], data.y["val"])
    assert stored_fingerprint(tmp_path / "data.npz") == fingerprint(data) == fingerprint(loaded)
    loaded.x["test"][0] = -1.0  # copy-on-write: the file keeps its bytes
    assert np.array_equal(load_prepared(tmp_path / "data.npz").x["test"], data.x["test"])


def write_images(folder, sizes=((8, 8),), modes=("L",), per_class=6, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            mode = modes[i % len(modes)]
            shape = (h, w) if mode == "L" else (h, w, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / c / f"{i}.png")


def test_image_folder_reads_classes_channels_and_resizes(tmp_path):
    write_images(tmp_path / "imgs", sizes=((8, 8), (10, 6)), modes=("L", "RGB"))
    raw = load_dataset("image_folder", tmp_path / "imgs", tmp_path, image_size=[4, 5], channels=None)
    assert raw.x.shape == (12, 3, 4, 5)  # one RGB image makes the set RGB
    assert raw.class_names == ("cat", "dog") and raw.y.tolist() == [0] * 6 + [1] * 6
    assert raw.x.min() >= 0.0 and raw.x.max() <= 1.0
    gray = load_dataset("image_folder", tmp_path / "imgs", tmp_path, image_size=[4, 5], channels=1)
    assert gray.x.shape == (12, 1, 4, 5)


def test_image_folder_with_mixed_sizes_and_no_resize_is_refused(tmp_path):
    write_images(tmp_path / "imgs", sizes=((8, 8), (10, 6)))
    with pytest.raises(UsageError, match="different sizes.*data.image_size"):
        load_dataset("image_folder", tmp_path / "imgs", tmp_path)


def test_unreadable_image_exits_2_and_writes_nothing(tmp_path, capsys):
    params = {**TINY_PARAMS, "data": {"dataset": "image_folder", "path": "imgs"},
              "inputs": {"data": "imgs", "model": "pipeline/models.py"}}
    root = make_workspace(tmp_path / "ws", params)
    write_images(root / "imgs", per_class=12)
    (root / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    assert run_stage("prepare", root) == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
    assert not (root / "data" / "prepared" / "data.npz").exists()
    (root / "imgs" / "dog" / "broken.png").unlink()
    assert run_stage("prepare", root) == 0
    assert load_prepared(root / "data" / "prepared" / "data.npz").x["train"].shape[1:] == (1, 8, 8)


# --- training reads the splits through torch.utils.data -------------------------------------------------

class ReadLog(ArrayDataset):
    """The memory-mapped dataset, recording how many samples each read takes (a real dataset, not a mock)."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.reads: list[int] = []

    def _take(self, indices):
        self.reads.append(len(indices))
        return super()._take(indices)

    def slice(self, start, stop):
        self.reads.append(min(stop, len(self)) - start)
        return super().slice(start, stop)


def _fit_digits(tmp_path, train, val, workers=0, epochs=2):
    import torch

    from pipeline.attacks.pgd import PGD
    from pipeline.models import build_model
    from pipeline.threat import Domain, LpBall
    from pipeline.training.loop import FitConfig, fit

    data = load_prepared(tmp_path / "data.npz")
    torch.manual_seed(0)
    model = build_model("mlp", [1, 8, 8], 10, {"hidden": [16]})
    cfg = FitConfig(method="pgd_at", epochs=epochs, batch_size=32, optimizer="adam", lr=0.005, momentum=0.9,
                    weight_decay=0.0, threat=LpBall("linf", 0.05), epsilon_warmup_epochs=0, train_pgd=PGD(2, 0.02),
                    val_pgd=PGD(2, 0.02))
    result = fit(model, train, None, val, None, Domain.from_arrays(data.lower, data.upper), cfg,
                 torch.Generator().manual_seed(0), num_classes=10, workers=workers)
    return model.state_dict(), result.history


@pytest.fixture
def prepared_digits(tmp_path):
    data = prepare(load_dataset("digits"), 0.15, 0.25, seed=0)  # 1078 training samples: more than a 512 batch
    save_prepared(data, tmp_path / "data.npz")
    return load_prepared(tmp_path / "data.npz")


def test_training_streams_batches_from_the_memory_map_and_matches_in_memory_training(tmp_path, prepared_digits):
    """fit reads the memory-mapped splits a batch at a time (never whole: no read above one training batch
    of 32 or one evaluation batch of 512, every training sample once per epoch), and gives the very weights
    and history that in-memory tensors give. Fails on the code before: fit indexed `x_train[idx]` on
    whole in-memory tensors and took no dataset."""
    import torch

    data = prepared_digits
    train, val = ReadLog(data.x["train"], data.y["train"]), ReadLog(data.x["val"], data.y["val"])
    streamed, history = _fit_digits(tmp_path, train, val)
    n = len(data.y["train"])
    training_reads = [r for r in train.reads if r <= 32]
    assert sum(training_reads) >= 2 * n and max(train.reads) <= 512 and max(val.reads) <= 512
    assert n > 512  # so that a whole-split read would show up as a read above 512
    tensors = {s: (torch.as_tensor(data.x[s]), torch.as_tensor(data.y[s])) for s in ("train", "val")}
    in_memory, history_in_memory = _fit_digits(tmp_path, ArrayDataset(*tensors["train"]),
                                               ArrayDataset(*tensors["val"]))
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in history] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in history_in_memory]


def test_data_loader_workers_give_identical_training(tmp_path, prepared_digits):
    """`runtime.workers: 2` reads batches in two worker processes; the order is drawn in the training process,
    so the weights are identical to reading in-process. Fails on the code before: fit had no workers."""
    import torch

    data = prepared_digits
    make = lambda: (ArrayDataset(data.x["train"], data.y["train"]), ArrayDataset(data.x["val"], data.y["val"]))  # noqa: E731
    zero, _ = _fit_digits(tmp_path, *make(), workers=0, epochs=1)
    two, _ = _fit_digits(tmp_path, *make(), workers=2, epochs=1)
    assert all(torch.equal(zero[k], two[k]) for k in zero)


def test_epoch_batches_yield_the_run_generators_permutation():
    """One process: the batches are torch.randperm from the run's generator, cut in batch-size slices (today's
    order, so one-process results stay bit-identical)."""
    import torch

    from pipeline.training.loop import Shuffle

    batches = EpochBatches(Shuffle(70), 32)
    batches.start_epoch(0, torch.Generator().manual_seed(5))
    drawn = list(batches)
    assert [len(b) for b in drawn] == [32, 32, 6] and len(batches) == 3
    assert torch.equal(torch.cat(drawn), torch.randperm(70, generator=torch.Generator().manual_seed(5)))


def test_a_memory_mapped_dataset_pickles_as_a_file_reference(prepared_digits):
    """A spawned data-loader worker receives the memory map's file and offset, not a copy of the split."""
    import pickle

    data = prepared_digits
    dataset = ArrayDataset(data.x["train"], data.y["train"])
    payload = pickle.dumps(dataset)
    assert len(payload) < 2000 < data.x["train"].nbytes
    copy = pickle.loads(payload)
    assert isinstance(copy.x, np.memmap) and np.array_equal(copy.x, data.x["train"])
    assert copy[3][1] == int(data.y["train"][3])
