"""``r3-torchrun``: torchrun whose output ends with r3's own message.

The same flags as ``torchrun`` (this is torchrun's own parser and launcher), e.g.
``r3-torchrun --nproc_per_node 4 -m r3.train --out runs/r3``. It differs in what happens when the
workers stop on purpose, and in three settings:

- a user error (a worker's one-line ``error: ...``, exit code 2) or a checkpoint after SIGTERM /
  SIGINT (exit code 128 + the signal) ends the launcher with that exit code and nothing after the
  workers' own lines: plain torchrun adds about 30 lines of ``ChildFailedError`` traceback and
  exits 1;
- any other failure (a crash) prints torchrun's failure summary (which rank, exit code, error
  file) without the launcher's own traceback, and exits 1;
- with several workers per node and no ``OMP_NUM_THREADS``, each gets this machine's CPUs divided
  by the number of workers (torchrun sets 1 and prints a banner about it);
- SIGTERM / SIGINT sent to the launcher reach the workers, which finish their step and save: the
  launcher waits for them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default here 600, torchrun's
  is 30) before killing them, then exits with 128 + the signal;
- under ``nohup`` SIGHUP stays ignored (torchrun would pass it on and kill the workers at once);
- the one-process commands (:data:`SINGLE_PROCESS`), and an ``r3.`` module that does not exist
  (``-m r3.trian``), are refused in one line.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from r3.distributed import available_cpus, cpu_threads

#: The signals an r3 worker handles itself (a checkpoint, then exit 128 + the signal).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
#: Exit codes an r3 worker uses after saying why it stopped (see :mod:`r3.errors`, r3.train).
QUIET_EXIT_CODES = frozenset({2, *(128 + s for s in STOP_SIGNALS)})
SHUTDOWN_TIMEOUT_S = "600"


class _DropQuietFailure(logging.Filter):
    """Drop torchrun's "failed (exitcode: N) local_rank: ..." line for the codes above, its
    "Sending process P closing signal SIGTERM" lines and its "Received 15 death signal" line (the
    workers say themselves why they stop; a crash still gets the failure summary)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = str(record.msg), record.args if isinstance(record.args, tuple) else ()
        if msg.startswith("Sending process") and "closing signal" in msg:
            return False
        if msg.startswith("Received") and "death signal" in msg and args and args[0] in STOP_SIGNALS:
            return False  # (each worker says it received SIGTERM / SIGINT; another signal it does not)
        return not (msg.startswith("failed (exitcode") and args and args[0] in QUIET_EXIT_CODES)


#: r3's commands that run in one process (see :func:`r3.cli.pick_device_dtype`).
SINGLE_PROCESS = ("r3.evaluate", "r3.forgetting", "r3.failures", "r3.generate", "r3.audit", "r3.report", "r3.plot")
_NO_MODEL = ("r3.audit", "r3.report", "r3.plot")  # (no --device: they read files)


def _single_process_module(argv: list[str]) -> str | None:
    """The single-process r3 command ``argv`` launches with ``-m``, if any: refused before
    torchrun's parser reads that command's flags as its own (``--n`` is "ambiguous", matching
    ``--nnodes`` and ``--nproc-per-node``)."""
    script = _launched_module(argv)
    return script if script in SINGLE_PROCESS else None


def _missing_r3_module(argv: list[str]) -> str | None:
    """The ``r3.`` module ``argv`` launches with ``-m`` when no such module exists (a typo such as
    ``r3.trian``): each worker would fail to start and torchrun add its failure summary."""
    script = _launched_module(argv)
    if not script or script.split(".")[0] != "r3":
        return None
    if "" in script.split("."):  # (r3..train: python -m refuses it)
        return script
    here = Path.cwd()  # (python -m puts it first: a checkout there is the r3 the workers import)
    if (here / "r3" / "__init__.py").is_file():
        path = here.joinpath(*script.split("."))
        return None if path.with_suffix(".py").is_file() or (path / "__main__.py").is_file() else script
    try:
        spec = importlib.util.find_spec(script)
        if spec is not None and spec.submodule_search_locations is not None:  # (a package runs its __main__)
            spec = importlib.util.find_spec(script + ".__main__")
        return None if spec is not None else script
    except (ImportError, ValueError):  # (r3.nosuch.x: its parent package is missing)
        return script


def _launched_module(argv: list[str]) -> str | None:
    """The module ``argv`` launches with ``-m``, if any: the first argument that is neither one
    of torchrun's options nor an option's value."""
    options = torchrun.get_args_parser()._option_string_actions
    module, i = False, 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-"):
            break
        name = a.split("=", 1)[0]
        # (an abbreviation, as torchrun's parser takes it: --nproc for --nproc-per-node)
        matches = {act for o, act in options.items() if o.startswith(name)} if name.startswith("--") else set()
        action = options.get(name) or (matches.pop() if len(matches) == 1 else None)
        module = module or a in ("-m", "--module")
        i += 1 if action is None or action.nargs == 0 or "=" in a else 2
    script = argv[i] if i < len(argv) else None
    return script if module else None


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    argv = sys.argv[1:] if argv is None else argv
    single = _single_process_module(argv)
    if single:
        runs_model = single not in _NO_MODEL
        print(f"error: {single} runs in one process{' on one device' if runs_model else ''}: start it with python -m "
              f"{single}, not r3-torchrun" + (" (--device cuda:N picks a GPU; for several GPUs, one process each with "
                                              "its own --out)" if runs_model else ""), file=sys.stderr)
        raise SystemExit(2)
    missing = _missing_r3_module(argv)
    if missing:
        close = difflib.get_close_matches(missing, ("r3.train", *SINGLE_PROCESS), n=1)
        hint = "" if not close else (f" (did you mean {close[0]}?)" if close[0] not in SINGLE_PROCESS else
                                     f" (did you mean python -m {close[0]}? it runs as one process, not under r3-torchrun)")
        print(f"error: no module named {missing}{hint}", file=sys.stderr)
        raise SystemExit(2)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and not any(
            k in os.environ for k in ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE")):
        # started under nohup: torchrun would catch SIGHUP and pass it on to the workers, which
        # it kills at once (no checkpoint); left ignored, the workers inherit nohup's ignore.
        # (--signals-to-handle's default, and the variable older torchruns read)
        os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGQUIT"
    args = torchrun.parse_args(argv)
    try:  # (torchrun: a ValueError or AssertionError traceback)
        nproc = torchrun.determine_local_world_size(args.nproc_per_node)
        why = None if nproc >= 1 else "must be at least 1"
    except ValueError as e:  # ("Unsupported nproc_per_node value: abc", "Cuda is not available.")
        why = str(e).rstrip(".")
    if why:
        print(f"error: --nproc_per_node {args.nproc_per_node!r}: {why}", file=sys.stderr)
        raise SystemExit(2)
    if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
        os.environ["OMP_NUM_THREADS"] = str(cpu_threads({}, nproc, available_cpus()))
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(_DropQuietFailure())
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode in QUIET_EXIT_CODES:
            raise SystemExit(first.exitcode) from None
        print(e.format_msg(), file=sys.stderr)
        raise SystemExit(1) from None
    except SignalException as e:
        raise SystemExit(128 + int(e.sigval)) from None


if __name__ == "__main__":
    main()
