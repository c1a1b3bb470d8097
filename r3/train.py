"""``torchrun [--nproc_per_node N] -m r3.train``: Reflect-Retry-Reward GRPO with FSDP2.

One optimizer step:

1. rollout — the policy's weights are gathered once into a plain (unsharded) copy in the compute
   dtype, and each rank runs the attempt/reflect/retry episode on its own share of queries with
   our KV-cache sampler (no FSDP all-gather per decode step). A group never spans ranks.
2. reference — the frozen reference model (sharded too) scores the reflection tokens.
3. update — micro-batches through the FSDP policy; log-probs of the reflection tokens only and
   their k3 KL to the reference, in one pass of ``kernels.fused_logprob_kl``; the GRPO loss is normalised by the *global* token count of the
   step (all micro-batches, all ranks), so 1 rank and N ranks give the same update.

Checkpoints (torch.distributed.checkpoint) hold model, optimizer, scheduler, step and data
position; running again with the same ``--out`` resumes exactly. The end of training writes a
Hugging Face export to ``OUT/export``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kernels import fused_logprob_kl
from r3 import grpo
from r3.checkpoint import load, resolve, save_hf
from r3.config import TrainConfig, parse_args
from r3.episode import run_episode
from r3.errors import R3Error, cli_main
from r3.failure_data import read_failures
from r3.heldout import evaluate_examples
from r3.model import Transformer
from r3.progress import format_duration
from r3.tasks import get as get_task
from r3.tasks import resolve as resolve_task

# --------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun's env:// rendezvous, or a 1-process group when run as plain ``python -m``."""
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        else:
            fd, path = tempfile.mkstemp(prefix="r3-pg-")
            os.close(fd)
            os.remove(path)
            dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # torchrun pins OMP threads to 1; share the cores among the local ranks instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank, world, local_rank, device, mesh)


def all_sum(values, d: Dist):
    """Sum over ranks, in one collective: a list of numbers -> a list, a dict of numbers -> a dict
    with the same keys."""
    keys = list(values) if isinstance(values, dict) else None
    t = torch.tensor([float(values[k]) for k in keys] if keys is not None else values, dtype=torch.float64)
    if d.world > 1:
        t = t.to(d.device if d.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
    out = t.cpu().tolist()
    return dict(zip(keys, out)) if keys is not None else out


def gather_to_main(items: list, d: Dist) -> list:
    """Every rank's list, concatenated in rank order on rank 0 (other ranks get [])."""
    if d.world == 1:
        return list(items)
    parts = [None] * d.world if d.main else None
    dist.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if d.main else []


def all_max(value: int | float, d: Dist) -> int | float:
    """The largest ``value`` over ranks (an int stays an int)."""
    t = torch.tensor([value], dtype=torch.int64 if isinstance(value, int) else torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) if isinstance(value, int) else float(t.item())


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def shard(model, d: Dist, dtype: torch.dtype):
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, norm, head)."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=d.mesh, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    return model


def build_models(cfg: TrainConfig, d: Dist):
    """-> (policy [FSDP, fp32 master weights], reference [FSDP, frozen], rollout copy, tokenizer)."""
    dtype = compute_dtype(cfg)
    policy, tokenizer = load(cfg.model, dtype=torch.float32, device=d.device)
    policy.train()
    reference, _ = load(cfg.model, dtype=dtype, device=d.device, tokenizer=False)
    reference.requires_grad_(False)
    with torch.device("meta"):
        rollout = Transformer(policy.config)
    rollout = rollout.to_empty(device=d.device).to(dtype)
    rollout.tie_weights()
    rollout.requires_grad_(False).eval()
    shard(policy, d, dtype)
    shard(reference, d, dtype)
    return policy, reference, rollout, tokenizer


@torch.no_grad()
def sync_rollout_weights(policy, rollout) -> None:
    """Gather the sharded fp32 policy once per step into the plain compute-dtype rollout copy."""
    target = dict(rollout.named_parameters())
    for name, p in policy.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        target[name].copy_(full)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class QueryStream:
    """Deterministic, resumable order over the training examples: a seeded permutation per
    epoch; ``position`` counts examples consumed (by all ranks together)."""

    def __init__(self, items: list, seed: int, position: int = 0):
        if not items:
            raise R3Error("the task has no training examples")
        self.items, self.seed, self.position = items, seed, position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

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


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, T]
    mask: torch.Tensor  # [b, T] bool: positions whose token is a reflection token
    advantages: torch.Tensor  # [b]
    rows: torch.Tensor  # [N] masked positions (row index)
    cols: torch.Tensor  # [N] masked positions (column index of the *predicting* position)
    targets: torch.Tensor  # [N]
    ref_logp: torch.Tensor | None = None  # [N]
    old_logp: torch.Tensor | None = None  # [N]
    rollout_logp: torch.Tensor | None = None  # [N] the sampler's log-probs of the targets


def make_micro_batches(sequences, spans, advantages, size: int, pad_id: int, device,
                       rollout_logprobs: list[list[float]] | None = None) -> list[MicroBatch]:
    """Sequences -> padded micro-batches whose mask marks each reflection span. The targets are
    flattened row by row, so ``rollout_logprobs`` (one list per sequence, one value per reflection
    token, as :class:`r3.episode.Episode` holds them) line up with them."""

    out = []
    for i in range(0, len(sequences), size):
        seqs, sp = sequences[i : i + size], spans[i : i + size]
        # Only the prefix up to the reflection's end matters: the retry is never trained and,
        # by causality, cannot change the reflection tokens' log-probs.
        T = max(end for _, end in sp)
        tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for b, (s, (start, end)) in enumerate(zip(seqs, sp)):
            tokens[b, :end] = torch.tensor(s[:end])
            mask[b, start:end] = True
        rows, cols = mask.nonzero(as_tuple=True)
        out.append(
            MicroBatch(
                tokens=tokens.to(device),
                mask=mask.to(device),
                advantages=torch.as_tensor(advantages[i : i + size], dtype=torch.float32).to(device),
                rows=rows.to(device),
                cols=(cols - 1).to(device),
                targets=tokens[rows, cols].to(device),
                rollout_logp=None if rollout_logprobs is None else torch.tensor(
                    [x for row in rollout_logprobs[i : i + size] for x in row], dtype=torch.float32).to(device),
            )
        )
    return out


def dummy_micro_batch(device) -> MicroBatch:
    """Keeps a rank with no data in lock-step with FSDP's collectives (zero loss)."""
    z = torch.zeros(1, dtype=torch.long, device=device)
    return MicroBatch(torch.zeros((1, 2), dtype=torch.long, device=device), torch.zeros((1, 2), dtype=torch.bool, device=device),
                      torch.zeros(1, device=device), z, z, z)


def token_logprobs(model, mb: MicroBatch, temperature: float, ref_logp: torch.Tensor | None = None):
    """``[N]`` log-probs of the micro-batch's targets (logits only at the masked positions) and,
    given ``ref_logp``, their k3 KL to it from the same fused pass (else None)."""
    logits = model(mb.tokens, at=(mb.rows, mb.cols))
    return fused_logprob_kl(logits, mb.targets, ref_logp, temperature=temperature)


def scatter(values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """[N] per-token values -> [b, T] at the masked positions (target positions)."""
    full = torch.zeros(mb.mask.shape, dtype=values.dtype, device=values.device)
    return full.index_put((mb.rows, mb.cols + 1), values)


@torch.no_grad()
def score_micro_batches(mbs: list[MicroBatch], reference, old_policy, temperature: float) -> None:
    """Reference log-probs (for the KL) and, with several update epochs, the pre-update policy's
    log-probs (the ratio's denominator). Every rank scores the same number of micro-batches."""
    for mb in mbs:
        if reference is not None:
            mb.ref_logp = token_logprobs(reference, mb, temperature)[0]
        if old_policy is not None:
            mb.old_logp = token_logprobs(old_policy, mb, temperature)[0]


def update(policy, optimizer, mbs: list[MicroBatch], n_real: int, cfg: TrainConfig, d: Dist) -> dict:
    """``cfg.update_epochs`` optimizer steps over the micro-batches (``mbs[n_real:]`` are dummies
    that keep this rank in step with the others). The loss of every micro-batch is divided by the
    step's global denominator, so the summed gradient is the whole batch's whatever the split over
    micro-batches and ranks. A non-finite loss or gradient norm skips the step (on every rank).

    Before the first optimizer step the policy's log-probs of the reflection tokens are those the
    sampler drew them with (same weights); ``logp_diff_sum`` / ``logp_diff_max`` / ``logp_diff_tokens``
    measure how far apart they are (precision of the rollout copy; a masking or alignment bug
    shows up as a jump)."""
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    real = mbs[:n_real]
    den = sum((grpo.loss_denominator(mb.mask, cfg.agg, max_len=cfg.max_reflection_tokens).cpu() for mb in real), torch.zeros(()))
    if d.world > 1:
        den = den.to(d.device)
        dist.all_reduce(den)
    stats = {"loss": 0.0, "kl_sum": 0.0, "tokens": 0.0, "clip_low_sum": 0.0, "clip_high_sum": 0.0,
             "grad_norm": float("nan"), "skipped": False, "logp_diff_sum": 0.0, "logp_diff_max": 0.0,
             "logp_diff_tokens": 0.0}
    for epoch in range(cfg.update_epochs):
        last = epoch == cfg.update_epochs - 1
        loss_total = 0.0
        for i, mb in enumerate(mbs):
            logp, kl = token_logprobs(policy, mb, temperature, mb.ref_logp if i < n_real else None)
            if i >= n_real:
                (logp.sum() * 0.0).backward()
                continue
            if epoch == 0 and mb.rollout_logp is not None and mb.rollout_logp.numel():
                gap = (logp.detach().float() - mb.rollout_logp).abs()
                stats["logp_diff_sum"] += float(gap.sum())
                stats["logp_diff_max"] = max(stats["logp_diff_max"], float(gap.max()))
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
            loss_total += float(loss.detach())
            if last:
                n = float(m["tokens"])
                stats["kl_sum"] += float(m["kl"]) * n
                stats["clip_low_sum"] += float(m["clip_frac_low"]) * n
                stats["clip_high_sum"] += float(m["clip_frac_high"]) * n
                stats["tokens"] += n
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
    return stats


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step_") and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


@contextlib.contextmanager
def _one_intra_op_thread():
    """Run torch.distributed.checkpoint with one intra-op thread. DCP does part of its work on
    another thread; with several threads that thread starts a second OpenMP team, and once
    libgomp manages more threads than there are CPUs it stops spin-waiting for good: every later
    parallel op pays a futex wake-up, and matmuls and rollouts stay slower for the rest of the run
    after the first checkpoint."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def save_checkpoint(out: Path, step: int, policy, optimizer, scheduler, stream: QueryStream, cfg: TrainConfig, d: Dist):
    import torch.distributed.checkpoint as dcp

    root = out / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    with _one_intra_op_thread():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if d.main:
        state = {
            "step": step,
            "data_position": stream.position,
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state().tolist(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(path: Path, policy, optimizer, scheduler, stream: QueryStream) -> int:
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_intra_op_thread():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(trainer["scheduler"])
    stream.position = trainer["data_position"]
    torch.set_rng_state(torch.tensor(trainer["torch_rng"], dtype=torch.uint8))
    return trainer["step"]


def export(out: Path, policy, tokenizer, d: Dist) -> Path | None:


    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = None
    if d.main:
        path = save_hf(policy, tokenizer, out / "export", state_dict=sd, dtype=torch.float32)
    dist.barrier()
    return path


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


def step_seed(cfg: TrainConfig, step: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + step * 7919 + rank * 104729) % (2**31)


def prepare_out_dir(cfg: TrainConfig, d: Dist) -> Path:
    """Create ``--out`` or check it holds a run with a compatible config (never overwrite)."""
    out = Path(cfg.out)
    saved = out / "config.json"
    if saved.is_file():
        try:
            previous = json.loads(saved.read_text())
        except json.JSONDecodeError:
            raise R3Error(f"{saved}: unreadable config of a previous run; use another --out") from None
        diff = cfg.incompatible_with(previous)
        if diff:
            raise R3Error(
                f"--out {out} holds a run with a different config ({', '.join(diff[:5])}); "
                "use another --out or the same settings to resume"
            )
    elif out.exists() and any(p.name != "export" for p in out.iterdir()) and not (out / "metrics.jsonl").exists():
        raise R3Error(f"--out {out} exists and is not an r3 run directory; choose an empty or new directory")
    dist.barrier()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        os.replace(tmp, saved)
    dist.barrier()
    return out


def train(cfg: TrainConfig) -> dict:
    d = init_distributed()
    if cfg.batch_size % d.world:
        raise R3Error(f"config: 'batch_size' ({cfg.batch_size}) must be divisible by the number of ranks ({d.world})")
    task = get_task(cfg.task, **cfg.task_options)

    resolve(cfg.model)  # a bad model path fails before anything is written
    failures = read_failures(cfg.failures) if cfg.failures else None
    out = prepare_out_dir(cfg, d)
    if d.main:
        print(f"r3.train: {d.world} rank(s) on {d.device.type}; config:", flush=True)
        for k, v in cfg.to_dict().items():
            print(f"  {k}: {v}", flush=True)
        base, options = resolve_task(cfg.task, cfg.task_options)
        print(f"  (task {base!r} with options {options})", flush=True)

    policy, reference, rollout_model, tokenizer = build_models(cfg, d)
    dtype = compute_dtype(cfg)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if failures is not None:
        stream = QueryStream(failures, cfg.seed)
    else:
        stream = QueryStream(task.examples("train", seed=cfg.seed), cfg.seed)

    start_step = 0
    done = checkpoint_dirs(out)
    if done:
        start_step = load_checkpoint(done[-1], policy, optimizer, scheduler, stream)
        if d.main:
            print(f"resumed from {done[-1]} (step {start_step})", flush=True)
    metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"
    if d.main and start_step == 0:
        for p in (metrics_path, samples_path):
            p.unlink(missing_ok=True)
    elif d.main:
        _truncate_jsonl(metrics_path, start_step)
        _truncate_jsonl(samples_path, start_step)
        _truncate_jsonl(out / "eval.jsonl", start_step)

    sampling = cfg.sampling()
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    local_q = cfg.batch_size // d.world
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if start_step == 0 and cfg.eval_n:
        if d.main:
            (out / "eval.jsonl").unlink(missing_ok=True)
        sync_rollout_weights(policy, rollout_model)
        held_out_eval(rollout_model, tokenizer, task, cfg, d, 0, out)
    run_start = time.time()
    last = {}
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        sync_rollout_weights(policy, rollout_model)

        # 1. rollout -------------------------------------------------------------------------
        if failures is not None:
            items = stream.take(cfg.batch_size, d.rank, d.world)
            examples, attempts = [r["example"] for r in items], [r["attempt_tokens"] for r in items]
        else:
            n_cand = int(math.ceil(local_q * cfg.candidates_per_failure)) * d.world
            examples, attempts = stream.take(n_cand, d.rank, d.world), None
        ep = run_episode(
            rollout_model, tokenizer, task, examples,
            group_size=cfg.group_size, max_failures=local_q, sampling=sampling,
            seed=step_seed(cfg, step, d.rank), failed_attempts=attempts,
        )
        t_rollout = time.time()

        rewards = ep.rewards  # [n_groups, G]
        adv = grpo.group_advantages(rewards, scale=cfg.scale_advantages)
        keep = [g for g in range(rewards.shape[0]) if not (cfg.skip_no_signal_groups and (adv[g] == 0).all())]
        idx = [g * cfg.group_size + j for g in keep for j in range(cfg.group_size)]
        seqs = [ep.sequences[i] for i in idx]
        spans = [ep.spans[i] for i in idx]
        seq_adv = [float(adv.view(-1)[i]) for i in idx]
        mbs = make_micro_batches(seqs, spans, seq_adv, cfg.micro_batch_size, pad_id, d.device,
                                 rollout_logprobs=[ep.reflection_logprobs[i] for i in idx])
        n_mb = all_max(len(mbs), d)
        padded = mbs + [dummy_micro_batch(d.device) for _ in range(n_mb - len(mbs))]

        # 2. reference (and old) log-probs ------------------------------------------------------
        score_micro_batches(padded, reference if cfg.beta > 0 else None, policy if cfg.update_epochs > 1 else None, temperature)
        t_ref = time.time()

        # 3. update ---------------------------------------------------------------------------
        upd = update(policy, optimizer, padded, len(mbs), cfg, d)
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        t_update = time.time()

        # 4. metrics --------------------------------------------------------------------------
        n_groups = rewards.shape[0]
        signal = sum(1 for g in range(n_groups) if not (adv[g] == 0).all())
        refl_lens = [e - s for s, e in ep.spans]
        g = all_sum({
            "loss": upd["loss"], "kl": upd["kl_sum"], "tokens": upd["tokens"], "clip_low": upd["clip_low_sum"],
            "clip_high": upd["clip_high_sum"], "logp_diff": upd["logp_diff_sum"], "logp_diff_tokens": upd["logp_diff_tokens"],
            "rewards": float(rewards.sum()), "retries": float(rewards.numel()), "queries": ep.queries,
            "first_success": ep.first_success, "groups": n_groups, "signal": signal,
            "reflection_tokens": sum(refl_lens), "generated": ep.generated_tokens,
        }, d)
        logp_diff_max = all_max(upd["logp_diff_max"], d)
        tok_g, nrefl_g = g["tokens"], g["retries"]
        step_time = t_update - t0
        row = {
            "step": step + 1,
            "loss": g["loss"],
            "kl": g["kl"] / tok_g if tok_g else None,  # None: no token trained this step
            "retry_success": g["rewards"] / nrefl_g if nrefl_g else 0.0,
            "first_try_success": g["first_success"] / g["queries"] if (g["queries"] and failures is None) else None,
            "groups": int(g["groups"]),
            "groups_with_signal": int(g["signal"]),
            "reflection_tokens": int(g["reflection_tokens"]),
            "trained_tokens": int(tok_g),
            "reflection_len_mean": g["reflection_tokens"] / nrefl_g if nrefl_g else 0.0,
            "clip_frac_low": g["clip_low"] / tok_g if tok_g else 0.0,
            "clip_frac_high": g["clip_high"] / tok_g if tok_g else 0.0,
            # the sampler's vs the trainer's log-prob of each trained token, before the update
            "logp_diff_mean": g["logp_diff"] / g["logp_diff_tokens"] if g["logp_diff_tokens"] else None,
            "logp_diff_max": logp_diff_max if g["logp_diff_tokens"] else None,
            "grad_norm": upd["grad_norm"],
            "lr": lr_now,
            "skipped": upd["skipped"],
            "step_time_s": step_time,
            "rollout_time_s": t_rollout - t0,
            "reference_time_s": t_ref - t_rollout,
            "update_time_s": t_update - t_ref,
            "rollout_tokens_per_s": g["generated"] / max(t_rollout - t0, 1e-9),
            "tokens_per_s": g["generated"] / max(step_time, 1e-9),
            "data_position": stream.position,
            # this rank's peak allocated GPU memory during the step (None on CPU)
            "peak_memory_gb": torch.cuda.max_memory_allocated(d.device) / 1e9 if d.device.type == "cuda" else None,
        }
        last = row
        logged = gather_to_main(sample_records(ep, task, step + 1, cfg, d.rank), d)
        if d.main:
            _append_jsonl(metrics_path, row)
            for rec in logged:
                _append_jsonl(samples_path, rec)
            done_steps = step + 1 - start_step
            rate = (time.time() - run_start) / done_steps
            eta = rate * (cfg.max_steps - step - 1)
            fts = "  n/a" if row["first_try_success"] is None else f"{row['first_try_success']:.2f}"
            print(
                f"step {step + 1}/{cfg.max_steps} | loss {row['loss']:+.4f} | kl {row['kl'] or 0.0:.2e} | "
                f"retry {row['retry_success']:.2f} | first {fts} | signal {row['groups_with_signal']}/{row['groups']} | "
                f"{step_time:.1f}s/step (rollout {row['rollout_time_s']:.1f}, ref {row['reference_time_s']:.1f}, "
                f"update {row['update_time_s']:.1f}) | ETA {format_duration(eta)}"
                + (" | SKIPPED (non-finite)" if row["skipped"] else ""),
                flush=True,
            )
        if cfg.eval_n and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps):
            sync_rollout_weights(policy, rollout_model)
            held_out_eval(rollout_model, tokenizer, task, cfg, d, step + 1, out)
        interrupted = cfg.stop_after and step + 1 == cfg.stop_after and step + 1 < cfg.max_steps
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or interrupted:
            save_checkpoint(out, step + 1, policy, optimizer, scheduler, stream, cfg, d)
        if interrupted:
            if d.main:
                print(f"stopping after step {step + 1} (stop_after); run again with the same --out to resume", flush=True)
            return last

    path = export(out, policy, tokenizer, d)
    if d.main:
        print(f"done: metrics {metrics_path}, samples {samples_path}, checkpoints {out / 'checkpoints'}, "
              f"Hugging Face export {path}", flush=True)
    return last


def sample_records(ep, task, step: int, cfg: TrainConfig, rank: int) -> list[dict]:
    """What ``samples.jsonl`` keeps of a rank's episode: every retry rewarded 1 (so that every
    reward can be audited: ``python -m r3.audit``), plus the first ``log_samples`` others every
    ``samples_every`` steps; each with the verifier's reason for its verdict."""
    unrewarded = cfg.log_samples if cfg.samples_every and step % cfg.samples_every == 0 else 0
    out = []
    for row, rec in enumerate(ep.records):
        if rec["reward"] <= 0:
            if unrewarded <= 0:
                continue
            unrewarded -= 1
        out.append({"step": step, "rank": rank, "row": row, **rec,
                    "reason": task.diagnose(rec["example"], rec["retry"])})
    return out


def held_out_eval(rollout_model, tokenizer, task, cfg: TrainConfig, d: Dist, step: int, out: Path) -> dict | None:
    """First- and second-attempt accuracy on ``eval_n`` test queries (split over ranks)."""
    if not cfg.eval_n:
        return None
    examples = task.examples("test", n=cfg.eval_n, seed=cfg.seed)
    mine = examples[d.rank::d.world]
    res = evaluate_examples(
        rollout_model, tokenizer, task, mine, cfg.sampling(cfg.eval_temperature), seed=cfg.seed + 17, batch_size=32,
    ) if mine else {"n": 0, "first_success": 0, "second_success": 0}
    n, first, second = all_sum([res["n"], res["first_success"], res["second_success"]], d)
    row = {"step": step, "n": int(n), "first_attempt_accuracy": first / max(n, 1),
           "second_attempt_accuracy": second / max(n, 1)}
    if d.main:
        _append_jsonl(out / "eval.jsonl", row)
        print(f"eval @ step {step}: first attempt {row['first_attempt_accuracy']:.3f}, "
              f"second attempt {row['second_attempt_accuracy']:.3f} (n={int(n)})", flush=True)
    return row


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _append_jsonl(path: Path, row: dict) -> None:
    row = {k: _finite_or_none(v) for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _truncate_jsonl(path: Path, step: int) -> None:
    """On resume, drop metric rows past the checkpoint (steps that will be redone)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, path)


@cli_main
def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            if sys.exc_info()[0] is None:
                dist.barrier()  # gloo can hang if a rank tears down while another is in a collective
            dist.destroy_process_group()


def _exit_hard(code) -> None:
    """Leave without the interpreter's teardown: after a clean run, gloo's worker threads can
    still abort it ("terminate called without an active exception"), which would turn a finished
    run (or a clean exit code 2) into SIGABRT. Every file we write is closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        _exit_hard(e.code)
    _exit_hard(0)
