"""Image data for demos, tests and the accuracy study. Nothing is downloaded.

- :func:`synthetic`: a generated, learnable toy set.
- :func:`load_cifar`: the CIFAR-10/100 "python version" pickle files in a directory.
- :func:`load_image_folder`: an ImageFolder tree (``root/<class>/<image>``).
- :func:`load_digits`: scikit-learn's 8×8 digits (the one real image set on our machines),
  upsampled to 32×32 RGB.
- :func:`non_iid_split`: two partitions with different class distributions, for
  pretraining on one and fine-tuning on the other.

Images are float32 NCHW in [0, 1]; labels int64.
"""

from __future__ import annotations

import os
import pickle

import numpy as np


def synthetic(count: int, num_classes: int = 10, image_size: int = 32,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy image set: each class is a fixed random pattern plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0.0, 1.0, (num_classes, 3, image_size, image_size))
    labels = rng.integers(0, num_classes, count)
    images = patterns[labels] + rng.normal(0.0, 1.0, (count, 3, image_size, image_size))
    return images.astype(np.float32), labels.astype(np.int64)


def load_cifar(root: str | os.PathLike, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``)."""
    root = os.fspath(root)
    if os.path.exists(os.path.join(root, "test_batch")):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = b"labels"
    else:
        names, key = ["train" if train else "test"], b"fine_labels"
    images, labels = [], []
    for name in names:
        path = os.path.join(root, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[key], np.int64))
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a CIFAR python-format batch: {err!r}") from err
    return np.concatenate(images).astype(np.float32) / 255.0, np.concatenate(labels)


def load_image_folder(root: str | os.PathLike, image_size: int = 32
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images under ``root/<class>/``, resized to ``image_size``; classes sorted by name."""
    from PIL import Image

    root = os.fspath(root)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root} has no class folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(root, name))):
            path = os.path.join(root, name, file)
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB").resize((image_size, image_size))
            except OSError as err:
                raise ValueError(f"{path} is not a readable image: {err}") from err
            images.append(np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0)
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int64), classes


def load_digits(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, upsampled (nearest, then a 2×2 box blur) to RGB."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    scale = image_size // 8
    images = digits.images.astype(np.float32) / 16.0
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    padded = np.pad(images, ((0, 0), (0, 1), (0, 1)), mode="edge")
    images = (padded[:, :-1, :-1] + padded[:, 1:, :-1] + padded[:, :-1, 1:] + padded[:, 1:, 1:]) / 4
    return np.repeat(images[:, None], 3, axis=1), digits.target.astype(np.int64)


def non_iid_split(labels: np.ndarray, skew: float = 0.8, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two partitions: the first holds ``skew`` of every class in the lower half of
    the classes and ``1 - skew`` of the upper half; the second the rest."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    first, second = [], []
    for c in classes:
        index = rng.permutation(np.flatnonzero(labels == c))
        share = skew if c < classes[len(classes) // 2] else 1.0 - skew
        cut = int(round(share * len(index)))
        first.append(index[:cut])
        second.append(index[cut:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def augment(images: np.ndarray, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """Random translations by up to ``shift`` pixels (zero fill), one per image."""
    n, _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    dy, dx = rng.integers(0, 2 * shift + 1, (2, n))
    return np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
