"""MNIST from the original IDX files.

``load_mnist(data_dir, split)`` looks in ``data_dir`` for the standard file names::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]   (60,000 images)
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]    (10,000 images)

(the variants ``train-images.idx3-ubyte`` etc. are accepted too). Each file may be raw or gzipped;
this is detected from the content, not the suffix. Images are returned as float32 in [0, 1]
(bytes / 255) flattened to 784 = 28·28 pixels in row-major order, labels as int64 — the
preprocessing of the paper's code (§7 of the spec: "pixels /255").

With ``download=True`` missing files are fetched from the usual public mirrors with
:mod:`urllib` and a short timeout, and their MD5 is checked. When that fails (e.g. no internet) a
:class:`DatasetError` says which files to put where.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from benchmarks.data.errors import DatasetError
from benchmarks.data.idx import parse_idx, read_idx

__all__ = ["MNIST_FILES", "MNIST_MD5", "MNIST_MIRRORS", "download_mnist", "find_mnist_files", "load_mnist"]

#: split -> (images file, labels file), canonical names without the .gz suffix.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: MD5 of the official gzipped files (the test pair matches ../shared/data/mnist/MD5SUMS).
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

#: Base URLs tried in order by ``download=True``.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

IMAGE_SIDE = 28


def _check_split(split: str) -> None:
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _candidates(data_dir: Path, stem: str) -> list[Path]:
    dotted = stem.replace("-idx", ".idx")
    return [data_dir / stem, data_dir / f"{stem}.gz", data_dir / dotted, data_dir / f"{dotted}.gz"]


def _find(data_dir: Path, stem: str) -> Path | None:
    for path in _candidates(data_dir, stem):
        if path.is_file():
            return path
    return None


def _missing_message(data_dir: Path, split: str, missing: Sequence[str]) -> str:
    names = ", ".join(f"{m}.gz" for m in missing)
    return (
        f"MNIST {split} split not found in {data_dir}: missing {names}. Put the official IDX files "
        f"(gzipped or not, e.g. {MNIST_FILES[split][0]}.gz or {MNIST_FILES[split][0]}) in that "
        "directory, or call load_mnist(..., download=True) on a machine with internet access."
    )


def find_mnist_files(data_dir: str | PathLike[str], split: str = "train") -> tuple[Path, Path]:
    """The (images, labels) files of ``split`` in ``data_dir``; DatasetError when one is missing."""
    _check_split(split)
    data_dir = Path(data_dir)
    found = [_find(data_dir, stem) for stem in MNIST_FILES[split]]
    missing = [stem for stem, path in zip(MNIST_FILES[split], found) if path is None]
    if missing:
        raise DatasetError(_missing_message(data_dir, split, missing), data_dir)
    return found[0], found[1]  # type: ignore[return-value]


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https/http URLs)
        return response.read()


def download_mnist(
    data_dir: str | PathLike[str],
    split: str = "train",
    *,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 10.0,
) -> tuple[Path, Path]:
    """Download the missing gzipped IDX files of ``split`` into ``data_dir``.

    Each file is tried on every mirror in turn; a download whose MD5 (when known) does not match is
    discarded. Raises DatasetError, saying where to put the files by hand, if a file cannot be had.
    """
    _check_split(split)
    data_dir = Path(data_dir)
    failures: list[str] = []
    missing: list[str] = []
    for stem in MNIST_FILES[split]:
        if _find(data_dir, stem) is not None:
            continue
        name = f"{stem}.gz"
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            try:
                data = _fetch(url, timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                failures.append(f"{url}: {exc}")
                continue
            want = MNIST_MD5.get(name)
            got = hashlib.md5(data).hexdigest()
            if want is not None and got != want:
                failures.append(f"{url}: MD5 mismatch (got {got}, expected {want})")
                continue
            try:
                parse_idx(data, url)  # never keep a file that does not decode
            except DatasetError as exc:
                failures.append(f"{url}: {exc}")
                continue
            data_dir.mkdir(parents=True, exist_ok=True)
            tmp = data_dir / f".{name}.part{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, data_dir / name)
            break
        else:
            missing.append(stem)
    if missing:
        tried = "; ".join(failures) if failures else "no mirrors given"
        raise DatasetError(
            "could not download MNIST (" + tried + "). " + _missing_message(data_dir, split, missing),
            data_dir,
        )
    return find_mnist_files(data_dir, split)


def load_mnist(
    data_dir: str | PathLike[str],
    split: str = "train",
    download: bool = False,
    *,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split as ``(images, labels)``.

    ``images``: float32 tensor (N, 784) with values in [0, 1] (raw bytes / 255, row-major pixels);
    ``labels``: int64 tensor (N,) with values 0..9. Both on the CPU.
    """
    _check_split(split)
    if download:
        download_mnist(data_dir, split, mirrors=mirrors, timeout=timeout)
    images_path, labels_path = find_mnist_files(data_dir, split)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(
            f"{images_path} is not an MNIST image file: expected uint8 of shape (N, 28, 28), "
            f"got {images.dtype} of shape {images.shape}",
            images_path,
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(
            f"{labels_path} is not an MNIST label file: expected uint8 of shape (N,), "
            f"got {labels.dtype} of shape {labels.shape}",
            labels_path,
        )
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"size mismatch: {images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels",
            labels_path,
        )
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(f"{labels_path} contains label {int(labels.max())} (> 9)", labels_path)
    n = images.shape[0]
    x = torch.from_numpy(images.reshape(n, IMAGE_SIDE * IMAGE_SIDE)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
