"""The batches a long evaluation has finished, kept beside its result file so that a rerun of the
same command (after a crash, a preemption or a full disk) goes on from there.

``r3.evaluate`` and ``r3.forgetting`` write their JSON once, at the end; an hour of generation
would otherwise be lost to an interruption a minute before it. Each finished batch is appended
as one line to ``OUT.partial.jsonl``, whose first line records what the results depend on (the
settings, the data, each model's files). A rerun with the same ``--out`` and the same inputs
reads the finished batches back instead of computing them; batches run in the same order and
composition as before, so the result equals an uninterrupted run's. A file recorded for other
inputs (settings, data, models, the task's code or r3's) is refused, naming what differs: it is
deleted by hand, never by a mistyped command. The file goes once the result is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from r3.checkpoint import canonical_model, resolve
from r3.errors import R3Error
from r3.failure_data import append_lines
from r3.files import hold_lock, release_lock

HEADER = "r3_partial_results"
FORMAT = 1  # (a key of another format never matches)


def _json(value) -> str:
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)
    except TypeError:  # (a dict whose keys cannot be sorted together, e.g. ints and strings)
        return json.dumps(value, ensure_ascii=True, default=str)


def fingerprint(value) -> str:
    """A short hash of a JSON-able value (documents, prompts): equal inputs, equal hashes."""
    return hashlib.sha256(_json(value).encode()).hexdigest()[:16]


def device_name(device) -> str:
    """``device`` as the key records it: a GPU by its product name (``cuda (NVIDIA H100 80GB
    HBM3)``), since another kind of GPU computes other numbers (its kernels), while any GPU of the
    same kind (``--device cuda``, ``cuda:0``, ``cuda:1``) continues another's batches."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda ({torch.cuda.get_device_name(index)})"
    return str(device)


def partial_path(out) -> Path:
    """``OUT.partial.jsonl``: where the finished batches of the command writing ``out`` are kept."""
    return Path(out).with_name(Path(out).name + ".partial.jsonl")


def code_fingerprint(*objects) -> str:
    """A short hash of r3's own source and of the files defining ``objects``' classes (a plug-in
    task and its bases): a fixed verifier or prompt, or another r3, is another evaluation."""
    files = set(Path(__file__).resolve().parent.glob("**/*.py"))
    for obj in objects:
        for cls in type(obj).__mro__:
            try:
                source = inspect.getsourcefile(cls)
            except TypeError:  # (a built-in class)
                continue
            if source:
                files.add(Path(source).resolve())
    digest = hashlib.sha256()
    for path in sorted(files):
        with contextlib.suppress(OSError):
            digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def model_files(spec: str) -> dict:
    """What identifies a model's weights without reading them: each file's size and modification
    time (an export rewritten by more training is another model)."""
    _, path = resolve(spec)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"spec": canonical_model(spec),
            "files": {p.name: [st.st_size, st.st_mtime_ns] for p in files for st in [p.stat()]}}


def _differences(old, new) -> list[str]:
    """The keys whose values differ between two key dicts (``settings.seed``: one level down); a key
    that holds null in one and is absent from the other differs too."""
    old = old if isinstance(old, dict) else {}
    gone = object()
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, gone), new.get(k, gone)
        if a != b:
            out += ([f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s, gone) != b.get(s, gone)]
                    if isinstance(a, dict) and isinstance(b, dict) else [k])
    return out


class _Terminated(BaseException):
    """SIGTERM, raised where the work is (as Ctrl-C raises KeyboardInterrupt)."""


class PartialResults:
    """Finished batches by ``(unit, batch)``: a unit is one model (on one benchmark), a batch its
    index in the unit's fixed order. ``key``: everything the results depend on (JSON-able)."""

    def __init__(self, out: Path, key: dict):
        self.out, self.path = Path(out), partial_path(out)
        self.key = json.loads(_json({"format": FORMAT, **key}))  # (as it reads back)
        self.done: dict[tuple[str, int], object] = {}
        self.earlier_s: dict[tuple[str, int], float] = {}  # (each read-back batch's seconds in its run)
        self._since: float | None = None
        self._header_written = False
        self._held: tuple | None = None
        if not self.path.exists():
            return
        self._hold()  # (before reading: another process may be appending to it)
        try:
            self._read()
        except BaseException:  # (a file refused: let go of it at once, not when the process ends)
            release_lock(self._held)
            self._held = None
            raise

    def _read(self) -> None:
        data = self.path.read_bytes()
        ours = b'{"' + HEADER.encode() + b'"'  # (how our first line starts; a crash may have cut even that)
        # a line cut short by a crash: appending would glue onto it
        if (data.startswith(ours) or ours.startswith(data)) and data and not data.endswith(b"\n"):
            print(f"warning: {self.path}: dropping the last line, cut short by an interrupted write", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
        rows = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise R3Error(f"{self.path}, line {n}: not valid JSON ({e.msg}); not a file of finished batches "
                              "written by r3: delete it or use another --out") from None
        if not rows:
            self._remove()
            return
        head = rows[0][1]
        if not (isinstance(head, dict) and HEADER in head):
            raise R3Error(f"{self.path}: not a file of finished batches (no {HEADER} header); delete it or use "
                          "another --out")
        if head.get("key") != self.key:
            changed = _differences(head.get("key"), self.key)
            raise R3Error(f"{self.path} holds {len(rows) - 1} finished batches of an evaluation with other inputs "
                          f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}): rerun that command "
                          "to finish it, or delete the file to start this one")
        self._header_written = True
        for n, row in rows[1:]:
            if not (isinstance(row, dict) and isinstance(row.get("unit"), str) and isinstance(row.get("batch"), int)
                    and "result" in row):
                raise R3Error(f"{self.path}, line {n}: not a finished batch; delete the file to start over")
            self.done[(row["unit"], row["batch"])] = row["result"]
            seconds = row.get("s")
            ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0
            self.earlier_s[(row["unit"], row["batch"])] = float(seconds) if ok else 0.0
        if self.done:
            print(f"resuming: {len(self.done)} finished batch{'es' if len(self.done) != 1 else ''} read from "
                  f"{self.path}", file=sys.stderr)

    def _hold(self) -> None:
        """Hold ``OUT.partial.jsonl`` until :meth:`finish` (or this process ends): two commands
        with the same --out would append their batches to one file, the second's header in the
        middle of the first's lines."""
        if self._held is None:
            self._held = hold_lock(self.path)
            if self._held is None:
                raise R3Error(f"{self.out} is being written by another process ({self.path} is held by it: "
                              "the same command with the same --out?); wait for it to end or use another --out")

    def _remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._held is not None:
            release_lock(self._held)
            self._held = None

    def of(self, unit: str) -> dict[int, object]:
        """The finished batches of ``unit``, by batch index."""
        return {b: r for (u, b), r in self.done.items() if u == unit}

    def start(self, unit: str) -> dict[int, object]:
        """The finished batches of ``unit`` (as :meth:`of`); the time of each batch run after this
        call is kept with it (from here, then from the batch before)."""
        self._since = time.perf_counter()
        return self.of(unit)

    def seconds_before(self, unit: str | None = None) -> float:
        """The seconds the read-back batches (of ``unit``, or all) took in the runs that made them:
        what a resumed evaluation's time adds to its own."""
        return sum(s for (u, _), s in self.earlier_s.items() if unit is None or u == unit)

    def add(self, unit: str, batch: int, result) -> None:
        """Record one finished batch (a line appended and synced: a crash can only cut it short)."""
        lines = [] if self._header_written else [{HEADER: 1, "key": self.key}]
        if not self._header_written:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # (as the result file's write makes it)
            self._hold()
            if self.path.stat().st_size:  # (another command's lines, written since this one started)
                release_lock(self._held)
                self._held = None
                raise R3Error(f"{self.out}: {self.path} was written by another command since this one "
                              "started (the same command with the same --out?); rerun this command to go on "
                              "from its finished batches, or use another --out")
        row = {"unit": unit, "batch": batch, "result": result}
        now = time.perf_counter()
        if self._since is not None:
            row["s"] = round(now - self._since, 3)
        self._since = now
        append_lines(self.path, lines + [row])
        self._header_written = True
        self.done[(unit, batch)] = result

    @contextlib.contextmanager
    def interrupted_note(self):
        """On Ctrl-C or SIGTERM (a preemption) inside: say where the finished batches are kept,
        then exit with 128 + the signal."""
        def terminated(signum, frame):
            raise _Terminated

        try:
            previous = signal.signal(signal.SIGTERM, terminated)
        except ValueError:  # (not the main thread: no handler)
            previous = None
        try:
            yield
        except (KeyboardInterrupt, _Terminated) as e:
            what = "terminated" if isinstance(e, _Terminated) else "interrupted"
            if self.done:
                print(f"{what}: {len(self.done)} finished batch{'es' if len(self.done) != 1 else ''} kept in "
                      f"{self.path}; the same command goes on from them", file=sys.stderr, flush=True)
            else:
                print(what, file=sys.stderr, flush=True)
            raise SystemExit(128 + (signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def finish(self) -> None:
        """The result file is written: the finished batches are no longer needed."""
        self._remove()
