"""Guards on the user's files: checked before the expensive work, not found after it.

Every command that writes calls :func:`guard_output` for each destination, with the paths it
reads (the model, its sidecar, its inputs): envlock never writes over its inputs (README, "What
envlock never does"). :func:`check_readable` and :func:`check_writable_dir` turn what would be
an ``OSError`` after a minute of work into one line at the start, naming the path as the user
gave it. :func:`describe_os_error` is the one wording of an ``OSError`` that still escapes.
:func:`atomic_write` is the one way envlock writes a file that others may read meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from envlock.errors import BadInputError, OutputConflictError
from envlock.settings import Settings


def os_reason(exc: OSError) -> str:
    """Why an OSError happened, in words (no ``[Errno 13]``)."""
    reason = exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or str(exc)
    return reason[0].lower() + reason[1:] if reason else "failed"


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` for an OSError."""
    reason = os_reason(exc)
    if exc.filename is not None and exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


def atomic_write(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Write ``data`` (text as UTF-8, newlines as given) to ``path`` all or nothing: a temporary
    file in the same folder, renamed over ``path``. A reader sees the old file or the new one,
    never a part; a failure (or Ctrl-C) leaves no temporary file behind. Missing parent folders
    are created. The file is private (0600) unless ``mode`` says otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _why_missing(path: Path) -> str:
    """Not just "no such file": a dangling or looping link, or a missing parent, says so."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "a symbolic link loop"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "a symbolic link loop"
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return "no such file or directory"


def check_readable(path: Path, what: str, *, folder_ok: bool = False) -> None:
    """``path`` exists, is a file (or a folder when ``folder_ok``), and can be opened."""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInputError(f"{path}: {what} is a symbolic link loop") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BadInputError(f"{path}: {what}: {_why_missing(path)}") from None
        raise BadInputError(f"{what} {describe_os_error(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        if not folder_ok:
            raise BadInputError(f"{path}: {what} is a folder, not a file")
        if not os.access(path, os.R_OK | os.X_OK):
            raise BadInputError(f"{path}: {what} is a folder that cannot be read (permission denied)")
        try:
            next(os.scandir(path), None)
        except OSError as exc:
            raise BadInputError(f"{what} {describe_os_error(exc)}") from None
        return
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"{path}: {what} is not a regular file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise BadInputError(f"{path}: {what} cannot be read ({os_reason(exc)})") from None


def check_writable_dir(folder: Path, what: str) -> None:
    """A file can be created in ``folder``."""
    if not folder.exists():
        raise BadInputError(f"{what}: the folder {folder} does not exist",
                            hint="create it first, or pass another path")
    if not folder.is_dir():
        raise BadInputError(f"{what}: {folder} is not a folder")
    # access(2) asks the kernel with this process's capabilities: root with CAP_DAC_OVERRIDE may
    # write anywhere (and is told so), a read-only mount answers EROFS. Nothing is created.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"{what}: cannot write in {folder} (permission denied or read-only)")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.absolute() == b.absolute() or os.path.realpath(a) == os.path.realpath(b)


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(folder)))


def guard_output(output: Path, *, model: Path | None = None, sidecar: Path | None = None,
                 inputs: Iterable[Path] = (), flag: str = "--output", make_parent: bool = False) -> None:
    """Refuse (exit 2) an output that is a folder, or any file this command reads from.

    Compared by identity (``samefile``: hard links and symlinks included) and by resolved path,
    so ``./x.npy``, ``x.npy`` and a link to it are all the same file.
    """
    if not str(output):
        raise BadInputError(f"{flag}: an empty path")
    if output.is_dir():
        raise BadInputError(f"{output}: {flag} is a folder; give a file name",
                            hint=f"for example {output / 'predictions.npy'}")
    if model is not None and (_same(output, model) or (model.is_dir() and _inside(output, model))):
        raise OutputConflictError(output, "the model")
    if sidecar is not None and (_same(output, sidecar) or _inside(output, sidecar)):
        raise OutputConflictError(output, "inside the model's sidecar")
    for inp in inputs:
        if _same(output, inp):
            raise OutputConflictError(output, f"the input {inp}")
    parent = output.parent
    if make_parent:  # the writer creates missing folders: the nearest existing one must be writable
        while not parent.exists() and parent != parent.parent:
            if parent.is_symlink() or (parent.parent.exists() and not parent.parent.is_dir()):
                break
            parent = parent.parent
    check_writable_dir(parent if str(parent) else Path("."), f"{output}")


def log_dir(settings: Settings) -> Path:
    """``$ENVLOCK_HOME/logs``, or a private folder in TMPDIR when the home is read-only (a
    cache baked into an image still serves what it holds, and the worker still logs)."""
    logs = settings.home / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        check_writable_dir(logs, "worker logs")
        return logs
    except (OSError, BadInputError):
        fallback = Path(tempfile.gettempdir()) / f"envlock-logs-{os.getuid() if hasattr(os, 'getuid') else 0}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        return fallback


def preflight_save(model: Path, probe: Path | None) -> None:
    """What `envlock save` can check before a minute of work: the probe can be read (and its
    header is sound), and the sidecar's folder can be written (the sidecar is built beside it
    and renamed into place)."""
    from envlock.facts.modelfile import sidecar_path

    if probe is not None:
        from envlock.sidecar.arrays import read_headers

        read_headers(probe, what="probe")
    target = sidecar_path(model)
    check_writable_dir(target.parent if str(target.parent) else Path("."), f"{target}")
    if target.exists() and not target.is_dir():
        raise BadInputError(f"{target}: exists and is not a sidecar folder; envlock will not replace it")
