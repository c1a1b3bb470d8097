import sys

from setuptools import find_packages, setup

# The top-level `kernels` package (DESIGN.md's contract name; it re-exports r3.kernels) is installed
# only by an editable install (the README's), which maps the name to this checkout and is consulted
# only when nothing else on the path is called `kernels`. A built wheel would write
# site-packages/kernels/__init__.py over Hugging Face's `kernels` distribution (transformers >= 5.25
# requires it), so a regular install ships r3 alone: r3 itself imports only r3.kernels.
EDITABLE = any(command in sys.argv[1:] for command in ("editable_wheel", "develop"))

setup(
    name="r3",
    version="0.1.0",
    description="Reflect, Retry, Reward: GRPO training of self-reflection, in pure PyTorch",
    packages=find_packages(include=["r3", "r3.*"] + (["kernels", "kernels.*"] if EDITABLE else [])),
    python_requires=">=3.10",
    # torch must be installed first (pip install torch==2.13.0) so pip never pulls a CUDA build.
    install_requires=[
        "torch>=2.9",  # the suite passes on 2.11 and 2.13; on 2.9 all but the compiled bf16 CPU decode; 2.6 fails
        # From 5.25 on transformers imports Hugging Face's `kernels`, whose import name the checkout's
        # top-level `kernels/` shares; run from the checkout, that package loads theirs in its place.
        "transformers>=4.56",  # (4.51.3 lacks Gemma 3's layer_types and the dtype= argument the tests use)
        "safetensors",
        "sentencepiece",
        "numpy",
        "gguf>=0.10",
        "pyyaml",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["r3-torchrun = r3.launch:main"]},
    extras_require={
        # accelerate: transformers needs it to load GGUF files, which the tests use as reference.
        # triton: the kernel tests run the Triton kernels in its CPU interpreter.
        # pyarrow: r3.forgetting reads parquet benchmark files with it (the tests write one).
        # tensorboard: --report-to tensorboard (the tests read its event files back).
        # sympy + antlr4 4.11: r3.forgetting --math-equivalence sympy (sympy's LaTeX parser needs 4.11).
        # pytest-xdist: the README's test command runs the suite on two processes.
        "test": ["pytest", "pytest-xdist", "accelerate", "triton", "pyarrow", "tensorboard", "sympy",
                 "antlr4-python3-runtime==4.11.*"],
        "triton": ["triton"],
        "parquet": ["pyarrow"],
        "tensorboard": ["tensorboard"],
        "math": ["sympy", "antlr4-python3-runtime==4.11.*"],
        "wandb": ["wandb"],
    },
)
