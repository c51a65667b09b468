#!/usr/bin/env python3
"""An independent implementation of edgetune's zeroth-order replay (docs/zeroth-order.md),
in numpy: Philox4x32-10, the integer z, exact coefficients, the i32 accumulators and the
state hash, from a run directory alone (session.json, w0.safetensors, history.jsonl).
Prints `state-hash: <hex>` as `edgetune replay` does; .ci/run compares the two.

    python3 tools/reference/zo_replay.py RUN_DIR
"""
import hashlib
import json
import math
import pathlib
import struct
import sys

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = np.uint64(0xFFFFFFFF)


def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 over arrays of counters (uint64 holding u32 values)."""
    c = [np.asarray(x, dtype=np.uint64) & MASK for x in (c0, c1, c2, c3)]
    c = np.broadcast_arrays(*c)
    c = [x.copy() for x in c]
    for r in range(10):
        if r > 0:
            k0 = (k0 + W0) & 0xFFFFFFFF
            k1 = (k1 + W1) & 0xFFFFFFFF
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return c


def popcount(x):
    x = x.astype(np.uint64)
    n = np.zeros_like(x)
    for _ in range(32):
        n += x & np.uint64(1)
        x >>= np.uint64(1)
    return n.astype(np.int64)


def z4(session_key, seed, tensor, n, kind):
    """4z for elements 0..n of `tensor` under `seed` (purpose 0)."""
    e = np.arange(n, dtype=np.uint64)
    w = philox(e >> np.uint64(1), tensor, seed, 0, session_key & 0xFFFFFFFF, session_key >> 32)
    odd = (e & np.uint64(1)) == 1
    a = np.where(odd, w[2], w[0])
    b = np.where(odd, w[3], w[1])
    if kind == "rademacher":
        return np.where((a & np.uint64(1)) == 1, 4, -4).astype(np.int64)
    return popcount(a) + popcount(b) - 32


def lr_at(lr, step, decay):
    """lr, or lr * max(0, 1 - step / decay), in IEEE doubles in this order."""
    lr = float(np.float32(lr))
    return lr if decay == 0 else lr * max(0.0, 1.0 - step / decay)


def coefficient(lr, g, delta_exp):
    """round_half_even(-lr * g * 2^delta_exp) in f64, clamped to 2^20."""
    q = -lr * float(np.float32(g)) * 2.0 ** delta_exp
    q = max(-(2.0 ** 20), min(2.0 ** 20, q))
    return int(np.rint(q))


def read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", name
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4")
    return out


def main(run):
    run = pathlib.Path(run)
    s = json.loads((run / "session.json").read_text())
    layout = s["layout"]
    lh = hashlib.sha256(b"edgetune-layout-v1\n")
    for i, p in enumerate(layout):
        lh.update(f"{i} {p['name']} {p['rows']} {p['cols']}\n".encode())
    assert lh.hexdigest() == s["layout_sha256"], "layout hash differs"
    key = int(s["session_key"])
    w0 = read_safetensors(run / "w0.safetensors")
    records = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    decay = s.get("lr_decay_steps") or 0
    coefs = [(r["seed"], coefficient(lr_at(s["lr"], r["step"], decay), r["g"], s["delta_exp"]))
             for r in records]
    h = hashlib.sha256(b"edgetune-state-v1\n")
    h.update(lh.digest())
    for i, p in enumerate(layout):
        n = p["rows"] * p["cols"]
        d = np.zeros(n, dtype=np.int64)
        for seed, q in coefs:
            d += q * z4(key, seed, i, n, s["z"])
        assert np.all(np.abs(d) < 2 ** 31), "accumulator overflow"
        h.update(w0[p["name"]].astype("<f4").tobytes())
        h.update(d.astype("<i4").tobytes())
    print(f"state-hash: {h.hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
