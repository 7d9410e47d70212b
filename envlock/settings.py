"""Settings and paths, passed around as one frozen value (no module-level singletons)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import platformdirs

DEFAULT_INDEX_URL = "https://pypi.org/simple"


def _split_urls(value: str | None) -> tuple[str, ...]:
    return tuple(u for u in (value or "").split() if u)


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
        home_path = Path(home) if home else Path(platformdirs.user_cache_dir("envlock"))
        config = env.get("ENVLOCK_CONFIG_DIR")
        config_path = Path(config) if config else (
            home_path / "config" if home else Path(platformdirs.user_config_dir("envlock"))
        )
        # uv's variables win over pip's, the way a user running uv would expect.
        index = env.get("UV_INDEX_URL") or env.get("UV_DEFAULT_INDEX") or env.get("PIP_INDEX_URL")
        extras = (
            _split_urls(env.get("UV_EXTRA_INDEX_URL"))
            + _split_urls(env.get("UV_INDEX"))
            + _split_urls(env.get("PIP_EXTRA_INDEX_URL"))
        )
        offline = env.get("ENVLOCK_OFFLINE", "").lower() in {"1", "true", "yes"}
        timeout = float(env.get("ENVLOCK_HTTP_TIMEOUT", "15"))
        return cls(
            home=home_path,
            config_dir=config_path,
            index_url=(index or DEFAULT_INDEX_URL).rstrip("/"),
            extra_index_urls=tuple(dict.fromkeys(u.rstrip("/") for u in extras)),
            offline=offline,
            http_timeout=timeout,
            uv_path=env.get("ENVLOCK_UV"),
            environ=env,
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
