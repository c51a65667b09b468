#!/usr/bin/env bash
# The C API's tests, compiled with -std=c11 -Wall -Wextra -Werror -pedantic against
# libedgetune_ffi (built with the panic-test export), each run under AddressSanitizer +
# UndefinedBehaviorSanitizer and under valgrind --leak-check=full; any report fails:
# - ffi/tests/c/flow.c: the tiny model, and SmolLM2 when EDGETUNE_SMOLLM2 names it (not
#   under valgrind, which runs the CPU reference about 50 times slower);
# - ffi/examples/personalize.c (with SmolLM2, under ASan + UBSan): an app teaches the
#   model a fact by backprop on tokenized prompt/completion pairs and checks the answer;
# - ffi/tests/c/fed.c: a federated round against a real edgetune-server on loopback (a
#   fresh one per run), curl carrying the bytes as an app's HTTP stack would.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p edgetune-ffi --features panic-test
cargo build -q -p edgetune-server
lib="$PWD/target/debug"
out=target/ffi-tests
rm -rf "$out"
mkdir -p "$out"
tiny=tests/golden/tiny/llama_gqa_tied/q4_0.gguf
flags=(-std=c11 -Wall -Wextra -Werror -pedantic -g -DET_PANIC_TEST -Iffi/include)
link=(-L"$lib" -ledgetune_ffi -Wl,-rpath,"$lib")
asan=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
for t in flow fed; do
    cc "${flags[@]}" "${asan[@]}" "ffi/tests/c/$t.c" "${link[@]}" -o "$out/$t-asan"
    cc "${flags[@]}" "ffi/tests/c/$t.c" "${link[@]}" -o "$out/$t"
done
cc "${flags[@]}" "${asan[@]}" ffi/examples/personalize.c "${link[@]}" -o "$out/personalize-asan"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
vg=(valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=1)

echo "--- flow: ASan + UBSan"
"$out/flow-asan" "$tiny" ${EDGETUNE_SMOLLM2:+"$EDGETUNE_SMOLLM2"}
if [ -n "${EDGETUNE_SMOLLM2:-}" ]; then
    echo "--- the example app (ffi/examples/personalize.c): SmolLM2 learns a fact, ASan + UBSan"
    "$out/personalize-asan" "$EDGETUNE_SMOLLM2" "$out/personal-adapter" host
fi
echo "--- flow: valgrind"
"${vg[@]}" "$out/flow" "$tiny"

. scripts/fed_test_server.sh
fed() {
    local work="$PWD/$out/work-$1"
    shift
    start_fed_server "$work"
    local rc=0
    "$@" "$FED_MODEL" "$FED_URL" "$FED_KEY" "$work" || rc=$?
    stop_fed_server
    if [ "$rc" != 0 ]; then
        echo "fed failed; server log:"
        cat "$work/server.log"
        return "$rc"
    fi
}
echo "--- fed: ASan + UBSan"
fed asan "$out/fed-asan"
echo "--- fed: valgrind"
fed valgrind "${vg[@]}" "$out/fed"
