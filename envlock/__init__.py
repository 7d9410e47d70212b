"""envlock: make a saved Keras/TensorFlow model reproducible months later, on another machine."""

from __future__ import annotations

__version__ = "0.1.0"

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `import envlock` stays cheap: the worker and the CLI import parts of it
    import numpy as np

    from envlock.commands.results import CheckResult, RunResult, SaveResult
    from envlock.commands.run import ModelSession
    from envlock.settings import Settings

__all__ = ["__version__", "check", "load", "lock", "prewarm", "run", "save"]

Stage = Callable[[str], None]
"""A callback told each step as it starts ("loading the model", "locking packages", ...)."""


def save(model: Any, path: str | os.PathLike[str], *,
         probe: np.ndarray | Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None,
         custom_objects: Sequence[str] = (), allow_mismatch: bool = False, atol: float = 1e-6,
         rtol: float = 1e-5, vendor: bool = False, keras_options: Mapping[str, Any] | None = None,
         settings: Settings | None = None, on_stage: Stage | None = None) -> SaveResult:
    """Save ``model`` with Keras at ``path``, then write its sidecar ``PATH.envlock/``.

    ``probe``: the reference inputs (an array, a dict of arrays by input name, or a .npy/.npz
    file); without one, envlock generates seeded inputs from the model's input specs.
    ``custom_objects``: modules to import before the model is loaded back. ``allow_mismatch``:
    save even if the weights loaded back differ. ``atol``/``rtol``: the tolerance that ``run``
    and ``check`` apply later. ``vendor``: copy every locked wheel into the sidecar, so a
    rebuild needs no index. ``keras_options``: passed to ``model.save`` as keyword arguments.
    Raises an :class:`envlock.errors.EnvlockError` subclass on failure (its ``exit_code`` is the CLI's).
    """
    from envlock.commands import save

    return save.save(model, path, probe=probe, settings=settings, custom_objects=custom_objects,
                       allow_mismatch=allow_mismatch, atol=atol, rtol=rtol, on_stage=on_stage,
                       vendor=vendor, **dict(keras_options or {}))


def lock(path: str | os.PathLike[str], *, probe: str | os.PathLike[str] | None = None,
         custom_objects: Sequence[str] = (), allow_mismatch: bool = False, atol: float = 1e-6,
         rtol: float = 1e-5, seed: int = 0, vendor: bool = False, settings: Settings | None = None,
         on_stage: Stage | None = None) -> SaveResult:
    """Write the sidecar of a model file that already exists (what ``envlock save`` does).

    ``probe``: a .npy/.npz file of reference inputs; without one, inputs generated with
    ``seed``. The other arguments are those of :func:`save`.
    """
    from pathlib import Path

    from envlock.commands import save

    options = save.SaveOptions(probe=Path(probe) if probe is not None else None,
                                 custom_object_modules=tuple(custom_objects), allow_mismatch=allow_mismatch,
                                 atol=atol, rtol=rtol, seed=seed, vendor=vendor)
    return save.lock(path, settings=settings, options=options, on_stage=on_stage)


def prewarm(*, custom_objects: Sequence[str] = (), settings: Settings | None = None) -> None:
    """Start the worker that :func:`save` reloads the model in now, so that the first save of
    this process finds TensorFlow already imported there. Returns at once."""
    from envlock.commands import save

    save.prewarm(custom_objects=custom_objects, settings=settings)


def load(model: str | os.PathLike[str], *, strategy: str = "auto", use_recorded_env: bool = True,
         trust_code: bool = False, unsafe: bool = False, timeout: float | None = None,
         allow_python_download: bool = False, find_links: Sequence[str] = (),
         custom_objects: Sequence[str] = (), settings: Settings | None = None,
         on_stage: Stage | None = None) -> ModelSession:
    """A session whose ``predict(x)`` runs the saved model in its locked environment.

    ``strategy``: ``auto`` (this interpreter if it satisfies the lock exactly, else the cached
    environment), ``current``, ``venv`` or ``conda``. ``use_recorded_env``: apply the TF_* /
    PYTHONHASHSEED values recorded at save. ``trust_code``: trust the sidecar's code/ (remembered).
    ``unsafe``: Keras safe_mode off (lambdas). ``timeout``: seconds one worker step may take.
    The session starts on first use or on ``with``; close it, or use it as a context manager.
    """
    from envlock.commands import run

    return run.load(model, **_session(strategy, use_recorded_env, trust_code, unsafe, timeout,
                                          allow_python_download, find_links, custom_objects, settings,
                                          on_stage))


def run(model: str | os.PathLike[str], input_path: str | os.PathLike[str], *,
        output: str | os.PathLike[str] | None = None, batch_size: int = 32, validate: bool = True,
        on_progress: Callable[[int, int], None] | None = None, strategy: str = "auto",
        use_recorded_env: bool = True, trust_code: bool = False, unsafe: bool = False,
        timeout: float | None = None, allow_python_download: bool = False, find_links: Sequence[str] = (),
        custom_objects: Sequence[str] = (), settings: Settings | None = None,
        on_stage: Stage | None = None) -> RunResult:
    """``envlock run``: replay the probe on this machine (unless ``validate`` is False), then
    predict ``input_path`` (.npy, or .npz by input name) into ``output`` (default: beside the
    input). ``on_progress(done, total)`` sees the rows. The session arguments are those of :func:`load`.
    """
    from envlock.commands import run

    return run.run(model, input_path, output=output, batch_size=batch_size, validate=validate,
                       on_progress=on_progress,
                       **_session(strategy, use_recorded_env, trust_code, unsafe, timeout,
                                  allow_python_download, find_links, custom_objects, settings, on_stage))


def check(model: str | os.PathLike[str], *, atol: float | None = None, rtol: float | None = None,
          strategy: str = "auto", use_recorded_env: bool = True, trust_code: bool = False,
          unsafe: bool = False, timeout: float | None = None, allow_python_download: bool = False,
          find_links: Sequence[str] = (), custom_objects: Sequence[str] = (),
          settings: Settings | None = None, on_stage: Stage | None = None) -> CheckResult:
    """``envlock check``: replay the probe on this machine and explain every difference.

    ``atol``/``rtol`` default to the tolerance recorded at save. The result's ``ok`` says
    whether the predictions match; ``findings`` rank the likely causes of a difference.
    The session arguments are those of :func:`load`.
    """
    from envlock.commands import check

    return check.check(model, atol=atol, rtol=rtol,
                          **_session(strategy, use_recorded_env, trust_code, unsafe, timeout,
                                     allow_python_download, find_links, custom_objects, settings, on_stage))


def _session(strategy: str, use_recorded_env: bool, trust_code: bool, unsafe: bool, timeout: float | None,
             allow_python_download: bool, find_links: Sequence[str], custom_objects: Sequence[str],
             settings: Settings | None, on_stage: Stage | None) -> dict[str, Any]:
    return {"strategy": strategy, "use_recorded_env": use_recorded_env, "trust_code": trust_code,
            "unsafe": unsafe, "timeout": timeout, "allow_python_download": allow_python_download,
            "find_links": tuple(find_links), "custom_objects": tuple(custom_objects), "settings": settings,
            "on_stage": on_stage}
