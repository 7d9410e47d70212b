"""The one error hierarchy. The CLI maps each class to an exit code (DESIGN section 1).

Instances carry the facts as fields and build their own message, so the CLI can print one
line (``err.message``) and, where it helps, one line of advice (``err.hint``); ``str(err)`` holds
both, for errors raised through the Python API.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_WORKER = 4
# sysexits' EX_SOFTWARE: a bug of envlock's, not a problem with the user's input.
EXIT_INTERNAL = 70
# 128 + the signal's number, as shells report a process killed by it.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class EnvlockError(Exception):
    """Base of every user-facing failure."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        # A stable cause code from DESIGN section 4, where the failure has one.
        self.cause = cause

    def __str__(self) -> str:
        # Raised through the Python API, the exception is all the user sees: it carries the
        # advice too. The CLI prints ``message`` and ``hint`` on lines of their own.
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class BadInputError(EnvlockError):
    """Bad usage or bad input: a missing file, a wrong shape, a corrupt archive (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class SettingsError(BadInputError):
    """An environment variable envlock reads holds a value it cannot use (exit 2)."""

    def __init__(self, variable: str, value: str, problem: str) -> None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"{variable}={shown!r}: {problem}",
                         hint=f"fix or unset {variable} (README: Environment variables)")
        self.variable = variable
        self.value = value


class OutputConflictError(BadInputError):
    """An output path that would write over one of the command's own inputs (exit 2)."""

    def __init__(self, output: object, what: str) -> None:
        super().__init__(f"{output}: is {what}; envlock never writes over its inputs",
                         hint="pass another --output")
        self.output = output


class ModelFileError(BadInputError):
    """The model path is missing, is not a model, or is corrupt."""

    def __init__(self, path: object, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {problem}", hint=hint)
        self.path = path
        self.problem = problem


class SidecarError(BadInputError):
    """The sidecar is missing, of an unknown schema, or was modified after it was written."""

    def __init__(self, sidecar: object, problem: str, *, file: str | None = None,
                 hint: str | None = None) -> None:
        where = f"{sidecar}/{file}" if file else str(sidecar)
        super().__init__(f"{where}: {problem}", hint=hint)
        self.sidecar = sidecar
        self.file = file
        self.problem = problem


class InputArrayError(BadInputError):
    """An input array does not fit the model (shape, dtype, object/pickled data, missing key)."""


class MismatchError(EnvlockError):
    """Predictions (or restored weights) do not match what the lock recorded (exit 1)."""

    exit_code = EXIT_MISMATCH


class WeightsNotRestoredError(MismatchError):
    """The model as loaded back from its file holds other weights than the model that was saved."""

    def __init__(self, layers: Sequence[str], *, detail: str = "",
                 custom_layers: Sequence[str] = ()) -> None:
        names = ", ".join(layers) if layers else "(unknown layers)"
        msg = f"weights_not_restored: weights of layer(s) {names} differ after loading the file back"
        if detail:
            msg += f" ({detail})"
        if custom_layers:
            hint = (f"a custom layer ({', '.join(custom_layers)}) does not restore its weights: give it a "
                    "build() that creates them (and restore them in load_own_variables if you override "
                    "it), then save again; --allow-mismatch saves anyway")
        else:
            hint = ("the model has no custom layer: save it again with Keras (model.save) and retry; if "
                    "this persists it is an envlock bug (please report it); --allow-mismatch saves anyway")
        super().__init__(msg, hint=hint, cause="weights_not_restored")
        self.custom_layers = list(custom_layers)
        self.layers = list(layers)


class EnvironmentBuildError(EnvlockError):
    """The locked environment could not be built or found (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


class InterpreterNotFoundError(EnvironmentBuildError):
    def __init__(self, version: str, searched: Sequence[str]) -> None:
        super().__init__(
            f"no Python {version} found (looked in: {', '.join(searched) or 'nowhere'})",
            hint=f"install Python {version} (e.g. `uv python install {version}` or "
            f"`pyenv install {version}`), or pass --allow-python-download",
        )
        self.version = version
        self.searched = list(searched)


class ToolNotFoundError(EnvironmentBuildError):
    def __init__(self, tool: str, searched: Sequence[str], *, hint: str | None = None) -> None:
        super().__init__(f"{tool} not found (looked in: {', '.join(searched) or 'nowhere'})", hint=hint)
        self.tool = tool
        self.searched = list(searched)


class WorkerError(EnvlockError):
    """The worker crashed, timed out or could not load the model (exit 4)."""

    exit_code = EXIT_WORKER

    def __init__(self, message: str, *, log_tail: str = "", hint: str | None = None,
                 cause: str | None = None) -> None:
        super().__init__(message, hint=hint, cause=cause)
        self.log_tail = log_tail


class NetworkError(EnvironmentBuildError):
    """A package index could not be reached or answered with an HTTP error (exit 3).

    ``kind`` is one of ``refused``, ``timeout``, ``http``, ``dns``, ``tls``: four failures that a
    user fixes in four different ways, none of them by looking for a deleted version.
    """

    def __init__(self, kind: str, where: str, detail: str = "", *, hint: str | None = None) -> None:
        what = {
            "refused": "the connection was refused",
            "timeout": "the connection timed out",
            "http": "the server answered with an HTTP error",
            "dns": "the host name could not be resolved",
            "tls": "the TLS handshake failed",
        }.get(kind, "the network request failed")
        msg = f"could not reach {where}: {what}" + (f" ({detail})" if detail else "")
        super().__init__(msg, hint=hint or _NETWORK_HINTS.get(kind))
        self.kind = kind
        self.where = where


_NETWORK_HINTS = {
    "refused": "check the index URL (UV_INDEX_URL / PIP_INDEX_URL) and that the server is up; "
               "offline, pass --find-links DIR or use a sidecar saved with --vendor",
    "timeout": "the index is slow or unreachable: retry, raise ENVLOCK_HTTP_TIMEOUT, "
               "or pass --find-links DIR",
    "http": "the index is up but refused the request: check the URL and any credentials it needs",
    "dns": "check the index URL's host name and this machine's network",
    "tls": "check the index's certificate (SSL_CERT_FILE) and the URL's scheme",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every cleanup for Ctrl-C runs for it too."""


class CommandError(EnvironmentBuildError):
    """An external command failed. Carries the argv and the tail of its stderr.

    A subclass of EnvironmentBuildError: nearly every command envlock runs builds or probes
    an environment, and a caller catching build failures must see failed installs too.
    """

    def __init__(self, argv: Sequence[str], returncode: int, stderr_tail: str, *,
                 what: str | None = None) -> None:
        prog = argv[0] if argv else "?"
        last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else ""
        head = what or f"`{prog}` failed"
        if len(last) > 300:  # a resolver's whole explanation on one line: keep the start
            last = last[:297] + "..."
        msg = f"{head} (exit {returncode})" + (f": {last}" if last else "")
        super().__init__(msg)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class HashMismatchError(CommandError):
    """An installer refused a file whose sha256 the lock does not record: names the packages."""

    def __init__(self, packages: Sequence[str], failed: CommandError) -> None:
        super().__init__(failed.argv, failed.returncode, failed.stderr_tail)
        self.packages = list(packages)
        self.message = (f"{', '.join(self.packages)}: the file served for it does not have any sha256 "
                        "the lock records (the index or --find-links folder holds other bytes than at save)")
        self.args = (self.message,)
        self.hint = ("if you trust the new file, save the model again; otherwise find the original "
                     "wheel and pass --find-links DIR")
