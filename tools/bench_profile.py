"""Per-kernel time of a compiled train step, for tools/bench.py profile.

TVM 0.27's Relax VM has no profiling mode. Steps (after the timed, uninstrumented ones) run
with the VM's instrument hook (``VirtualMachine.set_instrument``), which records every kernel
call (symbol and argument tensors) and times the VM's builtins (``vm.builtin.*``: allocation,
shape checks, reshapes) in place. Each kernel is then timed alone on its recorded arguments
by TVM's C++ ``time_evaluator`` (no Python in the timed loop) and counted once per call in the
step. The step itself is timed without the hook. "VM runtime and rest" is the step minus the
kernels: the builtins, the VM's dispatch, and the difference between a kernel run alone (warm
caches) and inside the step. The builtins' own rows are upper bounds: the hook's Python
overhead (about half a microsecond per call) falls inside their timed intervals. Each
artifact is profiled in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax

from gftvm.data import synthetic
from gftvm.runtime import read_manifest
from gftvm.state import read_state
from gftvm.timing import median_ms
from bench_steps import run_fresh
from tune import HEAVY_OPS, kernel_ops


def is_builtin(symbol: str) -> bool:
    return symbol.startswith("vm.builtin.")


def kind_of(kernel: str) -> str:
    """The heavy op a kernel fuses (``fused_conv2d17_add3_relu`` -> ``conv2d``; see
    tune.HEAVY_OPS), else its name without ``fused_`` and numbering (``fused_multiply2_add5``
    -> ``multiply_add``)."""
    ops = kernel_ops(kernel, set(HEAVY_OPS))
    if ops:
        return max(ops, key=len)
    return re.sub(r"(?<=[a-z])\d+(?=_|$)", "", kernel.removeprefix("fused_"))


@dataclass
class Profile:
    """Per-step kernel times of one train step: ``us[name]`` and ``calls[name]``."""

    step_ms: float        # median uninstrumented step
    us: Counter
    calls: Counter

    def family(self) -> "Profile":
        """The kernels grouped by kind (:func:`kind_of`). Numbered names are per module, so only
        kinds compare across two train steps."""
        us, calls = Counter(), Counter()
        for name in self.us:
            kind = kind_of(name)
            us[kind] += self.us[name]
            calls[kind] += self.calls[name]
        return Profile(self.step_ms, us, calls)

    @property
    def kernel_us(self) -> float:
        """Time of the kernels (builtins left out) per step."""
        return sum(us for name, us in self.us.items() if not is_builtin(name))

    def percent(self, name: str) -> float:
        return 100 * self.us[name] / (self.step_ms * 1e3)


def load_train_step(directory: str) -> tuple[tvm.runtime.Module, list[tvm.runtime.Tensor]]:
    """An artifact's library and ``train_step``'s flat arguments as runtime.Session passes
    them: x, y (``synthetic`` data), parameters, optimizer state."""
    manifest = read_manifest(directory)
    library = tvm.runtime.load_module(os.path.join(directory, manifest["files"]["library"]["path"]))
    state = read_state(os.path.join(directory, manifest["files"]["state"]["path"]))
    batch, _, size, _ = manifest["input"]["shape"]
    images, labels = synthetic(batch, image_size=size)
    arrays = [images, labels, *(state.params[p["name"]] for p in manifest["params"]), *state.optim]
    return library, [tvm.runtime.tensor(a) for a in arrays]


def record_steps(vm: relax.VirtualMachine, args: list, steps: int
                 ) -> tuple[list[tuple[str, list]], Profile]:
    """``steps`` runs of ``train_step`` under the instrument hook: the kernel calls (symbol,
    arguments) of the first, and the builtins' wall time (median over the steps) and calls per
    step as a Profile (without step time)."""
    kernels, started, per_step = [], {}, []

    def instrument(func, symbol: str, before: bool, ret, *call_args) -> int:
        if not is_builtin(symbol):
            if before and len(per_step) == 1:
                kernels.append((symbol, list(call_args)))
        elif before:
            started[symbol] = time.perf_counter()
        else:
            per_step[-1].append((symbol, (time.perf_counter() - started[symbol]) * 1e6))
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(steps):
        per_step.append([])
        vm["train_step"](*args)
    totals = [Counter() for _ in per_step]
    for total, builtin_calls in zip(totals, per_step):
        for symbol, us in builtin_calls:
            total[symbol] += us
    calls = Counter(symbol for symbol, _ in per_step[0])
    us = Counter({name: statistics.median(total[name] for total in totals) for name in calls})
    return kernels, Profile(0.0, us, calls)


def profile_train_step(directory: str, repeat: int) -> Profile:
    """Median step time of the artifact in ``directory``, each kernel's time alone (median of
    ``repeat`` means of 3 runs) times its calls, and the builtins' time per instrumented step
    (median of ``repeat``)."""
    library, args = load_train_step(directory)
    vm = relax.VirtualMachine(library, tvm.cpu())
    step_ms = median_ms(lambda: vm["train_step"](*args), repeat)
    kernels, profile = record_steps(vm, args, repeat)
    profile.step_ms = step_ms
    first_args: dict[str, list] = {}
    for symbol, call_args in kernels:
        first_args.setdefault(symbol, call_args)
        profile.calls[symbol] += 1
    for symbol, call_args in first_args.items():
        profile.us[symbol] = kernel_us(library, symbol, call_args, repeat) * profile.calls[symbol]
    return profile


def kernel_us(library: tvm.runtime.Module, symbol: str, args: list, repeat: int) -> float:
    """Microseconds of one call of a kernel of ``library`` run alone on ``args``: the median
    of ``repeat`` means of 3 runs, by TVM's C++ ``time_evaluator``."""
    module = next(m for m in [library, *library.imports] if m.implements_function(symbol))
    return module.time_evaluator(symbol, tvm.cpu(), number=3, repeat=repeat)(*args).median * 1e6


def kernel_calls(vm: relax.VirtualMachine, function: str, args: list) -> list[tuple[str, list]]:
    """The kernel calls (symbol, argument tensors) of one run of ``vm[function]``."""
    calls = []

    def instrument(func, symbol: str, before: bool, ret, *call_args) -> int:
        if before and not is_builtin(symbol):
            calls.append((symbol, list(call_args)))
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    vm[function](*args)
    vm.set_instrument(lambda *_: 0)
    return calls


def skipping(skipped: str | None) -> Callable[..., int]:
    """A VM instrument hook that skips the calls of kernel ``skipped`` (None: none); the
    kernels after it read what its outputs held before."""
    return lambda func, symbol, before, ret, *_: int(before and symbol == skipped)


def in_place_ms(vm: relax.VirtualMachine, function: str, args: list, symbols: list[str],
                rounds: int, repeat: int) -> dict[str, float]:
    """What each kernel in ``symbols`` costs inside runs of ``vm[function]``: the run's time
    minus its time with that kernel skipped (the instrument hook's SKIP_RUN), the hook set in
    both so that most of its own cost cancels (not in runs of a few hundred microseconds,
    where the hook, 5-16 us per VM call here, costs as much as the kernels); each the median
    of ``repeat`` runs, the difference the median of ``rounds`` rounds that time every variant
    in turn. Unlike a kernel timed alone, this counts the data that the kernel finds out of
    cache and the data it pushes out of cache for the kernels after it. A kernel called more
    than once per run is skipped at every call."""
    times: dict[str | None, list[float]] = {skipped: [] for skipped in [None, *symbols]}
    for _ in range(rounds):
        for skipped, runs in times.items():
            vm.set_instrument(skipping(skipped))
            runs.append(median_ms(lambda: vm[function](*args), repeat))
    vm.set_instrument(lambda *_: 0)
    return {symbol: statistics.median(whole - without for whole, without
                                      in zip(times[None], times[symbol]))
            for symbol in symbols}


def profile_in_fresh_process(directory: str, threads: int, repeat: int) -> Profile:
    """:func:`profile_train_step` in a new Python process (a profile taken after another in
    the same process was measured up to 2x slower)."""
    result = run_fresh(__file__, [directory, threads, repeat], f"profiling {directory}")
    return Profile(result["step_ms"], Counter(result["us"]), Counter(result["calls"]))


def side_by_side(profiles: dict[str, Profile], top: int) -> str:
    """Kernel families (union of each method's ``top`` slowest), the rest of the step, then
    the VM builtins; one column group per method: calls, us and % of the step."""
    families = {method: p.family() for method, p in profiles.items()}
    kernels = {n for p in families.values()
               for n, _ in Counter({k: v for k, v in p.us.items() if not is_builtin(k)})
               .most_common(top)}
    builtins = {n for p in families.values() for n in p.us if is_builtin(n)}
    head = f"{'kernel family':30}" + "".join(f" | {m + ' calls':>11} {'us':>10} {'%':>6}"
                                             for m in profiles)
    return "\n".join([
        head, "-" * len(head), *_rows(families, kernels),
        _total_row("VM runtime and rest", [(p.step_ms * 1e3 - p.kernel_us, p.step_ms)
                                           for p in families.values()]),
        _total_row("step", [(p.step_ms * 1e3, p.step_ms) for p in families.values()]),
        "", "VM builtins, timed by the hook (upper bounds, part of 'VM runtime and rest'):",
        *_rows(families, builtins)])


def _rows(families: dict[str, Profile], names: set[str]) -> list[str]:
    order = sorted(names, key=lambda n: -max(p.us[n] for p in families.values()))
    return [f"{name[:30]:30}" + "".join(f" | {p.calls[name]:11d} {p.us[name]:10.1f} "
                                        f"{p.percent(name):6.1f}" for p in families.values())
            for name in order]


def _total_row(label: str, values: list[tuple[float, float]]) -> str:
    return f"{label:30}" + "".join(f" | {'':11} {us:10.1f} {us / (step_ms * 10):6.1f}"
                                   for us, step_ms in values)


def top_kernels(method: str, profile: Profile, top: int) -> str:
    """One method's ``top`` slowest individual kernels (builtins left out)."""
    lines = [f"{method}: top {top} kernels", f"{'kernel':40} {'calls':>6} {'us':>10} {'%':>6}"]
    ranked = Counter({n: us for n, us in profile.us.items() if not is_builtin(n)})
    for name, us in ranked.most_common(top):
        lines.append(f"{name[:40]:40} {profile.calls[name]:6d} {us:10.1f} "
                     f"{profile.percent(name):6.1f}")
    return "\n".join(lines)


def main() -> None:
    directory, threads, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.environ["TVM_NUM_THREADS"] = str(threads)
    profile = profile_train_step(directory, repeat)
    print(json.dumps({"step_ms": profile.step_ms, "us": profile.us, "calls": profile.calls}))


if __name__ == "__main__":
    main()
