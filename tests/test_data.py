"""Data loaders, on small files the tests write."""

import pickle

import numpy as np
import pytest
from PIL import Image

from gftvm import data


def write_cifar10(root, count=4):
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, count).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": labels}, f)
        batches[name] = (pixels, labels)
    return batches


def test_cifar10(tmp_path):
    batches = write_cifar10(tmp_path)
    x, y = data.load_cifar(tmp_path, train=True)
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    pixels, labels = batches["data_batch_2"]
    np.testing.assert_array_equal(x[4:8], pixels.reshape(4, 3, 32, 32) / np.float32(255))
    assert y[4:8].tolist() == labels
    x_test, y_test = data.load_cifar(tmp_path, train=False)
    assert x_test.shape == (4, 3, 32, 32) and y_test.tolist() == batches["test_batch"][1]


def test_cifar100_and_corrupted_files(tmp_path):
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for name in ("train", "test"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": pixels, b"fine_labels": [7, 99], b"coarse_labels": [1, 2]}, f)
    x, y = data.load_cifar(tmp_path)
    assert y.tolist() == [7, 99] and x[0, 0, 0, 1] == np.float32(1 / 255)
    (tmp_path / "train").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="train is not a CIFAR python-format batch"):
        data.load_cifar(tmp_path)


def test_image_folder(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, colour in colours.items():
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 20), colour).save(tmp_path / name / f"{i}.png")
    x, y, classes = data.load_image_folder(tmp_path, image_size=16)
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 1, 1]
    assert x.shape == (4, 3, 16, 16)
    np.testing.assert_allclose(x[0, :, 5, 5], [1, 0, 0])
    np.testing.assert_allclose(x[3, :, 5, 5], [0, 0, 1])
    (tmp_path / "dog" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        data.load_image_folder(tmp_path)


def test_digits_and_non_iid_split():
    x, y = data.load_digits()
    assert x.shape == (1797, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    first, second = data.non_iid_split(y, skew=0.8, seed=0)
    assert len(np.intersect1d(first, second)) == 0 and len(first) + len(second) == len(y)
    low = lambda part: np.mean(y[part] < 5)
    assert low(first) > 0.75 and low(second) < 0.25


def test_augment_shifts_without_changing_shape():
    rng = np.random.default_rng(0)
    x = np.zeros((3, 3, 8, 8), np.float32)
    x[:, :, 4, 4] = 1
    out = data.augment(x, rng, shift=2)
    assert out.shape == x.shape and np.all(out.sum((1, 2, 3)) == 3)
