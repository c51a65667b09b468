# Sourced by the C API's tests: start_fed_server WORK starts a fresh edgetune-server on the
# tiny model (LoRA r2 alpha 4 on q,v, FedKSeed K=64, tau 3, quorum 1) with its own database
# and port under WORK, clients 1 and 2 holding $FED_KEY; it sets FED_URL and FED_PID and
# waits until the server answers. stop_fed_server stops it.
FED_KEY=000d1a2734414e5b6875828f9ca9b6c3d0ddeaf704111e2b3845525f6c798693
FED_MODEL=tests/golden/tiny/llama_gqa_tied/q4_0.gguf

start_fed_server() {
    local work=$1 port=$((20000 + RANDOM % 20000))
    mkdir -p "$work"
    echo "{\"1\": \"$FED_KEY\", \"2\": \"$FED_KEY\"}" > "$work/clients.json"
    target/debug/edgetune-server --model "$FED_MODEL" --db "$work/server.db" \
        --listen "127.0.0.1:$port" --clients "$work/clients.json" --trainable lora --rank 2 \
        --alpha 4 --targets q,v --seeds 64 --tau 3 --lr 1e-2 --eps 1e-2 --quorum 1 \
        --session-key 77 > "$work/server.log" 2>&1 &
    FED_PID=$!
    FED_URL="http://127.0.0.1:$port"
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$FED_URL/v1/status" && return 0
        sleep 0.1
    done
    echo "edgetune-server did not start:"
    cat "$work/server.log"
    return 1
}

stop_fed_server() {
    kill "$FED_PID" 2>/dev/null || true
    wait "$FED_PID" 2>/dev/null || true
}
