"""Qwen 3.5's text model (transformers ``qwen3_5_text``, and the ``qwen3_5`` wrapper with a vision
tower): its Gated DeltaNet layers and gated attention against transformers on the same weights,
loading and exporting Hugging Face directories, and the sampler carrying each row's recurrent
state (its log-probs against a forward over each whole row)."""

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
    ({"layer_types": ["linear_attention"] * 4}, "unsupported Qwen 3.5 layout: no 'full_attention' layer"),
    ({"full_attention_interval": 5, "layer_types": None}, "unsupported Qwen 3.5 layout: no 'full_attention' layer"),
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
        # the wrapper's own text path (its 4-row positions: text, and time/height/width for mrope)
        assert torch.allclose(vl(tokens), wrapper(input_ids=tokens).logits, atol=1e-5)
    save_hf(vl, None, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5ForCausalLM"] and cfg["model_type"] == "qwen3_5_text"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert torch.allclose(back(tokens).logits, want, atol=1e-5)



def _hub_config(hidden, intermediate, layers, heads, kv_heads, value_heads, tied):
    """A config.json as the Qwen3.5 hub checkpoints write it (Qwen3_5ForConditionalGeneration: the
    text model's fields with the multi-token-prediction head's, mrope sections, rope_theta 1e7)."""
    text = {"attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "bos_token_id": 248044,
            "dtype": "bfloat16", "eos_token_id": 248044, "full_attention_interval": 4, "head_dim": 256,
            "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": intermediate,
            "layer_types": ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
            "linear_num_value_heads": value_heads, "linear_value_head_dim": 128, "mamba_ssm_dtype": "float32",
            "max_position_embeddings": 262144, "model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False, "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads, "output_gate_type": "swish", "pad_token_id": None,
            "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06,
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25,
                                "rope_theta": 10000000, "rope_type": "default"},
            "tie_word_embeddings": tied, "use_cache": True, "vocab_size": 248320}
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "image_token_id": 248056, "model_type": "qwen3_5",
            "text_config": text, "tie_word_embeddings": tied, "video_token_id": 248057,
            "vision_config": {"depth": 27, "hidden_size": 1152, "model_type": "qwen3_5_vision",
                              "out_hidden_size": hidden},
            "vision_end_token_id": 248054, "vision_start_token_id": 248053}


@pytest.mark.parametrize("shape", [(1024, 3584, 24, 8, 2, 16, True), (5120, 17408, 64, 24, 4, 48, False)],
                         ids=["0.8B", "27B"])
def test_a_hub_shaped_config_builds_transformers_parameters_and_exports_its_semantics(shape):
    """Qwen3.5-0.8B's and -27B's shapes as their config.json gives them (on the meta device): r3's
    parameters are transformers' causal LM's, fused; RoPE turns 64 dims at theta 1e7; the export's
    config.json builds the same text config."""
    import copy

    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    raw = _hub_config(*shape)
    cfg = ModelConfig.from_hf(copy.deepcopy(raw))
    hf_cfg = Qwen3_5Config(**copy.deepcopy(raw)).text_config
    assert (cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling) == (64, 1e7, None)
    assert cfg.tie_word_embeddings == shape[-1] and cfg.max_position_embeddings == 262144
    assert cfg.linear_layers == [i for i in range(shape[2]) if (i + 1) % 4]
    with torch.device("meta"):
        hf, ours = Qwen3_5ForCausalLM(hf_cfg), Transformer(cfg)
    hf_shapes = {k.removeprefix("model."): v.shape for k, v in hf.state_dict().items()}
    fused = fuse_checkpoint_tensors(cfg, {k: torch.empty(s, device="meta") for k, s in hf_shapes.items()
                                          if not (cfg.tie_word_embeddings and k == "lm_head.weight")})
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()
                   if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert {k: tuple(v.shape) for k, v in fused.items()} == ours_shapes
    back = Qwen3_5TextConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    for key in ("layer_types", "head_dim", "tie_word_embeddings", "linear_num_value_heads", "linear_num_key_heads",
                "eos_token_id", "max_position_embeddings", "attention_bias", "rms_norm_eps", "vocab_size"):
        assert getattr(back, key) == getattr(hf_cfg, key), key
    drop = ("mrope_section", "mrope_interleaved")  # (text alone: one position on every axis)
    assert ({k: v for k, v in back.rope_parameters.items() if k not in drop}
            == {k: v for k, v in hf_cfg.rope_parameters.items() if k not in drop})


def test_loglikelihoods_of_a_batch_keep_each_contexts_padding_out_of_the_states():
    """r3.evals.engine.loglikelihoods (r3.forgetting's multiple choice) prefills a batch's contexts
    right-padded to the longest: a shorter context's Gated DeltaNet states must not take that
    padding, or its choices' later tokens are scored from a state that read it."""
    from r3.evals.engine import loglikelihoods

    model = _stateful_model()
    items = [([1, 2, 3, 4, 5, 6, 7, 8, 9], [[3, 4], [5]]), ([9, 8], [[7, 7, 7], [1]]), ([6], [[2, 2, 2, 2]])]
    got = loglikelihoods(model, items, batch_size=8)
    for (ctx, conts), scores in zip(items, got):
        for cont, score in zip(conts, scores):
            want = sum(_teacher_forced(model, ctx + cont, len(ctx) - 1, cont))
            assert score.logprob == pytest.approx(want, abs=1e-4), (ctx, cont)

def _stateful_model():
    """A tiny Qwen 3.5 in fp32 whose stop token 5 is sampled now and then."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen35").to_dict())
    model = _perturbed(Transformer(cfg)).eval()
    with torch.no_grad():
        model.lm_head.weight[5] += 0.5
    return model


def _teacher_forced(model, row: list[int], start: int, tokens: list[int]) -> list[float]:
    """Log-probs of ``tokens`` (row[start + 1 + j] = tokens[j]) by one forward over the row."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([row])).float(), -1)[0]
    return [lp[start + j, t].item() for j, t in enumerate(tokens)]


@pytest.mark.parametrize("compact", [False, True])
def test_sampled_log_probs_equal_a_forward_over_each_whole_row(compact):
    """The sampler carries each row's Gated DeltaNet state through a ragged prefill (right
    padding kept out of it), forks, stops (a row that has stopped keeps its state while others
    decode), appended turns of different lengths (an empty one too) and compaction: every
    sampled token's log-prob equals a forward over the whole row."""
    from r3.sampler import Session

    model = _stateful_model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3] * 20, [4, 4, 4, 4, 4]]
    session = Session.start(model, prompts, seed=0, compact=compact, prefill_tokens=16).fork(2)
    first = session.sample(12, temperature=1.0, stop_token_ids=[5])
    session.append([[7, 7, 7] if i % 3 else [] for i in range(len(session))])
    second = session.sample(10, temperature=1.0, stop_token_ids=[5])
    assert set(first.finished) == {True, False} and set(second.finished) == {True, False}
    for i, row in enumerate(session.tokens):
        start = len(prompts[i // 2]) - 1
        assert first.logprobs[i] == pytest.approx(_teacher_forced(model, row, start, first.tokens[i]), abs=1e-5)
        n = len(second.tokens[i])
        assert second.logprobs[i] == pytest.approx(_teacher_forced(model, row, len(row) - n - 1, second.tokens[i]),
                                                   abs=1e-5)
    if compact:  # (the same samples as without compaction)
        again = Session.start(model, prompts, seed=0, compact=False, prefill_tokens=16).fork(2)
        assert again.sample(12, temperature=1.0, stop_token_ids=[5]).tokens == first.tokens


def test_a_stop_string_ends_a_row_at_its_step_and_its_state_there():
    """A row stopped by a stop string keeps the state of the tokens it keeps (checked every step
    for a stateful model, on any device): what it samples next follows its kept text."""
    from r3.sampler import Session, StopStrings

    model = _stateful_model()
    strings = StopStrings(["|"], lambda ids: "".join("|" if t == 5 else "x" for t in ids))
    session = Session.start(model, [[1, 2, 3], [4, 5, 6, 7]], seed=1)
    out = session.sample(15, temperature=1.0, stop_strings=strings, sync_every=4)
    assert any(out.finished), "a row must meet the stop string"
    session.append([[7, 8], [7]])
    more = session.sample(6, temperature=1.0)
    for i, row in enumerate(session.tokens):
        n = len(more.tokens[i])
        assert more.logprobs[i] == pytest.approx(_teacher_forced(model, row, len(row) - n - 1, more.tokens[i]), abs=1e-5)


def _compiled_equals_eager(model, prompts, turns):
    """Samples of ``turns`` (each: (max_new_tokens, sampling kwargs, appended tokens or None)) from
    a session of ``prompts`` forked in two, eager and compiled: the same tokens, stops and
    log-probs; returns the compiled session."""
    from r3.sampler import Session

    sessions = [Session.start(model, prompts, seed=0, decode=d, prefill_tokens=16).fork(2) for d in ("eager", "compiled")]
    for n, kw, append in turns:
        eager, comp = (s.sample(n, **kw) for s in sessions)
        assert comp.tokens == eager.tokens and comp.finished == eager.finished, kw
        assert torch.allclose(comp.logprob_tensor, eager.logprob_tensor, atol=1e-5), kw
        if append is not None:
            for s in sessions:
                s.append([append if i % 3 else [] for i in range(len(s))])
    return sessions[1]


_TURNS = [(20, dict(temperature=1.0, stop_token_ids=[5]), [7, 7, 7]),
          (10, dict(temperature=1.0, stop_token_ids=[5], top_k=20), None)]  # (top-k: the pick outside the step)


def test_compiled_decode_equals_eager_through_stops_forks_turns_and_compaction():
    """decode="compiled" on a CPU (inductor on the session's own cache): the step carries each
    row's Gated DeltaNet states (rows that have stopped keep theirs), with the pick fused or not;
    the samples and log-probs equal the eager sampler's, and the states it leaves are the ones a
    forward over each whole row gives (the next turn's log-probs)."""
    model = _stateful_model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3] * 20, [4, 4, 4, 4, 4]]
    session = _compiled_equals_eager(model, prompts, _TURNS)
    more = session.sample(5, temperature=1.0)
    for i, row in enumerate(session.tokens):
        n = len(more.tokens[i])
        assert more.logprobs[i] == pytest.approx(_teacher_forced(model, row, len(row) - n - 1, more.tokens[i]), abs=1e-5)


@pytest.mark.parametrize("run_steps", [0, 8])
def test_cuda_graph_decode_carries_the_states_through_the_static_cache(monkeypatch, run_steps):
    """The decode path a GPU takes (CUDA graphs forced on this CPU, where a recording is the steps
    run again): the states are copied into the model's static cache with the rows' keys and
    values, moved with them by compactions, and written back; per-step replays and graph runs (a
    run's warm-up runs with every row stopped: it feeds no state, and no state is copied) sample
    as the eager sampler does. A stop string keeps graph runs off (each row must stop at its step). A
    batch of fewer rows in the same static cache compiles nothing again (no guard on the rows:
    the one-token conv runs without F.conv1d under compile), and the step is one graph."""
    from torch._dynamo.utils import counters

    import r3.decode as decode_mod
    from r3.packed_linear import PackedWeights
    from r3.sampler import StopStrings

    monkeypatch.setattr(decode_mod, "CUDA_GRAPHS", True)
    monkeypatch.setattr(PackedWeights, "available", staticmethod(lambda model: False))
    monkeypatch.setattr(decode_mod, "GRAPH_RUN_STEPS", run_steps)
    runs = []
    run = decode_mod.GraphRuns.run
    monkeypatch.setattr(decode_mod.GraphRuns, "run", lambda self, kv_len, k, u: runs.append(k) or run(self, kv_len, k, u))
    cloned, fed = _spy_recordings(monkeypatch)
    model = _stateful_model()
    breaks, frames = sum(counters["graph_break"].values()), counters["frames"]["ok"]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3] * 20, [4, 4, 4, 4, 4], [2] * 9, [6, 1], [8, 8, 8], [1]]
    _compiled_equals_eager(model, prompts, _TURNS)
    assert static_rows(model) == 16
    assert (8 in runs) == (run_steps == 8) == bool(fed)
    # A recording's warm-up feeds no state, so it copies none to put back: the states can be as
    # large as the KV cache (Qwen3.5-0.8B's: 18.6 MiB a row, 4.7 GiB for 256 rows).
    state_row = sum(t[0].numel() * t[0].element_size() for t in decode_mod.static_cache(model).full.states)
    assert not any(fed) and max(cloned, default=0) < state_row
    compiled = counters["frames"]["ok"] - frames
    _compiled_equals_eager(model, prompts[:3], _TURNS)  # (6 rows in the same static cache)
    assert static_rows(model) == 16 and counters["frames"]["ok"] - frames == compiled
    runs.clear()
    strings = StopStrings(["|"], lambda ids: "".join("|" if t == 5 else "x" for t in ids))
    _compiled_equals_eager(model, prompts[:3], [(15, dict(temperature=1.0, stop_strings=strings, sync_every=4), [7]),
                                                (6, dict(temperature=1.0, stop_token_ids=[5]), None)])
    assert 8 not in runs  # (the turn with the stop string: one step at a time)
    assert sum(counters["graph_break"].values()) == breaks


def _spy_recordings(monkeypatch):
    """Per graph-run recording: whether its warm-up (the steps run once before the capture) fed
    any Gated DeltaNet state, and the bytes of every tensor the recording cloned."""
    import r3.decode as decode_mod

    cloned, fed, clone = [], [], torch.Tensor.clone
    record, warm_up = decode_mod.GraphRuns._record, decode_mod.GraphRuns._warm_up

    def counting_clone(t, *args, **kwargs):
        cloned.append(t.numel() * t.element_size())
        return clone(t, *args, **kwargs)

    def spied_record(self, model_ref, key):
        monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
        try:
            return record(self, model_ref, key)
        finally:
            monkeypatch.setattr(torch.Tensor, "clone", clone)

    def spied_warm_up(self, body):
        monkeypatch.setattr(torch.Tensor, "clone", clone)  # (the compiled steps run as they would)
        before = [t.clone() for t in self.conv + self.ssm]
        warm_up(self, body)
        fed.append(any(not torch.equal(a, b) for a, b in zip(before, self.conv + self.ssm)))
        monkeypatch.setattr(torch.Tensor, "clone", counting_clone)

    monkeypatch.setattr(decode_mod.GraphRuns, "_record", spied_record)
    monkeypatch.setattr(decode_mod.GraphRuns, "_warm_up", spied_warm_up)
    return cloned, fed


def static_rows(model) -> int:
    from r3.decode import static_cache

    return static_cache(model).full.batch_size


def test_the_rollout_memory_check_counts_the_deltanet_states(pair):
    from r3.rollout_memory import kv_cache_bytes

    _, ours = pair
    cache = ours.new_cache(3, 40, dtype=torch.bfloat16)
    assert kv_cache_bytes(ours.config, 3, 40, 2) == cache.nbytes()


def test_r3_train_and_evaluate_run_a_tiny_qwen35(tmp_path, builtin):
    """Through the commands: two training steps on two ranks (FSDP2 shards the Gated DeltaNet
    blocks; the update's shared-prefix layout runs each reflection from its prefix's states) with
    a resume, then r3.evaluate --run, eager and compiled (the same records); the export loads in
    transformers as Qwen3_5ForCausalLM."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{here / 'helpers'}{os.pathsep}{here.parent}", "OMP_NUM_THREADS": "1"}
    model_dir = tmp_path / "model"
    make_tiny_hf(model_dir, "qwen35", vocab_size=49152)
    builtin[1].save_pretrained(str(model_dir))
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "r3.train",
            "--task", "r3_test_tasks:CoinTask", "--task-options", "{}", "--batch-size", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--dtype", "fp32", "--lr", "1e-3", "--micro-batch-size", "3",
            "--warmup-steps", "0", "--cut-answers", "judge", "--model", str(model_dir), "--out", str(out)]
    proc = subprocess.run(base + ["--max-steps", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = subprocess.run(base + ["--max-steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["logp_diff_max"] < 1e-4 for r in rows if r.get("logp_diff_max") is not None)
    assert sum(r["groups_with_signal"] for r in rows) > 0
    back = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    assert type(back).__name__ == "Qwen3_5ForCausalLM"
    records = {}
    for decode, written in (("eager", out / "evaluation.json"), ("compiled", tmp_path / "compiled.json")):
        # (fp32, greedy: the compiled step gives the same samples; --run writes into the run by default)
        where = [] if decode == "eager" else ["--out", str(written)]
        proc = subprocess.run([sys.executable, "-m", "r3.evaluate", "--run", str(out), "--n", "3", "--quiet", "--records",
                               "--decode", decode, *where], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        doc = json.loads(written.read_text())
        assert doc["n"] == 3
        records[decode] = [m["records"] for m in doc["models"]]
    assert records["compiled"] == records["eager"] and len(records["eager"]) == 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_shared_prefix_layout_equals_the_per_row_layout(checkpointing):
    """The update's shared-prefix layout (each group's prefix once, its reflections after it):
    the Gated DeltaNet layers run each reflection from the states its prefix ended in, so the
    log-probs, the KL, the loss and every gradient equal the per-row layout's (fp32, every
    aggregation, whole groups, groups split over micro-batches, one row each; with activation
    checkpointing too)."""
    from r3 import grpo
    from test_shared_prefix import compare, groups

    model, reference = _stateful_model(), _stateful_model()
    model.activation_checkpointing = checkpointing
    with torch.no_grad():  # a reference that differs, so the KL term has a gradient
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    seqs, spans, adv = groups(model.config.vocab_size)
    for agg in grpo.AGGREGATIONS if not checkpointing else grpo.AGGREGATIONS[:1]:
        for micro in (12, 5, 1):
            compare(model, reference, seqs, spans, adv, agg, micro_packed=micro, rtol=1e-5, atol=1e-6)


def test_the_update_reads_each_packed_layout_from_the_host_copy_once(monkeypatch):
    """A packed micro-batch's SegmentRuns come from the host copy of its layout that
    pack_shared_prefixes made, once (the reference pass and the policy's share them): no forward
    waits to read ``segments`` back from the device. The log-probs are those of the forward that
    reads them."""
    from r3 import batch as B
    from r3.model import SegmentRuns
    from test_shared_prefix import groups

    model = _stateful_model()
    seqs, spans, adv = groups(model.config.vocab_size)
    mbs = B.make_micro_batches(seqs, spans, adv, 1, 0, "cpu", shared_prefix=True)
    for mb in mbs:  # (a device copy apart from the host's, as on a GPU)
        mb.packed.segments = mb.packed.segments.clone()
    real, calls = SegmentRuns.of.__func__, []
    monkeypatch.setattr(SegmentRuns, "of", classmethod(lambda cls, seg, device=None: calls.append(seg) or real(cls, seg, device)))
    with torch.no_grad():
        got = [(B.token_logprobs(model, mb, 1.0)[0], B.token_logprobs(model, mb, 1.0)[0]) for mb in mbs]
        assert len(calls) == len(mbs) > 1 and all(c is mb.packed.segments_host for c, mb in zip(calls, mbs))
        for (a, b), mb in zip(got, mbs):
            p = mb.packed
            direct = model(p.tokens, positions=p.positions, segments=p.segments, at=(p.rows, p.cols))
            expected = torch.log_softmax(direct.float(), -1).gather(-1, mb.targets[:, None])[:, 0]
            assert torch.equal(a, b) and torch.allclose(a, expected, atol=1e-6)
    assert len(calls) == 2 * len(mbs)  # (the direct forwards read their layouts)


def test_segment_runs_gather_each_segment_in_column_order():
    """SegmentRuns of a packed layout: each row's prefix, and each later segment with the row it
    continues, as flat positions in column order (padding -1 left out; a row without later
    segments has none)."""
    from r3.model import SegmentRuns

    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1], [0, 0, 1, 2, 2, 2, 1], [0, -1, -1, -1, -1, -1, -1]])
    runs = SegmentRuns.of(seg)
    assert runs.prefix_len.tolist() == [3, 2, 1]
    assert [r[:n] for r, n in zip(runs.prefix.tolist(), runs.prefix_len.tolist())] == [[0, 1, 2], [7, 8], [14]]
    assert runs.segment_row.tolist() == [0, 0, 1, 1]
    assert [r[:n] for r, n in zip(runs.segment.tolist(), runs.segment_len.tolist())] == [[3, 4], [5], [9, 13], [10, 11, 12]]
