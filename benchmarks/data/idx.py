"""Reader and writer for the IDX binary format (the format MNIST is distributed in).

Layout of an IDX file (all multi-byte integers big-endian):

========  ======  =================================================================
offset    size    content
========  ======  =================================================================
0         2       zero bytes ``00 00``
2         1       element type code (see ``IDX_DTYPES``)
3         1       number of dimensions ``d``
4         4·d     the ``d`` dimension sizes, unsigned 32-bit each
4 + 4·d   ...     the elements, row-major (C order), big-endian for multi-byte types
========  ======  =================================================================

A file may also be gzip-compressed as a whole. Compression is detected from the two gzip magic
bytes ``1f 8b`` at the start of the file, never from the file name, so a raw file named ``*.gz``
or a compressed file without the suffix both load. Every failure (unreadable, bad gzip stream,
wrong magic, unknown type code, truncated or over-long payload) raises
:class:`~benchmarks.data.errors.DatasetError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from os import PathLike
from pathlib import Path

import numpy as np

from benchmarks.data.errors import DatasetError

__all__ = ["IDX_DTYPES", "GZIP_MAGIC", "parse_idx", "read_idx", "write_idx", "encode_idx"]

#: IDX element type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_FOR_KIND = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}

GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 32


def _decompress_if_gzip(data: bytes, name: str) -> bytes:
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DatasetError(f"corrupt or truncated gzip stream in {name} ({exc})", name) from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an IDX file (raw or gzip-compressed) into a native-endian array.

    ``name`` is only used in error messages.
    """
    data = _decompress_if_gzip(data, name)
    if len(data) < 4:
        raise DatasetError(
            f"{name} is too short to be an IDX file ({len(data)} bytes; the header needs at least 4)",
            name,
        )
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DatasetError(
            f"{name} is not an IDX file: wrong magic number 0x{data[:4].hex()} "
            "(an IDX file starts with two zero bytes, a type code and the number of dimensions)",
            name,
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DatasetError(f"{name}: unknown IDX element type code 0x{code:02X} (known: {known})", name)
    if ndim == 0 or ndim > _MAX_NDIM:
        raise DatasetError(f"{name}: implausible number of dimensions {ndim} in the IDX header", name)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(
            f"{name} is truncated: the IDX header announces {ndim} dimensions "
            f"({header_len} header bytes) but the file has only {len(data)} bytes",
            name,
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DatasetError(
            f"{name} is {what}: shape {tuple(shape)} of {dtype.name} needs {expected} data bytes "
            f"but {actual} follow the header",
            name,
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed, detected from its magic bytes)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"IDX file not found: {path}", path) from exc
    except OSError as exc:
        raise DatasetError(f"cannot read IDX file {path} ({exc})", path) from exc
    return parse_idx(data, str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as uncompressed IDX bytes (dtype one of uint8/int8/int16/int32/float32/float64)."""
    array = np.asarray(array)
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in _CODE_FOR_KIND or array.ndim == 0 or array.ndim > _MAX_NDIM:
        raise ValueError(f"cannot encode an array of dtype {array.dtype} and ndim {array.ndim} as IDX")
    code = _CODE_FOR_KIND[key]
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    body = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    return header + body


def write_idx(path: str | PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` (default: when the name ends in .gz)."""
    path = Path(path)
    if compress is None:
        compress = path.name.endswith(".gz")
    data = encode_idx(array)
    if compress:
        data = gzip.compress(data, mtime=0)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
