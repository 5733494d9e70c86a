"""FLASH: NN-Degree, cost features, models, the hierarchical SHGO search and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from scipy.optimize import linprog
from scipy.stats import kendalltau
from torch import nn

import gftvm
from gftvm import models
from gftvm.errors import ConfigError
from gftvm.flash import space
from gftvm.flash.degree import (channel_graph_degree, nn_degree, resolution_cell,
                                search_space_cell)
from gftvm.flash.filter_search import LayerCosts, choose_filter, layer_costs, modelled_ms
from gftvm.flash.hardware import (FEATURES, LatencyModel, features, layer_features,
                                  memory_bytes)
from gftvm.flash.predictor import AccuracyPredictor
from gftvm.flash.search import Problem, _max_linear, exhaustive, hierarchical_shgo
from reference import check_parity

TOOLS = os.path.join(os.path.dirname(__file__), os.pardir, "tools")
TINY = space.Config((4, 6, 8), (3, 1, 4), (3, 0, 5))


def export(config, path):
    models.export_onnx(space.build(config), path, (1, 3, 32, 32))
    return onnx.load(path)


def test_closed_form_degree_matches_the_counted_channel_graph(tmp_path):
    for config in [TINY] + space.sample(space.Ranges(widths=tuple(range(3, 13))), 3, seed=3):
        counted = channel_graph_degree(export(config, tmp_path / "m.onnx"), search_space_cell)
        closed = [w + t * (d - 1) / d for w, d, t in zip(config.widths, config.depths,
                                                          config.skips)]
        assert counted == pytest.approx(dict(enumerate(closed)), rel=1e-12), config
        assert sum(counted.values()) == pytest.approx(
            nn_degree(config.widths, config.depths, config.skips))


def test_identity_skips_add_edges(tmp_path):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), \
                nn.Conv2d(4, 5, 1)

        def forward(self, x):
            y = self.a(x)
            return torch.flatten(nn.functional.adaptive_avg_pool2d(self.c(self.b(y) + y), 1), 1)

    models.export_onnx(Residual(), tmp_path / "r.onnx", (1, 3, 8, 8))
    proto = onnx.load(tmp_path / "r.onnx")
    # a: 3 in-edges per channel, b: 4, c: 4 from b plus 4 through the identity skip.
    per_conv = channel_graph_degree(proto, lambda node, shape: node.input[1])
    assert sorted(per_conv.values()) == [3, 4, 8]
    # zoo networks map onto the metric stage by stage (cells keyed by resolution)
    models.export_zoo_model("mobilenetv2-0.35", tmp_path / "mb.onnx")
    stages = channel_graph_degree(onnx.load(tmp_path / "mb.onnx"), resolution_cell)
    assert set(stages) == {16, 8, 4, 2, 1} and all(v > 0 for v in stages.values())


def test_closed_form_features_match_the_model_layers():
    for config in [TINY] + space.sample(space.FULL, 2, seed=5):
        rows = layer_features(space.build(config), (2, 3, 32, 32))
        expected = features(config.widths, config.depths, config.skips, batch=2)
        assert rows.sum(0)[:4] == pytest.approx(expected[:4], rel=1e-12)
        assert len(rows) == expected[FEATURES.index("layers")]


def test_space_size_and_config_checks():
    assert space.Ranges(widths=(2,), depths=(1, 2), skips=(0, 1, 2, 3), cells=2).size() == \
        (1 + 3) ** 2
    assert space.FULL.size() > 10 ** 12
    with pytest.raises(ConfigError, match="cell 0"):
        space.Config((4,), (2,), (5,))


def test_hardware_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    configs = space.sample(space.FULL, 40, seed=1)
    x = features(*[np.array([getattr(c, k) for c in configs]) for k in
                   ("widths", "depths", "skips")])
    truth = np.array([3e-7, 2e-6, 5e-6, 0.04, 0.3])
    np.testing.assert_allclose(LatencyModel.fit(x, x @ truth).coefficients, truth, rtol=1e-6)
    noisy = x @ truth * (1 + rng.normal(0, 1e-4, len(x)))
    np.testing.assert_allclose(LatencyModel.fit(x, noisy).coefficients, truth, rtol=0.05)


def test_predictor_fit_score_and_maximum():
    g = np.linspace(40, 200, 30)
    truth = AccuracyPredictor(np.array([-0.4, 0.9, 0.45]), 200.0)
    fitted = AccuracyPredictor.fit(g, truth.predict(g))
    np.testing.assert_allclose(fitted.predict(g), truth.predict(g), atol=1e-9)
    score = fitted.score(g, truth.predict(g) + np.sin(g) * 1e-3)
    assert score["rmse"] < 1e-3 and score["kendall_tau"] == pytest.approx(
        kendalltau(truth.predict(g), truth.predict(g) + np.sin(g) * 1e-3).statistic)
    dense = np.linspace(60, 190, 100001)
    assert fitted.maximum(60, 190) == pytest.approx(truth.predict(dense).max(), abs=1e-9)


def test_vertex_lp_matches_linprog():
    rng = np.random.default_rng(2)
    for _ in range(50):
        rows = np.vstack([rng.random((4, 3)), -np.eye(3), np.eye(3)])
        limits = np.concatenate([rng.random(4) * 3, np.zeros(3), rng.random(3) * 5 + 1])
        gain = rng.random(3)
        lp = linprog(-gain, A_ub=rows, b_ub=limits, method="highs")
        assert _max_linear(gain, rows, limits) == pytest.approx(-lp.fun, abs=1e-7)


def synthetic_problem(ranges, latency_ms, memory_kb):
    """A latency model and an accuracy curve of the shape the real fits have."""
    latency = LatencyModel(np.array([2e-7, 1e-6, 1e-6, 0.05, 0.2]))
    predictor = AccuracyPredictor(np.array([-0.3, 0.6, 0.6]), 150.0)
    return Problem(ranges, predictor, latency, latency_ms, memory_kb * 1024)


@pytest.mark.parametrize("latency_ms,memory_kb", [(2, 250), (5, 500), (20, 2000)])
def test_shgo_matches_exhaustive_search_on_the_reduced_space(latency_ms, memory_kb):
    problem = synthetic_problem(space.REDUCED, latency_ms, memory_kb)
    best = exhaustive(problem)
    found = hierarchical_shgo(problem)
    assert found.config is not None and best.config is not None
    accuracy, latency, memory = problem.evaluate(found.config.vector())
    assert latency <= latency_ms and memory <= memory_kb * 1024
    assert accuracy == found.accuracy >= 0.99 * best.accuracy
    assert found.evaluations < best.evaluations / 20


def test_search_is_fast_on_the_full_space():
    problem = synthetic_problem(space.FULL, 5, 512)
    found = hierarchical_shgo(problem)
    assert found.config is not None
    # a smoke bound on a shared CPU; tools/search.py report measures the time
    assert found.seconds < 10


def test_a_config_compiles_and_trains_like_pytorch(tmp_path):
    """Split and Concat on the trained path: 3 compiled SGD steps match PyTorch autograd,
    then the compiled predict matches PyTorch with the trained parameters."""
    model = space.build(TINY)
    models.calibrate_batchnorm(model, torch.randn(16, 3, 32, 32))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.clamp_(min=0.1)
    models.export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    session = check_parity(model, tmp_path / "m.onnx", "all", "sgd")
    trained = space.build(TINY)
    missing, unexpected = trained.load_state_dict(
        {k: torch.from_numpy(v) for k, v in session.parameters().items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = trained.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.predict(x), expected, rtol=1e-4, atol=1e-5)


def test_memory_is_parameters_plus_the_largest_cell():
    w, d, t = np.array([8, 16, 32]), np.array([2, 2, 2]), np.array([4, 4, 4])
    params = features(w, d, t)[FEATURES.index("param_bytes")]
    cells = 4 * np.array([32, 16, 8]) ** 2 * (w * 3 + t)
    assert memory_bytes(w, d, t) == params + cells.max()


def test_cli_search_emits_a_compilable_model(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "search.py"), "--latency-ms",
                          "20", "--memory-kb", "512", "--emit-onnx", str(tmp_path / "m.onnx")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for field in ("architecture", "NN-Degree", "accuracy", "latency", "memory", "search"):
        assert field in out.stdout
    gftvm.compile(tmp_path / "m.onnx", batch_size=1)


def test_filter_plan_search_matches_exhaustive():
    rng = np.random.default_rng(4)
    bp = rng.integers(10 ** 5, 10 ** 7, 12).astype(float)
    costs = LayerCosts([f"conv{i}" for i in range(12)],
                       np.stack([bp, bp / 4 + 10, bp / 16 + 10], axis=1), 10 ** 7)
    exact = modelled_ms(costs, 1e-6)
    strongest = 1e-6 * (costs.forward_macs + costs.backward[:, 2].sum())
    assert choose_filter(costs, 1e-6, exact) is None
    with pytest.raises(ConfigError, match="even filtering all 12"):
        choose_filter(costs, 1e-6, strongest * 0.99)
    for budget in np.linspace(strongest, exact, 9)[1:-1]:
        choice = choose_filter(costs, 1e-6, budget)
        plans = [(k, r) for k in range(13) for r in (0, 1)
                 if 1e-6 * (costs.forward_macs + costs.backward[:, 0].sum() - sum(
                     costs.backward[12 - k:, 0] - costs.backward[12 - k:, 1 + r])) <= budget]
        assert choice.modelled_ms <= budget
        assert choice.layers + (choice.patch == 4) / 2 == min(k + r / 2 for k, r in plans)


def test_compile_cli_filter_auto(tmp_path):
    path = tmp_path / "m.onnx"
    export(TINY, path)
    latency = {"batch": 1, "rows": []}
    configs = space.sample(space.SMALL, 8, seed=0)
    x = features(*[np.array([getattr(c, k) for c in configs]) for k in
                   ("widths", "depths", "skips")])
    for config, ms in zip(configs, x @ np.array([3e-6, 0, 0, 0.01, 0.1])):
        latency["rows"].append({"widths": config.widths, "depths": config.depths,
                                "skips": config.skips, "step_ms": ms})
    (tmp_path / "latency.json").write_text(json.dumps(latency))
    costs = layer_costs(path, "all", 2)
    exact = modelled_ms(costs, 1e-6)
    budget = exact - 1e-6 * (costs.backward[-1, 0] - costs.backward[-1, 1]) / 2
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "compile.py"), str(path),
                          "--batch", "2", "--filter", "auto", "--budget-ms", str(budget),
                          "--latency", str(tmp_path / "latency.json"), "-o",
                          str(tmp_path / "art")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "filter auto: last 1 trained convs at R2" in out.stdout
    plan = gftvm.runtime.load(tmp_path / "art").manifest["gradient_filter"]["plan"]
    assert [layer["node"] for layer in plan] == costs.nodes[-1:]


def test_measure_cli_over_rpc_loopback(tmp_path, rpc_server):
    """The board path (tools/measure.py's functions), with this machine as the board."""
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "search.py"), "measure",
                          "--count", "1", "--repeat", "2", "--rpc", rpc_server,
                          "-o", str(tmp_path / "latency.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "latency.json").read_text())
    assert result["board"] == rpc_server and result["rows"][0]["step_ms"] > 0


def test_cli_search_reports_budgets_nothing_fits(capsys, monkeypatch):
    monkeypatch.syspath_prepend(TOOLS)
    import search as search_cli  # tools/search.py

    assert search_cli.main(["--latency-ms", "0.01", "--memory-kb", "1"]) == 1
    assert "no network of the space fits 0.01 ms and 1.0 KB" in capsys.readouterr().out
