"""The installed distribution is what the tests exercise, and it is complete: every source folder with an
``__init__.py`` imports as ``spike_audit.<folder>`` from the install, and every command's ``--help`` runs
through the console script."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("schemas", "auditors", "pipelines")


def _packages() -> list[str]:
    found = []
    for top in TOP:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT).parts
            found.append(".".join(("spike_audit",) + parts))
    return found


def _modules() -> list[str]:
    found = []
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "__init__.py":
                continue
            parts = path.with_suffix("").relative_to(ROOT).parts
            found.append(".".join(("spike_audit",) + parts))
    return found


def test_the_checkout_itself_is_not_importable_under_the_package_names():
    # The top-level names of the folders would shadow other PyPI projects; nothing may import them.
    assert not (ROOT / "spike_audit").exists()
    for name in TOP:
        assert name not in sys.modules or not str(getattr(sys.modules[name], "__file__", "")).startswith(str(ROOT))


@pytest.mark.parametrize("name", _packages())
def test_every_source_package_is_in_the_installed_distribution(name):
    mod = importlib.import_module(name)
    assert mod.__doc__, f"{name}/__init__.py needs a docstring saying what lives there and what it may import"


@pytest.mark.parametrize("name", _modules())
def test_every_source_module_imports_from_the_installed_distribution(name):
    importlib.import_module(name)


def _console_script() -> str:
    exe = Path(sys.executable).parent / "spike-audit"
    return str(exe) if exe.exists() else shutil.which("spike-audit")


def test_every_command_has_help_through_the_console_script():
    from spike_audit.pipelines.cli.main import COMMANDS

    script = _console_script()
    assert script, "the spike-audit console script is not installed"
    env = dict(os.environ, PYTHONPATH="")
    top = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, cwd="/")
    assert top.returncode == 0, top.stderr
    for cmd in COMMANDS:
        out = subprocess.run([script, cmd, "--help"], capture_output=True, text=True, env=env, cwd="/")
        assert out.returncode == 0, (cmd, out.stderr)
        assert f"spike-audit {cmd}" in out.stdout, (cmd, out.stdout)


def test_schema_reference_is_printed_by_the_installed_module():
    out = subprocess.run([sys.executable, "-m", "spike_audit.schemas"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "docs" / "schemas.md").read_text()
