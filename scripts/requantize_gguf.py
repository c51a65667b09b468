#!/usr/bin/env python3
"""Rewrites a GGUF model in another llama.cpp quantisation with llama.cpp's own quantiser
(through llama-cpp-python), e.g. to try the K-quant paths on a real model when only a Q4_1
file is at hand. Rows narrower than a K-quant's 256-element super-block fall back to the
format llama.cpp picks for them (Q8_0 for Q6_K; Q5_0, which edgetune does not read, for
Q4_K_M), as in its published files.

    pip install llama-cpp-python
    python3 scripts/requantize_gguf.py SRC.gguf OUT.gguf q6_k
"""
import ctypes
import sys

import llama_cpp

# llama.cpp's LLAMA_FTYPE_* codes.
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q6_k": 18}


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in FTYPES:
        sys.exit(f"usage: {sys.argv[0]} SRC.gguf OUT.gguf {{{','.join(FTYPES)}}}")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[sys.argv[3]]
    p.allow_requantize = True
    if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) != 0:
        sys.exit("llama_model_quantize failed")


if __name__ == "__main__":
    main()
