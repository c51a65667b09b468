#!/usr/bin/env python3
"""Golden files for the CPU reference kernels, from independent implementations.

- Dequantisation and quantised products: gguf-py (`gguf.quants.dequantize`, maintained
  with ggml), on random blocks.
- The other kernels: numpy in float64, written from the formulas of Hugging Face
  transformers' Llama (LlamaRMSNorm, rotate_half RoPE, repeat_kv GQA attention, SiLU gate)
  and llama.cpp's interleaved RoPE.

Writes tests/golden/kernels.json (manifest) and tests/golden/kernels.bin (little-endian
data). Regenerate with:  python3 tools/reference/kernels_golden.py
Needs: numpy, gguf (pip install numpy gguf).
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden"
rng = np.random.default_rng(20261126)
blob = bytearray()
cases = []


def put(arr, dtype):
    """Appends an array to the blob; returns its manifest entry."""
    a = np.ascontiguousarray(arr, dtype=dtype)
    off = len(blob)
    blob.extend(a.tobytes())
    while len(blob) % 4:
        blob.append(0)
    return {"dtype": np.dtype(dtype).name, "offset": off, "len": int(a.size)}


def case(kind, params, **tensors):
    cases.append({"kind": kind, "params": params, "tensors": tensors})


BLOCK = {  # type: (elements, bytes, offsets of f16 scale fields)
    "q8_0": (T.Q8_0, 32, 34, [0]),
    "q4_0": (T.Q4_0, 32, 18, [0]),
    "q4_1": (T.Q4_1, 32, 20, [0, 2]),
    "q4_k": (T.Q4_K, 256, 144, [0, 2]),
    "q6_k": (T.Q6_K, 256, 210, [208]),
}


def scales(n):
    return (rng.uniform(1.0, 2.0, n) * 2.0 ** -rng.integers(5, 11, n)).astype(np.float16)


def weights(name, rows, cols):
    """Random weights in format `name` as raw bytes, and their dequantisation by gguf-py."""
    if name == "f16":
        raw = rng.integers(0, 1 << 16, rows * cols, dtype=np.uint32).astype(np.uint16)
        raw[(raw & 0x7C00) == 0x7C00] &= ~np.uint16(0x0400)  # keep finite
        data = raw.view(np.uint8)
        return data, quants.dequantize(data, T.F16).reshape(-1)
    if name == "bf16":
        raw = rng.integers(0, 1 << 16, rows * cols, dtype=np.uint32).astype(np.uint16)
        raw[(raw & 0x7F80) == 0x7F80] &= ~np.uint16(0x0480)
        data = raw.view(np.uint8)
        return data, quants.dequantize(data, T.BF16).reshape(-1)
    qtype, be, bb, offs = BLOCK[name]
    nblocks = rows * cols // be
    data = rng.integers(0, 256, (nblocks, bb), dtype=np.uint8)
    for off in offs:
        data[:, off:off + 2] = scales(nblocks).view(np.uint8).reshape(nblocks, 2)
    data = data.reshape(-1)
    return data, quants.dequantize(data.reshape(rows, -1), qtype).reshape(-1).astype(np.float32)


# Dequantisation (exact) and the products x * dequant(W)^T.
for name, cols in [("f16", 64), ("bf16", 64), ("q8_0", 96), ("q4_0", 96), ("q4_1", 96), ("q4_k", 512), ("q6_k", 512)]:
    rows = 5
    data, deq = weights(name, rows, cols)
    case("dequant", {"wtype": name, "n": rows * cols}, w=put(data, np.uint8), out=put(deq, np.float32))
    if name in ("f16", "bf16"):
        continue  # all bit patterns: products would overflow; decoding is what matters
    m = 3
    x = rng.uniform(-1, 1, (m, cols)).astype(np.float32)
    y = x.astype(np.float64) @ deq.reshape(rows, cols).astype(np.float64).T
    case("qmatmul", {"wtype": name, "m": m, "k": cols, "n": rows},
         x=put(x, np.float32), w=put(data, np.uint8), out=put(y, np.float32))

# Load-time quantisation (safetensors --quantize) against gguf-py's quantisers.
for name, qtype in [("q8_0", T.Q8_0), ("q4_0", T.Q4_0)]:
    x = rng.normal(0, 0.05, (4, 64)).astype(np.float32)
    x[1] = 0.0  # an all-zero block row
    case("quantize", {"wtype": name, "n": x.size}, x=put(x, np.float32),
         q=put(quants.quantize(x, qtype).reshape(-1), np.uint8), out=put(np.zeros(1), np.float32))

# f32 matmul in every transpose form.
for m, k, n in [(5, 7, 3), (16, 32, 24)]:
    a = rng.uniform(-1, 1, (m, k))
    b = rng.uniform(-1, 1, (k, n))
    for a_t in (False, True):
        for b_t in (False, True):
            case("matmul", {"m": m, "k": k, "n": n, "a_t": a_t, "b_t": b_t},
                 a=put(a.T if a_t else a, np.float32), b=put(b.T if b_t else b, np.float32),
                 out=put(a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64), np.float32))

# RMSNorm (LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight).
for rows, dim, eps in [(3, 64, 1e-5), (2, 576, 1e-6)]:
    x = rng.uniform(-2, 2, (rows, dim)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, dim).astype(np.float32)
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w
    case("rmsnorm", {"rows": rows, "dim": dim, "eps": eps}, x=put(x, np.float32), weight=put(w, np.float32),
         out=put(y, np.float32))

# RoPE: half-split as transformers' rotate_half; interleaved as llama.cpp's normal mode.
for style in ("half_split", "interleaved"):
    for n_tokens, n_heads, hd, pos0, theta in [(4, 2, 16, 3, 10000.0), (2, 3, 64, 500, 100000.0)]:
        x = rng.uniform(-1, 1, (n_tokens, n_heads, hd)).astype(np.float32)
        inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        pos = np.arange(pos0, pos0 + n_tokens, dtype=np.float64)
        ang = pos[:, None] * inv_freq[None, :]  # [tokens, hd/2]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x64 = x.astype(np.float64)
        if style == "half_split":
            x1, x2 = x64[..., : hd // 2], x64[..., hd // 2:]
            y = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        else:
            x1, x2 = x64[..., 0::2], x64[..., 1::2]
            y = np.empty_like(x64)
            y[..., 0::2] = x1 * cos - x2 * sin
            y[..., 1::2] = x1 * sin + x2 * cos
        case("rope", {"style": style, "n_tokens": n_tokens, "n_heads": n_heads, "head_dim": hd, "pos0": pos0,
                      "theta": theta}, x=put(x, np.float32), out=put(y, np.float32))

# Softmax.
for rows, cols in [(2, 9), (3, 300)]:
    x = rng.uniform(-10, 10, (rows, cols)).astype(np.float32)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    case("softmax", {"rows": rows, "cols": cols}, x=put(x, np.float32), out=put(e / e.sum(-1, keepdims=True), np.float32))

# SwiGLU gate: silu(gate) * up.
g = rng.uniform(-8, 8, 257).astype(np.float32)
u = rng.uniform(-1, 1, 257).astype(np.float32)
g64 = g.astype(np.float64)
case("swiglu", {"n": 257}, gate=put(g, np.float32), up=put(u, np.float32),
     out=put(g64 / (1 + np.exp(-g64)) * u, np.float32))

# Causal GQA attention over a KV cache (transformers' repeat_kv + causal mask).
for n_tokens, n_heads, n_kv, hd, pos0 in [(3, 4, 2, 8, 0), (2, 6, 2, 16, 5), (1, 3, 1, 32, 9)]:
    total = pos0 + n_tokens
    q = rng.uniform(-1, 1, (n_tokens, n_heads, hd)).astype(np.float32)
    k = rng.uniform(-1, 1, (total, n_kv, hd)).astype(np.float32)
    v = rng.uniform(-1, 1, (total, n_kv, hd)).astype(np.float32)
    scale = 1.0 / np.sqrt(hd)
    rep = n_heads // n_kv
    k64 = np.repeat(k.astype(np.float64), rep, axis=1)  # [total, heads, hd]
    v64 = np.repeat(v.astype(np.float64), rep, axis=1)
    s = np.einsum("thd,phd->htp", q.astype(np.float64), k64) * np.float64(np.float32(scale))
    mask = np.arange(total)[None, :] > (pos0 + np.arange(n_tokens))[:, None]
    s[:, mask] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("htp,phd->thd", p, v64)
    case("attention", {"n_tokens": n_tokens, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": hd, "pos0": pos0,
                       "scale": float(np.float32(scale))},
         q=put(q, np.float32), k=put(k, np.float32), v=put(v, np.float32), out=put(out, np.float32))

OUT.mkdir(parents=True, exist_ok=True)
(OUT / "kernels.bin").write_bytes(bytes(blob))
(OUT / "kernels.json").write_text(json.dumps({
    "generator": "tools/reference/kernels_golden.py",
    "numpy": np.__version__,
    "cases": cases,
}, indent=1) + "\n")
print(f"{len(cases)} cases, {len(blob)} bytes")
