"""The library never imports a command-line module (the CLIs sit on top of it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

R3 = Path(__file__).resolve().parents[1] / "r3"
CLIS = {"r3.cli", "r3.evaluate", "r3.failures", "r3.generate", "r3.plot", "r3.audit", "r3.forgetting",
        "r3.report", "r3.train", "r3.launch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(R3.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


LIBRARY = sorted(p for p in R3.rglob("*.py") if module_name(p) not in CLIS)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: module_name(p))
def test_library_module_imports_no_cli(path):
    assert not (imported(path) & CLIS), f"{module_name(path)} imports {sorted(imported(path) & CLIS)}"


def test_every_cli_module_exists():
    assert all((R3 / f"{name.split('.')[1]}.py").is_file() for name in CLIS)
    assert len(LIBRARY) > 15
