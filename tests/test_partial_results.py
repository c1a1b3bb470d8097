"""r3.partial_results: the finished batches of an interrupted evaluation, read back by a rerun."""

import json
import os
import types

import pytest

from r3.errors import R3Error
from r3.partial_results import PartialResults, code_fingerprint, fingerprint, model_files


def test_batches_read_back_by_a_rerun_with_the_same_key(tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"  # (its directory made by the first write, as the result's is)
    key = {"settings": {"seed": 0, "n": 4}, "data": fingerprint([{"q": 1}])}
    p = PartialResults(out, key)
    assert p.path == tmp_path / "sub" / "r.json.partial.jsonl" and not p.path.exists() and p.of("m") == {}
    p.add("m", 0, {"x": [1.5, True]})
    p.add("m", 1, {"x": [0.1, False]})
    p.add("n", 0, ["text"])
    again = PartialResults(out, json.loads(json.dumps(key)))
    assert again.of("m") == {0: {"x": [1.5, True]}, 1: {"x": [0.1, False]}} and again.of("n") == {0: ["text"]}
    assert "resuming: 3 finished batches read from" in capsys.readouterr().err
    again.add("n", 1, ["more"])  # appends after the earlier lines, no second header
    lines = p.path.read_text().splitlines()
    assert len(lines) == 5 and sum("r3_partial_results" in line for line in lines) == 1
    again.finish()
    assert not p.path.exists()
    again.finish()  # (nothing left to remove)


def test_a_file_another_process_writes_is_refused(tmp_path):
    """Two commands with the same --out appended to one file (the second's header among the
    first's lines: every later rerun refused it). The file is held from the first batch to
    finish(); another holder (a separate open file, as another process's) is refused at the
    start when the file is there, or at the first batch when it came meanwhile, and the file is
    left as the holder wrote it."""
    import fcntl

    out = tmp_path / "r.json"
    late = PartialResults(out, {"k": 1})  # (no file yet: nothing to hold)
    first = PartialResults(out, {"k": 1})
    first.add("m", 0, "a")
    with open(first.path) as other:
        with pytest.raises(BlockingIOError):  # (held by `first`)
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    first.finish()
    with open(first.path, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (let go by finish: another process's now)
        other.write(json.dumps({"r3_partial_results": 1, "key": {"format": 1, "k": 1}}) + "\n")
        other.flush()
        kept = first.path.read_bytes()
        with pytest.raises(R3Error, match=r"r.json is being written by another process \(.*r.json.partial.jsonl is "
                                          r"held by it: the same command with the same --out\?\); wait for it"):
            PartialResults(out, {"k": 1})
        with pytest.raises(R3Error, match="is being written by another process"):
            late.add("m", 0, "b")
        assert first.path.read_bytes() == kept
    with pytest.raises(R3Error, match="other inputs"):  # (a refused file is let go of at once)
        PartialResults(out, {"k": 2})
    with open(first.path) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    again = PartialResults(out, {"k": 1})  # (the other ended: its file is read and held)
    again.add("m", 0, "c")
    assert again.of("m") == {0: "c"}
    again.finish()
    assert not first.path.exists()


def test_other_inputs_are_refused_naming_what_changed(tmp_path):
    out = tmp_path / "r.json"
    first = PartialResults(out, {"settings": {"seed": 0, "n": 4}, "models": ["a"]})
    first.add("a", 0, 1)
    kept = first.path.read_bytes()
    with pytest.raises(R3Error, match=r"r.json.partial.jsonl holds 1 finished batches of an evaluation with other "
                                      r"inputs \(models, settings.seed\): rerun that command to finish it, or delete "
                                      r"the file to start this one$"):
        PartialResults(out, {"settings": {"seed": 1, "n": 4}, "models": ["b"]})
    assert first.path.read_bytes() == kept  # (never deleted by a mistyped command)
    first.path.write_text(first.path.read_text().replace('"format": 1', '"format": 0'))
    with pytest.raises(R3Error, match=r"other inputs \(format\)"):  # (a file of another r3)
        PartialResults(out, {"settings": {"seed": 0, "n": 4}, "models": ["a"]})


def test_code_fingerprint_covers_r3_and_the_tasks_own_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "r3_fp_task_mod.py").write_text("class T:\n    def verify(self):\n        return 1\n")
    import r3_fp_task_mod

    task = r3_fp_task_mod.T()
    before = code_fingerprint(task)
    assert code_fingerprint(task) == before and code_fingerprint() != before
    (tmp_path / "r3_fp_task_mod.py").write_text("class T:\n    def verify(self):\n        return 2\n")
    assert code_fingerprint(task) != before  # the verifier was fixed: another evaluation
    # a plug-in's base class in another file (its verifier inherited) counts too
    (tmp_path / "r3_fp_base_mod.py").write_text("class Base:\n    def verify(self):\n        return 1\n")
    (tmp_path / "r3_fp_child_mod.py").write_text("from r3_fp_base_mod import Base\nclass C(Base):\n    pass\n")
    import r3_fp_child_mod

    child = r3_fp_child_mod.C()
    before = code_fingerprint(child)
    (tmp_path / "r3_fp_base_mod.py").write_text("class Base:\n    def verify(self):\n        return 2\n")
    assert code_fingerprint(child) != before
    # and r3's own modules in subpackages (r3.forgetting's scoring lives in r3/evals/)
    from pathlib import Path

    import r3.evals.engine

    engine = Path(r3.evals.engine.__file__).resolve()
    real = Path.read_bytes
    before = code_fingerprint()
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + (b"#" if self == engine else b""))
    assert code_fingerprint() != before
    assert fingerprint({1: "a", "b": 2}) == fingerprint({1: "a", "b": 2})  # (keys that do not sort together)


def test_a_line_cut_short_is_dropped_and_appends_stay_whole(tmp_path, capsys):
    out = tmp_path / "r.json"
    p = PartialResults(out, {"k": 1})
    p.add("m", 0, "a")
    p.add("m", 1, "b")
    p.path.write_bytes(p.path.read_bytes()[:-5])
    again = PartialResults(out, {"k": 1})
    assert again.of("m") == {0: "a"} and "dropping the last line, cut short" in capsys.readouterr().err
    again.add("m", 1, "b")
    assert PartialResults(out, {"k": 1}).of("m") == {0: "a", 1: "b"}
    # the header itself cut short: nothing finished, a fresh start
    p.path.write_bytes(p.path.read_bytes()[:12])
    fresh = PartialResults(out, {"k": 1})
    assert fresh.of("m") == {} and not fresh.path.exists()
    fresh.add("m", 0, "a")
    assert PartialResults(out, {"k": 1}).of("m") == {0: "a"}


@pytest.mark.parametrize("text, message", [
    ("hello\n", "line 1: not valid JSON"),
    ("hello", "line 1: not valid JSON"),  # (not ours: not truncated)
    ('{"a": 1}\n', r"not a file of finished batches \(no r3_partial_results header\)"),
    ('{"r3_partial_results": 1, "key": {"format": 1, "k": 1}}\n{"unit": "m"}\n', "line 2: not a finished batch"),
])
def test_a_file_that_is_not_ours_is_refused_and_kept(tmp_path, text, message):
    path = tmp_path / "r.json.partial.jsonl"
    path.write_text(text)
    with pytest.raises(R3Error, match=message):
        PartialResults(tmp_path / "r.json", {"k": 1})
    assert path.read_text() == text


def test_model_files_change_with_the_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"1234")
    before = model_files(str(d))
    assert before["spec"] == str(d.resolve()) and set(before["files"]) == {"config.json", "model.safetensors"}
    assert model_files(str(d)) == before
    (d / "model.safetensors").write_bytes(b"12345")
    assert model_files(str(d)) != before
    # retrained in place: the same size, written later (an export's size never changes)
    same_size = model_files(str(d))
    (d / "model.safetensors").write_bytes(b"54321")
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert model_files(str(d)) != same_size
    assert model_files("smollm2-135m")["spec"] == "smollm2-135m"
    assert fingerprint({"a": [1, 2]}) == fingerprint({"a": [1, 2]}) != fingerprint({"a": [2, 1]})


def test_a_model_is_keyed_by_its_absolute_path_and_a_value_whatever_its_key_order(tmp_path, monkeypatch):
    """--model m from two directories names two models (with the same file sizes and times they
    read as one, and the second resumed the first's batches); ./m and its absolute path are one.
    Equal dicts written in another key order (a re-exported data file) are the same inputs."""
    for where in ("one", "two"):
        (tmp_path / where / "m").mkdir(parents=True)
        (tmp_path / where / "m" / "config.json").write_text("{}")
        os.utime(tmp_path / where / "m" / "config.json", ns=(0, 0))
    monkeypatch.chdir(tmp_path / "one")
    first = model_files("m")
    assert first == model_files("./m") == model_files(str(tmp_path / "one" / "m"))
    monkeypatch.chdir(tmp_path / "two")
    assert model_files("m") != first and model_files("m")["spec"] == str((tmp_path / "two" / "m").resolve())
    assert fingerprint([{"nums": [1, 2], "target": 3}]) == fingerprint([{"target": 3, "nums": [1, 2]}])


def test_read_back_batches_of_the_wrong_size_are_an_error_not_a_short_result():
    """A damaged file whose header still matches: a batch with fewer results than items would
    otherwise be zipped short (a wrong n, or a KeyError later)."""
    from r3.evals.engine import generate_until, loglikelihoods
    from r3.heldout import evaluate_examples

    class Tok:
        def get_added_vocab(self):
            return {}

    prompts = [[1, 2], [3], [4, 5, 6]]
    texts = generate_until(None, Tok(), prompts, until=["\n"], max_new_tokens=4, batch_size=2,
                           finished={0: ["a", "b"], 1: ["c"]})  # (nothing left to run: no model needed)
    assert sorted(texts) == ["a", "b", "c"]
    with pytest.raises(R3Error, match="finished batch 1 read back holds 2 results for its 1 items"):
        generate_until(None, Tok(), prompts, until=["\n"], max_new_tokens=4, batch_size=2,
                       finished={0: ["a", "b"], 1: ["c", "d"]})
    items = [([1], [[2], [3]]), ([4], [[5]])]
    lls = loglikelihoods(types.SimpleNamespace(device="cpu"), items, batch_size=2, finished={0: [[[-1.5, True], [-2.0, False]], [[-0.25, True]]]})
    assert [[(x.logprob, x.greedy) for x in ll] for ll in lls] == [[(-1.5, True), (-2.0, False)], [(-0.25, True)]]
    with pytest.raises(R3Error, match="finished batch 0 read back holds 1 results for its 2 items"):
        loglikelihoods(types.SimpleNamespace(device="cpu"), items, batch_size=2, finished={0: [[[-1.5, True]]]})
    batch = {"first_correct": [True], "second_correct": [True], "generated_tokens": 3, "verifier": [0, 1, None]}
    res = evaluate_examples(None, None, None, [{"q": 1}], batch_size=1, finished={0: batch}, chat=object())
    assert res["n"] == 1 and res["first_success"] == 1 and res["generated_tokens"] == 3
    with pytest.raises(R3Error, match="finished batch 0 read back does not hold results for its 2 examples"):
        evaluate_examples(None, None, None, [{"q": 1}, {"q": 2}], batch_size=2, finished={0: batch}, chat=object())


def test_an_interruption_says_where_the_finished_batches_are(tmp_path, capsys):
    import os
    import signal

    p = PartialResults(tmp_path / "r.json", {"k": 1})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e, p.interrupted_note():
        raise KeyboardInterrupt
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"  # (nothing kept yet)
    p.add("m", 0, "a")
    with pytest.raises(SystemExit) as e, p.interrupted_note():
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption: raised where the work is
        raise AssertionError("not reached")
    assert e.value.code == 143
    assert capsys.readouterr().err == f"terminated: 1 finished batch kept in {p.path}; the same command goes on from them\n"
    assert signal.getsignal(signal.SIGTERM) == before  # (restored)


def test_each_batch_keeps_its_time_for_the_rerun(tmp_path, monkeypatch):
    """A batch's line holds the seconds from ``start`` (or the batch before) to its ``add``; a rerun
    sums those of the batches it reads back, per unit or in all. Lines without a time (or with a
    bad one) count 0."""
    import r3.partial_results as pr

    clock = iter([10.0, 12.5, 13.0, 20.0, 20.25])
    monkeypatch.setattr(pr.time, "perf_counter", lambda: next(clock))
    out = tmp_path / "r.json"
    p = PartialResults(out, {"k": 1})
    assert p.start("m") == {}  # 10.0
    p.add("m", 0, "a")  # 12.5
    p.add("m", 1, "b")  # 13.0
    assert p.start("n") == {}  # 20.0
    p.add("n", 0, "c")  # 20.25
    assert [json.loads(line).get("s") for line in p.path.read_text().splitlines()[1:]] == [2.5, 0.5, 0.25]
    with open(p.path, "a") as f:
        f.write(json.dumps({"unit": "n", "batch": 1, "result": "d"}) + "\n")
        f.write(json.dumps({"unit": "n", "batch": 2, "result": "e", "s": "x"}) + "\n")
    again = PartialResults(out, {"k": 1})
    assert again.seconds_before("m") == 3.0 and again.seconds_before("n") == 0.25
    assert again.seconds_before() == 3.25 and again.seconds_before("other") == 0
    assert PartialResults(tmp_path / "fresh.json", {"k": 1}).seconds_before() == 0


def test_a_gpu_is_keyed_by_its_kind(monkeypatch):
    """Any GPU of one kind (``--device cuda``, ``cuda:1``, ``cuda:2``) continues another's batches;
    another kind computes other numbers, so it starts afresh (CUDA is faked here: only the name is
    computed)."""
    import torch

    from r3.partial_results import device_name

    assert device_name("cpu") == "cpu" and device_name(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA A100-SXM4-80GB", "NVIDIA H200", "NVIDIA H200"][i])
    assert device_name("cuda") == device_name("cuda:2") == device_name(torch.device("cuda")) == "cuda (NVIDIA H200)"
    assert device_name("cuda:0") == "cuda (NVIDIA A100-SXM4-80GB)"


def test_a_key_is_compared_as_it_reads_back_and_a_clean_file_resumes_without_a_warning(tmp_path, capsys):
    """A key holding tuples or paths (JSON turns them into lists and strings) matches its own file;
    a file whose last line is whole is resumed without the cut-line warning, and a file holding
    only its header says nothing of resuming."""
    from pathlib import Path

    out = tmp_path / "r.json"
    key = {"settings": {"shape": (2, 3)}, "data": Path("/data/x.jsonl")}
    p = PartialResults(out, key)
    p.add("m", 0, "a")
    again = PartialResults(out, key)
    assert again.of("m") == {0: "a"}
    err = capsys.readouterr().err
    assert "dropping" not in err and "resuming: 1 finished batch read from" in err
    p.path.write_text(p.path.read_text().splitlines()[0] + "\n")  # (the header only: the batch line was cut)
    assert PartialResults(out, key).of("m") == {} and capsys.readouterr().err == ""


def test_the_refusal_names_keys_gone_from_the_inputs_and_four_at_most(tmp_path):
    out = tmp_path / "r.json"
    PartialResults(out, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1, "gone": 1}).add("m", 0, 1)
    with pytest.raises(R3Error, match=r"other inputs \(gone\): rerun"):
        PartialResults(out, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1})
    with pytest.raises(R3Error, match=r"other inputs \(a, b, c, d, \.\.\.\): rerun"):
        PartialResults(out, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2, "gone": 1})
    with pytest.raises(R3Error, match=r"other inputs \(a, b, c, d\): rerun"):
        PartialResults(out, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 1, "gone": 1})


@pytest.mark.parametrize("row", [{"unit": "m", "batch": "0", "result": 1}, {"unit": "m", "batch": 0.0, "result": 1},
                                 {"unit": 3, "batch": 0, "result": 1}, {"unit": "m", "batch": 0}])
def test_a_batch_line_of_the_wrong_shape_is_refused(tmp_path, row):
    out = tmp_path / "r.json"
    PartialResults(out, {"k": 1}).add("m", 0, "a")
    path = tmp_path / "r.json.partial.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    with pytest.raises(R3Error, match="line 3: not a finished batch"):
        PartialResults(out, {"k": 1})


def test_a_negative_or_boolean_time_counts_zero(tmp_path):
    out = tmp_path / "r.json"
    PartialResults(out, {"k": 1}).add("m", 0, "a")
    with open(tmp_path / "r.json.partial.jsonl", "a") as f:
        for b, s in ((1, -5.0), (2, True), (3, 1.5)):
            f.write(json.dumps({"unit": "m", "batch": b, "result": "x", "s": s}) + "\n")
    assert PartialResults(out, {"k": 1}).seconds_before("m") == 1.5


def test_a_file_another_command_wrote_and_left_meanwhile_is_not_appended_to(tmp_path):
    """A command that found no file at its start, whose first batch came after another command
    with the same --out had written batches and ended (killed: its lock let go), appended its own
    header after the other's lines: every rerun refused the file ('not a finished batch'), and
    this command's finish() deleted the other's batches. It is refused, the file left as it was."""
    from r3.files import release_lock

    out = tmp_path / "r.json"
    late = PartialResults(out, {"k": 1})  # (no file yet: nothing to hold)
    other = PartialResults(out, {"k": 1})
    other.add("m", 0, "a")
    release_lock(other._held)  # (the other command killed: the OS lets go of its lock)
    kept = other.path.read_bytes()
    with pytest.raises(R3Error, match="was written by another command since this one started"):
        late.add("m", 0, "b")
    assert other.path.read_bytes() == kept
    again = PartialResults(out, {"k": 1})  # (a rerun goes on from the other's batches; nothing held)
    assert again.of("m") == {0: "a"}
    again.add("m", 1, "c")
    again.finish()


@pytest.mark.parametrize("text,warned", [("", False), ('{"r3_par', True),
                                         ('{"r3_partial_results": 1, "ke', True)])
def test_an_empty_file_or_a_header_cut_short_is_started_afresh(tmp_path, capsys, text, warned):
    """A crash during the first write leaves an empty file or a header cut anywhere, even before
    the header's name is whole: that is a fresh start (the cut dropped, with a warning), not a
    refusal of a file 'not written by r3'; an empty file is no cut line to warn about."""
    out = tmp_path / "r.json"
    (tmp_path / "r.json.partial.jsonl").write_text(text)
    p = PartialResults(out, {"k": 1})
    assert p.of("m") == {} and not p.path.exists()
    assert ("cut short by an interrupted write" in capsys.readouterr().err) == warned
    p.add("m", 0, "a")
    assert PartialResults(out, {"k": 1}).of("m") == {0: "a"}


def test_sigterm_is_handled_only_inside_the_interrupted_note(tmp_path):
    """The SIGTERM handler that raises where the work is stays only for the evaluation inside:
    after it (a normal end too) the handler before it is back, or a later SIGTERM would raise an
    exception nothing catches."""
    import signal

    p = PartialResults(tmp_path / "r.json", {"k": 1})

    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with p.interrupted_note():
            assert signal.getsignal(signal.SIGTERM) is not own
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_refusal_names_a_value_that_became_an_object_or_stopped_being_one(tmp_path):
    """A key's value recorded as a number or absent (an older r3's key) where it is an object now,
    or the other way round, is named by its key: it is not compared part by part (a TypeError
    traceback instead of the refusal)."""
    out = tmp_path / "r.json"
    PartialResults(out, {"settings": 3, "same": {"x": 1}}).add("m", 0, 1)
    with pytest.raises(R3Error, match=r"other inputs \(settings\): rerun"):
        PartialResults(out, {"settings": {"seed": 0}, "same": {"x": 1}})
    with pytest.raises(R3Error, match=r"other inputs \(same, settings\): rerun"):
        PartialResults(out, {"settings": {"seed": 0}, "same": "x"})
    with pytest.raises(R3Error, match=r"other inputs \(new, same.x\): rerun"):
        PartialResults(out, {"settings": 3, "same": {"x": 2}, "new": {"y": 1}})


def test_the_refusal_names_a_key_that_held_null_and_is_now_absent(tmp_path):
    """A key recorded as null and now absent (or absent and now null), at the top or one level
    down, is named: ``.get`` read both as None, and the refusal named nothing ("other inputs ()")."""
    out = tmp_path / "r.json"
    PartialResults(out, {"limit": None, "settings": {"seed": 0, "n": None}}).add("m", 0, 1)
    with pytest.raises(R3Error, match=r"other inputs \(limit\): rerun"):
        PartialResults(out, {"settings": {"seed": 0, "n": None}})
    with pytest.raises(R3Error, match=r"other inputs \(settings.n\): rerun"):
        PartialResults(out, {"limit": None, "settings": {"seed": 0}})
    with pytest.raises(R3Error, match=r"other inputs \(extra\): rerun"):
        PartialResults(out, {"limit": None, "settings": {"seed": 0, "n": None}, "extra": None})


def test_finish_lets_go_of_the_file_it_held(tmp_path):
    """The file held from the first batch is let go of at finish() (and when an empty file is
    removed), not when the process ends: a process evaluating one output after another (a
    notebook, a sweep script) kept an open file for each."""
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(5):
        p = PartialResults(tmp_path / f"r{i}.json", {"k": 1})
        p.add("m", 0, "a")
        p.finish()
        (tmp_path / f"e{i}.json.partial.jsonl").write_text("")
        PartialResults(tmp_path / f"e{i}.json", {"k": 1})
    assert len(os.listdir("/proc/self/fd")) == fds and list(tmp_path.iterdir()) == []
