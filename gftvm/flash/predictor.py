"""Few-sample accuracy predictor: accuracy as a low-order polynomial of NN-Degree.

Sampled networks are trained briefly in PyTorch (:func:`train_and_evaluate`: SGD + momentum,
cosine schedule, random translations) on any ``(images, labels)`` split, so the procedure is
the same for digits (:func:`gftvm.data.load_digits`) and CIFAR-10 (:func:`gftvm.data.load_cifar`).
:class:`AccuracyPredictor` fits the test accuracies by least squares in the NN-Degree and is
judged on held-out networks by RMSE and Kendall's τ (scipy.stats.kendalltau).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import nn

from ..data import augment
from .space import Config, build


def train_and_evaluate(config: Config, train: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray], epochs: int = 3, batch: int = 32,
                       lr: float = 0.05, seed: int = 0) -> float:
    """Top-1 test accuracy of ``config`` after ``epochs`` of training on ``train``."""
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    model = build(config, num_classes, seed)
    rng = np.random.default_rng(seed)
    steps = epochs * (len(train[0]) // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(train[0]))
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start:start + batch]
            x = torch.from_numpy(augment(train[0][index], rng))
            loss = nn.functional.cross_entropy(model(x), torch.from_numpy(train[1][index]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(test[0][i:i + 256]))
                            for i in range(0, len(test[0]), 256)])
    return float((logits.argmax(1).numpy() == test[1]).mean())


@dataclass
class AccuracyPredictor:
    """accuracy ≈ Σ_k a_k (g / scale)^k, k = 0..order (polynomial in the NN-Degree g)."""

    coefficients: np.ndarray   # highest power first, as numpy.polyval wants
    scale: float

    @classmethod
    def fit(cls, degrees: np.ndarray, accuracies: np.ndarray, order: int = 2
            ) -> AccuracyPredictor:
        degrees = np.asarray(degrees, float)
        scale = float(degrees.max())
        return cls(np.polyfit(degrees / scale, np.asarray(accuracies, float), order), scale)

    def predict(self, degrees: np.ndarray) -> np.ndarray:
        return np.polyval(self.coefficients, np.asarray(degrees, float) / self.scale)

    def maximum(self, low: float, high: float) -> float:
        """Largest predicted accuracy for a degree in [low, high]."""
        stationary = np.roots(np.polyder(self.coefficients)) if len(self.coefficients) > 2 \
            else np.empty(0)
        inside = [r.real * self.scale for r in stationary
                  if abs(r.imag) < 1e-12 and low <= r.real * self.scale <= high]
        return float(self.predict(np.array([low, high, *inside])).max())

    def score(self, degrees: np.ndarray, accuracies: np.ndarray) -> dict[str, float]:
        """RMSE and Kendall's τ of the predictions on (held-out) networks."""
        predicted = self.predict(degrees)
        tau = kendalltau(predicted, accuracies).statistic
        return {"rmse": float(np.sqrt(np.mean((predicted - accuracies) ** 2))),
                "kendall_tau": float(tau)}

    def to_json(self) -> dict:
        return {"coefficients": self.coefficients.tolist(), "scale": self.scale}
