"""nvidia-smi: what the NVIDIA driver says about the GPUs, when NVML bindings are not importable.

Driven through its command line only (``--query-gpu`` CSV and the plain table's header line),
never through its internals. Most machines have no NVIDIA GPU, so "not found" is an ordinary
answer here (``None``), not an error; only a path the user gave explicitly fails loudly.

The parsers are pure functions over text so that tests feed them output recorded on real
machines (``tests/data/gpu/``).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from envlock import proc
from envlock.errors import CommandError, ToolNotFoundError

log = logging.getLogger("envlock.tools.nvidia_smi")

# The identity of each GPU, not its load: these do not change between two runs on one machine,
# so a lock taken twice on the same host records the same facts.
QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "name",
    "uuid",
    "pci.bus_id",
    "driver_version",
    "memory.total",
    "compute_cap",
)

# Where drivers put nvidia-smi when it is not on PATH: the Kubernetes device plugin and GKE
# mount the driver at /usr/local/nvidia; WSL2 exposes the Windows driver's Linux build under
# /usr/lib/wsl/lib; DCH drivers on Windows install into System32, older ones into NVSMI.
_POSIX_PLACES = (
    "/usr/bin/nvidia-smi",
    "/usr/local/bin/nvidia-smi",
    "/usr/local/nvidia/bin/nvidia-smi",
    "/usr/lib/wsl/lib/nvidia-smi",
)


def _windows_places() -> list[str]:
    root = os.environ.get("SYSTEMROOT", r"C:\Windows")
    program_files = os.environ.get("PROGRAMFILES", r"C:\Program Files")
    return [
        os.path.join(root, "System32", "nvidia-smi.exe"),
        os.path.join(program_files, "NVIDIA Corporation", "NVSMI", "nvidia-smi.exe"),
    ]


def known_places() -> list[str]:
    """Fixed locations searched after ``PATH``, for this operating system."""
    return _windows_places() if os.name == "nt" else list(_POSIX_PLACES)


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nvidia_smi(
    explicit: str | os.PathLike[str] | None = None,
    *,
    path: str | None = None,
    places: Sequence[str] | None = None,
) -> Path | None:
    """Find nvidia-smi: ``explicit``, then ``PATH``, then the driver's known places.

    Returns None when there is none: a machine without an NVIDIA driver is normal. An
    ``explicit`` path that is not an executable raises :class:`ToolNotFoundError`, because the
    user asked for that one. ``path`` replaces ``$PATH`` and ``places`` the known places (tests).
    """
    if explicit:
        cand = Path(explicit).expanduser()
        if _runnable(cand):
            return cand
        # A bare name such as "nvidia-smi.exe" is looked up on PATH.
        if os.sep not in str(explicit) and (os.altsep is None or os.altsep not in str(explicit)):
            on_path = shutil.which(str(explicit), path=path)
            if on_path:
                return Path(on_path)
        raise ToolNotFoundError(
            "nvidia-smi", [str(explicit)], hint="check the nvidia-smi path you gave"
        )
    on_path = shutil.which("nvidia-smi", path=path)
    if on_path:
        return Path(on_path)
    for place in known_places() if places is None else places:
        cand = Path(place)
        if _runnable(cand):
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# Parsing


_UNIT_IN_HEADER = re.compile(r"^(?P<name>\S+?)\s*\[(?P<unit>[^\]]*)\]$")
_FIELD_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
# nvidia-smi writes every "no value" state in brackets: [N/A], [Not Supported], [Unknown Error],
# [Insufficient Permissions], [Requested functionality has been deprecated], ... Some newer
# fields print a bare N/A. None of these is a value.
_NO_VALUE = {"", "N/A", "Not Supported", "Unknown Error", "ERR!"}


def _header_cell(cell: str) -> tuple[str, str | None]:
    m = _UNIT_IN_HEADER.match(cell)
    if m:
        return m.group("name"), m.group("unit")
    return cell, None


def _looks_like_header(cells: Sequence[str], fields: Sequence[str]) -> bool:
    names = [_header_cell(c)[0] for c in cells]
    return all(_FIELD_NAME.match(n) for n in names) and any(n in fields for n in names)


def clean_value(value: str, unit: str | None = None) -> str | None:
    """One CSV cell as a value: None for nvidia-smi's "no value" markers, unit suffix removed."""
    text = value.strip()
    if text in _NO_VALUE or (text.startswith("[") and text.endswith("]")):
        return None
    if unit and text.endswith(" " + unit):
        text = text[: -len(unit) - 1].rstrip()
    return text or None


def parse_query_csv(text: str, fields: Sequence[str] = QUERY_FIELDS) -> list[dict[str, str | None]]:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`` output.

    With a header line the columns are matched by name, so extra, missing or reordered columns
    are harmless; without one they are taken in the order of ``fields``. Each row maps every
    name in ``fields`` to its value or None ("[N/A]", "[Not Supported]", a column the driver did
    not print). Units ("81559 MiB") are removed. Lines of the wrong width (an error message
    mixed into the output) are skipped.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    # nvidia-smi does not quote; skipinitialspace handles its ", " separator.
    table = list(csv.reader(lines, skipinitialspace=True))
    columns: list[tuple[str, str | None]]
    if _looks_like_header(table[0], fields):
        columns = [_header_cell(c.strip()) for c in table[0]]
        body = table[1:]
    else:
        columns = [(f, None) for f in fields]
        body = table
    rows: list[dict[str, str | None]] = []
    for cells in body:
        if len(cells) != len(columns):
            log.debug("nvidia-smi: skipping a line of %d cells, expected %d", len(cells), len(columns))
            continue
        got = {name: clean_value(cell, unit) for (name, unit), cell in zip(columns, cells)}
        rows.append({f: got.get(f) for f in fields})
    return rows


_SMI_VERSION = re.compile(r"NVIDIA-SMI(?:\s+version)?\s*:?\s*(\d[\w.-]*)", re.IGNORECASE)
_DRIVER_VERSION = re.compile(r"Driver\s+Version\s*:\s*(\d[\w.-]*)", re.IGNORECASE)
_CUDA_VERSION = re.compile(r"CUDA\s+Version\s*:\s*(\d+(?:\.\d+)*)", re.IGNORECASE)


def parse_header(text: str) -> dict[str, str | None]:
    """Versions named by nvidia-smi's plain table header, ``-q`` or ``--version`` output.

    ``cuda_version`` is the newest CUDA the *driver* supports (its libcuda), not a toolkit
    installed on the machine; drivers older than 410 do not print it.
    """

    def first(pattern: re.Pattern[str]) -> str | None:
        m = pattern.search(text)
        return m.group(1) if m else None

    return {
        "nvidia_smi_version": first(_SMI_VERSION),
        "driver_version": first(_DRIVER_VERSION),
        "cuda_version": first(_CUDA_VERSION),
    }


_INVALID_FIELD = re.compile(r'Field\s+"([^"]+)"\s+is not a valid field to query', re.IGNORECASE)


def invalid_field(output: str) -> str | None:
    """The field an old driver rejected ('Field "compute_cap" is not a valid field to query.')."""
    m = _INVALID_FIELD.search(output)
    return m.group(1) if m else None


def failure_message(output: str) -> str:
    """nvidia-smi's own explanation of a failure, on one line."""
    return " ".join(ln.strip() for ln in output.splitlines() if ln.strip())


# ---------------------------------------------------------------------------------------------
# Running


def _run(argv: Sequence[str | os.PathLike[str]], timeout: float) -> proc.Completed:
    return proc.run(argv, check=False, timeout=timeout, what="nvidia-smi")


def _fail(done: proc.Completed, what: str) -> CommandError:
    # nvidia-smi prints its errors on stdout; keep whichever stream has them.
    output = "\n".join(s for s in (done.stderr.strip(), done.stdout.strip()) if s)
    return CommandError(done.argv, done.returncode, output, what=what)


def query(
    path: str | os.PathLike[str],
    *,
    fields: Iterable[str] = QUERY_FIELDS,
    timeout: float = 30.0,
) -> list[dict[str, str | None]]:
    """Ask nvidia-smi for ``fields`` of every GPU; one dict per GPU, values as text or None.

    A field an old driver does not know (``compute_cap`` before R510) is dropped and the query
    repeated; it comes back as None. A failing nvidia-smi (no driver loaded, driver/library
    version mismatch, timeout) raises :class:`CommandError` whose ``stderr_tail`` holds
    nvidia-smi's own message.
    """
    wanted = list(fields)
    asked = list(wanted)
    while True:
        # The header is kept (no "noheader"): it names the columns nvidia-smi actually printed,
        # so a driver that reorders or drops one cannot shift a value under the wrong key.
        argv = [os.fspath(path), f"--query-gpu={','.join(asked)}", "--format=csv,nounits"]
        done = _run(argv, timeout)
        if done.returncode == 0:
            return [{f: row.get(f) for f in wanted} for row in parse_query_csv(done.stdout, asked)]
        rejected = invalid_field(done.stdout + "\n" + done.stderr)
        if rejected in asked and len(asked) > 1:
            log.debug("nvidia-smi does not know field %r; asking again without it", rejected)
            asked.remove(rejected)
            continue
        raise _fail(done, "nvidia-smi could not query the GPUs")


def header(path: str | os.PathLike[str], *, timeout: float = 30.0) -> dict[str, str | None]:
    """The driver and CUDA driver versions from the plain ``nvidia-smi`` table (any driver)."""
    # Plain `nvidia-smi`, not `--version`: drivers before R525 do not know --version, and only the
    # table names the CUDA version on every driver since R410.
    done = _run([os.fspath(path)], timeout)
    if done.returncode != 0:
        raise _fail(done, "nvidia-smi failed")
    return parse_header(done.stdout)
