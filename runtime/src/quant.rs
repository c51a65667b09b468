//! Weight storage formats: plain floats and the GGUF block quantisations.
//!
//! Layouts follow ggml exactly (little-endian). Every dequantisation is written so that
//! each output is produced by at most one rounding of correctly rounded f32 operations
//! (see the per-format notes); that is what lets the WGSL kernels match this reference
//! bit for bit, whatever the shader compiler fuses.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::prelude::v1::*;

/// How the elements of a weight tensor are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q6K,
}

/// Elements per block of the 32-element formats.
pub const QK: usize = 32;
/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

impl WeightType {
    /// Every type, in a stable order (also the order of the shader's `WTYPE` codes).
    pub const ALL: [WeightType; 8] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q8_0,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q4K,
        WeightType::Q6K,
    ];

    /// The name GGUF tools print.
    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::F16 => "f16",
            WeightType::BF16 => "bf16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q4_1 => "q4_1",
            WeightType::Q4K => "q4_k",
            WeightType::Q6K => "q6_k",
        }
    }

    /// The ggml type id used in GGUF tensor infos.
    pub fn ggml_id(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q4_1 => 3,
            WeightType::Q8_0 => 8,
            WeightType::Q4K => 12,
            WeightType::Q6K => 14,
            WeightType::BF16 => 30,
        }
    }

    /// The code the WGSL kernels receive as the `WTYPE` override constant.
    pub fn shader_code(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::BF16 => 2,
            WeightType::Q8_0 => 3,
            WeightType::Q4_0 => 4,
            WeightType::Q4_1 => 5,
            WeightType::Q4K => 6,
            WeightType::Q6K => 7,
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => 1,
            WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4_1 => QK,
            WeightType::Q4K | WeightType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::F16 | WeightType::BF16 => 2,
            WeightType::Q8_0 => Q8_0_BYTES,
            WeightType::Q4_0 => Q4_0_BYTES,
            WeightType::Q4_1 => Q4_1_BYTES,
            WeightType::Q4K => Q4K_BYTES,
            WeightType::Q6K => Q6K_BYTES,
        }
    }

    /// Bytes of one row of `cols` elements; rows must hold whole blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        let be = self.block_elems();
        if !cols.is_multiple_of(be) {
            return Err(Error::InvalidShape {
                op: "row_bytes",
                reason: format!(
                    "{cols} columns is not a multiple of the {} block size {be}",
                    self.name()
                ),
            });
        }
        (cols / be)
            .checked_mul(self.block_bytes())
            .ok_or_else(|| Error::InvalidShape {
                op: "row_bytes",
                reason: format!("{cols} columns of {} overflow usize", self.name()),
            })
    }
}

// Block sizes as laid out by ggml; the offsets below are the fields' positions.
/// Q8_0: f16 scale d, then 32 x i8.
pub const Q8_0_BYTES: usize = 2 + QK;
/// Q4_0: f16 scale d, then 16 bytes of nibbles (low nibbles are elements 0..16).
pub const Q4_0_BYTES: usize = 2 + QK / 2;
/// Q4_1: f16 scale d, f16 minimum m, then 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 4 + QK / 2;
/// Q4_K: f16 d, f16 dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles.
pub const Q4K_BYTES: usize = 4 + 12 + QK_K / 2;
/// Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 x i8 scales, f16 d.
pub const Q6K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

const _: () = assert!(Q8_0_BYTES == 34);
const _: () = assert!(Q4_0_BYTES == 18);
const _: () = assert!(Q4_1_BYTES == 20);
const _: () = assert!(Q4K_BYTES == 144);
const _: () = assert!(Q6K_BYTES == 210);

/// The half at byte `off`, widened exactly.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

/// Half to single precision without branches or calls, so it stays inside vectorised
/// loops (the `half` crate picks F16C at run time through a call, which spills the
/// loop's registers). Exact: the magnitude bits shifted into place and scaled by 2^112
/// re-bias normals and normalise subnormals in one exactly rounded multiply; infinities
/// and NaNs keep an all-ones exponent. Checked against `half` for every value.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let mag = h & 0x7FFF;
    let finite = f32::from_bits(mag << 13) * f32::from_bits(0x7780_0000);
    let bits = if mag >= 0x7C00 {
        (mag << 13) | 0x7F80_0000
    } else {
        finite.to_bits()
    };
    f32::from_bits(bits | sign)
}

/// Dequantise `out.len()` elements stored as `ty` in `src` (which must hold exactly the
/// bytes of those elements, whole blocks).
pub fn dequantize(ty: WeightType, src: &[u8], out: &mut [f32]) -> Result<()> {
    dequantize_scaled(ty, src, None, out)
}

/// Whether a format's blocks have one continuous (f16) scale d each that training may
/// multiply (the "scales" trainable set): the 32-element formats' d, and the K-quants'
/// super-block d (their 6- or 8-bit sub-block scales are integer codes and stay frozen,
/// like the quants). Minimums (Q4_1's m, Q4_K's dmin) are not scaled.
pub fn has_block_scale(ty: WeightType) -> bool {
    matches!(
        ty,
        WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4_1 | WeightType::Q4K | WeightType::Q6K
    )
}

/// The byte offset of d in a block of a format with [`has_block_scale`] (Q6_K stores it last).
pub fn block_scale_offset(ty: WeightType) -> usize {
    if ty == WeightType::Q6K {
        QK_K / 2 + QK_K / 4 + QK_K / 16
    } else {
        0
    }
}

/// The elements that share one trained scale factor of the "scales" set in a `ty` weight:
/// its block, where it has a block scale; otherwise 32 (the layout's default; such a
/// weight cannot take factors).
pub fn scale_block(ty: WeightType) -> u32 {
    if has_block_scale(ty) {
        ty.block_elems() as u32
    } else {
        QK as u32
    }
}

/// [`dequantize`], with each block's stored scale d multiplied by `factors[block]` where
/// given (a format with [`has_block_scale`]; one f32 per block): the trained scale is
/// d * factor, one rounding. Q4_0's offset -8d, Q4_1's stored minimum and the K-quants'
/// sub-block scales and minimums follow the formulas below unchanged.
pub fn dequantize_scaled(
    ty: WeightType,
    src: &[u8],
    factors: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let need = ty.row_bytes(out.len())?;
    if src.len() != need {
        return Err(Error::BufferTooSmall {
            op: "dequantize",
            buffer: "src",
            needed: need as u64,
            actual: src.len() as u64,
        });
    }
    let be = ty.block_elems();
    let bb = ty.block_bytes();
    if let Some(s) = factors
        && (!has_block_scale(ty) || s.len() != out.len() / be)
    {
        return Err(Error::InvalidShape {
            op: "dequantize",
            reason: format!(
                "{} scale factors for {} blocks of {}",
                s.len(),
                out.len() / be,
                ty.name()
            ),
        });
    }
    let off = block_scale_offset(ty);
    for (i, (blk, y)) in src
        .chunks_exact(bb)
        .zip(out.chunks_exact_mut(be))
        .enumerate()
    {
        let d = || factors.map_or(1.0, |f| f[i]) * f16_at(blk, off);
        match ty {
            WeightType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            WeightType::F16 => y[0] = f16_at(blk, 0),
            WeightType::BF16 => {
                y[0] = bf16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32()
            }
            WeightType::Q8_0 => dequant_q8_0(blk, d(), y),
            WeightType::Q4_0 => dequant_q4_0(blk, d(), y),
            WeightType::Q4_1 => dequant_q4_1(blk, d(), y),
            WeightType::Q4K => dequant_q4k(blk, d(), y),
            WeightType::Q6K => dequant_q6k(blk, d(), y),
        }
    }
    Ok(())
}

/// y = d * q: one rounding.
fn dequant_q8_0(b: &[u8], d: f32, y: &mut [f32]) {
    for (i, v) in y.iter_mut().enumerate() {
        *v = d * f32::from(b[2 + i] as i8);
    }
}

/// y = d * q - 8d, the shaders' form: for a stored (f16) d both products are exact, so
/// this is d * (q - 8) exactly; for a trained f32 d it is two roundings, as on the GPU.
fn dequant_q4_0(b: &[u8], d: f32, y: &mut [f32]) {
    let m = -8.0 * d;
    for j in 0..QK / 2 {
        let q = b[2 + j];
        y[j] = d * f32::from(q & 0x0F) + m;
        y[j + QK / 2] = d * f32::from(q >> 4) + m;
    }
}

/// y = d * q + m: for a stored d, d * q is exact (11 x 4 significant bits), so one
/// rounding even if fused.
fn dequant_q4_1(b: &[u8], d: f32, y: &mut [f32]) {
    let m = f16_at(b, 2);
    for j in 0..QK / 2 {
        let q = b[4 + j];
        y[j] = d * f32::from(q & 0x0F) + m;
        y[j + QK / 2] = d * f32::from(q >> 4) + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K super-block, as ggml packs them.
pub fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// y = (d * sc) * q - dmin * m. For a stored d, d * sc has at most 17 significant bits and
/// q 4, so both products are exact and the subtraction is the only rounding; a trained d
/// rounds d * sc and its product with q too, in that order, as the shaders do.
fn dequant_q4k(b: &[u8], d: f32, y: &mut [f32]) {
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..];
    for chunk in 0..4 {
        let (sc1, m1) = q4k_scale_min(scales, 2 * chunk);
        let (sc2, m2) = q4k_scale_min(scales, 2 * chunk + 1);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let q = &qs[32 * chunk..32 * chunk + 32];
        let out = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0x0F) - min1;
            out[l + 32] = d2 * f32::from(q[l] >> 4) - min2;
        }
    }
}

/// y = (d * sc) * q: for a stored d, d * sc is exact (11 x 8 bits) and the product with q
/// is the one rounding; a trained d rounds d * sc too.
fn dequant_q6k(b: &[u8], d: f32, y: &mut [f32]) {
    let (ql, rest) = b.split_at(QK_K / 2);
    let (qh, rest) = rest.split_at(QK_K / 4);
    let sc = &rest[..QK_K / 16];
    for half in 0..2 {
        let ql = &ql[64 * half..];
        let qh = &qh[32 * half..];
        let sc = &sc[8 * half..];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            out[l] = s(0) * q1 as f32;
            out[l + 32] = s(2) * q2 as f32;
            out[l + 64] = s(4) * q3 as f32;
            out[l + 96] = s(6) * q4 as f32;
        }
    }
}

/// Quantises `x` (a whole number of 32-element blocks) to Q8_0 as ggml's reference does:
/// d = max|x| / 127, q = round(x / d).
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    blocks_of(x, "quantize_q8_0")?;
    let mut out = Vec::with_capacity(x.len() / QK * Q8_0_BYTES);
    for b in x.chunks_exact(QK) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(b.iter().map(|v| libm::roundf(v * id) as i8 as u8));
    }
    Ok(out)
}

/// Quantises `x` to Q4_0 as ggml's reference does: d = (the value of largest magnitude) / -8,
/// q = min(15, trunc(x / d + 8.5)).
pub fn quantize_q4_0(x: &[f32]) -> Result<Vec<u8>> {
    blocks_of(x, "quantize_q4_0")?;
    let mut out = Vec::with_capacity(x.len() / QK * Q4_0_BYTES);
    for b in x.chunks_exact(QK) {
        let mut max = 0.0f32;
        for &v in b {
            if v.abs() > max.abs() {
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
        for j in 0..QK / 2 {
            out.push(q(b[j]) | (q(b[j + QK / 2]) << 4));
        }
    }
    Ok(out)
}

/// `x` stored as `ty` (whole rows of it): the float formats by rounding, Q8_0 and Q4_0 by
/// ggml's reference quantisers; Q4_1 and the K-quants are not written.
pub fn quantize(ty: WeightType, x: &[f32]) -> Result<Vec<u8>> {
    match ty {
        WeightType::F32 => Ok(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        WeightType::F16 => Ok(x
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect()),
        WeightType::BF16 => Ok(x
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect()),
        WeightType::Q8_0 => quantize_q8_0(x),
        WeightType::Q4_0 => quantize_q4_0(x),
        WeightType::Q4_1 | WeightType::Q4K | WeightType::Q6K => Err(Error::InvalidShape {
            op: "quantize",
            reason: format!("writing {} is not supported", ty.name()),
        }),
    }
}

fn blocks_of(x: &[f32], op: &'static str) -> Result<()> {
    if x.is_empty() || !x.len().is_multiple_of(QK) {
        return Err(Error::InvalidShape {
            op,
            reason: format!("{} values is not a whole number of 32-blocks", x.len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got:e} vs {want:e}"
            );
        }
    }

    #[test]
    fn row_bytes_rejects_partial_blocks() {
        assert_eq!(WeightType::Q4K.row_bytes(512).unwrap(), 288);
        assert!(matches!(
            WeightType::Q4_0.row_bytes(33),
            Err(Error::InvalidShape { .. })
        ));
    }

    #[test]
    fn dequantize_rejects_wrong_length() {
        let mut out = [0.0f32; 32];
        assert!(matches!(
            dequantize(WeightType::Q8_0, &[0u8; 33], &mut out),
            Err(Error::BufferTooSmall { .. })
        ));
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 10.0)
            .collect();
        for (ty, q) in [
            (WeightType::Q8_0, quantize_q8_0(&x).unwrap()),
            (WeightType::Q4_0, quantize_q4_0(&x).unwrap()),
        ] {
            let mut y = vec![0.0; 64];
            dequantize(ty, &q, &mut y).unwrap();
            let step = if ty == WeightType::Q8_0 {
                3.15 / 127.0
            } else {
                3.15 / 8.0
            };
            for (a, b) in x.iter().zip(&y) {
                // Q4_0 maps the largest magnitude to -8d, so the other sign tops out at 7d.
                let clipped = ty == WeightType::Q4_0 && a.abs() > 7.0 * step;
                assert!(
                    (a - b).abs() <= step * 0.51 + 1e-3 || clipped,
                    "{ty:?}: {a} vs {b}"
                );
            }
        }
        assert!(quantize_q8_0(&x[..33]).is_err());
    }

    #[test]
    fn q4_1_known_block() {
        // d = 0.5, m = -1.0, nibbles 0..15 low and 15..0 high.
        let mut b = [0u8; Q4_1_BYTES];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        for j in 0..16u8 {
            b[4 + j as usize] = j | ((15 - j) << 4);
        }
        let mut y = [0.0f32; 32];
        dequantize(WeightType::Q4_1, &b, &mut y).unwrap();
        assert_eq!(y[0], -1.0);
        assert_eq!(y[15], 6.5);
        assert_eq!(y[16], 6.5);
        assert_eq!(y[31], -1.0);
    }
}
