"""Which sidecars' code the user trusts (the way direnv's `allow` works).

Code in a sidecar's ``code/`` folder runs when the model loads. A sidecar saved on this
machine is trusted automatically; any other needs ``--trust-code`` once. Trust is keyed by
the manifest's own sha256, so a modified sidecar is a new, untrusted one. Kept apart from
the environment cache, so ``envlock cache gc`` never forgets it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from envlock.settings import Settings
from envlock.sidecar import Sidecar


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
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            data = _load(path)
            data[sidecar.manifest_sha256] = {"sidecar": str(sidecar.path.resolve()), "reason": reason,
                                             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trust-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
            os.replace(tmp, path)
            tmp = None
    except OSError as exc:
        logging.getLogger("envlock.trust").warning("could not record trust in %s: %s", path, exc)
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return True
