"""Where a training step's time goes, and what the shared-prefix forward saves: the reference pass
and the update (forward + backward + clip) over the same groups with ``shared_prefix`` off and on,
in one run, on the trainer's own models (FSDP2 policy with fp32 master weights, compute in the
run's dtype). Prints a table; ``--json`` writes it.

    python benchmarks/bench_train_step.py --json benchmarks/results/train_step_cpu.json

Two shapes:

* ``default``: one real rollout of the main command's settings (the built-in model, countdown-tiny,
  8 failed queries x G=8, reflections up to 96 tokens); its time is reported once.
* ``paper``: 4 groups x G=8 of random tokens shaped like the paper's runs: a prefix of 250-400
  tokens (prompt + a failed attempt of up to 256 tokens + the reflection prompt) and reflections of
  40-128 tokens.

Every group is given non-zero advantages, so each one is trained (a real step trains only the
groups whose rewards differ, 0-3 of 8 on the default run). Times are the median of ``--repeats``;
the per-group numbers divide by the number of groups. The FLOPs lower bound counts 2 x (the
blocks' parameters) per encoded token plus the LM head on the targets for a forward, 3x that for
forward + backward, at this machine's measured rate for a matmul of the model's shape in the compute dtype; attention's score
FLOPs are left out, so the bound is optimistic for long rows.

Rollouts, the same seed, alternating: the default rollout with ``compact_rollouts`` off and on
(the median time of each part: first attempts, reflections, retries, each prefill + decode; and
whether both gave the same samples), with the share of each decode batch's row-steps spent on
rows that had already stopped (the most that compaction can save); and a paper-shaped rollout
(Countdown with answer tags, its own 3-4 number problems, attempts and retries up to 256 tokens,
reflections up to 128; 8 failures x G=8) off, with compaction, and with compaction plus the
task's stop string (answer turns end at ``</answer>``; the default task has none: without tags
the final equation can come at any point). Stop strings change the samples (turns are cut), so
that row is compared on time only.

``--model DIR --shapes paper --no-rollouts``: another model's reference pass and update on the
paper shape (e.g. a random Qwen 3.5-shaped checkpoint, whose Gated DeltaNet layers run each
reflection from the state its prefix ended in).

What it does not show: the optimizer step (the same in both), or a GPU (it runs there on CUDA
when one is present).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r3 import batch as B  # noqa: E402
from r3.config import TrainConfig  # noqa: E402
from r3.distributed import init_distributed  # noqa: E402
from r3.episode import run_episode  # noqa: E402
from r3.files import write_json_atomic  # noqa: E402
from r3.flops import matmul_flops_per_token  # noqa: E402
from r3.precision import cpu_description  # noqa: E402
from r3.tasks import get as get_task  # noqa: E402
from r3.train import build_models, compute_dtype, resolve_dtype, sync_rollout_weights, update  # noqa: E402


def paper_groups(vocab: int, n_groups: int, G: int, seed: int):
    rng = random.Random(seed)
    seqs, spans = [], []
    for _ in range(n_groups):
        prefix = [rng.randrange(vocab) for _ in range(rng.randint(250, 400))]
        for _ in range(G):
            n = rng.randint(40, 128)
            seqs.append(prefix + [rng.randrange(vocab) for _ in range(n + 20)])
            spans.append((len(prefix), len(prefix) + n))
    return seqs, spans


def matmul_rate(hidden: int, inter: int, dtype, device, tokens: int = 2048) -> float:
    """FLOP/s of an [tokens, hidden] x [hidden, inter] matmul (median of 10)."""
    a = torch.randn(tokens, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, inter, dtype=dtype, device=device)
    times = []
    for i in range(13):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * tokens * hidden * inter / statistics.median(times)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def measure(name, seqs, spans, G, policy, reference, cfg, d, flops, rate, repeats):
    n_groups = len(seqs) // G
    adv = [float(x) for x in torch.randn(len(seqs), generator=torch.Generator().manual_seed(0))]
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # the weights stay as they are
    temperature = cfg.temperature
    results = {}
    for shared in (False, True):
        ref_t, upd_t, peak = [], [], 0
        for _ in range(repeats):
            mbs = B.make_micro_batches(seqs, spans, adv, cfg.micro_batch_size, 0, d.device, shared_prefix=shared)
            ref_t.append(timed(lambda: B.score_micro_batches(mbs, reference, None, temperature), d.device))
            ref_logp = torch.cat([mb.ref_logp for mb in mbs]).float().cpu()
            upd_t.append(timed(lambda: update(policy, opt, mbs, len(mbs), cfg, d), d.device))
            if d.device.type == "cuda":
                peak = max(peak, torch.cuda.max_memory_allocated())
        # real tokens run through the model (padding left out)
        if shared:
            tokens = sum(int((mb.packed.segments >= 0).sum()) for mb in mbs)
        else:
            tokens = sum(end for _, end in spans)
        ref_s, upd_s = statistics.median(ref_t), statistics.median(upd_t)
        targets = sum(end - start for start, end in spans)
        bound = 4 * flops(tokens, targets) / rate  # forward (reference) + forward and backward (update)
        results[shared] = {"shape": name, "shared_prefix": shared, "groups": n_groups, "rows": len(seqs),
                           "tokens_encoded": tokens, "reference_s": ref_s, "update_s": upd_s,
                           "per_group_s": (ref_s + upd_s) / n_groups,
                           "tokens_per_s": 2 * tokens / (ref_s + upd_s), "flops_bound_s": bound,
                           "of_bound": (ref_s + upd_s) / bound, "micro_batches": len(mbs),
                           "peak_memory_gib": peak / 2**30 if peak else None, "_ref_logp": ref_logp}
    a, b = results[False], results[True]
    b["speedup"] = a["per_group_s"] / b["per_group_s"]
    # the same reference log-probs from both layouts, up to the compute dtype's rounding
    b["ref_logp_max_diff"] = float((a.pop("_ref_logp") - b.pop("_ref_logp")).abs().max())
    return [a, b]


def measure_rollouts(shape: str, model, tok, examples, cfg, variants, repeats):
    """One step's episode (seed 0) under each of ``variants`` (``(label, task, sampling)``),
    alternating, ``repeats`` times each: the median time of each part. The first two variants
    differ only in compaction: whether they gave the same samples (every sequence and reward)."""
    times = {label: [] for label, _, _ in variants}
    eps = {}
    for _ in range(repeats):
        for label, task, sampling in variants:
            t = time.perf_counter()
            ep = run_episode(model, tok, task, examples, group_size=cfg.group_size, max_failures=cfg.batch_size,
                             sampling=sampling, seed=0)
            times[label].append({"total": time.perf_counter() - t, **ep.times})
            eps[label] = ep
    rows = []
    for label, _, _ in variants:
        med = {k: statistics.median(t[k] for t in times[label]) for k in times[label][0]}
        rows.append({"shape": shape, "variant": label, **{f"{k}_s": v for k, v in med.items()},
                     "generated_tokens": eps[label].generated_tokens, "mean_length": mean_lengths(eps[label])})
    for r in rows[1:]:
        r["speedup"] = rows[0]["total_s"] / r["total_s"]
    a, b = eps[variants[0][0]], eps[variants[1][0]]
    rows[1]["same_samples"] = a.sequences == b.sequences and torch.equal(a.rewards, b.rewards)
    rows[1]["rows_differing"] = sum(x != y for x, y in zip(a.sequences, b.sequences))
    return a, rows


def part_lengths(ep) -> dict:
    """Tokens of each first attempt, reflection and retry of an episode."""
    lengths = {"attempt": [len(a) for a in ep.first_attempts], "reflection": [e - s for s, e in ep.spans],
               "retry": [e - s for s, e in ep.retry_spans]}
    return {k: v for k, v in lengths.items() if v}


def mean_lengths(ep) -> dict:
    return {k: sum(v) / len(v) for k, v in part_lengths(ep).items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="default,paper", help="comma-separated: default, paper")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rollout-repeats", type=int, default=1, help="repeats of the paper-shaped rollouts")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: the config's")
    ap.add_argument("--model", default=None, help="default: the config's (the built-in model)")
    ap.add_argument("--no-rollouts", action="store_true",
                    help="the paper shape's reference pass and update only (no rollouts: e.g. random weights)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    d = init_distributed()
    cfg = TrainConfig(**({"micro_batch_size": args.micro_batch_size} if args.micro_batch_size else {}),
                      **({"model": args.model} if args.model else {})).validate()
    resolve_dtype(cfg, d)
    dtype = compute_dtype(cfg)
    policy, reference, rollout_model, tok = build_models(cfg, d)
    sync_rollout_weights(policy, rollout_model)
    mc = rollout_model.config
    def flops(tokens: int, targets: int) -> float:
        """One forward's matmul FLOPs: the blocks on every token, the LM head on the targets."""
        return matmul_flops_per_token(mc) * tokens + 2 * mc.hidden_size * mc.vocab_size * targets

    rate = matmul_rate(mc.hidden_size, mc.intermediate_size, dtype, d.device)
    out = {"device": torch.cuda.get_device_name() if d.device.type == "cuda" else f"cpu ({cpu_description()})",
           "model": cfg.model, "dtype": str(dtype).replace("torch.", ""), "matmul_tflops": rate / 1e12, "rows": []}
    shapes = args.shapes.split(",")
    if "default" in shapes and args.no_rollouts:
        raise SystemExit("--no-rollouts: the default shape is a real rollout; use --shapes paper")
    if "default" in shapes:
        task = get_task(cfg.task, **cfg.task_options)
        examples = task.examples("train", seed=0)
        n = math.ceil(cfg.batch_size * cfg.candidates_per_failure)
        variants = [("off", task, replace(cfg.sampling(), compact=False)),
                    ("compaction", task, replace(cfg.sampling(), compact=True))]
        ep, rows = measure_rollouts("default", rollout_model, tok, examples[:n], cfg, variants, args.repeats)
        out["rollouts"] = rows
        # Row-steps of each decode batch spent on rows that had already stopped (without
        # compaction): what dropping them can save at most (decode time is not linear in the rows).
        out["stopped_row_step_fraction"] = {k: 1 - sum(v) / (len(v) * max(v)) for k, v in part_lengths(ep).items()}
        out["mean_length"] = mean_lengths(ep)
        out["rows"] += measure("default", ep.sequences, ep.spans, cfg.group_size, policy, reference, cfg, d,
                               flops, rate, args.repeats)
    if "paper" in shapes and not args.no_rollouts:
        # Countdown with answer tags (its own defaults: 3-4 numbers, all four operators) at the
        # paper's token limits; the answer turns may end at </answer>.
        pcfg = replace(cfg, max_attempt_tokens=256, max_reflection_tokens=128, max_retry_tokens=256)
        free, stopping = get_task("countdown", stop_at_answer=False), get_task("countdown")
        examples = free.examples("train", seed=0)[:math.ceil(cfg.batch_size * cfg.candidates_per_failure)]
        variants = [("off", free, replace(pcfg.sampling(), compact=False)),
                    ("compaction", free, replace(pcfg.sampling(), compact=True)),
                    ("compaction + stop strings", stopping, replace(pcfg.sampling(), compact=True))]
        _, rows = measure_rollouts("paper", rollout_model, tok, examples, pcfg, variants, args.rollout_repeats)
        out.setdefault("rollouts", []).extend(rows)
    if "paper" in shapes:
        seqs, spans = paper_groups(mc.vocab_size, 4, cfg.group_size, seed=0)
        out["rows"] += measure("paper", seqs, spans, cfg.group_size, policy, reference, cfg, d, flops, rate,
                               args.repeats)
    print(f"device {out['device']}, {out['dtype']}, matmul {out['matmul_tflops']:.2f} TFLOP/s")
    if "rollouts" in out:
        head = ("rollout", "variant", "attempt s", "reflection s", "retry s", "rollout s", "speed-up",
                "mean attempt / retry tokens", "same samples")
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for r in out["rollouts"]:
            ml = r["mean_length"]
            cells = (r["shape"], r["variant"], f"{r['attempt_s']:.2f}", f"{r['reflection_s']:.2f}",
                     f"{r['retry_s']:.2f}", f"{r['total_s']:.2f}", f"{r['speedup']:.2f}x" if "speedup" in r else "",
                     f"{ml.get('attempt', 0):.0f} / {ml.get('retry', 0):.0f}",
                     ("yes" if r["same_samples"] else f"no ({r['rows_differing']} rows differ)") if "same_samples" in r else "")
            print("| " + " | ".join(str(c) for c in cells) + " |")
    for k, v in out.get("stopped_row_step_fraction", {}).items():
        print(f"  {k}: mean length {out['mean_length'][k]:.1f} tokens; {v:.0%} of the decode batch's row-steps "
              "are rows that already stopped")
    head = ("shape", "shared prefix", "groups", "micro-batches", "tokens", "reference s", "update s", "s / group",
            "speed-up", "x FLOPs bound", "max |ref logp diff|")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in out["rows"]:
        cells = (r["shape"], "on" if r["shared_prefix"] else "off", r["groups"], r["micro_batches"], r["tokens_encoded"],
                 f"{r['reference_s']:.2f}", f"{r['update_s']:.2f}", f"{r['per_group_s']:.2f}",
                 f"{r['speedup']:.2f}x" if "speedup" in r else "", f"{r['of_bound']:.1f}",
                 f"{r['ref_logp_max_diff']:.1e}" if "ref_logp_max_diff" in r else "")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        write_json_atomic(Path(args.json), out)


if __name__ == "__main__":
    main()
