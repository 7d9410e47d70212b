"""A corpus of bad inputs across every command (issue 11).

Every case runs the real CLI in a subprocess, in a working folder holding a copy of a real
saved model, its sidecar and a good input, and asserts: the documented exit code; exactly one
``envlock: error:`` line on stderr plus at most one ``hint:`` line, and nothing else (no
traceback); every file of the working folder exactly as it was (listing, mode, sha256); and,
with --json, one error document on stdout that validates against envlock/schemas/error.schema.json.

Permission cases run with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (setpriv), so that
they bite when the tests run as root, as CI does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from envlock.settings import VARIABLES
from envlock.sidecar.manifest import load_schema, schema_names
from envlock.sidecar.store import MANIFEST, read_sidecar, write_sidecar

jsonschema = pytest.importorskip("jsonschema")

EXIT_OK, EXIT_MISMATCH, EXIT_BAD, EXIT_ENV, EXIT_WORKER, EXIT_INTERNAL = 0, 1, 2, 3, 4, 70
ROOT = Path(__file__).resolve().parent.parent
SETPRIV = shutil.which("setpriv")
NO_DAC = [SETPRIV or "setpriv", "--inh-caps=-dac_override,-dac_read_search",
          "--bounding-set=-dac_override,-dac_read_search"]
MODEL, SIDECAR = "model.keras", "model.keras.envlock"


# --- the working folder -------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The files every case starts from (copied, never touched)."""

    model: Path  # model.keras with its sidecar beside it
    x: Path  # a good input for it: (5, 4) float32
    bomb: Path  # a .keras whose config.json inflates to 256 MiB


@pytest.fixture(scope="session")
def source(saved_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Source:
    root = tmp_path_factory.mktemp("bad-inputs-src")
    x = root / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((5, 4)).astype("float32"))
    bomb = root / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        with zf.open("config.json", "w", force_zip64=True) as f:
            block = b" " * (1 << 20)
            for _ in range(256):
                f.write(block)
    return Source(saved_tiny, x, bomb)


def _populate(w: Path, src: Source) -> None:
    w.mkdir()
    shutil.copy2(src.model, w / MODEL)
    shutil.copytree(src.model.with_name(SIDECAR), w / SIDECAR)
    shutil.copy2(src.x, w / "x.npy")


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """relative path → (kind, mode, sha256 or link target) of everything under ``root``."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", st.st_mode, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, "")
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", st.st_mode, "")
    return out


# --- bad files ----------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = 64 - (10 + len(header) + 1) % 64
    body = (header + " " * pad + "\n").encode()
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def _zip_flag(path: Path, member: str, *, method: int | None = None, encrypted: bool = False) -> None:
    """Rewrite a member's compression method or encryption flag in both of its headers."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for sig, flag_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        i = data.find(sig)
        while i >= 0:
            if data[i + name_at: i + name_at + len(name)] == name:
                if method is not None:
                    data[i + method_at: i + method_at + 2] = method.to_bytes(2, "little")
                if encrypted:
                    data[i + flag_at] |= 0x1
            i = data.find(sig, i + 4)
    path.write_bytes(bytes(data))


def _keras_with(w: Path, name: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(w / name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, content in members.items():
            zf.writestr(member, content)


def _deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _rewrite_manifest(w: Path, edit: Callable[[dict[str, Any]], Any],
                      files: Callable[[dict[str, bytes | Path]], None] | None = None) -> None:
    """A self-consistent sidecar (its integrity record matches) whose content was edited: what
    only validation, not integrity, can refuse."""
    sc = read_sidecar(w / MODEL)
    manifest = json.loads(json.dumps(sc.manifest))
    edit(manifest)
    stash = w.parent / (w.name + "-stash")
    shutil.copytree(sc.path, stash)
    content: dict[str, bytes | Path] = {p.relative_to(stash).as_posix(): p for p in stash.rglob("*")
                                        if p.is_file() and p.name != MANIFEST}
    if files is not None:
        files(content)
    write_sidecar(w / MODEL, manifest, content)
    shutil.rmtree(stash)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        node = m
        *parents, last = path.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


_DELETE = object()


def _symlink(target: str, name: str) -> Callable[[Path], None]:
    return lambda w: os.symlink(target, w / name)


def _chmod(name: str, mode: int) -> Callable[[Path], None]:
    return lambda w: os.chmod(w / name, mode)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).write_bytes(data)
    return setup


def _mkdir(name: str, mode: int | None = None) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / name).mkdir(parents=True, exist_ok=True)
        if mode is not None:
            os.chmod(w / name, mode)
    return setup


def _all(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for s in steps:
            s(w)
    return setup


def _save_array(name: str, array: np.ndarray) -> Callable[[Path], None]:
    return lambda w: np.save(w / name, array, allow_pickle=True)


def _model_in(folder: str, mode: int) -> Callable[[Path], None]:
    """The model (no sidecar) in a folder of its own, then the folder's mode set."""
    def setup(w: Path) -> None:
        (w / folder).mkdir()
        shutil.copy2(w / MODEL, w / folder / MODEL)
        os.chmod(w / folder, mode)
    return setup


def _flip_crc(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = data.find(b"PK\x03\x04")
    data[i + 14] ^= 0xFF  # the local header's CRC-32
    j = data.find(b"PK\x01\x02")
    data[j + 16] ^= 0xFF  # and the central directory's, so that only the data disagrees
    path.write_bytes(bytes(data))


def _pickled_probe(files: dict[str, bytes | Path]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, input__features=np.array([[object()] * 4] * 16, dtype=object),
             output__logits=np.zeros((16, 2), "float32"))
    files["probe.npz"] = buf.getvalue()


def _latin1_lock(files: dict[str, bytes | Path]) -> None:
    files["requirements.lock.txt"] = "# caf\xe9\nsix==1.17.0\n".encode("latin-1")


def _outside_file(w: Path) -> None:
    """A manifest (with a matching integrity record) that lists a file outside its folder."""
    from envlock.sidecar.store import _self_hash, canonical_json

    (w / "outside.txt").write_text("x\n")
    path = w / SIDECAR / MANIFEST
    m = json.loads(path.read_text())
    m["files"]["../outside.txt"] = hashlib.sha256(b"x\n").hexdigest()
    m["integrity"]["manifest_sha256"] = _self_hash(m)
    path.write_bytes(canonical_json(m))


# --- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    code: int = EXIT_BAD
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    no_dac: bool = False  # run without CAP_DAC_OVERRIDE: permissions bite as root
    says: str = ""  # a piece of the error line (names the path, the field, the variable)


def C(id: str, *args: str, **kw: Any) -> Case:
    return Case(id, args, **kw)


R = ("run", MODEL, "-i", "x.npy")
OUT = "y.npy"
X_BAD = np.zeros((5, 4), dtype="float32")

CASES: list[Case] = [
    # 7. numeric options and other parse-time refusals (no file is read)
    C("gc-older-than-negative", "cache", "gc", "--older-than", "-5", says="--older-than"),
    C("gc-older-than-nan", "cache", "gc", "--older-than", "nan", says="finite"),
    C("gc-older-than-inf", "cache", "gc", "--older-than", "inf", says="finite"),
    C("gc-older-than-huge", "cache", "gc", "--older-than", "1e300", says="at most"),
    C("gc-older-than-word", "cache", "gc", "--older-than", "abc", says="not a number"),
    C("gc-max-size-negative", "cache", "gc", "--max-size", "-1", says="--max-size"),
    C("gc-max-size-nan", "cache", "gc", "--max-size", "nan", says="finite"),
    C("gc-max-size-huge", "cache", "gc", "--max-size", "1e300", says="at most"),
    C("check-atol-negative", "check", MODEL, "--atol", "-1", says="--atol"),
    C("check-rtol-negative", "check", MODEL, "--rtol", "-0.5", says="--rtol"),
    C("check-atol-nan", "check", MODEL, "--atol", "nan", says="finite"),
    C("check-rtol-inf", "check", MODEL, "--rtol", "inf", says="finite"),
    C("check-timeout-negative", "check", MODEL, "--timeout", "-5", says="--timeout"),
    C("save-atol-negative", "save", MODEL, "--atol", "-1", says="--atol"),
    C("save-rtol-nan", "save", MODEL, "--rtol", "nan", says="--rtol"),
    C("save-seed-negative", "save", MODEL, "--seed", "-1", says="--seed"),
    C("save-seed-fraction", "save", MODEL, "--seed", "1.5", says="--seed"),
    C("save-seed-too-big", "save", MODEL, "--seed", "99999999999", says="--seed"),
    C("run-timeout-negative", *R, "--timeout", "-1", says="--timeout"),
    C("run-timeout-zero", *R, "--timeout", "0", says="--timeout"),
    C("run-timeout-nan", *R, "--timeout", "nan", says="--timeout"),
    C("run-batch-zero", *R, "--batch-size", "0", says="--batch-size"),
    C("run-batch-negative", *R, "--batch-size", "-3", says="--batch-size"),
    C("run-batch-word", *R, "--batch-size", "many", says="--batch-size"),
    C("run-strategy-unknown", *R, "--strategy", "bogus", says="--strategy"),
    C("env-strategy-unknown", "env", MODEL, "--strategy", "bogus", says="--strategy"),
    C("no-command"),
    C("unknown-command", "frobnicate", says="frobnicate"),
    C("run-without-input", "run", MODEL, says="--input"),
    C("export-without-format", "export", MODEL, says="--format"),
    C("cache-without-subcommand", "cache"),
    C("save-unknown-flag", "save", MODEL, "--frobnicate", says="--frobnicate"),
    C("gc-negative-json", "cache", "gc", "--older-than", "-5", "--json", says="--older-than"),
    C("check-atol-json", "check", MODEL, "--atol", "-1", "--json", says="--atol"),
    C("unknown-command-json", "frobnicate", "--json", says="frobnicate"),
    # 4. empty and root paths
    C("run-empty-model", "run", "", "-i", "x.npy", says="empty path"),
    C("run-empty-input", "run", MODEL, "-i", "", says="empty path"),
    C("run-empty-output", *R, "-o", "", says="empty path"),
    C("save-empty", "save", "", says="empty path"),
    C("show-empty", "show", "", says="empty path"),
    C("check-empty", "check", "", says="empty path"),
    C("diff-empty", "diff", "", says="empty path"),
    C("env-empty", "env", "", says="empty path"),
    C("export-empty", "export", "", "-f", "requirements", says="empty path"),
    C("diff-python-empty", "diff", MODEL, "--python", "", says="empty path"),
    C("show-root", "show", "/", says="root folder"),
    C("run-root", "run", "/", "-i", "x.npy", says="root folder"),
    C("save-root", "save", "/"),
    C("check-root", "check", "/", says="root folder"),
    C("show-dot", "show", ".", says="no sidecar"),
    C("env-root-json", "env", "/", "--json", says="root folder"),
    # 1. missing, wrong-kind and unreadable paths
    C("save-missing", "save", "nope.keras", says="nope.keras: no such file"),
    C("save-empty-file", "save", "empty.keras", setup=_write("empty.keras", b""), says="empty file"),
    C("save-text-file", "save", "notes.keras", setup=_write("notes.keras", b"hello\n"), says="not a model"),
    C("save-folder-not-savedmodel", "save", "adir", setup=_mkdir("adir"), says="no saved_model.pb"),
    C("save-symlink-loop", "save", "loop.keras", setup=_symlink("loop.keras", "loop.keras"),
      says="symbolic link loop"),
    C("save-dangling-symlink", "save", "gone.keras", setup=_symlink("nowhere.keras", "gone.keras"),
      says="nowhere.keras, which does not exist"),
    C("save-fifo", "save", "pipe.keras", setup=lambda w: os.mkfifo(w / "pipe.keras"),
      says="not a regular file"),
    C("save-probe-missing", "save", MODEL, "--probe", "nope.npy", says="nope.npy"),
    C("save-probe-folder", "save", MODEL, "--probe", "pdir", setup=_mkdir("pdir"), says="pdir"),
    C("save-probe-truncated", "save", MODEL, "--probe", "p.npy",
      setup=_write("p.npy", _npy_header((16, 4)) + b"\0" * 10), says="truncated"),
    C("save-sidecar-is-a-file", "save", "m2.keras",
      setup=_all(lambda w: shutil.copy2(w / MODEL, w / "m2.keras"), _write("m2.keras.envlock", b"x")),
      says="m2.keras.envlock"),
    C("show-no-sidecar", "show", "other.keras", says="no sidecar"),
    C("show-sidecar-is-a-file", "show", "m3.keras", setup=_write("m3.keras.envlock", b"x"),
      says="not a sidecar folder"),
    C("run-input-missing", "run", MODEL, "-i", "nope.npy", says="nope.npy: input: no such file"),
    C("run-input-folder", "run", MODEL, "-i", "xdir.npy", setup=_mkdir("xdir.npy"),
      says="no input shards found"),
    C("run-input-symlink-loop", "run", MODEL, "-i", "l.npy", setup=_symlink("l.npy", "l.npy"),
      says="symbolic link loop"),
    C("run-input-dangling", "run", MODEL, "-i", "d.npy", setup=_symlink("gone.npy", "d.npy"),
      says="which does not exist"),
    C("run-input-not-npy", "run", MODEL, "-i", "x.txt", setup=_write("x.txt", b"1,2,3,4\n"), says="x.txt"),
    C("run-output-folder", *R, "-o", "odir", setup=_mkdir("odir"), says="is a folder"),
    C("run-output-folder-missing", *R, "-o", "nodir/y.npy", says="does not exist"),
    C("run-output-not-npy", *R, "-o", "y.csv", says=".npy or .npz"),
    C("export-output-folder", "export", MODEL, "-f", "requirements", "-o", "odir", setup=_mkdir("odir"),
      says="is a folder"),
    C("export-unknown-format", "export", MODEL, "-f", "nosuch", says="nosuch"),
    C("diff-python-missing", "diff", MODEL, "--python", "/nonexistent/python", says="/nonexistent/python"),
    C("diff-python-not-executable", "diff", MODEL, "--python", "notes.txt",
      setup=_write("notes.txt", b"not python\n"), says="notes.txt"),
    C("diff-python-folder", "diff", MODEL, "--python", "pdir", setup=_mkdir("pdir"), says="pdir"),
    C("diff-python-not-python", "diff", MODEL, "--python", "/bin/true", says="not a Python interpreter"),
    C("diff-python-script-not-python", "diff", MODEL, "--python", "fake-python",
      setup=_all(_write("fake-python", b"#!/bin/sh\necho 3.12.0\n"), _chmod("fake-python", 0o755)),
      says="not a Python interpreter"),
    # 1. permissions (as root too: without CAP_DAC_OVERRIDE)
    C("save-unreadable-model", "save", "locked/model.keras", no_dac=True,
      setup=_all(_mkdir("locked"), lambda w: shutil.copy2(w / MODEL, w / "locked" / MODEL),
                 _chmod("locked/model.keras", 0o000)), says="cannot be read"),
    C("save-readonly-folder", "save", "ro/model.keras", no_dac=True, setup=_model_in("ro", 0o555),
      says="cannot write"),
    C("save-unreadable-probe", "save", MODEL, "--probe", "p.npy", no_dac=True,
      setup=_all(_save_array("p.npy", X_BAD), _chmod("p.npy", 0o000)), says="p.npy"),
    C("run-unreadable-input", "run", MODEL, "-i", "u.npy", no_dac=True,
      setup=_all(_save_array("u.npy", X_BAD), _chmod("u.npy", 0o000)), says="u.npy"),
    C("run-readonly-output-folder", *R, "-o", "ro/y.npy", no_dac=True, setup=_mkdir("ro", 0o555),
      says="cannot write"),
    C("export-readonly-output-folder", "export", MODEL, "-f", "requirements", "-o", "ro/req.txt",
      no_dac=True, setup=_mkdir("ro", 0o555), says="cannot write"),
    C("show-unreadable-manifest", "show", MODEL, no_dac=True,
      setup=_chmod(f"{SIDECAR}/{MANIFEST}", 0o000), says="cannot be read"),
    C("show-unreadable-sidecar", "show", MODEL, no_dac=True, setup=_chmod(SIDECAR, 0o000),
      says="cannot be read"),
    C("run-unreadable-sidecar-lock", "run", MODEL, "-i", "x.npy", no_dac=True,
      setup=_chmod(f"{SIDECAR}/requirements.lock.txt", 0o000), says="requirements.lock.txt"),
    C("check-unreadable-model", "check", MODEL, no_dac=True, setup=_chmod(MODEL, 0o000),
      says=MODEL),
    C("env-home-readonly-empty", "env", MODEL, code=EXIT_ENV, no_dac=True,
      setup=_mkdir("home-ro", 0o555), env={"ENVLOCK_HOME": "home-ro"}, says="home-ro"),
    # 8. environment variables
    C("home-is-a-file", "cache", "list", setup=_write("homefile", b""), env={"ENVLOCK_HOME": "homefile"},
      says="ENVLOCK_HOME"),
    C("config-dir-is-a-file", "cache", "list", setup=_write("cfg", b""),
      env={"ENVLOCK_CONFIG_DIR": "cfg"}, says="ENVLOCK_CONFIG_DIR"),
    C("http-timeout-word", "cache", "list", env={"ENVLOCK_HTTP_TIMEOUT": "abc"}, says="ENVLOCK_HTTP_TIMEOUT"),
    C("http-timeout-negative", "cache", "list", env={"ENVLOCK_HTTP_TIMEOUT": "-1"},
      says="ENVLOCK_HTTP_TIMEOUT"),
    C("http-timeout-nan", "cache", "list", env={"ENVLOCK_HTTP_TIMEOUT": "nan"}, says="ENVLOCK_HTTP_TIMEOUT"),
    C("offline-maybe", "cache", "list", env={"ENVLOCK_OFFLINE": "maybe"}, says="ENVLOCK_OFFLINE"),
    C("conda-installer-bogus", "cache", "list", env={"ENVLOCK_CONDA_INSTALLER": "bogus"},
      says="ENVLOCK_CONDA_INSTALLER"),
    C("uv-index-url-bracket", "cache", "list", env={"UV_INDEX_URL": "http://[::1"}, says="UV_INDEX_URL"),
    C("uv-index-url-words", "cache", "list", env={"UV_INDEX_URL": "not a url"}, says="UV_INDEX_URL"),
    C("pip-index-url-ftp", "cache", "list", env={"PIP_INDEX_URL": "ftp://example.org/simple"},
      says="PIP_INDEX_URL"),
    C("extra-index-bad-port", "cache", "list", env={"UV_EXTRA_INDEX_URL": "http://example.org:port/"},
      says="UV_EXTRA_INDEX_URL"),
    C("uv-index-url-run", *R, env={"UV_INDEX_URL": "http://[::1"}, says="UV_INDEX_URL"),
    C("http-timeout-save-json", "save", MODEL, "--json", env={"ENVLOCK_HTTP_TIMEOUT": "soon"},
      says="ENVLOCK_HTTP_TIMEOUT"),
    # 2, 3. archives: .keras models
    C("keras-deep-config", "save", "deep.keras",
      setup=lambda w: _keras_with(w, "deep.keras", {"config.json": _deep_json()}), says="nested too deeply"),
    C("keras-metadata-list", "save", "meta.keras",
      setup=lambda w: _keras_with(w, "meta.keras", {"metadata.json": b"[1, 2]", "config.json": b"{}"}),
      says="metadata.json holds a JSON list"),
    C("keras-config-string", "save", "cfg.keras",
      setup=lambda w: _keras_with(w, "cfg.keras", {"config.json": b'"model"'}), says="config.json"),
    C("keras-config-not-json", "save", "bad.keras",
      setup=lambda w: _keras_with(w, "bad.keras", {"config.json": b"{nope"}), says="not JSON"),
    C("keras-config-not-utf8", "save", "bin.keras",
      setup=lambda w: _keras_with(w, "bin.keras", {"config.json": b"\xff\xfe{}"}), says="config.json"),
    C("keras-no-config", "save", "noc.keras",
      setup=lambda w: _keras_with(w, "noc.keras", {"metadata.json": b"{}"}), says="without config.json"),
    C("keras-unsupported-compression", "save", "comp.keras",
      setup=_all(lambda w: _keras_with(w, "comp.keras", {"config.json": b"{}"}),
                 lambda w: _zip_flag(w / "comp.keras", "config.json", method=99)), says="comp.keras"),
    C("keras-encrypted", "save", "enc.keras",
      setup=_all(lambda w: _keras_with(w, "enc.keras", {"config.json": b"{}"}),
                 lambda w: _zip_flag(w / "enc.keras", "config.json", encrypted=True)), says="encrypted"),
    C("keras-truncated", "save", "cut.keras",
      setup=lambda w: (w / "cut.keras").write_bytes((w / MODEL).read_bytes()[:4000]), says="cut.keras"),
    C("keras-bad-crc", "save", "crc.keras",
      setup=_all(lambda w: _keras_with(w, "crc.keras", {"config.json": b"{}" + b" " * 100}),
                 lambda w: _flip_crc(w / "crc.keras")),
      says="crc.keras"),
    C("keras-zip-bomb", "save", "bomb.keras", setup=None, says="zip bomb"),  # setup from source.bomb
    C("keras-zip-bomb-json", "save", "bomb.keras", "--json", setup=None, says="zip bomb"),
    # inputs: .npy
    C("npy-truncated", "run", MODEL, "-i", "t.npy", setup=_write("t.npy", _npy_header((5, 4)) + b"\0" * 7),
      says="truncated"),
    C("npy-trillion-rows", "run", MODEL, "-i", "big.npy",
      setup=_write("big.npy", _npy_header((10**12, 4)) + b"\0" * 64), says="1000000000000 rows"),
    C("npy-header-only", "run", MODEL, "-i", "h.npy", setup=_write("h.npy", b"\x93NUMPY\x01\x00"),
      says="h.npy"),
    C("npy-bad-magic", "run", MODEL, "-i", "m.npy", setup=_write("m.npy", b"PK\x03\x04 not numpy at all"),
      says="m.npy"),
    C("npy-wrong-shape", "run", MODEL, "-i", "s.npy", setup=_save_array("s.npy", np.zeros((5, 3), "float32")),
      says="shape"),
    C("npy-wrong-rank", "run", MODEL, "-i", "r.npy", setup=_save_array("r.npy", np.zeros((5,), "float32")),
      says="shape"),
    C("npy-complex", "run", MODEL, "-i", "c.npy", setup=_save_array("c.npy", np.zeros((5, 4), "complex64")),
      says="dtype"),
    C("npy-pickled-objects", "run", MODEL, "-i", "o.npy",
      setup=_save_array("o.npy", np.array([[{"a": 1}] * 4] * 5, dtype=object)), says="o.npy"),
    C("npy-no-rows", "run", MODEL, "-i", "z.npy", setup=_save_array("z.npy", np.zeros((0, 4), "float32")),
      says="no rows"),
    C("npy-strings", "run", MODEL, "-i", "u.npy", setup=_save_array("u.npy", np.full((5, 4), "a")),
      says="dtype"),
    C("npy-trillion-rows-json", "run", MODEL, "-i", "big.npy", "--json",
      setup=_write("big.npy", _npy_header((10**12, 4)) + b"\0" * 64), says="truncated"),
    # inputs: .npz
    C("npz-not-a-zip", "run", MODEL, "-i", "n.npz", setup=_write("n.npz", b"not a zip"), says="n.npz"),
    C("npz-empty", "run", MODEL, "-i", "e.npz", setup=lambda w: _npz(w / "e.npz", {}),
      says="without any array"),
    C("npz-pickled", "run", MODEL, "-i", "p.npz",
      setup=lambda w: _npz(w / "p.npz", {"features": np.array([[None] * 4] * 5, dtype=object)}),
      says="p.npz"),
    C("npz-wrong-names", "run", MODEL, "-i", "k.npz",
      setup=lambda w: _npz(w / "k.npz", {"a": X_BAD, "b": X_BAD}), says="features"),
    C("npz-encrypted", "run", MODEL, "-i", "enc.npz",
      setup=_all(lambda w: _npz(w / "enc.npz", {"features": X_BAD}),
                 lambda w: _zip_flag(w / "enc.npz", "features.npy", encrypted=True)), says="enc.npz"),
    C("npz-unsupported-compression", "run", MODEL, "-i", "cm.npz",
      setup=_all(lambda w: _npz(w / "cm.npz", {"features": X_BAD}),
                 lambda w: _zip_flag(w / "cm.npz", "features.npy", method=99)), says="cm.npz"),
    C("npz-truncated-member", "run", MODEL, "-i", "tm.npz",
      setup=lambda w: _keras_with(w, "tm.npz", {"features.npy": _npy_header((5, 4)) + b"\0" * 3}),
      says="truncated"),
    C("npz-bad-header", "run", MODEL, "-i", "bh.npz",
      setup=lambda w: _keras_with(w, "bh.npz", {"features.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': 7}"}),
      says="bh.npz"),
    C("npz-shape-mismatch", "run", MODEL, "-i", "sm.npz",
      setup=lambda w: _npz(w / "sm.npz", {"features": np.zeros((5, 9), "float32")}), says="shape"),
    # 6. outputs that would overwrite the user's own files
    C("run-output-is-input", *R, "-o", "x.npy", says="the input"),
    C("run-output-is-input-dotted", *R, "-o", "./x.npy", says="the input"),
    C("run-output-hardlink-to-input", *R, "-o", "hard.npy",
      setup=lambda w: os.link(w / "x.npy", w / "hard.npy"),
      says="the input"),
    C("run-output-symlink-to-input", *R, "-o", "soft.npy", setup=_symlink("x.npy", "soft.npy"),
      says="the input"),
    C("run-output-in-sidecar", *R, "-o", f"{SIDECAR}/probe.npz", says="sidecar"),
    C("run-output-new-file-in-sidecar", *R, "-o", f"{SIDECAR}/new.npy", says="sidecar"),
    C("export-output-is-model", "export", MODEL, "-f", "requirements", "-o", MODEL, says="the model"),
    C("export-output-in-sidecar", "export", MODEL, "-f", "requirements", "-o", f"{SIDECAR}/REPRODUCE.md",
      says="sidecar"),
    C("export-output-link-to-model", "export", MODEL, "-f", "requirements", "-o", "m.txt",
      setup=_symlink(MODEL, "m.txt"), says="the model"),
    C("run-output-is-input-json", *R, "-o", "x.npy", "--json", says="the input"),
    # 5. sidecar content: self-consistent but invalid (only validation can tell)
    C("manifest-no-model", "show", MODEL, setup=lambda w: _rewrite_manifest(w, _set("model", _DELETE)),
      says="model: missing"),
    C("manifest-model-string", "show", MODEL, setup=lambda w: _rewrite_manifest(w, _set("model", "x")),
      says="model: expected object"),
    C("manifest-probe-null", "run", MODEL, "-i", "x.npy",
      setup=lambda w: _rewrite_manifest(w, _set("probe", None)), says="probe"),
    C("manifest-probe-missing", "check", MODEL,
      setup=lambda w: _rewrite_manifest(w, _set("probe", _DELETE)), says="probe: missing"),
    C("manifest-atol-string", "check", MODEL,
      setup=lambda w: _rewrite_manifest(w, _set("probe.tolerance.atol", "tiny")),
      says="probe.tolerance.atol"),
    C("manifest-atol-negative", "check", MODEL,
      setup=lambda w: _rewrite_manifest(w, _set("probe.tolerance.atol", -1)), says="probe.tolerance.atol"),
    C("manifest-batch-zero", "run", MODEL, "-i", "x.npy",
      setup=lambda w: _rewrite_manifest(w, _set("probe.batch_size", 0)), says="probe.batch_size"),
    C("manifest-shape-string", "run", MODEL, "-i", "x.npy",
      setup=lambda w: _rewrite_manifest(w, _set("model.inputs.0.shape", "4")), says="model.inputs[0].shape"),
    C("manifest-inputs-empty", "run", MODEL, "-i", "x.npy",
      setup=lambda w: _rewrite_manifest(w, _set("model.inputs", [])), says="model.inputs"),
    C("manifest-python-version-missing", "env", MODEL,
      setup=lambda w: _rewrite_manifest(w, _set("python.version", _DELETE)), says="python.version"),
    C("manifest-custom-object-string", "show", MODEL,
      setup=lambda w: _rewrite_manifest(w, _set("custom_objects", ["tinylayers.Scale"])),
      says="custom_objects[0]"),
    C("manifest-format-unknown", "export", MODEL, "-f", "requirements",
      setup=lambda w: _rewrite_manifest(w, _set("model.format", "onnx")), says="model.format"),
    C("manifest-weights-null", "check", MODEL,
      setup=lambda w: _rewrite_manifest(w, _set("weights", None)), says="weights"),
    C("probe-npz-pickled", "run", MODEL, "-i", "x.npy",
      setup=lambda w: _rewrite_manifest(w, lambda m: None, _pickled_probe), says="Python objects"),
    C("lock-not-utf8", "show", MODEL,
      setup=lambda w: _rewrite_manifest(w, lambda m: None, _latin1_lock), says="not UTF-8"),
    C("manifest-lists-outside-file", "show", MODEL, setup=_outside_file, says="outside the sidecar"),
    C("manifest-not-json", "show", MODEL, setup=_write(f"{SIDECAR}/{MANIFEST}", b"{nope"),
      says="not valid JSON"),
    C("manifest-json-list", "show", MODEL, setup=_write(f"{SIDECAR}/{MANIFEST}", b"[]"),
      says="not a JSON object"),
    C("manifest-deep-json", "show", MODEL, setup=_write(f"{SIDECAR}/{MANIFEST}", _deep_json()),
      says="nested too deeply"),
    C("manifest-version-string", "show", MODEL,
      setup=_write(f"{SIDECAR}/{MANIFEST}", b'{"schema_version": "1"}'),
      says="schema_version"),
    C("manifest-version-future", "show", MODEL,
      setup=_write(f"{SIDECAR}/{MANIFEST}", b'{"schema_version": 99}'),
      says="newer"),
    C("sidecar-tampered-lock", "run", MODEL, "-i", "x.npy",
      setup=lambda w: (w / SIDECAR / "requirements.lock.txt").open("a").write("# edited\n"), says="modified"),
    C("sidecar-added-file", "show", MODEL, setup=_write(f"{SIDECAR}/code/evil.py", b"import os\n"),
      says="added file"),
    C("manifest-invalid-json-output", "show", MODEL, "--json",
      setup=lambda w: _rewrite_manifest(w, _set("model", "x")), says="model"),
]


# --- the harness --------------------------------------------------------------------------------


def _env(home: Path, extra: dict[str, str], w: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("ENVLOCK_", "UV_INDEX", "UV_EXTRA", "UV_DEFAULT_INDEX", "PIP_INDEX", "PIP_EXTRA")):
            del env[k]
    env["ENVLOCK_HOME"] = str(home)
    env["NO_COLOR"] = "1"
    for k, v in extra.items():
        env[k] = str(w / v) if k in ("ENVLOCK_HOME", "ENVLOCK_CONFIG_DIR") and not os.path.isabs(v) else v
    return env


def assert_one_error(stderr: str, code: int) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[0].startswith("envlock: error: "), stderr
    assert len(lines) <= 2, f"more than an error and a hint:\n{stderr}"
    if len(lines) == 2:
        assert lines[1].startswith("  hint: "), stderr
    return lines[0]


def assert_error_document(stdout: str, code: int) -> dict[str, Any]:
    doc = json.loads(stdout)
    jsonschema.validate(doc, load_schema("error"))
    assert doc["exit_code"] == code and doc["schema"] == "envlock.error/1"
    return dict(doc)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, source: Source, tmp_path: Path) -> None:
    as_root = os.geteuid() == 0
    if case.no_dac and as_root and SETPRIV is None:
        pytest.skip("as root, permission cases need setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    w = tmp_path / "work"
    _populate(w, source)
    if case.id.startswith("keras-zip-bomb"):
        shutil.copy2(source.bomb, w / "bomb.keras")
    if case.setup is not None:
        case.setup(w)
    before = snapshot(w)
    home = tmp_path / "home"
    argv = [sys.executable, "-m", "envlock", *case.args]
    if case.no_dac and as_root:
        argv = [*NO_DAC, *argv]
    proc = subprocess.run(argv, cwd=w, env=_env(home, case.env, w), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == case.code, f"exit {proc.returncode}\n{proc.stderr}"
    line = assert_one_error(proc.stderr, case.code)
    assert case.says in line, line
    if "--json" in case.args:
        assert_error_document(proc.stdout, case.code)
    else:
        assert proc.stdout == ""
    # Leaves every file of the user's exactly as it was: nothing written, moved or left behind.
    after = snapshot(w)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)
    commands = {c.args[0] for c in CASES if c.args}
    assert {"save", "run", "check", "diff", "env", "show", "export", "cache"} <= commands


def test_a_zip_bomb_is_refused_before_it_is_inflated(source: Source, tmp_path: Path) -> None:
    """256 MiB of config.json in a small archive: refused from its declared size, in bounded
    memory (the limit on the child's address space would stop a full inflate)."""
    import resource

    w = tmp_path / "w"
    w.mkdir()
    shutil.copy2(source.bomb, w / "bomb.keras")
    assert (w / "bomb.keras").stat().st_size < 2 << 20

    def limit() -> None:  # pragma: no cover - in the child
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = subprocess.run([sys.executable, "-m", "envlock", "save", "bomb.keras"], cwd=w,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env=_env(tmp_path / "home", {}, w))
    assert proc.returncode == EXIT_BAD, proc.stderr
    assert "zip bomb" in assert_one_error(proc.stderr, EXIT_BAD)


def test_a_read_only_cache_still_lists_what_it_holds(source: Source, tmp_path: Path) -> None:
    if SETPRIV is None or os.geteuid() != 0:
        pytest.skip("needs setpriv as root")
    home = tmp_path / "home"
    (home / "envs").mkdir(parents=True)
    os.chmod(home / "envs", 0o555)
    os.chmod(home, 0o555)
    proc = subprocess.run([*NO_DAC, sys.executable, "-m", "envlock", "cache", "list", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=_env(home, {}, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["environments"] == []


def test_an_internal_error_is_exit_70_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A bug cannot be produced on purpose through the real CLI: a command that raises a plain
    exception stands in for one."""
    from envlock import cli

    def broken(args: Any, out: Any) -> int:
        raise KeyError("not a user's mistake")

    monkeypatch.setattr(cli, "cmd_cache_list", broken)
    assert cli.main(["cache", "list", "--json"]) == EXIT_INTERNAL
    captured = capsys.readouterr()
    line = assert_one_error(captured.err, EXIT_INTERNAL)
    assert "internal error" in line and "--debug" in captured.err
    assert assert_error_document(captured.out, EXIT_INTERNAL)["error"] == "InternalError"


def test_a_3000_character_message_is_cut_to_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    from envlock import cli
    from envlock.errors import EnvironmentBuildError

    cli._report_error(EnvironmentBuildError("x" * 3000 + "\n" + "y" * 100), debug=False)
    line = assert_one_error(capsys.readouterr().err, EXIT_ENV)
    assert len(line) < 500 and "more characters; --debug shows all" in line


def test_every_envlock_variable_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    used = set()
    for path in (ROOT / "envlock").rglob("*.py"):
        import re

        used |= set(re.findall(r"ENVLOCK_[A-Z_]+[A-Z]", path.read_text(encoding="utf-8")))
    assert used <= set(VARIABLES), used - set(VARIABLES)
    missing = [v for v in VARIABLES if f"`{v}`" not in readme]
    assert not missing, missing
    for code in ("`70`", "`130`", "`143`"):
        assert code in readme
    assert "envlock never writes over its inputs" in readme


# --- network failures: four different messages ----------------------------------------------------


@pytest.fixture(scope="module")
def http_503() -> Iterator[str]:
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple"
    server.shutdown()


def _refused_url() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/simple"


SIX = "six==1.17.0 --hash=sha256:4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274\n"


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["uv", "pip"])
@pytest.mark.parametrize("problem", ["refused", "http"])
def test_an_unreachable_index_is_not_a_deleted_version(installer: str, problem: str, tmp_path: Path,
                                                        http_503: str) -> None:
    import platform

    from envlock.envs.cache import EnvCache
    from envlock.envs.key import EnvSpec
    from envlock.errors import NetworkError
    from envlock.settings import Settings

    url = _refused_url() if problem == "refused" else http_503
    lock = tmp_path / "lock.txt"
    lock.write_text(SIX)
    settings = Settings.from_env({"ENVLOCK_HOME": str(tmp_path / "home"), "UV_INDEX_URL": url,
                                  "UV_CACHE_DIR": str(tmp_path / "uv-cache")})
    with pytest.raises(NetworkError) as err:
        EnvCache(settings, installer=installer).ensure(EnvSpec.from_lock(lock, platform.python_version()))
    assert err.value.kind == problem
    assert "no longer available" not in str(err.value) and url in str(err.value)
    assert err.value.hint and "--find-links" not in err.value.hint.split(";")[0]


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_an_index_that_never_answers_is_a_timeout(installer: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers. envlock gives pip ENVLOCK_HTTP_TIMEOUT
    and bounded retries (pip's own would retry for minutes), so this takes seconds for both."""
    import platform
    import socket

    from envlock.envs.cache import EnvCache
    from envlock.envs.key import EnvSpec
    from envlock.errors import NetworkError
    from envlock.settings import Settings

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)  # the kernel completes the handshakes; nobody ever reads or writes
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
    lock = tmp_path / "lock.txt"
    lock.write_text(SIX)
    monkeypatch.setenv("UV_HTTP_TIMEOUT", "2")
    settings = Settings.from_env({"ENVLOCK_HOME": str(tmp_path / "home"), "UV_INDEX_URL": url,
                                  "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "ENVLOCK_HTTP_TIMEOUT": "2"})
    try:
        with pytest.raises(NetworkError) as err:
            EnvCache(settings, installer=installer).ensure(EnvSpec.from_lock(lock, platform.python_version()))
    finally:
        silent.close()
    assert err.value.kind == "timeout" and "timed out" in str(err.value)
    assert err.value.exit_code == 3


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_a_hash_mismatch_names_the_package(installer: str, tmp_path: Path) -> None:
    import platform

    from envlock.envs.cache import EnvCache
    from envlock.envs.key import EnvSpec
    from envlock.errors import EnvironmentBuildError
    from envlock.settings import Settings

    lock = tmp_path / "lock.txt"
    lock.write_text("six==1.17.0 --hash=sha256:" + "0" * 64 + "\n")
    settings = Settings.from_env({"ENVLOCK_HOME": str(tmp_path / "home")})
    with pytest.raises(EnvironmentBuildError, match=r"^six==1\.17\.0: the file served for it does not"):
        EnvCache(settings, installer=installer).ensure(EnvSpec.from_lock(lock, platform.python_version()))


# --- --json of every command, success and failure, against the published schemas ----------------


def test_the_schemas_are_valid_and_published() -> None:
    names = schema_names()
    assert {"manifest", "error", "save", "show", "run", "check", "diff", "env", "export", "cache.list",
            "cache.gc"} <= set(names)
    for name in names:
        jsonschema.Draft202012Validator.check_schema(load_schema(name))


def _json_cli(args: list[str], cwd: Path, home: Path) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "envlock", *args, "--json"], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=_env(home, {}, cwd))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.slow
def test_json_of_every_command_validates(source: Source, tmp_path: Path, envlock_home: Path) -> None:
    from envlock.sidecar.manifest import validate

    w = tmp_path / "w"
    _populate(w, source)
    x = np.load(w / "x.npy")
    x[2, 1] = np.nan
    np.save(w / "nan.npy", x)
    shutil.copy2(source.model.parent / "tinylayers.py", w)  # save imports the custom layer's module
    home = envlock_home  # the session's: saved_tiny's code is trusted there
    runs = {
        "show": ["show", MODEL],
        "run": ["run", MODEL, "-i", "nan.npy", "-o", "y.npy"],
        "check": ["check", MODEL],
        "diff": ["diff", MODEL],
        "export": ["export", MODEL, "-f", "requirements"],
        "cache.list": ["cache", "list"],
        "cache.gc": ["cache", "gc", "--older-than", "36500"],
        "save": ["save", MODEL],
    }
    for name, args in runs.items():
        code, doc = _json_cli(args, w, home)
        assert code == 0, (name, doc)
        jsonschema.validate(doc, load_schema(name))
        assert validate(doc, load_schema(name)) == []  # envlock's own validator agrees
        if name == "run":
            assert doc["nonfinite_rows"] == 1
        if name == "show":
            jsonschema.validate(doc["manifest"], load_schema("manifest"))
    failures = {
        "show": ["show", "missing.keras"],
        "run": ["run", MODEL, "-i", "x.npy", "-o", "x.npy"],
        "check": ["check", MODEL, "--atol", "-1"],
        "diff": ["diff", MODEL, "--python", "/nonexistent"],
        "env": ["env", "/"],
        "export": ["export", MODEL, "-f", "nosuch"],
        "cache.gc": ["cache", "gc", "--max-size", "-1"],
        "save": ["save", "missing.keras"],
    }
    for name, args in failures.items():
        code, doc = _json_cli(args, w, home)
        assert code == EXIT_BAD, (name, doc)
        jsonschema.validate(doc, load_schema("error"))


@pytest.mark.slow
def test_env_json_validates(source: Source, tmp_path: Path, envlock_home: Path) -> None:
    w = tmp_path / "w"
    _populate(w, source)
    code, doc = _json_cli(["env", MODEL], w, envlock_home)
    assert code == 0, doc
    jsonschema.validate(doc, load_schema("env"))


# --- signals: SIGTERM like Ctrl-C, nothing half-written ------------------------------------------


def _worker_pids(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_run_leaves_nothing_behind(sig: int, code: int, source: Source, tmp_path: Path,
                                                   envlock_home: Path) -> None:
    w = tmp_path / "w"
    _populate(w, source)
    np.save(w / "big.npy", np.random.default_rng(1).standard_normal((4_000_000, 4)).astype("float32"))
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = _env(envlock_home, {}, w)
    env["TMPDIR"] = str(private_tmp)
    before = snapshot(w)
    proc = subprocess.Popen([sys.executable, "-m", "envlock", "run", MODEL, "-i", "big.npy", "-o", "out.npy"],
                            cwd=w, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    # Predicting: the scratch folder beside the output exists only then.
    while not any(p.name.startswith(".out.npy.envlock-") for p in w.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached predict"
        time.sleep(0.1)
    time.sleep(0.5)
    assert _worker_pids(str(private_tmp)), "no worker running"
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    print(f"exit {proc.returncode} {took:.2f}s after {signal.Signals(sig).name}")
    assert proc.returncode == code, err
    assert_one_error(err, code)
    assert snapshot(w) == before  # no out.npy, no .out.npy.envlock-* folder
    assert list(private_tmp.iterdir()) == []  # no envlock-run-* left in TMPDIR
    for _ in range(50):
        if not _worker_pids(str(private_tmp)):
            break
        time.sleep(0.1)
    assert _worker_pids(str(private_tmp)) == [], "the worker outlived envlock"


@pytest.mark.slow
def test_sigterm_during_save_keeps_the_old_sidecar(source: Source, tmp_path: Path,
                                                   envlock_home: Path) -> None:
    w = tmp_path / "w"
    _populate(w, source)
    shutil.copy2(source.model.parent / "tinylayers.py", w)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = _env(envlock_home, {}, w)
    env["TMPDIR"] = str(private_tmp)
    before = snapshot(w)
    proc = subprocess.Popen([sys.executable, "-m", "envlock", "save", MODEL], cwd=w, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not _worker_pids(str(private_tmp)) or not any(private_tmp.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "save never started its worker"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert_one_error(err, 143)
    assert snapshot(w) == before  # the old sidecar as it was, no .tmp- folder beside it
    assert list(private_tmp.iterdir()) == []  # no envlock-save-* left
    for _ in range(50):
        if not _worker_pids(str(private_tmp)):
            break
        time.sleep(0.1)
    assert _worker_pids(str(private_tmp)) == [], "the worker outlived envlock"


def test_the_typed_manifest_of_a_real_sidecar(source: Source) -> None:
    sc = read_sidecar(source.model)
    jsonschema.validate(sc.manifest, load_schema("manifest"))
    typed = sc.typed
    assert typed.model.file == MODEL and typed.model.format == "keras"
    assert typed.probe is not None and typed.probe.tolerance.atol >= 0
    assert [s.name for s in typed.model.inputs] == [s.name for s in typed.probe.inputs]
    assert set(typed.files) == {p.relative_to(sc.path).as_posix() for p in sc.path.rglob("*")
                                if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts}
