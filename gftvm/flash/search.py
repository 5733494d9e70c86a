"""Hierarchical SHGO: maximise predicted accuracy under latency and memory budgets.

Variables: per cell width w, depth d and skip budget t (integers from :class:`Ranges`). Every
model here is a smooth function of their relaxed, real values: NN-Degree ``Σ w + t(d−1)/d``,
the accuracy polynomial in it, the closed-form cost features and hence the fitted latency, and
the modelled memory. The search has two levels, each solved by ``scipy.optimize.shgo``:

1. **Outer level, macro-structure (w, d)**: 2·N_c relaxed variables, constrained so that the
   macro-structure fits the budgets without skips. Its objective is the best predicted accuracy
   that relaxed skip budgets reach for that macro-structure. Latency and memory are linear in
   t, so the largest reachable degree is a linear program in N_c variables (solved exactly by
   enumerating its vertices); every degree between that and the skip-free one is reachable
   too, and the accuracy polynomial's maximum on that interval is exact. The integer
   macro-structures bracketing the outer local optima are the candidates.
2. **Inner level, skip budgets t** for one integer macro-structure: SHGO over the relaxed t
   (t_c <= w_c) under the budgets, then the best feasible rounding among the allowed values
   bracketing it.

Candidates are visited best first by their relaxed value (an upper bound on what integer skip
budgets reach); the inner level stops once no remaining candidate can beat the best found.

Macro first: it sets the bulk of the cost (∝ w²d per cell) and the main term of the degree (w),
while skips refine the degree at a cost linear in t, so for a fixed macro-structure the inner
problem is small and nearly linear. SHGO's triangulation also grows steeply with dimension:
2·N_c and N_c variables take milliseconds where all 3·N_c at once take seconds.

:func:`exhaustive` enumerates a (reduced) space for comparison; :func:`random_search` samples.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import shgo

from .degree import nn_degree
from .hardware import LatencyModel, cell_working_bytes, features, memory_bytes
from .predictor import AccuracyPredictor
from .space import Config, Ranges

#: SHGO's local minimiser. Accuracy moves by ~1e-4 per skip channel: SLSQP's default ftol
#: (1e-6) would stop it early.
LOCAL = {"method": "SLSQP", "options": {"maxiter": 100, "ftol": 1e-12}}


@dataclass
class Problem:
    """Maximise ``predictor(NN-Degree)`` s.t. latency <= ``latency_ms``, memory <=
    ``memory_bytes`` over ``ranges``."""

    ranges: Ranges
    predictor: AccuracyPredictor
    latency: LatencyModel
    latency_ms: float
    memory_bytes: float
    batch: int = 1
    image_size: int = 32

    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted accuracy, modelled latency (ms) and memory (bytes) of vectors
        (..., 3·cells) laid out as (w_1..w_N, d_1..d_N, t_1..t_N); relaxed values allowed."""
        x = np.asarray(x, float)
        n = self.ranges.cells
        w, d, t = x[..., :n], x[..., n:2 * n], x[..., 2 * n:]
        accuracy = self.predictor.predict(nn_degree(w, d, t))
        costs = features(w, d, t, self.batch, self.image_size)
        memory = memory_bytes(w, d, t, self.batch, self.image_size, costs[..., 1])
        return accuracy, self.latency.predict(costs), memory

    def value(self, x: np.ndarray) -> np.ndarray:
        """Predicted accuracy where the budgets hold (and t <= w), -inf elsewhere."""
        accuracy, latency, memory = self.evaluate(x)
        n = self.ranges.cells
        ok = (latency <= self.latency_ms) & (memory <= self.memory_bytes) & np.all(
            x[..., 2 * n:] <= x[..., :n], axis=-1)
        return np.where(ok, accuracy, -np.inf)

    def constraints(self, complete) -> list[dict]:
        """SHGO inequality constraints (>= 0) on a partial vector completed by ``complete``."""
        def budgets(z: np.ndarray) -> np.ndarray:
            _, latency, memory = self.evaluate(complete(z))
            return np.array([1 - latency / self.latency_ms, 1 - memory / self.memory_bytes])

        def skips_fit(z: np.ndarray) -> np.ndarray:
            x, n = complete(z), self.ranges.cells
            return x[:n] - x[2 * n:]
        return [{"type": "ineq", "fun": budgets}, {"type": "ineq", "fun": skips_fit}]


@dataclass
class Result:
    config: Config | None
    accuracy: float
    seconds: float
    evaluations: int


def _bracket(values: np.ndarray, x: float) -> list[float]:
    """The allowed values on either side of ``x`` (one value if x is allowed or outside)."""
    i = int(np.searchsorted(values, x))
    return sorted({float(values[min(i, len(values) - 1)]), float(values[max(i - 1, 0)])})


def hierarchical_shgo(problem: Problem, sampling: int = 16, candidates: int = 8,
                      tolerance: float = 1e-4) -> Result:
    """The two-level search described in the module docstring: at most ``candidates`` inner
    searches, none for a macro-structure whose bound is within ``tolerance`` of the best."""
    start = time.perf_counter()
    n = problem.ranges.cells
    values = problem.ranges.values()
    no_skips = lambda z: np.concatenate([z, np.zeros(n)])
    outer = shgo(lambda z: -_relaxed_skips(problem, z), [(v[0], v[-1]) for v in values[:2 * n]],
                 constraints=problem.constraints(no_skips)[:1], sampling_method="simplicial",
                 iters=3, minimizer_kwargs={**LOCAL, "options": {"maxiter": 20, "ftol": 1e-9}},
                 options={"local_iter": 2})
    evaluations = outer.nfev
    # Without a feasible local optimum SHGO may still report its best sampling point, or none.
    found = [p for p in (outer.get("xl"), outer.x) if p is not None]
    relaxed = np.reshape(found[0], (-1, 2 * n)) if found else np.empty((0, 2 * n))
    macros = {m for z in relaxed for m in itertools.product(
        *(_bracket(values[j], z[j]) for j in range(2 * n)))}
    bounds = {m: _relaxed_skips(problem, np.array(m)) for m in macros}
    best, best_value = None, -np.inf
    for macro in sorted(macros, key=lambda m: -bounds[m])[:candidates]:
        if bounds[macro] <= best_value + tolerance:
            break
        x, inner_evaluations = _inner(problem, np.array(macro), sampling)
        evaluations += inner_evaluations
        value = problem.value(x) if x is not None else -np.inf
        if value > best_value:
            best, best_value = x, value
    config = Config.from_vector(best) if best is not None else None
    return Result(config, float(best_value), time.perf_counter() - start, evaluations)


def _relaxed_skips(problem: Problem, macro: np.ndarray) -> float:
    """Best predicted accuracy over relaxed skip budgets for a relaxed macro-structure (-inf if
    it does not fit the budgets even without skips)."""
    n = problem.ranges.cells
    w, d = macro[:n], macro[n:]
    skip_max = np.minimum(w, problem.ranges.skips[-1])
    basis = np.concatenate([np.zeros((1, n)), np.eye(n)])          # t = 0, then unit steps
    x = np.concatenate([np.broadcast_to(macro, (n + 1, 2 * n)), basis], axis=1)
    costs = features(x[:, :n], x[:, n:2 * n], x[:, 2 * n:], problem.batch, problem.image_size)
    latency = problem.latency.predict(costs)
    # memory while each cell runs (the budget applies to the largest: one row per cell)
    memory = costs[:, 1:2] + cell_working_bytes(x[:, :n], x[:, n:2 * n], x[:, 2 * n:],
                                                problem.batch, problem.image_size)
    if latency[0] > problem.latency_ms or memory[0].max() > problem.memory_bytes:
        return -np.inf
    gain = (d - 1) / d                                               # degree per skip channel
    rows = np.vstack([latency[1:] - latency[0], (memory[1:] - memory[0]).T, -np.eye(n),
                      np.eye(n)])
    limits = np.concatenate([[problem.latency_ms - latency[0]],
                             problem.memory_bytes - memory[0], np.zeros(n), skip_max])
    low = float(nn_degree(w, d, np.zeros(n)))
    high = low + _max_linear(gain, rows, limits)
    return float(problem.predictor.maximum(low, high))


def _max_linear(gain: np.ndarray, rows: np.ndarray, limits: np.ndarray) -> float:
    """max gain·t s.t. rows·t <= limits, for a bounded, non-empty polytope in few dimensions:
    the best feasible vertex, each vertex solving n of the constraints with equality.
    (``scipy.optimize.linprog`` gives the same answer but costs ~5 ms a call in setup, and the
    outer level asks hundreds of times.)"""
    n = len(gain)
    subsets = np.array(list(itertools.combinations(range(len(rows)), n)))
    systems, rhs = rows[subsets], limits[subsets]
    regular = np.abs(np.linalg.det(systems)) > 1e-12 * np.abs(systems).max(axis=(1, 2)) ** n
    vertices = np.linalg.solve(systems[regular], rhs[regular][..., None])[..., 0]
    slack = 1e-9 * (np.abs(limits) + 1)
    feasible = np.all(vertices @ rows.T <= limits + slack, axis=1)
    return float((vertices[feasible] @ gain).max()) if feasible.any() else 0.0


def _inner(problem: Problem, macro: np.ndarray, sampling: int) -> tuple[np.ndarray | None, int]:
    """Best integer skip budgets for a fixed macro-structure (None if nothing fits)."""
    n = problem.ranges.cells
    skips = problem.ranges.values()[2 * n]
    free = [c for c in range(n) if macro[n + c] > 1]

    def complete(z: np.ndarray) -> np.ndarray:
        t = np.zeros(n)
        t[free] = z
        return np.concatenate([macro, t])
    evaluations, choices = 0, [[0.0] for _ in range(n)]
    if free:
        bounds = [(skips[0], min(skips[-1], macro[c])) for c in free]
        inner = shgo(lambda z: -problem.evaluate(complete(z))[0], bounds,
                     constraints=problem.constraints(complete), n=sampling, iters=1,
                     sampling_method="sobol", minimizer_kwargs=LOCAL)
        evaluations = inner.nfev
        start = inner.x if inner.success else np.zeros(len(free))
        for c, t in zip(free, start):
            choices[c] = [v for v in _bracket(skips, t) if v <= macro[c]] + [skips[0]]
    grid = np.array([np.concatenate([macro, t]) for t in itertools.product(*choices)])
    values = problem.value(grid)
    if not np.isfinite(values.max()):
        return None, evaluations + len(grid)
    return grid[int(np.argmax(values))], evaluations + len(grid)


def exhaustive(problem: Problem, chunk: int = 200_000) -> Result:
    """Every network of ``problem.ranges`` (vectorised), the best feasible one."""
    start = time.perf_counter()
    r = problem.ranges
    cells = np.array([(w, d, t) for w in r.widths for d in r.depths for t in r.skips
                      if t <= w and (d > 1 or t == 0)], float)
    count = len(cells) ** r.cells
    best, best_value = None, -np.inf
    for first in range(0, count, chunk):
        index = np.arange(first, min(first + chunk, count))
        digits = np.stack([index // len(cells) ** k % len(cells) for k in range(r.cells)], 1)
        x = cells[digits].transpose(0, 2, 1).reshape(len(index), -1)
        values = problem.value(x)
        i = int(np.argmax(values))
        if values[i] > best_value:
            best, best_value = x[i], values[i]
    config = Config.from_vector(best) if best is not None else None
    return Result(config, float(best_value), time.perf_counter() - start, count)


def random_search(problem: Problem, samples: int, seed: int = 0) -> Result:
    """The best feasible network among ``samples`` uniform draws (per variable, t <= w)."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    r = problem.ranges
    w = rng.choice(r.widths, (samples, r.cells)).astype(float)
    d = rng.choice(r.depths, (samples, r.cells)).astype(float)
    skips = np.asarray(r.skips, float)
    t = skips[(rng.random((samples, r.cells)) * (np.searchsorted(skips, w, "right"))).astype(int)]
    x = np.concatenate([w, d, np.where(d > 1, t, 0.0)], axis=1)
    values = problem.value(x)
    i = int(np.argmax(values))
    config = Config.from_vector(x[i]) if np.isfinite(values[i]) else None
    return Result(config, float(values[i]), time.perf_counter() - start, samples)
