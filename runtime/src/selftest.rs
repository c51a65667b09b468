//! The device conformance suite: every kernel on a device against the CPU reference, at
//! several shapes, with a stated tolerance per kernel (bit-exact where the operation is
//! exact), and the device's throughput. `edgetune selftest` prints it; the GPU tests and a
//! device farm run it.
//!
//! With the CPU backend as the device the comparison is with itself, so those rows check
//! the harness and time the reference; the reference itself is checked against
//! independent implementations by the golden-file tests.

use crate::backend::cpu::{self, Cpu};
use crate::backend::{Backend, Op, RopeScaling, RopeStyle, rope_table};
use crate::error::{Error, Result};
use crate::quant::{self, WeightType};
use crate::rng::{ZKind, philox4x32_10};
use half::{bf16, f16};
use std::prelude::v1::*;
use std::time::Instant;

/// How close the device must be to the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    /// Every output bit equal.
    Exact,
    /// |device - reference| <= atol + rtol * |reference| for every element.
    Close { atol: f64, rtol: f64 },
}

/// What the throughput figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    GflopPerS,
    GbPerS,
}

impl Tolerance {
    /// "exact", or "atol+rtol|r|".
    pub fn text(self) -> String {
        match self {
            Tolerance::Exact => "exact".into(),
            Tolerance::Close { atol, rtol } => format!("{atol:.0e}+{rtol:.0e}|r|"),
        }
    }
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::GflopPerS => "GFLOP/s",
            Unit::GbPerS => "GB/s",
        }
    }
}

/// One row of the suite's report.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub kernel: &'static str,
    pub shape: String,
    pub tolerance: Tolerance,
    pub max_abs: f64,
    pub max_rel: f64,
    pub pass: bool,
    pub throughput: f64,
    pub unit: Unit,
    /// Set when the check could not run (the error, as text).
    pub error: Option<String>,
}

impl CheckRow {
    /// The row as one JSON object (non-finite figures as null).
    pub fn to_json(&self) -> serde_json::Value {
        let finite = |v: f64| v.is_finite().then_some(v);
        serde_json::json!({
            "kernel": self.kernel,
            "shape": self.shape,
            "max_abs": finite(self.max_abs),
            "max_rel": finite(self.max_rel),
            "tolerance": self.tolerance.text(),
            "pass": self.pass,
            "throughput": finite(self.throughput),
            "unit": self.unit.label(),
            "error": self.error,
        })
    }
}

/// A buffer of a case: data to upload, or zeros for an output.
#[derive(Debug, Clone)]
enum Init {
    Data(Vec<u8>),
    /// Weights in GGUF layout, uploaded with [`Backend::upload_weights`].
    Weights(WeightType, u32, Vec<u8>),
    Zeros(u64),
}

/// One kernel call at one shape. Buffers in `op` are indices into `bufs`.
#[derive(Debug)]
pub struct Case {
    kernel: &'static str,
    shape: String,
    bufs: Vec<Init>,
    op: Op<'static, usize>,
    out: usize,
    out_elems: usize,
    tolerance: Tolerance,
    /// Work per call in the unit's numerator (flops, or bytes moved).
    work: f64,
    unit: Unit,
}

impl Case {
    pub fn kernel(&self) -> &'static str {
        self.kernel
    }

    pub fn shape(&self) -> &str {
        &self.shape
    }
}

static IDX: [usize; 14] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13];

/// An [`Op::NormQkv`] case of `ty` weights `dim` wide, n_q and n_kv rows, optionally with
/// factors (q's, k's and v's, each optional), comparing buffer `out`: 3 the sum, 7-9 q, k,
/// v.
fn norm_qkv_case(
    d: &mut Data,
    ty: WeightType,
    (dim, n_q, n_kv): (usize, usize, usize),
    factors: Option<[Option<Vec<f32>>; 3]>,
    out: usize,
) -> Case {
    let mut bufs = vec![
        Init::Data(f32_bytes(&d.f32s(dim))),
        Init::Data(f32_bytes(&d.f32s(dim))),
        Init::Data(f32_bytes(&d.f32s(dim))),
        Init::Zeros((dim * 4) as u64),
        Init::Weights(ty, dim as u32, d.weights(ty, n_q, dim, false)),
        Init::Weights(ty, dim as u32, d.weights(ty, n_kv, dim, false)),
        Init::Weights(ty, dim as u32, d.weights(ty, n_kv, dim, false)),
        Init::Zeros((n_q * 4) as u64),
        Init::Zeros((n_kv * 4) as u64),
        Init::Zeros((n_kv * 4) as u64),
    ];
    // Factors, where given, in buffers 10-12 (absent ones taking no index).
    let mut slots = [None; 3];
    let mut with = String::new();
    for (i, f) in factors.into_iter().flatten().enumerate() {
        if let Some(f) = f {
            slots[i] = Some(&IDX[bufs.len()]);
            bufs.push(Init::Data(f32_bytes(&f)));
            with.push_str([" q", " k", " v"][i]);
        }
    }
    let wbytes = ty.row_bytes(dim).unwrap_or(0) * (n_q + 2 * n_kv);
    Case {
        kernel: "norm_qkv",
        shape: format!(
            "{} {dim}x{n_q}+{n_kv}x2 {}{}",
            ty.name(),
            ["sum", "", "", "", "q", "k", "v"][out - 3],
            if with.is_empty() {
                String::new()
            } else {
                format!(" scale factors on{with}")
            }
        ),
        bufs,
        op: Op::NormQkv {
            a: &IDX[0],
            h: &IDX[1],
            norm: &IDX[2],
            sum: &IDX[3],
            wq: &IDX[4],
            wk: &IDX[5],
            wv: &IDX[6],
            q: &IDX[7],
            k: &IDX[8],
            v: &IDX[9],
            q_factors: slots[0],
            k_factors: slots[1],
            v_factors: slots[2],
            wtype: ty,
            dim: dim as u32,
            n_q: n_q as u32,
            n_kv: n_kv as u32,
            eps: 1e-5,
        },
        out,
        out_elems: match out {
            3 => dim,
            7 => n_q,
            _ => n_kv,
        },
        tolerance: match out {
            // One f32 addition, the same everywhere.
            3 => Tolerance::Exact,
            _ => close(2e-6 * dim as f64, 1e-4),
        },
        work: wbytes as f64,
        unit: Unit::GbPerS,
    }
}

/// An [`Op::NormQkvRope`] case: [`norm_qkv_case`]'s inputs (in buffers 0-9, without
/// factors) in heads of `head_dim`, the token at position `pos` of caches of pos + 2 rows
/// that hold data (so the rows the call must leave are compared too), comparing buffer
/// `out`: 11 q_out, 12 the k cache, 13 the v cache.
fn norm_qkv_rope_case(
    d: &mut Data,
    ty: WeightType,
    (dim, n_q, n_kv): (usize, usize, usize),
    (head_dim, pos, style): (u32, u32, RopeStyle),
    out: usize,
) -> Case {
    let mut case = norm_qkv_case(d, ty, (dim, n_q, n_kv), None, 7);
    let cache = (pos as usize + 2) * n_kv;
    case.bufs.extend([
        Init::Data(f32_bytes(&rope_table(
            10000.0,
            head_dim,
            pos + 1,
            &RopeScaling::None,
        ))),
        Init::Data(f32_bytes(&d.f32s(n_q))),
        Init::Data(f32_bytes(&d.f32s(cache))),
        Init::Data(f32_bytes(&d.f32s(cache))),
    ]);
    case.kernel = "norm_qkv_rope";
    let what = ["q_out", "k_cache", "v_cache"][out - 11];
    case.shape = format!(
        "{} {dim}x{n_q}+{n_kv}x2 d={head_dim} pos={pos} {style:?} {what}",
        ty.name()
    );
    case.op = Op::NormQkvRope {
        a: &IDX[0],
        h: &IDX[1],
        norm: &IDX[2],
        sum: &IDX[3],
        wq: &IDX[4],
        wk: &IDX[5],
        wv: &IDX[6],
        q: &IDX[7],
        k: &IDX[8],
        v: &IDX[9],
        table: &IDX[10],
        q_out: &IDX[11],
        k_cache: &IDX[12],
        v_cache: &IDX[13],
        q_factors: None,
        k_factors: None,
        v_factors: None,
        wtype: ty,
        dim: dim as u32,
        n_q: n_q as u32,
        n_kv: n_kv as u32,
        eps: 1e-5,
        head_dim,
        pos,
        style,
    };
    case.out = out;
    case.out_elems = if out == 11 { n_q } else { cache };
    case
}

/// Deterministic test data from Philox (so every run and every machine sees the same inputs).
#[derive(Debug)]
struct Data {
    key: [u32; 2],
    ctr: u32,
}

impl Data {
    fn words(&mut self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n + 3);
        while out.len() < n {
            out.extend_from_slice(&philox4x32_10([self.ctr, 0xDA7A, 0, 0], self.key));
            self.ctr = self.ctr.wrapping_add(1);
        }
        out.truncate(n);
        out
    }

    /// Uniform in [-1, 1).
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.words(n)
            .into_iter()
            .map(|w| (w >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
            .collect()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        self.words(n.div_ceil(4))
            .into_iter()
            .flat_map(u32::to_le_bytes)
            .take(n)
            .collect()
    }

    /// A small positive scale as f16 bits, in [2^-10, 2^-4).
    fn scale(&mut self) -> [u8; 2] {
        let w = self.words(1)[0];
        let v =
            (1.0 + (w & 0xFFFF) as f32 / 65536.0) * libm::exp2f(-(((w >> 16) % 6) as f32) - 5.0);
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    /// `rows` x `cols` weights stored as `ty`: random payload and sane scales. With
    /// `all_bits`, half types take every finite bit pattern (subnormals included), which
    /// tests decoding; without, values in \[-1, 1\], which keeps products finite.
    fn weights(&mut self, ty: WeightType, rows: usize, cols: usize, all_bits: bool) -> Vec<u8> {
        let n = rows * cols;
        match ty {
            WeightType::F32 => self
                .f32s(n)
                .into_iter()
                .flat_map(f32::to_le_bytes)
                .collect(),
            WeightType::F16 if !all_bits => self
                .f32s(n)
                .into_iter()
                .flat_map(|v| f16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            WeightType::BF16 if !all_bits => self
                .f32s(n)
                .into_iter()
                .flat_map(|v| bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            WeightType::F16 | WeightType::BF16 => self
                .words(n)
                .into_iter()
                .flat_map(|w| {
                    let mut h = (w & 0xFFFF) as u16;
                    // Keep the value finite: clear one exponent bit when all are set.
                    let exp_mask = if ty == WeightType::F16 {
                        0x7C00
                    } else {
                        0x7F80
                    };
                    if h & exp_mask == exp_mask {
                        h &= !0x0400;
                        if ty == WeightType::BF16 {
                            h &= !0x0080;
                        }
                    }
                    debug_assert!(if ty == WeightType::F16 {
                        f16::from_bits(h).is_finite()
                    } else {
                        bf16::from_bits(h).is_finite()
                    });
                    h.to_le_bytes()
                })
                .collect(),
            _ => {
                let bb = ty.block_bytes();
                let blocks = n / ty.block_elems();
                let mut b = self.bytes(blocks * bb);
                for blk in b.chunks_exact_mut(bb) {
                    let d = self.scale();
                    let m = self.scale();
                    match ty {
                        WeightType::Q6K => blk[208..210].copy_from_slice(&d),
                        WeightType::Q4_1 | WeightType::Q4K => {
                            blk[0..2].copy_from_slice(&d);
                            blk[2..4].copy_from_slice(&m);
                        }
                        _ => blk[0..2].copy_from_slice(&d),
                    }
                }
                b
            }
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn close(atol: f64, rtol: f64) -> Tolerance {
    Tolerance::Close { atol, rtol }
}

/// x of the [`Op::QSwiGlu`] cases, scaled down: the product of the gate's and up's sums
/// carries each one's rounding times the other, so both are kept near 1.
fn small(x: Vec<f32>) -> Vec<f32> {
    x.into_iter().map(|v| v / 16.0).collect()
}

/// [`Op::QSwiGlu`]'s tolerance for rows of k elements: that of a product times the other
/// sum (near 1 with [`small`] x; the K-quants, with larger scales, need more).
fn swiglu_tolerance(k: usize) -> Tolerance {
    close(3.2e-5 * k as f64, 1e-3)
}

/// Every case of the suite, in report order.
pub fn cases() -> Vec<Case> {
    let mut d = Data {
        key: [0x5EED, 0xED6E],
        ctr: 0,
    };
    let mut cases = Vec::new();

    // f32 matmul: every transpose form, edges, and the register-blocked fast path.
    let shapes: [(u32, u32, u32, bool, bool); 11] = [
        (1, 1, 1, false, false),
        (7, 13, 5, false, false),
        (7, 13, 5, true, false),
        (7, 13, 5, false, true),
        (7, 13, 5, true, true),
        (33, 64, 40, false, false),
        (64, 96, 128, false, true),
        (96, 64, 80, true, false),
        (16, 32, 48, true, true),
        (40, 36, 24, false, true),
        (256, 256, 256, false, false),
    ];
    for (m, k, n, a_t, b_t) in shapes {
        let (mu, ku, nu) = (m as usize, k as usize, n as usize);
        cases.push(Case {
            kernel: "matmul",
            shape: format!(
                "{m}x{k}x{n}{}{}",
                if a_t { " aT" } else { "" },
                if b_t { " bT" } else { "" }
            ),
            bufs: vec![
                Init::Data(f32_bytes(&d.f32s(mu * ku))),
                Init::Data(f32_bytes(&d.f32s(ku * nu))),
                Init::Zeros((mu * nu * 4) as u64),
            ],
            op: Op::Matmul {
                a: &IDX[0],
                b: &IDX[1],
                out: &IDX[2],
                m,
                k,
                n,
                a_t,
                b_t,
            },
            out: 2,
            out_elems: mu * nu,
            tolerance: close(2e-6 * f64::from(k), 1e-4),
            work: 2.0 * f64::from(m) * f64::from(k) * f64::from(n),
            unit: Unit::GflopPerS,
        });
    }

    for ty in WeightType::ALL {
        let k_small = if ty.block_elems() == 256 {
            512
        } else if ty.block_elems() == 32 {
            96
        } else {
            77
        };
        // Dequantisation is bit-exact.
        let n_deq = 4 * k_small;
        cases.push(Case {
            kernel: "dequant",
            shape: format!("{} n={n_deq}", ty.name()),
            bufs: vec![
                Init::Weights(ty, k_small as u32, d.weights(ty, 4, k_small, true)),
                Init::Zeros((n_deq * 4) as u64),
            ],
            op: Op::Dequant {
                w: &IDX[0],
                factors: None,
                out: &IDX[1],
                wtype: ty,
                rows: 4,
                cols: k_small as u32,
            },
            out: 1,
            out_elems: n_deq,
            tolerance: Tolerance::Exact,
            work: (ty.row_bytes(n_deq).unwrap_or(0) + 4 * n_deq) as f64,
            unit: Unit::GbPerS,
        });
        // Embedding gather is a dequantisation too: bit-exact.
        let (vocab, n_ids) = (50usize, 9usize);
        let ids: Vec<u8> = d
            .words(n_ids)
            .into_iter()
            .flat_map(|w| (w % vocab as u32).to_le_bytes())
            .collect();
        cases.push(Case {
            kernel: "embed",
            shape: format!("{} vocab={vocab} dim={k_small} ids={n_ids}", ty.name()),
            bufs: vec![
                Init::Weights(ty, k_small as u32, d.weights(ty, vocab, k_small, true)),
                Init::Data(ids),
                Init::Zeros((n_ids * k_small * 4) as u64),
            ],
            op: Op::Embed {
                table: &IDX[0],
                ids: &IDX[1],
                out: &IDX[2],
                wtype: ty,
                vocab: vocab as u32,
                dim: k_small as u32,
                n_ids: n_ids as u32,
            },
            out: 2,
            out_elems: n_ids * k_small,
            tolerance: Tolerance::Exact,
            work: (n_ids * (ty.row_bytes(k_small).unwrap_or(0) + 4 * k_small)) as f64,
            unit: Unit::GbPerS,
        });
        // Products: one token (matvec) and a batch, with an odd row count.
        let k_big = if ty.block_elems() == 256 { 1536 } else { 576 };
        for (m, k, n) in [
            (1usize, k_small, 67usize),
            (5, k_small, 67),
            (1, k_big, 1536),
            // Takes the eight-rows-per-invocation matvec path, with a ragged end.
            (1, k_small, 16_389),
            // A multiple of 4 rows but not of 8, nor of the split layout's row groups:
            // four-row subgroup kernels end on a partial group, eight-row ones take one
            // row per invocation there (as every subgroup shape does for 67 and 16_389).
            (1, k_small, 1_028),
            // Rows longer than the subgroup products' uniform copy of x holds
            // (backend::wgpu's X_UNIFORM_BYTES): they read x from its storage binding.
            (1, 4_352, 67),
            // Enough tokens for the prompt paths (dequantise to f32 scratch and use the f32
            // matmul, or `qmatmul_sg8`), and more weight rows than one workgroup of
            // `qmatmul_sg8` takes, neither count a multiple of its tiles.
            (20, k_big, 64),
            (41, k_big, 600),
        ] {
            let wbytes = ty.row_bytes(k).unwrap_or(0) * n;
            cases.push(Case {
                kernel: if m == 1 { "qmatvec" } else { "qmatmul" },
                shape: format!("{} {m}x{k}x{n}", ty.name()),
                bufs: vec![
                    Init::Data(f32_bytes(&d.f32s(m * k))),
                    Init::Weights(ty, k as u32, d.weights(ty, n, k, false)),
                    Init::Zeros((m * n * 4) as u64),
                ],
                op: Op::QMatmul {
                    x: &IDX[0],
                    w: &IDX[1],
                    factors: None,
                    out: &IDX[2],
                    wtype: ty,
                    m: m as u32,
                    k: k as u32,
                    n: n as u32,
                },
                out: 2,
                out_elems: m * n,
                tolerance: close(2e-6 * k as f64, 1e-4),
                work: if m == 1 {
                    wbytes as f64
                } else {
                    2.0 * (m * k * n) as f64
                },
                unit: if m == 1 {
                    Unit::GbPerS
                } else {
                    Unit::GflopPerS
                },
            });
        }
        // The feed-forward's gate and up products with SwiGLU in one call: one token (the
        // fused subgroup kernel, with the 67- and 1028-row ends as above) and a batch (the
        // products and SwiGLU one after another).
        for (m, k, n) in [
            (1usize, k_small, 67usize),
            (1, k_small, 1_028),
            (1, k_big, 1536),
            (5, k_small, 67),
        ] {
            cases.push(Case {
                kernel: "qswiglu",
                shape: format!("{} {m}x{k}x{n}", ty.name()),
                bufs: vec![
                    Init::Data(f32_bytes(&small(d.f32s(m * k)))),
                    Init::Weights(ty, k as u32, d.weights(ty, n, k, false)),
                    Init::Weights(ty, k as u32, d.weights(ty, n, k, false)),
                    Init::Zeros((m * n * 4) as u64),
                ],
                op: Op::QSwiGlu {
                    x: &IDX[0],
                    gate: &IDX[1],
                    up: &IDX[2],
                    gate_factors: None,
                    up_factors: None,
                    out: &IDX[3],
                    wtype: ty,
                    m: m as u32,
                    k: k as u32,
                    n: n as u32,
                },
                out: 3,
                out_elems: m * n,
                tolerance: swiglu_tolerance(k),
                work: 2.0 * (ty.row_bytes(k).unwrap_or(0) * n) as f64,
                unit: Unit::GbPerS,
            });
        }
        // A decode step's residual add and norm fused into the product after it: plain and
        // with SwiGLU, the 67- and 1028-row ends as above; each call's output and, in
        // cases of their own, the sum it stores.
        for (k, n, swiglu, check_sum) in [
            (k_small, 67usize, false, false),
            (k_small, 1_028, false, false),
            (k_big, 1536, true, false),
            (k_small, 1_028, true, false),
            (k_small, 67, false, true),
            (k_big, 1536, true, true),
        ] {
            let wbytes = ty.row_bytes(k).unwrap_or(0) * n;
            // Scaled down with SwiGLU, as [`small`] scales the qswiglu cases' x.
            let norm = match swiglu {
                true => small(d.f32s(k)),
                false => d.f32s(k),
            };
            let up = d.weights(ty, n, k, false);
            cases.push(Case {
                kernel: "norm_qmatvec",
                shape: format!(
                    "{} 1x{k}x{n}{}{}",
                    ty.name(),
                    if swiglu { " swiglu" } else { "" },
                    if check_sum { " sum" } else { "" }
                ),
                bufs: vec![
                    Init::Data(f32_bytes(&d.f32s(k))),
                    Init::Data(f32_bytes(&d.f32s(k))),
                    Init::Data(f32_bytes(&norm)),
                    Init::Weights(ty, k as u32, d.weights(ty, n, k, false)),
                    Init::Weights(ty, k as u32, up),
                    Init::Zeros((n * 4) as u64),
                    Init::Zeros((k * 4) as u64),
                ],
                op: Op::NormMatvec {
                    a: &IDX[0],
                    h: &IDX[1],
                    norm: &IDX[2],
                    w: &IDX[3],
                    out: &IDX[5],
                    sum: Some(&IDX[6]),
                    factors: None,
                    up: swiglu.then_some(&IDX[4]),
                    up_factors: None,
                    wtype: ty,
                    k: k as u32,
                    n: n as u32,
                    eps: 1e-5,
                },
                out: if check_sum { 6 } else { 5 },
                out_elems: if check_sum { k } else { n },
                tolerance: match (check_sum, swiglu) {
                    // One f32 addition, the same everywhere.
                    (true, _) => Tolerance::Exact,
                    (false, true) => swiglu_tolerance(k),
                    (false, false) => close(2e-6 * k as f64, 1e-4),
                },
                work: if swiglu { 2.0 } else { 1.0 } * wbytes as f64,
                unit: Unit::GbPerS,
            });
        }
        // A decode step's q, k and v products of one pending add and norm: the fused
        // kernel's q and k/v halves (each output and the sum, a partial row group of q,
        // SmolLM2's shape), and a q whose rows are no multiple of any row count (each
        // product on its own there).
        for (k, n_q, n_kv, out) in [
            (k_small, 72usize, 24usize, 7),
            (k_small, 72, 24, 8),
            (k_small, 72, 24, 9),
            (k_small, 72, 24, 3),
            (k_big, 576, 192, 9),
            (k_small, 67, 24, 8),
        ] {
            cases.push(norm_qkv_case(&mut d, ty, (k, n_q, n_kv), None, out));
        }
        // The same with RoPE and the cache writes: each output at heads of 8 (every row
        // count's rows in one head), the k cache at SmolLM2's shape deep in the cache,
        // heads of 4 (no 8 rows in one head: the fused kernel takes them only 4 rows an
        // invocation) and Hugging Face's half-split pairs (never fused).
        for (k, n_q, n_kv, rope, out) in [
            (
                k_small,
                72usize,
                24usize,
                (8u32, 5u32, RopeStyle::Interleaved),
                11,
            ),
            (k_small, 72, 24, (8, 5, RopeStyle::Interleaved), 12),
            (k_small, 72, 24, (8, 5, RopeStyle::Interleaved), 13),
            (k_big, 576, 192, (64, 300, RopeStyle::Interleaved), 12),
            (k_small, 72, 24, (4, 2, RopeStyle::Interleaved), 12),
            (k_small, 72, 24, (8, 5, RopeStyle::HalfSplit), 11),
        ] {
            cases.push(norm_qkv_rope_case(&mut d, ty, (k, n_q, n_kv), rope, out));
        }
    }

    // Trained scale factors (the "scales" adapter) multiplying the stored block scales in
    // dequantisation and products. A device may fuse s * q + m, so these are compared
    // within rounding.
    for ty in WeightType::ALL
        .into_iter()
        .filter(|&t| quant::has_block_scale(t))
    {
        // n a multiple of 8, so that m = 20 takes the GPU's dequantise-then-matmul path.
        let (k, n) = if ty.block_elems() == quant::QK_K {
            (512usize, 24usize)
        } else {
            (96, 72)
        };
        let blocks = n * k / ty.block_elems();
        let w = d.weights(ty, n, k, false);
        let factors: Vec<f32> = d.f32s(blocks).iter().map(|v| 1.0 + 0.25 * v).collect();
        cases.push(Case {
            kernel: "dequant",
            shape: format!("{} n={} scale factors", ty.name(), n * k),
            bufs: vec![
                Init::Weights(ty, k as u32, w.clone()),
                Init::Data(f32_bytes(&factors)),
                Init::Zeros((n * k * 4) as u64),
            ],
            op: Op::Dequant {
                w: &IDX[0],
                factors: Some(&IDX[1]),
                out: &IDX[2],
                wtype: ty,
                rows: n as u32,
                cols: k as u32,
            },
            out: 2,
            out_elems: n * k,
            tolerance: close(1e-6, 1e-6),
            work: (ty.row_bytes(n * k).unwrap_or(0) + 8 * n * k) as f64,
            unit: Unit::GbPerS,
        });
        // One token, a few (the per-row kernel) and enough to take the f32 scratch path.
        for m in [1usize, 5, 20] {
            cases.push(Case {
                kernel: if m == 1 { "qmatvec" } else { "qmatmul" },
                shape: format!("{} {m}x{k}x{n} scale factors", ty.name()),
                bufs: vec![
                    Init::Data(f32_bytes(&d.f32s(m * k))),
                    Init::Weights(ty, k as u32, w.clone()),
                    Init::Data(f32_bytes(&factors)),
                    Init::Zeros((m * n * 4) as u64),
                ],
                op: Op::QMatmul {
                    x: &IDX[0],
                    w: &IDX[1],
                    factors: Some(&IDX[2]),
                    out: &IDX[3],
                    wtype: ty,
                    m: m as u32,
                    k: k as u32,
                    n: n as u32,
                },
                out: 3,
                out_elems: m * n,
                tolerance: close(2e-6 * k as f64, 1e-4),
                work: 2.0 * (m * k * n) as f64,
                unit: Unit::GflopPerS,
            });
        }
        // q, k and v each with factors (the fused kernel), and only q (each product on its
        // own).
        for all in [true, false] {
            let f = |d: &mut Data, n: usize, on: bool| {
                let v: Vec<f32> = d
                    .f32s(n * k / ty.block_elems())
                    .iter()
                    .map(|v| 1.0 + 0.25 * v)
                    .collect();
                on.then_some(v)
            };
            let factors = [
                f(&mut d, n, true),
                f(&mut d, n / 3, all),
                f(&mut d, n / 3, all),
            ];
            cases.push(norm_qkv_case(&mut d, ty, (k, n, n / 3), Some(factors), 9));
        }
        // Gate and up each with factors (the fused kernel on one token), and only the gate
        // (factors are one switch there, so the calls run one after another).
        for both in [true, false] {
            let up_factors: Vec<f32> = d.f32s(blocks).iter().map(|v| 1.0 - 0.25 * v).collect();
            cases.push(Case {
                kernel: "qswiglu",
                shape: format!(
                    "{} 1x{k}x{n} scale factors on {}",
                    ty.name(),
                    if both { "both" } else { "gate" }
                ),
                bufs: vec![
                    Init::Data(f32_bytes(&small(d.f32s(k)))),
                    Init::Weights(ty, k as u32, w.clone()),
                    Init::Weights(ty, k as u32, d.weights(ty, n, k, false)),
                    Init::Data(f32_bytes(&factors)),
                    Init::Data(f32_bytes(&up_factors)),
                    Init::Zeros((n * 4) as u64),
                ],
                op: Op::QSwiGlu {
                    x: &IDX[0],
                    gate: &IDX[1],
                    up: &IDX[2],
                    gate_factors: Some(&IDX[3]),
                    up_factors: both.then_some(&IDX[4]),
                    out: &IDX[5],
                    wtype: ty,
                    m: 1,
                    k: k as u32,
                    n: n as u32,
                },
                out: 5,
                out_elems: n,
                tolerance: swiglu_tolerance(k),
                work: 2.0 * (ty.row_bytes(k).unwrap_or(0) * n) as f64,
                unit: Unit::GbPerS,
            });
        }
    }

    for (rows, dim) in [(1u32, 576u32), (7, 100)] {
        let n = (rows * dim) as usize;
        cases.push(Case {
            kernel: "rmsnorm",
            shape: format!("{rows}x{dim}"),
            bufs: vec![
                Init::Data(f32_bytes(&d.f32s(n))),
                Init::Data(f32_bytes(&d.f32s(dim as usize))),
                Init::Zeros(n as u64 * 4),
            ],
            op: Op::RmsNorm {
                x: &IDX[0],
                weight: &IDX[1],
                out: &IDX[2],
                rows,
                dim,
                eps: 1e-5,
            },
            out: 2,
            out_elems: n,
            tolerance: close(1e-6, 1e-5),
            work: 8.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }

    // The residual add and norm in one kernel: both of its outputs (the sum, the addend
    // overwritten with the normed rows) are cases.
    for (rows, dim) in [(1u32, 576u32), (7, 100)] {
        let n = (rows * dim) as usize;
        for (what, out) in [("sum", 2), ("h", 1)] {
            cases.push(Case {
                kernel: "add_rmsnorm",
                shape: format!("{what} {rows}x{dim}"),
                bufs: vec![
                    Init::Data(f32_bytes(&d.f32s(n))),
                    Init::Data(f32_bytes(&d.f32s(n))),
                    Init::Zeros(n as u64 * 4),
                    Init::Data(f32_bytes(&d.f32s(dim as usize))),
                ],
                op: Op::AddRmsNorm {
                    a: &IDX[0],
                    h: &IDX[1],
                    sum: &IDX[2],
                    weight: &IDX[3],
                    rows,
                    dim,
                    eps: 1e-5,
                },
                out,
                out_elems: n,
                tolerance: close(1e-6, 1e-5),
                work: 20.0 * n as f64,
                unit: Unit::GbPerS,
            });
        }
    }

    for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
        // The last is one sequence of a packed batch: its rows start at row0 and two more
        // follow it, and the rows of `out` before and after them must come back untouched.
        for (n_tokens, n_heads, head_dim, pos0, row0, after) in [
            (5u32, 3u32, 64u32, 7u32, 0u32, 0u32),
            (1, 9, 128, 1000, 0, 0),
            (4, 3, 64, 0, 6, 2),
        ] {
            let n = ((row0 + n_tokens + after) * n_heads * head_dim) as usize;
            cases.push(Case {
                kernel: "rope",
                shape: format!(
                    "{style:?} t={n_tokens} h={n_heads} d={head_dim} pos0={pos0} row0={row0}"
                ),
                bufs: vec![
                    Init::Data(f32_bytes(&d.f32s(n))),
                    Init::Data(f32_bytes(&rope_table(
                        10000.0,
                        head_dim,
                        pos0 + n_tokens,
                        &RopeScaling::None,
                    ))),
                    Init::Data(f32_bytes(&d.f32s(n))),
                ],
                op: Op::Rope {
                    x: &IDX[0],
                    table: &IDX[1],
                    out: &IDX[2],
                    n_tokens,
                    n_heads,
                    head_dim,
                    pos0,
                    row0,
                    style,
                },
                out: 2,
                out_elems: n,
                tolerance: close(1e-6, 1e-5),
                work: 12.0 * f64::from(n_tokens * n_heads * head_dim),
                unit: Unit::GbPerS,
            });
        }
    }

    // The fused step into the KV cache: each of its three outputs is a case. A decode step
    // after many positions, a prompt at position 0, multi-head; the rows of q_out after the
    // call's and of the caches before and after pos0.. must come back untouched.
    for (style, t, h, kv, hd, pos0) in [
        (RopeStyle::Interleaved, 1u32, 9u32, 3u32, 64u32, 300u32),
        (RopeStyle::HalfSplit, 7, 4, 2, 32, 0),
        (RopeStyle::HalfSplit, 2, 3, 3, 6, 5),
    ] {
        let after = 2;
        let nq = ((t + after) * h * hd) as usize;
        let nkv = (t * kv * hd) as usize;
        let ncache = ((pos0 + t + after) * kv * hd) as usize;
        for (what, out, out_elems) in [("q", 4, nq), ("k", 5, ncache), ("v", 6, ncache)] {
            cases.push(Case {
                kernel: "rope_kv",
                shape: format!("{what} {style:?} t={t} h={h} kv={kv} d={hd} pos0={pos0}"),
                bufs: vec![
                    Init::Data(f32_bytes(&d.f32s(nq))),
                    Init::Data(f32_bytes(&d.f32s(nkv))),
                    Init::Data(f32_bytes(&d.f32s(nkv))),
                    Init::Data(f32_bytes(&rope_table(
                        10000.0,
                        hd,
                        pos0 + t,
                        &RopeScaling::None,
                    ))),
                    Init::Data(f32_bytes(&d.f32s(nq))),
                    Init::Data(f32_bytes(&d.f32s(ncache))),
                    Init::Data(f32_bytes(&d.f32s(ncache))),
                ],
                op: Op::RopeKv {
                    q: &IDX[0],
                    k: &IDX[1],
                    v: &IDX[2],
                    table: &IDX[3],
                    q_out: &IDX[4],
                    k_cache: &IDX[5],
                    v_cache: &IDX[6],
                    n_tokens: t,
                    n_heads: h,
                    n_kv_heads: kv,
                    head_dim: hd,
                    pos0,
                    style,
                },
                out,
                out_elems,
                tolerance: close(1e-6, 1e-5),
                work: 4.0 * f64::from(t * (h + 3 * kv) * hd),
                unit: Unit::GbPerS,
            });
        }
    }

    for (rows, cols) in [(3u32, 1000u32), (10, 7)] {
        let n = (rows * cols) as usize;
        let x: Vec<f32> = d.f32s(n).into_iter().map(|v| 8.0 * v).collect();
        cases.push(Case {
            kernel: "softmax",
            shape: format!("{rows}x{cols}"),
            bufs: vec![Init::Data(f32_bytes(&x)), Init::Zeros(n as u64 * 4)],
            op: Op::Softmax {
                x: &IDX[0],
                out: &IDX[1],
                rows,
                cols,
            },
            out: 1,
            out_elems: n,
            tolerance: close(1e-7, 1e-4),
            work: 8.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }

    for n in [1000u32, 100_003] {
        let nu = n as usize;
        let a: Vec<f32> = d.f32s(nu).into_iter().map(|v| 6.0 * v).collect();
        let b = d.f32s(nu);
        for kernel in ["add", "scale", "swiglu"] {
            let op = match kernel {
                "add" => Op::Add {
                    a: &IDX[0],
                    b: &IDX[1],
                    out: &IDX[2],
                    n,
                },
                "scale" => Op::Scale {
                    x: &IDX[0],
                    out: &IDX[2],
                    n,
                    alpha: -0.37,
                },
                _ => Op::SwiGlu {
                    gate: &IDX[0],
                    up: &IDX[1],
                    out: &IDX[2],
                    n,
                },
            };
            cases.push(Case {
                kernel,
                shape: format!("n={n}"),
                bufs: vec![
                    Init::Data(f32_bytes(&a)),
                    Init::Data(f32_bytes(&b)),
                    Init::Zeros(u64::from(n) * 4),
                ],
                op,
                out: 2,
                out_elems: nu,
                // Add and scale are single correctly rounded operations.
                tolerance: if kernel == "swiglu" {
                    close(1e-6, 1e-5)
                } else {
                    Tolerance::Exact
                },
                work: 12.0 * f64::from(n),
                unit: Unit::GbPerS,
            });
        }
    }

    // Bias rows: one correctly rounded addition per element.
    for (rows, cols) in [(1u32, 1u32), (5, 192), (3, 1000)] {
        let n = (rows * cols) as usize;
        cases.push(Case {
            kernel: "add_bias",
            shape: format!("{rows}x{cols}"),
            bufs: vec![
                Init::Data(f32_bytes(&d.f32s(n))),
                Init::Data(f32_bytes(&d.f32s(cols as usize))),
                Init::Zeros(n as u64 * 4),
            ],
            op: Op::AddBias {
                x: &IDX[0],
                bias: &IDX[1],
                out: &IDX[2],
                rows,
                cols,
            },
            out: 2,
            out_elems: n,
            tolerance: Tolerance::Exact,
            work: 12.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }

    // Columns scaled (IA3): one correctly rounded product per element.
    for (rows, cols) in [(1u32, 1u32), (4, 576), (3, 1000)] {
        let n = (rows * cols) as usize;
        cases.push(Case {
            kernel: "mul_cols",
            shape: format!("{rows}x{cols}"),
            bufs: vec![
                Init::Data(f32_bytes(&d.f32s(n))),
                Init::Data(f32_bytes(&d.f32s(cols as usize))),
                Init::Zeros(n as u64 * 4),
            ],
            op: Op::MulCols {
                x: &IDX[0],
                scale: &IDX[1],
                out: &IDX[2],
                rows,
                cols,
            },
            out: 2,
            out_elems: n,
            tolerance: Tolerance::Exact,
            work: 12.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }

    // Copy between offsets is a bit-exact move.
    for (n, src_offset, dst_offset) in [(1u32, 0u32, 0u32), (1000, 17, 333), (70_000, 5, 0)] {
        let src = d.f32s((n + src_offset) as usize);
        cases.push(Case {
            kernel: "copy",
            shape: format!("n={n} src+{src_offset} dst+{dst_offset}"),
            bufs: vec![
                Init::Data(f32_bytes(&src)),
                Init::Data(f32_bytes(&d.f32s((n + dst_offset) as usize + 3))),
            ],
            op: Op::Copy {
                src: &IDX[0],
                dst: &IDX[1],
                n,
                src_offset,
                dst_offset,
            },
            out: 1,
            out_elems: (n + dst_offset) as usize + 3,
            tolerance: Tolerance::Exact,
            work: 8.0 * f64::from(n),
            unit: Unit::GbPerS,
        });
    }

    // (tokens, heads, kv heads, head_dim, pos0, row0): prefill with GQA, decode with a long
    // cache, multi-head attention, the largest head; row0 > 0 is one sequence of a packed
    // batch (its rows of every buffer start there and `after` more rows follow; the rows
    // of `out` outside the call's must come back untouched and those of k and v must not
    // be attended to).
    for (t, h, kv, hd, pos0, row0, after) in [
        (5u32, 9u32, 3u32, 64u32, 11u32, 0u32, 0u32),
        (1, 9, 3, 64, 200, 0, 0),
        (4, 4, 4, 32, 0, 0, 0),
        (6, 9, 3, 64, 0, 7, 3),
        (1, 9, 3, 64, 20, 5, 2),
        // The widest head of the vec4 path, and a head the vec4 path cannot take.
        (3, 2, 1, 128, 5, 0, 0),
        (2, 3, 3, 6, 1, 0, 0),
        (2, 3, 3, 6, 0, 3, 4),
        (2, 2, 1, 256, 3, 0, 0),
        // Query heads per kv head: 4 (the most one `attention_gqa` workgroup holds, packed
        // and not) and 7 (beyond it).
        (1, 8, 2, 64, 37, 0, 0),
        (2, 16, 4, 32, 9, 3, 1),
        (1, 14, 2, 64, 30, 0, 0),
        // Decode attention's rarer forms: a head of 96 (three vec4s in each invocation's
        // eighth of `attention_dsg8`), and a step of several tokens whose first ends
        // before a chunk its last reads (an empty chunk, with 32 or 64 positions a chunk).
        (1, 6, 2, 96, 100, 0, 0),
        (4, 9, 3, 64, 62, 0, 0),
        // Prompts (enough pairs for the prefill kernels): token counts that fill no
        // subgroup or workgroup exactly, packed and not, both subgroup head widths.
        (45, 9, 3, 64, 3, 2, 5),
        (37, 8, 2, 128, 0, 0, 0),
    ] {
        let qn = ((row0 + t + after) * h * hd) as usize;
        let kvn = ((row0 + pos0 + t + after) * kv * hd) as usize;
        cases.push(Case {
            kernel: "attention",
            shape: format!("t={t} h={h} kv={kv} d={hd} pos0={pos0} row0={row0}"),
            bufs: vec![
                Init::Data(f32_bytes(&d.f32s(qn))),
                Init::Data(f32_bytes(&d.f32s(kvn))),
                Init::Data(f32_bytes(&d.f32s(kvn))),
                Init::Data(f32_bytes(&d.f32s(qn))),
            ],
            op: Op::Attention {
                q: &IDX[0],
                k: &IDX[1],
                v: &IDX[2],
                out: &IDX[3],
                n_tokens: t,
                n_heads: h,
                n_kv_heads: kv,
                head_dim: hd,
                pos0,
                row0,
                scale: 1.0 / (hd as f32).sqrt(),
            },
            out: 3,
            out_elems: qn,
            tolerance: close(1e-6, 1e-4),
            work: 4.0 * f64::from(t) * f64::from(h) * f64::from(pos0 + t) * f64::from(hd),
            unit: Unit::GflopPerS,
        });
    }

    // Philox: the Random123 known-answer vectors, then a long stream.
    let kats: [([u32; 4], [u32; 2], u32); 3] = [
        ([0; 4], [0; 2], 1),
        ([u32::MAX; 4], [u32::MAX; 2], 1),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            1,
        ),
    ];
    for (counter, key, n_blocks) in kats.into_iter().chain([([5, 6, 7, 8], [9, 10], 100_000)]) {
        cases.push(Case {
            kernel: "philox",
            shape: format!(
                "ctr={:08x}.. key={:08x}.. blocks={n_blocks}",
                counter[0], key[0]
            ),
            bufs: vec![Init::Zeros(u64::from(n_blocks) * 16)],
            op: Op::Philox {
                out: &IDX[0],
                counter,
                key,
                n_blocks,
            },
            out: 0,
            out_elems: 4 * n_blocks as usize,
            tolerance: Tolerance::Exact,
            work: 16.0 * f64::from(n_blocks),
            unit: Unit::GbPerS,
        });
    }

    // z: both kinds, from 0, from an odd start, and across the 2^32 element boundary.
    for kind in [ZKind::Binomial, ZKind::Rademacher] {
        for (start, n) in [(0u32, 100_000u32), (12_345, 777), (u32::MAX - 3, 16)] {
            cases.push(Case {
                kernel: "perturb_z",
                shape: format!("{kind:?} start={start} n={n}"),
                bufs: vec![Init::Zeros(u64::from(n) * 4)],
                op: Op::PerturbZ {
                    out: &IDX[0],
                    session_key: 0x0123_4567_89ab_cdef,
                    seed: 17,
                    tensor: 3,
                    start,
                    n,
                    kind,
                },
                out: 0,
                out_elems: n as usize,
                tolerance: Tolerance::Exact,
                work: 4.0 * f64::from(n),
                unit: Unit::GbPerS,
            });
        }
    }

    // A perturbed trainable tensor. Unperturbed (eps = 0) its value is exact on every
    // device for any accumulator (the split keeps both products exact); perturbed, a
    // device may fuse the last multiply-add.
    let accs = |d: &mut Data, n: usize, bound: u32| -> Vec<u8> {
        d.words(n)
            .into_iter()
            .map(|w| (i64::from(w % (2 * bound + 1)) - i64::from(bound)) as i32)
            .flat_map(i32::to_le_bytes)
            .collect()
    };
    for (n, eps, kind) in [
        (1u32, 0.0f32, ZKind::Binomial),
        (4_099, 0.0, ZKind::Binomial),
        (4_099, 1e-3, ZKind::Binomial),
        (70_000, -2e-2, ZKind::Rademacher),
    ] {
        cases.push(Case {
            kernel: "zo_weights",
            shape: format!("{kind:?} n={n} eps={eps}"),
            bufs: vec![
                Init::Data(f32_bytes(&d.f32s(n as usize))),
                Init::Data(accs(&mut d, n as usize, i32::MAX as u32)),
                Init::Zeros(u64::from(n) * 4),
            ],
            op: Op::ZoWeights {
                base: &IDX[0],
                acc: &IDX[1],
                out: &IDX[2],
                n,
                step: 1.0 / (1u32 << 22) as f32,
                eps,
                session_key: 0xfeed_f00d_1234_5678,
                seed: 4_000_000_000,
                tensor: 9,
                kind,
            },
            out: 2,
            out_elems: n as usize,
            tolerance: if eps == 0.0 {
                Tolerance::Exact
            } else {
                close(1e-7, 1e-6)
            },
            work: 12.0 * f64::from(n),
            unit: Unit::GbPerS,
        });
    }

    // The fused multi-seed update: integer, so exact on every device; one case wraps.
    for (n, n_seeds, coef_bound) in [
        (1u32, 1u32, 5u32),
        (3_001, 7, 1 << 20),
        (20_000, 40, 1 << 30),
    ] {
        let seeds: Vec<u8> = d
            .words(2 * n_seeds as usize)
            .chunks_exact(2)
            .flat_map(|w| {
                let coef = (w[1] % (2 * coef_bound + 1)) as i32 - coef_bound as i32;
                [w[0].to_le_bytes(), coef.to_le_bytes()]
            })
            .flatten()
            .collect();
        cases.push(Case {
            kernel: "zo_accumulate",
            shape: format!("n={n} seeds={n_seeds} |coef|<={coef_bound}"),
            bufs: vec![
                Init::Data(accs(&mut d, n as usize, 1 << 30)),
                Init::Data(seeds),
            ],
            op: Op::ZoAccumulate {
                acc: &IDX[0],
                seeds: &IDX[1],
                n,
                n_seeds,
                session_key: 0x0123_4567_89ab_cdef,
                tensor: 2,
                kind: ZKind::Binomial,
            },
            out: 0,
            out_elems: n as usize,
            tolerance: Tolerance::Exact,
            work: 8.0 * f64::from(n) * f64::from(n_seeds),
            unit: Unit::GbPerS,
        });
    }
    cases.extend(backward_cases(&mut d));
    cases
}

/// The backward and optimiser kernels; an op with several outputs has a case per output.
fn backward_cases(d: &mut Data) -> Vec<Case> {
    let mut cases = Vec::new();
    let data = |d: &mut Data, n: usize| Init::Data(f32_bytes(&d.f32s(n)));
    // The input gradient of every weight format, with trained block scales where a
    // format has them; rows and columns as in the models.
    for ty in WeightType::ALL {
        // The last shape, for four formats, is SmolLM2's feed-forward at 64 tokens: large
        // enough for the host path to split its columns across threads, and the timing
        // that compares the formats' backward cost (Q4_1 against Q8_0).
        let big = matches!(
            ty,
            WeightType::Q8_0 | WeightType::Q4_1 | WeightType::Q4K | WeightType::F16
        );
        let shapes = [
            (1usize, 67usize, false),
            (9, 40, quant::has_block_scale(ty)),
        ];
        let threaded = big.then_some((64, 1536, quant::has_block_scale(ty)));
        for (m, n, scaled) in shapes.into_iter().chain(threaded) {
            let k = match (n, ty.block_elems()) {
                (1536, 256) => 1536,
                (1536, _) => 576,
                (_, 256) => 512,
                _ => 96,
            };
            let mut bufs = vec![
                data(d, m * n),
                Init::Weights(ty, k as u32, d.weights(ty, n, k, false)),
                Init::Zeros((m * k * 4) as u64),
            ];
            if scaled {
                let f: Vec<f32> = d
                    .f32s(n * k / ty.block_elems())
                    .iter()
                    .map(|v| 1.0 + 0.5 * v)
                    .collect();
                bufs.push(Init::Data(f32_bytes(&f)));
            }
            cases.push(Case {
                kernel: "qmatmul_t",
                shape: format!(
                    "{} {m}x{n} by {n}x{k}{}",
                    ty.name(),
                    if scaled { " scaled" } else { "" }
                ),
                bufs,
                op: Op::QMatmulT {
                    dy: &IDX[0],
                    w: &IDX[1],
                    factors: scaled.then_some(&IDX[3]),
                    dx: &IDX[2],
                    wtype: ty,
                    m: m as u32,
                    k: k as u32,
                    n: n as u32,
                },
                out: 2,
                out_elems: m * k,
                tolerance: close(2e-5 * n as f64, 1e-4),
                work: 2.0 * (m * n * k) as f64,
                unit: Unit::GflopPerS,
            });
        }
    }
    for (rows, dim) in [(1u32, 7u32), (9, 576)] {
        let n = (rows * dim) as usize;
        cases.push(Case {
            kernel: "rmsnorm_grad",
            shape: format!("{rows}x{dim}"),
            bufs: vec![
                data(d, n),
                data(d, dim as usize),
                data(d, n),
                Init::Zeros(n as u64 * 4),
            ],
            op: Op::RmsNormGrad {
                x: &IDX[0],
                weight: &IDX[1],
                dy: &IDX[2],
                dx: &IDX[3],
                rows,
                dim,
                eps: 1e-5,
            },
            out: 3,
            out_elems: n,
            tolerance: close(1e-5, 1e-4),
            work: 16.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }
    // Attention: grouped heads, odd sizes; one case per gradient and for the statistics.
    for (t, heads, kv_heads, hd) in [(1u32, 2u32, 1u32, 8u32), (13, 6, 2, 16), (9, 3, 3, 64)] {
        let (qo, kv) = ((t * heads * hd) as usize, (t * kv_heads * hd) as usize);
        let (q, k, v) = (d.f32s(qo), d.f32s(kv), d.f32s(kv));
        let shape = cpu::AttnShape {
            n_tokens: t as usize,
            n_heads: heads as usize,
            n_kv_heads: kv_heads as usize,
            head_dim: hd as usize,
            pos0: 0,
        };
        let scale = 1.0 / libm::sqrtf(hd as f32);
        let out = cpu::attention(&q, &k, &v, shape, scale);
        for (name, idx, elems) in [
            ("dq", 5usize, qo),
            ("dk", 6, kv),
            ("dv", 7, kv),
            ("stats", 8, (t * heads * 2) as usize),
        ] {
            cases.push(Case {
                kernel: "attention_grad",
                shape: format!("{name} t={t} heads={heads}/{kv_heads} hd={hd}"),
                bufs: vec![
                    Init::Data(f32_bytes(&q)),
                    Init::Data(f32_bytes(&k)),
                    Init::Data(f32_bytes(&v)),
                    Init::Data(f32_bytes(&out)),
                    data(d, qo),
                    Init::Zeros(qo as u64 * 4),
                    Init::Zeros(kv as u64 * 4),
                    Init::Zeros(kv as u64 * 4),
                    Init::Zeros(u64::from(t * heads) * 8),
                ],
                op: Op::AttentionGrad {
                    q: &IDX[0],
                    k: &IDX[1],
                    v: &IDX[2],
                    out: &IDX[3],
                    dout: &IDX[4],
                    dq: &IDX[5],
                    dk: &IDX[6],
                    dv: &IDX[7],
                    stats: &IDX[8],
                    n_tokens: t,
                    n_heads: heads,
                    n_kv_heads: kv_heads,
                    head_dim: hd,
                    scale,
                },
                out: idx,
                out_elems: elems,
                tolerance: close(2e-5, 1e-4),
                work: 8.0 * f64::from(t * t * heads * hd),
                unit: Unit::GflopPerS,
            });
        }
    }
    for (name, idx) in [("dgate", 3usize), ("dup", 4)] {
        let n = 1000usize;
        let gate: Vec<f32> = d.f32s(n).iter().map(|v| 8.0 * v).collect();
        cases.push(Case {
            kernel: "swiglu_grad",
            shape: format!("{name} n={n}"),
            bufs: vec![
                Init::Data(f32_bytes(&gate)),
                data(d, n),
                data(d, n),
                Init::Zeros(n as u64 * 4),
                Init::Zeros(n as u64 * 4),
            ],
            op: Op::SwiGluGrad {
                gate: &IDX[0],
                up: &IDX[1],
                dy: &IDX[2],
                dgate: &IDX[3],
                dup: &IDX[4],
                n: n as u32,
            },
            out: idx,
            out_elems: n,
            tolerance: close(1e-6, 1e-5),
            work: 20.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }
    // Cross-entropy over a vocabulary-sized row, with a masked row.
    for (name, idx) in [("loss", 2usize), ("dlogits", 3)] {
        let (rows, vocab) = (5u32, 49_152u32);
        let logits: Vec<f32> = d
            .f32s((rows * vocab) as usize)
            .iter()
            .map(|v| 12.0 * v)
            .collect();
        let targets: Vec<u8> = [7u32, crate::backend::NO_TARGET, 49_151, 0, 30_000]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        cases.push(Case {
            kernel: "cross_entropy",
            shape: format!("{name} {rows}x{vocab}"),
            bufs: vec![
                Init::Data(f32_bytes(&logits)),
                Init::Data(targets),
                Init::Zeros(u64::from(rows) * 4),
                Init::Zeros(u64::from(rows * vocab) * 4),
            ],
            op: Op::CrossEntropy {
                logits: &IDX[0],
                targets: &IDX[1],
                loss: &IDX[2],
                dlogits: &IDX[3],
                rows,
                vocab,
                scale: 0.25,
            },
            out: idx,
            out_elems: if idx == 2 {
                rows as usize
            } else {
                (rows * vocab) as usize
            },
            tolerance: close(1e-6, 1e-4),
            work: 8.0 * f64::from(rows * vocab),
            unit: Unit::GbPerS,
        });
    }
    let (rows, cols) = (37u32, 192u32);
    let n = (rows * cols) as usize;
    cases.push(Case {
        kernel: "col_dot",
        shape: format!("{rows}x{cols}"),
        bufs: vec![data(d, n), data(d, n), Init::Zeros(u64::from(cols) * 4)],
        op: Op::ColDot {
            a: &IDX[0],
            b: &IDX[1],
            out: &IDX[2],
            rows,
            cols,
        },
        out: 2,
        out_elems: cols as usize,
        tolerance: Tolerance::Exact,
        work: 8.0 * n as f64,
        unit: Unit::GbPerS,
    });
    cases.push(Case {
        kernel: "axpy",
        shape: "n=1000".into(),
        bufs: vec![data(d, 1000), data(d, 1000)],
        op: Op::Axpy {
            x: &IDX[0],
            y: &IDX[1],
            n: 1000,
            alpha: 0.375,
        },
        out: 1,
        out_elems: 1000,
        tolerance: close(1e-7, 1e-6),
        work: 12_000.0,
        unit: Unit::GbPerS,
    });
    // Optimiser steps from a state with moments, at step 3.
    let n = 1000usize;
    let v: Vec<f32> = d.f32s(n).iter().map(|x| x * x * 0.01).collect();
    let hyper = crate::backend::AdamHyper {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        bias1: 1.0,
        bias2_sqrt: 1.0,
        grad_scale: 0.5,
    }
    .at_step(3);
    for (name, idx) in [("param", 0usize), ("m", 2), ("v", 3)] {
        cases.push(Case {
            kernel: "adamw",
            shape: format!("{name} n={n}"),
            bufs: vec![
                data(d, n),
                data(d, n),
                data(d, n),
                Init::Data(f32_bytes(&v)),
            ],
            op: Op::AdamW {
                param: &IDX[0],
                grad: &IDX[1],
                m: &IDX[2],
                v: &IDX[3],
                n: n as u32,
                hyper,
            },
            out: idx,
            out_elems: n,
            tolerance: close(1e-7, 1e-5),
            work: 20.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }
    for (name, idx) in [("param", 0usize), ("buf", 2)] {
        cases.push(Case {
            kernel: "sgd",
            shape: format!("{name} n={n}"),
            bufs: vec![data(d, n), data(d, n), data(d, n)],
            op: Op::Sgd {
                param: &IDX[0],
                grad: &IDX[1],
                buf: &IDX[2],
                n: n as u32,
                lr: 0.5,
                momentum: 0.9,
                weight_decay: 0.01,
                grad_scale: 0.5,
            },
            out: idx,
            out_elems: n,
            tolerance: close(1e-7, 1e-5),
            work: 16.0 * n as f64,
            unit: Unit::GbPerS,
        });
    }
    cases
}

/// Runs the case on `dev`, returning the output words and seconds per call.
fn execute<B: Backend>(dev: &B, case: &Case, timed: bool) -> Result<(Vec<u32>, f64)> {
    let bufs = case
        .bufs
        .iter()
        .map(|init| match init {
            Init::Data(bytes) => dev.upload(bytes, "selftest input"),
            Init::Weights(wtype, cols, bytes) => {
                dev.upload_weights(*wtype, bytes, *cols, "selftest weights")
            }
            Init::Zeros(n) => dev.alloc(*n, "selftest output"),
        })
        .collect::<Result<Vec<_>>>()?;
    let op = case
        .op
        .map_buffers(|&i| bufs.get(i))
        .ok_or_else(|| Error::InvalidArgument {
            name: "conformance case",
            reason: format!(
                "{} {} names a buffer it does not hold",
                case.kernel, case.shape
            ),
        })?;
    dev.run(&op)?;
    let bytes = dev.read(&bufs[case.out])?;
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .take(case.out_elems)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut secs = f64::NAN;
    if timed {
        // Repeat until about 50 ms have passed (at least 3 calls, at most 200).
        let start = Instant::now();
        let mut reps = 0u32;
        while reps < 3 || (reps < 200 && start.elapsed().as_secs_f64() < 0.05) {
            dev.run(&op)?;
            dev.sync()?;
            reps += 1;
        }
        secs = start.elapsed().as_secs_f64() / f64::from(reps);
    }
    Ok((words, secs))
}

/// Compares device output words with the reference's: (max abs, max rel, pass).
fn compare(case: &Case, dev: &[u32], reference: &[u32]) -> (f64, f64, bool) {
    let bits_are_floats = !matches!(case.op, Op::Philox { .. } | Op::ZoAccumulate { .. });
    let (mut max_abs, mut max_rel, mut pass) = (0.0f64, 0.0f64, dev.len() == reference.len());
    let mut nan = false;
    for (&g, &r) in dev.iter().zip(reference) {
        let (gv, rv) = if bits_are_floats {
            (f64::from(f32::from_bits(g)), f64::from(f32::from_bits(r)))
        } else {
            (f64::from(g), f64::from(r))
        };
        let diff = (gv - rv).abs();
        if diff.is_nan() && g != r {
            // A NaN where the reference has none (or the reverse) fails and is reported.
            pass = false;
            nan = true;
            continue;
        }
        if diff.is_nan() {
            continue;
        }
        max_abs = max_abs.max(diff);
        if rv != 0.0 {
            max_rel = max_rel.max(diff / rv.abs());
        } else if diff != 0.0 {
            max_rel = f64::INFINITY;
        }
        pass &= match case.tolerance {
            Tolerance::Exact => g == r,
            Tolerance::Close { atol, rtol } => diff <= atol + rtol * rv.abs(),
        };
    }
    if nan {
        (f64::NAN, f64::NAN, false)
    } else {
        (max_abs, max_rel, pass)
    }
}

/// Runs one case on `dev` and on the CPU reference; `timed` also measures throughput
/// (about 50 ms per case).
pub fn check<B: Backend>(dev: &B, case: &Case, timed: bool) -> CheckRow {
    let mut row = CheckRow {
        kernel: case.kernel,
        shape: case.shape.clone(),
        tolerance: case.tolerance,
        max_abs: f64::NAN,
        max_rel: f64::NAN,
        pass: false,
        throughput: f64::NAN,
        unit: case.unit,
        error: None,
    };
    let outcome = execute(&Cpu, case, false)
        .and_then(|(reference, _)| Ok((reference, execute(dev, case, timed)?)));
    match outcome {
        Ok((reference, (got, secs))) => {
            let (max_abs, max_rel, pass) = compare(case, &got, &reference);
            row.max_abs = max_abs;
            row.max_rel = max_rel;
            row.pass = pass;
            row.throughput = case.work / secs / 1e9;
        }
        Err(e) => row.error = Some(e.to_string()),
    }
    row
}

/// [`run`] on whichever backend `be` holds (the CPU reference is then compared with
/// itself: that checks the harness and times the reference).
pub fn run_any(be: &crate::backend::any::AnyBackend, filter: Option<&str>) -> Vec<CheckRow> {
    use crate::backend::any::AnyBackend;
    match be {
        AnyBackend::Cpu(cpu) => run(cpu, filter),
        AnyBackend::Host(host) => run(host, filter),
        #[cfg(feature = "gpu")]
        AnyBackend::Gpu(gpu) => run(&**gpu, filter),
    }
}

/// Runs every case whose kernel name contains `filter` (all when `None`).
pub fn run<B: Backend>(dev: &B, filter: Option<&str>) -> Vec<CheckRow> {
    cases()
        .iter()
        .filter(|c| filter.is_none_or(|f| c.kernel.contains(f)))
        .map(|c| check(dev, c, true))
        .collect()
}
