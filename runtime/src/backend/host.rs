//! The multi-threaded CPU path for hosts without a usable GPU (std). It shares the
//! reference's buffers and runs every op through the reference except the two that take
//! most of a forward pass: the quantised products (weight rows split over threads, blocks
//! decoded in registers, the same source compiled for AVX2 where the processor has it) and
//! attention (query heads split over threads). The reference stays plain and remains the
//! oracle; the conformance suite checks this backend against it.

use super::cpu::{
    AttnCall, AttnShape, Cpu, CpuBuffer, WeightRef, composed_products, perturb_addr, softmax,
    zo_accumulate_range, zo_weights_range,
};
use super::pool::Pool;
use super::{Backend, Op};
use crate::error::Result;
use crate::quant::{self, WeightType};
use std::prelude::v1::*;
use std::sync::{Arc, Mutex};

/// The threaded CPU backend.
#[derive(Debug, Clone)]
pub struct Host {
    threads: usize,
    isa: Isa,
    /// `threads - 1` workers that stay alive between ops (starting threads per op cost
    /// about a third of a decode step); the calling thread takes parts too. `None` with
    /// one thread.
    pool: Option<Arc<Pool>>,
}

/// The instruction sets the quantised products are compiled for; one is chosen when a
/// [`Host`] is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64, NEON on aarch64): runs everywhere.
    Baseline,
    /// x86-64 with AVX2 and FMA: eight f32 lanes.
    Avx2,
    /// x86-64 with AVX-512 F and BW: sixteen f32 lanes.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];

    /// Whether this processor can run the variant.
    pub fn available(self) -> bool {
        match self {
            Isa::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && Isa::Avx2.available()
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    /// The widest variant this processor runs.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.available())
            .unwrap_or(Isa::Baseline)
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl Default for Host {
    fn default() -> Self {
        Host::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// The transposed weights the input gradient of a product works through at once.
const WT_BYTES: usize = 2 << 20;

/// Below this many weight bytes a product runs on the calling thread: starting threads
/// costs more than it saves.
const MIN_BYTES_PER_THREAD: usize = 256 << 10;

impl Host {
    /// A backend using up to `threads` threads (at least one) and the widest instruction
    /// set this processor has.
    pub fn new(threads: usize) -> Host {
        Host::make(threads, Isa::detect())
    }

    /// The same with a chosen instruction set, or `None` if this processor lacks it.
    pub fn with_isa(threads: usize, isa: Isa) -> Option<Host> {
        isa.available().then(|| Host::make(threads, isa))
    }

    /// If the system refuses the workers, the backend runs on the calling thread alone
    /// (and its name says so).
    fn make(threads: usize, isa: Isa) -> Host {
        let pool = (threads > 1).then(|| Pool::new(threads - 1)).flatten();
        Host {
            threads: if pool.is_some() { threads } else { 1 },
            isa,
            pool: pool.map(Arc::new),
        }
    }

    /// `f` over `0..n` split evenly across the threads (ranges of whole cache lines of
    /// 4-byte values), the parts' outputs concatenated in order: for elements that depend
    /// on their own index only.
    fn over_elements<T: Send>(
        &self,
        n: usize,
        f: impl Fn(core::ops::Range<usize>) -> Vec<T> + Sync,
    ) -> Vec<T> {
        let per = n.div_ceil(self.threads.max(1)).next_multiple_of(16).max(16);
        let parts = self.parallel(n.div_ceil(per), |p| f(p * per..((p + 1) * per).min(n)));
        parts.into_iter().flatten().collect()
    }

    /// `f(0..parts)` in order, run on the workers and the calling thread.
    fn parallel<T: Send>(&self, parts: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
        let slots: Vec<Mutex<Option<T>>> = (0..parts).map(|_| Mutex::new(None)).collect();
        let run = |i: usize| {
            let v = f(i);
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
        };
        match &self.pool {
            Some(pool) => pool.run(parts, &run),
            None => (0..parts).for_each(run),
        }
        // `run` returns once every part has run (a panic in one is re-raised there).
        slots
            .into_iter()
            .filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

/// The dot product of two equal-length rows, in eight independent partial sums so the
/// compiler can keep them in vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

const QK: usize = 32;
const HALF: usize = QK / 2;

/// Sums of each 32-element block of `x`: the Q4_1 minimum multiplies them.
#[inline(always)]
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(QK).map(|b| b.iter().sum()).collect()
}

/// x . row for one Q8_0 row, decoding in registers (no dequantised row is written).
#[inline(always)]
fn dot_q8_0(x: &[f32], row: &[u8]) -> f32 {
    let mut acc = [0.0f32; QK];
    for (b, xb) in row.chunks_exact(quant::Q8_0_BYTES).zip(x.chunks_exact(QK)) {
        let d = quant::f16_at(b, 0);
        for j in 0..QK {
            acc[j] += d * (xb[j] * f32::from(b[2 + j] as i8));
        }
    }
    acc.iter().sum()
}

/// x . row for one Q4_0 row: element j of a block is d * (nibble - 8).
#[inline(always)]
fn dot_q4_0(x: &[f32], row: &[u8]) -> f32 {
    let mut acc = [0.0f32; HALF];
    for (b, xb) in row.chunks_exact(quant::Q4_0_BYTES).zip(x.chunks_exact(QK)) {
        let d = quant::f16_at(b, 0);
        for j in 0..HALF {
            let q = b[2 + j];
            let lo = f32::from(q & 0x0F) - 8.0;
            let hi = f32::from(q >> 4) - 8.0;
            acc[j] += d * (xb[j] * lo + xb[j + HALF] * hi);
        }
    }
    acc.iter().sum()
}

/// x . row for one Q4_1 row: d * (x . nibbles) + m * (sum of x), the sums from
/// [`block_sums`].
#[inline(always)]
fn dot_q4_1(x: &[f32], sums: &[f32], row: &[u8]) -> f32 {
    let mut acc = [0.0f32; HALF];
    let mut mins = 0.0f32;
    for ((b, xb), s) in row
        .chunks_exact(quant::Q4_1_BYTES)
        .zip(x.chunks_exact(QK))
        .zip(sums)
    {
        let d = quant::f16_at(b, 0);
        mins += quant::f16_at(b, 2) * s;
        for j in 0..HALF {
            let q = b[4 + j];
            acc[j] += d * (xb[j] * f32::from(q & 0x0F) + xb[j + HALF] * f32::from(q >> 4));
        }
    }
    acc.iter().sum::<f32>() + mins
}

/// [`dot_q8_0`] in the variant of `isa`.
#[inline(always)]
fn dot_q8_0_isa(isa: Isa, x: &[f32], row: &[u8]) -> f32 {
    // The kernels' reads rest on these lengths; checked here so no caller can break them.
    let fits = x.len() == row.len() / quant::Q8_0_BYTES * QK;
    match isa {
        _ if !fits => dot_q8_0(x, row),
        // SAFETY (both): the Host's instruction set is one the processor reports; `row` is
        // whole blocks (chunks_exact) and x holds 32 values per block (checked above).
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { x86::q8_0_avx512(x, row) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { x86::q8_0_avx2(x, row) },
        _ => dot_q8_0(x, row),
    }
}

/// [`dot_q4_1`] in the variant of `isa`.
#[inline(always)]
fn dot_q4_1_isa(isa: Isa, x: &[f32], sums: &[f32], row: &[u8]) -> f32 {
    let blocks = row.len() / quant::Q4_1_BYTES;
    let fits = x.len() == blocks * QK && sums.len() == blocks;
    match isa {
        _ if !fits => dot_q4_1(x, sums, row),
        // SAFETY (both): as in `dot_q8_0_isa`; `sums` holds one value per block (checked).
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { x86::q4_1_avx512(x, sums, row) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { x86::q4_1_avx2(x, sums, row) },
        _ => dot_q4_1(x, sums, row),
    }
}

/// Below this many x rows a product decodes each weight block where it is used; from here
/// on it dequantises each weight row once and reuses it for every x row.
const DEQUANT_FROM_ROWS: usize = 4;

/// out\[i, j\] for j in `rows` (a column block of out, stored row-major as
/// \[m, rows.len()\]). Inlined into each instruction-set variant below, so the compiler
/// vectorises the same source for each; the fused loops are written out here rather than
/// passed as closures, which would be compiled apart from the variant's instruction set.
#[inline(always)]
fn qmatmul_rows_body(
    isa: Isa,
    x: &[f32],
    (w, factors): (&[u8], Option<&[f32]>),
    wtype: WeightType,
    (m, k): (usize, usize),
    rows: core::ops::Range<usize>,
) -> Result<Vec<f32>> {
    let row_bytes = wtype.row_bytes(k)?;
    let width = rows.len();
    let mut out = vec![0.0f32; m * width];
    let weights = |j: usize| &w[j * row_bytes..(j + 1) * row_bytes];
    let xs = |i: usize| &x[i * k..(i + 1) * k];
    // Each weight row `$r` decoded in registers against every x row `$i`.
    macro_rules! fused {
        ($i:ident, $r:ident => $dot:expr) => {{
            for (c, j) in rows.enumerate() {
                let $r = &w[j * row_bytes..(j + 1) * row_bytes];
                for $i in 0..m {
                    out[$i * width + c] = $dot;
                }
            }
            return Ok(out);
        }};
    }
    // Scale factors take the dequantising path: the fused decoders read the stored scales.
    if m < DEQUANT_FROM_ROWS && factors.is_none() {
        match wtype {
            WeightType::Q8_0 => fused!(i, r => dot_q8_0_isa(isa, &x[i * k..(i + 1) * k], r)),
            WeightType::Q4_0 => fused!(i, r => dot_q4_0(&x[i * k..(i + 1) * k], r)),
            WeightType::Q4_1 => {
                let sums: Vec<Vec<f32>> = (0..m).map(|i| block_sums(xs(i))).collect();
                fused!(i, r => dot_q4_1_isa(isa, &x[i * k..(i + 1) * k], &sums[i], r))
            }
            _ => {}
        }
    }
    // Dequantise a block of weight rows once, then multiply it with x four rows by four
    // weight rows at a time (`tile`), the block staying in the nearer caches. Rows past the
    // end repeat the last one; their results are dropped.
    let mut deq = vec![0.0f32; DEQUANT_BLOCK_ROWS * k];
    for j0 in rows.clone().step_by(DEQUANT_BLOCK_ROWS) {
        let nb = DEQUANT_BLOCK_ROWS.min(rows.end - j0);
        for (j, buf) in (j0..j0 + nb).zip(deq.chunks_exact_mut(k)) {
            let per_row = k / wtype.block_elems();
            let row_factors = factors.map(|f| &f[j * per_row..(j + 1) * per_row]);
            quant::dequantize_scaled(wtype, weights(j), row_factors, buf)?;
        }
        let deq_row = |r: usize| &deq[r.min(nb - 1) * k..][..k];
        for i0 in (0..m).step_by(TILE) {
            let xt = [0, 1, 2, 3].map(|t| xs((i0 + t).min(m - 1)));
            for r0 in (0..nb).step_by(TILE) {
                let wt = [0, 1, 2, 3].map(|r| deq_row(r0 + r));
                let sums = tile(isa, xt, wt);
                for (t, row) in sums.iter().enumerate().take(m - i0) {
                    let o = &mut out[(i0 + t) * width + (j0 - rows.start) + r0..];
                    for (o, v) in o.iter_mut().zip(row).take(nb - r0) {
                        *o = *v;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Weight rows dequantised together for a multi-row product: 16 rows of SmolLM2's widest k
/// (1536) are 96 KiB, within a core's second-level cache.
const DEQUANT_BLOCK_ROWS: usize = 16;

/// x rows and weight rows per [`tile`].
const TILE: usize = 4;

/// Every dot product of rows `rows` of one operand with rows 0..n of another (each given
/// by its index, all of one length), a [`tile`] at a time: `emit(i, j, dot)`. Rows past
/// either end repeat the last one; their results are not emitted.
#[inline(always)]
fn tiled<'a>(
    isa: Isa,
    (rows, a_row): (core::ops::Range<usize>, impl Fn(usize) -> &'a [f32]),
    (n, b_row): (usize, impl Fn(usize) -> &'a [f32]),
    mut emit: impl FnMut(usize, usize, f32),
) {
    let last = rows.end - 1;
    for i in rows.clone().step_by(TILE) {
        for j in (0..n).step_by(TILE) {
            let t = tile(
                isa,
                core::array::from_fn(|x| a_row((i + x).min(last))),
                core::array::from_fn(|y| b_row((j + y).min(n - 1))),
            );
            for (x, vals) in t.iter().enumerate().take(rows.end - i) {
                for (y, v) in vals.iter().enumerate().take(n - j) {
                    emit(i + x, j + y, *v);
                }
            }
        }
    }
}

/// The 4 x 4 dot products of four x rows with four weight rows (all of one length k),
/// in the variant of `isa`.
#[inline(always)]
fn tile(isa: Isa, xs: [&[f32]; TILE], ws: [&[f32]; TILE]) -> [[f32; TILE]; TILE] {
    let k = ws[0].len();
    let fits = xs.iter().chain(&ws).all(|r| r.len() == k);
    match isa {
        _ if !fits => xs.map(|x| ws.map(|w| dot(x, w))),
        // SAFETY (both): a Host holds only an instruction set the processor reports (see
        // `qmatmul_rows`); the kernels read k = ws[0].len() values of each row, and every
        // row has that length (checked above).
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { x86::tile_avx512(xs, ws) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { x86::tile_avx2(xs, ws) },
        _ => xs.map(|x| ws.map(|w| dot(x, w))),
    }
}

/// Register-blocked 4 x 4 tiles with explicit vector instructions: written for the
/// compiler to vectorise, the same loops kept their sixteen accumulators in memory or fell
/// back to two-lane code (measured slower than one dot at a time).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::TILE;
    use crate::quant::{self, Q4_1_BYTES, Q8_0_BYTES};
    use core::arch::x86_64::*;

    /// x . row for a Q8_0 row: each block's 32 signed bytes widened to two 16-lane vectors;
    /// two accumulators (even and odd blocks) so consecutive blocks do not wait on each
    /// other.
    ///
    /// # Safety
    /// AVX-512 F; `row` is whole blocks and `x` holds 32 values per block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn q8_0_avx512(x: &[f32], row: &[u8]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 2];
        for (b, blk) in row.chunks_exact(Q8_0_BYTES).enumerate() {
            let d = _mm512_set1_ps(quant::f16_at(blk, 0));
            // SAFETY: a block holds 2 + 32 bytes; x holds 32 values for block b.
            let (q0, q1, x0, x1) = unsafe {
                (
                    _mm_loadu_si128(blk.as_ptr().add(2).cast()),
                    _mm_loadu_si128(blk.as_ptr().add(18).cast()),
                    _mm512_loadu_ps(x.as_ptr().add(b * 32)),
                    _mm512_loadu_ps(x.as_ptr().add(b * 32 + 16)),
                )
            };
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
            let p = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
            acc[b & 1] = _mm512_fmadd_ps(d, p, acc[b & 1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    /// x . row for a Q4_1 row: d * (x . nibbles) per block in vectors, m * (sum of x) in
    /// two scalar chains.
    ///
    /// # Safety
    /// AVX-512 F; `row` is whole blocks, `x` holds 32 values and `sums` one per block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn q4_1_avx512(x: &[f32], sums: &[f32], row: &[u8]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut mins = [0.0f32; 2];
        let low = _mm512_set1_epi32(0x0F);
        for ((b, blk), s) in row.chunks_exact(Q4_1_BYTES).enumerate().zip(sums) {
            let d = _mm512_set1_ps(quant::f16_at(blk, 0));
            mins[b & 1] += quant::f16_at(blk, 2) * s;
            // SAFETY: a block holds 4 + 16 bytes; x holds 32 values for block b.
            let (q, x0, x1) = unsafe {
                (
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(4).cast())),
                    _mm512_loadu_ps(x.as_ptr().add(b * 32)),
                    _mm512_loadu_ps(x.as_ptr().add(b * 32 + 16)),
                )
            };
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, low));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q));
            let p = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
            acc[b & 1] = _mm512_fmadd_ps(d, p, acc[b & 1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + (mins[0] + mins[1])
    }

    /// The sum of an 8-lane vector.
    #[target_feature(enable = "avx2")]
    fn hsum256(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }

    /// [`q8_0_avx512`] in 8-lane vectors.
    ///
    /// # Safety
    /// AVX2 and FMA; `row` is whole blocks and `x` holds 32 values per block.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q8_0_avx2(x: &[f32], row: &[u8]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        for (b, blk) in row.chunks_exact(Q8_0_BYTES).enumerate() {
            let d = _mm256_set1_ps(quant::f16_at(blk, 0));
            let mut p = _mm256_setzero_ps();
            for part in 0..4 {
                // SAFETY: bytes 2 + 8 * part .. + 8 lie in the 34-byte block; x holds 32
                // values for block b.
                let (q, xv) = unsafe {
                    (
                        _mm_loadl_epi64(blk.as_ptr().add(2 + 8 * part).cast()),
                        _mm256_loadu_ps(x.as_ptr().add(b * 32 + 8 * part)),
                    )
                };
                p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), xv, p);
            }
            acc[b & 1] = _mm256_fmadd_ps(d, p, acc[b & 1]);
        }
        hsum256(_mm256_add_ps(acc[0], acc[1]))
    }

    /// [`q4_1_avx512`] in 8-lane vectors.
    ///
    /// # Safety
    /// AVX2 and FMA; `row` is whole blocks, `x` holds 32 values and `sums` one per block.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4_1_avx2(x: &[f32], sums: &[f32], row: &[u8]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut mins = [0.0f32; 2];
        let low = _mm256_set1_epi32(0x0F);
        for ((b, blk), s) in row.chunks_exact(Q4_1_BYTES).enumerate().zip(sums) {
            let d = _mm256_set1_ps(quant::f16_at(blk, 0));
            mins[b & 1] += quant::f16_at(blk, 2) * s;
            let mut p = _mm256_setzero_ps();
            for part in 0..2 {
                // SAFETY: bytes 4 + 8 * part .. + 8 lie in the 20-byte block; x holds 32
                // values for block b.
                let (q, x0, x1) = unsafe {
                    (
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            blk.as_ptr().add(4 + 8 * part).cast(),
                        )),
                        _mm256_loadu_ps(x.as_ptr().add(b * 32 + 8 * part)),
                        _mm256_loadu_ps(x.as_ptr().add(b * 32 + 16 + 8 * part)),
                    )
                };
                let lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, low));
                let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(q));
                p = _mm256_fmadd_ps(lo, x0, p);
                p = _mm256_fmadd_ps(hi, x1, p);
            }
            acc[b & 1] = _mm256_fmadd_ps(d, p, acc[b & 1]);
        }
        hsum256(_mm256_add_ps(acc[0], acc[1])) + (mins[0] + mins[1])
    }

    /// Sixteen 16-lane accumulators; the last partial chunk through masked loads.
    ///
    /// # Safety
    /// The processor has AVX-512 F; every row in `xs` and `ws` holds `ws[0].len()` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(
        xs: [&[f32]; TILE],
        ws: [&[f32]; TILE],
    ) -> [[f32; TILE]; TILE] {
        let k = ws[0].len();
        let mut acc = [[_mm512_setzero_ps(); TILE]; TILE];
        let mut c = 0;
        while c < k {
            let mask: __mmask16 = if k - c >= 16 {
                0xFFFF
            } else {
                (1u16 << (k - c)) - 1
            };
            let mut w = [_mm512_setzero_ps(); TILE];
            for r in 0..TILE {
                // SAFETY: c < k <= len; masked-off lanes are not read.
                w[r] = unsafe { _mm512_maskz_loadu_ps(mask, ws[r].as_ptr().add(c)) };
            }
            for t in 0..TILE {
                // SAFETY: as above.
                let x = unsafe { _mm512_maskz_loadu_ps(mask, xs[t].as_ptr().add(c)) };
                for r in 0..TILE {
                    acc[t][r] = _mm512_fmadd_ps(x, w[r], acc[t][r]);
                }
            }
            c += 16;
        }
        let mut out = [[0.0f32; TILE]; TILE];
        for t in 0..TILE {
            for r in 0..TILE {
                out[t][r] = _mm512_reduce_add_ps(acc[t][r]);
            }
        }
        out
    }

    /// Two passes of four x rows by two weight rows (eight 8-lane accumulators: AVX2 has
    /// sixteen registers); the last partial chunk in scalar code.
    ///
    /// # Safety
    /// The processor has AVX2 and FMA; every row holds `ws[0].len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(xs: [&[f32]; TILE], ws: [&[f32]; TILE]) -> [[f32; TILE]; TILE] {
        let k = ws[0].len();
        let body = k - k % 8;
        let mut out = [[0.0f32; TILE]; TILE];
        for half in [0, 2] {
            let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
            let mut c = 0;
            while c < body {
                // SAFETY: c + 8 <= body <= len for every row.
                let (w0, w1) = unsafe {
                    (
                        _mm256_loadu_ps(ws[half].as_ptr().add(c)),
                        _mm256_loadu_ps(ws[half + 1].as_ptr().add(c)),
                    )
                };
                for t in 0..TILE {
                    // SAFETY: as above.
                    let x = unsafe { _mm256_loadu_ps(xs[t].as_ptr().add(c)) };
                    acc[t][0] = _mm256_fmadd_ps(x, w0, acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(x, w1, acc[t][1]);
                }
                c += 8;
            }
            for t in 0..TILE {
                for r in 0..2 {
                    let mut lanes = [0.0f32; 8];
                    // SAFETY: `lanes` holds eight f32.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t][r]) };
                    let tail: f32 = (body..k).map(|c| xs[t][c] * ws[half + r][c]).sum();
                    out[t][half + r] = lanes.iter().sum::<f32>() + tail;
                }
            }
        }
        out
    }
}

/// One instruction-set variant of the quantised product: the same body, compiled under the
/// given attributes.
macro_rules! qmatmul_variant {
    ($(#[$attr:meta])* $name:ident, $isa:expr) => {
        $(#[$attr])*
        fn $name(
            x: &[f32],
            w: (&[u8], Option<&[f32]>),
            wtype: WeightType,
            shape: (usize, usize),
            rows: core::ops::Range<usize>,
        ) -> Result<Vec<f32>> {
            qmatmul_rows_body($isa, x, w, wtype, shape, rows)
        }
    };
}

qmatmul_variant!(
    /// The portable variant (SSE2 on x86-64, NEON on aarch64: the target's baseline).
    qmatmul_rows_baseline,
    Isa::Baseline
);
qmatmul_variant!(
    /// Eight f32 lanes, chosen at run time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    qmatmul_rows_avx2,
    Isa::Avx2
);
qmatmul_variant!(
    /// Sixteen f32 lanes, chosen at run time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    qmatmul_rows_avx512,
    Isa::Avx512
);

/// The variant of `isa`; a [`Host`] holds only instruction sets the processor has.
fn qmatmul_rows(
    isa: Isa,
    x: &[f32],
    w: (&[u8], Option<&[f32]>),
    wtype: WeightType,
    shape: (usize, usize),
    rows: core::ops::Range<usize>,
) -> Result<Vec<f32>> {
    match isa {
        // SAFETY (both): `Host::new` and `Host::with_isa` admit only an instruction set the
        // processor reports; the functions are otherwise ordinary safe Rust.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { qmatmul_rows_avx512(x, w, wtype, shape, rows) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { qmatmul_rows_avx2(x, w, wtype, shape, rows) },
        _ => qmatmul_rows_baseline(x, w, wtype, shape, rows),
    }
}

/// The f32 at byte 4i of `b` (little-endian: a plain load on little-endian targets).
#[inline(always)]
fn le(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// [`dot`] with the second row as little-endian bytes, read in place.
#[inline(always)]
fn dot_le(a: &[f32], b: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, _) = b.as_chunks::<32>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * le(y, i);
        }
    }
    let base = ca.len() * 8;
    let mut tail = 0.0;
    for (i, x) in ra.iter().enumerate() {
        tail += x * le(b, base + i);
    }
    acc.iter().sum::<f32>() + tail
}

/// Attention for the query heads `heads` of every token: \[n_tokens, heads.len(), hd\].
/// The same arithmetic as the reference, reading the caches' bytes in place; inlined into
/// each instruction-set variant below.
#[inline(always)]
fn attention_heads_body(
    q: &[f32],
    k: &[u8],
    v: &[u8],
    s: AttnShape,
    scale: f32,
    heads: core::ops::Range<usize>,
) -> Vec<f32> {
    let hd = s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let width = heads.len();
    let mut out = vec![0.0f32; s.n_tokens * width * hd];
    let mut scores: Vec<Vec<f32>> = Vec::new();
    for t in 0..s.n_tokens {
        let last = s.pos0 + t;
        // The query heads sharing a cached key/value head go together, so each cached row
        // is read once per group rather than once per head (the cache outgrows the caches
        // of the processor on long contexts).
        let mut h0 = heads.start;
        while h0 < heads.end {
            let kv_head = h0 / group;
            let h1 = ((kv_head + 1) * group).min(heads.end);
            let qs: Vec<&[f32]> = (h0..h1)
                .map(|h| &q[(t * s.n_heads + h) * hd..][..hd])
                .collect();
            scores.resize_with(qs.len(), Vec::new);
            for sc in &mut scores {
                sc.clear();
            }
            for p in 0..=last {
                let kr = &k[(p * s.n_kv_heads + kv_head) * hd * 4..][..hd * 4];
                for (sc, qv) in scores.iter_mut().zip(&qs) {
                    sc.push(scale * dot_le(qv, kr));
                }
            }
            let probs: Vec<Vec<f32>> = scores[..qs.len()]
                .iter()
                .map(|sc| softmax(sc, sc.len()))
                .collect();
            let o0 = (t * width + (h0 - heads.start)) * hd;
            let os = &mut out[o0..o0 + (h1 - h0) * hd];
            for p in 0..=last {
                let vr = &v[(p * s.n_kv_heads + kv_head) * hd * 4..][..hd * 4];
                for (o, pr) in os.chunks_exact_mut(hd).zip(&probs) {
                    let w = pr[p];
                    for (i, oi) in o.iter_mut().enumerate() {
                        *oi += w * le(vr, i);
                    }
                }
            }
            h0 = h1;
        }
    }
    out
}

/// One instruction-set variant of attention: the same body under the given attributes.
macro_rules! attention_variant {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        fn $name(
            q: &[f32],
            k: &[u8],
            v: &[u8],
            s: AttnShape,
            scale: f32,
            heads: core::ops::Range<usize>,
        ) -> Vec<f32> {
            attention_heads_body(q, k, v, s, scale, heads)
        }
    };
}

attention_variant!(attention_heads_baseline);
attention_variant!(
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    attention_heads_avx2
);
attention_variant!(
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    attention_heads_avx512
);

/// The attention variant of `isa`.
fn attention_heads(
    isa: Isa,
    q: &[f32],
    k: &[u8],
    v: &[u8],
    s: AttnShape,
    scale: f32,
    heads: core::ops::Range<usize>,
) -> Vec<f32> {
    match isa {
        // SAFETY (both): a Host holds only an instruction set the processor reports.
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { attention_heads_avx512(q, k, v, s, scale, heads) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { attention_heads_avx2(q, k, v, s, scale, heads) },
        _ => attention_heads_baseline(q, k, v, s, scale, heads),
    }
}

/// Below this many multiply-adds an attention call runs on the calling thread.
const MIN_ATTENTION_WORK_PER_THREAD: usize = 1 << 18;

impl Host {
    /// Causal grouped-query attention, the query heads split over threads.
    fn attention(&self, q: &[f32], k: &[u8], v: &[u8], s: AttnShape, scale: f32) -> Vec<f32> {
        let work = s.n_tokens * s.n_heads * (s.pos0 + s.n_tokens) * s.head_dim * 2;
        let threads = self
            .threads
            .min(work / MIN_ATTENTION_WORK_PER_THREAD)
            .clamp(1, s.n_heads);
        if threads == 1 {
            return attention_heads(self.isa, q, k, v, s, scale, 0..s.n_heads);
        }
        let per = s.n_heads.div_ceil(threads);
        let blocks = self.parallel(s.n_heads.div_ceil(per), |b| {
            let heads = b * per..((b + 1) * per).min(s.n_heads);
            (
                heads.len(),
                attention_heads(self.isa, q, k, v, s, scale, heads),
            )
        });
        let hd = s.head_dim;
        let mut out = vec![0.0f32; s.n_tokens * s.n_heads * hd];
        let mut h0 = 0;
        for (width, block) in blocks {
            for t in 0..s.n_tokens {
                out[(t * s.n_heads + h0) * hd..][..width * hd]
                    .copy_from_slice(&block[t * width * hd..][..width * hd]);
            }
            h0 += width;
        }
        out
    }

    /// x \[m, k\] times the \[n, k\] quantised rows of `w` (block scales times `factors`
    /// where given), transposed: \[m, n\].
    fn qmatmul(
        &self,
        x: &[f32],
        (w, factors): (&[u8], Option<&[f32]>),
        wtype: WeightType,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let row_bytes = wtype.row_bytes(k)?;
        let threads = self
            .threads
            .min((row_bytes * n) / MIN_BYTES_PER_THREAD)
            .clamp(1, n);
        if threads == 1 {
            return qmatmul_rows(self.isa, x, (w, factors), wtype, (m, k), 0..n);
        }
        let per = n.div_ceil(threads);
        let blocks = self.parallel(n.div_ceil(per), |b| {
            let rows = b * per..((b + 1) * per).min(n);
            qmatmul_rows(self.isa, x, (w, factors), wtype, (m, k), rows)
        });
        // Interleave the column blocks back into rows of n.
        let mut out = vec![0.0f32; m * n];
        for (b, block) in blocks.into_iter().enumerate() {
            let block = block?;
            let j0 = b * per;
            let width = block.len() / m;
            for i in 0..m {
                out[i * n + j0..i * n + j0 + width]
                    .copy_from_slice(&block[i * width..(i + 1) * width]);
            }
        }
        Ok(out)
    }
}

impl Host {
    /// dx \[m, k\] = dy \[m, n\] times the \[n, k\] rows of `w` (the input gradient of
    /// [`Host::qmatmul`]): threads split k at block boundaries, each dequantising its part
    /// of every row once and adding it, scaled by each token's dy, into its columns.
    fn qmatmul_t(
        &self,
        dy: &[f32],
        (w, factors): (&[u8], Option<&[f32]>),
        wtype: WeightType,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let row_bytes = wtype.row_bytes(k)?;
        let be = wtype.block_elems();
        let unit = be.max(QK);
        let units = k.div_ceil(unit);
        let threads = self
            .threads
            .min((row_bytes * n) / MIN_BYTES_PER_THREAD)
            .clamp(1, units);
        let per = units.div_ceil(threads) * unit;
        let parts = self.parallel(k.div_ceil(per), |b| -> Result<Vec<f32>> {
            let (c0, c1) = (b * per, ((b + 1) * per).min(k));
            let width = c1 - c0;
            // Per chunk of weight rows: their columns c0..c1, dequantised (one call per
            // row) and transposed into `wt` (a row of the chunk's length per column), then
            // dx += dy[:, chunk] wt^T by the register-blocked tiles of the forward product.
            let (at, len) = (wtype.row_bytes(c0)?, wtype.row_bytes(width)?);
            let per = ((WT_BYTES / 4) / width).clamp(TILE, n.max(TILE));
            let mut row = vec![0.0f32; width];
            let mut wt = vec![0.0f32; width * per.min(n)];
            let mut out = vec![0.0f32; m * width];
            for j0 in (0..n).step_by(per) {
                let nj = per.min(n - j0);
                for (r, j) in (j0..j0 + nj).enumerate() {
                    let f = factors.map(|f| &f[(j * k + c0) / be..(j * k + c1).div_ceil(be)]);
                    quant::dequantize_scaled(wtype, &w[j * row_bytes + at..][..len], f, &mut row)?;
                    for (c, v) in row.iter().enumerate() {
                        wt[c * nj + r] = *v;
                    }
                }
                tiled(
                    self.isa,
                    (0..m, |i: usize| &dy[i * n + j0..][..nj]),
                    (width, |c: usize| &wt[c * nj..][..nj]),
                    |i, c, v| out[i * width + c] += v,
                );
            }
            Ok(out)
        });
        let mut dx = vec![0.0f32; m * k];
        for (b, part) in parts.into_iter().enumerate() {
            let part = part?;
            let c0 = b * per;
            let width = part.len() / m;
            for i in 0..m {
                dx[i * k + c0..i * k + c0 + width]
                    .copy_from_slice(&part[i * width..(i + 1) * width]);
            }
        }
        Ok(dx)
    }
}

/// Below this many multiply-adds an f32 product runs on the calling thread.
const MIN_MATMUL_WORK_PER_THREAD: usize = 1 << 16;

impl Host {
    /// out\[m,n\] = a\[m,k\] b^T with b stored \[n,k\] (an adapter's products: LoRA's A and
    /// B are stored so), by the register-blocked tiles of the quantised product over row
    /// blocks of `a` split across the threads.
    fn matmul_bt(&self, a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let blocks = m.div_ceil(TILE);
        let threads = self
            .threads
            .min(m.saturating_mul(k).saturating_mul(n) / MIN_MATMUL_WORK_PER_THREAD)
            .clamp(1, blocks);
        let per = blocks.div_ceil(threads) * TILE;
        let parts = self.parallel(m.div_ceil(per), |p| {
            let (i0, i1) = (p * per, ((p + 1) * per).min(m));
            let mut out = vec![0.0f32; (i1 - i0) * n];
            tiled(
                self.isa,
                (i0..i1, |i: usize| &a[i * k..][..k]),
                (n, |j: usize| &b[j * k..][..k]),
                |i, j, v| out[(i - i0) * n + j] = v,
            );
            out
        });
        parts.into_iter().flatten().collect()
    }
}

impl Host {
    /// [`Host::qmatmul`] of x with a weight buffer and its optional factors.
    fn product(
        &self,
        x: &[f32],
        (w, factors): WeightRef<'_>,
        wtype: WeightType,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let factors = factors.map(|f| f.f32s(n * k / wtype.block_elems()));
        let w = w.bytes(wtype.row_bytes(k)? * n);
        self.qmatmul(x, (&w, factors.as_deref()), wtype, (m, k, n))
    }
}

impl Backend for Host {
    type Buffer = CpuBuffer;

    fn name(&self) -> String {
        format!("cpu, {} threads, {}", self.threads, self.isa.name())
    }

    fn alloc(&self, bytes: u64, what: &'static str) -> Result<CpuBuffer> {
        Cpu.alloc(bytes, what)
    }

    fn upload(&self, data: &[u8], what: &'static str) -> Result<CpuBuffer> {
        Cpu.upload(data, what)
    }

    fn size(&self, buf: &CpuBuffer) -> u64 {
        Cpu.size(buf)
    }

    fn read(&self, buf: &CpuBuffer) -> Result<Vec<u8>> {
        Cpu.read(buf)
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn run(&self, op: &Op<'_, CpuBuffer>) -> Result<()> {
        match *op {
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
                op.check(|b| self.size(b))?;
                let (m, k, n) = (m as usize, k as usize, n as usize);
                // The result is computed before `out` is written: it may alias `x`.
                let result = self.product(&x.f32s(m * k), (w, factors), wtype, (m, k, n))?;
                out.write_f32(&result);
                Ok(())
            }
            Op::QSwiGlu { .. } | Op::NormMatvec { .. } | Op::NormQkv { .. } => {
                op.check(|b| self.size(b))?;
                composed_products(op, |x, w, wtype, shape| self.product(x, w, wtype, shape))?;
                Ok(())
            }
            // Its parts, NormQkv on this path's threaded products.
            Op::NormQkvRope { .. } => {
                op.check(|b| self.size(b))?;
                for part in op.qkv_rope_parts().into_iter().flatten() {
                    self.run(&part)?;
                }
                Ok(())
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
                op.check(|b| self.size(b))?;
                let (m, k, n) = (m as usize, k as usize, n as usize);
                let g = dy.f32s(m * n);
                let factors = factors.map(|f| f.f32s(n * k / wtype.block_elems()));
                let result = {
                    let w = w.bytes(wtype.row_bytes(k)? * n);
                    self.qmatmul_t(&g, (&w, factors.as_deref()), wtype, (m, k, n))?
                };
                dx.write_f32(&result);
                Ok(())
            }
            Op::Matmul {
                a,
                b,
                out,
                m,
                k,
                n,
                a_t: false,
                b_t: true,
            } => {
                op.check(|b| self.size(b))?;
                let (m, k, n) = (m as usize, k as usize, n as usize);
                // Computed before `out` is written: it may alias an operand.
                let y = self.matmul_bt(&a.f32s(m * k), &b.f32s(n * k), (m, k, n));
                out.write_f32(&y);
                Ok(())
            }
            Op::Attention { .. } => {
                op.check(|b| self.size(b))?;
                if let Some(a) = AttnCall::read(op) {
                    // Computed before `out` is written: it may alias a cache.
                    let y = {
                        let bytes = a.kv.start * 4..a.kv.end * 4;
                        let (k, v) = (a.k.bytes_in(bytes.clone()), a.v.bytes_in(bytes));
                        self.attention(&a.q, &k, &v, a.shape, a.scale)
                    };
                    a.out.write_f32_at(a.out_at, &y);
                }
                Ok(())
            }
            // The zeroth-order kernels split their elements across the threads: each
            // element depends on its own index only, so the bits are the reference's.
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
                op.check(|b| self.size(b))?;
                let n = n as usize;
                let (base, acc) = (base.f32s(n), acc.i32s(n));
                let addr = perturb_addr(session_key, seed, tensor);
                out.write_f32(&self.over_elements(n, |range| {
                    zo_weights_range(&base, &acc, range, (step, eps), &addr, kind)
                }));
                Ok(())
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
                op.check(|b| self.size(b))?;
                let n = n as usize;
                let pairs = seeds.i32s(2 * n_seeds as usize);
                let d = acc.i32s(n);
                acc.write_i32(&self.over_elements(n, |range| {
                    let start = range.start;
                    let mut part = d[range].to_vec();
                    zo_accumulate_range(&mut part, start, &pairs, (session_key, tensor), kind);
                    part
                }));
                Ok(())
            }
            _ => Cpu.run(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn threaded_attention_matches_the_reference() {
        // Enough work for threads; 9 heads over 2 threads split 5 + 4.
        let s = AttnShape {
            n_tokens: 8,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            pos0: 100,
        };
        let q = values(s.n_tokens * s.n_heads * s.head_dim, 1);
        let kv = (s.pos0 + s.n_tokens) * s.n_kv_heads * s.head_dim;
        let (k, v) = (values(kv, 2), values(kv, 3));
        let want = super::super::cpu::attention(&q, &k, &v, s, 0.125);
        for threads in [1, 2, 4] {
            let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
            let got = Host::new(threads).attention(&q, &bytes(&k), &bytes(&v), s, 0.125);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{threads} threads: max diff {worst}");
        }
    }
}
