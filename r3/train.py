"""``torchrun [--nproc_per_node N] -m r3.train``: Reflect-Retry-Reward GRPO with FSDP2.

One optimizer step:

1. rollout — the policy's weights are gathered once into a plain (unsharded) copy in the compute
   dtype, and each rank runs the attempt/reflect/retry episode on its own share of queries with
   our KV-cache sampler (no FSDP all-gather per decode step). A group never spans ranks.
2. reference — the frozen reference model (sharded too) scores the reflection tokens.
3. update — micro-batches through the FSDP policy; log-probs of the reflection tokens only and
   their k3 KL to the reference, in one pass of ``r3.kernels.fused_logprob_kl``; the GRPO loss is normalised by the *global* token count of the
   step (all micro-batches, all ranks), so 1 rank and N ranks give the same update.

Checkpoints (torch.distributed.checkpoint) hold model, optimizer, scheduler, step and data
position; running again with the same ``--out`` resumes exactly. The end of training writes a
Hugging Face export to ``OUT/export``.

Read :func:`train` top to bottom: :func:`set_up`, then per step :func:`train_step` (rollout ->
:mod:`r3.batch` -> :func:`update`) and :mod:`r3.metrics`, held-out evaluation, and the checkpoint
of :mod:`r3.rundir`. Process-group helpers are in :mod:`r3.distributed`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from r3.kernels.logprob_kl import triton_compiles
from r3 import grpo
from r3.batch import (
    MicroBatch,
    dummy_micro_batch,
    episode_micro_batches,
    kept_rows,
    scatter,
    score_micro_batches,
    token_logprobs,
)
from r3.chat import ChatFormat, check_messages, template_options
from r3.checkpoint import canonical_model, load, load_config
from r3.config import TrainConfig, parse_args
from r3.cpu_share import CpuShareWatch, watch_for
from r3.distributed import (
    Dist,
    StopSignals,
    all_max,
    all_sum,
    fail_together,
    gather_to_main,
    init_distributed,
    run_and_exit,
    shard,
    synchronize,
    wait_for_main,
)
from r3.episode import run_episode
from r3.errors import R3Error, cli_main
from r3.failure_data import check_made_for, read_failures, without_test_queries
from r3.flops import backward_flops, forward_flops, peak_flops
from r3.heldout import evaluate_examples
from r3.metrics import format_step_line, step_metrics
from r3.model import Transformer, check_token_limits
from r3.precision import resolve_dtype_name, slow_bf16_warning
from r3.rollout_memory import available_bytes, kv_cache_bytes, local_ranks, rollout_memory_warning, rollout_rows
from r3.rundir import (
    append_jsonl,
    export,
    prepare_out_dir,
    resume,
    save_checkpoint,
    truncate_jsonl,
    write_config,
)
from r3.tasks import examples_of
from r3.tasks import get as get_task
from r3.tasks import resolve as resolve_task
from r3.tasks.base import report_verifier_errors, verifier_error_counts
from r3.toolchain import check_toolchain
from r3.tracking import Tracker, make_tracker, tracker_module

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The torch dtype of a resolved ``cfg.dtype`` (see :func:`resolve_dtype`)."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]


def resolve_dtype(cfg: TrainConfig, d: Dist) -> None:
    """Make ``dtype: auto`` concrete before anything compares or records it: a run being resumed
    keeps the dtype its config.json recorded, a new one takes bf16 where this device multiplies
    bf16 natively, else fp32. bf16 on a device that only emulates it is a warning."""
    if cfg.dtype == "auto":
        try:
            recorded = json.loads((Path(cfg.out) / "config.json").read_text()).get("dtype")
        except (OSError, ValueError, AttributeError):
            recorded = None
        cfg.dtype = recorded if recorded in ("bf16", "fp32") else resolve_dtype_name("auto", d.device)
    warning = slow_bf16_warning(d.device) if cfg.dtype == "bf16" else None
    if warning and d.main:
        print(warning, flush=True)


def build_models(cfg: TrainConfig, d: Dist):
    """-> (policy [FSDP, fp32 master weights], reference [FSDP, frozen], rollout copy, tokenizer)."""
    dtype = compute_dtype(cfg)
    # Each model is sharded before the next one loads: at most one whole model (the fp32 policy,
    # 4 bytes a parameter) sits on a device beside the shards, not all three (8 bytes a parameter).
    policy, tokenizer = load(cfg.model, dtype=torch.float32, device=d.device)
    frozen = freeze_parameters(policy, cfg.freeze)
    if d.main and frozen:
        total = sum(p.numel() for p in policy.parameters())
        print(f"note: --freeze {cfg.freeze}: {frozen:,} of the model's {total:,} parameters "
              f"({100 * frozen / total:.1f}%) stay as they are", flush=True)
    policy.train()
    policy.activation_checkpointing = cfg.activation_checkpointing
    shard(policy, d, dtype)
    reference, _ = load(cfg.model, dtype=dtype, device=d.device, tokenizer=False)
    reference.requires_grad_(False)
    shard(reference, d, dtype)
    with torch.device("meta"):
        rollout = Transformer(policy.config)
    rollout = rollout.to_empty(device=d.device).to(dtype)
    rollout.tie_weights()
    rollout.requires_grad_(False).eval()
    return policy, reference, rollout, tokenizer


def freeze_parameters(model, patterns: str) -> int:
    """Hold the parameters whose names match one of ``patterns`` (comma-separated ``fnmatch``
    patterns over r3's names: fused ``qkv_proj`` / ``gate_up_proj``; a tied ``lm_head.weight`` is
    ``embed_tokens.weight``) fixed: no gradient, no optimizer state. Returns how many numbers are
    frozen. A pattern that matches no parameter is an R3Error naming it, with names that exist."""
    import fnmatch

    if not patterns:
        return 0
    named = list(model.named_parameters(remove_duplicate=False))
    frozen = {}
    for pattern in (p.strip() for p in patterns.split(",")):
        hits = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            names = [n for n, _ in named]
            shown = ", ".join(names[:3] + (["...", names[-1]] if len(names) > 3 else []))
            raise R3Error(f"config: 'freeze' pattern {pattern!r} matches no parameter of the model (r3's names: {shown})")
        frozen.update({id(p): p for _, p in hits})
    if len(frozen) == len({id(p) for _, p in named}):
        raise R3Error(f"config: 'freeze' {patterns!r} matches every parameter of the model: nothing is left to train")
    for p in frozen.values():
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


@torch.no_grad()
def sync_rollout_weights(policy, rollout) -> None:
    """Gather the sharded fp32 policy once per step into the plain compute-dtype rollout copy (its
    buffers too: Gemma 4's layer scalars, which the copy, made empty, holds no value of)."""
    target = dict(rollout.named_parameters())
    for name, p in policy.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        target[name].copy_(full)
    buffers = dict(rollout.named_buffers())
    for name, b in policy.named_buffers():
        buffers[name].copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class QueryStream:
    """Deterministic, resumable order over the training examples: a seeded permutation per
    epoch; ``position`` counts examples consumed (by all ranks together).
    ``recent_first_success``: the first-attempt success of the last steps, which sizes how many
    queries a step takes in fresh mode (:func:`candidates_per_failure`); checkpointed with the
    position (None after loading a checkpoint of an older version, which did not record it)."""

    def __init__(self, items: list, seed: int, position: int = 0):
        if not items:
            raise R3Error("the task has no training examples")
        self.items, self.seed, self.position = items, seed, position
        self.recent_first_success: list[float] | None = []
        self._orders: dict[int, list[int]] = {}
        self._fingerprint: str | None = None

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:  # (once per epoch: a step takes hundreds of items of 60k)
            order = list(range(len(self.items)))
            random.Random(self.seed * 100003 + epoch).shuffle(order)
            self._orders = {epoch: order, **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the items: a checkpoint records it, so resuming on other data is said."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for item in self.items:  # (one at a time: 60k stored failures are hundreds of MB as one text)
                try:
                    text = json.dumps(item, sort_keys=True)
                except TypeError:  # (keys that do not sort: int and str mixed)
                    text = json.dumps(item)
                h.update(text.encode() + b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def take(self, n_total: int, rank: int, world: int) -> list:
        """The next ``n_total`` items; this rank gets its contiguous slice of them."""
        per_rank = n_total // world
        out = []
        for i in range(self.position + rank * per_rank, self.position + (rank + 1) * per_rank):
            epoch, j = divmod(i, len(self.items))
            out.append(self.items[self._order(epoch)[j]])
        self.position += per_rank * world
        return out


# --------------------------------------------------------------------------------------------
# Update
# --------------------------------------------------------------------------------------------


def update(policy, optimizer, mbs: list[MicroBatch], n_real: int, cfg: TrainConfig, d: Dist) -> dict:
    """``cfg.update_epochs`` optimizer steps over the micro-batches (``mbs[n_real:]`` are dummies
    that keep this rank in step with the others). The loss of every micro-batch is divided by the
    step's global denominator, so the summed gradient is the whole batch's whatever the split over
    micro-batches and ranks. A non-finite loss or gradient norm skips the step (on every rank).

    Before the first optimizer step the policy's log-probs of the reflection tokens are those the
    sampler drew them with (same weights); ``logp_diff_sum`` / ``logp_diff_max`` / ``logp_diff_tokens``
    measure how far apart they are (precision of the rollout copy; a masking or alignment bug
    shows up as a jump)."""
    real = mbs[:n_real]
    # Sums are kept on the device and read once per optimizer step: no host sync per micro-batch.
    den = sum((grpo.loss_denominator(mb.mask, cfg.agg, max_len=cfg.max_reflection_tokens).to(d.device)
               for mb in real), torch.zeros((), device=d.device))
    if d.world > 1:
        dist.all_reduce(den)
    stats = {"loss": 0.0, "grad_norm": float("nan"), "skipped": False, "logp_diff_tokens": 0.0,
             "kl_scored": cfg.beta > 0}  # (beta 0: no reference scored, no KL to report)
    zero = torch.zeros((), dtype=torch.float64, device=d.device)
    sums = dict.fromkeys(("kl_sum", "clip_low_sum", "clip_high_sum", "tokens"), zero)
    gap_sum = gap_max = torch.zeros((), device=d.device)
    for epoch in range(cfg.update_epochs):
        last = epoch == cfg.update_epochs - 1
        loss_sum = zero
        for i, mb in enumerate(mbs):
            logp, kl = token_logprobs(policy, mb, cfg.temperature, mb.ref_logp if i < n_real else None)
            if i >= n_real:
                (logp.sum() * 0.0).backward()
                continue
            if epoch == 0 and mb.rollout_logp is not None and mb.rollout_logp.numel():
                gap = (logp.detach().float() - mb.rollout_logp).abs()
                gap_sum, gap_max = gap_sum + gap.sum(), torch.maximum(gap_max, gap.max())
                stats["logp_diff_tokens"] += gap.numel()
            lp = scatter(logp, mb)
            old = scatter(mb.old_logp, mb) if mb.old_logp is not None else lp.detach()
            loss, m = grpo.policy_loss(
                lp, old, None, mb.advantages, mb.mask,
                eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, agg=cfg.agg,
                denominator=den, max_len=cfg.max_reflection_tokens, kl=scatter(kl, mb) if kl is not None else None,
            )
            # FSDP averages gradients over ranks; the loss is already globally normalised.
            (loss * d.world).backward()
            loss_sum = loss_sum + loss.detach().double()
            if last:
                n = m["tokens"].double()
                for key, metric in (("kl_sum", "kl"), ("clip_low_sum", "clip_frac_low"), ("clip_high_sum", "clip_frac_high")):
                    sums[key] = sums[key] + m[metric].double() * n
                sums["tokens"] = sums["tokens"] + n
        loss_total = float(loss_sum)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        bad = all_max(0 if (math.isfinite(gn) and math.isfinite(loss_total)) else 1, d)
        if bad:
            stats["skipped"] = True
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["grad_norm"] = gn
        if last:
            stats["loss"] = loss_total
    stats.update({k: float(v) for k, v in sums.items()})
    stats["logp_diff_sum"], stats["logp_diff_max"] = float(gap_sum), float(gap_max)
    return stats


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(cfg: TrainConfig, params) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the run's lr, betas and weight decay (its state made up front), and the lr
    schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio``."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    init_adamw_state(optimizer)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each parameter group's lr to this run's schedule at the scheduler's step. A checkpoint
    holds the lr of the schedule it was written under: a resume that raises --max-steps would
    otherwise take its first step at the old schedule's lr, and the new one's from the second."""
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(scheduler.last_epoch)


def step_seed(cfg: TrainConfig, step: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + step * 7919 + rank * 104729) % (2**31)


def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state made up front as its first step makes it (step 0, zero moments). Otherwise a
    checkpoint saved before the first update (a step without signal) has
    torch.distributed.checkpoint initialise the state by taking an empty step, which AdamW counts:
    ``--save-every`` would change the weights."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@dataclass
class Run:
    """What every step uses, set up once (and restored from the latest checkpoint)."""

    cfg: TrainConfig
    d: Dist
    task: object
    failures: list | None  # stored failures (``--failures``), or None: fresh first attempts
    out: Path
    policy: torch.nn.Module  # FSDP, fp32 master weights
    reference: torch.nn.Module  # FSDP, frozen
    rollout_model: torch.nn.Module  # plain copy in the compute dtype, synced before each rollout
    tokenizer: object
    chat: ChatFormat  # the conversations under the model's chat template and cfg.chat_template_options
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: QueryStream
    start_step: int
    tracker: Tracker
    # (groups, retry success) of each step since one had signal; None once warn_without_signal has warned
    steps_without_signal: list | None = field(default_factory=list)
    peak_flops: float = 0.0  # one device's peak FLOP/s in the compute dtype (r3.flops.peak_flops)


def set_up(cfg: TrainConfig) -> Run:
    """Check the inputs before writing anything, then the run directory, models, optimizer and
    data order; resume from the latest checkpoint when ``--out`` holds one."""
    d = init_distributed()
    with fail_together(d, alike=True):  # (every rank checks; rank 0 says what is wrong)
        resolve_dtype(cfg, d)
        peak, peak_source = peak_flops(d.device, compute_dtype(cfg))  # (MFU's denominator)
        if cfg.batch_size % d.world:
            raise R3Error(f"config: 'batch_size' ({cfg.batch_size}) must be divisible by the number of ranks "
                          f"({d.world})")
        check_toolchain(d.device, compiled_decode=cfg.decode == "compiled", triton_kernels=triton_compiles(d.device))
        task = get_task(cfg.task, **cfg.task_options)
        cfg.model = canonical_model(cfg.model)  # (a bad model path fails before anything is written)
        model_config = load_config(cfg.model)
        check_token_limits(model_config, cfg.model, attempt=cfg.max_attempt_tokens,
                           reflection=cfg.max_reflection_tokens, retry=cfg.max_retry_tokens)
        if cfg.report_to != "none":
            tracker_module(cfg.report_to)  # (its package is installed)
        # (every rank reads the files; rank 0 says their warnings, once)
        with contextlib.nullcontext() if d.main else contextlib.redirect_stderr(io.StringIO()):
            failures = read_failures(cfg.failures) if cfg.failures else None
            if cfg.failures:
                check_made_for(cfg.failures, task, cfg.model, cfg.chat_template_options, cfg.cut_answers)
            for i, rec in enumerate(failures or []):
                task.check_example(f"{cfg.failures}: record {i + 1}: 'example' (not a {cfg.task} example)",
                                   rec["example"])
                if max(rec["attempt_tokens"]) >= model_config.vocab_size:  # (another model's tokens)
                    raise R3Error(f"{cfg.failures}: record {i + 1}: 'attempt_tokens' holds token id "
                                  f"{max(rec['attempt_tokens'])}, past the {model_config.vocab_size} ids of "
                                  f"{cfg.model} (made with another model?)")
            if failures:
                failures = without_test_queries(cfg.failures, task, failures)
            # a bad data file fails here, the test split's too (else it failed in r3.evaluate, after training)
            queries = failures if failures is not None else examples_of(task, "train", seed=cfg.seed)
            source = f" ({task.data_path})" if getattr(task, "data_path", None) else ""
            if not queries:
                raise R3Error(f"{cfg.failures}: no failure records to train on" if failures is not None
                              else f"task {cfg.task!r}{source}: no training examples")
            if not examples_of(task, "test", seed=cfg.seed) and cfg.eval_n:
                raise R3Error(f"task {cfg.task!r}{source}: no test examples for --eval-n {cfg.eval_n}")
    out = prepare_out_dir(cfg, d)
    if d.main:
        print(f"r3.train: {d.world} rank(s) on {d.device.type}; config:", flush=True)
        for k, v in cfg.to_dict().items():
            print(f"  {k}: {v}", flush=True)
        base, options = resolve_task(cfg.task, cfg.task_options)
        print(f"  (task {base!r} with options {options})", flush=True)
        print(f"  (MFU against {peak / 1e12:.1f} TFLOP/s per {d.device.type} device, {peak_source})", flush=True)
        if getattr(task, "stand_in_data", False):
            print(f"note: task {base!r} has no data_path: it trains on generated examples, not on real data "
                  "(pass the real file with --task-option data_path=FILE)", flush=True)
        if cfg.decode == "compiled":
            print("note: decode compiled: the first rollouts also compile the decode step, once per process" +
                  (" (1-2 minutes for the built-in model on a 2-core CPU)" if d.device.type == "cpu" else ""),
                  flush=True)

    policy, reference, rollout_model, tokenizer = build_models(cfg, d)
    # the model's chat template renders the task's conversations (else a failed start would leave
    # a config.json that a corrected retry is refused for)
    with fail_together(d, alike=True):
        messages = task.messages(queries[0]["example"] if failures is not None else queries[0]) if queries else None
        if messages is not None:
            try:
                check_messages(messages)
            except R3Error as e:  # (the task's problem, not the model's)
                raise R3Error(f"task {cfg.task}: {e}") from None
        try:
            chat = ChatFormat(tokenizer, template_options=template_options(cfg.chat_template_options))
            first_prompt = chat.prompt(messages) if messages is not None else None
        except R3Error as e:  # (the template's problem: name the model it came with, as r3.evaluate does)
            raise R3Error(f"{cfg.model}: {e}") from None
        opens = (f"the chat template's generation prompt opens a reasoning block ({chat.reply_prefix.strip()!r})"
                 if chat.reply_prefix else "enable_thinking is on: the model may open a reasoning block"
                 if chat.template_options.get("enable_thinking") else None)
        if d.main and opens:
            print(f"note: {opens}: answers are read after its closing tag, and a turn cut off before it has none; turn "
                  f"budgets are {cfg.max_attempt_tokens} (attempt) / {cfg.max_retry_tokens} (retry) tokens", flush=True)
    if d.main and first_prompt is not None:
        say_if_rollout_too_big(cfg, d, rollout_model, len(first_prompt), fresh=failures is None)
    if d.main and failures is None and (note := retry_budget_note(cfg)):
        print(note, flush=True)
    write_config(cfg, out, d)
    optimizer, scheduler = make_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad])
    stream = QueryStream(queries, cfg.seed)

    start_step = resume(out, policy, optimizer, scheduler, stream, d)
    follow_schedule(scheduler)
    without_signal: list = []  # (the streak goes on across a resume)
    recent: list = []  # (a checkpoint of an older version: the pool's measure from the log)
    with fail_together(d):  # (rewriting a log needs its size free again)
        if d.main:
            logged = _logged_steps(out / "metrics.jsonl") if start_step == 0 else 0
            if logged:
                print(f"note: {out} has no complete checkpoint to resume from (checkpoints/): starting at step 1; "
                      f"the {logged} logged step{'s are' if logged > 1 else ' is'} trained again", flush=True)
            for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
                if start_step == 0:
                    (out / name).unlink(missing_ok=True)
                    continue
                kept = truncate_jsonl(out / name, start_step)
                if name == "metrics.jsonl":
                    for row in kept:
                        count_without_signal(without_signal, row)
                        remember_first_success(recent, row)
    if stream.recent_first_success is None:
        stream.recent_first_success = share_recent(recent, d)
    tracker = make_tracker(cfg.report_to, out, cfg.to_dict(), start_step, d.main)
    return Run(cfg, d, task, failures, out, policy, reference, rollout_model, tokenizer, chat, optimizer, scheduler, stream,
               start_step, tracker, without_signal, peak)


def retry_budget_note(cfg: TrainConfig) -> str | None:
    """Where a retry may run longer than the attempt before it and cut answers fail: an attempt
    the limit cut off fails unread, and a retry that writes the same answer within its larger
    budget is paid, so the reflection is credited for the budget, not for what it said."""
    if cfg.cut_answers != "fail" or cfg.max_retry_tokens <= cfg.max_attempt_tokens:
        return None
    return (f"note: --max-retry-tokens {cfg.max_retry_tokens} is above --max-attempt-tokens {cfg.max_attempt_tokens}: "
            f"an attempt cut off at {cfg.max_attempt_tokens} tokens fails unread (cut_answers fail), and a retry "
            "that writes the same answer within the larger budget is paid, crediting the reflection for the budget")


def say_if_rollout_too_big(cfg: TrainConfig, d: Dist, model, prompt_tokens: int, fresh: bool) -> None:
    """Warn when the first rollout's KV cache alone (its most rows at once, each as long as the
    first query's prompt and the three turn limits) is more than this rank's memory."""
    rows = rollout_rows(cfg.batch_size, cfg.group_size, d.world, cfg.candidates_per_failure if fresh else None)
    positions = prompt_tokens + cfg.max_attempt_tokens + cfg.max_reflection_tokens + cfg.max_retry_tokens
    need = kv_cache_bytes(model.config, rows, positions, next(model.parameters()).element_size())
    warning = rollout_memory_warning(need, available_bytes(d.device, local_ranks()), rows, positions, d.device)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def _logged_steps(path: Path) -> int:
    """The lines of a metrics log (0 when there is none or it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


#: Steps whose first-attempt success sizes the candidate pool, and the pool's largest size.
RECENT_STEPS = 5
MAX_CANDIDATES_PER_FAILURE = 8.0


def remember_first_success(recent: list, row: dict) -> None:
    value = row.get("first_try_success")
    if isinstance(value, (int, float)):
        recent.append(float(value))
        del recent[:-RECENT_STEPS]


def share_recent(recent: list, d) -> list:
    """Rank 0's list (read from metrics.jsonl on resuming a checkpoint that did not record it)
    on every rank, exactly (float64 sums with zeros)."""
    if d.world == 1:
        return recent
    n = int(all_sum([len(recent) if d.main else 0], d)[0])
    values = all_sum([recent[i] if d.main else 0.0 for i in range(n)] if n else [0.0], d)
    return values[:n]


def candidates_per_failure(cfg: TrainConfig, recent_first_success: list) -> float:
    """First attempts to sample per failure the step needs (fresh mode): ``candidates_per_failure``,
    or more when the recent first-attempt success says that many would yield fewer than
    ``batch_size`` failures: 1.25 / the failure rate of the last steps, at most
    :data:`MAX_CANDIDATES_PER_FAILURE` and at most ``group_size``, so that the first attempts
    never hold more rows (and KV cache) than the reflections that follow. A model that solves
    nearly every query gets fewer groups, and ``groups`` in metrics.jsonl shows it."""
    rates = [1.0 - s for s in recent_first_success[-RECENT_STEPS:]]
    if not rates:
        return cfg.candidates_per_failure
    fail = sum(rates) / len(rates)
    needed = 1.25 / fail if fail > 0 else math.inf
    return max(cfg.candidates_per_failure, min(MAX_CANDIDATES_PER_FAILURE, cfg.group_size, needed))


def rollout(run: Run, step: int):
    """This rank's episode: its share of stored failures, or one batch of fresh first attempts
    (sized by :func:`candidates_per_failure`) of which the first ``batch_size / ranks`` failures
    are kept; each failure is reflected on G times and retried."""
    cfg, d = run.cfg, run.d
    local_q = cfg.batch_size // d.world
    if run.failures is not None:
        items = run.stream.take(cfg.batch_size, d.rank, d.world)
        examples, attempts = [r["example"] for r in items], [r["attempt_tokens"] for r in items]
    else:
        n_cand = math.ceil(local_q * candidates_per_failure(cfg, run.stream.recent_first_success)) * d.world
        examples, attempts = run.stream.take(n_cand, d.rank, d.world), None
    return run_episode(
        run.rollout_model, run.tokenizer, run.task, examples,
        group_size=cfg.group_size, max_failures=local_q, sampling=cfg.sampling(),
        seed=step_seed(cfg, step, d.rank), failed_attempts=attempts, chat=run.chat,
    )


def train_step(run: Run, step: int) -> tuple[dict, object]:
    """One optimizer step: rollout -> advantages -> micro-batches -> reference log-probs ->
    update. Returns the step's metrics row (reduced over ranks) and this rank's episode."""
    cfg, d = run.cfg, run.d
    t0 = time.time()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    sync_rollout_weights(run.policy, run.rollout_model)
    ep = rollout(run, step)
    errors, calls, first = verifier_error_counts(run.task)
    errors = say_verifier_errors(errors, calls, first, d, f"in step {step + 1}" + (" (all ranks)" if d.world > 1 else ""))
    t_rollout = time.time()

    adv = grpo.group_advantages(ep.rewards, scale=cfg.scale_advantages)  # [n_groups, G]
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    mbs = episode_micro_batches(ep, adv, cfg.micro_batch_size, pad_id, d.device,
                                skip_no_signal=cfg.skip_no_signal_groups, shared_prefix=cfg.shared_prefix)
    padded = mbs + [dummy_micro_batch(d.device) for _ in range(all_max(len(mbs), d) - len(mbs))]
    score_micro_batches(padded, run.reference if cfg.beta > 0 else None,
                        run.policy if cfg.update_epochs > 1 else None, cfg.temperature)
    synchronize(d.device)  # (the reference pass is queued work on a GPU until then)
    t_ref = time.time()

    upd = update(run.policy, run.optimizer, padded, len(mbs), cfg, d)
    lr_now = run.optimizer.param_groups[0]["lr"]  # (the lr this update used)
    run.scheduler.step()
    t_update = time.time()
    times = {"step": t_update - t0, "rollout": t_rollout - t0, "reference": t_ref - t_rollout, "update": t_update - t_ref}
    row = step_metrics(step + 1, ep, adv, upd, times, d, lr=lr_now, data_position=run.stream.position,
                       fresh_attempts=run.failures is None, flops=training_flops(run, ep, adv), peak_flops=run.peak_flops)
    row["verifier_errors"] = errors
    remember_first_success(run.stream.recent_first_success, row)
    return row, ep


def say_verifier_errors(errors: int, calls: int, first: str | None, d: Dist, during: str) -> int:
    """The verifier errors of every rank, said once by rank 0 with the first error of any rank;
    when every verdict of every rank failed, every rank stops together. Returns all ranks' count."""
    errors, calls = all_sum([errors, calls], d)
    if errors:
        firsts = gather_to_main([first] if first else [], d)
        if d.main or errors >= calls:
            report_verifier_errors(errors, calls, firsts[0] if firsts else first, during)
    return int(errors)


def training_flops(run: Run, ep, adv: torch.Tensor) -> int:
    """This rank's model FLOPs of the step's reference and update passes (:mod:`r3.flops`): the
    reference's and the pre-update policy's forwards where they run, the update's forward and
    backward in each epoch (the backward of what trains, with ``--freeze``)."""
    cfg = run.cfg
    rows = kept_rows(adv, cfg.skip_no_signal_groups)
    sequences, spans = [ep.sequences[i] for i in rows], [ep.spans[i] for i in rows]
    forward = forward_flops(run.rollout_model.config, sequences, spans)
    trainable = ({n for n, p in run.policy.named_parameters(remove_duplicate=False) if p.requires_grad}
                 if cfg.freeze else None)  # (a tied head's two names both)
    backward = backward_flops(run.rollout_model.config, sequences, spans, trainable) if forward else 0
    return forward * (int(cfg.beta > 0) + int(cfg.update_epochs > 1) + cfg.update_epochs) + backward * cfg.update_epochs


def train(cfg: TrainConfig) -> dict:
    run = set_up(cfg)
    try:
        result = train_loop(run)
    finally:
        run.tracker.close()
    wait_for_main(run.d)  # (rank 0 closed the tracker alone: a W&B upload can outlast NCCL's timeout)
    return result


def train_loop(run: Run) -> dict:
    cfg, d, out = run.cfg, run.d, run.out
    if run.start_step == 0 and cfg.eval_n:
        sync_rollout_weights(run.policy, run.rollout_model)
        run.tracker.log_metrics(held_out_eval(run, 0), 0, "eval")
    clock = (time.time(), run.start_step)  # (time, steps done then): the ETA's start, moved past the first step
    row: dict = {}
    if d.main and run.start_step >= cfg.max_steps:
        print(f"note: {out} is already at step {run.start_step} of --max-steps {cfg.max_steps}: nothing to train "
              "(raise --max-steps to train on); writing the export", flush=True)
    elif d.main:  # (else the first line comes after the whole first step)
        print(f"starting step {run.start_step + 1}/{cfg.max_steps} (the first also warms up, so it is slower than the "
              "rest; a line per step follows)", flush=True)
    watch = cpu_share_watch(d)
    with StopSignals() as signals:
        for step in range(run.start_step, cfg.max_steps):
            if watch:
                watch.start()
            row, ep = train_step(run, step)
            stopped = step_end(run, step, row, ep, clock, lambda: signals.requested(d))
            note = watch and watch.stop(f"step {step + 1}")
            if note:
                print(note, flush=True)
            if step == run.start_step:  # (it compiles, warms up and allocates: slower than the rest)
                clock = (time.time(), step + 1)
            if stopped:
                if stopped > 0:
                    raise SystemExit(128 + stopped)
                return row

    path = export(out, run.policy, run.tokenizer, d)
    if d.main:
        print(f"done: metrics {out / 'metrics.jsonl'}, samples {out / 'samples.jsonl'}, checkpoints "
              f"{out / 'checkpoints'}, Hugging Face export {path}", flush=True)
    return row


def cpu_share_watch(d: Dist) -> CpuShareWatch | None:
    """Rank 0's watch on other work slowing a CPU run's steps (one process on the machine only:
    a multi-process run's other ranks are themselves other work)."""
    return watch_for(d.device) if d.main and local_ranks() == 1 else None


def step_end(run: Run, step: int, row: dict, ep, clock: tuple[float, int], requested) -> int:
    """Log the step, evaluate and checkpoint when due. Returns 0 to go on, the signal number when
    a signal stopped the run (after a checkpoint), or -1 for ``stop_after``. ``clock``: (time,
    steps done then), where the ETA's rate starts. ``requested()``: the stop signal received so far
    (0 if none; a collective), asked after the evaluation and again after a checkpoint, so that a
    signal that came while they ran stops the run here, not after one more step."""
    cfg, d, out = run.cfg, run.d, run.out
    logged = gather_to_main(sample_records(ep, step + 1, cfg, d.rank), d)
    with fail_together(d):
        if d.main:
            append_jsonl(out / "metrics.jsonl", row)
            for rec in logged:
                append_jsonl(out / "samples.jsonl", rec)
            eta = eta_s(clock, step + 1, cfg.max_steps, time.time())
            print(format_step_line(row, cfg.max_steps, eta), flush=True)
            warn_without_signal(run, row)
            run.tracker.log_metrics(row, step + 1)
            run.tracker.log_samples(logged, step + 1)
    if cfg.eval_n and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps):
        sync_rollout_weights(run.policy, run.rollout_model)
        evaluation = held_out_eval(run, step + 1)
        run.tracker.log_metrics(evaluation, step + 1, "eval")
    last = step + 1 == cfg.max_steps
    stop_after = bool(cfg.stop_after and step + 1 == cfg.stop_after and not last)
    signum = requested()
    if (step + 1) % cfg.save_every == 0 or last or stop_after or signum:
        save_checkpoint(out, step + 1, run.policy, run.optimizer, run.scheduler, run.stream, cfg, d)
        signum = signum or (0 if last else requested())  # (one during the write: that checkpoint is the stop's)
    if (stop_after or signum) and not last:
        if d.main:
            why = "stop_after" if stop_after else signal.Signals(signum).name
            print(f"stopping after step {step + 1} ({why}); checkpoint saved: run again with the same --out "
                  "to resume", flush=True)
        return signum or -1
    return 0


def eta_s(clock: tuple[float, int], done: int, total: int, now: float) -> float:
    """Seconds left at the rate of the steps since ``clock`` (time, steps done then)."""
    return (now - clock[0]) / (done - clock[1]) * (total - done)


SIGNAL_LESS_STEPS = 10


def count_without_signal(seen: list, row: dict) -> None:
    """Extend the streak of steps without reward signal by a metrics row, or end it."""
    if row.get("groups_with_signal"):
        seen.clear()
    else:
        seen.append((row.get("groups") or 0, row.get("retry_success") or 0.0))


def warn_without_signal(run: Run, row: dict) -> None:
    """Say so once when ``SIGNAL_LESS_STEPS`` steps in a row had no reward signal (no group had
    both a passing and a failing retry, so the policy-gradient term was zero): a task too hard or
    too easy for the model, or a verifier that never pays, would otherwise run to the end quietly."""
    if run.steps_without_signal is None:  # (said already)
        return
    count_without_signal(run.steps_without_signal, row)
    if len(run.steps_without_signal) < SIGNAL_LESS_STEPS:
        return
    seen = run.steps_without_signal[-SIGNAL_LESS_STEPS:]  # (a resumed run's streak can be longer)
    if not any(groups for groups, _ in seen):
        why = "no first attempt failed, so there was nothing to reflect on: the task may be too easy for this model"
    elif any(success for _, success in seen):
        why = ("some retries passed, but in each group all passed or all failed (GRPO learns from a group with "
               "both; a larger --group-size makes one likelier)")
    else:
        why = ("no retry passed: the task may be too hard for this model, or its verifier never pays "
               f"(read {run.out / 'samples.jsonl'} and the verifier's reasons)")
        if getattr(run.cfg, "cut_answers", "judge") == "fail":
            why += ("; under cut_answers fail no retry that --max-retry-tokens cut off can pass (retry_cut_frac in "
                    "metrics.jsonl: how many were)")
    if any(groups for groups, _ in seen) and run.cfg.beta > 0 and not run.cfg.skip_no_signal_groups:
        why += "; only the KL penalty trained on those steps (--skip-no-signal-groups false)"
    print(f"warning: no group had a reward signal in the last {SIGNAL_LESS_STEPS} steps; {why}",
          file=sys.stderr, flush=True)
    run.steps_without_signal = None


def sample_records(ep, step: int, cfg: TrainConfig, rank: int) -> list[dict]:
    """What ``samples.jsonl`` keeps of a rank's episode: every retry rewarded 1 (so that every
    reward can be audited: ``python -m r3.audit``), plus the first ``log_samples`` others every
    ``samples_every`` steps; each with the verifier's reason for its verdict (from the call that
    gave the reward, :func:`r3.tasks.base.judge`)."""
    unrewarded = cfg.log_samples if cfg.samples_every and step % cfg.samples_every == 0 else 0
    out = []
    for row, rec in enumerate(ep.records):
        if rec["reward"] <= 0:
            if unrewarded <= 0:
                continue
            unrewarded -= 1
        out.append({"step": step, "rank": rank, "row": row, **rec})  # (its reason: the verdict's own)
    return out


def held_out_eval(run: Run, step: int) -> dict | None:
    """First- and second-attempt accuracy on ``eval_n`` test queries (split over ranks)."""
    cfg, d, task, out = run.cfg, run.d, run.task, run.out
    if not cfg.eval_n:
        return None
    examples = examples_of(task, "test", n=cfg.eval_n, seed=cfg.seed)
    mine = examples[d.rank::d.world]
    res = evaluate_examples(
        run.rollout_model, run.tokenizer, task, mine, cfg.sampling(cfg.eval_temperature), seed=cfg.seed + 17,
        batch_size=32, chat=run.chat,
    ) if mine else {"n": 0, "first_success": 0, "second_success": 0, "verifier_errors": 0, "verdicts": 0}
    n, first, second = all_sum([res["n"], res["first_success"], res["second_success"]], d)
    say_verifier_errors(res["verifier_errors"], res["verdicts"], res.get("first_verifier_error"), d,
                        f"in the evaluation at step {step}")
    row = {"step": step, "n": int(n), "first_attempt_accuracy": first / max(n, 1),
           "second_attempt_accuracy": second / max(n, 1)}
    with fail_together(d):
        if d.main:
            append_jsonl(out / "eval.jsonl", row)
            print(f"eval @ step {step}: first attempt {row['first_attempt_accuracy']:.3f}, "
                  f"second attempt {row['second_attempt_accuracy']:.3f} (n={int(n)})", flush=True)
    return row


@cli_main
def main(argv: list[str] | None = None) -> None:
    try:
        try:
            cfg = parse_args(sys.argv[1:] if argv is None else argv)
        except R3Error:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank read the same flags: rank 0 says it once
                with fail_together(init_distributed(), alike=True):  # (meets set_up's on ranks that parsed them)
                    raise
            raise
        train(cfg)
    finally:
        if dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()  # gloo can hang if a rank tears down while another is in a collective
                dist.destroy_process_group()
            elif dist.get_world_size() == 1:  # (an in-process caller goes on)
                dist.destroy_process_group()
            # With more ranks the process ends now, its error not yet printed (that is cli_main's,
            # outside): tearing the group down first would end the other ranks' wait for this one,
            # and the launcher could stop this rank on their exit before its line is out.


if __name__ == "__main__":
    run_and_exit(main)
