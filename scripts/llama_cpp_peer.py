#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python, its CPU backend) on the same model and machine:
prompt processing and generation tokens/s and peak RSS, as `edgetune bench --model` reports.

Usage: python3 scripts/llama_cpp_peer.py MODEL.gguf [prompt_tokens] [gen_tokens] [threads]
Needs: pip install llama-cpp-python (builds llama.cpp; about 4 minutes on 2 cores).
"""
import resource
import sys
import time

from llama_cpp import Llama

path = sys.argv[1]
pp = int(sys.argv[2]) if len(sys.argv) > 2 else 512
tg = int(sys.argv[3]) if len(sys.argv) > 3 else 128
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
llm = Llama(model_path=path, n_ctx=pp + tg + 8, n_batch=pp, n_threads=threads, n_threads_batch=threads,
            verbose=False)
vocab = llm.n_vocab()
tokens = [(i * 7919 + 13) % vocab for i in range(pp)]
llm.eval(tokens[:8])  # warm-up
llm.reset()
t = time.perf_counter()
llm.eval(tokens)
pp_s = time.perf_counter() - t
t = time.perf_counter()
# One token per call, as in generation (which tokens does not change the cost).
for i in range(tg):
    llm.eval([tokens[i % pp]])
tg_s = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{'llama.cpp CPU (' + str(threads) + ' threads)':<34} prompt {pp:>4} tokens {pp / pp_s:>8.1f} tok/s   "
      f"generate {tg:>4} tokens {tg / tg_s:>7.2f} tok/s   peak RSS {rss:.0f} MiB")
