#!/usr/bin/env bash
# The C API's tests: ffi/tests/c/flow.c compiled with -std=c11 -Wall -Wextra -Werror
# -pedantic against libedgetune_ffi (built with the panic-test export), run under
# AddressSanitizer + UndefinedBehaviorSanitizer (the tiny model and SmolLM2 when
# EDGETUNE_SMOLLM2 names it) and under valgrind --leak-check=full (the tiny model: valgrind
# runs the CPU reference about 50 times slower). Any report fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p edgetune-ffi --features panic-test
lib="$PWD/target/debug"
out=target/ffi-tests
mkdir -p "$out"
tiny=tests/golden/tiny/llama_gqa_tied/q4_0.gguf
flags=(-std=c11 -Wall -Wextra -Werror -pedantic -g -DET_PANIC_TEST -Iffi/include)
link=(-L"$lib" -ledgetune_ffi -Wl,-rpath,"$lib")
cc "${flags[@]}" -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    ffi/tests/c/flow.c "${link[@]}" -o "$out/flow-asan"
cc "${flags[@]}" ffi/tests/c/flow.c "${link[@]}" -o "$out/flow"
echo "--- ASan + UBSan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$out/flow-asan" "$tiny" ${EDGETUNE_SMOLLM2:+"$EDGETUNE_SMOLLM2"}
echo "--- valgrind"
valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=1 \
    "$out/flow" "$tiny"
