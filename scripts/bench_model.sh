#!/usr/bin/env bash
# Model benchmark with its peers, side by side in one run: prompt processing (ppN),
# generation after it (tgN), the training shape (trainBxT, loss at every position), a
# zeroth-order step on it (zoBxT, LoRA r8 on q,v), a fused replay of 1000 seeds and a
# backprop step (bpBxT, the same LoRA, AdamW), with
# tokens/s and each test's peak RSS, for edgetune (wgpu adapter, the multi-threaded CPU
# path, the CPU reference) and llama.cpp's CPU backend (llama-cpp-python, the same thread
# count). Writes the run as JSON lines and prints it with the ratios to llama.cpp through
# scripts/bench_compare.py; with a baseline run, also the change per test.
# Usage: scripts/bench_model.sh MODEL.gguf [prompt_tokens] [gen_tokens] [BASELINE.jsonl]
# Environment: BENCH_OUT (default target/bench/<time>.jsonl), BENCH_BACKENDS (default
# "gpu host cpu"), BENCH_TRAIN (default 4x128), BENCH_TORCH_PYTHON (a python with torch,
# transformers, peft and gguf: adds PyTorch MeZO's step as the peer of zoBxT and PyTorch +
# PEFT's backprop step as the peer of bpBxT).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
pp=${2:-512}
tg=${3:-128}
baseline=${4:-}
train=${BENCH_TRAIN:-4x128}
out=${BENCH_OUT:-target/bench/$(date +%Y%m%d-%H%M%S).jsonl}
python3 -c 'import llama_cpp, numpy' 2>/dev/null || pip install -q llama-cpp-python numpy
cargo build --release -q -p edgetune-cli
threads=$(nproc)
mkdir -p "$(dirname "$out")"
: > "$out"
for backend in ${BENCH_BACKENDS:-gpu host cpu}; do
    ./target/release/edgetune bench --backend "$backend" --model "$model" --json \
        --prompt-tokens "$pp" --gen-tokens "$tg" --train "$train" >> "$out"
done
python3 scripts/llama_cpp_peer.py "$model" "$pp" "$tg" "$threads" --train "$train" --json >> "$out"
# PyTorch MeZO and PyTorch + PEFT backprop, the training peers, where a Python with torch, transformers, peft and
# gguf is given (PyTorch pulls gigabytes of wheels: not installed here).
if [ -n "${BENCH_TORCH_PYTHON:-}" ]; then
    "$BENCH_TORCH_PYTHON" scripts/pytorch_mezo_peer.py "$model" "$threads" "$train" 2>/dev/null >> "$out"
    "$BENCH_TORCH_PYTHON" scripts/pytorch_backprop_peer.py "$model" "$threads" "$train" 2>/dev/null >> "$out"
fi
echo "run written to $out"
python3 scripts/bench_compare.py $baseline "$out"
