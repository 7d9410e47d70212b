"""Interpreter and machine facts: this machine's real ones, and recorded CPU descriptions.

tests/data/cpuinfo/SOURCES.md says where each recorded file came from.
"""

from __future__ import annotations

import os
import platform
import stat
import sys
import sysconfig
from pathlib import Path

import pytest

from envlock.facts import host

DATA = Path(__file__).parent / "data" / "cpuinfo"


def recorded(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Python


def test_python_facts_describe_this_interpreter() -> None:
    facts = host.python_facts()
    assert set(facts) == {"version", "implementation", "abi", "abiflags", "cache_tag", "executable",
                          "prefix", "base_prefix", "is_venv", "is_conda", "hash_randomization"}
    assert facts["version"] == platform.python_version()
    assert facts["version"].count(".") == 2  # the full version, with the patch level
    assert facts["implementation"] == sys.implementation.name
    assert facts["cache_tag"] == sys.implementation.cache_tag
    if sysconfig.get_config_var("SOABI"):
        assert facts["abi"] == sysconfig.get_config_var("SOABI")
    assert facts["executable"] == sys.executable
    assert facts["prefix"] == sys.prefix and facts["base_prefix"] == sys.base_prefix
    assert facts["is_venv"] is (sys.prefix != sys.base_prefix)
    assert facts["is_conda"] is (Path(sys.prefix) / "conda-meta").is_dir()
    assert facts["hash_randomization"] is bool(sys.flags.hash_randomization)


def test_python_facts_in_the_dev_venv() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("tests not run from a virtual environment")
    facts = host.python_facts()
    assert facts["is_venv"] is True
    assert facts["is_conda"] is False


# ---------------------------------------------------------------------------------------------
# This machine


def _first(path: Path, key: str) -> str | None:
    for line in path.read_text().splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo here")
def test_platform_facts_reads_this_machine() -> None:
    facts = host.platform_facts()
    assert facts["os"] == platform.system().lower() == "linux"
    assert facts["release"] == platform.release()
    assert facts["machine"] == platform.machine()
    cpu = facts["cpu"]
    cpuinfo = Path("/proc/cpuinfo")
    # Compared with /proc/cpuinfo read independently of the parser.
    if _first(cpuinfo, "model name") is not None:
        assert cpu["model"] == _first(cpuinfo, "model name")
    if _first(cpuinfo, "vendor_id") is not None:
        assert cpu["vendor"] == _first(cpuinfo, "vendor_id")
    raw_flags = _first(cpuinfo, "flags") or _first(cpuinfo, "Features") or ""
    assert cpu["flags"] == sorted(set(raw_flags.split()))
    assert set(cpu["numeric_flags"]) <= set(cpu["flags"])
    entries = [ln for ln in cpuinfo.read_text().splitlines() if ln.partition(":")[0].strip() == "processor"]
    assert cpu["processors"] == len(entries)
    assert cpu["logical_cores"] == os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        assert cpu["usable_cores"] == len(os.sched_getaffinity(0))
    libc_name, libc_version = platform.libc_ver()
    if libc_name:
        assert facts["libc"] == {"name": libc_name, "version": libc_version}
        assert facts["platform_tag"].startswith("manylinux_")
    else:
        assert facts["libc"] is None or facts["libc"]["name"] == "musl"


def test_platform_facts_on_x86_64_linux_names_avx() -> None:
    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file():
        pytest.skip("x86_64 Linux only")
    cpu = host.platform_facts()["cpu"]
    # Every x86-64 CPU TensorFlow 2.x wheels run on has AVX.
    assert "avx" in cpu["numeric_flags"]


def test_platform_facts_never_raise_without_cpuinfo(tmp_path: Path) -> None:
    facts = host.platform_facts(cpuinfo_path=tmp_path / "missing")
    if facts["os"] == "linux":
        cpu = facts["cpu"]
        assert cpu["model"] is None and cpu["flags"] is None and cpu["numeric_flags"] is None
        assert cpu["logical_cores"] == os.cpu_count()


@pytest.mark.skipif(platform.system() != "Linux", reason="reads cpuinfo only on Linux")
def test_platform_facts_read_the_given_cpuinfo_file() -> None:
    cpu = host.platform_facts(cpuinfo_path=DATA / "x86_64-intel-xeon-6972p.cpuinfo")["cpu"]
    assert cpu["model"] == "Intel(R) Xeon(R) 6972P"
    assert "amx_bf16" in cpu["numeric_flags"]


# ---------------------------------------------------------------------------------------------
# Recorded /proc/cpuinfo


def test_parse_intel_with_avx512_and_amx() -> None:
    cpu = host.parse_cpuinfo(recorded("x86_64-intel-xeon-6972p.cpuinfo"))
    assert cpu["model"] == "Intel(R) Xeon(R) 6972P"
    assert cpu["vendor"] == "GenuineIntel"
    assert cpu["processors"] == 1
    assert cpu["ids"] == {"cpu family": "6", "model": "173", "stepping": "1"}
    assert len(cpu["flags"]) == len(set(cpu["flags"])) and cpu["flags"] == sorted(cpu["flags"])
    assert "vmx flags" not in cpu["flags"] and "preemption_timer" not in cpu["flags"]
    assert cpu["numeric_flags"] == [
        "amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_fp16",
        "avx512_vnni", "avx512bw", "avx512dq", "avx512f", "avx512vl", "avx_vnni", "f16c", "fma",
        "sse4_1", "sse4_2",
    ]


def test_parse_amd_epyc_in_a_container() -> None:
    cpu = host.parse_cpuinfo(recorded("x86_64-amd-epyc-9754-lxc.cpuinfo"))
    assert cpu["model"] == "AMD EPYC 9754 128-Core Processor"
    assert cpu["vendor"] == "AuthenticAMD"
    assert cpu["processors"] == 8
    assert cpu["ids"] == {"cpu family": "25", "model": "160", "stepping": "2"}
    assert "hypervisor" in cpu["flags"]
    assert cpu["numeric_flags"] == [
        "avx", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512dq", "avx512f", "avx512vl",
        "f16c", "fma", "sse4_1", "sse4_2",
    ]


def test_parse_graviton2_without_a_model_name() -> None:
    cpu = host.parse_cpuinfo(recorded("aarch64-graviton2.cpuinfo"))
    assert cpu["model"] == "Neoverse-N1"
    assert cpu["vendor"] == "ARM"
    assert cpu["processors"] == 1
    assert cpu["ids"] == {"cpu implementer": "0x41", "cpu part": "0xd0c", "cpu variant": "0x3",
                          "cpu revision": "1"}
    assert cpu["flags"][:3] == ["aes", "asimd", "asimddp"]
    assert cpu["numeric_flags"] == ["asimd", "asimddp", "asimdhp", "fphp"]


def test_parse_ampere_and_neoverse_v3ae() -> None:
    ampere = host.parse_cpuinfo(recorded("aarch64-ampere1a.cpuinfo"))
    assert (ampere["vendor"], ampere["model"]) == ("Ampere", "Ampere-1a")
    assert {"bf16", "i8mm"} <= set(ampere["numeric_flags"])
    assert "sve" not in ampere["flags"]
    v3 = host.parse_cpuinfo(recorded("aarch64-neoverse-v3ae.cpuinfo"))
    assert (v3["vendor"], v3["model"]) == ("ARM", "Neoverse-V3AE")
    assert {"sve", "sve2", "svebf16", "svei8mm", "bf16", "i8mm"} <= set(v3["numeric_flags"])


def test_parse_flags_common_to_every_processor() -> None:
    # Two entries of the EPYC recording, the second without avx512f: a kernel chosen on the
    # first core would fault on the second, so avx512f is not a feature of this machine.
    text = recorded("x86_64-amd-epyc-9754-lxc.cpuinfo")
    blocks = text.split("\n\n")
    second = blocks[1].replace(" avx512f ", " ")
    cpu = host.parse_cpuinfo(blocks[0] + "\n\n" + second)
    assert "avx512f" not in cpu["flags"] and "avx512dq" in cpu["flags"]


def test_parse_empty_or_garbage_is_all_none() -> None:
    for text in ("", "\n\n", "no colon here\n"):
        cpu = host.parse_cpuinfo(text)
        assert cpu["model"] is None and cpu["vendor"] is None and cpu["flags"] == []
        assert cpu["processors"] is None


# ---------------------------------------------------------------------------------------------
# Recorded macOS sysctl


def test_sysctl_apple_silicon() -> None:
    cpu = host.cpu_from_sysctl(host.parse_sysctl(recorded("darwin-arm64-m4-max.sysctl")))
    assert cpu["model"] == "Apple M4 Max"
    assert cpu["vendor"] == "Apple"
    assert cpu["processors"] == 16
    # Named as Linux names them, so a Mac lock compares with an aarch64 Linux one.
    assert {"asimd", "neon", "bf16", "i8mm", "asimddp", "fphp", "sme", "sme2"} <= set(cpu["numeric_flags"])
    assert "ebf16" not in cpu["flags"]  # "FEAT_EBF16: 0" is absent, not present
    assert "watchpoint" not in cpu["flags"]  # a count, not a feature


def test_sysctl_intel_mac() -> None:
    cpu = host.cpu_from_sysctl(host.parse_sysctl(recorded("darwin-x86_64-i7-6700k.sysctl")))
    assert cpu["model"] == "Intel(R) Core(TM) i7-6700K CPU @ 4.00GHz"
    assert cpu["vendor"] == "GenuineIntel"
    assert cpu["numeric_flags"] == ["avx", "avx2", "f16c", "fma", "sse4_1", "sse4_2"]


@pytest.mark.skipif(os.name == "nt", reason="the fake sysctl is a POSIX shell script")
def test_macos_cpu_facts_runs_sysctl_through_proc(tmp_path: Path) -> None:
    # A fake sysctl printing the recorded M4 answer verbatim, to exercise envlock.proc.run; it
    # exits 1 as sysctl does when one of the asked keys is unknown on that Mac.
    exe = tmp_path / "sysctl"
    script = f"""#!/bin/sh
echo "$*" > {tmp_path / 'args'}
cat {DATA / 'darwin-arm64-m4-max.sysctl'}
exit 1
"""
    exe.write_text(script, encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    cpu = host.macos_cpu_facts(exe)
    assert cpu is not None and cpu["model"] == "Apple M4 Max"
    assert "machdep.cpu.brand_string" in (tmp_path / "args").read_text()
    assert host.macos_cpu_facts(tmp_path / "missing-sysctl") is None
