#!/usr/bin/env bash
# Builds the firmware for thumbv7em-none-eabihf, runs it under QEMU (mps2-an386, a
# Cortex-M4F), decodes its defmt log with defmt-print, turns the (seed, g) records into a
# run directory (records.py) and replays them with `edgetune replay` on the host's CPU
# reference, its threaded CPU path and the GPU backend (wgpu: lavapipe where there is no
# GPU), and with tools/reference/zo_replay.py (numpy). Every hash must equal the
# firmware's; the last line is `state-hash: <hex>`.
# First, the error paths: a heap too small and a damaged model image each halt cleanly, and
# steps whose losses are not finite are skipped.
set -euo pipefail
cd "$(dirname "$0")"
out=target/run
rm -rf "$out" && mkdir -p "$out"
if ! command -v qemu-system-arm >/dev/null 2>&1; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-arm >/dev/null
fi
if [ "$(defmt-print --version 2>/dev/null | head -n 1)" != "defmt-print 1.1.0" ]; then
    cargo install -q --locked defmt-print --version 1.1.0
fi
cargo fmt --check
for features in "" oom truncated-model non-finite; do
    cargo clippy -q --release --features "$features" -- -D warnings
done

# qemu ELF NAME: runs the firmware, decodes its log into $out/NAME.txt; $rc is its exit.
qemu() {
    rc=0
    timeout 600 qemu-system-arm -M mps2-an386 -nographic -monitor none -serial null \
        -semihosting-config enable=on,target=native -kernel "$1" \
        </dev/null >"$out/$2.bin" 2>"$out/$2.err" || rc=$?
    # A log that does not decode is judged by the checks below, with the log shown.
    defmt-print -e "$1" <"$out/$2.bin" >"$out/$2.txt" || true
}

# The error paths: an allocation failure and a damaged model each halt cleanly, logged,
# with their exit codes; non-finite losses skip their steps, logged.
for fault in oom:2:"out of memory" truncated-model:2:parse non-finite:0:"skipped step=0"; do
    IFS=: read -r feature want text <<<"$fault"
    cargo build -q --release --features "$feature" --target-dir target/fault
    qemu target/fault/thumbv7em-none-eabihf/release/edgetune-firmware "$feature"
    if [ "$rc" != "$want" ] || ! grep -q "$text" "$out/$feature.txt"; then
        echo "feature $feature: exit $rc (want $want), log:"
        cat "$out/$feature.txt" "$out/$feature.err"
        exit 1
    fi
    echo "$feature: exit $rc, $(grep -m1 "$text" "$out/$feature.txt")"
done

cargo build -q --release
elf=target/thumbv7em-none-eabihf/release/edgetune-firmware
qemu "$elf" log
cat "$out/log.txt"
if [ "$rc" != 0 ]; then
    echo "the firmware exited with $rc"
    cat "$out/log.err"
    exit 1
fi
python3 records.py "$out/log.txt" "$out/run"
fw=$(grep -o 'state-hash: [0-9a-f]*' "$out/log.txt" | tail -n 1 | cut -d' ' -f2)
cd ..
# The release CLI: CI built it already for the conformance run, so nothing is rebuilt.
cargo build -q --release -p edgetune-cli
for backend in cpu host gpu; do
    host=$(target/release/edgetune replay --model tests/golden/tiny/llama_gqa_tied/q8_0.gguf \
        --history "embedded/$out/run" --backend "$backend" | grep -o '[0-9a-f]\{64\}')
    echo "edgetune replay --backend $backend: $host"
    if [ "$host" != "$fw" ]; then
        echo "the $backend replay's hash differs from the firmware's ($fw)"
        exit 1
    fi
done
# And the independent numpy implementation of the replay, from the directory alone.
ref=$(python3 tools/reference/zo_replay.py "embedded/$out/run" | grep -o '[0-9a-f]\{64\}')
echo "tools/reference/zo_replay.py (numpy): $ref"
if [ "$ref" != "$fw" ]; then
    echo "the numpy replay's hash differs from the firmware's ($fw)"
    exit 1
fi
echo "state-hash: $fw"
