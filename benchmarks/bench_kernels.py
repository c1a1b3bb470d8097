"""Benchmark fused_logprob_kl against torch eager and torch.compile of the naive reference.

Providers:
  eager    log_softmax(logits.float() / T) + gather + k3 (r3.kernels.logprob_kl_reference)
  compile  torch.compile of the same function (Inductor; on CPU it needs a C++ compiler)
  r3       r3.kernels.fused_logprob_kl: Triton on CUDA, the chunked PyTorch path on CPU

For each (N, V, dtype) it measures the forward alone (no autograd) and forward + backward
(gradient of logp.sum() + kl.sum() w.r.t. the logits): the best of --repeats timed runs after
--warmup untimed ones (the median is in the JSON too).

Effective bandwidth counts only the bytes that *must* move: the forward reads the logits once
(N*V*elem); forward + backward reads them twice and writes dlogits once (3*N*V*elem). The [N]-sized
inputs and outputs are ignored. "% peak" divides by --peak-gbps (default per known GPU name).

Peak extra memory is what the forward + backward allocates beyond the logits already resident
(the dlogits it returns included, which is 1.0x the logits for the same dtype). On CUDA it is
torch.cuda.max_memory_allocated() minus the allocation before the call (exact, allocator level).
On CPU it is the peak resident-set-size increase of the process, sampled every ~0.5 ms from
/proc/self/statm during one call after malloc_trim (approximate: allocator caching and sampling
can over- or under-state it by a chunk).

Memory budget: a provider is skipped for a configuration when its estimated peak exceeds
--max-gb (default: 8 GB on CPU, 90% of GPU memory on CUDA); the eager/compile reference needs about
logits + 3 fp32 [N, V] tensors for forward + backward. Skips are listed in the output.

Examples:
  python benchmarks/bench_kernels.py                       # CPU here: N=1024,4096, all V, bf16+fp32
  python benchmarks/bench_kernels.py --n 16384 --v 151936 --dtype bf16 --providers r3 compile
  python benchmarks/bench_kernels.py --json benchmarks/results/kernels_cpu.json --md benchmarks/results/kernels_cpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import r3.kernels.logprob_kl as lk  # noqa: E402
from r3.kernels.logprob_kl import fused_logprob_kl, logprob_kl_reference  # noqa: E402
from r3.precision import cpu_description  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# HBM peak GB/s by substring of torch.cuda.get_device_name() (first match wins).
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]


# ------------------------------------------------------------------------------------ providers


def _reference(logits, targets, ref, temperature):
    return logprob_kl_reference(logits, targets, ref, temperature)


def make_providers(names):
    providers = {}
    for name in names:
        if name == "eager":
            providers[name] = _reference
        elif name == "compile":
            providers[name] = None  # built per configuration (fresh dynamo cache, static shapes)
        elif name == "r3":
            providers[name] = fused_logprob_kl
        else:
            raise SystemExit(f"unknown provider {name!r}")
    return providers


def estimated_peak_bytes(provider, N, V, elem):
    """Rough peak for forward + backward, logits included (used only to skip what cannot fit)."""
    nv = N * V
    if provider == "r3":
        return nv * elem * 2 + lk.CPU_CHUNK_BYTES * 2
    # fp32 upcast (bf16 only), log_softmax output (saved), its gradient, the fp32 input gradient,
    # dlogits in the input dtype
    return nv * elem + nv * 4 * (3 + (elem != 4)) + nv * elem


# ------------------------------------------------------------------------------------ measurement


class _Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class _RssPeak:
    """Peak RSS increase while the block runs, sampled by a background thread."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.peak = max(self.peak, _rss_bytes())
        self._stop.set()
        self._thread.join()
        self.extra = self.peak - self.base


def measure(fn, logits, targets, ref, temperature, *, warmup, repeats, device):
    timer = _Timer(device)

    def fwd():
        with torch.no_grad():
            fn(logits, targets, ref, temperature)

    x = logits.detach().requires_grad_()

    def fwd_bwd():
        logp, kl = fn(x, targets, ref, temperature)
        (logp.sum() + kl.sum()).backward()
        x.grad = None

    out = {}
    for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for _ in range(warmup):
            f()
        times = [timer(f) for _ in range(repeats)]
        out[name + "_s"] = min(times)  # best of: robust to other processes on shared cores
        out[name + "_median_s"] = statistics.median(times)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd()
        torch.cuda.synchronize()
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        with _RssPeak() as rss:
            fwd_bwd()
        out["peak_extra_bytes"] = rss.extra
    return out


# ------------------------------------------------------------------------------------ main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="rows (tokens); CPU default 1024 4096, CUDA 4096 16384")
    p.add_argument("--v", type=int, nargs="+", default=[32000, 49152, 128256, 151936])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--providers", nargs="+", default=["eager", "compile", "r3"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs (best is reported); CPU default 3, CUDA 20")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first; CPU default 1, CUDA 5")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth for %% of peak")
    p.add_argument("--max-gb", type=float, default=None, help="skip a provider whose estimated peak exceeds this")
    p.add_argument("--block-v", type=int, default=None, help="Triton BLOCK_V override (tuning)")
    p.add_argument("--num-warps", type=int, default=None, help="Triton num_warps override (tuning)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON")
    p.add_argument("--md", type=Path, default=None, help="write the table as Markdown")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = args.n or ([4096, 16384] if cuda else [1024, 4096])
    repeats = args.repeats or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args.block_v:
        lk.TRITON_CONFIG_OVERRIDE["block_v"] = args.block_v
    if args.num_warps:
        lk.TRITON_CONFIG_OVERRIDE["num_warps"] = args.num_warps

    if cuda:
        dev_name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        max_bytes = (args.max_gb * 1e9) if args.max_gb else 0.9 * total
        peak = args.peak_gbps or next((g for k, g in PEAK_GBPS if k in dev_name), None)
        r3_path = "triton" if lk.uses_triton(device) else "torch (no triton)"
    else:
        dev_name = f"CPU {cpu_description()}, {torch.get_num_threads()} torch threads"
        max_bytes = (args.max_gb or 8.0) * 1e9
        peak = args.peak_gbps
        r3_path = "triton interpreter" if lk.uses_triton(device) else "chunked torch"

    providers = make_providers(args.providers)
    notes = [f"command: python benchmarks/bench_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}"]
    if not cuda and args.n is None:
        notes.append("CPU default grid: N in {1024, 4096} (N=16384 x V=151936 fp32 alone is 10 GB of logits); "
                     "N=1024 gives every provider every V within the budget.")
    notes.append(f"budget: providers whose estimated peak exceeds {max_bytes / 1e9:.1f} GB are skipped.")
    if not cuda:
        notes.append("GPU numbers (Triton path) are not in this run.")
        notes.append(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share these cores).")

    results = []
    header = (f"# fused_logprob_kl benchmark on {dev_name}\n"
              f"torch {torch.__version__}, r3 path: {r3_path}, temperature {args.temperature}, "
              f"best of {repeats} (warmup {warmup}), peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'n/a'}")
    print(header, flush=True)
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        elem = torch.empty((), dtype=dtype).element_size()
        for N in ns:
            for V in args.v:
                logits_bytes = N * V * elem
                g = torch.Generator(device="cpu").manual_seed(0)
                logits = (torch.randn(N, V, generator=g, dtype=torch.float32) * 2).to(dtype).to(device)
                targets = torch.randint(0, V, (N,), generator=g).to(device)
                ref = (torch.randn(N, generator=g) * 0.1 - 10).to(device)
                for prov, fn in providers.items():
                    row = dict(provider=prov, dtype=dtype_name, N=N, V=V, logits_gb=logits_bytes / 1e9)
                    est = estimated_peak_bytes(prov, N, V, elem)
                    if est > max_bytes:
                        row["skipped"] = f"estimated peak {est / 1e9:.1f} GB > budget {max_bytes / 1e9:.1f} GB"
                        print(f"  skip {prov:8s} {dtype_name} N={N} V={V}: {row['skipped']}", flush=True)
                        results.append(row)
                        continue
                    try:
                        if prov == "compile":
                            torch._dynamo.reset()
                            fn = torch.compile(_reference, dynamic=False)
                        m = measure(fn, logits, targets, ref, args.temperature,
                                    warmup=warmup, repeats=repeats, device=device)
                    except Exception as e:  # keep going: report what failed
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        print(f"  FAIL {prov:8s} {dtype_name} N={N} V={V}: {row['error']}", flush=True)
                        results.append(row)
                        continue
                    row.update(m)
                    row["fwd_gbps"] = logits_bytes / m["fwd_s"] / 1e9
                    row["fwd_bwd_gbps"] = 3 * logits_bytes / m["fwd_bwd_s"] / 1e9
                    if peak:
                        row["fwd_pct_peak"] = 100 * row["fwd_gbps"] / peak
                        row["fwd_bwd_pct_peak"] = 100 * row["fwd_bwd_gbps"] / peak
                    row["peak_extra_x_logits"] = m["peak_extra_bytes"] / logits_bytes
                    results.append(row)
                    print(f"  {prov:8s} {dtype_name} N={N:6d} V={V:6d}  fwd {m['fwd_s'] * 1e3:9.2f} ms "
                          f"{row['fwd_gbps']:7.1f} GB/s   fwd+bwd {m['fwd_bwd_s'] * 1e3:9.2f} ms "
                          f"{row['fwd_bwd_gbps']:7.1f} GB/s   peak extra {m['peak_extra_bytes'] / 1e9:6.2f} GB "
                          f"({row['peak_extra_x_logits']:.2f}x logits)", flush=True)
                del logits, targets, ref
                gc.collect()

    table = format_table(results, peak, cuda)
    text = header + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + table
    print("\n" + text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=dev_name, torch=torch.__version__, r3_path=r3_path, repeats=repeats, warmup=warmup,
                    temperature=args.temperature, peak_gbps=peak, notes=notes,
                    memory_measure="torch.cuda.max_memory_allocated delta" if cuda
                    else "peak RSS delta sampled every ~0.5 ms (approximate)")
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    return results


def format_table(results, peak, cuda):
    mem_col = "peak extra mem (CUDA alloc)" if cuda else "peak extra mem (RSS delta, approx)"
    cols = ["provider", "dtype", "N", "V", "fwd ms", "fwd GB/s"]
    if peak:
        cols.append("fwd % peak")
    cols += ["fwd+bwd ms", "fwd+bwd GB/s"]
    if peak:
        cols.append("fwd+bwd % peak")
    cols.append(mem_col)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        base = [r["provider"], r["dtype"], str(r["N"]), str(r["V"])]
        if "skipped" in r or "error" in r:
            msg = "skipped: " + r["skipped"] if "skipped" in r else "error: " + r["error"]
            lines.append("| " + " | ".join(base + [msg] + [""] * (len(cols) - 5)) + " |")
            continue
        vals = [f"{r['fwd_s'] * 1e3:.2f}", f"{r['fwd_gbps']:.1f}"]
        if peak:
            vals.append(f"{r['fwd_pct_peak']:.0f}%")
        vals += [f"{r['fwd_bwd_s'] * 1e3:.2f}", f"{r['fwd_bwd_gbps']:.1f}"]
        if peak:
            vals.append(f"{r['fwd_bwd_pct_peak']:.0f}%")
        vals.append(f"{r['peak_extra_bytes'] / 1e9:.2f} GB ({r['peak_extra_x_logits']:.2f}x logits)")
        lines.append("| " + " | ".join(base + vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
