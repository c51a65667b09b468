//! The shape of a Llama-family model, read from GGUF metadata.

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
}

fn bad(what: String) -> Error {
    Error::InvalidShape {
        op: "model config",
        reason: what,
    }
}

/// Rope scaling as llama.cpp's metadata records it (`rope.scaling.type`). Llama 3's
/// per-frequency divisors come as a tensor, `rope_freqs.weight`, read by the model loader.
fn gguf_rope_scaling(g: &Gguf, arch: &str) -> Result<RopeScaling> {
    match g
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(Value::as_str)
    {
        None | Some("none") => Ok(RopeScaling::None),
        Some("linear") => {
            let factor = g
                .get(&format!("{arch}.rope.scaling.factor"))
                .and_then(Value::as_f64)
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| bad("rope.scaling.factor is missing or not positive".into()))?;
            Ok(RopeScaling::Linear(factor))
        }
        Some(other) => Err(bad(format!("rope scaling `{other}` is not supported"))),
    }
}

impl Config {
    /// Reads the config of a GGUF model; every missing or inconsistent value is an error.
    pub fn from_gguf(g: &Gguf) -> Result<Config> {
        let arch_name = g
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("general.architecture is missing".into()))?;
        let arch = match arch_name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(bad(format!(
                    "unsupported architecture `{other}` (llama, mistral, qwen2 are)"
                )));
            }
        };
        let int = |key: &str| -> Result<u32> {
            let full = format!("{arch_name}.{key}");
            g.get(&full)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| bad(format!("{full} is missing or not a positive u32")))
        };
        let float = |key: &str, default: f64| -> f64 {
            g.get(&format!("{arch_name}.{key}"))
                .and_then(Value::as_f64)
                .unwrap_or(default)
        };
        let dim = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let n_kv_heads = match g.get(&format!("{arch_name}.attention.head_count_kv")) {
            Some(_) => int("attention.head_count_kv")?,
            None => n_heads,
        };
        let token_embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| bad("tensor token_embd.weight is missing".into()))?;
        let vocab = match g.get(&format!("{arch_name}.vocab_size")) {
            Some(_) => int("vocab_size")?,
            None => token_embd
                .dims
                .get(1)
                .copied()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
        };
        let cfg = Config {
            arch,
            n_layers: int("block_count")?,
            dim,
            ffn_dim: int("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads,
            vocab,
            context: int("context_length")?,
            rope_theta: float("rope.freq_base", 10_000.0),
            // llama.cpp's converter permutes Llama's q/k rows for interleaved pairs; Qwen2
            // keeps Hugging Face's half-split layout.
            rope_style: match arch {
                Arch::Llama => RopeStyle::Interleaved,
                Arch::Qwen2 => RopeStyle::HalfSplit,
            },
            rope_scaling: gguf_rope_scaling(g, arch_name)?,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5) as f32,
            tied_embeddings: g.tensor("output.weight").is_none(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let RopeScaling::Divisors(d) = &self.rope_scaling
            && d.len() != (self.head_dim / 2) as usize
        {
            return Err(bad(format!(
                "{} rope frequency factors for head dimension {}",
                d.len(),
                self.head_dim
            )));
        }
        if !self.dim.is_multiple_of(self.n_heads) || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(bad(format!(
                "{} heads, {} kv heads and width {} do not divide",
                self.n_heads, self.n_kv_heads, self.dim
            )));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > crate::backend::MAX_HEAD_DIM {
            return Err(bad(format!(
                "head dimension {} is odd or too large",
                self.head_dim
            )));
        }
        if self.vocab == 0 {
            return Err(bad("vocabulary size is 0".into()));
        }
        Ok(())
    }

    /// Bytes of KV cache per position (keys and values, all layers, f32).
    pub fn kv_bytes_per_position(&self) -> u64 {
        2 * u64::from(self.n_layers) * u64::from(self.n_kv_heads) * u64::from(self.head_dim) * 4
    }
}
