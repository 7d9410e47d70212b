"""py-rattler: install exact conda records into a prefix, with no conda on the machine.

py-rattler is a library (``pip install 'envlock[conda]'``), not a command, so envlock runs a
small helper *in a child process* (``python -c`` importing :func:`_helper_main` below, records
as JSON on stdin, one JSON answer on stdout) through :mod:`envlock.proc`, rather than calling
it in-process:

* Ctrl-C or a failure then kills the install with its whole process group before the build
  folder is removed (rattler links on Rust threads that Python cannot cancel);
* rattler's progress output and logging stay out of envlock's stdout;
* the host never imports the Rust extension unless a conda environment is being built.

No solver runs: the records are the lock's, installed as they are (``rattler.install``, which
downloads into rattler's shared package cache, checks each archive's sha256/md5, and links).
``alternative_target_prefix`` makes the files name the environment's final path while they
are written into the temporary build folder, so the folder can be renamed into place like a
venv (see :mod:`envlock.envs.cache`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from envlock import proc
from envlock.errors import EnvironmentBuildError, ToolNotFoundError

INSTALL_HINT = "install py-rattler (`pip install 'envlock[conda]'`), or conda/mamba/micromamba"
# The oldest py-rattler tested; install(alternative_target_prefix=...) is recent (2026).
MIN_VERSION = (0, 28)
# Repodata fields py-rattler's PackageRecord carries beyond what index.json holds.
_REPODATA_ONLY = ("size", "sha256", "md5", "indexed_timestamp", "fn", "url", "channel")


@dataclass(frozen=True)
class Rattler:
    """py-rattler importable by ``python`` (the host's interpreter)."""

    python: Path
    version: str


def find_rattler(python: Path | None = None) -> Rattler:
    """py-rattler in this interpreter (the helper runs with it); ToolNotFoundError otherwise."""
    exe = Path(python or sys.executable)
    if python is None or Path(python) == Path(sys.executable):
        if find_spec("rattler") is None:
            raise ToolNotFoundError("py-rattler", [f"{exe} (import rattler)"], hint=INSTALL_HINT)
        try:
            found = Rattler(exe, metadata.version("py-rattler"))
        except metadata.PackageNotFoundError:
            found = Rattler(exe, "0")
    else:
        probe = "import importlib.metadata as m, rattler; print(m.version('py-rattler'))"
        done = proc.run([exe, "-c", probe], check=False)
        if done.returncode != 0:
            raise ToolNotFoundError("py-rattler", [f"{exe} (import rattler)"], hint=INSTALL_HINT)
        found = Rattler(exe, done.stdout.strip())
    have = tuple(int(p) for p in re.findall(r"\d+", found.version)[:2])
    if have < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise EnvironmentBuildError(f"py-rattler {found.version} is too old (envlock needs {need} or newer)",
                                    hint=f"pip install -U 'py-rattler>={need}'")
    return found


_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from envlock.tools.rattler import _helper_main; sys.exit(_helper_main())")


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def install(rattler: Rattler, records: Sequence[Mapping[str, Any]], target: Path, *,
            final: Path | None = None, cache_dir: Path | None = None, timeout: float | None = None
            ) -> list[str]:
    """Install exactly ``records`` (conda-meta style dicts: index fields plus ``fn``, ``url``,
    ``channel``, ``md5``, ``sha256``) into ``target``; the files name ``final`` when given.

    Returns the file names installed. A package that cannot be fetched (gone from its
    channel, say) is an :class:`EnvironmentBuildError` naming it.
    """
    request = {
        "target": str(target),
        "final": str(final) if final is not None else None,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "records": [dict(r) for r in records],
    }
    done = proc.run([rattler.python, "-c", _BOOT, _package_root()], input_text=json.dumps(request),
                    check=False, timeout=timeout, env=proc.clean_env(keep=("RATTLER_*", "SSL_CERT_*")))
    answer = _answer(done.stdout)
    if done.returncode == 0 and answer.get("installed") is not None:
        return [str(x) for x in answer["installed"]]
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
    error = str(answer.get("error") or tail or f"exit {done.returncode}")
    culprits = [r for r in records if str(r.get("fn") or "") and str(r["fn"]) in error]
    if culprits:
        raise _fetch_error(culprits, error)
    first = error.strip().splitlines()[0] if error.strip() else f"exit {done.returncode}"
    raise EnvironmentBuildError(f"py-rattler could not install the conda packages: {first}")


def _answer(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return {}


def _fetch_error(records: Sequence[Mapping[str, Any]], error: str) -> EnvironmentBuildError:
    """The package(s) rattler could not fetch, named, with rattler's innermost cause."""
    names = ", ".join(f"{r.get('name')} {r.get('version')} ({r.get('fn')})" for r in records)
    where = str(records[0].get("url", "")).rsplit("/", 1)[0]
    causes = [ln.strip()[len("Caused by:"):].strip() for ln in error.splitlines()
              if ln.strip().startswith("Caused by:")]
    cause = causes[-1] if causes else error.strip().splitlines()[0]
    return EnvironmentBuildError(
        f"conda package{'s' if len(records) > 1 else ''} {names} could not be fetched from {where}: {cause}",
        hint="the lock names exact files: put them back on the channel (or a mirror, and edit the "
             "URLs), or rebuild with --strategy venv")


# --- the helper, run in the child ------------------------------------------------------------


def _record(r: Mapping[str, Any], scratch: Path) -> Any:
    import datetime

    import rattler

    index = {k: v for k, v in r.items() if k not in _REPODATA_ONLY}
    path = scratch / f"{r['fn']}.index.json"
    path.write_text(json.dumps(index), encoding="utf-8")
    pkg = rattler.PackageRecord.from_index_json(path, size=r.get("size"), sha256=r.get("sha256"),
                                                md5=r.get("md5"))
    if r.get("indexed_timestamp") is not None:
        ts = int(r["indexed_timestamp"])
        # repodata timestamps are milliseconds since the epoch (seconds in old records)
        pkg.indexed_timestamp = datetime.datetime.fromtimestamp(ts / 1000 if ts > 1e11 else ts,
                                                                tz=datetime.timezone.utc)
    channel = str(r.get("channel") or str(r["url"]).rsplit("/", 2)[0])
    return rattler.RepoDataRecord(pkg, str(r["fn"]), str(r["url"]), channel)


def _helper_main() -> int:  # pragma: no cover - runs in the child process
    import asyncio
    import tempfile

    try:
        import rattler

        request = json.loads(sys.stdin.read())
        with tempfile.TemporaryDirectory(prefix="envlock-rattler-") as scratch:
            records = [_record(r, Path(scratch)) for r in request["records"]]
        kwargs: dict[str, Any] = {"show_progress": False, "installed_packages": [],
                                  "execute_link_scripts": False}
        if request.get("final"):
            kwargs["alternative_target_prefix"] = request["final"]
        if request.get("cache_dir"):
            kwargs["cache_dir"] = request["cache_dir"]
        asyncio.run(rattler.install(records, request["target"], **kwargs))
    except Exception as exc:
        sys.stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    sys.stdout.write(json.dumps({"installed": [str(r["fn"]) for r in request["records"]]}) + "\n")
    return 0


__all__ = ["INSTALL_HINT", "Rattler", "find_rattler", "install"]
