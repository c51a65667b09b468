#!/usr/bin/env bash
# The JVM binding (ffi/bindings/java, JNA) against the real library: compiled with
# javac -Xlint:all -Werror and run on the tiny model and SmolLM2 (EDGETUNE_SMOLLM2).
# Needs a JDK (17) and Debian's libjna-java (/usr/share/java/jna.jar).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${EDGETUNE_SMOLLM2:?set EDGETUNE_SMOLLM2 to the SmolLM2 GGUF}"
cargo build -q -p edgetune-ffi
jna=/usr/share/java/jna.jar
out=target/java
rm -rf "$out" && mkdir -p "$out"
javac -Xlint:all -Werror -cp "$jna" -d "$out" ffi/bindings/java/dev/edgetune/*.java
java -Djna.library.path="$PWD/target/debug" -Djna.encoding=UTF-8 -cp "$out:$jna" \
    dev.edgetune.EdgetuneTest tests/golden/tiny/llama_gqa_tied/q4_0.gguf "$EDGETUNE_SMOLLM2"
