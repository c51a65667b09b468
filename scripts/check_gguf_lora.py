#!/usr/bin/env python3
"""Checks an exported GGUF LoRA adapter in llama.cpp (through llama-cpp-python): the
adapter's effect on the logits of a token sequence ((adapted - base) logits) from llama.cpp
against edgetune's with the same adapter.

Both run an F32 copy of MODEL (made with llama.cpp's own quantize API), with llama.cpp's KV
cache in F32: on quantised weights llama.cpp also quantises the activations (Q8), whose
rounding moves its logits by up to about 1.4 on SmolLM2 Q4_1, which would hide the adapter.

    pip install llama-cpp-python numpy
    python3 scripts/check_gguf_lora.py MODEL.gguf ADAPTER.gguf [EDGETUNE_BINARY]
"""
import ctypes
import os
import subprocess
import sys
import tempfile

import llama_cpp
import numpy as np
from llama_cpp import Llama

TOKENS = [1, 504, 3456, 28, 905, 17, 339, 2682, 30, 1]


def llama_cpp_logits(model, lora):
    kw = dict(model_path=model, logits_all=True, n_ctx=64, n_threads=2, verbose=False,
              type_k=0, type_v=0)
    if lora:
        kw["lora_path"] = lora
    llm = Llama(**kw)
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)], dtype=np.float64)


def edgetune_logits(binary, model, lora):
    with tempfile.NamedTemporaryFile(suffix=".npy") as f:
        cmd = [binary, "logits", "--model", model, "--tokens", ",".join(map(str, TOKENS)),
               "--out", f.name, "--backend", "host"]
        if lora:
            cmd += ["--adapter", lora]
        subprocess.run(cmd, check=True, capture_output=True)
        return np.load(f.name).astype(np.float64)


def f32_copy(model, out):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 0  # LLAMA_FTYPE_ALL_F32
    p.allow_requantize = True
    if llama_cpp.llama_model_quantize(model.encode(), out.encode(), ctypes.byref(p)) != 0:
        sys.exit(f"llama.cpp could not write an F32 copy of {model}")


def main():
    model, lora = sys.argv[1], sys.argv[2]
    binary = sys.argv[3] if len(sys.argv) > 3 else "target/release/edgetune"
    tmp = tempfile.mkdtemp()
    f32 = os.path.join(tmp, "base_f32.gguf")
    f32_copy(model, f32)
    model = f32
    lc = llama_cpp_logits(model, lora) - llama_cpp_logits(model, None)
    et = edgetune_logits(binary, model, lora) - edgetune_logits(binary, model, None)
    diff = np.abs(lc - et).max()
    effect = np.abs(et).max()
    corr = np.corrcoef(lc.ravel(), et.ravel())[0, 1]
    print(f"adapter effect on the logits: max |edgetune| {effect:.4f}, max |llama.cpp| {np.abs(lc).max():.4f}")
    print(f"max |llama.cpp - edgetune| of the effect {diff:.4f} ({diff / effect:.2%} of it), correlation {corr:.6f}")
    os.remove(f32)
    ok = diff < 0.01 * effect and corr > 0.9999
    print("gguf-lora-check:", "ok" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
