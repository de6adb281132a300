"""CURVES: 28×28 images of smooth curves through three random points (synthetic re-creation).

The CURVES autoencoder benchmark (Hinton & Salakhutdinov, Science 2006; used by Martens 2010 and
by Goldfarb, Ren & Bahamou 2020) consists of 28×28 grey-level images of a smooth curve drawn
through three randomly chosen points, 20,000 for training and 10,000 for testing, with
intensities in [0, 1]. The original file (``digs3pts_1.mat``, variables ``bdata`` and
``bdatatest``) can no longer be downloaded. When you have it, ``load_curves(mat_path=...)`` reads
it; otherwise this module generates a *deterministic re-creation* that follows the published
construction. It is not byte-identical to the original, so losses are comparable between runs of
this project but only qualitatively with the paper.

Exact construction (generator version ``GENERATOR_VERSION``)
-------------------------------------------------------------

Coordinates. The image is the continuous square [0, 28] × [0, 28]; ``x`` is the column and ``y``
the row coordinate, both growing from the top-left corner. Pixel (row ``r``, column ``c``) is the
unit square [c, c+1] × [r, r+1]. Images are flattened row-major (index ``28·r + c``), as MNIST.

1. **Random numbers.** Split ``train`` uses ``numpy.random.default_rng([seed, 0])`` and split
   ``test`` uses ``numpy.random.default_rng([seed, 1])`` (PCG64 seeded through SeedSequence), so
   the two splits are independent streams and neither depends on the size of the other.
2. **Three points.** Candidates are drawn in blocks of ``BLOCK`` = 4096 triples with
   ``rng.uniform(2, 26, size=(4096, 3, 2))``: the points P0, P1, P2 are i.i.d. uniform on the
   square [2, 26]² (a 2-pixel margin), each as (x, y).
3. **Curve.** The curve is the parabolic arc through the three points in order, with chord-length
   parametrisation: with a = |P1 − P0|, b = |P2 − P1| and τ = a / (a + b),

       B(t) = P0 + t·(P2 − P0) + t·(t − 1)·K,   t ∈ [0, 1],
       K = (P1 − P0 − τ·(P2 − P0)) / (τ·(τ − 1)),

   so that B(0) = P0, B(τ) = P1, B(1) = P2. (Equivalently, the quadratic Bézier curve from P0
   to P2 with control point C = (P0 + P2 − K) / 2.)
4. **Rejection.** A triple is accepted only if a ≥ 3 px and b ≥ 3 px (no degenerate, dot-like
   curves) and the whole arc B([0, 1]) stays inside [2, 26]² (computed exactly from the
   coordinate-wise extrema of the quadratic), so every stroke lies fully inside the image.
   Accepted triples are kept in the order drawn; blocks are drawn until ``n`` are accepted.
   Hence the first ``k`` images of a set of size ``n ≥ k`` are exactly the set of size ``k``.
   About 85% of the candidates are accepted.
5. **Pen positions.** The arc length L of the curve is measured on its ``ARC_TABLE`` = 128-chord
   polygon (t = 0, 1/128, …, 1). The pen is placed at K + 1 points B(t_k), K = ceil(L / 0.25),
   at equal arc-length steps L/K ≤ 0.25 px (t_k from linear interpolation in the chord table, so
   the true steps match L/K to within 1%), the first at P0 and the last at P2.
6. **Stroke and anti-aliasing.** The pen is a disk of diameter ``STROKE_WIDTH`` = 1.5 px: a point
   is ink if it lies within 0.75 px of at least one pen position. (This union of disks is the set
   of points within 0.75 px of the curve up to a boundary ripple below 0.011 px.) Each pixel is
   supersampled on a regular ``SUPERSAMPLE`` × ``SUPERSAMPLE`` = 4 × 4 grid of sample points at
   (c + (i + ½)/4, r + (j + ½)/4), i, j = 0..3, and its intensity is the fraction of its 16 sample
   points that are ink, so intensities lie in {0, 1/16, …, 1} ⊂ [0, 1] (box-filter
   anti-aliasing). Distances are compared in float32 in supersample-grid units.

No noise, blur or contrast change is applied afterwards. The nonzero pixels of every image form
one 8-connected component (a continuous stroke wider than one pixel).

Caching. ``load_curves(cache_dir, ...)`` writes both splits once to
``cache_dir/curves_v{GENERATOR_VERSION}_seed{seed}_train{n_train}_test{n_test}.npz`` (ink counts
0..16 as uint8) and reads them back afterwards; an unreadable or inconsistent cache file is
regenerated with a warning. Any change to the construction must bump ``GENERATOR_VERSION``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from benchmarks.data.errors import DatasetError

__all__ = [
    "GENERATOR_VERSION",
    "IMAGE_SIDE",
    "N_TEST",
    "N_TRAIN",
    "STROKE_WIDTH",
    "SUPERSAMPLE",
    "arc_length_points",
    "curve_coefficients",
    "evaluate_curves",
    "generate_curves",
    "load_curves",
    "load_curves_mat",
    "render_curves",
    "sample_curve_points",
]

GENERATOR_VERSION = 1
IMAGE_SIDE = 28
N_TRAIN = 20_000
N_TEST = 10_000
MARGIN = 2.0
MIN_GAP = 3.0
STROKE_WIDTH = 1.5
SUPERSAMPLE = 4
MAX_STEP = 0.25  # px of arc length between consecutive pen positions
ARC_TABLE = 128  # chords used to measure arc length
BLOCK = 4096
_SPLIT_STREAM = {"train": 0, "test": 1}
_RENDER_CHUNK = 128


def _stream_rng(seed: int, split: str) -> np.random.Generator:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), _SPLIT_STREAM[split]])


def curve_coefficients(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients (c0, c1, c2) with B(t) = c0 + c1·t + c2·t² for points of shape (n, 3, 2)."""
    points = np.asarray(points, dtype=np.float64)
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    a = np.linalg.norm(p1 - p0, axis=1)
    b = np.linalg.norm(p2 - p1, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = a / (a + b)
        k = (p1 - p0 - tau[:, None] * (p2 - p0)) / (tau * (tau - 1.0))[:, None]
    return p0, p2 - p0 - k, k


def evaluate_curves(points: np.ndarray, t: np.ndarray) -> np.ndarray:
    """B(t) for each curve: points (n, 3, 2), t (m,) -> (n, m, 2) in pixel coordinates (x, y)."""
    c0, c1, c2 = curve_coefficients(points)
    t = np.asarray(t, dtype=np.float64)[None, :, None]
    return c0[:, None, :] + c1[:, None, :] * t + c2[:, None, :] * t * t


def _arc_bounds(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise min and max of c0 + c1 t + c2 t² over t in [0, 1]; arrays (n, 2)."""
    end = c0 + c1 + c2
    lo, hi = np.minimum(c0, end), np.maximum(c0, end)
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = -c1 / (2.0 * c2)
    inside = np.isfinite(ts) & (ts > 0.0) & (ts < 1.0)
    ts = np.where(inside, ts, 0.0)
    ext = c0 + c1 * ts + c2 * ts * ts
    lo = np.where(inside, np.minimum(lo, ext), lo)
    hi = np.where(inside, np.maximum(hi, ext), hi)
    return lo, hi


def _accept(points: np.ndarray) -> np.ndarray:
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    ok = (np.linalg.norm(p1 - p0, axis=1) >= MIN_GAP) & (np.linalg.norm(p2 - p1, axis=1) >= MIN_GAP)
    lo, hi = _arc_bounds(*curve_coefficients(points))
    ok &= np.isfinite(lo).all(1) & np.isfinite(hi).all(1)
    ok &= (lo >= MARGIN).all(1) & (hi <= IMAGE_SIDE - MARGIN).all(1)
    return ok


def sample_curve_points(n: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """The three defining points of the first ``n`` curves of a split: float64 (n, 3, 2) as (x, y)."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = _stream_rng(seed, split)
    kept: list[np.ndarray] = []
    count = 0
    while count < n:
        cand = rng.uniform(MARGIN, IMAGE_SIDE - MARGIN, size=(BLOCK, 3, 2))
        cand = cand[_accept(cand)]
        kept.append(cand)
        count += cand.shape[0]
    if not kept:
        return np.zeros((0, 3, 2))
    return np.concatenate(kept)[:n]


def _offsets(radius_sub: float) -> np.ndarray:
    """Integer offsets (dx, dy) of every grid point that can lie within ``radius_sub`` of a
    centre whose nearest grid point is (0, 0)."""
    reach = int(np.ceil(radius_sub + 0.5))
    du, dv = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    keep = (np.abs(du) - 0.5).clip(0) ** 2 + (np.abs(dv) - 0.5).clip(0) ** 2 <= radius_sub**2
    return np.stack([du[keep], dv[keep]], axis=1).astype(np.int64)  # (O, 2) as (dx, dy)


def arc_length_points(points: np.ndarray, step: float = MAX_STEP) -> tuple[np.ndarray, np.ndarray]:
    """Points spaced along each arc at equal arc-length steps L/K, K = ceil(L / step).

    Returns ``(index, xy)``: for every dense point the curve it belongs to (int64) and its (x, y)
    position (float64). Arc length is measured on a ``ARC_TABLE``-chord approximation and t is
    found by linear interpolation in that table.
    """
    points = np.asarray(points, dtype=np.float64)
    m = points.shape[0]
    c0, c1, c2 = curve_coefficients(points)
    tt = np.linspace(0.0, 1.0, ARC_TABLE + 1)
    poly = c0[:, None, :] + c1[:, None, :] * tt[None, :, None] + c2[:, None, :] * (tt * tt)[None, :, None]
    cum = np.zeros((m, ARC_TABLE + 1))
    np.cumsum(np.linalg.norm(np.diff(poly, axis=1), axis=2), axis=1, out=cum[:, 1:])
    length = cum[:, -1]
    k_steps = np.maximum(np.ceil(length / step).astype(np.int64), 1)
    index = np.repeat(np.arange(m), k_steps + 1)
    first = np.concatenate([[0], np.cumsum(k_steps + 1)[:-1]])
    s = (np.arange(index.size) - first[index]) / k_steps[index] * length[index]
    # one searchsorted over all curves: shift curve i's table by i * (max length + 1)
    shift = float(length.max(initial=0.0)) + 1.0
    seg = np.searchsorted((cum + shift * np.arange(m)[:, None]).ravel(), s + shift * index, side="right") - 1
    seg = np.clip(seg - index * (ARC_TABLE + 1), 0, ARC_TABLE - 1)
    lo, hi = cum[index, seg], cum[index, seg + 1]
    width = hi - lo
    frac = np.clip(np.divide(s - lo, width, out=np.zeros_like(s), where=width > 0), 0.0, 1.0)
    t = ((seg + frac) / ARC_TABLE)[:, None]
    return index, c0[index] + c1[index] * t + c2[index] * t * t


def _ink_counts(points: np.ndarray, stroke_width: float, supersample: int) -> np.ndarray:
    """Number of inked supersample points per pixel, uint8 (n, 784)."""
    n = points.shape[0]
    side = IMAGE_SIDE * supersample
    radius_sub = 0.5 * stroke_width * supersample
    r2 = np.float32(radius_sub * radius_sub)
    offsets = _offsets(radius_sub)
    ox = offsets[:, 0].astype(np.float32)[None, :]
    oy = offsets[:, 1].astype(np.float32)[None, :]
    reach = int(np.abs(offsets).max())
    out = np.empty((n, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for start in range(0, n, _RENDER_CHUNK):
        pts = points[start : start + _RENDER_CHUNK]
        m = pts.shape[0]
        index, dense = arc_length_points(pts)
        q = dense * supersample - 0.5  # supersample-grid units: sample point i sits at i
        base = np.rint(q)
        frac = (q - base).astype(np.float32)
        base = base.astype(np.int64)
        dx = ox - frac[:, 0:1]
        dx *= dx
        dy = oy - frac[:, 1:2]
        dy *= dy
        dx += dy
        hit = dx <= r2  # (P, O): grid point base + offset is within the pen radius
        if base.min(initial=reach) < reach or base.max(initial=0) >= side - reach:
            cx = base[:, 0:1] + offsets[None, :, 0]
            cy = base[:, 1:2] + offsets[None, :, 1]
            hit &= (cx >= 0) & (cx < side) & (cy >= 0) & (cy < side)
        flat = ((index * side + base[:, 1]) * side + base[:, 0])[:, None]
        flat = flat + (offsets[:, 1] * side + offsets[:, 0])[None, :]
        fine = np.zeros(m * side * side, dtype=np.uint8)
        fine[flat[hit]] = 1
        fine = fine.reshape(m, IMAGE_SIDE, supersample, IMAGE_SIDE, supersample)
        counts = out[start : start + m]
        counts[...] = 0
        for a in range(supersample):
            for b in range(supersample):
                counts += fine[:, :, a, :, b]
    return out.reshape(n, IMAGE_SIDE * IMAGE_SIDE)


def render_curves(
    points: np.ndarray, *, stroke_width: float = STROKE_WIDTH, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Rasterise the parabolic arcs through ``points`` (n, 3, 2): float32 (n, 784) in [0, 1]."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 3 or points.shape[1:] != (3, 2):
        raise ValueError(f"points must have shape (n, 3, 2), got {points.shape}")
    if supersample < 1 or supersample > 15:
        raise ValueError("supersample must be in 1..15")
    if not all(np.isfinite(c).all() for c in curve_coefficients(points)):
        raise ValueError("points must be finite and consecutive points must differ")
    counts = _ink_counts(points, stroke_width, supersample)
    return counts.astype(np.float32) / np.float32(supersample * supersample)


def generate_curves(n: int, seed: int = 0, split: str = "train") -> np.ndarray:
    """The first ``n`` CURVES images of ``split`` for ``seed``: float32 (n, 784) in [0, 1]."""
    return render_curves(sample_curve_points(n, seed, split))


# --------------------------------------------------------------------------------------------
# cache


def _cache_path(cache_dir: Path, seed: int, n_train: int, n_test: int) -> Path:
    return cache_dir / f"curves_v{GENERATOR_VERSION}_seed{seed}_train{n_train}_test{n_test}.npz"


def _read_cache(path: Path, seed: int, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """The cached ink counts, or raises (any exception means: regenerate)."""
    npix = IMAGE_SIDE * IMAGE_SIDE
    with np.load(path, allow_pickle=False) as z:
        meta = z["meta"]
        train, test = z["train"], z["test"]
    want = np.array([GENERATOR_VERSION, seed, n_train, n_test, SUPERSAMPLE], dtype=np.int64)
    if meta.shape != want.shape or not np.array_equal(meta, want):
        raise ValueError(f"cache metadata {meta} != {want}")
    if train.dtype != np.uint8 or test.dtype != np.uint8:
        raise ValueError("cache arrays are not uint8")
    if train.shape != (n_train, npix) or test.shape != (n_test, npix):
        raise ValueError("cache arrays have the wrong shape")
    if max(int(train.max(initial=0)), int(test.max(initial=0))) > SUPERSAMPLE**2:
        raise ValueError("cache values out of range")
    return {"train": train, "test": test}


def _write_cache(path: Path, counts: dict[str, np.ndarray], seed: int, n_train: int, n_test: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = np.array([GENERATOR_VERSION, seed, n_train, n_test, SUPERSAMPLE], dtype=np.int64)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, meta=meta, train=counts["train"], test=counts["test"])
    os.replace(tmp, path)


def _counts_for(seed: int, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    return {
        "train": _ink_counts(sample_curve_points(n_train, seed, "train"), STROKE_WIDTH, SUPERSAMPLE),
        "test": _ink_counts(sample_curve_points(n_test, seed, "test"), STROKE_WIDTH, SUPERSAMPLE),
    }


# --------------------------------------------------------------------------------------------
# the original .mat file

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_V73_HINT = (
    "it is a MATLAB v7.3 (HDF5) file, which scipy.io.loadmat cannot read. Convert it to the v7 "
    "format, e.g. in MATLAB: load('{name}'); save('digs3pts_1_v7.mat', 'bdata', 'bdatatest', '-v7') "
    "or in Octave: load {name}; save -v7 digs3pts_1_v7.mat bdata bdatatest; then pass the new file"
)


def _is_hdf5_mat(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(520)
    return b"MATLAB 7.3" in head[:128] or head[512:520] == _HDF5_SIGNATURE or head[:8] == _HDF5_SIGNATURE


def load_curves_mat(mat_path: str | PathLike[str]) -> dict[str, np.ndarray]:
    """Read ``bdata`` (train) and ``bdatatest`` (test) from the original ``digs3pts_1.mat``.

    Each must be a real 2-D array with 784 columns (N × 784; a 784 × N array with N ≠ 784 is
    transposed) and values in [0, 1]. Rows are used as stored; the pixel order inside a row is
    whatever the file uses (irrelevant to a fully connected autoencoder). Returns float32 arrays.
    """
    import scipy.io

    path = Path(mat_path)
    if not path.is_file():
        raise DatasetError(f"CURVES .mat file not found: {path}", path)
    try:
        if _is_hdf5_mat(path):
            raise DatasetError(f"cannot read {path}: " + _V73_HINT.format(name=path.name), path)
        mat = scipy.io.loadmat(path, variable_names=["bdata", "bdatatest"])
    except DatasetError:
        raise
    except NotImplementedError as exc:  # scipy's message for v7.3 files
        raise DatasetError(f"cannot read {path}: " + _V73_HINT.format(name=path.name), path) from exc
    except Exception as exc:  # noqa: BLE001 (scipy raises many types for corrupt files)
        raise DatasetError(f"cannot read {path} as a MATLAB v5/v7 file ({exc})", path) from exc
    out: dict[str, np.ndarray] = {}
    npix = IMAGE_SIDE * IMAGE_SIDE
    for split, var in (("train", "bdata"), ("test", "bdatatest")):
        if var not in mat:
            found = sorted(name for name, _, _ in scipy.io.whosmat(path))
            raise DatasetError(f"{path} has no variable {var!r} (found: {found})", path)
        arr = np.asarray(mat[var])
        if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DatasetError(f"{path}: {var} must be a 2-D numeric array, got {arr.dtype} {arr.shape}", path)
        if np.iscomplexobj(arr):
            raise DatasetError(f"{path}: {var} is complex", path)
        if arr.shape[1] != npix and arr.shape[0] == npix:
            arr = arr.T
        if arr.shape[1] != npix or arr.shape[0] == 0:
            raise DatasetError(f"{path}: {var} must have shape (N, {npix}), got {arr.shape}", path)
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise DatasetError(
                f"{path}: {var} values must be finite and in [0, 1] "
                f"(got min {arr.min():.4g}, max {arr.max():.4g})",
                path,
            )
        out[split] = np.ascontiguousarray(arr)
    return out


def load_curves(
    cache_dir: str | PathLike[str] | None = None,
    split: str = "train",
    seed: int = 0,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    *,
    mat_path: str | PathLike[str] | None = None,
) -> torch.Tensor:
    """A CURVES split as a float32 CPU tensor (N, 784) with values in [0, 1].

    With ``mat_path`` the original ``digs3pts_1.mat`` is read (``seed``/``n_*``/``cache_dir``
    are then ignored). Otherwise the synthetic re-creation described in the module docstring is
    generated for ``seed`` — cached in ``cache_dir`` when one is given (both splits in one file),
    regenerated when the cache is unreadable or inconsistent.
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if mat_path is not None:
        return torch.from_numpy(load_curves_mat(mat_path)[split])
    _stream_rng(seed, split)  # validates seed
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be non-negative")
    if cache_dir is None:
        n = n_train if split == "train" else n_test
        counts = _ink_counts(sample_curve_points(n, seed, split), STROKE_WIDTH, SUPERSAMPLE)
    else:
        path = _cache_path(Path(cache_dir), seed, n_train, n_test)
        cached = None
        if path.exists():
            try:
                cached = _read_cache(path, seed, n_train, n_test)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                warnings.warn(f"CURVES cache {path} is unreadable ({exc}); regenerating it", stacklevel=2)
        if cached is None:
            cached = _counts_for(seed, n_train, n_test)
            _write_cache(path, cached, seed, n_train, n_test)
        counts = cached[split]
    return torch.from_numpy(counts.astype(np.float32) / np.float32(SUPERSAMPLE * SUPERSAMPLE))
