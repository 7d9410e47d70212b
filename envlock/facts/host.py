"""Facts about the interpreter and the machine, read without any ML framework (DESIGN section 2).

Everything here answers with None where the machine does not say, and never raises: a lock is
still worth writing on a platform whose CPU we cannot name. Parsing is kept apart from reading
(``parse_cpuinfo``, ``parse_sysctl``) so that tests feed text recorded on real machines.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from envlock import proc
from envlock.errors import EnvlockError

log = logging.getLogger("envlock.facts.host")

# CPU features that decide which kernels oneDNN, Eigen, XLA and the BLAS libraries pick, and so
# the bits a float computation produces (FMA fuses a rounding away; AVX-512 and AMX change the
# reduction order and the bf16/int8 paths). Named as Linux names them in /proc/cpuinfo.
X86_NUMERIC_FLAGS = frozenset({
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512dq", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
})
ARM_NUMERIC_FLAGS = frozenset({
    "neon", "asimd", "fphp", "asimdhp", "asimddp", "asimdfhm", "i8mm", "bf16",
    "sve", "sve2", "svebf16", "svei8mm", "sme", "sme2",
})
NUMERIC_FLAGS = X86_NUMERIC_FLAGS | ARM_NUMERIC_FLAGS

# /proc/cpuinfo on ARM names the designer by its MIDR implementer code (as util-linux lscpu).
_ARM_IMPLEMENTERS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu",
    "0x48": "HiSilicon", "0x4e": "NVIDIA", "0x50": "APM", "0x51": "Qualcomm",
    "0x53": "Samsung", "0x61": "Apple", "0x69": "Intel", "0x6d": "Microsoft", "0xc0": "Ampere",
}
# Server and board cores met in practice (util-linux lscpu-arm.c names); others stay None.
_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd49"): "Neoverse-N2", ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x41", "0xd83"): "Neoverse-V3AE", ("0x41", "0xd84"): "Neoverse-V3",
    ("0x41", "0xd8e"): "Neoverse-N3", ("0xc0", "0xac3"): "Ampere-1",
    ("0xc0", "0xac4"): "Ampere-1a", ("0x43", "0x0af"): "ThunderX2",
    ("0x46", "0x001"): "A64FX",
}
# macOS names some Arm features differently from Linux; map them so that a lock taken on a Mac
# compares with one taken on Linux/aarch64.
_APPLE_ARM_FEATURES = {
    "advsimd": "asimd", "feat_fp16": "fphp", "feat_dotprod": "asimddp", "feat_fhm": "asimdfhm",
    "feat_bf16": "bf16", "feat_i8mm": "i8mm", "feat_sme": "sme", "feat_sme2": "sme2",
}
# machdep.cpu.features spells some x86 features differently from /proc/cpuinfo.
_MAC_X86_FEATURES = {"avx1.0": "avx", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "sse3": "pni"}


# ---------------------------------------------------------------------------------------------
# Python


def python_facts() -> dict[str, Any]:
    """The running interpreter: version, implementation, ABI, where it lives, venv/conda."""
    soabi = sysconfig.get_config_var("SOABI")
    if not soabi:
        # Windows CPython before 3.13 has no SOABI; EXT_SUFFIX (".cp311-win_amd64.pyd") says it.
        ext = sysconfig.get_config_var("EXT_SUFFIX") or ""
        soabi = ext.strip(".").rsplit(".", 1)[0] or None
    return {
        "version": platform.python_version(),
        "implementation": sys.implementation.name,
        "abi": soabi,
        "abiflags": getattr(sys, "abiflags", ""),
        "cache_tag": sys.implementation.cache_tag,
        "executable": sys.executable or None,
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "is_venv": sys.prefix != sys.base_prefix,
        "is_conda": (Path(sys.prefix) / "conda-meta").is_dir(),
        "hash_randomization": bool(sys.flags.hash_randomization),
    }


# ---------------------------------------------------------------------------------------------
# Parsing CPU descriptions


def _blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def numeric_flags(flags: Iterable[str]) -> list[str]:
    """The subset of ``flags`` that changes which numeric kernels run (see NUMERIC_FLAGS)."""
    return sorted(NUMERIC_FLAGS.intersection(flags))


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model, vendor and features from the text of ``/proc/cpuinfo`` (x86 or ARM).

    ``flags`` is sorted and taken as the features every processor lists (a kernel chosen on one
    core must run on all of them); ``processors`` counts the processor entries; ``ids`` holds the
    raw identification (x86 family/model/stepping, ARM implementer/part), which names the
    microarchitecture where "model name" is generic (a VM's "AMD EPYC") or absent (aarch64).
    """
    blocks = _blocks(text)
    cpus = [b for b in blocks if "processor" in b]
    first = cpus[0] if cpus else (blocks[0] if blocks else {})

    flag_sets = [set(b.get("flags", b.get("features", "")).split()) for b in cpus or blocks]
    flag_sets = [s for s in flag_sets if s]
    flags = sorted(set.intersection(*flag_sets)) if flag_sets else []

    model = first.get("model name") or first.get("cpu model") or None
    vendor = first.get("vendor_id") or first.get("vendor") or None
    ids: dict[str, str] = {}
    if "cpu implementer" in first:
        implementer = first["cpu implementer"].lower()
        part = first.get("cpu part", "").lower()
        ids = {k: first[k] for k in ("cpu implementer", "cpu part", "cpu variant", "cpu revision")
               if k in first}
        vendor = vendor or _ARM_IMPLEMENTERS.get(implementer)
        model = model or _ARM_PARTS.get((implementer, part))
    else:
        ids = {k: first[k] for k in ("cpu family", "model", "stepping") if k in first}
    return {
        "model": model,
        "vendor": vendor,
        "processors": len(cpus) or None,
        "flags": flags,
        "numeric_flags": numeric_flags(flags),
        "ids": ids,
    }


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl name ...`` output ("name: value" per line) as a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


def cpu_from_sysctl(values: Mapping[str, str]) -> dict[str, Any]:
    """Model, vendor and features of a Mac from its sysctl values (Intel or Apple silicon)."""
    brand = values.get("machdep.cpu.brand_string") or None
    vendor = values.get("machdep.cpu.vendor") or None
    if vendor is None and brand and brand.startswith("Apple"):
        vendor = "Apple"
    flags: set[str] = set()
    for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures"):
        for word in values.get(key, "").split():
            name = word.lower()
            flags.add(_MAC_X86_FEATURES.get(name, name.replace(".", "_")))
    for key, value in values.items():
        # hw.optional.* entries that are plain booleans; counts (watchpoint: 4) are not features.
        if key.startswith("hw.optional.") and value == "1":
            name = key[len("hw.optional."):].lower()
            name = name[len("arm."):] if name.startswith("arm.") else name
            flags.add(_APPLE_ARM_FEATURES.get(name, name.removeprefix("feat_")))
    if "neon" in flags:
        flags.add("asimd")
    ids = {k: values[k] for k in ("machdep.cpu.family", "machdep.cpu.model", "hw.cpufamily")
           if k in values}
    cores = values.get("hw.logicalcpu") or values.get("hw.ncpu")
    return {
        "model": brand,
        "vendor": vendor,
        "processors": int(cores) if cores and cores.isdigit() else None,
        "flags": sorted(flags),
        "numeric_flags": numeric_flags(flags),
        "ids": ids,
    }


# ---------------------------------------------------------------------------------------------
# Reading


_SYSCTL_KEYS = (
    "machdep.cpu.brand_string", "machdep.cpu.vendor", "machdep.cpu.family", "machdep.cpu.model",
    "machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures",
    "hw.cpufamily", "hw.logicalcpu", "hw.optional",
)


def find_sysctl() -> Path | None:
    """macOS sysctl: /usr/sbin (not on a non-admin PATH), then PATH."""
    for cand in (Path("/usr/sbin/sysctl"), Path("/sbin/sysctl")):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("sysctl")
    return Path(found) if found else None


def macos_cpu_facts(sysctl: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """CPU facts on macOS from ``sysctl``; None when sysctl cannot be run."""
    exe = sysctl or find_sysctl()
    if exe is None:
        return None
    try:
        # Keys a given Mac lacks (machdep.cpu.vendor on Apple silicon) only make sysctl exit 1
        # after printing the others, so the output is used whatever the exit status.
        done = proc.run([exe, *_SYSCTL_KEYS], check=False, timeout=15)
    except EnvlockError as exc:
        log.debug("sysctl failed: %s", exc)
        return None
    values = parse_sysctl(done.stdout)
    return cpu_from_sysctl(values) if values else None


def _windows_cpu_model() -> str | None:
    if sys.platform != "win32":
        return None
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE,
                            r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as key:
            return str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip() or None
    except OSError:
        return None


def _read_text(path: str | os.PathLike[str]) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _usable_cores() -> int | None:
    # The cores this process may run on (a container's cpuset, taskset): what thread pools size to.
    getaff = getattr(os, "sched_getaffinity", None)
    if getaff is None:
        return None
    try:
        return len(getaff(0))
    except OSError:
        return None


def _libc() -> dict[str, str | None] | None:
    name, version = platform.libc_ver()
    if name:
        return {"name": name, "version": version or None}
    tag = _platform_tag()
    if tag and tag.startswith("musllinux_"):
        major, minor = tag.split("_")[1:3]
        return {"name": "musl", "version": f"{major}.{minor}"}
    return None


def _platform_tag() -> str | None:
    """The most specific wheel platform tag this interpreter accepts (manylinux_2_36_x86_64)."""
    try:
        from packaging import tags

        all_tags = list(tags.platform_tags())
    except Exception as exc:  # packaging cannot tell on an exotic platform; the tag is optional
        log.debug("platform tags unavailable: %s", exc)
        return None
    # On Linux the plain "linux_x86_64" comes first, but the compatibility that matters for
    # wheels is the newest manylinux/musllinux tag.
    for tag in all_tags:
        if tag.startswith(("manylinux_", "musllinux_")):
            return tag
    return all_tags[0] if all_tags else None


def _cpu_facts(system: str, cpuinfo_path: str | os.PathLike[str]) -> dict[str, Any]:
    cpu: dict[str, Any] = {
        "model": None, "vendor": None, "processors": None, "flags": None,
        "numeric_flags": None, "ids": {},
    }
    parsed: dict[str, Any] | None = None
    if system == "darwin":
        parsed = macos_cpu_facts()
    else:
        text = _read_text(cpuinfo_path)
        if text:
            parsed = parse_cpuinfo(text)
    if parsed:
        cpu.update(parsed)
    if cpu["model"] is None and system == "windows":
        # No cpuinfo on Windows; platform.processor() ("Intel64 Family 6 Model 85 ...") is the
        # fallback when the registry does not answer.
        cpu["model"] = _windows_cpu_model() or platform.processor() or None
    cpu["logical_cores"] = os.cpu_count()
    cpu["usable_cores"] = _usable_cores()
    return cpu


def platform_facts(*, cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> dict[str, Any]:
    """The operating system, C library, wheel platform tag and CPU of this machine.

    ``cpu`` holds ``model``, ``vendor``, ``flags`` (sorted), ``numeric_flags`` (those that change
    float results), ``ids``, ``processors`` (entries in cpuinfo), ``logical_cores``
    (``os.cpu_count``) and ``usable_cores`` (this process's affinity). Never raises.
    """
    system = platform.system().lower()
    facts: dict[str, Any] = {
        "os": system or None,
        "release": platform.release() or None,
        "machine": platform.machine() or None,
        "libc": None,
        "platform_tag": None,
        "cpu": None,
    }
    for key, fn in (("libc", _libc), ("platform_tag", _platform_tag)):
        try:
            facts[key] = fn()
        except Exception as exc:  # an odd platform answers None, never an exception
            log.debug("%s unavailable: %s", key, exc)
    try:
        facts["cpu"] = _cpu_facts(system, cpuinfo_path)
    except Exception as exc:  # as above
        log.debug("cpu facts unavailable: %s", exc)
    return facts
