"""python -m r3.audit: every logged reward re-judged by the verifier and the independent re-check."""

from __future__ import annotations

import json

import pytest

from r3 import audit as A

OPTIONS = {"difficulty": "easy", "answer_tags": False, "min_count": 2, "max_count": 2, "max_num": 30,
           "max_target": 60}
EX = {"id": "x", "nums": [19, 17], "target": 36}


def make_run(tmp_path, samples, task="countdown", options=OPTIONS, **config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": task, "task_options": options, "model": "m", **config}))
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run


def sample(step, retry, reward, example=EX):
    return {"step": step, "rank": 0, "row": 0, "example": example, "attempt": "a", "reflection": "r",
            "retry": retry, "reward": reward, "reason": "logged"}


def run_main(argv, capsys):
    try:
        rc = A.main(argv)
    except SystemExit as e:
        rc = e.code
    return (rc, *capsys.readouterr())


def test_clean_run_passes(tmp_path, capsys):
    run = make_run(tmp_path, [sample(1, "So 19 + 17 = 36.", 1.0), sample(1, "19 - 17", 0.0),
                              sample(2, "**Answer:** 17 + 19", 1.0)])
    out = tmp_path / "audit.json"
    rc, stdout, err = run_main([str(run), "--out", str(out)], capsys)
    assert rc == 0, err
    assert "rewarded retries logged: 2 (steps 1-2)" in stdout
    assert "pass the independent re-check: 2/2 (100.0%)" in stdout
    assert "DISAGREEMENT" not in stdout and "17 + 19" in stdout  # the rewarded retries are shown
    data = json.loads(out.read_text())
    assert data["rewarded"] == 2 and data["rewarded_pass_recheck"] == 2 and data["disagreements"] == []


def test_a_wrong_reward_is_reported_and_fails(tmp_path, capsys):
    """A reward the old lenient reader paid (the written result is false) is caught."""
    run = make_run(tmp_path, [sample(1, "The answer is 19 + 17 = 26.", 1.0), sample(1, "19 + 17 = 36", 0.0)])
    rc, stdout, _ = run_main([str(run), "--show", "0"], capsys)
    assert rc == 1
    assert "pass the independent re-check: 0/1 (0.0%)" in stdout
    dis = [line for line in stdout.splitlines() if line.startswith("DISAGREEMENT")]
    assert len(dis) == 2  # the wrong reward, and the right answer that was not paid
    assert ("logged reward 1.0, verifier now False (the written result 26 is not the target 36), re-check False "
            "(the written value is not the target)") in dis[0]


def test_plugin_task_without_recheck(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    run = make_run(tmp_path, [sample(1, "anything", 0.0, {"id": "train-0", "word": "w"})],
                   task="r3_test_tasks:CoinTask", options={})
    rc, stdout, _ = run_main([str(run)], capsys)
    assert rc == 0 and "independent re-check: none for task" in stdout
    assert "unrewarded samples logged: 1\n" in stdout and "n/a" not in stdout  # (no re-check to name)
    import hashlib

    ex = {"id": "train-0", "word": "w"}  # a logged reward the coin's verifier refuses now
    wrong = next(t for t in (f"t{i}" for i in range(100)) if hashlib.sha256(("train-0" + t).encode()).digest()[0] % 2)
    (tmp_path / "2").mkdir()
    run = make_run(tmp_path / "2", [sample(1, wrong, 1.0, ex)], task="r3_test_tasks:CoinTask", options={})
    rc, stdout, _ = run_main([str(run)], capsys)
    assert rc == 1 and "logged reward 1.0, verifier now False (coin)\n" in stdout and "n/a" not in stdout
    assert "rewarded retries logged: 1 (step 1)" in stdout


@pytest.mark.parametrize("setup,pattern", [
    (lambda p: None, "no such run directory"),
    (lambda p: p.mkdir(), "config.json: missing"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "missing field 'task'"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"task": "countdown", "task_options": {}}')),
     "samples.jsonl: missing"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"task": "countdown", "task_options": {}}'),
                (p / "samples.jsonl").write_text('oops\n{"a": 1}\n')), "line 1: not valid JSON"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"task": "countdown", "task_options": {}}'),
                (p / "samples.jsonl").write_text('{"a": 1}\n')), "line 1: expected an object"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"task": "countdown", "task_options": {}}'),
                (p / "samples.jsonl").write_text('{"example": {}, "retry": "1 + 2"}\n')), "line 1: expected an object"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, setup, pattern):
    run = tmp_path / "run"
    setup(run)
    rc, _, err = run_main([str(run)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and pattern in lines[0], err


def test_a_cut_last_line_is_skipped(tmp_path, capsys):
    run = make_run(tmp_path, [sample(1, "19 + 17", 1.0)])
    with open(run / "samples.jsonl", "a") as f:
        f.write('{"step": 2, "retry": "cut\n\n')
    rc, stdout, err = run_main([str(run)], capsys)
    assert rc == 0 and "rewarded retries logged: 1" in stdout
    assert "skipping the last line, cut short by an interrupted write" in err


def test_a_reward_only_the_recheck_rejects_is_reported_and_fails(tmp_path, capsys, monkeypatch):
    """Where the verifier still pays a logged reward but the independent re-check does not (a
    verifier bug the re-check exists to catch), the audit counts it as failing, lists it, and
    exits 1; the counts keep the two judges apart."""
    real = A.recheck

    def stricter(task, example, text):  # (stands in for a verifier that pays what it should not)
        return (False, "re-check refuses") if "19 + 17 = 36" in text else real(task, example, text)

    monkeypatch.setattr(A, "recheck", stricter)
    run = make_run(tmp_path, [sample(1, "So 19 + 17 = 36.", 1.0), sample(2, "**Answer:** 17 + 19", 1.0)])
    out = tmp_path / "audit.json"
    rc, stdout, _ = run_main([str(run), "--out", str(out), "--show", "0"], capsys)
    assert rc == 1
    data = json.loads(out.read_text())
    assert (data["rewarded_pass_verifier"], data["rewarded_pass_recheck"], data["rewarded_failing"]) == (2, 1, 1)
    (dis,) = data["disagreements"]
    assert dis["verifier_now"] is True and dis["recheck"] is False and dis["retry"] == "So 19 + 17 = 36."
    assert "pass the verifier now:         2/2" in stdout and "pass the independent re-check: 1/2" in stdout


def test_show_prints_the_last_n_rewarded_retries_only(tmp_path, capsys):
    """``--show N``: the N latest rewarded retries, each with its reflection and reason; an
    unrewarded sample is never printed as rewarded; the default is 5."""
    rewarded = [dict(sample(s, "So 19 + 17 = 36.", 1.0), reflection=f"reflection {s}") for s in range(1, 8)]
    unrewarded = [dict(sample(s, "19 - 17", 0.0), reflection=f"not paid {s}") for s in range(1, 8)]
    run = make_run(tmp_path, [x for pair in zip(rewarded, unrewarded) for x in pair])
    rc, stdout, _ = run_main([str(run), "--show", "3"], capsys)
    assert rc == 0
    headers = [line for line in stdout.splitlines() if line.startswith("--- rewarded")]
    assert [h.split(",")[1].strip().split(":")[0] for h in headers] == ["step 5", "step 6", "step 7"]
    for s in (5, 6, 7):
        assert f"reflection: 'reflection {s}'" in stdout
    assert stdout.count("\nattempt: 'a'\n") == 3  # (the failed attempt, and why where the sample says)
    assert "'reflection 4'" not in stdout and "not paid" not in stdout and stdout.count("reason: logged") == 3
    rc, stdout, _ = run_main([str(run)], capsys)
    assert rc == 0 and sum(line.startswith("--- rewarded") for line in stdout.splitlines()) == 5
    rc, _, err = run_main([str(run), "--show", "-1"], capsys)  # (accepted, it showed none)
    assert rc == 2 and err.strip() == "error: --show must be >= 0, got -1"
    rewarded[6].update(attempt="19 + 17 = 36 and so on", attempt_reason="cut off at the token limit", attempt_cut=True)
    (tmp_path / "why").mkdir()
    run = make_run(tmp_path / "why", [x for pair in zip(rewarded, unrewarded) for x in pair])
    rc, stdout, _ = run_main([str(run), "--show", "1"], capsys)
    assert rc == 0 and "\nattempt (failed: cut off at the token limit): '19 + 17 = 36 and so on'\n" in stdout


def test_summary_names_the_step_span_and_the_unrewarded_samples_the_recheck_passes(tmp_path, capsys, monkeypatch):
    """The span is the first to the last logged step; the count of unrewarded samples is the
    independent re-check's (not the verifier's); an unpaid right answer alone is listed but is
    no wrong reward (exit 0)."""
    real = A.recheck
    monkeypatch.setattr(A, "recheck", lambda task, example, text: (False, "re-check refuses")
                        if text == "19 + 17 = 36" else real(task, example, text))
    run = make_run(tmp_path, [sample(1, "So 19 + 17 = 36.", 1.0), sample(3, "19 + 17 = 36", 0.0),
                              sample(3, "19 - 17", 0.0), sample(7, "**Answer:** 17 + 19", 1.0)])
    rc, stdout, _ = run_main([str(run), "--show", "0"], capsys)
    assert rc == 0
    assert "rewarded retries logged: 2 (steps 1-7)" in stdout
    assert "unrewarded samples logged: 2; the re-check passes 0 of them" in stdout
    (dis,) = [line for line in stdout.splitlines() if line.startswith("DISAGREEMENT")]
    assert dis.startswith("DISAGREEMENT step 3 row 0: logged reward 0.0, verifier now True")


def test_a_disagreement_names_its_rank(tmp_path, capsys):
    """Rows are numbered per rank: two ranks' rows 0 of one step are two samples, so a
    disagreement names its rank (rank 0 unnamed, as one-process runs have only it)."""
    rows = [sample(3, "19 + 17 = 36", 0.0), {**sample(3, "17 + 19 = 36", 0.0), "rank": 1}]
    rc, stdout, _ = run_main([str(make_run(tmp_path, rows)), "--show", "0", "--out", str(tmp_path / "a.json")], capsys)
    assert rc == 0
    dis = [line for line in stdout.splitlines() if line.startswith("DISAGREEMENT")]
    assert [d.split(":")[0] for d in dis] == ["DISAGREEMENT step 3 row 0", "DISAGREEMENT step 3 rank 1 row 0"]
    assert [d["rank"] for d in json.loads((tmp_path / "a.json").read_text())["disagreements"]] == [0, 1]


@pytest.mark.parametrize("reward", ['"1.0"', "null", "[1]", "NaN"])
def test_a_reward_that_is_not_a_number_is_bad_input(tmp_path, capsys, reward):
    """A logged reward that is not a number is a malformed file: one line and exit 2 (it was a
    TypeError traceback, whose exit status 1 reads as 'a wrong reward'; a NaN was counted
    neither rewarded nor unrewarded, so its retry went unchecked and the audit passed)."""
    run = make_run(tmp_path, [sample(1, "So 19 + 17 = 36.", 1.0)])
    with open(run / "samples.jsonl", "a") as f:
        f.write(json.dumps(sample(2, "19 + 17 = 26", 1.0)).replace('"reward": 1.0', f'"reward": {reward}') + "\n")
        f.write(json.dumps(sample(3, "17 + 19", 1.0)) + "\n")
    rc, _, err = run_main([str(run)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "line 2: the reward" in lines[0] and "not a number" in lines[0], err


def test_the_json_keeps_each_judges_counts_the_logged_reason_and_the_options(tmp_path, capsys):
    """``--out``: the verifier's count of a wrong reward is 0 of 1 (not one per sample read), an
    unpaid right answer is counted on the unrewarded side, each disagreement keeps the reason
    logged at training time, and the task options the run was judged with are written."""
    run = make_run(tmp_path, [sample(1, "The answer is 19 + 17 = 26.", 1.0), sample(2, "19 + 17 = 36", 0.0),
                              sample(2, "19 - 17", 0.0)])
    out = tmp_path / "audit.json"
    rc, stdout, _ = run_main([str(run), "--out", str(out), "--show", "0"], capsys)
    assert rc == 1 and "pass the verifier now:         0/1 (0.0%)" in stdout
    data = json.loads(out.read_text())
    assert (data["rewarded_pass_verifier"], data["unrewarded_pass_verifier"], data["rewarded_failing"]) == (0, 1, 1)
    assert [d["logged_reason"] for d in data["disagreements"]] == ["logged", "logged"]
    assert data["task"] == "countdown" and data["task_options"] == OPTIONS


def test_a_right_reward_of_a_task_without_recheck_passes(tmp_path, capsys, monkeypatch):
    """A plug-in task has no independent re-check: a reward its verifier still pays is no failure
    (exit 0, no disagreement); only the verifier judges it."""
    import hashlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    ex = {"id": "train-0", "word": "w"}
    right = next(t for t in (f"t{i}" for i in range(100))
                 if not hashlib.sha256(("train-0" + t).encode()).digest()[0] % 2)
    run = make_run(tmp_path, [sample(1, right, 1.0, ex)], task="r3_test_tasks:CoinTask", options={})
    out = tmp_path / "audit.json"
    rc, stdout, _ = run_main([str(run), "--out", str(out)], capsys)
    assert rc == 0 and "DISAGREEMENT" not in stdout and "pass the verifier now:         1/1 (100.0%)" in stdout
    data = json.loads(out.read_text())
    assert data["rewarded_failing"] == 0 and data["independent_checker"] is False


def test_show_0_prints_no_rewarded_retry(tmp_path, capsys):
    """``--show 0`` prints none of the rewarded retries (a slice ``[-0:]`` would print them all)."""
    run = make_run(tmp_path, [sample(s, "So 19 + 17 = 36.", 1.0) for s in (1, 2, 3)])
    rc, stdout, _ = run_main([str(run), "--show", "0"], capsys)
    assert rc == 0 and "rewarded retries logged: 3" in stdout and "--- rewarded" not in stdout


def test_a_sample_without_its_retry_is_bad_input(tmp_path, capsys):
    """A logged sample without its ``retry`` is one line naming the file and line, exit 2 (not a
    KeyError traceback, whose status 1 reads as a wrong reward)."""
    run = make_run(tmp_path, [sample(1, "So 19 + 17 = 36.", 1.0), {"step": 2, "example": EX, "reward": 1.0}])
    rc, _, err = run_main([str(run)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "line 2: expected an object with example, retry and reward" in lines[0], err


def test_rewarded_retries_the_token_limit_cut_off_are_counted_and_marked(tmp_path, capsys):
    """A retry cut off right after `19 + 17` is paid by the answer rule, though the model may have
    gone on to write `= 26`: the audit counts those rewards and marks them in --show, so a reader
    looks at them; samples logged before the flag existed are not counted as whole (not a false
    0 of all)."""
    cut = {**sample(1, "I used 19 + 17 = 26 first. Then I used 19 + 17", 1.0), "retry_cut": True}
    whole = {**sample(2, "So 19 + 17 = 36.", 1.0), "retry_cut": False}
    out = tmp_path / "audit.json"
    rc, stdout, _ = run_main([str(make_run(tmp_path, [cut, whole])), "--out", str(out)], capsys)
    assert rc == 0
    assert "  cut off at the retry token limit: 1/2 (50.0%)" in stdout
    assert "--- rewarded, step 1 (retry cut off at the token limit):" in stdout and "--- rewarded, step 2:" in stdout
    assert json.loads(out.read_text())["rewarded_cut"] == 1
    (tmp_path / "old").mkdir()
    old = {k: v for k, v in cut.items() if k != "retry_cut"}
    rc, stdout, _ = run_main([str(make_run(tmp_path / "old", [old, whole])), "--out", str(out)], capsys)
    assert "cut off" not in stdout and json.loads(out.read_text())["rewarded_recording_cut"] == 1
    (tmp_path / "resumed").mkdir()  # (a run resumed across the upgrade: some samples without the field)
    rc, stdout, _ = run_main([str(make_run(tmp_path / "resumed", [old, cut, whole]))], capsys)
    assert "  cut off at the retry token limit: 1/2 (50.0%) of the 2 whose samples record it (paid" in stdout


def test_a_run_that_fails_cut_answers_has_each_rewarded_cut_retry_reported_and_fails(tmp_path, capsys):
    """A run trained with ``cut_answers: fail`` pays no retry the limit cut off: a rewarded one in
    its samples (a right equation read where the limit fell) is a wrong reward by the run's own
    rule, failing both checks; a cut retry it did not pay is no disagreement."""
    cut = {**sample(1, "So 19 + 17 = 36", 1.0), "retry_cut": True}
    unpaid = {**sample(1, "So 17 + 19 = 36", 0.0), "retry_cut": True}
    whole = {**sample(2, "So 19 + 17 = 36.", 1.0), "retry_cut": False}
    out = tmp_path / "audit.json"
    rc, stdout, _ = run_main([str(make_run(tmp_path, [cut, unpaid, whole], cut_answers="fail")), "--out", str(out)],
                             capsys)
    assert rc == 1
    assert "pass the verifier now:         1/2 (50.0%)" in stdout and "re-check: 1/2 (50.0%)" in stdout
    assert "(the run fails cut answers: these should not have been paid)" in stdout
    data = json.loads(out.read_text())
    assert data["rewarded_failing"] == 1 and len(data["disagreements"]) == 1
    assert data["disagreements"][0]["verifier_reason"].startswith("cut off at the token limit")
    (tmp_path / "judged").mkdir()  # (the same samples under the default rule: all three right)
    rc, stdout, _ = run_main([str(make_run(tmp_path / "judged", [cut, whole], cut_answers="judge"))], capsys)
    assert rc == 0 and "--cut-answers fail pays only answers the model ended" in stdout
    (tmp_path / "bad").mkdir()
    rc, _, err = run_main([str(make_run(tmp_path / "bad", [whole], cut_answers="drop"))], capsys)
    assert rc == 2 and "'cut_answers' must be one of judge, fail, got 'drop'" in err


def test_the_audit_file_records_the_rule_it_judged_cut_retries_by(tmp_path, capsys):
    """``--out``: the rule the samples were re-judged by is in the file (the same disagreements
    mean other things under judge and fail); a run from before the option is audited under judge."""
    cut = {**sample(1, "So 19 + 17 = 36", 1.0), "retry_cut": True}
    for rule, want in (("fail", "fail"), (None, "judge")):
        (tmp_path / str(rule)).mkdir()
        out = tmp_path / f"{rule}.json"
        run_main([str(make_run(tmp_path / str(rule), [cut], **({"cut_answers": rule} if rule else {}))),
                  "--out", str(out)], capsys)
        assert json.loads(out.read_text())["cut_answers"] == want
