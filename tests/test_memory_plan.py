"""benchmarks/memory_plan.py: the formula's parts add up, and its activation term is what
autograd keeps (checked here against the bytes the forward pass actually allocates)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu")


def test_plan_parts_add_up_and_checkpointing_shrinks_activations():
    import memory_plan as mp

    run = dict(mp.PAPER, batch_size=16)
    plain = mp.plan(TINY, 2, run, False, shared_prefix=False)
    ac = mp.plan(TINY, 2, run, True, shared_prefix=False)
    P = plain["params"]
    assert plain["parts"]["policy fp32 shards"] == 4 * P / 2 and plain["parts"]["rollout copy bf16"] == 2 * P
    assert plain["static"] == sum(plain["parts"].get(k, 0) for k in mp.STATIC)
    update = plain["update_phase"] - plain["static"]
    kv = plain["parts"]["rollout KV cache"]
    assert plain["parts"]["its compacted copy (<= 3/4)"] == 0.75 * kv
    assert plain["total"] == plain["static"] + max(1.75 * kv, update)
    # without checkpointing every block keeps its activations; with it, every block its input and
    # one block all of its activations (during its recomputation); both, what lies outside them
    n, a, L, h = plain["micro_batch_tokens"], plain["activation_bytes_per_token_by_layer"], 3, 64
    root = plain["activation_bytes_per_token_root"]
    assert len(a) == L and len(set(a)) == 1 and plain["activation_bytes_per_token_layer"] == a[0]
    i = plain["activation_bytes_per_token_inputs"]
    assert i == [2.0 * h] * L and root > 0  # (each block's input norm keeps its bf16 input: r3.rms_norm)
    # and while the last block's backward pass runs (or, with checkpointing, any one's), its working set
    w = plain["activation_bytes_per_token_backward"]
    assert len(set(w)) == 1 and 0 < w[0] < a[0]
    assert plain["parts"]["activations (one micro-batch)"] == n * (L * (a[0] + i[0]) + w[0]) + n * root
    w = ac["activation_bytes_per_token_backward"]  # (measured again: allocations, not to the byte)
    assert ac["parts"]["activations (one micro-batch)"] == n * L * 2 * h + n * (a[0] + w[0]) + n * root
    # blocks that keep their own input (OLMo's) and blocks of other kinds: without checkpointing
    # all of it, with it the inputs anyway and the largest block's activations
    given = {"blocks": [10.0, 30.0, 20.0], "inputs": [2.0] * 3, "root": 5.0}
    act = lambda ckpt: mp.plan(TINY, 2, run, ckpt, given, shared_prefix=False)["parts"]["activations (one micro-batch)"]  # noqa: E731
    assert act(False) == n * (60 + 6 + 5) and act(True) == n * (L * 2 * h + 30 + 5)
    # a block's backward working set on top of the blocks before it and itself: the first block's
    # can outweigh the later blocks' activations
    for working, plain_top, ac_top in (([50.0, 0, 0], 66, 60), ([100.0, 0, 0], 112, 110), ([0, 0, 7.0], 73, 30)):
        act = lambda ckpt: mp.plan(TINY, 2, run, ckpt, {**given, "backward": working},  # noqa: E731
                                   shared_prefix=False)["parts"]["activations (one micro-batch)"]
        assert act(False) == n * (plain_top + 5) and act(True) == n * (L * 2 * h + ac_top + 5)
    assert ac["parts"]["rollout KV cache"] == plain["parts"]["rollout KV cache"]
    # compiled decode on CUDA: the static cache (64 rows; 830 slots rounded up to 832, plus one
    # bucket: 896) is held all the time, and compactions happen in it
    comp = mp.plan(TINY, 2, run, False, mp.activation_bytes_of(plain), decode="compiled", shared_prefix=False)
    assert plain["rows_per_rank"] == 64 and plain["slots"] == 830
    assert comp["parts"]["static decode cache"] == kv * 896 / 830
    assert comp["parts"]["its compacted copy (<= 3/4)"] == 0
    assert comp["static"] == plain["static"] + kv * 896 / 830
    assert comp["total"] == comp["static"] + max(kv, update)
    # the update's peak from its parts by name: the gradient shards, plus the backward pass's busiest
    # moment (gathered parameters, activations and logits held, or the root's reduce-scatter)
    for p in (plain, ac, comp):
        parts = p["parts"]
        assert parts["gradients fp32 shards"] == 4 * P / 2
        assert p["update_phase"] - p["static"] == pytest.approx(parts["gradients fp32 shards"] + max(
            parts["gathered params + their grads (bf16)"] + parts["activations (one micro-batch)"]
            + parts["logits (reflection positions)"], parts[mp.END_OF_BACKWARD]), rel=1e-12)


def test_the_shared_prefix_layout_packs_whole_groups_into_the_per_row_budget():
    """The trainer's default layout (r3.batch._chunks): a micro-batch holds as many whole groups as
    fit in the tokens of 8 per-row rows (8 x 554), each its 426-token prefix once and its 8
    reflections of 128: 3 groups, 4350 tokens, 3 x 8 x 128 targets (3x the per-row layout's
    logits). On CUDA each attention block keeps its kv heads repeated (2 x 2 more heads of 16,
    bf16, per token), and each packed row an additive [L, L] mask. A group over the budget alone
    is split by rows, its prefix in each part."""
    import memory_plan as mp

    run = dict(mp.PAPER, batch_size=16)
    given = {"blocks": [1000.0] * 3, "inputs": [0.0] * 3, "root": 100.0}
    assert mp.micro_batch_layout(run, False) == {"tokens": 8 * 554, "targets": 8 * 128, "rows": 8, "length": 554}
    assert mp.micro_batch_layout(run, True) == {"tokens": 4350, "targets": 3072, "rows": 3, "length": 1450}
    assert mp.micro_batch_layout(dict(run, group_size=64), True) == {
        "tokens": 426 + 31 * 128, "targets": 31 * 128, "rows": 1, "length": 426 + 31 * 128}
    # as the trainer batches such groups (r3.batch.make_micro_batches)
    from r3 import batch as B

    for group_size in (8, 64):
        seqs = [[g + 1] * 426 + [7] * 128 for g in range(4) for _ in range(group_size)]
        spans = [(426, 554)] * len(seqs)
        mbs = B.make_micro_batches(seqs, spans, [1.0] * len(seqs), 8, 0, "cpu", shared_prefix=True)
        biggest = max(mbs, key=lambda m: m.packed.tokens.numel())
        want = mp.micro_batch_layout(dict(run, group_size=group_size), True)
        assert int((biggest.packed.segments >= 0).sum()) == want["tokens"] and len(biggest.targets) == want["targets"]
        assert tuple(biggest.packed.tokens.shape) == (want["rows"], want["length"])
    for ckpt in (False, True):
        p = mp.plan(TINY, 2, run, ckpt, given)
        held = 1000 + 2 * 2 * 16 * 2
        blocks = 3 * 2 * 64 + held if ckpt else 3 * held
        mask = 3 * 1450 ** 2 * 2
        assert p["micro_batch_tokens"] == 4350 and p["micro_batch_targets"] == 3072
        assert p["parts"]["activations (one micro-batch)"] == pytest.approx(4350 * (blocks + 100) + mask, rel=1e-12)
        assert p["parts"]["logits (reflection positions)"] == 3072 * 512 * 2
        assert p["activation_bytes_per_token_by_layer"] == given["blocks"]  # (as measured: planned again as given)


@pytest.mark.parametrize("family", ["qwen2", "olmo2", "gemma4", "qwen35"])
def test_activation_terms_are_the_bytes_a_forward_keeps(family):
    """Whole tiny model, bf16: the per-token terms (each block's, the inputs blocks keep, what
    lies outside them), measured on one block of each kind, times the tokens are the memory the
    whole model's forward pass leaves allocated for backward, to the byte. Qwen2's outside: the
    positions, the RoPE tables every block reads (made once), and the final norm's bf16 input
    and statistics; every block keeps its input (its input norm, r3.rms_norm; OLMo 2's
    attention, which reads it unnormed); Gemma 4's per-layer inputs grow with the layers."""
    import memory_plan as mp
    from conftest import tiny_hf_config
    from r3.model import ModelConfig, Transformer

    T = 256
    shape = TINY if family == "qwen2" else tiny_hf_config(family).to_dict()
    got = mp.activation_bytes(shape, T)
    mc = ModelConfig.from_hf(shape)
    torch.manual_seed(0)
    model = Transformer(mc).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(torch.randint(0, mc.vocab_size, (1, T)))
    assert (sum(got["blocks"]) + sum(got["inputs"]) + got["root"]) * T == sum(kept.values())
    assert got["inputs"] == [2.0 * mc.hidden_size] * mc.num_hidden_layers  # (bf16: an input norm's, OLMo's attention's)
    if family == "qwen2":
        positions, tables, final_norm = 8 * T, 2 * T * mc.head_dim * 2, T * (2 * mc.hidden_size + 4)
        assert got["root"] * T == positions + tables + final_norm


QWEN35_SMALL = dict(model_type="qwen3_5_text", vocab_size=4096, hidden_size=256, intermediate_size=704,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
                    linear_value_head_dim=32, linear_conv_kernel_dim=4, full_attention_interval=4,
                    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})


@pytest.mark.fresh_process
@pytest.mark.parametrize("shape", [
    pytest.param(dict(TINY, vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4), id="qwen2"),
    pytest.param(QWEN35_SMALL, id="qwen35"),
])
def test_measure_runs_and_the_formula_matches_what_an_update_allocates(tmp_path, shape):
    """``--measure`` as a user runs it (one process here, a small shape given as a config.json):
    the models and an update of two micro-batches (the second holds the first's gradients), with
    and without activation checkpointing, allocate what the formula says, within a quarter. Qwen
    3.5's Gated DeltaNet blocks keep about 1.3x the bytes per token of its attention block here,
    and their backward pass recomputes the delta rule's chunk intermediates."""
    import json
    import subprocess

    (tmp_path / "config.json").write_text(json.dumps(shape))
    out = tmp_path / "measured.json"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_plan.py"), "--measure", "--shape",
                           str(tmp_path / "config.json"), "--tokens", "2048", "--micro-batches", "2",
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["measured"]
    assert r["world"] == 1 and r["micro_batches"] == 2 and len(r["phases"]) == 3
    assert abs(r["models_measured_gib"] / r["models_formula_gib"] - 1) < 0.1
    plain, ac = r["phases"][2], r["phases"][1]
    assert not plain["activation_checkpointing"] and ac["activation_checkpointing"]
    assert abs(plain["update_peak_growth_gib"] / r["formula_update_gib"]["false"] - 1) < 0.25
    assert abs(ac["update_peak_growth_gib"] / r["formula_update_gib"]["true"] - 1) < 0.25
    assert ac["update_peak_growth_gib"] < 0.7 * plain["update_peak_growth_gib"]


@pytest.mark.fresh_process
def test_a_blocks_backward_working_set_holds_one_chunk_of_what_the_delta_rule_recomputes(monkeypatch):
    """Qwen 3.5's Gated DeltaNet backward pass recomputes the delta rule's chunk intermediates its
    forward does not keep, one chunk at a time: the working set measured for such a block is less
    than those bytes (what autograd would keep through the chunks), and the block's peak while its
    backward runs (what it keeps and its working set, as with activation checkpointing) is below
    autograd-through-the-chunks' own."""
    import memory_plan as mp
    import r3.linear_attention as la
    from r3.model import ModelConfig

    mc = ModelConfig.from_hf(QWEN35_SMALL)
    linear = next(i for i in range(mc.num_hidden_layers) if mc.linear(i))
    attention = next(i for i in range(mc.num_hidden_layers) if not mc.linear(i))
    got = mp.activation_bytes(QWEN35_SMALL, 256, backward=True)
    with monkeypatch.context() as m:
        m.setattr(la._ChunkedRule, "apply", la._rule)
        through_the_chunks = mp.activation_bytes(QWEN35_SMALL, 256, backward=True)
    recomputed = through_the_chunks["blocks"][linear] - got["blocks"][linear]
    assert recomputed > 0.4 * got["blocks"][linear]
    assert 0 < got["backward"][linear] < 0.5 * recomputed
    peak = lambda r: r["blocks"][linear] + r["backward"][linear]  # noqa: E731
    assert peak(got) < 0.75 * peak(through_the_chunks)
    assert got["backward"][attention] > 0


@pytest.mark.parametrize("family,fields,kinds", [
    pytest.param("qwen35", {}, 2, id="qwen35"),
    pytest.param("gemma4", {}, 4, id="gemma4"),
    pytest.param("smollm3", {}, 2, id="smollm3"),
    pytest.param("smollm3", {"use_sliding_window": False, "sliding_window": None,
                             "layer_types": ["full_attention"] * 2}, 2, id="smollm3-nope-only"),
    pytest.param("gemma2", {}, 2, id="gemma2"),
])
def test_one_layer_of_each_kind_measures_every_layer_of_the_whole_model(family, fields, kinds):
    """The plan measures one block of each kind (Qwen 3.5's Gated DeltaNets and attention; Gemma
    4's sliding, full and shared layers; SmolLM3's NoPE layer, also where it differs from the
    others in nothing else; Gemma 2's sliding and global layers) in a model cut to those: per
    layer, the bytes the whole model's blocks keep."""
    import memory_plan as mp
    from conftest import tiny_hf_config
    from r3.model import ModelConfig

    shape = {**tiny_hf_config(family).to_dict(), **fields}
    whole = mp.activation_bytes(shape, 64, reduce=False)
    assert mp.activation_bytes(shape, 64) == whole
    assert len(set(whole["blocks"])) == kinds  # (the layers' kinds do differ)
    small, keep = mp._reduced_config(ModelConfig.from_hf(shape))
    assert small.vocab_size <= 1024 and len(keep) == kinds


def test_the_rollout_cache_holds_each_layers_own_keys_values_and_states():
    """Qwen 3.5: keys and values for its attention layer, and for each Gated DeltaNet the conv's
    and the delta rule's states (fixed, whatever the slots); Gemma 4: none for its shared layers,
    its full layers' own head size and kv heads. Counted from the config's fields by hand."""
    import memory_plan as mp
    from conftest import tiny_hf_config

    run = dict(mp.PAPER, batch_size=16)
    rows, slots = 64, 830  # (16 failures / 2 ranks x G=8; 150 + 256 + 128 + 256 + 40)
    ones = lambda n: {"blocks": [1.0] * n, "inputs": [0.0] * n, "root": 1.0}  # noqa: E731
    q = mp.plan(tiny_hf_config("qwen35").to_dict(), 2, run, False, ones(4))
    attention = 2 * 2 * 16 * 2  # k and v, 2 kv heads of 16, bf16: per slot
    conv = (4 - 1) * (2 * 2 * 8 + 4 * 12) * 2  # kernel - 1 inputs of q, k and v's channels, bf16
    delta = 4 * 8 * 12 * 4  # per value head a key dim x value dim state, fp32
    assert (q["rows_per_rank"], q["slots"]) == (rows, slots)
    assert q["parts"]["rollout KV cache"] == rows * (slots * attention + 3 * (conv + delta))
    g = mp.plan(tiny_hf_config("gemma4").to_dict(), 2, run, False, ones(5))
    sliding, full = 2 * 2 * 16 * 2, 2 * 1 * 32 * 2  # (layers 3 and 4 read layers 2's and 1's)
    assert g["parts"]["rollout KV cache"] == rows * slots * (2 * sliding + full)
    comp = mp.plan(tiny_hf_config("qwen35").to_dict(), 2, run, False, ones(4), decode="compiled")
    assert comp["parts"]["static decode cache"] == rows * (896 * attention + 3 * (conv + delta))


def test_frozen_parameters_have_no_gradients_and_no_adamw_state():
    import memory_plan as mp

    run = dict(mp.PAPER, batch_size=16)
    a = {"blocks": [1000.0] * 3, "inputs": [0.0] * 3, "root": 100.0}
    full = mp.plan(TINY, 2, run, False, a)
    frozen = mp.plan(TINY, 2, run, False, a, freeze="embed_tokens.weight,layers.0.*")
    P, V, h = full["params"], 512, 64
    block = (P - V * h - h) // 3  # (tied embeddings, the final norm)
    trained = P - V * h - block
    assert frozen["params"] == P and frozen["trained_params"] == trained
    parts, before = frozen["parts"], full["parts"]
    assert parts["AdamW state"] == 8 * trained / 2 and parts["gradients fp32 shards"] == 4 * trained / 2
    for same in ("policy fp32 shards", "reference bf16 shards", "rollout copy bf16", "activations (one micro-batch)"):
        assert parts[same] == before[same]
    root = V * h + h
    assert parts["gathered params + their grads (bf16)"] == 2 * (root + 2 * block) + 2 * (h + 2 * block)
    assert parts[mp.END_OF_BACKWARD] == 2 * root + 2 * h + 4 * h * 1.5
    with pytest.raises(Exception, match="matches no parameter"):
        mp.plan(TINY, 2, run, False, a, freeze="no_such.*")


def test_the_plan_of_a_users_config_and_bad_shapes(tmp_path):
    """``--shape`` takes a checkpoint directory (its config.json): a table for that model, its
    layers' kinds measured apart; a file r3 cannot read is one line naming it, exit 2."""
    import json
    import subprocess

    from conftest import tiny_hf_config

    model = tmp_path / "my-qwen35"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_hf_config("qwen35").to_dict()))
    script = str(ROOT / "benchmarks" / "memory_plan.py")
    out = subprocess.run([sys.executable, script, "--shape", str(model), "--world", "2", "--json",
                          str(tmp_path / "p.json"), "--freeze", "embed_tokens.weight"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| part | my-qwen35 | my-qwen35 + AC |" in out.stdout
    assert "blocks) / " in out.stdout and "parameters matching 'embed_tokens.weight' frozen" in out.stdout
    rows = json.loads((tmp_path / "p.json").read_text())["plan"]
    assert {r["model"] for r in rows} == {"my-qwen35"} and len(rows) == 4
    assert all(r["trained_params"] < r["params"] for r in rows)
    assert "shared-prefix layout" in out.stdout and rows[0]["micro_batch_targets"] == 3 * 8 * 128
    per_row = subprocess.run([sys.executable, script, "--shape", str(model), "--world", "2", "--shared-prefix", "false",
                              "--json", str(tmp_path / "q.json"), "--markdown", str(tmp_path / "q.md")],
                             capture_output=True, text=True, timeout=300)
    assert per_row.returncode == 0 and "per-row layout" in per_row.stdout, per_row.stderr[-2000:]
    md = (tmp_path / "q.md").read_text()  # (the table, how it was made and what it leaves out)
    assert md.startswith("# Memory plan") and "| part | my-qwen35 | my-qwen35 + AC |" in md
    assert f"Made with `python benchmarks/memory_plan.py --shape {model} --world 2 --shared-prefix false" in md
    assert "It does not show a GPU allocator's" in md
    assert json.loads((tmp_path / "q.json").read_text())["plan"][0]["micro_batch_targets"] == 8 * 128
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "qwen2"}))
    for shape, message in ((tmp_path / "bad.json", "bad.json: missing field"),
                           (tmp_path / "nothing", "neither one of qwen2.5-0.5b")):
        out = subprocess.run([sys.executable, script, "--shape", str(shape)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_measure_says_a_bad_shape_or_freeze_in_one_line(tmp_path):
    """``--measure`` (run_and_exit, as under torchrun) with a shape or freeze pattern r3 cannot
    use: the plan's one line and exit 2, not a traceback and exit 1."""
    import json
    import subprocess

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    script = str(ROOT / "benchmarks" / "memory_plan.py")
    for extra, message in ((["--shape", str(tmp_path / "nothing")], "neither one of qwen2.5-0.5b"),
                           (["--shape", str(tmp_path / "config.json"), "--freeze", "no_such.*"], "matches no parameter")):
        out = subprocess.run([sys.executable, script, "--measure", *extra], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_plan_names_a_model_given_as_the_current_directory(tmp_path):
    """``--shape .`` (a checkpoint directory by a name with no last part): the table and the
    JSON name the directory, not an empty string."""
    import json
    import subprocess

    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_plan.py"), "--shape", ".", "--world", "2",
                          "--json", str(tmp_path / "p.json")], cwd=model, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| part | my-model | my-model + AC |" in out.stdout
    assert {r["model"] for r in json.loads((tmp_path / "p.json").read_text())["plan"]} == {"my-model"}
