"""The training progress line and r3.plot's curves: metrics a step did not produce (KL and
first-attempt success are None when nothing was trained / no first attempt was made) show as
n/a, not as zero, and sparse series are drawn with markers."""

from __future__ import annotations

import json

import pytest

from r3 import plot
from r3.metrics import format_step_line


def _row(step, **kw):
    row = {"step": step, "loss": 0.0, "kl": None, "retry_success": 0.0, "first_try_success": None,
           "groups_with_signal": 0, "groups": 8, "step_time_s": 1.0, "rollout_time_s": 1.0, "reference_time_s": 0.0,
           "update_time_s": 0.0, "skipped": False, "reflection_len_mean": 10.0}
    row.update(kw)
    return row


def test_progress_line_says_n_a_for_what_a_step_did_not_measure():
    line = format_step_line(_row(1), 3, 2.0)
    assert "| kl      n/a |" in line and "| first   n/a |" in line
    line = format_step_line(_row(2, kl=0.0123, first_try_success=0.5), 3, 1.0)
    assert "| kl 1.23e-02 |" in line and "| first 0.50 |" in line
    assert format_step_line(_row(3, kl=0.0), 3, 0.0).count("kl 0.00e+00") == 1  # a measured zero stays zero


@pytest.mark.parametrize("steps, marked", [(5, True), (plot.MARKERS_UP_TO, True), (plot.MARKERS_UP_TO + 1, False)])
def test_plot_marks_sparse_series(tmp_path, monkeypatch, steps, marked):
    run = tmp_path / "run"
    run.mkdir()
    rows = [_row(s, kl=0.01 if s == 2 else None, retry_success=s / steps) for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    save = plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, out: (figures.append(fig), save(fig, out))[1])
    out = plot.plot([run], tmp_path / "c.png")
    assert out.is_file() and out.stat().st_size > 0
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    kl = axes["KL to reference (k3)"].lines
    assert len(kl) == 1 and list(kl[0].get_xdata()) == [2] and kl[0].get_marker() == "o"  # one point, visible
    retry = axes["retry success (reward)"].lines[0]
    assert len(retry.get_xdata()) == steps and (retry.get_marker() == "o") == marked


def test_a_panel_without_values_says_so(tmp_path, monkeypatch):
    """KL is None on every step of a run that trained no token: its panel has its title and says
    nothing was logged (it was an empty, untitled box)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(_row(s)) + "\n" for s in (1, 2)))
    figures = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, out: figures.append(fig) or out)
    plot.plot([run], tmp_path / "curves.png")
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    assert [t.get_text() for t in axes["KL to reference (k3)"].texts] == ["no kl logged (only a step that trains a token logs it)"]
    assert axes["first-attempt success"].texts[0].get_text() == "no first_try_success logged"
    assert not axes["loss"].texts and axes["loss"].lines
    ticks = axes["loss"].get_xticks()  # whole steps only, on a 2-step run
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
    plot.pyplot().close(figures[0])


def test_read_metrics_skips_a_cut_last_line_and_refuses_a_bad_earlier_one(tmp_path, capsys):
    """A run killed mid-write leaves its last metrics line cut short: r3.train drops it when it
    resumes, so r3.plot skips it too (with a warning); a bad line before the last is an error."""
    from r3.errors import R3Error

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_row(1)) + "\n" + json.dumps(_row(2)) + "\n" + '{"step": 3, "lo')
    assert [r["step"] for r in plot.read_metrics(tmp_path)] == [1, 2]
    assert "metrics.jsonl: skipping the last line, cut short by an interrupted write" in capsys.readouterr().err
    path.write_text(json.dumps(_row(1)) + "\n" + '{"step": 2, "lo\n' + json.dumps(_row(3)) + "\n\n")
    with pytest.raises(R3Error, match="line 2 is not valid JSON"):
        plot.read_metrics(tmp_path)


@pytest.mark.parametrize("lines, match", [
    (["[1, 2]"], "line 1 is not a metrics row"),
    (['{"nums": [3, 5], "target": 8}'], "line 1 is not a metrics row"),  # (a data file, not metrics)
    (['{"step": "1"}'], "line 1 is not a metrics row"),
    (['{"step": true}'], "line 1 is not a metrics row"),
    ([json.dumps(_row(1, kl=True))], "line 1: 'kl' is True, not a number"),
    ([json.dumps(_row(1)), json.dumps(_row(2, loss="x"))], "line 2: 'loss' is 'x', not a number"),
])
def test_read_metrics_refuses_what_is_not_a_metrics_row(tmp_path, lines, match):
    """A file of other rows was plotted as empty panels with exit 0, or was an AttributeError."""
    from r3.errors import R3Error

    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(R3Error, match=match):
        plot.read_metrics(tmp_path)


def test_plot_cli_bad_output_and_options_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_row(1)) + "\n")
    (tmp_path / "a_dir.png").mkdir()
    for args, message in ((["--smooth", "0"], "--smooth must be a window of at least 1 step, got 0"),
                          (["--out", str(tmp_path / "c.txt")], "give a file name ending in .png"),
                          (["--out", str(tmp_path / "a_dir.png")], "is a directory, expected a file")):
        with pytest.raises(SystemExit) as e:
            plot.main([str(tmp_path), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "c.txt").exists()
    import errno

    from matplotlib.figure import Figure

    def read_only(self, *a, **k):  # (the place passed the probe, then the disk went read-only)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Figure, "savefig", read_only)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{tmp_path / 'curves.png'}: cannot write (Read-only file system)" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_smoothing_draws_the_moving_average_over_the_faded_curve(tmp_path, monkeypatch):
    """--smooth N: each series drawn faded as logged, then its moving average over the last N
    points (fewer at the start) in the same colour; without it, one opaque line."""
    run = tmp_path / "run"
    run.mkdir()
    values = [0.0, 3.0, 6.0, 0.0, 3.0]
    (run / "metrics.jsonl").write_text("".join(json.dumps(_row(s + 1, retry_success=v)) + "\n"
                                               for s, v in enumerate(values)))
    figures = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, out: figures.append(fig) or out)
    for window, want in ((2, [0.0, 1.5, 4.5, 3.0, 1.5]), (3, [0.0, 1.5, 3.0, 3.0, 3.0])):
        plot.plot([run], tmp_path / "c.png", window)
        axes = {ax.get_title(): ax for ax in figures[-1].axes}
        raw, smoothed = axes["retry success (reward)"].lines
        assert list(raw.get_ydata()) == values and raw.get_alpha() == 0.35
        assert list(smoothed.get_ydata()) == pytest.approx(want) and smoothed.get_color() == raw.get_color()
    assert plot.smooth(values, 1) == values
    plot.plot([run], tmp_path / "c.png")
    (line,) = {ax.get_title(): ax for ax in figures[-1].axes}["retry success (reward)"].lines
    assert line.get_alpha() == 1.0


def test_several_runs_are_overlaid_with_a_legend_of_their_names(tmp_path, monkeypatch):
    runs = []
    for name in ("base", "tuned"):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(_row(s)) + "\n" for s in (1, 2, 3)))
        runs.append(run)
    figures = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, out: figures.append(fig) or out)
    plot.plot(runs, tmp_path / "c.png")
    legends = [ax.get_legend() for ax in figures[-1].axes if ax.get_legend() is not None]
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == ["base", "tuned"]
    plot.plot(runs[:1], tmp_path / "c.png")
    assert all(ax.get_legend() is None for ax in figures[-1].axes)


def test_plot_cli_given_a_metrics_file_writes_beside_it(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_row(1)) + "\n")
    plot.main([str(tmp_path / "metrics.jsonl")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_metrics_file_without_rows_is_one_line_and_an_upper_case_png_is_a_png(tmp_path, capsys):
    """A metrics.jsonl with no rows yet (only blank lines) is an error naming it, not an empty
    picture; ``--out CURVES.PNG`` is a PNG name like ``curves.png``."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n\n")
    with pytest.raises(SystemExit) as e:
        plot.main([str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{run / 'metrics.jsonl'}: no rows yet" in err and err.count("\n") == 1
    assert not (run / "curves.png").exists()
    (run / "metrics.jsonl").write_text("".join(json.dumps(_row(s)) + "\n" for s in (1, 2)))
    plot.main([str(run), "--out", str(tmp_path / "CURVES.PNG")])
    assert (tmp_path / "CURVES.PNG").stat().st_size > 0


def test_the_legend_of_several_runs_is_on_a_panel_that_has_their_lines(tmp_path, monkeypatch):
    """Runs that never logged retry success (no first attempt failed): the legend naming the runs
    goes to the first panel with lines, not to the empty first panel (an empty legend)."""
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        rows = [_row(s, retry_success=None, first_try_success=0.5) for s in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    figures = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, out: figures.append(fig) or out)
    plot.plot(runs, tmp_path / "c.png")
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    assert axes["retry success (reward)"].get_legend() is None
    assert [t.get_text() for t in axes["first-attempt success"].get_legend().get_texts()] == ["a", "b"]
    plot.pyplot().close("all")  # (figures kept from save_figure: closed, as save_figure would)
