//! One Llama-family implementation over any backend and any weight format.
//!
//! Weights stay in their stored blocks on the device (no f32 copy of the model); every
//! projection is a dequantising product. `forward` runs a batch of tokens (prefill) or one
//! (decode) against a KV cache.

use super::config::{Arch, Config};
use crate::adapter::{self, AdapterConfig, Dims, Init, Method, ParamInfo, Slot, Target};
use crate::backend::{Backend, Op, RopeScaling, rope_table};
use crate::error::{Error, Result};
use crate::format::gguf::{Gguf, TensorInfo};
use crate::held::Held;
use crate::quant::{self, WeightType};
use std::prelude::v1::*;

mod backward;
pub use backward::Tape;

/// A weight matrix on the device: `rows` rows of `cols` elements of `wtype`.
#[derive(Debug)]
pub struct Weight<B: Backend> {
    pub buf: B::Buffer,
    pub wtype: WeightType,
    pub rows: u32,
    pub cols: u32,
    /// Factors multiplying the stored block scales (the "scales" adapter), one f32 per
    /// block (32 elements, or a K-quant's 256-element super-block), row by row.
    pub scale_factors: Option<B::Buffer>,
}

impl<B: Backend> Weight<B> {
    /// out \[m, rows\] = x \[m, cols\] * self^T.
    fn apply(&self, be: &B, x: &B::Buffer, out: &B::Buffer, m: u32) -> Result<()> {
        be.run(&Op::QMatmul {
            x,
            w: &self.buf,
            factors: self.scale_factors.as_ref(),
            out,
            wtype: self.wtype,
            m,
            k: self.cols,
            n: self.rows,
        })
    }
}

/// LoRA's low-rank pair on one projection: y += scale * B (A x).
#[derive(Debug)]
pub struct Lora<B: Backend> {
    /// \[rank, in\]
    pub a: B::Buffer,
    /// \[out, rank\]
    pub b: B::Buffer,
    pub rank: u32,
    pub scale: f32,
}

/// A linear projection: a frozen weight, an optional bias, and the adapter slot (LoRA, or
/// IA3 scales on its output or input). Every projection of the model goes through its
/// `forward`, the one place adapters, in-kernel perturbation and backprop attach.
#[derive(Debug)]
pub struct Linear<B: Backend> {
    pub weight: Weight<B>,
    pub bias: Option<B::Buffer>,
    pub lora: Option<Lora<B>>,
    /// IA3 scales of the output features (k, v).
    pub scale_out: Option<B::Buffer>,
    /// IA3 scales of the input features (down, PEFT's feed-forward case).
    pub scale_in: Option<B::Buffer>,
}

impl<B: Backend> Linear<B> {
    fn new(weight: Weight<B>, bias: Option<B::Buffer>) -> Linear<B> {
        Linear {
            weight,
            bias,
            lora: None,
            scale_out: None,
            scale_in: None,
        }
    }

    /// out \[m, rows\] = x \[m, cols\] * weight^T, then the bias, LoRA and IA3 steps as
    /// PEFT orders them. Intermediate results pass through the scratch's `y` pair, so
    /// no kernel reads and writes one buffer (which wgpu forbids); `out` must not be `x`.
    fn forward(
        &self,
        be: &B,
        x: &B::Buffer,
        out: &B::Buffer,
        m: u32,
        s: &Scratch<B>,
    ) -> Result<()> {
        self.forward_steps(be, x, out, m, s, true)
    }

    /// Whether an adapter acts on this projection.
    fn adapted(&self) -> bool {
        self.lora.is_some() || self.scale_in.is_some() || self.scale_out.is_some()
    }

    /// Whether this projection is its weight's product alone (no adapter, no bias): what
    /// the fused decode ops take.
    fn plain(&self) -> bool {
        !self.adapted() && self.bias.is_none()
    }

    /// The steps after the product (bias, LoRA, IA3's output scales if `scale_out`), each
    /// writing an intermediate of the scratch's `y` pair but the last.
    fn steps(&self, scale_out: bool) -> usize {
        usize::from(self.bias.is_some())
            + usize::from(self.lora.is_some())
            + usize::from(self.scale_out.is_some() && scale_out)
    }

    /// [`Linear::forward`], without IA3's output scales unless `scale_out` (backprop
    /// recomputes the product they scale).
    fn forward_steps(
        &self,
        be: &B,
        x: &B::Buffer,
        out: &B::Buffer,
        m: u32,
        s: &Scratch<B>,
        scale_out: bool,
    ) -> Result<()> {
        let steps = self.steps(scale_out);
        let scale_out = self.scale_out.as_ref().filter(|_| scale_out);
        let (rows, cols) = (self.weight.rows, self.weight.cols);
        let room = s.adapter.as_ref().map(|a| a.room);
        if self.adapted()
            && room.is_none_or(|r| {
                (self.scale_in.is_some() && !r.input)
                    || (steps >= 2 && !r.spare)
                    || (self.lora.is_some() && r.rank == 0)
            })
        {
            return Err(Error::InvalidArgument {
                name: "adapter",
                reason: "a projection has an adapter but the activations have no room for it"
                    .into(),
            });
        }
        let input = match (
            &self.scale_in,
            s.adapter.as_ref().and_then(|a| a.input.as_ref()),
        ) {
            (Some(scale), Some(scaled)) => {
                be.run(&Op::MulCols {
                    x,
                    scale,
                    out: scaled,
                    rows: m,
                    cols,
                })?;
                scaled
            }
            _ => x,
        };
        let spare = s
            .adapter
            .as_ref()
            .and_then(|a| a.y.as_ref())
            .unwrap_or(&s.y);
        // Step i writes dst(i); the last writes `out`.
        let dst = |i: usize| match i {
            _ if i == steps => out,
            _ if i.is_multiple_of(2) => &s.y,
            _ => spare,
        };
        self.weight.apply(be, input, dst(0), m)?;
        let mut at = 0;
        if let Some(bias) = &self.bias {
            be.run(&Op::AddBias {
                x: dst(at),
                bias,
                out: dst(at + 1),
                rows: m,
                cols: rows,
            })?;
            at += 1;
        }
        if let (Some(l), Some(a)) = (&self.lora, s.adapter.as_ref().and_then(|a| a.lora.as_ref())) {
            be.run(&Op::Matmul {
                a: input,
                b: &l.a,
                out: &a.u,
                m,
                k: cols,
                n: l.rank,
                a_t: false,
                b_t: true,
            })?;
            be.run(&Op::Scale {
                x: &a.u,
                out: &a.u2,
                n: m * l.rank,
                alpha: l.scale,
            })?;
            be.run(&Op::Matmul {
                a: &a.u2,
                b: &l.b,
                out: &a.out,
                m,
                k: l.rank,
                n: rows,
                a_t: false,
                b_t: true,
            })?;
            be.run(&Op::Add {
                a: dst(at),
                b: &a.out,
                out: dst(at + 1),
                n: m * rows,
            })?;
            at += 1;
        }
        if let Some(scale) = scale_out {
            be.run(&Op::MulCols {
                x: dst(at),
                scale,
                out: dst(at + 1),
                rows: m,
                cols: rows,
            })?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Layer<B: Backend> {
    attn_norm: B::Buffer,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    ffn_norm: B::Buffer,
    gate: Linear<B>,
    up: Linear<B>,
    down: Linear<B>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Model<'b, B: Backend> {
    backend: Held<'b, B>,
    pub cfg: Config,
    embed: Weight<B>,
    layers: Vec<Layer<B>>,
    out_norm: B::Buffer,
    output: Option<Weight<B>>,
    /// The attached adapter and its trainable tensors in the pinned order.
    adapter: Option<(AdapterConfig, Vec<ParamInfo>)>,
}

/// Keys and values of every layer for up to `capacity` positions, plus the RoPE table.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    k: Vec<B::Buffer>,
    v: Vec<B::Buffer>,
    rope: B::Buffer,
    capacity: u32,
    len: u32,
    /// Activation buffers of the last call, reused while the token count stays the same
    /// (every decode step), so a step allocates nothing but its logits.
    scratch: Option<Scratch<B>>,
}

/// What a layer's `h` holds when it starts (see [`Model::layer_forward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerIn {
    /// Nothing yet: the layer norms x itself (the first layer).
    Raw,
    /// x's attention norm, which the layer before left.
    Normed,
    /// The layer before's feed-forward output, its residual add pending: x = x2 + h, which
    /// the q, k and v products make and norm themselves ([`Op::NormMatvec`]).
    Pending,
}

/// Where one layer's forward pass reads and writes (see [`Model::layer_forward`]).
#[derive(Debug)]
struct LayerBufs<'a, B: Backend> {
    x: &'a B::Buffer,
    x2: &'a B::Buffer,
    out: &'a B::Buffer,
    h: &'a B::Buffer,
    q: &'a B::Buffer,
    qr: &'a B::Buffer,
    k: &'a B::Buffer,
    kr: &'a B::Buffer,
    v: &'a B::Buffer,
    att: &'a B::Buffer,
    gate: &'a B::Buffer,
    up: &'a B::Buffer,
    act: &'a B::Buffer,
}

// Copied field by field: the buffers are borrowed, never moved.
impl<B: Backend> Clone for LayerBufs<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for LayerBufs<'_, B> {}

/// Attention's score scale, 1 / sqrt(head_dim).
fn attention_scale(head_dim: u32) -> f32 {
    1.0 / libm::sqrtf(head_dim as f32)
}

/// One forward call's activations for `tokens` tokens.
#[derive(Debug)]
struct Scratch<B: Backend> {
    tokens: u32,
    x: B::Buffer,
    x2: B::Buffer,
    h: B::Buffer,
    q: B::Buffer,
    qr: B::Buffer,
    k: B::Buffer,
    kr: B::Buffer,
    v: B::Buffer,
    att: B::Buffer,
    gate: B::Buffer,
    up: B::Buffer,
    act: B::Buffer,
    /// A projection's intermediate result (before its bias), \[tokens, widest\].
    y: B::Buffer,
    adapter: Option<AdapterScratch<B>>,
}

/// What adapter steps need besides: a scaled input, a second intermediate, LoRA's
/// low-rank activations and its product.
#[derive(Debug)]
struct AdapterScratch<B: Backend> {
    room: AdapterRoom,
    input: Option<B::Buffer>,
    y: Option<B::Buffer>,
    lora: Option<LoraScratch<B>>,
}

/// LoRA's low-rank activations (A x, then scaled) and its product B (A x).
#[derive(Debug)]
struct LoraScratch<B: Backend> {
    u: B::Buffer,
    u2: B::Buffer,
    out: B::Buffer,
}

/// Which of [`AdapterScratch`]'s buffers an attached adapter's steps use, so a forward
/// pass allocates only those (each is as large as the widest activation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AdapterRoom {
    /// LoRA's rank (0 without LoRA).
    rank: u32,
    /// A scaled input: IA3 on a projection's input features.
    input: bool,
    /// A second intermediate: a projection with two or more steps after its product.
    spare: bool,
}

impl<B: Backend> Scratch<B> {
    /// `room` is Some when an adapter is attached.
    fn new(be: &B, c: &Config, t: u32, room: Option<AdapterRoom>) -> Result<Self> {
        let f = |n: u32| u64::from(t) * u64::from(n) * 4;
        let (q_dim, kv_dim) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let widest = [c.dim, q_dim, c.ffn_dim].into_iter().fold(kv_dim, u32::max);
        let wide = |needed: bool| -> Result<Option<B::Buffer>> {
            needed.then(|| be.alloc(f(widest), "adapter")).transpose()
        };
        let adapter = match room {
            None => None,
            Some(room) => Some(AdapterScratch {
                room,
                input: wide(room.input)?,
                y: wide(room.spare)?,
                lora: match room.rank {
                    0 => None,
                    rank => Some(LoraScratch {
                        u: be.alloc(f(rank), "adapter")?,
                        u2: be.alloc(f(rank), "adapter")?,
                        out: be.alloc(f(widest), "adapter")?,
                    }),
                },
            }),
        };
        Ok(Scratch {
            tokens: t,
            x: be.alloc(f(c.dim), "activations")?,
            x2: be.alloc(f(c.dim), "activations")?,
            h: be.alloc(f(c.dim), "activations")?,
            q: be.alloc(f(q_dim), "q")?,
            qr: be.alloc(f(q_dim), "q")?,
            k: be.alloc(f(kv_dim), "k")?,
            kr: be.alloc(f(kv_dim), "k")?,
            v: be.alloc(f(kv_dim), "v")?,
            att: be.alloc(f(q_dim), "attention")?,
            gate: be.alloc(f(c.ffn_dim), "ffn")?,
            up: be.alloc(f(c.ffn_dim), "ffn")?,
            act: be.alloc(f(c.ffn_dim), "ffn")?,
            y: be.alloc(f(widest), "activations")?,
            adapter,
        })
    }

    /// Bytes [`Scratch::new`] allocates for `t` tokens with an adapter of `rank` that uses
    /// every buffer ([`AdapterRoom::all`]).
    fn bytes(c: &Config, t: u64, rank: u64) -> u64 {
        let (dim, q, kv, ffn) = (
            u64::from(c.dim),
            u64::from(c.n_heads * c.head_dim),
            u64::from(c.n_kv_heads * c.head_dim),
            u64::from(c.ffn_dim),
        );
        let widest = [dim, q, ffn].into_iter().fold(kv, u64::max);
        4 * t * (3 * dim + 3 * q + 3 * kv + 3 * ffn + 4 * widest + 2 * rank)
    }

    /// Whether this scratch serves `t` tokens with `room` (a larger one does: every op
    /// is given its row count).
    fn fits(&self, t: u32, room: Option<AdapterRoom>) -> bool {
        self.tokens >= t && self.adapter.as_ref().map(|a| a.room) == room
    }
}

impl AdapterRoom {
    /// Every buffer (the backward pass's tape).
    fn all(rank: u32) -> AdapterRoom {
        AdapterRoom {
            rank,
            input: true,
            spare: true,
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// Positions filled so far.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Forgets every position (the buffers are reused).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// What a tensor is for in the model; sources map roles to their own names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embed,
    OutputNorm,
    /// The output projection; absent when tied to the embedding.
    Output,
    AttnNorm(u32),
    Q(u32),
    K(u32),
    V(u32),
    O(u32),
    QBias(u32),
    KBias(u32),
    VBias(u32),
    FfnNorm(u32),
    /// Per-frequency RoPE divisors (Llama 3 scaling in GGUF).
    RopeFreqs,
    Gate(u32),
    Up(u32),
    Down(u32),
}

/// A tensor as a source holds it: format, shape \[rows, cols\] (vectors have one row), bytes.
#[derive(Debug)]
pub struct HostTensor<'a> {
    pub name: String,
    /// The file it was read from (a GGUF file, one safetensors shard), for errors.
    pub file: String,
    pub wtype: WeightType,
    pub rows: u64,
    pub cols: u64,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// Where a model's tensors come from (a GGUF file, a safetensors directory, ...).
pub trait TensorSource {
    /// The tensor for `role`, or `None` if the source has none.
    fn tensor(&self, role: Role) -> Result<Option<HostTensor<'_>>>;
    /// What the source calls the tensor for `role` (errors use the file's own names).
    fn name(&self, role: Role) -> String;
    /// The file or directory the tensors come from.
    fn origin(&self) -> String;
}

/// The tensors of a GGUF file, by llama.cpp's names.
#[derive(Debug)]
pub struct GgufSource<'a> {
    pub gguf: &'a Gguf,
    pub bytes: &'a [u8],
    /// The file's name, for errors.
    pub file: &'a str,
}

impl GgufSource<'_> {
    fn host(&self, t: &TensorInfo) -> Result<HostTensor<'_>> {
        let bad = |reason: String| Error::Tensor {
            file: self.file.to_owned(),
            tensor: t.name.clone(),
            reason,
        };
        let wtype = t
            .ggml_type
            .weight_type()
            .ok_or_else(|| bad(format!("type {} is not supported", t.ggml_type.name())))?;
        let (cols, rows) = match t.dims[..] {
            [n] => (n, 1),
            [c, r] => (c, r),
            _ => {
                return Err(bad(format!("dims {:?} are not a matrix or vector", t.dims)));
            }
        };
        let data = self
            .gguf
            .tensor_data(self.bytes, t)
            .ok_or_else(|| bad("lies outside the file".into()))?;
        Ok(HostTensor {
            name: t.name.clone(),
            file: self.file.to_owned(),
            wtype,
            rows,
            cols,
            data: data.into(),
        })
    }
}

impl TensorSource for GgufSource<'_> {
    fn tensor(&self, role: Role) -> Result<Option<HostTensor<'_>>> {
        let name = self.name(role);
        self.gguf.tensor(&name).map(|t| self.host(t)).transpose()
    }

    fn origin(&self) -> String {
        self.file.to_owned()
    }

    fn name(&self, role: Role) -> String {
        match role {
            Role::Embed => "token_embd.weight".into(),
            Role::OutputNorm => "output_norm.weight".into(),
            Role::Output => "output.weight".into(),
            Role::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Role::Q(l) => format!("blk.{l}.attn_q.weight"),
            Role::K(l) => format!("blk.{l}.attn_k.weight"),
            Role::V(l) => format!("blk.{l}.attn_v.weight"),
            Role::O(l) => format!("blk.{l}.attn_output.weight"),
            Role::QBias(l) => format!("blk.{l}.attn_q.bias"),
            Role::KBias(l) => format!("blk.{l}.attn_k.bias"),
            Role::VBias(l) => format!("blk.{l}.attn_v.bias"),
            Role::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Role::RopeFreqs => "rope_freqs.weight".into(),
            Role::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Role::Up(l) => format!("blk.{l}.ffn_up.weight"),
            Role::Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }
}

struct Loader<'a, B: Backend, S: TensorSource> {
    backend: &'a B,
    source: &'a S,
    /// The file the expected shapes come from (config.json, GGUF metadata).
    config: &'a str,
}

impl<B: Backend, S: TensorSource> Loader<'_, B, S> {
    /// A tensor the source holds, of the wrong shape.
    fn error(t: HostTensor<'_>, reason: String) -> Error {
        Error::Tensor {
            file: t.file,
            tensor: t.name,
            reason,
        }
    }

    fn missing(&self, role: Role, why: &str) -> Error {
        Error::Tensor {
            file: self.source.origin(),
            tensor: self.source.name(role),
            reason: format!("is missing{why}"),
        }
    }

    fn required(&self, role: Role) -> Result<HostTensor<'_>> {
        self.source
            .tensor(role)?
            .ok_or_else(|| self.missing(role, ""))
    }

    /// A matrix of `rows` x `cols` kept in its stored format.
    fn matrix(&self, role: Role, rows: u32, cols: u32) -> Result<Weight<B>> {
        let t = self.required(role)?;
        if (t.rows, t.cols) != (u64::from(rows), u64::from(cols)) {
            let reason = format!(
                "holds [{}, {}] but {} implies [{rows}, {cols}] (rows, columns)",
                t.rows, t.cols, self.config
            );
            return Err(Self::error(t, reason));
        }
        let buf = self
            .backend
            .upload_weights(t.wtype, &t.data, cols, "weight")?;
        Ok(Weight {
            buf,
            wtype: t.wtype,
            rows,
            cols,
            scale_factors: None,
        })
    }

    /// A vector of `n` values, converted to f32 on the host (norms and biases are tiny).
    fn vector(&self, role: Role, n: u32) -> Result<Option<B::Buffer>> {
        let Some(t) = self.source.tensor(role)? else {
            return Ok(None);
        };
        if t.rows.checked_mul(t.cols) != Some(u64::from(n)) {
            let reason = format!(
                "holds [{}, {}] values but {} implies {n}",
                t.rows, t.cols, self.config
            );
            return Err(Self::error(t, reason));
        }
        let mut v = vec![0.0f32; n as usize];
        quant::dequantize(t.wtype, &t.data, &mut v)?;
        Ok(Some(self.backend.upload_f32(&v, "vector")?))
    }

    fn required_vector(&self, role: Role, n: u32) -> Result<B::Buffer> {
        self.vector(role, n)?.ok_or_else(|| self.missing(role, ""))
    }
}

impl<'b, B: Backend> Model<'b, B> {
    /// Loads a GGUF model whose header `gguf` was parsed from `bytes` (the whole file);
    /// `file` names it in errors.
    pub fn from_gguf(
        backend: impl Into<Held<'b, B>>,
        gguf: &Gguf,
        bytes: &[u8],
        file: &str,
    ) -> Result<Self> {
        Self::load(
            backend,
            Config::from_gguf(gguf, file)?,
            &GgufSource { gguf, bytes, file },
        )
    }

    /// Loads a model of shape `cfg` from any tensor source.
    pub fn load(
        backend: impl Into<Held<'b, B>>,
        mut cfg: Config,
        source: &impl TensorSource,
    ) -> Result<Self> {
        let backend = backend.into();
        cfg.validate()?;
        if let Some(t) = source.tensor(Role::RopeFreqs)? {
            let want = u64::from(cfg.head_dim / 2);
            if t.rows.checked_mul(t.cols) != Some(want) {
                return Err(Error::Tensor {
                    reason: format!(
                        "holds [{}, {}] values; head dimension {} needs {want}",
                        t.rows, t.cols, cfg.head_dim
                    ),
                    file: t.file,
                    tensor: t.name,
                });
            }
            let mut v = vec![0.0f32; want as usize];
            quant::dequantize(t.wtype, &t.data, &mut v)?;
            cfg.rope_scaling = RopeScaling::Divisors(v.iter().map(|&d| f64::from(d)).collect());
            cfg.validate()?;
        }
        let config = cfg.origin.file().to_owned();
        let l = Loader {
            backend: &*backend,
            source,
            config: &config,
        };
        let (dim, q_dim, kv_dim) = (
            cfg.dim,
            cfg.n_heads * cfg.head_dim,
            cfg.n_kv_heads * cfg.head_dim,
        );
        let biased = cfg.arch == Arch::Qwen2;
        let bias = |role: Role, n: u32| -> Result<Option<B::Buffer>> {
            let b = l.vector(role, n)?;
            if biased && b.is_none() {
                return Err(l.missing(role, " (qwen2 has q/k/v biases)"));
            }
            Ok(b)
        };
        // Grown one layer at a time: a layer count that the source does not back fails at
        // its first missing tensor, not in a reservation sized by the count.
        let mut layers = Vec::new();
        for i in 0..cfg.n_layers {
            layers.push(Layer {
                attn_norm: l.required_vector(Role::AttnNorm(i), dim)?,
                q: Linear::new(
                    l.matrix(Role::Q(i), q_dim, dim)?,
                    bias(Role::QBias(i), q_dim)?,
                ),
                k: Linear::new(
                    l.matrix(Role::K(i), kv_dim, dim)?,
                    bias(Role::KBias(i), kv_dim)?,
                ),
                v: Linear::new(
                    l.matrix(Role::V(i), kv_dim, dim)?,
                    bias(Role::VBias(i), kv_dim)?,
                ),
                o: Linear::new(l.matrix(Role::O(i), dim, q_dim)?, None),
                ffn_norm: l.required_vector(Role::FfnNorm(i), dim)?,
                gate: Linear::new(l.matrix(Role::Gate(i), cfg.ffn_dim, dim)?, None),
                up: Linear::new(l.matrix(Role::Up(i), cfg.ffn_dim, dim)?, None),
                down: Linear::new(l.matrix(Role::Down(i), dim, cfg.ffn_dim)?, None),
            });
        }
        let embed = l.matrix(Role::Embed, cfg.vocab, dim)?;
        let output = if cfg.tied_embeddings {
            None
        } else {
            Some(l.matrix(Role::Output, cfg.vocab, dim)?)
        };
        let out_norm = l.required_vector(Role::OutputNorm, dim)?;
        Ok(Model {
            backend,
            cfg,
            embed,
            layers,
            out_norm,
            output,
            adapter: None,
        })
    }

    /// The backend the model's buffers live on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The model's dimensions as adapters see them.
    pub fn dims(&self) -> Dims {
        let blocks = Target::ALL.map(|t| {
            self.linear(0, t)
                .map_or(quant::QK as u32, |l| quant::scale_block(l.weight.wtype))
        });
        Dims::of(&self.cfg, blocks)
    }

    /// Attaches `cfg`'s trainable tensors (one adapter at a time), started as
    /// [`adapter::init_values`] with `init_seed`; trainable norms keep the model's values.
    /// The frozen weights are untouched. Returns the pinned layout.
    pub fn attach(&mut self, mut cfg: AdapterConfig, init_seed: u64) -> Result<&[ParamInfo]> {
        if self.adapter.is_some() {
            return Err(Error::InvalidArgument {
                name: "adapter",
                reason: "the model already has an adapter attached".into(),
            });
        }
        cfg.validate()?;
        let layout = adapter::layout(&cfg, &self.dims());
        if cfg.method == Method::Full {
            self.widen_weights(&layout)?;
        }
        // Every buffer first, so a failed allocation leaves the model as it was.
        let mut bufs = Vec::with_capacity(layout.len());
        for (i, p) in layout.iter().enumerate() {
            if let Slot::Scales(l, t) = p.slot {
                self.check_block_scales(l, t)?;
            }
            bufs.push(match p.init {
                Init::Model => None,
                init => {
                    let v = adapter::init_values(init, p.len(), i as u32, init_seed);
                    Some(self.backend.upload_f32(&v, "adapter")?)
                }
            });
        }
        let (rank, scale) = match cfg.method {
            Method::Lora { rank, .. } => (rank, cfg.lora_scale()),
            _ => (0, 1.0),
        };
        let mut pending_a = None;
        for (p, buf) in layout.iter().zip(bufs) {
            let Some(buf) = buf else { continue };
            match p.slot {
                Slot::LoraA(..) => pending_a = Some(buf),
                Slot::LoraB(l, t) => {
                    if let (Some(a), Some(lin)) = (pending_a.take(), self.linear_mut(l, t)) {
                        lin.lora = Some(Lora {
                            a,
                            b: buf,
                            rank,
                            scale,
                        });
                    }
                }
                Slot::Ia3(l, t) => {
                    if let Some(lin) = self.linear_mut(l, t) {
                        if t == Target::Down {
                            lin.scale_in = Some(buf);
                        } else {
                            lin.scale_out = Some(buf);
                        }
                    }
                }
                Slot::Scales(l, t) => {
                    if let Some(lin) = self.linear_mut(l, t) {
                        lin.weight.scale_factors = Some(buf);
                    }
                }
                Slot::AttnNorm(_)
                | Slot::FfnNorm(_)
                | Slot::OutputNorm
                | Slot::Weight(..)
                | Slot::Bias(..)
                | Slot::Embed
                | Slot::Output => {}
            }
        }
        self.adapter = Some((cfg, layout));
        Ok(self.layout())
    }

    /// The attached adapter's configuration.
    pub fn adapter(&self) -> Option<&AdapterConfig> {
        self.adapter.as_ref().map(|(c, _)| c)
    }

    /// The attached adapter's tensors in the pinned order (empty without one).
    pub fn layout(&self) -> &[ParamInfo] {
        self.adapter.as_ref().map_or(&[], |(_, l)| l)
    }

    /// The device buffers the forward pass reads for each tensor of [`Model::layout`], in
    /// that order: what training writes its perturbed values into.
    pub fn params(&self) -> Result<Vec<&B::Buffer>> {
        self.layout()
            .iter()
            .map(|p| {
                self.param(p.slot).ok_or_else(|| Error::InvalidArgument {
                    name: "adapter",
                    reason: format!("tensor `{}` has no buffer in the model", p.name),
                })
            })
            .collect()
    }

    /// The current values of every adapter tensor, in layout order.
    pub fn read_params(&self) -> Result<Vec<Vec<f32>>> {
        self.params()?
            .into_iter()
            .zip(self.layout())
            .map(|(b, p)| self.backend.read_f32(b, p.len() as usize))
            .collect()
    }

    /// Sets every adapter tensor (layout order, exact lengths): a loaded adapter's values.
    pub fn write_params(&self, values: &[Vec<f32>]) -> Result<()> {
        let layout = self.layout();
        if values.len() != layout.len() {
            return Err(Error::InvalidArgument {
                name: "adapter values",
                reason: format!("{} tensors for a layout of {}", values.len(), layout.len()),
            });
        }
        for ((v, p), dst) in values.iter().zip(layout).zip(self.params()?) {
            if v.len() != p.len() as usize {
                return Err(Error::Tensor {
                    file: "adapter".into(),
                    tensor: p.name.clone(),
                    reason: format!("holds {} values; the model needs {}", v.len(), p.len()),
                });
            }
            let src = self.backend.upload_f32(v, "adapter")?;
            self.backend.run(&Op::Copy {
                src: &src,
                dst,
                n: p.len(),
                src_offset: 0,
                dst_offset: 0,
            })?;
        }
        Ok(())
    }

    /// Full training holds every matrix in f32: each unquantised weight is widened into a
    /// new f32 buffer (the old ones are dropped only once all are made). A quantised
    /// weight is refused: its blocks are never rewritten.
    fn widen_weights(&mut self, layout: &[ParamInfo]) -> Result<()> {
        // A run writes its start and current values as f32 files, read back whole.
        let bytes: u64 = layout.iter().map(|p| u64::from(p.len()) * 4).sum();
        let cap = adapter::MAX_FILE_BYTES;
        if bytes > cap {
            return Err(Error::InvalidArgument {
                name: "trainable",
                reason: format!(
                    "full training would hold {bytes} bytes of f32 weights, more than the {cap} an adapter file may hold; train lora or ia3"
                ),
            });
        }
        let mut widened = Vec::new();
        for p in layout {
            let Some(w) = self.weight(p.slot) else {
                continue;
            };
            if !matches!(
                w.wtype,
                WeightType::F32 | WeightType::F16 | WeightType::BF16
            ) {
                return Err(Error::InvalidArgument {
                    name: "trainable",
                    reason: format!(
                        "full training needs an unquantised model, but `{}` is {:?}; train lora, ia3 or norms on a quantised one",
                        p.name, w.wtype
                    ),
                });
            }
            let n = w.rows as usize * w.cols as usize;
            let bytes = self.backend.read(&w.buf)?;
            let need = w.wtype.row_bytes(w.cols as usize)? * w.rows as usize;
            let mut v = vec![0.0f32; n];
            quant::dequantize(w.wtype, bytes.get(..need).unwrap_or(&bytes), &mut v)?;
            let f32s: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let buf = self
                .backend
                .upload_weights(WeightType::F32, &f32s, w.cols, "weight")?;
            widened.push((p.slot, buf));
        }
        for (slot, buf) in widened {
            if let Some(w) = self.weight_mut(slot) {
                w.buf = buf;
                w.wtype = WeightType::F32;
            }
        }
        Ok(())
    }

    fn weight(&self, slot: Slot) -> Option<&Weight<B>> {
        match slot {
            Slot::Weight(l, t) => Some(&self.linear(l, t)?.weight),
            Slot::Embed => Some(&self.embed),
            Slot::Output => self.output.as_ref(),
            _ => None,
        }
    }

    fn weight_mut(&mut self, slot: Slot) -> Option<&mut Weight<B>> {
        match slot {
            Slot::Weight(l, t) => Some(&mut self.linear_mut(l, t)?.weight),
            Slot::Embed => Some(&mut self.embed),
            Slot::Output => self.output.as_mut(),
            _ => None,
        }
    }

    /// Every frozen buffer: the weight matrices, biases, and the norms unless they are
    /// trainable. Training must leave their bytes as they are.
    pub fn frozen(&self) -> Vec<&B::Buffer> {
        if self.adapter().is_some_and(|c| c.method == Method::Full) {
            return Vec::new();
        }
        let norms = self.adapter().is_none_or(|c| c.method != Method::Norms);
        let mut out = vec![&self.embed.buf];
        out.extend(self.output.as_ref().map(|w| &w.buf));
        if norms {
            out.push(&self.out_norm);
        }
        for l in &self.layers {
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                out.push(&lin.weight.buf);
                out.extend(lin.bias.as_ref());
            }
            if norms {
                out.extend([&l.attn_norm, &l.ffn_norm]);
            }
        }
        out
    }

    fn param(&self, slot: Slot) -> Option<&B::Buffer> {
        match slot {
            Slot::LoraA(l, t) => self.linear(l, t)?.lora.as_ref().map(|x| &x.a),
            Slot::LoraB(l, t) => self.linear(l, t)?.lora.as_ref().map(|x| &x.b),
            Slot::Ia3(l, Target::Down) => self.linear(l, Target::Down)?.scale_in.as_ref(),
            Slot::Ia3(l, t) => self.linear(l, t)?.scale_out.as_ref(),
            Slot::AttnNorm(l) => Some(&self.layers.get(l as usize)?.attn_norm),
            Slot::FfnNorm(l) => Some(&self.layers.get(l as usize)?.ffn_norm),
            Slot::OutputNorm => Some(&self.out_norm),
            Slot::Weight(..) | Slot::Embed | Slot::Output => self.weight(slot).map(|w| &w.buf),
            Slot::Bias(l, t) => self.linear(l, t)?.bias.as_ref(),
            Slot::Scales(l, t) => self.linear(l, t)?.weight.scale_factors.as_ref(),
        }
    }

    /// Checks that layer `l`'s projection `t` has one scale per block of the layout's size
    /// for the "scales" adapter's factors to multiply.
    fn check_block_scales(&self, l: u32, t: Target) -> Result<()> {
        let w = &self
            .linear(l, t)
            .ok_or_else(|| Error::InvalidArgument {
                name: "adapter",
                reason: format!("layer {l} has no {}", t.module()),
            })?
            .weight;
        let block = self.dims().scale_block(t);
        if !quant::has_block_scale(w.wtype) {
            return Err(Error::InvalidArgument {
                name: "trainable",
                reason: format!(
                    "scales trains the block scales of q8_0, q4_0, q4_1, q4_k and q6_k weights; layer {l}'s {} is {}",
                    t.module(),
                    w.wtype.name()
                ),
            });
        }
        if quant::scale_block(w.wtype) != block {
            return Err(Error::InvalidArgument {
                name: "trainable",
                reason: format!(
                    "scales takes one factor per block of layer 0's {0} ({block} elements); layer {l}'s {0} is {1}, with blocks of {2}",
                    t.module(),
                    w.wtype.name(),
                    w.wtype.block_elems()
                ),
            });
        }
        Ok(())
    }

    fn linear(&self, l: u32, t: Target) -> Option<&Linear<B>> {
        let layer = self.layers.get(l as usize)?;
        Some(match t {
            Target::Q => &layer.q,
            Target::K => &layer.k,
            Target::V => &layer.v,
            Target::O => &layer.o,
            Target::Gate => &layer.gate,
            Target::Up => &layer.up,
            Target::Down => &layer.down,
        })
    }

    fn linear_mut(&mut self, l: u32, t: Target) -> Option<&mut Linear<B>> {
        let layer = self.layers.get_mut(l as usize)?;
        Some(match t {
            Target::Q => &mut layer.q,
            Target::K => &mut layer.k,
            Target::V => &mut layer.v,
            Target::O => &mut layer.o,
            Target::Gate => &mut layer.gate,
            Target::Up => &mut layer.up,
            Target::Down => &mut layer.down,
        })
    }

    /// An empty KV cache for up to `capacity` positions (at most the model's context).
    pub fn new_cache(&self, capacity: u32) -> Result<KvCache<B>> {
        if capacity == 0 || capacity > self.cfg.context {
            return Err(Error::InvalidArgument {
                name: "kv cache capacity",
                reason: format!(
                    "{capacity} must be in 1..={} (the context)",
                    self.cfg.context
                ),
            });
        }
        let per_layer =
            u64::from(capacity) * u64::from(self.cfg.n_kv_heads * self.cfg.head_dim) * 4;
        let mut k = Vec::with_capacity(self.cfg.n_layers as usize);
        let mut v = Vec::with_capacity(self.cfg.n_layers as usize);
        for _ in 0..self.cfg.n_layers {
            k.push(self.backend.alloc(per_layer, "kv cache")?);
            v.push(self.backend.alloc(per_layer, "kv cache")?);
        }
        // The table is capacity x head_dim floats, no larger than one layer's keys just
        // allocated (kv_dim >= head_dim), so that allocation bounds this one.
        let rope = self.backend.upload_f32(
            &rope_table(
                self.cfg.rope_theta,
                self.cfg.head_dim,
                capacity,
                &self.cfg.rope_scaling,
            ),
            "rope table",
        )?;
        Ok(KvCache {
            k,
            v,
            rope,
            capacity,
            len: 0,
            scratch: None,
        })
    }

    /// Runs `tokens` at the cache's next positions and appends their keys and values.
    /// Returns logits \[tokens.len(), vocab\] if `all_logits`, else those of the last token.
    pub fn forward(
        &self,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let pos0 = cache.len;
        let t = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        let scratch = self.run_layers(cache, tokens, (&[t], true))?;
        // Only the rows whose logits are wanted go through the output head.
        let picked: Vec<u32> = if all_logits {
            (0..t).collect()
        } else {
            vec![t - 1]
        };
        let rows = picked.len() as u64;
        let gathered = be.alloc(rows * u64::from(c.dim) * 4, "activations")?;
        let normed = be.alloc(rows * u64::from(c.dim) * 4, "activations")?;
        let logits = be.alloc(rows * u64::from(c.vocab) * 4, "logits")?;
        self.head_rows(&scratch.x, &picked, (&gathered, &normed, &logits))?;
        let out = be.read_f32(&logits, rows as usize * c.vocab as usize)?;
        cache.scratch = Some(scratch);
        // NaN or infinity here means the weights or the config hold nonsense; say where it
        // shows rather than return numbers nothing downstream can use.
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            let vocab = c.vocab as usize;
            let token = picked[i / vocab] as usize;
            return Err(Error::NonFinite {
                what: "logits",
                at: format!(
                    "token {token} (position {}), vocabulary id {}",
                    pos0 as usize + token,
                    i % vocab
                ),
            });
        }
        Ok(out)
    }

    /// The final norm and the output head over the rows `picked` (increasing) of `x`, the
    /// last layer's output, into `logits` \[picked.len(), vocab\]; `gathered` and `normed`
    /// hold as many rows. Runs of consecutive rows move with one copy each.
    fn head_rows(
        &self,
        x: &B::Buffer,
        picked: &[u32],
        (gathered, normed, logits): (&B::Buffer, &B::Buffer, &B::Buffer),
    ) -> Result<()> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let dim = c.dim;
        for (at, row, len) in runs(picked) {
            be.run(&Op::Copy {
                src: x,
                dst: gathered,
                n: len * dim,
                src_offset: row * dim,
                dst_offset: at * dim,
            })?;
        }
        let rows = picked.len() as u32;
        be.run(&Op::RmsNorm {
            x: gathered,
            weight: &self.out_norm,
            out: normed,
            rows,
            dim,
            eps: c.rms_eps,
        })?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        head.apply(be, normed, logits, rows)
    }

    /// The adapter buffers a forward pass needs: none unless an adapter acts on a
    /// projection (norms, block scales and full training live in the model's own buffers).
    fn adapter_room(&self) -> Option<AdapterRoom> {
        let linears = || {
            self.layers
                .iter()
                .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
        };
        linears().any(Linear::adapted).then(|| AdapterRoom {
            rank: linears()
                .find_map(|l| l.lora.as_ref().map(|l| l.rank))
                .unwrap_or(0),
            input: linears().any(|l| l.scale_in.is_some()),
            spare: linears().any(|l| l.steps(true) >= 2),
        })
    }

    /// Embeds `tokens` and runs every layer over them at the cache's next positions, as the
    /// sequences `segs` (token counts summing to `tokens.len()`, see
    /// [`Model::layer_forward`]), appending their keys and values to the cache if `keep`
    /// (otherwise attention reads them from the activations and the cache is not touched).
    /// The last layer's output is the returned scratch's `x`; the caller hands the scratch
    /// back to the cache.
    fn run_layers(
        &self,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        (segs, keep): (&[u32], bool),
    ) -> Result<Scratch<B>> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let t = u32::try_from(tokens.len())
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| Error::InvalidArgument {
                name: "tokens",
                reason: format!("{} tokens (1 to u32::MAX allowed)", tokens.len()),
            })?;
        if let Some(&bad) = tokens.iter().find(|&&id| id >= c.vocab) {
            return Err(Error::IndexOutOfRange {
                op: "forward: token id",
                index: u64::from(bad),
                bound: u64::from(c.vocab),
            });
        }
        let pos0 = cache.len;
        if u64::from(pos0) + u64::from(t) > u64::from(cache.capacity) {
            return Err(Error::InvalidArgument {
                name: "tokens",
                reason: format!(
                    "{} positions exceed the KV cache capacity {}",
                    u64::from(pos0) + u64::from(t),
                    cache.capacity
                ),
            });
        }
        let (dim, hd) = (c.dim, c.head_dim);
        let kv_dim = c.n_kv_heads * hd;
        // Element counts and offsets below are u32 products of token counts or positions
        // and row widths: check the largest of each once so none of them can overflow.
        let widest = [dim, c.n_heads * hd, c.ffn_dim, c.vocab]
            .into_iter()
            .fold(kv_dim, u32::max);
        let positions = u64::from(pos0) + u64::from(t);
        if u64::from(t) * u64::from(widest) > u64::from(u32::MAX)
            || positions * u64::from(kv_dim) > u64::from(u32::MAX)
        {
            return Err(Error::InvalidShape {
                op: "forward",
                reason: format!(
                    "{t} tokens at {positions} positions exceed the 2^32 elements one call addresses"
                ),
            });
        }
        let ids: Vec<u8> = tokens.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids = be.upload(&ids, "token ids")?;
        let room = self.adapter_room();
        let scratch = match cache.scratch.take() {
            Some(s) if s.fits(t, room) => s,
            _ => Scratch::new(be, c, t, room)?,
        };
        let s = &scratch;
        let Scratch {
            x,
            x2,
            h,
            q,
            qr,
            k,
            kr,
            v,
            att,
            gate,
            up,
            act,
            ..
        } = &scratch;
        be.run(&Op::Embed {
            table: &self.embed.buf,
            ids: &ids,
            out: x,
            wtype: self.embed.wtype,
            vocab: c.vocab,
            dim,
            n_ids: t,
        })?;
        for (i, layer) in self.layers.iter().enumerate() {
            let bufs = LayerBufs {
                x,
                x2,
                out: x,
                h,
                q,
                qr,
                k,
                kr,
                v,
                att,
                gate,
                up,
                act,
            };
            let kv = keep.then_some((&cache.k[i], &cache.v[i]));
            // Each layer leaves the next one's attention norm of its output in `h`, or in a
            // decode step where the next layer's q, k and v take it fused, its residual add
            // pending.
            let input = match i {
                0 => LayerIn::Raw,
                _ if self.takes_pending(layer, t, keep, segs) => LayerIn::Pending,
                _ => LayerIn::Normed,
            };
            let next = self
                .layers
                .get(i + 1)
                .map(|l| (&l.attn_norm, self.takes_pending(l, t, keep, segs)));
            self.layer_forward(
                layer,
                &bufs,
                s,
                (&cache.rope, pos0, segs),
                kv,
                (input, next),
            )?;
        }
        if keep {
            cache.len = pos0 + t;
        }
        Ok(scratch)
    }

    /// Whether `layer`'s q, k and v weights can be one [`Op::NormQkvRope`] (its
    /// [`Op::NormQkv`]): of one type and width, k's and v's of one shape.
    fn same_qkv(layer: &Layer<B>) -> bool {
        let (q, k, v) = (&layer.q.weight, &layer.k.weight, &layer.v.weight);
        (q.wtype, q.cols) == (k.wtype, k.cols)
            && (k.wtype, k.rows, k.cols) == (v.wtype, v.rows, v.cols)
    }

    /// Whether `layer` of a forward pass of `t` tokens in the sequences `segs` takes the
    /// layer before's residual add pending ([`LayerIn::Pending`]): one decode step into the
    /// cache, q, k and v plain and the backend fusing the norm into their products.
    fn takes_pending(&self, layer: &Layer<B>, t: u32, keep: bool, segs: &[u32]) -> bool {
        t == 1
            && keep
            && segs.len() == 1
            && [&layer.q, &layer.k, &layer.v]
                .iter()
                .all(|l| l.plain() && self.backend.fuses_norm(l.weight.wtype, l.weight.rows))
    }

    /// One layer of the forward pass over the sequences `segs` (their token counts) packed
    /// one after another, each at positions pos0..: reads `b.x`, writes `b.out` (which may
    /// be `b.x`) and the activations in `b`. With `kv`, the keys and values go into that
    /// layer's cache at pos0 and attention reads the cache; without, the sequences attend
    /// to their own rows of `b.kr` and `b.v` (pos0 = 0, training). Several sequences need
    /// pos0 = 0: each attends to its own rows only. `input`: what `b.h` holds; `next`: the
    /// next layer's attention norm, to leave `b.h` holding of `b.out` (each residual add
    /// and the norm after it being one kernel), and whether that layer takes the add
    /// pending instead (`b.out` is then not written: `b.x2` + `b.h` is).
    fn layer_forward(
        &self,
        layer: &Layer<B>,
        b: &LayerBufs<'_, B>,
        s: &Scratch<B>,
        (rope_table, pos0, segs): (&B::Buffer, u32, &[u32]),
        kv: Option<(&B::Buffer, &B::Buffer)>,
        (input, next): (LayerIn, Option<(&B::Buffer, bool)>),
    ) -> Result<()> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let t: u32 = segs.iter().sum();
        // Several sequences start at position 0 each: their keys sit at their own rows.
        debug_assert!(segs.len() == 1 || pos0 == 0);
        // (first row, tokens) of each sequence.
        let spans = segs.iter().scan(0u32, |row0, &n| {
            let at = *row0;
            *row0 += n;
            Some((at, n))
        });
        let (dim, hd) = (c.dim, c.head_dim);
        let kv_dim = c.n_kv_heads * hd;
        let LayerBufs {
            x,
            x2,
            out,
            h,
            q,
            qr,
            k,
            kr,
            v,
            att,
            gate,
            up,
            act,
        } = *b;
        // Whether q, k and v are already rotated into `qr` and the cache.
        let mut roped = false;
        match (input, kv) {
            (LayerIn::Raw, _) => be.run(&Op::RmsNorm {
                x,
                weight: &layer.attn_norm,
                out: h,
                rows: t,
                dim,
                eps: c.rms_eps,
            })?,
            (LayerIn::Normed, _) => {}
            // x = x2 + h, normed into q, k and v, and those rotated into `qr` and the
            // cache, in one call where their weights are of one type and width (and k's
            // and v's of one shape).
            (LayerIn::Pending, Some((k_cache, v_cache))) if Self::same_qkv(layer) => {
                let (wq, wk, wv) = (&layer.q.weight, &layer.k.weight, &layer.v.weight);
                be.run(&Op::NormQkvRope {
                    a: x2,
                    h,
                    norm: &layer.attn_norm,
                    sum: x,
                    wq: &wq.buf,
                    wk: &wk.buf,
                    wv: &wv.buf,
                    q,
                    k,
                    v,
                    table: rope_table,
                    q_out: qr,
                    k_cache,
                    v_cache,
                    q_factors: wq.scale_factors.as_ref(),
                    k_factors: wk.scale_factors.as_ref(),
                    v_factors: wv.scale_factors.as_ref(),
                    wtype: wq.wtype,
                    dim: wq.cols,
                    n_q: wq.rows,
                    n_kv: wk.rows,
                    eps: c.rms_eps,
                    head_dim: hd,
                    pos: pos0,
                    style: c.rope_style,
                })?;
                roped = true;
            }
            // Elsewhere each of q, k and v takes it (q's call storing x).
            (LayerIn::Pending, _) => {
                for (i, (l, out)) in [(&layer.q, q), (&layer.k, k), (&layer.v, v)]
                    .into_iter()
                    .enumerate()
                {
                    let w = &l.weight;
                    be.run(&Op::NormMatvec {
                        a: x2,
                        h,
                        norm: &layer.attn_norm,
                        w: &w.buf,
                        out,
                        sum: (i == 0).then_some(x),
                        factors: w.scale_factors.as_ref(),
                        up: None,
                        up_factors: None,
                        wtype: w.wtype,
                        k: w.cols,
                        n: w.rows,
                        eps: c.rms_eps,
                    })?;
                }
            }
        }
        if input != LayerIn::Pending {
            layer.q.forward(be, h, q, t, s)?;
            layer.k.forward(be, h, k, t, s)?;
            layer.v.forward(be, h, v, t, s)?;
        }
        let (keys, values, pos0) = match kv {
            Some((ck, cv)) if roped => (ck, cv, pos0),
            // One sequence into the cache: RoPE and the cache writes in one kernel.
            Some((ck, cv)) if segs.len() == 1 => {
                be.run(&Op::RopeKv {
                    q,
                    k,
                    v,
                    table: rope_table,
                    q_out: qr,
                    k_cache: ck,
                    v_cache: cv,
                    n_tokens: t,
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    head_dim: hd,
                    pos0,
                    style: c.rope_style,
                })?;
                (ck, cv, pos0)
            }
            _ => {
                for (row0, n) in spans.clone() {
                    for (x, out, n_heads) in [(q, qr, c.n_heads), (k, kr, c.n_kv_heads)] {
                        be.run(&Op::Rope {
                            x,
                            table: rope_table,
                            out,
                            n_tokens: n,
                            n_heads,
                            head_dim: hd,
                            pos0,
                            row0,
                            style: c.rope_style,
                        })?;
                    }
                }
                match kv {
                    Some((ck, cv)) => {
                        let at = pos0 * kv_dim;
                        be.run(&Op::Copy {
                            src: kr,
                            dst: ck,
                            n: t * kv_dim,
                            src_offset: 0,
                            dst_offset: at,
                        })?;
                        be.run(&Op::Copy {
                            src: v,
                            dst: cv,
                            n: t * kv_dim,
                            src_offset: 0,
                            dst_offset: at,
                        })?;
                        (ck, cv, pos0)
                    }
                    None => (kr, v, 0),
                }
            }
        };
        for (row0, n) in spans {
            be.run(&Op::Attention {
                q: qr,
                k: keys,
                v: values,
                out: att,
                n_tokens: n,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                pos0,
                row0,
                scale: attention_scale(hd),
            })?;
        }
        layer.o.forward(be, att, h, t, s)?;
        let (g, u) = (&layer.gate, &layer.up);
        let same_shape =
            |a: &Weight<B>, b: &Weight<B>| (a.wtype, a.rows, a.cols) == (b.wtype, b.rows, b.cols);
        // A decode step (never a pass backprop reads gate and up from): both products and
        // SwiGLU in one call, one dispatch where the device fuses them, and the residual
        // add and norm before them in it too where the device fuses that.
        let fused_ffn =
            t == 1 && kv.is_some() && g.plain() && u.plain() && same_shape(&g.weight, &u.weight);
        if fused_ffn && be.fuses_norm(g.weight.wtype, g.weight.rows) {
            be.run(&Op::NormMatvec {
                a: x,
                h,
                norm: &layer.ffn_norm,
                w: &g.weight.buf,
                out: act,
                sum: Some(x2),
                factors: g.weight.scale_factors.as_ref(),
                up: Some(&u.weight.buf),
                up_factors: u.weight.scale_factors.as_ref(),
                wtype: g.weight.wtype,
                k: g.weight.cols,
                n: g.weight.rows,
                eps: c.rms_eps,
            })?;
        } else {
            be.run(&Op::AddRmsNorm {
                a: x,
                h,
                sum: x2,
                weight: &layer.ffn_norm,
                rows: t,
                dim,
                eps: c.rms_eps,
            })?;
            if fused_ffn {
                be.run(&Op::QSwiGlu {
                    x: h,
                    gate: &g.weight.buf,
                    up: &u.weight.buf,
                    gate_factors: g.weight.scale_factors.as_ref(),
                    up_factors: u.weight.scale_factors.as_ref(),
                    out: act,
                    wtype: g.weight.wtype,
                    m: 1,
                    k: g.weight.cols,
                    n: g.weight.rows,
                })?;
            } else {
                g.forward(be, h, gate, t, s)?;
                u.forward(be, h, up, t, s)?;
                be.run(&Op::SwiGlu {
                    gate,
                    up,
                    out: act,
                    n: t * c.ffn_dim,
                })?;
            }
        }
        layer.down.forward(be, act, h, t, s)?;
        match next {
            // The next layer's q, k and v make out = x2 + h.
            Some((_, true)) => Ok(()),
            Some((weight, false)) => be.run(&Op::AddRmsNorm {
                a: x2,
                h,
                sum: out,
                weight,
                rows: t,
                dim,
                eps: c.rms_eps,
            }),
            None => be.run(&Op::Add {
                a: x2,
                b: h,
                out,
                n: t * dim,
            }),
        }
    }

    /// The summed negative log-likelihood of each token after the first, given the ones
    /// before it, from one forward of `tokens` on the cleared cache, and how many tokens
    /// were predicted: a training sequence's loss (mean = sum / count) and the numerator of
    /// perplexity. Accumulated in f64 (log-sum-exp per position).
    pub fn sequence_nll(&self, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<(f64, usize)> {
        self.masked_nll(cache, tokens, None)
    }

    /// [`Model::sequence_nll`] over the tokens `targets` marks (`targets[i]`: token i is
    /// predicted; `targets[0]` is ignored): a completion's loss without its prompt's.
    pub fn masked_nll(
        &self,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        targets: Option<&[bool]>,
    ) -> Result<(f64, usize)> {
        self.packed_nll(cache, &[(tokens, targets)])
    }

    /// The summed loss and target count of several sequences (each with `targets` as in
    /// [`Model::masked_nll`]) from one forward pass on the cleared cache: the sequences are
    /// packed one after another, each from position 0 and attending to its own tokens
    /// alone, so the result is the sum of their [`Model::masked_nll`]s. Their total length
    /// may not exceed the cache's capacity. The output head runs 64 rows at a
    /// time and each row's log-sum-exp is accumulated in f64.
    pub fn packed_nll(
        &self,
        cache: &mut KvCache<B>,
        seqs: &[(&[u32], Option<&[bool]>)],
    ) -> Result<(f64, usize)> {
        let total: usize = seqs.iter().map(|(s, _)| s.len()).sum();
        if total > cache.capacity as usize {
            return Err(Error::InvalidArgument {
                name: "tokens",
                reason: format!(
                    "{total} tokens packed into one pass exceed the KV cache capacity {}",
                    cache.capacity
                ),
            });
        }
        // Checked here, before run_layers does, because the row indices below are u32.
        let mut tokens = Vec::with_capacity(total);
        let mut segs = Vec::with_capacity(seqs.len());
        // (row, the token it predicts) for every target.
        let mut rows: Vec<(u32, u32)> = Vec::new();
        for (n, &(seq, targets)) in seqs.iter().enumerate() {
            if seq.len() < 2 {
                return Err(Error::InvalidArgument {
                    name: "tokens",
                    reason: format!(
                        "sequence {n} has {} tokens; a loss needs at least 2",
                        seq.len()
                    ),
                });
            }
            if let Some(t) = targets
                && t.len() != seq.len()
            {
                return Err(Error::InvalidArgument {
                    name: "targets",
                    reason: format!("sequence {n}: {} flags for {} tokens", t.len(), seq.len()),
                });
            }
            let at = tokens.len();
            // Position i predicts token i + 1.
            for i in 0..seq.len() - 1 {
                if targets.is_none_or(|t| t[i + 1]) {
                    rows.push(((at + i) as u32, seq[i + 1]));
                }
            }
            tokens.extend_from_slice(seq);
            segs.push(seq.len() as u32);
        }
        cache.clear();
        if rows.is_empty() {
            return Ok((0.0, 0));
        }
        // The keys and values stay in the activations: a loss pass never reads them again.
        let scratch = self.run_layers(cache, &tokens, (&segs, false))?;
        let result = self.head_nll(&scratch.x, &rows, &segs);
        cache.scratch = Some(scratch);
        result
    }

    /// The summed loss of `rows` (row of `x`, the token it predicts) through the final norm
    /// and the output head, [`HEAD_CHUNK`] rows at a time; `segs` (the packed sequences'
    /// lengths) name where a non-finite logit shows.
    fn head_nll(&self, x: &B::Buffer, rows: &[(u32, u32)], segs: &[u32]) -> Result<(f64, usize)> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let (dim, vocab) = (u64::from(c.dim), c.vocab as usize);
        let chunk = rows.len().min(HEAD_CHUNK as usize);
        let gathered = be.alloc(chunk as u64 * dim * 4, "activations")?;
        let normed = be.alloc(chunk as u64 * dim * 4, "activations")?;
        let logits = be.alloc((chunk * vocab) as u64 * 4, "logits")?;
        let (mut total, mut count) = (0.0, 0);
        for part in rows.chunks(chunk) {
            let picked: Vec<u32> = part.iter().map(|&(r, _)| r).collect();
            self.head_rows(x, &picked, (&gathered, &normed, &logits))?;
            let out = be.read_f32(&logits, part.len() * vocab)?;
            for (row, &(r, next)) in out.chunks_exact(vocab).zip(part) {
                // NaN or infinity means the weights or the config hold nonsense; say where.
                if let Some(i) = row.iter().position(|v| !v.is_finite()) {
                    let (mut seq, mut at) = (0, r);
                    while seq + 1 < segs.len() && at >= segs[seq] {
                        at -= segs[seq];
                        seq += 1;
                    }
                    let which = match segs.len() {
                        1 => String::new(),
                        _ => format!("sequence {seq} of the pass, "),
                    };
                    return Err(Error::NonFinite {
                        what: "logits",
                        at: format!("{which}token {at} (position {at}), vocabulary id {i}"),
                    });
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|v| libm::exp(f64::from(v - max))).sum();
                total += f64::from(max) + libm::log(sum) - f64::from(row[next as usize]);
                count += 1;
            }
        }
        Ok((total, count))
    }
}

/// Rows of the output head computed at once when only a loss is wanted (training, and the
/// backward pass): logits exist for this many positions at a time (12 MiB for a
/// 49,152-token vocabulary), never for a whole batch; each chunk reads the whole head once.
const HEAD_CHUNK: u32 = 64;

/// Runs of consecutive values in `rows`: (index of the run's first value in `rows`, that
/// value, length), so each run moves with one copy.
fn runs(rows: &[u32]) -> Vec<(u32, u32, u32)> {
    let mut out: Vec<(u32, u32, u32)> = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        match out.last_mut() {
            Some((_, first, len)) if *first + *len == r => *len += 1,
            _ => out.push((i as u32, r, 1)),
        }
    }
    out
}
