"""IDX reader/writer: round trips in every element type, gzip detected by content, clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.data.errors import DatasetError
from benchmarks.data.idx import IDX_DTYPES, encode_idx, parse_idx, read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _sample(dtype, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)
    err = DatasetError("bad", "/x/y.idx")
    assert "/x/y.idx" in str(err) and err.path is not None and err.path.name == "y.idx"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, dtype, compress):
    arr = _sample(dtype, (3, 4, 5))
    path = write_idx(tmp_path / "a.idx", arr, compress=compress)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=40)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_encode_parse_property(shape, dtype, seed):
    arr = _sample(dtype, tuple(shape), seed)
    back = parse_idx(encode_idx(arr))
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_array_equal(parse_idx(gzip.compress(encode_idx(arr))), arr)


def test_header_layout_is_big_endian():
    data = struct.pack(">HBB", 0, 0x0C, 2) + struct.pack(">II", 1, 2) + struct.pack(">ii", 258, -2)
    arr = parse_idx(data)
    assert arr.dtype == np.int32 and arr.shape == (1, 2)
    assert arr.tolist() == [[258, -2]]
    assert encode_idx(arr) == data
    assert encode_idx(np.zeros((2, 3), np.uint8))[:12] == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    assert set(IDX_DTYPES) == {0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E}


def test_compression_detected_from_content_not_name(tmp_path):
    arr = _sample(np.uint8, (2, 3))
    raw_named_gz = tmp_path / "raw.idx.gz"
    raw_named_gz.write_bytes(encode_idx(arr))
    gz_named_raw = tmp_path / "compressed.idx"
    gz_named_raw.write_bytes(gzip.compress(encode_idx(arr)))
    np.testing.assert_array_equal(read_idx(raw_named_gz), arr)
    np.testing.assert_array_equal(read_idx(gz_named_raw), arr)
    # write_idx compresses by suffix unless told otherwise
    assert write_idx(tmp_path / "x.gz", arr).read_bytes()[:2] == b"\x1f\x8b"
    assert write_idx(tmp_path / "y", arr).read_bytes()[:2] == b"\x00\x00"


def _good() -> bytes:
    return encode_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    ("label", "payload", "match"),
    [
        ("empty", b"", "too short"),
        ("wrong-magic", b"\x08\x03" + _good()[2:], "magic"),
        ("text-file", b"hello world, not an idx file", "magic"),
        ("bad-type-code", b"\x00\x00\x07\x03" + _good()[4:], "type code"),
        ("zero-dims", b"\x00\x00\x08\x00", "dimensions"),
        ("truncated-header", _good()[:9], "truncated"),
        ("truncated-data", _good()[:-1], "truncated"),
        ("trailing-data", _good() + b"\x00", "longer"),
        ("truncated-gzip", gzip.compress(_good())[:-6], "gzip"),
        ("gzip-of-garbage", gzip.compress(b"\x01\x02\x03\x04\x05"), "magic"),
        ("gzip-bad-crc", gzip.compress(_good())[:-8] + b"\x00\x00\x00\x00" + gzip.compress(_good())[-4:], "gzip"),
    ],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_corrupt_files_raise_dataset_error_naming_the_file(tmp_path, label, payload, match, suffix):
    path = tmp_path / f"{label}-idx3-ubyte{suffix}"
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found") as info:
        read_idx(tmp_path / "nope-idx1-ubyte")
    assert "nope-idx1-ubyte" in str(info.value)


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(ValueError):
        encode_idx(np.zeros(3, np.uint16))
    with pytest.raises(ValueError):
        encode_idx(np.array(3, np.uint8))
