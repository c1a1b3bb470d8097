"""``python -m r3.audit RUN``: re-check every reward a training run handed out.

A run's ``samples.jsonl`` holds every retry that was rewarded 1, plus a sample of the others, each
with the verifier's reason. This reads them with the run's own task and options (``config.json``)
and judges each retry again twice: with the task's verifier as it is now, and with an independent
implementation of the same answer rule (:mod:`r3.tasks.recheck`, for the built-in tasks) that
shares no parsing code with it. It prints how many rewarded retries each accepts, every
disagreement with its text, and the last few rewarded retries, so that a person reads what was
paid for.

    python -m r3.audit runs/r3                      # summary, disagreements, 5 rewarded retries
    python -m r3.audit runs/r3 --show 20 --out audit.json

Exit status: 0 when every rewarded retry passes both checks, 1 when one does not (a reward to
look at), 2 for bad input (no such run, a malformed file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from r3.cli import ArgumentParser, check_out_path, read_run_config, run_cut_answers, write_json_atomic
from r3.episode import CUT_REASON, DEFAULT_CUT_ANSWERS, failed_unread
from r3.errors import R3Error, cli_main
from r3.files import read_json_lines
from r3.tasks import get, resolve
from r3.tasks.base import judge
from r3.tasks.recheck import has_recheck, recheck


def read_run_task(run: Path):
    """The task a run trained on, rebuilt from ``RUN/config.json``."""
    cfg = read_run_config(run)
    return cfg, get(cfg["task"], **cfg.get("task_options", {}))


def read_samples(path: Path) -> list[dict]:
    if not path.is_file():
        raise R3Error(f"{path}: missing (the run has logged no samples yet)")
    rows = []
    for lineno, rec in read_json_lines(path, lambda n, e: R3Error(f"{path}, line {n}: not valid JSON ({e.msg})")):
        if not isinstance(rec, dict) or any(f not in rec for f in ("example", "retry", "reward")):
            raise R3Error(f"{path}, line {lineno}: expected an object with example, retry and reward")
        reward = rec["reward"]  # (a NaN is neither > 0 nor <= 0: its retry would be checked by nobody)
        if not isinstance(reward, (int, float)) or reward != reward:
            raise R3Error(f"{path}, line {lineno}: the reward {reward!r} is not a number")
        rows.append(rec)
    return rows


def audit(task, samples: list[dict], cut_answers: str = DEFAULT_CUT_ANSWERS) -> dict:
    """Re-judge every sample by the run's ``cut_answers`` rule (with "fail", a retry its sample
    records as cut off fails both checks unread); returns counts and the disagreements."""
    independent = has_recheck(task)
    rewarded = [s for s in samples if s["reward"] > 0]
    others = [s for s in samples if s["reward"] <= 0]
    out = {"rewarded": len(rewarded), "unrewarded_logged": len(others), "independent_checker": independent,
           "rewarded_pass_verifier": 0, "rewarded_pass_recheck": 0, "unrewarded_pass_verifier": 0,
           "unrewarded_pass_recheck": 0, "rewarded_failing": 0, "disagreements": [],
           # (rewarded retries that hit the retry token limit, of those whose sample records it:
           # a run resumed across the upgrade that added the field has some without it)
           "rewarded_cut": sum(s.get("retry_cut") is True for s in rewarded),
           "rewarded_recording_cut": sum("retry_cut" in s for s in rewarded)}
    for group, key in ((rewarded, "rewarded"), (others, "unrewarded")):
        for s in group:
            cut = failed_unread(s.get("retry_cut") is not True, cut_answers)
            # (why: this verdict's own; None from a duck-typed task)
            now, why = (False, CUT_REASON) if cut else judge(task, s["example"], s["retry"])
            again = ((False, CUT_REASON) if cut else recheck(task, s["example"], s["retry"])) if independent else None
            out[f"{key}_pass_verifier"] += now
            out[f"{key}_pass_recheck"] += bool(again and again[0])
            logged = s["reward"] > 0
            out["rewarded_failing"] += logged and not (now and (again is None or again[0]))
            if now != logged or (again is not None and again[0] != logged):
                out["disagreements"].append({
                    "step": s.get("step"), "rank": s.get("rank"), "row": s.get("row"), "logged_reward": s["reward"],
                    "verifier_now": now, "verifier_reason": why,
                    "recheck": None if again is None else again[0],
                    "recheck_reason": None if again is None else again[1],
                    "logged_reason": s.get("reason"), "example": s["example"], "retry": s["retry"],
                })
    return out


def _rate(k: int, n: int) -> str:
    return f"{k}/{n}" + (f" ({100 * k / n:.1f}%)" if n else "")


@cli_main
def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m r3.audit", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory (--out of r3.train)")
    p.add_argument("--show", type=int, default=5, help="print the last N rewarded retries (default 5)")
    p.add_argument("--out", help="write the audit as JSON")
    args = p.parse_args(argv)
    if args.show < 0:
        raise R3Error(f"--show must be >= 0, got {args.show}")
    run = Path(args.run)
    out_path = check_out_path(args.out) if args.out else None
    cfg, task = read_run_task(run)
    samples = read_samples(run / "samples.jsonl")
    cut_answers = run_cut_answers(run, cfg)
    res = audit(task, samples, cut_answers)
    steps = sorted({s.get("step") for s in samples if isinstance(s.get("step"), int)})
    span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}" if steps else "no steps"
    _, options = resolve(cfg["task"], cfg.get("task_options", {}))
    print(f"run {run}: task {cfg['task']} {json.dumps(options)}")
    print(f"rewarded retries logged: {res['rewarded']} ({span})")
    print(f"  pass the verifier now:         {_rate(res['rewarded_pass_verifier'], res['rewarded'])}")
    if res["independent_checker"]:
        print(f"  pass the independent re-check: {_rate(res['rewarded_pass_recheck'], res['rewarded'])}")
    else:
        print(f"  independent re-check: none for task {cfg['task']!r} (built-in tasks only)")
    if res["rewarded_cut"]:
        of = res["rewarded_recording_cut"]
        print(f"  cut off at the retry token limit: {_rate(res['rewarded_cut'], of)}"
              + (f" of the {of} whose samples record it" if of < res["rewarded"] else "")
              + (" (the run fails cut answers: these should not have been paid)" if cut_answers == "fail" else
                 " (paid for the text where the limit fell; read them, the model may not have been done: --show marks "
                 "them; --cut-answers fail pays only answers the model ended)"))
    print(f"unrewarded samples logged: {res['unrewarded_logged']}" + (
        f"; the re-check passes {res['unrewarded_pass_recheck']} of them" if res["independent_checker"] else ""))
    for dis in res["disagreements"]:
        recheck = "" if dis["recheck"] is None else f", re-check {dis['recheck']} ({dis['recheck_reason']})"
        rank = f" rank {dis['rank']}" if dis["rank"] else ""  # (rows are numbered per rank; rank 0 unnamed)
        print(f"DISAGREEMENT step {dis['step']}{rank} row {dis['row']}: logged reward {dis['logged_reward']}, verifier now "
              f"{dis['verifier_now']}" + (f" ({dis['verifier_reason']})" if dis["verifier_reason"] else "") +
              f"{recheck}\n"
              f"  example: {json.dumps(dis['example'])[:300]}\n  retry: {dis['retry']!r}")
    shown = [s for s in samples if s["reward"] > 0][-args.show:] if args.show > 0 else []
    for s in shown:
        cut = " (retry cut off at the token limit)" if s.get("retry_cut") is True else ""
        failed_as = f" (failed: {s['attempt_reason']})" if s.get("attempt_reason") else ""
        print(f"--- rewarded, step {s.get('step')}{cut}: {json.dumps(s['example'])[:200]}\n"
              f"attempt{failed_as}: {s.get('attempt', '')!r}\n"
              f"reflection: {s.get('reflection', '')!r}\nretry: {s['retry']!r}\nreason: {s.get('reason')}")
    if out_path:
        write_json_atomic(out_path, {"run": str(run), "task": cfg["task"], "task_options": cfg.get("task_options", {}),
                                     "cut_answers": cut_answers, **res})
    return 1 if res["rewarded_failing"] else 0


if __name__ == "__main__":
    sys.exit(main())
