"""What this CPU can do, read from ``/proc/cpuinfo``: for reports that say why a precision is unavailable.

The backends decide from their own libraries' view (OpenVINO's ``OPTIMIZATION_CAPABILITIES``); these
flags are the kernel's, which is what a person compares against a CPU's spec sheet. Outside Linux
there is no ``/proc/cpuinfo`` and every answer is empty.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The instruction sets that decide the speed and the precisions of CPU inference.
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "avx_vnni")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str:
    """The value of the first ``name : value`` line (the first core's), or "" when absent or unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return ""


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The instruction-set flags the kernel reports (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    return set((_cpuinfo_field("flags", cpuinfo) or _cpuinfo_field("Features", cpuinfo)).split())


def has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Native bfloat16 arithmetic (AVX-512 BF16 or AMX BF16)."""
    return bool(cpu_flags(cpuinfo) & set(BF16_FLAGS))


def cpu_summary(cpuinfo: Path = CPUINFO) -> dict:
    """Model name and whether each notable flag is present, e.g. ``{"model": ..., "flags": {"avx2": True, ...}}``."""
    flags = cpu_flags(cpuinfo)
    return {
        "model": _cpuinfo_field("model name", cpuinfo) or "unknown",
        "flags": {flag: flag in flags for flag in NOTABLE_FLAGS},
    }
