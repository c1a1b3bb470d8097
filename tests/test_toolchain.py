"""A machine without the compiler that torch.compile or Triton needs gets one line before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from r3.errors import R3Error
from r3.toolchain import check_toolchain, inductor_cxx, triton_cc

HERE = Path(__file__).parent


def test_compiled_decode_on_cpu_needs_a_cxx_compiler(monkeypatch):
    from torch._inductor import cpp_builder, exc

    if inductor_cxx() is None:
        pytest.skip("no C++ compiler on this machine")
    check_toolchain("cpu", compiled_decode=True)  # (this machine has one)

    def none_found():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    assert inductor_cxx() is None
    check_toolchain("cpu", compiled_decode=False)  # eager needs none
    check_toolchain("cpu", compiled_decode=False, triton_kernels=True)  # (Triton's rule is CUDA's)
    with pytest.raises(R3Error, match=r"^--decode compiled on CPU needs a C\+\+ compiler: .*\(tried .*g\+\+.*\); "
                                      r"install g\+\+ \(or set CXX to one\), or use --decode eager$"):
        check_toolchain("cpu", compiled_decode=True)

    def not_executable():  # CXX naming a file that is not a program: inductor's search lets this through
        raise PermissionError(13, "Permission denied", "/tmp/not-a-compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", not_executable)
    with pytest.raises(R3Error, match="needs a C\\+\\+ compiler"):
        check_toolchain("cpu", compiled_decode=True)


def test_triton_on_cuda_needs_a_c_compiler(monkeypatch):
    """Triton's own rule (CC, else gcc, else clang), checked without a GPU: the device is only named."""
    try:
        from triton import knobs

        monkeypatch.setattr(knobs.build, "impl", None)
    except (ImportError, AttributeError):
        pass
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert triton_cc() is None
    check_toolchain("cuda", compiled_decode=False)  # eager inference runs no Triton
    with pytest.raises(R3Error, match=r"^--decode compiled on CUDA needs a C compiler: .*no CC, gcc or clang here; "
                                      r"install gcc \(or set CC to one\), or use --decode eager$"):
        check_toolchain("cuda", compiled_decode=True)
    for decode in (False, True):  # training's log-prob kernel runs in Triton whatever the decode
        with pytest.raises(R3Error, match=r"^training on CUDA needs a C compiler: .*set CC to one\)$"):
            check_toolchain("cuda:0", compiled_decode=decode, triton_kernels=True)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/clang" if name == "clang" else None)
    assert triton_cc() == "/usr/bin/clang"
    check_toolchain("cuda", compiled_decode=True, triton_kernels=True)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setenv("CC", "/opt/cc")
    check_toolchain("cuda", compiled_decode=True, triton_kernels=True)


@pytest.mark.parametrize("module,args", [
    ("r3.generate", ["--prompt", "hi", "--decode", "compiled"]),
    ("r3.evaluate", ["--n", "2", "--compile", "--out", "{tmp}/e.json"]),
    ("r3.train", ["--out", "{tmp}/run", "--decode", "compiled"]),
])
def test_clis_refuse_compiled_decode_without_a_compiler(module, args, tmp_path):
    """With no compiler on PATH (as in a slim container) each CLI stops in one line and writes nothing."""
    if inductor_cxx() is None:
        pytest.skip("no C++ compiler on this machine")
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "PATH": str(empty)}
    env.pop("CXX", None)
    proc = subprocess.run([sys.executable, "-m", module] + [a.format(tmp=tmp_path) for a in args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --decode compiled on CPU needs a C++ compiler"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]
