"""Which processor a bench ran on: its model name and the instruction sets that pick kernels.

Decode speed on a CPU is set by the vector instructions PyTorch and llama.cpp find at run
time (AVX2, AVX-512, VNNI for int8 dot products, AVX-512 BF16, AMX tiles): two machines
with the same core count can differ several-fold. Every decode result records this
identity, and results from two identities are never merged into one table.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

KERNEL_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
"""/proc/cpuinfo flags that change which matmul kernels run (the rest do not matter here)"""


def cpu_identity(cpuinfo: str | None = None) -> dict:
    """{"model", "flags", "logical_cpus"} of this machine; `cpuinfo` is /proc/cpuinfo's text
    (read here on Linux). Elsewhere the model is platform's answer and the flags are empty."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    model, flags = "", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {
        "model": model or platform.processor() or platform.machine(),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
    }


def describe(identity: dict) -> str:
    flags = ", ".join(identity["flags"]) or "no flags known"
    return f"{identity['model']} ({flags})"


def same_cpu(a: dict, b: dict) -> bool:
    """One processor model with one kernel-relevant instruction set (core counts may differ:
    each result records its own torch threads)."""
    return a["model"] == b["model"] and set(a["flags"]) == set(b["flags"])
