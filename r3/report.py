"""``python -m r3.report RUN``: the paper's report of a training run, one Markdown page and its PNGs.

    python -m r3.evaluate --run RUN --records          (writes RUN/evaluation.json)
    python -m r3.forgetting --run RUN --data gsm8k=test.jsonl --fewshot-data gsm8k=train.jsonl --out RUN/forgetting.json
    python -m r3.report RUN [--forgetting RUN/forgetting.json] [--out RUN/report]

Writes ``OUT/report.md`` with, as in the paper's Sections 5.1-5.2:

- the accuracy table: first attempt and after one reflection + retry, untrained vs trained, with
  standard errors and the paired changes (from ``r3.evaluate --run``);
- training: steps, time, retry success and reflection length early vs late (``metrics.jsonl``),
  with the curves of :mod:`r3.plot`;
- reflection length before and after training: the reflections each model wrote on the queries
  it failed (the evaluation's ``--records``), in tokens;
- the forgetting table (``r3.forgetting``), when given: each benchmark's score for both models and
  the paired change;
- reflections before vs after: queries both models failed at first, the untrained and the trained
  model's reflection and retry with their verdicts, taken in turn from each outcome (only the
  trained retry passed, only the untrained one, both, neither) so the page does not show only
  successes;
- the task's options in effect and its prompts, as the evaluation recorded them.

The report reads files and runs no model; each missing or malformed input is one line naming the
file. PNGs: ``accuracy.png``, ``reflection_length.png``, ``forgetting.png``, ``curves.png``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from r3.cli import (
    ArgumentParser,
    check_out_path,
    positive_int,
    read_json_object,
    read_run_config,
    write_text_atomic,
)
from r3.errors import R3Error, cli_main
from r3.partial_results import model_files
from r3.plot import plot as plot_curves
from r3.plot import pyplot, read_metrics, save_figure

OUTCOMES = (
    ("trained_only", "only the trained model's retry passed"),
    ("untrained_only", "only the untrained model's retry passed"),
    ("both", "both retries passed"),
    ("neither", "neither retry passed"),
)


# --------------------------------------------------------------------------------------------
# Reading the inputs
# --------------------------------------------------------------------------------------------


def _recorded_cwd(path: Path, doc: dict) -> str | None:
    """The directory the command that wrote ``doc`` ran in (``cwd``; None in files of older r3)."""
    cwd = doc.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise R3Error(f"{path}: 'cwd' is {cwd!r}, not a directory")
    return cwd


def _same_path(a, b, cwd: str | None = None) -> bool:
    """Whether ``a`` (a path as an r3 command recorded it) names the same place as ``b`` (relative
    to here): read from here, or, when relative, from ``cwd``, the directory that command ran in
    (where it recorded one; a run copied elsewhere with its evaluation is read from here)."""
    a, b = Path(a).expanduser(), Path(b).expanduser().resolve()
    return a.resolve() == b or bool(cwd and not a.is_absolute() and (Path(cwd) / a).resolve() == b)


def _moved_with_its_run(path: Path, ev: dict, run: Path) -> bool:
    """Whether the evaluation file lies in ``run`` and ``run/export`` is the export it evaluated
    (each file's size and modification time, which ``mv`` and ``cp -a`` keep): the run directory
    was moved or renamed with its evaluation."""
    recorded = ev.get("export_files")
    if not isinstance(recorded, dict) or Path(path).resolve().parent != Path(run).resolve():
        return False
    return _export_files(run) == recorded


def _export_files(run: Path) -> dict | None:
    """``run/export``'s files as :func:`r3.partial_results.model_files` identifies them (None where
    it cannot be read)."""
    try:
        return model_files(str(Path(run) / "export"))["files"]
    except (OSError, R3Error):
        return None


def relocated(fg: dict, ev: dict, run: Path) -> dict:
    """``fg`` with the models it names by the run's place when ``ev`` was made (a run moved since,
    with its evaluation) named by ``run``, so its rows are labelled "trained" as before the move."""
    if ev.get("run") is None or _same_path(ev["run"], run, ev.get("cwd")):
        return fg
    old_export = Path(ev.get("cwd") or ".") / ev["run"] / "export"

    def here(model):
        return str(run / "export") if isinstance(model, str) and _same_path(model, old_export, fg.get("cwd")) else model

    return {**fg, "results": [{**r, "model": here(r["model"])} for r in fg["results"]],
            "paired": [{**p, "model": here(p.get("model")), "baseline": here(p.get("baseline"))}
                       for p in fg.get("paired", [])]}


def read_evaluation(path: Path, run: Path) -> dict:
    """An ``r3.evaluate`` JSON of this run: its first model the untrained one, its second the export."""
    ev = read_json_object(path, f"missing: make it with python -m r3.evaluate --run {run} --records --out {path}")
    models = ev.get("models")
    if not isinstance(models, list) or len(models) < 2 or not all(isinstance(m, dict) for m in models):
        raise R3Error(f"{path}: needs two evaluated models (untrained and trained); "
                      f"make it with python -m r3.evaluate --run {run} --records")
    for i, m in enumerate(models[:2]):
        for key in ("model", "n", "first_attempt_accuracy", "second_attempt_accuracy",
                    "first_attempt_stderr", "second_attempt_stderr", "first_correct", "second_correct"):
            if key not in m:
                raise R3Error(f"{path}: models[{i}] has no {key!r} (not an r3.evaluate output?)")
        for key in ("n", "first_attempt_accuracy", "second_attempt_accuracy", "first_attempt_stderr",
                    "second_attempt_stderr"):
            if isinstance(m[key], bool) or not isinstance(m[key], (int, float)):
                raise R3Error(f"{path}: models[{i}].{key} is {m[key]!r}, not a number")
        records = m.get("records")
        if records is not None and not (isinstance(records, list) and all(isinstance(r, dict) for r in records)):
            raise R3Error(f"{path}: models[{i}].records is not a list of records")
        for j, r in enumerate(records or []):
            t = r.get("reflection_tokens")
            if t is not None and (isinstance(t, bool) or not isinstance(t, int)):
                raise R3Error(f"{path}: models[{i}].records[{j}].reflection_tokens is {t!r}, not a token count")
    cwd = _recorded_cwd(path, ev)
    if ev.get("run") is not None:
        if not _same_path(ev["run"], run, cwd) and not _moved_with_its_run(path, ev, run):
            raise R3Error(f"{path}: evaluates the run {ev['run']}" + (f" (from {cwd})" if cwd else "")
                          + f", not {run}; evaluate it with python -m r3.evaluate --run {run} --records")
    elif not _same_path(models[1]["model"], run / "export", cwd):
        raise R3Error(f"{path}: its second model is {models[1]['model']}, not {run / 'export'}; "
                      f"evaluate with --run {run}")
    if models[0]["n"] != models[1]["n"]:
        raise R3Error(f"{path}: the two models were evaluated on different numbers of queries")
    changed = _export_changed_since(ev, run)
    if changed:
        raise R3Error(f"{path}: evaluates an earlier export of {run} (rewritten since, by more training or a "
                      f"resume: {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); evaluate it again "
                      f"with python -m r3.evaluate --run {run} --records")
    return ev


def _export_changed_since(ev: dict, run: Path) -> list[str]:
    """The files of ``run/export`` whose size or modification time differ from those the
    evaluation recorded of the export it evaluated (none where it recorded none, as older r3
    did, or where the export is gone)."""
    recorded = ev.get("export_files")
    now = _export_files(run) if ev.get("run") is not None and isinstance(recorded, dict) else None
    if now is None:
        return []
    return sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))


def read_forgetting(path: Path) -> dict:
    fg = read_json_object(path)
    if not isinstance(fg.get("results"), list) or not isinstance(fg.get("paired", []), list):
        raise R3Error(f"{path}: no 'results' list (not an r3.forgetting output?)")
    if not fg["results"]:
        raise R3Error(f"{path}: no results (r3.forgetting writes a row per model, benchmark and metric)")
    for i, r in enumerate(fg["results"]):
        if not isinstance(r, dict) or not {"model", "benchmark", "metric", "score", "stderr", "n"} <= set(r):
            raise R3Error(f"{path}: results[{i}] is not a {{model, benchmark, metric, score, stderr, n}} row")
    _recorded_cwd(path, fg)
    return fg


# --------------------------------------------------------------------------------------------
# What the report computes
# --------------------------------------------------------------------------------------------


def reflection_lengths(model_result: dict) -> list[int] | None:
    """Token lengths of the reflections a model wrote in the evaluation (None without records)."""
    records = model_result.get("records")
    if records is None:
        return None
    return [int(r["reflection_tokens"]) for r in records if "reflection_tokens" in r]


def length_summary(lengths: list[int], limit: int | None) -> dict:
    n = len(lengths)
    if not n:
        return {"n": 0}
    mean = sum(lengths) / n
    sd = statistics.stdev(lengths) if n > 1 else 0.0
    out = {"n": n, "mean": mean, "stderr": sd / n ** 0.5, "median": statistics.median(lengths)}
    if limit:
        out["at_limit"] = sum(1 for x in lengths if x >= limit) / n
    return out


def pair_outcomes(untrained: dict, trained: dict) -> dict[str, list[tuple[dict, dict]]]:
    """The queries both models failed at first, grouped by which retry passed, in file order."""
    groups: dict[str, list] = {key: [] for key, _ in OUTCOMES}
    for a, b in zip(untrained.get("records") or [], trained.get("records") or []):
        if a.get("attempt_correct") or b.get("attempt_correct") or "reflection" not in a or "reflection" not in b:
            continue
        ra, rb = bool(a.get("retry_correct")), bool(b.get("retry_correct"))
        key = "both" if ra and rb else "trained_only" if rb else "untrained_only" if ra else "neither"
        groups[key].append((a, b))
    return groups


def pick_examples(groups: dict[str, list], k: int) -> list[tuple[str, dict, dict]]:
    """Up to ``k`` pairs, one from each outcome in turn (so every outcome present is shown)."""
    out, depth = [], 0
    while len(out) < k and any(depth < len(v) for v in groups.values()):
        for key, _ in OUTCOMES:
            if len(out) < k and depth < len(groups[key]):
                out.append((key, *groups[key][depth]))
        depth += 1
    return out


def training_summary(metrics: list[dict]) -> dict:
    """Steps, time, and early vs late means of the per-step training metrics."""
    w = max(1, min(10, len(metrics) // 2))

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    early, late = metrics[:w], metrics[-w:]
    return {
        "steps": metrics[-1].get("step", len(metrics)),
        "window": w,
        "step_time_s": sum(r.get("step_time_s") or 0.0 for r in metrics),
        **{f"{key}_{part}": mean(rows, key) for key in ("retry_success", "first_try_success", "reflection_len_mean",
                                                       "groups_with_signal", "kl")
           for part, rows in (("early", early), ("late", late))},
    }


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def pct(x: float, se: float | None = None) -> str:
    return f"{100 * x:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def fenced(text: str) -> str:
    """``text`` in a code fence longer than any run of backticks inside it."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def label(model: str, run: Path, cfg: dict, cwd: str | None = None) -> str:
    """"trained" for the run's export, "untrained" for its base model, else the model as given
    (``cwd``: where the command that recorded ``model`` ran)."""
    if _same_path(model, run / "export", cwd):
        return "trained"
    return "untrained" if model == cfg.get("model") else model


def _cut_answers_note(st: dict, cfg: dict) -> str:
    """How the evaluation judged answers the token limit cut off (evaluations of older r3 did
    not record it: nothing said), and the run's own rule where that was another."""
    rule = st.get("cut_answers")
    if rule is None:
        return ""
    trained = cfg.get("cut_answers", "judge")  # (runs before the option judged them)
    return f", cut-off answers {'failed' if rule == 'fail' else 'judged as they stand'} (cut_answers {rule}" + (
        f"; the run trained with {trained})" if trained != rule else ")")


def _is_prompt(option: str) -> bool:
    return option.endswith("prompt") or option == "prompt_template"


def _task_config(ev: dict) -> dict:
    """The task's options the evaluation recorded as in effect ({} where it recorded none)."""
    cfg = ev.get("task_config")
    return cfg if isinstance(cfg, dict) else {}


def _options_in_effect(ev: dict) -> str:
    """The task's options as the evaluation ran it (a preset's included), prompts aside: a run's
    ``task_options`` hold only what was given (``{}`` for a preset)."""
    shown = ", ".join(f"{k}={v}" for k, v in _task_config(ev).items() if not _is_prompt(k) and v is not None)
    return f"; in effect `{shown}`" if shown else ""


def _prompt_lines(ev: dict) -> list[str]:
    """The task's prompts the model saw, verbatim (``{nums}``-style placeholders as the task fills
    them), and the first evaluation query's messages as the task wrote them (a plug-in's prompt
    is its ``messages()``, not an option)."""
    prompts = [(k, v) for k, v in _task_config(ev).items() if _is_prompt(k) and isinstance(v, str)]
    first = ev.get("first_query_messages")
    first = first if isinstance(first, list) and all(isinstance(m, dict) for m in first) else []
    if not prompts and not first:
        return []
    lines = ["## The task's prompts", ""]
    for k, v in prompts:
        lines += [f"`{k}`:", "", fenced(v), ""]
    if first:
        lines += ["The first evaluation query's messages, before the chat template:", ""]
        for m in first:
            lines += [f"{m.get('role', '?')}:", "", fenced(str(m.get("content", ""))), ""]
    return lines


def render(run: Path, cfg: dict, ev: dict, metrics: list[dict] | None, fg: dict | None, pngs: dict,
           examples: int) -> str:
    base, trained = ev["models"][0], ev["models"][1]
    st = ev.get("settings", {})
    lines = [f"# r3 report: `{run}`", ""]
    lines += [f"- untrained model: `{base['model']}`; trained: `{trained['model']}`",
              f"- task: `{cfg['task']}`, options `{cfg.get('task_options', {})}`" + _options_in_effect(ev)
              + (f"; chat template options `{cfg['chat_template_options']}`" if cfg.get("chat_template_options") else ""),
              f"- training: lr {cfg.get('lr')}, {cfg.get('batch_size')} failed queries x G={cfg.get('group_size')} "
              f"reflections per step, reflections up to {cfg.get('max_reflection_tokens')} tokens, seed {cfg.get('seed')}"
              + ("; answers the token limit cut off failed (cut_answers: fail)" if cfg.get("cut_answers") == "fail" else
                 "; answers the token limit cut off were judged as they stood (cut_answers: judge)"),
              f"- evaluation: {base['n']} {st.get('split', 'test')} queries, temperature {st.get('temperature', 0.0)} "
              f"({'greedy' if not st.get('temperature') else 'sampled'}), dtype {st.get('dtype', '?')}"
              + _cut_answers_note(st, cfg), ""]

    lines += ["## Accuracy after one and two attempts", "",
              "| model | first attempt (%) | after reflect + retry (%) | gain from the retry (points) |",
              "| --- | --- | --- | --- |"]
    for name, m in (("untrained", base), ("trained", trained)):
        lines.append(f"| {name} | {pct(m['first_attempt_accuracy'], m['first_attempt_stderr'])} | "
                     f"{pct(m['second_attempt_accuracy'], m['second_attempt_stderr'])} | "
                     f"{100 * (m['second_attempt_accuracy'] - m['first_attempt_accuracy']):+.1f} |")
    paired = [p for p in ev.get("paired", []) if _same_path(p.get("model", ""), trained["model"])]
    if paired:
        p = paired[0]
        lines += [""] + [f"Paired change, trained minus untrained, {what} (same {p[key]['n']} queries): "
                         f"{100 * p[key]['mean']:+.1f} ± {100 * p[key]['stderr']:.1f} points "
                         f"({p[key]['better']} better, {p[key]['worse']} worse)."
                         for key, what in (("first_attempt", "first attempt"), ("second_attempt", "after the retry"))]
    lines += ["", f"![accuracy]({pngs['accuracy']})", ""]

    lines += ["## Training", ""]
    if metrics:
        t = training_summary(metrics)

        def fmt(key, scale=1.0, digits=3):
            a, b = t[f"{key}_early"], t[f"{key}_late"]
            return "n/a" if a is None or b is None else f"{scale * a:.{digits}f} -> {scale * b:.{digits}f}"

        lines += [f"{t['steps']} steps, {t['step_time_s'] / 60:.1f} minutes of steps. Means over the first vs the "
                  f"last {t['window']} steps:", "",
                  f"- retry success (the reward): {fmt('retry_success')}",
                  f"- first-attempt success while sampling failures: {fmt('first_try_success')}",
                  f"- groups with signal per step: {fmt('groups_with_signal', digits=2)}",
                  f"- reflection length (tokens): {fmt('reflection_len_mean', digits=1)}",
                  f"- KL to the reference: {fmt('kl', digits=5)}", "", f"![training curves]({pngs['curves']})", ""]
    else:
        lines += [f"No `metrics.jsonl` in `{run}`.", ""]

    lines += ["## Reflection length before and after training", ""]
    limit = st.get("max_reflection_tokens") or cfg.get("max_reflection_tokens")
    lens = {name: reflection_lengths(m) for name, m in (("untrained", base), ("trained", trained))}
    if any(v is None or not v for v in lens.values()):
        lines += ["Not available: the evaluation has no per-query records with reflection lengths "
                  f"(rerun `python -m r3.evaluate --run {run} --records`).", ""]
    else:
        lines += ["Reflections each model wrote on the evaluation queries it failed at first (tokens):", "",
                  f"| model | reflections | mean | median | at the {limit}-token limit |", "| --- | --- | --- | --- | --- |"]
        for name, v in lens.items():
            s = length_summary(v, limit)
            lines.append(f"| {name} | {s['n']} | {s['mean']:.1f} ± {s['stderr']:.1f} | {s['median']:g} | "
                         f"{100 * s.get('at_limit', 0.0):.0f}% |")
        lines += ["", f"![reflection length]({pngs['reflection_length']})", ""]

    lines += ["## Other skills (forgetting)", ""]
    if fg is None:
        lines += [f"Not measured: run `python -m r3.forgetting --run {run} --data gsm8k=FILE ... --out F.json` and "
                  "pass `--forgetting F.json`.", ""]
    else:
        fs = fg.get("settings", {})
        cwd = fg.get("cwd")
        lines += [f"Scored by lm-evaluation-harness's rules ({'chat template' if fs.get('chat') else 'plain prompts'}, "
                  f"dtype {fs.get('dtype', '?')}).", "",
                  "| benchmark | metric | model | score (%) | n |", "| --- | --- | --- | --- | --- |"]
        for r in fg["results"]:
            lines.append(f"| {r['benchmark']} | {r['metric']} | {label(r['model'], run, cfg, cwd)} | {pct(r['score'], r['stderr'])} | {r['n']} |")
        for p in fg.get("paired", []):
            lines.append(f"\nPaired change on {p['benchmark']} {p['metric']}, {label(p['model'], run, cfg, cwd)} minus "
                         f"{label(p['baseline'], run, cfg, cwd)}: {100 * p['difference']:+.1f} ± {100 * p['stderr']:.1f} points "
                         f"(n = {p['n']}, {p['better']} better, {p['worse']} worse).")
        lines += ["", f"![forgetting]({pngs['forgetting']})", ""]

    lines += ["## Reflections before vs after training", ""]
    groups = pair_outcomes(base, trained)
    total = sum(len(v) for v in groups.values())
    if not total:
        lines += ["No query that both models failed at first has per-query records "
                  f"(rerun `python -m r3.evaluate --run {run} --records`).", ""]
    else:
        lines += [f"Of the {total} queries both models failed at first: "
                  + "; ".join(f"{text}: {len(groups[key])}" for key, text in OUTCOMES) + ".", ""]
        for i, (key, a, b) in enumerate(pick_examples(groups, examples), 1):
            text = dict(OUTCOMES)[key]
            lines += [f"### Example {i} ({text})", "", "Query:", "", fenced(json.dumps(a["example"], ensure_ascii=False)), ""]
            for name, rec in (("untrained", a), ("trained", b)):
                verdict = "passed" if rec.get("retry_correct") else "failed"
                lines += [f"**{name}**, first attempt (failed):", "", fenced(rec["attempt"]), "",
                          "reflection:", "", fenced(rec["reflection"]), "",
                          f"retry ({verdict}):", "", fenced(rec.get("retry", "")), ""]
    lines += _prompt_lines(ev)
    return "\n".join(lines).rstrip() + "\n"


def plot_accuracy(ev: dict, out: Path) -> Path:
    plt = pyplot()
    base, trained = ev["models"][0], ev["models"][1]
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, (name, m) in enumerate((("untrained", base), ("trained", trained))):
        xs = [0 + 0.38 * j, 1 + 0.38 * j]
        ax.bar(xs, [100 * m["first_attempt_accuracy"], 100 * m["second_attempt_accuracy"]], width=0.36,
               yerr=[100 * m["first_attempt_stderr"], 100 * m["second_attempt_stderr"]], capsize=4, label=name)
    ax.set_xticks([0.19, 1.19], ["first attempt", "after reflect + retry"])
    ax.set_ylabel(f"accuracy (%), n = {base['n']}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_lengths(lens: dict[str, list[int]], limit: int | None, out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max([limit or 0] + [max(v) for v in lens.values() if v])
    width = max(1, (top + 1) // 24)
    bins = range(0, max(top, 1) + width, width)  # (up to the first edge at or past top: the longest is counted)
    for name, v in lens.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (n = {len(v)})")
    if limit:
        ax.axvline(limit, color="k", ls="--", lw=1, label="limit")
    ax.set_xlabel("reflection length (tokens)")
    ax.set_ylabel("reflections")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


def plot_forgetting(fg: dict, run: Path, cfg: dict, out: Path) -> Path:
    plt = pyplot()
    keys = list(dict.fromkeys((r["benchmark"], r["metric"]) for r in fg["results"]))
    models = list(dict.fromkeys(r["model"] for r in fg["results"]))
    by = {(r["benchmark"], r["metric"], r["model"]): r for r in fg["results"]}
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(keys)), 4))
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        xs = [i + width * j for i in range(len(keys))]
        rows = [by.get((b, k, m)) for b, k in keys]
        ax.bar(xs, [100 * r["score"] if r else 0 for r in rows], width=width * 0.95,
               yerr=[100 * r["stderr"] if r else 0 for r in rows], capsize=3, label=label(m, run, cfg, fg.get("cwd")))
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(keys))],
                  [f"{b}\n{k.split(',')[0]}" for b, k in keys], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def write_report(run: Path, evaluation: Path, forgetting: Path | None, out: Path, examples: int = 4) -> Path:
    """Read the run and its evaluations, write ``out/report.md`` and its PNGs; returns the page."""
    cfg = read_run_config(run, ("model", "task", "task_options"))
    ev = read_evaluation(evaluation, run)
    fg = relocated(read_forgetting(forgetting), ev, run) if forgetting is not None else None
    metrics = read_metrics(run) if (run / "metrics.jsonl").is_file() else None
    pngs = {"accuracy": "accuracy.png", "curves": "curves.png", "reflection_length": "reflection_length.png",
            "forgetting": "forgetting.png"}
    text = render(run, cfg, ev, metrics, fg, pngs, examples)  # (before any file: bad input writes nothing)
    plot_accuracy(ev, out / pngs["accuracy"])
    if metrics:
        plot_curves([run], out / pngs["curves"])
    lens = {name: reflection_lengths(m) for name, m in zip(("untrained", "trained"), ev["models"][:2])}
    if all(lens.values()):
        limit = ev.get("settings", {}).get("max_reflection_tokens") or cfg.get("max_reflection_tokens")
        plot_lengths(lens, limit, out / pngs["reflection_length"])
    if fg is not None:
        plot_forgetting(fg, run, cfg, out / pngs["forgetting"])
    page = out / "report.md"
    write_text_atomic(page, text)
    return page


@cli_main
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m r3.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="an r3.train output directory")
    ap.add_argument("--eval", type=Path, default=None,
                    help="r3.evaluate --run RUN --records output (default: RUN/evaluation.json)")
    ap.add_argument("--forgetting", type=Path, default=None, help="r3.forgetting --run RUN output")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: RUN/report)")
    ap.add_argument("--examples", type=int, default=4, help="reflections before vs after to show")
    args = ap.parse_args(argv)
    positive_int("--examples", args.examples)
    out = args.out or args.run / "report"
    if out.exists() and not out.is_dir():
        raise R3Error(f"--out {out}: exists and is not a directory")
    check_out_path(str(out / "report.md"), "--out")  # (writable: a read-only place fails before anything)
    page = write_report(args.run, args.eval or args.run / "evaluation.json", args.forgetting, out, args.examples)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
