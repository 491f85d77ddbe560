"""The package layout shows the roles, and the import graph keeps them apart.

The site's side (``blossom_secure.site``) and the coordinator's side
(``blossom_secure.coordinator``) never import each other; both build on the ground floor and
the secure-aggregation core; only the runtimes, the CLI and the experiments import both.
A function-level import counts the same as a module-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import blossom_secure

PACKAGE = Path(blossom_secure.__file__).parent
#: Modules of the ground floor and the shared cores: they import neither side nor a runtime.
SHARED = ("errors", "blocks", "crypto", "config", "model", "_fs", "_system", "_toml", "exchange", "wire", "roster",
          "secagg", "audit")
SIDES = ("site", "coordinator")
UPPER = ("runtimes", "cli", "experiments")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``blossom_secure`` module a file imports, anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("blossom_secure.")}


def _top(module: str) -> str:
    return module.split(".")[1]


def _files_under(top: str) -> list[Path]:
    target = PACKAGE / top
    return sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


@pytest.mark.parametrize("side,other", [("site", "coordinator"), ("coordinator", "site")])
def test_one_side_never_imports_the_other(side, other):
    offenders = {_module_name(f): sorted(m for m in _imports(f) if _top(m) == other) for f in _files_under(side)}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("top", SHARED)
def test_the_shared_ground_imports_no_side_and_no_runtime(top):
    offenders = {_module_name(f): sorted(m for m in _imports(f) if _top(m) in SIDES + UPPER)
                 for f in _files_under(top)}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_module_sits_in_a_named_role():
    """A new top-level module has to be placed deliberately (a side, the shared ground, or above)."""
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert tops == set(SHARED) | set(SIDES) | set(UPPER)


def test_the_layout_check_sees_a_forbidden_import(tmp_path):
    """The checker itself: a function-level import of the other side is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from blossom_secure.coordinator.steps import RoundCoordinator\n")
    assert "blossom_secure.coordinator.steps" in _imports(probe)


def test_the_flower_client_app_module_loads_without_torch():
    """Flower starts a fresh ClientApp process for every message, and the module that holds
    it holds the ServerApp too: loading it must not load torch (seconds on a busy machine),
    so that a site's identify and secure-aggregation steps, which train nothing, answer
    within the stage's time. Only the offer and finish steps (training, evaluation) load it."""
    code = ("import sys, blossom_secure.runtimes.flower.apps, blossom_secure.site.steps; "
            "print(sorted(m for m in ('torch', 'monai', 'opacus') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-2000:]
