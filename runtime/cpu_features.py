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


# -- identity: which CPU this is (benchmark rows name their machine by it) ----------------------------
SYS_CPU = Path("/sys/devices/system/cpu")
# The instruction sets a benchmark row records: those that change inference kernels and precisions
# (x86: AVX2/FMA, AVX-512 and its VNNI/BF16/FP16 parts, AVX-VNNI, AMX; Arm: NEON, SVE, BF16, I8MM).
IDENTITY_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)
VENDORS = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel", "HygonGenuine": "Hygon"}
UNKNOWN = "unknown"

# AMD family -> (first model, last model, microarchitecture), from Linux's bsp_init_amd (arch/x86/kernel/cpu/amd.c).
_AMD = {
    0x17: ((0x00, 0x2F, "Zen"), (0x50, 0x5F, "Zen"), (0x30, 0x4F, "Zen 2"), (0x60, 0x7F, "Zen 2"),
           (0x90, 0x91, "Zen 2"), (0xA0, 0xAF, "Zen 2")),
    0x19: ((0x00, 0x0F, "Zen 3"), (0x20, 0x5F, "Zen 3"), (0x10, 0x1F, "Zen 4"), (0x60, 0xAF, "Zen 4")),
    0x1A: ((0x50, 0x5F, "Zen 6"), (0x80, 0xAF, "Zen 6"), (0xC0, 0xCF, "Zen 6"), (0x00, 0xFF, "Zen 5")),
}  # fmt: skip
# Intel family 6 models (Linux's arch/x86/include/asm/intel-family.h): the common server and client cores.
_INTEL6 = {
    0x3C: "Haswell", 0x3F: "Haswell", 0x45: "Haswell", 0x46: "Haswell",
    0x3D: "Broadwell", 0x47: "Broadwell", 0x4F: "Broadwell", 0x56: "Broadwell",
    0x4E: "Skylake", 0x5E: "Skylake", 0x55: "Skylake",  # 0x55: Skylake-SP, Cascade or Cooper Lake by stepping
    0x8E: "Kaby Lake", 0x9E: "Kaby Lake", 0xA5: "Comet Lake", 0xA6: "Comet Lake",
    0x6A: "Ice Lake", 0x6C: "Ice Lake", 0x7D: "Ice Lake", 0x7E: "Ice Lake", 0x8C: "Tiger Lake", 0x8D: "Tiger Lake",
    0xA7: "Rocket Lake", 0x8F: "Sapphire Rapids", 0xCF: "Emerald Rapids", 0xAD: "Granite Rapids",
    0xAE: "Granite Rapids", 0xAF: "Sierra Forest", 0x97: "Alder Lake", 0x9A: "Alder Lake", 0xB7: "Raptor Lake",
    0xBA: "Raptor Lake", 0xBF: "Raptor Lake", 0xAA: "Meteor Lake", 0xAC: "Meteor Lake", 0xC5: "Arrow Lake",
    0xC6: "Arrow Lake", 0xB5: "Arrow Lake", 0xBD: "Lunar Lake",
}  # fmt: skip
# Arm (implementer, part) -> core, for the server cores in common clouds (Graviton, Ampere Altra, Cobalt, Grace).
_ARM = {
    (0x41, 0xD08): "Cortex-A72", (0x41, 0xD0C): "Neoverse N1", (0x41, 0xD40): "Neoverse V1",
    (0x41, 0xD49): "Neoverse N2", (0x41, 0xD4F): "Neoverse V2", (0x41, 0xD8E): "Neoverse N3",
    (0x41, 0xD84): "Neoverse V3", (0xC0, 0xAC3): "AmpereOne", (0xC0, 0xAC4): "AmpereOne",
}  # fmt: skip


def microarchitecture(vendor: str, family: int | None, model: int | None, stepping: int | None = None) -> str:
    """The core's design ("Zen 4", "Sapphire Rapids", "Neoverse V1", ...) from the CPUID family/model (Arm:
    implementer/part in ``family``/``model``), or "unknown" for what the tables do not hold."""
    if family is None or model is None:
        return UNKNOWN
    if vendor in ("AMD", "AuthenticAMD"):
        return next((name for lo, hi, name in _AMD.get(family, ()) if lo <= model <= hi), UNKNOWN)
    if vendor in ("Intel", "GenuineIntel") and family == 6:
        name = _INTEL6.get(model, UNKNOWN)
        if model == 0x55 and stepping is not None:
            name = "Cooper Lake" if stepping >= 10 else "Cascade Lake" if stepping >= 5 else "Skylake"
        return name
    return _ARM.get((family, model), UNKNOWN)


# Intel cores that have AMX; a hypervisor may report another model number (a KVM guest on an AMX Xeon was seen
# reporting family 6 model 0xA7, Rocket Lake, a client core without AMX or AVX-512 FP16).
AMX_CORES = ("Sapphire Rapids", "Emerald Rapids", "Granite Rapids")
AMX_UNNAMED = "AMX Xeon (model number hidden)"


def _consistent(name: str, vendor: str, flags: set[str]) -> str:
    """The table's name, unless the CPU's flags contradict it: an Intel core with AMX is a Xeon of the
    AMX generations whatever model number the hypervisor passes on."""
    if vendor == "Intel" and "amx_tile" in flags and name not in AMX_CORES:
        return AMX_UNNAMED
    return name


def cpuinfo_fields(text: str) -> dict[str, str]:
    """``key: value`` of a /proc/cpuinfo text, each key's first occurrence (the first processor's; on
    Arm also the lines after the per-processor blocks)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _int(text: str | None, base: int = 10) -> int | None:
    try:
        return int(text, base) if text else None
    except ValueError:
        return None


def parse_identity(text: str) -> dict:
    """What a /proc/cpuinfo text says the CPU is: vendor, model name, family/model/stepping (Arm:
    implementer/part/variant), microarchitecture, the IDENTITY_FLAGS it has (in that order), logical
    CPUs online, threads per core, and the clock the kernel reports now (``mhz``: volatile)."""
    f = cpuinfo_fields(text)
    flags = set((f.get("flags") or f.get("Features") or "").split())
    if "vendor_id" in f:  # x86
        vendor = VENDORS.get(f["vendor_id"], f["vendor_id"])
        family, model, stepping = _int(f.get("cpu family")), _int(f.get("model")), _int(f.get("stepping"))
    else:  # Arm: "CPU implementer : 0x41", "CPU part : 0xd40"
        family, model = _int(f.get("CPU implementer"), 16), _int(f.get("CPU part"), 16)
        stepping = _int(f.get("CPU variant"), 16)
        vendor = {0x41: "Arm", 0xC0: "Ampere", 0x61: "Apple"}.get(family or -1, f.get("CPU implementer", UNKNOWN))
    siblings, cores = _int(f.get("siblings")), _int(f.get("cpu cores"))
    mhz = f.get("cpu MHz")
    try:
        clock = round(float(mhz), 1) if mhz else None
    except ValueError:
        clock = None
    return {
        "vendor": vendor,
        "model_name": f.get("model name") or f.get("Model") or UNKNOWN,
        "family": family,
        "model": model,
        "stepping": stepping,
        "microarchitecture": _consistent(microarchitecture(vendor, family, model, stepping), vendor, flags),
        "features": [flag for flag in IDENTITY_FLAGS if flag in flags],
        "logical_cpus": sum(1 for line in text.splitlines() if line.partition(":")[0].strip() == "processor") or None,
        "threads_per_core": siblings // cores if siblings and cores else None,
        "mhz": clock,
        "hypervisor": "hypervisor" in flags,
    }


def cpu_identity(cpuinfo: Path = CPUINFO) -> dict:
    """``parse_identity`` of this machine's /proc/cpuinfo; every field unknown (None, "unknown", no
    features) where it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    return parse_identity(text)


def max_mhz(sys_cpu: Path = SYS_CPU) -> float | None:
    """The CPU's highest clock as cpufreq reports it (``cpu0/cpufreq/cpuinfo_max_freq``, kHz), in MHz:
    a property of the part, unlike /proc/cpuinfo's current MHz. None without cpufreq (most VMs)."""
    try:
        return round(int((sys_cpu / "cpu0" / "cpufreq" / "cpuinfo_max_freq").read_text().strip()) / 1000, 1)
    except (OSError, ValueError):
        return None
