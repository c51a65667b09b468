//! The backend abstraction: buffers, uploads and readbacks, and kernel dispatch.
//!
//! A kernel call is an [`Op`] value naming its buffers and shape. Shapes are checked once,
//! here, against the buffers' real sizes ([`Op::check`]), so every backend gets the same
//! typed errors. `cpu` is the reference every other backend is tested against.

use crate::error::{Error, Result};
use crate::quant::{self, WeightType};
use crate::rng::ZKind;
use std::prelude::v1::*;

#[cfg(feature = "std")]
pub mod any;
pub mod cpu;
pub mod grad;
#[cfg(feature = "std")]
pub mod host;
#[cfg(feature = "std")]
mod pool;
#[cfg(feature = "gpu")]
pub mod tune;
#[cfg(feature = "gpu")]
pub mod wgpu;

/// The two RoPE pairings in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RopeStyle {
    /// Rotate (x\[2i\], x\[2i+1\]): GGUF Llama checkpoints (llama.cpp's "normal" mode).
    Interleaved,
    /// Rotate (x\[i\], x\[i + d/2\]): Hugging Face Llama/Qwen2 (llama.cpp's "neox" mode).
    HalfSplit,
}

/// One kernel call. Buffers hold little-endian f32 unless stated; shapes are in elements.
/// Matrices are row-major.
#[derive(Debug)]
#[non_exhaustive]
pub enum Op<'a, B> {
    /// out\[m,n\] = op(a)\[m,k\] * op(b)\[k,n\], where op transposes when the flag is set:
    /// `a` is stored \[m,k\] (or \[k,m\] if `a_t`), `b` is stored \[k,n\] (or \[n,k\] if `b_t`).
    Matmul {
        a: &'a B,
        b: &'a B,
        out: &'a B,
        m: u32,
        k: u32,
        n: u32,
        a_t: bool,
        b_t: bool,
    },
    /// out\[m,n\] = x\[m,k\] * dequant(w)^T with w stored as n rows of k elements of `wtype`.
    /// m = 1 is the one-token matrix-vector product. `factors` (f32, one per block, row by
    /// row) multiply each block's stored scale: the "scales" trainable set, for formats
    /// with [`quant::has_block_scale`]; the stored blocks are only read.
    QMatmul {
        x: &'a B,
        w: &'a B,
        factors: Option<&'a B>,
        out: &'a B,
        wtype: WeightType,
        m: u32,
        k: u32,
        n: u32,
    },
    /// out\[m,n\] = silu(x * dequant(gate)^T) * (x * dequant(up)^T): a feed-forward's gate
    /// and up products and SwiGLU in one call, so that a device with a fused kernel runs
    /// one dispatch where [`Op::QMatmul`] twice and [`Op::SwiGlu`] run three (on lavapipe
    /// each dispatch costs a thread hand-off). `gate` and `up` are of one type and shape,
    /// each with its optional factors, as in [`Op::QMatmul`].
    QSwiGlu {
        x: &'a B,
        gate: &'a B,
        up: &'a B,
        gate_factors: Option<&'a B>,
        up_factors: Option<&'a B>,
        out: &'a B,
        wtype: WeightType,
        m: u32,
        k: u32,
        n: u32,
    },
    /// A decode step's residual add and norm with the product after it, in one call: for
    /// one row of k elements, s = a + h and x = rmsnorm(s) * norm (as [`Op::AddRmsNorm`]
    /// computes them), then out\[n\] = x * dequant(w)^T as [`Op::QMatmul`], or with `up`,
    /// silu(x * dequant(w)^T) * (x * dequant(up)^T) as [`Op::QSwiGlu`] (`w` the gate). s
    /// is stored to `sum` where given, which must be neither `a` nor `h`: those are only
    /// read, so the q, k and v products can each take the same pending norm, one storing
    /// the sum. A device with a fused kernel saves the norm's dispatch.
    NormMatvec {
        a: &'a B,
        h: &'a B,
        norm: &'a B,
        w: &'a B,
        out: &'a B,
        sum: Option<&'a B>,
        factors: Option<&'a B>,
        up: Option<&'a B>,
        up_factors: Option<&'a B>,
        wtype: WeightType,
        k: u32,
        n: u32,
        eps: f32,
    },
    /// A decode step's q, k and v products of one pending add and norm, in one call: s =
    /// a + h stored to `sum` and x = rmsnorm(s) * norm as in [`Op::NormMatvec`] (`sum`
    /// neither `a` nor `h`), then q\[n_q\] = x * dequant(wq)^T, k\[n_kv\] = x *
    /// dequant(wk)^T and v\[n_kv\] = x * dequant(wv)^T, the three weights of one type and
    /// width `dim`, each with its optional factors as in [`Op::QMatmul`]. A device with a
    /// fused kernel runs one dispatch where three [`Op::NormMatvec`] run three.
    NormQkv {
        a: &'a B,
        h: &'a B,
        norm: &'a B,
        sum: &'a B,
        wq: &'a B,
        wk: &'a B,
        wv: &'a B,
        q: &'a B,
        k: &'a B,
        v: &'a B,
        q_factors: Option<&'a B>,
        k_factors: Option<&'a B>,
        v_factors: Option<&'a B>,
        wtype: WeightType,
        dim: u32,
        n_q: u32,
        n_kv: u32,
        eps: f32,
    },
    /// A decode step's [`Op::NormQkv`] into `q`, `k` and `v`, then [`Op::RopeKv`] of those
    /// (one token at position `pos`, heads of `head_dim`; n_q and n_kv whole heads): q
    /// rotated into `q_out`, k rotated into `k_cache` and v copied into `v_cache` at row
    /// `pos`. `q`, `k` and `v` are scratch: a device with a fused kernel rotates the
    /// products as they are stored and leaves them unwritten, running one dispatch where
    /// the two ops run two.
    NormQkvRope {
        a: &'a B,
        h: &'a B,
        norm: &'a B,
        sum: &'a B,
        wq: &'a B,
        wk: &'a B,
        wv: &'a B,
        q: &'a B,
        k: &'a B,
        v: &'a B,
        table: &'a B,
        q_out: &'a B,
        k_cache: &'a B,
        v_cache: &'a B,
        q_factors: Option<&'a B>,
        k_factors: Option<&'a B>,
        v_factors: Option<&'a B>,
        wtype: WeightType,
        dim: u32,
        n_q: u32,
        n_kv: u32,
        eps: f32,
        head_dim: u32,
        pos: u32,
        style: RopeStyle,
    },
    /// out\[rows, cols\] = dequant(w) (the same arithmetic as QMatmul), with `factors` as
    /// there.
    Dequant {
        w: &'a B,
        factors: Option<&'a B>,
        out: &'a B,
        wtype: WeightType,
        rows: u32,
        cols: u32,
    },
    /// out\[t, 0..dim\] = dequant(table row ids\[t\]); `ids` holds u32.
    Embed {
        table: &'a B,
        ids: &'a B,
        out: &'a B,
        wtype: WeightType,
        vocab: u32,
        dim: u32,
        n_ids: u32,
    },
    /// out\[r,:\] = x\[r,:\] / sqrt(mean(x\[r,:\]^2) + eps) * weight.
    RmsNorm {
        x: &'a B,
        weight: &'a B,
        out: &'a B,
        rows: u32,
        dim: u32,
        eps: f32,
    },
    /// sum = a + h, then h = rmsnorm(sum) * weight, both \[rows, dim\]: a residual add and
    /// the norm after it in one kernel (one dispatch instead of two); `h`, the addend, is
    /// overwritten with the normed rows.
    AddRmsNorm {
        a: &'a B,
        h: &'a B,
        sum: &'a B,
        weight: &'a B,
        rows: u32,
        dim: u32,
        eps: f32,
    },
    /// Rotary embedding of rows row0..row0 + n_tokens of x \[rows, n_heads, head_dim\] into
    /// the same rows of `out` (the rest of `out` is untouched); the token in row row0 + t
    /// sits at position pos0 + t. `table` holds (cos, sin) pairs \[positions, head_dim/2, 2\]
    /// from [`rope_table`]. A packed batch rotates each sequence at its own rows from
    /// position 0.
    Rope {
        x: &'a B,
        table: &'a B,
        out: &'a B,
        n_tokens: u32,
        n_heads: u32,
        head_dim: u32,
        pos0: u32,
        row0: u32,
        style: RopeStyle,
    },
    /// A step's queries, keys and values for attention over the KV cache in one kernel:
    /// rows 0..n_tokens of q \[n_tokens, n_heads, head_dim\] rotated into the same rows of
    /// `q_out`, of k \[n_tokens, n_kv_heads, head_dim\] rotated into `k_cache`'s rows pos0..,
    /// and of v (same shape) copied into `v_cache`'s rows pos0.., the tokens at positions
    /// pos0..: what [`Op::Rope`] on q and on k and two [`Op::Copy`]s into the cache do,
    /// with one dispatch instead of four (CPU-emulated GPUs pay per dispatch).
    RopeKv {
        q: &'a B,
        k: &'a B,
        v: &'a B,
        table: &'a B,
        q_out: &'a B,
        k_cache: &'a B,
        v_cache: &'a B,
        n_tokens: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        pos0: u32,
        style: RopeStyle,
    },
    /// Row-wise softmax of x \[rows, cols\].
    Softmax {
        x: &'a B,
        out: &'a B,
        rows: u32,
        cols: u32,
    },
    /// out = silu(gate) * up, elementwise (SwiGLU).
    SwiGlu {
        gate: &'a B,
        up: &'a B,
        out: &'a B,
        n: u32,
    },
    /// out = a + b, elementwise.
    Add {
        a: &'a B,
        b: &'a B,
        out: &'a B,
        n: u32,
    },
    /// out\[r, c\] = x\[r, c\] + bias\[c\] for x \[rows, cols\] (projection biases).
    AddBias {
        x: &'a B,
        bias: &'a B,
        out: &'a B,
        rows: u32,
        cols: u32,
    },
    /// out = alpha * x, elementwise.
    Scale {
        x: &'a B,
        out: &'a B,
        n: u32,
        alpha: f32,
    },
    /// dst\[dst_offset + i\] = src\[src_offset + i\] for i < n (32-bit words): moves rows into
    /// the KV cache and picks rows out of a batch.
    Copy {
        src: &'a B,
        dst: &'a B,
        n: u32,
        src_offset: u32,
        dst_offset: u32,
    },
    /// Causal attention with grouped-query heads over a KV cache.
    /// q \[rows, n_heads, head_dim\]; k, v \[capacity, n_kv_heads, head_dim\]; every buffer is
    /// read (and `out` written) from row `row0` on: the call's query t is q's row row0 + t,
    /// its position p is k's and v's row row0 + p, positions 0..pos0 + n_tokens filled;
    /// query t (position pos0 + t) attends to positions 0..=pos0 + t. Query head h reads kv
    /// head h / (n_heads / n_kv_heads). Rows outside the call's are neither read nor
    /// written, so each sequence of a packed batch attends to its own rows alone.
    Attention {
        q: &'a B,
        k: &'a B,
        v: &'a B,
        out: &'a B,
        n_tokens: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        pos0: u32,
        row0: u32,
        scale: f32,
    },
    /// out\[4i..4i+4\] = philox4x32_10(counter + (i, 0, 0, 0), key) as u32, i < n_blocks.
    /// The addition wraps in the first word only.
    Philox {
        out: &'a B,
        counter: [u32; 4],
        key: [u32; 2],
        n_blocks: u32,
    },
    /// out\[i\] = z(start + i) for i < n: the perturbation of [`crate::rng::ZAddr`], as f32.
    PerturbZ {
        out: &'a B,
        session_key: u64,
        seed: u32,
        tensor: u32,
        start: u32,
        n: u32,
        kind: ZKind,
    },
    /// out\[i\] = value(i) + eps * z(i) for i < n, where value(i) =
    /// (base\[i\] + (4096 step) * (acc\[i\] >> 12)) + step * (acc\[i\] & 4095): a trainable tensor's
    /// value (f32 start `base`, i32 accumulator `acc`, see [`crate::train`]) moved by eps
    /// along z of (session key, seed, tensor). The accumulator is split so that both
    /// products are exact for a power-of-two `step` (an i32 over 2^24 does not convert to
    /// f32 exactly, and WGSL leaves the rounding of that conversion open), which makes the
    /// unperturbed value the same bits on every device. Nothing is written to `base` or
    /// `acc`, so there is nothing to restore.
    ZoWeights {
        base: &'a B,
        acc: &'a B,
        out: &'a B,
        n: u32,
        step: f32,
        eps: f32,
        session_key: u64,
        seed: u32,
        tensor: u32,
        kind: ZKind,
    },
    /// acc\[i\] += sum over j < n_seeds of coef_j * 4z_j(i), for i < n, in wrapping i32
    /// arithmetic; `seeds` holds (seed u32, coef i32) pairs. Integer, so exact and
    /// independent of order: the fused update and replay of [`crate::train`].
    ZoAccumulate {
        acc: &'a B,
        seeds: &'a B,
        n: u32,
        n_seeds: u32,
        session_key: u64,
        tensor: u32,
        kind: ZKind,
    },
    /// out\[r, c\] = x\[r, c\] * scale\[c\] for x \[rows, cols\] (IA3's learned scales).
    MulCols {
        x: &'a B,
        scale: &'a B,
        out: &'a B,
        rows: u32,
        cols: u32,
    },
    /// dx\[m,k\] = dy\[m,n\] * dequant(w)\[n,k\]: the gradient of [`Op::QMatmul`]'s input,
    /// w and `factors` as there. The blocks are dequantised as they are read and only
    /// read: the frozen base has no gradient buffer.
    QMatmulT {
        dy: &'a B,
        w: &'a B,
        factors: Option<&'a B>,
        dx: &'a B,
        wtype: WeightType,
        m: u32,
        k: u32,
        n: u32,
    },
    /// dx = the gradient of [`Op::RmsNorm`]'s input given dy = dL/d(out), the weight frozen:
    /// dx = r (w dy) - x r^3 mean(w dy x), r = 1 / sqrt(mean(x^2) + eps).
    RmsNormGrad {
        x: &'a B,
        weight: &'a B,
        dy: &'a B,
        dx: &'a B,
        rows: u32,
        dim: u32,
        eps: f32,
    },
    /// The gradients of [`Op::Attention`] over a sequence attending to itself (pos0 = 0):
    /// q \[n_tokens, n_heads, head_dim\], k and v \[n_tokens, n_kv_heads, head_dim\], `out`
    /// its result and `dout` = dL/d(out). Writes dq, dk, dv (shaped as q, k, v) and `stats`
    /// \[n_tokens, n_heads, 2\] (log-sum-exp of the scores, dout . out), which the first of its
    /// two passes (dq) leaves for the second (dk, dv).
    AttentionGrad {
        q: &'a B,
        k: &'a B,
        v: &'a B,
        out: &'a B,
        dout: &'a B,
        dq: &'a B,
        dk: &'a B,
        dv: &'a B,
        stats: &'a B,
        n_tokens: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        scale: f32,
    },
    /// The gradients of [`Op::SwiGlu`]: dgate = dy up silu'(gate), dup = dy silu(gate).
    SwiGluGrad {
        gate: &'a B,
        up: &'a B,
        dy: &'a B,
        dgate: &'a B,
        dup: &'a B,
        n: u32,
    },
    /// Cross-entropy of each row of `logits` \[rows, vocab\] against `targets` (u32 per row;
    /// [`NO_TARGET`], or any id of `vocab` or more, masks a row: loss 0, gradient 0): loss\[r\] = logsumexp(row) -
    /// row\[target\], dlogits = scale (softmax(row) - onehot(target)).
    CrossEntropy {
        logits: &'a B,
        targets: &'a B,
        loss: &'a B,
        dlogits: &'a B,
        rows: u32,
        vocab: u32,
        scale: f32,
    },
    /// out\[c\] = sum over r of a\[r, c\] b\[r, c\] for \[rows, cols\]: IA3's scale gradient.
    ColDot {
        a: &'a B,
        b: &'a B,
        out: &'a B,
        rows: u32,
        cols: u32,
    },
    /// y += alpha x, elementwise: gradients summed in place.
    Axpy {
        x: &'a B,
        y: &'a B,
        n: u32,
        alpha: f32,
    },
    /// One AdamW step as PyTorch computes it, on g = grad_scale * grad:
    /// p *= 1 - lr wd; m += (1 - beta1)(g - m); v = beta2 v + (1 - beta2) g^2;
    /// p -= (lr / bias1) m / (sqrt(v) / bias2_sqrt + eps), with bias1 = 1 - beta1^t and
    /// bias2_sqrt = sqrt(1 - beta2^t) computed by the caller.
    AdamW {
        param: &'a B,
        grad: &'a B,
        m: &'a B,
        v: &'a B,
        n: u32,
        hyper: AdamHyper,
    },
    /// One SGD step with momentum as PyTorch computes it, on g = grad_scale * grad +
    /// weight_decay p: buf = momentum buf + g; p -= lr buf.
    Sgd {
        param: &'a B,
        grad: &'a B,
        buf: &'a B,
        n: u32,
        lr: f32,
        momentum: f32,
        weight_decay: f32,
        grad_scale: f32,
    },
}

/// The same op over other buffers: each variant with its buffer fields mapped by `$f`
/// (which returns `None` for a buffer it cannot map), its optional buffers (after a second
/// `;`) likewise where present, and its other fields copied.
macro_rules! map_op {
    ($op:expr, $f:expr; $($variant:ident { $($buf:ident),* ; $($val:ident),* $(; $($opt:ident),*)? })*) => {
        match *$op {
            $(Op::$variant { $($buf,)* $($val,)* $($($opt,)*)? } => Op::$variant {
                $($buf: $f($buf)?,)*
                $($val,)*
                $($($opt: match $opt { Some(b) => Some($f(b)?), None => None },)*)?
            },)*
        }
    };
}

impl<'a, B> Op<'a, B> {
    /// The same call on other buffers: `f` maps each buffer to one of another kind (an
    /// index into a list, as the conformance suite stores its cases; the buffer inside an
    /// [`any::AnyBuffer`]), or to `None` if it cannot (a buffer of another backend).
    pub fn map_buffers<'b, C>(&self, f: impl Fn(&'a B) -> Option<&'b C>) -> Option<Op<'b, C>> {
        Some(map_op!(self, f;
            Matmul { a, b, out; m, k, n, a_t, b_t }
            QMatmul { x, w, out; wtype, m, k, n; factors }
            QSwiGlu { x, gate, up, out; wtype, m, k, n; gate_factors, up_factors }
            NormMatvec { a, h, norm, w, out; wtype, k, n, eps; sum, factors, up, up_factors }
            NormQkv { a, h, norm, sum, wq, wk, wv, q, k, v; wtype, dim, n_q, n_kv, eps; q_factors, k_factors, v_factors }
            NormQkvRope { a, h, norm, sum, wq, wk, wv, q, k, v, table, q_out, k_cache, v_cache; wtype, dim, n_q, n_kv, eps, head_dim, pos, style; q_factors, k_factors, v_factors }
            Dequant { w, out; wtype, rows, cols; factors }
            Embed { table, ids, out; wtype, vocab, dim, n_ids }
            RmsNorm { x, weight, out; rows, dim, eps }
            AddRmsNorm { a, h, sum, weight; rows, dim, eps }
            Rope { x, table, out; n_tokens, n_heads, head_dim, pos0, row0, style }
            RopeKv { q, k, v, table, q_out, k_cache, v_cache; n_tokens, n_heads, n_kv_heads, head_dim, pos0, style }
            Softmax { x, out; rows, cols }
            SwiGlu { gate, up, out; n }
            Add { a, b, out; n }
            AddBias { x, bias, out; rows, cols }
            Scale { x, out; n, alpha }
            Copy { src, dst; n, src_offset, dst_offset }
            Attention { q, k, v, out; n_tokens, n_heads, n_kv_heads, head_dim, pos0, row0, scale }
            Philox { out; counter, key, n_blocks }
            PerturbZ { out; session_key, seed, tensor, start, n, kind }
            ZoWeights { base, acc, out; n, step, eps, session_key, seed, tensor, kind }
            ZoAccumulate { acc, seeds; n, n_seeds, session_key, tensor, kind }
            MulCols { x, scale, out; rows, cols }
            QMatmulT { dy, w, dx; wtype, m, k, n; factors }
            RmsNormGrad { x, weight, dy, dx; rows, dim, eps }
            AttentionGrad { q, k, v, out, dout, dq, dk, dv, stats; n_tokens, n_heads, n_kv_heads, head_dim, scale }
            SwiGluGrad { gate, up, dy, dgate, dup; n }
            CrossEntropy { logits, targets, loss, dlogits; rows, vocab, scale }
            ColDot { a, b, out; rows, cols }
            Axpy { x, y; n, alpha }
            AdamW { param, grad, m, v; n, hyper }
            Sgd { param, grad, buf; n, lr, momentum, weight_decay, grad_scale }
        ))
    }
}

impl<'a, B> Op<'a, B> {
    /// [`Op::NormQkvRope`] as the two ops it stands for, [`Op::NormQkv`] then
    /// [`Op::RopeKv`], which a device without a fused kernel runs; `None` for other ops.
    pub fn qkv_rope_parts(&self) -> Option<[Op<'a, B>; 2]> {
        let Op::NormQkvRope {
            a,
            h,
            norm,
            sum,
            wq,
            wk,
            wv,
            q,
            k,
            v,
            table,
            q_out,
            k_cache,
            v_cache,
            q_factors,
            k_factors,
            v_factors,
            wtype,
            dim,
            n_q,
            n_kv,
            eps,
            head_dim,
            pos,
            style,
        } = *self
        else {
            return None;
        };
        // A zero head_dim gives zero heads, which RopeKv's check rejects.
        let heads = |n: u32| n.checked_div(head_dim).unwrap_or(0);
        Some([
            Op::NormQkv {
                a,
                h,
                norm,
                sum,
                wq,
                wk,
                wv,
                q,
                k,
                v,
                q_factors,
                k_factors,
                v_factors,
                wtype,
                dim,
                n_q,
                n_kv,
                eps,
            },
            Op::RopeKv {
                q,
                k,
                v,
                table,
                q_out,
                k_cache,
                v_cache,
                n_tokens: 1,
                n_heads: heads(n_q),
                n_kv_heads: heads(n_kv),
                head_dim,
                pos0: pos,
                style,
            },
        ])
    }
}

/// The target of a [`Op::CrossEntropy`] row that has none (masked out of the loss).
pub const NO_TARGET: u32 = u32::MAX;

/// AdamW's settings for one step (see [`Op::AdamW`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 - beta1^t for step t (from 1).
    pub bias1: f32,
    /// sqrt(1 - beta2^t).
    pub bias2_sqrt: f32,
    /// Multiplies the gradient first (clipping, averaging accumulated gradients).
    pub grad_scale: f32,
}

impl AdamHyper {
    /// The bias corrections of step `t` (from 1), computed in f64 as PyTorch does.
    pub fn at_step(mut self, t: u64) -> AdamHyper {
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        self.bias1 = (1.0 - libm::pow(f64::from(self.beta1), f64::from(t))) as f32;
        self.bias2_sqrt = libm::sqrt(1.0 - libm::pow(f64::from(self.beta2), f64::from(t))) as f32;
        self
    }

    fn check(&self) -> Result<()> {
        let in_unit = |v: f32| (0.0..1.0).contains(&v);
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && in_unit(self.beta1)
            && in_unit(self.beta2)
            && self.eps.is_finite()
            && self.eps > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0
            && self.bias1 > 0.0
            && self.bias1 <= 1.0
            && self.bias2_sqrt > 0.0
            && self.bias2_sqrt <= 1.0
            && self.grad_scale.is_finite()
            && self.grad_scale >= 0.0;
        if ok {
            return Ok(());
        }
        Err(Error::InvalidShape {
            op: "adamw",
            reason: format!("settings out of range: {self:?}"),
        })
    }
}

/// Largest head dimension the attention kernel accepts (its per-invocation accumulator).
pub const MAX_HEAD_DIM: u32 = 256;

fn need(
    op: &'static str,
    buffer: &'static str,
    actual: u64,
    elems: u64,
    elem_bytes: u64,
) -> Result<()> {
    let needed = elems
        .checked_mul(elem_bytes)
        .ok_or_else(|| Error::InvalidShape {
            op,
            reason: format!("{elems} elements of {elem_bytes} bytes overflow"),
        })?;
    if actual < needed {
        return Err(Error::BufferTooSmall {
            op,
            buffer,
            needed,
            actual,
        });
    }
    Ok(())
}

/// RoPE's head width is even and its (cos, sin) table covers `positions`.
fn rope_table_fits(
    op: &'static str,
    table_bytes: u64,
    positions: u64,
    head_dim: u32,
) -> Result<()> {
    if !head_dim.is_multiple_of(2) {
        return Err(Error::InvalidShape {
            op,
            reason: format!("head_dim {head_dim} must be even"),
        });
    }
    need(
        op,
        "table",
        table_bytes,
        elems(op, &[positions, head_dim.into()])?,
        4,
    )
}

/// A norm's epsilon: finite and not negative.
fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        return Ok(());
    }
    Err(Error::InvalidShape {
        op,
        reason: format!("eps must be finite and >= 0, got {eps}"),
    })
}

fn nonzero(op: &'static str, dims: &[(&str, u32)]) -> Result<()> {
    for (name, v) in dims {
        if *v == 0 {
            return Err(Error::InvalidShape {
                op,
                reason: format!("{name} must be > 0"),
            });
        }
    }
    Ok(())
}

/// The product of `dims` in u64, or an error if it overflows: shapes are checked before
/// any kernel multiplies them in `usize`.
fn elems(op: &'static str, dims: &[u64]) -> Result<u64> {
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::InvalidShape {
            op,
            reason: format!("the product of {dims:?} overflows"),
        })
}

fn mul(a: u32, b: u32) -> u64 {
    u64::from(a) * u64::from(b)
}

/// Bytes of `rows` rows of `cols` elements of `wtype`.
fn weight_bytes(op: &'static str, wtype: WeightType, rows: u32, cols: u32) -> Result<u64> {
    let row = wtype.row_bytes(cols as usize).map_err(|e| match e {
        Error::InvalidShape { reason, .. } => Error::InvalidShape { op, reason },
        other => other,
    })?;
    (row as u64)
        .checked_mul(u64::from(rows))
        .ok_or_else(|| Error::InvalidShape {
            op,
            reason: "weight size overflows".into(),
        })
}

/// The blocks of `rows` x `cols` of `wtype` (one scale each), for a format with
/// [`quant::has_block_scale`]; any other format cannot take scale factors.
fn block_count(op: &'static str, wtype: WeightType, rows: u32, cols: u32) -> Result<u64> {
    if !quant::has_block_scale(wtype) {
        return Err(Error::InvalidShape {
            op,
            reason: format!("{} has no per-block scale to replace", wtype.name()),
        });
    }
    Ok(mul(rows, cols) / wtype.block_elems() as u64)
}

impl<B> Op<'_, B> {
    /// The kernel's name as the conformance suite prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Matmul { .. } => "matmul",
            Op::QMatmul { m: 1, .. } => "qmatvec",
            Op::QMatmul { .. } => "qmatmul",
            Op::QSwiGlu { .. } => "qswiglu",
            Op::NormMatvec { .. } => "norm_qmatvec",
            Op::NormQkv { .. } => "norm_qkv",
            Op::NormQkvRope { .. } => "norm_qkv_rope",
            Op::Dequant { .. } => "dequant",

            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::AddRmsNorm { .. } => "add_rmsnorm",
            Op::Rope { .. } => "rope",
            Op::RopeKv { .. } => "rope_kv",
            Op::Softmax { .. } => "softmax",
            Op::SwiGlu { .. } => "swiglu",
            Op::Add { .. } => "add",
            Op::Scale { .. } => "scale",
            Op::Copy { .. } => "copy",
            Op::AddBias { .. } => "add_bias",
            Op::Attention { .. } => "attention",
            Op::Philox { .. } => "philox",
            Op::PerturbZ { .. } => "perturb_z",
            Op::ZoWeights { .. } => "zo_weights",
            Op::ZoAccumulate { .. } => "zo_accumulate",
            Op::MulCols { .. } => "mul_cols",
            Op::QMatmulT { .. } => "qmatmul_t",
            Op::RmsNormGrad { .. } => "rmsnorm_grad",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::SwiGluGrad { .. } => "swiglu_grad",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::ColDot { .. } => "col_dot",
            Op::Axpy { .. } => "axpy",
            Op::AdamW { .. } => "adamw",
            Op::Sgd { .. } => "sgd",
        }
    }

    /// Checks the shape against the buffers' sizes in bytes, as reported by `size`.
    pub fn check(&self, size: impl Fn(&B) -> u64) -> Result<()> {
        let op = self.name();
        match *self {
            Op::Matmul {
                a, b, out, m, k, n, ..
            } => {
                nonzero(op, &[("m", m), ("k", k), ("n", n)])?;
                need(op, "a", size(a), mul(m, k), 4)?;
                need(op, "b", size(b), mul(k, n), 4)?;
                need(op, "out", size(out), mul(m, n), 4)
            }
            Op::QMatmul {
                x,
                w,
                factors,
                out,
                wtype,
                m,
                k,
                n,
            } => {
                nonzero(op, &[("m", m), ("k", k), ("n", n)])?;
                need(op, "x", size(x), mul(m, k), 4)?;
                need(op, "w", size(w), weight_bytes(op, wtype, n, k)?, 1)?;
                if let Some(f) = factors {
                    need(op, "factors", size(f), block_count(op, wtype, n, k)?, 4)?;
                }
                need(op, "out", size(out), mul(m, n), 4)
            }
            Op::QSwiGlu {
                x,
                gate,
                up,
                gate_factors,
                up_factors,
                out,
                wtype,
                m,
                k,
                n,
            } => {
                nonzero(op, &[("m", m), ("k", k), ("n", n)])?;
                need(op, "x", size(x), mul(m, k), 4)?;
                let bytes = weight_bytes(op, wtype, n, k)?;
                need(op, "gate", size(gate), bytes, 1)?;
                need(op, "up", size(up), bytes, 1)?;
                for (what, f) in [("gate_factors", gate_factors), ("up_factors", up_factors)] {
                    if let Some(f) = f {
                        need(op, what, size(f), block_count(op, wtype, n, k)?, 4)?;
                    }
                }
                need(op, "out", size(out), mul(m, n), 4)
            }
            Op::NormMatvec {
                a,
                h,
                norm,
                w,
                out,
                sum,
                factors,
                up,
                up_factors,
                wtype,
                k,
                n,
                eps,
            } => {
                nonzero(op, &[("k", k), ("n", n)])?;
                check_eps(op, eps)?;
                for (name, b) in [
                    ("a", Some(a)),
                    ("h", Some(h)),
                    ("norm", Some(norm)),
                    ("sum", sum),
                ] {
                    if let Some(b) = b {
                        need(op, name, size(b), u64::from(k), 4)?;
                    }
                }
                if up.is_none() && up_factors.is_some() {
                    return Err(Error::InvalidShape {
                        op,
                        reason: "up_factors without up".into(),
                    });
                }
                let bytes = weight_bytes(op, wtype, n, k)?;
                for (name, b) in [("w", Some(w)), ("up", up)] {
                    if let Some(b) = b {
                        need(op, name, size(b), bytes, 1)?;
                    }
                }
                for (name, f) in [("factors", factors), ("up_factors", up_factors)] {
                    if let Some(f) = f {
                        need(op, name, size(f), block_count(op, wtype, n, k)?, 4)?;
                    }
                }
                need(op, "out", size(out), u64::from(n), 4)
            }
            Op::NormQkv {
                a,
                h,
                norm,
                sum,
                wq,
                wk,
                wv,
                q,
                k,
                v,
                q_factors,
                k_factors,
                v_factors,
                wtype,
                dim,
                n_q,
                n_kv,
                eps,
            } => {
                nonzero(op, &[("dim", dim), ("n_q", n_q), ("n_kv", n_kv)])?;
                check_eps(op, eps)?;
                for (name, b) in [("a", a), ("h", h), ("norm", norm), ("sum", sum)] {
                    need(op, name, size(b), u64::from(dim), 4)?;
                }
                for (name, w, f, out, fname, oname, n) in [
                    ("wq", wq, q_factors, q, "q_factors", "q", n_q),
                    ("wk", wk, k_factors, k, "k_factors", "k", n_kv),
                    ("wv", wv, v_factors, v, "v_factors", "v", n_kv),
                ] {
                    need(op, name, size(w), weight_bytes(op, wtype, n, dim)?, 1)?;
                    if let Some(f) = f {
                        need(op, fname, size(f), block_count(op, wtype, n, dim)?, 4)?;
                    }
                    need(op, oname, size(out), u64::from(n), 4)?;
                }
                Ok(())
            }
            Op::NormQkvRope {
                n_q,
                n_kv,
                head_dim,
                ..
            } => {
                nonzero(op, &[("head_dim", head_dim)])?;
                if !(n_q.is_multiple_of(head_dim) && n_kv.is_multiple_of(head_dim)) {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!(
                            "n_q {n_q} and n_kv {n_kv} must be whole heads of {head_dim}"
                        ),
                    });
                }
                // Each part's checks, their errors naming this op (`size` as a trait
                // object: the recursive call instantiates no new `check`).
                let size: &dyn Fn(&B) -> u64 = &size;
                for part in self.qkv_rope_parts().into_iter().flatten() {
                    part.check(size).map_err(|e| match e {
                        Error::InvalidShape { reason, .. } => Error::InvalidShape { op, reason },
                        Error::BufferTooSmall {
                            buffer,
                            needed,
                            actual,
                            ..
                        } => Error::BufferTooSmall {
                            op,
                            buffer,
                            needed,
                            actual,
                        },
                        other => other,
                    })?;
                }
                Ok(())
            }
            Op::Dequant {
                w,
                factors,
                out,
                wtype,
                rows,
                cols,
            } => {
                nonzero(op, &[("rows", rows), ("cols", cols)])?;
                need(op, "w", size(w), weight_bytes(op, wtype, rows, cols)?, 1)?;
                if let Some(f) = factors {
                    need(
                        op,
                        "factors",
                        size(f),
                        block_count(op, wtype, rows, cols)?,
                        4,
                    )?;
                }
                need(op, "out", size(out), mul(rows, cols), 4)
            }
            Op::Embed {
                table,
                ids,
                out,
                wtype,
                vocab,
                dim,
                n_ids,
            } => {
                nonzero(op, &[("vocab", vocab), ("dim", dim), ("n_ids", n_ids)])?;
                need(
                    op,
                    "table",
                    size(table),
                    weight_bytes(op, wtype, vocab, dim)?,
                    1,
                )?;
                need(op, "ids", size(ids), u64::from(n_ids), 4)?;
                need(op, "out", size(out), mul(n_ids, dim), 4)
            }
            Op::RmsNorm {
                x,
                weight,
                out,
                rows,
                dim,
                eps,
            }
            | Op::AddRmsNorm {
                a: x,
                sum: out,
                weight,
                rows,
                dim,
                eps,
                ..
            } => {
                nonzero(op, &[("rows", rows), ("dim", dim)])?;
                check_eps(op, eps)?;
                let (x_name, out_name) = match *self {
                    Op::AddRmsNorm { h, .. } => {
                        need(op, "h", size(h), mul(rows, dim), 4)?;
                        ("a", "sum")
                    }
                    _ => ("x", "out"),
                };
                need(op, x_name, size(x), mul(rows, dim), 4)?;
                need(op, "weight", size(weight), u64::from(dim), 4)?;
                need(op, out_name, size(out), mul(rows, dim), 4)
            }
            Op::Rope {
                x,
                table,
                out,
                n_tokens,
                n_heads,
                head_dim,
                pos0,
                row0,
                ..
            } => {
                nonzero(
                    op,
                    &[
                        ("n_tokens", n_tokens),
                        ("n_heads", n_heads),
                        ("head_dim", head_dim),
                    ],
                )?;
                let rows = u64::from(row0) + u64::from(n_tokens);
                let n = elems(op, &[rows, n_heads.into(), head_dim.into()])?;
                need(op, "x", size(x), n, 4)?;
                need(op, "out", size(out), n, 4)?;
                let positions = u64::from(pos0) + u64::from(n_tokens);
                rope_table_fits(op, size(table), positions, head_dim)
            }
            Op::RopeKv {
                q,
                k,
                v,
                table,
                q_out,
                k_cache,
                v_cache,
                n_tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                pos0,
                ..
            } => {
                nonzero(
                    op,
                    &[
                        ("n_tokens", n_tokens),
                        ("n_heads", n_heads),
                        ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim),
                    ],
                )?;
                let tokens = u64::from(n_tokens);
                let positions = u64::from(pos0) + tokens;
                let nq = elems(op, &[tokens, n_heads.into(), head_dim.into()])?;
                let nkv = elems(op, &[tokens, n_kv_heads.into(), head_dim.into()])?;
                let cache = elems(op, &[positions, n_kv_heads.into(), head_dim.into()])?;
                need(op, "q", size(q), nq, 4)?;
                need(op, "q_out", size(q_out), nq, 4)?;
                need(op, "k", size(k), nkv, 4)?;
                need(op, "v", size(v), nkv, 4)?;
                need(op, "k_cache", size(k_cache), cache, 4)?;
                need(op, "v_cache", size(v_cache), cache, 4)?;
                rope_table_fits(op, size(table), positions, head_dim)
            }
            Op::Softmax { x, out, rows, cols } => {
                nonzero(op, &[("rows", rows), ("cols", cols)])?;
                need(op, "x", size(x), mul(rows, cols), 4)?;
                need(op, "out", size(out), mul(rows, cols), 4)
            }
            Op::SwiGlu {
                gate: a,
                up: b,
                out,
                n,
            }
            | Op::Add { a, b, out, n } => {
                nonzero(op, &[("n", n)])?;
                need(op, "a", size(a), u64::from(n), 4)?;
                need(op, "b", size(b), u64::from(n), 4)?;
                need(op, "out", size(out), u64::from(n), 4)
            }
            Op::Scale { x, out, n, .. } => {
                nonzero(op, &[("n", n)])?;
                need(op, "x", size(x), u64::from(n), 4)?;
                need(op, "out", size(out), u64::from(n), 4)
            }
            Op::AddBias {
                x,
                bias,
                out,
                rows,
                cols,
            } => {
                nonzero(op, &[("rows", rows), ("cols", cols)])?;
                need(op, "x", size(x), mul(rows, cols), 4)?;
                need(op, "bias", size(bias), u64::from(cols), 4)?;
                need(op, "out", size(out), mul(rows, cols), 4)
            }
            Op::Copy {
                src,
                dst,
                n,
                src_offset,
                dst_offset,
            } => {
                nonzero(op, &[("n", n)])?;
                need(
                    op,
                    "src",
                    size(src),
                    u64::from(src_offset) + u64::from(n),
                    4,
                )?;
                need(
                    op,
                    "dst",
                    size(dst),
                    u64::from(dst_offset) + u64::from(n),
                    4,
                )
            }
            Op::Attention {
                q,
                k,
                v,
                out,
                n_tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                pos0,
                row0,
                ..
            } => {
                nonzero(
                    op,
                    &[
                        ("n_tokens", n_tokens),
                        ("n_heads", n_heads),
                        ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim),
                    ],
                )?;
                if n_heads % n_kv_heads != 0 {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!(
                            "n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}"
                        ),
                    });
                }
                if head_dim > MAX_HEAD_DIM {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!("head_dim {head_dim} exceeds {MAX_HEAD_DIM}"),
                    });
                }
                let rows = u64::from(row0) + u64::from(n_tokens);
                let qo = elems(op, &[rows, n_heads.into(), head_dim.into()])?;
                let positions = u64::from(row0) + u64::from(pos0) + u64::from(n_tokens);
                let kv = elems(op, &[positions, n_kv_heads.into(), head_dim.into()])?;
                need(op, "q", size(q), qo, 4)?;
                need(op, "k", size(k), kv, 4)?;
                need(op, "v", size(v), kv, 4)?;
                need(op, "out", size(out), qo, 4)
            }
            Op::Philox { out, n_blocks, .. } => {
                nonzero(op, &[("n_blocks", n_blocks)])?;
                need(op, "out", size(out), u64::from(n_blocks), 16)
            }
            Op::PerturbZ { out, n, .. } => {
                nonzero(op, &[("n", n)])?;
                need(op, "out", size(out), u64::from(n), 4)
            }
            Op::ZoWeights {
                base,
                acc,
                out,
                n,
                step,
                eps,
                ..
            } => {
                nonzero(op, &[("n", n)])?;
                if !(step.is_finite() && eps.is_finite()) {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!("step {step} and eps {eps} must be finite"),
                    });
                }
                need(op, "base", size(base), u64::from(n), 4)?;
                need(op, "acc", size(acc), u64::from(n), 4)?;
                need(op, "out", size(out), u64::from(n), 4)
            }
            Op::ZoAccumulate {
                acc,
                seeds,
                n,
                n_seeds,
                ..
            } => {
                nonzero(op, &[("n", n), ("n_seeds", n_seeds)])?;
                need(op, "acc", size(acc), u64::from(n), 4)?;
                need(op, "seeds", size(seeds), u64::from(n_seeds), 8)
            }
            Op::MulCols {
                x,
                scale,
                out,
                rows,
                cols,
            } => {
                nonzero(op, &[("rows", rows), ("cols", cols)])?;
                need(op, "x", size(x), mul(rows, cols), 4)?;
                need(op, "scale", size(scale), u64::from(cols), 4)?;
                need(op, "out", size(out), mul(rows, cols), 4)
            }

            Op::QMatmulT {
                dy,
                w,
                factors,
                dx,
                wtype,
                m,
                k,
                n,
            } => {
                nonzero(op, &[("m", m), ("k", k), ("n", n)])?;
                need(op, "dy", size(dy), mul(m, n), 4)?;
                need(op, "w", size(w), weight_bytes(op, wtype, n, k)?, 1)?;
                if let Some(f) = factors {
                    need(op, "factors", size(f), block_count(op, wtype, n, k)?, 4)?;
                }
                need(op, "dx", size(dx), mul(m, k), 4)
            }
            Op::RmsNormGrad {
                x,
                weight,
                dy,
                dx,
                rows,
                dim,
                eps,
            } => {
                nonzero(op, &[("rows", rows), ("dim", dim)])?;
                check_eps(op, eps)?;
                for (name, b) in [("x", x), ("dy", dy), ("dx", dx)] {
                    need(op, name, size(b), mul(rows, dim), 4)?;
                }
                need(op, "weight", size(weight), u64::from(dim), 4)
            }
            Op::AttentionGrad {
                q,
                k,
                v,
                out,
                dout,
                dq,
                dk,
                dv,
                stats,
                n_tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                ..
            } => {
                nonzero(
                    op,
                    &[
                        ("n_tokens", n_tokens),
                        ("n_heads", n_heads),
                        ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim),
                    ],
                )?;
                if n_heads % n_kv_heads != 0 || head_dim > MAX_HEAD_DIM {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!(
                            "n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads} and head_dim {head_dim} at most {MAX_HEAD_DIM}"
                        ),
                    });
                }
                let qo = elems(op, &[n_tokens.into(), n_heads.into(), head_dim.into()])?;
                let kv = elems(op, &[n_tokens.into(), n_kv_heads.into(), head_dim.into()])?;
                for (name, b) in [("q", q), ("out", out), ("dout", dout), ("dq", dq)] {
                    need(op, name, size(b), qo, 4)?;
                }
                for (name, b) in [("k", k), ("v", v), ("dk", dk), ("dv", dv)] {
                    need(op, name, size(b), kv, 4)?;
                }
                need(op, "stats", size(stats), mul(n_tokens, n_heads), 8)
            }
            Op::SwiGluGrad {
                gate,
                up,
                dy,
                dgate,
                dup,
                n,
            } => {
                nonzero(op, &[("n", n)])?;
                for (name, b) in [
                    ("gate", gate),
                    ("up", up),
                    ("dy", dy),
                    ("dgate", dgate),
                    ("dup", dup),
                ] {
                    need(op, name, size(b), u64::from(n), 4)?;
                }
                Ok(())
            }
            Op::CrossEntropy {
                logits,
                targets,
                loss,
                dlogits,
                rows,
                vocab,
                scale,
            } => {
                nonzero(op, &[("rows", rows), ("vocab", vocab)])?;
                if !scale.is_finite() {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!("scale must be finite, got {scale}"),
                    });
                }
                need(op, "logits", size(logits), mul(rows, vocab), 4)?;
                need(op, "dlogits", size(dlogits), mul(rows, vocab), 4)?;
                need(op, "targets", size(targets), u64::from(rows), 4)?;
                need(op, "loss", size(loss), u64::from(rows), 4)
            }
            Op::ColDot {
                a,
                b,
                out,
                rows,
                cols,
            } => {
                nonzero(op, &[("rows", rows), ("cols", cols)])?;
                need(op, "a", size(a), mul(rows, cols), 4)?;
                need(op, "b", size(b), mul(rows, cols), 4)?;
                need(op, "out", size(out), u64::from(cols), 4)
            }
            Op::Axpy { x, y, n, alpha } => {
                nonzero(op, &[("n", n)])?;
                if !alpha.is_finite() {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!("alpha must be finite, got {alpha}"),
                    });
                }
                need(op, "x", size(x), u64::from(n), 4)?;
                need(op, "y", size(y), u64::from(n), 4)
            }
            Op::AdamW {
                param,
                grad,
                m,
                v,
                n,
                hyper,
            } => {
                nonzero(op, &[("n", n)])?;
                hyper.check()?;
                for (name, b) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
                    need(op, name, size(b), u64::from(n), 4)?;
                }
                Ok(())
            }
            Op::Sgd {
                param,
                grad,
                buf,
                n,
                lr,
                momentum,
                weight_decay,
                grad_scale,
            } => {
                nonzero(op, &[("n", n)])?;
                let all = [lr, momentum, weight_decay, grad_scale];
                if !all.iter().all(|v| v.is_finite() && *v >= 0.0) {
                    return Err(Error::InvalidShape {
                        op,
                        reason: format!(
                            "lr {lr}, momentum {momentum}, weight decay {weight_decay} and gradient scale {grad_scale} must be finite and >= 0"
                        ),
                    });
                }
                for (name, b) in [("param", param), ("grad", grad), ("buf", buf)] {
                    need(op, name, size(b), u64::from(n), 4)?;
                }
                Ok(())
            }
        }
    }
}

/// How the RoPE frequencies are stretched for contexts longer than the training one.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// Every frequency divided by the factor (positions interpolated).
    Linear(f64),
    /// Frequency i divided by `divisors\[i\]` (Llama 3's scheme; llama.cpp's `rope_freqs`).
    Divisors(Vec<f64>),
}

impl RopeScaling {
    /// Llama 3's frequency-dependent scaling, as transformers computes it: long wavelengths
    /// divided by `factor`, short ones kept, the band between interpolated.
    pub fn llama3(
        theta: f64,
        head_dim: u32,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    ) -> RopeScaling {
        let low_wavelen = original_context / low_freq_factor;
        let high_wavelen = original_context / high_freq_factor;
        let divisors = (0..head_dim / 2)
            .map(|i| {
                let freq = libm::pow(theta, -(2.0 * f64::from(i)) / f64::from(head_dim));
                let wavelen = 2.0 * core::f64::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        RopeScaling::Divisors(divisors)
    }
}

/// The (cos, sin) table for RoPE: \[positions, head_dim/2, 2\] with angle
/// pos * theta^(-2i/head_dim) / scaling_i, computed in f64 and rounded once. Computing it on
/// the host keeps the kernels free of transcendental functions and gives rope scaling one
/// home.
pub fn rope_table(theta: f64, head_dim: u32, positions: u32, scaling: &RopeScaling) -> Vec<f32> {
    let half = head_dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| {
            let f = libm::pow(theta, -(2.0 * f64::from(i)) / f64::from(head_dim));
            match scaling {
                RopeScaling::None => f,
                RopeScaling::Linear(factor) => f / factor,
                RopeScaling::Divisors(d) => f / d.get(i as usize).copied().unwrap_or(1.0),
            }
        })
        .collect();
    let mut t = Vec::with_capacity(positions as usize * head_dim as usize);
    for p in 0..positions {
        for freq in &freqs {
            let angle = f64::from(p) * freq;
            t.push(libm::cos(angle) as f32);
            t.push(libm::sin(angle) as f32);
        }
    }
    t
}

/// A compute device holding buffers and running [`Op`]s on them.
///
/// Work may be queued: results are guaranteed visible after [`Backend::read`] or
/// [`Backend::sync`].
pub trait Backend {
    /// A device buffer (byte-addressed, size a multiple of 4).
    type Buffer;

    /// A short description of the device.
    fn name(&self) -> String;
    /// A zero-filled buffer of at least `bytes` bytes; `what` names it in errors.
    fn alloc(&self, bytes: u64, what: &'static str) -> Result<Self::Buffer>;
    /// A buffer holding `data` (padded with zeros to a multiple of 4 bytes).
    fn upload(&self, data: &[u8], what: &'static str) -> Result<Self::Buffer>;
    /// The buffer's size in bytes.
    fn size(&self, buf: &Self::Buffer) -> u64;
    /// The buffer's contents (waits for queued work).
    fn read(&self, buf: &Self::Buffer) -> Result<Vec<u8>>;
    /// Checks the shape, then runs (or queues) one kernel.
    fn run(&self, op: &Op<'_, Self::Buffer>) -> Result<()>;
    /// Waits until all queued work has finished.
    fn sync(&self) -> Result<()>;

    /// A buffer holding weights stored as `wtype` (GGUF bytes), rows of `cols` elements. A
    /// backend may rearrange them into a layout its kernels read faster; buffers from here
    /// are what [`Op::QMatmul`], [`Op::Dequant`] and [`Op::Embed`] take as weights, with
    /// the same row width.
    fn upload_weights(
        &self,
        wtype: WeightType,
        data: &[u8],
        cols: u32,
        what: &'static str,
    ) -> Result<Self::Buffer> {
        let _ = (wtype, cols);
        self.upload(data, what)
    }

    /// Whether [`Op::NormMatvec`] on weights of `wtype` with `n` rows costs no more than
    /// its add, norm and product run apart: the model fuses a pending norm into the
    /// products after it (q, k and v each taking it) only then. A backend that runs the add
    /// and the norm apart inside the op repeats them at every call.
    fn fuses_norm(&self, wtype: WeightType, n: u32) -> bool {
        let _ = (wtype, n);
        true
    }

    /// Uploads f32 values.
    fn upload_f32(&self, data: &[f32], what: &'static str) -> Result<Self::Buffer> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload(&bytes, what)
    }

    /// Reads `n` f32 values from the start of the buffer.
    fn read_f32(&self, buf: &Self::Buffer, n: usize) -> Result<Vec<f32>> {
        let bytes = self.read(buf)?;
        let need_bytes = n.saturating_mul(4);
        if bytes.len() < need_bytes {
            return Err(Error::BufferTooSmall {
                op: "read_f32",
                buffer: "buf",
                needed: need_bytes as u64,
                actual: bytes.len() as u64,
            });
        }
        Ok(bytes[..need_bytes]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}
