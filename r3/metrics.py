"""One training step's metrics: every rank's counts summed into the row ``metrics.jsonl`` keeps,
and the progress line printed for it."""

from __future__ import annotations

import torch

from r3.distributed import Dist, all_max, all_sum
from r3.progress import format_duration


def step_metrics(step: int, ep, adv: torch.Tensor, upd: dict, times: dict, d: Dist, *, lr: float,
                 data_position: int, fresh_attempts: bool, flops: float, peak_flops: float) -> dict:
    """The row for ``metrics.jsonl``. ``ep``: this rank's episode; ``adv``: its group advantages;
    ``upd``: what :func:`r3.train.update` returned; ``times``: seconds of the step and of its
    rollout, reference and update parts; ``flops``: this rank's model FLOPs of the reference and
    update passes, ``peak_flops`` its device's peak rate (:mod:`r3.flops`). Rates are over all
    ranks' tokens and retries."""
    rewards = ep.rewards
    n_groups = rewards.shape[0]
    signal = sum(1 for g in range(n_groups) if not (adv[g] == 0).all())
    g = all_sum({
        "loss": upd["loss"], "kl": upd["kl_sum"], "tokens": upd["tokens"], "clip_low": upd["clip_low_sum"],
        "clip_high": upd["clip_high_sum"], "logp_diff": upd["logp_diff_sum"], "logp_diff_tokens": upd["logp_diff_tokens"],
        "rewards": float(rewards.sum()), "retries": float(rewards.numel()), "queries": ep.queries,
        "first_success": ep.first_success, "groups": n_groups, "signal": signal,
        "reflection_tokens": sum(e - s for s, e in ep.spans), "generated": ep.generated_tokens,
        "reflections_cut": sum(r["reflection_cut"] for r in ep.records), "retries_cut": sum(r["retry_cut"] for r in ep.records),
        "flops": float(flops), "peak_flops": float(peak_flops),
    }, d)
    logp_diff_max = all_max(upd["logp_diff_max"], d)
    tokens, retries = g["tokens"], g["retries"]
    return {
        "step": step,
        "loss": g["loss"],
        # None: no token trained this step, or no reference to measure against (beta 0)
        "kl": g["kl"] / tokens if tokens and upd["kl_scored"] else None,
        "retry_success": g["rewards"] / retries if retries else 0.0,
        "first_try_success": g["first_success"] / g["queries"] if (g["queries"] and fresh_attempts) else None,
        "groups": int(g["groups"]),
        "groups_with_signal": int(g["signal"]),
        "reflection_tokens": int(g["reflection_tokens"]),
        "trained_tokens": int(tokens),
        "reflection_len_mean": g["reflection_tokens"] / retries if retries else 0.0,
        # the shares the token limits cut off (not ended by the model): a limit that binds often
        # cuts reflections short, and a cut retry fails unread (cut_answers fail) or is judged
        # where the limit fell (judge)
        "reflection_cut_frac": g["reflections_cut"] / retries if retries else 0.0,
        "retry_cut_frac": g["retries_cut"] / retries if retries else 0.0,
        "clip_frac_low": g["clip_low"] / tokens if tokens else 0.0,
        "clip_frac_high": g["clip_high"] / tokens if tokens else 0.0,
        # the sampler's vs the trainer's log-prob of each trained token, before the update
        "logp_diff_mean": g["logp_diff"] / g["logp_diff_tokens"] if g["logp_diff_tokens"] else None,
        "logp_diff_max": logp_diff_max if g["logp_diff_tokens"] else None,
        "grad_norm": upd["grad_norm"],
        "lr": lr,
        "skipped": upd["skipped"],
        "step_time_s": times["step"],
        "rollout_time_s": times["rollout"],
        # this rank's rollout by part: first attempts, reflections, retries (prefill + decode), verdicts
        "attempt_time_s": ep.times.get("attempt", 0.0),
        "reflection_time_s": ep.times.get("reflection", 0.0),
        "retry_time_s": ep.times.get("retry", 0.0),
        "verify_time_s": ep.times.get("verify", 0.0),  # (the verifier's calls: a slow plug-in shows here)
        "reference_time_s": times["reference"],
        "update_time_s": times["update"],
        "rollout_tokens_per_s": g["generated"] / max(times["rollout"], 1e-9),
        "tokens_per_s": g["generated"] / max(times["step"], 1e-9),
        # model FLOPs of the reference and update passes over their time and every rank's peak
        # (the rollout's decoding is bandwidth-bound: its measure is tokens/s); None: no such pass
        "mfu": g["flops"] / (max(times["reference"] + times["update"], 1e-9) * g["peak_flops"])
        if g["peak_flops"] and g["flops"] else None,
        "peak_tflops": g["peak_flops"] / d.world / 1e12 if g["peak_flops"] else None,
        "data_position": data_position,
        # this rank's peak allocated GPU memory during the step (None on CPU)
        "peak_memory_gb": torch.cuda.max_memory_allocated(d.device) / 1e9 if d.device.type == "cuda" else None,
    }


def _verify_part(row: dict) -> str:
    """The verifier's share of the rollout where it is a tenth or more: a slow plug-in verifier
    is otherwise hidden in the rollout's time."""
    verify, rollout = row.get("verify_time_s") or 0.0, row["rollout_time_s"]
    return f" of which verify {verify:.1f}" if rollout > 0 and verify >= 0.1 * rollout else ""


def format_step_line(row: dict, max_steps: int, eta_s: float) -> str:
    fts = "  n/a" if row["first_try_success"] is None else f"{row['first_try_success']:.2f}"
    kl = "     n/a" if row["kl"] is None else f"{row['kl']:.2e}"  # None: no token trained this step
    return (
        f"step {row['step']}/{max_steps} | loss {row['loss']:+.4f} | kl {kl} | "
        f"retry {row['retry_success']:.2f} | first {fts} | signal {row['groups_with_signal']}/{row['groups']} | "
        f"{row['step_time_s']:.1f}s/step (rollout {row['rollout_time_s']:.1f}{_verify_part(row)}, "
        f"ref {row['reference_time_s']:.1f}, "
        f"update {row['update_time_s']:.1f})"
        + ("" if row.get("mfu") is None else f" | mfu {100 * row['mfu']:.1f}%")
        + f" | ETA {format_duration(eta_s)}"
        + (" | SKIPPED (non-finite)" if row["skipped"] else "")
    )
