"""The package's layout holds: the import contracts in pyproject.toml pass, and they cover every top-level module."""

import subprocess
import sys
from pathlib import Path

import pytest

import vlcache

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(vlcache.__file__).resolve().parent


def test_the_import_contracts_hold():
    pytest.importorskip("importlinter")  # in the dev extra; CI also runs `lint-imports` itself
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_top_level_module_sits_in_a_layer():
    """A new top-level module or package must be placed in the layers contract, or nothing checks its imports."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # 3.10: the same parser as tomli, which import-linter needs there
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c.get("containers") == ["vlcache"]]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    present = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert present == placed
