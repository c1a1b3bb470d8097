"""Does the main command teach the built-in model to reflect? Held-out numbers before and after.

    python benchmarks/learning_curve.py --out runs/lc                     # the main command's defaults
    python benchmarks/learning_curve.py --out runs/lc -- --max-steps 60   # flags after -- go to r3.train
    python benchmarks/learning_curve.py --pool runs/lc/learning_curve.json runs/lc1/learning_curve.json
    python benchmarks/learning_curve.py --out runs/fc --before-only -- --task function_calling

1. The untrained model makes one sampled first attempt per held-out test query of the run's task;
   its failures (query + failed attempt) are stored. It then writes ``--samples`` reflections per
   stored failure, each followed by a retry, with the training sampling settings (temperature,
   top-p/top-k, the attempt / reflection / retry token limits). Greedy first- and second-attempt
   accuracy over the whole test split comes from :func:`r3.evaluate.evaluate_examples`.
2. Train with ``torchrun -m r3.train [flags]`` (resumes if ``--out`` already holds the run).
3. The trained export makes its own first attempts, reflects + retries on **the same stored
   failures** with the same seeds (a paired comparison: identical inputs, so the change is not
   confounded by which queries each model fails) and on its own failures, and is evaluated greedily
   on the same queries (paired per query).

Every rate comes with its standard error; the paired changes with the standard error of the
per-failure (or per-query) difference. Writes ``OUT/learning_curve.json`` and ``OUT/run/curves.png``.
The untrained model's evaluation is kept in ``OUT/before.json`` and reused when the settings it
depends on match.

``--pool`` combines runs that differ only in the training seed and share the untrained model's
evaluation (copy ``before.json`` into each ``--out``): the paired gain per stored failure is the
mean over the runs' trained models minus the untrained model, so the standard error is over the
failures, and the greedy change likewise per query.

What it does not show: anything about larger models or the paper's settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r3.checkpoint import load  # noqa: E402
from r3.config import parse_args as parse_train_args  # noqa: E402
from r3.distributed import release_device_memory  # noqa: E402
from r3.precision import resolve_dtype_name  # noqa: E402
from r3.chat import ChatFormat, template_options  # noqa: E402
from r3.episode import answer_stops, failed_unread, run_episode  # noqa: E402
from r3.evaluate import evaluate_examples  # noqa: E402
from r3.sampler import RANDOM_STREAMS, Session  # noqa: E402
from r3.stats import paired_difference  # noqa: E402
from r3.tasks import get  # noqa: E402
from r3.tasks.base import passes  # noqa: E402

CHUNK = 16  # failures (or queries) per batch


def rate(k: int, n: int) -> dict:
    p = k / n if n else 0.0
    return {"rate": p, "k": k, "n": n, "stderr": math.sqrt(p * (1 - p) / n) if n else None}


def first_attempts(model, tok, chat, task, examples, sampling, seed) -> list[tuple[list[int], bool]]:
    """One sampled first attempt per example: (attempt token ids, passed), judged as the run
    judges (``sampling.cut_answers``: with "fail", an attempt the token limit cut off fails)."""
    out = []
    for i in range(0, len(examples), CHUNK):
        batch = examples[i:i + CHUNK]
        s = Session.start(model, [chat.prompt(task.messages(ex)) for ex in batch], vocab_size=len(tok), seed=seed + i)
        got = s.sample(sampling.max_attempt_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                       top_k=sampling.top_k, stop_token_ids=chat.stop_ids,
                       stop_strings=answer_stops(task, chat))
        out += [(list(t), not failed_unread(fin, sampling.cut_answers) and passes(task, ex, chat.decode(t)))
                for ex, t, fin in zip(batch, got.tokens, got.finished)]
    return out


def retries_on(model, tok, chat, task, examples, failures, samples, sampling, seed, label) -> list[int]:
    """Reflect ``samples`` times on each stored failure ``{"index", "attempt"}`` and retry:
    successes per failure. Seeds depend only on the chunk, so two models see the same draws
    wherever their distributions agree."""
    wins, t0 = [], time.time()
    for i in range(0, len(failures), CHUNK):
        chunk = failures[i:i + CHUNK]
        ep = run_episode(model, tok, task, [examples[f["index"]] for f in chunk], group_size=samples,
                         sampling=sampling, seed=seed + i, failed_attempts=[f["attempt"] for f in chunk], chat=chat)
        wins += [int(x) for x in ep.rewards.sum(1).tolist()]
        print(f"  {label}: {len(wins)}/{len(failures)} failures x {samples} reflections, {time.time() - t0:.0f}s",
              file=sys.stderr, flush=True)
    return wins


def evaluate_model(spec: str, cfg, samples: int, seed: int, base_failures: list[dict] | None,
                   device: str = "cpu") -> dict:
    """First attempts, retries on the model's own failures and (``base_failures``) on the
    untrained model's stored failures, and greedy accuracy on the whole test split."""
    t0 = time.time()
    model, tok = load(spec, dtype=torch.bfloat16 if cfg.dtype == "bf16" else torch.float32, device=device)
    chat = ChatFormat(tok, template_options=template_options(cfg.chat_template_options))
    task = get(cfg.task, **cfg.task_options)
    examples = task.examples("test", seed=0)
    sampling = cfg.sampling()
    attempts = first_attempts(model, tok, chat, task, examples, sampling, seed)
    own = [{"index": i, "attempt": a} for i, (a, ok) in enumerate(attempts) if not ok]
    own_wins = retries_on(model, tok, chat, task, examples, own, samples, sampling, seed + 100_000, f"{spec} own failures")
    result = {
        "model": spec,
        "sampled_first_attempt": rate(sum(ok for _, ok in attempts), len(attempts)),
        "retry_success_own_failures": rate(sum(own_wins), samples * len(own)),
        "own_failures": own,
        "own_failure_wins": own_wins,
    }
    if base_failures is not None:
        base_wins = (own_wins if base_failures == own else
                     retries_on(model, tok, chat, task, examples, base_failures, samples, sampling, seed + 100_000,
                                f"{spec} base failures"))
        result["retry_success_base_failures"] = rate(sum(base_wins), samples * len(base_failures))
        result["base_failure_wins"] = base_wins
    greedy = evaluate_examples(model, tok, task, examples, cfg.sampling(0.0), batch_size=32, chat=chat)
    result.update(greedy_first_attempt=rate(greedy["first_success"], greedy["n"]),
                  greedy_second_attempt=rate(greedy["second_success"], greedy["n"]),
                  greedy_first_correct=greedy["first_correct"], greedy_second_correct=greedy["second_correct"],
                  time_s=time.time() - t0)
    return result


def signal_estimate(wins: list[int], samples: int, group_size: int, batch_size: int) -> dict:
    """How much GRPO signal the untrained model offers: with per-failure retry success p_i (from
    ``samples`` reflections each), the chance that a group of ``group_size`` reflections has both
    a passing and a failing retry, 1 - (1 - p_i)^G - p_i^G, averaged over failures, and the
    expected number of such groups among ``batch_size`` failures per step. An all-equal group
    has zero advantage and teaches nothing."""
    p = [w / samples for w in wins]
    per = [1 - (1 - x) ** group_size - x ** group_size for x in p]
    mixed = sum(per) / len(per) if per else 0.0
    return {"failures": len(p), "failures_with_any_success": sum(w > 0 for w in wins),
            "group_size": group_size, "p_group_has_signal": mixed, "groups_with_signal_per_step": mixed * batch_size,
            "batch_size": batch_size}


def paired_over_failures(before: list[int], after: list[int], samples: int) -> dict:
    """Mean over failures of (after - before) success rate, with its standard error."""
    d = [(a - b) / samples for a, b in zip(after, before)]
    n = len(d)
    mean = sum(d) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n) if n else None
    return {"mean": mean, "stderr": se, "z": mean / se if se else None, "failures": n, "samples_per_failure": samples}


def pool(paths: list[str]) -> dict:
    """Paired changes of the mean trained model over runs that share one untrained evaluation."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    before = runs[0]["before"]
    for p, r in zip(paths, runs):
        if r["before"]["own_failure_wins"] != before["own_failure_wins"] or \
                r["before"]["greedy_first_correct"] != before["greedy_first_correct"]:
            raise SystemExit(f"{p}: its untrained evaluation differs from {paths[0]}'s (copy before.json)")
    samples = runs[0]["samples_per_failure"]
    wins = [sum(r["after"]["base_failure_wins"][i] for r in runs) / len(runs) for i in range(len(before["own_failure_wins"]))]
    greedy = {}
    for kind in ("first", "second"):
        per_query = [sum(r["after"][f"greedy_{kind}_correct"][i] for r in runs) / len(runs) - b
                     for i, b in enumerate(before[f"greedy_{kind}_correct"])]
        n = len(per_query)
        mean = sum(per_query) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in per_query) / (n - 1) / n)
        greedy[f"{kind}_attempt"] = {"mean": mean, "stderr": se, "n": n}
    return {"runs": paths, "seeds": [r["config"]["seed"] for r in runs],
            "paired_retry_gain_on_base_failures": paired_over_failures(before["own_failure_wins"], wins, samples),
            "paired_greedy_change": greedy}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt(r: dict) -> str:
    return f"{r['rate']:.3f} \u00b1 {r['stderr'] or 0:.3f} (n={r['n']})"


def untrained_key(cfg, samples: int, seed: int, device: str) -> dict:
    """What the untrained model's evaluation (``OUT/before.json``) depends on, not the training
    knobs: it is reused only where this matches."""
    key = {k: getattr(cfg, k) for k in ("model", "task", "task_options", "temperature", "top_p", "top_k", "dtype",
                                        "max_attempt_tokens", "max_reflection_tokens", "max_retry_tokens")}
    key.update(samples=samples, seed=seed, random_streams=RANDOM_STREAMS)
    # (these only where they differ from what earlier r3 always used: their cached evaluations stay valid)
    if cfg.chat_template_options:
        key["chat_template_options"] = cfg.chat_template_options
    if cfg.cut_answers != "judge":  # (the rule before "fail", now the default: another verdict on every cut answer)
        key["cut_answers"] = cfg.cut_answers
    if torch.device(device).type != "cpu":  # (a GPU draws other samples: its generator and kernels)
        key["device"] = torch.device(device).type
    return key


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/learning_curve")
    ap.add_argument("--samples", type=int, default=16, help="reflections per failed held-out query")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--skip-train", action="store_true", help="only evaluate an existing run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the evaluations run (default: cuda if available); training follows r3.train's own choice")
    ap.add_argument("--before-only", action="store_true",
                    help="only evaluate the untrained model: base rates and the GRPO signal it offers")
    ap.add_argument("--pool", nargs="+", metavar="JSON", help="combine runs' learning_curve.json (see above)")
    ap.add_argument("--json", help="with --pool: write the pooled result here")
    ap.add_argument("train_args", nargs="*", help="flags for r3.train, after --")
    args = ap.parse_args()
    if args.pool:
        res = pool(args.pool)
        p, g = res["paired_retry_gain_on_base_failures"], res["paired_greedy_change"]["first_attempt"]
        print(f"{len(args.pool)} runs (seeds {res['seeds']}): paired retry gain on the untrained model's "
              f"{p['failures']} failures {p['mean']:+.3f} \u00b1 {p['stderr']:.3f} (z={p['z']:.1f}); "
              f"greedy first attempt {g['mean']:+.3f} \u00b1 {g['stderr']:.3f}")
        if args.json:
            _write_json(Path(args.json), res)
        return
    cfg = parse_train_args(list(args.train_args))
    cfg.dtype = resolve_dtype_name(cfg.dtype, args.device)  # (the run and both evaluations in one dtype)
    out = Path(args.out)
    run = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    key = untrained_key(cfg, args.samples, args.seed, args.device)
    before_path = out / "before.json"
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    if before is None or before.get("key") != json.loads(json.dumps(key)):
        print("evaluating the untrained model", flush=True)
        before = evaluate_model(cfg.model, cfg, args.samples, args.seed, None, args.device)
        # (before the training process needs the GPU)
        release_device_memory(torch.device(args.device), compiled=cfg.decode == "compiled")
        before["key"] = key
        _write_json(before_path, before)
    base = before["own_failures"]
    sig = signal_estimate(before["own_failure_wins"], args.samples, cfg.group_size, cfg.batch_size)
    print(f"untrained: first attempt, sampled {_fmt(before['sampled_first_attempt'])}; greedy "
          f"{_fmt(before['greedy_first_attempt'])}; retry success on its {sig['failures']} failures "
          f"{_fmt(before['retry_success_own_failures'])}, {sig['failures_with_any_success']} failures with any "
          f"passing retry; expected groups with signal per step {sig['groups_with_signal_per_step']:.2f} of "
          f"{cfg.batch_size} (G={cfg.group_size})", flush=True)
    if args.before_only:
        _write_json(out / "before_summary.json", {
            "command": " ".join(["python", "benchmarks/learning_curve.py"] + sys.argv[1:]), "config": cfg.to_dict(),
            "samples_per_failure": args.samples, "signal": sig,
            **{k: before[k] for k in ("sampled_first_attempt", "greedy_first_attempt", "greedy_second_attempt",
                                      "retry_success_own_failures", "time_s")}})
        return
    t0 = time.time()
    if not args.skip_train:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "r3.train", *args.train_args, "--dtype", cfg.dtype, "--out", str(run)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    train_s = time.time() - t0
    print("evaluating the trained model", flush=True)
    after = evaluate_model(str(run / "export"), cfg, args.samples, args.seed, base, args.device)
    subprocess.run([sys.executable, "-m", "r3.plot", str(run), "--smooth", "5"], check=True)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    def mean(k, rows):
        return sum(m[k] or 0 for m in rows) / max(1, len(rows))

    paired = paired_over_failures(before["own_failure_wins"], after["base_failure_wins"], args.samples)
    greedy_paired = {
        "first_attempt": paired_difference(before["greedy_first_correct"], after["greedy_first_correct"]),
        "second_attempt": paired_difference(before["greedy_second_correct"], after["greedy_second_correct"]),
    }
    result = {
        "command": " ".join(["python", "benchmarks/learning_curve.py"] + sys.argv[1:]),
        "config": cfg.to_dict(),
        "samples_per_failure": args.samples,
        "before": {k: v for k, v in before.items() if k not in ("own_failures", "key")},
        "after": {k: v for k, v in after.items() if k != "own_failures"},
        "paired_retry_gain_on_base_failures": paired,
        "paired_greedy_change": greedy_paired,
        "untrained_signal": sig,
        "train_wall_s": train_s if not args.skip_train else None,
        "train_step_time_s_total": sum(m["step_time_s"] for m in metrics),
        "train_steps": len(metrics),
        "train_first_try_success_first_10": mean("first_try_success", metrics[:10]),
        "train_first_try_success_last_10": mean("first_try_success", metrics[-10:]),
        "train_retry_success_first_10": mean("retry_success", metrics[:10]),
        "train_retry_success_last_10": mean("retry_success", metrics[-10:]),
        "train_reflection_len_first_10": mean("reflection_len_mean", metrics[:10]),
        "train_reflection_len_last_10": mean("reflection_len_mean", metrics[-10:]),
    }
    _write_json(out / "learning_curve.json", result)
    b, a, ab = before["retry_success_own_failures"], after["retry_success_own_failures"], after["retry_success_base_failures"]
    print(f"retry success on the untrained model's {paired['failures']} held-out failures: {_fmt(b)} -> {_fmt(ab)}; "
          f"paired gain {paired['mean']:+.3f} \u00b1 {paired['stderr'] or 0:.3f} (z={paired['z'] or 0:.1f})")
    print(f"retry success on each model's own failures: {_fmt(b)} -> {_fmt(a)}")
    print(f"first attempt, sampled: {_fmt(before['sampled_first_attempt'])} -> {_fmt(after['sampled_first_attempt'])}")
    g1, g2 = greedy_paired["first_attempt"], greedy_paired["second_attempt"]
    print(f"greedy first attempt: {_fmt(before['greedy_first_attempt'])} -> {_fmt(after['greedy_first_attempt'])}; "
          f"paired change {g1['mean']:+.3f} \u00b1 {g1['stderr']:.3f}")
    print(f"greedy second attempt: {_fmt(before['greedy_second_attempt'])} -> {_fmt(after['greedy_second_attempt'])}; "
          f"paired change {g2['mean']:+.3f} \u00b1 {g2['stderr']:.3f}")


if __name__ == "__main__":
    main()
