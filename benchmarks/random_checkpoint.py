"""Write a randomly initialised Hugging Face checkpoint of a real architecture's shape (one of
``bench_sampler.py``'s ``--model-shape`` names, optionally with fewer layers), with the built-in
model's tokenizer, for benchmarks that load a model directory (``bench_train_step.py --model``).

    python benchmarks/random_checkpoint.py qwen3.5-0.8b /tmp/q35 --num-layers 4

Random weights: for timing and memory, not for anything a trained model's outputs would show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sampler import SHAPES, random_hf  # noqa: E402
from r3.checkpoint import load_tokenizer  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", help="the directory to write (config.json, weights, tokenizer)")
    ap.add_argument("--num-layers", type=int, default=None, help="fewer layers than the shape's")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    spec = dict(SHAPES[args.shape])
    if args.num_layers is not None:
        spec["num_hidden_layers"] = args.num_layers
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = random_hf(spec, dtype, seed=args.seed)
    model.save_pretrained(args.out)
    load_tokenizer("smollm2-135m").save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.shape}, {spec['num_hidden_layers']} layers, {n / 1e6:.0f}M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
