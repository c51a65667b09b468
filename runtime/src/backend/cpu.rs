//! The CPU reference backend: plain, readable Rust, no_std. Written for clarity, not speed;
//! every other backend is tested against it, and it is tested against independent
//! implementations (numpy, gguf-py) through committed golden files.

use super::{Backend, Op, RopeStyle, grad};
use crate::error::{Error, Result};
use crate::quant::{self, WeightType};
use crate::rng::{self, ZAddr, ZKind};
use core::cell::RefCell;
use std::borrow::Cow;
use std::prelude::v1::*;

/// The reference backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu;

/// A host buffer. Kernels read their inputs into owned values before writing the output,
/// so an output may alias an input. Weights [`CpuInPlace`] finds in its image are borrowed
/// from it and copied only if something writes them.
#[derive(Debug)]
pub struct CpuBuffer(RefCell<Cow<'static, [u8]>>);

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl CpuBuffer {
    /// The first `n` values (at most the buffer's), converting only those: a KV cache
    /// read for its first positions must not cost its whole capacity.
    pub(crate) fn f32s(&self, n: usize) -> Vec<f32> {
        self.f32s_at(0, n)
    }

    /// Values `start..start + n` (within the buffer's).
    pub(crate) fn f32s_at(&self, start: usize, n: usize) -> Vec<f32> {
        let b = self.0.borrow();
        let start = start.saturating_mul(4).min(b.len());
        f32s(&b[start..start.saturating_add(n.saturating_mul(4)).min(b.len())])
    }

    /// The first `n` bytes in place (weights are not copied). Callers drop the borrow
    /// before writing an output, which may be the same buffer.
    pub(crate) fn bytes(&self, n: usize) -> core::cell::Ref<'_, [u8]> {
        self.bytes_in(0..n)
    }

    /// Bytes `range` in place (within the buffer's), as [`CpuBuffer::bytes`].
    pub(crate) fn bytes_in(&self, range: core::ops::Range<usize>) -> core::cell::Ref<'_, [u8]> {
        core::cell::Ref::map(self.0.borrow(), |b| {
            &b[range.start.min(b.len())..range.end.min(b.len())]
        })
    }

    /// The first `n` values as i32 (accumulators, seed lists).
    pub(crate) fn i32s(&self, n: usize) -> Vec<i32> {
        let b = self.0.borrow();
        u32s(&b[..n.saturating_mul(4).min(b.len())])
            .into_iter()
            .map(|v| v as i32)
            .collect()
    }

    /// Whether the bytes are read in place from an image (not copied).
    pub fn in_place(&self) -> bool {
        matches!(*self.0.borrow(), Cow::Borrowed(_))
    }

    pub(crate) fn write_f32(&self, vals: &[f32]) {
        self.write_f32_at(0, vals);
    }

    /// Writes `vals` at values `start..` (within the buffer's).
    pub(crate) fn write_f32_at(&self, start: usize, vals: &[f32]) {
        let mut b = self.0.borrow_mut();
        let b = b.to_mut();
        let start = start.saturating_mul(4).min(b.len());
        for (dst, v) in b[start..].chunks_exact_mut(4).zip(vals) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn write_u32(&self, vals: &[u32]) {
        let mut b = self.0.borrow_mut();
        for (dst, v) in b.to_mut().chunks_exact_mut(4).zip(vals) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }

    pub(crate) fn write_i32(&self, vals: &[i32]) {
        let mut b = self.0.borrow_mut();
        for (dst, v) in b.to_mut().chunks_exact_mut(4).zip(vals) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// The CPU reference for a model in read-only memory that lives as long as the program (a
/// microcontroller's flash): weights whose bytes lie inside `image` are used where they
/// are instead of being copied to the heap; everything else is [`Cpu`]'s.
#[derive(Debug, Clone, Copy)]
pub struct CpuInPlace {
    pub image: &'static [u8],
}

impl Backend for CpuInPlace {
    type Buffer = CpuBuffer;

    fn name(&self) -> String {
        "cpu reference (weights in place)".into()
    }

    fn alloc(&self, bytes: u64, what: &'static str) -> Result<CpuBuffer> {
        Cpu.alloc(bytes, what)
    }

    fn upload(&self, data: &[u8], what: &'static str) -> Result<CpuBuffer> {
        Cpu.upload(data, what)
    }

    /// In place when `data` is a whole number of words inside the image (a buffer's size
    /// is a multiple of 4); a copy otherwise.
    fn upload_weights(
        &self,
        wtype: WeightType,
        data: &[u8],
        cols: u32,
        what: &'static str,
    ) -> Result<CpuBuffer> {
        let at = (data.as_ptr() as usize).checked_sub(self.image.as_ptr() as usize);
        match at.and_then(|at| self.image.get(at..at.checked_add(data.len())?)) {
            Some(bytes) if data.len().is_multiple_of(4) => {
                Ok(CpuBuffer(RefCell::new(Cow::Borrowed(bytes))))
            }
            _ => Cpu.upload_weights(wtype, data, cols, what),
        }
    }

    fn size(&self, buf: &CpuBuffer) -> u64 {
        Cpu.size(buf)
    }

    fn read(&self, buf: &CpuBuffer) -> Result<Vec<u8>> {
        Cpu.read(buf)
    }

    fn sync(&self) -> Result<()> {
        Cpu.sync()
    }

    fn run(&self, op: &Op<'_, CpuBuffer>) -> Result<()> {
        Cpu.run(op)
    }
}

fn padded_len(bytes: u64, what: &'static str) -> Result<usize> {
    let len = bytes.max(4).div_ceil(4) * 4;
    usize::try_from(len).map_err(|_| Error::BufferTooLarge {
        what,
        bytes,
        limit: usize::MAX as u64,
    })
}

impl Backend for Cpu {
    type Buffer = CpuBuffer;

    fn name(&self) -> String {
        "cpu reference".into()
    }

    fn alloc(&self, bytes: u64, what: &'static str) -> Result<CpuBuffer> {
        let len = padded_len(bytes, what)?;
        let mut v = Vec::new();
        v.try_reserve_exact(len)
            .map_err(|_| Error::OutOfMemory { what, bytes })?;
        v.resize(len, 0);
        Ok(CpuBuffer(RefCell::new(Cow::Owned(v))))
    }

    fn upload(&self, data: &[u8], what: &'static str) -> Result<CpuBuffer> {
        let buf = self.alloc(data.len() as u64, what)?;
        buf.0.borrow_mut().to_mut()[..data.len()].copy_from_slice(data);
        Ok(buf)
    }

    fn size(&self, buf: &CpuBuffer) -> u64 {
        buf.0.borrow().len() as u64
    }

    fn read(&self, buf: &CpuBuffer) -> Result<Vec<u8>> {
        Ok(buf.0.borrow().to_vec())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn run(&self, op: &Op<'_, CpuBuffer>) -> Result<()> {
        op.check(|b| self.size(b))?;
        match *op {
            Op::Matmul {
                a,
                b,
                out,
                m,
                k,
                n,
                a_t,
                b_t,
            } => {
                let (m, k, n) = (m as usize, k as usize, n as usize);
                out.write_f32(&matmul(&a.f32s(m * k), &b.f32s(k * n), m, k, n, a_t, b_t));
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
                let (m, k, n) = (m as usize, k as usize, n as usize);
                out.write_f32(&product(&x.f32s(m * k), (w, factors), wtype, (m, k, n))?);
            }
            Op::QSwiGlu { .. } | Op::NormMatvec { .. } | Op::NormQkv { .. } => {
                composed_products(op, product)?;
            }
            Op::NormQkvRope { .. } => {
                for part in op.qkv_rope_parts().into_iter().flatten() {
                    self.run(&part)?;
                }
            }
            Op::Dequant {
                w,
                factors,
                out,
                wtype,
                rows,
                cols,
            } => {
                let n = rows as usize * cols as usize;
                let factors = factors.map(|f| f.f32s(n / wtype.block_elems()));
                let mut y = vec![0.0; n];
                quant::dequantize_scaled(
                    wtype,
                    &w.bytes(wtype.row_bytes(n)?),
                    factors.as_deref(),
                    &mut y,
                )?;
                out.write_f32(&y);
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
                let row = wtype.row_bytes(dim as usize)?;
                let ids = u32s(&ids.bytes(n_ids as usize * 4));
                let y = embed(
                    &table.bytes(row * vocab as usize),
                    &ids,
                    wtype,
                    vocab,
                    dim as usize,
                )?;
                out.write_f32(&y);
            }
            Op::RmsNorm {
                x,
                weight,
                out,
                rows,
                dim,
                eps,
            } => {
                let d = dim as usize;
                out.write_f32(&rmsnorm(
                    &x.f32s(rows as usize * d),
                    &weight.f32s(d),
                    d,
                    eps,
                ));
            }
            Op::AddRmsNorm {
                a,
                h,
                sum,
                weight,
                rows,
                dim,
                eps,
            } => {
                let normed = add_norm(
                    (a, h),
                    weight,
                    Some(sum),
                    (rows as usize, dim as usize),
                    eps,
                );
                h.write_f32(&normed);
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
                style,
            } => {
                let row = (n_heads * head_dim) as usize;
                let (rows, at) = (n_tokens as usize * row, row0 as usize * row);
                let tab = table.f32s(((pos0 + n_tokens) * head_dim) as usize);
                let shape = (n_tokens as usize, n_heads as usize, head_dim as usize);
                let y = rope(&x.f32s_at(at, rows), &tab, shape, pos0 as usize, style);
                out.write_f32_at(at, &y);
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
                style,
            } => {
                let (t, hd) = (n_tokens as usize, head_dim as usize);
                let (nq, nkv) = (t * n_heads as usize * hd, t * n_kv_heads as usize * hd);
                let tab = table.f32s(((pos0 + n_tokens) * head_dim) as usize);
                let at = pos0 as usize * n_kv_heads as usize * hd;
                let p = pos0 as usize;
                q_out.write_f32(&rope(
                    &q.f32s(nq),
                    &tab,
                    (t, n_heads as usize, hd),
                    p,
                    style,
                ));
                let kr = rope(&k.f32s(nkv), &tab, (t, n_kv_heads as usize, hd), p, style);
                k_cache.write_f32_at(at, &kr);
                v_cache.write_f32_at(at, &v.f32s(nkv));
            }
            Op::Softmax { x, out, rows, cols } => {
                out.write_f32(&softmax(&x.f32s((rows * cols) as usize), cols as usize));
            }
            Op::SwiGlu { gate, up, out, n } => {
                let (g, u) = (gate.f32s(n as usize), up.f32s(n as usize));
                out.write_f32(&swiglu(&g, &u));
            }
            Op::Add { a, b, out, n } => {
                let (a, b) = (a.f32s(n as usize), b.f32s(n as usize));
                out.write_f32(&a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>());
            }
            Op::Scale { x, out, n, alpha } => {
                out.write_f32(
                    &x.f32s(n as usize)
                        .iter()
                        .map(|v| alpha * v)
                        .collect::<Vec<_>>(),
                );
            }
            Op::AddBias {
                x,
                bias,
                out,
                rows,
                cols,
            } => {
                let (x, b) = (x.f32s((rows * cols) as usize), bias.f32s(cols as usize));
                let y: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + b[i % cols as usize])
                    .collect();
                out.write_f32(&y);
            }
            Op::Copy {
                src,
                dst,
                n,
                src_offset,
                dst_offset,
            } => {
                let (n, so, d) = (
                    n as usize * 4,
                    src_offset as usize * 4,
                    dst_offset as usize * 4,
                );
                let words = src.0.borrow()[so..so + n].to_vec();
                dst.0.borrow_mut().to_mut()[d..d + n].copy_from_slice(&words);
            }
            Op::Attention { .. } => {
                if let Some(a) = AttnCall::read(op) {
                    let (k, v) = (
                        a.k.f32s_at(a.kv.start, a.kv.len()),
                        a.v.f32s_at(a.kv.start, a.kv.len()),
                    );
                    a.out
                        .write_f32_at(a.out_at, &attention(&a.q, &k, &v, a.shape, a.scale));
                }
            }
            Op::Philox {
                out,
                counter,
                key,
                n_blocks,
            } => {
                let mut words = Vec::with_capacity(n_blocks as usize * 4);
                for i in 0..n_blocks {
                    let mut c = counter;
                    c[0] = c[0].wrapping_add(i);
                    words.extend_from_slice(&rng::philox4x32_10(c, key));
                }
                out.write_u32(&words);
            }
            Op::PerturbZ {
                out,
                session_key,
                seed,
                tensor,
                start,
                n,
                kind,
            } => {
                let addr = perturb_addr(session_key, seed, tensor);
                out.write_f32(&perturb_z(addr, u64::from(start), n as usize, kind));
            }
            Op::ZoWeights {
                base,
                acc,
                out,
                n,
                step,
                eps,
                session_key,
                seed,
                tensor,
                kind,
            } => {
                let addr = perturb_addr(session_key, seed, tensor);
                let (base, acc) = (base.f32s(n as usize), acc.i32s(n as usize));
                out.write_f32(&zo_weights_range(
                    &base,
                    &acc,
                    0..n as usize,
                    (step, eps),
                    &addr,
                    kind,
                ));
            }
            Op::ZoAccumulate {
                acc,
                seeds,
                n,
                n_seeds,
                session_key,
                tensor,
                kind,
            } => {
                let pairs = seeds.i32s(2 * n_seeds as usize);
                let mut d = acc.i32s(n as usize);
                zo_accumulate_range(&mut d, 0, &pairs, (session_key, tensor), kind);
                acc.write_i32(&d);
            }
            Op::MulCols {
                x,
                scale,
                out,
                rows,
                cols,
            } => {
                let (x, s) = (x.f32s((rows * cols) as usize), scale.f32s(cols as usize));
                let y: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v * s[i % cols as usize])
                    .collect();
                out.write_f32(&y);
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
                let (m, k, n) = (m as usize, k as usize, n as usize);
                let factors = factors.map(|f| f.f32s(n * k / wtype.block_elems()));
                let y = grad::qmatmul_t(
                    &dy.f32s(m * n),
                    &w.bytes(wtype.row_bytes(k)? * n),
                    wtype,
                    factors.as_deref(),
                    (m, k, n),
                )?;
                dx.write_f32(&y);
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
                let (n, d) = (rows as usize * dim as usize, dim as usize);
                let y = grad::rmsnorm_grad(&x.f32s(n), &weight.f32s(d), &dy.f32s(n), d, eps);
                dx.write_f32(&y);
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
                scale,
            } => {
                let s = AttnShape {
                    n_tokens: n_tokens as usize,
                    n_heads: n_heads as usize,
                    n_kv_heads: n_kv_heads as usize,
                    head_dim: head_dim as usize,
                    pos0: 0,
                };
                let qo = s.n_tokens * s.n_heads * s.head_dim;
                let kv = s.n_tokens * s.n_kv_heads * s.head_dim;
                let (gq, gk, gv, st) = grad::attention_grad(
                    (&q.f32s(qo), &k.f32s(kv), &v.f32s(kv)),
                    &out.f32s(qo),
                    &dout.f32s(qo),
                    s,
                    scale,
                );
                dq.write_f32(&gq);
                dk.write_f32(&gk);
                dv.write_f32(&gv);
                stats.write_f32(&st);
            }
            Op::SwiGluGrad {
                gate,
                up,
                dy,
                dgate,
                dup,
                n,
            } => {
                let n = n as usize;
                let (g, u) = grad::swiglu_grad(&gate.f32s(n), &up.f32s(n), &dy.f32s(n));
                dgate.write_f32(&g);
                dup.write_f32(&u);
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
                let (r, v) = (rows as usize, vocab as usize);
                let t = u32s(&targets.bytes(r * 4));
                let (l, d) = grad::cross_entropy(&logits.f32s(r * v), &t, v, scale);
                loss.write_f32(&l);
                dlogits.write_f32(&d);
            }
            Op::ColDot {
                a,
                b,
                out,
                rows,
                cols,
            } => {
                let n = rows as usize * cols as usize;
                out.write_f32(&grad::col_dot(&a.f32s(n), &b.f32s(n), cols as usize));
            }
            Op::Axpy { x, y, n, alpha } => {
                let (xs, mut ys) = (x.f32s(n as usize), y.f32s(n as usize));
                for (a, b) in ys.iter_mut().zip(&xs) {
                    *a += alpha * b;
                }
                y.write_f32(&ys);
            }
            Op::AdamW {
                param,
                grad: g,
                m,
                v,
                n,
                hyper,
            } => {
                let n = n as usize;
                let (mut p, mut ms, mut vs) = (param.f32s(n), m.f32s(n), v.f32s(n));
                grad::adamw(&mut p, &g.f32s(n), &mut ms, &mut vs, hyper);
                param.write_f32(&p);
                m.write_f32(&ms);
                v.write_f32(&vs);
            }
            Op::Sgd {
                param,
                grad: g,
                buf,
                n,
                lr,
                momentum,
                weight_decay,
                grad_scale,
            } => {
                let n = n as usize;
                let (mut p, mut b) = (param.f32s(n), buf.f32s(n));
                let hyper = (lr, momentum, weight_decay, grad_scale);
                grad::sgd(&mut p, &g.f32s(n), &mut b, hyper);
                param.write_f32(&p);
                buf.write_f32(&b);
            }
        }
        Ok(())
    }
}

/// out\[m,n\] = op(a) * op(b); see [`Op::Matmul`] for the layouts.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    a_t: bool,
    b_t: bool,
) -> Vec<f32> {
    let at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
    let bt = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f32;
            for p in 0..k {
                acc += at(i, p) * bt(p, j);
            }
            out[i * n + j] = acc;
        }
    }
    out
}

/// out\[m,n\] = x\[m,k\] * dequant(w)^T, one dequantised row of w at a time.
pub fn qmatmul(
    x: &[f32],
    w: &[u8],
    wtype: WeightType,
    factors: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let row_bytes = wtype.row_bytes(k)?;
    let per_row = k / wtype.block_elems();
    let mut row = vec![0.0f32; k];
    let mut out = vec![0.0f32; m * n];
    for j in 0..n {
        let row_factors = factors.map(|f| &f[j * per_row..(j + 1) * per_row]);
        let src = &w[j * row_bytes..(j + 1) * row_bytes];
        quant::dequantize_scaled(wtype, src, row_factors, &mut row)?;
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            out[i * n + j] = xi.iter().zip(&row).map(|(a, b)| a * b).sum();
        }
    }
    Ok(out)
}

/// [`qmatmul`] of x with a weight buffer and its optional factors.
fn product(
    x: &[f32],
    (w, factors): WeightRef<'_>,
    wtype: WeightType,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let factors = factors.map(|f| f.f32s(n * k / wtype.block_elems()));
    qmatmul(
        x,
        &w.bytes(wtype.row_bytes(k)? * n),
        wtype,
        factors.as_deref(),
        (m, k, n),
    )
}

/// Rows `ids` of a `vocab` x `dim` table, dequantised.
pub fn embed(
    table: &[u8],
    ids: &[u32],
    wtype: WeightType,
    vocab: u32,
    dim: usize,
) -> Result<Vec<f32>> {
    let row_bytes = wtype.row_bytes(dim)?;
    let mut out = vec![0.0f32; ids.len() * dim];
    for (t, &id) in ids.iter().enumerate() {
        if id >= vocab {
            return Err(Error::IndexOutOfRange {
                op: "embed",
                index: u64::from(id),
                bound: u64::from(vocab),
            });
        }
        let r = id as usize * row_bytes;
        quant::dequantize(
            wtype,
            &table[r..r + row_bytes],
            &mut out[t * dim..(t + 1) * dim],
        )?;
    }
    Ok(out)
}

/// A weight buffer and its optional scale factors, as the products take them.
pub(crate) type WeightRef<'b> = (&'b CpuBuffer, Option<&'b CpuBuffer>);

/// [`Op::QSwiGlu`], [`Op::NormMatvec`] and [`Op::NormQkv`]: their products, each through
/// `product` (the reference's, or the host path's threaded one), composed with the add,
/// norm and SwiGLU around them. Other ops are not composed products: `false`, nothing run.
pub(crate) fn composed_products(
    op: &Op<'_, CpuBuffer>,
    product: impl Fn(&[f32], WeightRef<'_>, WeightType, (usize, usize, usize)) -> Result<Vec<f32>>,
) -> Result<bool> {
    match *op {
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
            let (m, k, n) = (m as usize, k as usize, n as usize);
            let xs = x.f32s(m * k);
            let g = product(&xs, (gate, gate_factors), wtype, (m, k, n))?;
            let u = product(&xs, (up, up_factors), wtype, (m, k, n))?;
            out.write_f32(&swiglu(&g, &u));
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
            let x = add_norm((a, h), norm, sum, (1, k as usize), eps);
            let shape = (1, k as usize, n as usize);
            let y = product(&x, (w, factors), wtype, shape)?;
            out.write_f32(&match up {
                Some(up) => swiglu(&y, &product(&x, (up, up_factors), wtype, shape)?),
                None => y,
            });
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
            let x = add_norm((a, h), norm, Some(sum), (1, dim as usize), eps);
            for (w, factors, out, n) in [
                (wq, q_factors, q, n_q),
                (wk, k_factors, k, n_kv),
                (wv, v_factors, v, n_kv),
            ] {
                out.write_f32(&product(
                    &x,
                    (w, factors),
                    wtype,
                    (1, dim as usize, n as usize),
                )?);
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// s = a + h over `rows` rows of `dim`, stored to `sum` where given, and rmsnorm(s) *
/// weight returned: [`Op::AddRmsNorm`] and [`Op::NormMatvec`]'s input.
pub(crate) fn add_norm(
    (a, h): (&CpuBuffer, &CpuBuffer),
    weight: &CpuBuffer,
    sum: Option<&CpuBuffer>,
    (rows, dim): (usize, usize),
    eps: f32,
) -> Vec<f32> {
    let n = rows * dim;
    let s: Vec<f32> = a
        .f32s(n)
        .iter()
        .zip(&h.f32s(n))
        .map(|(x, y)| x + y)
        .collect();
    if let Some(sum) = sum {
        sum.write_f32(&s);
    }
    rmsnorm(&s, &weight.f32s(dim), dim, eps)
}

/// Row-wise RMSNorm over rows of `dim`.
pub fn rmsnorm(x: &[f32], weight: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / libm::sqrtf(ms + eps);
        out.extend(row.iter().zip(weight).map(|(v, w)| v * inv * w));
    }
    out
}

/// RoPE over x \[tokens, heads, head_dim\] with a [`super::rope_table`].
pub fn rope(
    x: &[f32],
    table: &[f32],
    shape: (usize, usize, usize),
    pos0: usize,
    style: RopeStyle,
) -> Vec<f32> {
    let (n_tokens, n_heads, hd) = shape;
    let half = hd / 2;
    let mut out = x.to_vec();
    for t in 0..n_tokens {
        let cs = &table[(pos0 + t) * hd..(pos0 + t + 1) * hd];
        for h in 0..n_heads {
            let base = (t * n_heads + h) * hd;
            for i in 0..half {
                let (c, s) = (cs[2 * i], cs[2 * i + 1]);
                let (i0, i1) = match style {
                    RopeStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                    RopeStyle::HalfSplit => (base + i, base + i + half),
                };
                let (x0, x1) = (x[i0], x[i1]);
                out[i0] = x0 * c - x1 * s;
                out[i1] = x0 * s + x1 * c;
            }
        }
    }
    out
}

/// Row-wise softmax, subtracting the row maximum first.
pub fn softmax(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|v| libm::expf(v - max)).collect();
        let sum: f32 = e.iter().sum();
        out.extend(e.iter().map(|v| v / sum));
    }
    out
}

/// x * sigmoid(x).
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

/// silu(gate) * up, elementwise.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect()
}

/// The shape of an attention call; see [`Op::Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub pos0: usize,
}

/// An attention op's operands read from its buffers (q, and the keys and values of the
/// positions it attends to), for the reference and the threaded path alike.
pub(crate) struct AttnCall<'a> {
    pub q: Vec<f32>,
    /// The caches, read in place by the host path (a copy per call would cost more than
    /// a decode step's attention); the values `kv` of each are in use.
    pub k: &'a CpuBuffer,
    pub v: &'a CpuBuffer,
    /// The f32 values of each cache the call attends to.
    pub kv: core::ops::Range<usize>,
    pub shape: AttnShape,
    pub scale: f32,
    pub out: &'a CpuBuffer,
    /// Where the call's rows of `out` begin (f32 values).
    pub out_at: usize,
}

impl<'a> AttnCall<'a> {
    /// The operands of `op` if it is an attention op (checked by the caller).
    pub(crate) fn read(op: &Op<'a, CpuBuffer>) -> Option<AttnCall<'a>> {
        let Op::Attention {
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
            scale,
        } = *op
        else {
            return None;
        };
        let shape = AttnShape {
            n_tokens: n_tokens as usize,
            n_heads: n_heads as usize,
            n_kv_heads: n_kv_heads as usize,
            head_dim: head_dim as usize,
            pos0: pos0 as usize,
        };
        let q_row = shape.n_heads * shape.head_dim;
        let kv_row = shape.n_kv_heads * shape.head_dim;
        let row0 = row0 as usize;
        let kv0 = row0 * kv_row;
        Some(AttnCall {
            q: q.f32s_at(row0 * q_row, shape.n_tokens * q_row),
            k,
            v,
            kv: kv0..kv0 + (shape.pos0 + shape.n_tokens) * kv_row,
            shape,
            scale,
            out,
            out_at: row0 * q_row,
        })
    }
}

/// Causal grouped-query attention over a KV cache.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32) -> Vec<f32> {
    let hd = s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let mut out = vec![0.0f32; s.n_tokens * s.n_heads * hd];
    for t in 0..s.n_tokens {
        let last = s.pos0 + t;
        for h in 0..s.n_heads {
            let kvh = h / group;
            let qv = &q[(t * s.n_heads + h) * hd..][..hd];
            let kv_at = |buf: &'_ [f32], p: usize| -> Vec<f32> {
                buf[(p * s.n_kv_heads + kvh) * hd..][..hd].to_vec()
            };
            let scores: Vec<f32> = (0..=last)
                .map(|p| scale * qv.iter().zip(kv_at(k, p)).map(|(a, b)| a * b).sum::<f32>())
                .collect();
            let probs = softmax(&scores, scores.len());
            let o = &mut out[(t * s.n_heads + h) * hd..][..hd];
            for (p, w) in probs.iter().enumerate() {
                for (oi, vi) in o.iter_mut().zip(kv_at(v, p)) {
                    *oi += w * vi;
                }
            }
        }
    }
    out
}

/// z for elements start..start+n of one tensor.
pub fn perturb_z(addr: ZAddr, start: u64, n: usize, kind: ZKind) -> Vec<f32> {
    (0..n as u64).map(|i| addr.z(start + i, kind)).collect()
}

/// The address of tensor `tensor`'s perturbation for `seed` (the z of [`Op::ZoWeights`] and
/// [`Op::ZoAccumulate`]).
pub(crate) fn perturb_addr(session_key: u64, seed: u32, tensor: u32) -> ZAddr {
    ZAddr {
        session_key,
        seed,
        tensor,
        purpose: rng::PURPOSE_PERTURB,
    }
}

/// Elements `range` of [`Op::ZoWeights`]' output: each element's value at `step` plus eps z.
/// Every element depends on its own index only, so any split of the range gives the same bits.
pub(crate) fn zo_weights_range(
    base: &[f32],
    acc: &[i32],
    range: core::ops::Range<usize>,
    (step, eps): (f32, f32),
    addr: &ZAddr,
    kind: ZKind,
) -> Vec<f32> {
    range
        .map(|i| crate::train::value(base[i], acc[i], step) + eps * addr.z(i as u64, kind))
        .collect()
}

/// [`Op::ZoAccumulate`] on the accumulators `d` of elements `start..start + d.len()`:
/// integer and per element, so any split of the elements gives the same bits.
pub(crate) fn zo_accumulate_range(
    d: &mut [i32],
    start: usize,
    pairs: &[i32],
    (session_key, tensor): (u64, u32),
    kind: ZKind,
) {
    for pair in pairs.chunks_exact(2) {
        let addr = perturb_addr(session_key, pair[0] as u32, tensor);
        for (e, v) in d.iter_mut().enumerate() {
            *v = v.wrapping_add(pair[1].wrapping_mul(addr.z4((start + e) as u64, kind)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights inside the image are borrowed, copied when written, and give the same logits
    /// as copied ones; bytes outside it are copied.
    #[test]
    fn in_place_weights_are_borrowed_and_compute_as_copies() {
        static IMAGE: &[u8] = include_bytes!("../../../tests/golden/tiny/llama_gqa_tied/q8_0.gguf");
        let flash = CpuInPlace { image: IMAGE };
        let w = flash
            .upload_weights(WeightType::Q8_0, &IMAGE[64..64 + 136], 128, "w")
            .unwrap();
        assert!(w.in_place());
        let elsewhere = IMAGE[64..64 + 136].to_vec();
        assert!(
            !flash
                .upload_weights(WeightType::Q8_0, &elsewhere, 128, "w")
                .unwrap()
                .in_place()
        );
        // An odd length cannot be a whole buffer: copied.
        assert!(
            !flash
                .upload_weights(WeightType::Q8_0, &IMAGE[64..64 + 135], 128, "w")
                .unwrap()
                .in_place()
        );
        w.write_f32(&[1.5]);
        assert!(!w.in_place());
        assert_eq!(flash.read_f32(&w, 1).unwrap(), [1.5]);

        let gguf = crate::format::gguf::Gguf::parse(IMAGE).unwrap();
        fn logits<B: Backend>(m: &crate::model::Model<'_, B>) -> Vec<f32> {
            let mut cache = m.new_cache(8).unwrap();
            m.forward(&mut cache, &[1, 5, 9, 13], true).unwrap()
        }
        let copied = crate::model::Model::from_gguf(&Cpu, &gguf, IMAGE, "image").unwrap();
        let placed = crate::model::Model::from_gguf(&flash, &gguf, IMAGE, "image").unwrap();
        assert_eq!(logits(&copied), logits(&placed));
    }

    #[test]
    fn matmul_transposes_agree() {
        // a: 2x3, b: 3x2.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let want = [58.0, 64.0, 139.0, 154.0];
        assert_eq!(matmul(&a, &b, 2, 3, 2, false, false), want);
        let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let bt = [7.0, 9.0, 11.0, 8.0, 10.0, 12.0];
        assert_eq!(matmul(&at, &b, 2, 3, 2, true, false), want);
        assert_eq!(matmul(&a, &bt, 2, 3, 2, false, true), want);
        assert_eq!(matmul(&at, &bt, 2, 3, 2, true, true), want);
    }

    #[test]
    fn run_rejects_short_buffers_and_bad_ids() {
        let cpu = Cpu;
        let a = cpu.upload_f32(&[1.0; 6], "a").unwrap();
        let small = cpu.alloc(4, "out").unwrap();
        let err = cpu
            .run(&Op::Matmul {
                a: &a,
                b: &a,
                out: &small,
                m: 2,
                k: 3,
                n: 2,
                a_t: false,
                b_t: false,
            })
            .unwrap_err();
        assert!(matches!(
            err,
            Error::BufferTooSmall {
                buffer: "out",
                needed: 16,
                actual: 4,
                ..
            }
        ));

        let table = cpu.upload_f32(&[0.5; 8], "table").unwrap();
        let ids = cpu.upload(&7u32.to_le_bytes(), "ids").unwrap();
        let out = cpu.alloc(16, "out").unwrap();
        let err = cpu
            .run(&Op::Embed {
                table: &table,
                ids: &ids,
                out: &out,
                wtype: WeightType::F32,
                vocab: 2,
                dim: 4,
                n_ids: 1,
            })
            .unwrap_err();
        assert_eq!(
            err,
            Error::IndexOutOfRange {
                op: "embed",
                index: 7,
                bound: 2
            }
        );
    }

    #[test]
    fn norm_qkv_rope_checks_its_heads_and_both_parts_under_its_name() {
        let cpu = Cpu;
        let x = cpu.upload_f32(&[0.5; 32], "x").unwrap();
        let w = cpu.upload_f32(&[0.25; 32 * 16], "w").unwrap();
        let angles = super::super::rope_table(10000.0, 8, 3, &super::super::RopeScaling::None);
        let table = cpu.upload_f32(&angles, "table").unwrap();
        let out = cpu.alloc(16 * 4, "out").unwrap();
        let sum = cpu.alloc(32 * 4, "sum").unwrap();
        let cache = cpu.alloc(3 * 8 * 4, "cache").unwrap();
        let op = |n_kv: u32, head_dim: u32, pos: u32| Op::NormQkvRope {
            a: &x,
            h: &x,
            norm: &x,
            sum: &sum,
            wq: &w,
            wk: &w,
            wv: &w,
            q: &out,
            k: &out,
            v: &out,
            table: &table,
            q_out: &out,
            k_cache: &cache,
            v_cache: &cache,
            q_factors: None,
            k_factors: None,
            v_factors: None,
            wtype: WeightType::F32,
            dim: 32,
            n_q: 16,
            n_kv,
            eps: 1e-5,
            head_dim,
            pos,
            style: RopeStyle::Interleaved,
        };
        cpu.run(&op(8, 8, 2)).unwrap();
        for (n_kv, head_dim) in [(6, 8), (8, 0)] {
            let err = cpu.run(&op(n_kv, head_dim, 0)).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidShape {
                        op: "norm_qkv_rope",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        // Position 3 needs a fourth cache row: RopeKv's check, named so.
        let err = cpu.run(&op(8, 8, 3)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::BufferTooSmall {
                    op: "norm_qkv_rope",
                    buffer: "k_cache",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn attention_single_key_returns_its_value() {
        let s = AttnShape {
            n_tokens: 1,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            pos0: 0,
        };
        let out = attention(&[1.0, 0.0, 0.0, 1.0], &[3.0, 4.0], &[5.0, 6.0], s, 1.0);
        assert_eq!(out, vec![5.0, 6.0, 5.0, 6.0]);
    }
}
