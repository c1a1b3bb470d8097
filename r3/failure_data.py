"""The failure dataset's files, what ``python -m r3.failures`` writes and ``r3.train --failures``
reads (the format is described in :mod:`r3.failures`): reading with a cut-short last line
tolerated, checking records, appending whole lines, and the pair ``F.jsonl`` + ``F.jsonl.done``."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from r3.errors import R3Error
from r3.files import fsync_fd, hold_lock, naming_os_errors, release_lock, write_text_atomic

FORMAT_VERSION = 1
_LINE_PREFIX = b'{"key": '  # every line r3.failures writes (the header line aside) starts so


def example_key(example: dict) -> str:
    """A stable key of an example: sha256 of its canonical JSON (sorted keys), 16 hex digits."""
    text = json.dumps(example, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def done_path(out: Path) -> Path:
    return out.with_name(out.name + ".done")


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


# --------------------------------------------------------------------------------------------
# Reading and appending JSONL safely
# --------------------------------------------------------------------------------------------


def _an_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def _cut_short(tail: bytes, prefix: bytes) -> bool:
    """``tail`` is what a write of a line starting with ``prefix`` can leave when cut short: at any
    byte, also inside the prefix itself (``{"ke``)."""
    return tail.startswith(prefix) or prefix.startswith(tail)


def read_jsonl(path: Path, *, header: bool = False, need_key: bool = True,
               hand_made: bool = False) -> tuple[dict | None, list[dict], int | None]:
    """-> (header record or None, records, where to cut the file or None) of a file this module
    wrote.

    Every complete line must be a JSON object with a ``key`` (unless not ``need_key``; or, as the
    first line when ``header``, an object with ``r3_failures``); anything else is an R3Error naming the line. An
    unterminated last line that starts like one of our records is what a crash mid-write leaves:
    it is ignored with a warning (the third value is then its offset, to cut the file there).
    ``hand_made`` (reading only, never to append to): a last line without its newline that is a
    whole JSON object is a record, and a UTF-8 byte-order mark (as Windows tools write) is skipped."""
    if not path.exists():
        return None, [], None
    if not path.is_file():
        raise R3Error(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise R3Error(f"{path}: cannot read: {e.strerror or e}") from None
    if hand_made and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    good = data.rfind(b"\n") + 1
    tail = data[good:]
    if tail and hand_made and _an_object(tail):  # (a hand-made file need not end with a newline)
        data, good, tail = data + b"\n", len(data) + 1, b""
    if tail:
        if not (_cut_short(tail, _LINE_PREFIX) or (header and good == 0 and _cut_short(tail, b'{"r3_failures": '))):
            raise R3Error(f"{path}: not a file written by r3.failures (its last line is not a record)")
        print(f"warning: {path}: ignoring a truncated last line (an interrupted write)", file=sys.stderr)
    head, records = None, []
    for lineno, line in enumerate(data[:good].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise R3Error(f"{where}: not valid JSON; not a file written by r3.failures") from None
        if header and lineno == 1 and isinstance(rec, dict) and "r3_failures" in rec:
            head = rec
            continue
        if not isinstance(rec, dict) or (need_key and not isinstance(rec.get("key"), str)):
            raise R3Error(f"{where}: expected a JSON object{' with a key' if need_key else ''}; "
                          "not a file written by r3.failures")
        records.append(rec)
    return head, records, good if tail else None


def append_lines(path: Path, records: list[dict]) -> None:
    """Append records as whole lines in one write, then flush and fsync: a crash can only cut the
    last line short, never touch earlier ones."""
    if not records:
        return
    blob = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)
    with naming_os_errors(path), open(path, "a", encoding="ascii") as f:
        f.write(blob)
        f.flush()
        fsync_fd(f.fileno())


def read_failures(path) -> list[dict]:
    """The failure records of a file written by ``python -m r3.failures`` (what training needs:
    ``example`` and ``attempt_tokens`` per record; ``key`` is optional here, so hand-made files
    work too). A missing file or a line that is not such a record is an R3Error; a last line cut short by a crash is ignored with a
    warning."""
    path = Path(path)
    if path.is_dir():
        raise R3Error(f"failure dataset '{path}' is a directory, not a file written by python -m r3.failures")
    if not path.is_file() and done_path(path).is_file():  # (r3.failures writes no records when none failed)
        raise R3Error(f"{path}: no failure records to train on (r3.failures found none: every query in "
                      f"{done_path(path)} passed)")
    if not path.is_file():
        raise R3Error(f"failure dataset '{path}' does not exist (make one with python -m r3.failures)")
    return _checked(path, read_jsonl(path, need_key=False, hand_made=True)[1])


def _checked(path: Path, records: list[dict]) -> list[dict]:
    for i, rec in enumerate(records):
        toks = rec.get("attempt_tokens")
        if not isinstance(rec.get("example"), dict) or not isinstance(toks, list) or not toks \
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks):
            raise R3Error(f"{path}: record {i + 1} lacks an 'example' object or non-empty 'attempt_tokens' "
                          "(token ids); not a file written by r3.failures")
    return records


def recorded_settings(path) -> dict | None:
    """The settings ``python -m r3.failures`` recorded for the failure file ``path`` (the header
    line of ``path.done``: model, task, task options, split, sampling), or None where there is no
    such header (a hand-made file)."""
    done = done_path(Path(path))
    try:
        with open(done, "rb") as f:
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or "r3_failures" not in header or not isinstance(header.get("settings"), dict):
        return None
    return header["settings"]


def check_made_for(path, task, model: str, chat_template_options: dict | None = None,
                   cut_answers: str = "fail") -> None:
    """Refuse to train on failures of another task: the records' examples and attempts are
    judged with the run's task, so a file made for another task (other numbers, operators or
    answer format) would reward against the wrong rule. Compares the task's name and every
    option in effect with what ``r3.failures`` recorded, and the chat template options (the
    stored attempts continue the conversation they were sampled in); warns when the model
    differs (the attempts are another model's, in its tokens), the queries are not from the
    train split, or the file counted attempts the token limit cut off as failures (``--cut-answers
    fail``) where the run (``cut_answers``) reads them as they stand."""
    from r3.checkpoint import same_model
    from r3.config import absolute_paths
    from r3.tasks import get
    from r3.tasks.base import stop_strings_of

    settings = recorded_settings(path)
    if settings is None or "task" not in settings:
        return
    try:  # (files of older versions recorded relative paths: read from here, as the run's own are)
        made = get(settings["task"], **absolute_paths(settings.get("task_options", {})))
    except R3Error as e:
        raise R3Error(f"{path}: made for task {settings['task']!r}, which cannot be rebuilt here ({e})") from None
    mine, theirs = _options_in_effect(task), _options_in_effect(made)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    same_kind = type(made) is type(task) and getattr(made, "name", None) == getattr(task, "name", None)
    if not same_kind or differ:
        detail = (f"options differ: {', '.join(f'{k} {theirs.get(k)!r} there, {mine.get(k)!r} here' for k in differ[:3])}"
                  f"{' ...' if len(differ) > 3 else ''}" if same_kind else
                  f"task {_kind(made)} there, {_kind(task)} here")
        raise R3Error(f"{path} was made for task {settings['task']!r} with options {settings.get('task_options', {})}, "
                      f"not this run's task ({detail}); pass the same --task and --task-option to r3.train, "
                      "or make the file again")
    theirs, mine = settings.get("chat_template_options") or {}, chat_template_options or {}
    if _rendering(theirs) != _rendering(mine):
        raise R3Error(f"{path} was sampled with chat template options {theirs}, not this run's {mine}: its attempts "
                      "continue another conversation; pass the same --chat-template-option to r3.train, or make "
                      "the file again")
    theirs, mine = settings.get("attempt_stop_strings", []), list(stop_strings_of(task))
    if theirs != mine:  # (files made before attempts ended at the task's stop strings)
        print(f"warning: {path}'s attempts were not ended at this task's stop strings {mine} (made with {theirs}): "
              "some may run past an answer a training attempt stops at, and fail where it passes; make the "
              "file again with this version of r3.failures", file=sys.stderr)
    if settings.get("cut_answers", "judge") == "fail" and cut_answers == "judge":
        print(f"warning: {path} was made with --cut-answers fail: some of its failures may be attempts the token "
              "limit cut off that this run (cut_answers judge) would pass as they stand, and reflects on as failed; "
              "train with --cut-answers fail, or make the file again with --cut-answers judge", file=sys.stderr)
    if settings.get("model") is not None and not same_model(settings["model"], model):
        print(f"warning: {path} holds the first attempts of model {settings['model']!r}; this run trains {model!r}",
              file=sys.stderr)
    if settings.get("split", "train") != "train":
        print(f"warning: {path} holds queries of the {settings['split']!r} split", file=sys.stderr)


def without_test_queries(path, task, records: list[dict]) -> list[dict]:
    """``records`` less those whose query is one of the task's test-split queries, with a
    warning saying how many: held-out accuracy is read on the test split, so training on its
    queries would make it a measure of memorisation. A query is what the model is shown
    (``task.messages``), so a test query under another id is caught too. Such records come from a
    file made with ``--split test``, or made before the task's split rule changed (function
    calling once split by id, which put repeated queries on both sides). A task with a rule for
    it (``on_test_side(example)``: generated Countdown, whose test split is larger than
    ``examples("test")`` lists) is asked instead. All of them test queries is an R3Error."""
    def shown(example: dict) -> str:
        return json.dumps(task.messages(example), sort_keys=True, ensure_ascii=True, default=str)

    from r3.tasks import examples_of

    # a task's own rule where it has one (generated Countdown: its test split is larger than
    # examples("test") lists, and test_fraction 0 lists none), else the listed test split
    on_test_side, listed = getattr(task, "on_test_side", None), None

    def in_test(example: dict) -> bool:
        nonlocal listed
        side = on_test_side(example) if callable(on_test_side) else None
        if side is not None:
            return bool(side)
        if listed is None:
            listed = {shown(ex) for ex in examples_of(task, "test")}
        return shown(example) in listed

    kept = [rec for rec in records if not in_test(rec["example"])]
    if len(kept) == len(records):
        return records
    if not kept:
        raise R3Error(f"{path}: all {len(records)} failure records are queries of the task's test split, on which "
                      "held-out accuracy is measured; make the file from the train split (python -m r3.failures "
                      "--split train)")
    print(f"warning: {path}: {len(records) - len(kept)} of {len(records)} failure records are queries of the task's "
          "test split (the file was made with --split test, or before the task's split changed); training leaves "
          "them out so held-out accuracy stays held out", file=sys.stderr)
    return kept


def _rendering(options):
    """Chat template options as the template gets them (a file's, read as recorded if malformed)."""
    from r3.chat import template_options

    try:
        return template_options(options)
    except R3Error:
        return options


def _kind(task) -> str:
    """A task's name, and its class where the name alone does not tell two tasks apart."""
    return f"{getattr(task, 'name', '?')!r} ({type(task).__module__}.{type(task).__qualname__})"


def _options_in_effect(task) -> dict:
    config = getattr(task, "config", None)  # (a plug-in need not have it: then only its kind is compared)
    return config() if callable(config) else {}


def _stat_or_none(path: Path):
    try:
        return path.stat()
    except FileNotFoundError:
        return None


class FailureFile:
    """``F.jsonl`` (failures) plus ``F.jsonl.done`` (header + queries that never failed)."""

    def __init__(self, out: Path):
        self.out, self.done, self.progress_file = out, done_path(out), progress_path(out)
        self._locks: set = set()  # the held files' keys (r3.files.hold_lock)
        self._read()

    def _stamp(self) -> list:
        return [(st.st_size, st.st_mtime_ns) if st else None
                for st in map(_stat_or_none, (self.done, self.out, self.progress_file))]

    def _read(self) -> None:
        self._read_at = self._stamp()
        try:
            self.header, self.done_records, cut_done = read_jsonl(self.done, header=True)
            _, failures, cut_out = read_jsonl(self.out)
            self.failures = _checked(self.out, failures)
            _, progress, cut_progress = read_jsonl(self.progress_file)
        except R3Error as e:  # (r3.failures would append to it)
            raise R3Error(f"{e}; use another --out") from None
        # attempts passed so far by queries still being sampled when a run stopped (the last line wins)
        self.progress = {r["key"]: r["passed"] for r in progress
                         if isinstance(r.get("passed"), int) and not isinstance(r["passed"], bool) and r["passed"] > 0}
        self._cuts = [(p, c) for p, c in ((self.done, cut_done), (self.out, cut_out), (self.progress_file, cut_progress))
                      if c is not None]

    def open(self, settings: dict) -> None:
        """Check ``settings`` against the header (the task must match), drop any truncated last
        lines and write the header if there is none yet. One process at a time: the files are
        read again once this one holds them (another that ended meanwhile may have added to them)."""
        self._lock()
        if self._stamp() != self._read_at:
            self._read()
        if self.header is not None:
            old = self.header.get("settings", {})
            # (files made before these settings were recorded: what those versions did)
            old = {"chat_template_options": {}, "attempt_stop_strings": [], "cut_answers": "judge", **old}
            for k in ("task", "task_options", "split", "chat_template_options"):
                if k in old and k in settings and old[k] != settings[k]:
                    raise R3Error(f"{self.out} holds {k} {old[k]!r}, not {settings[k]!r}; use another --out")
            from r3.checkpoint import same_model

            if isinstance(old.get("model"), str) and isinstance(settings.get("model"), str) \
                    and not same_model(old["model"], settings["model"]):  # (its header would name the first alone)
                raise R3Error(f"{self.out} holds the failures of model {old['model']!r}, not {settings['model']!r} "
                              "(its attempts are that model's tokens); use another --out")
            changed = [k for k in settings if k in old and old[k] != settings[k] and k not in ("n", "model")]
            if changed:
                print(f"warning: {self.out} was started with other settings "
                      f"({', '.join(f'{k}: {old[k]!r} -> {settings[k]!r}' for k in changed)}); "
                      "queries already in it are not sampled again", file=sys.stderr)
        for path, cut in self._cuts:  # drop what an interrupted write left
            with open(path, "r+b") as f:
                f.truncate(cut)
        self._cuts = []
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.header is None:  # a new file (or a header-less .done): put the header first
            self.header = {"r3_failures": FORMAT_VERSION, "settings": settings}
            body = self.done.read_text(encoding="utf-8") if self.done.exists() else ""
            write_text_atomic(self.done, json.dumps(self.header, ensure_ascii=True) + "\n" + body)
            self._lock()  # (the file just written replaced the one held)

    def _lock(self) -> None:
        """Hold ``F.jsonl.done`` until this process ends: two processes on the same --out would
        each sample the queries left and append every record twice (each query twice in the
        file training reads)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        key = hold_lock(self.done)
        if key is None:
            raise R3Error(f"{self.out} is being written by another process (r3.failures with the same --out); "
                          "wait for it to end or use another --out")
        self._locks.add(key)

    def close(self) -> None:
        """Let other processes write the files again (the hold :meth:`open` took; a process that
        ends lets go of it too)."""
        for key in self._locks:
            release_lock(key)
        self._locks.clear()

    def keys(self) -> set[str]:
        return {r["key"] for r in self.failures} | {r["key"] for r in self.done_records}

    def add(self, failures: list[dict], passed: list[dict]) -> None:
        append_lines(self.out, failures)  # failures first: on a crash between the two, both
        append_lines(self.done, passed)  # kinds are still recognised as processed
        self.failures.extend(failures)
        self.done_records.extend(passed)

    def add_progress(self, surviving: list[dict]) -> None:
        """``{"key", "passed"}`` (``F.jsonl.progress``) for each query of a batch that passed all
        its attempts so far and is sampled again: a run stopped before its next round goes on from
        there, not from its first attempt."""
        append_lines(self.progress_file, surviving)
        self.progress.update({r["key"]: r["passed"] for r in surviving})

    def finished(self) -> None:
        """The queries asked for are all in ``F.jsonl`` or ``F.jsonl.done``: the progress file goes
        once it holds no other query (one of a larger --n still to sample keeps it)."""
        if not set(self.progress) - self.keys():
            self.progress_file.unlink(missing_ok=True)
            self.progress = {}
