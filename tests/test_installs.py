"""Reproducible installs: every way pumpwatch is installed takes what uv.lock pins.

README's two commands, `.ci/run` and the Dockerfile install through `uv sync --locked` (which
refuses a lock that disagrees with pyproject.toml) after a hash-checked pip install of the pinned
uv. These tests keep it so, and check the lock against pyproject.toml themselves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"
PIP_UV = "pip install -q --require-hashes -r requirements/uv.txt"


def readme_commands() -> list[str]:
    """The shell commands of README's first screen, in order."""
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_the_readme_commands_install_what_the_lock_pins() -> None:
    demo, tests = readme_commands()
    for command in (demo, tests):
        assert PIP_UV in command
        assert re.search(r"\.venv/bin/uv sync -q --locked --inexact\b", command), command
    assert demo.endswith(".venv/bin/pumpwatch demo")
    assert "--extra lab" in demo
    assert "--extra dev" in tests
    assert tests.endswith(".venv/bin/pytest")


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    _, tests = readme_commands()
    lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert lines[-1] == tests


def test_the_image_installs_from_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements/uv.txt" in dockerfile
    assert "uv sync --locked --no-editable" in dockerfile
    assert "pip install ." not in dockerfile


def test_the_pinned_uv_is_the_one_installed_and_hashed() -> None:
    wanted = (ROOT / "requirements" / "uv.in").read_text().strip()
    hashed = (ROOT / "requirements" / "uv.txt").read_text()
    assert re.search(rf"^{re.escape(wanted)} \\$", hashed, re.MULTILINE), wanted
    assert hashed.count("--hash=sha256:") >= 2
    version = subprocess.run(
        [str(UV), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert wanted == f"uv=={version}"


def _lock_check(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(UV), "lock", "--check", "--offline", "--project", str(project)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_lock_agrees_with_pyproject() -> None:
    checked = _lock_check(ROOT)
    assert checked.returncode == 0, checked.stderr


def test_a_dependency_added_without_relocking_is_caught(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    control = _lock_check(tmp_path)
    assert control.returncode == 0, control.stderr  # the copy agrees before the change
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '    "rich>=13",\n' in text
    pyproject.write_text(text.replace('    "rich>=13",\n', '    "rich>=13",\n    "tabulate",\n'))
    checked = _lock_check(tmp_path)
    assert checked.returncode != 0
    # uv names the stale lock, or (offline, with a cache that lacks some package the new
    # resolution needs) says it cannot resolve: either way the lock no longer installs.
    reasons = ("needs to be updated", "tabulate", "No solution found")
    assert any(reason in checked.stderr for reason in reasons), checked.stderr


@pytest.mark.parametrize("package", ["msgspec", "fastapi", "asyncpg", "pydantic"])
def test_installed_versions_are_the_locked_ones(package: str) -> None:
    from importlib.metadata import version

    lock = (ROOT / "uv.lock").read_text()
    locked = re.findall(rf'^name = "{package}"\nversion = "([^"]+)"', lock, re.MULTILINE)
    assert locked, package
    assert version(package) in locked
