"""MNIST loader: tiny IDX files in the real format, error paths, offline download, real test split."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from benchmarks.data.errors import DatasetError
from benchmarks.data.idx import encode_idx, write_idx
from benchmarks.data.mnist import MNIST_FILES, MNIST_MD5, download_mnist, find_mnist_files, load_mnist

# Digit counts of the official 10,000-image test split.
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _tiny(n=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def _write_split(directory, split, images, labels, *, gz_images=True, gz_labels=False):
    img_name, lab_name = MNIST_FILES[split]
    write_idx(directory / (img_name + (".gz" if gz_images else "")), images)
    write_idx(directory / (lab_name + (".gz" if gz_labels else "")), labels)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize(("gz_images", "gz_labels"), [(True, True), (False, False), (True, False)])
def test_load_tiny_split(tmp_path, split, gz_images, gz_labels):
    images, labels = _tiny()
    _write_split(tmp_path, split, images, labels, gz_images=gz_images, gz_labels=gz_labels)
    x, y = load_mnist(tmp_path, split)
    assert x.dtype == torch.float32 and x.shape == (5, 784) and x.device.type == "cpu"
    assert y.dtype == torch.int64 and y.shape == (5,)
    np.testing.assert_array_equal(x.numpy(), images.reshape(5, 784).astype(np.float32) / np.float32(255))
    assert x[0, 0] == 0.0 and x[0, 1] == 1.0
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(y.numpy(), labels.astype(np.int64))
    # row-major flattening: pixel (r, c) -> 28 r + c
    assert x[1, 28 * 3 + 7] == float(images[1, 3, 7]) / 255


def test_dotted_file_names_are_accepted(tmp_path):
    images, labels = _tiny(3)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", labels)
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (3, 784) and y.shape == (3,)


def test_missing_files_say_where_to_put_them(tmp_path):
    images, _ = _tiny()
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path, "train")
    msg = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in msg and str(tmp_path) in msg and "download=True" in msg
    assert re.search(r"missing (\S+)\.gz\.", msg).group(1) == "train-labels-idx1-ubyte"


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist(".", "validation")


def test_size_mismatch_names_file(tmp_path):
    images, labels = _tiny(5)
    _write_split(tmp_path, "test", images, labels[:4])
    with pytest.raises(DatasetError, match="mismatch") as info:
        load_mnist(tmp_path, "test")
    assert "t10k-labels-idx1-ubyte" in str(info.value)


@pytest.mark.parametrize(
    ("images", "labels", "bad"),
    [
        (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), "t10k-images"),
        (np.zeros((2, 784), np.uint8), np.zeros(2, np.uint8), "t10k-images"),
        (np.zeros((2, 28, 28), np.float32), np.zeros(2, np.uint8), "t10k-images"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1), np.uint8), "t10k-labels"),
        (np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8), "t10k-labels"),
    ],
)
def test_wrong_content_names_file(tmp_path, images, labels, bad):
    _write_split(tmp_path, "test", images, labels)
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path, "test")
    assert bad in str(info.value)


@pytest.mark.parametrize("which", [0, 1])
def test_corrupt_or_truncated_file_names_file(tmp_path, which):
    images, labels = _tiny()
    _write_split(tmp_path, "test", images, labels, gz_images=True, gz_labels=True)
    path = find_mnist_files(tmp_path, "test")[which]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError) as info:
        load_mnist(tmp_path, "test")
    assert str(path) in str(info.value)


def test_wrong_magic_names_file(tmp_path):
    images, labels = _tiny()
    _write_split(tmp_path, "test", images, labels, gz_images=False)
    path = find_mnist_files(tmp_path, "test")[0]
    data = bytearray(path.read_bytes())
    data[0] = 0x42
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="magic") as info:
        load_mnist(tmp_path, "test")
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- download (no internet here)


def test_download_failure_with_mocked_urlopen(tmp_path, monkeypatch):
    calls = []

    def fail(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    target = tmp_path / "mnist"
    with pytest.raises(DatasetError) as info:
        load_mnist(target, "train", download=True, mirrors=["https://a.example/m/", "https://b.example"], timeout=0.5)
    msg = str(info.value)
    assert "could not download" in msg and str(target) in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert [c[0] for c in calls[:2]] == [
        "https://a.example/m/train-images-idx3-ubyte.gz",
        "https://b.example/train-images-idx3-ubyte.gz",
    ]
    assert all(c[1] == 0.5 for c in calls) and len(calls) == 4
    assert not target.exists()  # nothing is created when every download fails


def test_download_failure_with_unreachable_url(tmp_path):
    with pytest.raises(DatasetError, match="could not download"):
        download_mnist(tmp_path, "test", mirrors=["http://127.0.0.1:9/"], timeout=0.5)
    with pytest.raises(DatasetError, match="could not download"):
        download_mnist(tmp_path, "test", mirrors=["not a url"], timeout=0.5)
    assert list(tmp_path.iterdir()) == []


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_success_with_mocked_urlopen(tmp_path, monkeypatch):
    images, labels = _tiny(4)
    payload = {
        "t10k-images-idx3-ubyte.gz": gzip.compress(encode_idx(images)),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(encode_idx(labels)),
    }
    for name, data in payload.items():
        monkeypatch.setitem(MNIST_MD5, name, hashlib.md5(data).hexdigest())
    seen = []

    def fake(url, timeout=None):
        seen.append(url)
        if url.startswith("https://down.example"):
            raise TimeoutError("timed out")
        return _Response(payload[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    x, y = load_mnist(tmp_path / "new", "test", download=True, mirrors=["https://down.example/", "https://up.example/"])
    assert x.shape == (4, 784) and y.tolist() == labels.tolist()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(payload)
    n_calls = len(seen)
    load_mnist(tmp_path / "new", "test", download=True, mirrors=["https://up.example/"])
    assert len(seen) == n_calls  # present files are not fetched again


def test_download_rejects_checksum_mismatch(tmp_path, monkeypatch):
    data = gzip.compress(encode_idx(np.zeros(3, np.uint8)))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(data))
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        download_mnist(tmp_path, "test", mirrors=["https://x.example/"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- real data


def test_real_test_split(mnist_path):
    sums = {}
    for line in (mnist_path / "MD5SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    assert set(sums) == {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    for name, digest in sums.items():
        assert hashlib.md5((mnist_path / name).read_bytes()).hexdigest() == digest
        assert MNIST_MD5[name] == digest

    x, y = load_mnist(mnist_path, "test")
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == TEST_LABEL_COUNTS
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert 0.12 < float(x.mean()) < 0.14  # mean MNIST intensity ~0.1325
    # every value is k/255
    k = x * 255
    assert torch.equal(k, k.round())
