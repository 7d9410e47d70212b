"""The command line and the package around it: main's own argv, shell completion, the typed
public API (checked by the pinned mypy), py.typed in the wheel, the dev lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from envlock import cli

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_main_parses_the_argv_it_is_given(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["envlock", "save", "--no-such-option"])
    assert cli.main(["cache", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == "envlock.cache.list/1"


@pytest.mark.slow
def test_save_records_the_command_main_was_given(tiny_project: Path, tmp_path: Path) -> None:
    """The manifest's command is the argv passed to main, not the process's sys.argv."""
    shutil.copy(tiny_project / "model.keras", tmp_path / "my model.keras")
    for f in tiny_project.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    res = _python("import sys; from envlock.cli import main; sys.argv = ['embedding-app', '--serve'];"
                  "sys.exit(main(['save', 'my model.keras', '--seed', '3', '--json']))", tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "my model.keras.envlock" / "envlock.json").read_text())
    assert manifest["command"] == "envlock save 'my model.keras' --seed 3 --json"


def test_print_completion_and_complete_a_command_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "envlock", "--print-completion", "bash"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "complete " in res.stdout and "envlock" in res.stdout

    def complete(line: str) -> set[str]:
        out = tmp_path / "completions"
        done = subprocess.run(
            [sys.executable, "-m", "envlock"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
                 "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(out)})
        assert done.returncode == 0, done.stderr
        return {word.strip() for word in out.read_text().split("\n")} - {""}

    assert {"list", "gc"} <= complete("envlock cache ")
    assert {"save", "run", "check", "diff", "env", "export", "show", "cache"} <= complete("envlock ")
    assert {"--probe"} <= complete("envlock save model.keras --pro")


def test_print_completion_rejects_an_unknown_shell() -> None:
    res = subprocess.run([sys.executable, "-m", "envlock", "--print-completion", "cmd.exe"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("envlock: error:") and "cmd.exe" in res.stderr


API_USER = """
from __future__ import annotations

import numpy as np

import envlock

x = np.zeros((4, 3), dtype="float32")
saved = envlock.save(object(), "model.keras", probe=x, atol=1e-6, vendor=False,
                     keras_options={"include_optimizer": False})
hashed: int = saved.hashed
envlock.lock("model.keras", probe="probe.npy", seed=3, custom_objects=["layers"])
envlock.prewarm(custom_objects=["layers"])
with envlock.load("model.keras", strategy="venv", timeout=30.0) as session:
    y = session.predict(x, batch_size=8)
ran = envlock.run("model.keras", "x.npy", output="y.npy", batch_size=16, find_links=["wheels"])
rows: int = ran.rows
ok: bool = envlock.check("model.keras", atol=1e-5, strategy="current").ok
"""

API_MISUSE = """
import envlock

envlock.save(object(), "model.keras", include_optimizer=False)
envlock.check("model.keras", atol="tight")
envlock.run("model.keras")
name: str = envlock.lock("model.keras").hashed
"""


def test_mypy_type_checks_the_api_and_finds_its_misuse(tmp_path: Path) -> None:
    (tmp_path / "user_script.py").write_text(textwrap.dedent(API_USER))
    (tmp_path / "misuse.py").write_text(textwrap.dedent(API_MISUSE))
    # envlock is found as an installed package (the editable install), which mypy reads only
    # because it ships py.typed; --no-incremental: no cache shared with ./dev lint. One run for
    # both files: mypy's start-up is most of the cost.
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                          "--follow-imports=silent", "user_script.py", "misuse.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    errors = [line for line in res.stdout.splitlines() if ": error:" in line]
    assert res.returncode == 1 and errors and all(e.startswith("misuse.py:") for e in errors), res.stdout
    assert len(errors) == 4, res.stdout
    assert 'Unexpected keyword argument "include_optimizer"' in errors[0]
    assert '"atol"' in errors[1] and '"input_path"' in errors[2] and "int" in errors[3]


def test_the_api_has_no_catch_all_keyword_arguments() -> None:
    import inspect

    import envlock

    for name in ("save", "lock", "load", "run", "check", "prewarm"):
        fn = getattr(envlock, name)
        kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, name
        assert fn.__doc__ and len(fn.__doc__) > 60, name


def test_the_wheel_ships_py_typed(tmp_path: Path) -> None:
    from uv import find_uv_bin  # the dev group's uv

    uv = find_uv_bin()
    res = subprocess.run([uv, "build", "--wheel", "-q", "-o", str(tmp_path), str(ROOT)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("envlock-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "envlock/py.typed" in names
    assert {"envlock/cli/__init__.py", "envlock/cli/parse.py", "envlock/cli/render.py"} <= set(names)


def test_the_dev_lock_pins_the_lint_tools_of_the_dev_group() -> None:
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib

    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]
    locked = {}
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            req = Requirement(line.split(" \\")[0].split(" ;")[0])
            locked.setdefault(req.name, set()).add(str(req.specifier).lstrip("="))
    for entry in groups["lint"]:
        req = Requirement(entry)
        assert str(req.specifier).startswith("=="), f"{entry}: lint tools are pinned exactly"
        assert locked[req.name] == {str(req.specifier)[2:]}, entry
    for entry in groups["dev"]:
        if isinstance(entry, str):
            req = Requirement(entry)
            assert req.name in locked, f"{req.name} is in the dev group but not in requirements-dev.txt"
            assert all(req.specifier.contains(v) for v in locked[req.name]), entry
