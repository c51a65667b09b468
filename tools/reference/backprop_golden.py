#!/usr/bin/env python3
"""Backpropagation golden files: adapter gradients and optimiser trajectories from PyTorch + PEFT.

For each tiny random model (llama_gqa_tied, qwen2_gqa_bias) and each adapter kind (LoRA, IA3)
made by peft_golden.py (tests/golden/peft/<model>/<kind>_from_peft), loaded with
PeftModel.from_pretrained(..., is_trainable=True) in float32, on a fixed batch of two
sequences (each run as its own forward, no padding), records:

  loss       token-weighted mean NLL over the batch: sum over both sequences of -log p(token i |
             tokens < i) for every i with mask[i], divided by the number of such targets;
  grads      d loss / d param for every trainable parameter, flat row-major, keyed by the names
             in adapter_model.safetensors (peft's saved names, adapter name ".default" stripped);
  grad_norm  global L2 norm of all gradients (float64);
  trajs      6-step full-batch trajectories, each from the loaded adapter:
               adamw              AdamW lr 1e-2, betas (0.9, 0.999), eps 1e-8, wd 0.01, constant
               adamw_cosine_clip  same AdamW, get_cosine_schedule_with_warmup(2, 6) stepped after
                                  each optimiser step, clip_grad_norm_(max_norm 0.05) before each
               sgd_momentum       SGD lr 0.5, momentum 0.9, constant
               adamw_accum        AdamW as adamw, 2 micro-batches (seq 0, seq 1), each its own
                                  token mean, backward of each / 2 (mean of per-micro-batch means)
             with losses (before each step), lrs (lr used at each step), final_loss, final params.

Writes <out>/gradients.json (default tests/golden/backprop/gradients.json); the Rust backprop
tests compare edgetune's gradients and optimiser steps with it.
Regenerate (after tools/reference/peft_golden.py has made the adapters) with:
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft safetensors
    /tmp/ref/bin/python tools/reference/backprop_golden.py [--out DIR]
"""
import argparse
import json
import math
import pathlib

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

transformers.utils.logging.disable_progress_bar()

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "golden" / "tiny"
PEFT_DIR = ROOT / "tests" / "golden" / "peft"
OUT = ROOT / "tests" / "golden" / "backprop"
MODELS = ["llama_gqa_tied", "qwen2_gqa_bias"]
KINDS = ["lora", "ia3"]
SEQUENCES = [
    {"tokens": [3, 17, 0, 42, 91, 5, 64], "mask": [False, True, True, True, True, True, True]},
    {"tokens": [1, 8, 33, 2, 77], "mask": [False, False, False, True, True]},
]
STEPS = 6
ADAMW = {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
SGD = {"lr": 0.5, "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}
CLIP = 0.05


def load(name, kind, dtype=torch.float32):
    base = AutoModelForCausalLM.from_pretrained(TINY / name, dtype=dtype)
    model = PeftModel.from_pretrained(base, PEFT_DIR / name / f"{kind}_from_peft", is_trainable=True)
    model = model.to(dtype).eval()  # no dropout anywhere (lora_dropout is 0 anyway); autograd still on
    return model


def trainable(model, adapter_dir):
    """(saved name, parameter) for every trainable parameter, checked against the adapter file."""
    adapter = model.active_adapter
    # as peft.utils.save_and_load.get_peft_model_state_dict: k.replace(f".{adapter_name}", "")
    params = [(n.replace(f".{adapter}", ""), p) for n, p in model.named_parameters() if p.requires_grad]
    names = sorted(n for n, _ in params)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
    saved = sorted(peft.get_peft_model_state_dict(model))
    if names != keys or names != saved or len(set(names)) != len(names):
        raise SystemExit(f"trainable names do not match {adapter_dir}:\n  ours {names}\n  file {keys}\n"
                         f"  peft {saved}")
    for n, p in params:
        if list(p.shape) != shapes[n]:
            raise SystemExit(f"{n}: shape {list(p.shape)} in the model, {shapes[n]} in {adapter_dir}")
    return params


def seq_nll(model, seq):
    """(sum of target NLLs, number of targets) for one sequence."""
    tokens = torch.tensor([seq["tokens"]])
    logits = model(tokens).logits[0]
    idx = torch.tensor([i for i, m in enumerate(seq["mask"]) if m])
    return F.cross_entropy(logits[idx - 1], tokens[0, idx], reduction="sum"), len(idx)


def batch_loss(model):
    total, count = 0.0, 0
    for seq in SEQUENCES:
        s, n = seq_nll(model, seq)
        total, count = total + s, count + n
    return total / count


def grads_of(model, params):
    for _, p in params:
        p.grad = None
    loss = batch_loss(model)
    loss.backward()
    return loss


def global_norm(params):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for _, p in params))


def flat(params, attr):
    return {n: (p.grad if attr == "grad" else p.detach()).reshape(-1).tolist() for n, p in params}


def make(name, kind, dtype=torch.float32):
    model = load(name, kind, dtype)
    return model, trainable(model, PEFT_DIR / name / f"{kind}_from_peft")


def trajectory(name, kind, which):
    model, params = make(name, kind)
    ps = [p for _, p in params]
    rec = {"steps": STEPS}
    sched = None
    if which == "sgd_momentum":
        opt = torch.optim.SGD(ps, **SGD)
        rec.update(optimizer="sgd", **SGD, schedule="constant", warmup=0, clip=None)
    else:
        opt = torch.optim.AdamW(ps, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"],
                                weight_decay=ADAMW["weight_decay"])
        rec.update(optimizer="adamw", **ADAMW, schedule="constant", warmup=0, clip=None)
    if which == "adamw_cosine_clip":
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)
        rec.update(schedule="cosine_with_warmup", warmup=2, total_steps=STEPS, clip=CLIP,
                   clip_note="torch.nn.utils.clip_grad_norm_: g *= min(1, clip / (norm + 1e-6))")
        rec["grad_norms"] = []
    if which == "adamw_accum":
        rec.update(micro_batches=[[0], [1]], accumulation="mean of per-micro-batch token means")
    rec["losses"], rec["lrs"] = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if which == "adamw_accum":
            losses = []
            for seq in SEQUENCES:
                s, n = seq_nll(model, seq)
                loss = s / n
                (loss / len(SEQUENCES)).backward()
                losses.append(loss.item())
            rec["losses"].append(sum(losses) / len(losses))
        else:
            loss = batch_loss(model)
            loss.backward()
            rec["losses"].append(loss.item())
        if which == "adamw_cosine_clip":
            rec["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(ps, max_norm=CLIP)))
        rec["lrs"].append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        if which == "adamw_accum":
            rec["final_loss"] = sum((lambda s, n: (s / n).item())(*seq_nll(model, q)) for q in SEQUENCES) / 2
        else:
            rec["final_loss"] = batch_loss(model).item()
    rec["final"] = flat(params, "data")
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    out = ap.parse_args().out
    torch.manual_seed(0)
    golden = {"sequences": SEQUENCES, "loss": "token-weighted mean NLL over the batch",
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "cases": {}}
    for name in MODELS:
        for kind in KINDS:
            model, params = make(name, kind)
            loss = grads_of(model, params)
            case = {"adapter": f"tests/golden/peft/{name}/{kind}_from_peft", "loss": loss.item(),
                    "shapes": {n: list(p.shape) for n, p in params},
                    "grads": flat(params, "grad"), "grad_norm": global_norm(params)}
            for which in ["adamw", "adamw_cosine_clip", "sgd_momentum", "adamw_accum"]:
                case[which] = trajectory(name, kind, which)
            golden["cases"][f"{name}/{kind}"] = case
            print(f"{name}/{kind}: loss {case['loss']:.6f} grad_norm {case['grad_norm']:.6f} "
                  f"params {sum(p.numel() for _, p in params)} final " +
                  " ".join(f"{w} {case[w]['final_loss']:.6f}"
                           for w in ["adamw", "adamw_cosine_clip", "sgd_momentum", "adamw_accum"]))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gradients.json"
    path.write_text(json.dumps(golden))
    print("wrote", path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
