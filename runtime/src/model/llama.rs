//! One Llama-family implementation over any backend and any weight format.
//!
//! Weights stay in their stored blocks on the device (no f32 copy of the model); every
//! projection is a dequantising product. `forward` runs a batch of tokens (prefill) or one
//! (decode) against a KV cache.

use super::config::{Arch, Config};
use crate::backend::{Backend, Op, rope_table};
use crate::error::{Error, Result};
use crate::format::gguf::{Gguf, TensorInfo};
use crate::quant::{self, WeightType};
use std::prelude::v1::*;

/// A weight matrix on the device: `rows` rows of `cols` elements of `wtype`.
#[derive(Debug)]
pub struct Weight<B: Backend> {
    pub buf: B::Buffer,
    pub wtype: WeightType,
    pub rows: u32,
    pub cols: u32,
}

#[derive(Debug)]
struct Layer<B: Backend> {
    attn_norm: B::Buffer,
    wq: Weight<B>,
    wk: Weight<B>,
    wv: Weight<B>,
    wo: Weight<B>,
    ffn_norm: B::Buffer,
    w_gate: Weight<B>,
    w_up: Weight<B>,
    w_down: Weight<B>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Model<'b, B: Backend> {
    backend: &'b B,
    pub cfg: Config,
    embed: Weight<B>,
    layers: Vec<Layer<B>>,
    out_norm: B::Buffer,
    output: Option<Weight<B>>,
}

/// Keys and values of every layer for up to `capacity` positions, plus the RoPE table.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    k: Vec<B::Buffer>,
    v: Vec<B::Buffer>,
    rope: B::Buffer,
    capacity: u32,
    len: u32,
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

fn bad_tensor(t: &str, reason: String) -> Error {
    Error::InvalidShape {
        op: "load model",
        reason: format!("tensor `{t}`: {reason}"),
    }
}

struct Loader<'a, B: Backend> {
    backend: &'a B,
    gguf: &'a Gguf,
    bytes: &'a [u8],
}

impl<B: Backend> Loader<'_, B> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.gguf
            .tensor(name)
            .ok_or_else(|| bad_tensor(name, "missing".into()))
    }

    fn data(&self, t: &TensorInfo) -> Result<&[u8]> {
        self.gguf
            .tensor_data(self.bytes, t)
            .ok_or_else(|| bad_tensor(&t.name, "data outside the file".into()))
    }

    /// A matrix of `rows` x `cols` kept in its stored format.
    fn matrix(&self, name: &str, rows: u32, cols: u32) -> Result<Weight<B>> {
        let t = self.info(name)?;
        if t.dims != [u64::from(cols), u64::from(rows)] {
            return Err(bad_tensor(
                name,
                format!("dims {:?}, expected [{cols}, {rows}]", t.dims),
            ));
        }
        let wtype = t.ggml_type.weight_type().ok_or_else(|| {
            bad_tensor(
                name,
                format!("type {} is not supported", t.ggml_type.name()),
            )
        })?;
        let buf = self
            .backend
            .upload_weights(wtype, self.data(t)?, "weight")?;
        Ok(Weight {
            buf,
            wtype,
            rows,
            cols,
        })
    }

    /// A vector of `n` values, converted to f32 on the host (norms are tiny).
    fn vector(&self, name: &str, n: u32) -> Result<B::Buffer> {
        let t = self.info(name)?;
        if t.dims != [u64::from(n)] {
            return Err(bad_tensor(
                name,
                format!("dims {:?}, expected [{n}]", t.dims),
            ));
        }
        let wtype = t.ggml_type.weight_type().ok_or_else(|| {
            bad_tensor(
                name,
                format!("type {} is not supported", t.ggml_type.name()),
            )
        })?;
        let mut v = vec![0.0f32; n as usize];
        quant::dequantize(wtype, self.data(t)?, &mut v)?;
        self.backend.upload_f32(&v, "norm")
    }
}

impl<'b, B: Backend> Model<'b, B> {
    /// Loads a GGUF model whose header `gguf` was parsed from `bytes` (the whole file).
    pub fn from_gguf(backend: &'b B, gguf: &Gguf, bytes: &[u8]) -> Result<Self> {
        let cfg = Config::from_gguf(gguf)?;
        if cfg.arch == Arch::Qwen2 {
            return Err(Error::InvalidShape {
                op: "load model",
                reason: "qwen2 (q/k/v biases) is not implemented yet".into(),
            });
        }
        let l = Loader {
            backend,
            gguf,
            bytes,
        };
        let (dim, kv_dim) = (cfg.dim, cfg.n_kv_heads * cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.n_layers as usize);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: l.vector(&n("attn_norm"), dim)?,
                wq: l.matrix(&n("attn_q"), cfg.n_heads * cfg.head_dim, dim)?,
                wk: l.matrix(&n("attn_k"), kv_dim, dim)?,
                wv: l.matrix(&n("attn_v"), kv_dim, dim)?,
                wo: l.matrix(&n("attn_output"), dim, cfg.n_heads * cfg.head_dim)?,
                ffn_norm: l.vector(&n("ffn_norm"), dim)?,
                w_gate: l.matrix(&n("ffn_gate"), cfg.ffn_dim, dim)?,
                w_up: l.matrix(&n("ffn_up"), cfg.ffn_dim, dim)?,
                w_down: l.matrix(&n("ffn_down"), dim, cfg.ffn_dim)?,
            });
        }
        let embed = l.matrix("token_embd.weight", cfg.vocab, dim)?;
        let output = if cfg.tied_embeddings {
            None
        } else {
            Some(l.matrix("output.weight", cfg.vocab, dim)?)
        };
        let out_norm = l.vector("output_norm.weight", dim)?;
        Ok(Model {
            backend,
            cfg,
            embed,
            layers,
            out_norm,
            output,
        })
    }

    /// An empty KV cache for up to `capacity` positions (at most the model's context).
    pub fn new_cache(&self, capacity: u32) -> Result<KvCache<B>> {
        if capacity == 0 || capacity > self.cfg.context {
            return Err(Error::InvalidShape {
                op: "kv cache",
                reason: format!("capacity {capacity} must be in 1..={}", self.cfg.context),
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
        let rope = self.backend.upload_f32(
            &rope_table(self.cfg.rope_theta, self.cfg.head_dim, capacity),
            "rope table",
        )?;
        Ok(KvCache {
            k,
            v,
            rope,
            capacity,
            len: 0,
        })
    }

    fn matmul(&self, x: &B::Buffer, w: &Weight<B>, out: &B::Buffer, m: u32) -> Result<()> {
        self.backend.run(&Op::QMatmul {
            x,
            w: &w.buf,
            out,
            wtype: w.wtype,
            m,
            k: w.cols,
            n: w.rows,
        })
    }

    /// Runs `tokens` at the cache's next positions and appends their keys and values.
    /// Returns logits [tokens.len(), vocab] if `all_logits`, else those of the last token.
    pub fn forward(
        &self,
        cache: &mut KvCache<B>,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let be = self.backend;
        let c = &self.cfg;
        let t = u32::try_from(tokens.len())
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| Error::InvalidShape {
                op: "forward",
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
            return Err(Error::InvalidShape {
                op: "forward",
                reason: format!(
                    "{} positions exceed the KV cache capacity {}",
                    u64::from(pos0) + u64::from(t),
                    cache.capacity
                ),
            });
        }
        let (dim, hd) = (c.dim, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        let f = |n: u32| u64::from(t) * u64::from(n) * 4;
        let ids: Vec<u8> = tokens.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids = be.upload(&ids, "token ids")?;
        let x = be.alloc(f(dim), "activations")?;
        let x2 = be.alloc(f(dim), "activations")?;
        let h = be.alloc(f(dim), "activations")?;
        let q = be.alloc(f(q_dim), "q")?;
        let qr = be.alloc(f(q_dim), "q")?;
        let k = be.alloc(f(kv_dim), "k")?;
        let kr = be.alloc(f(kv_dim), "k")?;
        let v = be.alloc(f(kv_dim), "v")?;
        let att = be.alloc(f(q_dim), "attention")?;
        let gate = be.alloc(f(c.ffn_dim), "ffn")?;
        let up = be.alloc(f(c.ffn_dim), "ffn")?;
        let act = be.alloc(f(c.ffn_dim), "ffn")?;
        be.run(&Op::Embed {
            table: &self.embed.buf,
            ids: &ids,
            out: &x,
            wtype: self.embed.wtype,
            vocab: c.vocab,
            dim,
            n_ids: t,
        })?;
        for (i, layer) in self.layers.iter().enumerate() {
            be.run(&Op::RmsNorm {
                x: &x,
                weight: &layer.attn_norm,
                out: &h,
                rows: t,
                dim,
                eps: c.rms_eps,
            })?;
            self.matmul(&h, &layer.wq, &q, t)?;
            self.matmul(&h, &layer.wk, &k, t)?;
            self.matmul(&h, &layer.wv, &v, t)?;
            let rope = |x: &B::Buffer, out: &B::Buffer, n_heads: u32| {
                be.run(&Op::Rope {
                    x,
                    table: &cache.rope,
                    out,
                    n_tokens: t,
                    n_heads,
                    head_dim: hd,
                    pos0,
                    style: c.rope_style,
                })
            };
            rope(&q, &qr, c.n_heads)?;
            rope(&k, &kr, c.n_kv_heads)?;
            let at = pos0 * kv_dim;
            be.run(&Op::Copy {
                src: &kr,
                dst: &cache.k[i],
                n: t * kv_dim,
                src_offset: 0,
                dst_offset: at,
            })?;
            be.run(&Op::Copy {
                src: &v,
                dst: &cache.v[i],
                n: t * kv_dim,
                src_offset: 0,
                dst_offset: at,
            })?;
            be.run(&Op::Attention {
                q: &qr,
                k: &cache.k[i],
                v: &cache.v[i],
                out: &att,
                n_tokens: t,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                pos0,
                scale: 1.0 / libm::sqrtf(hd as f32),
            })?;
            self.matmul(&att, &layer.wo, &h, t)?;
            be.run(&Op::Add {
                a: &x,
                b: &h,
                out: &x2,
                n: t * dim,
            })?;
            be.run(&Op::RmsNorm {
                x: &x2,
                weight: &layer.ffn_norm,
                out: &h,
                rows: t,
                dim,
                eps: c.rms_eps,
            })?;
            self.matmul(&h, &layer.w_gate, &gate, t)?;
            self.matmul(&h, &layer.w_up, &up, t)?;
            be.run(&Op::SwiGlu {
                gate: &gate,
                up: &up,
                out: &act,
                n: t * c.ffn_dim,
            })?;
            self.matmul(&act, &layer.w_down, &h, t)?;
            be.run(&Op::Add {
                a: &x2,
                b: &h,
                out: &x,
                n: t * dim,
            })?;
        }
        cache.len = pos0 + t;
        // Only the rows whose logits are wanted go through the output head.
        let rows = if all_logits { t } else { 1 };
        let last = if all_logits {
            x
        } else {
            let last = be.alloc(u64::from(dim) * 4, "activations")?;
            be.run(&Op::Copy {
                src: &x,
                dst: &last,
                n: dim,
                src_offset: (t - 1) * dim,
                dst_offset: 0,
            })?;
            last
        };
        let normed = be.alloc(u64::from(rows) * u64::from(dim) * 4, "activations")?;
        be.run(&Op::RmsNorm {
            x: &last,
            weight: &self.out_norm,
            out: &normed,
            rows,
            dim,
            eps: c.rms_eps,
        })?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let logits = be.alloc(u64::from(rows) * u64::from(c.vocab) * 4, "logits")?;
        self.matmul(&normed, head, &logits, rows)?;
        be.read_f32(&logits, rows as usize * c.vocab as usize)
    }
}
