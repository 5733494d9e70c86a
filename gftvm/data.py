"""Data for demos and tests."""

from __future__ import annotations

import numpy as np


def synthetic(count: int, num_classes: int = 10, image_size: int = 32,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy image set: each class is a fixed random pattern plus Gaussian noise.
    Returns float32 NCHW images and int64 labels."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0.0, 1.0, (num_classes, 3, image_size, image_size))
    labels = rng.integers(0, num_classes, count)
    images = patterns[labels] + rng.normal(0.0, 1.0, (count, 3, image_size, image_size))
    return images.astype(np.float32), labels.astype(np.int64)
