"""Qwen 3.5 GGUF files (llama.cpp's ``qwen35`` architecture): a tiny Qwen3_5ForCausalLM written the
way llama.cpp's converter writes it (convert_hf_to_gguf.py: Qwen3_5TextModel, a Qwen3NextModel with
the value heads reordered to tiled order), loaded by r3, gives transformers' logits; what r3 cannot
run as llama.cpp does is refused in one line."""

import pytest
import torch

from r3 import checkpoint
from r3.checkpoint import load
from r3.errors import R3Error

pytest.importorskip("gguf")


def _tokens(vocab: int, B: int = 2, T: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def _grouped_to_tiled(t: torch.Tensor, dim: int, k: int, r: int, d: int) -> torch.Tensor:
    """llama.cpp's converter's _reorder_v_heads: value heads grouped by key head -> tiled."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], k, r, d, *shape[dim + 1:])
    perm = list(range(t.dim()))
    perm[dim], perm[dim + 1] = perm[dim + 1], perm[dim]
    return t.permute(*perm).contiguous().reshape(shape)


def write_qwen35_gguf(hf, path, bf16: bool = False, nextn: int = 0, fields: dict | None = None,
                      tensors: dict | None = None, vocab_from=None) -> None:
    """``hf``'s weights and config as llama.cpp's converter writes a Qwen3_5ForCausalLM: TextModel's
    fields, Qwen3NextModel's ssm.* fields, full_attention_interval and rope.dimension_count; the MTP
    block left out, or (``nextn``) written as blocks after the decoder's with nextn_predict_layers;
    A_log as -exp(A_log), dt_bias as ssm_dt.bias, the conv kernel squeezed, every norm but
    linear_attn.norm as 1 + w, the value heads of every v-indexed tensor grouped -> tiled (values of
    in_proj_qkv and conv1d, in_proj_z, in_proj_a/b, A_log, dt_bias, out_proj's columns).
    ``fields``: <arch>.<key> -> value (None: left out), ``tensors``: GGUF name -> array (None: left
    out; new names added); ``vocab_from``: a GGUF file whose tokenizer.* fields are copied."""
    import gguf
    import numpy as np

    c = hf.config
    arch = "qwen35"
    n = c.num_hidden_layers
    k, v = c.linear_num_key_heads, c.linear_num_value_heads
    r, dk, dv = v // k, c.linear_key_head_dim, c.linear_value_head_dim
    rope = c.rope_parameters
    sections = list(rope.get("mrope_section", []))
    sections += [0] * (4 - len(sections))
    kv = {"block_count": n + nextn, "context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads, "attention.key_length": c.head_dim,
          "attention.value_length": c.head_dim, "rope.freq_base": float(rope["rope_theta"]),
          "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "rope.dimension_sections": sections[:4],
          "ssm.conv_kernel": c.linear_conv_kernel_dim, "ssm.state_size": dk, "ssm.group_count": k,
          "ssm.time_step_rank": v, "ssm.inner_size": dv * v,
          "full_attention_interval": getattr(c, "full_attention_interval", 4),
          "rope.dimension_count": int(c.head_dim * rope.get("partial_rotary_factor", 0.25)),
          "vocab_size": c.vocab_size}
    if nextn:
        kv["nextn_predict_layers"] = nextn
    kv.update(fields or {})
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        elif isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", int(value))
    if vocab_from is not None:
        src = gguf.GGUFReader(str(vocab_from))
        for key, field in src.fields.items():
            if key.startswith("tokenizer."):
                if field.types[0] == gguf.GGUFValueType.ARRAY:
                    w.add_array(key, field.contents())
                else:
                    w.add_key_value(key, field.contents(), field.types[0])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, n + nextn)
    tensors = dict(tensors or {})
    state = dict(hf.state_dict())
    for i in range(nextn):  # (an MTP block as newer converters write it: a full-attention block and nextn.*)
        for name, t in list(state.items()):
            if f"layers.{c.layer_types.index('full_attention')}." in name:
                state[name.replace(f"layers.{c.layer_types.index('full_attention')}.", f"layers.{n + i}.")] = t + 0.5
        state[f"model.layers.{n + i}.eh_proj.weight"] = torch.randn(c.hidden_size, 2 * c.hidden_size)
    for name, t in state.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float()
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif "conv1d" in name:
            t = t.squeeze()
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            t = t + 1
        if "linear_attn." in name and k != v:
            if ".in_proj_qkv." in name or ".conv1d." in name:
                t = torch.cat([t[:2 * k * dk], _grouped_to_tiled(t[2 * k * dk:], 0, k, r, dv)])
            elif ".in_proj_z." in name:
                t = _grouped_to_tiled(t, 0, k, r, dv)
            elif ".in_proj_a." in name or ".in_proj_b." in name or ".A_log" in name or ".dt_proj." in name:
                t = _grouped_to_tiled(t, 0, k, r, 1)
            elif ".out_proj." in name:
                t = _grouped_to_tiled(t, 1, k, r, dv)
        if name.endswith("eh_proj.weight"):
            gname = name.replace("model.layers.", "blk.").replace("eh_proj", "nextn.eh_proj")
        else:
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        arr = np.ascontiguousarray(t.numpy())
        if gname in tensors:
            arr = tensors.pop(gname)
            if arr is None:
                continue
        if bf16 and arr.ndim == 2 and "norm" not in gname and "ssm_conv1d" not in gname:  # (F32 as the converter keeps them)
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(gname, arr)
    for gname, arr in tensors.items():
        if arr is not None:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# (layouts the converter writes: its full_attention_interval decides the layer kinds llama.cpp runs,
# so the source's layer_types follow it)
_LAYOUTS = {
    "tiled": dict(layer_types=["linear_attention"] * 3 + ["full_attention"], full_attention_interval=4,
                  linear_value_head_dim=8),
    "widths": dict(layer_types=["linear_attention", "full_attention"] * 2, full_attention_interval=2),
    "one-per-key": dict(layer_types=["linear_attention"] * 3 + ["full_attention"], full_attention_interval=4,
                        linear_num_value_heads=2, linear_value_head_dim=8),
    "three-per-key": dict(layer_types=["linear_attention"] * 3 + ["full_attention"], full_attention_interval=4,
                          linear_num_value_heads=6, linear_value_head_dim=8),
}


def _tiny(tmp_path, layout: str, **over):
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen35", **{**_LAYOUTS[layout], **over})
    return hf


@pytest.mark.parametrize("layout, bf16, nextn", [("tiled", False, 0), ("tiled", True, 1), ("widths", False, 0),
                                                 ("one-per-key", False, 0), ("three-per-key", True, 1)])
def test_a_qwen35_gguf_gives_the_source_models_logits(tmp_path, layout, bf16, nextn):
    """Gated DeltaNet layers with 2 key heads and 4 (tiled), 2 (one per key: nothing reordered) or
    6 value heads, values 8 or 12 wide (widths: a full-attention layer every second one), a gated
    attention layer turning a quarter of each 16-dim head; with a multi-token prediction block
    (nextn_predict_layers 1), left unread; fp32 or bf16 matrices. The logits over 40 positions are
    transformers' on the same weights."""
    hf = _tiny(tmp_path, layout)
    if bf16:  # the reference holds exactly what a bf16 file can (its 2-d matrices; norms and conv kernels f32)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" not in name and p.dim() == 2:
                    p.copy_(p.bfloat16().float())
    path = tmp_path / "qwen35.gguf"
    write_qwen35_gguf(hf, path, bf16=bf16, nextn=nextn)
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    c, h = model.config, hf.config
    assert c.model_type == "qwen3_5_text" and c.num_hidden_layers == h.num_hidden_layers
    assert c.linear_layers == [i for i, t in enumerate(h.layer_types) if t == "linear_attention"]
    assert (c.linear_key_heads, c.linear_value_heads, c.linear_key_dim, c.linear_value_dim, c.linear_conv_kernel) == (
        h.linear_num_key_heads, h.linear_num_value_heads, h.linear_key_head_dim, h.linear_value_head_dim, 4)
    assert c.partial_rotary_factor == 0.25 and c.rope_theta == 1e6 and not c.tie_word_embeddings
    tokens = _tokens(h.vocab_size)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4


def _mutated(model, what: str) -> None:
    """``model``'s weights as a loader with one mistake would have left them."""
    c = model.config
    layer = model.layers[c.linear_layers[0]].linear_attn
    attn = model.layers[[i for i in range(c.num_hidden_layers) if not c.linear(i)][0]].self_attn
    with torch.no_grad():
        if what == "A read with its sign flipped":  # (A_log = -log(-ssm_a))
            layer.A_log.neg_()
        elif what == "A_log read as stored":  # (ssm_a, -exp(A_log), taken for A_log)
            layer.A_log.copy_(-layer.A_log.exp())
        elif what == "norm read as stored (1 + w)":
            model.layers[0].input_layernorm.weight.add_(1.0)
        elif what == "q_norm read as stored (1 + w)":
            attn.q_norm.weight.add_(1.0)
        elif what == "linear_attn.norm offset by 1":
            layer.norm.weight.sub_(1.0)
        elif what == "query and gate rows swapped":
            d, nh = c.head_dim, c.num_attention_heads
            q = attn.qkv_proj.weight[: 2 * nh * d].view(nh, 2, d, -1)
            q.copy_(q.flip(1))
        elif what == "value heads left tiled":  # (out_proj's columns, as the file holds them)
            k, v, dv = c.linear_key_heads, c.linear_value_heads, c.linear_value_dim
            w = layer.out_proj.weight
            w.copy_(_grouped_to_tiled(w.clone(), 1, k, v // k, dv))
        elif what == "dt_bias left tiled":
            k, v = c.linear_key_heads, c.linear_value_heads
            layer.dt_bias.copy_(_grouped_to_tiled(layer.dt_bias.clone(), 0, k, v // k, 1))
        else:
            raise ValueError(what)


@pytest.mark.parametrize("what", ["A read with its sign flipped", "A_log read as stored", "norm read as stored (1 + w)",
                                  "q_norm read as stored (1 + w)", "linear_attn.norm offset by 1",
                                  "query and gate rows swapped", "value heads left tiled", "dt_bias left tiled"])
def test_each_of_the_converters_transformations_matters(tmp_path, what):
    """Each transformation undone by the loader changes the logits when left in (so the comparison
    above would catch a loader that skipped it or got it backwards)."""
    hf = _tiny(tmp_path, "tiled")
    path = tmp_path / "qwen35.gguf"
    write_qwen35_gguf(hf, path)
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4
        _mutated(model, what)
        assert (want - model(tokens)).abs().max().item() > 1e-2


def _qwen35_vocab(path, n_bytes: int = 256) -> list[str]:
    """A byte-level BPE vocabulary as llama.cpp's converter writes Qwen 3.5's (tokenizer model gpt2,
    pre qwen35), with its control tokens at the end."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()
    merges = ["H e", "He l", "Hel l", "Hell o", "Ġ w", "Ġw o", "Ġwo r", "Ġwor l", "Ġworl d", "1 2"]
    tokens = [spelled[b] for b in range(n_bytes)] + [m.replace(" ", "") for m in merges]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "qwen35")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 3)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_a_qwen35_gguf_reads_as_transformers_reads_it(tmp_path, monkeypatch):
    """The file this test's writer makes is read by transformers' own GGUF loader (5.25 on, its
    independent reading of llama.cpp's qwen35 layout) as the source model, and by r3 with the same
    logits; its tokenizer (gpt2 / qwen35: Qwen 3.5's split) gives transformers' ids and special
    tokens, and the export is the same model to transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r3.checkpoint import save_hf

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    tokens = _qwen35_vocab(tmp_path / "vocab.gguf")
    rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 1],
            "mrope_interleaved": True}  # (transformers' GGUF reader needs three non-empty sections)
    hf = _tiny(tmp_path, "tiled", vocab_size=len(tokens), head_dim=24, rope_parameters=rope)
    (tmp_path / "g").mkdir()
    path = tmp_path / "g" / "qwen35.gguf"
    write_qwen35_gguf(hf, path, vocab_from=tmp_path / "vocab.gguf")
    model, tok = load(path, dtype=torch.float32)
    ids = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        want = hf(ids).logits.float()
        assert (want - model(ids)).abs().max().item() <= 1e-4
        try:
            theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as e:  # (before 5.25: no qwen35 GGUF support)
            theirs = None
            assert "qwen35" in str(e), e
        if theirs is not None:
            assert (want - theirs(ids).logits.float()).abs().max().item() <= 1e-5
        out = save_hf(model, tok, tmp_path / "export")
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        assert (want - got).abs().max().item() <= 1e-4
    text = "Hello world 123<|im_start|>Hello<|im_end|>"
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == [
        "Hello", "Ġworld", "Ġ", "1", "2", "3", "<|im_start|>", "Hello", "<|im_end|>"]  # (digits one by one)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.decode(tok(text)["input_ids"]) == text
    try:
        ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        assert "qwen35" in str(e), e
    else:
        assert tok(text)["input_ids"] == ref(text)["input_ids"]


def _refused(tmp_path, match: str, layout: str = "tiled", **write) -> str:
    hf = _tiny(tmp_path, layout)
    path = tmp_path / "qwen35.gguf"
    write_qwen35_gguf(hf, path, **write)
    with pytest.raises(R3Error) as e:
        load(path, tokenizer=False, dtype=torch.float32)
    message = str(e.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.mark.parametrize("write, match", [
    (dict(fields={"ssm.state_size": None}), "missing GGUF field 'qwen35.ssm.state_size'"),
    (dict(fields={"ssm.inner_size": 30}), "'qwen35.ssm.inner_size' 30 is not a multiple of 'qwen35.ssm.time_step_rank' 4"),
    (dict(fields={"ssm.time_step_rank": 3, "ssm.inner_size": 24}), "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    (dict(fields={"nextn_predict_layers": 4}), "'qwen35.nextn_predict_layers' must be an integer from 0 to 3, got 4"),
    (dict(fields={"rope.dimension_count": 3}), "'qwen35.rope.dimension_count' must be an even number of dims"),
    (dict(fields={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}),
     "unsupported GGUF field 'qwen35.rope.scaling.type' 'yarn'"),
    (dict(fields={"attention.scale": 0.5}), "unsupported GGUF field 'qwen35.attention.scale' 0.5"),
    (dict(fields={"attention.value_length": 8}), "unsupported GGUF field 'qwen35.attention.value_length' 8"),
    (dict(fields={"attention.recurrent_layers": [True, True, True, True]}),
     "unsupported Qwen 3.5 layout: no 'full_attention' layer"),
    (dict(fields={"attention.recurrent_layers": [True, False]}),
     "unsupported GGUF field 'qwen35.attention.recurrent_layers' [True, False]"),
    (dict(fields={"full_attention_interval": 0}), "'qwen35.full_attention_interval' must be a positive integer, got 0"),
    (dict(tensors={"blk.1.ssm_a": None}), "missing tensor 'blk.1.ssm_a' ('layers.1.linear_attn.A_log' in r3)"),
    (dict(tensors={"blk.0.ssm_dt.bias": None}), "missing tensor 'blk.0.ssm_dt.bias'"),
    (dict(tensors={"blk.3.attn_q.weight": None}), "missing tensor 'blk.3.attn_q.weight'"),
    (dict(tensors={"blk.0.attn_gate.weight": __import__("numpy").zeros((64, 32), "float32")}),
     "tensor 'blk.0.attn_gate.weight' ('layers.0.linear_attn.in_proj_z.weight' in r3) has shape (64, 32), "
     "expected (32, 64)"),
    (dict(tensors={"blk.0.ssm_conv1d.weight": __import__("numpy").zeros((1, 4, 64), "float32")}),
     "tensor 'blk.0.ssm_conv1d.weight' ('layers.0.linear_attn.conv1d.weight' in r3) has shape (1, 4, 64), "
     "expected (64, 4)"),
    (dict(tensors={"blk.2.ssm_a": __import__("numpy").ones(4, "float32")}),
     "'blk.2.ssm_a' ('layers.2.linear_attn.A_log' in r3) must hold -exp(A_log), below 0"),
    (dict(tensors={"blk.3.attn_qkv.weight": __import__("numpy").zeros((64, 64), "float32")}),
     "unexpected GGUF tensor 'blk.3.attn_qkv.weight' (layer 3 is an attention layer: attn_norm, attn_q"),
    (dict(tensors={"blk.0.attn_q.weight": __import__("numpy").zeros((64, 128), "float32")}),
     "unexpected GGUF tensor 'blk.0.attn_q.weight' (layer 0 is a Gated DeltaNet: attn_norm, ssm_a, ssm_dt.bias"),
    (dict(tensors={"blk.4.attn_norm.weight": __import__("numpy").ones(64, "float32")}),
     "unexpected GGUF tensor 'blk.4.attn_norm.weight' (layer 4 of a model of 4 layers)"),
    (dict(tensors={"blk.0.ffn_gate_inp.weight": __import__("numpy").ones((64, 8), "float32")}),
     "unexpected GGUF tensor 'blk.0.ffn_gate_inp.weight'"),
])
def test_what_r3_cannot_read_as_llama_cpp_does_is_refused_in_one_line(tmp_path, write, match):
    """Fields llama.cpp requires, counts that do not fit, RoPE scaling and a query scale r3 does not
    run for Qwen 3.5, a layout without attention, tensors missing, of another shape (the conv kernel
    unsqueezed: the converter squeezes it), A not stored as -exp(A_log), a tensor of the other
    layer kind's, past the layers, or of the mixture-of-experts model: each one line."""
    _refused(tmp_path, match, **write)


def test_recurrent_layer_flags_decide_the_layer_kinds(tmp_path):
    """llama.cpp's attention.recurrent_layers (one flag per block, the MTP block's false) over
    full_attention_interval: the same model with its flags for an interval it does not follow."""
    hf = _tiny(tmp_path, "widths")  # (full attention on layers 1 and 3)
    path = tmp_path / "qwen35.gguf"
    write_qwen35_gguf(hf, path, nextn=1, fields={"full_attention_interval": 4,
                                                 "attention.recurrent_layers": [True, False, True, False, False]})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    assert model.config.linear_layers == [0, 2]
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-4


def test_the_mixture_of_experts_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), "qwen35moe")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(R3Error, match="unsupported GGUF architecture 'qwen35moe' \\(supported: .*qwen35"):
        checkpoint.load(path, tokenizer=False)
