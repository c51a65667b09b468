#!/usr/bin/env bash
# The C API's library as phones would ship it: `cargo build --profile mobile` (opt-level
# "z", fat LTO, stripped) for aarch64. Android's and iOS's own targets cannot be linked
# here (no NDK, no Xcode), so the arm64 figure is aarch64 Linux's (the same code, the same
# features, another libc), linked by Debian's cross gcc; x86-64 beside it. Prints bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
for target in aarch64-unknown-linux-gnu x86_64-unknown-linux-gnu; do
    cargo build -q --profile mobile -p edgetune-ffi --target "$target"
    so="target/$target/mobile/libedgetune_ffi.so"
    echo "$target: $(stat -c %s "$so") bytes ($(file -b "$so" | cut -d, -f1-2))"
done
