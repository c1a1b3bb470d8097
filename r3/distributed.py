"""The process group training runs in: torchrun's rendezvous (or one process), reductions over
ranks, FSDP2 sharding, and a clean exit. One rank is one process; on CPU the cores are shared
among the local ranks."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard



@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object
    cpu_group: object = None  # gloo, long timeout: waits on rank 0's file work (see wait_for_main)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun's env:// rendezvous, or a 1-process group when run as plain ``python -m``."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # The GPU is set before the process group exists and named to NCCL: its communicator and every
    # barrier use this rank's GPU, not one guessed from the global rank.
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if device.type == "cuda":
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        else:
            # one process: an in-memory store (nothing on disk, no port); NCCL on a GPU, since
            # FSDP2's collectives over gloo would take CUDA tensors through host memory
            nccl = device.type == "cuda" and dist.is_nccl_available()
            dist.init_process_group("nccl" if nccl else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    **({"device_id": device} if nccl else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(os.environ, int(os.environ.get("LOCAL_WORLD_SIZE", world)), available_cpus()))

    mesh = init_device_mesh(device.type, (world,))
    cpu_group = dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT) if world > 1 else None
    return Dist(rank, world, local_rank, device, mesh, cpu_group)


def cpu_threads(env, local_world: int, cpus: int) -> int:
    """Intra-op threads for each of a node's ``local_world`` CPU ranks: ``OMP_NUM_THREADS`` where
    the user set it (fewer threads than CPUs are what a CPU shared with other work needs: a
    parallel op waits for its slowest thread), else the ``cpus`` this process may use, shared
    among the ranks. The ``1`` torchrun sets for several ranks on its own is not a user's choice."""
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1 and not (given == "1" and local_world > 1):
        return int(given)
    return max(1, cpus // local_world)


def available_cpus() -> int:
    """The CPUs this process may run on (a container's or ``taskset``'s limit), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        return os.cpu_count() or 1


#: How long the other ranks wait for rank 0's work on files (see :func:`wait_for_main`).
MAIN_WORK_TIMEOUT = timedelta(hours=2)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a time taken next
    counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_device_memory(device: torch.device, compiled: bool = False) -> None:
    """After a model is dropped (``del model``): collect it, and on a GPU hand the caching
    allocator's free blocks back (and, after ``decode="compiled"``, the compiled code and its
    CUDA-graph memory pools, which hold the old model's buffers), so that the next model, or
    another process, finds the memory free."""
    gc.collect()
    if device.type == "cuda":
        if compiled:
            torch.compiler.reset()
        torch.cuda.empty_cache()


def wait_for_main(d: Dist) -> None:
    """A barrier after work rank 0 does alone on files (writing the export, rewriting an old
    checkpoint), which for a 7B+ model can outlast NCCL's 10-minute collective timeout: taken on a
    gloo group with a timeout of :data:`MAIN_WORK_TIMEOUT`."""
    if d.world > 1:
        dist.barrier(group=d.cpu_group)


@contextlib.contextmanager
def fail_together(d: Dist, *, alike: bool = False):
    """Around work that can fail on some ranks only (what rank 0 writes alone: logs, the export;
    a check of a node's own machine): an error there (a full disk) stops every rank together, the
    failing ranks with their own message or traceback and the others with exit code 2 and nothing
    printed, instead of leaving them to crash with a traceback at the next collective. The others
    wait as :func:`wait_for_main` does (on the gloo group: an export can outlast NCCL's timeout).

    ``alike``: checks every rank makes of the same inputs (the config, the model's path, the
    task): a rank whose error is rank 0's stays quiet, instead of each rank printing the same
    line; an error of its own (a node without a compiler) it still says."""
    failed = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  (re-raised below, after the other ranks know)
        failed = e
    flag = torch.tensor([1 if failed is not None else 0, 1 if failed is not None and d.main else 0])
    if d.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.cpu_group)
    if flag[0].item():
        said_by_main = False
        if alike and flag[1].item() and d.world > 1:  # (the same on every rank: all take part)
            said = [None] * d.world
            dist.all_gather_object(said, None if failed is None else str(failed), group=d.cpu_group)
            said_by_main = not d.main and said[d.rank] == said[0]
        if failed is not None and not said_by_main:
            raise failed
        exit_after_failing_ranks(d)


def exit_after_failing_ranks(d: Dist) -> NoReturn:
    """Leave with exit code 2 and nothing printed, once the ranks that failed are gone (this
    barrier breaks when they exit): the launcher then reports their exit code and error first, and
    does not stop them, on this rank's exit, before they have said why. The SIGTERM the launcher
    sends once a failed rank has exited leaves quietly too (it said 'terminated' under the failed
    rank's line when it came before this rank was gone)."""
    def leave(signum, frame):
        raise SystemExit(2)

    with contextlib.suppress(ValueError):  # (not the main thread: signals are left alone)
        signal.signal(signal.SIGTERM, leave)
    with contextlib.suppress(Exception):
        dist.barrier(group=d.cpu_group)
    raise SystemExit(2)


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


def shard(model, d: Dist, dtype: torch.dtype):
    """FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, norm, head)."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=d.mesh, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    return model


def _exit_hard(code) -> None:
    """Leave without the interpreter's teardown: after a clean run, gloo's worker threads can
    still abort it ("terminate called without an active exception"), which would turn a finished
    run (or a clean exit code 2) into SIGABRT. Every file we write is closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def run_and_exit(main) -> None:
    """Run a rank's entry point and leave with :func:`_exit_hard`, a crash too (its traceback
    printed, then exit 1 at once): a crashed rank is then gone before the ranks waiting for it in
    :func:`fail_together` notice and exit 2, so the launcher reports the crash, not their exit."""
    try:
        main()
    except SystemExit as e:
        _exit_hard(e.code)
    except BaseException:  # noqa: BLE001  (printed as the interpreter would, then a prompt exit)
        traceback.print_exc()
        _exit_hard(1)
    _exit_hard(0)


_PARENT_AT_START = os.getppid()


def _first_rank() -> bool:
    """Whether this process is rank 0 (or was not started by torchrun): it says what every rank does."""
    return os.environ.get("RANK", "0") == "0"


class StopSignals:
    """SIGTERM (what Slurm and Kubernetes send before killing a job) and SIGINT ask the run to
    stop at the end of the current step, after a checkpoint, instead of at once. A second Ctrl-C
    interrupts immediately: a SIGINT after any signal, or a SIGTERM after a SIGINT (the second
    Ctrl-C as torchrun forwards it). A repeated SIGTERM still waits for the checkpoint: Slurm
    sends one to every process of the job, so a worker gets its own and the launcher's.

    Under torchrun, a launcher that is gone (killed with SIGKILL: its workers live in sessions of
    their own and would train on, holding the run's lock and devices) counts as a SIGTERM.
    Use as a context manager; ``requested(d)`` agrees over all ranks."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        # the launcher's pid, when torchrun started this process (read when this module was
        # imported: a launcher killed while the models load is noticed too)
        self._launcher = _PARENT_AT_START if "TORCHELASTIC_RUN_ID" in os.environ else None

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signal.SIGINT in (signum, self.signum):
                raise KeyboardInterrupt
            return  # (a SIGTERM again: the same stop, said once)
        self.signum = signum
        if _first_rank():  # (every rank gets the launcher's signal: said once)
            print(f"received {signal.Signals(signum).name}: stopping after this step's checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False

    def requested(self, d: Dist) -> int:
        """The signal number any rank received (0 if none), the same on every rank."""
        if self.signum is None and self._launcher is not None and os.getppid() != self._launcher:
            self.signum = signal.SIGTERM
            if _first_rank():
                print(f"the launcher (pid {self._launcher}) is gone: stopping after this step's checkpoint",
                      file=sys.stderr, flush=True)
        return all_max(int(self.signum or 0), d)
