"""The dataset of failures: sample up to K attempts per query and keep the queries the model fails.

``python -m r3.failures --model M --task T --samples K --out F.jsonl [--n N] [--split train] ...``

For each query, attempts are sampled until the first one that fails the verifier (at most K).
Sampling is batched by rounds: round ``r`` draws ``min(2**r, K - done, --batch-size)`` attempts for
every query that has passed all its attempts so far (one :func:`r3.sampler.generate` call per
batch of queries, the prompt prefilled once and shared by its samples), so a weak model finishes in
one round and a strong one needs about ``log2(K)`` rounds, not K.

Files (all lines ASCII JSON, appended whole and flushed after every batch):

* ``F.jsonl`` -- one record per query that failed, what ``r3.train --failures F.jsonl`` reads::

      {"key": "...", "example": {...}, "attempt_tokens": [ids], "attempt_text": "...",
       "attempts_before_failure": k, "samples": k + 1, "finished": true}

  ``attempt_tokens`` are the failed attempt's generated token ids (the stop token included when
  it was sampled), exactly as the sampler produced them after the prompt
  ``ChatFormat(tokenizer).prompt(task.messages(example))``.
* ``F.jsonl.done`` -- a header line ``{"r3_failures": 1, "settings": {...}}`` (model, task, task
  options, sampling settings of the first run), then one line ``{"key": "...", "samples": K}``
  per query that passed all its K attempts.

``key`` is a hash of the example's canonical JSON. A rerun with the same ``--out`` skips every query
whose key is in either file (resume). A crash can at worst leave the last line of a file cut short:
it is dropped, with a warning, when the file is next opened. Prints the failure rate and how many
samples it took.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from r3.cli import (
    DTYPES,
    ArgumentParser,
    Progress,
    check_out_path,
    load_model,
    load_task,
    parse_task_options,
    pick_device_dtype,
    positive_int,
)
from r3.errors import R3Error, cli_main

FORMAT_VERSION = 1
_LINE_PREFIX = b'{"key": '  # every line r3.failures writes (the header line aside) starts so


def example_key(example: dict) -> str:
    """A stable key of an example: sha256 of its canonical JSON (sorted keys), 16 hex digits."""
    text = json.dumps(example, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def done_path(out: Path) -> Path:
    return out.with_name(out.name + ".done")


# --------------------------------------------------------------------------------------------
# Reading and appending JSONL safely
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path, *, header: bool = False, need_key: bool = True) -> tuple[dict | None, list[dict], int | None]:
    """-> (header record or None, records, where to cut the file or None) of a file this module
    wrote.

    Every complete line must be a JSON object with a ``key`` (unless not ``need_key``; or, as the
    first line when ``header``, an object with ``r3_failures``); anything else is an R3Error naming the line. An
    unterminated last line that starts like one of our records is what a crash mid-write leaves:
    it is ignored with a warning (the third value is then its offset, to cut the file there)."""
    if not path.exists():
        return None, [], None
    if not path.is_file():
        raise R3Error(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise R3Error(f"{path}: cannot read: {e.strerror or e}") from None
    good = data.rfind(b"\n") + 1
    tail = data[good:]
    if tail:
        if not (tail.startswith(_LINE_PREFIX) or (header and good == 0 and tail.startswith(b'{"r3_failures": '))):
            raise R3Error(f"{path}: not a file written by r3.failures (its last line is not a record); "
                          "use another --out")
        print(f"warning: {path}: ignoring a truncated last line (an interrupted write)", file=sys.stderr)
    head, records = None, []
    for lineno, line in enumerate(data[:good].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise R3Error(f"{where}: not valid JSON; not a file written by r3.failures (use another --out)") from None
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
    with open(path, "a", encoding="ascii") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def read_failures(path) -> list[dict]:
    """The failure records of a file written by ``python -m r3.failures`` (what training needs:
    ``example`` and ``attempt_tokens`` per record; ``key`` is optional here, so hand-made files
    work too). A missing file or a line that is not such a record is an R3Error; a last line cut short by a crash is ignored with a
    warning."""
    path = Path(path)
    if not path.is_file():
        raise R3Error(f"failure dataset '{path}' does not exist (make one with python -m r3.failures)")
    return _checked(path, read_jsonl(path, need_key=False)[1])


def _checked(path: Path, records: list[dict]) -> list[dict]:
    for i, rec in enumerate(records):
        toks = rec.get("attempt_tokens")
        if not isinstance(rec.get("example"), dict) or not isinstance(toks, list) or not toks \
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks):
            raise R3Error(f"{path}: record {i + 1} lacks an 'example' object or non-empty 'attempt_tokens' "
                          "(token ids); not a file written by r3.failures")
    return records


class FailureFile:
    """``F.jsonl`` (failures) plus ``F.jsonl.done`` (header + queries that never failed)."""

    def __init__(self, out: Path):
        self.out, self.done = out, done_path(out)
        self.header, self.done_records, cut_done = read_jsonl(self.done, header=True)
        _, failures, cut_out = read_jsonl(self.out)
        self.failures = _checked(self.out, failures)
        self._cuts = [(p, c) for p, c in ((self.done, cut_done), (self.out, cut_out)) if c is not None]

    def open(self, settings: dict) -> None:
        """Check ``settings`` against the header (the task must match), drop any truncated last
        lines and write the header if there is none yet."""
        if self.header is not None:
            old = self.header.get("settings", {})
            for k in ("task", "task_options", "split"):
                if k in old and old[k] != settings[k]:
                    raise R3Error(f"{self.out} holds {k} {old[k]!r}, not {settings[k]!r}; use another --out")
            changed = [k for k in settings if k in old and old[k] != settings[k] and k != "n"]
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
            body = self.done.read_bytes() if self.done.exists() else b""
            tmp = self.done.with_name(self.done.name + ".tmp")
            tmp.write_bytes((json.dumps(self.header, ensure_ascii=True) + "\n").encode("ascii") + body)
            os.replace(tmp, self.done)

    def keys(self) -> set[str]:
        return {r["key"] for r in self.failures} | {r["key"] for r in self.done_records}

    def add(self, failures: list[dict], passed: list[dict]) -> None:
        append_lines(self.out, failures)  # failures first: on a crash between the two, both
        append_lines(self.done, passed)  # kinds are still recognised as processed
        self.failures.extend(failures)
        self.done_records.extend(passed)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _round_seed(seed: int, round_: int, batch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"r3.failures:{seed}:{round_}:{batch}".encode()).digest()[:7], "big")


def find_failures(
    model,
    tokenizer,
    task,
    examples: list[dict],
    *,
    samples: int,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    on_batch=None,
    progress: Progress | None = None,
    chat=None,
) -> dict:
    """Sample up to ``samples`` attempts per example, stopping at each example's first failure.

    After every batch, ``on_batch(failures, passed)`` gets the new failure records (see the
    module docstring) and the records ``{"key", "id", "samples"}`` of examples that passed all
    their attempts. Returns ``{"queries", "failed", "passed", "samples_needed", "samples_drawn",
    "generated_tokens"}``; ``samples_needed`` counts attempts up to and including each first
    failure (``samples`` for queries that never failed), ``samples_drawn`` all attempts sampled
    (rounds of several samples per query may draw a few past the first failure)."""
    from r3.episode import ChatFormat
    from r3.sampler import generate

    samples = positive_int("samples", samples)
    batch_size = positive_int("batch_size", batch_size)
    chat = chat or ChatFormat(tokenizer)
    vocab = min(len(tokenizer), model.config.vocab_size)
    prompts = [chat.prompt(task.messages(ex)) for ex in examples]
    keys = [example_key(ex) for ex in examples]
    stats = dict(queries=len(examples), failed=0, passed=0, samples_needed=0, samples_drawn=0, generated_tokens=0)
    pending = list(range(len(examples)))
    passed_so_far = 0  # attempts every pending query has passed (the same for all of them)
    round_ = 0
    resolved = 0
    while pending:
        m = min(2**round_, samples - passed_so_far, batch_size)  # samples per query this round
        per_batch = max(1, batch_size // m)
        survivors = []
        for b, lo in enumerate(range(0, len(pending), per_batch)):
            idx = pending[lo: lo + per_batch]
            out = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, num_samples=m, stop_token_ids=chat.stop_ids,
                           seed=_round_seed(seed, round_, b), vocab_size=vocab)
            stats["samples_drawn"] += len(out.tokens)
            stats["generated_tokens"] += out.new_tokens
            fails, passes = [], []
            for j, i in enumerate(idx):
                ex = examples[i]
                for s in range(m):
                    toks = out.tokens[j * m + s]
                    text = chat.decode(toks)
                    if not task.verify(ex, text):
                        k = passed_so_far + s
                        fails.append({"key": keys[i], "example": ex, "attempt_tokens": list(toks), "attempt_text": text,
                                      "attempts_before_failure": k, "samples": k + 1,
                                      "finished": bool(out.finished[j * m + s])})
                        stats["samples_needed"] += k + 1
                        break
                else:
                    if passed_so_far + m >= samples:
                        passes.append({"key": keys[i], "id": ex.get("id"), "samples": samples})
                        stats["samples_needed"] += samples
                    else:
                        survivors.append(i)
            stats["failed"] += len(fails)
            stats["passed"] += len(passes)
            resolved += len(fails) + len(passes)
            if on_batch is not None:
                on_batch(fails, passes)
            if progress is not None:
                progress.update(resolved, f"round {round_ + 1} ({m} sample{'s' if m > 1 else ''}/query), "
                                f"failed {stats['failed']}, never failed {stats['passed']}, "
                                f"{stats['samples_drawn']} samples drawn")
        pending = survivors
        passed_so_far += m
        round_ += 1
    if progress is not None:
        progress.close()
    return stats


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m r3.failures", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or built-in name (default: smollm2-135m)")
    p.add_argument("--task", default="countdown", help="task name or plug-in 'package.module:Class' (default: countdown)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option (value parsed as JSON when possible); repeatable")
    p.add_argument("--samples", type=int, default=8, help="K: attempts per query at most (default: 8; the paper: up to 64)")
    p.add_argument("--out", required=True, help="the failure dataset (JSONL); F.jsonl.done lists queries that never failed")
    p.add_argument("--n", type=int, default=None, help="queries (default: the task's whole split)")
    p.add_argument("--split", default="train", help="default: train")
    p.add_argument("--seed", type=int, default=0, help="which examples, and the sampling seed (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="default: 1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256, help="attempt length limit (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="sampled rows per batch (default: 16)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="default: bf16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    positive_int("--samples", args.samples)
    positive_int("--n", args.n, allow_none=True)
    positive_int("--max-new-tokens", args.max_new_tokens)
    positive_int("--batch-size", args.batch_size)
    from r3.sampler import check_sampling_args

    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.temperature == 0 and args.samples > 1:
        raise R3Error("--temperature 0 is greedy: every sample of a query would be the same; use --samples 1")
    out = check_out_path(args.out)
    options = parse_task_options(args.task_option)
    task = load_task(args.task, options)
    examples = task.examples(args.split, args.n, args.seed)
    if not examples:
        raise R3Error(f"task {args.task!r}: no {args.split} examples")
    device, dtype = pick_device_dtype(args.device, args.dtype)
    from r3.checkpoint import resolve

    resolve(args.model)  # a bad path is an error even when there is nothing left to sample
    store = FailureFile(out)
    settings = {"model": args.model, "task": args.task, "task_options": options, "split": args.split,
                "seed": args.seed, "n": args.n, "samples": args.samples, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype}
    store.open(settings)
    seen = store.keys()
    keys = [example_key(ex) for ex in examples]
    todo = [ex for ex, k in zip(examples, keys) if k not in seen]
    if len(todo) < len(examples):
        print(f"resuming {out}: {len(examples) - len(todo)} of {len(examples)} queries already done, "
              f"{len(todo)} to sample", file=sys.stderr)
    t0 = time.perf_counter()
    drawn = 0
    if todo:
        model, tok = load_model(args.model, dtype, device)
        drawn = find_failures(
            model, tok, task, todo, samples=args.samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size,
            seed=args.seed, on_batch=store.add,
            progress=Progress(len(todo), "failures", enabled=not args.quiet),
        )["samples_drawn"]
    summary = summarize(store, set(keys), new=len(todo), drawn=drawn, elapsed=time.perf_counter() - t0)
    print(summary["line"])
    return 0


def summarize(store: FailureFile, keys: set[str], *, new: int, drawn: int, elapsed: float) -> dict:
    """The failure rate and samples needed over the queries ``keys`` (from the files)."""
    failed = {r["key"]: r for r in store.failures if r["key"] in keys}
    passed = {r["key"]: r for r in store.done_records if r["key"] in keys and r["key"] not in failed}
    q = len(failed) + len(passed)
    needed = sum(int(r.get("samples", r.get("attempts_before_failure", 0) + 1)) for r in failed.values()) + \
        sum(int(r.get("samples", 0)) for r in passed.values())
    rate = len(failed) / q if q else 0.0
    line = (f"{len(failed)}/{q} queries failed at least once (failure rate {100 * rate:.1f}%); "
            f"samples needed {needed} ({needed / q if q else 0:.2f} per query); "
            f"{new} sampled in this run ({drawn} samples drawn, {elapsed:.1f}s), {q - new} resumed; "
            f"{len(store.failures)} failures in {store.out}")
    return {"queries": q, "failed": len(failed), "never_failed": len(passed), "failure_rate": rate,
            "samples_needed": needed, "new": new, "samples_drawn": drawn, "line": line}


if __name__ == "__main__":
    sys.exit(main())
