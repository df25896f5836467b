"""The machine a benchmark ran on, named the same way in every result file.

Numbers from these CPUs differ by instruction set (AVX-512 vs AVX2-only Zen 3), so each
result names the CPU model, the vector extensions it has and the kernel path that ran.
"""

from __future__ import annotations

import platform

import torch

ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma",
             "asimd", "sve")


def cpu_info() -> tuple[str, list[str]]:
    """The CPU model name and which of :data:`ISA_FLAGS` it has (``/proc/cpuinfo``)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def describe() -> dict[str, str]:
    """CPU model, ISA flags, the kernels' chosen path and torch's thread count."""
    from sparsekit.engine import kernels

    model, flags = cpu_info()
    path = kernels.isa() if kernels.available() else "none (PyTorch fallback)"
    return {"model": model, "flags": " ".join(flags) or "none", "isa": path,
            "threads": str(torch.get_num_threads())}
