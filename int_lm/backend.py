"""Backend-specific details in one place: what the machine offers, and (later) the
CPU-only XLA workarounds.

The rest of the package describes the integer model and EGGROLL; whatever depends
on which CPU or accelerator runs them lives here, so that a reader of the model
does not have to learn it first. For now this module holds :func:`cpu_flags`: the
CPU's model name and the instruction-set flags that decide how fast int8 GEMMs
and the integer element work run (AVX2, AVX-512, VNNI, AMX; on ARM the dot-product
and int8-matmul extensions). Benchmarks and run metadata record it so every
figure says what it ran on (docs/performance.md keeps one table per CPU kind).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# Flags that bear on integer GEMM and SIMD element-work speed, in the order we report them.
# x86: AVX2 (256-bit integer SIMD), AVX-512 (F: foundation, BW: byte/word ops), VNNI
# (int8 dot-product instructions, in AVX-512 and in the VEX "AVX-VNNI" form), BF16/FP16
# arithmetic, AMX tiles (int8 and bf16 matrix units). ARM: asimddp (int8 dot product),
# i8mm (int8 matrix multiply), SVE/SVE2, bf16.
INT8_GEMM_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16",
)

_MODEL_KEYS = ("model name", "cpu model", "hardware", "processor", "uarch")


def _parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, set of flags) of the first processor block of /proc/cpuinfo text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in _MODEL_KEYS and not model and value and not value.isdigit():
            model = value
    return model, flags


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """What this CPU offers for int8 work, from ``/proc/cpuinfo``.

    Returns ``{"model": name, "arch": machine, "cpus": usable logical CPUs,
    "flags": [the INT8_GEMM_FLAGS present, in that order], "source": path}``.
    Where the file cannot be read (macOS, Windows, a sandbox) ``source`` is None,
    ``flags`` is empty (unknown, not absent) and ``model`` comes from ``platform``.
    """
    arch = platform.machine() or "unknown"
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {"model": platform.processor() or arch, "arch": arch, "cpus": _usable_cpus(), "flags": [],
                "source": None}
    model, present = _parse_cpuinfo(text)
    return {"model": model or platform.processor() or arch, "arch": arch, "cpus": _usable_cpus(),
            "flags": [f for f in INT8_GEMM_FLAGS if f in present], "source": str(cpuinfo)}


def describe_cpu(info: dict | None = None) -> str:
    """One line for logs: ``Intel(R) Xeon(R) Processor, 2 CPUs (x86_64: avx2 avx512f ... amx_int8)``."""
    info = cpu_flags() if info is None else info
    flags = " ".join(info["flags"]) if info["source"] else "flags unknown"
    cpus = f", {info['cpus']} CPUs" if info.get("cpus") else ""
    return f"{info['model']}{cpus} ({info['arch']}: {flags})"
