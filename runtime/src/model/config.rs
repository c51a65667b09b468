//! The shape of a Llama-family model, read from GGUF metadata (or config.json, in
//! `files`), and checked before any size is derived from it.

use crate::backend::{RopeScaling, RopeStyle};
use crate::error::{Error, Result};
use crate::format::gguf::{Gguf, Value};
use std::prelude::v1::*;

/// Architectures sharing the one Llama implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM2, Mistral (grouped-query attention, no biases).
    Llama,
    /// Qwen2: biases on the q, k and v projections.
    Qwen2,
}

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: u32,
    pub dim: u32,
    pub ffn_dim: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub vocab: u32,
    pub context: u32,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    /// The output projection is the token embedding (no separate `output.weight`).
    pub tied_embeddings: bool,
    /// Where the values came from (for errors in the file's own words).
    pub origin: Origin,
}

/// The fields of a config, so errors can quote the file's own key for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Layers,
    Dim,
    FfnDim,
    Heads,
    KvHeads,
    HeadDim,
    Vocab,
    Context,
    RopeTheta,
    RmsEps,
    RopeScaling,
}

/// Where a config was read from: errors name that file and its own keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// GGUF metadata; keys are prefixed by the architecture name.
    Gguf { file: String, arch: String },
    /// A Hugging Face config.json.
    Json { file: String },
}

impl Origin {
    pub fn file(&self) -> &str {
        match self {
            Origin::Gguf { file, .. } | Origin::Json { file } => file,
        }
    }

    /// The key that holds `field` in this kind of file.
    pub fn key(&self, field: Field) -> String {
        match self {
            Origin::Gguf { arch, .. } => {
                let k = match field {
                    Field::Layers => "block_count",
                    Field::Dim => "embedding_length",
                    Field::FfnDim => "feed_forward_length",
                    Field::Heads => "attention.head_count",
                    Field::KvHeads => "attention.head_count_kv",
                    Field::HeadDim => "attention.key_length",
                    Field::Vocab => "vocab_size",
                    Field::Context => "context_length",
                    Field::RopeTheta => "rope.freq_base",
                    Field::RmsEps => "attention.layer_norm_rms_epsilon",
                    // Llama 3 divisors come as a tensor in GGUF.
                    Field::RopeScaling => return "rope_freqs.weight".into(),
                };
                format!("{arch}.{k}")
            }
            Origin::Json { .. } => match field {
                Field::Layers => "num_hidden_layers",
                Field::Dim => "hidden_size",
                Field::FfnDim => "intermediate_size",
                Field::Heads => "num_attention_heads",
                Field::KvHeads => "num_key_value_heads",
                Field::HeadDim => "head_dim",
                Field::Vocab => "vocab_size",
                Field::Context => "max_position_embeddings",
                Field::RopeTheta => "rope_theta",
                Field::RmsEps => "rms_norm_eps",
                Field::RopeScaling => "rope_scaling",
            }
            .into(),
        }
    }

    /// An error about `field`'s value.
    pub fn error(&self, field: Field, reason: String) -> Error {
        self.key_error(self.key(field), reason)
    }

    /// An error about the value of `key`.
    pub fn key_error(&self, key: String, reason: String) -> Error {
        Error::Metadata {
            file: self.file().to_owned(),
            key,
            reason,
        }
    }
}

/// A GGUF metadata value of the expected type: a missing key is `None`, a value of another
/// type is an error (never a silent default).
pub(crate) fn gguf_value<'a, T>(
    g: &'a Gguf,
    file: &str,
    key: &str,
    expected: &str,
    convert: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => convert(v).map(Some).ok_or_else(|| Error::Metadata {
            file: file.to_owned(),
            key: key.to_owned(),
            reason: match v.brief() {
                Some(b) => format!("is {} ({b}), expected {expected}", v.kind()),
                None => format!("is {}, expected {expected}", v.kind_of_array()),
            },
        }),
    }
}

/// Rope scaling as llama.cpp's metadata records it (`rope.scaling.type`). Llama 3's
/// per-frequency divisors come as a tensor, `rope_freqs.weight`, read by the model loader.
fn gguf_rope_scaling(g: &Gguf, origin: &Origin, arch: &str) -> Result<RopeScaling> {
    let kind_key = format!("{arch}.rope.scaling.type");
    match gguf_value(g, origin.file(), &kind_key, "a string", Value::as_str)? {
        None | Some("none") => Ok(RopeScaling::None),
        Some("linear") => {
            let key = format!("{arch}.rope.scaling.factor");
            let factor = gguf_value(g, origin.file(), &key, "a number", Value::as_f64)?
                .ok_or_else(|| origin.key_error(key.clone(), "is missing".into()))?;
            positive(origin, key, factor)?;
            Ok(RopeScaling::Linear(factor))
        }
        Some(other) => Err(origin.key_error(
            kind_key,
            format!("rope scaling `{other}` is not supported (none and linear are)"),
        )),
    }
}

/// Checks that a float that scales or divides is finite and positive.
fn positive(origin: &Origin, key: String, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(origin.key_error(key, format!("{v} must be finite and positive")))
    }
}

/// A float kept as f32 (the RMS epsilon): finite and positive after rounding, with the
/// file's own value in the message when rounding is what broke it.
pub fn positive_f32(origin: &Origin, field: Field, v: f64) -> Result<f32> {
    let r = v as f32;
    if r.is_finite() && r > 0.0 {
        Ok(r)
    } else {
        Err(origin.error(
            field,
            format!("{v:e} must be finite and positive as an f32 (it rounds to {r})"),
        ))
    }
}

/// The layers a file's tensors are for, from names `{prefix}{i}.…`: one past the highest
/// index, and the lowest index below it that no tensor has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayersPresent {
    pub end: u64,
    /// The lowest layer below `end` without tensors, if any.
    pub first_missing: Option<u64>,
}

pub fn layers_present<'a>(names: impl Iterator<Item = &'a str>, prefix: &str) -> LayersPresent {
    let indices: std::collections::BTreeSet<u64> = names
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .collect();
    LayersPresent {
        end: indices.last().map_or(0, |i| i.saturating_add(1)),
        first_missing: indices
            .iter()
            .zip(0u64..)
            .find(|(i, n)| *i != n)
            .map(|(_, n)| n),
    }
}

impl Config {
    /// Reads the config of a GGUF model (`file` names it in errors). Every missing,
    /// mistyped or inconsistent value is an error, and the counts are checked against the
    /// tensors the file holds.
    pub fn from_gguf(g: &Gguf, file: &str) -> Result<Config> {
        let arch_error = |reason: String| Error::Metadata {
            file: file.to_owned(),
            key: "general.architecture".into(),
            reason,
        };
        let arch_name = gguf_value(g, file, "general.architecture", "a string", Value::as_str)?
            .ok_or_else(|| arch_error("is missing".into()))?;
        let arch = match arch_name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(arch_error(format!(
                    "`{other}` is not supported (llama, mistral, qwen2 are)"
                )));
            }
        };
        let origin = Origin::Gguf {
            file: file.to_owned(),
            arch: arch_name.to_owned(),
        };
        let count = |field: Field| -> Result<Option<u32>> {
            let key = origin.key(field);
            let Some(v) = gguf_value(g, origin.file(), &key, "an unsigned integer", Value::as_u64)?
            else {
                return Ok(None);
            };
            u32::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .map(Some)
                .ok_or_else(|| origin.error(field, format!("{v} is not in 1..=4294967295")))
        };
        let required = |field: Field| -> Result<u32> {
            count(field)?.ok_or_else(|| origin.error(field, "is missing".into()))
        };
        let float = |field: Field, default: f64| -> Result<f64> {
            let key = origin.key(field);
            let v =
                gguf_value(g, origin.file(), &key, "a number", Value::as_f64)?.unwrap_or(default);
            positive(&origin, key, v)?;
            Ok(v)
        };
        let dim = required(Field::Dim)?;
        let n_heads = required(Field::Heads)?;
        let embd = "token_embd.weight";
        let token_embd = g.tensor(embd).ok_or_else(|| Error::Tensor {
            file: file.to_owned(),
            tensor: embd.into(),
            reason: "is missing".into(),
        })?;
        let (embd_dim, embd_vocab) = match token_embd.dims[..] {
            [d, v] => (d, v),
            _ => {
                return Err(Error::Tensor {
                    file: file.to_owned(),
                    tensor: embd.into(),
                    reason: format!(
                        "has dims {:?}, expected [width, vocabulary]",
                        token_embd.dims
                    ),
                });
            }
        };
        let vocab = match count(Field::Vocab)? {
            Some(v) => v,
            None => u32::try_from(embd_vocab).map_err(|_| Error::Tensor {
                file: file.to_owned(),
                tensor: embd.into(),
                reason: format!("vocabulary of {embd_vocab} is too large"),
            })?,
        };
        if (embd_dim, embd_vocab) != (u64::from(dim), u64::from(vocab)) {
            return Err(Error::Tensor {
                file: file.to_owned(),
                tensor: embd.into(),
                reason: format!(
                    "has dims [{embd_dim}, {embd_vocab}] but the metadata says width {dim} ({}) and vocabulary {vocab}",
                    origin.key(Field::Dim)
                ),
            });
        }
        let head_dim = match count(Field::HeadDim)? {
            Some(h) => h,
            None => dim / n_heads,
        };
        let cfg = Config {
            arch,
            n_layers: required(Field::Layers)?,
            dim,
            ffn_dim: required(Field::FfnDim)?,
            n_heads,
            n_kv_heads: count(Field::KvHeads)?.unwrap_or(n_heads),
            head_dim,
            vocab,
            context: required(Field::Context)?,
            rope_theta: float(Field::RopeTheta, 10_000.0)?,
            // llama.cpp's converter permutes Llama's q/k rows for interleaved pairs; Qwen2
            // keeps Hugging Face's half-split layout.
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::HalfSplit,
            },
            rope_scaling: gguf_rope_scaling(g, &origin, arch_name)?,
            rms_eps: positive_f32(&origin, Field::RmsEps, float(Field::RmsEps, 1e-5)?)?,
            tied_embeddings: g.tensor("output.weight").is_none(),
            origin,
        };
        cfg.validate()?;
        cfg.check_layers(layers_present(
            g.tensors.iter().map(|t| t.name.as_str()),
            "blk.",
        ))?;
        Ok(cfg)
    }

    /// Checks the declared layer count against the layers whose tensors the file holds:
    /// every layer from 0 up must have tensors, and no more.
    pub fn check_layers(&self, present: LayersPresent) -> Result<()> {
        if u64::from(self.n_layers) != present.end {
            return Err(self.origin.error(
                Field::Layers,
                format!(
                    "declares {} layers but the model's tensors are for {}",
                    self.n_layers, present.end
                ),
            ));
        }
        if let Some(gap) = present.first_missing {
            return Err(self.origin.error(
                Field::Layers,
                format!(
                    "the model's tensors are for layers 0 to {} but layer {gap} has none",
                    present.end - 1
                ),
            ));
        }
        Ok(())
    }

    /// Checks the values against each other, so that every size derived from them is
    /// meaningful and fits its type.
    pub(crate) fn validate(&self) -> Result<()> {
        let o = &self.origin;
        for (field, v) in [
            (Field::Layers, self.n_layers),
            (Field::Dim, self.dim),
            (Field::FfnDim, self.ffn_dim),
            (Field::Heads, self.n_heads),
            (Field::KvHeads, self.n_kv_heads),
            (Field::HeadDim, self.head_dim),
            (Field::Vocab, self.vocab),
            (Field::Context, self.context),
        ] {
            if v == 0 {
                return Err(o.error(field, "must be positive".into()));
            }
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return Err(o.error(
                Field::Heads,
                format!(
                    "{} heads do not divide the width {}",
                    self.n_heads, self.dim
                ),
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(o.error(
                Field::KvHeads,
                format!(
                    "{} kv heads do not divide the {} attention heads",
                    self.n_kv_heads, self.n_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > crate::backend::MAX_HEAD_DIM {
            // Without its own key the head dimension is width / heads: blame the heads.
            let derived = self.head_dim == self.dim / self.n_heads;
            return Err(o.error(
                if derived {
                    Field::Heads
                } else {
                    Field::HeadDim
                },
                format!(
                    "head dimension {}{} must be even and at most {}",
                    self.head_dim,
                    if derived {
                        format!(" (width {} / {} heads)", self.dim, self.n_heads)
                    } else {
                        String::new()
                    },
                    crate::backend::MAX_HEAD_DIM
                ),
            ));
        }
        // Every activation row is at most this wide; sizes are products of these and token
        // counts, computed in u64 from here on.
        if self.n_heads.checked_mul(self.head_dim).is_none() {
            return Err(o.error(
                Field::Heads,
                format!("{} heads of {} overflow a row", self.n_heads, self.head_dim),
            ));
        }
        positive(o, o.key(Field::RopeTheta), self.rope_theta)?;
        positive(o, o.key(Field::RmsEps), f64::from(self.rms_eps))?;
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear(f) => positive(o, o.key(Field::RopeScaling), *f)?,
            RopeScaling::Divisors(d) => {
                if d.len() != (self.head_dim / 2) as usize {
                    return Err(o.error(
                        Field::RopeScaling,
                        format!(
                            "{} rope frequency factors for head dimension {} (expected {})",
                            d.len(),
                            self.head_dim,
                            self.head_dim / 2
                        ),
                    ));
                }
                if let Some((i, v)) = d
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !(v.is_finite() && **v > 0.0))
                {
                    return Err(o.error(
                        Field::RopeScaling,
                        format!("rope frequency factor {i} is {v}; it must be finite and positive"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Bytes of KV cache per position (keys and values, all layers, f32).
    pub fn kv_bytes_per_position(&self) -> u64 {
        // Validated counts are u32 and head_dim <= 256: 2 * 2^32 * 2^32 * 2^8 * 4 overflows,
        // so saturate rather than trust the product.
        [u64::from(self.n_kv_heads), u64::from(self.head_dim), 4]
            .iter()
            .fold(2 * u64::from(self.n_layers), |a, b| a.saturating_mul(*b))
    }
}
