"""A run's directory: ``config.json`` (checked on resume), ``metrics.jsonl`` / ``samples.jsonl`` /
``eval.jsonl`` (appended per step, trimmed back to the checkpoint on resume), checkpoints
(torch.distributed.checkpoint, written to a temporary directory and renamed) and the Hugging
Face export."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from r3.checkpoint import save_hf
from r3.config import TrainConfig, upgrade_config_dict
from r3.distributed import Dist, all_max, exit_after_failing_ranks, fail_together, wait_for_main
from r3.errors import R3Error, free_space_at
from r3.files import fsync_directory, fsync_file, fsync_tree, try_flock, write_json_atomic, write_text_atomic


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step_") and (p / "trainer_state.json").is_file()]
    return sorted(done, key=step_of)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[1])


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


def _error_line(e: BaseException) -> str:
    """Why a checkpoint write or read failed, in one line: the last line of the innermost error
    (DCP puts each rank's traceback in its message)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def _write_failure(e: BaseException) -> str:
    """:func:`_error_line` for a failed write. torch's zip writer reports a short write (a full
    disk, a quota) as ``[enforce fail at inline_container.cc:N] . unexpected pos 704 vs 598``,
    the OS error lost: said as what it is."""
    line = _error_line(e)
    if "unexpected pos" in line or "file write failed" in line:
        return f"a write came up short: {line.split('] . ')[-1]}"
    return line


def _disk_full(e: BaseException) -> bool:
    """Whether a write failed for want of space (or quota): safetensors reports the OS error in
    its message."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, SafetensorError) and any(f"os error {n})" in str(e) for n in (errno.ENOSPC, errno.EDQUOT))


def _free_space_if_full(e: BaseException, where: Path) -> str:
    """:func:`_free_space` for a write that failed for want of space, else nothing."""
    return _free_space(where) if _disk_full(e) else ""


def _free_space(where: Path) -> str:
    """``; N GiB free on that disk (full?)`` to follow a failed write's reason, or nothing."""
    free = free_space_at(where, mark_low=True)
    return f"; {free}" if free else ""


def save_checkpoint(out: Path, step: int, policy, optimizer, scheduler, stream, cfg: TrainConfig, d: Dist):
    """Write ``OUT/checkpoints/step_N`` (to a temporary directory, renamed when complete), then
    drop all but the last ``keep_last``. A failed write (a full disk) removes the partial
    directory, keeps the earlier checkpoints, and is one line naming the path."""
    root = out / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    with fail_together(d):  # (a full disk can refuse the directory too)
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    failure = None
    try:
        with _one_intra_op_thread():
            # (DCP's own collectives on the gloo group: ranks wait there for the slowest writer,
            # which on a slow file system can outlast NCCL's 10-minute timeout)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), process_group=d.cpu_group)
        if d.main:
            state = {
                "step": step,
                "data_position": stream.position,
                "recent_first_success": stream.recent_first_success,
                "data_sha256": stream.fingerprint,
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state().tolist(),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            # On the disk before it is published (the older checkpoints are deleted next), with
            # the logs' rows up to this step, which a resume keeps. Inside the try: a delayed
            # write error (ENOSPC, EDQUOT, EIO) surfaces at the flush, and is a failed write too.
            for log in out.glob("*.jsonl"):
                fsync_file(log)
            fsync_tree(tmp)
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (DCP wraps the OS error; its type is a BaseException)
        failure = e
    if all_max(1 if failure is not None else 0, d):  # (rank 0's trainer state is its own write)
        free = _free_space(root)  # (before the partial checkpoint is removed: what the write met)
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            exit_after_failing_ranks(d)  # (the rank that failed says why)
        kept = checkpoint_dirs(out)
        raise R3Error(f"could not write checkpoint {final} ({_write_failure(failure)}{free}); "
                      + (f"the last complete one, {kept[-1].name}, is kept: free space and rerun with the same --out"
                         if kept else "no earlier checkpoint")) from None
    if d.main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(root)
        # (one past this step is from steps being redone after a resume skipped it, damaged:
        # kept, it would outrank the checkpoints written now and be the one left)
        done = checkpoint_dirs(out)
        stale = [p for p in done if step_of(p) > step]
        for old in stale + [p for p in done if p not in stale][: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    wait_for_main(d)  # (rank 0 renamed it and removed old checkpoints alone)


def load_checkpoint(path: Path, policy, optimizer, scheduler, stream, group=None) -> int:
    """``group``: the process group of DCP's own collectives (the default one when None)."""
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if not (path / ".metadata").is_file():  # (DCP would log two tracebacks on the root logger, then fail)
        raise FileNotFoundError(f"no {path / '.metadata'}")
    with _one_intra_op_thread():
        dcp.load(state, checkpoint_id=str(path), process_group=group)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(trainer["scheduler"])
    stream.position = trainer["data_position"]
    stream.resumed_fingerprint = trainer.get("data_sha256")  # (absent in checkpoints of older versions)
    stream.recent_first_success = trainer.get("recent_first_success")  # (likewise: then read from the log)
    torch.set_rng_state(torch.tensor(trainer["torch_rng"], dtype=torch.uint8))
    return trainer["step"]


def _legacy_layout(path: Path) -> bool:
    """Whether checkpoint ``path`` holds separate q/k/v and gate/up projections (written by r3
    before the model fused them)."""
    try:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001  (an unreadable checkpoint is reported by the load itself)
        return False
    return any(k.endswith((".self_attn.q_proj.weight", ".mlp.gate_proj.weight")) for k in keys)


def upgrade_fused_layout(path: Path, cfg) -> None:
    """Rewrite a checkpoint of the separate-projection layout in the fused one: the model's
    weights and AdamW's moments concatenated as the model's fused projections are (element-wise
    state, so exact). Written to a new directory that replaces the old one only when complete.
    One process does it, holding the whole state in memory once."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from r3.model import fuse_checkpoint_tensors, fused_target

    whole = path.parent / f".{path.name}.whole.pt"
    try:
        with _one_intra_op_thread():
            dcp_to_torch_save(str(path), str(whole))
        state = torch.load(str(whole), weights_only=False)  # (written just now, by DCP)
    finally:
        whole.unlink(missing_ok=True)
    state["model"] = fuse_checkpoint_tensors(cfg, state["model"], always=True)
    optim = state["optim"]
    new_state: dict[str, dict] = {}
    pieces: dict[str, tuple[tuple, dict]] = {}  # fused name -> (its parts in order, {part: state})
    for name, st in optim["state"].items():
        target = fused_target(cfg, name, always=True)
        if target is None:
            new_state[name] = st
            continue
        ours, part, parts = target
        pieces.setdefault(ours, (parts, {}))[1][part] = st
    for ours, (parts, got) in pieces.items():
        if set(got) != set(parts):
            raise R3Error(f"{path}: optimizer state of '{ours}' lacks {sorted(set(parts) - set(got))}")
        ordered = [got[p] for p in parts]
        # moments concatenated like the weights; a scalar (AdamW's step count) is the parts' own
        new_state[ours] = {key: value if not torch.is_tensor(value) or value.dim() == 0
                           else torch.cat([st[key] for st in ordered], dim=0)
                           for key, value in ordered[0].items()}
    optim["state"] = new_state
    for group in optim["param_groups"]:
        names = []
        for name in group["params"]:
            target = fused_target(cfg, name, always=True)
            name = target[0] if target is not None else name
            if name not in names:
                names.append(name)
        group["params"] = names
    tmp = path.parent / f".{path.name}.fused.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with _one_intra_op_thread():
        dcp.save({"model": state["model"], "optim": optim}, checkpoint_id=str(tmp), no_dist=True)
    shutil.copy2(path / "trainer_state.json", tmp / "trainer_state.json")
    fsync_tree(tmp)
    old = path.parent / f".{path.name}.unfused"
    os.replace(path, old)
    os.replace(tmp, path)
    fsync_directory(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover_upgrades(out: Path) -> None:
    """What an :func:`upgrade_fused_layout` cut short left: the original, ``.step_N.unfused``,
    goes back to ``step_N`` unless the rewritten one is in place; partial files are removed."""
    root = out / "checkpoints"
    if not root.is_dir():
        return
    for old in root.glob(".step_*.unfused"):
        final = root / old.name[1: -len(".unfused")]
        if (final / "trainer_state.json").is_file():
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
    for stale in [*root.glob(".step_*.fused.tmp"), *root.glob(".step_*.whole.pt")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def resume(out: Path, policy, optimizer, scheduler, stream, d: Dist) -> int:
    """Load the newest checkpoint that reads back whole and return its step (0: none, a fresh
    start). A damaged newest one (a truncated file, say) is reported and the one before it used."""
    if d.main:
        _recover_upgrades(out)
    wait_for_main(d)
    dirs = checkpoint_dirs(out)
    legacy = [_legacy_layout(p) for p in dirs]
    wait_for_main(d)  # every rank has listed and looked before rank 0 rewrites anything
    for path, old_layout in reversed(list(zip(dirs, legacy))):
        if old_layout:  # written before q/k/v and gate/up were fused: rewritten once
            if d.main:
                print(f"rewriting {path} with fused q/k/v and gate/up projections", flush=True)
                try:
                    upgrade_fused_layout(path, policy.config)
                except (Exception, CheckpointException) as e:  # noqa: BLE001  (the load below reports it)
                    print(f"warning: could not rewrite {path} ({_error_line(e)})", file=sys.stderr, flush=True)
            wait_for_main(d)
        try:
            step = load_checkpoint(path, policy, optimizer, scheduler, stream, d.cpu_group)
        except (Exception, CheckpointException) as e:  # noqa: BLE001  (DCP and json raise many kinds; each is reported)
            if d.main:
                print(f"warning: checkpoint {path} cannot be read ({_error_line(e)}); "
                      "trying the one before it", file=sys.stderr, flush=True)
            continue
        if d.main:
            print(f"resumed from {path} (step {step})", flush=True)
            before = getattr(stream, "resumed_fingerprint", None)
            if before is not None and before != stream.fingerprint:
                print(f"warning: the training examples are not those {path} was written with (the task's data "
                      f"file or its generator changed); training goes on at position {stream.position} of "
                      "the new ones", file=sys.stderr, flush=True)
        return step
    with fail_together(d, alike=True):  # (every rank got here; rank 0 says it)
        if dirs:
            raise R3Error(f"no checkpoint in {out / 'checkpoints'} can be read; move that directory away to start over")
    return 0


def export(out: Path, policy, tokenizer, d: Dist) -> Path | None:
    """The Hugging Face export, ``OUT/export`` (written whole, then renamed). What an export killed
    half-way left behind is removed first (the run's lock guarantees no other writer)."""
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = None
    with fail_together(d):  # (a gloo collective: the export may outlast NCCL's timeout)
        if d.main:
            for stale in [*out.glob(".export.tmp-*"), *out.glob(".export.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            try:
                path = save_hf(policy, tokenizer, out / "export", state_dict=sd, dtype=torch.float32)
            except (OSError, SafetensorError) as e:  # (save_hf removed what it had written)
                if not (isinstance(e, OSError) or _disk_full(e)):
                    raise  # (a serialisation bug, not the disk)
                kept = checkpoint_dirs(out)
                full = _disk_full(e)
                raise R3Error(f"could not write the export {out / 'export'} ({_error_line(e)}{_free_space_if_full(e, out)}); "
                              + (f"checkpoint {kept[-1].name} is kept: {'free space and ' if full else ''}rerun with the "
                                 "same --out to write the export" if kept else "no checkpoint was written")) from None
    return path


_HELD_LOCKS: list = []  # open lock files: the OS releases their locks when the process ends


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _holds_steps(out: Path) -> bool:
    """Whether a run directory holds a logged step or a checkpoint (anything trained)."""
    metrics = out / "metrics.jsonl"
    ckpts = out / "checkpoints"
    return (metrics.exists() and metrics.stat().st_size > 0) or (ckpts.is_dir() and any(ckpts.iterdir()))


def training_holder(out) -> str | None:
    """Who holds the run directory ``out``'s lock (``pid N on HOST``) while r3.train runs there;
    None when no run holds it."""
    try:
        with open(Path(out) / ".lock", "r") as f:
            if not try_flock(f, shared=True, quiet=True):
                return f.read().strip() or "unknown"
    except OSError:
        pass
    return None


def prepare_out_dir(cfg: TrainConfig, d: Dist) -> Path:
    """Check that ``--out`` is new, empty, or holds a run with a compatible config (never
    overwrite), and take its lock: one run per directory. The config is written by
    :func:`write_config` once the models have loaded, so a failed start leaves nothing that a
    corrected retry would be refused for."""
    out = Path(cfg.out)
    saved = out / "config.json"
    start_over = False
    previous_steps = None  # (the max_steps of the run being resumed, when this one gives another)
    with fail_together(d, alike=True):  # (every rank checks; rank 0 says what is wrong)
        if out.exists() and not out.is_dir():
            raise R3Error(f"--out {out} is a file, not a directory")
        if saved.is_file():
            try:
                previous = json.loads(saved.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise R3Error(f"{saved}: unreadable config of a previous run; use another --out") from None
            if not isinstance(previous, dict):
                raise R3Error(f"{saved}: not a config of a previous run (a JSON {type(previous).__name__}, not an "
                              "object); use another --out")
            if "model_type" in previous or not {"model", "task"} <= set(previous):  # (a model's own config.json)
                raise R3Error(f"--out {out} exists and is not an r3 run directory ({saved} is not a run's config: "
                              f"{'a model directory?' if 'model_type' in previous else 'no model and task'}); "
                              "choose an empty or new directory")
            diff = cfg.incompatible_with(previous)
            # a start that failed after writing its config (in the first step, say): nothing was
            # trained or logged under it, so a corrected retry starts over (said once the lock is ours)
            trained = _holds_steps(out)
            start_over = bool(diff) and not trained
            if trained and previous.get("max_steps", cfg.max_steps) != cfg.max_steps:
                saved_steps = checkpoint_dirs(out)
                if not (saved_steps and step_of(saved_steps[-1]) >= cfg.max_steps):  # (else nothing left to train)
                    previous_steps = previous["max_steps"]
            if diff and not start_over:
                mine, theirs = cfg.to_dict(), upgrade_config_dict(previous)
                diff.sort(key=lambda k: (k not in ("model", "task", "task_options"), k not in theirs, k))
                shown = "; ".join(f"{k}: {_short(theirs.get(k))} there, {_short(mine.get(k))} here" for k in diff[:3])
                raise R3Error(
                    f"--out {out} holds a run with a different config ({shown}{'; ...' if len(diff) > 3 else ''}); "
                    "use another --out or the same settings to resume"
                )
        elif out.exists() and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
            # (config.json is written before the first step: without it nothing says which
            # config these steps were trained with)
            raise R3Error(f"--out {out} holds a run without its config.json, so whether this config may resume it "
                          "is unknown; restore config.json or use another --out")
        elif out.exists() and any(p.name not in ("export", ".lock") for p in out.iterdir()):
            raise R3Error(f"--out {out} exists and is not an r3 run directory; choose an empty or new directory")
    with fail_together(d):  # (rank 0's lock and writes: the others exit quietly when they fail)
        if d.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                f = open(out / ".lock", "a+")
            except OSError as e:
                raise R3Error(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None
            if not try_flock(f):
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise R3Error(f"--out {out} is in use by another run ({holder}); "
                              "wait for it to end or choose another --out") from None
            else:
                try:
                    f.seek(0)
                    f.truncate()
                    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                    f.flush()
                except OSError as e:  # (a full disk)
                    with contextlib.suppress(OSError):  # (closing flushes what is buffered again)
                        f.close()
                    raise R3Error(f"--out {out}: cannot write there ({e.strerror or type(e).__name__}"
                                  f"{_free_space_if_full(e, out)})") from None
                _HELD_LOCKS.append(f)
            if start_over:
                print(f"note: --out {out} holds a run that ended before its first step was logged; starting over "
                      "with this config", flush=True)
                # (a W&B run id kept would resume the old run's W&B page under the new config)
                (out / "wandb_run_id").unlink(missing_ok=True)
            elif previous_steps is not None:  # (a resume without the run's --max-steps takes the default)
                print(f"note: --out {out} was run with --max-steps {previous_steps}, this run with {cfg.max_steps}: the "
                      f"lr schedule is recomputed for {cfg.max_steps} steps (pass --max-steps {previous_steps} to keep "
                      "it)", flush=True)
    return out


def write_config(cfg: TrainConfig, out: Path, d: Dist) -> None:
    """``OUT/config.json``: what a resume is checked against."""
    with fail_together(d):
        if d.main:
            try:
                write_json_atomic(out / "config.json", cfg.to_dict())
            except OSError as e:  # (a full disk; nothing is left half-written)
                raise R3Error(f"could not write {out / 'config.json'} ({e.strerror or type(e).__name__}"
                              f"{_free_space_if_full(e, out)})") from None


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def append_jsonl(path: Path, row: dict) -> None:
    """Append a row to a run's log. A failed write (a full disk) is one line: a resume drops the
    rows past its checkpoint and a line cut short, so nothing is lost but the steps redone."""
    row = {k: _finite_or_none(v) for k, v in row.items()}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
    except OSError as e:
        kept = checkpoint_dirs(path.parent)
        fix = "free space and rerun" if _disk_full(e) else "rerun"
        raise R3Error(f"could not write {path} ({e.strerror or e}{_free_space_if_full(e, path.parent)}); "
                      f"{fix} with the same --out: " + (f"it resumes from checkpoint {kept[-1].name}" if kept
                                                        else "there is no checkpoint yet, so it starts again")) from None


def truncate_jsonl(path: Path, step: int) -> list[dict]:
    """On resume, drop the rows past the checkpoint (steps that will be redone) and return the rows
    kept. A last line cut short by a crash is dropped with a warning; any other line that is not
    JSON is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows, kept = [], []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                print(f"warning: {path}: dropped the last line, cut short by an interrupted write", file=sys.stderr)
                continue
            raise R3Error(f"{path}: line {n} is not JSON; repair or remove the file to resume") from None
        if not isinstance(row, dict):
            raise R3Error(f"{path}: line {n} is not a JSON object; repair or remove the file to resume")
        if row.get("step", 0) <= step:
            rows.append(line)
            kept.append(row)
    write_text_atomic(path, "".join(r + "\n" for r in rows))
    return kept
