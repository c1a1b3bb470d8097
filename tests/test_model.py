"""Our transformer against transformers on the same weights, and the KV cache against a full forward."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import hf_rope, transformers_major
from r3.checkpoint import load
from r3.model import ModelConfig, Transformer, rope_inv_freq, rope_scale

KINDS = ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3", "smollm3", "olmo2", "olmo3", "granite", "ministral3",
         "gemma2", "gemma4")


def _tokens(vocab, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_fp32(tiny_dirs, kind):
    path, hf = tiny_dirs[kind]
    model, _ = load(path, tokenizer=False)
    tokens = _tokens(hf.config.vocab_size, 3, 40)  # 40 > the Mistral window of 8
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits.float()
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_config_features_are_really_used(tiny_dirs):
    """The tiny configs exercise what they claim: llama3 scaling, tying, biases, a window."""
    llama, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    assert llama.config.rope_scaling["rope_type"] == "llama3"
    assert llama.lm_head.weight is llama.embed_tokens.weight
    plain = ModelConfig(**{**llama.config.__dict__, "rope_scaling": None})
    assert not torch.allclose(rope_inv_freq(plain), rope_inv_freq(llama.config))
    qwen, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    assert qwen.layers[0].self_attn.qkv_proj.bias is not None and qwen.layers[0].self_attn.o_proj.bias is None
    assert qwen.lm_head.weight is not qwen.embed_tokens.weight
    mistral, _ = load(tiny_dirs["mistral"][0], tokenizer=False)
    assert mistral.config.layer_windows == [8, 8] and mistral.config.head_dim == 24


def test_qwen3_and_phi3_features_are_really_used(tiny_dirs):
    """Qwen3's q/k norms and explicit head_dim, Phi-3's LongRoPE (short factors, attention factor)
    are read and change the output, so the parity tests above cover them."""
    qwen3, _ = load(tiny_dirs["qwen3"][0], tokenizer=False)
    attn = qwen3.layers[0].self_attn
    assert qwen3.config.head_dim == 24 and attn.q_norm.weight.shape == (24,) and attn.k_norm.weight.shape == (24,)
    assert qwen3.lm_head.weight is qwen3.embed_tokens.weight
    phi3, _ = load(tiny_dirs["phi3"][0], tokenizer=False)
    s = phi3.config.rope_scaling
    assert s["rope_type"] == "longrope" and s["original_max_position_embeddings"] == 64
    assert s["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(256 / 64) / math.log(64)))
    plain = ModelConfig(**{**phi3.config.__dict__, "rope_scaling": None})
    assert not torch.allclose(rope_inv_freq(plain), rope_inv_freq(phi3.config))
    tokens = _tokens(256, 1, 20)
    with torch.no_grad():
        ours = phi3(tokens)
        for layer in qwen3.layers:
            assert layer.self_attn.q_norm.weight.std() > 0.1  # non-trivial norms (conftest)
        phi3.config.rope_scaling = {**s, "attention_factor": 1.0}
        assert (phi3(tokens) - ours).abs().max() > 1e-3
        phi3.config.rope_scaling = s


def test_smollm3_nope_layers_and_their_windows_are_really_used(tiny_dirs):
    """SmolLM3's NoPE layer (``no_rope_layers`` 0) attends without RoPE and holds the sliding
    window, its attention and MLP biases and tied embeddings are read: turning RoPE on in that
    layer, or dropping its window, moves the logits far past the parity tests' tolerance."""
    path, hf = tiny_dirs["smollm3"]
    model, _ = load(path, tokenizer=False)
    cfg = model.config
    assert cfg.nope_layers == [1] and cfg.layer_windows == [None, 8] and cfg.rope_theta == 500000.0
    assert [layer.self_attn.rope for layer in model.layers] == [True, False]
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is not None
    assert model.layers[0].mlp.down_proj.bias is not None and model.lm_head.weight is model.embed_tokens.weight
    tokens = _tokens(256, 2, 30)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        assert (model(tokens) - ref).abs().max() <= 1e-4
        model.layers[1].self_attn.rope = True
        assert (model(tokens) - ref).abs().max() > 1e-2
        model.layers[1].self_attn.rope, model.layers[1].self_attn.window = False, None
        assert (model(tokens) - ref).abs().max() > 1e-2


def test_smollm3_config_fields_as_transformers_reads_them():
    """Without ``no_rope_layers`` every ``no_rope_layer_interval``-th layer (4 by default) is NoPE;
    windows go to the NoPE layers unless ``layer_types`` says; SmolLM3Config's defaults (tied
    embeddings, base 2e6) apply; a malformed list is one clear error."""
    from r3.errors import R3Error

    base = dict(model_type="smollm3", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=8,
                num_attention_heads=2)
    cfg = ModelConfig.from_hf(base)
    assert cfg.nope_layers == [3, 7] and cfg.layer_windows == [None] * 8
    assert cfg.tie_word_embeddings and cfg.rope_theta == 2_000_000.0 and cfg.max_position_embeddings == 32_768
    assert ModelConfig.from_hf({**base, "no_rope_layer_interval": 3}).nope_layers == [2, 5]
    windowed = ModelConfig.from_hf({**base, "use_sliding_window": True, "sliding_window": 16})
    assert windowed.layer_windows == [None, None, None, 16, None, None, None, 16]
    typed = ModelConfig.from_hf({**base, "use_sliding_window": True, "sliding_window": 16,
                                 "layer_types": ["sliding_attention"] + ["full_attention"] * 7})
    assert typed.layer_windows == [16] + [None] * 7
    assert ModelConfig.from_hf({**base, "no_rope_layers": [1, 0] * 4 + [1, 1]}).nope_layers == [1, 3, 5, 7]
    for bad in ([1] * 7, [1, 2] * 4, [True] * 8, "1111"):
        with pytest.raises(R3Error, match=r"^config.json: field 'no_rope_layers' must list 1 \(RoPE\) or 0 "
                                          r"\(none\) for each of the 8 layers, got "):
            ModelConfig.from_hf({**base, "no_rope_layers": bad})
    again = ModelConfig.from_hf(windowed.to_hf())
    assert again == windowed and windowed.to_hf()["no_rope_layers"] == [1, 1, 1, 0, 1, 1, 1, 0]


@pytest.mark.parametrize("name,params", [("SmolLM3Config", 3_075_098_624), ("Olmo2Config", 6_888_624_128),
                                         ("Olmo3Config", 6_888_624_128), ("GraniteConfig", 6_738_415_616),
                                         ("Gemma2Config", 2_614_341_888), ("Ministral3Config", 8_489_553_920),
                                         ("Gemma4TextConfig", 5_077_177_856)])
def test_default_shapes_build_transformers_parameter_names_and_count(name, params):
    """SmolLM3Config's defaults are SmolLM3-3B's shapes, Olmo2Config's, Olmo3Config's and GraniteConfig's 7B ones,
    Gemma2Config's gemma-2-2b's, Ministral3Config's an 8B's and Gemma4TextConfig's a 5B with
    per-layer inputs and 512-wide full-attention heads: r3 builds the same parameters as
    transformers, name for name (q/k/v and gate/up apart, as in a checkpoint; Gemma 4's
    layer_scalar buffers too) and in number (on the meta device: nothing is allocated)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from r3.model import param_names_hf

    hf_cfg = getattr(transformers, name)()
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg)
    theirs = {k.removeprefix("model."): tuple(v.shape) for k, v in hf.state_dict().items()}
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    if cfg.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    assert param_names_hf(cfg) == theirs
    counted = [s for k, s in theirs.items() if not k.endswith("layer_scalar")]  # (a buffer, not a parameter)
    assert sum(math.prod(s) for s in counted) == sum(p.numel() for p in hf.parameters()) == params
    if name == "SmolLM3Config":
        assert cfg.nope_layers == list(range(3, 36, 4))
    if name == "Olmo3Config":
        assert cfg.layer_windows == [None if i % 4 == 3 else 4096 for i in range(32)]
    if name == "Gemma4TextConfig":
        assert cfg.layer_windows == [None if i % 6 == 5 else 512 for i in range(30)]
        assert (cfg.global_head_dim, cfg.per_layer_input_size, cfg.rope_scaling["partial_rotary_factor"]) == (512, 256, 0.25)
    if name == "Gemma2Config":
        assert cfg.layer_windows == [None if i % 2 else 4096 for i in range(26)]
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.query_pre_attn_scalar) == (50.0, 30.0, 256)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_olmo2_output_norms_and_all_head_qk_norms_are_really_used(tiny_dirs):
    """OLMo 2 norms each block's attention and MLP outputs (no input norm), norms q and k over all
    heads at once, and scales its norms and turns RoPE in fp32: in bf16 its logits equal
    transformers' bit for bit, and per-head q/k norms instead of whole-projection ones move them."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_dirs["olmo2"]
    model, _ = load(path, tokenizer=False, dtype=torch.bfloat16)
    block = model.layers[0]
    assert not hasattr(block, "input_layernorm") and block.post_feedforward_layernorm.style == "olmo"
    assert block.self_attn.q_norm.weight.shape == (64,) and block.self_attn.k_norm.weight.shape == (32,)
    assert block.self_attn.o_proj.bias is not None and model.lm_head.weight is not model.embed_tokens.weight
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    tokens = _tokens(256, 3, 40)
    with torch.no_grad():
        assert torch.equal(model(tokens), theirs(tokens).logits.float())
        model, _ = load(path, tokenizer=False)  # (fp32: the parity tests' tolerance is 1e-4)
        want = model(tokens)
        for layer in model.layers:
            layer.self_attn.qk_norm_all_heads = False  # (the norms' weights then broadcast per head: wrong)
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight = torch.nn.Parameter(norm.weight[:16].clone())
        assert (model(tokens) - want).abs().max() > 1e-3


def test_olmo3_windows_and_rope_per_layer_type_are_really_used(tiny_dirs):
    """OLMo 3's tiny config: a sliding-window layer (window 8) turning RoPE by its own base (10000)
    and a full layer with YaRN on a base of 500000. In bf16 its logits equal transformers' bit for
    bit; dropping the window, the sliding layer's own base or the full layer's YaRN each moves the
    fp32 logits far past the parity tests' tolerance. The export reads back the same in r3 and in
    transformers."""
    from transformers import AutoModelForCausalLM

    from r3.checkpoint import save_hf

    path, hf = tiny_dirs["olmo3"]
    model, _ = load(path, tokenizer=False, dtype=torch.bfloat16)
    cfg = model.config
    assert cfg.layer_windows == [8, None] and cfg.local_rope_theta == 10000.0 and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["original_max_position_embeddings"] == 32
    assert not hasattr(model.layers[0], "input_layernorm") and model.layers[0].self_attn.q_norm.weight.shape == (64,)
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    tokens = _tokens(256, 3, 60)
    with torch.no_grad():
        assert torch.equal(model(tokens), theirs(tokens).logits.float())
        model, _ = load(path, tokenizer=False)
        want = model(tokens)
        for change in ({"layer_windows": [None, None]}, {"local_rope_theta": 500000.0}, {"rope_scaling": None}):
            other = Transformer(ModelConfig(**{**cfg.__dict__, **change}))
            other.load_state_dict(model.state_dict())
            assert (other(tokens) - want).abs().max().item() > 1e-3, change
    save_hf(model, None, path.parent / "olmo3_export")
    back = AutoModelForCausalLM.from_pretrained(str(path.parent / "olmo3_export")).eval()
    with torch.no_grad():
        assert (back(tokens).logits.float() - hf(tokens).logits.float()).abs().max().item() <= 1e-5
    assert load(path.parent / "olmo3_export", tokenizer=False)[0].config == cfg


def test_olmo3_rope_fields_follow_transformers_5():
    """Without rope_parameters per layer type, transformers 5 turns the full layers by rope_theta
    (with rope_scaling) and the sliding ones by 500000, while 4.x turns both by rope_theta: r3 reads
    the first, and refuses a rope_theta where the two differ. Every fourth layer is full unless
    layer_types says otherwise; a bad field is one line naming it."""
    from r3.errors import R3Error

    base = dict(model_type="olmo3", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=4,
                num_attention_heads=2)
    cfg = ModelConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "yarn", "factor": 8.0,
                                                                              "original_max_position_embeddings": 8192}})
    assert cfg.layer_windows == [4096, 4096, 4096, None] and (cfg.rope_theta, cfg.local_rope_theta) == (5e5, 5e5)
    assert cfg.rope_scaling["factor"] == 8.0 and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    nested = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}
    cfg = ModelConfig.from_hf({**base, "rope_parameters": nested, "layer_types": ["full_attention"] * 4})
    assert cfg.layer_windows == [None] * 4 and (cfg.rope_theta, cfg.local_rope_theta) == (1e6, 1e4)
    for change, message in (
            ({"rope_theta": 10000.0}, "field 'rope_theta' 10000.0 of an OLMo 3 config: transformers 5 turns"),
            ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
             "field 'rope_parameters' of an OLMo 3 config is keyed by layer type"),
            ({"rope_parameters": {**nested, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
             "unsupported rope scaling type 'linear' for the sliding-window layers"),
            ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "names its type as 'type' ('yarn')"),
            ({"sliding_window": None}, "field 'sliding_window' is None, but layers use sliding_attention"),
            ({"layer_types": ["full_attention"] * 3}, "field 'layer_types' must list")):
        with pytest.raises(R3Error) as e:
            ModelConfig.from_hf({**base, **change})
        assert message in str(e.value), str(e.value)


def test_granite_scalars_are_really_used(tiny_dirs):
    """Granite 3's embedding, attention, residual and logit scalars (in the tiny config, values that
    published 2b-class configs use) are read, and each moves the logits far past the parity tests'
    tolerance when left out; in bf16 its logits equal transformers' bit for bit."""
    from transformers import AutoModelForCausalLM

    path, hf = tiny_dirs["granite"]
    model, _ = load(path, tokenizer=False)
    cfg = model.config
    assert (cfg.embedding_multiplier, cfg.attention_multiplier, cfg.residual_multiplier, cfg.logits_scaling) == (
        12.0, 0.015625, 0.22, 8.0)
    tokens = _tokens(256, 3, 40)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        for layer in model.layers:
            layer.self_attn.scale = None  # (SDPA's 1/sqrt(head_dim))
        assert (model(tokens) - want).abs().max() > 1e-2
        for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            model, _ = load(path, tokenizer=False)
            setattr(model.config, key, 1.0)
            for layer in model.layers:
                layer.residual_scale = None if key == "residual_multiplier" else layer.residual_scale
            assert (model(tokens) - want).abs().max() > 1e-2, key
        theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
        ours, _ = load(path, tokenizer=False, dtype=torch.bfloat16)
        assert torch.equal(ours(tokens), theirs(tokens).logits.float())


def test_longrope_past_the_original_context_is_refused(tiny_dirs):
    from r3.errors import R3Error

    phi3, _ = load(tiny_dirs["phi3"][0], tokenizer=False)
    with torch.no_grad():
        phi3(_tokens(256, 1, 64))  # positions 0..63: the short factors, as transformers uses them
        with pytest.raises(R3Error, match="original_max_position_embeddings = 64"):
            phi3(_tokens(256, 1, 65))
        cache = phi3.new_cache(1, 80)
        with pytest.raises(R3Error, match="reached 70"):
            phi3(_tokens(256, 1, 1), positions=torch.tensor([[69]]), cache=cache)
        # a decode step with kv_len (as the sampler calls it: the longest row's length) is checked
        # by kv_len, without reading the positions back
        phi3.hidden_states(_tokens(256, 1, 1), positions=torch.tensor([[63]]), cache=cache, kv_len=64)
        with pytest.raises(R3Error, match="reached 66"):
            phi3.hidden_states(_tokens(256, 1, 1), positions=torch.tensor([[10]]), cache=cache, kv_len=66)


def test_token_limits_are_checked_against_the_positions_the_model_has(tiny_dirs):
    """The sampling limits' sum against the model's positions, before any sampling: LongRoPE's
    original context (where the forward refuses more), a linear factor's scaled length (some
    checkpoints keep the unscaled one in max_position_embeddings), else max_position_embeddings."""
    from r3.checkpoint import load_config
    from r3.errors import R3Error
    from r3.model import check_token_limits

    phi3 = load_config(tiny_dirs["phi3"][0])
    assert phi3.max_position_embeddings == 256
    check_token_limits(phi3, "phi3", attempt=32, reflection=32)
    with pytest.raises(R3Error, match=r"^token limits attempt 32 \+ reflection 33 = 65, more than the 64 positions "
                                      r"of phi3 \(original_max_position_embeddings, as far as r3 follows LongRoPE\)"):
        check_token_limits(phi3, "phi3", attempt=32, reflection=33)
    llama = load_config(tiny_dirs["llama"][0])
    n = llama.max_position_embeddings
    check_token_limits(llama, "llama", attempt=n)
    with pytest.raises(R3Error, match=rf"^token limits attempt {n + 1}, more than the {n} positions of llama "
                                      r"\(max_position_embeddings\); lower them$"):
        check_token_limits(llama, "llama", attempt=n + 1)
    llama.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    check_token_limits(llama, "llama", attempt=4 * n)
    with pytest.raises(R3Error, match=rf"more than the {4 * n} positions of llama \(max_position_embeddings x the "
                                      r"linear rope scaling factor\)"):
        check_token_limits(llama, "llama", attempt=4 * n + 1)


def test_sliding_window_changes_the_output(tiny_dirs):
    """Guard the parity test: without the window, Mistral's logits would differ past position 8."""
    path, hf = tiny_dirs["mistral"]
    model, _ = load(path, tokenizer=False)
    tokens = _tokens(hf.config.vocab_size, 1, 24)
    with torch.no_grad():
        windowed = model(tokens)
        for layer in model.layers:
            layer.self_attn.window = None
        full = model(tokens)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert (windowed[:, 9:] - full[:, 9:]).abs().max() > 1e-3


def test_builtin_matches_transformers_gguf(builtin, builtin_hf):
    model, tok = builtin
    text = "<|im_start|>user\nUse 3, 5 and 7 to make 22.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        diff = (model(ids) - builtin_hf(ids).logits.float()).abs().max().item()
    assert diff <= 2e-3


def test_builtin_tokenizer_ids_identical(builtin):
    """Our (cached) tokenizer gives transformers' GGUF tokenizer's ids, chat template included,
    with a bos only where the file says to add one (``tokenizer.ggml.add_bos_token``; SmolLM2's says
    not to, and transformers 4.57's conversion adds one anyway: a prompt with ``<|im_start|>`` in front)."""
    import gguf
    from transformers import AutoTokenizer

    from r3.checkpoint import builtin_gguf

    _, ours = builtin
    f = builtin_gguf("smollm2-135m")
    ref = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    add_bos = bool(gguf.GGUFReader(str(f)).fields["tokenizer.ggml.add_bos_token"].contents())
    bos = [int(gguf.GGUFReader(str(f)).fields["tokenizer.ggml.bos_token_id"].contents())] if add_bos else []
    texts = ["hello world", "  (12 + 7) * 3 = 57\n<answer> 1 </answer>", "naïve café — ünïcödé 🙂", ""]
    for t in texts:
        assert ours(t)["input_ids"] == bos + ref(t, add_special_tokens=False)["input_ids"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    a = ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    b = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert a == b and a.endswith("<|im_start|>assistant\n")
    assert ours.eos_token == "<|im_end|>" and len(ours) == 49152


def _prefill_then_decode(model, rows, n_prefill):
    """Right-padded ragged prefill of each row's first n_prefill[b] tokens, then decode the rest
    one token per step with per-row positions; returns per-row logits for every position."""
    B = len(rows)
    max_len = max(len(r) for r in rows)
    cache = model.new_cache(B, max_len + 4)
    P = max(n_prefill)
    pad = 0
    tokens = torch.tensor([r[:n] + [pad] * (P - n) for r, n in zip(rows, n_prefill)])
    positions = torch.arange(P).expand(B, P).clone()
    out = [[] for _ in range(B)]
    logits = model(tokens, positions=positions, cache=cache)
    for b, n in enumerate(n_prefill):
        out[b].extend(logits[b, :n])
    pos = list(n_prefill)
    while any(p < len(r) for p, r in zip(pos, rows)):
        # rows already done keep re-feeding a pad token at their end slot (harmless, overwritten)
        tok = torch.tensor([[r[p] if p < len(r) else pad] for p, r in zip(pos, rows)])
        positions = torch.tensor([[min(p, len(r))] for p, r in zip(pos, rows)])
        logits = model(tok, positions=positions, cache=cache)
        for b, r in enumerate(rows):
            if pos[b] < len(r):
                out[b].append(logits[b, 0])
                pos[b] += 1
    return [torch.stack(o) for o in out]


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_ragged_decode_equals_full_forward(tiny_dirs, kind):
    path, hf = tiny_dirs[kind]
    model, _ = load(path, tokenizer=False)
    lengths, n_prefill = [21, 9, 15], [5, 3, 11]
    rows = [_tokens(hf.config.vocab_size, 1, n, seed=i)[0].tolist() for i, n in enumerate(lengths)]
    with torch.no_grad():
        inc = _prefill_then_decode(model, rows, n_prefill)
        for r, got in zip(rows, inc):
            full = model(torch.tensor([r]))[0]
            assert got.shape == full.shape
            assert (got - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma3"])  # mistral, gemma3: a sliding window of 8 < T
def test_prefill_from_the_start_is_plain_causal(tiny_dirs, kind):
    """A cached forward whose rows all sit at positions 0..T-1 runs SDPA's causal path (no mask);
    it must equal the masked path, which a forward starting at position 1 takes."""
    path, hf = tiny_dirs[kind]
    model, _ = load(path, tokenizer=False)
    row = _tokens(hf.config.vocab_size, 2, 20)
    pos = torch.arange(20).expand(2, 20)
    masks = model._masks(pos, 64, torch.float32)
    window = hf.config.sliding_window if kind == "mistral" else None
    assert masks[window] is None if window is None else masks[window].shape == (2, 1, 20, 64)
    assert all(m is not None for m in model._masks(pos + 1, 64, torch.float32).values())  # not from the start: masked
    with torch.no_grad():
        a = model(row, positions=pos, cache=model.new_cache(2, 64))
        cache = model.new_cache(2, 64)
        first = model(row[:, :1], positions=pos[:, :1], cache=cache)
        rest = model(row[:, 1:], positions=pos[:, 1:], cache=cache)
        b = torch.cat([first, rest], dim=1)
        full = model(row)
    assert (a - b).abs().max().item() <= 1e-5 and (a - full).abs().max().item() <= 1e-5


def test_kv_cache_select_forks_rows(tiny_dirs):
    path, hf = tiny_dirs["llama"]
    model, _ = load(path, tokenizer=False)
    row = _tokens(hf.config.vocab_size, 1, 12)[0]
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(row[None, :10], positions=torch.arange(10)[None], cache=cache)
        forked = cache.select([0, 0, 0]).grow(20)
        assert forked.batch_size == 3 and forked.max_len == 20
        nxt = row[10:12].expand(3, 2)
        got = model(nxt, positions=torch.tensor([[10, 11]] * 3), cache=forked)
        full = model(row[None])[0, 10:12]
    for b in range(3):
        assert (got[b] - full).abs().max().item() <= 1e-4


def test_bf16_forward_close_to_fp32(tiny_dirs):
    path, hf = tiny_dirs["qwen2"]
    m32, _ = load(path, tokenizer=False)
    m16, _ = load(path, dtype=torch.bfloat16, tokenizer=False)
    assert m16.dtype == torch.bfloat16
    tokens = _tokens(hf.config.vocab_size, 2, 16)
    with torch.no_grad():
        a, b = m32(tokens), m16(tokens)
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_hidden_states_feed_lm_head(tiny_dirs):
    path, hf = tiny_dirs["qwen2"]
    model, _ = load(path, tokenizer=False)
    tokens = _tokens(hf.config.vocab_size, 2, 7)
    with torch.no_grad():
        h = model.hidden_states(tokens)
        assert h.shape == (2, 7, model.config.hidden_size)
        assert torch.equal(model.lm_head(h).float(), model(tokens))


def test_gradients_flow_through_every_parameter(tiny_dirs):
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    model.train()
    model(_tokens(256, 2, 8)).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unsupported_options_are_clear_errors():
    from r3.errors import R3Error

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    ModelConfig.from_hf(base)
    with pytest.raises(R3Error, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(R3Error, match="unsupported rope scaling type 'dynamic'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    for scaling in (None, {"rope_type": "yarn", "factor": 4.0}):  # (odd: a crash in RoPE before)
        with pytest.raises(R3Error, match="head_dim 5 is odd, and RoPE turns pairs of dims"):
            ModelConfig.from_hf({**base, "head_dim": 5, "rope_scaling": scaling})
    with pytest.raises(R3Error, match="hidden_act 'gelu'"):
        ModelConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(R3Error, match="'short_factor' must be a list of 2 numbers"):
        ModelConfig.from_hf({**base, "model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                                            "long_factor": [1.0, 2.0]}})
    with pytest.raises(R3Error, match="unsupported model_type 'gemma'"):
        ModelConfig.from_hf({**base, "model_type": "gemma"})
    with pytest.raises(R3Error, match="missing field 'hidden_size'"):
        ModelConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    qwen = ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True,
                                "sliding_window": 4, "max_window_layers": 0})
    assert qwen.layer_windows == [4]


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", "two", "field 'num_hidden_layers' must be a positive integer, got 'two'"),
    ("vocab_size", -5, "field 'vocab_size' must be a positive integer, got -5"),
    ("hidden_size", 8.5, "field 'hidden_size' must be a positive integer"),
    ("num_attention_heads", 0, "field 'num_attention_heads' must be a positive integer, got 0"),
    ("num_attention_heads", 16, "hidden_size 8 is smaller than num_attention_heads 16"),
    ("num_key_value_heads", 3, "num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
    ("intermediate_size", True, "field 'intermediate_size' must be a positive integer, got True"),
    ("rms_norm_eps", "x", "field 'rms_norm_eps' must be a positive number, got 'x'"),
    ("rope_theta", "abc", "field 'rope_theta' must be a positive number"),
    ("max_position_embeddings", "x", "field 'max_position_embeddings' must be a positive integer"),
    ("rope_scaling", "linear", "field 'rope_scaling' must be an object, got 'linear'"),
    ("rope_scaling", [1], "field 'rope_scaling' must be an object"),
    ("rope_scaling", {"rope_type": "linear"}, "field 'rope_scaling.factor' must be a positive number, got None"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": "4"},
     "field 'rope_scaling.high_freq_factor'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "field 'rope_scaling.original_max_position_embeddings' must be a positive integer, got None"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16.5},
     "field 'rope_scaling.original_max_position_embeddings' must be a positive integer, got 16.5"),
    ("rope_theta", float("inf"), "field 'rope_theta' must be a positive number, got inf"),
    ("num_hidden_layers", True, "field 'num_hidden_layers' must be a positive integer, got True"),
])
def test_hand_edited_config_fields_are_named(field, value, match):
    # a config.json edited by hand: a one-line error naming the field, not a ValueError deep inside
    from r3.errors import R3Error

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(R3Error, match=re.escape("config.json: " + match)):
        ModelConfig.from_hf({**base, field: value})


def test_hand_edited_window_fields_are_named():
    from r3.errors import R3Error

    base = dict(model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(R3Error, match="field 'sliding_window' must be a positive integer, got 'x'"):
        ModelConfig.from_hf({**base, "sliding_window": "x"})
    with pytest.raises(R3Error, match="field 'max_window_layers' must be an integer >= 0"):
        ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
                             "max_window_layers": "1"})
    assert ModelConfig.from_hf({**base, "sliding_window": 4.0}).layer_windows == [4]


def test_transformer_from_config_runs_without_checkpoint():
    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 32)


def test_cache_writes_into_contiguous_and_strided_caches_alike(tiny_dirs):
    """A contiguous cache takes each layer's keys/values through one flat index_copy_; any other
    (here: views of the first slots of a longer cache) through indexing. Same logits, same slots."""
    from r3.model import KVCache

    path, hf = tiny_dirs["qwen2"]
    model, _ = load(path, tokenizer=False)
    rows = _tokens(hf.config.vocab_size, 3, 9)
    flat = model.new_cache(3, 16)
    big = model.new_cache(3, 24)
    strided = KVCache([t[:, :, :16] for t in big.k], [t[:, :, :16] for t in big.v])
    assert all(t.is_contiguous() for t in flat.k) and not any(t.is_contiguous() for t in strided.k)
    n_kv = model.config.num_key_value_heads  # (where layers of that many kv heads write)
    assert model._cache_writes(flat, torch.zeros(3, 1, dtype=torch.long))[n_kv][0] is None
    assert model._cache_writes(strided, torch.zeros(3, 1, dtype=torch.long))[n_kv][0] is not None
    out = []
    with torch.no_grad():
        for cache in (flat, strided):
            pos = torch.tensor([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
            first = model(rows[:, :6], positions=pos, cache=cache)
            step = model(rows[:, 6:7], positions=pos[:, -1:] + 1, cache=cache)
            out.append(torch.cat([first, step], dim=1))
    assert torch.equal(out[0], out[1])
    for a, b in zip(flat.k + flat.v, strided.k + strided.v):
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_kv_heads_are_repeated_where_cuda_would_fall_back_to_the_math_kernel():
    """On CUDA only flash attention takes grouped kv heads (bf16/fp16, no mask, square causal,
    head dim <= 256); elsewhere ``sdpa`` repeats them so the memory-efficient kernel applies.
    CPU kernels take grouped heads as they are. (Meta tensors stand in for a GPU's.)"""
    from r3.model import expands_kv_heads

    def qk(dtype=torch.bfloat16, T=16, S=16, heads=8, kv=2, D=64, device="meta"):
        return (torch.empty(2, heads, T, D, dtype=dtype, device=device),
                torch.empty(2, kv, S, D, dtype=dtype, device=device))

    mask = torch.empty(2, 1, 16, 16, dtype=torch.bool, device="meta")
    assert not expands_kv_heads(*qk(), None, causal=True)  # flash: the update's per-row forward
    assert not expands_kv_heads(*qk(T=1, S=40), None, causal=False)
    assert expands_kv_heads(*qk(), mask, causal=False)  # shared-prefix segments, ragged prefill
    assert expands_kv_heads(*qk(T=16, S=64), None, causal=True)  # a prefill into a longer cache
    assert expands_kv_heads(*qk(dtype=torch.float32), None, causal=True)  # flash has no fp32
    assert expands_kv_heads(*qk(D=512), None, causal=True)
    assert not expands_kv_heads(*qk(D=256), None, causal=True)  # flash's largest head dim
    assert not expands_kv_heads(*qk(kv=8), mask, causal=False)  # one kv head per query head
    assert not expands_kv_heads(*qk(device="cpu"), torch.zeros(2, 1, 16, 16, dtype=torch.bool), causal=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_kv_heads_give_the_grouped_attention(tiny_dirs, monkeypatch, dtype):
    """The repeated-heads path (what CUDA runs with a mask) equals the grouped one: a causal
    forward, a masked shared-prefix forward with gradients, and a prefill into a longer cache."""
    import r3.model as M
    from r3 import batch as B

    model, _ = load(tiny_dirs["qwen2"][0], dtype=dtype, tokenizer=False)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    vocab = model.config.vocab_size
    prefix = _tokens(vocab, 1, 12)[0].tolist()
    seqs = [prefix + _tokens(vocab, 1, 6, seed=s)[0].tolist() for s in (1, 2, 3)]
    mb = B.make_micro_batches(seqs, [(12, 18)] * 3, [1.0, -1.0, 0.5], 3, 0, "cpu", shared_prefix=True)[0]
    rows = torch.tensor(seqs)
    pos = torch.arange(18).expand(3, 18)

    def run():
        model.zero_grad(set_to_none=True)
        logp = B.token_logprobs(model, mb, 1.0)[0]
        logp.sum().backward()
        grads = [p.grad.float().clone() for p in model.parameters()]
        with torch.no_grad():
            causal = model(rows).float()
            cached = model(rows, positions=pos, cache=model.new_cache(3, 64)).float()
        return [logp.detach().float(), causal, cached], grads

    calls = []
    real = M.expands_kv_heads
    grouped, g_grouped = run()
    monkeypatch.setattr(M, "expands_kv_heads", lambda q, k, mask, causal: calls.append(mask is not None) or
                        q.shape[1] != k.shape[1])
    repeated, g_repeated = run()
    assert True in calls and False in calls and real is not M.expands_kv_heads
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(grouped + g_grouped, repeated + g_repeated):
        assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())


def _tiny_llama(seed=0, **kw):
    """A tiny random Llama built from a config (no checkpoint): two layers, grouped kv heads."""
    cfg = ModelConfig(**{**dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                rms_norm_eps=1e-5), **kw})
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_three_query_heads_per_kv_head(monkeypatch):
    """6 query heads over 2 kv heads (a group of 3, unlike the tiny checkpoints' 4 over 2, where
    group and kv head counts coincide): a ragged decode (one masked token per step, the grouped
    decode path) and the repeated-heads path (CUDA's) give the full forward's logits."""
    import r3.model as M

    model = _tiny_llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    rows = _tokens(64, 2, 10, seed=9)
    with torch.no_grad():
        full = model(rows)
        cache = model.new_cache(2, 16)
        got = [model(rows[:, :4], positions=torch.arange(4).expand(2, 4), cache=cache)]
        for t in range(4, 10):
            got.append(model(rows[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache, kv_len=t + 1))
        assert (torch.cat(got, dim=1) - full).abs().max().item() <= 1e-4
        monkeypatch.setattr(M, "expands_kv_heads", lambda q, k, mask, causal: q.shape[1] != k.shape[1])
        repeated = model(rows)
    assert (repeated - full).abs().max().item() <= 1e-5


def test_cached_forward_mistakes_are_clear_errors():
    """A cached forward without positions, past the cache's slots, or with segments: a clear
    ValueError (a write past the cache would land in another row's slots)."""
    model = _tiny_llama()
    cache = model.new_cache(2, 8)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="positions are required with a KV cache"):
        model(tokens, cache=cache)
    with pytest.raises(ValueError, match="positions up to 9 exceed the cache's 8 slots"):
        model(tokens, positions=torch.tensor([[0, 1, 2], [6, 7, 8]]), cache=cache)
    with pytest.raises(ValueError, match="positions up to 10 exceed the cache's 8 slots"):
        model(tokens[:, :1], positions=torch.tensor([[0], [1]]), cache=cache, kv_len=10)
    with pytest.raises(ValueError, match="segments are for a forward without a KV cache"):
        model(tokens, positions=torch.arange(3).expand(2, 3), cache=cache, segments=torch.zeros(2, 3, dtype=torch.long))


def test_cached_forward_without_kv_len_reads_the_slot_it_writes_at_a_bucket_edge():
    """kv_len defaults to the largest position + 1: a token at position 64 (the first slot of the
    second KV bucket) attends to itself, as in the full forward."""
    model = _tiny_llama()
    row = _tokens(64, 1, 66, seed=3)
    with torch.no_grad():
        full = model(row)[0]
        cache = model.new_cache(1, 80)
        model(row[:, :64], positions=torch.arange(64)[None], cache=cache)
        step = model(row[:, 64:65], positions=torch.tensor([[64]]), cache=cache)[0, 0]
        two = model(row[:, 65:66], positions=torch.tensor([[65]]), cache=cache)[0, 0]
    assert (step - full[64]).abs().max().item() <= 1e-4
    assert (two - full[65]).abs().max().item() <= 1e-4


def test_rope_tables_are_computed_in_fp32_for_any_dtype():
    """cos/sin are computed in fp32 and only then cast (as transformers does): positions past 256
    are not exact in bf16, and tables made from rounded positions rotate by the wrong angle."""
    from r3.model import rope_cos_sin

    inv = rope_inv_freq(ModelConfig(model_type="llama", vocab_size=8, hidden_size=32, intermediate_size=8,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16))
    pos = torch.arange(0, 2000, 7)[None]
    cos32, sin32 = rope_cos_sin(inv, pos, torch.float32)
    cos16, sin16 = rope_cos_sin(inv, pos, torch.bfloat16)
    assert cos16.dtype == sin16.dtype == torch.bfloat16 and cos16.shape == (1, pos.shape[1], 1, 16)
    assert torch.equal(cos16, cos32.to(torch.bfloat16)) and torch.equal(sin16, sin32.to(torch.bfloat16))


def test_linear_rope_scaling_divides_every_frequency():
    """head_dim 4, theta 1e4: inverse frequencies theta^(-0/4), theta^(-2/4) = 1, 0.01; a linear
    factor of 4 divides both (the tiny checkpoints use llama3 and LongRoPE scaling, not linear)."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2, rope_theta=10000.0)
    torch.testing.assert_close(rope_inv_freq(ModelConfig.from_hf(base)), torch.tensor([1.0, 0.01]))
    linear = ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    torch.testing.assert_close(rope_inv_freq(linear), torch.tensor([0.25, 0.0025]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_transformers_bit_for_bit(dtype):
    """RMSNorm normalises in fp32 with the config's eps and scales in the input dtype, as
    transformers' LlamaRMSNorm: bit for bit in bf16 too (rounding once after the scale would
    differ), and a large eps is really used."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from r3.model import RMSNorm

    g = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(4, 7, 64, generator=g)).to(dtype)
    for eps in (1e-5, 0.5):
        ours, ref = RMSNorm(64, eps).to(dtype), LlamaRMSNorm(64, eps=eps).to(dtype)
        with torch.no_grad():
            w = (1 + 0.3 * torch.randn(64, generator=g)).to(dtype)
            ours.weight.copy_(w)
            ref.weight.copy_(w)
            a, b = ours(x), ref(x)
        assert a.dtype == dtype and torch.equal(a, b), eps


def test_logits_at_positions_stay_in_the_compute_dtype():
    """forward(at=(rows, cols)): only those positions' logits, [N, V] in the model's dtype (no
    fp32 copy of them: the loss kernel upcasts per block); the full forward's are fp32."""
    model = _tiny_llama().to(torch.bfloat16)
    tokens = _tokens(64, 2, 6)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([5, 0, 3])
    with torch.no_grad():
        some = model(tokens, at=(rows, cols))
        full = model(tokens)
    assert some.dtype == torch.bfloat16 and some.shape == (3, 64) and full.dtype == torch.float32
    assert torch.equal(some.float(), full[rows, cols])


def test_config_edge_cases_follow_transformers():
    """Fields read as transformers reads them: the defaults (eps 1e-6, one kv head per query
    head), rope_parameters' own theta and rope_type over a top-level rope_theta and an old
    ``type``, Phi-3's older names for LongRoPE and its original context (the top-level field,
    else Phi3Config's 4096, not the rope dict's), mlp_bias only for Llama; a partial rotary
    factor and a layer_types list of the wrong length refused."""
    from r3.errors import R3Error

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2)
    assert ModelConfig.from_hf(base).rms_norm_eps == 1e-6
    assert ModelConfig.from_hf(base).num_key_value_heads == 2
    assert ModelConfig.from_hf({**base, "rope_theta": 1e4, "rope_parameters": {"rope_type": "default",
                                                                              "rope_theta": 5e5}}).rope_theta == 5e5
    linear = ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "type": "llama3", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ModelConfig(**{k: v for k, v in ModelConfig.from_hf(base).__dict__.items() if k != "rms_norm_eps"}
                       ).rms_norm_eps == 1e-6
    factors = {"short_factor": [1.0, 2.0], "long_factor": [3.0, 4.0]}
    phi3 = {**base, "model_type": "phi3", "max_position_embeddings": 16384}
    for name in ("su", "yarn", "longrope"):
        s = ModelConfig.from_hf({**phi3, "rope_scaling": {"type": name, **factors,
                                                          "original_max_position_embeddings": 2048}}).rope_scaling
        assert s["rope_type"] == "longrope" and s["original_max_position_embeddings"] == 4096, name
    s = ModelConfig.from_hf({**phi3, "original_max_position_embeddings": 1024,
                             "rope_scaling": {"type": "longrope", **factors}}).rope_scaling
    assert s["original_max_position_embeddings"] == 1024
    assert ModelConfig.from_hf({**base, "mlp_bias": True}).mlp_bias
    for kind in ("qwen2", "mistral", "phi3", "qwen3"):
        assert not ModelConfig.from_hf({**base, "model_type": kind, "mlp_bias": True}).mlp_bias, kind
    with pytest.raises(R3Error, match="unsupported partial_rotary_factor"):
        ModelConfig.from_hf({**base, "partial_rotary_factor": 0.5,
                             "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(R3Error, match="layer_types has 1 entries, expected 2"):
        ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
                             "layer_types": ["sliding_attention"]})
    qwen = ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
                                "layer_types": ["full_attention", "sliding_attention"]})
    assert qwen.layer_windows == [None, 4]


@pytest.mark.parametrize("factor,longrope", [(0.5, False), (0.75, True)], ids=["default", "longrope"])
def test_phi3_partial_rotary_matches_transformers(tmp_path, factor, longrope):
    """A Phi-3 config with ``partial_rotary_factor`` (Phi-4-mini: 0.75 with LongRoPE) turns only the
    first int(head_dim * factor) dims of each head, as transformers does: the same logits in a
    full forward and through the KV cache, and an export that transformers reads back the same."""
    from transformers import AutoModelForCausalLM, Phi3Config

    from r3.checkpoint import save_hf

    head_dim = 24
    rotary = int(head_dim * factor)
    g = torch.Generator().manual_seed(3)
    # (under "type", as Phi-3.5 and Phi-4-mini ship it: transformers 4.x's Phi3Config refuses "rope_type")
    scaling = {"type": "longrope", "short_factor": (1 + 2 * torch.rand(rotary // 2, generator=g)).tolist(),
               "long_factor": (4 + 20 * torch.rand(rotary // 2, generator=g)).tolist()} if longrope else None
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=128, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     original_max_position_embeddings=64, partial_rotary_factor=factor, rope_scaling=scaling,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    model, _ = load(tmp_path / "hf", tokenizer=False)
    assert model.config.partial_rotary_factor == factor and rope_inv_freq(model.config).shape == (rotary // 2,)
    tokens = _tokens(128, 2, 40)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        ours = model(tokens)
        assert (ours - ref).abs().max().item() <= 1e-4
        whole = Transformer(ModelConfig(**{**model.config.__dict__, "partial_rotary_factor": 1.0,
                                           "rope_scaling": None}))
        whole.load_state_dict(model.state_dict())
        assert (whole(tokens) - ref).abs().max().item() > 1e-3  # (the factor matters here)
        cached = _prefill_then_decode(model, tokens.tolist(), [30, 25])
        for b in range(2):
            assert (cached[b] - ours[b]).abs().max().item() <= 1e-4
    save_hf(model, None, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert (back(tokens).logits.float() - ref).abs().max().item() <= 1e-4
    assert load(tmp_path / "export", tokenizer=False)[0].config == model.config


@pytest.mark.parametrize("kind, scaling", [
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),  # as Qwen3's model card
    ("llama", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 8.0,
               "beta_slow": 2.0, "truncate": False}),
    ("qwen2", {"type": "yarn", "factor": 2.5, "mscale": 0.8, "mscale_all_dim": 0.5}),  # (old key, factor's mscale)
    ("mistral", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                 "attention_factor": 1.5}),
])
def test_yarn_matches_transformers(tmp_path, kind, scaling):
    """YaRN (Qwen2.5 and Qwen3 ship it for contexts past 32k): the same inverse frequencies and
    attention factor as transformers computes, the same logits over 200 positions in a full forward
    and through the KV cache, and an export transformers reads back the same. Without the scaling
    the logits move by more than 1e-3 (100 times the tolerance)."""
    from conftest import make_tiny_hf
    from transformers import AutoModelForCausalLM

    from r3.checkpoint import save_hf
    from r3.model import rope_scale

    rope = {k: v for k, v in scaling.items() if k != "type"}
    rope["rope_type"] = "yarn"
    hf = make_tiny_hf(tmp_path / "hf", kind, head_dim=32, rope_scaling=dict(scaling),
                      rope_parameters={**rope, "rope_theta": 10000.0}, tie_word_embeddings=False)
    model, _ = load(tmp_path / "hf", tokenizer=False)
    rotary = hf.model.rotary_emb
    assert model.config.rope_scaling["rope_type"] == "yarn"
    torch.testing.assert_close(rope_inv_freq(model.config), rotary.inv_freq, rtol=0, atol=0)
    assert rope_scale(model.config) == pytest.approx(rotary.attention_scaling, rel=1e-12)
    tokens = _tokens(hf.config.vocab_size, 2, 200)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        ours = model(tokens)
        assert (ours - ref).abs().max().item() <= 1e-5
        plain = Transformer(ModelConfig(**{**model.config.__dict__, "rope_scaling": None}))
        plain.load_state_dict(model.state_dict())
        assert (plain(tokens) - ref).abs().max().item() > 1e-3
        cached = _prefill_then_decode(model, tokens.tolist(), [150, 120])
        for b in range(2):
            assert (cached[b] - ours[b]).abs().max().item() <= 1e-4
    save_hf(model, None, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert (back(tokens).logits.float() - ref).abs().max().item() <= 1e-5
    assert load(tmp_path / "export", tokenizer=False)[0].config == model.config


def test_yarn_fields_resolve_as_in_transformers():
    """The original context: a top-level field, else the rope dict's, else max_position_embeddings;
    the factor: given, else their ratio; the attention factor: given, else 0.1 ln(factor) + 1 (1 for
    a factor of 1), or from mscale / mscale_all_dim when both are set; beta_fast and beta_slow: 32 and
    1 when left out or 0. A bad field is one line naming it."""
    from r3.errors import R3Error

    base = dict(model_type="qwen3", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=4096)
    yarn = {"rope_type": "yarn", "factor": 4.0}
    s = ModelConfig.from_hf({**base, "rope_scaling": yarn}).rope_scaling
    assert s == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                 "attention_factor": pytest.approx(0.1 * math.log(4) + 1), "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": True}
    s = ModelConfig.from_hf({**base, "original_max_position_embeddings": 512,
                             "rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024,
                                              "beta_fast": 0, "beta_slow": None}}).rope_scaling
    assert (s["original_max_position_embeddings"], s["factor"], s["beta_fast"], s["beta_slow"]) == (512, 8.0, 32.0, 1.0)
    s = ModelConfig.from_hf({**base, "rope_scaling": {**yarn, "mscale": 2.0, "mscale_all_dim": 1.0}}).rope_scaling
    assert s["attention_factor"] == pytest.approx((0.2 * math.log(4) + 1) / (0.1 * math.log(4) + 1))
    assert ModelConfig.from_hf({**base, "rope_scaling": {**yarn, "factor": 1.0}}).rope_scaling["attention_factor"] == 1.0
    assert ModelConfig.from_hf({**base, "rope_parameters": {**yarn, "attention_factor": 1.25, "rope_theta": 1e6}}
                               ).rope_scaling["attention_factor"] == 1.25
    with pytest.raises(R3Error, match="rope scaling 'yarn' without a 'factor'"):  # (transformers: a KeyError)
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 1024}})
    for bad, message in (({"factor": "4"}, "field 'rope_scaling.factor' must be a positive number, got '4'"),
                         ({"original_max_position_embeddings": 10.5},
                          "field 'rope_scaling.original_max_position_embeddings' must be a positive integer"),
                         ({"attention_factor": -1.0}, "field 'rope_scaling.attention_factor' must be a positive number"),
                         ({"beta_fast": "x"}, "field 'rope_scaling.beta_fast' must be a positive number"),
                         ({"truncate": "yes"}, "field 'rope_scaling.truncate' must be true or false, got 'yes'")):
        with pytest.raises(R3Error) as e:
            ModelConfig.from_hf({**base, "rope_scaling": {**yarn, **bad}})
        assert message in str(e.value)


@pytest.mark.parametrize("model_type", ["olmo3", "gemma3_text"])
def test_yarn_of_the_full_layers_resolves_as_in_transformers(model_type):
    """Gemma 3's and OLMo 3's full layers keep their YaRN per layer type, where transformers 5 reads
    no top-level original_max_position_embeddings (the rope dict's, else max_position_embeddings)
    and ignores the rope dict's truncate (it reads it from the outer dict: always true): r3 gives
    the same inverse frequencies and attention factor, and refuses a truncate false, which 4.x
    would apply."""
    import importlib

    from transformers import CONFIG_MAPPING

    from r3.errors import R3Error
    from r3.model import rope_scale

    module = importlib.import_module(f"transformers.models.{model_type.removesuffix('_text')}.modeling_"
                                     f"{model_type.removesuffix('_text')}")
    rotary = getattr(module, f"{'Olmo3' if model_type == 'olmo3' else 'Gemma3'}RotaryEmbedding")
    base = dict(model_type=model_type, vocab_size=10, hidden_size=64, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    sliding = {"rope_type": "default", "rope_theta": 10000.0}
    for change in ({"original_max_position_embeddings": 64,
                    "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6},
                                        "sliding_attention": sliding}},
                   {"original_max_position_embeddings": 64, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}):
        config = {**base, **change}
        hf = rotary(CONFIG_MAPPING[model_type].from_dict(json.loads(json.dumps(config))))
        cfg = ModelConfig.from_hf(json.loads(json.dumps(config)))
        torch.testing.assert_close(rope_inv_freq(cfg), hf.full_attention_inv_freq, rtol=0, atol=0)
        assert rope_scale(cfg) == pytest.approx(hf.full_attention_attention_scaling, rel=1e-12)
    full = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "truncate": False}
    for change in ({"rope_parameters": {"full_attention": {**full, "rope_theta": 1e6}, "sliding_attention": sliding}},
                   {"rope_theta": 500000.0, "rope_scaling": full}):
        with pytest.raises(R3Error, match="field 'truncate' false in the full-attention layers' YaRN"):
            ModelConfig.from_hf({**base, **change})


@pytest.mark.parametrize("model_type", ["llama", "smollm3", "granite", "qwen2", "qwen3", "mistral", "phi3", "olmo2",
                                        "olmo3", "gemma3_text"])
def test_a_config_json_that_leaves_fields_out_reads_as_transformers_defaults_them(model_type):
    """A config.json with only the sizes: r3 fills in what transformers' config class does (head
    width, norm epsilon, RoPE base and scaling, context length, windows, biases, tying, the Granite
    and Gemma scalars), so the architecture equals the one read from the config transformers writes
    out in full. (Qwen3's heads are 128 wide and Mistral's window 4096 unless given.)"""
    from transformers import CONFIG_MAPPING

    from r3.model import SUPPORTED_MODEL_TYPES

    assert model_type in SUPPORTED_MODEL_TYPES
    sizes = dict(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)
    full = json.loads(json.dumps(CONFIG_MAPPING[model_type](**sizes).to_dict()))
    ours, theirs = ModelConfig.from_hf({"model_type": model_type, **sizes}), ModelConfig.from_hf(full)
    skip = ("bos_token_id", "eos_token_id", "pad_token_id")  # (r3 takes these from the tokenizer's files)
    assert {k: v for k, v in ours.__dict__.items() if k not in skip} == {
        k: v for k, v in theirs.__dict__.items() if k not in skip}


_NULLABLE_FIELDS = ("head_dim", "sliding_window", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                    "max_position_embeddings", "num_key_value_heads", "rope_scaling", "rope_parameters",
                    "partial_rotary_factor", "use_sliding_window", "max_window_layers", "hidden_act", "attention_bias",
                    "mlp_bias", "query_pre_attn_scalar", "no_rope_layers", "no_rope_layer_interval",
                    "embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling",
                    "original_max_position_embeddings")


@pytest.mark.parametrize("model_type", ["llama", "smollm3", "granite", "qwen2", "qwen3", "mistral", "phi3", "olmo2",
                                        "olmo3", "gemma3_text"])
def test_a_config_json_field_written_as_null_reads_as_transformers_or_is_refused(model_type):
    """A field present but null ("head_dim": null, "rms_norm_eps": null, ...): where transformers
    builds and runs the model from such a config, r3 reads the architecture it builds (the one of
    the config it writes out in full); where transformers cannot (its config class rejects the null,
    or the model fails on it), r3 refuses it in one line naming the field, where it used to put in
    its own default (a null tie_word_embeddings, say, is untied in transformers 4.x)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from r3.errors import R3Error

    sizes = dict(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0)
    skip = ("bos_token_id", "eos_token_id", "pad_token_id")
    for key in _NULLABLE_FIELDS:
        raw = {"model_type": model_type, **sizes, key: None}
        try:
            hf_cfg = CONFIG_MAPPING[model_type](**{k: v for k, v in raw.items() if k != "model_type"})
            torch.manual_seed(0)
            with torch.no_grad():
                AutoModelForCausalLM.from_config(hf_cfg)(torch.tensor([[1, 2, 3]]))
        except Exception:
            with pytest.raises(R3Error) as e:
                ModelConfig.from_hf(raw)
            assert str(e.value).startswith(f"config.json: field '{key}' is null") or key in str(e.value), key
            continue
        ours = ModelConfig.from_hf(raw)
        theirs = ModelConfig.from_hf(json.loads(json.dumps(hf_cfg.to_dict())))
        assert {k: v for k, v in ours.__dict__.items() if k not in skip} == {
            k: v for k, v in theirs.__dict__.items() if k not in skip}, key


def test_a_qwen3_config_without_head_dim_takes_transformers_default():
    """Qwen3Config's head_dim is 128 unless given (not hidden / heads, as for the other families):
    a config.json without it builds the model transformers builds."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    raw = dict(model_type="qwen3", vocab_size=32, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    cfg = ModelConfig.from_hf(raw)
    assert cfg.head_dim == 128 and ModelConfig.from_hf({**raw, "model_type": "llama"}).head_dim == 32
    from r3.model import param_names_hf

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(Qwen3Config(**{k: v for k, v in raw.items() if k != "model_type"}))
    theirs = {k.removeprefix("model."): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert param_names_hf(cfg) == theirs


def test_partial_rotary_factor_is_read_where_transformers_puts_it():
    """The factor is read at the top level, in rope_parameters (transformers 5) or in rope_scaling;
    outside Phi-3, or where it turns no even number of dims, it is a one-line error."""
    from r3.errors import R3Error

    base = dict(model_type="phi3", vocab_size=10, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    assert ModelConfig.from_hf(base).partial_rotary_factor == 1.0
    for cfg in ({**base, "partial_rotary_factor": 0.5},
                {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
                {**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}}):
        c = ModelConfig.from_hf(cfg)
        assert c.partial_rotary_factor == 0.5 and rope_inv_freq(c).shape == (2,), cfg
    for kind in ("llama", "qwen2", "qwen3", "mistral"):
        with pytest.raises(R3Error, match=f"unsupported partial_rotary_factor for model_type '{kind}'"):
            ModelConfig.from_hf({**base, "model_type": kind, "partial_rotary_factor": 0.5})
    assert rope_inv_freq(ModelConfig.from_hf({**base, "partial_rotary_factor": 0.3})).shape == (1,)  # int(2.4)
    for bad in (0.1, 0.375, 1.5, 0, "half"):  # 0 dims, 3 dims, more than the head, not a number
        with pytest.raises(R3Error, match="partial_rotary_factor"):
            ModelConfig.from_hf({**base, "partial_rotary_factor": bad})


def test_longrope_fields_outside_phi3_follow_transformers():
    """LongRoPE outside Phi-3: the original context is the rope dict's own field; the factor is
    max_position_embeddings / original unless given, and the attention factor
    sqrt(1 + ln(factor) / ln(original)) unless given (1 for a factor of 1)."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=4096)
    lr = {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [3.0, 4.0],
          "original_max_position_embeddings": 1024}
    s = ModelConfig.from_hf({**base, "rope_scaling": lr}).rope_scaling
    assert s["original_max_position_embeddings"] == 1024
    assert s["attention_factor"] == pytest.approx(math.sqrt(1.2))  # factor 4: 1 + ln 4 / ln 1024
    s = ModelConfig.from_hf({**base, "rope_scaling": {**lr, "factor": 16.0}}).rope_scaling
    assert s["attention_factor"] == pytest.approx(math.sqrt(1.4))
    assert ModelConfig.from_hf({**base, "rope_scaling": {**lr, "attention_factor": 1.5}}).rope_scaling[
        "attention_factor"] == 1.5
    assert ModelConfig.from_hf({**base, "rope_scaling": {**lr, "factor": 1.0}}).rope_scaling["attention_factor"] == 1.0


def test_window_bias_and_activation_fields_per_family():
    """Qwen2's window only with use_sliding_window (and, without layer_types or max_window_layers,
    Qwen2Config's default of 28 full layers first), Phi-3's on every layer; attention_bias for
    Llama but never Phi-3; swish is silu."""
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    qwen = {**base, "model_type": "qwen2", "sliding_window": 4, "max_window_layers": 0}
    assert ModelConfig.from_hf(qwen).layer_windows == [None, None]
    assert ModelConfig.from_hf({**qwen, "use_sliding_window": True}).layer_windows == [4, 4]
    qwen.pop("max_window_layers")
    assert ModelConfig.from_hf({**qwen, "use_sliding_window": True}).layer_windows == [None, None]
    assert ModelConfig.from_hf({**base, "model_type": "phi3", "sliding_window": 5}).layer_windows == [5, 5]
    phi3 = ModelConfig.from_hf({**base, "model_type": "phi3", "attention_bias": True})
    assert not phi3.qkv_bias and not phi3.o_bias
    llama = ModelConfig.from_hf({**base, "model_type": "llama", "attention_bias": True})
    assert llama.qkv_bias and llama.o_bias
    ModelConfig.from_hf({**base, "model_type": "llama", "hidden_act": "swish"})


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    """Both fields, disagreeing (a hand-edited transformers-4 config): transformers' config takes
    ``rope_scaling`` (``rope_parameters = rope_scaling or rope_parameters``), and so does r3."""
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, rope_theta=10000.0)
    cfg = ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("kw", [
    dict(model_type="llama", qkv_bias=True, o_bias=True, mlp_bias=True),
    dict(model_type="qwen3", qkv_bias=True, qk_norm=True, tie_word_embeddings=True),
])
def test_param_shapes_are_the_models_own(kw):
    """param_shapes (what a checkpoint is checked against) lists exactly the model's parameters and
    shapes, with heads * head_dim (24) != hidden_size (16) so q/o shapes cannot be confused; the
    checkpoint names split q/k/v and gate/up by rows."""
    from r3.model import param_names_hf, param_shapes

    cfg = ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=12, **kw)
    got = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        assert got.pop("lm_head.weight") == (16, 16)
    assert got == param_shapes(cfg)
    hf = param_names_hf(cfg)
    assert hf["layers.1.self_attn.q_proj.weight"] == (24, 16) and hf["layers.1.self_attn.k_proj.weight"] == (12, 16)
    assert hf["layers.1.self_attn.v_proj.bias"] == (12,) and hf["layers.1.mlp.up_proj.weight"] == (20, 16)
    assert "layers.1.self_attn.qkv_proj.weight" not in hf and ("lm_head.weight" in hf) != cfg.tie_word_embeddings


@pytest.mark.parametrize("kind", ["llama", "mistral", "phi3", "qwen2", "qwen3"])
def test_exported_config_reads_back_as_the_same_architecture(kind):
    """to_hf writes what from_hf reads back unchanged, whether a reader takes both spellings, only
    transformers 5's (rope_parameters and layer_types) or only 4.x's (rope_scaling and
    max_window_layers): biases, windows, rope scaling, LongRoPE's original context."""
    base = dict(model_type=kind, vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=256, rope_theta=5e5)
    extra = {"llama": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True,
                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
             "mistral": {"sliding_window": 8, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
             "phi3": {"sliding_window": 32, "original_max_position_embeddings": 64,
                      "rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [3.0, 4.0]}},
             "qwen2": {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention",
                                                                                     "sliding_attention"]},
             "qwen3": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "beta_fast": 16}}}[kind]
    cfg = ModelConfig.from_hf({**base, **extra})
    assert cfg.layer_windows != [None, None] or kind in ("llama", "qwen3")
    hf = cfg.to_hf()
    v5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "max_window_layers")}
    v4 = {k: v for k, v in hf.items() if k not in ("rope_parameters", "layer_types")}
    for d in (hf, v5, v4):
        assert ModelConfig.from_hf(d) == cfg


def test_incomplete_fused_projection_is_an_error():
    """A checkpoint with q/k but no v (a missing shard): an error naming the fused parameter."""
    from r3.errors import R3Error
    from r3.model import fuse_checkpoint_tensors, split_for_checkpoint

    cfg = _tiny_llama().config
    state = split_for_checkpoint(cfg, {k: v for k, v in _tiny_llama().state_dict().items() if "layers.0." in k})
    assert "layers.0.self_attn.v_proj.weight" in state and "layers.0.mlp.up_proj.weight" in state
    fused = fuse_checkpoint_tensors(cfg, state)
    assert fused["layers.0.self_attn.qkv_proj.weight"].shape == (64, 32)
    state.pop("layers.0.self_attn.v_proj.weight")
    with pytest.raises(R3Error, match=r"incomplete fused projection 'layers\.0\.self_attn\.qkv_proj\.weight'"):
        fuse_checkpoint_tensors(cfg, state)


def test_activation_checkpointing_leaves_cached_forwards_alone():
    """Activation checkpointing recomputes blocks only in a forward without a KV cache: a cached
    forward with gradients on (a policy sampled outside no_grad) still writes and reads the cache."""
    model = _tiny_llama()
    row = _tokens(64, 1, 12, seed=4)
    with torch.no_grad():
        ref = model(row)[0, 8:]
    model.activation_checkpointing = True
    cache = model.new_cache(1, 16)
    model(row[:, :8], positions=torch.arange(8)[None], cache=cache)
    got = model(row[:, 8:], positions=torch.arange(8, 12)[None], cache=cache)[0]
    assert cache.k[1][0, :, :12].abs().sum(-1).gt(0).all()
    assert (got.detach() - ref).abs().max().item() <= 1e-4


def test_cached_forward_with_one_row_from_the_start_and_one_continuing():
    """Only a forward whose every row starts at position 0 is plain causal: with one row from the
    start and another continuing its own cache, each row gets its full forward's logits."""
    model = _tiny_llama()
    a, b = _tokens(64, 1, 6, seed=6)[0], _tokens(64, 1, 9, seed=7)[0]
    with torch.no_grad():
        ref_a, ref_b = model(a[None])[0], model(b[None])[0]
        cache = model.new_cache(2, 12)
        model(b[None, :3].expand(2, 3), positions=torch.arange(3).expand(2, 3), cache=cache)  # (row 1's start)
        got = model(torch.stack([a, b[3:]]), positions=torch.stack([torch.arange(6), torch.arange(3, 9)]), cache=cache)
    assert (got[0] - ref_a).abs().max().item() <= 1e-4
    assert (got[1] - ref_b[3:]).abs().max().item() <= 1e-4


GEMMA3 = dict(model_type="gemma3_text", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=12,
              hidden_activation="gelu_pytorch_tanh", sliding_window=4)


def test_gemma3_configs_of_each_layout_read_as_transformers_reads_them():
    """A hub config.json of Gemma 3 (rope_theta, rope_local_base_freq, rope_scaling, a
    sliding_window_pattern and no layer_types) and transformers 5's own layout (rope_parameters
    per layer type, layer_types) give the layers, windows and RoPE transformers computes: full
    layers every pattern-th, the scaling on the full layers only, each kind its own base."""
    from transformers import Gemma3TextConfig

    hub = {**GEMMA3, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 3,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    theirs = Gemma3TextConfig(**hub)
    for cfg in (hub, theirs.to_dict()):
        c = ModelConfig.from_hf(cfg)
        assert c.layer_windows == [4 if t == "sliding_attention" else None for t in theirs.layer_types]
        assert c.layer_windows == [4, 4, None, 4, 4, None]
        assert (c.rope_theta, c.local_rope_theta, c.rope_scaling) == (1e6, 1e4, {"rope_type": "linear", "factor": 8.0})
        assert (c.query_pre_attn_scalar, c.hidden_act, c.tie_word_embeddings, c.qk_norm) == (
            12.0, "gelu_pytorch_tanh", True, True)
    assert hf_rope(theirs)["full_attention"]["rope_theta"] == 1e6
    assert hf_rope(theirs)["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    # What transformers fills in when a field is left out: every 6th layer full, the 4096 window,
    # the bases 1e6 / 1e4, a query scale of 256, tied embeddings
    bare = {k: v for k, v in GEMMA3.items() if k not in ("query_pre_attn_scalar", "sliding_window")}
    c, t = ModelConfig.from_hf(bare), Gemma3TextConfig(**bare)
    assert c.layer_windows == [t.sliding_window if k == "sliding_attention" else None for k in t.layer_types]
    assert (c.rope_theta, c.local_rope_theta, c.query_pre_attn_scalar) == (
        hf_rope(t)["full_attention"]["rope_theta"], hf_rope(t)["sliding_attention"]["rope_theta"],
        t.query_pre_attn_scalar)
    # (r3's export writes both layouts; transformers reads it back the same)
    again = Gemma3TextConfig(**{k: v for k, v in c.to_hf().items() if k not in ("architectures",)})
    assert again.layer_types == t.layer_types and hf_rope(again) == hf_rope(t)
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_gemma3_local_and_global_rope_differ_by_layer():
    """Sliding-window layers turn by rope_local_base_freq, unscaled; full layers by rope_theta
    with the linear factor (one table for both would pass a test whose positions stay small)."""
    c = ModelConfig.from_hf({**GEMMA3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    dims = torch.arange(0, 8, 2).float() / 8
    assert torch.allclose(rope_inv_freq(c, local=True), 1.0 / (1e4 ** dims))
    assert torch.allclose(rope_inv_freq(c), 1.0 / (1e6 ** dims) / 8.0)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gemma3"}, "model_type 'gemma3' without a 'text_config' object"),
    ({"model_type": "gemma"}, "unsupported model_type 'gemma'"),
    ({"final_logit_softcapping": 0.0}, "field 'final_logit_softcapping' must be a positive number, got 0.0"),
    ({"attn_logit_softcapping": "50"}, "field 'attn_logit_softcapping' must be a positive number, got '50'"),
    ({"attn_logit_softcapping": 50.0}, "field 'attn_logit_softcapping' 50.0 of a Gemma 3 config: transformers 5's"),
    ({"use_bidirectional_attention": True}, "field 'use_bidirectional_attention' true is not supported"),
    ({"hidden_activation": "silu"}, "unsupported hidden_activation 'silu' for model_type 'gemma3_text'"),
    ({"layer_types": ["full_attention"] * 5}, "field 'layer_types' must list"),
    ({"layer_types": ["full_attention"] * 5 + ["chunked_attention"]}, "field 'layer_types' must list"),
    ({"sliding_window_pattern": 0}, "field 'sliding_window_pattern' must be a positive integer"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "unsupported rope scaling type 'linear' for the sliding-window layers"),
    ({"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0}}}, "unsupported rope scaling type 'dynamic'"),
    # (transformers reads an old "type" key too, and would scale the sliding layers; more layer
    # types than layers would build a layer too many)
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"type": "linear", "factor": 2.0}}},
     "unsupported rope scaling type 'linear' for the sliding-window layers"),
    ({"layer_types": ["sliding_attention"] * 5 + ["full_attention"] * 2}, "field 'layer_types' must list"),
    # (a flat dict transformers does not read for Gemma 3: its logits moved by 0.92 with r3 applying
    # it; a null window transformers cannot build a model with)
    ({"rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
     "field 'rope_parameters' of a Gemma 3 config is keyed by layer type"),
    ({"sliding_window": None}, "field 'sliding_window' is None, but layers use sliding_attention"),
    # (an old-style scaling type: transformers 5 merges it under "default" and scales nothing, 4.x scaled)
    ({"rope_scaling": {"type": "linear", "factor": 8.0}},
     "field 'rope_scaling' of a Gemma 3 config names its type as 'type' ('linear'), which transformers 5 ignores"),
])
def test_gemma3_configs_r3_cannot_follow_are_refused_by_name(change, match):
    from r3.errors import R3Error

    with pytest.raises(R3Error, match=re.escape(match)):
        ModelConfig.from_hf({**GEMMA3, **change})
    with pytest.raises(R3Error, match=re.escape("unsupported hidden_act 'gelu_pytorch_tanh' for model_type 'llama'")):
        ModelConfig.from_hf({**GEMMA3, "model_type": "llama", "hidden_act": "gelu_pytorch_tanh"})


def test_gemma3_bf16_logits_equal_transformers(tiny_dirs):
    """In bf16 the Gemma-specific rounding shows: its norms scale by (1 + w) in fp32 and round
    once, and the embeddings are multiplied by sqrt(hidden) rounded to bf16. Ours equal
    transformers' bit for bit, and differ from fp32."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_dirs["gemma3"]
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    ours, _ = load(path, dtype=torch.bfloat16, tokenizer=False)
    tokens = _tokens(256, 3, 40)
    with torch.no_grad():
        want = theirs(tokens).logits.float()
        assert torch.equal(ours(tokens), want)
        assert not torch.equal(load(path, tokenizer=False)[0](tokens), want)


def test_the_published_gemma3_1b_config_builds_the_same_model_as_transformers():
    """google/gemma-3-1b-it's config.json as published (transformers 4.52 wrote it): the same
    layers, windows (every sixth layer full), and parameters, 999,885,952 (embeddings tied), as
    transformers builds from it."""
    import math

    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from r3.model import param_shapes

    published = {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": True, "vocab_size": 262144}
    ours = ModelConfig.from_hf(published)
    theirs = Gemma3TextConfig(**{k: v for k, v in published.items() if k != "architectures"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(theirs)
    assert sum(math.prod(s) for s in param_shapes(ours).values()) == sum(p.numel() for p in hf.parameters()) == 999_885_952
    assert ours.layer_windows == [512 if t == "sliding_attention" else None for t in theirs.layer_types]
    assert sum(w is None for w in ours.layer_windows) == 4 and ours.tie_word_embeddings
    assert (ours.rope_theta, ours.local_rope_theta, ours.rope_scaling, ours.eos_token_id) == (1e6, 1e4, None, [1, 106])


@pytest.mark.parametrize("text_config", [
    # the text_config of google/gemma-3-{4b,12b,27b}-it's config.json as published (4.50.0.dev0
    # wrote it: only the fields that differ from Gemma3TextConfig's defaults)
    {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
     "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
    {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_attention_heads": 16,
     "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
     "sliding_window": 1024},
    {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
     "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
     "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
], ids=["4b", "12b", "27b"])
def test_the_published_gemma3_vision_configs_read_as_transformers_reads_them(text_config):
    """The vision checkpoints' text_config leaves out what equals Gemma3TextConfig's defaults
    (vocab_size, the head counts, head_dim): r3 reads the defaults transformers fills in, not
    'missing field' nor head_dim = hidden_size / heads (240 for the 12b, whose heads are 256)."""
    import copy
    import math

    from transformers import AutoModelForCausalLM, Gemma3Config

    from r3.model import param_shapes

    published = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
                 "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
                 "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
                 "text_config": text_config, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0"}
    ours = ModelConfig.from_hf(copy.deepcopy(published))
    theirs = Gemma3Config(**{k: v for k, v in copy.deepcopy(published).items()
                             if k not in ("architectures", "torch_dtype", "transformers_version")}).text_config
    assert (ours.vocab_size, ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim,
            ours.query_pre_attn_scalar) == (theirs.vocab_size, theirs.num_attention_heads,
                                            theirs.num_key_value_heads, theirs.head_dim, theirs.query_pre_attn_scalar)
    assert ours.layer_windows == [1024 if t == "sliding_attention" else None for t in theirs.layer_types]
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(theirs)
    assert sum(math.prod(s) for s in param_shapes(ours).values()) == sum(p.numel() for p in hf.parameters())


def test_gemma3_position_limit_and_the_older_layer_pattern_field():
    """Gemma 3's max_position_embeddings (131072) is already the scaled length: its linear RoPE
    factor does not multiply it (token limits up to 1M passed the check on the 4b). The export
    also writes sliding_window_pattern, which transformers 4.50 to 4.52 read instead of
    layer_types, where one k gives the layout."""
    from r3.model import position_limit

    c = ModelConfig.from_hf({**GEMMA3, "max_position_embeddings": 131072,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert position_limit(c) == (131072, "max_position_embeddings")
    llama = ModelConfig.from_hf({**GEMMA3, "model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 4096,
                                 "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert position_limit(llama)[0] == 8192  # (other families may keep the unscaled length there)
    assert ModelConfig.from_hf({**GEMMA3, "sliding_window_pattern": 3}).to_hf()["sliding_window_pattern"] == 3
    assert ModelConfig.from_hf(GEMMA3).to_hf()["sliding_window_pattern"] == 6
    odd = ModelConfig.from_hf({**GEMMA3, "layer_types": ["full_attention"] + ["sliding_attention"] * 5})
    assert "sliding_window_pattern" not in odd.to_hf()


def test_a_gemma3_config_of_defaults_only_builds_the_default_model_transformers_builds():
    """A gemma3_text config.json that leaves every field to Gemma3TextConfig's defaults (a vision
    checkpoint's text_config leaves out whatever equals them): r3 fills in what transformers fills
    in. A default off by one (a hidden or MLP size, a layer count, the 4096 window, the bases, the
    query scale, untied embeddings) builds another model, silently: nothing is missing."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from r3.model import param_names_hf

    ours, theirs = ModelConfig.from_hf({"model_type": "gemma3_text"}), Gemma3TextConfig()
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_hidden_layers,
            ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (
        theirs.vocab_size, theirs.hidden_size, theirs.intermediate_size, theirs.num_hidden_layers,
        theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim)
    assert (ours.max_position_embeddings, ours.rms_norm_eps, ours.query_pre_attn_scalar, ours.tie_word_embeddings,
            ours.hidden_act) == (theirs.max_position_embeddings, theirs.rms_norm_eps, theirs.query_pre_attn_scalar,
                                 theirs.tie_word_embeddings, theirs.hidden_activation)
    assert ours.layer_windows == [theirs.sliding_window if t == "sliding_attention" else None
                                  for t in theirs.layer_types]
    assert (ours.rope_theta, ours.local_rope_theta, ours.rope_scaling) == (
        hf_rope(theirs)["full_attention"]["rope_theta"],
        hf_rope(theirs)["sliding_attention"]["rope_theta"], None)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(theirs)
    assert {k: tuple(v.shape) for k, v in hf.model.state_dict().items() if "rotary" not in k and "embed_scale" not in k
            } == param_names_hf(ours)  # (tied: no lm_head in either)


@pytest.mark.parametrize("rope", [
    pytest.param("longrope", marks=pytest.mark.skipif(
        transformers_major() < 5, reason="transformers 4.x's LongRoPE outside Phi-3 ignores rope_scaling's "
        "original_max_position_embeddings (64) for max_position_embeddings (256): another attention factor")),
    "llama3"])
def test_gemma3_scaled_global_rope_leaves_the_local_layers_alone(tmp_path, rope):
    """Gemma 3 with LongRoPE or Llama-3 scaling on its full-attention layers (rope_parameters per
    layer type): transformers scales only the full layers' RoPE (LongRoPE's attention factor too);
    the sliding layers keep their own plain base. The same logits, full forward and cached."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    g = torch.Generator().manual_seed(5)
    full = {"longrope": {"rope_type": "longrope", "short_factor": (1 + 2 * torch.rand(12, generator=g)).tolist(),
                         "long_factor": (4 + 20 * torch.rand(12, generator=g)).tolist(),
                         "original_max_position_embeddings": 64, "factor": 16.0},
            "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}}[rope]
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                           query_pre_attn_scalar=20, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"] * 2,
                           **(dict(rope_parameters={"full_attention": {**full, "rope_theta": 1e6},
                                                    "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
                              if transformers_major() >= 5 else  # (4.x: the same RoPE in its own fields)
                              dict(rope_theta=1e6, rope_scaling=full, rope_local_base_freq=2e4)))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))
    hf.save_pretrained(str(tmp_path))
    model, _ = load(tmp_path, tokenizer=False)
    assert model.config.rope_scaling["rope_type"] == rope and model.config.local_rope_theta == 2e4
    tokens = _tokens(64, 2, 40)
    with torch.no_grad():
        ours, want = model(tokens), hf(tokens).logits.float()
        assert (ours - want).abs().max().item() <= 1e-4
        cached = _prefill_then_decode(model, tokens.tolist(), [30, 25])
        for b in range(2):
            assert (cached[b] - ours[b]).abs().max().item() <= 1e-4


def test_gemma3_export_config_reads_back_in_every_layout_transformers_has_read():
    """to_hf for Gemma 3 (the config of an export without the source's config.json) writes what
    each reader takes: transformers 5 (rope_parameters per layer type, layer_types), 4.53 to 4.57
    (rope_theta, rope_local_base_freq, rope_scaling, layer_types) and 4.50 to 4.52
    (sliding_window_pattern instead of layer_types). Each reads back the same layers, window,
    bases, scaling and q/k/v/o biases (left out, transformers builds a model without them); an
    all-sliding layout's pattern is one past the layers. transformers builds the same tensors."""
    import copy

    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from r3.model import param_names_hf

    for layout in ([4, 4, None, 4, 4, None], [None] * 6, [4] * 6, [4, None] * 3):
        c = ModelConfig.from_hf({**GEMMA3, "layer_types": ["full_attention" if w is None else "sliding_attention"
                                                            for w in layout],
                                 "rope_theta": 5e5, "rope_local_base_freq": 2e4, "attention_bias": True,
                                 "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
        assert c.layer_windows == layout and c.qkv_bias and c.o_bias
        hf = c.to_hf()
        v4 = {k: v for k, v in hf.items() if k not in ("rope_parameters",)}
        v450 = {k: v for k, v in v4.items() if k != "layer_types"}
        for d in (hf, {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta", "rope_local_base_freq",
                                                                 "sliding_window_pattern")}, v4, v450):
            assert ModelConfig.from_hf(d) == c, (layout, sorted(d))
        for d in (hf, v450):
            theirs = Gemma3TextConfig(**{k: v for k, v in copy.deepcopy(d).items() if k not in ("architectures",)})
            assert theirs.layer_types == ["full_attention" if w is None else "sliding_attention" for w in layout]
            assert (theirs.sliding_window, theirs.query_pre_attn_scalar, hf_rope(theirs)) == (
                4 if 4 in layout else None, 12,
                {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(theirs)
        assert {k.removeprefix("model."): tuple(v.shape) for k, v in model.state_dict().items()
                if "rotary" not in k and "embed_scale" not in k and k != "lm_head.weight"} == param_names_hf(c)


def test_phi3_fields_left_out_take_phi3configs_defaults(tiny_dirs, tmp_path):
    """A Phi-3 config.json without rms_norm_eps or max_position_embeddings: transformers fills in
    Phi3Config's 1e-5 and 4096, not LlamaConfig's 1e-6 and 2048. The eps is in every norm, and the
    length sets LongRoPE's attention factor (sqrt(1 + ln(4096 / 64) / ln 64) on the tiny model):
    with Llama's defaults the logits moved by up to 1e-2 and 2e-3."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    src, _ = tiny_dirs["phi3"]
    for field in ("rms_norm_eps", "max_position_embeddings"):
        d = shutil.copytree(src, tmp_path / field)
        raw = json.loads((d / "config.json").read_text())
        del raw[field]
        (d / "config.json").write_text(json.dumps(raw))
        hf = AutoModelForCausalLM.from_pretrained(str(d)).eval()
        model, _ = load(d, tokenizer=False)
        want = (1e-5, 256) if field == "rms_norm_eps" else (1e-5, 4096)
        assert (model.config.rms_norm_eps, model.config.max_position_embeddings) == (
            hf.config.rms_norm_eps, hf.config.max_position_embeddings) == want
        tokens = _tokens(256, 2, 40)
        with torch.no_grad():
            assert (model(tokens) - hf(tokens).logits.float()).abs().max().item() <= 1e-4, field


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3", "gemma3"])
def test_a_config_without_max_position_embeddings_takes_its_familys_default(tiny_dirs, tmp_path, kind):
    """Without the field, transformers fills in each config class's own default (Llama 2048, Qwen2
    and Qwen3 32768, Mistral 131072, Gemma 3 131072); r3 took Llama's 2048 for Qwen and Mistral, so
    its token-limit check refused or warned about prompts the model takes."""
    import json
    import shutil

    from transformers import AutoConfig

    d = shutil.copytree(tiny_dirs[kind][0], tmp_path / kind)
    raw = json.loads((d / "config.json").read_text())
    del raw["max_position_embeddings"]
    (d / "config.json").write_text(json.dumps(raw))
    model, _ = load(d, tokenizer=False)
    hf = AutoConfig.from_pretrained(str(d))
    hf = getattr(hf, "text_config", hf)
    assert model.config.max_position_embeddings == hf.max_position_embeddings
    assert model.config.max_position_embeddings == {"llama": 2048, "qwen2": 32768, "mistral": 131072, "qwen3": 32768,
                                                    "gemma3": 131072}[kind]


def test_gemma3_runs_in_float64_as_transformers_does(tiny_dirs):
    """A Gemma 3 model loaded in float64 (load takes any float dtype; other families run in it):
    the embedding scale was kept for fp32, bf16 and fp16 only, and the forward died on a bare
    KeyError. It multiplies by sqrt(hidden) in float64, as transformers' float64 model does."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_dirs["gemma3"]
    ours, _ = load(path, dtype=torch.float64, tokenizer=False)
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    tokens = _tokens(256, 2, 30)
    with torch.no_grad():
        want = theirs(tokens).logits
        assert (ours(tokens).double() - want).abs().max().item() <= 1e-6  # (r3's logits are fp32)
        assert ours.hidden_states(tokens).dtype == torch.float64


def _needs_5(reason):
    """Skipped under transformers 4.x, which reads the case otherwise (``reason``); r3 follows 5.x."""
    return pytest.mark.skipif(transformers_major() < 5, reason="transformers 4.x: " + reason)


_PHI3_HALF = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0, 4.0, 5.0, 6.0]}


@pytest.mark.parametrize("kind,fields", [
    ("llama", {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    pytest.param("llama", {"rope_theta": 1e4,
                           "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 3e5}},
                 marks=_needs_5(
                     "reads rope_theta at the top level only (1e4), not the one in rope_scaling (3e5)")),
    pytest.param("phi3", {"partial_rotary_factor": 0.5,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                              "partial_rotary_factor": 0.75}},
                 marks=_needs_5(
                     "does not read rope_parameters: its partial factor is the top-level 0.5, not 0.75")),
    pytest.param("phi3", {"partial_rotary_factor": 0.5, "rope_scaling": _PHI3_HALF,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                              "partial_rotary_factor": 0.75}},
                 marks=_needs_5(
                     "Phi3Config refuses a rope_scaling whose type is under 'rope_type' (ValueError)")),
    pytest.param("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                        "rope_theta": 5e5},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}},
                                 "rope_scaling": {"factor": 4.0}},
                 marks=_needs_5(
                     "refuses a rope_scaling without a type (KeyError) and does not read rope_parameters")),
    pytest.param("gemma3_text", {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 3e5},
                                 "rope_theta": 1e5},
                 marks=_needs_5(
                     "reads rope_theta at the top level only (1e5), not the one in rope_scaling (3e5)")),
    pytest.param("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}},
                                 "rope_local_base_freq": 5e3},
                 marks=_needs_5(
                     "does not read rope_parameters: bases 1e6 (its default) and rope_local_base_freq 5e3")),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default"},
                                         "sliding_attention": {"rope_type": "default"}},
                     "rope_local_base_freq": 3e4, "rope_theta": 2e5}),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
], ids=["llama-theta-beside-scaling", "llama-theta-in-scaling", "phi3-partial-in-dict", "phi3-partial-top-level",
        "gemma3-merged", "gemma3-theta-in-scaling", "gemma3-local-theta-in-dict", "gemma3-bases-at-the-top-level",
        "gemma3-default-bases"])
def test_rope_fields_in_two_places_read_as_transformers_reads_them(kind, fields):
    """Hand-edited configs with RoPE fields in two places that disagree. transformers keeps the
    rope_scaling dict whole over rope_parameters (its rope_theta and partial_rotary_factor with it;
    the top-level fields only where the kept dict has none), and for Gemma 3 merges rope_scaling
    into the full-attention dict (the sliding layers' base: their own dict's rope_theta, else
    rope_local_base_freq, else 1e4). r3 took rope_parameters' theta beside a rope_scaling, dropped a
    rope_theta inside rope_scaling and preferred a top-level partial factor to the dict's: another
    RoPE than transformers' (a Phi-3 with 0.5 at the top and 0.75 in rope_parameters: its logits
    moved by 5e-3)."""
    import copy

    from transformers import AutoConfig

    base = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "gemma3_text":
        base.update(head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    theirs = AutoConfig.for_model(kind, **base, **copy.deepcopy(fields))  # (transformers fills in the dicts it gets)
    rope = hf_rope(theirs)["full_attention"] if kind == "gemma3_text" else hf_rope(theirs)
    ours = ModelConfig.from_hf({"model_type": kind, **base, **copy.deepcopy(fields)})
    assert ours.rope_theta == rope["rope_theta"]
    assert ours.partial_rotary_factor == rope.get("partial_rotary_factor", 1.0)
    assert (ours.rope_scaling or {}).get("rope_type", "default") == rope["rope_type"]
    assert (ours.rope_scaling or {}).get("factor") == rope.get("factor")
    if kind == "gemma3_text":  # (the sliding layers' base: their own dict's, else rope_local_base_freq, else 1e4)
        assert ours.local_rope_theta == hf_rope(theirs)["sliding_attention"]["rope_theta"]


@pytest.mark.skipif(transformers_major() < 5, reason="transformers 4.x writes no rope_parameters and reads none: "
                    "the top-level factor (0.5) is the one it runs")
def test_phi3_partial_factor_of_the_rope_dict_wins_in_the_logits(tmp_path):
    """The logits behind the config test above: a Phi-3 config.json with a top-level
    partial_rotary_factor 0.5 and 0.75 in rope_parameters runs as transformers runs it (0.75)."""
    import json

    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, partial_rotary_factor=0.75,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"]["partial_rotary_factor"] == 0.75
    raw["partial_rotary_factor"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ours, _ = load(tmp_path, tokenizer=False)
    tokens = _tokens(64, 2, 40)
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits.float()).abs().max().item() <= 1e-4


def test_phi3_export_config_keeps_the_partial_factor_for_every_reader():
    """to_hf of a Phi-3 with a partial rotary factor and LongRoPE (Phi-4-mini's layout) writes the
    factor at the top level as well as in rope_parameters: transformers keeps the rope_scaling dict
    whole (it has no factor) and fills it in from the top-level field; without that field, it and
    r3 read back RoPE over whole heads."""
    import copy

    from transformers import Phi3Config

    lr = {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5], "long_factor": [4.0] * 6}
    c = ModelConfig.from_hf(dict(model_type="phi3", vocab_size=10, hidden_size=32, intermediate_size=16,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256,
                                 original_max_position_embeddings=64, partial_rotary_factor=0.75, rope_scaling=lr))
    assert c.rotary_dim == 12
    hf = c.to_hf()
    # (the three keys transformers 4.x's Phi3Config takes: with more, it refused to load the export)
    assert hf["rope_scaling"] == {k: lr[k] for k in ("type", "short_factor", "long_factor")}
    for d in (hf, {k: v for k, v in hf.items() if k != "rope_scaling"}, {k: v for k, v in hf.items()
                                                                        if k != "rope_parameters"}):
        assert ModelConfig.from_hf(d) == c
        if transformers_major() < 5 and "rope_scaling" not in d:
            continue  # (rope_parameters alone: transformers 5's layout, which 4.x does not read)
        theirs = Phi3Config(**{k: v for k, v in copy.deepcopy(d).items() if k not in ("architectures", "model_type")})
        assert hf_rope(theirs)["partial_rotary_factor"] == 0.75
        assert hf_rope(theirs)["short_factor"] == lr["short_factor"]


def test_a_gemma3_model_built_from_its_config_starts_with_identity_norms():
    """Gemma's norms scale by (1 + w): a model built from a config (no checkpoint) holds w = 0, as
    transformers initialises them, so each norm is a plain RMS normalisation; the ones every other
    family starts with would double every norm's output."""
    from r3.model import RMSNorm

    model = Transformer(ModelConfig.from_hf(GEMMA3))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 1 + 6 * 6
    assert all(m.offset and torch.equal(m.weight, torch.zeros_like(m.weight)) for m in norms)
    x = torch.randn(2, 3, 16)
    assert torch.allclose(model.norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Ministral 3
# --------------------------------------------------------------------------------------------

MINISTRAL3 = dict(model_type="ministral3", vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096)
# Ministral 3's published RoPE (8B), as its config.json's text_config writes it
MINISTRAL3_ROPE = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 16.0, "llama_4_scaling_beta": 0.1, "mscale": 1.0,
                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
                   "rope_theta": 1000000.0, "rope_type": "yarn", "type": "yarn"}


def _hf_yarn_factor(config) -> tuple:
    """(inverse frequencies, cos/sin factor) transformers computes for a config's RoPE."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = hf_rope(config).get("rope_type", "default")
    if rope_type == "default":
        return None, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


@pytest.mark.parametrize("fields", [
    pytest.param({"rope_parameters": MINISTRAL3_ROPE}, id="published"),
    pytest.param({}, id="defaults"),
    # (transformers ignores a top-level rope_theta when there are no RoPE parameters: its default YaRN)
    pytest.param({"rope_theta": 5e5}, id="theta-alone"),
    pytest.param({"rope_parameters": {**MINISTRAL3_ROPE, "factor": 4.0, "mscale_all_dim": 0.5,
                                      "original_max_position_embeddings": 64, "llama_4_scaling_beta": 0.3}},
                 id="other-factors"),
    pytest.param({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1,
                                      "original_max_position_embeddings": 32}, "sliding_window": 16},
                 id="unscaled-with-window"),
    pytest.param({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "llama_4_scaling_beta": 0.2,
                                   "original_max_position_embeddings": 8}, "rope_theta": 1e4}, id="rope-scaling"),
    pytest.param({k: None for k in ("vocab_size", "hidden_size", "num_hidden_layers")}, id="dims-left-to-defaults"),
])
def test_ministral3_configs_read_as_transformers_reads_them(fields):
    """Ministral3Config's fields as transformers 5 resolves them: its defaults where a field is left
    out (head_dim 128 and 8 kv heads, not hidden / heads; YaRN with the query scaling), the RoPE
    from rope_parameters or rope_scaling, a window on every layer, and the query scaling's beta and
    length read from the RoPE parameters. The export reads back the same."""
    from transformers import Ministral3Config

    cfg = {k: v for k, v in {**MINISTRAL3, **fields}.items() if v is not None}
    if fields == {}:
        cfg = {k: v for k, v in cfg.items() if k not in ("head_dim", "num_key_value_heads", "num_attention_heads")}
    theirs = Ministral3Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    c = ModelConfig.from_hf(cfg)
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (
        theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads)
    assert (c.head_dim, c.num_key_value_heads, c.rms_norm_eps, c.max_position_embeddings) == (
        theirs.head_dim, theirs.num_key_value_heads, theirs.rms_norm_eps, theirs.max_position_embeddings)
    assert c.layer_windows == [theirs.sliding_window] * c.num_hidden_layers
    assert not c.tie_word_embeddings and not c.qkv_bias and c.hidden_act == "silu"
    rope = hf_rope(theirs)
    assert c.rope_theta == rope["rope_theta"]
    assert (c.query_scaling_beta, c.query_scaling_length) == (
        rope["llama_4_scaling_beta"], rope["original_max_position_embeddings"])
    inv_freq, factor = _hf_yarn_factor(theirs)
    if inv_freq is not None:
        assert torch.allclose(rope_inv_freq(c), inv_freq.float(), rtol=1e-6, atol=0)
        assert rope_scale(c) == pytest.approx(factor, abs=1e-12)
    else:
        assert c.rope_scaling is None
    again = ModelConfig.from_hf(c.to_hf())
    assert again == c
    back = Ministral3Config(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")})
    assert hf_rope(back)["llama_4_scaling_beta"] == c.query_scaling_beta
    assert hf_rope(back)["original_max_position_embeddings"] == c.query_scaling_length
    if inv_freq is not None:
        inv_back, factor_back = _hf_yarn_factor(back)
        assert torch.equal(inv_back, inv_freq) and factor_back == factor


def test_ministral3_queries_are_scaled_past_the_original_context_as_transformers_scales_them(tiny_dirs):
    """Ministral 3 multiplies each query, after RoPE, by 1 + beta ln(1 + floor(p / length)): exactly
    1 before position ``length`` (16 in the tiny model), 1 + 0.1 ln 2 from 16, 1 + 0.1 ln 3 from 32.
    The tiny model's logits equal transformers' past both steps in fp32 and bf16, and without the
    scaling they would move at those positions only."""
    from transformers import AutoModelForCausalLM

    from r3.model import query_scale

    path, hf = tiny_dirs["ministral3"]
    model, _ = load(path, tokenizer=False)
    c = model.config
    assert (c.query_scaling_beta, c.query_scaling_length) == (0.1, 16) and c.rope_scaling["rope_type"] == "yarn"
    scale = query_scale(c, torch.arange(40)[None], torch.float32)[0, :, 0, 0]
    assert torch.equal(scale[:16], torch.ones(16))
    assert scale[16].item() == pytest.approx(1 + 0.1 * math.log(2)) and scale[32].item() == pytest.approx(1 + 0.1 * math.log(3))
    tokens = _tokens(256, 2, 40)
    plain = Transformer(ModelConfig(**{**c.__dict__, "query_scaling_beta": 0.0})).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        want, unscaled = hf(tokens).logits, plain(tokens)
        assert (model(tokens) - want).abs().max().item() <= 1e-5
        assert torch.equal(unscaled[:, :16], model(tokens)[:, :16])
        assert (unscaled[:, 16:] - want[:, 16:]).abs().amax(-1).min().item() > 1e-3
        theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
        ours, _ = load(path, dtype=torch.bfloat16, tokenizer=False)
        assert torch.equal(ours(tokens), theirs(tokens).logits.float())


@pytest.mark.parametrize("change,match", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     "a ministral3 config's RoPE parameters need 'llama_4_scaling_beta'"),
    ({"rope_parameters": {**MINISTRAL3_ROPE, "original_max_position_embeddings": None}},
     "a ministral3 config's RoPE parameters need 'original_max_position_embeddings'"),
    ({"rope_parameters": {**MINISTRAL3_ROPE, "llama_4_scaling_beta": -0.1}},
     "field 'llama_4_scaling_beta' must be a number >= 0, got -0.1"),
    ({"rope_parameters": {**MINISTRAL3_ROPE, "llama_4_scaling_beta": "0.1"}},
     "field 'llama_4_scaling_beta' must be a number >= 0, got '0.1'"),
    ({"rope_parameters": {**MINISTRAL3_ROPE, "original_max_position_embeddings": 0}},
     "original_max_position_embeddings"),
    ({"head_dim": None}, "field 'head_dim' is null"),
    ({"num_key_value_heads": None}, "field 'num_key_value_heads' is null"),
])
def test_ministral3_configs_transformers_cannot_run_are_refused_by_name(change, match):
    """transformers' Ministral 3 fails on a config whose RoPE parameters lack the query scaling's
    beta or length (a TypeError in its forward), and refuses these nulls: r3 says which field."""
    from r3.errors import R3Error

    with pytest.raises(R3Error, match=re.escape(match)):
        ModelConfig.from_hf({**MINISTRAL3, "rope_parameters": MINISTRAL3_ROPE, **change})


# --------------------------------------------------------------------------------------------
# Gemma 2
# --------------------------------------------------------------------------------------------

GEMMA2 = dict(model_type="gemma2", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=12,
              hidden_activation="gelu_pytorch_tanh", sliding_window=4)


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="defaults"),
    pytest.param({"layer_types": ["full_attention", "sliding_attention"] * 2, "rope_theta": 5e5}, id="layer-types"),
    pytest.param({"attn_logit_softcapping": None, "final_logit_softcapping": 12.5}, id="one-cap"),
    pytest.param({"attn_logit_softcapping": None, "final_logit_softcapping": None}, id="no-caps"),
    # (Gemma 2 has no sliding_window_pattern: transformers alternates whatever it says)
    pytest.param({"sliding_window_pattern": 3}, id="pattern-unread"),
])
def test_gemma2_configs_read_as_transformers_reads_them(fields):
    """Gemma2Config's fields as transformers 5 resolves them: even layers slide and odd ones are
    full unless layer_types says, one RoPE base for all, the caps 50 (scores) and 30 (logits)
    where left out and none where null, tied embeddings. The export reads back the same."""
    from transformers import Gemma2Config

    cfg = {**GEMMA2, **fields}
    theirs = Gemma2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    c = ModelConfig.from_hf(cfg)
    assert c.layer_windows == [4 if t == "sliding_attention" else None for t in theirs.layer_types]
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (
        theirs.attn_logit_softcapping, theirs.final_logit_softcapping)
    assert (c.rope_theta, c.local_rope_theta, c.rope_scaling) == (hf_rope(theirs)["rope_theta"], None, None)
    assert (c.query_pre_attn_scalar, c.hidden_act, c.tie_word_embeddings, c.qk_norm, c.gemma) == (
        12.0, "gelu_pytorch_tanh", True, False, True)
    assert ModelConfig.from_hf(c.to_hf()) == c
    back = Gemma2Config(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")})
    assert back.layer_types == theirs.layer_types and hf_rope(back) == hf_rope(theirs)
    assert (back.attn_logit_softcapping, back.final_logit_softcapping) == (
        theirs.attn_logit_softcapping, theirs.final_logit_softcapping)


def test_gemma2_caps_are_really_used_and_bf16_logits_equal_transformers(tiny_dirs):
    """The tiny Gemma 2's caps (3 on the scores, 4 on the logits) bite: without either the logits
    move far from transformers'; with both they equal transformers' bit for bit in bf16 (scores in
    bf16, softmax in fp32, the logits capped in bf16, as its eager attention and head compute them)."""
    from transformers import AutoModelForCausalLM

    path, hf = tiny_dirs["gemma2"]
    model, _ = load(path, tokenizer=False)
    c = model.config
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (3.0, 4.0)
    assert c.layer_windows == [8, None] and not c.qk_norm
    tokens = _tokens(256, 2, 40)
    with torch.no_grad():
        want = hf(tokens).logits
        assert want.abs().max() <= 4.0 and (model(tokens) - want).abs().max().item() <= 1e-5
        for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}):
            other = Transformer(ModelConfig(**{**c.__dict__, **change})).eval()
            other.load_state_dict(model.state_dict())
            assert (other(tokens) - want).abs().max().item() > 1e-2, change
        theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
        ours, _ = load(path, dtype=torch.bfloat16, tokenizer=False)
        assert torch.equal(ours(tokens), theirs(tokens).logits.float())


def test_a_gemma3_config_with_a_final_softcap_runs_as_transformers_runs_it(tmp_path):
    """Gemma 3 ships without caps, but transformers' Gemma 3 caps the logits where a config sets
    final_logit_softcapping (its attention leaves attn_logit_softcapping unread, so r3 refuses
    that one): r3 follows, where it refused both before."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path, "gemma3", final_logit_softcapping=4.0)
    model, _ = load(tmp_path, tokenizer=False)
    assert (model.config.attn_logit_softcapping, model.config.final_logit_softcapping) == (None, 4.0)
    tokens = _tokens(256, 2, 40)
    with torch.no_grad():
        want = hf(tokens).logits
        assert want.abs().max() <= 4.0 and (model(tokens) - want).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------
# Gemma 4
# --------------------------------------------------------------------------------------------

GEMMA4 = dict(model_type="gemma4_text", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
              hidden_size_per_layer_input=4, vocab_size_per_layer_input=32)


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="defaults"),
    pytest.param({"attention_k_eq_v": True, "num_global_key_value_heads": 1, "global_head_dim": 16}, id="k-eq-v"),
    pytest.param({"attention_k_eq_v": False, "num_global_key_value_heads": 1}, id="global-kv-unread"),
    pytest.param({"num_kv_shared_layers": 3, "use_double_wide_mlp": True,
                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                                  "sliding_attention", "sliding_attention"]}, id="shared-last-made-full"),
    pytest.param({"per_layer_config": {"5": {"head_dim": 12, "num_key_value_heads": 1}}, "global_head_dim": 64},
                 id="per-layer-config"),
    pytest.param({"hidden_size_per_layer_input": 0, "final_logit_softcapping": 30.0,
                  "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                                      "full_attention": {"rope_type": "default", "rope_theta": 2e5}}},
                 id="no-ple-default-rope"),
    pytest.param({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                      "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                                         "partial_rotary_factor": 0.5, "factor": 2.0}}},
                 id="proportional-factor"),
])
def test_gemma4_configs_read_as_transformers_reads_them(fields):
    """Gemma4TextConfig's fields as transformers 5 resolves them: every sixth layer full (the last
    one always), the full layers' head size (global_head_dim, 512 by default, or per_layer_config)
    and kv heads (num_global_key_value_heads only with attention_k_eq_v), the shared layers'
    sources (kv_sharing_modes), per-layer inputs (256 dims by default), proportional RoPE's
    frequencies per layer type, tied embeddings. The export reads back the same, in r3 and in
    transformers."""
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    cfg = {**GEMMA4, **fields}
    theirs = Gemma4TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    c = ModelConfig.from_hf(cfg)
    n = theirs.num_hidden_layers
    assert c.layer_windows == [4 if t == "sliding_attention" else None for t in theirs.layer_types]
    assert [c.layer_head_dim(i) for i in range(n)] == [theirs.per_layer_config[i].head_dim for i in range(n)]
    assert [c.layer_kv_heads(i) for i in range(n)] == [theirs.per_layer_config[i].num_key_value_heads for i in range(n)]
    modes = theirs.kv_sharing_modes
    assert [c.kv_source(i) != i for i in range(n)] == [m == "reuse" for m in modes]
    for i in range(n):  # (a shared layer reads the last "store" layer of its type)
        if modes[i] == "reuse":
            j = c.kv_source(i)
            assert modes[j] == "store" and theirs.layer_types[j] == theirs.layer_types[i]
    assert (c.per_layer_input_size, c.final_logit_softcapping, c.tie_word_embeddings, c.query_pre_attn_scalar) == (
        theirs.hidden_size_per_layer_input or 0, theirs.final_logit_softcapping, True, 1.0)
    for local, kind in ((False, "full_attention"), (True, "sliding_attention")):
        rope_type = theirs.rope_parameters[kind]["rope_type"]
        fn = (Gemma4TextRotaryEmbedding.compute_default_rope_parameters if rope_type == "default"
              else ROPE_INIT_FUNCTIONS[rope_type])
        want = fn(theirs.per_layer_config[kind], None, layer_type=kind)[0]
        assert torch.equal(rope_inv_freq(c, local=local), want), kind
    assert ModelConfig.from_hf(c.to_hf()) == c
    back = Gemma4TextConfig(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")})
    assert back.layer_types == theirs.layer_types and back.rope_parameters == theirs.rope_parameters
    assert [(back.per_layer_config[i].head_dim, back.per_layer_config[i].num_key_value_heads) for i in range(n)] == [
        (theirs.per_layer_config[i].head_dim, theirs.per_layer_config[i].num_key_value_heads) for i in range(n)]
    assert back.kv_sharing_modes == modes


def test_gemma4_parts_are_really_used_and_bf16_logits_equal_transformers(tiny_dirs):
    """The tiny Gemma 4 (see conftest) holds what it claims, and each part changes the logits:
    the layer scalars, the per-layer inputs, proportional RoPE (not the default one) on the full
    layers, the shared layers reading their sources' keys and values (not their own layer's
    input again), the full layers' keys as values. In bf16 the logits equal transformers' bit for
    bit."""
    from transformers import AutoModelForCausalLM

    path, hf = tiny_dirs["gemma4"]
    model, _ = load(path, tokenizer=False)
    c = model.config
    assert (c.global_head_dim, c.global_kv_heads, c.attention_k_eq_v, c.kv_shared_layers, c.double_wide_mlp,
            c.per_layer_input_size) == (32, 1, True, 2, True, 8)
    assert [c.kv_source(i) for i in range(5)] == [0, 1, 2, 2, 1] and c.cache_layers() == [0, 1, 2]
    assert model.layers[4].mlp.down_proj.weight.shape == (48, 192) and model.layers[1].self_attn.qkv_proj.weight.shape == (
        4 * 32 + 32, 48)
    assert not any(torch.equal(layer.layer_scalar, torch.ones(1)) for layer in model.layers)
    tokens = _tokens(256, 2, 40)
    with torch.no_grad():
        want = hf(tokens).logits
        assert (model(tokens) - want).abs().max().item() <= 1e-5

        def far(other):
            return (other(tokens) - want).abs().max().item() > 1e-2

        for change in ({"rope_scaling": None}, {"final_logit_softcapping": None}):
            other = Transformer(ModelConfig(**{**c.__dict__, **change})).eval()
            other.load_state_dict(model.state_dict())
            assert far(other), change
        other = Transformer(c).eval()
        other.load_state_dict(model.state_dict())
        for layer in other.layers:
            layer.layer_scalar.fill_(1.0)
        assert far(other)
        other.load_state_dict(model.state_dict())
        other._per_layer_inputs = lambda tokens, x: torch.zeros(*tokens.shape, 5, 8)
        assert far(other)
        theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
        ours, _ = load(path, dtype=torch.bfloat16, tokenizer=False)
        assert torch.equal(ours(tokens), theirs(tokens).logits.float())


def test_gemma4_export_and_the_vision_language_checkpoint_load_as_transformers_does(tiny_dirs, tmp_path):
    """A Gemma 4 checkpoint as published (Gemma4ForConditionalGeneration: the language model under
    model.language_model., vision and audio towers beside it, and keys and values for the shared
    layers, which transformers leaves unread) loads as the text model it holds; its export is a
    Gemma4ForCausalLM that transformers loads with the same logits."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from r3.checkpoint import save_hf

    path, hf = tiny_dirs["gemma4"]
    text = json.loads((path / "config.json").read_text())
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    (wrapped / "config.json").write_text(json.dumps({
        "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
        "vision_config": {"model_type": "gemma4_vision"}, "tie_word_embeddings": True}))
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.language_model.{k.removeprefix('model.')}": v.contiguous()
               for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    tensors.update({"model.vision_tower.patch_embedder.weight": torch.randn(4, 8, generator=g),
                    "model.audio_tower.conv.weight": torch.randn(4, 8, generator=g),
                    "model.embed_vision.embedding_projection.weight": torch.randn(4, 8, generator=g)})
    for i in (3, 4):  # (the published checkpoints' keys and values of the shared layers)
        d = 16 if i == 3 else 32
        for name, shape in (("k_proj.weight", (d * (2 if i == 3 else 1), 48)), ("v_proj.weight", (d * 2, 48)),
                            ("k_norm.weight", (d,))):
            tensors[f"model.language_model.layers.{i}.self_attn.{name}"] = torch.randn(shape, generator=g)
    save_file(tensors, str(wrapped / "model.safetensors"))
    model, _ = load(wrapped, tokenizer=False)
    tokens = _tokens(256, 2, 40)
    with torch.no_grad():
        want = hf(tokens).logits
        assert (model(tokens) - want).abs().max().item() <= 1e-5
        out = save_hf(model, None, tmp_path / "export")
        back = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert type(back).__name__ == "Gemma4ForCausalLM"
        assert (back(tokens).logits - want).abs().max().item() <= 1e-5
    assert set(back.state_dict()) == set(hf.state_dict())


@pytest.mark.parametrize("change,match", [
    ({"enable_moe_block": True}, "field 'enable_moe_block' true: Gemma 4's mixture-of-experts"),
    ({"use_bidirectional_attention": "all"}, "field 'use_bidirectional_attention' 'all' is not supported"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "field 'rope_scaling' of a Gemma 4 config"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}, "sliding_attention": {}}},
     "unsupported rope scaling type 'yarn' for Gemma 4's full-attention layers"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "partial_rotary_factor": 0.5},
                          "sliding_attention": {}}}, "partial_rotary_factor' with rope_type default"),
    ({"attn_logit_softcapping": 50.0}, "of a Gemma 4 config: transformers 5's Gemma 4 attention leaves it unread"),
    ({"num_kv_shared_layers": 6}, "field 'num_kv_shared_layers' must be an integer from 0 to 5, got 6"),
    ({"num_kv_shared_layers": 1}, "has no earlier layer of its kind"),
    ({"per_layer_config": {"5": {"head_dim": 12}, "0": {"head_dim": 12}}}, "gives layers of one kind different shapes"),
    ({"per_layer_config": {"5": {"sliding_window": 12}}}, "field 'per_layer_config' entry '5'"),
    ({"global_head_dim": 15}, "global_head_dim 15 is odd"),
    ({"attention_k_eq_v": True, "num_global_key_value_heads": 3}, "not a multiple of the full-attention layers' 3"),
    # (Gemma4TextConfig fails on a null global_head_dim; transformers' model on a token id past the
    # per-layer table, which r3 read as the sliding layers' head size and met mid-rollout)
    ({"global_head_dim": None}, "field 'global_head_dim' is null, from which transformers cannot build"),
    ({"vocab_size_per_layer_input": 31}, "field 'vocab_size_per_layer_input' 31 is below vocab_size 32: a token id"),
])
def test_gemma4_configs_r3_cannot_run_are_refused_in_one_line(change, match):
    from r3.errors import R3Error

    cfg = {**GEMMA4, "layer_types": ["sliding_attention"] * 5 + ["full_attention"], **change}
    with pytest.raises(R3Error, match=re.escape(match)):
        ModelConfig.from_hf(cfg)
