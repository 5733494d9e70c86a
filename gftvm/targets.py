"""Compilation targets by name: what TVM target each one is, how its library is linked, and
which device it runs on.

- ``host``: the build machine's CPU (LLVM's name for it).
- ``cortex-a72``: Raspberry Pi 4 (TVM tag ``raspberry-pi/4b-aarch64``: aarch64, NEON, 4 cores),
  linked with Debian's ``aarch64-linux-gnu-g++``.

``jetson-nano`` is refused with the reason: the aarch64 TVM wheel's CUDA runtime needs a CUDA 13
driver, and JetPack 4.6 ships CUDA 10.2. Its kernels do compile (passes/gpu_schedule.py, checked
for sm_53 in tests/test_gpu_schedule.py); README ("Targets and the device side") has the rest.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass

import tvm
from tvm import relax

from .errors import ConfigError

AARCH64_CXX = "aarch64-linux-gnu-g++"


@dataclass(frozen=True)
class TargetSpec:
    name: str
    arch: str      # platform.machine() of the machine that runs the artifact

    def tvm_target(self) -> tvm.target.Target:
        if self.name == "host":
            return tvm.target.Target({"kind": "llvm",
                                      "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
        return tvm.target.Target("raspberry-pi/4b-aarch64")

    @property
    def cross_compiled(self) -> bool:
        return self.arch != platform.machine()


TARGETS = {spec.name: spec for spec in (TargetSpec("host", platform.machine()),
                                         TargetSpec("cortex-a72", "aarch64"))}


def get(name: str) -> TargetSpec:
    if name == "jetson-nano":
        raise ConfigError("target 'jetson-nano' is not available: TVM's CUDA runtime for "
                          "aarch64 needs a CUDA 13 driver and JetPack 4.6 ships CUDA 10.2; "
                          "see README, 'Targets and the device side'")
    if name not in TARGETS:
        raise ConfigError(f"target={name!r}: supported targets are {', '.join(TARGETS)}")
    return TARGETS[name]


def export(executable: relax.Executable, path: str, spec: TargetSpec) -> None:
    """Write the shared library, linked for the target's CPU."""
    if not spec.cross_compiled:
        executable.export_library(path)
        return
    if not shutil.which(AARCH64_CXX):
        raise ConfigError(f"target {spec.name} needs the cross compiler {AARCH64_CXX} "
                          f"(Debian package g++-aarch64-linux-gnu; see README)")
    executable.export_library(path, fcompile=tvm.support.cc.cross_compiler(AARCH64_CXX))
