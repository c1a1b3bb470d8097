"""The system compilers that torch.compile and Triton build code with, checked before a run starts.

``decode="compiled"`` on CPU has inductor build C++ with the system's C++ compiler; on CUDA,
Triton (the compiled decode step, and the training step's log-prob kernel) builds its kernel
launcher with a C compiler. On a machine without one (a slim container image) the first compiled
step or kernel launch fails with a traceback, a minute or a whole rollout in. These checks say so
in one line before anything is loaded or written.
"""

from __future__ import annotations

import os
import shutil

import torch

from r3.errors import R3Error


def inductor_cxx() -> str | None:
    """The C++ compiler inductor's CPU code would be built with (its own search: ``CXX``, else
    g++), or None when none runs."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError):  # (none found; CXX naming a file that does not run)
        return None


def triton_cc() -> str | None:
    """The C compiler Triton would build its launchers with (its own rule: ``CC``, else gcc, else
    clang), or None when there is none. Triton's custom build hook, when set, counts as one."""
    try:
        from triton import knobs

        if knobs.build.impl is not None:
            return "triton.knobs.build.impl"
    except (ImportError, AttributeError):
        pass
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def check_toolchain(device, *, compiled_decode: bool, triton_kernels: bool = False) -> None:
    """Refuse in one line when the work about to run needs a compiler the machine lacks:
    ``compiled_decode`` (``--decode compiled``) on ``device``, or ``triton_kernels`` (the
    training step's fused log-prob kernel, compiled by Triton on CUDA unless ``TRITON_INTERPRET``
    runs it in Triton's interpreter: :func:`r3.kernels.logprob_kl.triton_compiles`)."""
    device = torch.device(device)
    if compiled_decode and device.type == "cpu" and inductor_cxx() is None:
        from torch._inductor import config

        tried = ", ".join(str(c) for c in config.cpp.cxx if c) if isinstance(config.cpp.cxx, (list, tuple)) else str(config.cpp.cxx)
        raise R3Error(f"--decode compiled on CPU needs a C++ compiler: torch.compile builds the decode step with one, "
                      f"and none runs here (tried {tried}); install g++ (or set CXX to one), or use --decode eager")
    if device.type == "cuda" and (compiled_decode or triton_kernels) and triton_cc() is None:
        what = "training" if triton_kernels else "--decode compiled"
        fix = "" if triton_kernels else ", or use --decode eager"
        raise R3Error(f"{what} on CUDA needs a C compiler: Triton builds its kernel launchers with one, and there is "
                      f"no CC, gcc or clang here; install gcc (or set CC to one){fix}")
