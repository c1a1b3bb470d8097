"""r3.report: the paper's page from a run, its evaluation and its forgetting numbers (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r3 import report as R
from r3.errors import R3Error


def record(i, first_ok, retry_ok=None, n_tokens=10, attempt="1 + 2 = 4"):
    rec = {"example": {"id": f"q{i}", "nums": [1, 2], "target": 3}, "attempt": attempt, "attempt_correct": first_ok}
    if not first_ok:
        rec.update(reflection=f"reflection {i} with ``` inside", reflection_tokens=n_tokens,
                   retry=f"retry {i}", retry_correct=retry_ok)
    return rec


def model_result(name, records):
    n = len(records)
    first = [r["attempt_correct"] for r in records]
    second = [r["attempt_correct"] or bool(r.get("retry_correct")) for r in records]
    return {"model": name, "n": n, "first_correct": first, "second_correct": second,
            "first_attempt_accuracy": sum(first) / n, "second_attempt_accuracy": sum(second) / n,
            "first_attempt_stderr": 0.1, "second_attempt_stderr": 0.15, "records": records}


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({
        "model": "smollm2-135m", "task": "countdown-tiny", "task_options": {}, "lr": 1.5e-5, "batch_size": 8,
        "group_size": 8, "max_attempt_tokens": 48, "max_reflection_tokens": 96, "max_retry_tokens": 48, "seed": 0}))
    rows = [{"step": s + 1, "retry_success": 0.01 * (s + 1), "first_try_success": 0.1, "groups_with_signal": s % 2,
             "reflection_len_mean": 90.0, "kl": 0.001, "loss": 0.0, "step_time_s": 30.0} for s in range(20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # queries 0-5 failed by both; outcomes: trained-only x2, untrained-only x1, both x1, neither x2
    base = [record(0, False, False, 96), record(1, False, False, 96), record(2, False, True, 50),
            record(3, False, True, 40), record(4, False, False, 96), record(5, False, False, 20),
            record(6, True), record(7, False, False, 60)]
    trained = [record(0, False, True, 30), record(1, False, True, 40), record(2, False, False, 50),
               record(3, False, True, 60), record(4, False, False, 96), record(5, False, False, 70),
               record(6, True), record(7, True)]
    ev = {"run": str(run), "n": 8, "settings": {"split": "test", "temperature": 0.0, "dtype": "bf16",
                                                 "max_reflection_tokens": 96},
          "models": [model_result("smollm2-135m", base), model_result(str(run / "export"), trained)],
          "paired": [{"model": str(run / "export"), "baseline": "smollm2-135m",
                      "first_attempt": {"mean": 0.125, "stderr": 0.125, "n": 8, "better": 1, "worse": 0},
                      "second_attempt": {"mean": 0.25, "stderr": 0.16, "n": 8, "better": 3, "worse": 1}}]}
    (run / "evaluation.json").write_text(json.dumps(ev))
    fg = {"results": [{"model": "smollm2-135m", "benchmark": "gsm8k", "metric": "exact_match,strict-match",
                       "score": 0.02, "stderr": 0.01, "n": 50},
                      {"model": str(run / "export"), "benchmark": "gsm8k", "metric": "exact_match,strict-match",
                       "score": 0.04, "stderr": 0.014, "n": 50}],
          "paired": [{"model": str(run / "export"), "baseline": "smollm2-135m", "benchmark": "gsm8k",
                      "metric": "exact_match,strict-match", "difference": 0.02, "stderr": 0.02, "n": 50,
                      "better": 2, "worse": 1}],
          "settings": {"chat": False, "dtype": "bf16"}}
    (run / "forgetting.json").write_text(json.dumps(fg))
    return run


def test_report_page_numbers_and_files(run):
    page = R.write_report(run, run / "evaluation.json", run / "forgetting.json", run / "report", examples=5)
    text = page.read_text()
    out = run / "report"
    for png in ("accuracy.png", "curves.png", "reflection_length.png", "forgetting.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in text
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    # the paper's table: 2/8 and 3/8 -> 3/8 ... computed by hand
    assert "| untrained | 12.5 ± 10.0 | 37.5 ± 15.0 | +25.0 |" in text
    assert "| trained | 25.0 ± 10.0 | 62.5 ± 15.0 | +37.5 |" in text
    assert "after the retry (same 8 queries): +25.0 ± 16.0 points (3 better, 1 worse)" in text
    # training: first 10 steps' retry success 0.01..0.10 -> mean 0.055; last 10: 0.11..0.20 -> 0.155
    assert "retry success (the reward): 0.055 -> 0.155" in text and "20 steps, 10.0 minutes" in text
    # reflection lengths: untrained 7 reflections [96,96,50,40,96,20,60] mean 65.4, median 60, 3/7 at 96
    assert "| untrained | 7 | 65.4 ± " in text and "| 60 | 43% |" in text
    # trained 6 reflections [30,40,50,60,96,70]: mean 57.7, median 55, 1/6 at the limit
    assert "| trained | 6 | 57.7 ± " in text and "| 55 | 17% |" in text
    # forgetting rows labelled by role, the paired change in points
    assert "| gsm8k | exact_match,strict-match | untrained | 2.0 ± 1.0 | 50 |" in text
    assert "trained minus untrained: +2.0 ± 2.0 points (n = 50, 2 better, 1 worse)" in text
    # outcomes counted over the 6 queries both failed at first (query 7: the trained model passed)
    assert ("Of the 6 queries both models failed at first: only the trained model's retry passed: 2; only the "
            "untrained model's retry passed: 1; both retries passed: 1; neither retry passed: 2.") in text
    heads = [line for line in text.splitlines() if line.startswith("### Example")]
    assert heads == ["### Example 1 (only the trained model's retry passed)",
                     "### Example 2 (only the untrained model's retry passed)", "### Example 3 (both retries passed)",
                     "### Example 4 (neither retry passed)", "### Example 5 (only the trained model's retry passed)"]
    # texts holding ``` are fenced with a longer fence
    assert "````\nreflection 0 with ``` inside\n````" in text


def test_paths_recorded_relative_to_where_their_command_ran(run, tmp_path, monkeypatch):
    """`cd work && python -m r3.evaluate --run runs/r3` recorded "runs/r3"; a report made from
    another directory refused it as another run, and labelled forgetting rows by path."""
    for name in ("evaluation.json", "forgetting.json"):
        doc = json.loads((run / name).read_text().replace(str(run), "run"))
        doc["cwd"] = str(tmp_path)
        (run / name).write_text(json.dumps(doc))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = R.write_report(run, run / "evaluation.json", run / "forgetting.json", run / "report").read_text()
    assert "| gsm8k | exact_match,strict-match | trained | 4.0 ± 1.4 | 50 |" in text
    assert "trained minus untrained: +2.0 ± 2.0 points" in text
    # a run copied elsewhere with its files: recorded "run" from a cwd that no longer holds it,
    # read from here
    monkeypatch.chdir(tmp_path)
    for name in ("evaluation.json", "forgetting.json"):
        doc = json.loads((run / name).read_text())
        doc["cwd"] = "/nowhere/else"
        (run / name).write_text(json.dumps(doc))
    text = R.write_report(Path("run"), run / "evaluation.json", run / "forgetting.json", run / "report").read_text()
    assert "| gsm8k | exact_match,strict-match | trained | 4.0 ± 1.4 | 50 |" in text
    monkeypatch.chdir(elsewhere)
    doc = json.loads((run / "evaluation.json").read_text())
    del doc["cwd"]  # (a file from before r3 recorded where it ran: read from here, as before)
    (run / "evaluation.json").write_text(json.dumps(doc))
    with pytest.raises(R3Error, match="evaluates the run run, not "):
        R.write_report(run, run / "evaluation.json", None, run / "report2")


def test_a_run_moved_with_its_evaluation_is_recognised_by_its_export(run, tmp_path):
    """Renaming a run directory (``mv runs/r3 runs/r3-lr1e5``) made r3.report refuse its own
    evaluation ("evaluates the run runs/r3, not runs/r3-lr1e5"), so a rename meant evaluating again.
    The evaluation lies in the run and records its export's files (size and modification time,
    which ``mv`` keeps): that run, moved, is reported, its forgetting rows still "trained". An
    export rewritten since, or the file outside the run, is still refused."""
    import os

    from r3.partial_results import model_files

    ev = json.loads((run / "evaluation.json").read_text())
    ev["export_files"] = model_files(str(run / "export"))["files"]
    (run / "evaluation.json").write_text(json.dumps(ev))
    moved = tmp_path / "renamed"
    os.rename(run, moved)
    text = R.write_report(moved, moved / "evaluation.json", moved / "forgetting.json", moved / "report").read_text()
    assert "| gsm8k | exact_match,strict-match | trained | 4.0 ± 1.4 | 50 |" in text
    assert "trained minus untrained: +2.0 ± 2.0 points" in text
    assert "| trained | 25.0 ± 10.0 | 62.5 ± 15.0 | +37.5 |" in text

    outside = tmp_path / "evaluation.json"
    outside.write_text((moved / "evaluation.json").read_text())
    with pytest.raises(R3Error, match=f"evaluates the run {run}, not {moved}; evaluate it with"):
        R.write_report(moved, outside, None, moved / "report2")
    (moved / "export" / "config.json").write_text('{"retrained": true}')  # (more training rewrote the export)
    with pytest.raises(R3Error, match=f"evaluates the run {run}, not {moved}"):
        R.write_report(moved, moved / "evaluation.json", None, moved / "report3")


def test_an_evaluation_of_an_export_rewritten_since_is_refused(run):
    """A run resumed for more steps after its evaluation rewrites its export: the report put the
    earlier export's numbers under the longer run's training, without a word. The evaluation
    records the export's files (size and modification time): where they changed, the report
    refuses it with the command that evaluates the export as it is; an evaluation that recorded
    none (older r3), or an export that is gone, is read as before."""
    import os

    from r3.partial_results import model_files

    ev = json.loads((run / "evaluation.json").read_text())
    ev["export_files"] = model_files(str(run / "export"))["files"]
    (run / "evaluation.json").write_text(json.dumps(ev))
    assert R.write_report(run, run / "evaluation.json", None, run / "report").is_file()  # (the same export)
    weights = run / "export" / "config.json"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # (rewritten: same size, later)
    with pytest.raises(R3Error) as e:
        R.write_report(run, run / "evaluation.json", None, run / "report2")
    assert str(e.value) == (f"{run / 'evaluation.json'}: evaluates an earlier export of {run} (rewritten since, by "
                            f"more training or a resume: config.json); evaluate it again with python -m r3.evaluate "
                            f"--run {run} --records")
    assert not (run / "report2").exists()
    del ev["export_files"]  # (older r3 recorded no files: nothing to compare)
    (run / "evaluation.json").write_text(json.dumps(ev))
    assert R.write_report(run, run / "evaluation.json", None, run / "report3").is_file()


def test_pick_examples_takes_each_outcome_in_turn():
    groups = {"trained_only": ["t1", "t2", "t3"], "untrained_only": [], "both": ["b1"], "neither": ["n1", "n2"]}
    groups = {k: [(x, x) for x in v] for k, v in groups.items()}
    keys = [(k, a) for k, a, _ in R.pick_examples(groups, 5)]
    assert keys == [("trained_only", "t1"), ("both", "b1"), ("neither", "n1"), ("trained_only", "t2"),
                    ("neither", "n2")]
    assert len(R.pick_examples(groups, 100)) == 6 and R.pick_examples({k: [] for k in groups}, 3) == []


def test_report_without_records_or_forgetting_says_what_is_missing(run):
    ev = json.loads((run / "evaluation.json").read_text())
    for m in ev["models"]:
        del m["records"]
    (run / "evaluation.json").write_text(json.dumps(ev))
    (run / "metrics.jsonl").unlink()
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert "Not measured: run `python -m r3.forgetting" in text
    assert text.count(f"rerun `python -m r3.evaluate --run {run} --records`") == 2
    assert "No `metrics.jsonl`" in text
    assert sorted(p.name for p in (run / "report").iterdir()) == ["accuracy.png", "report.md"]


@pytest.mark.parametrize("change, message", [
    (lambda run: (run / "evaluation.json").unlink(), "missing: make it with python -m r3.evaluate --run"),
    (lambda run: (run / "evaluation.json").write_text("[1, 2"), "evaluation.json: unreadable"),
    (lambda run: (run / "evaluation.json").write_text('{"models": [{"model": "m"}]}'), "needs two evaluated models"),
    (lambda run: (run / "evaluation.json").write_text(
        (run / "evaluation.json").read_text().replace(str(run), "/elsewhere/run")), "evaluates the run /elsewhere/run"),
    (lambda run: (run / "forgetting.json").write_text('{"results": [{"model": "m"}]}'), "results[0] is not a"),
    (lambda run: (run / "forgetting.json").write_text('{"results": [], "paired": []}'), "forgetting.json: no results"),
    (lambda run: (run / "config.json").unlink(), "config.json: missing"),
    # records and numbers of another shape: a ValueError/TypeError after the PNGs were written
    (lambda run: _edit_eval(run, lambda ev: ev["models"][0]["records"][0].update(reflection_tokens="x")),
     "models[0].records[0].reflection_tokens is 'x', not a token count"),
    (lambda run: _edit_eval(run, lambda ev: ev["models"][1].update(records=5)), "models[1].records is not a list"),
    (lambda run: _edit_eval(run, lambda ev: ev["models"][0].update(first_attempt_accuracy="x")),
     "models[0].first_attempt_accuracy is 'x', not a number"),
    (lambda run: _edit_eval(run, lambda ev: ev["models"][1]["records"][2].update(reflection_tokens=49.5)),
     "models[1].records[2].reflection_tokens is 49.5, not a token count"),
    (lambda run: _edit_eval(run, lambda ev: ev["models"][1].update(second_attempt_stderr=True)),
     "models[1].second_attempt_stderr is True, not a number"),
    (lambda run: _edit_eval(run, lambda ev: ev["models"][1].update(n=7)),
     "the two models were evaluated on different numbers of queries"),
])
def test_report_bad_input_is_one_line(run, capsys, change, message):
    change(run)
    with pytest.raises(SystemExit) as e:
        R.main([str(run), "--forgetting", str(run / "forgetting.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not (run / "report").exists()  # (nothing written: no page, no PNGs)


def _edit_eval(run, edit):
    ev = json.loads((run / "evaluation.json").read_text())
    edit(ev)
    (run / "evaluation.json").write_text(json.dumps(ev))


def test_report_into_a_place_it_cannot_write_is_one_line(run, capsys, monkeypatch):
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit) as e:
        R.main([str(run), "--out", str(run / "rep")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--out {run / 'rep' / 'report.md'}: cannot write in {run} (Read-only" in err
    assert err.count("\n") == 1 and not (run / "rep").exists()


def test_report_cli_writes_the_page(run, capsys):
    assert R.main([str(run), "--out", str(run / "rep"), "--examples", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "rep" / "report.md")
    assert Path(run / "rep" / "report.md").read_text().count("### Example") == 1


def test_length_errors_and_pair_outcomes_by_hand():
    """The reflection-length standard error is the sample sd over sqrt(n); only queries both
    models failed at first are grouped, by which retry passed."""
    import math

    s = R.length_summary([1, 3, 5, 7], None)
    assert s["mean"] == 4 and s["stderr"] == pytest.approx(math.sqrt(20 / 3) / 2) and s["median"] == 4

    def rec(first, retry=None):
        return {"attempt_correct": first, **({} if retry is None else {"reflection": "r", "retry_correct": retry})}

    untrained = {"records": [rec(True), rec(False, True), rec(False, False), rec(False, True), rec(False, False)]}
    trained = {"records": [rec(False, True), rec(True), rec(False, True), rec(False, True), rec(False, False)]}
    groups = R.pair_outcomes(untrained, trained)
    assert {k: len(v) for k, v in groups.items()} == {"trained_only": 1, "untrained_only": 0, "both": 1, "neither": 1}


def test_plot_bars_show_each_models_accuracies_and_scores(tmp_path, monkeypatch):
    """The PNGs' bars: each model's first- and second-attempt accuracy with its own standard error,
    and each forgetting score under its benchmark, in percent."""
    figures = []
    monkeypatch.setattr(R, "save_figure", lambda fig, out: figures.append(fig) or out)

    def bars(fig):
        ax = fig.axes[0]
        return [(round(p.get_x() + p.get_width() / 2, 2), round(p.get_height(), 6)) for p in ax.patches]

    def err(fig):  # the error bars' half-lengths, in the bars' order
        ax = fig.axes[0]
        return [round((seg[1][1] - seg[0][1]) / 2, 6) for c in ax.containers if hasattr(c, "errorbar")
                for seg in c.errorbar.lines[2][0].get_segments()]

    ev = {"models": [
        {"n": 50, "first_attempt_accuracy": 0.2, "second_attempt_accuracy": 0.3, "first_attempt_stderr": 0.01,
         "second_attempt_stderr": 0.02},
        {"n": 50, "first_attempt_accuracy": 0.4, "second_attempt_accuracy": 0.7, "first_attempt_stderr": 0.03,
         "second_attempt_stderr": 0.04}]}
    R.plot_accuracy(ev, tmp_path / "a.png")
    # untrained at 0 and 1, trained beside each
    assert bars(figures[-1]) == [(0.0, 20.0), (1.0, 30.0), (0.38, 40.0), (1.38, 70.0)]
    assert err(figures[-1]) == [1.0, 2.0, 3.0, 4.0]
    fg = {"results": [
        {"benchmark": "gsm8k", "metric": "exact_match,strict", "model": "base", "score": 0.25, "stderr": 0.02},
        {"benchmark": "gsm8k", "metric": "exact_match,strict", "model": "export", "score": 0.2, "stderr": 0.02},
        {"benchmark": "hellaswag", "metric": "acc_norm,none", "model": "base", "score": 0.5, "stderr": 0.01},
        {"benchmark": "hellaswag", "metric": "acc_norm,none", "model": "export", "score": 0.45, "stderr": 0.01}]}
    R.plot_forgetting(fg, tmp_path, {}, tmp_path / "f.png")
    assert bars(figures[-1]) == [(0.0, 25.0), (1.0, 50.0), (0.4, 20.0), (1.4, 45.0)]
    labels = [t.get_text() for t in figures[-1].axes[0].get_xticklabels()]
    assert labels == ["gsm8k\nexact_match", "hellaswag\nacc_norm"]
    # the reflection lengths: one histogram per model holding each of its lengths once, the limit line
    R.plot_lengths({"untrained": [96, 96, 50, 40, 96, 20, 60], "trained": [30, 40, 50, 60, 96, 70]}, 96,
                   tmp_path / "l.png")
    ax = figures[-1].axes[0]
    series = list(ax.containers)
    assert [round(sum(p.get_height() for p in c)) for c in series] == [7, 6]
    assert [c[-1].get_height() for c in series] == [3, 1]  # (the last bin ends at the limit: the 96s)
    assert series[0][-1].get_x() + series[0][-1].get_width() == 96
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["untrained (n = 7)", "trained (n = 6)", "limit"]
    assert [list(line.get_xdata()) for line in ax.lines] == [[96, 96]]


def test_the_paired_change_printed_is_the_exports(run):
    """An evaluation with a third model lists that model's paired change too; the page's "trained
    minus untrained" line is the export's, wherever it sits in the list."""
    ev = json.loads((run / "evaluation.json").read_text())
    other = {"model": "other-model", "baseline": "smollm2-135m",
             "first_attempt": {"mean": -0.5, "stderr": 0.2, "n": 8, "better": 0, "worse": 4},
             "second_attempt": {"mean": -0.375, "stderr": 0.18, "n": 8, "better": 0, "worse": 3}}
    ev["models"].append(dict(ev["models"][1], model="other-model"))
    ev["paired"].insert(0, other)
    (run / "evaluation.json").write_text(json.dumps(ev))
    text = R.write_report(run, run / "evaluation.json", run / "forgetting.json", run / "report").read_text()
    assert "after the retry (same 8 queries): +25.0 ± 16.0 points (3 better, 1 worse)" in text
    assert "-50.0" not in text and "-37.5" not in text


def test_report_settings_verdicts_and_each_models_own_attempt(run):
    """The limit the evaluation ran with (not the run's), greedy vs sampled, each example's retry
    verdict per model, and each model's own first attempt."""
    ev = json.loads((run / "evaluation.json").read_text())
    ev["settings"]["max_reflection_tokens"] = 60  # (evaluated with --max-reflection-tokens 60)
    for i, r in enumerate(ev["models"][1]["records"]):
        r["attempt"] = f"trained attempt {i}"
    (run / "evaluation.json").write_text(json.dumps(ev))
    text = R.write_report(run, run / "evaluation.json", None, run / "report", examples=1).read_text()
    assert "| model | reflections | mean | median | at the 60-token limit |" in text
    assert "temperature 0.0 (greedy)" in text
    example = text.split("### Example 1 (only the trained model's retry passed)")[1]
    untrained, trained = example.split("**trained**")
    assert "1 + 2 = 4" in untrained and "retry (failed):" in untrained and "retry (passed)" not in untrained
    assert "trained attempt 0" in trained and "retry (passed):" in trained and "retry (failed)" not in trained
    ev["settings"]["temperature"] = 0.7
    (run / "evaluation.json").write_text(json.dumps(ev))
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert "temperature 0.7 (sampled)" in text


def test_training_summary_windows_and_steps_without_a_value():
    """Early vs late: the first and last 10 steps at most; a metric a step did not log (KL on a
    step that trained no token) is left out of the mean, not counted as 0."""
    rows = [{"step": s, "retry_success": float(s), "kl": float(s) if s % 2 == 0 else None, "step_time_s": 1.0}
            for s in range(1, 41)]
    t = R.training_summary(rows)
    assert t["window"] == 10 and t["steps"] == 40 and t["step_time_s"] == 40.0
    assert (t["retry_success_early"], t["retry_success_late"]) == (5.5, 35.5)
    assert (t["kl_early"], t["kl_late"]) == (6.0, 36.0)
    assert t["first_try_success_early"] is None  # (never logged: n/a on the page)


def test_forgetting_rows_of_another_model_keep_its_name(run):
    cfg = json.loads((run / "config.json").read_text())
    assert R.label("smollm2-135m", run, cfg) == "untrained"
    assert R.label(str(run / "export"), run, cfg) == "trained"
    assert R.label("Qwen/Qwen3-1.7B", run, cfg) == "Qwen/Qwen3-1.7B"


def test_reflection_lengths_of_one_model_only_are_not_plotted(run):
    """Records for the untrained model but not the trained one: the page says the lengths are not
    available and no histogram is drawn (plotting one model's None was a TypeError)."""
    ev = json.loads((run / "evaluation.json").read_text())
    del ev["models"][1]["records"]
    (run / "evaluation.json").write_text(json.dumps(ev))
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert "Not available: the evaluation has no per-query records" in text
    assert not (run / "report" / "reflection_length.png").exists()


def test_length_histogram_keeps_every_length_whatever_the_limit(tmp_path, monkeypatch):
    """The bins reach past the longest length for any limit (a limit of 47 tokens: bins of 2;
    the 47s were dropped when the last edge was 46)."""
    figures = []
    monkeypatch.setattr(R, "save_figure", lambda fig, out: figures.append(fig) or out)
    for limit in (47, 96, 100):
        R.plot_lengths({"untrained": [limit, 10, limit], "trained": [limit - 1, 5]}, limit, tmp_path / "l.png")
        assert [round(sum(p.get_height() for p in c)) for c in figures[-1].axes[0].containers] == [3, 2], limit


def test_length_histogram_keeps_the_reflections_at_a_power_of_two_limit(tmp_path, monkeypatch):
    """The reflections cut at the limit are in the histogram for the usual limits too (128, 256,
    512 tokens: bins of 5, 10 and 21 ended at 125, 250 and 504, so every reflection at the limit,
    the ones the table counts as cut short, was left out of the picture)."""
    figures = []
    monkeypatch.setattr(R, "save_figure", lambda fig, out: figures.append(fig) or out)
    for limit in (73, 128, 256, 512, 1024):
        R.plot_lengths({"untrained": [limit, 10, limit, limit - 1], "trained": [limit, 5]}, limit, tmp_path / "l.png")
        assert [round(sum(p.get_height() for p in c)) for c in figures[-1].axes[0].containers] == [4, 2], limit
    R.pyplot().close("all")  # (figures kept from save_figure: closed, as save_figure would)


def test_training_summary_of_a_short_run_compares_halves_and_names_the_last_step():
    """A run of 6 steps compares its first 3 with its last 3 (windows of 6 would both be the whole
    run, early = late); the step count is the last step logged (a log starting at step 5 reached
    step 10, not 6 steps)."""
    rows = [{"step": s, "retry_success": float(s)} for s in range(1, 7)]
    t = R.training_summary(rows)
    assert t["window"] == 3 and (t["retry_success_early"], t["retry_success_late"]) == (2.0, 5.0)
    t = R.training_summary([{"step": s, "retry_success": 0.5} for s in range(5, 11)])
    assert t["steps"] == 10


def test_forgetting_bars_error_bars_are_in_percent(tmp_path, monkeypatch):
    """The forgetting bars' error bars are in percent like the scores (a standard error of 0.02
    drawn as 0.02 points would vanish under a 25% bar)."""
    figures = []
    monkeypatch.setattr(R, "save_figure", lambda fig, out: figures.append(fig) or out)
    fg = {"results": [
        {"benchmark": "gsm8k", "metric": "exact_match,strict", "model": "base", "score": 0.25, "stderr": 0.02},
        {"benchmark": "gsm8k", "metric": "exact_match,strict", "model": "export", "score": 0.2, "stderr": 0.03}]}
    R.plot_forgetting(fg, tmp_path, {}, tmp_path / "f.png")
    ax = figures[-1].axes[0]
    half = [round((seg[1][1] - seg[0][1]) / 2, 6) for c in ax.containers if hasattr(c, "errorbar")
            for seg in c.errorbar.lines[2][0].get_segments()]
    assert half == [2.0, 3.0]
    R.pyplot().close("all")  # (figures kept from save_figure: closed, as save_figure would)


@pytest.mark.parametrize("change, message", [
    # an evaluation without "run" (older r3): its second model must be the run's export
    (lambda run: _edit_eval(run, lambda ev: (ev.pop("run"), ev["models"][1].update(model="other-model"))),
     "its second model is other-model, not"),
    (lambda run: _edit_eval(run, lambda ev: ev["models"][0]["records"][1].update(reflection_tokens=True)),
     "models[0].records[1].reflection_tokens is True, not a token count"),
    (lambda run: _edit_eval(run, lambda ev: ev["models"][1].pop("second_correct")),
     "models[1] has no 'second_correct' (not an r3.evaluate output?)"),
])
def test_report_refuses_an_evaluation_of_another_model_or_shape(run, capsys, change, message):
    """What would put another model's numbers under "trained", count a boolean as a token, or read
    a file that is not an r3.evaluate output is one line, exit 2, nothing written."""
    change(run)
    with pytest.raises(SystemExit) as e:
        R.main([str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (run / "report").exists()


def test_a_failed_query_one_model_did_not_reflect_on_is_left_out_of_the_pairs(run):
    """A record whose first attempt failed but that holds no reflection (a hand-made or cut
    evaluation) is no pair to show: it is not counted, and the page is still written (it was a
    KeyError on the missing reflection)."""
    def edit(ev):
        for k in ("reflection", "reflection_tokens", "retry", "retry_correct"):
            ev["models"][1]["records"][0].pop(k)
    _edit_eval(run, edit)
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert "Of the 5 queries both models failed at first: only the trained model's retry passed: 1;" in text


def test_the_length_histogram_marks_the_limit_the_evaluation_ran_with(run, monkeypatch):
    """The histogram's limit line is the evaluation's ``max_reflection_tokens`` (as the table's
    column), not the training run's; the accuracy chart names its number of queries."""
    figures = []
    monkeypatch.setattr(R, "save_figure", lambda fig, out: figures.append(fig) or out)
    _edit_eval(run, lambda ev: ev["settings"].update(max_reflection_tokens=60))
    R.write_report(run, run / "evaluation.json", None, run / "report")
    (lengths,) = [f.axes[0] for f in figures if f.axes[0].get_xlabel() == "reflection length (tokens)"]
    assert [list(line.get_xdata()) for line in lengths.lines] == [[60, 60]]
    (accuracy,) = [f.axes[0] for f in figures if f.axes[0].get_ylabel().startswith("accuracy")]
    assert accuracy.get_ylabel() == "accuracy (%), n = 8"
    R.pyplot().close("all")  # (figures kept from save_figure: closed, as save_figure would)


def test_the_page_says_how_the_evaluation_judged_cut_answers_and_the_runs_rule_where_another(run):
    """The evaluation's ``cut_answers`` is on the page beside its other settings, with the run's
    own rule where ``r3.evaluate --cut-answers`` overrode it; the training line says the run's
    rule (a run from before the option judged); an evaluation of older r3 (no key) adds nothing."""
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    training = next(line for line in text.splitlines() if line.startswith("- training:"))
    assert training.endswith("; answers the token limit cut off were judged as they stood (cut_answers: judge)")
    assert text.count("cut_answers") == 1 and "cut-off answers" not in text
    ev = json.loads((run / "evaluation.json").read_text())
    ev["settings"]["cut_answers"] = "fail"
    (run / "evaluation.json").write_text(json.dumps(ev))
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert ", cut-off answers failed (cut_answers fail; the run trained with judge)" in text
    assert "(cut_answers: fail)" not in text
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "cut_answers": "fail"}))
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert ", cut-off answers failed (cut_answers fail)\n" in text
    training = next(line for line in text.splitlines() if line.startswith("- training:"))
    assert training.endswith("; answers the token limit cut off failed (cut_answers: fail)")


def test_the_page_names_a_presets_options_in_effect_and_its_prompts(run):
    """A preset's run records ``task_options: {}``; the page shows the options the evaluation ran
    the task with and its prompts verbatim (a fence longer than the backticks inside)."""
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert "- task: `countdown-tiny`, options `{}`\n" in text and "## The task's prompts" not in text
    ev = json.loads((run / "evaluation.json").read_text())
    ev["task_config"] = {"difficulty": "easy", "ops": "+-", "data_path": None, "system_prompt": None,
                         "prompt_template": "Make {target} from {nums}.",
                         "retry_prompt": "Now try again with ``` fences."}
    (run / "evaluation.json").write_text(json.dumps(ev))
    text = R.write_report(run, run / "evaluation.json", None, run / "report").read_text()
    assert "- task: `countdown-tiny`, options `{}`; in effect `difficulty=easy, ops=+-`\n" in text
    prompts = text.split("## The task's prompts")[1]
    assert "`prompt_template`:\n\n```\nMake {target} from {nums}.\n```" in prompts
    assert "`retry_prompt`:\n\n````\nNow try again with ``` fences.\n````" in prompts
    assert "system_prompt" not in prompts
    assert text.index("## The task's prompts") > text.index("### Example 1")
    ev["first_query_messages"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Make 3."}]
    (run / "evaluation.json").write_text(json.dumps(ev))
    prompts = R.write_report(run, run / "evaluation.json", None, run / "report").read_text().split(
        "## The task's prompts")[1]
    assert prompts.endswith("The first evaluation query's messages, before the chat template:\n\nsystem:\n\n```\n"
                            "Be brief.\n```\n\nuser:\n\n```\nMake 3.\n```\n")
