"""CURVES: the seeded generator, its cache, and reading the original digs3pts_1.mat."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.io
import torch
from scipy import ndimage

from benchmarks.data import curves as C
from benchmarks.data.curves import (
    arc_length_points,
    curve_coefficients,
    evaluate_curves,
    generate_curves,
    load_curves,
    render_curves,
    sample_curve_points,
)
from benchmarks.data.errors import DatasetError

N = 300


@pytest.fixture(scope="module")
def sample():
    points = sample_curve_points(N, seed=0, split="train")
    return points, generate_curves(N, seed=0, split="train")


def test_shapes_dtype_and_value_grid(sample):
    _, x = sample
    assert x.shape == (N, 784) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    k = x * C.SUPERSAMPLE**2  # intensities are multiples of 1/16
    np.testing.assert_array_equal(k, np.round(k))


def test_deterministic_and_seed_dependent(sample):
    _, x = sample
    np.testing.assert_array_equal(generate_curves(N, seed=0), x)
    assert not np.array_equal(generate_curves(N, seed=1), x)
    assert not np.array_equal(generate_curves(N, seed=0, split="test"), x)
    # prefix stability: the first k images do not depend on how many are generated
    np.testing.assert_array_equal(generate_curves(37, seed=0), x[:37])
    assert generate_curves(0).shape == (0, 784)


def test_points_follow_the_documented_distribution(sample):
    points, _ = sample
    assert points.shape == (N, 3, 2)
    assert points.min() >= C.MARGIN and points.max() <= C.IMAGE_SIDE - C.MARGIN
    gaps = np.linalg.norm(np.diff(points, axis=1), axis=2)
    assert gaps.min() >= C.MIN_GAP
    # the arc lies inside the margin box and interpolates the three points in order
    dense = evaluate_curves(points, np.linspace(0, 1, 513))
    assert dense.min() >= C.MARGIN - 1e-9 and dense.max() <= C.IMAGE_SIDE - C.MARGIN + 1e-9
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    a, b = np.linalg.norm(p1 - p0, axis=1), np.linalg.norm(p2 - p1, axis=1)
    c0, c1, c2 = curve_coefficients(points)
    for t, target in [(0.0, p0), (a / (a + b), p1), (1.0, p2)]:
        t = np.asarray(t)[..., None] if np.ndim(t) else t
        np.testing.assert_allclose(c0 + c1 * t + c2 * t * t, target, atol=1e-9)


def test_arc_length_spacing(sample):
    points, _ = sample
    index, dense = arc_length_points(points[:50])
    assert np.array_equal(np.unique(index), np.arange(50))
    for i in range(50):
        d = dense[index == i]
        np.testing.assert_allclose(d[0], points[i, 0], atol=1e-9)
        np.testing.assert_allclose(d[-1], points[i, 2], atol=1e-9)
        steps = np.linalg.norm(np.diff(d, axis=0), axis=1)
        assert steps.max() <= C.MAX_STEP * 1.01  # chords are never longer than the arc steps


def test_each_image_is_one_thin_connected_curve_through_its_points(sample):
    points, x = sample
    images = x.reshape(N, 28, 28)
    index, dense = arc_length_points(points)
    ratios = []
    for i in range(N):
        img = images[i]
        ink = img > 0
        assert 0.01 < ink.mean() < 0.25
        _, n_comp = ndimage.label(ink, structure=np.ones((3, 3)))
        assert n_comp == 1
        # thin: every inked pixel centre is within pen radius + half a pixel's sample spread
        rows, cols = np.nonzero(ink)
        centres = np.stack([cols + 0.5, rows + 0.5], axis=1)
        curve = dense[index == i]
        dist = np.sqrt(((centres[:, None, :] - curve[None, :, :]) ** 2).sum(-1)).min(1)
        assert dist.max() <= 0.75 + 0.375 * np.sqrt(2) + 0.01
        # and dense: pixels whose centre is on the curve are fully inked
        on_curve = dist <= 0.75 - 0.375 * np.sqrt(2) - 0.01
        assert (img[rows[on_curve], cols[on_curve]] == 1.0).all()
        # passes through its three points
        for x_j, y_j in points[i]:
            r, c = int(y_j), int(x_j)
            assert img[r, c] >= 0.5
        length = np.linalg.norm(np.diff(curve, axis=0), axis=1).sum()
        ratios.append(img.sum() / (C.STROKE_WIDTH * length + np.pi * 0.75**2))
    # total ink never exceeds the pen's swept area; usually matches it
    assert max(ratios) <= 1.05 and 0.95 <= np.median(ratios) <= 1.03


def test_render_single_known_curve():
    # a horizontal straight segment through the middle of row 14: y = 14.5, x from 5.5 to 20.5
    points = np.array([[[5.5, 14.5], [13.0, 14.5], [20.5, 14.5]]])
    img = render_curves(points).reshape(28, 28)
    # the pen (radius 0.75) covers rows 13..15 partially: centre row fully between the endpoints
    assert (img[14, 6:20] == 1.0).all()
    # rows 13 and 15: samples at y = r + 1/8, 3/8, 5/8, 7/8; only the one at distance 0.625 is
    # within the pen radius 0.75 of y = 14.5 -> 4 of 16 samples
    np.testing.assert_array_equal(img[13, 6:20], 0.25)
    np.testing.assert_array_equal(img[15, 6:20], 0.25)
    assert img[:12].sum() == 0 and img[17:].sum() == 0
    assert img[:, :4].sum() == 0 and img[:, 22:].sum() == 0


def test_render_validates_input():
    with pytest.raises(ValueError):
        render_curves(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="differ"):
        render_curves(np.array([[[5.0, 5.0], [5.0, 5.0], [9.0, 9.0]]]))
    with pytest.raises(ValueError):
        sample_curve_points(3, split="valid")
    with pytest.raises(ValueError):
        sample_curve_points(3, seed=-1)


def test_out_of_frame_points_are_clipped_not_crashing():
    img = render_curves(np.array([[[-3.0, 1.0], [14.0, 14.0], [30.0, 27.5]]]))
    assert img.shape == (1, 784) and 0 < img.sum() and img.max() <= 1.0


# ---------------------------------------------------------------- load_curves and the cache


def test_load_without_cache_matches_generator():
    x = load_curves(None, "test", seed=4, n_train=5, n_test=9)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (9, 784)
    np.testing.assert_array_equal(x.numpy(), generate_curves(9, seed=4, split="test"))


def test_cache_round_trip(tmp_path, monkeypatch):
    train = load_curves(tmp_path, "train", seed=2, n_train=40, n_test=20)
    files = list(tmp_path.glob("*.npz"))
    assert [f.name for f in files] == [f"curves_v{C.GENERATOR_VERSION}_seed2_train40_test20.npz"]
    np.testing.assert_array_equal(train.numpy(), generate_curves(40, seed=2, split="train"))

    def boom(*args, **kwargs):
        raise AssertionError("regenerated although the cache is valid")

    monkeypatch.setattr(C, "_counts_for", boom)
    np.testing.assert_array_equal(load_curves(tmp_path, "train", seed=2, n_train=40, n_test=20).numpy(), train.numpy())
    test = load_curves(tmp_path, "test", seed=2, n_train=40, n_test=20)
    np.testing.assert_array_equal(test.numpy(), generate_curves(20, seed=2, split="test"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong-shape", "wrong-meta"])
def test_corrupt_cache_is_regenerated(tmp_path, damage):
    good = load_curves(tmp_path, "train", seed=3, n_train=12, n_test=6).numpy()
    path = next(tmp_path.glob("*.npz"))
    if damage == "garbage":
        path.write_bytes(b"this is not a zip file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong-shape":
        np.savez(path, meta=np.array([C.GENERATOR_VERSION, 3, 12, 6, C.SUPERSAMPLE]),
                 train=np.zeros((11, 784), np.uint8), test=np.zeros((6, 784), np.uint8))
    else:
        with np.load(path) as z:
            arrays = dict(z)
        np.savez(path, meta=np.array([C.GENERATOR_VERSION + 99, 3, 12, 6, C.SUPERSAMPLE]),
                 train=arrays["train"], test=arrays["test"])
    with pytest.warns(UserWarning, match="regenerating"):
        again = load_curves(tmp_path, "train", seed=3, n_train=12, n_test=6).numpy()
    np.testing.assert_array_equal(again, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache is valid again
        np.testing.assert_array_equal(load_curves(tmp_path, "train", seed=3, n_train=12, n_test=6).numpy(), good)


# ---------------------------------------------------------------- the original .mat file


def _mat(tmp_path, **arrays):
    path = tmp_path / "digs3pts_1.mat"
    scipy.io.savemat(path, arrays)
    return path


def test_mat_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    bdata, bdatatest = rng.random((7, 784)), rng.random((3, 784))
    path = _mat(tmp_path, bdata=bdata, bdatatest=bdatatest, other=np.arange(3))
    train = load_curves(split="train", mat_path=path)
    test = load_curves(tmp_path / "unused-cache", "test", mat_path=path)
    assert train.dtype == torch.float32 and train.shape == (7, 784) and test.shape == (3, 784)
    np.testing.assert_allclose(train.numpy(), bdata.astype(np.float32))
    np.testing.assert_allclose(test.numpy(), bdatatest.astype(np.float32))
    assert not (tmp_path / "unused-cache").exists()


def test_mat_transposed_layout_is_accepted(tmp_path):
    bdata = np.random.default_rng(1).random((784, 5)).astype(np.float32)
    path = _mat(tmp_path, bdata=bdata, bdatatest=bdata[:, :2])
    np.testing.assert_array_equal(load_curves(split="train", mat_path=path).numpy(), bdata.T)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"bdata": np.zeros((4, 784))}, "bdatatest"),
        ({"bdata": np.zeros((4, 783)), "bdatatest": np.zeros((2, 784))}, "shape"),
        ({"bdata": np.full((4, 784), 1.5), "bdatatest": np.zeros((2, 784))}, r"\[0, 1\]"),
        ({"bdata": np.full((4, 784), -0.1), "bdatatest": np.zeros((2, 784))}, r"\[0, 1\]"),
        ({"bdata": np.full((4, 784), np.nan), "bdatatest": np.zeros((2, 784))}, "finite"),
        ({"bdata": np.zeros((2, 784, 1, 2)), "bdatatest": np.zeros((2, 784))}, "2-D"),
    ],
)
def test_mat_bad_content(tmp_path, arrays, match):
    path = _mat(tmp_path, **arrays)
    with pytest.raises(DatasetError, match=match) as info:
        load_curves(mat_path=path)
    assert str(path) in str(info.value)


def test_mat_v73_is_rejected_with_conversion_hint(tmp_path):
    path = tmp_path / "digs3pts_1.mat"
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    path.write_bytes(header.ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(DatasetError, match="v7.3") as info:
        load_curves(mat_path=path)
    assert "-v7" in str(info.value) and str(path) in str(info.value)


def test_mat_missing_or_garbage(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_curves(mat_path=tmp_path / "nope.mat")
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"\x01\x02" * 300)
    with pytest.raises(DatasetError) as info:
        load_curves(mat_path=garbage)
    assert str(garbage) in str(info.value)


def test_generator_fingerprint():
    """Guards the documented construction: if this fails, the images changed, so bump
    GENERATOR_VERSION (cached files are keyed by it) and update these numbers and the docs."""
    assert C.GENERATOR_VERSION == 1
    points = sample_curve_points(50, seed=0)
    np.testing.assert_allclose(points[0], [[17.2870805, 8.47488113], [2.98336457, 2.39666325], [21.51848574, 23.90613385]], atol=1e-7)
    np.testing.assert_allclose(points[49], [[20.94194116, 15.36405176], [7.3388815, 15.38594198], [2.29151663, 19.11184714]], atol=1e-7)
    x = generate_curves(50, seed=0)
    assert abs(float((x * 16).sum()) - 32416) <= 16  # total inked samples (a few boundary ties may flip)
    assert abs(int((x > 0).sum()) - 3323) <= 4
