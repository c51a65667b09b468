#!/usr/bin/env bash
# The JVM binding (ffi/bindings/java, JNA) against the real library: compiled with
# javac -Xlint:all -Werror and run on the tiny model and SmolLM2 (EDGETUNE_SMOLLM2): load,
# generate, training sessions, and a federated round against a real edgetune-server.
# Needs a JDK (17) and Debian's libjna-java (/usr/share/java/jna.jar).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${EDGETUNE_SMOLLM2:?set EDGETUNE_SMOLLM2 to the SmolLM2 GGUF}"
cargo build -q -p edgetune-ffi
cargo build -q -p edgetune-server
jna=/usr/share/java/jna.jar
out=target/java
rm -rf "$out" && mkdir -p "$out"
javac -Xlint:all -Werror -cp "$jna" -d "$out" ffi/bindings/java/dev/edgetune/*.java
. scripts/fed_test_server.sh
start_fed_server "$PWD/$out/server"
trap stop_fed_server EXIT
java -Djna.library.path="$PWD/target/debug" -Djna.encoding=UTF-8 -cp "$out:$jna" \
    dev.edgetune.EdgetuneTest "$FED_MODEL" "$EDGETUNE_SMOLLM2" "$FED_URL" "$FED_KEY"
