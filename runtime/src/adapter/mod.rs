//! Adapters as parameter sets: what is trainable, in which pinned order, under which names.
//!
//! An [`AdapterConfig`] says which small tensors a model gains (LoRA's A and B, IA3's
//! scales) or which of its own become trainable (the norm weights). [`layout`] lists them
//! in a pinned order with PEFT's tensor names and shapes; a tensor's index in that list is
//! its tensor id in the perturbation z (see [`crate::rng`]), and [`layout_hash`] pins the
//! whole list, so a seed history can only be replayed onto the parameters it was made for.
//! The model attaches them ([`crate::model::Model::attach`]); nothing here touches a backend.

#[cfg(feature = "std")]
pub mod gguf;
#[cfg(feature = "std")]
pub mod merge;
#[cfg(feature = "std")]
pub mod peft;

use crate::error::{Error, Result};
use crate::rng::{self, philox4x32_10};
use sha2::{Digest, Sha256};
use std::prelude::v1::*;

/// The largest adapter or start-values file edgetune writes or reads (a full run's f32
/// weights must fit).
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// A projection an adapter can attach to, in the pinned order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The short name the CLI takes (`q`, `gate`, ...).
    pub fn short(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    /// The module name in transformers' Llama (PEFT's `target_modules`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer.
    fn path(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    /// A target from its short or module name.
    pub fn parse(s: &str) -> Result<Target> {
        Target::ALL
            .into_iter()
            .find(|t| t.short() == s || t.module() == s)
            .ok_or_else(|| Error::InvalidArgument {
                name: "targets",
                reason: format!("`{s}` is not one of q, k, v, o, gate, up, down"),
            })
    }
}

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// y += scale * B (A x) on each target; A \[rank, in\], B \[out, rank\]; scale is
    /// alpha / rank, or alpha / sqrt(rank) with rsLoRA.
    Lora { rank: u32, alpha: f32, rslora: bool },
    /// IA3: learned scales on the outputs of k and v and the input of down (PEFT's
    /// feed-forward convention), initialised to one.
    Ia3,
    /// The model's own RMSNorm weights (two per layer and the final one).
    Norms,
    /// Every weight of an unquantised (f32, f16, bf16) model, held in f32 while it trains.
    Full,
    /// The block scales of a quantised model's projections on each target (QZO): the codes
    /// stay frozen, and each block's scale d (a K-quant's 256-element super-block d; its
    /// integer sub-block scales stay frozen too) learns as d * f, with
    /// the factor f held in f32 and starting at one (so eps and lr are relative, as for
    /// IA3, whatever the weights' magnitude).
    Scales,
}

/// An adapter: a method and the projections it attaches to (unused for norms).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub method: Method,
    pub targets: Vec<Target>,
}

impl AdapterConfig {
    /// LoRA of `rank` and `alpha` on `targets`.
    pub fn lora(rank: u32, alpha: f32, targets: &[Target]) -> AdapterConfig {
        AdapterConfig {
            method: Method::Lora {
                rank,
                alpha,
                rslora: false,
            },
            targets: targets.to_vec(),
        }
    }

    /// IA3 on PEFT's Llama defaults: k, v and down.
    pub fn ia3() -> AdapterConfig {
        AdapterConfig {
            method: Method::Ia3,
            targets: vec![Target::K, Target::V, Target::Down],
        }
    }

    pub fn norms() -> AdapterConfig {
        AdapterConfig {
            method: Method::Norms,
            targets: Vec::new(),
        }
    }

    pub fn full() -> AdapterConfig {
        AdapterConfig {
            method: Method::Full,
            targets: Vec::new(),
        }
    }

    /// The block scales of the projections on `targets`.
    pub fn scales(targets: &[Target]) -> AdapterConfig {
        AdapterConfig {
            method: Method::Scales,
            targets: targets.to_vec(),
        }
    }

    /// Checks ranges and normalises the target list (sorted into the pinned order, no
    /// duplicates).
    pub fn validate(&mut self) -> Result<()> {
        self.targets.sort();
        self.targets.dedup();
        match self.method {
            Method::Lora { rank, alpha, .. } => {
                if !(1..=1024).contains(&rank) {
                    return Err(Error::InvalidArgument {
                        name: "rank",
                        reason: format!("{rank} must be in 1..=1024"),
                    });
                }
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(Error::InvalidArgument {
                        name: "alpha",
                        reason: format!("{alpha} must be finite and > 0"),
                    });
                }
                if self.targets.is_empty() {
                    return Err(Error::InvalidArgument {
                        name: "targets",
                        reason: "LoRA needs at least one target".into(),
                    });
                }
            }
            Method::Ia3 | Method::Scales => {
                if self.targets.is_empty() {
                    return Err(Error::InvalidArgument {
                        name: "targets",
                        reason: format!("{} needs at least one target", self.method_name()),
                    });
                }
            }
            Method::Norms | Method::Full => self.targets.clear(),
        }
        Ok(())
    }

    /// LoRA's output scale.
    pub fn lora_scale(&self) -> f32 {
        match self.method {
            Method::Lora {
                rank,
                alpha,
                rslora,
            } => {
                let r = f64::from(rank);
                (f64::from(alpha) / if rslora { libm::sqrt(r) } else { r }) as f32
            }
            _ => 1.0,
        }
    }

    /// The method's name in files and on the command line.
    pub fn method_name(&self) -> &'static str {
        match self.method {
            Method::Lora { .. } => "lora",
            Method::Ia3 => "ia3",
            Method::Norms => "norms",
            Method::Full => "full",
            Method::Scales => "scales",
        }
    }
}

/// Where a trainable tensor sits in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    LoraA(u32, Target),
    LoraB(u32, Target),
    Ia3(u32, Target),
    AttnNorm(u32),
    FfnNorm(u32),
    OutputNorm,
    /// A projection's weight (full training).
    Weight(u32, Target),
    /// A projection's bias (full training of a model with biases).
    Bias(u32, Target),
    Embed,
    /// The output head of an untied model.
    Output,
    /// A projection's block-scale factors.
    Scales(u32, Target),
}

/// How a tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Uniform in (-bound, bound) from the init seed: PEFT's kaiming_uniform(a = sqrt(5))
    /// for LoRA's A, whose bound is 1 / sqrt(in_features).
    Uniform(f32),
    /// The model's own values (norm weights).
    Model,
}

/// One trainable tensor: its PEFT name, its shape as PEFT stores it, and its start.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub slot: Slot,
    pub rows: u32,
    pub cols: u32,
    pub init: Init,
}

impl ParamInfo {
    pub fn len(&self) -> u32 {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The model dimensions a layout depends on.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub n_layers: u32,
    pub dim: u32,
    pub q_dim: u32,
    pub kv_dim: u32,
    pub ffn_dim: u32,
    pub vocab: u32,
    /// The output head is the embedding.
    pub tied: bool,
    /// q, k and v have biases (Qwen2).
    pub biases: bool,
    /// Elements per trained factor of the "scales" set, per target in [`Target::ALL`]
    /// order: the block of layer 0's projection ([`crate::quant::scale_block`]; 32, or 256
    /// for the K-quants). llama.cpp's K-quant files give narrow projections a 32-element
    /// format, so the targets of one model can differ. Set through [`Dims::of`].
    scale_blocks: [u32; 7],
}

impl Dims {
    /// A model's dimensions, given the block of each target's weights (`scale_blocks`, in
    /// [`Target::ALL`] order; a zero counts as one).
    pub fn of(c: &crate::model::Config, scale_blocks: [u32; 7]) -> Dims {
        Dims {
            n_layers: c.n_layers,
            dim: c.dim,
            q_dim: c.n_heads * c.head_dim,
            kv_dim: c.n_kv_heads * c.head_dim,
            ffn_dim: c.ffn_dim,
            vocab: c.vocab,
            tied: c.tied_embeddings,
            biases: c.arch == crate::model::Arch::Qwen2,
            scale_blocks: scale_blocks.map(|b| b.max(1)),
        }
    }

    /// Elements per trained factor of target `t`'s "scales".
    pub fn scale_block(&self, t: Target) -> u32 {
        // The discriminants follow `Target::ALL`'s order.
        self.scale_blocks[t as usize]
    }

    /// (out, in) features of a target's projection.
    pub fn features(&self, t: Target) -> (u32, u32) {
        match t {
            Target::Q => (self.q_dim, self.dim),
            Target::K | Target::V => (self.kv_dim, self.dim),
            Target::O => (self.dim, self.q_dim),
            Target::Gate | Target::Up => (self.ffn_dim, self.dim),
            Target::Down => (self.dim, self.ffn_dim),
        }
    }
}

/// The trainable tensors of `cfg` on a model of `dims`, in the pinned order: layer by
/// layer, targets in [`Target::ALL`] order, LoRA's A before B; the final norm last.
pub fn layout(cfg: &AdapterConfig, dims: &Dims) -> Vec<ParamInfo> {
    if cfg.method == Method::Full {
        return full_layout(dims);
    }
    let mut out = Vec::new();
    let peft = |l: u32, t: Target, leaf: &str| {
        format!(
            "base_model.model.model.layers.{l}.{}.{}.{leaf}",
            t.path(),
            t.module()
        )
    };
    for l in 0..dims.n_layers {
        match cfg.method {
            Method::Lora { rank, .. } => {
                for &t in &cfg.targets {
                    let (n_out, n_in) = dims.features(t);
                    let bound = (1.0 / libm::sqrt(f64::from(n_in))) as f32;
                    out.push(ParamInfo {
                        name: peft(l, t, "lora_A.weight"),
                        slot: Slot::LoraA(l, t),
                        rows: rank,
                        cols: n_in,
                        init: Init::Uniform(bound),
                    });
                    out.push(ParamInfo {
                        name: peft(l, t, "lora_B.weight"),
                        slot: Slot::LoraB(l, t),
                        rows: n_out,
                        cols: rank,
                        init: Init::Zeros,
                    });
                }
            }
            Method::Ia3 => {
                for &t in &cfg.targets {
                    let (n_out, n_in) = dims.features(t);
                    // PEFT stores a feed-forward (input) scale as [1, in], others [out, 1].
                    let (rows, cols) = if t == Target::Down {
                        (1, n_in)
                    } else {
                        (n_out, 1)
                    };
                    out.push(ParamInfo {
                        name: peft(l, t, "ia3_l"),
                        slot: Slot::Ia3(l, t),
                        rows,
                        cols,
                        init: Init::Ones,
                    });
                }
            }
            Method::Full => {}
            Method::Scales => {
                for &t in &cfg.targets {
                    let (n_out, n_in) = dims.features(t);
                    out.push(ParamInfo {
                        name: format!("model.layers.{l}.{}.{}.scale_factors", t.path(), t.module()),
                        slot: Slot::Scales(l, t),
                        rows: n_out,
                        cols: n_in / dims.scale_block(t),
                        init: Init::Ones,
                    });
                }
            }
            Method::Norms => {
                for (slot, leaf) in [
                    (Slot::AttnNorm(l), "input_layernorm"),
                    (Slot::FfnNorm(l), "post_attention_layernorm"),
                ] {
                    out.push(ParamInfo {
                        name: format!("model.layers.{l}.{leaf}.weight"),
                        slot,
                        rows: 1,
                        cols: dims.dim,
                        init: Init::Model,
                    });
                }
            }
        }
    }
    if cfg.method == Method::Norms {
        out.push(ParamInfo {
            name: "model.norm.weight".into(),
            slot: Slot::OutputNorm,
            rows: 1,
            cols: dims.dim,
            init: Init::Model,
        });
    }
    out
}

/// Every weight in Hugging Face's order and names: the embedding, each layer's input
/// norm, q, k, v (and their biases), o, post-attention norm, gate, up, down, then the final
/// norm and an untied output head.
fn full_layout(dims: &Dims) -> Vec<ParamInfo> {
    let info = |name: String, slot, rows, cols| ParamInfo {
        name,
        slot,
        rows,
        cols,
        init: Init::Model,
    };
    let mut out = vec![info(
        "model.embed_tokens.weight".into(),
        Slot::Embed,
        dims.vocab,
        dims.dim,
    )];
    for l in 0..dims.n_layers {
        let name =
            |t: Target, leaf: &str| format!("model.layers.{l}.{}.{}.{leaf}", t.path(), t.module());
        out.push(info(
            format!("model.layers.{l}.input_layernorm.weight"),
            Slot::AttnNorm(l),
            1,
            dims.dim,
        ));
        for t in Target::ALL {
            if t == Target::Gate {
                out.push(info(
                    format!("model.layers.{l}.post_attention_layernorm.weight"),
                    Slot::FfnNorm(l),
                    1,
                    dims.dim,
                ));
            }
            let (n_out, n_in) = dims.features(t);
            out.push(info(name(t, "weight"), Slot::Weight(l, t), n_out, n_in));
            if dims.biases && matches!(t, Target::Q | Target::K | Target::V) {
                out.push(info(name(t, "bias"), Slot::Bias(l, t), n_out, 1));
            }
        }
    }
    out.push(info(
        "model.norm.weight".into(),
        Slot::OutputNorm,
        1,
        dims.dim,
    ));
    if !dims.tied {
        out.push(info(
            "lm_head.weight".into(),
            Slot::Output,
            dims.vocab,
            dims.dim,
        ));
    }
    out
}

/// SHA-256 of the layout's text form: `edgetune-layout-v1` then one line per tensor,
/// `<index> <name> <rows> <cols>` (docs/zeroth-order.md).
pub fn layout_hash(layout: &[ParamInfo]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"edgetune-layout-v1\n");
    for (i, p) in layout.iter().enumerate() {
        h.update(format!("{i} {} {} {}\n", p.name, p.rows, p.cols).as_bytes());
    }
    h.finalize().into()
}

/// The start values of tensor `tensor` for `init` (not [`Init::Model`], which the model
/// supplies): uniform values come from Philox with key = `init_seed`, counter =
/// (element, tensor, 0, [`rng::PURPOSE_INIT`]): u = ((word0 >> 9) + 0.5) * 2^-22 - 1, exact
/// and strictly inside (-1, 1); value = u * bound, one f32 rounding, so any language
/// reproduces it.
pub fn init_values(init: Init, n: u32, tensor: u32, init_seed: u64) -> Vec<f32> {
    let key = [init_seed as u32, (init_seed >> 32) as u32];
    match init {
        Init::Zeros | Init::Model => vec![0.0; n as usize],
        Init::Ones => vec![1.0; n as usize],
        Init::Uniform(bound) => (0..n)
            .map(|e| {
                let w = philox4x32_10([e, tensor, 0, rng::PURPOSE_INIT], key)[0];
                let u = ((w >> 9) as f32 + 0.5) * (1.0 / (1u32 << 22) as f32) - 1.0;
                u * bound
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: Dims = Dims {
        n_layers: 2,
        dim: 64,
        q_dim: 64,
        kv_dim: 32,
        ffn_dim: 128,
        vocab: 100,
        tied: true,
        biases: false,
        scale_blocks: [32; 7],
    };

    #[test]
    fn lora_layout_follows_peft_names_and_shapes() {
        let mut cfg = AdapterConfig::lora(4, 8.0, &[Target::V, Target::Q, Target::Q]);
        cfg.validate().unwrap();
        let l = layout(&cfg, &DIMS);
        assert_eq!(l.len(), 8);
        assert_eq!(
            l[0].name,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!((l[0].rows, l[0].cols), (4, 64));
        assert_eq!(
            l[3].name,
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        );
        assert_eq!((l[3].rows, l[3].cols), (32, 4));
        assert_eq!(cfg.lora_scale(), 2.0);
    }

    #[test]
    fn ia3_scales_the_feed_forward_input() {
        let l = layout(&AdapterConfig::ia3(), &DIMS);
        assert_eq!(l.len(), 6);
        assert_eq!((l[0].rows, l[0].cols), (32, 1));
        assert_eq!((l[2].rows, l[2].cols), (1, 128));
        assert!(l[2].name.ends_with("mlp.down_proj.ia3_l"));
    }

    #[test]
    fn layout_hash_pins_names_and_shapes() {
        let a = layout(&AdapterConfig::lora(4, 8.0, &[Target::Q]), &DIMS);
        let b = layout(&AdapterConfig::lora(8, 8.0, &[Target::Q]), &DIMS);
        assert_ne!(layout_hash(&a), layout_hash(&b));
        assert_eq!(layout_hash(&a), layout_hash(&a.clone()));
    }

    #[test]
    fn uniform_init_stays_inside_its_bound_and_is_spread() {
        let v = init_values(Init::Uniform(0.125), 10_000, 3, 99);
        assert!(v.iter().all(|x| x.abs() < 0.125));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / 1e4;
        let var = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / 1e4;
        // U(-b, b): mean 0, variance b^2 / 3.
        assert!(mean.abs() < 0.005, "{mean}");
        assert!((var - 0.125f64.powi(2) / 3.0).abs() < 3e-4, "{var}");
    }
}
