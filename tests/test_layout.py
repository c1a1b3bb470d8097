"""The library never imports a command-line module (the CLIs sit on top of it), r3 never
imports the top-level ``kernels`` name, which Hugging Face's ``kernels`` distribution also uses,
and every result file the README and the results' own pages name exists."""

from __future__ import annotations

import ast
import re
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

R3 = Path(__file__).resolve().parents[1] / "r3"
CLIS = {"r3.cli", "r3.evaluate", "r3.failures", "r3.generate", "r3.plot", "r3.audit", "r3.forgetting",
        "r3.report", "r3.train", "r3.launch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(R3.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports: absolute and relative imports (resolved against its
    package), and a string literal naming an r3 module or ``kernels`` (``importlib.import_module``)."""
    names = set()
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module:
                names.add(module)
            names |= {f"{module}.{a.name}" if module else a.name for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and (node.value.startswith("r3.") or node.value.split(".")[0] == "kernels"):
            names.add(node.value)
    return names


def test_imported_sees_relative_and_dynamic_imports(tmp_path, monkeypatch):
    pkg = R3 / "tasks" / "x.py"  # (a name only: nothing is written inside r3)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "from ..cli import ArgumentParser\nfrom . import base\nimport importlib\n"
        "importlib.import_module('r3.train')\n"))
    assert {"r3.cli", "r3.cli.ArgumentParser", "r3.tasks", "r3.tasks.base", "r3.train"} <= imported(pkg)


LIBRARY = sorted(p for p in R3.rglob("*.py") if module_name(p) not in CLIS)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: module_name(p))
def test_library_module_imports_no_cli(path):
    assert not (imported(path) & CLIS), f"{module_name(path)} imports {sorted(imported(path) & CLIS)}"


def test_every_cli_module_exists():
    assert all((R3 / f"{name.split('.')[1]}.py").is_file() for name in CLIS)
    assert len(LIBRARY) > 15


@pytest.mark.parametrize("path", sorted(R3.rglob("*.py")), ids=lambda p: module_name(p))
def test_r3_imports_its_kernels_as_r3_kernels(path):
    """``kernels`` is DESIGN.md's contract name, but also the import name of Hugging Face's
    ``kernels`` (transformers >= 5.25 requires it); r3 uses ``r3.kernels`` so it works next to it."""
    top = {n.split(".")[0] for n in imported(path)}
    assert "kernels" not in top, f"{module_name(path)} imports the top-level kernels package"


def test_r3_runs_where_another_kernels_package_comes_first(tmp_path):
    """Where Hugging Face's ``kernels`` is installed, ``import kernels`` outside this checkout finds
    it. Every r3 module still imports, and the training loss's kernel runs (a stand-in package on
    the path ahead of the checkout plays Hugging Face's)."""
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\ndef get_kernel(*args, **kwargs):\n    raise RuntimeError\n")
    script = """
import importlib, pkgutil, sys
import torch
import r3
names = [m.name for m in pkgutil.walk_packages(r3.__path__, "r3.")]
for name in names:
    importlib.import_module(name)
import kernels
assert getattr(kernels, "FOREIGN", False), kernels.__file__
from r3.batch import fused_logprob_kl
logits = torch.randn(3, 7, requires_grad=True)
logp, kl = fused_logprob_kl(logits, torch.tensor([0, 6, 2]), torch.zeros(3))
(logp.sum() + kl.sum()).backward()
ref = torch.log_softmax(logits.detach(), -1)[torch.arange(3), torch.tensor([0, 6, 2])]
torch.testing.assert_close(logp.detach(), ref)
print("imported", len(names))
"""
    repo = R3.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(foreign.parent), str(repo)]))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 30


def _run_from_checkout(script: str, path: list[Path], *argv, only_these_kernels: bool = False):
    """``script`` in a fresh interpreter in the checkout, with ``path`` first on ``sys.path``.
    ``only_these_kernels``: once torch and r3 are imported, the path keeps no other directory
    holding a ``kernels`` package than ``path``'s (site-packages may hold Hugging Face's)."""
    if only_these_kernels:
        script = """
import os, sys
import r3.kernels
keep = set(sys.argv[1:])
sys.path[:] = [p for p in sys.path if p in keep or not os.path.isdir(os.path.join(p or ".", "kernels"))]
""" + script
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in path))
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)], cwd=R3.parent, env=env,
                          capture_output=True, text=True, timeout=300)


def _foreign_kernels(site: Path, init: str) -> None:
    """A stand-in for Hugging Face's ``kernels``: its __init__ imports a submodule by the absolute
    name, as theirs does (``from kernels._internals... import``)."""
    (site / "kernels" / "_internals").mkdir(parents=True)
    (site / "kernels" / "_internals" / "__init__.py").write_text("")
    (site / "kernels" / "_internals" / "layer.py").write_text("class CUDAProperties:\n    pass\n")
    (site / "kernels" / "__init__.py").write_text(init)


def test_from_the_checkout_another_kernels_package_is_what_import_kernels_gives(tmp_path):
    """Run from the checkout (its root first on the path), ``import kernels`` finds DESIGN.md's
    package here first. Where another ``kernels`` is installed (Hugging Face's, which transformers
    >= 5.25 imports), that one is loaded in its place with r3's names added: transformers gets its
    names, the contract's name still works, and a name of the other package's own is not replaced."""
    site = tmp_path / "site"
    _foreign_kernels(site, "from kernels._internals.layer import CUDAProperties\nk3 = 'theirs'\n")
    script = """
import sys
import kernels
from kernels import CUDAProperties
import kernels.logprob_kl
import r3.kernels
from r3.kernels import logprob_kl
assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__
assert sys.modules["kernels"] is kernels and kernels.k3 == "theirs"
assert kernels.fused_logprob_kl is r3.kernels.fused_logprob_kl
assert kernels.logprob_kl_reference is r3.kernels.logprob_kl_reference
assert kernels.logprob_kl is logprob_kl and sys.modules["kernels.logprob_kl"] is logprob_kl
assert "installed_elsewhere" not in vars(kernels)
print("ok")
"""
    proc = _run_from_checkout(script, [R3.parent, site], site)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "ok", proc.stdout[-3000:] + proc.stderr[-3000:]


def test_another_kernels_package_found_by_an_import_hook_is_found(tmp_path):
    """One that no ``sys.path`` entry holds but an import finder serves (an editable install of
    Hugging Face's ``kernels``) is found too."""
    site = tmp_path / "elsewhere"
    _foreign_kernels(site, "from kernels._internals.layer import CUDAProperties\n")
    script = """
import importlib.util
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "kernels":
            init = os.path.join(sys.argv[2], "kernels", "__init__.py")
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
sys.meta_path.append(Finder())
import kernels
from kernels import CUDAProperties, fused_logprob_kl
print(kernels.__file__)
"""
    proc = _run_from_checkout(script, [R3.parent], R3.parent, site, only_these_kernels=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert Path(proc.stdout.split()[-1]) == site / "kernels" / "__init__.py", proc.stdout


@pytest.mark.parametrize("foreign", [True, False])
def test_two_checkouts_on_one_path_pass_each_other_over(tmp_path, foreign):
    """Another r3 checkout's ``kernels/`` is not another package: the import goes on to Hugging
    Face's if it is installed, and is this checkout's own if not (not an endless hand-over)."""
    import shutil

    other = tmp_path / "other_checkout"
    (other / "kernels").mkdir(parents=True)
    shutil.copy(R3.parent / "kernels" / "__init__.py", other / "kernels" / "__init__.py")
    site = tmp_path / "site"
    if foreign:
        _foreign_kernels(site, "from kernels._internals.layer import CUDAProperties\n")
    script = """
import kernels
from kernels import fused_logprob_kl
print(kernels.__file__)
"""
    path = [R3.parent, other, site]
    proc = _run_from_checkout(script, path, *path, only_these_kernels=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    home = site if foreign else R3.parent
    assert Path(proc.stdout.split()[-1]) == home / "kernels" / "__init__.py", proc.stdout


def test_another_thread_waits_for_the_other_kernels_package_to_finish(tmp_path):
    """While the other package's __init__ runs in its place, an import of it in another thread
    waits for it, as for any module being imported, instead of taking the unfinished module."""
    site = tmp_path / "site"
    _foreign_kernels(site, """
import threading, time
def _late():
    try:
        from kernels import LATE
        RESULT.append(LATE)
    except ImportError as e:
        RESULT.append(repr(e))
RESULT = []
THREAD = threading.Thread(target=_late)
THREAD.start()
time.sleep(0.5)
LATE = "finished"
""")
    script = """
import kernels
kernels.THREAD.join()
print(kernels.RESULT)
"""
    proc = _run_from_checkout(script, [R3.parent, site])
    assert proc.stdout.strip().splitlines()[-1:] == ["['finished']"], proc.stdout[-3000:] + proc.stderr[-3000:]


def test_from_the_checkout_a_broken_other_kernels_package_fails_as_itself(tmp_path):
    """Where the other ``kernels`` cannot be imported, ``import kernels`` from the checkout raises
    its error, as it would anywhere else, and leaves no half-made module behind."""
    site = tmp_path / "site"
    _foreign_kernels(site, "from kernels._internals.layer import Missing\n")
    script = """
import sys
try:
    import kernels
except ImportError as e:
    print("raised", e.name, "kernels" in sys.modules)
"""
    proc = _run_from_checkout(script, [R3.parent, site])
    assert proc.stdout.split()[-3:] == ["raised", "kernels._internals.layer", "False"], proc.stdout + proc.stderr


def test_only_an_editable_install_ships_the_top_level_kernels_name(tmp_path):
    """A regular wheel holds r3 alone (its ``kernels/`` would overwrite Hugging Face's package in
    site-packages); the README's editable install also maps ``kernels`` to the checkout."""
    import json
    import shutil

    build_meta = pytest.importorskip("setuptools.build_meta")
    if not hasattr(build_meta, "build_editable"):
        pytest.skip("setuptools < 64 has no editable wheels")
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None:  # (built in from setuptools 70.1)
        pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(R3.parent / name, src / name)
    for name in ("r3", "kernels"):
        shutil.copytree(R3.parent / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = """
import json, os, zipfile
from setuptools import build_meta
wheel = zipfile.ZipFile("wheel/" + build_meta.build_wheel("wheel")).namelist()
os.makedirs("metadata")
metadata = build_meta.prepare_metadata_for_build_editable("metadata")  # (pip's sequence, PEP 660)
editable = zipfile.ZipFile("editable/" + build_meta.build_editable("editable", None, "metadata/" + metadata))
finder = [editable.read(n).decode() for n in editable.namelist() if n.endswith("_finder.py")]
print(json.dumps({"wheel": wheel, "finder": finder[0] if finder else ""}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tops = {n.split("/")[0] for n in out["wheel"]}
    assert "kernels" not in tops and "r3/kernels/logprob_kl.py" in out["wheel"], sorted(tops)
    assert f"'kernels': '{src / 'kernels'}'" in out["finder"] and f"'r3': '{src / 'r3'}'" in out["finder"], out["finder"]


RESULT_NAME = re.compile(r"(?<![\w/.-])(?:benchmarks/results/)?((?:report_demo/[\w.-]+|(?:learning_curve|sampler|kernels"
                         r"|train_step|memory_plan|forgetting|function_calling|fuzz_verifiers|gpu_check)_[\w.{},*<>-]*)"
                         r"\.(?:jsonl|json|md|png))")


def expand_braces(name: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [x for part in m.group(1).split(",") for x in expand_braces(name[:m.start()] + part + name[m.end():])]


def result_names(text: str) -> set[str]:
    """Every result file a text names, with ``{a,b}`` expanded and ``*`` / ``<commit>`` as globs."""
    return {re.sub(r"<[^<>]*>", "*", n) for m in RESULT_NAME.finditer(text) for n in expand_braces(m.group(1))}


def test_result_names_are_read_with_braces_and_globs():
    text = ("`benchmarks/results/kernels_cpu.md`, `learning_curve_cpu_b32_seed{0,2}.json`, "
            "`learning_curve_cpu_seed*_<commit>.json`, [x](benchmarks/results/report_demo/report.md); not "
            "r3/report.py, RUN/report/report.md, --out forgetting.json or xlam_function_calling_60k.json")
    assert result_names(text) == {"kernels_cpu.md", "learning_curve_cpu_b32_seed0.json", "report_demo/report.md",
                                  "learning_curve_cpu_b32_seed2.json", "learning_curve_cpu_seed*_*.json"}


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.name for p in (R3.parent / "benchmarks" / "results").glob("*.md"))])
def test_every_result_file_a_document_names_exists(doc):
    """A published number points at its source file: a result renamed or removed leaves no dangling name."""
    results = R3.parent / "benchmarks" / "results"
    path = R3.parent / doc if doc == "README.md" else results / doc
    names = result_names(path.read_text(encoding="utf-8"))
    missing = sorted(n for n in names if not list(results.glob(n)))
    assert not missing, f"{doc} names result files that do not exist: {missing}"


def test_the_readme_layout_names_every_r3_module():
    """The README's Layout table is where a new reader finds which file does what: five modules
    (errors, partial_results, precision, toolchain, tracking) were missing from it."""
    text = (R3.parent / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]
    modules = [f"r3/{p.name}" for p in sorted(R3.glob("*.py")) if p.name != "__init__.py"]
    packages = [f"r3/{p.name}/" for p in sorted(R3.iterdir()) if (p / "__init__.py").is_file()]
    missing = [name for name in modules + packages if f"`{name}`" not in layout]
    assert not missing, f"the README's Layout table does not name {missing}"
