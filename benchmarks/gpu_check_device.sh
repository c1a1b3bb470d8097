#!/usr/bin/env bash
# benchmarks/gpu_check.py as one command for a lent GPU machine (the device tool's `run`), run from
# the repository root. That machine has torch, transformers and triton but not this package or
# the built-in model's GGUF file, so prepare the tokenizer here first, once:
#
#   python -c "from r3.checkpoint import load; load('smollm2-135m', tokenizer=True)[1].save_pretrained('.gpu_tokenizer')"
#   echo /.gpu_tokenizer/ >> .git/info/exclude
#
# then run `bash benchmarks/gpu_check_device.sh` with carry [".gpu_tokenizer"] and a timeout_s of
# about 590. The JSON, the Markdown and the log land in $OUT (benchmarks/results without it).
# All sections may not fit in one 10-minute call; split them over calls on the warm machine,
# `SECTIONS=env,parity,sampler` first (parity, then the decode measurements: the step compiles
# four times, greedy and sampled, in graph runs and per step), then `SECTIONS=train` (the kernel
# section, unchanged since it was measured, is left out; each run's files are named after its
# sections, and each keeps a log of its own).
# SECTIONS (default: all), TRAIN_TIMEOUT (seconds per training run, default 200) and EXTRA (more
# arguments) adjust it; each section's results are written as soon as it ends.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
args=(--out "$out" --sections "${SECTIONS:-env,parity,kernel,sampler,train}" --train-timeout "${TRAIN_TIMEOUT:-200}")
if [ -d .gpu_tokenizer ]; then args+=(--tokenizer .gpu_tokenizer); fi
# shellcheck disable=SC2206  # EXTRA is split into words on purpose
args+=(${EXTRA:-})
log="$out/gpu_check${SECTIONS:+_${SECTIONS//,/_}}.log"
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) 2>&1 | tee "$log"
python3 benchmarks/gpu_check.py "${args[@]}" 2>&1 | tee -a "$log"
