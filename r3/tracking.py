"""Experiment tracking, as users of TRL and verl expect: ``--report-to none|tensorboard|wandb``.

Every tracker gets the same things ``metrics.jsonl`` and ``samples.jsonl`` hold: the resolved
config as hyper-parameters, each step's numeric metrics as scalars (``train/<name>``), the
held-out evaluation (``eval/<name>``), and the step's logged samples (every rewarded retry and a
few others) as text. Only rank 0 tracks.

- ``tensorboard``: event files in ``OUT/tensorboard`` (``pip install tensorboard``; view with
  ``tensorboard --logdir OUT/tensorboard``). A resume drops the events after the checkpoint's step,
  as ``metrics.jsonl`` is trimmed.
- ``wandb``: a Weights & Biases run in ``OUT/wandb`` (``pip install wandb``), resumed under the
  same id after a restart. It runs offline (files only, ``wandb sync`` uploads them) unless
  ``WANDB_MODE`` says otherwise or ``WANDB_API_KEY`` is set.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import threading
from pathlib import Path

from r3.errors import R3Error

REPORT_TO = ("none", "tensorboard", "wandb")


class Tracker:
    """No tracking (``none``); the base of the others."""

    def log_metrics(self, row: dict, step: int, prefix: str = "train") -> None:
        pass

    def log_samples(self, records: list[dict], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def scalars(row: dict) -> dict[str, float]:
    """The row's finite numbers (booleans as 0/1), without the step itself."""
    out = {}
    for k, v in row.items():
        if k == "step" or v is None or isinstance(v, str):
            continue
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def samples_markdown(records: list[dict]) -> str:
    """The samples as a Markdown table: reward, reason, and the three texts."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| reward | reason | attempt | reflection | retry |", "| --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r.get('reward')} | {cell(r.get('reason', ''))} | {cell(r.get('attempt', ''))} | "
                     f"{cell(r.get('reflection', ''))} | {cell(r.get('retry', ''))} |")
    return "\n".join(lines)


def tracker_module(report_to: str):
    """The module ``--report-to`` needs (``torch.utils.tensorboard`` or ``wandb``), or an R3Error
    saying which package to install. ``r3.train`` calls it before anything is written, so a missing
    package does not cost a model load and leave a run directory behind."""
    try:  # (each is named after its package)
        return importlib.import_module("torch.utils.tensorboard" if report_to == "tensorboard" else report_to)
    except ImportError:
        raise R3Error(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}") from None


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path, config: dict, start_step: int):
        SummaryWriter = tracker_module("tensorboard").SummaryWriter
        # purge_step: after a resume, events past the checkpoint's step are dropped (from step 0
        # on a resume before the first checkpoint). A fresh run writes its marker too: TensorBoard's
        # UI takes a run's first marker as its start, and purges only at the ones after it.
        self.out, self.failed = out, False
        _quiet_writer_thread_errors()
        with self._writing():
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else 0)
            if not start_step:
                self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (a full disk; TensorBoard's writer thread meets it, the next call here
        raises it) is one line naming the directory, as a failed write of a log is."""
        try:
            yield
        except OSError as e:
            from r3.rundir import _free_space_if_full, checkpoint_dirs

            self.failed = True
            kept = checkpoint_dirs(self.out)
            raise R3Error(f"could not write {self.out / 'tensorboard'} ({e.strerror or e}"
                          f"{_free_space_if_full(e, self.out)}); free space and rerun with the same --out: "
                          + (f"it resumes from checkpoint {kept[-1].name}" if kept
                             else "there is no checkpoint yet, so it starts again")) from None

    def log_metrics(self, row: dict, step: int, prefix: str = "train") -> None:
        with self._writing():
            for k, v in scalars(row).items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def log_samples(self, records: list[dict], step: int) -> None:
        if records:
            with self._writing():
                self.writer.add_text("samples", samples_markdown(records), step)

    def close(self) -> None:
        if self.failed:  # (said already; the writer raises the same error again)
            with contextlib.suppress(OSError):
                self.writer.close()
            return
        with self._writing():
            self.writer.close()


def _quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread prints the traceback of a failed write before the next call
    raises it in the main thread: that call says it in one line (see ``_writing``)."""
    previous = threading.excepthook
    if getattr(previous, "r3_quiet", False):
        return

    def hook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.r3_quiet = True
    threading.excepthook = hook


class WandbTracker(Tracker):
    def __init__(self, out: Path, config: dict, start_step: int):
        self.wandb = wandb = tracker_module("wandb")
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "r3"), name=out.name, dir=str(out), id=run_id,
                              resume="allow", config=config, mode=mode)

    def log_metrics(self, row: dict, step: int, prefix: str = "train") -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in scalars(row).items()}, step=step)

    def log_samples(self, records: list[dict], step: int) -> None:
        if records:
            cols = ["step", "reward", "reason", "attempt", "reflection", "retry"]
            table = self.wandb.Table(columns=cols, data=[[step] + [r.get(c) for c in cols[1:]] for r in records])
            self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(report_to: str, out: Path, config: dict, start_step: int, main: bool) -> Tracker:
    """The tracker ``report_to`` names (a no-op one on ranks other than 0)."""
    if report_to not in REPORT_TO:
        raise R3Error(f"config: 'report_to' must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if not main or report_to == "none":
        return Tracker()
    return (TensorBoardTracker if report_to == "tensorboard" else WandbTracker)(Path(out), config, start_step)
