#!/usr/bin/env python3
"""A tiny Llama GGUF whose projections are K-quants, for the tests of the "scales"
trainable set on Q4_K and Q6_K (K-quant rows need 256-element super-blocks, which the
transformers-made tiny models are too narrow for).

The gguf package reads and writes K-quant tensors but cannot quantise to them, so the
blocks are drawn at random, field by field: any bytes are valid Q4_K / Q6_K codes. The super-block scales are
kept f16 normals down to a quarter of their value (real K-quant files often hold subnormal
ones), so that the tests' power-of-two factors merge into them exactly. As llama.cpp's
Q4_K_M does, v and down are Q6_K and the other projections and the embedding Q4_K.
Projections narrower than 256 get a 32-element format in llama.cpp's files; here o is
Q8_0 in every layer, and layer 1's k is Q8_0 where layer 0's is Q4_K (a target whose layers
differ, which the scales set refuses).
Deterministic (fixed seed). Writes tests/golden/tiny/llama_kquant/model.gguf:
    python3 tools/reference/kquant_model.py
"""
import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "tiny" / "llama_kquant"
DIM, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 256, 4, 2, 2, 64
rng = np.random.default_rng(20261130)


def f16_bytes(lo, hi, n):
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def q4_k(rows, cols):
    """[d f16][dmin f16][12 bytes of 6-bit scales and mins][128 bytes of nibbles]."""
    n = rows * cols // 256
    blocks = np.concatenate(
        [f16_bytes(2.5e-4, 5e-4, n), f16_bytes(2.5e-4, 5e-4, n),
         rng.integers(0, 256, (n, 12 + 128), dtype=np.uint8)], axis=1)
    return blocks.reshape(rows, cols // 256 * 144)


def q6_k(rows, cols):
    """[128 bytes of low nibbles][64 bytes of high bit pairs][16 i8 scales][d f16]."""
    n = rows * cols // 256
    scales = rng.integers(-16, 17, (n, 16)).astype(np.int8).view(np.uint8)
    blocks = np.concatenate(
        [rng.integers(0, 256, (n, 192), dtype=np.uint8), scales, f16_bytes(2.5e-4, 5e-4, n)], axis=1)
    return blocks.reshape(rows, cols // 256 * 210)


def q8_0(rows, cols):
    return quants.quantize((0.05 * rng.standard_normal((rows, cols))).astype(np.float32), T.Q8_0)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(OUT / "model.gguf"), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    head = DIM // HEADS
    w.add_tensor("token_embd.weight", q4_k(VOCAB, DIM), raw_dtype=T.Q4_K)
    for l in range(LAYERS):
        norm = lambda: (1.0 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)  # noqa: E731
        w.add_tensor(f"blk.{l}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{l}.attn_q.weight", q4_k(DIM, DIM), raw_dtype=T.Q4_K)
        if l == 0:
            w.add_tensor(f"blk.{l}.attn_k.weight", q4_k(KV_HEADS * head, DIM), raw_dtype=T.Q4_K)
        else:
            w.add_tensor(f"blk.{l}.attn_k.weight", q8_0(KV_HEADS * head, DIM), raw_dtype=T.Q8_0)
        w.add_tensor(f"blk.{l}.attn_v.weight", q6_k(KV_HEADS * head, DIM), raw_dtype=T.Q6_K)
        w.add_tensor(f"blk.{l}.attn_output.weight", q8_0(DIM, DIM), raw_dtype=T.Q8_0)
        w.add_tensor(f"blk.{l}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{l}.ffn_gate.weight", q4_k(FFN, DIM), raw_dtype=T.Q4_K)
        w.add_tensor(f"blk.{l}.ffn_up.weight", q4_k(FFN, DIM), raw_dtype=T.Q4_K)
        w.add_tensor(f"blk.{l}.ffn_down.weight", q6_k(DIM, FFN), raw_dtype=T.Q6_K)
    w.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(OUT / "model.gguf")


if __name__ == "__main__":
    main()
