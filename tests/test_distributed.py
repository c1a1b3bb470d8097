"""r3.distributed: stop signals, and the process-group set-up on a GPU machine seen through stand-ins for CUDA and
torch.distributed (this machine has no GPU; the real path runs in benchmarks/gpu_check.py)."""

import pytest
import torch

import r3.distributed as D


class _Stop(Exception):
    pass


def test_nccl_is_given_the_local_gpu_before_the_group_exists(monkeypatch):
    """Each rank sets its own GPU (LOCAL_RANK) and names it to NCCL, so the communicator and every
    barrier use it, not a device guessed from the global rank."""
    calls = []
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(D.torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)

    def init_process_group(backend, **kw):
        calls.append(("init_process_group", backend, kw))
        raise _Stop  # (the rest needs a real group)

    monkeypatch.setattr(D.dist, "init_process_group", init_process_group)
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(_Stop):
        D.init_distributed()
    gpu = torch.device("cuda", 1)
    assert calls == [("set_device", gpu), ("init_process_group", "nccl", {"device_id": gpu})]


def test_release_device_memory_hands_a_gpus_cached_blocks_back(monkeypatch):
    """After a CLI drops one model: the allocator's cache on a GPU (and compiled code with its
    CUDA-graph pools after decode="compiled"); on a CPU only a collection."""
    from r3.distributed import release_device_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))
    release_device_memory(torch.device("cpu"), compiled=True)
    assert calls == []
    release_device_memory(torch.device("cuda", 1))
    assert calls == ["empty_cache"]
    release_device_memory(torch.device("cuda"), compiled=True)
    assert calls == ["empty_cache", "reset", "empty_cache"]


ONE_RANK = D.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), mesh=None)


@pytest.mark.parametrize("first, second, at_once", [
    ("SIGINT", "SIGINT", True),    # Ctrl-C twice
    ("SIGINT", "SIGTERM", True),   # Ctrl-C twice under r3-torchrun: the launcher forwards the second as SIGTERM
    ("SIGTERM", "SIGINT", True),   # a preemption, then Ctrl-C
    ("SIGTERM", "SIGTERM", False),  # Slurm: one to the launcher (forwarded) and one to the worker
])
def test_a_second_ctrl_c_stops_at_once_a_second_sigterm_waits(first, second, at_once, capsys):
    import os
    import signal

    first, second = getattr(signal, first), getattr(signal, second)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with D.StopSignals() as signals:
        os.kill(os.getpid(), first)
        assert signals.requested(ONE_RANK) == first
        if at_once:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), second)
        else:
            os.kill(os.getpid(), second)
            assert signals.requested(ONE_RANK) == first
    assert {s: signal.getsignal(s) for s in before} == before
    assert capsys.readouterr().err.count(f"received {first.name}: stopping after this step's checkpoint") == 1


def test_a_stop_is_said_by_rank_0_only(monkeypatch, capsys):
    """Every rank gets the launcher's signal, and sees a launcher gone: with two ranks each line
    was printed twice. Rank 0 says it; the others stop as quietly as they agree."""
    import os
    import signal

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(D, "_PARENT_AT_START", 4242)
    monkeypatch.setattr(os, "getppid", lambda: 1)
    for rank, said in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with D.StopSignals() as signals:
            signals._handle(signal.SIGTERM, None)
        with D.StopSignals() as signals:
            assert signals.requested(ONE_RANK) == signal.SIGTERM
        err = capsys.readouterr().err
        assert err.count("received SIGTERM: stopping after this step's checkpoint") == said, (rank, err)
        assert err.count("the launcher (pid 4242) is gone") == said, (rank, err)


def test_a_launcher_that_is_gone_stops_its_workers_after_the_step(monkeypatch, capsys):
    """torchrun starts each worker in a session of its own: with the launcher SIGKILLed they would
    train on, orphaned, holding the run's lock."""
    import os
    import signal

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(D, "_PARENT_AT_START", 4242)  # (read at import: before the models load)
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    with D.StopSignals() as signals:
        assert signals.requested(ONE_RANK) == 0
        monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented
        assert signals.requested(ONE_RANK) == signal.SIGTERM
        assert signals.requested(ONE_RANK) == signal.SIGTERM  # (every later step: said once)
    assert capsys.readouterr().err.count("the launcher (pid 4242) is gone") == 1
    with D.StopSignals() as signals:  # a Ctrl-C first, then the launcher went: still the Ctrl-C's stop
        signals._handle(signal.SIGINT, None)
        assert signals.requested(ONE_RANK) == signal.SIGINT
    assert "is gone" not in capsys.readouterr().err
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # plain python: the parent is a shell, never watched
    with D.StopSignals() as signals:
        assert signals.requested(ONE_RANK) == 0


@pytest.mark.parametrize("module", ["r3.evaluate", "r3.generate", "r3.forgetting"])
def test_r3_torchrun_refuses_the_one_process_commands_before_parsing_their_flags(module, capsys):
    """torchrun's parser read `--n 2` of r3.evaluate as an abbreviation of its own options
    ("ambiguous option: --n could match --nnodes, ..."), printed its usage and exited."""
    from r3 import launch

    with pytest.raises(SystemExit) as e:
        launch.main(["--nproc_per_node", "1", "-m", module, "--n", "2", "--out", "x.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {module} runs in one process on one device: start it with python -m {module}, "
                                "not r3-torchrun (--device cuda:N picks a GPU; for several GPUs, one process each "
                                "with its own --out)"]
    with pytest.raises(SystemExit):  # (a command that runs no model is not told about --device, which it lacks)
        launch.main(["--nproc_per_node", "1", "-m", "r3.audit", "runs/r3"])
    assert capsys.readouterr().err.splitlines() == [
        "error: r3.audit runs in one process: start it with python -m r3.audit, not r3-torchrun"]
    single = launch._single_process_module
    assert single(["--standalone", "-m", "r3.train", "--out", "r3.evaluate"]) is None
    assert single(["r3.evaluate"]) is None  # (a script path, not -m)
    assert single(["--rdzv-endpoint", "r3.cluster:29400", "-m", "r3.evaluate"]) == "r3.evaluate"  # (an option's value)
    assert single(["--log-dir", "r3.plot", "-m", "r3.train"]) is None
    assert single(["--nproc-per-node=2", "--module", "r3.generate", "--n", "1"]) == "r3.generate"


def test_r3_torchrun_refuses_an_r3_module_that_does_not_exist(tmp_path, monkeypatch, capsys):
    """A typo in the module (`-m r3.trian`) started the workers, each failed with "No module named
    r3.trian", and torchrun added its failure summary (17 lines), exit 1; now it is one line, exit
    2, before any worker starts. What the workers would import decides: a checkout in the current
    directory, which python -m puts first, else the r3 installed."""
    from r3 import launch

    monkeypatch.chdir(tmp_path)
    missing = launch._missing_r3_module
    assert missing(["-m", "r3.trian"]) == "r3.trian" and missing(["-m", "r3.nosuch.x"]) == "r3.nosuch.x"
    assert missing(["--nproc_per_node", "1", "-m", "r3.train"]) is None
    assert missing(["-m", "r3.tasks.function_calling"]) is None
    assert missing(["-m", "other.module"]) is None and missing(["r3.trian"]) is None  # (not r3's; a script)
    # a package without __main__, empty parts: python -m would refuse them too
    assert [missing(["-m", m]) for m in ("r3", "r3.tasks", "r3..train")] == ["r3", "r3.tasks", "r3..train"]
    for module, line in (("r3.trian", "error: no module named r3.trian (did you mean r3.train?)"),
                         ("r3.nosuch.x", "error: no module named r3.nosuch.x"),
                         ("r3.evalute", "error: no module named r3.evalute (did you mean python -m r3.evaluate? it "
                                        "runs as one process, not under r3-torchrun)")):
        with pytest.raises(SystemExit) as e:
            launch.main(["--nproc_per_node", "1", "-m", module, "--out", "x"])
        assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [line]
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "__init__.py").write_text("")
    (tmp_path / "r3" / "newcmd.py").write_text("")
    assert missing(["-m", "r3.newcmd"]) is None  # (the checkout here has it)
    assert missing(["-m", "r3.train"]) == "r3.train"  # (and lacks this one: so would the workers)
    assert missing(["-m", "r3"]) == "r3" and missing(["-m", "r3.newcmd."]) == "r3.newcmd."
    (tmp_path / "r3" / "__main__.py").write_text("")
    assert missing(["-m", "r3"]) is None


def test_r3_torchrun_under_nohup_leaves_sighup_ignored(monkeypatch):
    """torchrun catches SIGHUP and passes it on to the workers, which it kills at once (no
    checkpoint), so a run started with nohup died when its terminal closed; r3-torchrun keeps
    nohup's ignore, which the workers inherit. torchrun's line about a SIGHUP is kept: the workers
    say nothing about a signal they do not handle."""
    import logging
    import signal

    from r3 import launch

    class Parsed(Exception):
        pass

    def parse_args(argv):
        raise Parsed

    import os

    names = ("TORCHELASTIC_SIGNALS_TO_HANDLE", "PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    for name in names:  # (set, then removed: the test's end restores them to absent, for later tests)
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setattr(launch.torchrun, "parse_args", parse_args)
    real = signal.getsignal
    # (SIGHUP as a terminal leaves it, also where pytest itself runs under nohup)
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_DFL if s == signal.SIGHUP else real(s))
    with pytest.raises(Parsed):  # SIGHUP not ignored: torchrun's own signal handling, untouched
        launch.main(["--nproc_per_node", "1", "-m", "r3.train"])
    assert "PET_SIGNALS_TO_HANDLE" not in os.environ and "TORCHELASTIC_SIGNALS_TO_HANDLE" not in os.environ
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN if s == signal.SIGHUP else real(s))
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM")  # a user's own choice under nohup is kept
    with pytest.raises(Parsed):
        launch.main(["--nproc_per_node", "1", "-m", "r3.train"])
    assert os.environ["PET_SIGNALS_TO_HANDLE"] == "SIGTERM" and "TORCHELASTIC_SIGNALS_TO_HANDLE" not in os.environ
    monkeypatch.delenv("PET_SIGNALS_TO_HANDLE")
    with pytest.raises(Parsed):
        launch.main(["--nproc_per_node", "1", "-m", "r3.train"])
    assert os.environ["PET_SIGNALS_TO_HANDLE"] == os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGQUIT"
    drop = launch._DropQuietFailure()

    def record(sig):
        return logging.LogRecord("x", logging.WARNING, "f", 1, "Received %s death signal, shutting down workers",
                                 (sig,), None)

    assert not drop.filter(record(signal.SIGTERM)) and not drop.filter(record(signal.SIGINT))
    assert drop.filter(record(signal.SIGHUP))


def test_r3_torchrun_keeps_its_shutdown_timeout_default_and_a_users_value(monkeypatch):
    """torchrun kills the workers 30 s after a SIGTERM to the launcher: too soon for a large
    model's checkpoint, so r3-torchrun waits 600 s unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT says."""
    import os

    from r3 import launch

    class Parsed(Exception):
        pass

    def parse_args(argv):
        raise Parsed

    monkeypatch.setattr(launch.torchrun, "parse_args", parse_args)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "x")  # (so the test's end restores it to absent)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    with pytest.raises(Parsed):
        launch.main(["--nproc_per_node", "1", "-m", "r3.train"])
    assert os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")
    with pytest.raises(Parsed):
        launch.main(["--nproc_per_node", "1", "-m", "r3.train"])
    assert os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "45"


SLOW_MAIN_FAILS = '''
import sys, time
from r3.distributed import fail_together, init_distributed, run_and_exit
from r3.errors import R3Error, cli_main

@cli_main
def main():
    d = init_distributed()
    try:
        with fail_together(d):
            if d.main and sys.argv[1] == "r3error":
                raise R3Error("could not write metrics.jsonl (No space left on device)")
            if d.main:
                raise ValueError("a bug in rank 0's writes")
    except Exception:
        time.sleep(2)  # rank 0 is slow to go (its error on a slow disk, a large traceback)
        raise
    raise AssertionError("not reached")

run_and_exit(main)
'''


def test_the_launchers_sigterm_to_a_quiet_rank_says_nothing(monkeypatch, capsys):
    """Once the failed rank exits, torchrun sends SIGTERM to the others: one still waiting to leave
    quietly printed 'terminated' (exit 143) under the failed rank's one line (a race CI met)."""
    import os
    import signal
    import types

    from r3 import distributed
    from r3.errors import cli_main

    def barrier_broken_by_the_launcher(group=None):
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(distributed.dist, "barrier", barrier_broken_by_the_launcher)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: distributed.exit_after_failing_ranks(types.SimpleNamespace(cpu_group=None)))()
    assert e.value.code == 2 and capsys.readouterr().err == ""
    assert signal.getsignal(signal.SIGTERM) is before  # (cli_main puts its handler back)


@pytest.mark.parametrize("kind", ["r3error", "crash"])
def test_quiet_ranks_wait_for_a_slow_failing_rank_to_say_why(tmp_path, kind):
    """The ranks that did not fail leave only once the failing rank is gone: exiting at once, their
    exit 2 was torchrun's first failure, so it stopped rank 0 before its one line (or reported exit 2
    for rank 0's crash, without its failure summary)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "slow_main_fails.py"
    script.write_text(SLOW_MAIN_FAILS)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-m", "r3.launch", "--standalone", "--nproc_per_node", "2", str(script),
                           kind], capture_output=True, text=True, env=env, timeout=300)
    if kind == "r3error":
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert lines == ["error: could not write metrics.jsonl (No space left on device)"], lines
    else:
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "ValueError: a bug in rank 0's writes" in proc.stderr
        root = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
        assert "rank      : 0 (local_rank: 0)" in root and "exitcode  : 1" in root, proc.stderr[-3000:]


def test_cpu_ranks_share_the_cores_of_their_node(monkeypatch):
    """On a CPU each of a node's LOCAL_WORLD_SIZE ranks takes its share of the cores (torchrun
    pins one thread a rank otherwise)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(D, "available_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        D.init_distributed()
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # (the user's choice)
        D.init_distributed()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_a_users_omp_num_threads_is_kept_and_torchruns_one_is_not():
    """OMP_NUM_THREADS set by the user was overridden by the CPU count: on a CPU other work
    shares, 2 threads where 1 core is free ran a step ~7x slower, and the variable that should fix
    it did nothing. torchrun's own 1 (set for several ranks when unset) still gives way to a share
    of the CPUs; unset or unreadable, the share of the CPUs this process may use."""
    assert D.cpu_threads({"OMP_NUM_THREADS": "1"}, 1, 2) == 1
    assert D.cpu_threads({"OMP_NUM_THREADS": "6"}, 2, 16) == 6
    assert D.cpu_threads({"OMP_NUM_THREADS": "1"}, 4, 16) == 4  # (torchrun's)
    assert D.cpu_threads({}, 1, 2) == 2 and D.cpu_threads({}, 3, 16) == 5 and D.cpu_threads({}, 4, 2) == 1
    for junk in ("", "0", "two", "-1"):
        assert D.cpu_threads({"OMP_NUM_THREADS": junk}, 2, 8) == 4


def test_shard_wraps_each_block_and_reduces_gradients_in_fp32():
    """shard: every transformer block is its own FSDP unit beside the root, computing in the
    given dtype and reducing gradients in fp32 (bf16 sums over ranks would lose the small ones)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_hf_config

    from r3.model import ModelConfig, Transformer

    d = D.init_distributed()
    model = Transformer(ModelConfig.from_hf(tiny_hf_config("qwen2").to_dict()))
    D.shard(model, d, torch.bfloat16)
    units = [model, *model.layers]
    assert len([m for m in model.modules() if hasattr(m, "_get_fsdp_state")]) == len(units) == 3
    for unit in units:
        mp = unit._get_fsdp_state()._fsdp_param_group.mp_policy
        assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_a_rank_leaves_with_its_exit_code(monkeypatch, capsys):
    """run_and_exit: the entry point's SystemExit code as the process's (None: 0, a message: 1 as
    the interpreter would), a crash 1 with its traceback, a return 0."""
    codes = []
    monkeypatch.setattr(D.os, "_exit", codes.append)

    def leaves(how):
        def main():
            if isinstance(how, BaseException):
                raise how
        codes.clear()
        D.run_and_exit(main)
        return codes[0]

    assert [leaves(SystemExit(None)), leaves(SystemExit(3)), leaves(SystemExit("stopped: out of data")),
            leaves(None), leaves(ValueError("bug"))] == [0, 3, 1, 0, 1]
    assert "ValueError: bug" in capsys.readouterr().err


def _launch_with(monkeypatch, nproc: int, run):
    """r3.launch.main with torchrun's parser, worker count and run stood in for (``run(args)``)."""
    import argparse

    from r3 import launch

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")  # (what main sets: restored after the test)
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGQUIT")  # (likewise, where SIGHUP is ignored)
    monkeypatch.setattr(launch.torchrun, "parse_args", lambda argv: argparse.Namespace(nproc_per_node=str(nproc)))
    monkeypatch.setattr(launch.torchrun, "determine_local_world_size", lambda value: int(value))
    monkeypatch.setattr(launch.torchrun, "run", run)
    monkeypatch.setattr(launch, "available_cpus", lambda: 16)
    launch.main(["--nproc_per_node", str(nproc), "-m", "r3.train"])  # (parsed by the stand-in)


def test_r3_torchrun_divides_the_cpus_among_several_workers_only(monkeypatch):
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", "x")  # (restored as it was after the test)
    monkeypatch.delenv("OMP_NUM_THREADS")
    _launch_with(monkeypatch, 1, lambda args: None)
    assert "OMP_NUM_THREADS" not in os.environ  # (one worker: torch's own default)
    _launch_with(monkeypatch, 3, lambda args: None)
    assert os.environ["OMP_NUM_THREADS"] == "5"  # 16 CPUs // 3 workers
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    _launch_with(monkeypatch, 4, lambda args: None)
    assert os.environ["OMP_NUM_THREADS"] == "2"  # (a user's own value is kept)


@pytest.mark.parametrize("exitcode, code", [(2, 2), (130, 130), (143, 143), (1, 1), (-9, 1), (137, 1)])
def test_r3_torchrun_exit_code_after_a_worker_fails(monkeypatch, capsys, exitcode, code):
    """A worker's own quiet exit (a user error, a checkpoint after SIGINT / SIGTERM) is the
    launcher's, with nothing printed; any other failure (a crash, a worker killed) prints
    torchrun's summary and exits 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def failed(args):
        raise ChildFailedError("r3.train", {0: ProcessFailure(local_rank=0, pid=1234, exitcode=exitcode, error_file="")})

    with pytest.raises(SystemExit) as e:
        _launch_with(monkeypatch, 1, failed)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert (err == "") if code != 1 else (f"exitcode  : {exitcode}" in err and "r3.train FAILED" in err), err
    drop = _drop_filter_record("failed (exitcode: %d) local_rank: %s (pid: %s) of binary: %s", (exitcode, 0, 1234, "x"))
    assert drop == (code == 1)  # (torchrun's own line about the failure: kept for a crash only)


def _drop_filter_record(msg, args) -> bool:
    import logging

    from r3 import launch

    return launch._DropQuietFailure().filter(logging.LogRecord("x", logging.ERROR, "f", 1, msg, args, None))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_r3_torchrun_signalled_itself_exits_128_plus_the_signal(monkeypatch, sig):
    import signal

    from torch.distributed.elastic.multiprocessing import SignalException

    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def signalled(args):
        raise SignalException("Process got signal", sigval=getattr(signal, sig))

    with pytest.raises(SystemExit) as e:
        _launch_with(monkeypatch, 1, signalled)
    assert e.value.code == 128 + getattr(signal, sig)
    assert not _drop_filter_record("Sending process %s closing signal %s", (1234, sig))


def test_r3_torchrun_gives_each_worker_at_least_one_thread(monkeypatch):
    """More workers than CPUs (8 CPU ranks on a 4-core node): the CPUs divided by the workers
    were 0, and OMP_NUM_THREADS=0 is no thread count (torch refuses or ignores it)."""
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", "x")  # (restored as it was after the test)
    monkeypatch.delenv("OMP_NUM_THREADS")
    _launch_with(monkeypatch, 32, lambda args: None)  # (16 CPUs)
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_r3_torchrun_counts_the_cpus_this_process_may_use(monkeypatch):
    """A container or `taskset` limits the CPUs a process may run on: dividing the machine's count
    gave each worker more threads than the CPUs it has (they then compete for them). Without
    sched_getaffinity (not Linux) the machine's count, at least 1."""
    import os

    from r3 import launch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert launch.available_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert launch.available_cpus() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # ("undetermined")
    assert launch.available_cpus() == 1


def test_r3_torchrun_finds_every_one_process_command_however_the_module_is_given(capsys):
    """The module is found after `--`, after options that follow -m, and for each of the one-process
    commands (r3.failures too); a command that runs no model is not told about --device."""
    from r3 import launch

    single = launch._single_process_module
    assert single(["--nproc-per-node", "2", "-m", "--", "r3.evaluate", "--n", "2"]) == "r3.evaluate"
    assert single(["-m", "--standalone", "--nproc-per-node", "2", "r3.failures", "--n", "2"]) == "r3.failures"
    assert single(["--", "r3.evaluate"]) is None  # (a script path, not -m)
    # an abbreviated option, as torchrun's parser takes it: its value is not the module
    assert single(["--nproc", "2", "-m", "r3.evaluate", "--n", "2"]) == "r3.evaluate"
    assert single(["--nproc=2", "--stand", "-m", "r3.failures"]) == "r3.failures"
    assert single(["--nproc", "2", "-m", "r3.train"]) is None
    for module in launch.SINGLE_PROCESS:
        assert single(["--nproc_per_node", "1", "-m", module]) == module
    assert {"r3.evaluate", "r3.forgetting", "r3.failures", "r3.generate", "r3.audit", "r3.report", "r3.plot"} <= set(
        launch.SINGLE_PROCESS)
    for module in ("r3.report", "r3.plot"):
        with pytest.raises(SystemExit) as e:
            launch.main(["--nproc_per_node", "1", "-m", module, "runs/r3"])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: {module} runs in one process: start it with python -m {module}, not r3-torchrun"]


def test_r3_torchrun_exit_code_is_the_first_failed_workers(monkeypatch, capsys):
    """Rank 0 stops with its one-line error (exit 2); torchrun then SIGTERMs rank 1, which fails
    later with -15: the launcher's exit code is the first failure's (2, quiet), not the last one's
    (a crash summary and exit 1 under the user error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    first = ProcessFailure(local_rank=0, pid=1234, exitcode=2, error_file="")
    later = ProcessFailure(local_rank=1, pid=1235, exitcode=-15, error_file="")
    first.timestamp, later.timestamp = 1000, 1005

    def failed(args):
        raise ChildFailedError("r3.train", {0: first, 1: later})

    with pytest.raises(SystemExit) as e:
        _launch_with(monkeypatch, 2, failed)
    assert e.value.code == 2 and capsys.readouterr().err == ""
