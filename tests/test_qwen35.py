"""Qwen 3.5's text model (transformers ``qwen3_5_text``, and the ``qwen3_5`` wrapper with a vision
tower): its Gated DeltaNet layers and gated attention against transformers on the same weights,
loading and exporting Hugging Face directories, and the one-line refusal of sampling, which r3's
sampler cannot drive yet (no recurrent state in its KV cache)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_hf, tiny_hf_config
from r3.checkpoint import load
from r3.errors import R3Error
from r3.model import ModelConfig, Transformer, fuse_checkpoint_tensors, param_shapes


def _perturbed(model):
    """Norm weights and the decays' biases away from their initial values (so that a mix-up of
    (1 + w) and w, or of A_log and dt_bias, shows), and decays moderate (A = exp(A_log) in [0.05,
    0.5]): the state then carries each token some way, as trained models' do."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("dt_bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.05, 0.5).log())
    return model


@pytest.fixture(scope="module")
def pair():
    """(transformers' Qwen3_5ForCausalLM, ours with its weights), fp32, eval."""
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    hf_cfg = tiny_hf_config("qwen35")
    hf = _perturbed(AutoModelForCausalLM.from_config(hf_cfg)).eval()
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    ours = Transformer(cfg).eval()
    ours.load_state_dict(fuse_checkpoint_tensors(cfg, {k.removeprefix("model."): v for k, v in hf.state_dict().items()}))
    return hf, ours


def test_config_reads_the_layer_kinds_the_deltanet_shapes_and_a_quarter_rotary():
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen35").to_dict())
    assert cfg.linear_layers == [0, 1, 3] and cfg.cache_layers() == [2]
    assert (cfg.linear_key_heads, cfg.linear_value_heads, cfg.linear_key_dim, cfg.linear_value_dim,
            cfg.linear_conv_kernel) == (2, 4, 8, 12, 4)
    assert cfg.rotary_dim == 4 and cfg.rope_scaling is None and cfg.attn_output_gate and cfg.norm_style == "gemma"
    # without layer_types: every full_attention_interval-th layer is attention (4 by default)
    d = {k: v for k, v in tiny_hf_config("qwen35").to_dict().items() if k != "layer_types"}
    d["num_hidden_layers"] = 8
    assert ModelConfig.from_hf(d).linear_layers == [0, 1, 2, 4, 5, 6]
    assert ModelConfig.from_hf({**d, "full_attention_interval": 2}).linear_layers == [0, 2, 4, 6]


@pytest.mark.parametrize("change,message", [
    ({"layer_types": ["linear_attention", "sliding_attention", "full_attention", "linear_attention"]},
     "field 'layer_types' must list 'linear_attention' or 'full_attention' for each of the 4 layers"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    ({"linear_conv_kernel_dim": None}, "field 'linear_conv_kernel_dim' is null, from which transformers cannot build"),
    ({"linear_key_head_dim": 0}, "linear_key_head_dim"),
    ({"full_attention_interval": 0, "layer_types": None}, "field 'full_attention_interval' must be a positive integer"),
])
def test_bad_qwen35_fields_are_one_line_errors(change, message):
    d = {**tiny_hf_config("qwen35").to_dict(), **change}
    with pytest.raises(R3Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf(d)


def test_the_default_config_builds_transformers_parameters_name_for_name():
    """Qwen3_5TextConfig's defaults (Qwen3.5-9B's shapes) on the meta device: every parameter of
    transformers' causal LM, shape for shape, q/k/v and gate/up fused as r3 holds them."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    hf_cfg = Qwen3_5TextConfig()
    with torch.device("meta"):
        hf = Qwen3_5ForCausalLM(hf_cfg)
        ours = Transformer(ModelConfig.from_hf(hf_cfg.to_dict()))
    cfg = ours.config
    hf_shapes = {k.removeprefix("model."): v.shape for k, v in hf.state_dict().items()}
    fused = fuse_checkpoint_tensors(cfg, {k: torch.empty(s, device="meta") for k, s in hf_shapes.items()})
    assert {k: tuple(v.shape) for k, v in fused.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert param_shapes(cfg) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def test_fp32_logits_equal_transformers(pair):
    hf, ours = pair
    tokens = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1))  # (more than a 64-token chunk)
    with torch.no_grad():
        want, got = hf(tokens).logits, ours(tokens)
    assert (got - want).abs().max().item() < 2e-5 * want.abs().max().item()


def test_bf16_logits_are_within_a_rounding_of_transformers(pair):
    """In bf16 the projections round as transformers' do; the delta rule runs in fp32 in both,
    in another order (transformers' chunks, r3's own), so the logits agree to bf16's rounding."""
    hf, ours = pair
    hf16, ours16 = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    try:
        tokens = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want, got = hf16(tokens).logits.float(), ours16(tokens).float()
        assert (got - want).abs().max().item() <= 2 ** -6 * max(1.0, want.abs().max().item())
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
    finally:
        hf.float(), ours.float()


def test_gradients_equal_transformers_and_with_activation_checkpointing(pair):
    hf, ours = pair
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    hf.zero_grad(), ours.zero_grad()
    hf(tokens).logits.square().mean().backward()
    ours(tokens).square().mean().backward()
    mine = dict(ours.named_parameters())
    for name in ("layers.0.linear_attn.A_log", "layers.0.linear_attn.dt_bias", "layers.0.linear_attn.conv1d.weight",
                 "layers.1.linear_attn.in_proj_a.weight", "layers.3.linear_attn.norm.weight", "layers.2.self_attn.q_norm.weight"):
        want = hf.get_parameter("model." + name).grad
        assert (mine[name].grad - want).abs().max() <= 1e-4 * want.abs().max(), name
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.activation_checkpointing = True
    try:
        ours.train()
        ours(tokens).square().mean().backward()
    finally:
        ours.activation_checkpointing = False
        ours.eval()
    assert all(torch.allclose(p.grad, plain[n], rtol=1e-5, atol=1e-8) for n, p in ours.named_parameters())


def test_a_directory_and_the_vision_language_wrapper_load_and_export(tmp_path):
    """A Qwen3_5ForCausalLM directory loads with transformers' logits; the wrapper
    (Qwen3_5ForConditionalGeneration: the language model under model.language_model., a vision
    tower under model.visual.) loads as its language model, with a multi-token-prediction head
    (mtp.*) in the file left unread as transformers leaves it; the export is a Qwen3_5ForCausalLM
    transformers loads with the same logits."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from r3.checkpoint import save_hf

    hf = make_tiny_hf(tmp_path / "lm", "qwen35")
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(tokens).logits
    model, _ = load(str(tmp_path / "lm"), tokenizer=False)
    with torch.no_grad():
        assert torch.allclose(model(tokens), want, atol=1e-5)
    text = tiny_hf_config("qwen35")
    wrapper = Qwen3_5ForConditionalGeneration(Qwen3_5Config(
        text_config=text.to_dict(), vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                       out_hidden_size=64, patch_size=4, temporal_patch_size=1,
                                                       spatial_merge_size=1))).eval()
    wrapper.model.language_model.load_state_dict(hf.model.state_dict())
    wrapper.lm_head.load_state_dict(hf.lm_head.state_dict())
    wrapper.save_pretrained(str(tmp_path / "vl"))
    weights = tmp_path / "vl" / "model.safetensors"
    tensors = load_file(str(weights))
    assert any(k.startswith("model.visual.") for k in tensors)
    tensors["mtp.fc.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    vl, _ = load(str(tmp_path / "vl"), tokenizer=False)
    with torch.no_grad():
        assert torch.allclose(vl(tokens), want, atol=1e-5)
    save_hf(vl, None, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5ForCausalLM"] and cfg["model_type"] == "qwen3_5_text"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert torch.allclose(back(tokens).logits, want, atol=1e-5)


def test_sampling_is_refused_in_one_line(pair):
    """r3's sampler keeps keys and values, not a Gated DeltaNet's recurrent state: every command
    that samples refuses the model before it starts, and a forward with a KV cache is an R3Error."""
    from r3.model import check_token_limits

    _, ours = pair
    with pytest.raises(R3Error, match="Qwen 3.5's linear-attention \\(Gated DeltaNet\\) layers: r3 loads, runs and "
                                      "exports this model, but its sampler does not yet carry their recurrent state"):
        check_token_limits(ours.config, "m", attempt=8)
    cache = ours.new_cache(1, 16)
    with pytest.raises(R3Error, match="does not yet carry their recurrent state"):
        ours.hidden_states(torch.zeros(1, 3, dtype=torch.long), positions=torch.arange(3)[None], cache=cache)
