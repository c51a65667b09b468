#!/usr/bin/env python3
"""Checks a model written by `edgetune adapter export --gguf` from a `scales` run (the
trained block scales merged into the GGUF) in llama.cpp (through llama-cpp-python): the
merge's effect on the logits of a token sequence ((merged - base) logits) from llama.cpp
against edgetune's with the adapter attached to the base.

llama.cpp runs F32 copies of both models (its own quantize API dequantises them), with an
F32 KV cache, as scripts/check_gguf_lora.py explains; edgetune runs the quantised files.
The merged model holds the scales rounded to f16, the adapter holds them in f32, so the
two effects differ by that rounding too.

    pip install llama-cpp-python numpy
    python3 scripts/check_gguf_scales.py BASE.gguf MERGED.gguf RUN_DIR [EDGETUNE_BINARY]
"""
import os
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from check_gguf_lora import edgetune_logits, f32_copy, llama_cpp_logits  # noqa: E402


def main():
    base, merged, run = sys.argv[1], sys.argv[2], sys.argv[3]
    binary = sys.argv[4] if len(sys.argv) > 4 else "target/release/edgetune"
    tmp = tempfile.mkdtemp()
    copies = []
    for name, model in [("base", base), ("merged", merged)]:
        out = os.path.join(tmp, f"{name}_f32.gguf")
        f32_copy(model, out)
        copies.append(out)
    lc = llama_cpp_logits(copies[1], None) - llama_cpp_logits(copies[0], None)
    et = edgetune_logits(binary, base, run) - edgetune_logits(binary, base, None)
    et_merged = edgetune_logits(binary, merged, None) - edgetune_logits(binary, base, None)
    for c in copies:
        os.remove(c)
    effect = np.abs(et).max()
    diff = np.abs(lc - et).max()
    rounding = np.abs(et_merged - et).max()
    corr = np.corrcoef(lc.ravel(), et.ravel())[0, 1]
    print(f"merge effect on the logits: max |edgetune adapter| {effect:.4f}, max |llama.cpp merged| {np.abs(lc).max():.4f}")
    print(f"edgetune: merged file vs adapter (the f16 rounding of the scales) max {rounding:.4f}")
    print(f"max |llama.cpp - edgetune| of the effect {diff:.4f} ({diff / effect:.2%} of it), correlation {corr:.6f}")
    ok = diff < 0.05 * effect and corr > 0.999
    print("gguf-scales-check:", "ok" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
