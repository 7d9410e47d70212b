"""Which sidecars' code the user trusts (the way direnv's `allow` works).

Code in a sidecar's ``code/`` folder runs when the model loads. A sidecar saved on this
machine is trusted automatically; any other needs ``--trust-code`` once. Trust is keyed by
the manifest's own sha256, so a modified sidecar is a new, untrusted one. Kept apart from
the environment cache, so ``envlock cache gc`` never forgets it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from filelock import FileLock

from envlock.fs import atomic_write
from envlock.settings import Settings
from envlock.sidecar.store import Sidecar


def _load(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def is_trusted(settings: Settings, sidecar: Sidecar) -> bool:
    return sidecar.manifest_sha256 in _load(settings.trust_file)


def trust(settings: Settings, sidecar: Sidecar, *, reason: str) -> bool:
    """Remember ``sidecar`` as trusted. False (and a logged warning) where the trust list
    cannot be written, a read-only ENVLOCK_CONFIG_DIR say: this run goes on, the next one asks
    for --trust-code again. A finished save must not fail over a convenience."""
    path = settings.trust_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            data = _load(path)
            data[sidecar.manifest_sha256] = {"sidecar": str(sidecar.path.resolve()), "reason": reason,
                                             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write(path, json.dumps(data, indent=2, sort_keys=True))
    except OSError as exc:
        logging.getLogger("envlock.sidecar.trust").warning("could not record trust in %s: %s", path, exc)
        return False
    return True
