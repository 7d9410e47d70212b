"""GPU and CUDA facts for the manifest (DESIGN section 2), read without any ML framework.

NVML (the ``pynvml`` module of the ``nvidia-ml-py`` package) is asked first when it can be
imported: it is the library nvidia-smi itself is built on, and answers without a subprocess.
nvidia-smi is the fallback. Neither being present is the normal case on a CPU-only machine.

Nothing here raises: a broken driver is a fact about the machine worth recording, not a reason
for ``envlock save`` to fail, so failures come back as ``source: "none"`` with ``error`` set.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, TypeVar

from packaging.utils import canonicalize_name

from envlock.errors import CommandError, EnvlockError
from envlock.tools import nvidia_smi as smi

log = logging.getLogger("envlock.facts.gpu")

T = TypeVar("T")

GPU_KEYS = ("index", "name", "uuid", "pci_bus_id", "compute_capability", "memory_total_mib")

_MIB = 1024 * 1024


def _empty(source: str = "none", error: str | None = None) -> dict[str, Any]:
    return {
        "source": source,
        "driver_version": None,
        "cuda_driver_version": None,
        "gpus": [],
        "error": error,
    }


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def cuda_version_from_int(value: int | None) -> str | None:
    """NVML's CUDA driver version integer (12040) as nvidia-smi prints it ("12.4")."""
    if not value or value < 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


# ---------------------------------------------------------------------------------------------
# NVML


def _text(value: object) -> str | None:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _nvml_facts(nvml: ModuleType) -> dict[str, Any]:
    """Facts from NVML. Raises ``nvml.NVMLError`` if NVML cannot start."""
    error_type: type[BaseException] = getattr(nvml, "NVMLError", Exception)

    def ask(fn: Callable[..., T] | None, *args: object) -> T | None:
        # One unsupported query (memory on a GB10 with unified memory, compute capability on an
        # old driver) must not cost the other facts.
        if fn is None:  # a binding too old to have this function
            return None
        try:
            return fn(*args)
        except (error_type, AttributeError, OSError) as exc:
            log.debug("NVML query failed: %s", exc)
            return None

    nvml.nvmlInit()
    try:
        facts = _empty("nvml")
        facts["driver_version"] = _text(ask(nvml.nvmlSystemGetDriverVersion))
        cuda = ask(getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None))
        if cuda is None:
            cuda = ask(getattr(nvml, "nvmlSystemGetCudaDriverVersion", None))
        facts["cuda_driver_version"] = cuda_version_from_int(cuda)
        count = nvml.nvmlDeviceGetCount()
        for index in range(count):
            handle = ask(nvml.nvmlDeviceGetHandleByIndex, index)
            gpu: dict[str, Any] = dict.fromkeys(GPU_KEYS)
            gpu["index"] = index
            if handle is not None:
                gpu["name"] = _text(ask(nvml.nvmlDeviceGetName, handle))
                gpu["uuid"] = _text(ask(nvml.nvmlDeviceGetUUID, handle))
                pci = ask(nvml.nvmlDeviceGetPciInfo, handle)
                gpu["pci_bus_id"] = _text(getattr(pci, "busId", None))
                cc = ask(getattr(nvml, "nvmlDeviceGetCudaComputeCapability", None), handle)
                if cc is not None:
                    gpu["compute_capability"] = f"{cc[0]}.{cc[1]}"
                mem = ask(nvml.nvmlDeviceGetMemoryInfo, handle)
                total = getattr(mem, "total", None)
                gpu["memory_total_mib"] = int(total) // _MIB if total else None
            facts["gpus"].append(gpu)
        return facts
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:  # a failed shutdown must not hide the facts already read
            log.debug("nvmlShutdown failed: %s", exc)


def _nvml_is_absent(exc: BaseException, nvml: ModuleType) -> bool:
    """True when NVML failed only because no NVIDIA driver is installed at all."""
    not_found = getattr(nvml, "NVMLError_LibraryNotFound", None)
    return isinstance(not_found, type) and isinstance(exc, not_found)


# ---------------------------------------------------------------------------------------------
# nvidia-smi


def gpus_from_rows(rows: Iterable[Mapping[str, str | None]]) -> list[dict[str, Any]]:
    """``envlock.tools.nvidia_smi.query`` rows in the manifest's GPU shape."""
    gpus = []
    for row in rows:
        gpus.append({
            "index": _int(row.get("index")),
            "name": row.get("name"),
            "uuid": row.get("uuid"),
            "pci_bus_id": row.get("pci.bus_id"),
            "compute_capability": row.get("compute_cap"),
            "memory_total_mib": _int(row.get("memory.total")),
        })
    return gpus


def _smi_facts(path: os.PathLike[str] | str) -> dict[str, Any]:
    """Facts from nvidia-smi. Raises CommandError when nvidia-smi fails."""
    rows = smi.query(path)
    facts = _empty("nvidia-smi")
    facts["gpus"] = gpus_from_rows(rows)
    facts["driver_version"] = next((r["driver_version"] for r in rows if r.get("driver_version")), None)
    try:
        head = smi.header(path)
    except CommandError as exc:
        log.debug("nvidia-smi header failed: %s", exc)
    else:
        facts["cuda_driver_version"] = head["cuda_version"]
        facts["driver_version"] = facts["driver_version"] or head["driver_version"]
    return facts


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CommandError):
        return smi.failure_message(exc.stderr_tail) or str(exc)
    return str(exc) or type(exc).__name__


def gpu_facts(*, nvidia_smi: str | None = None) -> dict[str, Any]:
    """What the NVIDIA driver reports about this machine's GPUs.

    Returns ``{"source": "nvml" | "nvidia-smi" | "none", "driver_version", "cuda_driver_version",
    "gpus": [{"index", "name", "uuid", "pci_bus_id", "compute_capability", "memory_total_mib"}],
    "error"}``. ``cuda_driver_version`` is the newest CUDA the driver supports. ``nvidia_smi`` is
    an explicit path to the executable. Never raises.
    """
    errors: list[str] = []
    try:
        return _gpu_facts(nvidia_smi, errors)
    except Exception as exc:  # facts gathering must never break a save; record what went wrong
        log.debug("gpu facts failed", exc_info=True)
        errors.append(_error_text(exc))
        return _empty(error="; ".join(errors))


def _gpu_facts(explicit: str | None, errors: list[str]) -> dict[str, Any]:
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        nvml = None
    if nvml is not None:
        try:
            return _nvml_facts(nvml)
        except Exception as exc:  # NVMLError, or a broken binding: fall back to nvidia-smi
            if not _nvml_is_absent(exc, nvml):
                errors.append(f"NVML: {_error_text(exc)}")
            log.debug("NVML unavailable: %s", exc)

    try:
        path = smi.find_nvidia_smi(explicit)
    except EnvlockError as exc:
        errors.append(str(exc))
        return _empty(error="; ".join(errors))
    if path is None:
        return _empty(error="; ".join(errors) or None)
    try:
        return _smi_facts(path)
    except CommandError as exc:
        errors.append(_error_text(exc))
        return _empty(error="; ".join(errors))


# ---------------------------------------------------------------------------------------------
# CUDA environment

# Variables that decide which GPUs a process sees, in which order, and whether float32 matmuls
# run as TF32: each can change predictions on the same hardware.
_CUDA_ENV = {
    "cuda_visible_devices": "CUDA_VISIBLE_DEVICES",
    "nvidia_visible_devices": "NVIDIA_VISIBLE_DEVICES",
    "cuda_device_order": "CUDA_DEVICE_ORDER",
    "nvidia_tf32_override": "NVIDIA_TF32_OVERRIDE",
    "cuda_home": "CUDA_HOME",
    "cuda_path": "CUDA_PATH",
}


def cuda_env_facts(
    environ: Mapping[str, str], inventory: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """CUDA-related environment variables and the installed ``nvidia-*`` wheels.

    A variable that is unset is None; set but empty stays "" (``CUDA_VISIBLE_DEVICES=""``
    hides every GPU, which is not the same as unset). ``inventory`` is the installed
    distributions as ``{"name", "version"}`` dicts; ``nvidia_wheels`` maps each canonical
    ``nvidia-*`` name (nvidia-cudnn-cu12, nvidia-cublas-cu12, ...) to its version.
    """
    facts: dict[str, Any] = {key: environ.get(var) for key, var in _CUDA_ENV.items()}
    wheels: dict[str, str] = {}
    for dist in inventory:
        name = canonicalize_name(str(dist.get("name") or ""))
        if name.startswith("nvidia-"):
            wheels[name] = str(dist.get("version") or "")
    facts["nvidia_wheels"] = dict(sorted(wheels.items()))
    return facts
