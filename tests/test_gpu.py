"""GPU facts: nvidia-smi parsing and discovery, the NVML path, the CUDA environment.

No GPU exists where these tests run, so every nvidia-smi answer is text recorded on a real
machine (tests/data/gpu/SOURCES.md says where each came from). The end-to-end tests put an
executable fake ``nvidia-smi`` on PATH that prints those recordings verbatim, so the real
discovery and ``envlock.proc.run`` path is exercised.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from envlock.errors import CommandError, ToolNotFoundError
from envlock.facts import gpu
from envlock.tools import nvidia_smi as smi

DATA = Path(__file__).parent / "data" / "gpu"

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake nvidia-smi is a POSIX shell script")


def recorded(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# parse_query_csv


def test_parse_full_capture_by_header_names_with_units() -> None:
    # 212 columns, units in the header ("memory.total [MiB]") and in the values ("81559 MiB").
    rows = smi.parse_query_csv(recorded("h100-mig-590.48.01.query.csv"))
    assert rows == [{
        "index": "0",
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-00000000-0000-0000-0000-000000000000",
        "pci.bus_id": "00000000:00:09.0",
        "driver_version": "590.48.01",
        "memory.total": "81559",
        "compute_cap": "9.0",
    }]


def test_parse_brackets_and_bare_na_are_no_value() -> None:
    fields = ["utilization.gpu", "display_mode", "fabric.health.summary", "platform.chassis_serial_number",
              "mig.mode.current", "power.draw"]
    (row,) = smi.parse_query_csv(recorded("h100-mig-590.48.01.query.csv"), fields)
    assert row == {
        "utilization.gpu": None,  # [N/A]: MIG mode has no whole-GPU utilisation
        "display_mode": None,  # [Requested functionality has been deprecated]
        "fabric.health.summary": None,  # bare N/A
        "platform.chassis_serial_number": None,  # an empty cell
        "mig.mode.current": "Enabled",
        "power.draw": "71.15",
    }


def test_parse_reordered_columns_two_gpus() -> None:
    rows = smi.parse_query_csv(recorded("titanv-rtx5880-570.86.15.query.csv"))
    assert [(r["index"], r["name"], r["compute_cap"], r["driver_version"]) for r in rows] == [
        ("0", "NVIDIA TITAN V", "7.0", "570.86.15"),
        ("1", "NVIDIA RTX 5880 Ada Generation", "8.9", "570.86.15"),
    ]
    # Columns the query did not include are None, not an error.
    assert rows[0]["uuid"] is None and rows[0]["memory.total"] is None


def test_parse_unified_memory_gpu_reports_no_memory() -> None:
    (row,) = smi.parse_query_csv(recorded("gb10.query.csv"))
    assert row["name"] == "NVIDIA GB10"
    assert row["memory.total"] is None
    (row,) = smi.parse_query_csv(recorded("gb10-580.173.02.query.csv"),
                                 ["memory.total", "utilization.gpu", "power.draw", "temperature.gpu"])
    assert row == {"memory.total": None, "utilization.gpu": "0", "power.draw": "11.17",
                   "temperature.gpu": "35"}


def test_parse_without_header_is_positional() -> None:
    rows = smi.parse_query_csv(recorded("gb10.noheader.csv"),
                               ["memory.used", "memory.total", "utilization.memory"])
    assert rows == [{"memory.used": None, "memory.total": None, "utilization.memory": "0"}]


def test_parse_single_column_header() -> None:
    assert smi.parse_query_csv(recorded("compute_cap-only.csv"), ["compute_cap"]) == [{"compute_cap": "8.9"}]


def test_parse_error_text_gives_no_rows() -> None:
    for name in ("no-driver.txt", "driver-library-mismatch.txt", "compute_cap-invalid.txt"):
        assert smi.parse_query_csv(recorded(name)) == []
    assert smi.parse_query_csv("") == []


def test_invalid_field_is_recognised() -> None:
    assert smi.invalid_field(recorded("compute_cap-invalid.txt")) == "compute_cap"
    assert smi.invalid_field(recorded("no-driver.txt")) is None


# ---------------------------------------------------------------------------------------------
# parse_header


@pytest.mark.parametrize(("name", "expected"), [
    ("h100-sxm-x8-565.57.01.table.txt", ("565.57.01", "565.57.01", "12.7")),
    ("h100-mig-590.48.01.table.txt", ("590.48.01", "590.48.01", "13.1")),
    ("gb10-580.126.09.table.txt", ("580.126.09", "580.126.09", "13.0")),
    ("v100-525.105.17.table.txt", ("525.105.17", "525.105.17", "12.0")),
    ("titanxp-450.57.table.txt", ("450.57", "450.57", "11.0")),
    # In a container the userspace nvidia-smi can be newer than the kernel driver: the driver
    # version is the one that matters, and the two must not be confused.
    ("t4-450.66-driver-418.67.table-excerpt.txt", ("450.66", "418.67", "10.1")),
    # Drivers before R410 print no CUDA version at all.
    ("gtx680x3-331.62.table-excerpt.txt", ("331.62", "331.62", None)),
])
def test_parse_header_of_the_table(name: str, expected: tuple[str | None, ...]) -> None:
    head = smi.parse_header(recorded(name))
    assert (head["nvidia_smi_version"], head["driver_version"], head["cuda_version"]) == expected


def test_parse_header_of_q_output() -> None:
    for name, driver, cuda in (("h100-sxm-x8-565.57.01.q-head.txt", "565.57.01", "12.7"),
                               ("h100-mig-590.48.01.q-head.txt", "590.48.01", "13.1")):
        head = smi.parse_header(recorded(name))
        assert (head["driver_version"], head["cuda_version"]) == (driver, cuda)


def test_parse_header_of_failures_is_empty() -> None:
    for name in ("no-driver.txt", "driver-library-mismatch.txt"):
        assert smi.parse_header(recorded(name)) == {
            "nvidia_smi_version": None, "driver_version": None, "cuda_version": None}


# ---------------------------------------------------------------------------------------------
# A fake nvidia-smi that replays recordings


def make_fake_nvidia_smi(
    directory: Path,
    *,
    table: str | None = None,
    query: str | None = None,
    compute_cap_rejected: bool = False,
    fail: tuple[str, int] | None = None,
) -> Path:
    """An executable ``nvidia-smi`` in ``directory`` that prints recorded files verbatim.

    ``table`` answers plain ``nvidia-smi``; ``query`` answers ``--query-gpu``; with
    ``compute_cap_rejected`` a query naming compute_cap gets the recorded "not a valid field"
    answer (exit 2), as an old driver gives; ``fail`` = (recording, exit status) answers every
    call. Each call's arguments are appended to ``calls.txt``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    calls = directory / "calls.txt"

    def cat(name: str) -> str:
        return f"cat {shlex.quote(str(DATA / name))}"

    lines = ["#!/bin/sh", f'echo "$*" >> {shlex.quote(str(calls))}']
    if fail is not None:
        lines += [cat(fail[0]), f"exit {fail[1]}"]
    else:
        lines.append('case "$1" in')
        if compute_cap_rejected:
            lines.append(f"  --query-gpu=*compute_cap*) {cat('compute_cap-invalid.txt')}; exit 2 ;;")
        if query is not None:
            lines.append(f"  --query-gpu=*) {cat(query)}; exit 0 ;;")
        if table is not None:
            lines.append(f'  "") {cat(table)}; exit 0 ;;')
        lines += ["esac", "echo 'Invalid combination of input arguments.'", "exit 2"]
    exe = directory / "nvidia-smi"
    exe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def calls(exe: Path) -> list[str]:
    path = exe.parent / "calls.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import pynvml` raise ImportError, whatever is installed.
    monkeypatch.setitem(sys.modules, "pynvml", None)


@pytest.fixture
def bare_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A PATH holding only an empty bin dir (plus /bin for the fake's `cat`)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", os.pathsep.join([str(bindir), "/bin", "/usr/bin"]))
    monkeypatch.setattr(smi, "known_places", lambda: [])
    return bindir


H100_MIG_GPU = {
    "index": 0,
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-00000000-0000-0000-0000-000000000000",
    "pci_bus_id": "00000000:00:09.0",
    "compute_capability": "9.0",
    "memory_total_mib": 81559,
}


def test_gpu_facts_through_a_fake_nvidia_smi_on_path(no_nvml: None, bare_path: Path) -> None:
    exe = make_fake_nvidia_smi(bare_path, table="h100-mig-590.48.01.table.txt",
                               query="h100-mig-590.48.01.query.csv")
    facts = gpu.gpu_facts()
    assert facts == {
        "source": "nvidia-smi",
        "driver_version": "590.48.01",
        "cuda_driver_version": "13.1",
        "gpus": [H100_MIG_GPU],
        "error": None,
    }
    # The real command lines went through envlock.proc.run.
    assert calls(exe) == [
        "--query-gpu=index,name,uuid,pci.bus_id,driver_version,memory.total,compute_cap --format=csv,nounits",
        "",
    ]


def test_old_driver_without_compute_cap_is_asked_again(no_nvml: None, bare_path: Path) -> None:
    exe = make_fake_nvidia_smi(bare_path, table="gb10-580.126.09.table.txt", query="gb10.query.csv",
                               compute_cap_rejected=True)
    facts = gpu.gpu_facts()
    assert facts["source"] == "nvidia-smi"
    assert facts["error"] is None
    assert facts["gpus"] == [{"index": 0, "name": "NVIDIA GB10", "uuid": None, "pci_bus_id": None,
                              "compute_capability": None, "memory_total_mib": None}]
    assert facts["cuda_driver_version"] == "13.0"
    assert facts["driver_version"] == "580.126.09"  # not in that CSV: taken from the table header
    first, second = calls(exe)[:2]
    assert "compute_cap" in first and "compute_cap" not in second


@pytest.mark.parametrize(("recording", "status", "message"), [
    ("no-driver.txt", 9, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."),
    ("driver-library-mismatch.txt", 18, "Failed to initialize NVML: Driver/library version mismatch"),
])
def test_failing_nvidia_smi_gives_none_with_its_message(
    no_nvml: None, bare_path: Path, recording: str, status: int, message: str
) -> None:
    make_fake_nvidia_smi(bare_path, fail=(recording, status))
    facts = gpu.gpu_facts()
    assert facts["source"] == "none"
    assert facts["gpus"] == [] and facts["driver_version"] is None
    assert facts["error"] is not None and facts["error"].startswith(message)
    if recording == "driver-library-mismatch.txt":
        assert facts["error"].endswith("NVML library version: 570.124")


def test_query_raises_command_error_with_the_message(bare_path: Path) -> None:
    exe = make_fake_nvidia_smi(bare_path, fail=("no-driver.txt", 9))
    with pytest.raises(CommandError) as info:
        smi.query(exe)
    assert info.value.returncode == 9
    assert "couldn't communicate with the NVIDIA driver" in info.value.stderr_tail


def test_no_nvidia_smi_anywhere(no_nvml: None, bare_path: Path) -> None:
    assert smi.find_nvidia_smi() is None
    assert gpu.gpu_facts() == {"source": "none", "driver_version": None, "cuda_driver_version": None,
                               "gpus": [], "error": None}


# ---------------------------------------------------------------------------------------------
# Discovery


def test_find_prefers_explicit_then_path_then_known_places(tmp_path: Path) -> None:
    explicit = make_fake_nvidia_smi(tmp_path / "explicit", table="v100-525.105.17.table.txt")
    on_path = make_fake_nvidia_smi(tmp_path / "onpath", table="v100-525.105.17.table.txt")
    known = make_fake_nvidia_smi(tmp_path / "known", table="v100-525.105.17.table.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert smi.find_nvidia_smi(explicit, path=str(on_path.parent), places=[str(known)]) == explicit
    assert smi.find_nvidia_smi(path=str(on_path.parent), places=[str(known)]) == on_path
    assert smi.find_nvidia_smi(path=str(empty), places=[str(tmp_path / "nope"), str(known)]) == known
    assert smi.find_nvidia_smi(path=str(empty), places=[]) is None


def test_explicit_path_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nvidia-smi"
    with pytest.raises(ToolNotFoundError) as info:
        smi.find_nvidia_smi(str(missing))
    assert str(missing) in str(info.value)


def test_gpu_facts_with_a_wrong_explicit_path_reports_it(no_nvml: None, tmp_path: Path) -> None:
    facts = gpu.gpu_facts(nvidia_smi=str(tmp_path / "nvidia-smi"))
    assert facts["source"] == "none"
    assert facts["error"] is not None and "nvidia-smi not found" in facts["error"]


def test_explicit_path_is_used_even_when_path_has_none(
    no_nvml: None, bare_path: Path, tmp_path: Path
) -> None:
    exe = make_fake_nvidia_smi(tmp_path / "elsewhere", table="h100-mig-590.48.01.table.txt",
                               query="h100-mig-590.48.01.query.csv")
    facts = gpu.gpu_facts(nvidia_smi=str(exe))
    assert facts["source"] == "nvidia-smi" and facts["gpus"] == [H100_MIG_GPU]


# ---------------------------------------------------------------------------------------------
# NVML


class _Memory:
    def __init__(self, total: int) -> None:
        self.total = total


class _Pci:
    def __init__(self, bus_id: str) -> None:
        self.busId = bus_id


def fake_pynvml(*, init_error: str | None = None, memory_supported: bool = True) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's ``pynvml`` answering what NVML answers on the H100 MIG
    machine of tests/data/gpu/h100-mig-590.48.01.* (its -q, table and query CSV give every value).
    """
    mod = types.ModuleType("pynvml")
    state: dict[str, Any] = {"shutdown": 0}

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):  # named as pynvml names it
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    def nvml_init() -> None:
        if init_error == "library":
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        if init_error == "driver":
            raise NVMLError_DriverNotLoaded("Driver Not Loaded")

    def memory(handle: int) -> _Memory:
        if not memory_supported:
            raise NVMLError("Not Supported")
        return _Memory(81559 * 1024 * 1024)

    def shutdown() -> None:
        state["shutdown"] += 1

    attrs: dict[str, Any] = {
        "NVMLError": NVMLError,
        "NVMLError_LibraryNotFound": NVMLError_LibraryNotFound,
        "NVMLError_DriverNotLoaded": NVMLError_DriverNotLoaded,
        "nvmlInit": nvml_init,
        "nvmlShutdown": shutdown,
        # Old bindings return bytes; the code must accept both.
        "nvmlSystemGetDriverVersion": lambda: b"590.48.01",
        "nvmlSystemGetCudaDriverVersion_v2": lambda: 13010,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: 1000 + i,
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: "GPU-00000000-0000-0000-0000-000000000000",
        "nvmlDeviceGetPciInfo": lambda h: _Pci("00000000:00:09.0"),
        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
        "nvmlDeviceGetMemoryInfo": memory,
        "state": state,
    }
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def test_nvml_is_asked_first_and_agrees_with_nvidia_smi(
    monkeypatch: pytest.MonkeyPatch, bare_path: Path
) -> None:
    exe = make_fake_nvidia_smi(bare_path, table="h100-mig-590.48.01.table.txt",
                               query="h100-mig-590.48.01.query.csv")
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    via_nvml = gpu.gpu_facts()
    assert via_nvml["source"] == "nvml"
    assert calls(exe) == []  # NVML answered; no subprocess
    assert nvml.state["shutdown"] == 1
    monkeypatch.setitem(sys.modules, "pynvml", None)
    via_smi = gpu.gpu_facts()
    assert via_smi["source"] == "nvidia-smi"
    assert {k: v for k, v in via_nvml.items() if k != "source"} == {
        k: v for k, v in via_smi.items() if k != "source"}


def test_nvml_unsupported_memory_is_none(monkeypatch: pytest.MonkeyPatch, bare_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(memory_supported=False))
    facts = gpu.gpu_facts()
    assert facts["source"] == "nvml"
    assert facts["gpus"][0]["memory_total_mib"] is None
    assert facts["gpus"][0]["compute_capability"] == "9.0"


def test_nvml_without_a_driver_falls_back_to_nvidia_smi(
    monkeypatch: pytest.MonkeyPatch, bare_path: Path
) -> None:
    make_fake_nvidia_smi(bare_path, table="h100-mig-590.48.01.table.txt",
                         query="h100-mig-590.48.01.query.csv")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="driver"))
    facts = gpu.gpu_facts()
    assert facts["source"] == "nvidia-smi"
    assert facts["gpus"] == [H100_MIG_GPU]


def test_nvml_library_missing_and_no_nvidia_smi_is_plain_absence(
    monkeypatch: pytest.MonkeyPatch, bare_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="library"))
    assert gpu.gpu_facts()["error"] is None


def test_nvml_driver_not_loaded_and_failing_nvidia_smi_reports_both(
    monkeypatch: pytest.MonkeyPatch, bare_path: Path
) -> None:
    make_fake_nvidia_smi(bare_path, fail=("no-driver.txt", 9))
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="driver"))
    facts = gpu.gpu_facts()
    assert facts["source"] == "none"
    assert facts["error"] is not None
    assert facts["error"].startswith("NVML: Driver Not Loaded; NVIDIA-SMI has failed")


def test_real_pynvml_on_a_machine_without_a_driver(bare_path: Path) -> None:
    """nvidia-ml-py, where installed, on this GPU-less machine: no library, so plain absence."""
    pytest.importorskip("pynvml")
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("this machine has an NVIDIA driver")
    assert gpu.gpu_facts() == {"source": "none", "driver_version": None, "cuda_driver_version": None,
                               "gpus": [], "error": None}


def test_cuda_version_from_int() -> None:
    assert gpu.cuda_version_from_int(12040) == "12.4"
    assert gpu.cuda_version_from_int(13010) == "13.1"
    assert gpu.cuda_version_from_int(11080) == "11.8"
    assert gpu.cuda_version_from_int(0) is None


# ---------------------------------------------------------------------------------------------
# CUDA environment


def test_cuda_env_facts() -> None:
    environ = {
        "CUDA_VISIBLE_DEVICES": "",  # hides every GPU: not the same as unset
        "NVIDIA_VISIBLE_DEVICES": "all",
        "CUDA_HOME": "/usr/local/cuda-12.4",
        "PATH": "/usr/bin",
    }
    # As an inventory lists them (names as the distributions spell them).
    inventory = [
        {"name": "nvidia_cudnn_cu12", "version": "9.3.0.75"},
        {"name": "nvidia-cublas-cu12", "version": "12.5.3.2"},
        {"name": "tensorflow", "version": "2.21.0"},
        {"name": "nvidia-ml-py", "version": "13.615.71"},
    ]
    facts = gpu.cuda_env_facts(environ, inventory)
    assert facts == {
        "cuda_visible_devices": "",
        "nvidia_visible_devices": "all",
        "cuda_device_order": None,
        "nvidia_tf32_override": None,
        "cuda_home": "/usr/local/cuda-12.4",
        "cuda_path": None,
        "nvidia_wheels": {
            "nvidia-cublas-cu12": "12.5.3.2",
            "nvidia-cudnn-cu12": "9.3.0.75",
            "nvidia-ml-py": "13.615.71",
        },
    }
    assert list(facts["nvidia_wheels"]) == sorted(facts["nvidia_wheels"])
    assert gpu.cuda_env_facts({})["nvidia_wheels"] == {}
