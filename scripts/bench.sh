#!/usr/bin/env bash
# Kernel benchmarks with their peers, measured in the same run on the same machine:
# numpy/OpenBLAS sgemm at 1024^3 (as the environment sets OpenBLAS, and with its core-type
# overrides removed), then `edgetune bench` on the GPU adapter and the CPU reference.
# Usage: scripts/bench.sh [extra edgetune bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import numpy' 2>/dev/null || pip install -q numpy

peer='
import time, numpy as np
n = 1024
a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
a @ b
best = []
for _ in range(5):
    t = time.perf_counter(); reps = 0
    while time.perf_counter() - t < 0.5:
        a @ b; reps += 1
    best.append((time.perf_counter() - t) / reps)
s = sorted(best)[len(best) // 2]
print(f"numpy/OpenBLAS sgemm 1024x1024x1024 {s*1e3:8.3f} ms {2*n**3/s/1e9:8.1f} GFLOP/s (median of 5)")
'
echo "== peer: numpy/OpenBLAS (environment as set)"
python3 -c "$peer"
echo "== peer: numpy/OpenBLAS (env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE)"
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 -c "$peer"

echo "== edgetune bench (wgpu adapter, then the CPU reference)"
cargo build --release -q -p edgetune-cli
./target/release/edgetune bench --backend gpu --with-reference "$@"
