#!/usr/bin/env python3
"""PyTorch MeZO, the zeroth-order peer: one MeZO step (the reference implementation's
perturb +eps, loss, -2 eps, loss, +eps, update, z from torch.manual_seed) on LoRA rank 8
over q and v of a GGUF model loaded by transformers (dequantised to f32), on the CPU with
the given threads, on BATCH sequences of TOKENS ids (the same ids as `edgetune bench`).
Prints one JSON object like `edgetune bench --json`: the step as test zoBxT (tokens = the
2 x B x T tokens both forward passes read) and the process's peak RSS after it.

    pip install torch transformers peft gguf
    python3 scripts/pytorch_mezo_peer.py MODEL.gguf THREADS [BxT]
"""
import json
import os
import platform
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    path, threads = sys.argv[1], int(sys.argv[2])
    batch, tokens = map(int, (sys.argv[3] if len(sys.argv) > 3 else "4x128").split("x"))
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                 gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM")).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 7919 + 13 + (b + 1) * 104_729) % vocab for i in range(tokens)]
                        for b in range(batch)])
    params = [p for p in model.parameters() if p.requires_grad]
    eps, lr = 1e-2, 1e-4

    def loss():
        with torch.inference_mode():
            return model(input_ids=ids, labels=ids).loss.item()

    def perturb(seed, scale):
        torch.manual_seed(seed)
        for p in params:
            p.data.add_(torch.normal(0, 1, size=p.shape) * (scale * eps))

    def step(seed):
        perturb(seed, 1)
        plus = loss()
        perturb(seed, -2)
        minus = loss()
        perturb(seed, 1)
        g = (plus - minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            p.data.add_(torch.normal(0, 1, size=p.shape) * (-lr * g))
        return (plus + minus) / 2

    loss()  # warm-up
    start = time.perf_counter()
    loss()
    forward = time.perf_counter() - start
    step(0)  # warm-up
    start = time.perf_counter()
    mean_loss = step(1)
    secs = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "system": f"PyTorch {torch.__version__} MeZO (CPU, {threads} threads)",
        "model": path, "cpu": platform.processor(), "peak_rss_per_test": False,
        "rows": [{"test": f"zo{batch}x{tokens}", "tokens": 2 * batch * tokens, "seconds": secs,
                  "tok_s": 2 * batch * tokens / secs, "peak_rss_mib": peak, "loss": mean_loss,
                  "note": f"{secs / forward:.2f}x its forward ({forward:.2f} s)"}],
    }))


if __name__ == "__main__":
    main()
