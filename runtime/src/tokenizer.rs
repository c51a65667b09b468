//! Tokenizers: the one embedded in GGUF metadata (byte-level BPE as in SmolLM2, Llama 3 and
//! Qwen2) and Hugging Face tokenizer.json files, both run by the `tokenizers` crate (its
//! pure-Rust regex engine, no C/C++). Chat templates are recognised, never executed.

use crate::error::{Error, Result};
use crate::format::file::{FileKind, parse_json, read_bounded, read_json};
use crate::format::gguf::{Array, Gguf, Value};
use crate::guard::guarded;
use crate::model::config::gguf_value;
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

    /// One turn of a conversation as (header, body): the loss of a training conversation
    /// covers an assistant turn's body, which ends with the end-of-turn marker. `None`
    /// without a recognised format.
    pub fn turn(&self, role: &str, content: &str) -> Option<(String, String)> {
        match self {
            ChatTemplate::ChatMl { .. } => Some((
                format!("<|im_start|>{role}\n"),
                format!("{content}<|im_end|>\n"),
            )),
            ChatTemplate::Llama3 => Some((
                format!("<|start_header_id|>{role}<|end_header_id|>\n\n"),
                format!("{content}<|eot_id|>"),
            )),
            ChatTemplate::Raw => None,
        }
    }

    /// What a conversation starts with: Llama 3's begin marker, or ChatML's default system
    /// turn when the conversation has no system message.
    pub fn conversation_start(&self, has_system: bool) -> String {
        match self {
            ChatTemplate::ChatMl {
                default_system: Some(s),
            } if !has_system => format!("<|im_start|>system\n{s}<|im_end|>\n"),
            ChatTemplate::Llama3 => "<|begin_of_text|>".into(),
            _ => String::new(),
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

/// Generated text as it grows: each token is decoded with those before it (a token may
/// end inside a UTF-8 sequence, or change how the previous ones decode), and only text
/// that is complete and will not change is handed out.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    shown: String,
}

impl TextStream {
    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        Ok(self.take(text))
    }

    /// The text not yet handed out once generation has ended.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let text = tok.decode(&self.ids)?;
        Ok(self.take(text))
    }

    /// What `text` adds beyond the text already shown. A later token may change how earlier
    /// ones decode (a tokenizer's clean-up of spaces, say); what was shown cannot be taken
    /// back, so the stream resyncs, going on from the same length of the new text (at a
    /// character boundary), rather than stalling until the end.
    fn take(&mut self, text: String) -> Option<String> {
        let mut from = self.shown.len().min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let new = text[from..].to_owned();
        self.shown = text;
        (!new.is_empty()).then_some(new)
    }
}

fn tok_err(source: &str, reason: impl core::fmt::Display) -> Error {
    Error::Tokenizer {
        source: source.to_owned(),
        reason: reason.to_string(),
    }
}

/// The component types the `tokenizers` crate runs, by tokenizer.json's `type` names. A
/// file naming another is reported by name before the crate sees it.
const MODELS: &[&str] = &["BPE", "WordPiece", "WordLevel", "Unigram"];
const NORMALIZERS: &[&str] = &[
    "BertNormalizer",
    "Bert",
    "Strip",
    "StripAccents",
    "NFC",
    "NFD",
    "NFKC",
    "NFKD",
    "Sequence",
    "Lowercase",
    "Nmt",
    "Precompiled",
    "Replace",
    "Prepend",
    "ByteLevel",
];
const PRE_TOKENIZERS: &[&str] = &[
    "BertPreTokenizer",
    "ByteLevel",
    "CharDelimiterSplit",
    "Metaspace",
    "Whitespace",
    "Sequence",
    "Split",
    "Punctuation",
    "WhitespaceSplit",
    "Digits",
    "UnicodeScripts",
    "FixedLength",
];

/// Checks that `v` (a component of tokenizer.json under `key`) and, for sequences, its
/// parts have a `type` from `known`.
fn check_component(
    source: &str,
    key: &str,
    v: &serde_json::Value,
    known: &[&str],
    parts: &str,
) -> Result<()> {
    if v.is_null() {
        return Ok(());
    }
    let kind = v
        .get("type")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| tok_err(source, format!("`{key}` has no `type` string")))?;
    if !known.contains(&kind) {
        return Err(tok_err(
            source,
            format!(
                "{key} type `{kind}` is not supported (supported: {})",
                known.join(", ")
            ),
        ));
    }
    if kind == "Precompiled" {
        check_precompiled(source, v)?;
    }
    if kind == "Sequence" {
        let list = v
            .get(parts)
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| {
                tok_err(
                    source,
                    format!("the `{key}` sequence has no `{parts}` list"),
                )
            })?;
        for part in list {
            check_component(source, key, part, known, parts)?;
        }
    }
    Ok(())
}

/// SentencePiece's precompiled normaliser is base64 of a u32 trie size in bytes, the trie,
/// then the normalised strings. The `tokenizers` crate reserves a `usize` per declared trie
/// byte before checking the size against the data (8 characters can ask for 32 GiB, an
/// abort no panic boundary catches), so the size is checked here first.
fn check_precompiled(source: &str, v: &serde_json::Value) -> Result<()> {
    let bad = |why: &str| {
        Err(tok_err(
            source,
            format!("normalizer Precompiled: `precompiled_charsmap` {why}"),
        ))
    };
    let Some(b64) = v
        .get("precompiled_charsmap")
        .and_then(serde_json::Value::as_str)
    else {
        return bad("is missing or not a string");
    };
    let sextet = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let body = b64.trim_end_matches('=').as_bytes();
    if body.len() < 6 || b64.len() % 4 != 0 {
        return bad("is too short or not base64");
    }
    // The first six characters carry the first four bytes (and a half).
    let mut bits = 0u64;
    for &c in &body[..6] {
        let Some(v) = sextet(c) else {
            return bad("is not base64");
        };
        bits = bits << 6 | u64::from(v);
    }
    let first4 = (bits >> 4) as u32; // 36 bits, the top 32 are bytes 0..4
    let trie_bytes = u64::from(first4.swap_bytes());
    let total = body.len() as u64 * 6 / 8;
    if trie_bytes % 4 != 0 || trie_bytes > total - 4 {
        return bad(&format!(
            "declares a trie of {trie_bytes} bytes in {total} bytes of data"
        ));
    }
    Ok(())
}

/// Builds a tokenizer from a tokenizer.json document, behind the panic boundary. Its own
/// padding and truncation are dropped: edgetune decides sequence lengths.
fn build(source: &str, mut spec: serde_json::Value) -> Result<tokenizers::Tokenizer> {
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| tok_err(source, "the document is not a JSON object"))?;
    // The crate reports an unknown key as a syntax error at a position in the document it
    // was handed, not in the user's file.
    const KEYS: &[&str] = &[
        "version",
        "truncation",
        "padding",
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
        "model",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(tok_err(
            source,
            format!("unknown top-level key `{k}` (known: {})", KEYS.join(", ")),
        ));
    }
    obj.insert("padding".into(), serde_json::Value::Null);
    obj.insert("truncation".into(), serde_json::Value::Null);
    let model = obj
        .get("model")
        .ok_or_else(|| tok_err(source, "`model` is missing"))?;
    check_component(source, "model", model, MODELS, "")?;
    if let Some(n) = obj.get("normalizer") {
        check_component(source, "normalizer", n, NORMALIZERS, "normalizers")?;
    }
    if let Some(p) = obj.get("pre_tokenizer") {
        check_component(source, "pre_tokenizer", p, PRE_TOKENIZERS, "pretokenizers")?;
    }
    let bytes = serde_json::to_vec(&spec).map_err(|e| tok_err(source, e))?;
    guarded("tokenizers", source, || {
        tokenizers::Tokenizer::from_bytes(&bytes)
    })?
    .map_err(|e| tok_err(source, e))
}

/// The pre-tokenizer of each llama.cpp `tokenizer.ggml.pre` name we support, as
/// tokenizer.json describes it.
fn pre_tokenizer(pre: &str) -> core::result::Result<serde_json::Value, String> {
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
        other => return Err(format!("pre-tokenizer `{other}` is not supported")),
    })
}

impl Tokenizer {
    /// The tokenizer embedded in a GGUF file's metadata (`file` names it in errors).
    pub fn from_gguf(g: &Gguf, file: &str) -> Result<Tokenizer> {
        let tok_err = |key: &str, reason: &str| tok_err(file, format!("`{key}`: {reason}"));
        // Typed reads: a value of the wrong type is an error, never a default.
        let s = |k: &str| gguf_value(g, file, k, "a string", Value::as_str);
        let model =
            s("tokenizer.ggml.model")?.ok_or_else(|| tok_err("tokenizer.ggml.model", "missing"))?;
        if model != "gpt2" {
            return Err(tok_err(
                "tokenizer.ggml.model",
                &format!("`{model}` is not supported (byte-level BPE `gpt2` is)"),
            ));
        }
        let Some(Value::Array(Array::Str(tokens))) = g.get("tokenizer.ggml.tokens") else {
            return Err(tok_err("tokenizer.ggml.tokens", "missing or not strings"));
        };
        let Some(Value::Array(Array::Str(merges))) = g.get("tokenizer.ggml.merges") else {
            return Err(tok_err("tokenizer.ggml.merges", "missing or not strings"));
        };
        let types: &[i32] = match g.get("tokenizer.ggml.token_type") {
            None => &[],
            Some(Value::Array(Array::I32(t))) if t.len() == tokens.len() => t,
            Some(Value::Array(Array::I32(t))) => {
                return Err(tok_err(
                    "tokenizer.ggml.token_type",
                    &format!("has {} entries for {} tokens", t.len(), tokens.len()),
                ));
            }
            Some(other) => {
                return Err(tok_err(
                    "tokenizer.ggml.token_type",
                    &format!("is {}, expected an array of i32", other.kind_of_array()),
                ));
            }
        };
        // Special token ids must name tokens of this vocabulary.
        let id = |k: &str| -> Result<Option<u32>> {
            let Some(v) = gguf_value(g, file, k, "an unsigned integer", Value::as_u64)? else {
                return Ok(None);
            };
            match u32::try_from(v) {
                Ok(i) if (i as usize) < tokens.len() => Ok(Some(i)),
                _ => Err(tok_err(
                    k,
                    &format!(
                        "{v} is not a token id (the vocabulary has {})",
                        tokens.len()
                    ),
                )),
            }
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
            "pre_tokenizer": pre_tokenizer(s("tokenizer.ggml.pre")?.unwrap_or("default"))
                .map_err(|e| tok_err("tokenizer.ggml.pre", &e))?,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner = build(file, spec)?;
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
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
            bos: id("tokenizer.ggml.bos_token_id")?,
            add_bos: gguf_value(
                g,
                file,
                "tokenizer.ggml.add_bos_token",
                "a boolean",
                Value::as_bool,
            )?
            .unwrap_or(false),
            chat: ChatTemplate::recognise(s("tokenizer.chat_template")?),
        })
    }

    /// A tokenizer from the bytes of a tokenizer.json alone (`source` names it in errors):
    /// checked, stripped of padding and truncation, built behind the panic boundary.
    pub fn from_json_bytes(bytes: &[u8], source: &str) -> Result<Tokenizer> {
        Self::with_config(build(source, parse_json(bytes, source)?)?, None)
    }

    /// A Hugging Face tokenizer.json (with tokenizer_config.json beside it, if present,
    /// for the special tokens and the chat template).
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let source = path.display().to_string();
        let inner = build(
            &source,
            parse_json(&read_bounded(path, FileKind::Tokenizer)?, &source)?,
        )?;
        let config_path = path.parent().map(|d| d.join("tokenizer_config.json"));
        // A tokenizer_config.json that cannot be read is an error, not a file to ignore.
        let config = match config_path {
            Some(p)
                if p.try_exists()
                    .map_err(|e| tok_err(&p.display().to_string(), e))? =>
            {
                Some((read_json(&p, FileKind::TokenizerConfig)?, p))
            }
            _ => None,
        };
        Self::with_config(inner, config)
    }

    /// The special tokens and chat format from tokenizer_config.json (parsed, with its
    /// path), if there is one.
    fn with_config(
        inner: tokenizers::Tokenizer,
        config: Option<(serde_json::Value, std::path::PathBuf)>,
    ) -> Result<Tokenizer> {
        let config_error = |key: &str, reason: &str| -> Error {
            Error::Metadata {
                file: config
                    .as_ref()
                    .map(|(_, p)| p.display().to_string())
                    .unwrap_or_default(),
                key: key.to_owned(),
                reason: reason.to_owned(),
            }
        };
        let get = |key: &str| -> Option<&serde_json::Value> {
            config.as_ref()?.0.get(key).filter(|v| !v.is_null())
        };
        // A special token is written as its text or as an object with `content`.
        let token_of = |key: &str| -> Result<Option<u32>> {
            let Some(v) = get(key) else { return Ok(None) };
            let text = v
                .as_str()
                .or_else(|| v.get("content")?.as_str())
                .ok_or_else(|| {
                    config_error(key, "is neither a string nor {\"content\": string}")
                })?;
            // transformers adds a special token missing from tokenizer.json to the vocabulary;
            // here it has no id, which matters only where it would be used (a BOS that
            // prompts start with, checked below).
            Ok(inner.token_to_id(text))
        };
        let mut eos: Vec<u32> = token_of("eos_token")?.into_iter().collect();
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(i) = inner.token_to_id(name).filter(|i| !eos.contains(i)) {
                eos.push(i);
            }
        }
        // `chat_template` is one template, or a list of named ones of which `default` is used.
        let template = match get("chat_template") {
            None => None,
            Some(serde_json::Value::String(t)) => Some(t.as_str()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str()),
            Some(_) => {
                return Err(config_error(
                    "chat_template",
                    "is neither a string nor a list",
                ));
            }
        };
        let add_bos = match get("add_bos_token") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| config_error("add_bos_token", "is not a boolean"))?,
        };
        let bos = token_of("bos_token")?;
        if add_bos && bos.is_none() {
            return Err(config_error(
                "bos_token",
                "is missing or not a token of tokenizer.json, but add_bos_token is true",
            ));
        }
        Ok(Tokenizer {
            bos,
            add_bos,
            eos,
            chat: ChatTemplate::recognise(template),
            inner,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// ids; no BOS is added (see [`Tokenizer::encode_prompt`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(
            guarded("tokenizers", "encode", || self.inner.encode(text, false))?
                .map_err(|e| tok_err("encode", e))?
                .get_ids()
                .to_vec(),
        )
    }

    /// Token ids of a prompt: the BOS token first when the model wants one (once: a chat
    /// format such as Llama 3's writes it as text already).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The text of `ids`, special tokens included. Ids the tokenizer does not know (a model's
    /// vocabulary is often padded past its tokenizer's) contribute nothing, as in
    /// transformers.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| self.inner.id_to_token(id).is_some())
            .collect();
        // Some decoders index the last token unconditionally.
        if known.is_empty() {
            return Ok(String::new());
        }
        guarded("tokenizers", "decode", || self.inner.decode(&known, false))?
            .map_err(|e| tok_err("decode", e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::TextStream;
    use std::prelude::v1::*;

    fn take(s: &mut TextStream, text: &str) -> Option<String> {
        s.take(text.to_owned())
    }

    #[test]
    fn text_stream_hands_out_growth_once_and_resyncs_after_a_rewrite() {
        let mut s = TextStream::default();
        assert_eq!(take(&mut s, "ab").as_deref(), Some("ab"));
        assert_eq!(take(&mut s, "abc").as_deref(), Some("c"));
        assert_eq!(take(&mut s, "abc"), None);
        // Earlier text decoded differently: the stream goes on instead of stalling.
        assert_eq!(take(&mut s, "xbcd").as_deref(), Some("d"));
        assert_eq!(take(&mut s, "xbcde").as_deref(), Some("e"));
        // A rewrite that cuts inside a multi-byte character goes back to its start.
        let mut s = TextStream::default();
        assert_eq!(take(&mut s, "ab").as_deref(), Some("ab"));
        assert_eq!(take(&mut s, "a\u{e9}z").as_deref(), Some("\u{e9}z"));
    }
}
