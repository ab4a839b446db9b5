"""What machine and software a number came from: one place for provenance and CPU features.

Every record that reports a speed or an error says which CPU (or GPU) made it and with which
versions; the CPUs of the project's machines vary (AMD EPYC without bf16 units, Intel Xeon with
AVX512-BF16 and AMX), so features are detected here, never assumed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo names) that give the CPU native bf16 arithmetic: the dot
# products of AVX512-BF16 and the tile multiplies of AMX. oneDNN uses them for bf16 convolutions
# and matrix products; without them bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "wandb", "numpy", "pandas",
            "matplotlib")


@functools.cache
def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    path = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if not path.exists():
        return fields
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: all cores of a machine are alike here
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name, e.g. 'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz'."""
    return (_cpuinfo_fields().get("model name") or platform.processor() or platform.machine()
            or "unknown")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where the OS does not list them)."""
    return frozenset(_cpuinfo_fields().get("flags", "").split())


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), so that bf16 autocast is
    faster than fp32 there."""
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def cuda_has_bf16() -> bool:
    """Whether the CUDA device computes bf16 natively (compute capability 8.0 and up: A100,
    H100, ...); older GPUs only emulate it, slower than fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_features() -> str:
    """The flags that decide the CPU fast paths, e.g. 'avx2 avx512f avx512_bf16 amx_bf16', and
    torch's own view of the vector unit (``torch.backends.cpu.get_cpu_capability``)."""
    present = [flag for flag in REPORTED_CPU_FLAGS if flag in cpu_flags()]
    return f"{' '.join(present) or 'none listed'} (torch: {torch.backends.cpu.get_cpu_capability()})"


def gpu_model(device: torch.device | str | None = None) -> str | None:
    """The CUDA device's name; None without CUDA or for a device that is not a CUDA device (a
    run on the CPU of a machine that has a GPU ran on no GPU)."""
    if not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def package_versions() -> dict[str, str]:
    """Versions of python and of the packages a result depends on ('absent' if not installed)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    versions["torch"] = torch.__version__  # the build actually imported, e.g. 2.14.1+cu130
    return versions


def describe_machine(device: torch.device | str | None = None) -> dict[str, str | int | None]:
    """The hardware of this process, for records and reports."""
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cpu_bf16": cpu_has_bf16(),
            "cores": len(_available_cpus()), "gpu": gpu_model(device),
            "os": platform.platform()}


def _available_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask: what SLURM or taskset gave it)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


__all__ = ["BF16_CPU_FLAGS", "cpu_features", "cpu_flags", "cpu_has_bf16", "cpu_model",
           "cuda_has_bf16",
           "describe_machine", "gpu_model", "package_versions"]
