"""Prepared data memory-mapped with its fingerprint stored once; the image-folder dataset.

Before this change `data.npz` was read whole (no memory map, no stored fingerprint: every stage
rehashed every array) and there was no `image_folder` dataset (params naming it were refused).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import load_dataset
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
