"""The proof the loop learns: held-out retry success of the built-in model before and after
Reflect-Retry-Reward training on CPU.

    python benchmarks/learning_curve.py --config configs/smollm2_countdown_tiny.yaml --out runs/lc

1. Evaluate the untrained model on the task's held-out test queries: one sampled first attempt
   per query, then ``--samples`` reflections + retries per failed query (the training
   distribution: same temperature), and greedy first/second-attempt accuracy (r3.evaluate).
2. Train with ``torchrun -m r3.train --config ...`` (resumes if ``--out`` already holds the run).
3. Evaluate the export the same way, with the same seeds.
Writes ``OUT/learning_curve.json`` (numbers with standard errors) and ``OUT/run/curves.png``.
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
import yaml

from r3.checkpoint import load
from r3.episode import EpisodeSampling, run_episode
from r3.evaluate import evaluate_examples
from r3.tasks import get


def sampled_eval(spec: str, cfg: dict, samples: int, seed: int) -> dict:
    """First-attempt success over queries, retry success over (failed query, reflection) pairs."""
    model, tok = load(spec, dtype=torch.bfloat16)
    task = get(cfg["task"], **cfg.get("task_options", {}))
    examples = task.examples("test", seed=0)
    mnt = int(cfg.get("max_new_tokens", 48))
    sampling = EpisodeSampling(temperature=float(cfg.get("temperature", 1.0)), max_attempt_tokens=mnt,
                               max_reflection_tokens=mnt, max_retry_tokens=mnt)
    first = queries = retry_ok = retries = 0
    t0 = time.time()
    for i in range(0, len(examples), 16):
        ep = run_episode(model, tok, task, examples[i:i + 16], group_size=samples, sampling=sampling, seed=seed + i)
        first += ep.first_success
        queries += ep.queries
        retry_ok += int(ep.rewards.sum())
        retries += ep.rewards.numel()
        print(f"  {spec}: {queries}/{len(examples)} queries, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    greedy = evaluate_examples(model, tok, task, examples, max_new_tokens=mnt, temperature=0.0, batch_size=32)

    def rate(k, n):
        p = k / n if n else 0.0
        return {"rate": p, "k": k, "n": n, "stderr": math.sqrt(p * (1 - p) / n) if n else None}

    return {
        "model": spec,
        "sampled_first_attempt": rate(first, queries),
        "sampled_retry_success": rate(retry_ok, retries),
        "greedy_first_attempt_accuracy": greedy["first_attempt_accuracy"],
        "greedy_second_attempt_accuracy": greedy["second_attempt_accuracy"],
        "greedy_n": greedy["n"],
        "time_s": time.time() - t0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2_countdown_tiny.yaml")
    ap.add_argument("--out", default="runs/learning_curve")
    ap.add_argument("--samples", type=int, default=8, help="reflections per failed held-out query")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--skip-train", action="store_true", help="only evaluate an existing run")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    run = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    print("evaluating the untrained model", flush=True)
    before = sampled_eval(cfg.get("model", "smollm2-135m"), cfg, args.samples, args.seed)
    t0 = time.time()
    if not args.skip_train:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "r3.train", "--config", args.config, "--out", str(run)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    train_s = time.time() - t0
    print("evaluating the trained model", flush=True)
    after = sampled_eval(str(run / "export"), cfg, args.samples, args.seed)
    subprocess.run([sys.executable, "-m", "r3.plot", str(run), "--smooth", "5"], check=True)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    result = {
        "command": " ".join(["python", "benchmarks/learning_curve.py"] + sys.argv[1:]),
        "config": cfg,
        "before": before,
        "after": after,
        "train_wall_s": train_s if not args.skip_train else None,
        "train_step_time_s_total": sum(m["step_time_s"] for m in metrics),
        "train_steps": len(metrics),
        "train_first_try_success_first_10": sum(m["first_try_success"] or 0 for m in metrics[:10]) / max(1, len(metrics[:10])),
        "train_first_try_success_last_10": sum(m["first_try_success"] or 0 for m in metrics[-10:]) / max(1, len(metrics[-10:])),
        "train_retry_success_first_10": sum(m["retry_success"] for m in metrics[:10]) / max(1, len(metrics[:10])),
        "train_retry_success_last_10": sum(m["retry_success"] for m in metrics[-10:]) / max(1, len(metrics[-10:])),
    }
    tmp = out / ".learning_curve.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "learning_curve.json")
    b, a = before["sampled_retry_success"], after["sampled_retry_success"]
    print(f"held-out retry success: {b['rate']:.3f} ± {b['stderr']:.3f} (n={b['n']}) -> "
          f"{a['rate']:.3f} ± {a['stderr']:.3f} (n={a['n']})")
    print(f"held-out first attempt (sampled): {before['sampled_first_attempt']['rate']:.3f} -> "
          f"{after['sampled_first_attempt']['rate']:.3f}")
    print(f"greedy accuracy 1st/2nd: {before['greedy_first_attempt_accuracy']:.3f}/{before['greedy_second_attempt_accuracy']:.3f}"
          f" -> {after['greedy_first_attempt_accuracy']:.3f}/{after['greedy_second_attempt_accuracy']:.3f}")


if __name__ == "__main__":
    main()
