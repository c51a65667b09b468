//! Tokenizers: the one embedded in GGUF metadata (byte-level BPE as in SmolLM2, Llama 3 and
//! Qwen2) and Hugging Face tokenizer.json files, both run by the `tokenizers` crate (its
//! pure-Rust regex engine, no C/C++). Chat templates are recognised, never executed.

use crate::error::{Error, Result};
use crate::format::gguf::{Array, Gguf, Value};
use serde_json::json;
use std::path::Path;
use std::prelude::v1::*;

/// The chat formats edgetune writes natively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n...<|im_end|>\n` (SmolLM2-Instruct, Qwen2), with the default
    /// system message the model's template inserts when there is none.
    ChatMl { default_system: Option<String> },
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>` (Llama 3).
    Llama3,
    /// No template, or one not recognised: the prompt is used as it is.
    Raw,
}

impl ChatTemplate {
    /// Recognises a Jinja chat template by its markers. The template text is only searched,
    /// never run.
    pub fn recognise(template: Option<&str>) -> ChatTemplate {
        let Some(t) = template else {
            return ChatTemplate::Raw;
        };
        if t.contains("<|im_start|>") {
            // A literal default system turn, as SmolLM2's and Qwen2's templates contain.
            let marker = "<|im_start|>system\n";
            let default_system = t.find(marker).and_then(|i| {
                let rest = &t[i + marker.len()..];
                let end = rest.find("<|im_end|>")?;
                let msg = &rest[..end];
                // Only a plain literal counts, not template code.
                (!msg.contains("{{") && !msg.contains("{%") && !msg.contains('\''))
                    .then(|| msg.to_string())
            });
            ChatTemplate::ChatMl { default_system }
        } else if t.contains("<|start_header_id|>") {
            ChatTemplate::Llama3
        } else {
            ChatTemplate::Raw
        }
    }

    /// The prompt for one user turn, ready for the assistant's reply.
    pub fn user_turn(&self, user: &str) -> String {
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let system = default_system
                    .as_ref()
                    .map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n"))
                    .unwrap_or_default();
                format!("{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
            }
            ChatTemplate::Llama3 => format!(
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            ChatTemplate::Raw => user.to_string(),
        }
    }
}

/// A tokenizer with the model's special tokens and chat format.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Token ids that end generation.
    pub eos: Vec<u32>,
    pub bos: Option<u32>,
    /// Whether a BOS token is prepended to prompts.
    pub add_bos: bool,
    pub chat: ChatTemplate,
}

fn tok_err(context: &str, e: impl core::fmt::Display) -> Error {
    Error::InvalidShape {
        op: "tokenizer",
        reason: format!("{context}: {e}"),
    }
}

/// The pre-tokenizer of each llama.cpp `tokenizer.ggml.pre` name we support, as
/// tokenizer.json describes it.
fn pre_tokenizer(pre: &str) -> Result<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        other => {
            return Err(tok_err(
                "tokenizer.ggml.pre",
                format!("pre-tokenizer `{other}` is not supported"),
            ));
        }
    })
}

impl Tokenizer {
    /// The tokenizer embedded in a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let s = |k: &str| g.get(k).and_then(Value::as_str);
        let id = |k: &str| {
            g.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let model =
            s("tokenizer.ggml.model").ok_or_else(|| tok_err("tokenizer.ggml.model", "missing"))?;
        if model != "gpt2" {
            return Err(tok_err(
                "tokenizer.ggml.model",
                format!("`{model}` is not supported (byte-level BPE `gpt2` is)"),
            ));
        }
        let Some(Value::Array(Array::Str(tokens))) = g.get("tokenizer.ggml.tokens") else {
            return Err(tok_err("tokenizer.ggml.tokens", "missing or not strings"));
        };
        let Some(Value::Array(Array::Str(merges))) = g.get("tokenizer.ggml.merges") else {
            return Err(tok_err("tokenizer.ggml.merges", "missing or not strings"));
        };
        let types: &[i32] = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(Array::I32(t))) if t.len() == tokens.len() => t,
            _ => &[],
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // llama.cpp token types: 3 = control (special), 4 = user-defined.
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, ty)| **ty == 3 || **ty == 4)
            .map(|(i, ty)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": *ty == 3})
            })
            .collect();
        let merges: Vec<&str> = merges.iter().map(String::as_str).collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(s("tokenizer.ggml.pre").unwrap_or("default"))?,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| tok_err("building the GGUF tokenizer", e))?;
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        // Chat models end turns with their end-of-turn token, not always the EOS.
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(i) = tokens.iter().position(|t| t == name) {
                let i = i as u32;
                if !eos.contains(&i) {
                    eos.push(i);
                }
            }
        }
        Ok(Tokenizer {
            inner,
            eos,
            bos: id("tokenizer.ggml.bos_token_id"),
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            chat: ChatTemplate::recognise(s("tokenizer.chat_template")),
        })
    }

    /// A Hugging Face tokenizer.json (with tokenizer_config.json beside it, if present,
    /// for the chat template).
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(&path.display().to_string(), e))?;
        let config: Option<serde_json::Value> = path
            .parent()
            .and_then(|d| std::fs::read_to_string(d.join("tokenizer_config.json")).ok())
            .and_then(|s| serde_json::from_str(&s).ok());
        let token_of = |key: &str| -> Option<u32> {
            let v = config.as_ref()?.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(text)
        };
        let mut eos: Vec<u32> = token_of("eos_token").into_iter().collect();
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(i) = inner.token_to_id(name).filter(|i| !eos.contains(i)) {
                eos.push(i);
            }
        }
        let template = config
            .as_ref()
            .and_then(|c| c.get("chat_template")?.as_str().map(str::to_owned));
        Ok(Tokenizer {
            bos: token_of("bos_token"),
            add_bos: config
                .as_ref()
                .and_then(|c| c.get("add_bos_token")?.as_bool())
                .unwrap_or(false),
            eos,
            chat: ChatTemplate::recognise(template.as_deref()),
            inner,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// ids; no BOS is added (see [`Tokenizer::encode_prompt`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err("encode", e))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of a prompt: the BOS token first when the model wants one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err("decode", e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
