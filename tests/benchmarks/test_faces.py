"""FACES loader: variable discovery, orientation, first-n-train / last-n-test split, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch

from benchmarks.data import faces as F
from benchmarks.data.errors import DatasetError
from benchmarks.data.faces import load_faces, load_faces_array


def _write(tmp_path, name="newfaces_rot_single.mat", **arrays):
    path = tmp_path / name
    scipy.io.savemat(path, arrays)
    return path


def _matlab_layout(n, seed=0):
    """625 x n, one sample per column as in Martens' MATLAB file; sample j has value j in pixel 0."""
    data = np.random.default_rng(seed).standard_normal((625, n)).astype(np.float32)
    data[0] = np.arange(n)
    return data


def test_paper_split_sizes():
    assert (F.N_TRAIN, F.N_TEST, F.FACES_PIXELS) == (103_500, 41_400, 625)


@pytest.mark.parametrize(("n_train", "n_test"), [(7, 5), (1, 1), (3, 9)])
@pytest.mark.parametrize("layout", ["matlab", "rows"])
def test_split_round_trip(tmp_path, n_train, n_test, layout):
    data = _matlab_layout(n_train + n_test)
    stored = data if layout == "matlab" else data.T.copy()
    path = _write(tmp_path, newfaces_single=stored)
    train = load_faces(path, "train", n_train=n_train, n_test=n_test)
    test = load_faces(path, "test", n_train=n_train, n_test=n_test)
    assert train.dtype == torch.float32 and train.shape == (n_train, 625) and test.shape == (n_test, 625)
    np.testing.assert_array_equal(train.numpy(), data.T[:n_train])
    np.testing.assert_array_equal(test.numpy(), data.T[n_train:])
    assert train[:, 0].tolist() == list(range(n_train))
    assert test[:, 0].tolist() == list(range(n_train, n_train + n_test))


def test_any_single_variable_name_and_float64(tmp_path):
    data = _matlab_layout(6).astype(np.float64)
    path = _write(tmp_path, faces=data, note=np.array(["hello"]))
    np.testing.assert_allclose(load_faces_array(path), data.T.astype(np.float32))
    test = load_faces(path, "test", n_train=4, n_test=2)
    assert test[:, 0].tolist() == [4.0, 5.0]


def test_unused_middle_rows_warn(tmp_path):
    path = _write(tmp_path, newfaces_single=_matlab_layout(10))
    with pytest.warns(UserWarning, match="unused"):
        test = load_faces(path, "test", n_train=3, n_test=4)
    assert test[:, 0].tolist() == [6.0, 7.0, 8.0, 9.0]


def test_overlapping_split_is_an_error(tmp_path):
    path = _write(tmp_path, newfaces_single=_matlab_layout(6))
    with pytest.raises(DatasetError, match="overlap") as info:
        load_faces(path, "train", n_train=4, n_test=3)
    assert str(path) in str(info.value)


def test_several_matrices(tmp_path):
    a, b = _matlab_layout(4, 0), _matlab_layout(4, 1)
    path = _write(tmp_path, newfaces_single=a, other=b)
    np.testing.assert_array_equal(load_faces_array(path), a.T)
    np.testing.assert_array_equal(load_faces_array(path, variable="other"), b.T)
    path2 = _write(tmp_path, name="two.mat", x=a, y=b)
    with pytest.raises(DatasetError, match="several"):
        load_faces_array(path2)
    with pytest.raises(DatasetError, match="no variable"):
        load_faces_array(path2, variable="newfaces_single")


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"newfaces_single": np.zeros((600, 10))}, "shape"),
        ({"newfaces_single": np.full((625, 3), np.nan)}, "NaN"),
        ({"label": np.array(["text only"])}, "no 2-D numeric"),
        ({"newfaces_single": np.zeros((625, 3, 2))}, "no 2-D numeric"),
    ],
)
def test_bad_content(tmp_path, arrays, match):
    path = _write(tmp_path, **arrays)
    with pytest.raises(DatasetError, match=match) as info:
        load_faces(path, "train", n_train=1, n_test=1)
    assert str(path) in str(info.value)


def test_v73_and_garbage_and_missing(tmp_path):
    v73 = tmp_path / "newfaces_rot_single.mat"
    v73.write_bytes(b"MATLAB 7.3 MAT-file, Platform: x".ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(DatasetError, match="v7.3") as info:
        load_faces(v73)
    assert "-v7" in str(info.value) and str(v73) in str(info.value)
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"nonsense" * 100)
    with pytest.raises(DatasetError, match="garbage.mat"):
        load_faces(garbage)
    with pytest.raises(DatasetError, match="not found"):
        load_faces(tmp_path / "missing.mat")


def test_argument_validation(tmp_path):
    path = _write(tmp_path, newfaces_single=_matlab_layout(4))
    with pytest.raises(ValueError, match="split"):
        load_faces(path, "val", n_train=2, n_test=2)
    with pytest.raises(ValueError):
        load_faces(path, "train", n_train=0, n_test=2)
