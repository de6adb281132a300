"""Training and test sets of the autoencoder experiments (spec §7), as float32 tensors on a device.

* ``curves``: ``--data-dir/digs3pts_1.mat`` (Martens' original, variables ``bdata``/``bdatatest``)
  when present; otherwise the deterministic synthetic re-creation of
  :mod:`benchmarks.data.curves` (generator seed ``curves_seed``), cached as ``.npz`` under
  ``--data-dir`` or, without one, ``~/.cache/secondorder`` (override with ``SECONDORDER_CACHE``).
  Sizes default to 20,000 / 10,000; smaller sizes are the first images of the full sets.
* ``mnist``: the IDX files in ``--data-dir`` (60k train, 10k test; ``n_train``/``n_test`` keep the
  first images). With ``mnist_test_as_train`` only the 10k test split is needed: training uses its
  first ``n_train`` (default 8,000) images and testing its last ``n_test`` (default 2,000); the two
  must not overlap.
* ``faces``: ``--data-dir/newfaces_rot_single.mat`` (or ``--data-dir`` naming the file itself):
  first ``n_train`` (103,500) samples train, last ``n_test`` (41,400) test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.data import DatasetError, load_curves, load_faces, load_mnist
from benchmarks.data.curves import N_TEST as CURVES_N_TEST
from benchmarks.data.curves import N_TRAIN as CURVES_N_TRAIN
from benchmarks.experiment.config import ExperimentConfig

__all__ = ["CURVES_MAT", "FACES_MAT", "DataBundle", "check_widths", "default_cache_dir", "load_data"]

CURVES_MAT = "digs3pts_1.mat"
FACES_MAT = "newfaces_rot_single.mat"
MNIST_TEST_SIZE = 10_000


@dataclass
class DataBundle:
    """The two splits (rows = samples) on the experiment's device, and where they came from."""

    train: torch.Tensor
    test: torch.Tensor
    source: str

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    def describe(self) -> dict[str, object]:
        return {"n_train": int(self.train.shape[0]), "n_test": int(self.test.shape[0]), "dim": self.dim,
                "source": self.source}


def default_cache_dir() -> Path:
    """``$SECONDORDER_CACHE`` or ``~/.cache/secondorder``."""
    env = os.environ.get("SECONDORDER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "secondorder"


def _head(x: torch.Tensor, n: int | None, what: str) -> torch.Tensor:
    if n is None:
        return x
    if n > x.shape[0]:
        raise ValueError(f"{what}: asked for {n} samples but the split has only {x.shape[0]}")
    return x[:n]


def _curves(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    mat = data_dir / CURVES_MAT if data_dir is not None else None
    if mat is not None and mat.is_file():
        train = _head(load_curves(split="train", mat_path=mat), cfg.n_train, "curves train")
        test = _head(load_curves(split="test", mat_path=mat), cfg.n_test, "curves test")
        return train, test, str(mat)
    n_train = cfg.n_train or CURVES_N_TRAIN
    n_test = cfg.n_test or CURVES_N_TEST
    cache = data_dir if data_dir is not None else default_cache_dir()
    train = load_curves(cache, "train", cfg.curves_seed, n_train, n_test)
    test = load_curves(cache, "test", cfg.curves_seed, n_train, n_test)
    return train, test, f"synthetic CURVES (generator seed {cfg.curves_seed}, cache {cache})"


def _mnist(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    if cfg.data_dir is None:
        raise DatasetError(
            "MNIST needs --data-dir pointing at the IDX files (train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); "
            "with only the 10k test split, add --mnist-test-as-train"
        )
    if cfg.mnist_test_as_train:
        images, _ = load_mnist(cfg.data_dir, "test")
        n_train = cfg.n_train if cfg.n_train is not None else 8_000
        n_test = cfg.n_test if cfg.n_test is not None else 2_000
        if n_train + n_test > images.shape[0]:
            raise ValueError(f"mnist_test_as_train: n_train + n_test = {n_train} + {n_test} exceeds the "
                             f"{images.shape[0]} images of the test split")
        return (images[:n_train], images[images.shape[0] - n_test:],
                f"MNIST test split of {cfg.data_dir} (first {n_train} train, last {n_test} test)")
    train, _ = load_mnist(cfg.data_dir, "train")
    test, _ = load_mnist(cfg.data_dir, "test")
    return _head(train, cfg.n_train, "mnist train"), _head(test, cfg.n_test, "mnist test"), f"MNIST {cfg.data_dir}"


def _faces(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    if cfg.data_dir is None:
        raise DatasetError(f"FACES needs --data-dir containing {FACES_MAT} (Martens' file; it cannot be downloaded)")
    path = Path(cfg.data_dir)
    mat = path if path.is_file() else path / FACES_MAT
    if not mat.is_file():
        raise DatasetError(f"FACES file not found: {mat} (put Martens' {FACES_MAT} there)", mat)
    sizes = {}
    if cfg.n_train is not None:
        sizes["n_train"] = cfg.n_train
    if cfg.n_test is not None:
        sizes["n_test"] = cfg.n_test
    return load_faces(mat, "train", **sizes), load_faces(mat, "test", **sizes), str(mat)


def load_data(cfg: ExperimentConfig) -> DataBundle:
    """Load both splits for ``cfg`` and move them to ``cfg.device`` (float32, contiguous)."""
    loader = {"curves": _curves, "mnist": _mnist, "faces": _faces}[cfg.dataset]
    train, test, source = loader(cfg)
    if train.shape[0] < cfg.batch_size:
        raise ValueError(f"the training set has {train.shape[0]} samples, fewer than batch_size {cfg.batch_size}")
    device = torch.device(cfg.device)
    train = train.to(device=device, dtype=torch.float32).contiguous()
    test = test.to(device=device, dtype=torch.float32).contiguous()
    bundle = DataBundle(train, test, source)
    check_widths(cfg, bundle)
    return bundle


def check_widths(cfg: ExperimentConfig, data: DataBundle) -> None:
    """A custom architecture must map the data dimension to itself."""
    if cfg.widths is not None and (cfg.widths[0] != data.dim or cfg.widths[-1] != data.dim):
        raise ValueError(f"widths {list(cfg.widths)} must start and end with the data dimension {data.dim}")
