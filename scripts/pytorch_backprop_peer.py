#!/usr/bin/env python3
"""PyTorch + PEFT backprop, the backprop peer: one LoRA training step (rank 8 on q and v,
forward with the loss at every position, backward, torch.optim.AdamW) on a GGUF model loaded
by transformers (dequantised to f32), on the CPU with the given threads, on BATCH sequences
of TOKENS ids (the same ids as `edgetune bench`). Prints one JSON object like `edgetune bench
--json`: the step as test bpBxT and the process's peak RSS after it.

    pip install torch transformers peft gguf
    python3 scripts/pytorch_backprop_peer.py MODEL.gguf THREADS [BxT]
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
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 7919 + 13 + (b + 1) * 104_729) % vocab for i in range(tokens)]
                        for b in range(batch)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, labels=ids).loss.item()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    forward()  # warm-up
    start = time.perf_counter()
    forward()
    fwd = time.perf_counter() - start
    step()  # warm-up
    start = time.perf_counter()
    loss = step()
    secs = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "system": f"PyTorch {torch.__version__} + PEFT backprop (CPU, {threads} threads)",
        "model": path, "cpu": platform.processor(), "peak_rss_per_test": False,
        "rows": [{"test": f"bp{batch}x{tokens}", "tokens": batch * tokens, "seconds": secs,
                  "tok_s": batch * tokens / secs, "peak_rss_mib": peak, "loss": loss,
                  "note": f"{secs / fwd:.2f}x its forward ({fwd:.2f} s)"}],
    }))


if __name__ == "__main__":
    main()
