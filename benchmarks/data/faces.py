"""FACES: Martens' ``newfaces_rot_single.mat`` (25×25 = 625-pixel face images).

The FACES autoencoder benchmark (Hinton & Salakhutdinov 2006; Martens 2010) uses 144,900 images
of 625 pixels. The paper's code loads Martens' ``newfaces_rot_single.mat`` and takes the first
103,500 samples for training and the last 41,400 for testing (spec §7). That file cannot be
downloaded here; supply it yourself.

Assumptions made when reading the file, all checked:

* It is a MATLAB v5/v7 MAT-file readable by ``scipy.io.loadmat`` (v7.3/HDF5 files are rejected with
  conversion instructions).
* Its data is the single 2-D, real, numeric variable in it (normally ``newfaces_single``). When
  there are several 2-D numeric variables, ``newfaces_single`` is used if present, else the
  ``variable`` argument must name one.
* Orientation: in Martens' MATLAB code the matrix is 625 × 144,900, i.e. one sample per
  *column*, and ``scipy`` returns it with that shape. A matrix with exactly one dimension equal
  to 625 is oriented so that that dimension becomes the columns (samples × 625). A 625 × 625
  matrix is ambiguous and is read as MATLAB's pixels × samples (then transposed).
* Sample order is the file's order (column ``j`` in MATLAB = row ``j`` here); the pixel order
  inside a sample is kept as stored (irrelevant to a fully connected autoencoder).
* Train = the first ``n_train`` (103,500) samples, test = the last ``n_test`` (41,400). The two
  must not overlap; samples in between (none in the real file) are unused, with a warning.
* Values are used as stored (no rescaling); they must be finite. The loss for FACES is
  ``half_squared_error`` on the raw values (Gaussian likelihood).
"""

from __future__ import annotations

import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from benchmarks.data.errors import DatasetError

__all__ = ["FACES_PIXELS", "FACES_VARIABLE", "N_TEST", "N_TRAIN", "load_faces", "load_faces_array"]

FACES_PIXELS = 625
FACES_VARIABLE = "newfaces_single"
N_TRAIN = 103_500
N_TEST = 41_400

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _v73_message(path: Path) -> str:
    return (
        f"cannot read {path}: it is a MATLAB v7.3 (HDF5) file, which scipy.io.loadmat cannot read. "
        f"Convert it to the v7 format, e.g. in MATLAB: load('{path.name}'); "
        f"save('newfaces_rot_single_v7.mat', '{FACES_VARIABLE}', '-v7') — or in Octave: "
        f"load {path.name}; save -v7 newfaces_rot_single_v7.mat {FACES_VARIABLE} — then pass the new file"
    )


def _is_numeric_matrix(value: object) -> bool:
    return (
        isinstance(value, np.ndarray)
        and value.ndim == 2
        and value.size > 0
        and (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating))
    )


def load_faces_array(mat_path: str | PathLike[str], variable: str | None = None) -> np.ndarray:
    """All samples of the FACES .mat file as float32 (N, 625), in the file's sample order."""
    import scipy.io

    path = Path(mat_path)
    if not path.is_file():
        raise DatasetError(f"FACES .mat file not found: {path} (expected Martens' newfaces_rot_single.mat)", path)
    with open(path, "rb") as f:
        head = f.read(520)
    if b"MATLAB 7.3" in head[:128] or head[512:520] == _HDF5_SIGNATURE or head[:8] == _HDF5_SIGNATURE:
        raise DatasetError(_v73_message(path), path)
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as exc:
        raise DatasetError(_v73_message(path), path) from exc
    except Exception as exc:  # noqa: BLE001 (scipy raises many types for corrupt files)
        raise DatasetError(f"cannot read {path} as a MATLAB v5/v7 file ({exc})", path) from exc
    names = sorted(k for k in mat if not k.startswith("__"))
    if variable is not None:
        if variable not in mat:
            raise DatasetError(f"{path} has no variable {variable!r} (found: {names})", path)
        chosen = variable
    else:
        matrices = [k for k in names if _is_numeric_matrix(mat[k])]
        if len(matrices) == 1:
            chosen = matrices[0]
        elif FACES_VARIABLE in matrices:
            chosen = FACES_VARIABLE
        elif not matrices:
            raise DatasetError(f"{path} contains no 2-D numeric variable (found: {names})", path)
        else:
            raise DatasetError(
                f"{path} contains several 2-D numeric variables {matrices}; pass variable=... to choose",
                path,
            )
    arr = mat[chosen]
    if not _is_numeric_matrix(arr):
        raise DatasetError(f"{path}: variable {chosen!r} is not a 2-D real numeric array", path)
    if arr.shape[0] == FACES_PIXELS:  # MATLAB layout: pixels x samples (also the 625 x 625 case)
        arr = arr.T
    elif arr.shape[1] != FACES_PIXELS:
        raise DatasetError(
            f"{path}: variable {chosen!r} has shape {arr.shape}; expected {FACES_PIXELS} x N or N x {FACES_PIXELS}",
            path,
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: variable {chosen!r} contains NaN or inf", path)
    return arr


def load_faces(
    mat_path: str | PathLike[str],
    split: str = "train",
    *,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    variable: str | None = None,
) -> torch.Tensor:
    """A FACES split as a float32 CPU tensor (n, 625): the first ``n_train`` or last ``n_test`` rows."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n_train <= 0 or n_test <= 0:
        raise ValueError("n_train and n_test must be positive")
    arr = load_faces_array(mat_path, variable)
    n = arr.shape[0]
    if n < n_train + n_test:
        raise DatasetError(
            f"{mat_path} has {n} samples, fewer than n_train + n_test = {n_train} + {n_test}: "
            "the train and test splits would overlap",
            mat_path,
        )
    if n > n_train + n_test:
        warnings.warn(
            f"{mat_path} has {n} samples; {n - n_train - n_test} between the first {n_train} (train) "
            f"and the last {n_test} (test) are unused",
            stacklevel=2,
        )
    rows = arr[:n_train] if split == "train" else arr[n - n_test :]
    return torch.from_numpy(np.ascontiguousarray(rows))
