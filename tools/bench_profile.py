"""Per-kernel time of a compiled train step, for tools/bench.py profile.

TVM 0.27's Relax VM has no profiling mode. One step runs with the VM's instrument hook
(``VirtualMachine.set_instrument``), which records every kernel call (symbol and argument
tensors); each kernel is then timed alone on its recorded arguments by TVM's C++
``time_evaluator`` (no Python in the timed loop) and counted once per call in the step. The
step itself is timed without the hook; what the kernels do not account for is listed as
"VM runtime and rest": the VM's builtins (allocation, shape checks, reshapes), its dispatch,
and the difference between a kernel run alone (warm caches) and inside the step.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import tvm
from tvm import relax

from gftvm.compiler import Artifact
from gftvm.data import synthetic
from gftvm.timing import median_ms

BUILTIN = "vm.builtin."


@dataclass
class Profile:
    """Per-step kernel times of one train step: ``us[name]`` and ``calls[name]``."""

    step_ms: float        # median uninstrumented step
    us: Counter
    calls: Counter

    def family(self) -> "Profile":
        """The kernels grouped by kind: numbering suffixes dropped (``conv2d17`` -> ``conv2d``).
        Numbered names are per module, so only families compare across two train steps."""
        us, calls = Counter(), Counter()
        for name in self.us:
            kind = re.sub(r"\d+$", "", name)
            us[kind] += self.us[name]
            calls[kind] += self.calls[name]
        return Profile(self.step_ms, us, calls)

    @property
    def total_us(self) -> float:
        return sum(self.us.values())

    def percent(self, name: str) -> float:
        return 100 * self.us[name] / (self.step_ms * 1e3)


def train_step_args(artifact: Artifact, image_size: int) -> list[tvm.runtime.Tensor]:
    """``train_step``'s flat arguments as runtime.Session passes them: x, y, params, state."""
    images, labels = synthetic(artifact.manifest["input"]["shape"][0], image_size=image_size)
    arrays = [images, labels, *artifact.state.params.values(), *artifact.state.optim]
    return [tvm.runtime.tensor(a) for a in arrays]


def recorded_kernel_calls(vm: relax.VirtualMachine, args: list) -> list[tuple[str, list]]:
    """(symbol, arguments) of every kernel call of one ``train_step`` (VM builtins left out)."""
    calls = []

    def instrument(func, symbol: str, before: bool, ret, *call_args) -> int:
        if before and not symbol.startswith(BUILTIN):
            calls.append((symbol, list(call_args)))
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    vm["train_step"](*args)
    return calls


def profile_train_step(artifact: Artifact, image_size: int, repeat: int) -> Profile:
    """Median step time, and each kernel's time alone (mean of ``repeat`` runs) times its calls."""
    args = train_step_args(artifact, image_size)
    module = artifact.executable.jit()
    libraries = [module, *module.imports]
    vm = relax.VirtualMachine(module, tvm.cpu())
    step_ms = median_ms(lambda: vm["train_step"](*args), repeat)
    calls = recorded_kernel_calls(relax.VirtualMachine(module, tvm.cpu()), args)
    counts = Counter(symbol for symbol, _ in calls)
    first_args: dict[str, list] = {}
    for symbol, call_args in calls:
        first_args.setdefault(symbol, call_args)
    us = Counter()
    for symbol, call_args in first_args.items():
        library = next(lib for lib in libraries if lib.implements_function(symbol))
        timer = library.time_evaluator(symbol, tvm.cpu(), number=repeat, repeat=1)
        us[symbol] = timer(*call_args).mean * 1e6 * counts[symbol]
    return Profile(step_ms, us, counts)


def side_by_side(profiles: dict[str, Profile], top: int) -> str:
    """Kernel families (union of each method's ``top`` slowest), one column group per method:
    calls per step, us per step, % of the uninstrumented step."""
    families = {method: p.family() for method, p in profiles.items()}
    names = {n for p in families.values() for n, _ in p.us.most_common(top)}
    order = sorted(names, key=lambda n: -max(p.us[n] for p in families.values()))
    head = f"{'kernel family':28}" + "".join(f" | {m + ' calls':>11} {'us':>10} {'%':>6}"
                                             for m in profiles)
    lines = [head, "-" * len(head)]
    for name in order:
        lines.append(f"{name[:28]:28}" + "".join(
            f" | {p.calls[name]:11d} {p.us[name]:10.1f} {p.percent(name):6.1f}"
            for p in families.values()))
    lines.append(f"{'VM runtime and rest':28}" + "".join(
        f" | {'':11} {p.step_ms * 1e3 - p.total_us:10.1f} "
        f"{100 - 100 * p.total_us / (p.step_ms * 1e3):6.1f}" for p in families.values()))
    lines.append(f"{'step (uninstrumented)':28}" + "".join(
        f" | {'':11} {p.step_ms * 1e3:10.1f} {100.0:6.1f}" for p in families.values()))
    return "\n".join(lines)


def top_kernels(method: str, profile: Profile, top: int) -> str:
    """One method's ``top`` slowest individual kernels."""
    lines = [f"{method}: top {top} kernels", f"{'kernel':40} {'calls':>6} {'us':>10} {'%':>6}"]
    for name, us in profile.us.most_common(top):
        lines.append(f"{name[:40]:40} {profile.calls[name]:6d} {us:10.1f} "
                     f"{profile.percent(name):6.1f}")
    return "\n".join(lines)
