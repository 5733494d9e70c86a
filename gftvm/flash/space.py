"""The FLASH search space: DenseNet-type CNNs of ``N_c`` cells, and the PyTorch model of a config.

A cell ``c`` has width ``w_c``, depth ``d_c`` and skip budget ``t_c``. Its *entry* (the stem
for the first cell; for later cells a transition: 2×2 average pool, 1×1 conv) turns the previous
cell's output into ``w_c`` channels at the cell's resolution (the input size halved per cell).
Then ``d_c`` layers (3×3 conv, BN, ReLU; ``w_c`` output channels each) follow. Layer 1 reads the
entry; layer ``i >= 2`` reads the concatenation of its predecessor and ``t_c`` *skip channels*
gathered round-robin from the earlier layers of the cell (entry, layer 1, ..., layer ``i-2``),
most recent first. ``t_c <= w_c`` keeps every layer's skip budget satisfiable, so each layer
``i >= 2`` receives exactly ``t_c`` skip channels. The head is global average pool + linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Ranges:
    """Allowed values of each cell's width, depth and skip budget (skip budget <= width)."""

    widths: tuple[int, ...] = tuple(range(8, 65))
    depths: tuple[int, ...] = tuple(range(1, 9))
    skips: tuple[int, ...] = tuple(range(33))
    cells: int = 3

    def size(self) -> int:
        """Number of distinct networks: a depth-1 cell has no skip, so its budget is moot."""
        per_cell = sum(1 if d == 1 else sum(1 for t in self.skips if t <= w)
                       for w in self.widths for d in self.depths)
        return per_cell ** self.cells

    def values(self) -> list[np.ndarray]:
        """Allowed values of the flat variable vector (w_1..w_N, d_1..d_N, t_1..t_N)."""
        return [np.asarray(v, float) for v in
                (self.widths,) * self.cells + (self.depths,) * self.cells
                + (self.skips,) * self.cells]


#: The full space (1.4e12 networks); a reduced one small enough for exhaustive search; the
#: small networks, which latency measurements sample as often as the full space.
FULL = Ranges()
REDUCED = Ranges(widths=(8, 16, 24, 32), depths=(1, 2, 3, 4), skips=(0, 4, 8, 16))
SMALL = Ranges(widths=tuple(range(8, 33)), depths=(1, 2, 3, 4), skips=tuple(range(17)))


@dataclass(frozen=True)
class Config:
    """One network: per-cell widths, depths and skip budgets."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    skips: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.widths) == len(self.depths) == len(self.skips) >= 1:
            raise ConfigError(f"{self}: widths, depths and skips need one entry per cell")
        for c, (w, d, t) in enumerate(zip(self.widths, self.depths, self.skips)):
            if w < 1 or d < 1 or not 0 <= t <= w:
                raise ConfigError(f"{self}: cell {c} needs width >= 1, depth >= 1 and "
                                  f"0 <= skips <= width, got w={w}, d={d}, t={t}")

    @classmethod
    def from_vector(cls, x: np.ndarray) -> Config:
        """From the flat vector (w_1..w_N, d_1..d_N, t_1..t_N) of integer values."""
        w, d, t = np.asarray(np.rint(x), int).reshape(3, -1)
        return cls(tuple(map(int, w)), tuple(map(int, d)), tuple(map(int, t)))

    def vector(self) -> np.ndarray:
        return np.asarray(self.widths + self.depths + self.skips, float)

    def __str__(self) -> str:
        return " ".join(f"[w{w} d{d} t{t}]" for w, d, t in
                        zip(self.widths, self.depths, self.skips))


def skip_sources(layer: int, skips: int) -> list[tuple[int, int]]:
    """(source, channels) pairs feeding layer ``layer`` (>= 2) of a cell besides its
    predecessor: ``skips`` channels spread round-robin over sources ``layer-2, ..., 0``
    (0 = the entry), the first channels of each."""
    sources = list(range(layer - 2, -1, -1))
    share = [skips // len(sources) + (k < skips % len(sources)) for k in range(len(sources))]
    return [(s, n) for s, n in zip(sources, share) if n]


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Cell(nn.Module):
    """Entry + ``depth`` densely skip-connected layers (see the module docstring)."""

    def __init__(self, cin: int, width: int, depth: int, skips: int, first: bool) -> None:
        super().__init__()
        self.entry = _conv_bn_relu(cin, width, 3) if first else nn.Sequential(
            nn.AvgPool2d(2), *_conv_bn_relu(cin, width, 1))
        self.layers = nn.ModuleList(
            _conv_bn_relu(width + (skips if i >= 2 else 0), width, 3)
            for i in range(1, depth + 1))
        self.width, self.skips = width, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.entry(x)]
        for i, layer in enumerate(self.layers, start=1):
            inputs = [outputs[-1]]
            if i >= 2:
                inputs += [self._first(outputs[s], n) for s, n in skip_sources(i, self.skips)]
            outputs.append(layer(torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]))
        return outputs[-1]

    def _first(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        # torch.split exports as ONNX Split, which gftvm differentiates (Slice it does not).
        if channels == self.width:
            return x
        return torch.split(x, [channels, self.width - channels], 1)[0]


class DenseNetType(nn.Module):
    """The network of a :class:`Config`."""

    def __init__(self, config: Config, num_classes: int = 10) -> None:
        super().__init__()
        cells, cin = [], 3
        for c, (w, d, t) in enumerate(zip(config.widths, config.depths, config.skips)):
            cells.append(Cell(cin, w, d, t, first=c == 0))
            cin = w
        self.cells = nn.Sequential(*cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.cells(x)), 1))


def build(config: Config, num_classes: int = 10, seed: int = 0) -> DenseNetType:
    """The PyTorch model of ``config`` with seeded weights."""
    torch.manual_seed(seed)
    return DenseNetType(config, num_classes)


def resolutions(cells: int, image_size: int = 32) -> list[int]:
    """Spatial size of each cell: the input size, halved per later cell."""
    if image_size % 2 ** (cells - 1):
        raise ConfigError(f"image size {image_size} is not divisible by 2^{cells - 1}")
    return [image_size // 2 ** c for c in range(cells)]


def sample(ranges: Ranges, count: int, seed: int = 0) -> list[Config]:
    """``count`` distinct configs drawn uniformly per variable (skip budget <= width)."""
    rng = np.random.default_rng(seed)
    found: dict[Config, None] = {}
    while len(found) < count:
        w = rng.choice(ranges.widths, ranges.cells)
        d = rng.choice(ranges.depths, ranges.cells)
        t = [int(rng.choice([s for s in ranges.skips if s <= wc])) if dc > 1 else 0
             for wc, dc in zip(w, d)]
        found[Config(tuple(map(int, w)), tuple(map(int, d)), tuple(t))] = None
    return list(found)

