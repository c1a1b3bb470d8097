"""Chat with a model from the command line: ``python -m r3.generate --prompt "Hi"``.

Applies the tokenizer's chat template (with the generation prompt, through
:class:`r3.chat.ChatFormat` as training does), samples with :func:`r3.sampler.generate`, stops
at the template's end-of-turn token and the checkpoint's eos ids, and prints each completion and the
throughput. Mistakes (a bad model path, a bad flag value) print one line and exit with code 2.
"""

from __future__ import annotations

import sys
import time

from r3.chat import ChatFormat, template_options
from r3.checkpoint import load
from r3.cli import DTYPES, parse_chat_template_options, pick_device_dtype
from r3.decode import DECODE_MODES
from r3.errors import ArgumentParser, R3Error, cli_main
from r3.progress import Progress
from r3.sampler import check_sampling_args, generate, sampling_vocab_size
from r3.toolchain import check_toolchain


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m r3.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or built-in name (default: smollm2-135m)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None,
                   help="a system message; --system '' sends an empty one (templates that add a default "
                        "system message when there is none, as SmolLM2's and Qwen2.5's, then add none)")
    p.add_argument("--raw", action="store_true",
                   help="the prompt as plain text, without the chat template (a base model without one): "
                        "the model continues it, stopping at its eos ids")
    p.add_argument("--chat-template-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the chat template, over enable_thinking=false (Qwen3's thinking mode: "
                        "enable_thinking=true); repeatable")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--num-samples", type=int, default=1, help="completions to sample (one shared prefill)")
    p.add_argument("--seed", type=int, default=None, help="the sampling seed (default: a new one each run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="default: auto, bf16 where the device multiplies it natively, else fp32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--decode", choices=DECODE_MODES, default="eager",
                   help="the decode step as it is, or through torch.compile (faster per token; CUDA graphs on GPU; "
                        "compiling takes ~1 min, in an untimed first run of the same generation)")
    p.add_argument("--compile", dest="decode", action="store_const", const="compiled", help="= --decode compiled")
    return p.parse_args(argv)


class DecodeProgress:
    """The decode steps done, on stderr, for a generation that runs a while: nothing in its first
    :data:`QUIET_S` seconds, then a line at most every :data:`EVERY_S` seconds (rewritten in place
    on a terminal)."""

    QUIET_S, EVERY_S = 2.0, 1.0

    def __init__(self, total: int, stream=None):
        self.line = Progress(total, "decoding", unit="steps", stream=stream)
        self.t0 = self.last = time.perf_counter()

    def __call__(self, steps: int) -> None:
        now = time.perf_counter()
        if now - self.t0 >= self.QUIET_S and now - self.last >= (self.EVERY_S if self.line.tty else 10 * self.EVERY_S):
            self.line.update(steps)
            self.last = now

    def close(self) -> None:
        self.line.close()


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise R3Error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise R3Error(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.raw and (args.system is not None or args.chat_template_option):
        raise R3Error(f"--raw samples without the chat template: drop "
                      f"{'--system' if args.system is not None else '--chat-template-option'}")
    chat_options = template_options(parse_chat_template_options(args.chat_template_option))
    device, dtype = pick_device_dtype(args.device, args.dtype)
    check_toolchain(device, compiled_decode=args.decode == "compiled")

    model, tok = load(args.model, dtype=dtype, device=device)
    if tok is None:
        raise R3Error(f"{args.model}: no tokenizer")
    eos = model.config.eos_token_id  # a GGUF's or a config-only checkpoint's eos ids stop it too
    eos_ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if args.raw:
        prompt = tok(args.prompt)["input_ids"]  # (with the BOS the tokenizer adds)
        if not prompt:
            raise R3Error("--prompt is empty: a raw prompt needs at least one token")
        stops = sorted({int(e) for e in eos_ids + [tok.eos_token_id] if e is not None and 0 <= int(e) < len(tok)})
        decode_reply = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + [
            {"role": "user", "content": args.prompt}
        ]
        try:
            chat = ChatFormat(tok, eos_token_ids=eos_ids, template_options=chat_options)
        except R3Error as e:
            hint = "; --raw samples without one" if "no chat template" in str(e) else ""
            raise R3Error(f"{args.model}: {e}{hint}") from None
        prompt = chat.prompt(messages)
        stops = chat.stop_ids
        decode_reply = chat.decode  # (the assistant message: a reasoning block's tags kept)
    limit = model.config.max_position_embeddings
    if len(prompt) + args.max_new_tokens > limit:
        print(f"warning: the prompt ({len(prompt)} tokens) plus --max-new-tokens {args.max_new_tokens} passes the "
              f"model's {limit} positions (max_position_embeddings); text past them is unreliable", file=sys.stderr)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples,
              seed=args.seed, vocab_size=sampling_vocab_size(model, tok), decode=args.decode)
    if args.decode == "compiled":
        # Compile outside the timed run, so tokens/s is the decoding speed: the same call once
        # (same seed, same draws), so every shape the timed run meets (the static cache's size,
        # its KV-length buckets, the CUDA graph runs) is compiled and recorded here.
        t0 = time.perf_counter()
        generate(model, [prompt], max_new_tokens=args.max_new_tokens, stop_token_ids=stops, **kw)
        print(f"[compiled the decode step (one untimed run) in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    bar = DecodeProgress(args.max_new_tokens)
    try:
        out = generate(model, [prompt], max_new_tokens=args.max_new_tokens, stop_token_ids=stops, progress=bar, **kw)
    finally:
        bar.close()
    for i, (toks, fin) in enumerate(zip(out.tokens, out.finished)):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ({len(toks)} tokens{'' if fin else ', truncated'}) ---")
        text = decode_reply(toks)
        print(text if args.raw else text.strip())  # (a raw continuation as it was sampled, spaces included)
    print(
        f"[{out.new_tokens} tokens, prompt {len(prompt)} tokens; prefill {out.prefill_s:.2f}s, "
        f"decode {out.decode_s:.2f}s, {out.tokens_per_s:.1f} tokens/s; {args.model} {str(dtype).removeprefix('torch.')} on {device}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
