#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python, its CPU backend) on the same model and machine, the
tests `edgetune bench --model` runs: prompt processing (ppN), generation after it (tgN) and
the training shape (trainBxT: B sequences of T tokens, each one forward with the loss at
every position), with tokens/s and each test's peak RSS.

Usage: python3 scripts/llama_cpp_peer.py MODEL.gguf [prompt_tokens] [gen_tokens] [threads]
           [--train BxT] [--json]
Needs: pip install llama-cpp-python numpy (builds llama.cpp; about 7 minutes on 2 cores).
"""
import argparse
import json
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("pp", nargs="?", type=int, default=512)
ap.add_argument("tg", nargs="?", type=int, default=128)
ap.add_argument("threads", nargs="?", type=int, default=2)
ap.add_argument("--train", default="4x128")
ap.add_argument("--json", action="store_true")
a = ap.parse_args()
batch, length = (int(v) for v in a.train.split("x"))


def reset_peak():
    # VmHWM restarts from the current RSS (Linux), as edgetune bench does per test.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


rows = []


def timed(test, tokens, fn):
    reset_peak()
    t = time.perf_counter()
    loss = fn()
    rows.append({"test": test, "tokens": tokens, "seconds": time.perf_counter() - t,
                 "peak_rss_mib": peak_mib(), "loss": loss})


llm = Llama(model_path=a.model, n_ctx=a.pp + a.tg + 8, n_batch=a.pp, n_threads=a.threads,
            n_threads_batch=a.threads, verbose=False)
vocab = llm.n_vocab()


def ids(n, salt):
    # The same ids as edgetune bench.
    return [(i * 7919 + 13 + salt * 104729) % vocab for i in range(n)]


tokens = ids(a.pp, 0)
llm.eval(tokens[:8])  # warm-up
llm.reset()
timed(f"pp{a.pp}", a.pp, lambda: llm.eval(tokens))


def generate():
    # One token per call, as in generation (which tokens does not change the cost).
    for i in range(a.tg):
        llm.eval([tokens[i % a.pp]])


timed(f"tg{a.tg}", a.tg, generate)
del llm

# Loss at every position needs every position's logits.
train = Llama(model_path=a.model, n_ctx=length, n_batch=length, n_threads=a.threads,
              n_threads_batch=a.threads, logits_all=True, verbose=False)


def train_step():
    total, count = 0.0, 0
    for b in range(batch):
        seq = ids(length, b + 1)
        train.reset()
        train.eval(seq)
        logits = np.asarray(train.scores[:length - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        total += float((lse - logits[np.arange(length - 1), seq[1:]]).sum())
        count += length - 1
    return total / count


timed(f"train{batch}x{length}", batch * length, train_step)
# The instruction set this llama.cpp build uses (an AVX2-only build on an AVX-512 host
# stands in for an AVX2-only host; BENCHMARKS.md), in the label so that bench_compare.py
# never pairs runs of different builds.
info = llama_cpp.llama_print_system_info().decode()
isa = next((name for flag, name in [("AVX512 = 1", "AVX-512"), ("AVX2 = 1", "AVX2"),
                                    ("NEON = 1", "NEON")] if flag in info), "baseline")
label = f"llama.cpp CPU ({a.threads} threads, {isa})"
if a.json:
    for r in rows:
        r["tok_s"] = r["tokens"] / r["seconds"]
    print(json.dumps({"system": label, "model": a.model, "rows": rows}))
else:
    for r in rows:
        loss = f"   loss {r['loss']:.3f}" if r["loss"] is not None else ""
        print(f"{label:<40} {r['test']:<12} {r['tokens']:>5} tokens {r['tokens'] / r['seconds']:>8.2f} tok/s"
              f"   peak RSS {r['peak_rss_mib']:>4.0f} MiB{loss}")
