//! The CPU reference of the backward and optimiser kernels ([`super::Op::QMatmulT`] to
//! [`super::Op::Sgd`]): plain no_std Rust like [`super::cpu`], checked against finite differences
//! and PyTorch (tests/tests/backprop.rs); every other backend is tested against it.

use super::cpu::{AttnShape, silu, softmax};
use super::{AdamHyper, NO_TARGET};
use crate::error::Result;
use crate::quant::{self, WeightType};
use std::prelude::v1::*;

/// dx\[m,k\] = dy\[m,n\] * dequant(w)\[n,k\], one dequantised row of w at a time.
pub fn qmatmul_t(
    dy: &[f32],
    w: &[u8],
    wtype: WeightType,
    factors: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let row_bytes = wtype.row_bytes(k)?;
    let per_row = k / wtype.block_elems();
    let mut row = vec![0.0f32; k];
    let mut dx = vec![0.0f32; m * k];
    for j in 0..n {
        let row_factors = factors.map(|f| &f[j * per_row..(j + 1) * per_row]);
        quant::dequantize_scaled(
            wtype,
            &w[j * row_bytes..][..row_bytes],
            row_factors,
            &mut row,
        )?;
        for i in 0..m {
            let g = dy[i * n + j];
            for (d, r) in dx[i * k..(i + 1) * k].iter_mut().zip(&row) {
                *d += g * r;
            }
        }
    }
    Ok(dx)
}

/// The input gradient of RMSNorm over rows of `dim` (see [`super::Op::RmsNormGrad`]).
pub fn rmsnorm_grad(x: &[f32], weight: &[f32], dy: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    let mut dx = Vec::with_capacity(x.len());
    for (row, g) in x.chunks_exact(dim).zip(dy.chunks_exact(dim)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let r = 1.0 / libm::sqrtf(ms + eps);
        let dot: f32 = row
            .iter()
            .zip(g)
            .zip(weight)
            .map(|((x, g), w)| w * g * x)
            .sum::<f32>()
            / dim as f32;
        let c = r * r * r * dot;
        dx.extend(
            row.iter()
                .zip(g)
                .zip(weight)
                .map(|((x, g), w)| r * w * g - x * c),
        );
    }
    dx
}

/// The gradients of causal grouped-query attention over a sequence attending to itself
/// (pos0 = 0): (dq, dk, dv, stats) for [`super::Op::AttentionGrad`].
pub fn attention_grad(
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &[f32],
    dout: &[f32],
    s: AttnShape,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let qi = |t: usize, h: usize| (t * s.n_heads + h) * hd;
    let kvi = |p: usize, h: usize| (p * s.n_kv_heads + h / group) * hd;
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let mut stats = vec![0.0f32; s.n_tokens * s.n_heads * 2];
    for t in 0..s.n_tokens {
        for h in 0..s.n_heads {
            let qv = &q[qi(t, h)..][..hd];
            let go = &dout[qi(t, h)..][..hd];
            let scores: Vec<f32> = (0..=t)
                .map(|p| scale * dot(qv, &k[kvi(p, h)..][..hd]))
                .collect();
            let probs = softmax(&scores, scores.len());
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scores.iter().map(|&x| libm::expf(x - max)).sum();
            let delta = dot(go, &out[qi(t, h)..][..hd]);
            stats[(t * s.n_heads + h) * 2] = max + libm::logf(sum);
            stats[(t * s.n_heads + h) * 2 + 1] = delta;
            for (p, &pr) in probs.iter().enumerate() {
                let kp = kvi(p, h);
                let ds = pr * (dot(go, &v[kp..][..hd]) - delta) * scale;
                for e in 0..hd {
                    dq[qi(t, h) + e] += ds * k[kp + e];
                    dk[kp + e] += ds * qv[e];
                    dv[kp + e] += pr * go[e];
                }
            }
        }
    }
    (dq, dk, dv, stats)
}

/// (dgate, dup) of out = silu(gate) * up.
pub fn swiglu_grad(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dgate = Vec::with_capacity(gate.len());
    let mut dup = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dy) {
        let sig = 1.0 / (1.0 + libm::expf(-g));
        dgate.push(d * u * sig * (1.0 + g * (1.0 - sig)));
        dup.push(d * silu(g));
    }
    (dgate, dup)
}

/// (loss per row, dlogits) of [`super::Op::CrossEntropy`], the sums in f64.
pub fn cross_entropy(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut loss = Vec::with_capacity(targets.len());
    let mut d = vec![0.0f32; logits.len()];
    for ((row, &target), drow) in logits
        .chunks_exact(vocab)
        .zip(targets)
        .zip(d.chunks_exact_mut(vocab))
    {
        if target == NO_TARGET || target as usize >= vocab {
            loss.push(0.0);
            continue;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&x| libm::exp(f64::from(x - max))).sum();
        let lse = f64::from(max) + libm::log(sum);
        loss.push((lse - f64::from(row[target as usize])) as f32);
        for (i, (dv, &x)) in drow.iter_mut().zip(row).enumerate() {
            let p = libm::exp(f64::from(x) - lse);
            let one = if i == target as usize { 1.0 } else { 0.0 };
            *dv = (f64::from(scale) * (p - one)) as f32;
        }
    }
    (loss, d)
}

/// out\[c\] = sum over rows of a\[r,c\] b\[r,c\].
pub fn col_dot(a: &[f32], b: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; cols];
    for (ra, rb) in a.chunks_exact(cols).zip(b.chunks_exact(cols)) {
        for ((o, x), y) in out.iter_mut().zip(ra).zip(rb) {
            *o += x * y;
        }
    }
    out
}

/// One AdamW step over (param, m, v) in place, in PyTorch's order of operations.
pub fn adamw(p: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: AdamHyper) {
    let decay = 1.0 - h.lr * h.weight_decay;
    let step = h.lr / h.bias1;
    for i in 0..p.len() {
        let g = grad[i] * h.grad_scale;
        p[i] *= decay;
        m[i] += (1.0 - h.beta1) * (g - m[i]);
        v[i] = v[i] * h.beta2 + (1.0 - h.beta2) * g * g;
        let denom = libm::sqrtf(v[i]) / h.bias2_sqrt + h.eps;
        p[i] -= step * (m[i] / denom);
    }
}

/// One SGD-with-momentum step over (param, buf) in place; `hyper` is (lr, momentum,
/// weight decay, gradient scale).
pub fn sgd(p: &mut [f32], grad: &[f32], buf: &mut [f32], hyper: (f32, f32, f32, f32)) {
    let (lr, momentum, wd, gs) = hyper;
    for i in 0..p.len() {
        let g = grad[i] * gs + wd * p[i];
        buf[i] = momentum * buf[i] + g;
        p[i] -= lr * buf[i];
    }
}

#[cfg(test)]
mod tests {
    //! Each gradient against central finite differences of its forward reference, on
    //! L = sum(r * forward(x)) for a fixed random r.
    use super::*;
    use crate::backend::cpu;
    use crate::backend::cpu::AttnShape;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn weighted(r: &[f32], y: &[f32]) -> f64 {
        r.iter()
            .zip(y)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    }

    /// Checks `grad` against central differences of `loss` at every element of `x`.
    fn check(what: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64) {
        let h = 1e-2f32;
        let mut worst = 0.0f64;
        for i in 0..x.len() {
            let (mut hi, mut lo) = (x.to_vec(), x.to_vec());
            hi[i] += h;
            lo[i] -= h;
            let fd = (loss(&hi) - loss(&lo)) / f64::from(2.0 * h);
            let err = (fd - f64::from(grad[i])).abs() / (1e-2 + fd.abs());
            worst = worst.max(err);
        }
        assert!(worst < 2e-2, "{what}: worst relative error {worst}");
    }

    #[test]
    fn qmatmul_t_is_the_products_input_gradient() {
        let (m, k, n) = (3, 64, 5);
        let w = values(n * k, 1);
        let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (x, r) = (values(m * k, 2), values(m * n, 3));
        let forward = |x: &[f32]| {
            let y = cpu::qmatmul(x, &wb, WeightType::F32, None, (m, k, n)).unwrap();
            weighted(&r, &y)
        };
        let g = qmatmul_t(&r, &wb, WeightType::F32, None, (m, k, n)).unwrap();
        check("qmatmul_t", &x, &g, forward);
    }

    #[test]
    fn rmsnorm_grad_matches_differences() {
        let dim = 12;
        let (x, w, r) = (values(2 * dim, 4), values(dim, 5), values(2 * dim, 6));
        let g = rmsnorm_grad(&x, &w, &r, dim, 1e-5);
        check("rmsnorm", &x, &g, |x| {
            weighted(&r, &cpu::rmsnorm(x, &w, dim, 1e-5))
        });
    }

    #[test]
    fn swiglu_grad_matches_differences() {
        let (g, u, r) = (values(9, 7), values(9, 8), values(9, 9));
        let gate: Vec<f32> = g.iter().map(|v| 4.0 * v).collect();
        let (dg, du) = swiglu_grad(&gate, &u, &r);
        let f = |g: &[f32], u: &[f32]| -> f64 {
            let y: Vec<f32> = g.iter().zip(u).map(|(&a, &b)| silu(a) * b).collect();
            weighted(&r, &y)
        };
        check("dgate", &gate, &dg, |g| f(g, &u));
        check("dup", &u, &du, |u| f(&gate, u));
    }

    #[test]
    fn attention_grad_matches_differences() {
        let s = AttnShape {
            n_tokens: 4,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 6,
            pos0: 0,
        };
        let (qn, kvn) = (4 * 4 * 6, 4 * 2 * 6);
        let (q, k, v, r) = (
            values(qn, 10),
            values(kvn, 11),
            values(kvn, 12),
            values(qn, 13),
        );
        let scale = 0.7;
        let out = cpu::attention(&q, &k, &v, s, scale);
        let (dq, dk, dv, stats) = attention_grad((&q, &k, &v), &out, &r, s, scale);
        let f = |q: &[f32], k: &[f32], v: &[f32]| weighted(&r, &cpu::attention(q, k, v, s, scale));
        check("dq", &q, &dq, |q| f(q, &k, &v));
        check("dk", &k, &dk, |k| f(&q, k, &v));
        check("dv", &v, &dv, |v| f(&q, &k, v));
        // The first token attends to itself alone: log-sum-exp is its one score.
        let s00 = scale * (0..6).map(|e| q[e] * k[e]).sum::<f32>();
        assert!((stats[0] - s00).abs() < 1e-6);
    }

    #[test]
    fn cross_entropy_gradient_matches_differences_and_masks() {
        let vocab = 11;
        let logits: Vec<f32> = values(3 * vocab, 14).iter().map(|v| 3.0 * v).collect();
        let targets = [4u32, NO_TARGET, 10];
        let (loss, d) = cross_entropy(&logits, &targets, vocab, 0.5);
        assert_eq!(loss[1], 0.0);
        assert!(d[vocab..2 * vocab].iter().all(|&v| v == 0.0));
        check("dlogits", &logits, &d, |x| {
            let (l, _) = cross_entropy(x, &targets, vocab, 0.5);
            0.5 * l.iter().map(|&v| f64::from(v)).sum::<f64>()
        });
    }

    #[test]
    fn col_dot_sums_rows() {
        let out = col_dot(&[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], 2);
        assert_eq!(out, vec![1.0 * 5.0 + 3.0 * 7.0, 2.0 * 6.0 + 4.0 * 8.0]);
    }
}
