"""The layering contract (import-linter, ``[tool.importlinter]`` in pyproject.toml) covers every module of the
package, and the package keeps it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "himap"


def _layers() -> list[set[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in config if c["type"] == "layers"]
    return [{name.strip(" ()") for name in layer.split(":")} for layer in contract["layers"]]


def _modules() -> set[str]:
    """Top-level modules and packages of himap; a package that mixes layers (analysis) by submodule."""
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                       if (p / "__init__.py").is_file()}
    names -= {"__init__", "__main__", "analysis"}
    return names | {f"analysis.{p.stem}" for p in (PACKAGE / "analysis").glob("*.py") if p.stem != "__init__"}


def test_every_module_is_in_a_layer():
    listed = set().union(*_layers())
    assert _modules() <= listed, f"not in any layer of the contract: {sorted(_modules() - listed)}"


def test_the_package_keeps_its_layers():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
