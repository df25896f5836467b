"""The machine a benchmark ran on, named the same way in every result file.

Numbers from these CPUs differ by instruction set (AVX-512 vs AVX2-only Zen 3), so each
result names the CPU model, the vector extensions it has and the kernel path that ran.
"""

from __future__ import annotations

import platform

import torch

ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512_vbmi2",
             "avx512_fp16", "amx_bf16", "amx_int8", "avx2", "fma", "asimd", "sve")
"""Extensions named in results: those the kernels use, and AMX (which oneDNN's dense bf16
and int8 matmuls, the peers, use where present)."""
ZEN = {23: "Zen or Zen 2", 26: "Zen 5"}  # AMD core generation by CPU family (25: Zen 3 or 4)


def cpu_info() -> tuple[str, list[str]]:
    """The CPU model name and which of :data:`ISA_FLAGS` it has (``/proc/cpuinfo``); an x86
    name also gets its family and model (and an AMD one its core generation), since a
    virtual machine's name ("AMD EPYC", "Intel(R) Xeon(R) Processor") does not tell the
    generations apart and their kernels' speeds differ."""
    model, flags, fields = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name", model)
    if fields.get("vendor_id") in ("AuthenticAMD", "GenuineIntel") and "cpu family" in fields:
        family, zen = int(fields["cpu family"]), ""
        if fields["vendor_id"] == "AuthenticAMD":
            zen = ZEN.get(family, "")
            if family == 25:  # Zen 3 and Zen 4 share a family; only Zen 4 has AVX-512
                zen = "Zen 4" if "avx512f" in flags else "Zen 3"
        model += f" (family {family}, model {fields.get('model', '?')}{', ' + zen if zen else ''})"
    return model, [f for f in ISA_FLAGS if f in flags]


def describe() -> dict[str, str]:
    """CPU model, ISA flags, the kernels' chosen path and torch's thread count."""
    from sparsekit.engine import kernels

    model, flags = cpu_info()
    path = kernels.isa() if kernels.available() else "none (PyTorch fallback)"
    return {"model": model, "flags": " ".join(flags) or "none", "isa": path,
            "threads": str(torch.get_num_threads())}


def machine() -> str:
    """One line naming the CPU model, its ISA flags and the kernels' path (results had
    named only ``x86_64``, which cannot tell Zen 3 from an AVX-512 Xeon)."""
    info = describe()
    return f"{info['model']} ({info['flags']}; kernels {info['isa']})"

