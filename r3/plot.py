"""``python -m r3.plot DIR``: PNG curves from a run's ``metrics.jsonl`` (reward, KL, lengths, time).

Writes ``DIR/curves.png`` (or ``--out FILE``). Several run directories can be overlaid.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from r3.errors import ArgumentParser, R3Error, cli_main
from r3.files import check_out_path, fsync_file, read_json_lines

PANELS = (
    ("retry_success", "retry success (reward)"),
    ("first_try_success", "first-attempt success"),
    ("kl", "KL to reference (k3)"),
    ("reflection_len_mean", "reflection length (tokens)"),
    ("loss", "loss"),
    ("step_time_s", "step time (s)"),
)
#: Panels with at most this many points get markers.
MARKERS_UP_TO = 60


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise R3Error(f"{path}: no metrics.jsonl (is this an r3.train output directory?)")
    rows = []
    for n, row in read_json_lines(path, lambda n, e: R3Error(f"{path}: line {n} is not valid JSON")):
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise R3Error(f"{path}: line {n} is not a metrics row (a JSON object with an integer 'step'); "
                          "is this an r3.train metrics.jsonl?")
        for key, _ in PANELS:
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise R3Error(f"{path}: line {n}: {key!r} is {value!r}, not a number")
        rows.append(row)
    if not rows:
        raise R3Error(f"{path}: no rows yet")
    return rows


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(runs: list[Path], out: Path, window: int = 1) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    from matplotlib.ticker import MaxNLocator

    for ax, (_, title) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (steps: no 1.2, 1.4 on a short run)
    drawn = set()
    for run in runs:
        rows = read_metrics(run)
        for ax, (key, _) in zip(axes.flat, PANELS):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            drawn.add(key)
            xs, ys = zip(*pts)
            # markers while points are few: a metric logged on few steps (KL: only steps that
            # trained a token) would otherwise be an invisible single point or short segments
            line = ax.plot(xs, ys, alpha=0.35 if window > 1 else 1.0, label=run.name,
                           marker="o" if len(pts) <= MARKERS_UP_TO else None, markersize=3)
            if window > 1:
                ax.plot(xs, smooth(list(ys), window), color=line[0].get_color())
            ax.grid(alpha=0.3)
    for ax, (key, _) in zip(axes.flat, PANELS):
        if key not in drawn:  # (KL is logged only for steps that trained a token)
            why = " (only a step that trains a token logs it)" if key == "kl" else ""
            ax.text(0.5, 0.5, f"no {key} logged{why}", ha="center", va="center", transform=ax.transAxes, alpha=0.6)
    if len(runs) > 1:
        drawn_axes = [ax for ax, (key, _) in zip(axes.flat, PANELS) if key in drawn]
        if drawn_axes:
            drawn_axes[0].legend()
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Save a matplotlib figure as a PNG through a temporary file and a rename, then close it."""
    plt = pyplot()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=110)
        fsync_file(tmp)  # (before the rename: see r3.files.fsync_tree)
        os.replace(tmp, out)
    except OSError as e:
        raise R3Error(f"{out}: cannot write ({e.strerror or type(e).__name__})") from None
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out


@cli_main
def main(argv=None):
    ap = ArgumentParser(prog="python -m r3.plot", description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path, help="r3.train output directories (or metrics.jsonl files)")
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: FIRST_RUN/curves.png)")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        raise R3Error(f"--smooth must be a window of at least 1 step, got {args.smooth}")
    for r in args.runs:
        if not r.exists():
            raise R3Error(f"run directory '{r}' does not exist")
    first = args.runs[0]
    out = args.out or ((first if first.is_dir() else first.parent) / "curves.png")
    if out.suffix.lower() != ".png":
        raise R3Error(f"--out {out}: the curves are a PNG; give a file name ending in .png")
    check_out_path(str(out))
    print(plot(args.runs, out, args.smooth))


if __name__ == "__main__":
    main()
