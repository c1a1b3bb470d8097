"""r3's sampler against transformers' ``generate`` on the same weights, dtype, batch and length.

Both sides produce exactly ``--new-tokens`` tokens per row (r3: no stop tokens; transformers: no
eos), from the same random prompts, and are timed end to end (prefill + decode) in the same
process, alternating, best of ``--repeats`` after one warm-up. Rows:

* plain batches: B prompts, greedy (r3 ``temperature=0`` / transformers ``do_sample=False``);
* G-sample groups: P prompts x G samples at temperature 1 (r3 prefills each prompt once and forks
  its cache; transformers ``num_return_sequences=G``, ``top_k=0``).

r3 runs twice per repeat: the eager decode step and ``decode="compiled"`` (the same step through
``torch.compile``, compiled in the warm-up; the first call's time is recorded as
``r3c_first_call_s``). ``--no-compiled`` skips the latter.

The model is the built-in SmolLM2-135M (transformers gets a dense ``LlamaForCausalLM`` holding the
same weights), or a randomly initialised model of a real architecture's shape
(``--model-shape qwen2.5-1.5b``, meant for a GPU).

    python benchmarks/bench_sampler.py --json benchmarks/results/sampler_cpu.json \\
        --markdown benchmarks/results/sampler_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r3.checkpoint import hf_state_dict, load  # noqa: E402
from r3.model import ModelConfig, Transformer, fuse_checkpoint_tensors  # noqa: E402
from r3.precision import cpu_description  # noqa: E402
from r3.sampler import generate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_plan import SHAPES as PUBLIC_SHAPES  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

SHAPES = {"qwen2.5-1.5b": PUBLIC_SHAPES["qwen2.5-1.5b"],
          # Qwen3.5-0.8B's text model (its config.json's text_config): Gated DeltaNet layers three in four
          "qwen3.5-0.8b": PUBLIC_SHAPES["qwen3.5-0.8b"]}


def random_hf(spec: dict, dtype, device="cpu", seed: int = 0):
    """A transformers causal LM of a hub-style config ``spec`` with random weights (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**spec)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()


def random_pair(spec: dict, dtype, device, name: str = "random", seed: int = 0):
    """-> (our model, transformers model) of a hub-style config ``spec`` with random weights.

    Ours aliases transformers' tensors (no second copy of a big model)."""
    hf = random_hf(spec, dtype, device, seed)
    return ours_from_hf(hf, name), hf


def ours_from_hf(hf, name: str = "random"):
    """Our model holding the tensors of the transformers model ``hf`` (aliasing them, except the
    projections we hold fused: q/k/v and gate/up are concatenated copies)."""
    ours_cfg = ModelConfig.from_hf(hf.config.to_dict(), source=name)
    with torch.device("meta"):
        ours = Transformer(ours_cfg)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    sd = fuse_checkpoint_tensors(ours_cfg, sd)
    if ours_cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    ours.load_state_dict(sd, assign=True, strict=not ours_cfg.tie_word_embeddings)
    ours.tie_weights()
    return ours.eval()


def build_models(args, dtype, device):
    """-> (our model, transformers model) sharing the same weights."""
    if args.model_shape:
        spec = dict(SHAPES[args.model_shape])
        if args.num_layers:
            spec["num_hidden_layers"] = args.num_layers
        return random_pair(spec, dtype, device, name=args.model_shape)
    ours, _ = load(args.model, dtype=dtype, device=device, tokenizer=False)
    return ours, hf_twin(ours, dtype, device)


def hf_twin(ours, dtype, device):
    """A transformers model holding a copy of our model's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**ours.config.to_hf(dtype))
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_r3(model, prompts, n, G, device, compiled=False):
    _sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=n, temperature=1.0 if G > 1 else 0.0, num_samples=G, seed=0,
                   decode="compiled" if compiled else "eager")
    _sync(device)
    dt = time.perf_counter() - t0
    assert all(len(t) == n for t in out.tokens)
    return dt, out


def run_hf(hf, prompts, n, G, device):
    from transformers import GenerationConfig

    # No eos at all (an unset eos in the config passed would be filled in from the model's, and
    # rows that hit it would be padded): every row really decodes n tokens, as r3's do.
    hf.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, device=device)
    if G > 1:
        cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G,
                               max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    else:
        cfg = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    _sync(device)
    dt = time.perf_counter() - t0
    assert out.shape == (len(prompts) * G, ids.shape[1] + n), out.shape
    return dt, out


def prefix_agreement(a: list[list[int]], b: list[list[int]], n: int) -> float:
    """The fraction of the n tokens per row that are equal before the rows' first difference."""
    same = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), n) for r, s in zip(a, b)]
    return sum(same) / (len(same) * n)


def case_prompts(B: int, G: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """The random prompts of the case (B prompts, G samples each): the same in every run."""
    g = torch.Generator().manual_seed(B * 1000 + G)
    return torch.randint(0, vocab, (B, prompt_len), generator=g).tolist()


def bench_case(ours, hf, *, B, G, n, prompt_len, repeats, device, vocab, compiled=True):
    prompts = case_prompts(B, G, prompt_len, vocab)
    rows = B * G
    run_r3(ours, prompts, min(n, 4), G, device)  # warm-up (allocators, oneDNN primitives)
    t0 = time.perf_counter()
    if compiled:  # warm-up; the first one compiles (or finds inductor's on-disk cache)
        run_r3(ours, prompts, min(n, 4), G, device, compiled=True)
    warm_compiled_s = time.perf_counter() - t0
    run_hf(hf, prompts, min(n, 4), G, device)
    r3_times, rc_times, hf_times, load = [], [], [], []
    out = ref = outc = None
    for _ in range(repeats):
        dt, out = run_r3(ours, prompts, n, G, device)
        r3_times.append(dt)
        if compiled:
            dt, outc = run_r3(ours, prompts, n, G, device, compiled=True)
            rc_times.append(dt)
        dt, ref = run_hf(hf, prompts, n, G, device)
        hf_times.append(dt)
        load.append(os.getloadavg()[0])
    r3_best, hf_best = min(r3_times), min(hf_times)
    rc_best = min(rc_times) if rc_times else None
    agree = None
    if G == 1:  # sanity: greedy continuations agree (up to near-ties; bf16 rounding differs)
        agree = prefix_agreement(out.tokens, ref[:, prompt_len:].tolist(), n)
    return {
        "batch": B, "group": G, "rows": rows, "prompt_len": prompt_len, "new_tokens": n,
        "mode": "sample T=1" if G > 1 else "greedy",
        "r3_s": r3_best, "hf_s": hf_best,
        "r3_tok_s": rows * n / r3_best, "hf_tok_s": rows * n / hf_best, "ratio": hf_best / r3_best,
        "r3_prefill_s": out.prefill_s, "r3_decode_ms_per_step": 1e3 * out.decode_s / out.steps,
        "greedy_agreement": agree,
        "r3c_s": rc_best, "r3c_tok_s": rows * n / rc_best if rc_best else None,
        "ratio_compiled": hf_best / rc_best if rc_best else None,
        "r3c_decode_ms_per_step": 1e3 * outc.decode_s / outc.steps if outc else None,
        "r3c_first_call_s": warm_compiled_s if compiled else None,
        "compiled_equals_eager": (outc.tokens == out.tokens) if outc else None,
        "r3_all_s": r3_times, "r3c_all_s": rc_times, "hf_all_s": hf_times, "loadavg_1m": load,
    }


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# Sampler throughput: r3 vs transformers `generate` ({meta['device_name']})",
        "",
        f"Model: {meta['model']}; prompts {meta['prompt_len']} random tokens; every row generates exactly "
        f"the stated number of new tokens on both sides; tokens/s = rows x new tokens / wall time of the "
        f"whole call (prefill + decode), best of {meta['repeats']} (after a warm-up), r3 and transformers "
        f"alternating in one process. torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['threads']} threads; 1-min load average before: {meta['loadavg_before']:.2f}, "
        f"after: {meta['loadavg_after']:.2f}.",
        "",
        "r3 = eager decode step; r3 compiled = `decode=\"compiled\"` (torch.compile of the same step, "
        "compiled once before timing).",
        "",
        "| dtype | batch | G | rows | new tokens | mode | r3 tok/s | r3 compiled tok/s | transformers tok/s "
        "| ratio | ratio compiled | r3 / compiled decode ms/step | r3 prefill s | greedy agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        rc = r.get("r3c_tok_s")
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['group']} | {r['rows']} | {r['new_tokens']} | {r['mode']} | "
            f"{r['r3_tok_s']:.1f} | {_fmt(rc, 1)} | {r['hf_tok_s']:.1f} | **{r['ratio']:.2f}x** | "
            f"**{_fmt(r.get('ratio_compiled'), 2)}x** | "
            f"{r['r3_decode_ms_per_step']:.1f} / {_fmt(r.get('r3c_decode_ms_per_step'), 1)} | {r['r3_prefill_s']:.2f} | "
            f"{_fmt(r['greedy_agreement'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--model-shape", choices=sorted(SHAPES), default=None,
                   help="random weights of this architecture instead of --model (for a GPU)")
    p.add_argument("--num-layers", type=int, default=None, help="with --model-shape: fewer layers (smoke tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16,fp32", help="comma list of bf16, fp32, fp16")
    p.add_argument("--batch", default="1,16,64", help="comma list of batch sizes (greedy rows)")
    p.add_argument("--groups", default="4x8", help="comma list of PxG sample groups ('' for none)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled decode step (decode=\"compiled\")")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write a markdown table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    device = args.device
    dev_name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else (
        f"CPU: {cpu_description()}")
    cases = [(int(b), 1) for b in args.batch.split(",") if b]
    cases += [tuple(int(x) for x in g.split("x")) for g in args.groups.split(",") if g]
    results = {
        "meta": {
            "model": args.model_shape and f"{args.model_shape} (random init)" or args.model,
            "device": device, "device_name": dev_name, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "prompt_len": args.prompt_len, "repeats": args.repeats, "loadavg_before": os.getloadavg()[0],
        },
        "rows": [],
    }
    print(f"# {results['meta']['model']} on {dev_name}, load {os.getloadavg()[0]:.2f}", flush=True)
    for dname in args.dtype.split(","):
        dtype = DTYPES[dname]
        ours, hf = build_models(args, dtype, device)
        vocab = ours.config.vocab_size
        for B, G in cases:
            r = bench_case(ours, hf, B=B, G=G, n=args.new_tokens, prompt_len=args.prompt_len,
                           repeats=args.repeats, device=device, vocab=vocab, compiled=not args.no_compiled)
            r["dtype"] = dname
            results["rows"].append(r)
            print(f"{dname:5s} B={B:<3d} G={G:<2d} rows={B * G:<3d} r3 {r['r3_tok_s']:8.1f} tok/s  "
                  f"compiled {_fmt(r['r3c_tok_s'], 1)} tok/s  "
                  f"transformers {r['hf_tok_s']:8.1f} tok/s  ratio {r['ratio']:.2f}x / {_fmt(r['ratio_compiled'], 2)}x  "
                  f"(r3 {r['r3_decode_ms_per_step']:.1f} ms/step, prefill {r['r3_prefill_s']:.2f}s; "
                  f"greedy agreement {_fmt(r['greedy_agreement'])}; "
                  f"load {r['loadavg_1m'][-1]:.2f})", flush=True)
        del ours, hf
    results["meta"]["loadavg_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
