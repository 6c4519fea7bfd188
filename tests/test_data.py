import gzip
import struct

import numpy as np
import pytest

from pipeline.data.datasets import load_dataset
from pipeline.data.idx import read_idx
from pipeline.data.split import fingerprint, prepare
from pipeline.errors import UsageError


def write_idx(path, array, compress=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_digits_in_unit_box():
    data = load_dataset("digits")
    assert data.x.shape == (1797, 1, 8, 8)
    assert data.x.min() >= 0 and data.x.max() <= 1
    assert set(np.unique(data.y)) == set(range(10))


def test_split_is_stratified_disjoint_and_seeded():
    raw = load_dataset("digits")
    a = prepare(raw, 0.15, 0.25, seed=3)
    b = prepare(raw, 0.15, 0.25, seed=3)
    c = prepare(raw, 0.15, 0.25, seed=4)
    sets = [set(a.indices[s].tolist()) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(s) for s in sets) == 1797
    test_share = np.bincount(a.y["test"]) / np.bincount(raw.y)
    assert np.allclose(test_share, 0.25, atol=0.02)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)


def test_breast_cancer_keeps_raw_units_and_records_train_statistics():
    """Issue 17: tabular x stays in the laboratory's units; the train-split statistics go to the model
    (before: x was standardised here and the scaling was lost to the exported model)."""
    raw = load_dataset("breast_cancer")
    data = prepare(raw, 0.15, 0.25, seed=0)
    assert np.array_equal(data.x["test"], raw.x[data.indices["test"]])
    assert np.allclose(data.mean, data.x["train"].mean(axis=0)) and np.allclose(data.std, data.x["train"].std(axis=0))
    assert data.feature_names[0] == "mean radius" and len(data.feature_names) == 30
    assert data.lower.shape == (30,) and (data.lower < data.upper).all()
    for split in ("train", "val", "test"):
        assert (data.x[split] >= data.lower).all() and (data.x[split] <= data.upper).all()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 6, 6), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 10).astype(np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    data = load_dataset("idx", tmp_path)
    assert data.x.shape == (40, 1, 6, 6)
    assert np.allclose(data.x[:, 0] * 255, images)
    assert (data.y == labels).all()


def test_truncated_idx_is_refused(tmp_path):
    write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((10, 4, 4), np.uint8))
    path = tmp_path / "a-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UsageError, match="truncated"):
        read_idx(path)


def test_label_count_mismatch_is_refused(tmp_path):
    write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((10, 4, 4), np.uint8))
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(UsageError, match="10 images but 9 labels"):
        load_dataset("idx", tmp_path)


def test_npz_dataset_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((60, 5)).astype(np.float32)
    y = np.tile(np.arange(3), 20)
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    data = load_dataset("npz", tmp_path / "ok.npz")
    assert data.x.shape == (60, 5) and data.lower is not None
    bad = x.copy()
    bad[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad, y=y)
    with pytest.raises(UsageError, match="NaN or inf"):
        load_dataset("npz", tmp_path / "nan.npz")
    np.savez(tmp_path / "short.npz", x=x, y=y[:-1])
    with pytest.raises(UsageError, match="60 samples but labels"):
        load_dataset("npz", tmp_path / "short.npz")
    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(UsageError, match="missing array"):
        load_dataset("npz", tmp_path / "nolabels.npz")
    np.savez(tmp_path / "pickled.npz", x=np.array([object()], dtype=object), y=y)
    with pytest.raises(UsageError, match="without pickles"):
        load_dataset("npz", tmp_path / "pickled.npz")


# Data errors from issue 13: each is one line (UsageError, exit 2) and prepare writes nothing.

def _npz_workspace(tmp_path, **arrays):
    """A workspace whose data is data/raw/d.npz holding `arrays`, with prepared outputs from an
    earlier run in place (so the test sees whether prepare replaced them)."""
    import yaml

    from tests.conftest import TINY_PARAMS, make_workspace

    params = {**TINY_PARAMS, "data": {"dataset": "npz", "path": "data/raw/d.npz"}, "model": {"name": "mlp"},
              "attack": {**TINY_PARAMS["attack"]}}
    root = make_workspace(tmp_path / "ws", params)
    (root / "data" / "raw").mkdir(parents=True)
    np.savez(root / "data" / "raw" / "d.npz", **arrays)
    for name in ("data/prepared/data.npz", "metrics/prepare.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("earlier run")
    assert yaml.safe_load((root / "params.yaml").read_text())["data"]["dataset"] == "npz"
    return root


def _prepare_refuses(root, capsys, message):
    from tests.conftest import run_stage

    assert run_stage("prepare", root) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (root / "data/prepared/data.npz").read_text() == "earlier run"
    assert (root / "metrics/prepare.json").read_text() == "earlier run"


def _tabular(n=60):
    rng = np.random.default_rng(0)
    return rng.random((n, 5)).astype(np.float32), np.tile(np.arange(3), n // 3)


def test_nan_domain_bound_is_a_data_error_and_nothing_is_written(tmp_path, capsys):
    """Before: prepare replaced data.npz, then crashed in write_json on the NaN bound (traceback)."""
    x, y = _tabular()
    lower, upper = np.zeros(5, np.float32), np.ones(5, np.float32)
    lower[2] = np.nan
    _prepare_refuses(_npz_workspace(tmp_path, x=x, y=y, lower=lower, upper=upper), capsys, "NaN or inf")


def test_inverted_domain_bounds_are_a_data_error(tmp_path, capsys):
    """Before: lower > upper was not checked; the samples were reported outside the bounds instead."""
    x, y = _tabular()
    x[:] = 0.5
    lower, upper = np.full(5, 0.6, np.float32), np.full(5, 0.4, np.float32)
    with pytest.raises(UsageError, match="inverted"):
        from pipeline.data.datasets import RawDataset, validate

        validate(RawDataset(x, y, False, lower, upper), "npz")
    _prepare_refuses(_npz_workspace(tmp_path, x=x, y=y, lower=lower, upper=upper), capsys, "bounds")


def test_empty_arrays_are_one_line(tmp_path, capsys):
    """Before: x.min() on a zero-size array raised a ValueError traceback."""
    _prepare_refuses(_npz_workspace(tmp_path, x=np.zeros((0, 5), np.float32), y=np.zeros(0, np.int64)),
                     capsys, "empty arrays")


def test_idx_symlink_out_of_the_workspace_is_refused(tmp_path):
    """Before: only data.path itself was confined; a file in it could point anywhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    write_idx(outside / "a-images-idx3-ubyte", np.zeros((10, 4, 4), np.uint8))
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    write_idx(root / "data" / "a-labels-idx1-ubyte", np.arange(10) % 2)
    (root / "data" / "a-images-idx3-ubyte").symlink_to(outside / "a-images-idx3-ubyte")
    with pytest.raises(UsageError, match="outside the workspace"):
        load_dataset("idx", root / "data", root)
    assert load_dataset("idx", root / "data").x.shape == (10, 1, 4, 4)  # without a root: no confinement asked


def test_prepare_names_the_dataset_and_its_classes(tmp_path):
    """Before: metrics/prepare.json had neither; every registry name was robustgate-digits."""
    import json

    from pipeline.workspace import Workspace
    from tests.conftest import TINY_PARAMS, make_workspace, run_stage

    params = {**TINY_PARAMS, "model": {"name": "mlp", "hidden": [8]}, "register": {}}
    root = make_workspace(tmp_path / "d", params)
    assert run_stage("prepare", root) == 0
    metrics = json.loads((root / "metrics/prepare.json").read_text())
    assert metrics["dataset_name"] == "digits" and metrics["class_names"] == [str(k) for k in range(10)]
    assert Workspace.at(root).params().registry.model_name == "robustgate-digits"

    params = {**TINY_PARAMS, "data": {"dataset": "breast_cancer"}, "model": {"name": "mlp", "hidden": [8]},
              "register": {}}
    root = make_workspace(tmp_path / "b", params)
    assert run_stage("prepare", root) == 0
    metrics = json.loads((root / "metrics/prepare.json").read_text())
    assert metrics["dataset_name"] == "breast_cancer" and metrics["class_names"] == ["malignant", "benign"]
    assert Workspace.at(root).params().registry.model_name == "robustgate-breast_cancer"

    params["data"] = {"dataset": "breast_cancer", "name": "wdbc biopsies", "class_names": ["M", "B"]}
    make_workspace(root, params)
    assert run_stage("prepare", root) == 0
    metrics = json.loads((root / "metrics/prepare.json").read_text())
    assert metrics["dataset_name"] == "wdbc biopsies" and metrics["class_names"] == ["M", "B"]
    assert Workspace.at(root).params().registry.model_name == "robustgate-wdbc-biopsies"
