"""The training loop: rank and micro-batch invariance of the update, resume, export, NaN guard,
bad input. Tiny random models with the built-in tokenizer; a coin-flip task gives real signal."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": f"{HERE / 'helpers'}{os.pathsep}{HERE.parent}", "OMP_NUM_THREADS": "1"}
# (--cut-answers judge: the tiny models' answers run to the 6-token limit, and these tests need
# the task's verdicts on them; the default, fail, is tested in test_episode and below)
BASE = ["--task", "r3_test_tasks:CoinTask", "--task-options", "{}", "--batch-size", "2", "--group-size", "4",
        "--max-new-tokens", "6", "--dtype", "fp32", "--lr", "1e-3", "--micro-batch-size", "3",
        "--warmup-steps", "0", "--cut-answers", "judge"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, builtin):
    from conftest import make_tiny_hf

    d = tmp_path_factory.mktemp("tinytrain") / "model"
    make_tiny_hf(d, "llama", vocab_size=49152, num_hidden_layers=2)
    builtin[1].save_pretrained(str(d))
    return d


def run_train(args, nproc=None, check=True):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc else [sys.executable]) + ["-m", "r3.train"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def load_weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


UPDATE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import torch.distributed as dist
    from r3 import batch as B
    from r3 import train as T
    from r3.checkpoint import load
    from r3.config import TrainConfig

    # Each run in argv[3] (JSON: name, micro-batch size, aggregation, shared prefix, activation
    # checkpointing) updates fresh copies of the model in this one process group.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    from torch.distributed.tensor import DTensor
    model_dir, out_dir, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    d = T.init_distributed()
    for name, micro, agg, shared, recompute in runs:
        cfg = TrainConfig(model=model_dir, dtype="fp32", micro_batch_size=micro, agg=agg, lr=1e-3, beta=0.05,
                          update_epochs=2, max_reflection_tokens=8).validate()
        policy, _ = load(model_dir, tokenizer=False)
        reference, _ = load(model_dir, tokenizer=False)
        with torch.no_grad():  # a reference that differs, so the KL term has a gradient
            for p in reference.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        policy.activation_checkpointing = recompute
        T.shard(policy, d, torch.float32); T.shard(reference, d, torch.float32)
        # SGD: the update is linear in the gradient, so the comparison sees the gradient itself (Adam
        # would blow last-bit differences of near-zero gradients up to full-size steps).
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        # 6 sequences of different lengths and reflection spans, fixed advantages; rows 0-2 and 3-5
        # share their tokens before the span (two groups, prefix lengths 4 and 6)
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (9, 14, 7, 12, 10, 16)]
        for rows in ((0, 1, 2), (3, 4, 5)):
            for b in rows[1:]:
                seqs[b][: 4 if rows[0] == 0 else 6] = seqs[rows[0]][: 4 if rows[0] == 0 else 6]
        spans = [(4, 8), (4, 14), (4, 7), (6, 9), (6, 10), (6, 16)]
        adv = [1.0, -0.5, 0.25, -1.0, 0.75, 0.0]
        per = len(seqs) // d.world
        mine = slice(d.rank * per, (d.rank + 1) * per)
        mbs = B.make_micro_batches(seqs[mine], spans[mine], adv[mine], micro, 0, d.device, shared_prefix=shared)
        n_mb = T.all_max(len(mbs), d)
        padded = mbs + [T.dummy_micro_batch(d.device) for _ in range(n_mb - len(mbs))]
        T.score_micro_batches(padded, reference, policy, 1.0)
        # the frozen reference is all sharded again (FSDP2 would keep its root gathered)
        assert all(isinstance(p, DTensor) for p in reference.parameters())
        stats = T.update(policy, opt, padded, len(mbs), cfg, d)
        sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        loss = T.all_sum([stats["loss"]], d)[0]
        if d.rank == 0:
            torch.save({"sd": sd, "loss": loss, "skipped": stats["skipped"]}, f"{out_dir}/{name}.pt")
    dist.barrier()  # gloo can hang if one rank tears down while another is still in a collective
    dist.destroy_process_group()
    from r3.distributed import _exit_hard
    _exit_hard(0)  # gloo threads can abort the interpreter's teardown
    """
)


def test_update_same_on_1_and_2_ranks_and_any_micro_batching(tiny_model, tmp_path):
    """Both loss aggregations: the update on one rank with 6, 1 or 2 sequences per micro-batch, on
    two ranks, with shared-prefix micro-batches and with activation checkpointing is the same
    update (the same weights after it, the same loss)."""
    script = tmp_path / "upd.py"
    script.write_text(UPDATE_SCRIPT)
    runs = {1: [], 2: []}  # ranks: [name, micro-batch size, aggregation, shared prefix, recompute]
    for agg in ("token-mean", "seq-mean-token-mean"):
        for name, nproc, micro, shared, recompute in (
                ("r1m6", 1, 6, 0, 0), ("r1m1", 1, 1, 0, 0), ("r2m2", 2, 2, 0, 0),  # per row
                ("r1m6p", 1, 6, 1, 0), ("r1m2p", 1, 2, 1, 0), ("r2m3p", 2, 3, 1, 0),  # shared prefix
                ("r1m2a", 1, 2, 0, 1), ("r2m3pa", 2, 3, 1, 1)):  # activation checkpointing
            runs[nproc].append([f"{agg}-{name}", micro, agg, bool(shared), bool(recompute)])
    for nproc, todo in runs.items():
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
               if nproc > 1 else [sys.executable]) + [str(script), str(tiny_model), str(tmp_path), json.dumps(todo)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from r3.checkpoint import load

    start, _ = load(tiny_model, tokenizer=False)
    losses = {}
    for agg in ("token-mean", "seq-mean-token-mean"):
        results = {p.stem.split("-")[-1]: torch.load(p) for p in tmp_path.glob(f"{agg}-*.pt")}
        assert len(results) == 8, sorted(results)
        ref = results["r1m6"]
        moved = max((ref["sd"][k] - v).abs().max().item() for k, v in start.state_dict().items())
        assert moved > 1e-4  # the update did something
        assert not ref["skipped"]
        for name in ("r1m1", "r2m2", "r1m6p", "r1m2p", "r2m3p", "r1m2a", "r2m3pa"):
            other = results[name]
            assert other["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), (agg, name)
            for k, v in ref["sd"].items():
                assert torch.allclose(other["sd"][k], v, atol=2e-6, rtol=1e-5), (agg, name, k)
        losses[agg] = ref["loss"]
    assert losses["token-mean"] != pytest.approx(losses["seq-mean-token-mean"])  # two aggregations ran


def _parts_of(name):
    for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
        if fused in name:
            return [name.replace(fused, part) for part in parts]
    return [name]


def _unfuse_checkpoint(path, model_dir):
    """Rewrite a training checkpoint in the layout of r3 before it fused q/k/v and gate/up:
    separate projections in the model and in AdamW's state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from r3.model import ModelConfig, split_for_checkpoint

    cfg = ModelConfig.from_hf(json.loads((Path(model_dir) / "config.json").read_text()))
    whole = Path(str(path) + ".pt")
    dcp_to_torch_save(str(path), str(whole))
    state = torch.load(str(whole), weights_only=False)
    whole.unlink()
    model = split_for_checkpoint(cfg, state["model"])
    assert "layers.0.self_attn.q_proj.weight" in model and "layers.0.self_attn.qkv_proj.weight" not in model
    optim = state["optim"]
    new = {}
    for name, st in optim["state"].items():
        moments = {k: split_for_checkpoint(cfg, {name: v}) for k, v in st.items() if k != "step"}
        for part in moments["exp_avg"]:
            new[part] = {"step": st["step"].clone(), **{k: m[part] for k, m in moments.items()}}
    optim["state"] = new
    for group in optim["param_groups"]:
        group["params"] = [p for n in group["params"] for p in _parts_of(n)]
    trainer = (Path(path) / "trainer_state.json").read_text()
    shutil.rmtree(path)
    dcp.save({"model": model, "optim": optim}, checkpoint_id=str(path), no_dist=True)
    (Path(path) / "trainer_state.json").write_text(trainer)


def test_train_resume_equals_uninterrupted_and_exports(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from r3.checkpoint import load

    full, part = tmp_path / "full", tmp_path / "part"
    args = BASE + ["--model", str(tiny_model), "--save-every", "2", "--eval-n", "8", "--eval-temperature", "1.0"]
    run_train(args + ["--out", str(full), "--max-steps", "4"])
    run_train(args + ["--out", str(part), "--max-steps", "4", "--stop-after", "2"])
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step_000002"]
    # as an r3 that held q/k/v and gate/up apart wrote it: the resume rewrites it, exactly; and
    # as one that did not record the recent first-attempt success: read from metrics.jsonl
    _unfuse_checkpoint(part / "checkpoints" / "step_000002", tiny_model)
    state_file = part / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("recent_first_success") == [r["first_try_success"] for r in read_metrics(part)]
    state_file.write_text(json.dumps(state))
    proc = run_train(args + ["--out", str(part), "--max-steps", "4"])
    assert "resumed from" in proc.stdout and "rewriting" in proc.stdout and "warning" not in proc.stderr
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ("loss", "kl", "retry_success", "groups_with_signal", "reflection_tokens", "grad_norm", "lr")
    for ra, rb in zip(a, b):
        for k in keys:  # (kl is None in a step that trains no token)
            assert (ra[k] is None and rb[k] is None) or ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    assert sum(r["groups_with_signal"] for r in a) > 0 and any(r["grad_norm"] > 0 for r in a)
    # each step's first attempts: 2 per failure needed, or more (at most G = 4) after steps that mostly passed
    # (the coin passes about half), from the logged success, restored on resume
    from r3.config import TrainConfig
    from r3.train import candidates_per_failure

    position, recent = 0, []
    for ra, rb in zip(a, b):
        position += math.ceil(2 * candidates_per_failure(TrainConfig(group_size=4), recent))
        assert ra["data_position"] == rb["data_position"] == position, (ra["step"], recent)
        recent.append(ra["first_try_success"])
    assert position > 4 * 4, recent  # (the pool grew in some step, so the rule above was exercised)
    for run in (full, part):  # (checkpointed with the data position: what the next resume reads)
        assert json.loads((run / "checkpoints" / "step_000004" / "trainer_state.json").read_text())[
            "recent_first_success"] == recent, run
    for r in a:  # fp32: the rollout copy and the trainer agree on every trained token's log-prob
        if r["trained_tokens"]:
            assert 0 <= r["logp_diff_mean"] <= r["logp_diff_max"] < 1e-3, r
        else:
            assert r["logp_diff_mean"] is None and r["logp_diff_max"] is None
    for k in ("step", "loss", "kl", "retry_success", "first_try_success", "groups_with_signal",
              "reflection_tokens", "step_time_s"):
        assert k in a[0]
    for r in a:  # MFU of the training passes, in the steps that train
        assert r["peak_tflops"] > 0 and (r["mfu"] is None) == (r["trained_tokens"] == 0), r
        assert r["mfu"] is None or 0 < r["mfu"] < math.inf
    ea = [json.loads(x) for x in (full / "eval.jsonl").read_text().splitlines()]
    eb = [json.loads(x) for x in (part / "eval.jsonl").read_text().splitlines()]
    assert ea == eb and [r["step"] for r in ea] == [0, 4] and ea[0]["n"] == 8
    # the evaluation before training is the base model's, at eval_temperature (not the rollouts'
    # 0.7), on the task's test split, first and second attempt apart: recomputed here
    from r3.chat import ChatFormat
    from r3.heldout import evaluate_examples
    from r3.tasks import examples_of
    from r3.tasks import get as get_task

    sys.path.insert(0, str(HERE / "helpers"))
    task = get_task("r3_test_tasks:CoinTask")
    base_model, base_tok = load(tiny_model, dtype=torch.float32)
    direct = evaluate_examples(base_model, base_tok, task, examples_of(task, "test", n=8, seed=0),
                               TrainConfig(max_new_tokens=6, cut_answers="judge").validate().sampling(1.0), seed=17, batch_size=32,
                               chat=ChatFormat(base_tok))
    assert (ea[0]["first_attempt_accuracy"], ea[0]["second_attempt_accuracy"]) == \
        (direct["first_attempt_accuracy"], direct["second_attempt_accuracy"])
    assert direct["first_attempt_accuracy"] < direct["second_attempt_accuracy"]  # (so the two cannot be swapped)
    # fresh first attempts: their success is logged; the KL is taken against the frozen reference
    assert all(r["first_try_success"] is not None for r in a)
    assert any(r["kl"] is not None and r["kl"] > 1e-6 for r in a[1:]), [r["kl"] for r in a]
    wa, wb = load_weights(full / "export"), load_weights(part / "export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from r3.files import current_umask

    mask = current_umask()  # the export and the logs are ordinary files, not private temp files
    assert (full / "export").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (full / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(full.glob(".export*"))
    # the export loads in transformers and in r3 with the same logits, and differs from the start
    start = load_weights(tiny_model)
    assert any(not torch.equal(wa[k], start[k]) for k in wa)
    hf = AutoModelForCausalLM.from_pretrained(str(full / "export")).eval()
    ours, tok = load(full / "export")
    ids = torch.tensor([tok("hello there, how are you")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-4
    assert (full / "config.json").is_file()
    # samples.jsonl: every rewarded retry of every step (and nothing repeated after the resume)
    sa = [json.loads(x) for x in (full / "samples.jsonl").read_text().splitlines()]
    sb = [json.loads(x) for x in (part / "samples.jsonl").read_text().splitlines()]
    assert sa == sb
    for row in a:
        rewarded = round(row["retry_success"] * row["groups"] * 4)
        logged = [s for s in sa if s["step"] == row["step"]]
        assert sum(s["reward"] == 1.0 for s in logged) == rewarded
        assert sum(s["reward"] == 0.0 for s in logged) <= 2
        assert all(s["reason"] == "coin" for s in logged)  # (the task's own reason, pass or fail)
    assert sum(s["reward"] == 1.0 for s in sa) > 0
    # the run's own evaluation (base model and export side by side; by default into the run,
    # where r3.report reads it) and its audit
    ev = full / "evaluation.json"
    proc = subprocess.run([sys.executable, "-m", "r3.evaluate", "--run", str(full), "--n", "4", "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(ev.read_text())
    assert [m["model"] for m in data["models"]] == [str(tiny_model), str(full / "export")]
    assert data["run"] == str(full) and data["task"] == "r3_test_tasks:CoinTask" and data["task_options"] == {}
    assert data["cwd"] == os.getcwd()  # (what a relative --run is relative to: r3.report reads it so)
    assert data["settings"]["max_attempt_tokens"] == 6 and data["settings"]["dtype"] == "fp32"
    assert data["paired"][0]["first_attempt"]["n"] == 4 and data["n"] == 4
    proc = subprocess.run([sys.executable, "-m", "r3.audit", str(full)], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0 and "independent re-check: none for task" in proc.stdout, proc.stderr


def test_function_calling_from_the_command_line(tiny_model, tmp_path):
    """--task function_calling gets its own default options (none of Countdown's), with the
    synthetic data and with data_path= an xlam-format file; evaluate --run and failures follow."""
    from r3.tasks.function_calling import write_synthetic

    data = tmp_path / "xlam.json"
    write_synthetic(str(data), 30)
    common = [a for a in BASE if a not in ("r3_test_tasks:CoinTask", "--task", "--task-options", "{}")]
    for name, options in (("synthetic", ["--task-option", "synthetic_size=30"]),
                          ("file", ["--task-option", f"data_path={data}"])):
        out = tmp_path / name
        proc = run_train(common + ["--task", "function_calling", *options, "--model", str(tiny_model),
                                   "--out", str(out), "--max-steps", "1"])
        assert "task 'function_calling' with options" in proc.stdout
        # generated data is said to be so; a real file is not
        assert ("note: task 'function_calling' has no data_path" in proc.stdout) == (name == "synthetic")
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["task"] == "function_calling" and "difficulty" not in cfg["task_options"]
        assert [r["step"] for r in read_metrics(out)] == [1]
    ev = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "r3.evaluate", "--run", str(tmp_path / "file"), "--n", "2",
                           "--out", str(ev), "--quiet"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(ev.read_text())["task_options"] == {"data_path": str(data)}
    fails = tmp_path / "failures.jsonl"
    proc = subprocess.run([sys.executable, "-m", "r3.failures", "--model", str(tiny_model), "--task", "function_calling",
                           "--task-option", f"data_path={data}", "--n", "2", "--samples", "2", "--max-new-tokens", "8",
                           "--dtype", "fp32", "--out", str(fails)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fails.is_file()


@pytest.mark.parametrize("task, message", [
    ("RaisingTask", "error: the task's verifier failed on all 12 completions in step 1 (first: KeyError: 'answr')"),
    ("TupleVerifyTask", "error: the task's verifier failed on all 12 completions in step 1 (first: tuple-verify: "
                        "verify() returned tuple ("),
])
def test_a_broken_verifier_stops_training_in_one_line(tiny_model, tmp_path, task, message):
    """A verifier that raises on every completion, or a verify() that returns a (bool, reason)
    tuple (truthy: it paid every wrong retry), ends the run with one line and a non-zero exit."""
    args = [a if a != "r3_test_tasks:CoinTask" else f"r3_test_tasks:{task}" for a in BASE]
    proc = run_train(args + ["--model", str(tiny_model), "--out", str(tmp_path / "run"), "--max-steps", "1"],
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_plugin_whose_messages_are_not_messages_is_named_not_the_model(tiny_model, tmp_path):
    """A plug-in's messages() returning a string was refused with the model's name in front ("error:
    MODEL: chat messages must be ..."), as a chat template's own problem is; the task is named."""
    args = [a if a != "r3_test_tasks:CoinTask" else "r3_test_tasks:StringMessagesTask" for a in BASE]
    proc = run_train(args + ["--model", str(tiny_model), "--out", str(tmp_path / "run"), "--max-steps", "1"],
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("error: task r3_test_tasks:StringMessagesTask: chat messages must be a non-empty list of "
            "{'role': str, 'content': str} objects (what a task's messages() returns), got 'Say something about "
            "item") in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "config.json").exists()


def test_nan_guard_skips_the_step(tiny_model, tmp_path):
    """A non-finite loss never reaches the weights (nor a checkpoint)."""
    from r3 import batch as B
    from r3 import train as T
    from r3.checkpoint import load
    from r3.config import TrainConfig

    d = T.init_distributed()
    cfg = TrainConfig(model=str(tiny_model), dtype="fp32", lr=1e-2).validate()
    policy, _ = load(tiny_model, tokenizer=False)
    T.shard(policy, d, torch.float32)
    before = {k: v.full_tensor().clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    mbs = B.make_micro_batches([[5, 6, 7, 8, 9]], [(2, 5)], [float("nan")], 4, 0, d.device)
    stats = T.update(policy, opt, mbs, 1, cfg, d)
    assert stats["skipped"]
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k].full_tensor()) for k in before)
    mbs = B.make_micro_batches([[5, 6, 7, 8, 9]], [(2, 5)], [1.0], 4, 0, d.device)
    stats = T.update(policy, opt, mbs, 1, cfg, d)
    assert not stats["skipped"]
    assert any(not torch.equal(before[k], v.full_tensor()) for k, v in policy.state_dict().items())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bogus-key", "1"], "unknown flag '--bogus-key'"),
        (["--task", "no_such_task"], "no_such_task"),
        (["--group-size", "1"], "'group_size' must be >= 2"),
        (["--lr", "abc"], "bad value 'abc' for 'lr'"),
        (["--agg", "mean"], "'agg' must be"),
        (["--failures", "/no/such/failures.jsonl"], "failure dataset '/no/such/failures.jsonl' does not exist"),
        (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
        (["--adam-betas", "[0.9, 1.5]"], "'adam_betas' must be two numbers in [0, 1), got [0.9, 1.5]"),
        (["--max-reflection-tokens", "100000"], "token limits attempt 48 + reflection 100000 + retry 48 = 100096, "
                                                "more than the 8192 positions of smollm2-135m"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, extra, message):
    proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1"] + extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], proc.stderr
    assert not (tmp_path / "o").exists()  # (so the corrected command is not refused as another run's)


@pytest.mark.parametrize("plugin,flags,message", [
    ("""
        class NoTestTask(CoinTask):
            def examples(self, split="train", n=None, seed=0):
                return [] if split == "test" else super().examples(split, n, seed)
        """, ["--eval-n", "2"], "error: task 'notest_task:NoTestTask': no test examples for --eval-n 2"),
    ("""
        from r3.errors import R3Error


        class NoTestTask(CoinTask):  # a test row the task refuses (the run is not held-out evaluated)
            def examples(self, split="train", n=None, seed=0):
                rows = super().examples(split, n, seed)
                return rows + [{"id": "bad"}] if split == "test" else rows

            def check_example(self, where, example):
                if "word" not in example:
                    raise R3Error(f"{where}: an example needs a 'word'")
        """, [], "error: task 'coin': test example 65 (id 'bad'): an example needs a 'word'"),
])
def test_a_test_split_that_is_empty_for_eval_n_or_bad_is_one_line_before_anything_is_written(tmp_path, plugin, flags,
                                                                                            message):
    """A task whose test split is empty (a plug-in that reads a train file only): with --eval-n
    the run logged first- and second-attempt accuracy 0.000 over n=0 queries at every
    evaluation, as if measured. A bad test row, checked only with --eval-n, surfaced in
    r3.evaluate --run after training."""
    (tmp_path / "notest_task.py").write_text("from r3_test_tasks import CoinTask\n" + textwrap.dedent(plugin))
    args = [a if a != "r3_test_tasks:CoinTask" else "notest_task:NoTestTask" for a in BASE]
    proc = subprocess.run([sys.executable, "-m", "r3.train", *args, "--out", str(tmp_path / "o"), "--max-steps", "1",
                           *flags], capture_output=True, text=True, timeout=600,
                          env={**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV['PYTHONPATH']}"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == [message], err
    assert not (tmp_path / "o").exists()


def test_config_values_and_files_are_checked_before_anything_runs(tmp_path, monkeypatch):
    """Values the optimizer or schedule would refuse (or silently misuse) are config errors, a
    config file must be one r3 reads, and a flag followed by another flag has no value."""
    from r3.config import TrainConfig, parse_args
    from r3.errors import R3Error

    for betas in ("[0.9, 1.5]", "[-0.1, 0.9]", "[0.9, 1]", "[NaN, 0.9]"):
        with pytest.raises(R3Error, match=r"'adam_betas' must be two numbers in \[0, 1\)"):
            parse_args(["--adam-betas", betas])
    assert parse_args(["--adam-betas", "[0, 0.95]"]).adam_betas == (0.0, 0.95)
    with pytest.raises(R3Error, match="'min_lr_ratio' must be <= 1"):
        parse_args(["--min-lr-ratio", "2"])
    assert parse_args(["--min-lr-ratio", "1"]).min_lr_ratio == 1
    with pytest.raises(R3Error, match=f"config file '{tmp_path}' is a directory"):
        parse_args(["--config", str(tmp_path)])
    (tmp_path / "c.toml").write_text("lr = 1e-6\n")
    with pytest.raises(R3Error, match="expected a .yaml, .yml or .json file"):
        parse_args(["--config", str(tmp_path / "c.toml")])
    with pytest.raises(R3Error, match="flag '--config' needs a value"):
        parse_args(["--config", "--out", "x"])
    with pytest.raises(R3Error, match="flag '--lr' needs a value"):
        parse_args(["--lr", "--task-option=max_num=9"])
    assert parse_args(["--out", "--x"]).out == "--x"  # (not a flag: a value)
    for argv in (["--bogus"], ["--out", "x", "--resume"]):  # (an unknown last flag: unknown, not valueless)
        with pytest.raises(R3Error, match=f"unknown flag '{argv[-1]}'"):
            parse_args(argv)
    for value in ("inf", "nan"):
        with pytest.raises(R3Error, match=f"'lr' must be a finite number > 0, got {value}"):
            parse_args(["--lr", value])

    # a failures file is recorded by its absolute path, and a run that recorded it relative resumes
    (tmp_path / "f.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["--failures", "f.jsonl"])
    assert cfg.failures == str(tmp_path / "f.jsonl")
    assert cfg.incompatible_with({**cfg.to_dict(), "failures": "f.jsonl"}) == []
    assert cfg.incompatible_with({**cfg.to_dict(), "failures": "g.jsonl"}) == ["failures"]
    assert TrainConfig(failures="/no/such.jsonl").validate().failures == "/no/such.jsonl"


def test_out_and_failures_from_a_config_file_expand_the_home_directory(tmp_path, monkeypatch):
    """A config file's values pass no shell: 'out: ~/runs/x' made a directory named '~' in the
    current directory (the run's last line said '~/runs/x', as if in the home directory), while
    'model: ~/...' was expanded. An empty --out wrote the run into the current directory."""
    from r3.config import parse_args
    from r3.errors import R3Error

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "f.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text("out: ~/runs/x\nfailures: ~/f.jsonl\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.out, cfg.failures) == (str(tmp_path / "runs" / "x"), str(tmp_path / "f.jsonl"))
    with pytest.raises(R3Error, match="config: 'out' cannot be empty"):
        parse_args(["--out", ""])


@pytest.mark.parametrize("example, field", [({"target": 5}, "missing field 'nums'"),
                                            ({"nums": [1, "2"], "target": 3}, "field 'nums' must hold"),
                                            ({"query": "q", "tools": "[]", "answers": "[]"}, "missing field 'target'")])
def test_a_failure_record_from_another_task_is_one_line_before_anything_is_written(tmp_path, example, field):
    fails = tmp_path / "f.jsonl"
    good = {"example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [5, 6]}
    fails.write_text(json.dumps(good) + "\n" + json.dumps({"example": example, "attempt_tokens": [5, 6]}) + "\n")
    proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", "--failures", str(fails)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and f"{fails}: record 2: 'example' (not a countdown-tiny example): {field}" in err[0], err
    assert not (tmp_path / "o").exists()


def test_failure_attempts_in_another_models_token_ids_are_one_line_before_anything_is_written(tmp_path):
    """Attempts sampled by a model with a larger vocabulary (Qwen's 151k ids, trained on the
    built-in model's 49k): the run loaded its models, wrote its config and stopped in the first
    rollout with "prompt 0 has token id 151000 outside [0, 49152)", naming neither file nor record."""
    fails = tmp_path / "f.jsonl"
    good = {"example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [5, 6]}
    fails.write_text(json.dumps(good) + "\n" + json.dumps({**good, "attempt_tokens": [5, 151000]}) + "\n")
    proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", "--failures", str(fails)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == [f"error: {fails}: record 2: 'attempt_tokens' holds token id 151000, past the 49152 ids of "
                   "smollm2-135m (made with another model?)"], err
    assert not (tmp_path / "o").exists()


def _failures_made_for(path, task, options=None, **settings):
    """A failure file as r3.failures writes it: records plus the .done header of its settings."""
    from r3.failure_data import FailureFile

    path.write_text(json.dumps({"key": "k", "example": {"nums": [1, 2], "target": 3}, "attempt_tokens": [5, 6]}) + "\n")
    FailureFile(path).open({"model": "smollm2-135m", "task": task, "task_options": options or {}, "split": "train",
                            **settings})
    return path


def test_failures_made_for_another_task_are_refused_before_anything_is_written(tmp_path):
    """The README's workflow made failures with --task countdown, then trained with the default
    task (2-number Countdown with + and -): the run judged 3-4-number records with the wrong rule.
    The file's recorded task must be the run's."""
    fails = _failures_made_for(tmp_path / "f.jsonl", "countdown")
    proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", "--failures", str(fails)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and f"{fails} was made for task 'countdown' with options {{}}, not this run's task" in err[0]
    assert "answer_tags True there, False here" in err[0] and "pass the same --task" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["empty", "directory"])
def test_an_empty_failures_file_is_refused_before_anything_is_written(tmp_path, kind):
    """An empty file (every query solved) was refused only after the models loaded, by which time
    config.json was written: the corrected retry with the same --out was then refused too."""
    fails = tmp_path / "f.jsonl"
    fails.write_text("") if kind == "empty" else fails.mkdir()
    proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", "--failures", str(fails)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    want = "no failure records to train on" if kind == "empty" else "is a directory, not a file"
    assert len(err) == 1 and str(fails) in err[0] and want in err[0], err
    assert not (tmp_path / "o").exists()


def test_failures_check_skips_a_header_without_a_task_and_refuses_another_class_of_the_same_name(tmp_path):
    """A .done header whose settings name no task (hand-edited, or an early version's) says
    nothing to check (it failed with a KeyError). A plug-in class that calls itself by a built-in
    task's name, with the same options, is still another task (another verifier): refused."""
    from r3.errors import R3Error
    from r3.failure_data import check_made_for
    from r3.tasks import get
    from r3.tasks.countdown import CountdownTask

    fails = tmp_path / "f.jsonl"
    fails.write_text("{}\n")
    (tmp_path / "f.jsonl.done").write_text(json.dumps({"r3_failures": 1, "settings": {"model": "m"}}) + "\n")
    check_made_for(fails, get("countdown"), "m")

    class LookAlike(CountdownTask):
        pass

    made = _failures_made_for(tmp_path / "g.jsonl", "countdown")
    check_made_for(made, CountdownTask(), "smollm2-135m")
    with pytest.raises(R3Error, match=r"task 'countdown' \(r3.tasks.countdown.CountdownTask\) there, 'countdown' \(.*LookAlike\) here"):
        check_made_for(made, LookAlike(), "smollm2-135m")


def test_a_failures_file_that_failed_cut_attempts_is_said_when_the_run_judges_them(tmp_path, capsys):
    """r3.failures --cut-answers fail stores attempts the token limit cut off as failures, also
    ones the verifier passes as they stand: a run that judges cut answers reflects on them as
    failed, which is said (in training's start, before the models load). A file made under
    "judge" (or before the option) holds failures under either rule: nothing to say."""
    from r3.failure_data import check_made_for
    from r3.tasks import get

    tiny = get("countdown-tiny")
    failing = _failures_made_for(tmp_path / "f.jsonl", "countdown-tiny", cut_answers="fail")
    check_made_for(failing, tiny, "smollm2-135m", cut_answers="judge")
    err = capsys.readouterr().err
    assert f"warning: {failing} was made with --cut-answers fail" in err and "train with --cut-answers fail" in err
    check_made_for(failing, tiny, "smollm2-135m")  # (the default: fail)
    judged = _failures_made_for(tmp_path / "j.jsonl", "countdown-tiny", cut_answers="judge")
    check_made_for(judged, tiny, "smollm2-135m", cut_answers="fail")
    check_made_for(_failures_made_for(tmp_path / "o.jsonl", "countdown-tiny"), tiny, "smollm2-135m", cut_answers="fail")
    assert capsys.readouterr().err == ""
    # r3.train passes its rule (a record that is no task example stops it right after the check)
    failing.write_text(json.dumps({"key": "k", "example": {"x": 1}, "attempt_tokens": [5]}) + "\n")
    for rule, said in (("judge", True), ("fail", False)):
        proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", "--failures", str(failing),
                          "--cut-answers", rule], check=False)
        assert proc.returncode == 2 and "record 1: 'example'" in proc.stderr, proc.stderr[-2000:]
        assert ("was made with --cut-answers fail" in proc.stderr) == said, (rule, proc.stderr[-2000:])


def test_failures_check_compares_chat_template_options_as_the_template_gets_them(tmp_path, capsys):
    """enable_thinking=false is r3's default: a file sampled with no chat template options and a
    run that spells the default out render the same conversation, so training goes on."""
    from r3.failure_data import check_made_for
    from r3.tasks import get

    made = _failures_made_for(tmp_path / "f.jsonl", "countdown-tiny")
    check_made_for(made, get("countdown-tiny"), "smollm2-135m", {"enable_thinking": False})
    spelled = _failures_made_for(tmp_path / "g.jsonl", "countdown-tiny", chat_template_options={"enable_thinking": False})
    check_made_for(spelled, get("countdown-tiny"), "smollm2-135m")
    assert capsys.readouterr().err == ""


def test_a_failures_file_that_recorded_no_split_is_taken_as_the_train_split(tmp_path, capsys):
    """r3.failures recorded no split before it had --split, when it sampled the train split only:
    no warning about "the None split"."""
    from r3.failure_data import check_made_for
    from r3.tasks import get

    fails = tmp_path / "f.jsonl"
    fails.write_text("{}\n")
    (tmp_path / "f.jsonl.done").write_text(json.dumps({"r3_failures": 1, "settings": {
        "model": "smollm2-135m", "task": "countdown-tiny", "task_options": {}}}) + "\n")
    check_made_for(fails, get("countdown-tiny"), "smollm2-135m")
    assert capsys.readouterr().err == ""


def test_failures_task_check_compares_the_options_in_effect(tmp_path, capsys):
    from r3.errors import R3Error
    from r3.failure_data import check_made_for
    from r3.tasks import get, resolve

    tiny = get("countdown-tiny")
    # the preset, and the base task with the preset's options spelled out: the same task
    check_made_for(_failures_made_for(tmp_path / "a.jsonl", "countdown-tiny"), tiny, "smollm2-135m")
    base, options = resolve("countdown-tiny")
    check_made_for(_failures_made_for(tmp_path / "b.jsonl", base, options), tiny, "smollm2-135m")
    assert capsys.readouterr().err == ""
    with pytest.raises(R3Error, match="options differ: max_num 30 there, 50 here"):
        check_made_for(tmp_path / "a.jsonl", get("countdown-tiny", max_num=50), "smollm2-135m")
    with pytest.raises(R3Error, match=r"task 'countdown' \(r3.tasks.countdown.CountdownTask\) there, "
                                      r"'function_calling' \(r3.tasks.function_calling.FunctionCallingTask\) here"):
        check_made_for(tmp_path / "a.jsonl", get("function_calling"), "smollm2-135m")
    # another model's attempts, or test-split queries: allowed, said
    check_made_for(_failures_made_for(tmp_path / "c.jsonl", "countdown-tiny"), tiny, "/models/other")
    assert "holds the first attempts of model 'smollm2-135m'; this run trains '/models/other'" in capsys.readouterr().err
    test_split = tmp_path / "d.jsonl"
    _failures_made_for(test_split, "countdown-tiny")
    done = test_split.with_name("d.jsonl.done")
    done.write_text(done.read_text().replace('"split": "train"', '"split": "test"'))
    check_made_for(test_split, tiny, "smollm2-135m")
    assert "holds queries of the 'test' split" in capsys.readouterr().err
    # the same model named by its path is the same model
    from r3.checkpoint import resolve

    check_made_for(tmp_path / "a.jsonl", tiny, str(resolve("smollm2-135m")[1]))
    assert capsys.readouterr().err == ""
    # a hand-made file (no .done header) is checked record by record only
    (tmp_path / "e.jsonl").write_text("{}\n")
    check_made_for(tmp_path / "e.jsonl", get("function_calling"), "smollm2-135m")
    # attempts sampled under other chat template options continue another conversation
    thinking = {"enable_thinking": True}
    with pytest.raises(R3Error, match=r"sampled with chat template options \{\}, not this run's \{'enable_thinking': True\}"):
        check_made_for(tmp_path / "a.jsonl", tiny, "smollm2-135m", thinking)
    made = _failures_made_for(tmp_path / "g.jsonl", "countdown-tiny", chat_template_options=thinking)
    check_made_for(made, tiny, "smollm2-135m", thinking)
    with pytest.raises(R3Error, match="sampled with chat template options"):
        check_made_for(made, tiny, "smollm2-135m")
    from r3.failure_data import FailureFile

    with pytest.raises(R3Error, match="holds chat_template_options"):  # adding to it with others
        FailureFile(made).open({"model": "smollm2-135m", "task": "countdown-tiny", "task_options": {}, "split": "train",
                                "chat_template_options": {}})
    # attempts that ran past the task's stop strings (a file of an older r3.failures): said
    tagged = get("countdown", difficulty="easy")
    old = _failures_made_for(tmp_path / "h.jsonl", "countdown", {"difficulty": "easy"})
    check_made_for(old, tagged, "smollm2-135m")
    assert ("h.jsonl's attempts were not ended at this task's stop strings ['</answer>'] (made with [])"
            in capsys.readouterr().err)
    new = _failures_made_for(tmp_path / "i.jsonl", "countdown", {"difficulty": "easy"},
                             attempt_stop_strings=["</answer>"])
    check_made_for(new, tagged, "smollm2-135m")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("which", ["data_path", "test_data_path"])
def test_a_bad_task_data_file_is_one_line_before_anything_is_written(tmp_path, which):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n")
    bad.write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n" + json.dumps({"nums": [4, 5]}) + "\n")
    paths = {"data_path": bad, "test_data_path": good} if which == "data_path" else {"data_path": good, "test_data_path": bad}
    opts = ["--task", "countdown"] + [x for k, v in paths.items() for x in ("--task-option", f"{k}={v}")]
    proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", "--eval-n", "4"] + opts, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and f"{bad}" in err[0] and "line 2" in err[0] and "missing field 'target'" in err[0], err
    assert not (tmp_path / "o").exists()


def test_incompatible_out_dir_is_refused_and_untouched(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = {"model": "something-else", "task": "countdown"}
    (out / "config.json").write_text(json.dumps(saved))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_train(BASE + ["--model", str(tiny_model), "--out", str(out), "--max-steps", "1"], check=False)
    assert proc.returncode == 2 and "holds a run with a different config" in proc.stderr
    # each difference with both values (the message named only the fields)
    assert f"model: 'something-else' there, '{tiny_model}' here" in proc.stderr
    assert "task: 'countdown' there, 'r3_test_tasks:CoinTask' here" in proc.stderr
    assert json.loads((out / "config.json").read_text()) == saved
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'



@pytest.mark.parametrize("name, text, where", [
    ("c.yaml", "lr: [1, 2\nbatch_size: 8\n",
     "line 2, column 11: expected ',' or ']', but got ':' (while parsing a flow sequence at line 1, column 5)"),
    ("c.json", '{"lr": 1,\n "x": }', "Expecting value: line 2 column 7"),
])
def test_a_config_file_that_does_not_parse_names_the_line(tmp_path, name, text, where):
    from r3.config import parse_args
    from r3.errors import R3Error

    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(R3Error) as e:
        parse_args(["--config", str(f)])
    assert str(e.value).startswith(f"{f}: cannot parse ({where}") and "\n" not in str(e.value)

def test_config_file_and_overrides(tmp_path):
    from r3.config import TrainConfig, parse_args

    f = tmp_path / "c.yaml"
    f.write_text("group_size: 6\nlr: 1.0e-6\ntask_options:\n  difficulty: standard\n")
    cfg = parse_args(["--config", str(f), "--lr", "3e-6", "--max-new-tokens", "32"])
    assert cfg.group_size == 6 and cfg.lr == 3e-6 and cfg.task_options == {"difficulty": "standard"}
    assert cfg.max_attempt_tokens == cfg.max_reflection_tokens == cfg.max_retry_tokens == 32
    cfg = parse_args(["--config", str(f), "--task-option", "max_num=30", "--task-option", "ops=+-"])
    assert cfg.task_options == {"difficulty": "standard", "max_num": 30, "ops": "+-"}
    assert cfg.decode == "eager"
    assert parse_args(["--decode", "compiled"]).decode == "compiled"
    # the earlier boolean key, from a flag, a config file, and a resumed run's config.json
    assert parse_args(["--compile-decode", "true"]).decode == "compiled"
    f.write_text("compile_decode: false\n")
    assert parse_args(["--config", str(f)]).decode == "eager"
    # a file that gives a key twice (its old name, or - for _) with different values: neither is taken silently
    f.write_text("decode: compiled\ncompile_decode: true\nmax-steps: 3\nmax_steps: 3\n")
    assert parse_args(["--config", str(f)]).decode == "compiled"
    for text in ("decode: compiled\ncompile_decode: false\n", "compile_decode: false\ndecode: compiled\n"):
        f.write_text(text)
        with pytest.raises(Exception, match="both set 'decode', to different values"):
            parse_args(["--config", str(f)])
    f.write_text("max-steps: 3\nmax_steps: 4\n")
    with pytest.raises(Exception, match="'max-steps' and 'max_steps' both set 'max_steps'"):
        parse_args(["--config", str(f)])
    old = {**TrainConfig().to_dict(), "compile_decode": True}
    del old["decode"]
    assert TrainConfig().incompatible_with(old) == []  # decode may change on resume
    assert TrainConfig(lr=1e-3).incompatible_with(old) == ["lr"]
    from r3.errors import R3Error

    # chat template options: a config file's, merged with flags; a run of an earlier version had the default
    f.write_text("chat_template_options:\n  enable_thinking: true\n")
    assert parse_args(["--config", str(f)]).chat_template_options == {"enable_thinking": True}
    assert parse_args(["--config", str(f), "--chat-template-option", "x=1"]).chat_template_options == {
        "enable_thinking": True, "x": 1}
    assert TrainConfig().chat_template_options == {}
    del old["chat_template_options"]
    assert TrainConfig().incompatible_with(old) == []
    assert TrainConfig(chat_template_options={"enable_thinking": True}).incompatible_with(old) == ["chat_template_options"]
    with pytest.raises(R3Error, match="--chat-template-option expects key=value, got 'thinking'"):
        parse_args(["--chat-template-option", "thinking"])
    assert parse_args(["--chat-template-option", "enable_thinking=false"]).chat_template_options == {}  # (the default)
    with pytest.raises(R3Error, match="bad value '\\[1\\]' for 'chat_template_options' \\(expected a JSON object\\)"):
        parse_args(["--chat-template-options", "[1]"])
    with pytest.raises(R3Error, match="bad value '0.9' for 'adam_betas' \\(expected a JSON list of 2 numbers\\)"):
        parse_args(["--adam-betas", "0.9"])
    with pytest.raises(R3Error, match="'tokenize' is an argument r3 gives the chat template itself"):
        parse_args(["--chat-template-option", "tokenize=true"])
    f.write_text("chat_template_options:\n  1: x\n")
    with pytest.raises(R3Error, match="'chat_template_options' must be a mapping with string keys"):
        parse_args(["--config", str(f)])
    f.write_text("grop_size: 6\n")

    with pytest.raises(R3Error, match="compile_decode"):
        parse_args(["--compile-decode", "maybe"])
    with pytest.raises(R3Error, match="'decode' must be one of eager, compiled, got 'fast'"):
        parse_args(["--decode", "fast"])

    with pytest.raises(R3Error, match=r"unknown key 'grop_size' \(did you mean group_size\?\)"):
        parse_args(["--config", str(f)])


def test_a_config_files_value_out_of_range_is_named_with_the_file(tmp_path):
    """A value of the right type but out of range (``group_size: 1``) was refused as ``config:
    'group_size' ...`` whether it came from the file or a flag; a bad type already named the file.
    A flag that overrides the file's value is the one refused, without the file."""
    from r3.config import parse_args
    from r3.errors import R3Error

    f = tmp_path / "my.yaml"
    f.write_text("group_size: 1\nagg: foo\n")
    with pytest.raises(R3Error, match=f"^{re.escape(str(f))}: 'group_size' must be >= 2"):
        parse_args(["--config", str(f)])
    with pytest.raises(R3Error, match=f"^{re.escape(str(f))}: 'agg' must be one of"):
        parse_args(["--config", str(f), "--group-size", "4"])
    with pytest.raises(R3Error, match="^config: 'group_size' must be >= 2"):
        parse_args(["--config", str(f), "--group-size", "1"])
    f.write_text("top_p: 0\nlr: -1\n")
    with pytest.raises(R3Error, match=f"^{re.escape(str(f))}: 'lr' must be a finite number > 0"):
        parse_args(["--config", str(f)])


def test_a_config_file_that_sets_a_key_twice_is_refused(tmp_path):
    """YAML and JSON keep the last of two equal keys silently (``lr: 1e-5`` ... ``lr: 2e-5`` trained
    at 2e-5), while ``--task-option k=..`` twice was already refused; a YAML merge key (``<<``) is
    not a second key."""
    from r3.config import parse_args
    from r3.errors import R3Error

    f = tmp_path / "my.yaml"
    f.write_text("lr: 1e-5\ngroup_size: 4\nlr: 2e-5\n")
    with pytest.raises(R3Error, match=r"my.yaml: key 'lr' is given twice, on lines 1 and 3 \(keep one\)$"):
        parse_args(["--config", str(f)])
    f.write_text("task_options:\n  difficulty: easy\n  difficulty: standard\n")
    with pytest.raises(R3Error, match="key 'difficulty' is given twice, on lines 2 and 3"):
        parse_args(["--config", str(f)])
    f.write_text("task_options: &opts\n  difficulty: easy\nchat_template_options:\n  <<: {}\n")
    assert parse_args(["--config", str(f)]).task_options == {"difficulty": "easy"}
    j = tmp_path / "my.json"
    j.write_text('{"lr": 1e-5, "lr": 2e-5}')
    with pytest.raises(R3Error, match=r"my.json: key 'lr' is given twice \(keep one\)$"):
        parse_args(["--config", str(j)])


@pytest.mark.parametrize("flag, hint", [
    ("--max-step", "--max-steps"), ("--lrr", "--lr"), ("--group_sise", "--group-size"),
    ("--max-reflection-token", "--max-reflection-tokens"), ("--task-opton", "--task-option"),
    ("--zzzzzz", None),
])
def test_unknown_flag_suggests_the_closest_real_one(flag, hint):
    from r3.config import parse_args
    from r3.errors import R3Error

    with pytest.raises(R3Error) as e:
        parse_args([flag, "3"])
    msg = str(e.value)
    assert msg.startswith(f"unknown flag '{flag.replace('_', '-')}'")
    assert (f"(did you mean {hint}?)" in msg) if hint else "did you mean" not in msg


def test_help_describes_every_knob_on_one_line(capsys, monkeypatch):
    from r3.config import _FIELDS, HELP, TrainConfig, parse_args

    assert set(HELP) == set(_FIELDS) and all(HELP.values())
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    defaults = TrainConfig().to_dict()
    for name in _FIELDS:
        lines = [x for x in out.splitlines() if x.split()[:1] == [f"--{name.replace('_', '-')}"]]
        assert len(lines) == 1 and lines[0].rstrip().endswith(HELP[name]) and repr(defaults[name]) in lines[0]
    monkeypatch.setenv("RANK", "1")  # (a stray RANK outside torchrun changes nothing)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--out" in capsys.readouterr().out
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # under torchrun: rank 0 prints it, once
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out == ""


def test_task_options_from_flags_refuse_a_key_given_twice():
    from r3.config import parse_args
    from r3.errors import R3Error

    with pytest.raises(R3Error, match="--task-option difficulty given twice"):
        parse_args(["--task-option", "difficulty=easy", "--task-option", "difficulty=standard"])


def test_checkpoint_io_runs_single_threaded_and_restores_threads():
    """DCP runs under one intra-op thread (a second OpenMP team would make libgomp stop
    spin-waiting for the rest of the run: rollouts were 1.5x slower after the first checkpoint);
    the thread count comes back afterwards, also when the save fails."""
    from r3.rundir import _one_intra_op_thread

    before = torch.get_num_threads()
    with _one_intra_op_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with _one_intra_op_thread():
            raise RuntimeError("disk full")
    assert torch.get_num_threads() == before


def test_the_example_config_is_the_defaults():
    """configs/smollm2_countdown_tiny.yaml documents the main command, every key written out: it
    must not drift, nor miss a key the config gains."""
    import dataclasses

    import yaml

    from r3.config import TrainConfig, parse_args
    from r3.tasks import resolve

    path = Path(__file__).parents[1] / "configs" / "smollm2_countdown_tiny.yaml"
    keys = list(yaml.safe_load(path.read_text()))
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    written, default = parse_args(["--config", str(path)]).to_dict(), TrainConfig().validate().to_dict()
    assert resolve(written.pop("task"), written.pop("task_options")) == resolve(default.pop("task"), default.pop("task_options"))
    assert written == default


def test_resume_trims_logs_and_survives_a_cut_short_last_line(tmp_path, capsys):
    from r3.errors import R3Error
    from r3.rundir import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_jsonl(path, 2) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "dropped the last line" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(R3Error, match=r"metrics.jsonl: line 2 is not JSON"):
        truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1}\n{"st\n{"step": 2}\n'  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]


def _trainer_to_checkpoint(model_dir, keep_last: int):
    """(Dist, config, FSDP policy, AdamW, scheduler, data stream) in this process, for save_checkpoint."""
    from r3 import train as T
    from r3.checkpoint import load
    from r3.config import TrainConfig

    d = T.init_distributed()
    cfg = TrainConfig(model=str(model_dir), dtype="fp32", keep_last=keep_last).validate()
    policy, _ = load(model_dir, tokenizer=False)
    T.shard(policy, d, torch.float32)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(cfg))
    return d, cfg, policy, opt, sched, T.QueryStream([1, 2, 3], seed=0)


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(tiny_model, tmp_path, monkeypatch):
    """A full disk during a save (simulated: ENOSPC from torch.distributed.checkpoint) names the
    checkpoint, leaves no partial directory and keeps the earlier complete checkpoint."""
    import errno

    import torch.distributed.checkpoint as dcp

    from r3.errors import R3Error
    from r3.rundir import checkpoint_dirs, save_checkpoint

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=2)
    save_checkpoint(tmp_path, 1, policy, opt, sched, stream, cfg, d)

    real = dcp.save

    def full_disk(state, checkpoint_id, process_group=None):  # as DCP reports it: the rank's error inside a CheckpointException
        from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: _wrap_exception(err)}) from None

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(R3Error) as e:
        save_checkpoint(tmp_path, 2, policy, opt, sched, stream, cfg, d)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "checkpoints" / "step_000002") in msg
    assert "No space left on device" in msg and "step_000001, is kept" in msg and "GiB free" in msg
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    monkeypatch.setattr(dcp, "save", real)
    save_checkpoint(tmp_path, 2, policy, opt, sched, stream, cfg, d)  # space freed: the next save works
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001", "step_000002"]


def test_a_full_disk_at_the_export_or_a_log_is_one_line_naming_the_kept_checkpoint(tiny_model, tmp_path, monkeypatch):
    """ENOSPC while writing the export (safetensors reports it as a SafetensorError) or appending to
    a log is one line that says what to rerun; the export leaves nothing half-written. (Checked for
    real on a 60 MB tmpfs: the rerun wrote the export; a run whose disk filled mid-step resumed from
    its checkpoint with the logs trimmed.)"""
    import errno
    import io

    import safetensors.torch
    from safetensors import SafetensorError

    from r3 import rundir
    from r3 import train as T
    from r3.checkpoint import load
    from r3.config import TrainConfig
    from r3.errors import R3Error

    d = T.init_distributed()
    cfg = TrainConfig(model=str(tiny_model), dtype="fp32").validate()
    policy, tok = load(tiny_model)
    T.shard(policy, d, torch.float32)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(cfg))
    stream = T.QueryStream([1, 2, 3], seed=0)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(R3Error) as e:
        rundir.export(tmp_path, policy, tok, d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"could not write the export {tmp_path / 'export'} (Error while serializing")
    assert "No space left on device" in msg and "GiB free" in msg and msg.endswith("no checkpoint was written")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    rundir.save_checkpoint(tmp_path, 1, policy, opt, sched, stream, cfg, d)
    with pytest.raises(R3Error, match=r"checkpoint step_000001 is kept: free space and rerun with the same --out "
                                      r"to write the export$"):
        rundir.export(tmp_path, policy, tok, d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]

    def bug(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: a tensor that is not contiguous")

    monkeypatch.setattr(safetensors.torch, "save_file", bug)
    with pytest.raises(SafetensorError, match="not contiguous"):  # a bug, not the disk: not a user error
        rundir.export(tmp_path, policy, tok, d)
    monkeypatch.undo()
    for stale in (".export.tmp-abc", ".export.old-123"):  # (what an export killed half-way left: a whole model)
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"x")
    assert (rundir.export(tmp_path, policy, tok, d) / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "export"]
    # a quota counts as a full disk (the free-space advice), for OS errors and safetensors' alike
    assert rundir._disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert rundir._disk_full(SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"))
    assert not rundir._disk_full(OSError(errno.EACCES, "Permission denied"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "open", no_space, raising=False)
    with pytest.raises(R3Error) as e:
        rundir.append_jsonl(tmp_path / "metrics.jsonl", {"step": 2})
    msg = str(e.value)
    assert msg.startswith(f"could not write {tmp_path / 'metrics.jsonl'} (No space left on device; ") and "GiB free" in msg
    assert msg.endswith("free space and rerun with the same --out: it resumes from checkpoint step_000001")
    with pytest.raises(R3Error, match="there is no checkpoint yet, so it starts again$"):
        rundir.append_jsonl(tmp_path / "new" / "metrics.jsonl", {"step": 1})

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rundir, "open", denied, raising=False)  # not the disk: no advice to free space
    with pytest.raises(R3Error, match=rf"^could not write {tmp_path / 'metrics.jsonl'} \(Permission denied\); rerun with "
                                      "the same --out: it resumes from checkpoint step_000001$"):
        rundir.append_jsonl(tmp_path / "metrics.jsonl", {"step": 2})
    monkeypatch.undo()
    (tmp_path / "config.json").write_text('{"lr": 1}')
    from r3 import files

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: (os.close(fd), Full())[1])
    with pytest.raises(R3Error, match=rf"^could not write {tmp_path / 'config.json'} \(No space left on device; .* GiB free"):
        rundir.write_config(cfg, tmp_path, d)  # (rewriting a resumed run's config on a full disk)
    assert (tmp_path / "config.json").read_text() == '{"lr": 1}'  # (not truncated: the run stays resumable)
    monkeypatch.undo()
    row = {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "kl": float("-inf"), "lr": 1e-5}
    rundir.append_jsonl(tmp_path / "nan.jsonl", row)  # (a skipped step's non-finite numbers: JSON null, not NaN)
    assert (tmp_path / "nan.jsonl").read_text() == '{"step": 3, "loss": null, "grad_norm": null, "kl": null, "lr": 1e-05}\n'


def test_a_checkpoint_before_the_first_update_does_not_count_as_an_adamw_step(tiny_model, tmp_path):
    """--save-every must not change the weights: saving before any update (a first step without
    signal) would have torch.distributed.checkpoint initialise AdamW's state with an empty step,
    and the next real update would then use step 2's bias correction."""
    from r3 import batch as B
    from r3 import train as T
    from r3.checkpoint import load
    from r3.config import TrainConfig
    from r3.rundir import save_checkpoint

    d = T.init_distributed()
    cfg = TrainConfig(model=str(tiny_model), dtype="fp32", lr=1e-2).validate()
    runs = []
    for saved in (True, False):
        policy, _ = load(tiny_model, tokenizer=False)
        T.shard(policy, d, torch.float32)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
        T.init_adamw_state(opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(cfg))
        if saved:
            save_checkpoint(tmp_path, 0, policy, opt, sched, T.QueryStream([1], seed=0), cfg, d)
        mbs = B.make_micro_batches([[5, 6, 7, 8, 9]], [(2, 5)], [1.0], 4, 0, d.device)
        assert not T.update(policy, opt, mbs, 1, cfg, d)["skipped"]
        steps = {float(st["step"]) for st in opt.state.values()}
        runs.append(({k: v.full_tensor().clone() for k, v in policy.state_dict().items()}, steps))
    (wa, sa), (wb, sb) = runs
    assert sa == sb == {1.0}
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_frequency_does_not_change_the_export(tiny_model, tmp_path):
    """Step 1 carries no signal (its 4 attempts and 8 retries fail on purpose), so --save-every 1
    saves before AdamW's first update."""
    args = BASE + ["--model", str(tiny_model), "--max-steps", "4", "--keep-last", "1",
                   "--task-options", '{"fail_first": 12}']
    for every in ("1", "3"):
        run_train(args + ["--save-every", every, "--out", str(tmp_path / every)])
    rows = read_metrics(tmp_path / "1")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["groups_with_signal"] == 0 and any(r["grad_norm"] > 0 for r in rows[1:])
    wa, wb = load_weights(tmp_path / "1" / "export"), load_weights(tmp_path / "3" / "export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tiny_model, tmp_path):
    import signal
    import time

    args = BASE + ["--model", str(tiny_model), "--max-steps", "4", "--save-every", "10"]
    run_train(args + ["--out", str(tmp_path / "full")])
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "r3.train"] + args + ["--out", str(part)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not ((part / "metrics.jsonl").is_file() and (part / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "received SIGTERM" in err and "checkpoint saved" in out and "Traceback" not in err
    steps = [r["step"] for r in read_metrics(part)]
    assert 1 <= len(steps) < 4 and (part / "checkpoints" / f"step_{steps[-1]:06d}").is_dir()
    assert not (part / "export").exists()
    run_train(args + ["--out", str(part)])
    wa, wb = load_weights(tmp_path / "full" / "export"), load_weights(part / "export")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["step"] for r in read_metrics(part)] == [1, 2, 3, 4]


def test_a_signal_during_a_checkpoint_stops_the_run_at_that_checkpoint(tiny_model, tmp_path):
    """SIGTERM while step 2's checkpoint was written (or its evaluation ran) was seen only after
    step 3: one more step and a second checkpoint before stopping, time a scheduler's grace period
    may not give. The checkpoint being written is the stop's."""
    script = tmp_path / "term_in_save.py"
    script.write_text(textwrap.dedent("""
        import os, runpy, signal, sys
        import torch.distributed.checkpoint as dcp
        real = dcp.save
        def save(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)  # (a preemption while the checkpoint is written)
            return real(*a, **k)
        dcp.save = save
        sys.argv = ["r3.train"] + sys.argv[1:]
        runpy.run_module("r3.train", run_name="__main__")
    """))
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(script)] + BASE + ["--model", str(tiny_model), "--max-steps", "4",
                          "--save-every", "2", "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert "stopping after step 2 (SIGTERM); checkpoint saved" in proc.stdout, proc.stdout[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.rundir import _HELD_LOCKS, prepare_out_dir

    d = T.init_distributed()
    cfg = TrainConfig(out=str(tmp_path / "run")).validate()
    prepare_out_dir(cfg, d)
    held = _HELD_LOCKS[-1]
    try:
        with pytest.raises(R3Error, match=r"is in use by another run \(pid \d+ on "):
            prepare_out_dir(cfg, d)
    finally:
        _HELD_LOCKS.remove(held)
        held.close()  # the first run ends: its lock goes with it
    prepare_out_dir(cfg, d)
    _HELD_LOCKS.pop().close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(R3Error, match="is a file, not a directory"):
        prepare_out_dir(TrainConfig(out=str(tmp_path / "file")).validate(), d)
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.MonkeyPatch.context() as mp:  # an --out that cannot be made: one line, not a traceback
        mp.setattr(Path, "mkdir", read_only)
        with pytest.raises(R3Error, match=r"--out .*/ro: cannot write there \(Read-only file system\)"):
            prepare_out_dir(TrainConfig(out=str(tmp_path / "ro")).validate(), d)

    import builtins

    from r3 import rundir

    class FullDisk:  # the lock file opens, but writing the holder's pid into it meets a full disk
        def __init__(self, path, mode):
            self.f = builtins.open(path, mode)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir, "open", FullDisk, raising=False)
        with pytest.raises(R3Error, match=r"--out .*/full: cannot write there \(No space left on device; .* GiB free"):
            prepare_out_dir(TrainConfig(out=str(tmp_path / "full")).validate(), d)
    assert not any(lock.name == str(tmp_path / "full" / ".lock") for lock in _HELD_LOCKS)  # (not held)


def test_a_resume_with_another_max_steps_says_so(tmp_path, capsys):
    """The README's resume line left the run's --max-steps out: the default (30) then resumed a
    20-step run as a 30-step one, its lr schedule recomputed, without a word. A resume whose
    max_steps differs from the run's says so in a note; the same max_steps says nothing, and so
    do a directory with nothing trained in it yet and a run already at or past the new max_steps
    (r3.train says it has nothing to train)."""
    import json

    from r3 import train as T
    from r3.config import TrainConfig
    from r3.rundir import _HELD_LOCKS, prepare_out_dir

    d = T.init_distributed()
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(TrainConfig(out=str(out), max_steps=20).validate().to_dict()))
    for logged, steps, said, saved in ((False, 30, False, 0), (True, 20, False, 0), (True, 30, True, 0),
                                       (True, 30, True, 12), (True, 10, False, 12), (True, 12, False, 12)):
        (out / "metrics.jsonl").write_text('{"step": 1}\n' if logged else "")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if saved:  # (a run already at or past the new --max-steps trains nothing: no schedule to recompute)
            (out / "checkpoints" / f"step_{saved}").mkdir(parents=True)
            (out / "checkpoints" / f"step_{saved}" / "trainer_state.json").write_text("{}")
        prepare_out_dir(TrainConfig(out=str(out), max_steps=steps).validate(), d)
        _HELD_LOCKS.pop().close()
        printed = capsys.readouterr().out
        assert ("note: --out " in printed) == said, printed
        assert not said or (f"was run with --max-steps 20, this run with {steps}: the lr schedule is recomputed for "
                            f"{steps} steps (pass --max-steps 20 to keep it)" in printed), printed


def test_a_file_system_that_cannot_lock_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    """Lustre mounted noflock (and some FUSE or network mounts) answer flock with ENOSYS: that
    was read as 'in use by another run (unknown)', so r3.train, r3.failures and r3.evaluate could
    never run there. Now only a lock another file holds refuses; the rest is one warning per file
    system, and a run there is not 'still training' to r3.evaluate."""
    import errno
    import fcntl

    from r3 import files
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.files import hold_lock, release_lock
    from r3.rundir import _HELD_LOCKS, prepare_out_dir, training_holder

    def noflock(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", noflock)
    monkeypatch.setattr(files, "_UNLOCKABLE", set())
    d = T.init_distributed()
    (tmp_path / ".lock").write_text("pid 1 on node7\n")
    assert training_holder(tmp_path) is None  # (r3.evaluate's probe only reads: no warning)
    (tmp_path / ".lock").unlink()
    assert capsys.readouterr().err == ""
    out = prepare_out_dir(TrainConfig(out=str(tmp_path / "run")).validate(), d)
    _HELD_LOCKS.pop().close()
    assert training_holder(out) is None
    key = hold_lock(tmp_path / "r.json.partial.jsonl")
    assert key is not None
    release_lock(key)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {out / '.lock'}: this file system cannot lock files "
                                                     "(Function not implemented); nothing stops two commands")

    def conflict(f, op):  # (a network mount's answer to a lock another client holds)
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fcntl, "flock", conflict)
    with pytest.raises(R3Error, match="is in use by another run"):
        prepare_out_dir(TrainConfig(out=str(tmp_path / "run")).validate(), d)
    assert hold_lock(tmp_path / "r.json.partial.jsonl") is None



def test_a_lock_is_held_until_released_and_never_on_a_file_replaced_or_removed_meanwhile(tmp_path,
                                                                                        monkeypatch):
    """hold_lock: held exclusively (a shared lock by another open file, as another process's,
    is refused too) until release_lock; this process asking again gets its key, not a refusal by
    its own lock; shared probes (try_flock shared) hold together. A file replaced or removed
    between the open and the lock is not held: the lock would be on a file no other process
    opens, and two commands would write the same output."""
    import fcntl

    from r3 import files

    path = tmp_path / "r.json.partial.jsonl"
    key = files.hold_lock(path)
    assert key is not None and files.hold_lock(path) == key
    with open(path) as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert not files.try_flock(other) and not files.try_flock(other, shared=True)
    files.release_lock(key)
    files.release_lock(key)  # (let go of already: nothing)
    with open(path) as a, open(path) as b:
        assert files.try_flock(a, shared=True) and files.try_flock(b, shared=True)
        assert files.hold_lock(path) is None
    real = files.try_flock
    (tmp_path / "new").write_text("")

    def replaced_meanwhile(f, **k):
        os.replace(tmp_path / "new", path)
        return real(f, **k)

    monkeypatch.setattr(files, "try_flock", replaced_meanwhile)
    assert files.hold_lock(path) is None

    def removed_meanwhile(f, **k):
        path.unlink()
        return real(f, **k)

    monkeypatch.setattr(files, "try_flock", removed_meanwhile)
    assert files.hold_lock(path) is None
    monkeypatch.setattr(files, "try_flock", real)
    key = files.hold_lock(path)  # (the file there now: held)
    assert key == (path.stat().st_dev, path.stat().st_ino)
    files.release_lock(key)


@pytest.mark.parametrize("code,locked", [("ENOSYS", True), ("EOPNOTSUPP", True), ("ENOTSUP", True),
                                         ("ENOLCK", True), ("EWOULDBLOCK", False), ("EACCES", False),
                                         ("EIO", False)])
def test_try_flock_reads_a_file_system_that_cannot_lock_as_locked_and_any_other_error_as_held(
        code, locked, tmp_path, monkeypatch, capsys):
    """A lock the file system cannot take (Lustre noflock answers ENOLCK, FUSE ENOSYS or
    EOPNOTSUPP) runs with one warning per file system (none for a quiet probe); another holder's
    answer (EWOULDBLOCK, a network mount's EACCES) or any other error is a refusal."""
    import errno
    import fcntl

    from r3 import files

    def fails(f, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", fails)
    monkeypatch.setattr(files, "_UNLOCKABLE", set())
    with open(tmp_path / "x", "a") as f:
        assert files.try_flock(f, quiet=True) is locked
        assert capsys.readouterr().err == ""
        assert files.try_flock(f) is locked and files.try_flock(f, shared=True) is locked
    err = capsys.readouterr().err
    assert err.count("cannot lock files") == (1 if locked else 0)
    assert err.count("\n") == err.count("warning")

def test_a_run_directory_without_a_readable_config_object_is_refused(tmp_path):
    """Without config.json nothing says which config a run's steps were trained with: resuming
    it under any config (another task, another lr) was accepted; a config.json holding a JSON
    list was a TypeError traceback."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.rundir import _HELD_LOCKS, prepare_out_dir

    d = T.init_distributed()
    for name, files in (("metrics", {"metrics.jsonl": '{"step": 1}\n'}),
                        ("checkpoints", {"checkpoints/step_000001/x": ""})):
        run = tmp_path / name
        for rel, text in files.items():
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / rel).write_text(text)
        with pytest.raises(R3Error, match=rf"--out {run} holds a run without its config.json"):
            prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
    for text, match in (("[1]", "a JSON list, not an object"), ("\udcff", "unreadable config")):
        run = tmp_path / f"bad{len(text)}"
        run.mkdir()
        (run / "config.json").write_bytes(b"\xff" if text == "\udcff" else text.encode())
        with pytest.raises(R3Error, match=match):
            prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
    empty = tmp_path / "empty"
    (empty / "export").mkdir(parents=True)  # (an export alone is no run: still allowed)
    prepare_out_dir(TrainConfig(out=str(empty)).validate(), d)
    _HELD_LOCKS.pop().close()


def test_a_model_directory_given_as_out_is_refused_and_left_untouched(tmp_path):
    """--out naming a Hugging Face model directory (the model being trained, or another run's
    export): its config.json, a JSON object, was taken for the config of a run that ended before
    its first step, so the run started over there and wrote its own config.json over the model's
    (which then no longer loaded: "missing field 'model_type'")."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.rundir import prepare_out_dir

    d = T.init_distributed()
    model = tmp_path / "model"
    model.mkdir()
    text = json.dumps({"model_type": "llama", "hidden_size": 64})
    (model / "config.json").write_text(text)
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(R3Error, match=rf"--out {model} exists and is not an r3 run directory \({model}/config.json "
                                      r"is not a run's config: a model directory\?\)"):
        prepare_out_dir(TrainConfig(out=str(model)).validate(), d)
    assert (model / "config.json").read_text() == text and not (model / ".lock").exists()


def test_a_start_that_failed_before_its_first_logged_step_does_not_block_a_corrected_retry(tmp_path, capsys):
    """A run that wrote its config.json and then failed in its first step (a task's data file with
    a bad field, say) holds nothing trained under that config: a retry with corrected settings
    starts over. With a logged step or a checkpoint, the other config is still refused."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.rundir import _HELD_LOCKS, prepare_out_dir

    d = T.init_distributed()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "task_options": {"data_path": "bad.jsonl"}}))
    (run / "metrics.jsonl").write_text("")  # (opened, nothing written)
    (run / "wandb_run_id").write_text("abc123\n")  # (the failed start's W&B run: not resumed under the new config)
    prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
    _HELD_LOCKS.pop().close()
    assert "holds a run that ended before its first step was logged; starting over" in capsys.readouterr().out
    assert not (run / "wandb_run_id").exists()
    for rel, text in (("metrics.jsonl", '{"step": 1}\n'), ("checkpoints/step_000001/x", "")):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
        with pytest.raises(R3Error, match="holds a run with a different config"):
            prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
        (run / rel).unlink()


def test_resume_skips_a_damaged_newest_checkpoint_and_a_failed_start_leaves_no_config(tiny_model, tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "bad_model"
    bad.mkdir()
    for f in Path(tiny_model).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    args = BASE + ["--max-steps", "4", "--save-every", "2", "--out", str(out)]
    proc = run_train(args + ["--model", str(bad)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (out / "config.json").exists()  # so the corrected retry below is not refused
    run_train(args + ["--model", str(tiny_model), "--stop-after", "3"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    shard = next((out / "checkpoints" / "step_000003").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = run_train(args + ["--model", str(tiny_model)])
    assert "checkpoint" in proc.stderr and "step_000003 cannot be read" in proc.stderr
    assert "resumed from" in proc.stdout and "(step 2)" in proc.stdout
    # (a line before the first step of this process, which also warms up: silence until it ended)
    lines = proc.stdout.splitlines()
    starting = lines.index("starting step 3/4 (the first also warms up, so it is slower than the rest; a line per "
                           "step follows)")
    assert lines[starting + 1].startswith("step 3/4 | ") and proc.stdout.count("starting step") == 1
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4] and (out / "export").is_dir()
    proc = run_train(args + ["--model", str(tiny_model)])  # (already done: said, not silently re-exported)
    assert f"note: {out} is already at step 4 of --max-steps 4: nothing to train" in proc.stdout
    assert "starting step" not in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]



def test_a_resume_that_raises_max_steps_follows_the_new_schedule(tiny_model, tmp_path):
    """The checkpoint holds the lr of the schedule it was written under; the resumed steps take
    the new --max-steps' cosine from the first one on."""
    from r3.config import TrainConfig
    from r3.train import lr_lambda

    out = tmp_path / "run"
    args = BASE + ["--model", str(tiny_model), "--out", str(out), "--warmup-steps", "1", "--min-lr-ratio", "0.1"]
    run_train(args + ["--max-steps", "2"])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]  # (the last step's, save_every 20)
    assert "resumed from" in run_train(args + ["--max-steps", "4"]).stdout
    lrs = [r["lr"] for r in read_metrics(out)]
    old = lr_lambda(TrainConfig(max_steps=2, warmup_steps=1, min_lr_ratio=0.1))
    new = lr_lambda(TrainConfig(max_steps=4, warmup_steps=1, min_lr_ratio=0.1))
    assert lrs == pytest.approx([1e-3 * old(0), 1e-3 * old(1), 1e-3 * new(2), 1e-3 * new(3)], rel=1e-12)
    assert 1e-3 * old(2) != pytest.approx(1e-3 * new(2))  # (the two schedules differ at step 3)


def test_resuming_on_other_training_examples_is_said(tiny_model, tmp_path):
    """A checkpoint records a fingerprint of the training examples; resuming after the data file
    changed goes on (at the same position of the new data) but says so."""
    data = tmp_path / "words.txt"
    data.write_text("alpha beta gamma delta epsilon zeta eta theta\n")
    args = [a if a != "r3_test_tasks:CoinTask" else "r3_test_tasks:FileCoinTask" for a in BASE]
    args = [a if a != "{}" else json.dumps({"data_path": str(data)}) for a in args]
    args += ["--model", str(tiny_model), "--max-steps", "3", "--out", str(tmp_path / "run")]
    run_train(args + ["--stop-after", "1"])
    proc = run_train(args + ["--stop-after", "2"])
    assert "resumed from" in proc.stdout and "warning" not in proc.stderr  # the same data: nothing said
    data.write_text("alpha beta gamma delta epsilon zeta eta iota\n")
    proc = run_train(args)
    assert "warning: the training examples are not those" in proc.stderr and "(the task's data file" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_model_without_a_chat_template_fails_before_the_config_is_written(tiny_model, tmp_path):
    """The template is checked on the task's first conversation before config.json is written,
    so the corrected retry on the same --out is not refused as a different config."""
    from conftest import copy_without_chat_template

    out, bare = tmp_path / "run", copy_without_chat_template(tiny_model, tmp_path / "no_template")
    args = BASE + ["--max-steps", "1", "--out", str(out)]
    proc = run_train(args + ["--model", str(bare)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: {bare}: the tokenizer has no chat template" in proc.stderr  # (named with its model)
    assert not (out / "config.json").exists()
    run_train(args + ["--model", str(tiny_model)])

LAUNCH = [sys.executable, "-m", "r3.launch", "--standalone"]


@pytest.mark.parametrize("flags,line", [
    (["--lr", "abc"], "error: command line: bad value 'abc' for 'lr' (expected float)"),  # (parsing the flags)
    (["--model", "/no/such/model"], "error: model path '/no/such/model' does not exist"),  # (set_up's checks)
    (["--task", "r3_test_tasks:CoinTask", "--task-options", "{}"], "error: --out {out} is a file"),  # (--out's)
    (["--batch-size", "3", "--model", "/no/such/model"],  # (the ranks' shares: checked before the model)
     "error: config: 'batch_size' (3) must be divisible by the number of ranks (2)"),
])
def test_r3_torchrun_ends_with_the_workers_error_line_and_its_exit_code(tmp_path, flags, line):
    """Plain torchrun follows a worker's one-line error with ~30 lines of ChildFailedError and
    exits 1; r3-torchrun exits 2 with the error line only, said once by rank 0 (every rank made
    the same check; each printed it before)."""
    out = tmp_path / "o"
    if "is a file" in line:
        out.write_text("")
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", "2", "-m", "r3.train", *flags, "--out", str(out)],
                          capture_output=True, text=True, env={k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"},
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(line.format(out=out)), lines
    assert out.is_file() if "is a file" in line else not out.exists()


@pytest.mark.parametrize("nproc, why", [("abc", "Unsupported nproc_per_node value: abc"), ("0", "must be at least 1")]
                         + ([("gpu", "Cuda is not available")] if not torch.cuda.is_available() else []))
def test_r3_torchrun_bad_worker_count_is_one_line(tmp_path, nproc, why):
    # (torchrun itself: a ValueError or AssertionError traceback)
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", nproc, "-m", "r3.train", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == f"error: --nproc_per_node {nproc!r}: {why}"


ALIKE_CHECK_FAILS = textwrap.dedent(
    """
    import sys
    from r3.distributed import fail_together, init_distributed, run_and_exit
    from r3.errors import R3Error, cli_main

    @cli_main
    def main():
        d = init_distributed()
        with fail_together(d, alike=True):
            if sys.argv[1] == "every":
                raise R3Error("the same check failed")
            if sys.argv[1] == "rank1" and d.rank == 1:
                raise R3Error("a file missing on rank 1's node")
            if sys.argv[1] == "different":
                raise R3Error("the model path is wrong" if d.main else "no C compiler on rank 1's node")
        raise AssertionError("not reached")

    run_and_exit(main)  # (as r3.train leaves)
    """
)


@pytest.mark.parametrize("kind,line", [
    ("every", "error: the same check failed"),  # said once: rank 0 speaks for all
    ("rank1", "error: a file missing on rank 1's node"),  # a failure of its own: the rank says it
    ("different", "error: the model path is wrong\nerror: no C compiler on rank 1's node"),  # both said
])
def test_checks_alike_on_every_rank_are_said_once(tmp_path, kind, line):
    script = tmp_path / "alike.py"
    script.write_text(ALIKE_CHECK_FAILS)
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", "2", str(script), kind], capture_output=True, text=True,
                          env={k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert sorted(x for x in proc.stderr.splitlines() if x.strip()) == sorted(line.split("\n")), proc.stderr[-3000:]


MAIN_WRITE_FAILS = textwrap.dedent(
    """
    import errno, sys
    from r3.distributed import fail_together, init_distributed, run_and_exit
    from r3.errors import R3Error, cli_main

    @cli_main
    def main():
        d = init_distributed()
        with fail_together(d):  # rank 0 writes fine
            pass
        with fail_together(d):
            if d.main and sys.argv[1] == "r3error":
                raise R3Error("could not write metrics.jsonl (No space left on device)")
            if d.main and sys.argv[1] == "crash":
                raise ValueError("a bug in rank 0's writes")
            if d.main:  # (e.g. the step line's print to a log on the same full disk)
                raise OSError(errno.ENOSPC, "No space left on device", "train.log")
        raise AssertionError("not reached")

    run_and_exit(main)  # (as r3.train leaves)
    """
)


@pytest.mark.parametrize("kind,line", [
    ("r3error", "error: could not write metrics.jsonl (No space left on device)"),
    ("oserror", r"error: No space left on device writing train.log \(\d+\.\d\d GiB free on that disk\); "
                r"free space and run the command again"),
])
def test_a_failed_write_on_rank_0_stops_every_rank_with_its_one_line(tmp_path, kind, line):
    """Without fail_together rank 1 went on to the next collective and died with ~26 lines of
    'Connection closed by peer' traceback under rank 0's one-line error (a run whose disk filled)."""
    script = tmp_path / "main_write_fails.py"
    script.write_text(MAIN_WRITE_FAILS)
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", "2", str(script), kind], capture_output=True, text=True,
                          env={k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and re.fullmatch(line if kind == "oserror" else re.escape(line), lines[0]), lines


def test_a_crash_in_rank_0s_writes_is_reported_as_rank_0s_crash(tmp_path):
    """The other ranks exit only once rank 0 has: the launcher's root cause is rank 0's exit 1, not
    another rank's quiet exit 2 (before, that was a race: 1 run in 4 here ended with exit 2)."""
    script = tmp_path / "main_write_fails.py"
    script.write_text(MAIN_WRITE_FAILS)
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", "2", str(script), "crash"], capture_output=True, text=True,
                          env={k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ValueError: a bug in rank 0's writes" in proc.stderr
    root = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 0 (local_rank: 0)" in root and "exitcode  : 1" in root, proc.stderr[-3000:]


TRAINER_STATE_FAILS = textwrap.dedent(
    """
    import errno, shutil, sys, time
    from pathlib import Path
    import torch
    from r3 import train as T
    from r3.checkpoint import load
    from r3.config import TrainConfig
    from r3.errors import cli_main
    from r3.rundir import save_checkpoint

    @cli_main
    def main():
        d = T.init_distributed()
        cfg = TrainConfig(model=sys.argv[1], dtype="fp32").validate()
        policy, _ = load(sys.argv[1], tokenizer=False)
        T.shard(policy, d, torch.float32)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(cfg))
        stream = T.QueryStream([1, 2, 3], seed=0)
        save_checkpoint(Path(sys.argv[2]), 1, policy, opt, sched, stream, cfg, d)
        real = Path.write_text

        def full(self, *a, **k):  # rank 0's own part of a checkpoint meets a full disk
            if self.name == "trainer_state.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, *a, **k)

        Path.write_text = full
        real_rmtree = shutil.rmtree

        def slow_rmtree(*a, **k):  # rank 0 takes its time removing the partial checkpoint (a large
            time.sleep(3)          # model's): the others must not leave, and so have it stopped, first
            return real_rmtree(*a, **k)

        shutil.rmtree = slow_rmtree
        save_checkpoint(Path(sys.argv[2]), 2, policy, opt, sched, stream, cfg, d)

    T.run_and_exit(main)  # (as r3.train leaves)
    """
)


def test_a_checkpoint_that_fails_on_rank_0_alone_stops_every_rank_with_its_one_line(tiny_model, tmp_path):
    script = tmp_path / "trainer_state_fails.py"
    script.write_text(TRAINER_STATE_FAILS)
    out = tmp_path / "run"
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", "2", str(script), str(tiny_model), str(out)],
                          capture_output=True, text=True, env={k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"},
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "UserWarning" not in line
             and not line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write checkpoint {out / 'checkpoints' / 'step_000002'} "
                                                   "([Errno 28] No space left on device;"), proc.stderr[-3000:]
    assert lines[0].endswith("the last complete one, step_000001, is kept: free space and rerun with the same --out")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]


@pytest.mark.parametrize("code", [143, 130])
def test_r3_torchrun_passes_on_a_workers_own_signal_exit_quietly(tmp_path, code):
    """A worker signalled directly (``kill`` of its pid, a scheduler's signal to every process)
    saves and exits 128 + the signal: the launcher exits with that code, without torchrun's
    failure summary (the launcher's own signal goes another way, through SignalException)."""
    script = tmp_path / "signalled.py"
    script.write_text(f"import sys\nprint('saved', file=sys.stderr)\nsys.exit({code})\n")
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", "1", str(script)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "FAILED" not in proc.stderr and "ChildFailedError" not in proc.stderr and "saved" in proc.stderr


def test_r3_torchrun_reports_a_crash_with_torchruns_summary_and_exit_1(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("raise ValueError('boom')\n")
    proc = subprocess.run(LAUNCH + ["--nproc_per_node", "1", str(script)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 1
    assert "ValueError: boom" in proc.stderr and f"{script} FAILED" in proc.stderr and "exitcode  : 1" in proc.stderr
    assert "torch/distributed/run.py" not in proc.stderr and "r3/launch.py" not in proc.stderr  # no launcher traceback


def test_sigterm_to_r3_torchrun_reaches_the_worker_which_saves_and_exits_143(tiny_model, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = BASE + ["--model", str(tiny_model), "--max-steps", "50", "--save-every", "100", "--out", str(out)]
    proc = subprocess.Popen(LAUNCH + ["--nproc_per_node", "1", "-m", "r3.train"] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM" in err and "checkpoint saved" in stdout and "Traceback" not in err, err[-3000:]
    assert "death signal" not in err and "closing signal" not in err, err[-3000:]  # (the worker says why)
    steps = [r["step"] for r in read_metrics(out)]
    assert 1 <= len(steps) < 50 and (out / "checkpoints" / f"step_{steps[-1]:06d}").is_dir()


WAIT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from r3.distributed import MAIN_WORK_TIMEOUT, init_distributed, wait_for_main

    d = init_distributed()
    assert d.cpu_group is not None and MAIN_WORK_TIMEOUT.total_seconds() >= 3600
    done = Path(sys.argv[1]) / "done"
    if d.main:
        time.sleep(1.0)  # rank 0's file work
        done.write_text("x")
    wait_for_main(d)
    assert done.read_text() == "x", d.rank  # nobody passes before rank 0 has finished
    """
)


def test_wait_for_main_holds_the_other_ranks_on_a_gloo_group(tmp_path):
    """Rank 0's long file work (an export, a checkpoint rewrite) is waited for on a gloo group
    with a long timeout, not NCCL's 10 minutes; the other ranks pass only once it is done."""
    _run_on_two_ranks(WAIT_SCRIPT, tmp_path)


def _run_on_two_ranks(source: str, tmp_path, *args) -> None:
    """Run ``source`` as a script on 2 CPU ranks with ``tmp_path`` (and ``args``) as its arguments;
    it must exit 0."""
    script = tmp_path / "two_ranks.py"
    script.write_text(source)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


SHARE_RECENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from r3.distributed import _exit_hard, gather_to_main, init_distributed
    from r3.train import share_recent

    d = init_distributed()
    mine = [0.1, 1 / 3, 0.0, 0.7] if d.main else [0.9]  # (rank 0 read metrics.jsonl; the others hold nothing)
    got = share_recent(mine, d), share_recent([] if d.main else [0.5], d), gather_to_main([d.rank, d.rank], d)
    with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as f:
        json.dump(got, f)
    dist.barrier()
    dist.destroy_process_group()
    _exit_hard(0)
    """
)


def test_the_resumed_first_attempt_success_reaches_every_rank_exactly(tmp_path):
    """On resume only rank 0 reads metrics.jsonl; the candidate pool must be sized alike on every
    rank (each takes its share of one stream), so rank 0's list goes to all, bit for bit."""
    _run_on_two_ranks(SHARE_RECENT_SCRIPT, tmp_path)
    for rank in (0, 1):  # (and samples gathered to rank 0 in rank order)
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == \
            [[0.1, 1 / 3, 0.0, 0.7], [], [0, 0, 1, 1] if rank == 0 else []]


def test_query_stream_order_is_one_seeded_permutation_per_epoch():
    """The stream keeps each epoch's order (it shuffled the whole data set for every item): the
    items taken equal a naive reading of the seeded permutations, across epochs and ranks."""
    import random

    from r3 import train as T

    items = list(range(10))

    def naive(position, n):
        out = []
        for i in range(position, position + n):
            epoch, j = divmod(i, len(items))
            order = list(range(len(items)))
            random.Random(7 * 100003 + epoch).shuffle(order)
            out.append(items[order[j]])
        return out

    streams = [T.QueryStream(items, seed=7) for _ in range(2)]
    taken = []
    for step in range(9):  # 9 x 4 items: almost four epochs
        parts = [s.take(4, rank, 2) for rank, s in enumerate(streams)]
        taken += parts[0] + parts[1]
        assert streams[0].position == streams[1].position == 4 * (step + 1)
    assert taken == naive(0, 36)
    assert T.QueryStream(items, seed=7).fingerprint == streams[0].fingerprint != T.QueryStream(items[::-1], 7).fingerprint


def test_task_option_paths_are_recorded_absolute(tmp_path, monkeypatch):
    """A relative path to an existing file is recorded as an absolute one (r3.evaluate --run and a
    resumed run read config.json from anywhere); a run recorded with the relative path by an older
    version still resumes from the same directory, and other strings stay as they are."""
    from r3.config import TrainConfig, parse_task_options

    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(task_options={"data_path": "data.jsonl", "prompt_template": "Try {nums}", "n": 3}).validate()
    assert cfg.task_options == {"data_path": str(tmp_path / "data.jsonl"), "prompt_template": "Try {nums}", "n": 3}
    # only path options (path, *_path): a file name meant for another directory stays as it is
    assert parse_task_options(["data_path=data.jsonl", "x_path=missing.jsonl", "train_file=data.jsonl"]) == {
        "data_path": str(tmp_path / "data.jsonl"), "x_path": "missing.jsonl", "train_file": "data.jsonl"}
    old = {**cfg.to_dict(), "task_options": {"data_path": "data.jsonl", "prompt_template": "Try {nums}", "n": 3}}
    assert cfg.incompatible_with(old) == []
    monkeypatch.chdir(tmp_path.parent)  # elsewhere, the old relative path names no file: another config
    assert cfg.incompatible_with(old) == ["task_options"]


def test_a_failures_file_recorded_with_a_relative_path_is_read_from_here(tmp_path, monkeypatch):
    """Failure files of older versions recorded --task-option paths as given; the run's own are
    absolute now, so the file's are read from the current directory too (it was refused)."""
    from r3.errors import R3Error
    from r3.failure_data import check_made_for
    from r3.tasks import get

    (tmp_path / "cd.jsonl").write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n")
    monkeypatch.chdir(tmp_path)
    fails = _failures_made_for(tmp_path / "f.jsonl", "countdown", {"data_path": "cd.jsonl"})
    check_made_for(fails, get("countdown", data_path=str(tmp_path / "cd.jsonl")), "smollm2-135m")
    (tmp_path / "other.jsonl").write_text(json.dumps({"nums": [1, 2], "target": 3}) + "\n")
    with pytest.raises(R3Error, match="options differ: data_path"):
        check_made_for(fails, get("countdown", data_path=str(tmp_path / "other.jsonl")), "smollm2-135m")


def test_the_eta_leaves_out_a_process_first_step():
    """The first step of a process compiles and warms up (a compiled decode: minutes): the ETA uses
    the rate of the steps after it once there are some."""
    from r3.train import eta_s

    assert eta_s((100.0, 0), 1, 30, 250.0) == 150.0 * 29  # one step done: its own rate
    assert eta_s((250.0, 1), 3, 30, 310.0) == 30.0 * 27  # steps 2-3 at 30 s, not (310 - 100) / 3
    assert eta_s((50.0, 10), 12, 12, 90.0) == 0.0  # a resumed run's clock starts at its checkpoint


def test_steps_without_signal_are_reported_once(tmp_path, capsys):
    """Ten steps in a row without reward signal get one warning saying why: no retry passed, every
    group's retries agreed, or no first attempt failed; a step with signal starts the count again."""
    from types import SimpleNamespace

    from r3 import train as T

    def warnings(rows, **cfg):
        cfg = SimpleNamespace(**{"beta": 0.001, "skip_no_signal_groups": True, **cfg})
        run = SimpleNamespace(steps_without_signal=[], out=tmp_path, cfg=cfg)
        for row in rows:
            T.warn_without_signal(run, row)
        return capsys.readouterr().err

    quiet = {"groups": 8, "groups_with_signal": 0, "retry_success": 0.0}
    n = T.SIGNAL_LESS_STEPS
    assert warnings([quiet] * (n - 1)) == ""
    assert warnings([quiet] * (n - 1) + [{"groups": 8, "groups_with_signal": 1, "retry_success": 0.1}] + [quiet] * (n - 1)) == ""
    err = warnings([quiet] * (3 * n))  # once, not again at every later step
    assert err.count("\n") == 1 and f"no group had a reward signal in the last {n} steps" in err
    assert "no retry passed" in err and str(tmp_path / "samples.jsonl") in err and "KL" not in err
    err = warnings([quiet] * n, skip_no_signal_groups=False)  # the groups stayed in: the KL term trained on them
    assert "no retry passed" in err and "only the KL penalty trained on those steps" in err
    assert "KL" not in warnings([quiet] * n, skip_no_signal_groups=False, beta=0.0)
    assert "cut_answers" not in err  # (judged as they stood)
    err = warnings([quiet] * n, cut_answers="fail")  # (the limit may be what fails them all)
    assert "no retry passed" in err and "under cut_answers fail no retry that --max-retry-tokens cut off" in err
    err = warnings([quiet] * 3 + [{**quiet, "retry_success": 1.0}] + [quiet] * (n - 4))
    assert "some retries passed, but in each group all passed or all failed" in err and "no retry passed" not in err
    # a resumed run's streak (read back from metrics.jsonl) can be longer: the last 10 steps are judged
    run = SimpleNamespace(steps_without_signal=[(8, 1.0)] * 6 + [(8, 0.0)] * (n - 1), out=tmp_path,
                          cfg=SimpleNamespace(beta=0.001, skip_no_signal_groups=True))
    T.warn_without_signal(run, quiet)
    err = capsys.readouterr().err
    assert "no retry passed" in err and "some retries passed" not in err
    easy = {"groups": 0, "groups_with_signal": 0, "retry_success": 0.0, "first_try_success": 1.0}
    err = warnings([easy] * n, skip_no_signal_groups=False)  # every first attempt passed: no groups at all
    assert "no first attempt failed, so there was nothing to reflect on: the task may be too easy" in err
    assert "KL" not in err


def test_the_streak_without_signal_goes_on_across_a_resume(tiny_model, tmp_path):
    """A run stopped after 5 steps without reward signal and resumed warns at its 10th such step
    (its last: the 5 steps before the resume count), in the resumed process, as an uninterrupted
    run would."""
    from r3.train import SIGNAL_LESS_STEPS

    args = BASE + ["--model", str(tiny_model), "--out", str(tmp_path / "run"), "--max-steps", "10",
                   "--save-every", "100", "--task-options", '{"fail_first": 1000000}']  # (no answer ever passes)
    first = run_train(args + ["--stop-after", "5"])
    assert "stopping after step 5" in first.stdout and "reward signal" not in first.stderr
    second = run_train(args)
    assert "resumed from" in second.stdout
    assert second.stderr.count(f"no group had a reward signal in the last {SIGNAL_LESS_STEPS} steps") == 1
    assert "no retry passed" in second.stderr
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 11)) and not any(r["groups_with_signal"] for r in rows)


def _policy_and_rows(seed=0):
    """A tiny random fp32 model and 6 rows: two groups of 3 sharing a prefix, different reflection
    lengths, each row's tokens different."""
    from conftest import tiny_hf_config

    from r3.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(tiny_hf_config("qwen2").to_dict()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.fill_(1.0)
    g = torch.Generator().manual_seed(seed)
    seqs, spans = [], []
    for prefix_len, lengths in ((5, (4, 2, 6)), (7, (3, 5, 1))):
        prefix = torch.randint(0, 256, (prefix_len,), generator=g).tolist()
        for n in lengths:
            seqs.append(prefix + torch.randint(0, 256, (n + 2,), generator=g).tolist())  # (+2: a retry after it)
            spans.append((prefix_len, prefix_len + n))
    return model, seqs, spans


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_the_update_raises_the_log_probs_of_reflections_with_positive_advantage(agg):
    """The direction of training: one small SGD step of update() raises the advantage-weighted
    log-probs of the reflection tokens (the policy-gradient objective) and lowers them with the
    advantages negated, in every layout; a sign error anywhere in the loss would lower it."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, agg=agg, grad_clip=0.0, max_reflection_tokens=8).validate()

    def objective(model, mbs):
        with torch.no_grad():
            total = 0.0
            for mb in mbs:
                lp = B.scatter(B.token_logprobs(model, mb, 1.0)[0], mb)
                total += float((lp * mb.mask * mb.advantages[:, None]).sum())
            return total

    for sign in (1.0, -1.0):
        adv = [sign * a for a in (1.0, -0.5, -0.5, 0.8, -1.2, 0.4)]
        for micro, shared in ((6, False), (1, False), (2, True)):
            model = copy.deepcopy(base)
            mbs = B.make_micro_batches(seqs, spans, adv, micro, 0, torch.device("cpu"), shared_prefix=shared)
            before = objective(model, mbs)
            T.update(model, torch.optim.SGD(model.parameters(), lr=0.05), mbs, len(mbs), cfg, one_rank)
            after = objective(model, mbs)
            assert after > before + 1e-3, (sign, micro, shared, before, after)


def test_later_update_epochs_take_the_ratio_against_the_pre_update_policy():
    """With update_epochs 2 the second epoch's ratio is the updated policy over the pre-update one
    (old_logp, scored before the update): a large first step moves it past the clip range, upwards
    for positive advantages, and the reported clip fractions and loss are the last epoch's."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    stats = {}
    for epochs in (1, 2):
        cfg = TrainConfig(dtype="fp32", beta=0.0, grad_clip=0.0, max_reflection_tokens=8, update_epochs=epochs,
                          eps_low=0.01, eps_high=0.01, temperature=1.0).validate()
        model = copy.deepcopy(base)
        mbs = B.make_micro_batches(seqs, spans, [1.0] * 6, 2, 0, torch.device("cpu"))
        B.score_micro_batches(mbs, None, model if epochs > 1 else None, 1.0)
        stats[epochs] = T.update(model, torch.optim.SGD(model.parameters(), lr=0.5), mbs, len(mbs), cfg, one_rank)
    assert stats[1]["clip_high_sum"] == stats[1]["clip_low_sum"] == 0.0  # one epoch: the ratio is 1
    assert stats[2]["clip_high_sum"] > 0.5 * stats[2]["tokens"] and stats[2]["clip_low_sum"] == 0.0
    assert stats[2]["loss"] != pytest.approx(stats[1]["loss"])  # (the last epoch's loss, at ratios past 1 + eps)


def test_the_update_loss_is_the_surrogate_plus_beta_times_k3_at_the_rollout_temperature():
    """update() with beta > 0: in the first epoch (ratio 1) the loss is, by hand, the mean over
    the 21 reflection tokens of -A + beta * k3, k3 = exp(d) - d - 1 with d = ref - logp, both
    log-probs at the rollout temperature (0.7) -- the KL term reaches the update, with the
    config's beta -- and kl_sum / tokens is the mean k3."""
    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    model, seqs, spans = _policy_and_rows()
    reference, _, _ = _policy_and_rows(seed=1)  # (other weights)
    adv = [1.0, -0.5, -0.5, 0.8, -1.2, 0.9]
    mbs = B.make_micro_batches(seqs, spans, adv, 2, 0, torch.device("cpu"), shared_prefix=True)
    B.score_micro_batches(mbs, reference, None, 0.7)
    with torch.no_grad():
        logp = torch.cat([B.token_logprobs(model, mb, 0.7)[0] for mb in mbs]).double()
    ref = torch.cat([mb.ref_logp for mb in mbs]).double()
    a = torch.tensor([x for x, (s, e) in zip(adv, spans) for _ in range(e - s)], dtype=torch.float64)
    d = ref - logp
    k3 = torch.exp(d) - d - 1
    assert len(a) == 21 and k3.mean() > 0.01  # (a KL term large enough to see)
    cfg = TrainConfig(dtype="fp32", beta=0.05, agg="token-mean", grad_clip=0.0, max_reflection_tokens=8,
                      temperature=0.7).validate()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.0), mbs, len(mbs), cfg, one_rank)
    assert stats["loss"] == pytest.approx(float((-a + 0.05 * k3).mean()), rel=1e-5)
    assert stats["kl_sum"] / stats["tokens"] == pytest.approx(float(k3.mean()), rel=1e-4)


def test_later_epochs_clip_each_side_at_its_own_epsilon():
    """eps_low and eps_high reach the loss each on its side: after a large first step the
    second epoch's ratios move up for positive advantages and down for negative ones; with
    eps_high = 10 no upper clip binds, with eps_low = 0.01 the lower one does."""
    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    model, seqs, spans = _policy_and_rows()
    cfg = TrainConfig(dtype="fp32", beta=0.0, grad_clip=0.0, max_reflection_tokens=8, update_epochs=2,
                      eps_low=0.01, eps_high=10.0, temperature=1.0).validate()
    mbs = B.make_micro_batches(seqs, spans, [1.0, -1.0, 1.0, -1.0, 1.0, -1.0], 2, 0, torch.device("cpu"))
    B.score_micro_batches(mbs, None, model, 1.0)
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.05), mbs, len(mbs), cfg, one_rank)
    assert stats["clip_high_sum"] == 0.0 and stats["clip_low_sum"] > 2


def test_logp_diff_max_is_over_every_micro_batch():
    """logp_diff_max (the trainer's log-prob against the sampler's, before the update) is the
    largest gap over all trained tokens, not over the last micro-batch's."""
    from types import SimpleNamespace

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    model, seqs, spans = _policy_and_rows()
    # row 0 "was sampled" with log-probs of -100: its gap dwarfs every other row's
    logprobs = [[-100.0 if i == 0 else 0.0] * (e - s) for i, (s, e) in enumerate(spans)]
    ep = SimpleNamespace(sequences=seqs, spans=spans, reflection_logprobs=logprobs)
    adv = torch.tensor([[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]])
    mbs = B.episode_micro_batches(ep, adv, 1, 0, torch.device("cpu"), skip_no_signal=True, shared_prefix=False)
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, max_reflection_tokens=8).validate()
    stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.0), mbs, len(mbs), cfg, one_rank)
    assert stats["logp_diff_max"] > 50 and len(mbs) == 6


def test_each_trained_row_gets_its_own_advantage_and_sampler_log_probs():
    """episode_micro_batches pairs each row with its advantage (group-major, [n_groups, G]) and
    with the log-probs its reflection was sampled with, leaving out the groups without signal;
    checked row by row through the tokens, in both layouts and across micro-batch sizes."""
    from types import SimpleNamespace

    from r3 import batch as B

    _, seqs, spans = _policy_and_rows()
    logprobs = [[-0.1 * (i + 1) - 0.01 * t for t in range(e - s)] for i, (s, e) in enumerate(spans)]
    ep = SimpleNamespace(sequences=seqs, spans=spans, reflection_logprobs=logprobs)
    adv = torch.tensor([[0.5, -0.5], [0.0, 0.0], [1.5, -2.5]])  # 3 groups of 2 rows; group 1 has no signal
    want = {0: 0.5, 1: -0.5, 4: 1.5, 5: -2.5}
    for skip in (True, False):
        for size, shared in ((1, False), (3, False), (2, True), (6, True)):
            mbs = B.episode_micro_batches(ep, adv, size, 0, torch.device("cpu"), skip_no_signal=skip, shared_prefix=shared)
            assert all((mb.packed is not None) == shared for mb in mbs)  # (the packed layout when asked for)
            seen = []
            for mb in mbs:
                k = 0  # (targets are listed row by row)
                assert mb.advantages.dtype == torch.float32
                ends = []
                for b in range(mb.tokens.shape[0]):
                    row = next(i for i, (sq, (s, e)) in enumerate(zip(seqs, spans))
                               if mb.tokens[b, :e].tolist() == sq[:e] and int(mb.mask[b].sum()) == e - s
                               and bool(mb.mask[b, s:e].all()))
                    seen.append(row)
                    ends.append(spans[row][1])
                    # the retry after the reflection is not even fed to the update's forward: padding
                    assert (mb.tokens[b, spans[row][1]:] == 0).all()
                    assert float(mb.advantages[b]) == want.get(row, 0.0)
                    n = spans[row][1] - spans[row][0]
                    assert mb.rollout_logp[k:k + n].tolist() == pytest.approx(logprobs[row])
                    k += n
                assert mb.tokens.shape[1] == max(ends)  # (as wide as its longest row up to its reflection's end)
            assert seen == ([0, 1, 4, 5] if skip else [0, 1, 2, 3, 4, 5]), (skip, size, shared)


def test_scoring_takes_the_reference_and_the_pre_update_policy_each_from_its_own_model():
    """score_micro_batches: ref_logp from the reference, old_logp from the pre-update policy, both
    at the rollout temperature, in both layouts; a model not given leaves its log-probs unset."""
    from r3 import batch as B

    reference, seqs, spans = _policy_and_rows(seed=0)
    old_policy, _, _ = _policy_and_rows(seed=1)  # (other weights, the same rows)
    adv = [1.0, -0.5, -0.5, 0.8, -1.2, 0.4]
    for micro, shared in ((6, False), (2, True)):
        mbs = B.make_micro_batches(seqs, spans, adv, micro, 0, torch.device("cpu"), shared_prefix=shared)
        B.score_micro_batches(mbs, reference, old_policy, 0.7)
        for mb in mbs:
            ref, old = B.token_logprobs(reference, mb, 0.7)[0], B.token_logprobs(old_policy, mb, 0.7)[0]
            assert torch.equal(mb.ref_logp, ref) and torch.equal(mb.old_logp, old)
            assert not torch.allclose(ref, old) and not torch.allclose(ref, B.token_logprobs(reference, mb, 1.0)[0])
        mbs = B.make_micro_batches(seqs, spans, adv, micro, 0, torch.device("cpu"), shared_prefix=shared)
        B.score_micro_batches(mbs, None, None, 0.7)
        assert all(mb.ref_logp is None and mb.old_logp is None for mb in mbs)


def test_a_step_takes_its_advantages_and_micro_batches_as_the_config_says(monkeypatch):
    """train_step: the group advantages of the episode's rewards, scaled by their std or not
    (scale_advantages: Dr. GRPO), go to episode_micro_batches with the config's micro-batch size,
    skip_no_signal_groups and shared_prefix."""
    from types import SimpleNamespace

    from r3 import train as T
    from r3.config import TrainConfig

    class Built(Exception):
        pass

    seen = {}

    def capture(ep, adv, size, pad_id, device, **kw):
        seen.update(adv=adv, size=size, pad_id=pad_id, **kw)
        raise Built

    ep = SimpleNamespace(rewards=torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    monkeypatch.setattr(T, "sync_rollout_weights", lambda *a: None)
    monkeypatch.setattr(T, "rollout", lambda run, step: ep)
    monkeypatch.setattr(T, "verifier_error_counts", lambda task: (0, 0, None))
    monkeypatch.setattr(T, "episode_micro_batches", capture)
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    s3 = 1 / math.sqrt(3)  # the unbiased std of (1, 0, 0)
    for scale, skip, shared, want in ((True, True, True, [2 / 3 / (s3 + 1e-6), -1 / 3 / (s3 + 1e-6)]),
                                      (False, False, False, [2 / 3, -1 / 3])):
        cfg = TrainConfig(scale_advantages=scale, skip_no_signal_groups=skip, shared_prefix=shared,
                          micro_batch_size=5).validate()
        run = SimpleNamespace(cfg=cfg, d=one_rank, policy=None, rollout_model=None, task=None,
                              tokenizer=SimpleNamespace(pad_token_id=7))
        with pytest.raises(Built):
            T.train_step(run, 0)
        a, b = want
        torch.testing.assert_close(seen["adv"], torch.tensor([[a, b, b], [0.0, 0.0, 0.0]]))
        assert (seen["size"], seen["pad_id"], seen["skip_no_signal"], seen["shared_prefix"]) == (5, 7, skip, shared)


def test_kept_rows_leave_out_only_groups_whose_advantages_are_all_zero():
    from r3.batch import kept_rows

    adv = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert kept_rows(adv, True) == [0, 1, 2, 6, 7, 8]
    assert kept_rows(adv, False) == list(range(9))
    assert kept_rows(torch.zeros(0, 3), True) == []


def test_checkpoints_are_listed_by_step_and_only_the_last_keep_last_stay(tiny_model, tmp_path):
    """checkpoint_dirs: complete checkpoints only (a trainer_state.json), in step order (also past
    six digits); save_checkpoint keeps the last keep_last and can write the same step again."""
    from r3.rundir import checkpoint_dirs, save_checkpoint

    root = tmp_path / "listing" / "checkpoints"
    for name, complete in (("step_1000000", True), ("step_999999", True), ("step_000005", False), ("notes", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in checkpoint_dirs(tmp_path / "listing")] == ["step_999999", "step_1000000"]

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=2)
    for step in (9, 10, 11, 11):
        save_checkpoint(tmp_path, step, policy, opt, sched, stream, cfg, d)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000010", "step_000011"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010", "step_000011"]


def test_checkpoints_written_after_resuming_past_a_damaged_newer_one_are_kept(tiny_model, tmp_path):
    """A resume that skips a damaged newest checkpoint redoes its steps: the checkpoints it then
    writes must stay, not be pruned in favour of the damaged one (which sorts last): with
    keep_last 1 every new checkpoint was deleted as it was written, and the next interruption
    found nothing readable; a later resume would also jump past steps whose log rows were dropped."""
    from r3.rundir import checkpoint_dirs, resume, save_checkpoint

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=2)
    for step in (2, 4):
        save_checkpoint(tmp_path, step, policy, opt, sched, stream, cfg, d)
    shard = next((tmp_path / "checkpoints" / "step_000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert resume(tmp_path, policy, opt, sched, stream, d) == 2
    cfg.keep_last = 1  # (a setting a resume may change)
    save_checkpoint(tmp_path, 3, policy, opt, sched, stream, cfg, d)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000003"]
    assert resume(tmp_path, policy, opt, sched, stream, d) == 3


def test_a_checkpoint_without_its_metadata_file_is_skipped_without_a_traceback(tiny_model, tmp_path, caplog, capsys):
    """A checkpoint copied without its hidden .metadata (``cp step_N/* ...`` skips it): DCP logged
    two Python tracebacks on the root logger (global, then rank-local metadata not found) before
    r3's one-line warning."""
    from r3.rundir import resume, save_checkpoint

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=2)
    for step in (2, 4):
        save_checkpoint(tmp_path, step, policy, opt, sched, stream, cfg, d)
    newest = tmp_path / "checkpoints" / "step_000004"
    (newest / ".metadata").unlink()
    capsys.readouterr()
    caplog.clear()
    assert resume(tmp_path, policy, opt, sched, stream, d) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"warning: checkpoint {newest} cannot be read (no {newest / '.metadata'}); trying the one before it"]


def test_resume_keeps_rows_without_a_step_and_rewrites_the_log_atomically(tmp_path, monkeypatch):
    from r3 import rundir
    from r3.errors import R3Error

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start"}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    calls = []
    real = rundir.write_text_atomic
    monkeypatch.setattr(rundir, "write_text_atomic", lambda p, text: (calls.append(p), real(p, text)))
    assert rundir.truncate_jsonl(path, 2) == [{"event": "start"}, {"step": 1}, {"step": 2}]
    assert path.read_text() == '{"event": "start"}\n{"step": 1}\n{"step": 2}\n' and calls == [path]
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(R3Error, match=r"metrics.jsonl: line 2 is not a JSON object; repair or remove the file"):
        rundir.truncate_jsonl(path, 2)


def test_seed_samples_every_and_skip_no_signal_groups_reach_the_run(tiny_model, tmp_path):
    """--seed orders the training queries; --samples-every 0 logs the rewarded retries only;
    --skip-no-signal-groups false trains every group's reflections (zero advantage included)."""
    from r3.config import TrainConfig
    from r3.train import step_seed

    args = BASE + ["--model", str(tiny_model), "--max-steps", "1", "--log-samples", "100", "--batch-size", "4", "--group-size", "2"]
    run_train(args + ["--out", str(tmp_path / "a"), "--seed", "1"])
    run_train(args + ["--out", str(tmp_path / "b"), "--seed", "2"])
    run_train(args + ["--out", str(tmp_path / "c"), "--seed", "1", "--samples-every", "0", "--skip-no-signal-groups",
                      "false"])

    def samples(name):
        return [json.loads(x) for x in (tmp_path / name / "samples.jsonl").read_text().splitlines()]

    a, b, c = samples("a"), samples("b"), samples("c")
    assert a and b and c  # (each run logged samples: the subset checks below hold on nothing)
    assert any(s["reward"] == 0.0 for s in a) and all(s["reward"] == 1.0 for s in c)
    from r3.train import QueryStream

    sys.path.insert(0, str(HERE / "helpers"))
    from r3_test_tasks import CoinTask

    for run, seed in ((a, 1), (b, 2)):  # step 1's 8 candidates are the first 8 of the seed's order
        taken = {ex["id"] for ex in QueryStream(CoinTask().examples("train"), seed).take(8, 0, 1)}
        assert {s["example"]["id"] for s in run} <= taken, seed
    assert {s["example"]["id"] for s in a} != {s["example"]["id"] for s in b}
    (ra,), (rc,) = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "c")
    assert ra["groups_with_signal"] < ra["groups"]  # (a group without signal, for the next line to mean something)
    assert ra["trained_tokens"] < rc["trained_tokens"] == rc["reflection_tokens"] == ra["reflection_tokens"]
    # each rank samples its own rollouts, each step anew, each seed otherwise
    seeds = {step_seed(cfg, step, rank) for cfg in (TrainConfig(seed=0), TrainConfig(seed=1))
             for step in range(3) for rank in range(4)}
    assert len(seeds) == 24


def test_scoring_reshards_the_reference_once_after_its_forwards():
    """FSDP2 keeps the root's parameters gathered after a forward of the frozen reference, whose
    backward never comes: score_micro_batches reshards it once after scoring (not the policy)."""
    from r3 import batch as B

    reference, seqs, spans = _policy_and_rows(seed=0)
    old_policy, _, _ = _policy_and_rows(seed=1)
    calls = []
    reference.reshard = lambda: calls.append("reference")
    old_policy.reshard = lambda: calls.append("policy")
    mbs = B.make_micro_batches(seqs, spans, [1.0] * 6, 2, 0, torch.device("cpu"))
    B.score_micro_batches(mbs, reference, old_policy, 1.0)
    assert calls == ["reference"] and all(mb.ref_logp is not None for mb in mbs)
    B.score_micro_batches(mbs, None, old_policy, 1.0)
    assert calls == ["reference"]


def test_a_resumed_dtype_falls_back_to_auto_on_a_config_that_is_not_an_object(tmp_path, monkeypatch, capsys):
    """resolve_dtype reads a resumed run's dtype from config.json; a file that is JSON but not an
    object (set_up refuses it later, in one line) falls back to auto instead of a traceback. The
    warning of an emulated bf16 is rank 0's line only."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.precision import resolve_dtype_name

    cpu = torch.device("cpu")
    (tmp_path / "config.json").write_text("[1, 2]")
    cfg = TrainConfig(out=str(tmp_path)).validate()
    T.resolve_dtype(cfg, T.Dist(rank=0, world=1, local_rank=0, device=cpu, mesh=None))
    assert cfg.dtype == resolve_dtype_name("auto", cpu)
    capsys.readouterr()
    monkeypatch.setattr(T, "slow_bf16_warning", lambda device: "warning: emulated bf16")
    for rank in (1, 0):
        T.resolve_dtype(TrainConfig(dtype="bf16").validate(), T.Dist(rank=rank, world=2, local_rank=rank, device=cpu,
                                                                      mesh=None))
        assert capsys.readouterr().out == ("warning: emulated bf16\n" if rank == 0 else ""), rank


@pytest.mark.parametrize("kind", ["llama", "gemma4"])
def test_build_models_keeps_fp32_master_weights_and_a_tied_rollout_copy_in_the_compute_dtype(tiny_model, builtin,
                                                                                           tmp_path, kind):
    """In bf16 the policy's (sharded) master weights stay fp32, the frozen reference and the plain
    rollout copy are bf16; the copy's head is tied to its embeddings, so after a sync every tensor
    is the policy's (Gemma 4's layer-scalar buffers too, which the empty copy held no value of);
    the activation-checkpointing setting reaches the policy."""
    from torch.distributed.tensor import DTensor

    from conftest import make_tiny_hf
    from r3 import train as T
    from r3.config import TrainConfig

    if kind == "gemma4":
        tiny_model = tmp_path / "gemma4"
        make_tiny_hf(tiny_model, "gemma4", vocab_size=49152, vocab_size_per_layer_input=49152)
        builtin[1].save_pretrained(str(tiny_model))
    d = T.init_distributed()
    cfg = TrainConfig(model=str(tiny_model), dtype="bf16", activation_checkpointing=True).validate()
    policy, reference, rollout, _ = T.build_models(cfg, d)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())
    assert all(not isinstance(p, DTensor) and p.dtype == torch.bfloat16 for p in rollout.parameters())
    assert policy.activation_checkpointing and not reference.activation_checkpointing
    T.sync_rollout_weights(policy, rollout)
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in policy.state_dict().items()}
    got = rollout.state_dict()
    assert got.keys() == full.keys() and "lm_head.weight" in got
    assert all(torch.equal(got[k], full[k].to(torch.bfloat16)) for k in got)
    if kind == "gemma4":
        assert not torch.equal(got["layers.0.layer_scalar"], torch.ones(1, dtype=torch.bfloat16))
    # the sharded policy computes in bf16 as the reference does (FSDP2 casts its parameters, not its
    # buffers: Gemma 4's fp32 layer scalars made the stream fp32 after the first block, and the next
    # block's bf16 matmul refused it), through activation checkpointing too, and its loss backpropagates
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = policy(tokens)
    with torch.no_grad():
        assert torch.equal(logits.detach(), reference(tokens))
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in policy.parameters())


def test_the_fingerprint_of_the_training_examples_is_stable_and_separates_items():
    """What a checkpoint records of its data: SHA-256 of one sorted-key JSON line per item, the
    same for the same items read with their keys in another order, other for items that run
    together ([12, 3] and [1, 23]); items whose keys do not sort (int and str mixed) have one too.
    A stream needs items."""
    import hashlib

    from r3 import train as T
    from r3.errors import R3Error

    assert T.QueryStream([1, {"b": 2, "a": [3]}], 0).fingerprint == \
        hashlib.sha256(b'1\n{"a": [3], "b": 2}\n').hexdigest()
    assert T.QueryStream([{"a": 1, "b": 2}], 0).fingerprint == T.QueryStream([{"b": 2, "a": 1}], 5).fingerprint
    assert T.QueryStream([12, 3], 0).fingerprint != T.QueryStream([1, 23], 0).fingerprint
    assert len(T.QueryStream([{1: "x", "y": 2}], 0).fingerprint) == 64
    with pytest.raises(R3Error, match="no training examples"):
        T.QueryStream([], 0)


def test_a_warmup_as_long_as_the_run_has_no_zero_span():
    """warmup_steps >= max_steps is allowed: the scheduler's step after the last one (and a resume
    of a finished run) evaluates the schedule at max_steps, past the warmup."""
    from r3.config import TrainConfig
    from r3.train import lr_lambda

    f = lr_lambda(TrainConfig(max_steps=2, warmup_steps=2, min_lr_ratio=0.1).validate())
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0], rel=1e-12)
    g = lr_lambda(TrainConfig(max_steps=2, warmup_steps=5, min_lr_ratio=0.1).validate())
    assert g(5) == pytest.approx(1.0) and g(6) == pytest.approx(0.1)


def test_the_update_clips_the_gradient_norm_and_reports_it_before_clipping():
    """grad_clip bounds the step (plain SGD at lr 1: the weights move by the clipped gradient) and
    the reported grad_norm is the norm before clipping; grad_clip 0 does not clip."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    moved = {}
    for clip in (1e-3, 0.0):
        cfg = TrainConfig(dtype="fp32", beta=0.0, grad_clip=clip, max_reflection_tokens=8).validate()
        model = copy.deepcopy(base)
        mbs = B.make_micro_batches(seqs, spans, [1.0, -0.5, -0.5, 0.8, -1.2, 0.4], 2, 0, torch.device("cpu"))
        stats = T.update(model, torch.optim.SGD(model.parameters(), lr=1.0), mbs, len(mbs), cfg, one_rank)
        moved[clip] = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), base.parameters())]).norm().item()
        assert stats["grad_norm"] > 1e-2 and not stats["skipped"]
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert moved[0.0] == pytest.approx(stats["grad_norm"], rel=1e-3)


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step():
    """The guard reads the gradient norm as well as the loss: an infinite gradient (the loss
    itself finite) leaves the weights as they were."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, max_reflection_tokens=8).validate()
    model = copy.deepcopy(base)
    next(model.parameters()).register_hook(lambda g: g + float("inf"))
    mbs = B.make_micro_batches(seqs, spans, [1.0, -0.5, -0.5, 0.8, -1.2, 0.4], 6, 0, torch.device("cpu"))
    stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.1), mbs, len(mbs), cfg, one_rank)
    assert math.isfinite(stats["loss"]) and not math.isfinite(stats["grad_norm"]) and stats["skipped"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_later_update_epochs_report_the_sampler_gap_before_the_update_and_the_last_epochs_norm(monkeypatch):
    """With update_epochs 2: logp_diff_* compare the sampler's log-probs with the policy's before
    the first optimizer step (here the same: ~0, however far the step moves it), each token once;
    grad_norm is the last epoch's; a step skipped in the first epoch is reported skipped."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, grad_clip=0.0, max_reflection_tokens=8, update_epochs=2,
                      temperature=1.0).validate()
    real = torch.nn.utils.clip_grad_norm_
    for first_bad in (False, True):
        norms = []

        def clip(params, max_norm, first_bad=first_bad, norms=norms):
            gn = real(params, max_norm)
            norms.append(float(gn))
            return torch.tensor(float("inf")) if first_bad and len(norms) == 1 else gn

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        model = copy.deepcopy(base)
        mbs = B.make_micro_batches(seqs, spans, [1.0, -0.5, -0.5, 0.8, -1.2, 0.4], 2, 0, torch.device("cpu"))
        with torch.no_grad():
            for mb in mbs:
                mb.rollout_logp = B.token_logprobs(model, mb, 1.0)[0].float()
        B.score_micro_batches(mbs, None, model, 1.0)
        stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.5), mbs, len(mbs), cfg, one_rank)
        assert stats["skipped"] == first_bad and len(norms) == 2 and (first_bad or norms[0] != norms[1])
        assert stats["grad_norm"] == norms[1]
        assert stats["logp_diff_max"] < 1e-5 and stats["logp_diff_tokens"] == sum(e - s for s, e in spans)
        if not first_bad:
            moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), base.parameters()))
            assert moved > 1e-2  # (the first step moved it: a gap read after it would show)


def _stand_in_run(tmp_path, d, **cfg):
    """A Run of stand-ins (no model) for the loop's bookkeeping: config, ranks, out dir, tracker."""
    from types import SimpleNamespace

    from r3.config import TrainConfig

    logged = []
    tracker = SimpleNamespace(log_metrics=lambda row, step, kind="train": logged.append((kind, step, row)),
                              log_samples=lambda samples, step: logged.append(("samples", step, samples)))
    return SimpleNamespace(cfg=TrainConfig(**cfg).validate(), d=d, out=tmp_path, task=None, policy="policy",
                           rollout_model="rollout", tokenizer="tok", chat="chat", optimizer=None, scheduler=None,
                           stream=None, failures=None, start_step=0, tracker=tracker, steps_without_signal=None,
                           peak_flops=1.0, logged=logged)


def test_each_rank_rolls_out_its_own_share_with_its_own_seed(tmp_path, monkeypatch):
    """rollout on rank 1 of 2: fresh mode takes ceil(batch_size / ranks * candidates per failure)
    first attempts for this rank (the pool measured on the recent first-attempt success) and keeps
    batch_size / ranks failures; stored failures: batch_size / ranks records with their attempts;
    the seed is this rank's."""
    from r3 import train as T

    calls = []
    monkeypatch.setattr(T, "run_episode", lambda *a, **kw: calls.append((a, kw)) or "episode")
    rank1 = T.Dist(rank=1, world=2, local_rank=1, device=torch.device("cpu"), mesh=None)
    run = _stand_in_run(tmp_path, rank1, batch_size=2, group_size=4, seed=3)
    items = [{"id": i} for i in range(40)]
    run.stream = T.QueryStream(items, seed=3)
    run.stream.recent_first_success = [0.5]  # 2.5 candidates per failure
    order = T.QueryStream(items, seed=3).take(40, 0, 1)
    assert T.rollout(run, 4) == "episode"
    (args, kw), = calls
    assert args == ("rollout", "tok", None, order[3:6])  # ceil(1 * 2.5) = 3 per rank, rank 1's
    assert run.stream.position == 6
    assert kw["max_failures"] == 1 and kw["group_size"] == 4 and kw["failed_attempts"] is None
    assert kw["seed"] == T.step_seed(run.cfg, 4, 1) != T.step_seed(run.cfg, 4, 0) and kw["chat"] == "chat"
    records = [{"example": {"id": i}, "attempt_tokens": [i, i]} for i in range(10)]
    run.failures, run.stream = records, T.QueryStream(records, seed=3)
    stored = T.QueryStream(records, seed=3).take(10, 0, 1)
    T.rollout(run, 0)
    args, kw = calls[-1]
    assert args[3] == [stored[1]["example"]] and kw["failed_attempts"] == [stored[1]["attempt_tokens"]]
    assert run.stream.position == 2 and kw["max_failures"] == 1


def test_each_rank_evaluates_its_share_of_the_held_out_queries(tmp_path, monkeypatch):
    """held_out_eval splits the eval_n test queries over the ranks (rank r: every world-th from r),
    samples them at eval_temperature with the run's seed + 17 (as r3.train always has), and
    reduces the counts into accuracies over the queries; only rank 0 writes eval.jsonl."""
    import contextlib

    from r3 import train as T

    seen = []
    monkeypatch.setattr(T, "examples_of", lambda task, split, n, seed: list(range(n)))

    def evaluate(model, tok, task, mine, sampling, seed, batch_size, chat):
        seen.append((mine, sampling.temperature, seed))
        return {"n": len(mine), "first_success": 1, "second_success": len(mine), "verifier_errors": 0, "verdicts": 9}

    monkeypatch.setattr(T, "evaluate_examples", evaluate)
    monkeypatch.setattr(T, "all_sum", lambda values, d: [2 * v for v in values])  # (two ranks alike)
    monkeypatch.setattr(T, "fail_together", lambda d: contextlib.nullcontext())
    for rank in (1, 0):
        d = T.Dist(rank=rank, world=2, local_rank=rank, device=torch.device("cpu"), mesh=None)
        row = T.held_out_eval(_stand_in_run(tmp_path, d, eval_n=5, seed=4, eval_temperature=0.3), 3)
        assert seen[-1] == (list(range(rank, 5, 2)), 0.3, 21)
        n = 2 * len(seen[-1][0])
        assert row == {"step": 3, "n": n, "first_attempt_accuracy": 2 / n, "second_attempt_accuracy": 1.0}
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [3]
    monkeypatch.setattr(T, "all_sum", lambda values, d: values)  # one query in all
    row = T.held_out_eval(_stand_in_run(tmp_path, d, eval_n=1), 4)
    assert (row["n"], row["first_attempt_accuracy"], row["second_attempt_accuracy"]) == (1, 1.0, 1.0)


def test_step_end_evaluates_saves_and_stops_on_its_cadence(tmp_path, monkeypatch):
    """step_end over a 5-step run: eval_every 2 and save_every 2 evaluate and save after steps 2
    and 4 and at the end; stop_after at the last step, or a signal during it, still finishes the
    run (0: the export follows); a signal earlier saves and returns its number, stop_after -1.
    Each evaluation syncs the rollout copy first; the ETA counts the steps done."""
    from types import SimpleNamespace

    from r3 import train as T

    saved, evals, etas = [], [], []
    monkeypatch.setattr(T, "save_checkpoint", lambda out, step, *a: saved.append(step))
    synced = []
    monkeypatch.setattr(T, "sync_rollout_weights", lambda policy, rollout: synced.append(len(evals)))
    monkeypatch.setattr(T, "held_out_eval", lambda run, step: evals.append(step) or {"step": step})
    monkeypatch.setattr(T, "format_step_line", lambda row, max_steps, eta: f"step {row['step']}")
    real_eta = T.eta_s
    monkeypatch.setattr(T, "eta_s", lambda clock, done, total, now: etas.append(done) or real_eta(clock, done, total, now))
    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    ep = SimpleNamespace(records=[])

    def steps(signals=(), **cfg):
        run = _stand_in_run(tmp_path, d, max_steps=5, save_every=2, eval_every=2, eval_n=4, **cfg)
        saved.clear(), evals.clear(), etas.clear(), synced.clear()
        out = []
        for step in range(5):
            out.append(T.step_end(run, step, {"step": step + 1}, ep, (0.0, 0), lambda s=step: 15 if s in signals else 0))
            if out[-1]:
                break
        assert etas == list(range(1, len(out) + 1))
        assert synced == list(range(len(evals)))  # (each evaluation of the weights just updated)
        return out

    assert steps() == [0] * 5 and saved == [2, 4, 5] and evals == [2, 4, 5]
    assert steps(stop_after=5) == [0] * 5 and saved == [2, 4, 5]
    assert steps(signals=(4,)) == [0] * 5 and saved == [2, 4, 5]
    assert steps(signals=(0,)) == [15] and saved == [1] and evals == []
    assert steps(stop_after=3) == [0, 0, -1] and saved == [2, 3] and evals == [2]


def test_the_loop_stops_without_an_export_and_times_from_the_second_step(tmp_path, monkeypatch):
    """train_loop: a fresh run evaluates before its first step (a resumed one does not); stop_after
    ends the loop with no export; the ETA's clock starts after the process's first step."""
    from r3 import train as T

    calls = []
    monkeypatch.setattr(T, "sync_rollout_weights", lambda policy, rollout: calls.append("sync"))
    monkeypatch.setattr(T, "held_out_eval", lambda run, step: calls.append(("eval", step)) or {"step": step})
    monkeypatch.setattr(T, "train_step", lambda run, step: ({"step": step + 1}, None))
    monkeypatch.setattr(T, "export", lambda out, policy, tok, d: calls.append("export") or out / "export")

    def step_end(run, step, row, ep, clock, signum):
        calls.append(("step", step, clock[1]))
        return -1 if step + 1 == run.cfg.stop_after else 0

    monkeypatch.setattr(T, "step_end", step_end)
    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    run = _stand_in_run(tmp_path, d, max_steps=4, eval_n=2, stop_after=2)
    assert T.train_loop(run) == {"step": 2}
    assert calls == ["sync", ("eval", 0), ("step", 0, 0), ("step", 1, 1)]
    calls.clear()
    run = _stand_in_run(tmp_path, d, max_steps=4, eval_n=2)
    run.start_step = 1
    assert T.train_loop(run) == {"step": 4}
    assert calls == [("step", 1, 1), ("step", 2, 2), ("step", 3, 2), "export"]


def test_samples_keep_every_rewarded_retry_and_the_first_unrewarded_ones_every_n_steps():
    """sample_records: rewarded retries always; log_samples unrewarded ones at the steps that are
    multiples of samples_every; each with the verifier's reason for the retry (the episode's, given
    with the verdict: the verifier is not asked again)."""
    from types import SimpleNamespace

    from r3 import train as T
    from r3.config import TrainConfig

    ep = SimpleNamespace(records=[{"example": i, "attempt": f"a{i}", "retry": f"r{i}", "reward": float(i == 3),
                                   "reason": f"{i}: r{i}"} for i in range(4)])
    cfg = TrainConfig(samples_every=2, log_samples=2).validate()
    got = {step: T.sample_records(ep, step, cfg, 1) for step in (1, 2, 3, 4)}
    assert [r["row"] for r in got[1]] == [r["row"] for r in got[3]] == [3]
    assert [r["row"] for r in got[2]] == [r["row"] for r in got[4]] == [0, 1, 3]
    assert [r["reason"] for r in got[2]] == ["0: r0", "1: r1", "3: r3"]
    assert all(r["step"] == 2 and r["rank"] == 1 for r in got[2])


REDUCE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from r3.distributed import _exit_hard, all_max, all_sum, init_distributed

    d = init_distributed()
    got = [all_max(d.rank + 1, d), all_max(0.5 + d.rank, d), all_max(-d.rank, d), all_sum({"a": d.rank + 1, "b": 0.25}, d)]
    with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as f:
        json.dump([got, [type(x).__name__ for x in got[:3]]], f)
    dist.barrier()
    dist.destroy_process_group()
    _exit_hard(0)
    """
)


def test_all_max_and_all_sum_agree_on_every_rank(tmp_path):
    """all_max is the largest value over the ranks (an int stays an int), all_sum the sum, by key."""
    _run_on_two_ranks(REDUCE_SCRIPT, tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == \
            [[2, 1.5, 0, {"a": 3.0, "b": 0.5}], ["int", "float", "int"]]


SYNC_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from conftest import tiny_hf_config
    from r3 import train as T
    from r3.distributed import _exit_hard
    from r3.model import ModelConfig, Transformer

    d = T.init_distributed()
    torch.manual_seed(0)  # (the same weights on both ranks)
    cfg = ModelConfig.from_hf(tiny_hf_config("qwen2").to_dict())
    policy, rollout = Transformer(cfg), Transformer(cfg).to(torch.bfloat16)
    want = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    T.shard(policy, d, torch.float32)
    T.sync_rollout_weights(policy, rollout)
    got = rollout.state_dict()
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want), "rollout copy"
    dist.barrier()
    dist.destroy_process_group()
    _exit_hard(0)
    """
)


def test_the_rollout_copy_gathers_every_ranks_shard(tmp_path):
    """sync_rollout_weights on 2 ranks: the plain rollout copy holds the whole policy (each rank's
    shard gathered), in the compute dtype."""
    _run_on_two_ranks(SYNC_SCRIPT, tmp_path, HERE)


def _stand_in_step(tmp_path, monkeypatch, d, got, **cfg):
    """A Run whose train_step runs on stand-ins (rollout, micro-batches, scoring, update, metrics):
    what reaches them lands in ``got``."""
    from types import SimpleNamespace

    from r3 import train as T

    ep = SimpleNamespace(rewards=torch.tensor([[1.0, 0.0]]))
    monkeypatch.setattr(T, "sync_rollout_weights", lambda policy, rollout: None)
    monkeypatch.setattr(T, "rollout", lambda run, step: ep)
    monkeypatch.setattr(T, "verifier_error_counts", lambda task: (0, 2, None))
    monkeypatch.setattr(T, "all_max", lambda value, d: max(value, 3))  # (another rank has 3 micro-batches)
    monkeypatch.setattr(T, "episode_micro_batches", lambda *a, **kw: ["real"])
    monkeypatch.setattr(T, "score_micro_batches", lambda mbs, ref, old, t: got.update(score=(len(mbs), ref, old)))
    monkeypatch.setattr(T, "update", lambda policy, opt, mbs, n_real, cfg, d: got.update(update=(mbs, n_real)) or {})
    monkeypatch.setattr(T, "training_flops", lambda run, ep, adv: 0)
    monkeypatch.setattr(T, "step_metrics", lambda step, *a, lr, **kw: {"step": step, "lr": lr, "first_try_success": 0.5})
    run = _stand_in_run(tmp_path, d, **cfg)
    run.reference, run.tokenizer, run.stream = "reference", SimpleNamespace(pad_token_id=0), SimpleNamespace(position=0)
    run.stream.recent_first_success = []
    group = {"lr": 0.5}
    run.optimizer = SimpleNamespace(param_groups=[group])
    run.scheduler = SimpleNamespace(step=lambda: group.update(lr=0.25))
    return run


def test_a_step_pads_to_the_most_micro_batches_of_any_rank_and_logs_the_lr_it_used(tmp_path, monkeypatch):
    """train_step: a rank with fewer micro-batches than another adds dummies up to the largest
    count (FSDP's collectives stay in step), only the real ones counted; the reference scores only
    where beta > 0, the pre-update policy only with more than one update epoch; the logged lr is
    the one the update used (read before the scheduler steps); the first-attempt success is kept."""
    from r3 import train as T

    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    for beta, epochs in ((0.04, 1), (0.0, 2)):
        got = {}
        run = _stand_in_step(tmp_path, monkeypatch, d, got, beta=beta, update_epochs=epochs)
        row, _ = T.train_step(run, 6)
        mbs, n_real = got["update"]
        assert len(mbs) == 3 and mbs[0] == "real" and n_real == 1
        assert all(mb.mask.sum() == 0 for mb in mbs[1:])
        assert got["score"] == ((3, "reference", None) if beta else (3, None, "policy"))
        assert row == {"step": 7, "lr": 0.5, "first_try_success": 0.5, "verifier_errors": 0}
        assert run.stream.recent_first_success == [0.5]


def test_verifier_errors_in_a_step_or_an_evaluation_are_said_by_rank_0(tmp_path, monkeypatch, capsys):
    """Some verdicts failed (summed over ranks): rank 0 warns once, the other ranks say nothing;
    all failed: every rank stops with the error."""
    import contextlib

    from r3 import train as T
    from r3.errors import R3Error

    monkeypatch.setattr(T, "all_sum", lambda values, d: values)  # (the other rank's counts: none)
    monkeypatch.setattr(T, "gather_to_main", lambda items, d: items)
    monkeypatch.setattr(T, "fail_together", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(T, "examples_of", lambda task, split, n, seed: list(range(n)))
    counts = {}
    monkeypatch.setattr(T, "evaluate_examples", lambda *a, **kw: {
        "n": 2, "first_success": 1, "second_success": 1, "verifier_errors": counts["errors"], "verdicts": counts["calls"],
        "first_verifier_error": "KeyError: 'answr'"})
    for rank in (0, 1):
        d = T.Dist(rank=rank, world=2, local_rank=rank, device=torch.device("cpu"), mesh=None)
        run = _stand_in_step(tmp_path, monkeypatch, d, {}, eval_n=4)
        for errors, calls in ((1, 4), (4, 4)):
            counts.update(errors=errors, calls=calls)
            monkeypatch.setattr(T, "verifier_error_counts", lambda task: (errors, calls, "KeyError: 'answr'"))
            for what, call in (("in step 3", lambda: T.train_step(run, 2)),
                               ("in the evaluation at step 5", lambda: T.held_out_eval(run, 5))):
                if errors < calls:
                    got = call()
                    if what == "in step 3":  # (the step's row counts them, on every rank: all ranks' sum)
                        assert got[0]["verifier_errors"] == 1
                    err = capsys.readouterr().err
                    assert err == ("" if rank else "warning: the task's verifier failed on 1 completion "
                                   f"{what}{' (all ranks)' if what == 'in step 3' else ''}; they count as wrong "
                                   "(first: KeyError: 'answr')\n"), (rank, what)
                else:
                    with pytest.raises(R3Error, match=f"failed on all 4 completions {what}"):
                        call()


def test_an_evaluation_names_the_first_verifier_error_of_another_rank(tmp_path, monkeypatch, capsys):
    """Only rank 1's verifier raised in the held-out evaluation: rank 0 says so with rank 1's
    first error, as a training step does, not with "first: None"."""
    import contextlib

    from r3 import train as T

    others = {3: [2, 1, 1], 2: [1, 4]}  # (rank 1's counts, by the length of what is summed)
    monkeypatch.setattr(T, "all_sum", lambda values, d: [a + b for a, b in zip(values, others[len(values)])])
    monkeypatch.setattr(T, "gather_to_main", lambda items, d: items + ["ValueError: rank 1's"])
    monkeypatch.setattr(T, "fail_together", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(T, "examples_of", lambda task, split, n, seed: list(range(n)))
    monkeypatch.setattr(T, "evaluate_examples", lambda *a, **kw: {
        "n": 2, "first_success": 1, "second_success": 1, "verifier_errors": 0, "verdicts": 4,
        "first_verifier_error": None})
    d = T.Dist(rank=0, world=2, local_rank=0, device=torch.device("cpu"), mesh=None)
    run = _stand_in_step(tmp_path, monkeypatch, d, {}, eval_n=4)
    row = T.held_out_eval(run, 5)
    assert capsys.readouterr().err == ("warning: the task's verifier failed on 1 completion in the evaluation at "
                                       "step 5; they count as wrong (first: ValueError: rank 1's)\n")
    assert row == {"step": 5, "n": 4, "first_attempt_accuracy": 0.5, "second_attempt_accuracy": 0.5}


UNEVEN_SCRIPT = textwrap.dedent(
    """
    import copy, sys, torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from conftest import tiny_hf_config
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.distributed import _exit_hard
    from r3.model import ModelConfig, Transformer

    d = T.init_distributed()
    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_hf(tiny_hf_config("qwen2").to_dict()))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 12, 7, 10)]
    spans, adv = [(3, 8), (4, 11), (2, 6), (5, 9)], [1.0, -0.5, 0.75, -1.0]
    cfg = TrainConfig(dtype="fp32", beta=0.0, grad_clip=0.0, max_reflection_tokens=8).validate()
    mine = slice(0, 3) if d.rank == 0 else slice(3, 4)  # rank 0: 3 micro-batches, rank 1: 1 and 2 dummies
    start = copy.deepcopy(base.state_dict())
    policy = copy.deepcopy(base)
    T.shard(policy, d, torch.float32)
    mbs = B.make_micro_batches(seqs[mine], spans[mine], adv[mine], 1, 0, d.device)
    padded = mbs + [T.dummy_micro_batch(d.device) for _ in range(T.all_max(len(mbs), d) - len(mbs))]
    assert len(padded) == 3
    T.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), padded, len(mbs), cfg, d)
    got = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:  # the same update on one rank, every row
        one = T.Dist(rank=0, world=1, local_rank=0, device=d.device, mesh=None)
        mbs = B.make_micro_batches(seqs, spans, adv, 4, 0, d.device)
        T.update(base, torch.optim.SGD(base.parameters(), lr=1.0), mbs, len(mbs), cfg, one)
        for k, v in base.state_dict().items():
            assert torch.allclose(got[k], v, atol=2e-6, rtol=1e-5), k
        assert max((got[k] - v).abs().max().item() for k, v in start.items()) > 1e-4  # (it moved)
    dist.barrier()
    dist.destroy_process_group()
    _exit_hard(0)
    """
)


def test_a_rank_with_fewer_micro_batches_trains_in_step_through_dummies(tmp_path):
    """update on 2 ranks with 3 micro-batches on one and 1 (plus 2 dummies) on the other: the
    dummies take part in every collective and add nothing, so the update is the 1-rank one."""
    _run_on_two_ranks(UNEVEN_SCRIPT, tmp_path, HERE)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_dummy_micro_batches_add_nothing_to_the_loss_or_its_denominator(agg):
    """mbs[n_real:] are dummies (a rank with fewer micro-batches than another): the update and
    its loss are those without them, in every aggregation (seq-mean-token-sum-norm counts rows)."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, agg=agg, grad_clip=0.0, max_reflection_tokens=8).validate()
    runs = []
    for dummies in (0, 2):
        model = copy.deepcopy(base)
        mbs = B.make_micro_batches(seqs, spans, [1.0, -0.5, -0.5, 0.8, -1.2, 0.4], 3, 0, torch.device("cpu"))
        padded = mbs + [T.dummy_micro_batch(torch.device("cpu")) for _ in range(dummies)]
        stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.1), padded, len(mbs), cfg, one_rank)
        runs.append((stats["loss"], [p.detach().clone() for p in model.parameters()]))
    (la, wa), (lb, wb) = runs
    assert la == pytest.approx(lb, rel=1e-6) and all(torch.allclose(a, b, atol=1e-7, rtol=1e-6) for a, b in zip(wa, wb))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_the_update_is_the_whole_batch_loss_whatever_the_micro_batching(agg):
    """update() on one rank divides every micro-batch by the step's denominator, so its loss is
    the whole batch's, by hand: at ratio 1 (first epoch) and beta 0 each reflection token's loss is
    -A, over 21 tokens in 6 rows, or Dr. GRPO's fixed 6 rows x max_reflection_tokens (8), not the
    micro-batches' padded widths; and the SGD step is the same for 6 rows per micro-batch, 1, 4
    (uneven) or shared-prefix packing (in-process; the 2-rank run is in
    test_update_same_on_1_and_2_ranks_and_any_micro_batching)."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    lengths = [e - s for s, e in spans]
    assert lengths == [4, 2, 6, 3, 5, 1]
    adv = [1.0, -0.5, -0.5, 0.8, -1.2, 0.9]
    weighted = sum(a * n for a, n in zip(adv, lengths))  # -2.7
    want = {"token-mean": -weighted / 21, "seq-mean-token-mean": -sum(adv) / 6,
            "seq-mean-token-sum-norm": -weighted / (6 * 8)}[agg]
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, agg=agg, grad_clip=0.0, max_reflection_tokens=8).validate()
    weights = []
    for micro, shared in ((6, False), (1, False), (4, False), (2, True)):
        model = copy.deepcopy(base)
        mbs = B.make_micro_batches(seqs, spans, adv, micro, 0, torch.device("cpu"), shared_prefix=shared)
        stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.1), mbs, len(mbs), cfg, one_rank)
        assert stats["loss"] == pytest.approx(want, rel=1e-5), (micro, shared)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], base.parameters()))  # (the step moved them)
    for other in weights[1:]:
        assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(weights[0], other))


def test_a_run_that_starts_again_from_no_checkpoint_starts_its_logs_again(tiny_model, tmp_path):
    """Every checkpoint gone (removed by hand, or a run killed while writing its first): the run
    starts at step 1 again, and its logs with it, not appended to the old rows; it says so (the
    logged steps went without a word)."""
    out = tmp_path / "run"
    args = BASE + ["--model", str(tiny_model), "--out", str(out), "--max-steps", "1", "--eval-n", "2"]
    assert "no complete checkpoint" not in run_train(args).stdout
    shutil.rmtree(out / "checkpoints")
    assert (f"note: {out} has no complete checkpoint to resume from (checkpoints/): starting at step 1; the 1 "
            "logged step is trained again") in run_train(args).stdout
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert [json.loads(x)["step"] for x in (out / "eval.jsonl").read_text().splitlines()] == [0, 1]
    assert {json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()} <= {1}



def test_failed_writes_name_the_newest_kept_checkpoint_and_say_free_space_only_for_a_full_disk(
        tiny_model, tmp_path, monkeypatch):
    """With several checkpoints kept, a failed checkpoint, log or export write names the newest
    (what a rerun resumes from); "free space" is advice for a full disk only (a permission error
    is not cured by it)."""
    import errno

    import torch.distributed.checkpoint as dcp

    from r3 import rundir
    from r3.errors import R3Error

    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_00000{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_00000{step}" / "trainer_state.json").write_text("{}")
    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=3)

    def full_disk(state, checkpoint_id, process_group=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(R3Error, match=r"the last complete one, step_000002, is kept: free space and rerun"):
        rundir.save_checkpoint(tmp_path, 3, policy, opt, sched, stream, cfg, d)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "open", no_space, raising=False)
    with pytest.raises(R3Error, match=r"free space and rerun with the same --out: it resumes from checkpoint step_000002$"):
        rundir.append_jsonl(tmp_path / "metrics.jsonl", {"step": 3})

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rundir, "save_hf", denied)
    with pytest.raises(R3Error) as e:
        rundir.export(tmp_path, policy, None, d)
    assert str(e.value) == (f"could not write the export {tmp_path / 'export'} ([Errno 13] Permission denied); "
                            "checkpoint step_000002 is kept: rerun with the same --out to write the export")


def test_free_space_is_said_in_gib_and_marked_when_under_one(tmp_path, monkeypatch):
    """One measure of free space for every failed write: the disk of the nearest existing folder
    (a failed write may leave no file), nothing when unreadable; a checkpoint's line marks under
    1 GiB, as its reason may not say the disk is full."""
    from types import SimpleNamespace

    from r3 import errors, rundir

    seen = []

    def usage(free):
        return lambda p: seen.append(p) or SimpleNamespace(free=free)

    monkeypatch.setattr(errors.shutil, "disk_usage", usage(2**29))
    assert rundir._free_space(tmp_path) == "; 0.50 GiB free on that disk (full?)"
    monkeypatch.setattr(errors.shutil, "disk_usage", usage(3 * 2**30))
    assert rundir._free_space(tmp_path / "gone" / "step_1") == "; 3.00 GiB free on that disk"
    assert errors.free_space_at(tmp_path / "gone" / "x.json") == "3.00 GiB free on that disk"
    assert seen[1:] == [str(tmp_path)] * 2

    def unreadable(p):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(errors.shutil, "disk_usage", unreadable)
    assert rundir._free_space(tmp_path) == "" and errors.free_space_at(tmp_path) == ""



def test_free_space_is_marked_only_under_one_gib_and_only_where_asked(tmp_path, monkeypatch):
    """``(full?)`` is for a failed checkpoint whose reason may not say the disk is full (under
    1 GiB, not at it); a full disk's own one-line error (mark_low False) already says so."""
    from types import SimpleNamespace

    from r3 import errors

    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: SimpleNamespace(free=2**30))
    assert errors.free_space_at(tmp_path, mark_low=True) == "1.00 GiB free on that disk"
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: SimpleNamespace(free=2**29))
    assert errors.free_space_at(tmp_path) == "0.50 GiB free on that disk"
    assert errors.free_space_at(tmp_path, mark_low=True) == "0.50 GiB free on that disk (full?)"

def test_a_checkpoint_error_is_the_last_line_of_the_innermost_error():
    """DCP raises its own exception with each rank's traceback in the message, the OS error as
    its context (not its cause): the one line said is the OS error's, its last line."""
    import errno

    from r3.rundir import _error_line

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("CheckpointException ranks:dict_keys([0])\nTraceback (most recent call last):\n"
                               "  File \"x.py\", line 1\nOSError: ...") from None
    except RuntimeError as e:
        assert _error_line(e) == "[Errno 28] No space left on device"
    assert _error_line(ValueError("Traceback (most recent call last):\n  File \"x.py\"\nValueError: bad")) == "ValueError: bad"
    assert _error_line(KeyError()) == "KeyError"


def test_resume_skips_blank_lines_of_a_log(tmp_path):
    from r3.rundir import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n  \n{"step": 2}\n{"step": 3}\n')
    assert truncate_jsonl(path, 2) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_different_config_is_named_by_its_first_three_differences_task_first(tmp_path):
    """The refusal names the task (what differs most) first, then settings alphabetically, three
    at most (then '...'), long values cut at 60 characters, and an older run's config as this
    version reads it (no chat_template_options: the default)."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.rundir import prepare_out_dir

    d = T.init_distributed()
    run = tmp_path / "run"
    run.mkdir()
    theirs = TrainConfig().to_dict()
    del theirs["chat_template_options"]
    theirs.update(task="r3_test_tasks:CoinTask", lr=0.5, beta=0.5, group_size=2)
    (run / "config.json").write_text(json.dumps(theirs))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(R3Error) as e:
        prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
    assert str(e.value) == (f"--out {run} holds a run with a different config (task: 'r3_test_tasks:CoinTask' there, "
                            "'countdown-tiny' here; beta: 0.5 there, 0.001 here; group_size: 2 there, 8 here; ...); "
                            "use another --out or the same settings to resume")
    theirs = TrainConfig().to_dict()
    del theirs["chat_template_options"]
    theirs["seed"] = "x" * 59  # (its repr: 61 characters, cut)
    (run / "config.json").write_text(json.dumps(theirs))
    mine = TrainConfig(out=str(run), chat_template_options={"enable_thinking": True}).validate()
    with pytest.raises(R3Error) as e:
        prepare_out_dir(mine, d)
    assert str(e.value) == (f"--out {run} holds a run with a different config (chat_template_options: {{}} there, "
                            '{"enable_thinking": true} here; seed: ' + f"'{'x' * 56}... there, 0 here); "
                            "use another --out or the same settings to resume")
    theirs["seed"] = "x" * 58  # (its repr: 60 characters, said whole)
    (run / "config.json").write_text(json.dumps(theirs))
    with pytest.raises(R3Error, match=f"seed: '{'x' * 58}' there, 0 here"):
        prepare_out_dir(mine, d)


def test_an_empty_checkpoints_directory_holds_no_steps_and_the_lock_names_one_holder(tmp_path):
    """A start that failed before its first step may leave an empty checkpoints directory: still
    nothing trained, so a corrected retry starts over. The lock file names its current holder only
    (a line per earlier run would make the refusal several lines)."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.rundir import _HELD_LOCKS, prepare_out_dir

    d = T.init_distributed()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "lr": 0.5}))
    prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
    _HELD_LOCKS.pop().close()
    prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
    _HELD_LOCKS.pop().close()
    lines = (run / ".lock").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pid {os.getpid()} on "), lines


def test_failure_records_of_test_split_queries_are_left_out(tmp_path, capsys):
    """Held-out accuracy is read on the test split: a failures file made with --split test, or
    before the task's split rule changed (function calling once split by id, so a repeated query
    sat on both sides), must not train on those queries. A query is what the model is shown, so
    a test query under another id is caught too."""
    from r3.errors import R3Error
    from r3.failure_data import without_test_queries
    from r3.tasks import get
    from r3.tasks.function_calling import write_synthetic

    tiny = get("countdown-tiny")
    test, train = tiny.examples("test")[:2], tiny.examples("train")[:3]
    records = [{"example": ex, "attempt_tokens": [5]} for ex in [train[0], test[0], train[1], test[1], train[2]]]
    kept = without_test_queries("f.jsonl", tiny, records)
    assert [r["example"] for r in kept] == train
    assert capsys.readouterr().err.strip() == (
        "warning: f.jsonl: 2 of 5 failure records are queries of the task's test split (the file was made with "
        "--split test, or before the task's split changed); training leaves them out so held-out accuracy stays "
        "held out")
    assert without_test_queries("f.jsonl", tiny, records[::2]) == records[::2]
    assert capsys.readouterr().err == ""
    with pytest.raises(R3Error, match=r"^f.jsonl: all 2 failure records are queries of the task's test split"):
        without_test_queries("f.jsonl", tiny, records[1::2])
    # function calling: a test record's query under another id (as the old id-based split kept it)
    data = tmp_path / "xlam.json"
    write_synthetic(str(data), 60)
    fc = get("function_calling", data_path=str(data))
    test, train = fc.examples("test"), fc.examples("train")
    assert test and train
    renamed = {**test[0], "id": "train-copy"}
    kept = without_test_queries("g.jsonl", fc, [{"example": e, "attempt_tokens": [5]} for e in (train[0], renamed)])
    assert [r["example"] for r in kept] == [train[0]] and "1 of 2 failure records" in capsys.readouterr().err
    # ... and with other tools listed (another prompt, the same query: the split is by query text)
    retooled = {**test[0], "id": "train-copy", "query": "  " + test[0]["query"] + " ", "tools": list(
        reversed(test[0]["tools"])) + [{"name": "extra_tool", "description": "An extra tool.", "parameters": {}}]}
    assert fc.messages(retooled) != fc.messages(test[0])
    kept = without_test_queries("g.jsonl", fc, [{"example": e, "attempt_tokens": [5]} for e in (train[0], retooled)])
    assert [r["example"] for r in kept] == [train[0]] and "1 of 2 failure records" in capsys.readouterr().err
    # a separate test file is listed whole: only its own queries are test queries
    split = tmp_path / "test.json"
    split.write_text(json.dumps(test))
    fc = get("function_calling", data_path=str(data), test_data_path=str(split))
    assert fc.on_test_side(retooled) is None
    assert without_test_queries("g.jsonl", fc, [{"example": e, "attempt_tokens": [5]} for e in (train[0], retooled)]) \
        == [{"example": e, "attempt_tokens": [5]} for e in (train[0], retooled)]


def test_generated_countdown_test_problems_drawn_at_another_seed_or_past_test_size_are_left_out(capsys):
    """Generated Countdown's test split is every problem whose numbers hash to the test side;
    examples("test") lists only seed 0's first test_size of them. A file made with --split test
    --seed 1 (what held-out evaluation at --seed 1 asks), or past test_size (evaluation with a
    larger --n), was kept whole: 54 of countdown-tiny's 90 seed-1 test problems, all 200 of
    countdown's first 200."""
    from r3.failure_data import without_test_queries
    from r3.tasks import get

    tiny = get("countdown-tiny", test_size=10)
    listed = {(tuple(ex["nums"]), ex["target"]) for ex in tiny.examples("test")}
    unlisted = [ex for ex in tiny.examples("test", n=20, seed=1) + tiny.examples("test", n=20)[10:]
                if (tuple(ex["nums"]), ex["target"]) not in listed]
    train = tiny.examples("train")[:2]
    assert len(unlisted) > 10
    records = [{"example": ex, "attempt_tokens": [5]} for ex in [train[0]] + unlisted + [train[1]]]
    assert [r["example"] for r in without_test_queries("f.jsonl", tiny, records)] == train
    assert f"{len(unlisted)} of {len(records)} failure records are queries of the task's test split" in \
        capsys.readouterr().err


def test_failures_of_a_countdown_task_without_a_test_split_are_all_kept(capsys):
    """test_fraction 0 puts every generated problem on the train side (and r3.train asks for no
    test examples unless eval_n): leaving out test queries listed the test split, which is an
    error there ("test_fraction=0.0 leaves the test split empty"), so --failures could not train."""
    from r3.failure_data import without_test_queries
    from r3.tasks import get

    task = get("countdown-tiny", test_fraction=0)
    records = [{"example": ex, "attempt_tokens": [5]} for ex in task.examples("train", n=3)]
    assert without_test_queries("f.jsonl", task, records) == records and capsys.readouterr().err == ""


def test_every_test_query_is_left_out_not_only_the_first_ones_listed(tmp_path, capsys):
    """The whole test split is compared, not a prefix of it: the last test query of a function
    calling file (and one under another id) is left out as the first is."""
    from r3.failure_data import without_test_queries
    from r3.tasks import get
    from r3.tasks.function_calling import write_synthetic

    data = tmp_path / "xlam.json"
    write_synthetic(str(data), 200)
    fc = get("function_calling", data_path=str(data))
    test, train = fc.examples("test"), fc.examples("train")
    assert len(test) > 10
    records = [{"example": ex, "attempt_tokens": [5]} for ex in (train[0], test[-1], {**test[-2], "id": "x"}, train[1])]
    assert [r["example"] for r in without_test_queries("f.jsonl", fc, records)] == train[:2]
    assert "2 of 4 failure records" in capsys.readouterr().err


def test_training_on_test_split_failures_only_is_refused_before_anything_is_written(tmp_path):
    fails = tmp_path / "f.jsonl"  # (the first three test examples of r3_test_tasks:CoinTask)
    fails.write_text("".join(json.dumps({"example": {"id": f"test-{i}", "word": f"item{10_000 + i}"},
                                         "attempt_tokens": [5, 6]}) + "\n" for i in range(3)))
    proc = run_train(BASE + ["--out", str(tmp_path / "o"), "--max-steps", "1", "--failures", str(fails)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and f"{fails}: all 3 failure records are queries of the task's test split" in err[0], err
    assert not (tmp_path / "o").exists()


def test_test_split_failure_records_are_left_out_on_every_rank_and_said_once(tiny_model, tmp_path):
    """Two ranks train on the same records (the queries they share out must agree), and the
    warning is rank 0's alone, not one per rank."""
    fails = tmp_path / "f.jsonl"  # (r3_test_tasks:CoinTask's examples: train-i / test-i)
    rows = [{"id": f"train-{i}", "word": f"item{i}"} for i in range(4)] + [{"id": "test-0", "word": "item10000"}]
    fails.write_text("".join(json.dumps({"example": ex, "attempt_tokens": [5, 6]}) + "\n" for ex in rows))
    out = tmp_path / "o"
    proc = run_train(BASE + ["--model", str(tiny_model), "--out", str(out), "--max-steps", "1", "--failures",
                             str(fails)], nproc=2)
    assert proc.stderr.count("failure records are queries of the task's test split") == 1, proc.stderr[-3000:]
    assert f"warning: {fails}: 1 of 5 failure records" in proc.stderr
    assert [r["step"] for r in read_metrics(out)] == [1]
    logged = [json.loads(line)["example"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert logged and all(ex["id"].startswith("train-") for ex in logged)


def test_episode_micro_batches_leave_out_groups_without_signal_by_default():
    """episode_micro_batches' default is the method's: a group whose advantages are all zero (all
    rewards equal) carries no signal and is left out unless the caller asks to keep it (a default
    that kept them would spend forwards, and the loss's token-mean denominator, on zero-gradient
    rows)."""
    from types import SimpleNamespace

    from r3 import batch as B

    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 2, 6, 8]]
    spans = [(3, 4)] * 4
    ep = SimpleNamespace(sequences=seqs, spans=spans, reflection_logprobs=[[-1.0]] * 4)
    adv = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    (mb,) = B.episode_micro_batches(ep, adv, 4, 0, torch.device("cpu"))
    assert mb.tokens.tolist() == [[1, 2, 6, 7], [1, 2, 6, 8]] and mb.advantages.tolist() == [1.0, -1.0]
    (mb,) = B.episode_micro_batches(ep, adv, 4, 0, torch.device("cpu"), skip_no_signal=False)
    assert mb.tokens.tolist() == seqs


def test_checkpoint_io_gives_back_a_thread_count_other_than_one():
    """The thread count DCP ran under comes back: checked from 2 threads, so that it tests
    something when the suite itself runs with OMP_NUM_THREADS=1 (then 'restored' and 'left at
    one' look the same)."""
    from r3.rundir import _one_intra_op_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _one_intra_op_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_checkpoint_restores_the_data_position_the_schedule_and_the_rng(tiny_model, tmp_path, capsys):
    """What a resume needs besides the weights comes back from the checkpoint: the stream's
    position (else the resumed run trains on the first examples again), the recent first-attempt
    success (the candidate pool's size), the lr schedule and
    torch's RNG state; a stale temporary directory of an interrupted save of that step leaves
    nothing in the checkpoint; a damaged newest checkpoint falls back to the one before, and none
    readable is an error, not a fresh start over the old run."""
    from r3 import train as T
    from r3.errors import R3Error
    from r3.rundir import checkpoint_dirs, resume, save_checkpoint

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=2)
    stale = tmp_path / "checkpoints" / ".step_000003.tmp"
    stale.mkdir(parents=True)
    (stale / "left_by_a_killed_save").write_text("x")
    stream.position, stream.recent_first_success = 5, [0.25, 0.5]
    for _ in range(3):
        opt.step()
        sched.step()
    save_checkpoint(tmp_path, 2, policy, opt, sched, stream, cfg, d)  # (an older one: the newest is used)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    save_checkpoint(tmp_path, 3, policy, opt, sched, stream, cfg, d)
    assert not (checkpoint_dirs(tmp_path)[-1] / "left_by_a_killed_save").exists()
    torch.manual_seed(99)
    opt2 = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, T.lr_lambda(cfg))
    stream2 = T.QueryStream([1, 2, 3], seed=0)
    assert resume(tmp_path, policy, opt2, sched2, stream2, d) == 3
    assert "not those" not in capsys.readouterr().err
    stream2 = T.QueryStream([1, 2, 4], seed=0)  # (other training examples: said)
    assert resume(tmp_path, policy, opt2, sched2, stream2, d) == 3
    assert "the training examples are not those" in capsys.readouterr().err
    assert stream2.position == 5 and stream2.recent_first_success == [0.25, 0.5] and sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == sched.get_last_lr()[0]
    assert torch.equal(torch.get_rng_state(), rng)
    for step in (3, 2):  # damaged: the one before it, then none that reads is one line
        shard = next((tmp_path / "checkpoints" / f"step_{step:06d}").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        if step == 3:
            assert resume(tmp_path, policy, opt2, sched2, stream2, d) == 2
    with pytest.raises(R3Error, match="no checkpoint in .* can be read"):
        resume(tmp_path, policy, opt2, sched2, stream2, d)


def test_a_rewrite_cut_short_puts_the_original_checkpoint_back(tmp_path):
    """What upgrade_fused_layout leaves when killed between its two renames: the original
    (.step_N.unfused) goes back to step_N when the rewritten one is not in place, and is dropped
    only when it is; partial files are removed."""
    from r3.rundir import _recover_upgrades, checkpoint_dirs

    root = tmp_path / "checkpoints"
    for name in (".step_000002.unfused", ".step_000004.unfused", "step_000004", ".step_000006.fused.tmp"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text(json.dumps({"from": name}))
    (root / ".step_000006.whole.pt").write_bytes(b"x")
    _recover_upgrades(tmp_path)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000002", "step_000004"]
    assert json.loads((root / "step_000002" / "trainer_state.json").read_text()) == {"from": ".step_000002.unfused"}
    assert json.loads((root / "step_000004" / "trainer_state.json").read_text()) == {"from": "step_000004"}
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004"]


def test_a_run_directory_whose_config_json_was_cut_short_is_refused_in_one_line(tmp_path):
    """A config.json that is not JSON (cut short by a full disk in an older version, or edited
    by hand) is the one-line refusal, not a JSONDecodeError traceback."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.rundir import prepare_out_dir

    d = T.init_distributed()
    run = tmp_path / "cut"
    run.mkdir()
    (run / "config.json").write_text('{"model": "smollm2-135m", "ta')
    with pytest.raises(R3Error, match="unreadable config of a previous run; use another --out"):
        prepare_out_dir(TrainConfig(out=str(run)).validate(), d)


def test_an_out_directory_holding_other_files_is_not_written_into(tmp_path):
    """--out pointed at a directory of other things (a notes file, a dataset) is refused before
    anything is written there: only a new or empty directory, or one holding just an export and
    the lock, starts a run."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.errors import R3Error
    from r3.rundir import prepare_out_dir

    d = T.init_distributed()
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    with pytest.raises(R3Error, match="exists and is not an r3 run directory"):
        prepare_out_dir(TrainConfig(out=str(run)).validate(), d)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_the_written_config_is_the_whole_config_and_resumes_itself(tmp_path):
    """config.json is every setting as the run has it (what a resume and r3.evaluate --run read):
    written whole, it is compatible with the config that wrote it."""
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.rundir import write_config

    d = T.init_distributed()
    cfg = TrainConfig(out=str(tmp_path), seed=7, lr=3e-6, task_options={"max_num": 30}).validate()
    write_config(cfg, tmp_path, d)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == cfg.to_dict() and cfg.incompatible_with(written) == []


def test_the_metrics_row_and_step_line_by_hand():
    """Every field of a one-rank metrics row from its counts, worked out by hand: a group with a
    zero advantage among non-zero ones still has signal; rates divide by their own denominators
    (retries, trained tokens, the rollout's or the passes' time); kl is None without a scored
    reference and first_try_success None when the first attempts were stored failures."""
    from types import SimpleNamespace

    from r3 import train as T
    from r3.metrics import format_step_line, step_metrics

    d = T.init_distributed()
    ep = SimpleNamespace(rewards=torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]]), queries=4, first_success=1,
                         spans=[(2, 5), (3, 4), (0, 2), (1, 2), (1, 3), (0, 1)], generated_tokens=60,
                         records=[{"reflection_cut": k == 0, "retry_cut": k in (2, 5)} for k in range(6)],
                         times={"attempt": 0.5, "reflection": 0.25, "retry": 0.125, "verify": 0.0625})
    adv = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    upd = {"loss": 0.5, "kl_sum": 0.3, "tokens": 6.0, "clip_low_sum": 3.0, "clip_high_sum": 1.5, "logp_diff_sum": 1.2,
           "logp_diff_tokens": 4.0, "logp_diff_max": 0.7, "kl_scored": True, "grad_norm": 2.0, "skipped": False}
    times = {"step": 4.0, "rollout": 2.0, "reference": 0.5, "update": 1.5}
    row = step_metrics(3, ep, adv, upd, times, d, lr=1e-5, data_position=12, fresh_attempts=True, flops=1e9,
                       peak_flops=1e10)
    want = {"step": 3, "loss": 0.5, "kl": 0.05, "retry_success": 4.5 / 6, "first_try_success": 0.25, "groups": 2,
            "groups_with_signal": 1, "reflection_tokens": 10, "trained_tokens": 6, "reflection_len_mean": 10 / 6,
            "reflection_cut_frac": 1 / 6, "retry_cut_frac": 2 / 6,
            "clip_frac_low": 0.5, "clip_frac_high": 0.25, "logp_diff_mean": 0.3, "logp_diff_max": 0.7, "grad_norm": 2.0,
            "lr": 1e-5, "skipped": False, "step_time_s": 4.0, "rollout_time_s": 2.0, "attempt_time_s": 0.5,
            "reflection_time_s": 0.25, "retry_time_s": 0.125, "verify_time_s": 0.0625, "reference_time_s": 0.5,
            "update_time_s": 1.5,
            "rollout_tokens_per_s": 30.0, "tokens_per_s": 15.0, "mfu": 1e9 / (2.0 * 1e10), "peak_tflops": 0.01,
            "data_position": 12, "peak_memory_gb": None}
    assert row.keys() == want.keys()
    assert row == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in want.items()}
    stored = step_metrics(3, ep, adv, {**upd, "kl_scored": False}, times, d, lr=1e-5, data_position=12,
                          fresh_attempts=False, flops=0.0, peak_flops=0.0)
    assert (stored["kl"], stored["first_try_success"], stored["mfu"], stored["peak_tflops"]) == (None, None, None, None)
    line = format_step_line({**row, "skipped": True}, 10, 60.0)
    assert line.startswith("step 3/10 | loss +0.5000 | kl 5.00e-02 | retry 0.75 | first 0.25 | signal 1/2 | ")
    assert "mfu 5.0%" in line and line.endswith(" | SKIPPED (non-finite)")
    assert "SKIPPED" not in format_step_line(row, 10, 60.0)


def _disk_events(monkeypatch):
    """Record, in order, each fsync (by the path it flushed), rename and tree removal."""
    events = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def on_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    def on_replace(src, dst, **kw):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return replace(src, dst, **kw)

    def on_rmtree(path, *a, **kw):
        events.append(("remove", os.path.realpath(path)))
        return rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "fsync", on_fsync)
    monkeypatch.setattr(os, "replace", on_replace)
    monkeypatch.setattr(shutil, "rmtree", on_rmtree)
    return events


def test_a_checkpoint_is_on_the_disk_before_it_is_published_and_the_older_one_deleted(tiny_model, tmp_path, monkeypatch):
    """The checkpoint was renamed into place and the older one deleted without a flush: a file
    system may commit the rename and the deletion before the new files' data, so a power cut
    could leave an empty newest checkpoint and no older one. Every file and directory of the new
    one, and the run's logs, are flushed before the rename, the directory holding it after, then
    the old one goes."""
    from r3.rundir import append_jsonl, checkpoint_dirs, save_checkpoint

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=1)
    save_checkpoint(tmp_path, 1, policy, opt, sched, stream, cfg, d)
    append_jsonl(tmp_path / "metrics.jsonl", {"step": 2})
    events = _disk_events(monkeypatch)
    save_checkpoint(tmp_path, 2, policy, opt, sched, stream, cfg, d)
    root = os.path.realpath(tmp_path / "checkpoints")
    final, old = root + "/step_000002", root + "/step_000001"
    [publish] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
    tmp = events[publish][1]
    flushed = {e[1] for e in events[:publish] if e[0] == "fsync"}
    files = {os.path.join(p, n).replace(final, tmp) for p, _, names in os.walk(final) for n in names}
    assert len(files) >= 3 and files <= flushed  # (the DCP shards, its metadata, trainer_state.json)
    assert tmp in flushed and os.path.realpath(tmp_path / "metrics.jsonl") in flushed  # (the rows a resume keeps)
    [removed] = [i for i, e in enumerate(events) if e == ("remove", old)]
    assert any(e == ("fsync", root) for e in events[publish:removed])
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000002"]


def test_a_checkpoint_cut_short_by_torch_says_a_write_came_up_short(tiny_model, tmp_path, monkeypatch):
    """torch's zip writer meets a full disk as 'unexpected pos 704 vs 598', the OS error lost:
    the line says a write came up short (beside the free space), not torch's enforce text."""
    from torch.distributed import checkpoint as dcp

    from r3.errors import R3Error
    from r3.rundir import save_checkpoint

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=2)

    def cut_short(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(dcp, "save", cut_short)
    with pytest.raises(R3Error) as caught:
        save_checkpoint(tmp_path, 1, policy, opt, sched, stream, cfg, d)
    assert "(a write came up short: unexpected pos 704 vs 598; " in str(caught.value)
    assert "enforce fail" not in str(caught.value) and "GiB free on that disk" in str(caught.value)


@pytest.mark.parametrize("flushed", ["trainer_state.json", ".metadata"])
def test_a_checkpoint_whose_flush_fails_is_a_failed_write(tiny_model, tmp_path, monkeypatch, flushed):
    """A delayed write error (a full disk or quota on NFS, thin storage, EIO) surfaces at fsync, not
    at the write: the flush before the publishing rename is part of the write, so its failure is
    the one-line 'could not write checkpoint', the partial directory is removed and the earlier
    checkpoint kept (it was a traceback with .step_N.tmp left behind, on rank 0 alone)."""
    import errno

    from r3.errors import R3Error
    from r3.rundir import checkpoint_dirs, save_checkpoint

    d, cfg, policy, opt, sched, stream = _trainer_to_checkpoint(tiny_model, keep_last=2)
    save_checkpoint(tmp_path, 1, policy, opt, sched, stream, cfg, d)
    real = os.fsync

    def full_at_flush(fd):  # (DCP flushes its shards itself; these two files only r3 flushes)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".step_000002.tmp/{flushed}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_at_flush)
    with pytest.raises(R3Error, match=r"could not write checkpoint .*step_000002 \(.*No space left on device.*"
                                      r"the last complete one, step_000001, is kept"):
        save_checkpoint(tmp_path, 2, policy, opt, sched, stream, cfg, d)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001"]


def test_a_skipped_step_leaves_no_gradient_for_the_next_one():
    """A step skipped for a non-finite gradient must not leave its gradient behind: the next
    update would add it to its own (inf or NaN there: every later step skipped too; a finite
    gradient of a step skipped for its loss would be applied twice). After the skip, one more
    update moves the weights exactly as the same update from a fresh start does."""
    import copy

    from r3 import batch as B
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, grad_clip=0.0, max_reflection_tokens=8).validate()
    adv = [1.0, -0.5, -0.5, 0.8, -1.2, 0.4]
    results = []
    for skip_first in (True, False):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if skip_first:
            hook = next(model.parameters()).register_hook(lambda g: g + float("inf"))
            mbs = B.make_micro_batches(seqs, spans, adv, 3, 0, torch.device("cpu"))
            assert T.update(model, opt, mbs, len(mbs), cfg, one_rank)["skipped"]
            hook.remove()
        mbs = B.make_micro_batches(seqs, spans, adv, 3, 0, torch.device("cpu"))
        stats = T.update(model, opt, mbs, len(mbs), cfg, one_rank)
        assert not stats["skipped"]
        results.append(([p.detach().clone() for p in model.parameters()], stats["grad_norm"]))
    (wa, ga), (wb, gb) = results
    assert ga == pytest.approx(gb, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-6) for a, b in zip(wa, wb))
    assert any(not torch.equal(a, b) for a, b in zip(wa, base.parameters()))  # (the second update moved them)


def test_a_step_syncs_the_rollout_copy_before_its_rollout_and_reports_the_data_mode(tmp_path, monkeypatch):
    """train_step gathers the policy into the rollout copy before the rollout samples (else the
    rollouts come from the weights before the last update, or from the copy's uninitialised
    memory at the first step); the metrics row is told whether first attempts were fresh (stored
    failures: no first-attempt success) and the data position after this step's queries."""
    from types import SimpleNamespace

    from r3 import train as T

    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    for failures in (None, [{"example": 1, "attempt_tokens": [1]}]):
        got, order = {}, []
        run = _stand_in_step(tmp_path, monkeypatch, d, got)
        run.failures = failures
        ep = SimpleNamespace(rewards=torch.tensor([[1.0, 0.0]]))

        def rollout(run, step, ep=ep):
            order.append("rollout")
            run.stream.position += 4
            return ep

        monkeypatch.setattr(T, "sync_rollout_weights", lambda policy, rollout: order.append(("sync", policy, rollout)))
        monkeypatch.setattr(T, "rollout", rollout)
        monkeypatch.setattr(T, "step_metrics", lambda step, *a, **kw: got.update(metrics=kw) or {"step": step})
        T.train_step(run, 0)
        assert order == [("sync", "policy", "rollout"), "rollout"]
        assert got["metrics"]["fresh_attempts"] is (failures is None) and got["metrics"]["data_position"] == 4


STOP_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch.distributed as dist
    from r3.distributed import StopSignals, _exit_hard, init_distributed

    d = init_distributed()
    os.environ.pop("TORCHELASTIC_RUN_ID", None)  # (no launcher to watch: only the signal counts)
    with StopSignals() as signals:
        before = signals.requested(d)
        if d.rank == 1:
            signals._handle(signal.SIGTERM, None)  # (rank 1 alone got it)
        after = signals.requested(d)
    with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as f:
        json.dump([before, after], f)
    dist.barrier()
    dist.destroy_process_group()
    _exit_hard(0)
    """
)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """StopSignals.requested agrees over the ranks: a SIGTERM that reached rank 1 only stops rank 0
    too (else rank 1 alone would save and leave, and rank 0 hang in its next collective)."""
    _run_on_two_ranks(STOP_SCRIPT, tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [0, 15], rank


def test_a_non_finite_loss_with_a_finite_gradient_skips_the_step(monkeypatch):
    """The guard reads the loss as well as the gradient norm (its docstring: either skips the
    step): a loss that is infinite while its gradient is finite (here an infinite constant added
    to the real loss) leaves the weights as they were, and the next step trains."""
    import copy

    from r3 import batch as B
    from r3 import grpo
    from r3 import train as T
    from r3.config import TrainConfig

    base, seqs, spans = _policy_and_rows()
    one_rank = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(dtype="fp32", beta=0.0, max_reflection_tokens=8).validate()
    model = copy.deepcopy(base)
    real = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **kw: (lambda lm: (lm[0] + float("inf"), lm[1]))(real(*a, **kw)))
    mbs = B.make_micro_batches(seqs, spans, [1.0, -0.5, -0.5, 0.8, -1.2, 0.4], 3, 0, torch.device("cpu"))
    stats = T.update(model, torch.optim.SGD(model.parameters(), lr=0.1), mbs, len(mbs), cfg, one_rank)
    assert not math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert stats["skipped"] and all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


SKIP_TOGETHER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from conftest import tiny_hf_config
    from r3 import batch as B
    from r3 import grpo
    from r3 import train as T
    from r3.config import TrainConfig
    from r3.distributed import _exit_hard
    from r3.model import ModelConfig, Transformer

    d = T.init_distributed()
    torch.manual_seed(0)
    policy = Transformer(ModelConfig.from_hf(tiny_hf_config("qwen2").to_dict()))
    T.shard(policy, d, torch.float32)
    before = {k: v.full_tensor().clone() for k, v in policy.state_dict().items()}
    if d.rank == 1:  # rank 1's loss is infinite, its gradient finite (an infinite constant added)
        real = grpo.policy_loss
        grpo.policy_loss = lambda *a, **kw: (lambda lm: (lm[0] + float("inf"), lm[1]))(real(*a, **kw))
    g = torch.Generator().manual_seed(d.rank)
    seqs = [torch.randint(0, 256, (9,), generator=g).tolist() for _ in range(2)]
    mbs = B.make_micro_batches(seqs, [(3, 8), (4, 9)], [1.0, -1.0], 2, 0, d.device)
    cfg = TrainConfig(dtype="fp32", beta=0.0, max_reflection_tokens=8).validate()
    stats = T.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), mbs, len(mbs), cfg, d)
    assert stats["skipped"], d.rank
    after = {k: v.full_tensor() for k, v in policy.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before), d.rank
    dist.barrier()
    dist.destroy_process_group()
    _exit_hard(0)
    """
)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The guard agrees over the ranks: rank 1's loss is not finite (its gradient, and so the
    global norm, is): every rank skips, else rank 0 would step its shards and rank 1 not (a model
    half updated)."""
    _run_on_two_ranks(SKIP_TOGETHER_SCRIPT, tmp_path, HERE)


def test_a_signal_during_the_checkpoint_stops_at_it_and_a_resume_past_stop_after_goes_on(tmp_path, monkeypatch):
    """step_end asks for a stop again after writing a checkpoint: a signal that came during the
    write stops the run there (not one step and one checkpoint later). stop_after stops at that
    step only: a run resumed past it (the same config) trains on instead of stopping after
    every step."""
    from types import SimpleNamespace

    from r3 import train as T

    saved = []
    monkeypatch.setattr(T, "save_checkpoint", lambda out, step, *a: saved.append(step))
    monkeypatch.setattr(T, "format_step_line", lambda row, max_steps, eta: "")
    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    ep = SimpleNamespace(records=[])
    run = _stand_in_run(tmp_path, d, max_steps=10, save_every=2)
    asked = iter([0, 15])  # none before the checkpoint, SIGTERM once it was written
    assert T.step_end(run, 3, {"step": 4}, ep, (0.0, 0), lambda: next(asked)) == 15 and saved == [4]
    saved.clear()
    run = _stand_in_run(tmp_path, d, max_steps=10, save_every=5, stop_after=3)
    assert [T.step_end(run, step, {"step": step + 1}, ep, (0.0, 3), lambda: 0) for step in (3, 4, 5)] == [0, 0, 0]
    assert saved == [5]


def test_a_signal_ends_the_loop_with_128_plus_its_number_and_no_export(tmp_path, monkeypatch):
    """train_loop: step_end's signal number ends the run as a process killed by it would (SIGTERM:
    exit 143, which schedulers read as preempted), with no export; not exit 0 (a finished run)
    nor the bare signal number."""
    import signal

    from r3 import train as T

    calls = []
    monkeypatch.setattr(T, "train_step", lambda run, step: ({"step": step + 1}, None))
    monkeypatch.setattr(T, "export", lambda out, policy, tok, d: calls.append("export") or out / "export")
    monkeypatch.setattr(T, "step_end", lambda run, step, row, ep, clock, signum: calls.append(step) or
                        (signal.SIGTERM if step == 1 else 0))
    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    with pytest.raises(SystemExit) as stopped:
        T.train_loop(_stand_in_run(tmp_path, d, max_steps=4))
    assert stopped.value.code == 128 + signal.SIGTERM and calls == [0, 1]


def test_step_end_logs_the_step_it_finished_to_the_files_and_the_tracker(tmp_path, monkeypatch):
    """step_end after the loop's step index 2 (the 3rd step): samples.jsonl and the tracker's
    metrics and samples are all at step 3, the row's own step (an index off by one would put a
    run's samples and its W&B curve one step before its metrics.jsonl)."""
    from types import SimpleNamespace

    from r3 import train as T

    monkeypatch.setattr(T, "format_step_line", lambda row, max_steps, eta: "")
    d = T.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    run = _stand_in_run(tmp_path, d, max_steps=10, save_every=5)
    ep = SimpleNamespace(records=[{"example": 1, "reward": 1.0, "reason": "ok"}])
    assert T.step_end(run, 2, {"step": 3}, ep, (0.0, 0), lambda: 0) == 0
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3]
    assert [(kind, step) for kind, step, _ in run.logged] == [("train", 3), ("samples", 3)]


def test_frozen_parameters_stay_as_they_are_on_two_ranks_and_a_resume_keeps_them(tiny_model, tmp_path):
    """--freeze: the parameters its patterns name stay bit for bit as loaded through training on
    two ranks (FSDP2 shards hold frozen and trained parameters side by side), the others move; the
    run says how many are frozen; a resume with other patterns is refused in one line."""
    from r3.checkpoint import load, split_for_checkpoint

    out = tmp_path / "run"
    args = BASE + ["--model", str(tiny_model), "--out", str(out), "--max-steps", "2",
                   "--freeze", "embed_tokens.weight, layers.0.*"]
    proc = run_train(args, nproc=2)
    assert "stay as they are" in proc.stdout and "--freeze embed_tokens.weight, layers.0.*" in proc.stdout
    assert sum(r["groups_with_signal"] for r in read_metrics(out)) > 0
    start, _ = load(tiny_model, tokenizer=False)
    before = {f"model.{k}": v for k, v in split_for_checkpoint(start.config, start.state_dict()).items()}
    after = load_weights(out / "export")
    frozen = [k for k in after if k.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    moved = [k for k in after if k not in frozen and k in before and not torch.equal(after[k], before[k])]
    assert any(".layers.1." in k for k in moved)
    proc = run_train(BASE + ["--model", str(tiny_model), "--out", str(out), "--max-steps", "3",
                             "--freeze", "embed_tokens.weight"], check=False)
    assert proc.returncode == 2 and "freeze" in proc.stderr


def test_freeze_patterns_name_r3_s_parameters_and_one_matching_none_is_refused(tiny_model):
    """Patterns are fnmatch patterns over r3's names (fused qkv_proj; a tied head's weight is the
    embeddings'); one that matches nothing names itself and names that exist; a config file's
    list of patterns reads as the comma-separated string; an older run's config (no freeze) is
    compatible with the default."""
    from r3.checkpoint import load
    from r3.config import InvalidValue, TrainConfig, _coerce
    from r3.errors import R3Error
    from r3.train import freeze_parameters

    model, _ = load(tiny_model, tokenizer=False)
    n = freeze_parameters(model, "layers.*.self_attn.qkv_proj.weight,norm.weight")
    held = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    assert held == ["layers.0.self_attn.qkv_proj.weight", "layers.1.self_attn.qkv_proj.weight", "norm.weight"]
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in held)
    with pytest.raises(R3Error, match=r"'freeze' pattern '\*\.q_proj\.\*' matches no parameter of the model "
                                      r"\(r3's names: embed_tokens\.weight, "):
        freeze_parameters(model, "norm.weight, *.q_proj.*")
    assert freeze_parameters(model, "") == 0
    with pytest.raises(R3Error, match=r"'freeze' '\*' matches every parameter of the model: nothing is left to train"):
        freeze_parameters(model, "*")
    assert _coerce("freeze", ["embed_tokens.weight", "layers.0.*"], "", "f.yaml") == "embed_tokens.weight,layers.0.*"
    for bad in (",", "a,,b", 3):
        with pytest.raises(InvalidValue, match="'freeze' must be comma-separated parameter name patterns"):
            TrainConfig(freeze=bad).validate()
    old = TrainConfig().validate().to_dict()
    old.pop("freeze")
    assert TrainConfig().validate().incompatible_with(old) == []
    assert TrainConfig(freeze="norm.weight").validate().incompatible_with(old) == ["freeze"]


def test_a_retry_budget_above_the_attempts_is_noted_where_cut_answers_fail():
    """An attempt cut off at its limit fails unread; a retry repeating its answer within a larger
    budget is paid for the budget, not the reflection."""
    from r3.config import TrainConfig
    from r3.train import retry_budget_note

    assert retry_budget_note(TrainConfig()) is None  # (48 and 48)
    assert retry_budget_note(TrainConfig(max_retry_tokens=96, cut_answers="judge")) is None
    assert retry_budget_note(TrainConfig(max_attempt_tokens=96, max_retry_tokens=64)) is None
    assert retry_budget_note(TrainConfig(max_retry_tokens=96)) == (
        "note: --max-retry-tokens 96 is above --max-attempt-tokens 48: an attempt cut off at 48 tokens fails unread "
        "(cut_answers fail), and a retry that writes the same answer within the larger budget is paid, crediting the "
        "reflection for the budget")


def test_cut_answers_is_a_setting_of_the_run_and_an_older_run_judged_cut_answers():
    """``cut_answers`` reaches the rollouts' and the held-out evaluation's sampling, "fail" by
    default; a bad value is refused naming the field; a run from before the option (no key)
    resumes under "judge", as it trained, and not under "fail", which would pay other retries."""
    from r3.config import InvalidValue, TrainConfig, parse_args

    cfg = parse_args(["--cut-answers", "judge"])
    assert cfg.cut_answers == "judge" and cfg.sampling().cut_answers == "judge"
    assert cfg.sampling(0.0).cut_answers == "judge" and TrainConfig().sampling().cut_answers == "fail"
    assert parse_args([]).cut_answers == "fail"
    with pytest.raises(InvalidValue, match="'cut_answers' must be one of judge, fail, got 'pay'"):
        TrainConfig(cut_answers="pay").validate()
    old = TrainConfig().validate().to_dict()
    old.pop("cut_answers")
    assert TrainConfig(cut_answers="judge").validate().incompatible_with(old) == []
    assert TrainConfig().validate().incompatible_with(old) == ["cut_answers"]


def test_a_run_that_fails_cut_answers_pays_no_retry_the_limit_cut_off(tiny_model, tmp_path):
    """End to end, with limits that cut most answers off: every logged retry that ran to its
    limit is unpaid with the cut-off reason, the run's config records the rule, and r3.audit
    re-judges the samples by it and passes."""
    from r3.episode import CUT_REASON

    out = tmp_path / "run"
    run_train(BASE + ["--model", str(tiny_model), "--out", str(out), "--max-steps", "2", "--cut-answers", "fail",
                      "--max-retry-tokens", "3", "--log-samples", "8"])
    assert json.loads((out / "config.json").read_text())["cut_answers"] == "fail"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    cut = [s for s in samples if s["retry_cut"]]
    assert cut and all(s["reward"] == 0.0 and s["reason"] == CUT_REASON for s in cut)
    assert all(s["reason"] == "coin" for s in samples if not s["retry_cut"])
    proc = subprocess.run([sys.executable, "-m", "r3.audit", str(out)], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
