#!/usr/bin/env bash
# Model benchmark with its peer, side by side in one run: prompt processing (ppN),
# generation after it (tgN) and the training shape (trainBxT, loss at every position), with
# tokens/s and each test's peak RSS, for edgetune (wgpu adapter, the multi-threaded CPU
# path, the CPU reference) and llama.cpp's CPU backend (llama-cpp-python, the same thread
# count). Writes the run as JSON lines and prints it with the ratios to llama.cpp through
# scripts/bench_compare.py; with a baseline run, also the change per test.
# Usage: scripts/bench_model.sh MODEL.gguf [prompt_tokens] [gen_tokens] [BASELINE.jsonl]
# Environment: BENCH_OUT (default target/bench/<time>.jsonl), BENCH_BACKENDS (default
# "gpu host cpu"), BENCH_TRAIN (default 4x128).
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
echo "run written to $out"
python3 scripts/bench_compare.py $baseline "$out"
