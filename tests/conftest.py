"""Shared fixtures: the built-in model (loaded once) and tiny random HF checkpoints made locally."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*non-writable.*")


_IN_FRESH_PROCESS = "R3_TEST_IN_FRESH_PROCESS"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "fresh_process: run the test alone in a new Python process (tests that read glibc's "
        "mallinfo2 after every op: its cost grows with the free chunks of a heap that earlier tests fragmented, "
        "from microseconds to milliseconds a call)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A ``fresh_process`` test runs as ``python -m pytest <its id>`` in a new process; its output
    is shown if it fails."""
    if pyfuncitem.get_closest_marker("fresh_process") is None or os.environ.get(_IN_FRESH_PROCESS):
        return None
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
                          cwd=str(pyfuncitem.config.rootpath), env={**os.environ, _IN_FRESH_PROCESS: "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{pyfuncitem.nodeid} failed in a fresh process:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}",
                    pytrace=False)
    return True


def pytest_terminal_summary(terminalreporter):
    """The versions a failure may depend on, next to the result line (also under ``-q``, in CI)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    names = ("torch", "transformers", "tokenizers", "huggingface_hub", "kernels", "triton", "gguf")
    terminalreporter.write_line("r3 versions: " + ", ".join(f"{n} {v(n)}" for n in names))


@pytest.fixture(scope="session")
def python_lines_run():
    """``run(fn, *args)``: the number of Python lines ``fn(*args)`` runs in r3's task modules, a
    count of work that, unlike a clock, does not depend on the machine or its load (a test of
    linear time doubles a text and expects about twice the lines, not four times). The call is
    made twice, and the second counted."""
    import sys

    def run(fn, *args) -> int:
        fn(*args)  # (once untraced: one-time work, a table built on first use, is not the input's)
        count = 0

        def local(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
            return local

        def tracer(frame, event, arg):
            return local if "/r3/tasks/" in frame.f_code.co_filename.replace("\\", "/") else None

        sys.settrace(tracer)
        try:
            fn(*args)
        finally:
            sys.settrace(None)
        return count

    return run


@pytest.fixture(scope="session")
def builtin():
    """(model, tokenizer) of the built-in smollm2-135m in fp32."""
    from r3.checkpoint import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def builtin_hf(tmp_path_factory):
    """transformers' own GGUF loading of the built-in model: the reference. Reading the GGUF takes
    transformers ~17 s, so under pytest-xdist the first worker that needs it saves the loaded
    weights and config for the others (transformers will not save a GGUF-loaded model itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from r3.checkpoint import builtin_gguf

    def from_gguf():
        f = builtin_gguf("smollm2-135m")
        return AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name).eval()

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return from_gguf()
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "builtin_hf"  # (the workers' common folder)
    with FileLock(str(shared) + ".lock"):
        if not (shared / "weights.pt").exists():
            model = from_gguf()
            shared.mkdir(exist_ok=True)
            model.config.save_pretrained(shared)
            torch.save(model.state_dict(), shared / "weights.tmp")
            os.replace(shared / "weights.tmp", shared / "weights.pt")
            return model
    state = torch.load(shared / "weights.pt", weights_only=True)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shared), dtype=state["lm_head.weight"].dtype)
    model.load_state_dict(state)
    model.tie_weights()
    return model.eval()


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def hf_rope(config) -> dict:
    """The RoPE parameters a transformers config runs with, as transformers 5 lists them in
    ``rope_parameters`` (Gemma 3: per layer type). transformers 4.x has no such field: its
    rotary embeddings read ``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor``, and
    Gemma 3's sliding layers ``rope_local_base_freq`` with no scaling."""
    if transformers_major() >= 5:
        return config.rope_parameters
    full = dict(config.rope_scaling or {})
    full["rope_type"] = full.pop("rope_type", full.pop("type", "default"))
    full["rope_theta"] = config.rope_theta
    if getattr(config, "partial_rotary_factor", None) is not None:
        full["partial_rotary_factor"] = config.partial_rotary_factor
    if config.model_type != "gemma3_text":
        return full
    return {"full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base_freq}}


def tiny_hf_config(kind: str, **overrides):
    """A tiny random config of one of the supported families, made with transformers' classes."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    if kind == "llama":  # Llama 3 RoPE scaling, tied embeddings
        cfg = LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500000.0,
        )
    elif kind == "smollm3":  # a NoPE layer (no_rope_layers 0) holding a sliding window of 8, attention and
        # MLP biases, embeddings tied by SmolLM3Config's default, weights large enough that RoPE matters
        from transformers import SmolLM3Config

        cfg = SmolLM3Config(**common, no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=8,
                            attention_bias=True, mlp_bias=True, rope_theta=500000.0,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    elif kind == "granite":  # its four scalars at values published 2b-class Granite configs use, biases, tied
        from transformers import GraniteConfig

        cfg = GraniteConfig(**common, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                            embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                            logits_scaling=8.0, rope_theta=10000000.0, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, initializer_range=0.2)
    elif kind == "olmo2":  # norms on the outputs only, q/k norms over all heads, attention biases, untied,
        # weights large enough that attention (so how q and k are normed) matters
        from transformers import Olmo2Config

        cfg = Olmo2Config(**common, attention_bias=True, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, initializer_range=0.2)
    elif kind == "olmo3":  # OLMo 2's layout with a sliding-window layer (window 8) turning RoPE by its own
        # base, and a full layer with YaRN (OLMo 3 7B's scaling, over a small original context)
        from transformers import Olmo3Config

        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                   "rope_theta": 500000.0}}
        cfg = Olmo3Config(**common, attention_bias=True, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=8, rope_parameters=rope, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          initializer_range=0.2)
    elif kind == "gemma2":  # Gemma 3's block without q/k norms, one RoPE base, sliding layers every other
        # one, and its caps: scores and logits through c * tanh(x / c), small enough here to bite
        from transformers import Gemma2Config

        cfg = Gemma2Config(**{**common, "hidden_size": 48, "head_dim": 24}, tie_word_embeddings=True,
                           query_pre_attn_scalar=20, sliding_window=8, attn_logit_softcapping=3.0,
                           final_logit_softcapping=4.0, rope_theta=10000.0, bos_token_id=2, eos_token_id=1,
                           pad_token_id=0, initializer_range=0.2)
    elif kind == "ministral3":  # Mistral's layout with Ministral 3's YaRN (mscale = mscale_all_dim: cos/sin
        # unscaled) and its queries scaled past a small original context (16: the test lengths pass it)
        from transformers import Ministral3Config

        rope = {"type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16,
                "max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
        cfg = Ministral3Config(**{**common, "head_dim": 16}, tie_word_embeddings=False, rope_parameters=rope,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    elif kind == "qwen2":  # q/k/v bias, untied
        cfg = Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0)
    elif kind == "mistral":  # sliding window that matters at the test lengths
        cfg = MistralConfig(**{**common, "head_dim": 24}, tie_word_embeddings=False, sliding_window=8)
    elif kind == "qwen3":  # per-head q/k RMSNorm, an explicit head_dim unlike hidden / heads, tied
        cfg = Qwen3Config(**{**common, "head_dim": 24}, tie_word_embeddings=True, rope_theta=1000000.0)
    elif kind == "phi3":  # fused qkv / gate_up, LongRoPE as Phi-3.5 ships it (factor 4, attention factor)
        g = torch.Generator().manual_seed(7)
        half = common["hidden_size"] // common["num_attention_heads"] // 2
        cfg = Phi3Config(**common, tie_word_embeddings=False, original_max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         rope_scaling={"type": "longrope",
                                       "short_factor": (1 + 2 * torch.rand(half, generator=g)).tolist(),
                                       "long_factor": (4 + 20 * torch.rand(half, generator=g)).tolist()})
    elif kind == "gemma3":  # (1 + w) norms, four per block, GeGLU, scaled embeddings, a query scale
        # unlike head_dim's, sliding and full layers with their own RoPE (linear scaling on full only)
        from transformers import Gemma3TextConfig

        # (hidden 48: sqrt(48) is not a bf16 number, so rounding the embedding scale shows; a
        # local base unlike transformers' default)
        # (transformers 4.x takes the same RoPE as rope_theta, rope_scaling and rope_local_base_freq:
        # it keeps a rope_parameters it is given as an unread extra field)
        rope = dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
                    ) if transformers_major() >= 5 else dict(
            rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=20000.0)
        cfg = Gemma3TextConfig(**{**common, "hidden_size": 48, "head_dim": 24}, tie_word_embeddings=True,
                               query_pre_attn_scalar=20,
                               sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                               bos_token_id=2, eos_token_id=1, pad_token_id=0, **rope)
    elif kind == "gemma4":  # Gemma 4 E2B's and 31B's parts at once: full layers with heads of their own
        # size and one kv head whose keys are the values, proportional RoPE, the last two layers
        # reading earlier layers' keys and values with MLPs twice as wide, per-layer inputs, a
        # final cap small enough to bite
        from transformers import Gemma4TextConfig

        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
        # (layer_types: read by Gemma4TextConfig's constructor, so an override goes in here, not after)
        types = overrides.pop("layer_types", ["sliding_attention", "full_attention", "sliding_attention",
                                              "sliding_attention", "full_attention"])
        cfg = Gemma4TextConfig(**{**common, "hidden_size": 48, "head_dim": 16, "num_hidden_layers": len(types)},
                               global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                               layer_types=types,
                               num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=8,
                               vocab_size_per_layer_input=256, sliding_window=8, final_logit_softcapping=4.0,
                               rope_parameters=rope, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                               pad_token_id=0, initializer_range=0.2)
    elif kind == "qwen35":  # Qwen 3.5: Gated DeltaNet layers (more value heads than key heads) around a gated
        # attention layer turning a quarter of each head, (1 + w) norms, untied
        from transformers import Qwen3_5TextConfig

        types = overrides.pop("layer_types", ["linear_attention", "linear_attention", "full_attention",
                                              "linear_attention"])
        cfg = Qwen3_5TextConfig(**{**common, "num_hidden_layers": len(types)}, head_dim=16, layer_types=types,
                                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                linear_value_head_dim=12, linear_conv_kernel_dim=4, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                                                 "mrope_section": [1, 1, 0], "mrope_interleaved": True},
                                bos_token_id=2, eos_token_id=1, pad_token_id=0)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_hf(path, kind: str, seed: int = 0, max_shard_size=None, **overrides):
    """Save a tiny random transformers model to ``path``; returns the transformers model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(kind, **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # (Gemma 4's: 1 at init would hide a loader that skips it)
                b.copy_(0.5 + torch.rand_like(b))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """kind -> (directory, transformers model) for llama, qwen2 (sharded), mistral, qwen3, phi3, gemma3,
    smollm3, olmo2, olmo3, granite, ministral3, gemma2 and gemma4."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3", "smollm3", "olmo2", "olmo3", "granite",
                 "ministral3", "gemma2", "gemma4"):
        shard = "100KB" if kind == "qwen2" else None
        out[kind] = (root / kind, make_tiny_hf(root / kind, kind, max_shard_size=shard))
    return out


def copy_without_chat_template(src, dst):
    """A copy of the model directory ``src`` at ``dst`` whose tokenizer has no chat template."""
    import json
    from pathlib import Path

    dst = Path(dst)
    dst.mkdir()
    for f in Path(src).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst



@pytest.fixture
def verifier_errors(monkeypatch):
    """Every verifier error noted during the test (a verifier that raised, or a plug-in ``verify``
    that returned no bool), kept as counted. ``Task.verify`` never raises: it judges such a text
    wrong, so a table of texts expected wrong passes on a crash unless someone looks. The test
    fails if any is left here at its end: a test that expects some checks them and clears the
    list. The verifier test files use it for every test (``pytestmark``)."""
    from r3.tasks import base

    seen: list[str] = []
    counted = base._note_error

    def note(task, error: str) -> None:
        seen.append(error)
        counted(task, error)

    monkeypatch.setattr(base, "_note_error", note)
    yield seen
    assert not seen, f"{len(seen)} verifier error(s), judged wrong only by the catch-all (first: {seen[0]})"
