"""Benchmark r3.rms_norm's norms against autograd through the same norms' plain tensor ops.

Providers:
  plain       the norm as tensor ops (r3.rms_norm._plain_rms_norm / _plain_gated_rms_norm):
              autograd keeps the fp32 upcast and the normalised values
  recomputed  r3.rms_norm.rms_norm / gated_rms_norm: keeps the input (and gate) and one fp32
              value per row; the backward pass recomputes the rest

For each case (style, rows x width, dtype) it reports forward + backward time (the best run of
--rounds rounds of the two providers in turn, each --repeats runs after a warm-up; gradients for
the input, weight and gate) and the bytes autograd
keeps for the backward pass per value of the input (saved_tensors_hooks; parameters excluded).
Cases: a Qwen2.5-1.5B / 7B block's input norm (Llama style, widths 1536 / 3584), Qwen 3.5's
(1 + w) norm (width 1024) and its gated norm over 16 heads of 128 values per token.

  python benchmarks/bench_rms_norm.py --json benchmarks/results/rms_norm_cpu.json \
      --md benchmarks/results/rms_norm_cpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r3 import rms_norm as rn  # noqa: E402
from r3.files import write_json_atomic, write_text_atomic  # noqa: E402
from r3.precision import cpu_description  # noqa: E402

# (name, style, rows, width): rows are tokens (x 16 heads for the gated norm)
CASES = [
    ("Qwen2.5-1.5B input norm", "", 4096, 1536),
    ("Qwen2.5-7B input norm", "", 4096, 3584),
    ("Qwen 3.5 (1 + w) norm", "gemma", 4096, 1024),
    ("Qwen 3.5 gated norm", "gated", 4096 * 16, 128),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _call(provider: str, style: str, x, w, z):
    if style == "gated":
        fn = rn.gated_rms_norm if provider == "recomputed" else rn._plain_gated_rms_norm
        return fn(x, z, w, 1e-6)
    fn = rn.rms_norm if provider == "recomputed" else rn._plain_rms_norm
    return fn(x, w, 1e-6, style)


def measure(provider: str, style: str, rows: int, width: int, dtype, repeats: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(device, dtype).requires_grad_()
    z = torch.randn(rows, width, generator=g).to(device, dtype).requires_grad_() if style == "gated" else None
    gy = torch.randn(rows, width, generator=g).to(device, dtype)
    leaves = [t for t in (x, w, z) if t is not None]
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.autograd.grad(_call(provider, style, x, w, z), leaves, gy)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.autograd.grad(_call(provider, style, x, w, z), leaves, gy)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"provider": provider, "ms": min(times[1:]) * 1e3, "saved_bytes_per_value": sum(kept.values()) / x.numel()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of both providers in turn (the best run counts)")
    p.add_argument("--scale", type=float, default=1.0, help="rows x this (tests run small shapes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--md", type=Path, default=None, help="write the table as Markdown")
    args = p.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    rows_out = []
    for name, style, rows, width in CASES:
        rows = max(1, int(rows * args.scale))
        for dname in args.dtype:
            got: dict[str, dict] = {}
            for _ in range(args.rounds):  # (alternating: the host's load drifts)
                for prov in ("plain", "recomputed"):
                    m = measure(prov, style, rows, width, DTYPES[dname], args.repeats, args.device)
                    got[prov] = m if prov not in got or m["ms"] < got[prov]["ms"] else got[prov]
            rows_out.append({"case": name, "style": style or "llama", "rows": rows, "width": width, "dtype": dname,
                             **{f"{k}_{m}": v[m] for k, v in got.items() for m in ("ms", "saved_bytes_per_value")}})
    head = ("| case | rows x width | dtype | plain ms | recomputed ms | speed-up | plain bytes kept / value "
            "| recomputed bytes kept / value |\n|---|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {r['case']} | {r['rows']} x {r['width']} | {r['dtype']} | {r['plain_ms']:.1f} | {r['recomputed_ms']:.1f} "
        f"| {r['plain_ms'] / r['recomputed_ms']:.2f}x | {r['plain_saved_bytes_per_value']:.2f} "
        f"| {r['recomputed_saved_bytes_per_value']:.2f} |" for r in rows_out]
    table = "\n".join(lines)
    threads = torch.get_num_threads()
    print(f"RMS norm forward + backward on {device_name} ({threads} threads), best of {args.rounds} x "
          f"{args.repeats}:\n")
    print(table)
    result = {"device": device_name, "threads": threads, "rounds": args.rounds, "repeats": args.repeats,
              "torch": torch.__version__,
              "rows": rows_out}
    if args.json:
        write_json_atomic(args.json, result)
    if args.md:
        write_text_atomic(args.md, (
            f"# RMS norms: recomputed against autograd through the plain ops\n\n"
            f"Forward + backward (gradients of the input, weight and gate) on {device_name}, {threads} threads, "
            f"torch {torch.__version__}, the best of {args.rounds} rounds of {args.repeats} runs (the two in turn); "
            f"bytes kept: what autograd saves for the backward pass per input value (parameters excluded).\n\n{table}\n\n"
            f"Made with `python benchmarks/bench_rms_norm.py --rounds {args.rounds} --repeats {args.repeats} --json "
            f"{args.json} --md {args.md}`. It does not show a "
            f"GPU, a whole block, or the backward pass's temporaries (the recomputed norm's fp32 working set).\n"))
    return result


if __name__ == "__main__":
    main()
