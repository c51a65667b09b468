#!/usr/bin/env bash
# Model benchmark with its peer, side by side in one run: prompt processing and generation
# tokens/s and peak RSS on the same GGUF, for edgetune (wgpu adapter, the multi-threaded
# CPU path, the CPU reference) and llama.cpp's CPU backend (llama-cpp-python, the same
# thread count). Prints the host's processor flags that matter for the CPU paths.
# Usage: scripts/bench_model.sh MODEL.gguf [prompt_tokens] [gen_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
pp=${2:-512}
tg=${3:-128}
python3 -c 'import llama_cpp' 2>/dev/null || pip install -q llama-cpp-python
cargo build --release -q -p edgetune-cli
threads=$(nproc)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $threads threads;" \
    "flags: $(grep -m1 -o -w -E 'avx512f|avx2|fma|neon|asimd' /proc/cpuinfo | sort -u | xargs)"
./target/release/edgetune bench --backend gpu --model "$model" --prompt-tokens "$pp" --gen-tokens "$tg"
./target/release/edgetune bench --backend host --model "$model" --prompt-tokens "$pp" --gen-tokens "$tg"
./target/release/edgetune bench --backend cpu --model "$model" --prompt-tokens "$pp" --gen-tokens "$tg"
python3 scripts/llama_cpp_peer.py "$model" "$pp" "$tg" "$threads"
