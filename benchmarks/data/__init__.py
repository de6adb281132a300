"""Dataset readers and generators for the autoencoder benchmarks (MNIST, CURVES, FACES)."""

from benchmarks.data.curves import generate_curves, load_curves
from benchmarks.data.errors import DatasetError
from benchmarks.data.faces import load_faces
from benchmarks.data.idx import read_idx, write_idx
from benchmarks.data.mnist import load_mnist

__all__ = [
    "DatasetError",
    "generate_curves",
    "load_curves",
    "load_faces",
    "load_mnist",
    "read_idx",
    "write_idx",
]
