"""--report-to: TensorBoard event files hold what metrics.jsonl holds (also across a resume);
the W&B tracker's calls (checked against a stand-in module: wandb is not a test dependency)."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from r3.errors import R3Error
from r3.tracking import make_tracker, samples_markdown, scalars
from test_train import BASE, read_metrics, run_train, tiny_model  # noqa: F401  (tiny_model: the fixture)


def test_scalars_and_samples_markdown():
    row = {"step": 3, "loss": 0.5, "kl": None, "skipped": False, "lr": 1e-5, "grad_norm": float("nan"), "x": "s"}
    assert scalars(row) == {"loss": 0.5, "skipped": 0.0, "lr": 1e-5}
    md = samples_markdown([{"reward": 1.0, "reason": "correct", "attempt": "a|b", "reflection": "r\nr", "retry": "1+2"}])
    assert md.splitlines()[2] == "| 1.0 | correct | a\\|b | r<br>r | 1+2 |"


def test_tensorboard_events_equal_the_metrics_across_a_resume(tiny_model, tmp_path):
    """Read by both of TensorBoard's readers: the UI's (plugin_event_accumulator) skips the first
    restart marker of a run, so a first run that wrote none left the redone steps doubled there."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

    out = tmp_path / "run"
    args = BASE + ["--model", str(tiny_model), "--out", str(out), "--max-steps", "3", "--save-every", "1",
                   "--keep-last", "3", "--eval-n", "2", "--report-to", "tensorboard", "--samples-every", "1"]
    run_train(args + ["--stop-after", "2"])
    shutil.rmtree(out / "checkpoints" / "step_000002")  # resume from step 1: step 2 is redone
    run_train(args)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 3]
    for reader in (event_accumulator, plugin_event_accumulator):
        acc = reader.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        events = acc.Scalars if reader is event_accumulator else acc.Tensors

        def value(e):
            return e.value if reader is event_accumulator else float(e.tensor_proto.float_val[0])

        for key in ("loss", "retry_success", "groups_with_signal", "lr"):
            got = events(f"train/{key}")
            assert [e.step for e in got] == [1, 2, 3], (reader.__name__, key)  # the first run's step 2 was purged
            assert [value(e) for e in got] == pytest.approx([float(r[key]) for r in rows], rel=1e-6), key
        assert [e.step for e in events("eval/first_attempt_accuracy")] == [0, 3], reader.__name__
    # text: the UI's reader (the legacy one purges scalars only)
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [1, 2, 3]
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0]


def test_wandb_tracker_runs_offline_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or FakeRun(),
        Table=lambda columns, data: ("table", columns, data),
        util=types.SimpleNamespace(generate_id=lambda: "abc123"),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    t = make_tracker("wandb", tmp_path, {"lr": 1e-5}, 0, main=True)
    t.log_metrics({"step": 1, "loss": 0.25, "kl": None}, 1)
    t.log_samples([{"reward": 1.0, "reason": "correct", "attempt": "a", "reflection": "b", "retry": "c"}], 1)
    t.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["id"] == "abc123" and init["resume"] == "allow"
    assert init["config"] == {"lr": 1e-5} and init["dir"] == str(tmp_path)
    assert calls[1] == ("log", {"train/loss": 0.25}, 1)
    assert calls[2][1]["samples"][2] == [[1, 1.0, "correct", "a", "b", "c"]] and calls[-1] == ("finish",)
    fake.util.generate_id = lambda: "other"
    make_tracker("wandb", tmp_path, {}, 5, main=True)
    assert calls[-1][1]["id"] == "abc123"  # a restart continues the same W&B run
    assert type(make_tracker("wandb", tmp_path, {}, 0, main=False)).__name__ == "Tracker"  # other ranks: nothing


def test_report_to_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(R3Error, match="needs the wandb package: pip install wandb"):
        make_tracker("wandb", tmp_path, {}, 0, main=True)
    with pytest.raises(R3Error, match="'report_to' must be one of none, tensorboard, wandb"):
        make_tracker("mlflow", Path(tmp_path), {}, 0, main=True)


def test_report_to_without_the_package_fails_before_anything_is_written(tmp_path, monkeypatch):
    """A missing tracking package is found before the models load: one line, exit 2, and no run
    directory (a lock and a config.json were left behind when the tracker was made last)."""
    import test_train

    blocker = tmp_path / "blocker" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('wandb is not installed here')\n")
    env = dict(test_train.ENV, PYTHONPATH=f"{blocker.parent}:{test_train.ENV.get('PYTHONPATH', '')}")
    monkeypatch.setattr(test_train, "ENV", env)
    proc = run_train(["--out", str(tmp_path / "o"), "--max-steps", "1", "--report-to", "wandb"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == ["error: --report-to wandb needs the wandb package: pip install wandb"], err
    assert not (tmp_path / "o").exists() and "r3.train:" not in proc.stdout  # (nothing loaded or printed)


def _tensorboard_tags(directory) -> dict:
    """The tags TensorBoard's UI reader finds in ``directory`` now (scalars and text are tensors)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    acc = plugin_event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.tensor_proto) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def test_tensorboard_metrics_are_on_disk_before_the_writer_closes(tmp_path, monkeypatch):
    """Each step's scalars are flushed when logged: where the event file's writes are buffered
    until a flush (TensorFlow's gfile, a file system without append), TensorBoard would otherwise
    show them up to two minutes late, and a run killed with SIGKILL would lose them."""
    pytest.importorskip("tensorboard")
    from tensorboard.compat import tf

    plain_init = tf.io.gfile.GFile.__init__

    def buffered(self, *args, **kwargs):  # the stub's GFile buffers like this where it cannot append
        plain_init(self, *args, **kwargs)
        self.fs_supports_append = False

    monkeypatch.setattr(tf.io.gfile.GFile, "__init__", buffered)
    t = make_tracker("tensorboard", tmp_path, {"lr": 1e-5}, 0, main=True)
    try:
        t.log_metrics({"step": 1, "loss": 0.25}, 1)
        tags = _tensorboard_tags(tmp_path / "tensorboard")
        assert [(step, p.float_val[0]) for step, p in tags["train/loss"]] == [(1, 0.25)]
    finally:
        t.close()


def test_tensorboard_logs_no_samples_table_for_a_step_without_samples(tmp_path):
    """A step with no logged samples writes no text (not a table of headers only)."""
    pytest.importorskip("tensorboard")
    t = make_tracker("tensorboard", tmp_path, {}, 0, main=True)
    t.log_samples([], 1)
    t.log_samples([{"reward": 1.0, "reason": "correct", "attempt": "a", "reflection": "b", "retry": "c"}], 2)
    t.close()
    tags = _tensorboard_tags(tmp_path / "tensorboard")
    assert [step for step, _ in tags["samples/text_summary"]] == [2]


def test_a_full_disk_under_tensorboard_is_one_line_naming_its_directory(tmp_path, monkeypatch, capsys):
    """TensorBoard's writer thread met ENOSPC, printed its traceback, and the next call raised the
    bare OSError: "error: No space left on device" naming no file and no checkpoint to resume from.
    It is one line as a log's failed write is, without the thread's traceback."""
    pytest.importorskip("tensorboard")
    import errno

    from tensorboard.summary.writer import record_writer

    t = make_tracker("tensorboard", tmp_path, {"lr": 1e-5}, 0, main=True)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000002" / "trainer_state.json").write_text("{}")
    with pytest.raises(R3Error) as e:
        t.log_metrics({"step": 3, "loss": 0.25}, 3)
    assert str(e.value).startswith(f"could not write {tmp_path / 'tensorboard'} (No space left on device; ")
    assert str(e.value).endswith("); free space and rerun with the same --out: it resumes from checkpoint step_000002")
    t.close()  # (said once: closing does not raise it again)
    assert "Traceback" not in capsys.readouterr().err


def _fake_wandb(monkeypatch) -> list:
    """A stand-in wandb module; returns the list its init(**kwargs) calls are appended to."""
    inits = []
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or types.SimpleNamespace(),
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    return inits


@pytest.mark.parametrize("env, mode", [({}, "offline"), ({"WANDB_API_KEY": "k"}, "online"),
                                       ({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}, "offline"),
                                       ({"WANDB_MODE": "disabled"}, "disabled")])
def test_wandb_mode_follows_wandb_mode_then_the_api_key(tmp_path, monkeypatch, env, mode):
    """Offline unless WANDB_API_KEY is set (then online); an explicit WANDB_MODE wins over the key."""
    inits = _fake_wandb(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    make_tracker("wandb", tmp_path, {}, 0, main=True)
    assert [kw["mode"] for kw in inits] == [mode]


def test_wandb_project_comes_from_wandb_project(tmp_path, monkeypatch):
    """WANDB_PROJECT names the W&B project (r3 when unset), as wandb users expect."""
    inits = _fake_wandb(monkeypatch)
    make_tracker("wandb", tmp_path, {}, 0, main=True)
    monkeypatch.setenv("WANDB_PROJECT", "p")
    make_tracker("wandb", tmp_path, {}, 0, main=True)
    assert [kw["project"] for kw in inits] == ["r3", "p"]


def test_wandb_run_is_named_after_the_run_directory_and_logs_no_empty_samples_table(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(log=lambda data, step: calls.append(("log", data, step))),
        Table=lambda columns, data: ("table", columns, data),
        util=types.SimpleNamespace(generate_id=lambda: "abc123"),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run = tmp_path / "my-run"
    run.mkdir()
    t = make_tracker("wandb", run, {}, 0, main=True)
    assert calls[0][1]["name"] == "my-run" and calls[0][1]["project"] == "r3"
    t.log_samples([], 3)  # (a step without logged samples: no table of headers only)
    t.log_metrics({"step": 3, "retry_success": 0.5}, 3, prefix="eval")
    assert calls[1:] == [("log", {"eval/retry_success": 0.5}, 3)]


def test_tensorboard_close_writes_what_is_still_buffered(tmp_path, monkeypatch):
    """The last step's samples (text is not flushed per step) reach the event file when the run
    closes its tracker, where the file's writes are buffered until a flush."""
    pytest.importorskip("tensorboard")
    from tensorboard.compat import tf

    plain_init = tf.io.gfile.GFile.__init__

    def buffered(self, *args, **kwargs):
        plain_init(self, *args, **kwargs)
        self.fs_supports_append = False

    monkeypatch.setattr(tf.io.gfile.GFile, "__init__", buffered)
    t = make_tracker("tensorboard", tmp_path, {"lr": 1e-5}, 0, main=True)
    t.log_samples([{"reward": 1.0, "reason": "correct", "attempt": "a", "reflection": "b", "retry": "c"}], 1)
    t.close()
    tags = _tensorboard_tags(tmp_path / "tensorboard")
    assert [step for step, _ in tags["samples/text_summary"]] == [1]
    assert [step for step, _ in tags["config/text_summary"]] == [0]


def test_a_full_disk_under_tensorboard_names_the_latest_checkpoint_or_none(tmp_path, monkeypatch):
    """The one line says where a rerun resumes: the last checkpoint (by step, not the first of
    several), or that there is none yet."""
    pytest.importorskip("tensorboard")
    import errno

    from tensorboard.summary.writer import record_writer

    for steps, end in (((), "there is no checkpoint yet, so it starts again"),
                       ((2, 10, 4), "it resumes from checkpoint step_000010")):
        out = tmp_path / f"run{len(steps)}"
        out.mkdir()
        t = make_tracker("tensorboard", out, {}, 0, main=True)
        for step in steps:
            (out / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
            (out / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").write_text("{}")
        with monkeypatch.context() as m:
            m.setattr(record_writer.RecordWriter, "write",
                      lambda self, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
            with pytest.raises(R3Error) as e:
                t.log_metrics({"step": 3, "loss": 0.25}, 3)
            t.close()
        assert str(e.value).endswith(f"); free space and rerun with the same --out: {end}"), str(e.value)


def test_only_tensorboards_writer_thread_oserrors_are_kept_quiet(monkeypatch):
    """The writer thread's failed write is said by the next call (one line); any other thread's
    exception, and any other exception of that thread (a bug), still reaches the hook there was,
    which is wrapped once however many trackers are made."""
    import threading

    from r3 import tracking

    heard = []
    monkeypatch.setattr(threading, "excepthook", lambda args: heard.append(
        (type(args.thread).__name__, type(args.exc_value).__name__)))
    tracking._quiet_writer_thread_errors()
    hook = threading.excepthook
    tracking._quiet_writer_thread_errors()
    assert threading.excepthook is hook

    class _AsyncWriterThread(threading.Thread):  # (TensorBoard's writer thread, by name)
        pass

    class Worker(threading.Thread):
        pass

    for thread, exc in ((_AsyncWriterThread, OSError(28, "No space left on device")), (_AsyncWriterThread, ValueError("bug")),
                        (Worker, OSError(5, "Input/output error"))):
        threading.excepthook(types.SimpleNamespace(thread=thread(), exc_type=type(exc), exc_value=exc, exc_traceback=None))
    assert heard == [("_AsyncWriterThread", "ValueError"), ("Worker", "OSError")]


def test_tensorboard_rerun_before_the_first_checkpoint_drops_the_first_runs_events(tmp_path):
    """A run stopped before its first checkpoint starts again from step 0: its events (the config,
    the step-0 evaluation, the steps done) are dropped, as metrics.jsonl is restarted, so step 0
    is not there twice with two values."""
    pytest.importorskip("tensorboard")
    for accuracy, steps in ((0.25, (1, 2)), (0.5, (1,))):
        t = make_tracker("tensorboard", tmp_path, {"lr": 1e-5}, 0, main=True)
        t.log_metrics({"step": 0, "first_attempt_accuracy": accuracy}, 0, "eval")
        for step in steps:
            t.log_metrics({"step": step, "loss": accuracy + step}, step)
        t.close()
    tags = _tensorboard_tags(tmp_path / "tensorboard")
    assert [(step, p.float_val[0]) for step, p in tags["eval/first_attempt_accuracy"]] == [(0, 0.5)]
    assert [(step, p.float_val[0]) for step, p in tags["train/loss"]] == [(1, 1.5)]
    assert [step for step, _ in tags["config/text_summary"]] == [0]


def test_a_full_disk_when_tensorboard_closes_is_one_line_too(tmp_path, monkeypatch, capsys):
    """The last samples are written when the tracker closes (text is not flushed per step): a full
    disk met there is the same one line as one met while logging, not a bare OSError."""
    pytest.importorskip("tensorboard")
    import errno

    from tensorboard.summary.writer import record_writer

    t = make_tracker("tensorboard", tmp_path, {}, 0, main=True)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    t.log_samples([{"reward": 1.0, "reason": "correct", "attempt": "a", "reflection": "b", "retry": "c"}], 1)
    with pytest.raises(R3Error, match=f"^could not write {tmp_path / 'tensorboard'} \\(No space left on device"):
        t.close()
    assert "Traceback" not in capsys.readouterr().err
