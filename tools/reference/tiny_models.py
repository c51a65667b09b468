#!/usr/bin/env python3
"""Small random Llama and Qwen2 models from Hugging Face transformers, saved as safetensors
and (through the gguf package) as GGUF in F32, Q8_0 and Q4_0, with transformers' logits
as golden files.

Configurations cover grouped-query and multi-head attention, tied and untied embeddings,
odd sizes (rows that are not whole quantisation blocks stay F32 in the quantised GGUF, as
llama.cpp's converter does), non-default rope theta, and Qwen2's q/k/v biases. For the
quantised GGUF files the reference runs transformers on the same dequantised weights.

Writes tests/golden/tiny/<name>/{config.json, model.safetensors, f32.gguf, q8_0.gguf,
q4_0.gguf} and tests/golden/tiny/logits.json. Regenerate with:
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers gguf numpy safetensors
    /tmp/ref/bin/python tools/reference/tiny_models.py
"""
import json
import pathlib
import shutil

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "tiny"
torch.manual_seed(1234)

MODELS = {
    # name: (arch, config kwargs)
    "llama_gqa_tied": ("llama", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                                     tie_word_embeddings=True, rope_theta=10000.0)),
    "llama_mha_untied_odd": ("llama", dict(hidden_size=96, intermediate_size=80, num_attention_heads=3,
                                           num_key_value_heads=3, num_hidden_layers=1, vocab_size=101,
                                           tie_word_embeddings=False, rope_theta=500000.0)),
    "llama_rope_llama3": ("llama", dict(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=1, vocab_size=100,
                                        tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16})),
    "qwen2_gqa_bias": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                                     num_key_value_heads=2, num_hidden_layers=2, vocab_size=96,
                                     tie_word_embeddings=False, rope_theta=1000000.0)),
}
TOKENS = [3, 17, 0, 42, 91, 5, 64]


def permute(w, n_head):
    """llama.cpp's converter: q/k rows reordered for interleaved RoPE pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    for a, b in [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
                 ("lm_head.weight", "output.weight")]:
        if hf == a:
            return b
    parts = hf.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    table = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    return f"blk.{layer}.{table[rest]}"


def quantisable(name, w):
    return w.ndim == 2 and w.shape[1] % 32 == 0


def write_gguf(path, arch, cfg, state, qtype):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    theta = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(theta.get("rope_theta") or cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rp = getattr(cfg, "rope_parameters", None) or {}
    if rp.get("rope_type") == "llama3":
        # As llama.cpp's converter: per-frequency divisors in a `rope_freqs` tensor.
        hd = cfg.hidden_size // cfg.num_attention_heads
        freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        low = rp["original_max_position_embeddings"] / rp["low_freq_factor"]
        high = rp["original_max_position_embeddings"] / rp["high_freq_factor"]
        factors = []
        for f in freqs:
            wavelen = 2 * np.pi / f
            if wavelen < high:
                factors.append(1.0)
            elif wavelen > low:
                factors.append(rp["factor"])
            else:
                smooth = (rp["original_max_position_embeddings"] / wavelen - rp["low_freq_factor"]) / (
                    rp["high_freq_factor"] - rp["low_freq_factor"])
                factors.append(1 / ((1 - smooth) / rp["factor"] + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    for name, t in state.items():
        a = t.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = permute(a, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            a = permute(a, cfg.num_key_value_heads)
        if qtype is not None and quantisable(name, a):
            w.add_tensor(gguf_name(name), quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits_of(model, state=None):
    if state is not None:
        model.load_state_dict(state)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float().numpy()


if OUT.exists():
    shutil.rmtree(OUT)
golden = {"generator": "tools/reference/tiny_models.py", "transformers": __import__("transformers").__version__,
          "tokens": TOKENS, "models": {}}
for name, (arch, kw) in MODELS.items():
    cls_cfg, cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cls_cfg(max_position_embeddings=64, rms_norm_eps=1e-5, **kw)
    model = cls(cfg).eval()
    # Random init is small; widen the weights so the logits spread and errors show.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    d = OUT / name
    model.save_pretrained(d, safe_serialization=True)
    for junk in ("generation_config.json",):
        (d / junk).unlink(missing_ok=True)
    if name == "qwen2_gqa_bias":
        # The same weights again as a sharded checkpoint (model.safetensors.index.json).
        model.save_pretrained(OUT / (name + "_sharded"), safe_serialization=True, max_shard_size="150KB")
        (OUT / (name + "_sharded") / "generation_config.json").unlink(missing_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    entry = {"f32": logits_of(model).round(6).tolist()}
    write_gguf(d / "f32.gguf", arch, cfg, state, None)
    for qname, qtype in [("q8_0", T.Q8_0), ("q4_0", T.Q4_0)]:
        write_gguf(d / f"{qname}.gguf", arch, cfg, state, qtype)
        deq = {}
        for k, v in state.items():
            a = v.float().numpy()
            if quantisable(k, a):
                a = quants.dequantize(quants.quantize(a, qtype), qtype).reshape(a.shape)
            deq[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        full = dict(deq)
        if cfg.tie_word_embeddings:
            full["lm_head.weight"] = full["model.embed_tokens.weight"]
        entry[qname] = logits_of(model, full).round(6).tolist()
        model.load_state_dict({k: v for k, v in state.items()} | ({"lm_head.weight": state["model.embed_tokens.weight"]} if cfg.tie_word_embeddings else {}))
    golden["models"][name] = entry
(OUT / "logits.json").write_text(json.dumps(golden) + "\n")
print("wrote", OUT, sorted(p.name for p in OUT.iterdir()))
