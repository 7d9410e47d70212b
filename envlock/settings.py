"""Settings and paths, passed around as one frozen value (no module-level singletons).

Every environment variable envlock reads is a field here, parsed and validated once in
:meth:`Settings.from_env`; a bad value raises :class:`SettingsError` naming the variable
(exit 2) instead of surfacing later as a traceback. ``VARIABLES`` documents them (the README's
"Environment variables" table is written from it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

from envlock.errors import SettingsError

DEFAULT_INDEX_URL = "https://pypi.org/simple"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
CONDA_INSTALLERS = ("auto", "conda", "rattler")  # envs.conda.INSTALLERS

# name → what it sets. Kept in step with the README by tests/test_bad_inputs.py.
VARIABLES: dict[str, str] = {
    "ENVLOCK_HOME": "the environment cache, worker logs and index cache (default: the user cache dir)",
    "ENVLOCK_CONFIG_DIR": "where the list of trusted sidecars lives (default: the user config dir, "
                          "or $ENVLOCK_HOME/config when ENVLOCK_HOME is set)",
    "ENVLOCK_OFFLINE": "1/true/yes/on: never ask a package index (0/false/no/off or unset: ask)",
    "ENVLOCK_HTTP_TIMEOUT": "seconds to wait for a package index (a positive number, default 15)",
    "ENVLOCK_UV": "the uv executable to use (a path or a name on PATH)",
    "ENVLOCK_CONDA": "the conda, mamba or micromamba executable to use",
    "ENVLOCK_CONDA_LOCK": "the conda-lock executable to use",
    "ENVLOCK_CONDA_INSTALLER": "auto, conda or rattler: what rebuilds a conda lock (default auto)",
}


def _split_urls(value: str | None) -> tuple[str, ...]:
    return tuple(u for u in (value or "").split() if u)


def _unnamed(entry: str) -> str:
    """uv's ``UV_INDEX`` entries may be ``name=URL``."""
    name, sep, rest = entry.partition("=")
    return rest if sep and "://" not in name else entry


def _check_url(variable: str, url: str) -> str:
    """An index URL: http(s) with a host, or file: with a path; anything else names the variable."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise SettingsError(variable, url, f"not a valid URL ({exc})") from None
    if parts.scheme in ("http", "https") and parts.hostname:
        return url
    if parts.scheme == "file" and parts.path:
        return url
    raise SettingsError(variable, url, "not an index URL (expected http://HOST/..., https://HOST/... "
                        "or file:///PATH)")


def _check_path(variable: str, value: str) -> Path:
    if "\0" in value:
        raise SettingsError(variable, value.replace("\0", "\\0"), "a path cannot hold a NUL byte")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise SettingsError(variable, value, "exists and is not a folder")
    return path


def _flag(env: Mapping[str, str], variable: str) -> bool:
    value = env.get(variable, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(variable, env[variable], "expected 1/true/yes/on or 0/false/no/off")


def _seconds(env: Mapping[str, str], variable: str, default: float) -> float:
    raw = env.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(variable, raw, "not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(variable, raw, "must be a positive, finite number of seconds")
    return value


def _choice(env: Mapping[str, str], variable: str, choices: tuple[str, ...]) -> str:
    value = env.get(variable, "").strip() or choices[0]
    if value not in choices:
        raise SettingsError(variable, value, f"expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    """Where envlock keeps things and how it reaches package indexes.

    ``home`` holds the environment cache; ``hash_cache`` the package-index answers;
    ``trust_file`` (kept apart from the cache, so `cache gc` never forgets trust) the
    sidecars whose code the user trusts.
    """

    home: Path
    config_dir: Path
    index_url: str = DEFAULT_INDEX_URL
    extra_index_urls: tuple[str, ...] = ()
    offline: bool = False
    http_timeout: float = 15.0
    uv_path: str | None = None
    conda_path: str | None = None
    conda_lock_path: str | None = None
    conda_installer: str = "auto"
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def env_cache(self) -> Path:
        return self.home / "envs"

    @property
    def hash_cache(self) -> Path:
        return self.home / "index-cache"

    @property
    def trust_file(self) -> Path:
        return self.config_dir / "trusted-sidecars.json"

    @property
    def index_urls(self) -> tuple[str, ...]:
        return (self.index_url, *self.extra_index_urls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        home = env.get("ENVLOCK_HOME")
        home_path = (_check_path("ENVLOCK_HOME", home) if home
                     else Path(platformdirs.user_cache_dir("envlock")))
        config = env.get("ENVLOCK_CONFIG_DIR")
        config_path = _check_path("ENVLOCK_CONFIG_DIR", config) if config else (
            home_path / "config" if home else Path(platformdirs.user_config_dir("envlock"))
        )
        # uv's variables win over pip's, the way a user running uv would expect.
        index_var = next((v for v in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "PIP_INDEX_URL")
                          if env.get(v, "").strip()), None)
        index = _check_url(index_var, env[index_var].strip()) if index_var else DEFAULT_INDEX_URL
        extras = tuple(
            _check_url(var, _unnamed(u))
            for var in ("UV_EXTRA_INDEX_URL", "UV_INDEX", "PIP_EXTRA_INDEX_URL")
            for u in _split_urls(env.get(var))
        )
        return cls(
            home=home_path,
            config_dir=config_path,
            index_url=index.rstrip("/"),
            extra_index_urls=tuple(dict.fromkeys(u.rstrip("/") for u in extras)),
            offline=_flag(env, "ENVLOCK_OFFLINE"),
            http_timeout=_seconds(env, "ENVLOCK_HTTP_TIMEOUT", 15.0),
            uv_path=env.get("ENVLOCK_UV") or None,
            conda_path=env.get("ENVLOCK_CONDA") or None,
            conda_lock_path=env.get("ENVLOCK_CONDA_LOCK") or None,
            conda_installer=_choice(env, "ENVLOCK_CONDA_INSTALLER", CONDA_INSTALLERS),
            environ=env,
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
