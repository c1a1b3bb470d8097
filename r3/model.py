"""A decoder-only transformer for the Llama family (Llama 3.x, SmolLM2), SmolLM3, Granite 3, Qwen2/2.5,
Qwen3 (dense), Mistral, Ministral 3, Phi-3 / Phi-3.5, OLMo 2 and 3, Gemma 2, 3 and 4 (their language
models; Gemma 3 4b and larger, and Gemma 4, also hold a vision tower, which r3 leaves out, as
Ministral 3's and Mistral Small 3.x's).

One file, read in one sitting: RMSNorm, RoPE (default, linear, Llama-3, YaRN and LongRoPE scaling),
grouped-query attention through SDPA (with Qwen3's and Gemma 3's per-head RMSNorm on q and k),
SwiGLU (GeGLU for Gemma), tied or untied embeddings, and a static, preallocated KV cache.
SmolLM3 is Llama-shaped with NoPE layers: every fourth layer (``no_rope_layers``) attends without
RoPE. OLMo 2 norms each block's attention and MLP outputs instead of their inputs (no
``input_layernorm``), norms q and k over the whole projection (not per head) before RoPE, and
scales every norm in fp32 before rounding; OLMo 3 adds sliding-window layers (three of every four)
that turn RoPE unscaled with their own base. Granite 3 is Llama-shaped with four scalars: the
embeddings are multiplied by ``embedding_multiplier``, attention scores scaled by
``attention_multiplier`` (not 1/sqrt(head_dim)), each block's attention and MLP outputs by
``residual_multiplier`` before they join the residual, and the logits divided by ``logits_scaling``.
Ministral 3 is Mistral-shaped with each query scaled after RoPE by 1 + beta ln(1 + floor(p / L)) at
position p (Llama 4's attention temperature: exactly 1 before position L).

Gemma 3 differs in six places: its RMSNorm scales by ``1 + w`` (in fp32, then rounds), the
embeddings are multiplied by sqrt(hidden size), every block norms the attention and MLP outputs
too (four norms), the MLP gates with tanh-approximated GELU, attention scores are scaled by
``query_pre_attn_scalar ** -0.5``, and sliding-window layers turn RoPE with their own base
(``rope_local_base_freq``) while full-attention layers use ``rope_theta`` and its scaling.
Gemma 2 has the same block without the q/k norms and with one RoPE base, and caps the attention
scores and the logits with ``c * tanh(x / c)``: capped scores take no fused SDPA kernel, so its
attention is :func:`softcapped_attention`, computed as transformers' eager attention is.
Gemma 4 (dense) has Gemma 3's block with plain-weight norms (scaled in fp32), its values normed
too (no weight) and its scores scaled by 1, and varies it per layer: the full-attention layers have
heads of their own size and kv heads (their keys their values too where ``attention_k_eq_v``) and
turn RoPE proportionally (the first pairs at base ``theta ** (-2j / head_dim)``, the rest not at
all); its last ``kv_shared_layers`` layers compute no keys or values and attend over those of the
last earlier layer of their kind (so they hold no KV cache); each block adds a per-layer input
(a token's row of a per-layer table plus a projection of its embedding, gated by the block's
output) and is scaled by a fixed ``layer_scalar``.

Parameter names follow the Hugging Face state dict minus its ``model.`` prefix (see
``r3.checkpoint``), with one difference: every family holds q/k/v as one fused ``qkv_proj`` and
gate/up as one ``gate_up_proj`` (Phi-3's own layout), so a forward runs one matmul for each.
Checkpoints with separate ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` are fused
on load and split again on export (:func:`fuse_checkpoint_tensors`, :func:`split_for_checkpoint`).

Every matmul is a :class:`Linear`: an ``nn.Linear`` whose product a CPU backend may take over
while it holds a current prepacked copy of the weight (``r3.packed_linear``); the math stays here.

LongRoPE (Phi-3.5): transformers picks the short or the long factors per forward from the largest
position (long once it passes ``original_max_position_embeddings``) and scales cos/sin by the
attention factor. Tokens cached with the short factors then sit beside tokens rotated with the
long ones, which no KV cache can reproduce, so r3 runs these models up to
``original_max_position_embeddings`` positions (4096 for Phi-3.5-mini) and refuses longer
sequences with a clear error.

KV cache convention (what the sampler relies on): a row's token at position ``p`` lives in cache
slot ``p``. A forward with a cache takes explicit ``positions [B, T]``; it writes each token's
keys/values at its position, then every query attends to the slots ``s <= p`` of its own row
(and ``s > p - window`` for sliding-window layers). Rows are therefore independent: ragged prompts
are simply right-padded (pad tokens sit at positions past the row's end, and are overwritten by the
row's next real tokens before anything can attend to them).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from r3.errors import R3Error
from r3.linear_attention import causal_conv, gated_delta_rule, gated_delta_step, qk_normalize
from r3.rms_norm import gated_rms_norm, rms_norm

SUPPORTED_MODEL_TYPES = ("llama", "smollm3", "granite", "qwen2", "qwen3", "mistral", "ministral3", "phi3", "olmo2",
                         "olmo3", "gemma2", "gemma3_text", "gemma4_text", "qwen3_5_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "mistral": "MistralForCausalLM", "ministral3": "Ministral3ForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                     "olmo3": "Olmo3ForCausalLM",
                     "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                     "gemma4_text": "Gemma4ForCausalLM", "qwen3_5_text": "Qwen3_5ForCausalLM"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh"}
# Gemma2Config's defaults (gemma-2-2b's shapes) for the fields r3 would otherwise need
_GEMMA2_DEFAULTS = {"vocab_size": 256_000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}
# Gemma3TextConfig's defaults for the fields r3 would otherwise need or derive another way:
# transformers writes a sub-config as its difference from these, so the text_config of the vision
# checkpoints (google/gemma-3-4b-it: hidden_size, intermediate_size, num_hidden_layers,
# rope_scaling, sliding_window and nothing more) leaves them out
_GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
                         "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                         "head_dim": 256}
# Gemma4TextConfig's defaults for the fields r3 would otherwise need (a wrapper's text_config is
# written as its difference from them)
_GEMMA4_TEXT_DEFAULTS = {"vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216,
                         "num_hidden_layers": 30, "num_attention_heads": 8, "num_key_value_heads": 4,
                         "head_dim": 256}
# Qwen3_5TextConfig's defaults (Qwen3.5-9B's shapes) for the fields r3 would otherwise need; its
# linear-attention layers' are in _QWEN35_LINEAR_DEFAULTS
_QWEN35_TEXT_DEFAULTS = {"vocab_size": 248_320, "hidden_size": 4096, "intermediate_size": 12_288,
                         "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4,
                         "head_dim": 256}
_QWEN35_LINEAR_DEFAULTS = {"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                           "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}
# transformers' config defaults where they differ from LlamaConfig's (eps 1e-6, 2048 positions)
_DEFAULT_RMS_NORM_EPS = {"phi3": 1e-5, "olmo2": 1e-5, "olmo3": 1e-5, "ministral3": 1e-5}
_DEFAULT_MAX_POSITIONS = {"gemma2": 8192, "gemma3_text": 131_072, "gemma4_text": 131_072, "phi3": 4096, "qwen2": 32_768, "qwen3": 32_768, "qwen3_5_text": 32_768, "mistral": 131_072,
                          "smollm3": 32_768, "ministral3": 262_144}
# Ministral3Config's defaults (heads 128 wide and 8 kv heads, not hidden / heads and all heads)
_MINISTRAL3_DEFAULTS = {"vocab_size": 131_072, "hidden_size": 4096, "intermediate_size": 14_336,
                        "num_hidden_layers": 34, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
# Ministral3Config's RoPE where a config gives none: YaRN, and Llama 4's query scaling past the
# original context
_MINISTRAL3_DEFAULT_ROPE = {"type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0,
                            "original_max_position_embeddings": 16_384, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
_DEFAULT_ROPE_THETA = {"gemma3_text": 1_000_000.0, "smollm3": 2_000_000.0, "olmo3": 500_000.0}
_TIED_BY_DEFAULT = ("gemma2", "gemma3_text", "gemma4_text", "smollm3")
# Gemma2Config's tanh caps on the attention scores and on the logits (Gemma 3's are null)
_DEFAULT_SOFTCAPS = {"gemma2": (50.0, 30.0)}
# Fields that config.json may leave out (r3 then fills in transformers' default) but not write as
# null: transformers 5 cannot build the model from such a config (its config classes reject the
# null, or the model fails on it), so r3 refuses it rather than guess a value (tie_word_embeddings
# null, say, reads as untied in transformers 4.x but as tied by default in r3)
_NULL_REFUSED = ("rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")
_NULL_REFUSED_BY_TYPE = {
    "llama": ("hidden_act", "rope_theta", "attention_bias", "mlp_bias"),
    "smollm3": ("hidden_act", "rope_theta", "head_dim", "attention_bias", "mlp_bias", "use_sliding_window",
                "no_rope_layer_interval"),
    "granite": ("hidden_act", "rope_theta", "head_dim", "attention_bias", "mlp_bias", "embedding_multiplier",
                "attention_multiplier", "residual_multiplier", "logits_scaling"),
    "qwen2": ("hidden_act", "rope_theta", "head_dim", "use_sliding_window", "max_window_layers"),
    "qwen3": ("hidden_act", "rope_theta", "head_dim", "attention_bias", "use_sliding_window", "max_window_layers"),
    "mistral": ("hidden_act", "rope_theta", "num_key_value_heads"),
    "ministral3": ("hidden_act", "num_key_value_heads", "head_dim"),
    "phi3": ("hidden_act", "rope_theta", "head_dim", "partial_rotary_factor", "original_max_position_embeddings"),
    "olmo2": ("hidden_act", "rope_theta", "head_dim", "attention_bias"),
    "olmo3": ("hidden_act", "rope_theta", "head_dim", "attention_bias"),
    "gemma2": ("hidden_activation", "rope_theta", "head_dim", "num_key_value_heads", "attention_bias",
               "query_pre_attn_scalar"),
    "gemma3_text": ("head_dim", "num_key_value_heads", "attention_bias", "query_pre_attn_scalar"),
    "gemma4_text": ("head_dim", "num_key_value_heads", "attention_bias", "hidden_activation", "num_kv_shared_layers",
                    "attention_k_eq_v", "use_double_wide_mlp", "enable_moe_block", "hidden_size_per_layer_input"),
    "qwen3_5_text": ("hidden_act", "head_dim", "num_key_value_heads", "attention_bias", *_QWEN35_LINEAR_DEFAULTS),
}
KV_BUCKET = 64


def kv_bucket_ceil(n):
    """``n`` slots rounded up to a multiple of :data:`KV_BUCKET`: the KV lengths a step reads."""
    return -(-n // KV_BUCKET) * KV_BUCKET


@dataclass
class ModelConfig:
    """The architecture, as read from a Hugging Face ``config.json`` (see ``from_hf``)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3"|"longrope"|"yarn", ...}; None = default
    partial_rotary_factor: float = 1.0  # Phi-3 family: RoPE turns the first int(head_dim * f) dims
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE; OLMo 2: over all heads
    layer_windows: list = field(default_factory=list)  # per layer: None or sliding-window size
    nope_layers: list = field(default_factory=list)  # SmolLM3: the layers that attend without RoPE
    hidden_act: str = "silu"  # silu (SwiGLU) | gelu_pytorch_tanh (Gemma's GeGLU)
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by its -1/2 power (None: head_dim's)
    local_rope_theta: float | None = None  # Gemma 3, OLMo 3: sliding-window layers' RoPE base, unscaled
    # Gemma 2 (and a Gemma 3 config that sets them): scores, and the logits, put through c * tanh(x / c)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Ministral 3 (Llama 4's attention temperature): queries scaled by 1 + beta ln(1 + floor(p / length))
    # at position p, so by exactly 1 before position ``length``; beta 0 is none
    query_scaling_beta: float = 0.0
    query_scaling_length: int = 0
    # Granite 3 (module docstring): 1.0 and None elsewhere
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    # Gemma 4 (module docstring): the full-attention layers' head size and kv heads (None: head_dim,
    # num_key_value_heads), their keys taken as their values too, the last ``kv_shared_layers``
    # layers attending over the keys/values of an earlier layer (:meth:`kv_source`) with an MLP
    # twice as wide if ``double_wide_mlp``, and per-layer inputs of ``per_layer_input_size`` dims
    # per layer from a table of ``per_layer_vocab_size`` tokens (0: none)
    global_head_dim: int | None = None
    global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    # Qwen 3.5: the layers that are Gated DeltaNets (a causal conv and the gated delta rule over a
    # recurrent state, :mod:`r3.linear_attention`) instead of attention, their heads and conv
    # kernel; its attention layers gate their output by a sigmoid of a second query projection
    linear_layers: list = field(default_factory=list)
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv_kernel: int = 0
    attn_output_gate: bool = False
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    @property
    def gemma(self) -> bool:
        """Gemma's scaled embeddings, four norms per block and GeGLU (see the module docstring)."""
        return self.model_type in ("gemma2", "gemma3_text", "gemma4_text")

    @property
    def gemma4(self) -> bool:
        return self.model_type == "gemma4_text"

    @property
    def qwen35(self) -> bool:
        return self.model_type == "qwen3_5_text"

    def linear(self, i: int) -> bool:
        """Whether layer ``i`` is a Gated DeltaNet (Qwen 3.5), not attention."""
        return i in self.linear_layers

    @property
    def linear_conv_channels(self) -> int:
        """A Gated DeltaNet's fused q, k and v: the channels of its causal conv and conv state."""
        return 2 * self.linear_key_heads * self.linear_key_dim + self.linear_value_heads * self.linear_value_dim

    def full_attention(self, i: int) -> bool:
        return not self.layer_windows or self.layer_windows[i] is None

    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.global_head_dim and self.full_attention(i) else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.global_kv_heads if self.global_kv_heads and self.full_attention(i) else self.num_key_value_heads

    def layer_k_eq_v(self, i: int) -> bool:
        """Whether layer ``i``'s keys are its values too (Gemma 4's full-attention layers with
        ``attention_k_eq_v``: one projection, normed two ways)."""
        return self.attention_k_eq_v and self.full_attention(i)

    def layer_intermediate_size(self, i: int) -> int:
        return self.intermediate_size * (2 if self.double_wide_mlp and self.kv_source(i) != i else 1)

    def kv_source(self, i: int) -> int:
        """The layer whose keys and values layer ``i`` attends over: itself, or for one of Gemma 4's
        last ``kv_shared_layers`` layers the last earlier layer of its kind (sliding or full)."""
        first = self.num_hidden_layers - self.kv_shared_layers
        if i < first:
            return i
        return max(j for j in range(first) if self.full_attention(j) == self.full_attention(i))

    def cache_layers(self) -> list[int]:
        """The layers that hold keys and values in a KV cache, in order (every layer but Gemma 4's
        shared ones)."""
        return [i for i in range(self.num_hidden_layers) if self.kv_source(i) == i and not self.linear(i)]

    @property
    def olmo(self) -> bool:
        """OLMo 2's and 3's output norms, q/k norms over all heads and fp32-scaled norms (module docstring)."""
        return self.model_type in ("olmo2", "olmo3")

    @property
    def norm_style(self) -> str:
        """How this family's RMSNorm scales (:class:`RMSNorm`)."""
        return "gemma4" if self.gemma4 else "gemma" if self.gemma or self.qwen35 else "olmo" if self.olmo else ""

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that RoPE turns (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a config.json dict; anything we don't implement is an R3Error naming it."""

        def need(key):
            if key not in cfg or cfg[key] is None:
                raise R3Error(f"{source}: missing field '{key}'")
            return cfg[key]

        def integer(key, default=None):
            value = need(key) if default is None else cfg.get(key)
            return default if value is None else _positive(value, key, source, integral=True)

        def number(key, default):
            value = cfg.get(key)
            return default if value is None else _positive(value, key, source, integral=False)

        cfg = language_model_config(cfg, source)
        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise R3Error(
                f"{source}: unsupported model_type '{model_type}' "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in (*_NULL_REFUSED, *_NULL_REFUSED_BY_TYPE[model_type]):
            if key in cfg and cfg[key] is None and not (
                    key == "rope_theta" and isinstance(cfg.get("rope_parameters"), dict)
                    and cfg["rope_parameters"].get("rope_theta") is not None):
                raise R3Error(f"{source}: field '{key}' is null, from which transformers cannot build a "
                              f"'{model_type}' model either: give its value or leave the field out")
        gemma = model_type in ("gemma2", "gemma3_text", "gemma4_text")
        defaults = {"gemma2": _GEMMA2_DEFAULTS, "gemma3_text": _GEMMA3_TEXT_DEFAULTS, "gemma4_text": _GEMMA4_TEXT_DEFAULTS,
                    "ministral3": _MINISTRAL3_DEFAULTS, "qwen3_5_text": _QWEN35_TEXT_DEFAULTS}.get(model_type)
        if defaults:  # (what transformers fills in where a field is left out)
            cfg = {**cfg, **{k: v for k, v in defaults.items() if cfg.get(k) is None}}
        act_key = "hidden_activation" if gemma and cfg.get("hidden_activation") is not None else "hidden_act"
        act = cfg.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in _ACTIVATIONS or (_ACTIVATIONS[act] == "silu") == gemma:
            raise R3Error(f"{source}: unsupported {act_key} '{act}' for model_type '{model_type}' "
                          f"(only {'gelu_pytorch_tanh' if gemma else 'silu'})")
        if gemma:
            _check_gemma_extras(cfg, model_type, source)
        softcaps = _softcaps(cfg, model_type, source)
        n_layers = integer("num_hidden_layers")
        n_heads = integer("num_attention_heads")
        hidden = integer("hidden_size")
        # (Qwen3Config's default is 128, not hidden / heads: Qwen3-0.6B's heads are 128 wide, 1024 / 16 = 64)
        default_head_dim = 128 if model_type == "qwen3" else hidden // n_heads
        head_dim = integer("head_dim", default_head_dim) if cfg.get("head_dim") else default_head_dim
        if head_dim < 1:
            raise R3Error(f"{source}: hidden_size {hidden} is smaller than num_attention_heads {n_heads}")
        n_kv_heads = integer("num_key_value_heads", n_heads) if cfg.get("num_key_value_heads") else n_heads
        if n_heads % n_kv_heads:
            raise R3Error(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                          f"num_key_value_heads {n_kv_heads}")

        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
        for key in ("rope_parameters", "rope_scaling"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise R3Error(f"{source}: field '{key}' must be an object, got {cfg[key]!r}")
        rope = dict(cfg.get("rope_parameters") or {})
        if model_type == "ministral3" and not rope and not cfg.get("rope_scaling"):
            rope = dict(_MINISTRAL3_DEFAULT_ROPE)  # (Ministral3Config's, whatever a top-level rope_theta says)
        local_theta = gemma4_scaling = None
        layered = model_type in ("gemma3_text", "olmo3")  # (RoPE per layer type)
        if model_type == "gemma4_text":
            gemma4_scaling, theta, local_theta = _gemma4_rope(cfg, rope, source)
            rope = {"rope_theta": theta}
        elif model_type == "gemma3_text":  # per layer type (transformers 5), or rope_theta / rope_local_base_freq
            rope, local_theta = _gemma_rope(cfg, rope, source)
        elif layered:
            rope, local_theta = _olmo3_rope(cfg, rope, source)
        if cfg.get("rope_scaling"):  # the dict transformers keeps: rope_scaling over rope_parameters
            old = cfg["rope_scaling"]
            if layered and "rope_type" not in old and old.get("type", "default") != "default":
                # (transformers 5 merges it under the full layers' rope_type "default": no scaling; 4.x scaled)
                family = "a Gemma 3" if gemma else "an OLMo 3"
                raise R3Error(f"{source}: field 'rope_scaling' of {family} config names its type as 'type' "
                              f"({old['type']!r}), which transformers 5 ignores and 4.x applies: write 'rope_type'")
            rope = {**rope, **old} if layered else dict(old)  # (Gemma 3, OLMo 3: merged into the full layers')
        query_scaling = _query_scaling(rope, source) if model_type == "ministral3" else (0.0, 0)
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or _DEFAULT_ROPE_THETA.get(model_type, 10000.0)
        theta = _positive(theta, "rope_theta", source, integral=False)
        # transformers' Phi-3 rotates only the first int(head_dim * factor) dims of each head (the
        # factor in the rope dict it keeps, else the top-level one); its other families here rotate
        # whole heads
        partial = rope.get("partial_rotary_factor")
        partial = cfg.get("partial_rotary_factor") if partial is None else partial
        if partial is None and model_type == "qwen3_5_text":
            partial = 0.25  # (Qwen3_5TextConfig's default)
        partial = 1.0 if partial is None else _positive(partial, "partial_rotary_factor", source, integral=False)
        rotary = int(head_dim * partial)
        if partial != 1.0:
            if model_type not in ("phi3", "qwen3_5_text"):
                raise R3Error(f"{source}: unsupported partial_rotary_factor for model_type '{model_type}' "
                              "(only phi3 and qwen3_5_text)")
            if partial > 1.0 or rotary < 2 or rotary % 2:
                raise R3Error(f"{source}: field 'partial_rotary_factor' {partial!r} does not turn an even number "
                              f"of the {head_dim} dims per head")
        elif rotary % 2:  # (transformers: "RoPE requires an even rotary dimension")
            raise R3Error(f"{source}: head_dim {head_dim} is odd, and RoPE turns pairs of dims")
        max_positions = integer("max_position_embeddings", _DEFAULT_MAX_POSITIONS.get(model_type, 2048))
        if model_type == "qwen3_5_text":
            rope = _qwen35_rope(rope, source)
        scaling = rope if rope else None
        if scaling is not None:
            scaling = dict(scaling)
            scaling.pop("rope_theta", None)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's earlier names for longrope
                rope_type = "longrope"
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise R3Error(
                    f"{source}: unsupported rope scaling type '{rope_type}' "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            scaling["rope_type"] = rope_type
            scaling.pop("type", None)
            if rope_type == "default":
                scaling = None
            elif rope_type == "longrope":
                scaling = _longrope(cfg, scaling, model_type, rotary, max_positions, source)
            elif rope_type == "yarn":
                scaling = _yarn(cfg, scaling, max_positions, source, layered)
            else:  # linear, llama3: the fields rope_inv_freq reads
                keys = ("factor",) if rope_type == "linear" else (
                    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                for key in keys:
                    scaling[key] = _positive(scaling.get(key), f"rope_scaling.{key}", source,
                                             integral=key == "original_max_position_embeddings")

        if gemma4_scaling is not None:
            scaling = gemma4_scaling
        nope = _nope_layers(cfg, n_layers, source) if model_type == "smollm3" else []
        windows = _layer_windows(cfg, model_type, n_layers, source, nope)
        gemma4 = _gemma4_layers(cfg, windows, head_dim, n_kv_heads, n_heads, source) if model_type == "gemma4_text" else {}
        qwen35 = _qwen35_layers(cfg, n_layers, source) if model_type == "qwen3_5_text" else {}
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type in ("phi3", "ministral3"):
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number("rms_norm_eps", _DEFAULT_RMS_NORM_EPS.get(model_type, 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),  # (transformers' defaults)
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type in ("llama", "smollm3", "granite") else False,
            qk_norm=model_type in ("qwen3", "gemma3_text", "gemma4_text", "olmo2", "olmo3", "qwen3_5_text"),
            attn_logit_softcapping=softcaps[0],
            final_logit_softcapping=softcaps[1],
            layer_windows=windows,
            nope_layers=nope,
            hidden_act=_ACTIVATIONS[act],
            # (Gemma 4 scales scores by 1: its q and k are normed)
            query_pre_attn_scalar=(1.0 if model_type == "gemma4_text" else number("query_pre_attn_scalar", 256.0))
            if gemma else None,
            local_rope_theta=local_theta,
            query_scaling_beta=query_scaling[0],
            query_scaling_length=query_scaling[1],
            **({key: number(key, 1.0) for key in _GRANITE_SCALARS} if model_type == "granite" else {}),
            **gemma4,
            **qwen35,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
        )

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """A config.json dict that transformers loads as the same architecture."""
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
        cfg = {
            "architectures": [_HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings, so transformers 4.x (rope_theta/rope_scaling) and 5.x read it.
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "dtype": str(dtype).removeprefix("torch."),
            "use_cache": True,
        }
        if self.partial_rotary_factor != 1.0:
            cfg["partial_rotary_factor"] = rope_parameters["partial_rotary_factor"] = self.partial_rotary_factor
        windows = {w for w in self.layer_windows if w is not None}
        if self.model_type in ("llama", "smollm3", "granite"):
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = self.mlp_bias
            if self.model_type == "granite":
                cfg.update({key: getattr(self, key) for key in _GRANITE_SCALARS})
            if self.model_type == "smollm3":
                cfg["no_rope_layers"] = [int(i not in self.nope_layers) for i in range(self.num_hidden_layers)]
                cfg["use_sliding_window"] = bool(windows)
                cfg["sliding_window"] = windows.pop() if windows else None
                cfg["layer_types"] = ["full_attention" if w is None else "sliding_attention"
                                      for w in self.layer_windows]
        elif self.olmo:
            cfg["attention_bias"] = self.qkv_bias
            if self.model_type == "olmo3":
                cfg["sliding_window"] = windows.pop() if windows else None
                cfg["layer_types"] = ["full_attention" if w is None else "sliding_attention"
                                      for w in self.layer_windows]
                cfg["rope_parameters"] = {"full_attention": rope_parameters, "sliding_attention": {
                    "rope_type": "default", "rope_theta": self.local_rope_theta}}
        elif self.model_type in ("mistral", "ministral3", "phi3"):
            cfg["sliding_window"] = windows.pop() if windows else None
            if self.model_type == "ministral3":  # (transformers reads both from the RoPE parameters)
                for d in (rope_parameters, cfg["rope_scaling"] or {}):
                    d.update(llama_4_scaling_beta=self.query_scaling_beta,
                             original_max_position_embeddings=self.query_scaling_length)
                yarn = self.rope_scaling or {}
                if yarn.get("original_max_position_embeddings", self.query_scaling_length) != self.query_scaling_length:
                    # (YaRN reads a top-level one first; the query scaling, the RoPE parameters')
                    cfg["original_max_position_embeddings"] = yarn["original_max_position_embeddings"]
            if self.rope_scaling and self.rope_scaling["rope_type"] == "longrope":
                s = self.rope_scaling
                cfg["original_max_position_embeddings"] = s["original_max_position_embeddings"]
                default = _longrope_attention(self.max_position_embeddings / s["original_max_position_embeddings"],
                                              s["original_max_position_embeddings"])
                if self.model_type == "phi3" and math.isclose(s["attention_factor"], default, rel_tol=1e-12):
                    # transformers 4.x's Phi3Config takes these three keys and no more (ValueError
                    # otherwise); every reader derives the rest from the top-level fields
                    cfg["rope_scaling"] = {"type": "longrope", "short_factor": list(s["short_factor"]),
                                           "long_factor": list(s["long_factor"])}
        elif self.gemma4:
            return self._gemma4_hf(cfg, windows)
        elif self.gemma:
            cfg["hidden_activation"] = self.hidden_act
            q = self.query_pre_attn_scalar  # (an int where it is one: transformers' field is typed int)
            cfg["query_pre_attn_scalar"] = int(q) if float(q).is_integer() else q
            cfg["attention_bias"] = self.qkv_bias
            cfg["sliding_window"] = windows.pop() if windows else None
            cfg["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in self.layer_windows]
            cfg["attn_logit_softcapping"] = self.attn_logit_softcapping
            cfg["final_logit_softcapping"] = self.final_logit_softcapping
            if self.model_type == "gemma3_text":
                pattern = _sliding_window_pattern(self.layer_windows)
                if pattern is not None:  # (transformers 4.50 to 4.52 read this, not layer_types)
                    cfg["sliding_window_pattern"] = pattern
                cfg["rope_local_base_freq"] = self.local_rope_theta
                cfg["rope_parameters"] = {"full_attention": rope_parameters, "sliding_attention": {
                    "rope_type": "default", "rope_theta": self.local_rope_theta}}
        elif self.qwen35:
            cfg["attention_bias"] = self.qkv_bias
            cfg["layer_types"] = ["linear_attention" if self.linear(i) else "full_attention"
                                  for i in range(self.num_hidden_layers)]
            cfg.update(linear_num_key_heads=self.linear_key_heads, linear_num_value_heads=self.linear_value_heads,
                       linear_key_head_dim=self.linear_key_dim, linear_value_head_dim=self.linear_value_dim,
                       linear_conv_kernel_dim=self.linear_conv_kernel)
        elif self.model_type in ("qwen2", "qwen3"):
            if self.model_type == "qwen3":
                cfg["attention_bias"] = self.qkv_bias
            cfg["use_sliding_window"] = bool(windows)
            cfg["sliding_window"] = windows.pop() if windows else None
            cfg["max_window_layers"] = next(
                (i for i, w in enumerate(self.layer_windows) if w is not None), self.num_hidden_layers
            )
            cfg["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in self.layer_windows
            ]
        return cfg


    def _gemma4_hf(self, cfg: dict, windows: set) -> dict:
        """:meth:`to_hf`'s dict for Gemma 4 (Gemma4TextConfig reads RoPE only per layer type, and
        takes no top-level rope_theta or rope_scaling)."""
        for key in ("rope_theta", "rope_scaling", "hidden_act"):
            cfg.pop(key)
        s = self.rope_scaling
        full = {"rope_type": "default", "rope_theta": self.rope_theta}
        if s:
            full.update(rope_type="proportional", partial_rotary_factor=s["partial_rotary_factor"])
            if s["factor"] != 1.0:
                full["factor"] = s["factor"]
        head_dim = self.global_head_dim or self.head_dim
        cfg.update({
            "hidden_activation": self.hidden_act, "attention_bias": self.qkv_bias,
            "sliding_window": windows.pop() if windows else None,
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in self.layer_windows],
            "final_logit_softcapping": self.final_logit_softcapping,
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta}},
            "attention_k_eq_v": self.attention_k_eq_v, "num_kv_shared_layers": self.kv_shared_layers,
            "use_double_wide_mlp": self.double_wide_mlp, "enable_moe_block": False,
            "hidden_size_per_layer_input": self.per_layer_input_size,
            "vocab_size_per_layer_input": self.per_layer_vocab_size or self.vocab_size,
        })
        if self.global_kv_heads is None or self.attention_k_eq_v:
            cfg.update(global_head_dim=head_dim, num_global_key_value_heads=self.global_kv_heads)
        else:  # (kv heads of their own on full layers whose keys are not the values: only this says so)
            kv = {"head_dim": head_dim, "num_key_value_heads": self.global_kv_heads}
            cfg["per_layer_config"] = {str(i): dict(kv) for i, w in enumerate(self.layer_windows) if w is None}
        return cfg


_GRANITE_SCALARS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def _positive(value, key: str, source: str, integral: bool):
    """A config field's value as a positive int (``integral``) or float, else an R3Error naming it
    (a hand-edited config.json: ``"num_hidden_layers": "two"``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integral and ok and not float(value).is_integer():
        ok = False
    if not ok:
        kind = "a positive integer" if integral else "a positive number"
        raise R3Error(f"{source}: field '{key}' must be {kind}, got {value!r}")
    return int(value) if integral else float(value)


def _longrope_attention(factor: float, original: int) -> float:
    """LongRoPE's attention factor when the config gives none, as transformers derives it from
    the context's extension factor."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _longrope(cfg: dict, scaling: dict, model_type: str, rotary_dim: int, max_pos: int, source: str) -> dict:
    """LongRoPE parameters as transformers resolves them: the original context length (Phi-3's
    top-level field first), both factor lists (one number per pair of rotary dims), and the
    attention factor that scales cos/sin. ``max_pos``: the model's max_position_embeddings."""
    if cfg.get("original_max_position_embeddings") is not None:
        original = _positive(cfg["original_max_position_embeddings"], "original_max_position_embeddings",
                             source, True)
    elif model_type == "phi3":
        original = 4096  # Phi3Config's default, which transformers prefers to the rope dict's
    else:
        original = _positive(scaling.get("original_max_position_embeddings") or max_pos,
                             "rope_scaling.original_max_position_embeddings", source, True)
    for key in ("short_factor", "long_factor"):
        values = scaling.get(key)
        if not isinstance(values, list) or len(values) != rotary_dim // 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            raise R3Error(f"{source}: rope scaling '{key}' must be a list of {rotary_dim // 2} numbers")
    factor = _positive(scaling.get("factor") or max_pos / original, "rope_scaling.factor", source, False)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = _longrope_attention(factor, original)
    attention = _positive(attention, "rope_scaling.attention_factor", source, False)
    return {"rope_type": "longrope", "short_factor": [float(x) for x in scaling["short_factor"]],
            "long_factor": [float(x) for x in scaling["long_factor"]],
            "original_max_position_embeddings": original, "attention_factor": float(attention)}


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context extended ``factor`` times (its paper's 0.1 ln s + 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(cfg: dict, scaling: dict, max_pos: int, source: str, layered: bool = False) -> dict:
    """YaRN parameters as transformers 5 resolves them: the original context length (a top-level
    field first, else the rope dict's, else max_position_embeddings), the factor (a key it
    requires; null: their ratio), the attention factor that scales cos/sin (else from ``mscale``
    and ``mscale_all_dim``, else from the factor), ``beta_fast`` / ``beta_slow`` (32 and 1 when left
    out or 0) and ``truncate`` (true). ``layered``: Gemma 3's and OLMo 3's full layers, whose
    parameters transformers 5 keeps per layer type: it reads no top-level original context there,
    and reads ``truncate`` from the outer dict, so runs true whatever the full layers' dict says
    (4.x honours it: a false one is refused)."""
    original = None if layered else cfg.get("original_max_position_embeddings")
    key = "original_max_position_embeddings"
    if original is None:
        original, key = scaling.get("original_max_position_embeddings") or max_pos, "rope_scaling." + key
    original = _positive(original, key, source, True)
    if "factor" not in scaling:  # (transformers: "Missing required keys ... {'factor'}")
        raise R3Error(f"{source}: rope scaling 'yarn' without a 'factor' (null for max_position_embeddings / "
                      "original_max_position_embeddings)")
    factor = scaling.get("factor")
    factor = _positive(max_pos / original if factor is None else factor, "rope_scaling.factor", source, False)
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and all_dim:
            mscale = _positive(mscale, "rope_scaling.mscale", source, False)
            all_dim = _positive(all_dim, "rope_scaling.mscale_all_dim", source, False)
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim)
        else:
            attention = _yarn_mscale(factor)
    attention = _positive(attention, "rope_scaling.attention_factor", source, False)
    betas = {}
    for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        betas[name] = _positive(scaling.get(name) or default, f"rope_scaling.{name}", source, False)
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise R3Error(f"{source}: field 'rope_scaling.truncate' must be true or false, got {truncate!r}")
    if layered and not truncate:
        raise R3Error(f"{source}: field 'truncate' false in the full-attention layers' YaRN, which transformers 5 "
                      "ignores (it truncates) and 4.x applies; leave it out")
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original,
            "attention_factor": float(attention), **betas, "truncate": truncate}


# The vision-language wrappers whose language model r3 loads: model_type -> (what it is, the text
# model types it may hold (the first when text_config names none), the default of the top-level
# tie_word_embeddings (transformers 5 ties the head by that flag))
_VISION_LANGUAGE = {"gemma3": ("Gemma 3", ("gemma3_text",), None), "qwen3_5": ("Qwen 3.5", ("qwen3_5_text",), None),
                    "gemma4": ("Gemma 4", ("gemma4_text",), True),
                    "mistral3": ("Mistral 3", ("mistral", "ministral3"), True)}
# MistralConfig's defaults for the fields r3 otherwise needs: a wrapper's text_config is written as
# its difference from them
_MISTRAL_DEFAULTS = {"vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 14_336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8}


def language_model_config(cfg: dict, source: str = "config.json") -> dict:
    """The config of the language model a checkpoint holds: ``cfg`` itself, or for a model with a
    vision tower its ``text_config`` as the text-only config transformers' causal LM of that type
    loads, with the checkpoint's own token ids (Gemma 3's eos list names the end-of-turn token):
    Gemma 3 (``model_type`` ``gemma3``: 4b and larger) as ``gemma3_text``, Mistral 3
    (``mistral3``: Ministral 3, Mistral Small 3.1 and 3.2) as ``ministral3`` or ``mistral``."""
    kind = cfg.get("model_type")
    if kind not in _VISION_LANGUAGE:
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise R3Error(f"{source}: model_type '{kind}' without a 'text_config' object")
    _, types, tie_default = _VISION_LANGUAGE[kind]
    text_type = text.get("model_type") or types[0]
    if text_type not in types:
        raise R3Error(f"{source}: unsupported text_config model_type '{text_type}' in a '{kind}' checkpoint "
                      f"(supported: {', '.join(types)})")
    if kind == "gemma3" and text.get("final_logit_softcapping") is not None:
        # (Gemma3ForCausalLM caps its logits by it; the wrapper, the model this checkpoint is, does not)
        raise R3Error(f"{source}: field 'text_config.final_logit_softcapping' {text['final_logit_softcapping']!r} of a "
                      "Gemma 3 checkpoint with a vision tower: transformers' Gemma3ForConditionalGeneration leaves it "
                      "unread; write null")
    if kind == "mistral3" and "tie_word_embeddings" in cfg and cfg["tie_word_embeddings"] is None:
        # (Mistral3Config refuses it: its head is tied by this flag, true by default)
        raise R3Error(f"{source}: field 'tie_word_embeddings' is null, from which transformers cannot build a "
                      "'mistral3' model either: give its value or leave the field out")
    out = {**(_MISTRAL_DEFAULTS if text_type == "mistral" else {}), **text, "model_type": text_type,
           "architectures": [_HF_ARCHITECTURES[text_type]]}
    if tie_default is not None:
        out["tie_word_embeddings"] = tie_default
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def vision_language_name(cfg: dict) -> str | None:
    """What a checkpoint with a vision tower is (``Gemma 3``), or None for a text-only config."""
    kind = _VISION_LANGUAGE.get(cfg.get("model_type"))
    return kind[0] if kind else None


def _query_scaling(rope: dict, source: str) -> tuple[float, int]:
    """Ministral 3's query scaling (beta, length) from its RoPE parameters, where transformers reads
    ``llama_4_scaling_beta`` and ``original_max_position_embeddings`` (it fails without either)."""
    beta, length = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
    for key, value in (("llama_4_scaling_beta", beta), ("original_max_position_embeddings", length)):
        if value is None:
            raise R3Error(f"{source}: a ministral3 config's RoPE parameters need '{key}' (transformers' Ministral 3 "
                          "scales its queries by it and cannot run without it)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0 or math.isinf(beta):
        raise R3Error(f"{source}: field 'llama_4_scaling_beta' must be a number >= 0, got {beta!r}")
    return float(beta), _positive(length, "original_max_position_embeddings", source, integral=True)


def _sliding_window_pattern(windows: list) -> int | None:
    """k where every k-th layer is full and the others slide (Gemma 3's older config field), or
    None for a layout no k gives."""
    full = [i for i, w in enumerate(windows) if w is None]
    k = full[0] + 1 if full else len(windows) + 1
    return k if all((w is None) == ((i + 1) % k == 0) for i, w in enumerate(windows)) else None


def _softcaps(cfg: dict, model_type: str, source: str) -> tuple[float | None, float | None]:
    """(attention, final) logit softcapping as transformers reads them: a field left out takes the
    family's default (Gemma 2's 50 and 30; none elsewhere), null is none. Only Gemma has them, and
    Gemma 3 only the final one (a score cap there is refused: transformers 5 does not apply it)."""
    defaults = _DEFAULT_SOFTCAPS.get(model_type, (None, None))
    out = []
    for key, default in zip(("attn_logit_softcapping", "final_logit_softcapping"), defaults):
        value = cfg.get(key, default)
        if value is not None:
            if model_type not in ("gemma2", "gemma3_text", "gemma4_text"):
                raise R3Error(f"{source}: unsupported field '{key}' for model_type '{model_type}' (only Gemma)")
            value = _positive(value, key, source, integral=False)
            if model_type != "gemma2" and key == "attn_logit_softcapping":  # (Gemma 3: 4.x's passed it on)
                name = "Gemma 3" if model_type == "gemma3_text" else "Gemma 4"
                raise R3Error(f"{source}: field '{key}' {value!r} of a {name} config: transformers 5's {name} "
                              "attention leaves it unread; write null")
        out.append(None if value is None else float(value))
    return out[0], out[1]


def _check_gemma_extras(cfg: dict, model_type: str, source: str) -> None:
    """Refuse what Gemma configs may set and r3 does not compute: the bidirectional attention of
    embedding models (Gemma 4's "vision" makes only image tokens bidirectional: text stays causal),
    Gemma 4's mixture-of-experts blocks."""
    both = cfg.get("use_bidirectional_attention")
    if both and not (model_type == "gemma4_text" and both == "vision"):
        shown = "true" if both is True else repr(both)
        raise R3Error(f"{source}: field 'use_bidirectional_attention' {shown} is not supported (a causal LM only)")
    if model_type == "gemma4_text" and cfg.get("enable_moe_block"):
        raise R3Error(f"{source}: field 'enable_moe_block' true: Gemma 4's mixture-of-experts models (26B-A4B) are "
                      "not supported (r3 runs the dense ones: E2B, E4B, 31B)")


def _rope_per_layer_type(rope: dict, family: str, source: str) -> tuple[dict, dict] | None:
    """(full-attention, sliding-window) parameters of a ``rope_parameters`` keyed by layer type,
    the sliding one unscaled; None for an empty dict. A flat dict is refused: transformers reads
    none for these families (it would run the default RoPE)."""
    if "full_attention" in rope or "sliding_attention" in rope:
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        for name, d in (("full_attention", full), ("sliding_attention", local)):
            if not isinstance(d, dict):
                raise R3Error(f"{source}: field 'rope_parameters.{name}' must be an object, got {d!r}")
        local_type = local.get("rope_type", local.get("type", "default"))
        if local_type != "default":
            raise R3Error(f"{source}: unsupported rope scaling type '{local_type}' for the sliding-window layers "
                          "(rope_parameters.sliding_attention; only default)")
        return dict(full), local
    if rope:
        raise R3Error(f"{source}: field 'rope_parameters' of {family} config is keyed by layer type "
                      f"('full_attention', 'sliding_attention'), got the keys {sorted(rope)}")
    return None


def _gemma_rope(cfg: dict, rope: dict, source: str) -> tuple[dict, float]:
    """Gemma 3's RoPE as (the full-attention layers' parameters, in the single-type layout the
    caller reads; the sliding-window layers' base). transformers 5 writes ``rope_parameters``
    keyed by layer type; older configs have ``rope_theta`` (full), ``rope_local_base_freq``
    (sliding) and ``rope_scaling`` (full layers only)."""
    layered = _rope_per_layer_type(rope, "a Gemma 3", source)
    if layered is not None:
        full, local = layered
        local_theta = local.get("rope_theta") or cfg.get("rope_local_base_freq") or 10_000.0
        return full, _positive(local_theta, "rope_parameters.sliding_attention.rope_theta", source, False)
    local_theta = cfg.get("rope_local_base_freq") or 10_000.0
    return rope, _positive(local_theta, "rope_local_base_freq", source, False)


def _gemma4_rope(cfg: dict, rope: dict, source: str) -> tuple[dict | None, float, float]:
    """Gemma 4's RoPE as (the full-attention layers' scaling: None or proportional, their base, the
    sliding-window layers' base). ``rope_parameters`` is keyed by layer type; Gemma4TextConfig's
    default (none given) is proportional RoPE turning a quarter of the full layers' dims at base
    1e6, and the default at 10000 for the sliding ones. Proportional RoPE's frequencies are
    ``theta ** (-2j / head_dim)`` for the first ``int(partial * head_dim // 2)`` pairs and 0 (no turn)
    for the rest, divided by ``factor``."""
    if cfg.get("rope_scaling"):
        raise R3Error(f"{source}: field 'rope_scaling' of a Gemma 4 config, which transformers does not read: "
                      "give rope_parameters per layer type")
    if not rope:
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
    full, local = _rope_per_layer_type(rope, "a Gemma 4", source)
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "proportional"):
        raise R3Error(f"{source}: unsupported rope scaling type '{kind}' for Gemma 4's full-attention layers "
                      "(rope_parameters.full_attention; only default and proportional)")
    theta = _positive(full.get("rope_theta") or 10_000.0, "rope_parameters.full_attention.rope_theta", source, False)
    local_theta = _positive(local.get("rope_theta") or 10_000.0, "rope_parameters.sliding_attention.rope_theta",
                            source, False)
    if kind == "default":
        if full.get("partial_rotary_factor", 1.0) != 1.0:  # (the default RoPE turns every dim)
            raise R3Error(f"{source}: field 'rope_parameters.full_attention.partial_rotary_factor' with rope_type "
                          "default, which transformers does not read: use rope_type proportional")
        return None, theta, local_theta
    partial = full.get("partial_rotary_factor", 1.0)
    partial = _positive(1.0 if partial is None else partial, "rope_parameters.full_attention.partial_rotary_factor",
                        source, False)
    if partial > 1:
        raise R3Error(f"{source}: field 'rope_parameters.full_attention.partial_rotary_factor' {partial!r} is above 1")
    factor = _positive(full.get("factor") or 1.0, "rope_parameters.full_attention.factor", source, False)
    return {"rope_type": "proportional", "partial_rotary_factor": float(partial), "factor": float(factor)}, theta, local_theta


def _gemma4_layers(cfg: dict, windows: list, head_dim: int, n_kv: int, n_heads: int, source: str) -> dict:
    """Gemma 4's per-layer fields of :class:`ModelConfig`, as Gemma4TextConfig reads them: the
    full-attention layers' head size and kv heads (``per_layer_config``, else ``global_head_dim``,
    512 by default, and ``num_global_key_value_heads`` where ``attention_k_eq_v``), the shared
    KV layers (each kind of layer they hold needs an earlier one that computes its keys), the
    per-layer inputs (256 dims per layer by default; 0 is none)."""
    n = len(windows)
    full = [i for i, w in enumerate(windows) if w is None]
    k_eq_v = cfg.get("attention_k_eq_v", False)
    if not isinstance(k_eq_v, bool):
        raise R3Error(f"{source}: field 'attention_k_eq_v' must be true or false, got {k_eq_v!r}")
    overrides = cfg.get("per_layer_config")
    if overrides is not None:  # (what transformers 5.2x writes: {"3": {"head_dim": 512, ...}, ...})
        if not isinstance(overrides, dict):
            raise R3Error(f"{source}: field 'per_layer_config' must be an object, got {overrides!r}")
        by_layer = {}
        for key, value in overrides.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < n) or not isinstance(value, dict) or \
                    not set(value) <= {"head_dim", "num_key_value_heads"}:
                raise R3Error(f"{source}: field 'per_layer_config' entry {key!r}: r3 reads a layer index below {n} "
                              f"with head_dim and num_key_value_heads, got {value!r}")
            by_layer[int(key)] = value
        seen = {(by_layer.get(i, {}).get("head_dim"), by_layer.get(i, {}).get("num_key_value_heads")) for i in full}
        if len(seen) > 1 or any(i in by_layer for i in range(n) if windows[i] is not None):
            raise R3Error(f"{source}: field 'per_layer_config' gives layers of one kind different shapes; r3 runs "
                          "one shape for the sliding-window layers and one for the full-attention layers")
        global_dim, global_kv = seen.pop() if seen else (None, None)
    else:
        global_dim = cfg.get("global_head_dim", 512)
        if global_dim is None:  # (Gemma4TextConfig overrides the full layers' head_dim with it: null is refused)
            raise R3Error(f"{source}: field 'global_head_dim' is null, from which transformers cannot build a "
                          "'gemma4_text' model either: give its value or leave the field out")
        global_kv = cfg.get("num_global_key_value_heads") if k_eq_v else None
    global_dim = head_dim if global_dim is None else _positive(global_dim, "global_head_dim", source, integral=True)
    global_kv = n_kv if global_kv is None else _positive(global_kv, "num_global_key_value_heads", source, integral=True)
    if global_dim % 2:
        raise R3Error(f"{source}: global_head_dim {global_dim} is odd, and RoPE turns pairs of dims")
    if n_heads % global_kv:
        raise R3Error(f"{source}: num_attention_heads {n_heads} is not a multiple of the full-attention layers' "
                      f"{global_kv} kv heads")
    shared = cfg.get("num_kv_shared_layers", 0) or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared < n:
        raise R3Error(f"{source}: field 'num_kv_shared_layers' must be an integer from 0 to {n - 1}, got {shared!r}")
    own = windows[:n - shared]
    if {w is None for w in own} != {w is None for w in windows}:
        raise R3Error(f"{source}: field 'num_kv_shared_layers' {shared}: a kind of layer (sliding or full) among the "
                      "shared layers has no earlier layer of its kind to share keys and values with")
    ple = cfg.get("hidden_size_per_layer_input", 256) or 0
    ple = _positive(ple, "hidden_size_per_layer_input", source, integral=True) if ple else 0
    ple_vocab = cfg.get("vocab_size_per_layer_input", 262_144)
    ple_vocab = _positive(ple_vocab, "vocab_size_per_layer_input", source, integral=True) if ple else 0
    if ple and ple_vocab < cfg["vocab_size"]:  # (transformers looks every token up unmasked, and fails there too)
        raise R3Error(f"{source}: field 'vocab_size_per_layer_input' {ple_vocab} is below vocab_size {cfg['vocab_size']}: "
                      f"a token id from {ple_vocab} up, which r3 may sample, has no row in the per-layer table")
    for key in ("use_double_wide_mlp",):
        if not isinstance(cfg.get(key, False), bool):
            raise R3Error(f"{source}: field '{key}' must be true or false, got {cfg[key]!r}")
    return {"global_head_dim": global_dim if global_dim != head_dim else None,
            "global_kv_heads": global_kv if global_kv != n_kv else None,
            "attention_k_eq_v": k_eq_v, "kv_shared_layers": shared,
            "double_wide_mlp": bool(cfg.get("use_double_wide_mlp", False)),
            "per_layer_input_size": ple, "per_layer_vocab_size": ple_vocab}


def _olmo3_rope(cfg: dict, rope: dict, source: str) -> tuple[dict, float]:
    """OLMo 3's RoPE as (the full-attention layers' parameters, the sliding-window layers' base),
    as transformers 5 reads them: ``rope_parameters`` keyed by layer type, or ``rope_theta`` (and
    ``rope_scaling``) for the full layers with 500000 for the sliding ones. A ``rope_theta`` that
    transformers 4.x gives the sliding layers too is refused where the two would differ."""
    layered = _rope_per_layer_type(rope, "an OLMo 3", source)
    if layered is not None:
        full, local = layered
        return full, _positive(local.get("rope_theta") or 500_000.0,
                               "rope_parameters.sliding_attention.rope_theta", source, False)
    theta = cfg.get("rope_theta")
    if theta is not None and theta != 500_000.0 and "sliding_attention" in (cfg.get("layer_types") or ["sliding_attention"]):
        raise R3Error(f"{source}: field 'rope_theta' {theta!r} of an OLMo 3 config: transformers 5 turns the "
                      "sliding-window layers by 500000 and 4.x by rope_theta; give rope_parameters per layer type")
    return rope, 500_000.0


def _qwen35_rope(rope: dict, source: str) -> dict:
    """Qwen 3.5's RoPE parameters without its multimodal sections: r3 feeds text alone, whose three
    position axes (time, height, width) are one position, so every section turns by it and the
    layout (``mrope_section``, ``mrope_interleaved``) changes nothing."""
    rope = dict(rope)
    section = rope.pop("mrope_section", None)
    rope.pop("mrope_interleaved", None)
    if section is not None and (not isinstance(section, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in section)):
        raise R3Error(f"{source}: field 'rope_parameters.mrope_section' must be a list of integers, got {section!r}")
    return rope


def _qwen35_layers(cfg: dict, n_layers: int, source: str) -> dict:
    """Qwen 3.5's layer kinds (``layer_types``, else every ``full_attention_interval``-th layer is
    attention, 4 by default) and its Gated DeltaNets' shapes."""
    kinds = cfg.get("layer_types")
    if kinds is None:
        interval = cfg.get("full_attention_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise R3Error(f"{source}: field 'full_attention_interval' must be a positive integer, got {interval!r}")
        kinds = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    if not isinstance(kinds, list) or len(kinds) != n_layers or not set(kinds) <= {"linear_attention", "full_attention"}:
        raise R3Error(f"{source}: field 'layer_types' must list 'linear_attention' or 'full_attention' for each of the "
                      f"{n_layers} layers")
    if "full_attention" not in kinds:  # (the sampler's KV cache, which sizes its slots, would hold no layer)
        raise R3Error(f"{source}: unsupported Qwen 3.5 layout: no 'full_attention' layer (r3 needs at least one)")
    dims = {}
    for key, default in _QWEN35_LINEAR_DEFAULTS.items():
        value = cfg.get(key)
        dims[key] = default if value is None else _positive(value, key, source, integral=True)
    if dims["linear_num_value_heads"] % dims["linear_num_key_heads"]:
        raise R3Error(f"{source}: linear_num_value_heads {dims['linear_num_value_heads']} is not a multiple of "
                      f"linear_num_key_heads {dims['linear_num_key_heads']}")
    return dict(linear_layers=[i for i, kind in enumerate(kinds) if kind == "linear_attention"],
                linear_key_heads=dims["linear_num_key_heads"], linear_value_heads=dims["linear_num_value_heads"],
                linear_key_dim=dims["linear_key_head_dim"], linear_value_dim=dims["linear_value_head_dim"],
                linear_conv_kernel=dims["linear_conv_kernel_dim"], attn_output_gate=True)


def _nope_layers(cfg: dict, n_layers: int, source: str) -> list:
    """SmolLM3's layers without RoPE, in order: the zeros of ``no_rope_layers`` (one 1 or 0 per
    layer, 1 = RoPE; a longer list's extra entries are not read), else every
    ``no_rope_layer_interval``-th layer (4 by default), as transformers reads them."""
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = cfg.get("no_rope_layer_interval", 4)
        interval = 4 if interval is None else _positive(interval, "no_rope_layer_interval", source, integral=True)
        return [i for i in range(n_layers) if (i + 1) % interval == 0]
    if (not isinstance(flags, list) or len(flags) < n_layers
            or any(type(f) is not int or f not in (0, 1) for f in flags)):  # (True is not a layer's 1)
        raise R3Error(f"{source}: field 'no_rope_layers' must list 1 (RoPE) or 0 (none) for each of the "
                      f"{n_layers} layers, got {flags!r}")
    return [i for i in range(n_layers) if flags[i] == 0]


def _layer_windows(cfg: dict, model_type: str, n_layers: int, source: str, nope: list = ()) -> list:
    """Per-layer sliding-window size (None = full attention), as transformers applies it
    (``nope``: SmolLM3's layers without RoPE, which hold its windows unless ``layer_types`` says)."""
    window = cfg.get("sliding_window", 4096 if model_type == "mistral" else None)  # (MistralConfig's default)
    if model_type in ("llama", "granite", "olmo2", "qwen3_5_text"):
        return [None] * n_layers
    if window:
        window = _positive(window, "sliding_window", source, integral=True)
    if model_type in ("mistral", "ministral3", "phi3"):
        return [window or None] * n_layers
    if model_type in ("gemma2", "gemma3_text", "gemma4_text", "olmo3"):  # layer_types, else every k-th layer is full
        # (Gemma 3: k = sliding_window_pattern, 6 by default; Gemma 4: 6; OLMo 3: 4; Gemma 2: 2)
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            pattern = cfg.get("sliding_window_pattern", 6) if model_type == "gemma3_text" else (
                2 if model_type == "gemma2" else 6 if model_type == "gemma4_text" else 4)
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                raise R3Error(f"{source}: field 'sliding_window_pattern' must be a positive integer, got {pattern!r}")
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
        if not isinstance(layer_types, list) or len(layer_types) != n_layers or not set(layer_types) <= {
                "full_attention", "sliding_attention"}:
            raise R3Error(f"{source}: field 'layer_types' must list 'full_attention' or 'sliding_attention' "
                          f"for each of the {n_layers} layers")
        if model_type == "gemma4_text" and layer_types and layer_types[-1] != "full_attention":
            layer_types = [*layer_types[:-1], "full_attention"]  # (Gemma4TextConfig makes the last layer full)
        if "sliding_attention" in layer_types and not window:
            if "sliding_window" in cfg:  # (null or 0: transformers cannot build such a model either)
                raise R3Error(f"{source}: field 'sliding_window' is {cfg['sliding_window']!r}, but layers use "
                              "sliding_attention; give their window size")
            window = 512 if model_type == "gemma4_text" else 4096  # (the config classes' defaults)
        return [window if t == "sliding_attention" else None for t in layer_types]
    # qwen2, qwen3: windows apply only with use_sliding_window, to layers >= max_window_layers;
    # smollm3: to its NoPE layers
    layer_types = cfg.get("layer_types")
    if not cfg.get("use_sliding_window") or not window:
        return [None] * n_layers
    if layer_types:
        if len(layer_types) != n_layers:
            raise R3Error(f"{source}: layer_types has {len(layer_types)} entries, expected {n_layers}")
        return [window if t == "sliding_attention" else None for t in layer_types]
    if model_type == "smollm3":
        return [window if i in nope else None for i in range(n_layers)]
    first = cfg.get("max_window_layers", n_layers)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise R3Error(f"{source}: field 'max_window_layers' must be an integer >= 0, got {first!r}")
    return [window if i >= first else None for i in range(n_layers)]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``style``: "" (Llama and most families), "gemma" (scale by ``1 + w``, weights start at 0),
    "olmo" (scale by ``w``) or "gemma4" (OLMo's, with Gemma 4's own normalisation: ``x *
    (mean(x^2) + eps) ** -1/2``, which rounds apart from ``rms_norm``'s reciprocal square root);
    the latter three scale in fp32 and round once. ``weight=False``: no scale (Gemma 4's norm of
    the values)."""

    def __init__(self, dim: int, eps: float, style: str = "", weight: bool = True):
        super().__init__()
        self.eps, self.style = eps, style
        if weight:
            self.weight = nn.Parameter(torch.zeros(dim) if self.offset else torch.ones(dim))
        else:
            self.weight = None

    @property
    def offset(self) -> bool:
        """Gemma's: the weight is added to 1."""
        return self.style == "gemma"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.style)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies [rotary dims / 2] in fp32 (the rotary dims: the whole head, or the
    part ``partial_rotary_factor`` says), with linear, Llama-3, YaRN or LongRoPE (the short factors: r3
    stays within the original context) scaling applied. ``local``: Gemma 3's sliding-window
    layers (their own base, no scaling)."""
    dim = cfg.rotary_dim
    if local:
        return default_inv_freq(cfg.local_rope_theta, dim)
    s = cfg.rope_scaling
    if cfg.global_head_dim:  # (Gemma 4: the full-attention layers' heads)
        dim = cfg.global_head_dim
    if s and s["rope_type"] == "proportional":  # (Gemma 4: a table as wide as the head, pairs past the turned ones still)
        turned = int(s["partial_rotary_factor"] * dim // 2)
        inv_freq = default_inv_freq(cfg.rope_theta, dim)[:turned]
        return torch.cat((inv_freq, torch.zeros(dim // 2 - turned))) / s["factor"]
    if s and s["rope_type"] == "longrope":
        ext = torch.tensor(s["short_factor"], dtype=torch.float32)
        return 1.0 / (ext * cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_freq = default_inv_freq(cfg.rope_theta, dim)
    if not s:
        return inv_freq
    if s["rope_type"] == "yarn":
        return yarn_inv_freq(cfg.rope_theta, dim, s)
    if s["rope_type"] == "linear":
        return inv_freq / float(s["factor"])
    return llama3_inv_freq(inv_freq, float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"]),
                           float(s["original_max_position_embeddings"]))


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Unscaled inverse frequencies [dim / 2] in fp32, as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def yarn_inv_freq(theta: float, dim: int, s: dict) -> torch.Tensor:
    """YaRN's inverse frequencies: the pairs of dims that turn fewer than ``beta_slow`` times over
    the original context are interpolated (divided by ``factor``), those that turn more than
    ``beta_fast`` times kept, with a linear ramp between, as transformers computes them."""
    factor, original = float(s["factor"]), float(s["original_max_position_embeddings"])

    def dim_for(turns):  # the (fractional) pair of dims that turns ``turns`` times over the original context
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(float(s["beta_fast"])), dim_for(float(s["beta_slow"]))
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (transformers' guard against a zero-width ramp)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low: float, high: float, old_len: float) -> torch.Tensor:
    """Llama 3's RoPE scaling of ``inv_freq``: keep high frequencies, divide low ones by
    ``factor``, interpolate smoothly between (wavelengths from ``old_len / high`` to ``old_len / low``)."""
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and signed sin [B, T, 1, rotary dims] for positions [B, T] (computed in fp32, scaled by the
    attention factor of LongRoPE or YaRN, cast like transformers); the sin's first half is negated, as
    :func:`apply_rope` wants it."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    half = inv_freq.shape[0]
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def rope_scale(cfg: ModelConfig) -> float:
    """The factor cos/sin are scaled by (LongRoPE's and YaRN's attention factor; 1 otherwise)."""
    s = cfg.rope_scaling
    return float(s["attention_factor"]) if s and s["rope_type"] in ("longrope", "yarn") else 1.0


def rope_max_positions(cfg: ModelConfig) -> int | None:
    """The most positions a forward may use, where r3 cannot follow transformers past it."""
    s = cfg.rope_scaling
    return int(s["original_max_position_embeddings"]) if s and s["rope_type"] == "longrope" else None


def position_limit(cfg: ModelConfig) -> tuple[int, str]:
    """-> (the most positions a sequence should use, the config field that says so)."""
    longrope = rope_max_positions(cfg)
    if longrope is not None:  # (the forward refuses more: see check_positions)
        return longrope, "original_max_position_embeddings, as far as r3 follows LongRoPE"
    s = cfg.rope_scaling
    # (some checkpoints keep the unscaled length there; Gemma 3's is the scaled one, 131072)
    if s and s["rope_type"] == "linear" and not cfg.gemma:
        n = int(cfg.max_position_embeddings * max(1.0, float(s["factor"])))
        return n, "max_position_embeddings x the linear rope scaling factor"
    return cfg.max_position_embeddings, "max_position_embeddings"


def check_token_limits(cfg: ModelConfig, model: str, **limits: int) -> None:
    """Refuse sampling limits whose sum alone passes the model's positions: the text past them is
    not what the model was trained for, and the KV cache sized for them can exhaust memory before
    anything else fails. ``limits``: what each limit is for -> tokens, e.g. ``reflection=96``."""
    n = sum(limits.values())
    limit, field = position_limit(cfg)
    if n > limit:
        parts = " + ".join(f"{k} {v}" for k, v in limits.items())
        raise R3Error(f"token limits {parts}{f' = {n}' if len(limits) > 1 else ''}, more than the {limit} positions "
                      f"of {model} ({field}); lower them")


def query_scale(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Ministral 3's query scale [B, T, 1, 1] for positions [B, T], computed in fp32 and cast to
    ``dtype`` as transformers does (exactly 1 before ``query_scaling_length``); None for models
    without one."""
    if not cfg.query_scaling_beta:
        return None
    steps = torch.floor(positions.float() / cfg.query_scaling_length)
    return (1 + cfg.query_scaling_beta * torch.log(1 + steps)).to(dtype)[:, :, None, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [B, T, heads, D]`` with :func:`rope_cos_sin`'s tables: transformers'
    ``x * cos + rotate_half(x) * sin``, bit for bit, as ``roll(x, D/2) * signed sin``. Tables
    narrower than D (a partial rotary factor) turn the first dims and pass the rest through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    out = x * cos + x.roll(r // 2, -1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)  # (fp32 tables: turned in fp32, rounded once; OLMo 2)


class KVCache:
    """Static, preallocated keys/values: per layer ``[B, n_kv_heads, max_len, head_dim]``.

    Slot ``p`` of a row holds that row's token at position ``p``. The cache owns no notion of
    lengths: whoever drives it (the sampler) tracks each row's length and passes positions.

    Qwen 3.5's Gated DeltaNet layers hold no keys or values but a state per row that every token
    fed changes: ``conv`` (the last ``kernel - 1`` inputs of the layer's causal conv, ``[B,
    channels, kernel - 1]``, the compute dtype) and ``ssm`` (the delta rule's ``[B, value heads,
    key dim, value dim]``, fp32), one of each per such layer. Unlike a slot, a state cannot be
    written twice: each token must be fed exactly once (the sampler's contract).
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], conv: list[torch.Tensor] | None = None,
                 ssm: list[torch.Tensor] | None = None):
        self.k, self.v = k, v
        self.conv, self.ssm = conv or [], ssm or []
        self.contiguous = all(t.is_contiguous() for t in k + v)  # (views of a cache may not be)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype, device) -> "KVCache":
        """One entry per layer of :meth:`ModelConfig.cache_layers` (Gemma 4's shared layers hold none),
        and the states of Qwen 3.5's Gated DeltaNet layers."""
        shapes = [(batch_size, cfg.layer_kv_heads(i), max_len, cfg.layer_head_dim(i)) for i in cfg.cache_layers()]
        n, channels = len(cfg.linear_layers), cfg.linear_conv_channels
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes],
            [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes],
            [torch.zeros(batch_size, channels, cfg.linear_conv_kernel - 1, dtype=dtype, device=device) for _ in range(n)],
            [torch.zeros(batch_size, cfg.linear_value_heads, cfg.linear_key_dim, cfg.linear_value_dim,
                         dtype=torch.float32, device=device) for _ in range(n)],
        )

    @property
    def states(self) -> list[torch.Tensor]:
        return self.conv + self.ssm

    @property
    def batch_size(self) -> int:
        return (self.k or self.ssm)[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.states)

    def select(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A new cache holding the given rows (repeats allowed: forking a row into G copies)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=(self.k or self.ssm)[0].device)
        pick = lambda ts: [t.index_select(0, rows) for t in ts]  # noqa: E731
        return KVCache(pick(self.k), pick(self.v), pick(self.conv), pick(self.ssm))

    def rows_view(self, lo: int, hi: int) -> "KVCache":
        """Rows ``lo:hi`` as views (writes go to this cache)."""
        view = lambda ts: [t[lo:hi] for t in ts]  # noqa: E731
        return KVCache(view(self.k), view(self.v), view(self.conv), view(self.ssm))

    def slots_view(self, n: int) -> "KVCache":
        """The first ``n`` slots of every row (views; the states whole)."""
        return KVCache([k[:, :, :n] for k in self.k], [v[:, :, :n] for v in self.v], self.conv, self.ssm)

    def grow(self, max_len: int) -> "KVCache":
        """A copy with room for ``max_len`` positions (never shrinks; the states are carried over)."""
        if max_len <= self.max_len:
            return self

        def pad(t):
            return F.pad(t, (0, 0, 0, max_len - t.shape[2]))

        return KVCache([pad(t) for t in self.k], [pad(t) for t in self.v], self.conv, self.ssm)


class Linear(nn.Linear):
    """``nn.Linear`` whose matmul ``r3.packed_linear`` can take over: while ``packed`` holds a slot
    number, the product runs on that slot's prepacked copy of the weight (set only for the
    duration of a decode step, when the copy is current)."""

    packed: int | None = None
    packed_eager = None  # r3.packed_linear's product without the op dispatch, for eager calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if torch.compiler.is_compiling():
                return torch.ops.r3.packed_linear(x, self.packed)
            return Linear.packed_eager(x, self.packed)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    """Layer ``index``'s attention. Gemma 4's (:attr:`ModelConfig.gemma4`) differs: its own head
    size and kv heads on full-attention layers, values normed without a scale (and taken from the
    keys' projection where ``attention_k_eq_v``), and on its shared layers no keys or values of its
    own: ``forward`` then takes the source layer's (``shared_kv``), and a layer others read returns
    its own beside its output (:attr:`shares_kv`, :attr:`stores_kv`)."""

    def __init__(self, cfg: ModelConfig, window: int | None, rope: bool = True, index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.layer_kv_heads(index), cfg.layer_head_dim(index)
        self.window = window
        self.rope = rope  # (False: a SmolLM3 NoPE layer)
        h, d = cfg.hidden_size, self.head_dim
        self.gemma4 = cfg.gemma4
        self.shares_kv = cfg.kv_source(index) != index
        self.stores_kv = any(cfg.kv_source(j) == index for j in range(index + 1, cfg.num_hidden_layers))
        self.k_eq_v = cfg.layer_k_eq_v(index)
        kv_rows = 0 if self.shares_kv else self.n_kv * d * (1 if self.k_eq_v else 2)
        self.gated = cfg.attn_output_gate  # (Qwen 3.5: each head's query rows are followed by its gate's)
        # (None: SDPA's own 1/sqrt(head_dim); Gemma: query_pre_attn_scalar ** -0.5; Granite: its multiplier)
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else cfg.attention_multiplier
        self.qkv_proj = Linear(h, self.n_heads * d * (2 if self.gated else 1) + kv_rows, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * d, h, bias=cfg.o_bias)
        self.softcap = cfg.attn_logit_softcapping
        self.qk_norm_all_heads = cfg.olmo
        if cfg.qk_norm:
            q_dim, k_dim = (self.n_heads * d, self.n_kv * d) if cfg.olmo else (d, d)
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, cfg.norm_style)
            if not self.shares_kv:
                self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps, cfg.norm_style)
        if cfg.gemma4 and not self.shares_kv:
            self.v_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_style, weight=False)

    def _gemma4_qkv(self, x, cos, sin):
        """Gemma 4's q, k, v ``[B, T, heads, D]`` (k and v None on a shared layer)."""
        B, T, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x)
        q = apply_rope(self.q_norm(qkv[..., :nh * d].view(B, T, nh, d)), cos, sin)
        if self.shares_kv:
            return q, None, None
        k = qkv[..., nh * d:(nh + nkv) * d].view(B, T, nkv, d)
        v = k if self.k_eq_v else qkv[..., (nh + nkv) * d:].view(B, T, nkv, d)
        return q, apply_rope(self.k_norm(k), cos, sin), self.v_norm(v)

    def _gated_qkv(self, x, cos, sin):
        """Qwen 3.5's q, k, v ``[B, T, heads, D]`` (normed per head, turned) and the output gate
        ``[B, T, heads * D]``: its query projection holds each head's query and gate rows in turn."""
        B, T, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x)
        qg = qkv[..., :2 * nh * d].view(B, T, nh, 2 * d)
        kv = qkv[..., 2 * nh * d:].view(B, T, 2 * nkv, d)
        q = apply_rope(self.q_norm(qg[..., :d]), cos, sin)
        k = apply_rope(self.k_norm(kv[:, :, :nkv]), cos, sin)
        return q, k, kv[:, :, nkv:], qg[..., d:].reshape(B, T, nh * d)

    def _qkv(self, x, cos, sin):
        """q, k, v ``[B, T, heads, D]``, q and k normed (Qwen3, Gemma 2/3, OLMo) and turned."""
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim)  # [B, T, heads, D]
        v = qkv[:, :, nh + nkv:]
        if self.qk_norm_all_heads:  # (OLMo 2: one norm over each token's q, and one over its k)
            q = self.q_norm(qkv[:, :, :nh].reshape(B, T, -1)).view(B, T, nh, self.head_dim)
            k = self.k_norm(qkv[:, :, nh:nh + nkv].reshape(B, T, -1)).view(B, T, nkv, self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        elif hasattr(self, "q_norm"):
            q, k = apply_rope(self.q_norm(qkv[:, :, :nh]), cos, sin), apply_rope(self.k_norm(qkv[:, :, nh:nh + nkv]), cos, sin)
        elif not self.rope:
            q, k = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv]
        else:  # RoPE on q and k at once
            qk = apply_rope(qkv[:, :, : nh + nkv], cos, sin)
            q, k = qk[:, :, :nh], qk[:, :, nh:]
        return q, k, v

    def forward(self, x, cos, sin, mask, layer_cache, write_at, kv_len, q_scale=None, shared_kv=None):
        B, T, _ = x.shape
        nkv = self.n_kv
        gate = None
        if self.gated:
            q, k, v, gate = self._gated_qkv(x, cos, sin)
        else:
            q, k, v = self._gemma4_qkv(x, cos, sin) if self.gemma4 else self._qkv(x, cos, sin)
        if self.shares_kv:  # (the source layer's, read from the cache or computed in this forward)
            k, v = shared_kv
        elif layer_cache is not None:
            k_cache, v_cache = layer_cache
            rows, positions = write_at[nkv]
            if rows is None:  # one flat index into the contiguous cache's [B * n_kv * S] rows
                d = self.head_dim
                k_cache.view(-1, d).index_copy_(0, positions, k.reshape(-1, d).to(k_cache.dtype))
                v_cache.view(-1, d).index_copy_(0, positions, v.reshape(-1, d).to(v_cache.dtype))
            else:  # cache[b, :, positions[b, t]] = k[b, t]  (advanced indices first -> [B, T, H, D])
                k_cache[rows, :, positions] = k.to(k_cache.dtype)
                v_cache[rows, :, positions] = v.to(v_cache.dtype)
            k, v = k_cache[:B, :, :kv_len], v_cache[:B, :, :kv_len]  # (a static cache holds more rows)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if q_scale is not None:  # (Ministral 3: after RoPE, as transformers scales them)
            q = q * q_scale
        q = q.transpose(1, 2)
        if mask is None and layer_cache is not None:  # a prefill from the start: no query may see a
            k, v = k[:, :, :T], v[:, :, :T]  # slot >= T, so square (flash attention takes grouped heads then)
        kv = (k, v) if self.stores_kv else None
        if self.softcap is not None:  # (Gemma 2: no fused kernel caps the scores)
            out = softcapped_attention(q, k, v, mask, mask is None and T > 1, self.scale, self.softcap)
        elif mask is None:
            out = sdpa(q, k, v, None, causal=T > 1, scale=self.scale)
        elif T == 1 and self.n_kv != self.n_heads:
            # One token per row (decode): the query heads sharing a kv head go in as that head's
            # "query positions", which share the row's mask. The same math as enable_gqa, which
            # expands the cache to every query head (a copy per step).
            out = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.head_dim), k, v, attn_mask=mask,
                                                 scale=self.scale)
            out = out.reshape(B, self.n_heads, 1, self.head_dim)
        else:
            out = sdpa(q, k, v, mask, causal=False, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        out = self.o_proj(out)
        return out if kv is None else (out, kv)


class GatedRMSNorm(nn.Module):
    """Qwen 3.5's norm of each Gated DeltaNet head's output, scaled by a weight and gated by
    ``silu(z)`` (:func:`r3.rms_norm.gated_rms_norm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


class LinearAttention(nn.Module):
    """Qwen 3.5's Gated DeltaNet, a layer's token mixer in place of attention: q, k and v from one
    projection through a causal depthwise conv with SiLU, keys and queries L2-normed, then the
    gated delta rule over a state per value head (decay ``exp(g)``, ``g = -exp(A_log) *
    softplus(a + dt_bias)``; write strength ``beta = sigmoid(b)``); each head's output normed and
    gated by ``silu(z)``. Names as transformers' (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``,
    ``in_proj_a``, ``conv1d``, ``dt_bias``, ``A_log``, ``norm``, ``out_proj``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.nk, self.nv, self.dk, self.dv = (cfg.linear_key_heads, cfg.linear_value_heads, cfg.linear_key_dim,
                                              cfg.linear_value_dim)
        conv_dim = cfg.linear_conv_channels
        self.in_proj_qkv = Linear(h, conv_dim, bias=False)
        self.in_proj_z = Linear(h, self.nv * self.dv, bias=False)
        self.in_proj_b = Linear(h, self.nv, bias=False)
        self.in_proj_a = Linear(h, self.nv, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.linear_conv_kernel, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.A_log = nn.Parameter(torch.zeros(self.nv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.nv * self.dv, h, bias=False)

    def forward(self, x: torch.Tensor, state: tuple | None = None, lengths: torch.Tensor | None = None,
                live: torch.Tensor | None = None, runs: "SegmentRuns | None" = None) -> torch.Tensor:
        """Without ``state``: a whole sequence from the start (right padding is harmless: nothing
        real follows it). With ``state`` (a cache's ``(conv, ssm)``, whose first ``B`` rows are
        these rows', updated in place): ``x`` continues each row; ``lengths [B]``: the tokens of
        each row that are real (the rest right padding, which leaves the state as it is); ``live
        [B]`` (one token per row): rows that take their token (the others keep their state). With
        ``runs`` (no state): ``x`` is a packed layout's rows, mixed segment by segment."""
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x)
        beta = self.in_proj_b(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        if runs is not None:
            out = runs.mix(self._mix, qkv, beta, g)
        else:
            conv_state, ssm = state if state is not None else (None, None)
            if state is not None:  # (rows [0, B) of a larger cache: the sampler's static one)
                conv_state, ssm = conv_state[:B], ssm[:B]
            out, conv_new, ssm_new = self._mix(qkv, beta, g, conv_state, ssm, lengths, live)
            if state is not None:
                conv_state.copy_(conv_new)
                ssm.copy_(ssm_new)
        out = self.norm(out.to(x.dtype), self.in_proj_z(x).view(B, T, self.nv, self.dv))
        return self.out_proj(out.reshape(B, T, self.nv * self.dv))

    def _mix(self, qkv: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, conv_state: torch.Tensor | None = None,
             ssm: torch.Tensor | None = None, lengths: torch.Tensor | None = None, live: torch.Tensor | None = None):
        """The token mixing of rows ``[B, T]`` from these states (None: the start): the causal conv
        of the projected ``qkv``, q and k normed, the gated delta rule. Returns (out ``[B, T, Hv,
        dv]`` fp32, the conv's new state, the rule's new state)."""
        B, T, _ = qkv.shape
        mixed, conv_new = causal_conv(qkv, self.conv1d.weight[:, 0], state=conv_state, lengths=lengths)
        kd = self.nk * self.dk
        q, k = mixed[..., :kd].view(B, T, self.nk, self.dk), mixed[..., kd:2 * kd].view(B, T, self.nk, self.dk)
        v = mixed[..., 2 * kd:].view(B, T, self.nv, self.dv)
        if ssm is not None and T == 1 and lengths is None:
            q, k = qk_normalize(q, k)
            out, ssm_new = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], ssm, live)
            if live is not None:
                conv_new = torch.where(live[:, None, None], conv_new, conv_state)
            return out[:, None], conv_new, ssm_new
        if live is not None:
            raise ValueError("live is for one token per row")
        out, ssm_new = gated_delta_rule(q, k, v, g, beta, state=ssm, lengths=lengths, normalize_qk=True)
        return out, conv_new, ssm_new


@dataclass
class SegmentRuns:
    """A packed layout's rows (see :meth:`Transformer.hidden_states`' ``segments``) as the Gated
    DeltaNet layers run them: each row's segment 0 (the shared prefix) from the start, then each
    later segment from the state the prefix ended in (the conv's and the delta rule's), as the
    per-row layout would reach its continuation. Gathered once per forward for every such layer:
    flat indices into the ``[P * L]`` positions, right-padded (with index 0, which ``lengths``
    keeps out of the states and which is never scattered back), in column order."""

    shape: tuple[int, int]  # (P, L)
    prefix: torch.Tensor  # [P, Lp] each row's segment-0 positions
    prefix_len: torch.Tensor  # [P]
    segment: torch.Tensor  # [S, Ls] each later segment's positions
    segment_len: torch.Tensor  # [S]
    segment_row: torch.Tensor  # [S] the row each later segment continues

    @classmethod
    def of(cls, segments: torch.Tensor, device=None) -> "SegmentRuns":
        """From ``segments [P, L]`` (0: prefix, k >= 1: the k-th continuation, -1: padding; one
        read to the host), on ``device`` (default: the layout's)."""
        P, L = segments.shape
        prefix, runs, rows = [[] for _ in range(P)], {}, []
        for r, row in enumerate(segments.tolist()):
            for c, k in enumerate(row):
                if k == 0:
                    prefix[r].append(r * L + c)
                elif k > 0:
                    if (r, k) not in runs:
                        runs[r, k] = []
                        rows.append(r)
                    runs[r, k].append(r * L + c)
        dev = segments.device if device is None else device

        def put(t):  # (to a GPU from pinned memory: a copy the host need not wait for)
            return t.pin_memory().to(dev, non_blocking=True) if torch.device(dev).type == "cuda" else t.to(dev)

        def padded(lists):
            width = max([1] + [len(x) for x in lists])
            out = torch.tensor([x + [0] * (width - len(x)) for x in lists] or [[0]], dtype=torch.long)
            return put(out), put(torch.tensor([len(x) for x in lists], dtype=torch.long))

        prefix_t, prefix_len = padded(prefix)
        segment_t, segment_len = padded(list(runs.values()))
        return cls((P, L), prefix_t, prefix_len, segment_t[:len(runs)], segment_len,
                   put(torch.tensor(rows, dtype=torch.long)))

    def mix(self, mix, *per_token: torch.Tensor) -> torch.Tensor:
        """``mix(*per_token rows, conv_state, ssm, lengths)`` (:meth:`LinearAttention._mix`) over
        the prefixes, then the continuations from their prefixes' states; its outputs put back at
        their positions ``[P, L, ...]`` (zero at padding)."""
        P, L = self.shape
        flat = [t.reshape(P * L, *t.shape[2:]) for t in per_token]
        out_p, conv, ssm = mix(*(t[self.prefix] for t in flat), lengths=self.prefix_len)
        out = out_p.new_zeros(P * L, *out_p.shape[2:])
        valid = torch.arange(self.prefix.shape[1], device=out.device) < self.prefix_len[:, None]
        out = out.index_put((self.prefix[valid],), out_p[valid])
        if len(self.segment_row):
            out_s, _, _ = mix(*(t[self.segment] for t in flat), conv_state=conv[self.segment_row],
                              ssm=ssm[self.segment_row], lengths=self.segment_len)
            valid = torch.arange(self.segment.shape[1], device=out.device) < self.segment_len[:, None]
            out = out.index_put((self.segment[valid],), out_s[valid])
        return out.view(P, L, *out.shape[1:])


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as SDPA's additive one (0 where allowed, -inf elsewhere), made
    once for every layer that shares it (SDPA would convert a boolean one in each call)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def expands_kv_heads(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> bool:
    """Whether :func:`sdpa` repeats the kv heads itself rather than pass ``enable_gqa``. On CUDA only
    flash attention (bf16/fp16, no mask, a square causal mask, head dim <= 256) takes grouped kv
    heads; the memory-efficient kernel wants one kv head per query head, and SDPA silently falls
    back to the math kernel otherwise, which holds fp32 ``[rows, heads, T, S]`` scores (and keeps
    them for the backward pass: tens of GB at the paper's shapes). CPU kernels take grouped heads
    with a mask."""
    if q.shape[1] == k.shape[1] or q.device.type == "cpu":
        return False
    flash = (mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
             and (not causal or q.shape[2] == k.shape[2]))
    return not flash


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
         scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of ``q`` ``[B, heads, T, D]`` over ``k``/``v`` ``[B, kv
    heads, S, D]`` (query head ``h`` reads kv head ``h // (heads / kv heads)``), on a fused kernel
    where one applies (:func:`expands_kv_heads`). A causal mask with ``T < S`` is aligned at the
    top left: query ``i`` sees keys ``0..i``."""
    if expands_kv_heads(q, k, mask, causal):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                         scale: float | None, cap: float) -> torch.Tensor:
    """Attention whose scores go through ``cap * tanh(scores / cap)`` before the mask and softmax
    (Gemma 2), computed as transformers' eager attention computes it: scores in the compute dtype,
    softmax in fp32. Shapes as :func:`sdpa`; ``mask`` additive, else ``causal`` (top-left aligned)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores + mask
    elif causal:
        T, S = scores.shape[-2:]
        hidden = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        h, i = cfg.hidden_size, intermediate_size or cfg.intermediate_size
        self.gate_up_proj = Linear(h, 2 * i, bias=cfg.mlp_bias)
        self.down_proj = Linear(i, h, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj((F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up)


class Block(nn.Module):
    """Pre-norm attention and MLP. Gemma norms each one's output too: its
    ``post_attention_layernorm`` is on the attention's output (Llama's is the MLP's input norm,
    which Gemma calls ``pre_feedforward_layernorm``). OLMo 2 norms only the outputs (its
    ``post_attention_layernorm`` and ``post_feedforward_layernorm``). Gemma 4 then adds its
    per-layer input (gated by the block's output, projected, normed) and scales the whole by a
    fixed ``layer_scalar``; a block whose keys and values later layers read returns them too."""

    def __init__(self, cfg: ModelConfig, window: int | None, rope: bool = True, index: int = 0):
        super().__init__()
        h, eps, style = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style
        self.post_norm = cfg.olmo
        if not self.post_norm:
            self.input_layernorm = RMSNorm(h, eps, style)
        self.linear = cfg.linear(index)
        if self.linear:
            self.linear_attn = LinearAttention(cfg)
        else:
            self.self_attn = Attention(cfg, window, rope, index)
        self.post_attention_layernorm = RMSNorm(h, eps, style)
        self.mlp = MLP(cfg, cfg.layer_intermediate_size(index))
        self.gemma4 = cfg.gemma4
        if cfg.per_layer_input_size:
            p = cfg.per_layer_input_size
            self.per_layer_input_gate = Linear(h, p, bias=False)
            self.per_layer_projection = Linear(p, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps, style)
        if cfg.gemma4:  # (a checkpoint's buffer: read and written, never trained)
            self.register_buffer("layer_scalar", torch.ones(1))
        self.sandwich = cfg.gemma
        self.residual_scale = cfg.residual_multiplier if cfg.residual_multiplier != 1.0 else None  # (Granite)
        if cfg.gemma:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, style)
        if cfg.gemma or cfg.olmo:
            self.post_feedforward_layernorm = RMSNorm(h, eps, style)

    def forward(self, x, cos, sin, mask, layer_cache=None, write_at=None, kv_len=None, q_scale=None, shared_kv=None,
                per_layer_input=None, lengths=None, live=None, runs=None):
        if self.linear:  # (Qwen 3.5's Gated DeltaNet: no RoPE or mask; its cache entry is its state)
            x = x + self.linear_attn(self.input_layernorm(x), layer_cache, lengths, live, runs)
            return x + self.mlp(self.post_attention_layernorm(x))
        if self.gemma4:
            attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, write_at, kv_len, None, shared_kv)
            attn, kv = attn if self.self_attn.stores_kv else (attn, None)
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            if per_layer_input is not None:
                gate = F.gelu(self.per_layer_input_gate(x), approximate="tanh")
                x = x + self.post_per_layer_input_norm(self.per_layer_projection(gate * per_layer_input))
            x = x * self.layer_scalar.to(x.dtype)  # (FSDP2 casts parameters to bf16, not buffers)
            return x if kv is None else (x, kv)
        if self.post_norm:
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, layer_cache, write_at, kv_len))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, write_at, kv_len, q_scale)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.residual_scale is not None:
            x = x + attn * self.residual_scale
            return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """``model(tokens [B, T]) -> logits [B, T, V]`` (fp32), optionally driving a ``KVCache``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        windows = cfg.layer_windows or [None] * cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, w, i not in cfg.nope_layers, i) for i, w in enumerate(windows))
        # (each layer's entry in a KV cache: its own, or for a Gemma 4 shared layer its source's)
        own = cfg.cache_layers()
        self._kv_source = [cfg.kv_source(i) for i in range(cfg.num_hidden_layers)]
        self._cache_entry = [own.index(j) if j in own else None for j in self._kv_source]  # (None: a Gated DeltaNet)
        self._linear_entry = {i: n for n, i in enumerate(cfg.linear_layers)}  # (its state's entry in a cache)
        self._kv_kinds = sorted({layer.self_attn.n_kv for layer in self.layers if not layer.linear})  # (Gemma 4: two)
        if cfg.per_layer_input_size:  # (Gemma 4's per-layer inputs: every layer's, packed in one row)
            width = cfg.num_hidden_layers * cfg.per_layer_input_size
            self.embed_tokens_per_layer = nn.Embedding(cfg.per_layer_vocab_size, width)
            self.per_layer_model_projection = Linear(cfg.hidden_size, width, bias=False)
            self.per_layer_projection_norm = RMSNorm(cfg.per_layer_input_size, cfg.rms_norm_eps, cfg.norm_style)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._inv_freq: dict[tuple, torch.Tensor] = {}
        # Gemma: sqrt(hidden size) rounded to each compute dtype, as transformers multiplies by it
        # (a Python number here, so a compiled step holds no tensor made on the fly)
        self._embed_scale = {dt: torch.tensor(cfg.hidden_size ** 0.5, dtype=dt, device="cpu").item()
                             for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
        self._per_layer_scale = {dt: torch.tensor(cfg.per_layer_input_size ** 0.5, dtype=dt, device="cpu").item()
                                 for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
        # Activation checkpointing: with gradients on, each block keeps only its input for the
        # backward pass and runs its forward again there (less memory, about a third more compute).
        self.activation_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def inv_freq(self, device, local: bool = False) -> torch.Tensor:
        """:func:`rope_inv_freq` on ``device``, made once (Gemma 3's local one with the global)."""
        device = torch.device(device)
        if (device, local) not in self._inv_freq:
            self._inv_freq[(device, False)] = rope_inv_freq(self.config).to(device)
            if self.config.local_rope_theta is not None:
                self._inv_freq[(device, True)] = rope_inv_freq(self.config, local=True).to(device)
        return self._inv_freq[(device, local)]

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        return KVCache.empty(self.config, batch_size, max_len, dtype or self.dtype, device or self.device)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        segments: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        live: torch.Tensor | None = None,
        runs: "SegmentRuns | None" = None,
    ) -> torch.Tensor:
        """Final (normed) hidden states [B, T, H]; the LM head is left to the caller.

        Without a cache: a plain causal forward (positions default to 0..T-1; right padding is
        harmless since no real token attends to a later one). With a cache: ``positions [B, T]``
        are required, tokens are written at those slots, and ``kv_len`` (default
        ``positions.max() + 1``) bounds the slots attention reads. With ``segments [B, T]`` (no
        cache; see :class:`r3.batch.Packed`): a token of segment 0 attends to the earlier tokens
        of segment 0, a token of segment k >= 1 to segment 0 and to the earlier tokens of segment
        k, by ``positions`` (sliding windows included); -1 marks padding. Qwen 3.5's Gated DeltaNet
        layers read segment 0 from the start and each later segment, in column order, from the
        state segment 0 ended in (:class:`SegmentRuns`: ``runs``, made on the host from the same
        layout, else read from ``segments``, which waits for the device).

        Qwen 3.5's Gated DeltaNet layers carry a state in the cache that each token changes once:
        with a cache, ``lengths [B]`` says how many of each row's T tokens are real (the rest is
        right padding, which must not reach the state) and ``live [B]`` (one token per row) which
        rows take their token (a row that has stopped keeps its state).
        """
        B, T = tokens.shape
        dev = tokens.device
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache")
            positions = torch.arange(T, device=dev).expand(B, T)
        if rope_max_positions(self.config) is not None and not torch.compiler.is_compiling():
            # (a compiled decode step: the sampler checks; with a cache, kv_len bounds the positions
            # without reading them back from the device)
            self.check_positions(kv_len if cache is not None and isinstance(kv_len, int) else int(positions.max()) + 1)
        x = self.embed_tokens(tokens)
        if self.config.gemma:
            x = x * self._embed_scale[x.dtype]
        elif self.config.embedding_multiplier != 1.0:  # (Granite: by the Python number, as transformers)
            x = x * self.config.embedding_multiplier
        # (OLMo keeps its tables in fp32 and turns q and k in fp32, as transformers does)
        table_dtype = torch.float32 if self.config.olmo else x.dtype
        cos, sin = rope_cos_sin(self.inv_freq(dev), positions, table_dtype, rope_scale(self.config))
        ropes = {w: (cos, sin) for w in self._windows()}  # per window size: each layer's RoPE tables
        if self.config.local_rope_theta is not None:  # (Gemma 3, OLMo 3: sliding-window layers turn by their own base)
            local = rope_cos_sin(self.inv_freq(dev, local=True), positions, table_dtype)
            ropes.update({w: local for w in ropes if w is not None})
        if cache is not None:
            if kv_len is None:
                kv_len = int(positions.max()) + 1
            if isinstance(kv_len, int) and kv_len > cache.max_len:  # (a cache write would land elsewhere)
                raise ValueError(f"positions up to {kv_len} exceed the cache's {cache.max_len} slots")
            # Round the slots read up to a multiple of KV_BUCKET (the mask hides the extra ones):
            # attention then sees few distinct shapes, and CPU kernels (oneDNN) are built once per
            # shape instead of once per decode step.
            kv_len = min(cache.max_len, kv_bucket_ceil(kv_len))
        if segments is not None:
            if cache is not None:
                raise ValueError("segments are for a forward without a KV cache")
            masks = self._segment_masks(positions, segments, x.dtype)
        else:
            masks = self._masks(positions, kv_len if cache is not None else None, x.dtype)
        write_at = self._cache_writes(cache, positions) if cache is not None else None
        q_scale = query_scale(self.config, positions, x.dtype)
        per_layer = self._per_layer_inputs(tokens, x) if self.config.per_layer_input_size else None
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        shared = {}  # Gemma 4: layer -> the keys and values (each [B, kv heads, S, D]) later layers read
        # (Qwen 3.5's Gated DeltaNet layers run a packed layout's segments apart, each continuation
        # from its prefix's state)
        if not self.config.linear_layers or segments is None:
            runs = None
        elif runs is None:
            runs = SegmentRuns.of(segments)
        for i, layer in enumerate(self.layers):
            if layer.linear:  # (a Gated DeltaNet: its state, not keys and values)
                if recompute:
                    x = checkpoint(layer, x, None, None, None, runs=runs, use_reentrant=False)
                else:
                    j = self._linear_entry[i]
                    state = (cache.conv[j], cache.ssm[j]) if cache is not None else None
                    x = layer(x, None, None, None, state, lengths=lengths, live=live, runs=runs)
                continue
            attn = layer.self_attn
            cos, sin = ropes[attn.window]
            source_kv = shared[self._kv_source[i]] if attn.shares_kv else None
            ple = per_layer[:, :, i] if per_layer is not None else None
            if recompute:
                x = checkpoint(layer, x, cos, sin, masks[attn.window], None, None, None, q_scale, source_kv, ple,
                               use_reentrant=False)
            else:
                j = self._cache_entry[i]
                layer_cache = (cache.k[j], cache.v[j]) if cache is not None and not attn.shares_kv else None
                x = layer(x, cos, sin, masks[attn.window], layer_cache, write_at, kv_len, q_scale, source_kv, ple)
            if attn.stores_kv:
                x, shared[i] = x
        return self.norm(x)

    def _per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4's per-layer inputs ``[B, T, layers, dims]``: each token's own row of the per-layer
        table (scaled by sqrt(dims)) and a projection of its embedding ``x`` (scaled by
        hidden ** -1/2, normed per layer), averaged as transformers does (sum times 2 ** -1/2)."""
        B, T = tokens.shape
        cfg = self.config
        shape = (B, T, cfg.num_hidden_layers, cfg.per_layer_input_size)
        own = (self.embed_tokens_per_layer(tokens) * self._per_layer_scale[x.dtype]).reshape(shape)
        projected = self.per_layer_model_projection(x) * cfg.hidden_size ** -0.5
        return (self.per_layer_projection_norm(projected.reshape(shape)) + own) * 2.0 ** -0.5

    def _cache_writes(self, cache: KVCache, positions: torch.Tensor) -> tuple:
        """Where each layer writes the new keys/values, keyed by its kv heads: ``(rows [B, 1],
        positions)`` for indexing, or, for a contiguous cache outside torch.compile, ``(None, flat)``:
        one index into the cache's ``[B * n_kv * S]`` rows, in the order of ``k [B, T, n_kv, D]``
        (built once per forward; each layer's write is then one ``index_copy_``)."""
        B, T = positions.shape
        kinds = self._kv_kinds
        if torch.compiler.is_compiling() or not cache.contiguous:
            at = torch.arange(B, device=positions.device)[:, None], positions
            return dict.fromkeys(kinds, at)
        S = cache.max_len
        out = {}
        for n_kv in kinds:
            heads = torch.arange(n_kv, device=positions.device)
            rows = torch.arange(B, device=positions.device)[:, None, None] * n_kv + heads  # [B, 1, n_kv]
            out[n_kv] = None, (rows * S + positions[:, :, None]).reshape(-1)
        return out

    def _windows(self) -> set:
        return {None if layer.linear else layer.self_attn.window for layer in self.layers}

    def check_positions(self, n: int) -> None:
        """Refuse ``n`` positions where r3 cannot follow transformers (LongRoPE past its original
        context; see the module docstring)."""
        limit = rope_max_positions(self.config)
        if limit is not None and n > limit:
            raise R3Error(f"this model's LongRoPE is followed up to original_max_position_embeddings = {limit} "
                          f"positions; a sequence reached {n} (shorten the token limits)")

    def _masks(self, positions: torch.Tensor, kv_len: int | None, dtype: torch.dtype) -> dict:
        """Additive attention masks [B, 1, T, S] (0 or -inf, in ``dtype``: SDPA would convert a
        boolean one in every layer) keyed by window size; None means plain causal (query t attends
        to slots <= t). With a cache, a forward whose every row sits at positions 0..T-1 (a
        prefill from the start) is plain causal too: the later slots it reads hold nothing it may
        see, and SDPA's causal path skips them instead of masking them."""
        masks = {}
        T = positions.shape[1]
        from_start = kv_len is not None and T > 1 and bool(
            (positions == torch.arange(T, device=positions.device)).all())
        for window in self._windows():
            if (kv_len is None or from_start) and (window is None or window >= T):
                masks[window] = None
                continue
            slots = torch.arange(T if kv_len is None else kv_len, device=positions.device)
            q = positions[:, None, :, None]
            m = slots <= q
            if window is not None:
                m = m & (slots > q - window)
            masks[window] = _additive(m, dtype)
        return masks

    def _segment_masks(self, positions: torch.Tensor, segments: torch.Tensor, dtype: torch.dtype) -> dict:
        """Additive masks [B, 1, T, T] (:func:`_additive`; a boolean one would be converted, and kept
        for the backward pass, in every layer) of the packed shared-prefix layout, keyed by window
        size. Padding attends to padding (never to real tokens, and no query row is empty)."""
        qs, ks = segments[:, None, :, None], segments[:, None, None, :]
        qp, kp = positions[:, None, :, None], positions[:, None, None, :]
        base = ((ks == qs) | ((ks == 0) & (qs > 0))) & (kp <= qp)
        masks = {}
        for w in self._windows():
            m = base if w is None else base & (kp > qp - w)
            masks[w] = _additive(m, dtype)
        return masks

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        segments: torch.Tensor | None = None,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
        runs: "SegmentRuns | None" = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in fp32; or, with ``at=(rows, cols)``, only the logits at those
        positions, [N, V] in the compute dtype (the loss needs a few positions, and reads them
        through a fused kernel that upcasts per block: no [B, T, V] fp32 tensor is built)."""
        h = self.hidden_states(tokens, positions=positions, cache=cache, kv_len=kv_len, segments=segments, runs=runs)
        if at is not None:
            return self.logits(h[at])
        return self.logits(h).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states, in the compute dtype (Granite: divided by its
        ``logits_scaling``; Gemma 2: capped by ``final_logit_softcapping``, as transformers does)."""
        out = self.lm_head(h)
        if self.config.logits_scaling != 1.0:
            out = out / self.config.logits_scaling
        cap = self.config.final_logit_softcapping
        return out if cap is None else torch.tanh(out / cap) * cap

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Our parameter name -> shape (tied ``lm_head`` left out), with Gemma 4's ``layer_scalar``
    buffers (a checkpoint holds them)."""
    h = cfg.hidden_size
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    ple = cfg.per_layer_input_size
    if ple:
        shapes.update({"embed_tokens_per_layer.weight": (cfg.per_layer_vocab_size, cfg.num_hidden_layers * ple),
                       "per_layer_model_projection.weight": (cfg.num_hidden_layers * ple, h),
                       "per_layer_projection_norm.weight": (ple,)})
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        if cfg.linear(n):
            shapes.update(_linear_layer_shapes(cfg, p))
            continue
        i, d = cfg.layer_intermediate_size(n), cfg.layer_head_dim(n)
        nq = cfg.num_attention_heads * d
        kv_rows = sum(rows for _, rows in _layer_qkv_rows(cfg, n)[1:])  # (k and v: none on a Gemma 4 shared layer)
        shapes.update({
            **({} if cfg.olmo else {p + "input_layernorm.weight": (h,)}),
            p + "post_attention_layernorm.weight": (h,),
            **({p + "pre_feedforward_layernorm.weight": (h,)} if cfg.gemma else {}),
            **({p + "post_feedforward_layernorm.weight": (h,)} if cfg.gemma or cfg.olmo else {}),
            p + "self_attn.qkv_proj.weight": (_layer_qkv_rows(cfg, n)[0][1] + kv_rows, h),
            p + "self_attn.o_proj.weight": (h, nq),
            p + "mlp.gate_up_proj.weight": (2 * i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.qkv_bias:
            shapes[p + "self_attn.qkv_proj.bias"] = (_layer_qkv_rows(cfg, n)[0][1] + kv_rows,)
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_up_proj.bias": (2 * i,), p + "mlp.down_proj.bias": (h,)})
        if cfg.qk_norm:
            q_dim, k_dim = (nq, kv_rows // 2) if cfg.olmo else (d, d)
            shapes[p + "self_attn.q_norm.weight"] = (q_dim,)
            if kv_rows:
                shapes[p + "self_attn.k_norm.weight"] = (k_dim,)
        if ple:
            shapes.update({p + "per_layer_input_gate.weight": (ple, h), p + "per_layer_projection.weight": (h, ple),
                           p + "post_per_layer_input_norm.weight": (h,)})
        if cfg.gemma4:
            shapes[p + "layer_scalar"] = (1,)
    return shapes


def _linear_layer_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple]:
    """A Qwen 3.5 Gated DeltaNet layer's parameter shapes (prefix ``p``), its norms and MLP too."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    values, conv = cfg.linear_value_heads * cfg.linear_value_dim, cfg.linear_conv_channels
    a = p + "linear_attn."
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            a + "in_proj_qkv.weight": (conv, h), a + "in_proj_z.weight": (values, h),
            a + "in_proj_b.weight": (cfg.linear_value_heads, h), a + "in_proj_a.weight": (cfg.linear_value_heads, h),
            a + "conv1d.weight": (conv, 1, cfg.linear_conv_kernel), a + "dt_bias": (cfg.linear_value_heads,),
            a + "A_log": (cfg.linear_value_heads,), a + "norm.weight": (cfg.linear_value_dim,),
            a + "out_proj.weight": (h, values),
            p + "mlp.gate_up_proj.weight": (2 * i, h), p + "mlp.down_proj.weight": (h, i)}


def _layer_qkv_rows(cfg: ModelConfig, n: int) -> list[tuple[str, int]]:
    """Layer ``n``'s fused q/k/v: the checkpoint projections it holds, in order, and their rows
    (Gemma 4: no v where the keys are the values, only q on a shared layer)."""
    d, kv = cfg.layer_head_dim(n), cfg.layer_kv_heads(n)
    parts = [("self_attn.q_proj", cfg.num_attention_heads * d * (2 if cfg.attn_output_gate else 1))]
    if cfg.kv_source(n) == n:
        parts.append(("self_attn.k_proj", kv * d))
        if not cfg.layer_k_eq_v(n):
            parts.append(("self_attn.v_proj", kv * d))
    return parts


def checkpoint_ignores(cfg: ModelConfig, name: str) -> bool:
    """Whether a checkpoint tensor (no ``model.`` prefix) is one that transformers leaves unread:
    Gemma 4's published checkpoints hold keys and values for the shared layers, which use their
    source layer's; Qwen 3.5's hold a multi-token prediction head (``mtp.*``), which its causal LM
    does not run."""
    if cfg.qwen35 and name.startswith("mtp."):
        return True
    if not cfg.kv_shared_layers:
        return False
    m = _LAYER.match(name)
    return bool(m and cfg.kv_source(int(m.group(1))) != int(m.group(1)) and name[m.end():].startswith(
        ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")))


_LAYER = re.compile(r"(?:.*\.)?layers\.(\d+)\.")


# Our fused projections and the checkpoint tensors they hold, in order (transformers' order for
# Phi-3, whose checkpoints store them fused already).
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _checkpoint_fuses(cfg: ModelConfig) -> bool:
    """Whether the family's checkpoints store q/k/v and gate/up fused (Phi-3) or apart."""
    return cfg.model_type == "phi3"


def _fused_parts(cfg: ModelConfig, fused: str, name: str) -> list[tuple[str, int]]:
    """The checkpoint projections (and their rows) of our fused ``fused`` in the layer ``name`` names."""
    m = _LAYER.match(name)
    n = int(m.group(1)) if m else 0
    if fused == "self_attn.qkv_proj":
        return _layer_qkv_rows(cfg, n)
    i = cfg.layer_intermediate_size(n)
    return [("mlp.gate_proj", i), ("mlp.up_proj", i)]


def _checkpoint_parts(cfg: ModelConfig, name: str) -> list[tuple[str, int]] | None:
    """``layers.3.self_attn.qkv_proj.weight`` -> the checkpoint names of its parts and their rows,
    ``[("layers.3.self_attn.q_proj.weight", 1536), ...]``; None for a parameter we do not fuse."""
    for fused in _FUSED:
        for kind in ("weight", "bias"):
            tail = f"{fused}.{kind}"
            if name.endswith(tail):
                prefix = name[: -len(tail)]
                return [(f"{prefix}{part}.{kind}", rows) for part, rows in _fused_parts(cfg, fused, name)]
    return None


def param_names_hf(cfg: ModelConfig) -> dict[str, tuple]:
    """The tensors a checkpoint of this family must provide (names without ``model.``) -> shape:
    ours, with the fused projections under the family's own names (apart except for Phi-3)."""
    shapes = param_shapes(cfg)
    if _checkpoint_fuses(cfg):
        return shapes
    out = {}
    for name, shape in shapes.items():
        for part, rows in _checkpoint_parts(cfg, name) or [(name, shape[0])]:
            out[part] = (rows, *shape[1:])
    return out


class CheckpointAssembler:
    """Builds our parameters from checkpoint tensors given one at a time (shards in any order):
    tensors of a fused projection wait until all its parts have come, then are concatenated."""

    def __init__(self, cfg: ModelConfig, always: bool = False):
        self.cfg = cfg
        self.always = always
        self.expected = param_names_hf(cfg)  # checkpoint tensor name -> shape
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``[(our name, tensor)]`` completed by the checkpoint tensor ``name`` (maybe none yet)."""
        target = fused_target(self.cfg, name, self.always)
        if target is None:
            return [(name, tensor)]
        ours, part, parts = target
        got = self.pending.setdefault(ours, {})
        got[part] = tensor
        if len(got) < len(parts):
            return []
        del self.pending[ours]
        return [(ours, torch.cat([got[p] for p in parts], dim=0))]


def fused_target(cfg: ModelConfig, name: str, always: bool = False) -> tuple[str, str, tuple] | None:
    """(our parameter name, the part, all parts in order) when the checkpoint tensor ``name`` is
    one part of a projection we hold fused; None for any other tensor. ``always``: for any family
    (r3's own training checkpoints held the parts apart for Phi-3 too); else only for families
    whose checkpoints hold them apart."""
    if _checkpoint_fuses(cfg) and not always:
        return None
    for fused, parts in _FUSED.items():
        for part in parts:
            for kind in ("weight", "bias"):
                tail = f"{part}.{kind}"
                if name.endswith(tail):
                    held = tuple(p for p, _ in _fused_parts(cfg, fused, name))
                    return f"{name[: -len(tail)]}{fused}.{kind}", part, held
    return None


def split_for_checkpoint(cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                         always: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict (any prefix) in the family's checkpoint layout: q/k/v and gate/up apart
    again, except for Phi-3 (whose checkpoints hold them fused, as we do), unless ``always``."""
    if _checkpoint_fuses(cfg) and not always:
        return tensors
    out = {}
    for name, t in tensors.items():
        parts = _checkpoint_parts(cfg, name)
        if parts is None:
            out[name] = t
            continue
        for (part, _), piece in zip(parts, t.split([rows for _, rows in parts], dim=0)):
            out[part] = piece.contiguous()
    return out


def fuse_checkpoint_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                            always: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_for_checkpoint`: a state dict in the checkpoint layout (any
    prefix) with q/k/v and gate/up fused as our model holds them (``always``: see
    :func:`fused_target`)."""
    assembler = CheckpointAssembler(cfg, always)
    out = {}
    for name, t in tensors.items():
        out.update(assembler.add(name, t))
    if assembler.pending:
        raise R3Error(f"incomplete fused projection '{next(iter(assembler.pending))}'")
    return out


def config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
