#!/usr/bin/env python3
"""PEFT interop golden files, both directions, on the tiny random models.

peft -> edgetune: LoRA (all seven projections) and IA3 (k, v, down) adapters made by
Python `peft` on transformers models, their B matrices / scales set to random values so
they change the logits, saved with save_pretrained; golden logits from peft.

edgetune -> peft: adapters written by `edgetune train` (a few zeroth-order steps with a
large learning rate so they differ from the identity, and a few backprop AdamW steps), loaded
with PeftModel.from_pretrained; golden logits from peft.

tests/tests/peft.rs loads every adapter directory in edgetune and compares its logits with
these. Writes tests/golden/peft/<model>/<case>/ and tests/golden/peft/logits.json.
Regenerate (needs a debug build of the CLI: cargo build -p edgetune-cli) with:
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft safetensors
    /tmp/ref/bin/python tools/reference/peft_golden.py
"""
import json
import pathlib
import shutil
import subprocess
import tempfile

import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "golden" / "tiny"
OUT = ROOT / "tests" / "golden" / "peft"
CLI = ROOT / "target" / "debug" / "edgetune"
TOKENS = [3, 17, 0, 42, 91, 5, 64]
MODELS = ["llama_gqa_tied", "qwen2_gqa_bias"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(name):
    return AutoModelForCausalLM.from_pretrained(TINY / name, torch_dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].tolist()


def from_peft(name, kind, dest):
    torch.manual_seed(7)
    if kind == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0, task_type="CAUSAL_LM")
    else:
        cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(base(name), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.5)
            elif "ia3_l" in n:
                p.copy_(1.0 + torch.randn_like(p) * 0.3)
    model.save_pretrained(dest)
    return logits(model.eval())


def from_edgetune(name, kind, dest, method="zo"):
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps({"input_ids": [1] + [(i * 5 + 3 * k) % 60 + 2 for k in range(10)]}) + "\n"
                                for i in range(8)))
        run = pathlib.Path(tmp) / "run"
        settings = (["--lr", "1.0", "--eps", "0.05"] if method == "zo" else
                    ["--method", "backprop", "--lr", "0.05", "--seq-len", "16"])
        subprocess.run([str(CLI), "train", "--model", str(TINY / name), "--data", str(data), "--out", str(run),
                        "--trainable", kind, "--targets", "q,v,gate,down", "--rank", "4", "--alpha", "8",
                        "--steps", "6", "--backend", "cpu", "--seed", "3"] + settings,
                       check=True, capture_output=True)
        dest.mkdir(parents=True, exist_ok=True)
        for f in ["adapter_config.json", "adapter_model.safetensors"]:
            shutil.copy(run / f, dest / f)
    model = PeftModel.from_pretrained(base(name), dest).eval()
    return logits(model)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    golden = {"tokens": TOKENS, "cases": {}}
    for name in MODELS:
        for kind in ["lora", "ia3"]:
            for direction, make in [("from_peft", from_peft), ("from_edgetune", from_edgetune),
                                    ("from_edgetune_backprop",
                                     lambda n, k, d: from_edgetune(n, k, d, method="backprop"))]:
                case = f"{name}/{kind}_{direction}"
                golden["cases"][case] = make(name, kind, OUT / case)
                print("wrote", case)
    (OUT / "logits.json").write_text(json.dumps(golden))


if __name__ == "__main__":
    main()
