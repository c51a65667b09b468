#!/usr/bin/env python3
"""A small Hugging Face tokenizer.json (BPE trained on a few sentences, ChatML special
tokens) with tokenizer_config.json, and the ids transformers' PreTrainedTokenizerFast gives
for a set of texts. Writes tests/golden/tokenizer/. Regenerate with:
    /tmp/ref/bin/python tools/reference/tokenizer_json.py   (needs tokenizers, transformers)
"""
import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "golden" / "tokenizer"
OUT.mkdir(parents=True, exist_ok=True)
corpus = ["the robot learns to paint the sky", "a small model runs on the device",
          "tokens are numbers and numbers are tokens", "hello world, hello robot!"] * 20
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.decoder = decoders.BPEDecoder()
trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
tok.train_from_iterator(corpus, trainer)
tok.save(str(OUT / "tokenizer.json"))
(OUT / "tokenizer_config.json").write_text(json.dumps({
    "bos_token": None,
    "eos_token": "<|endoftext|>",
    "add_bos_token": False,
    "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}",
}, indent=1) + "\n")
fast = PreTrainedTokenizerFast(tokenizer_file=str(OUT / "tokenizer.json"))
texts = ["the robot learns", "hello world, hello robot!", "<|im_start|>user\nhi the robot<|im_end|>", "numbers"]
(OUT / "expected.json").write_text(json.dumps({
    "generator": "tools/reference/tokenizer_json.py",
    "cases": [{"text": t, "ids": fast(t, add_special_tokens=False)["input_ids"]} for t in texts],
    "im_end": tok.token_to_id("<|im_end|>"),
    "endoftext": tok.token_to_id("<|endoftext|>"),
}, indent=1) + "\n")
print("wrote", OUT)
