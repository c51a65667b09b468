#!/usr/bin/env bash
# Model benchmark with its peer, side by side in one run: prompt processing and generation
# tokens/s and peak RSS on the same GGUF, for edgetune (wgpu adapter, CPU reference) and
# llama.cpp's CPU backend (llama-cpp-python, same thread count).
# Usage: scripts/bench_model.sh MODEL.gguf [prompt_tokens] [gen_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
pp=${2:-512}
tg=${3:-128}
python3 -c 'import llama_cpp' 2>/dev/null || pip install -q llama-cpp-python
cargo build --release -q -p edgetune-cli
./target/release/edgetune bench --model "$model" --prompt-tokens "$pp" --gen-tokens "$tg"
./target/release/edgetune bench --backend cpu --model "$model" --prompt-tokens "$pp" --gen-tokens "$tg"
python3 scripts/llama_cpp_peer.py "$model" "$pp" "$tg" 2
