#!/usr/bin/env bash
# The real-GPU checks of the speed issue as one command, for a lent device machine (the
# workplace's `device` tool) or any host with a GPU: the conformance suite with freshly
# measured kernel shapes, the kernel benchmark, and the model benchmark (prompt,
# generation, training shape) on the committed tiny models on the GPU and on the host path,
# plus SmolLM2 if EDGETUNE_SMOLLM2 names it. Everything lands as JSON in $OUT (the device
# tool's output folder) or target/device.
#
# Prepare here (the device machine has no Rust and no network):
#   cargo build --release -p edgetune-cli && mkdir -p .devbin &&
#       strip -o .devbin/edgetune target/release/edgetune
# and fetch the Vulkan loaders into .gl once (see the device tool's README); then run there
# with carry [".gl", ".devbin"]:  bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/device}
mkdir -p "$out"
if [ -d .gl ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$nvidia_icd" ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
    export VK_DRIVER_FILES=$nvidia_icd
fi
bin=${EDGETUNE_BIN:-.devbin/edgetune}
[ -x "$bin" ] || bin=target/release/edgetune
export EDGETUNE_CACHE_DIR=$out/cache
{
    echo "binary: $bin"
    grep -m1 'model name' /proc/cpuinfo
    echo "threads: $(nproc)"
    command -v nvidia-smi >/dev/null && nvidia-smi -L
} > "$out/info.txt" 2>&1
# Exit codes are kept in the files, not acted on: every check runs even if one fails.
"$bin" selftest --backend gpu --kernel-shapes measure --json > "$out/selftest.jsonl" 2> "$out/stderr.txt"
echo "selftest exit $?" >> "$out/info.txt"
"$bin" bench --backend gpu --seconds 0.3 --json > "$out/kernels.json" 2>> "$out/stderr.txt"
echo "kernel bench exit $?" >> "$out/info.txt"
models=(tests/golden/tiny/llama_gqa_tied/q8_0.gguf tests/golden/tiny/qwen2_gqa_bias/q8_0.gguf)
if [ -n "${EDGETUNE_SMOLLM2:-}" ] && [ -f "$EDGETUNE_SMOLLM2" ]; then
    models+=("$EDGETUNE_SMOLLM2")
fi
: > "$out/models.jsonl"
for m in "${models[@]}"; do
    [ -f "$m" ] || continue
    case $m in
        *tiny*) size=(--prompt-tokens 32 --gen-tokens 16 --train 4x32) ;;
        *) size=(--prompt-tokens 512 --gen-tokens 128 --train 4x128) ;;
    esac
    for backend in gpu host; do
        "$bin" bench --backend "$backend" --model "$m" "${size[@]}" --json \
            >> "$out/models.jsonl" 2>> "$out/stderr.txt"
        echo "model bench $backend $m exit $?" >> "$out/info.txt"
    done
done
cat "$out/info.txt"
