//! The multi-threaded CPU path for hosts without a usable GPU (std). It shares the
//! reference's buffers and runs every op through the reference except the quantised
//! products, which take most of a forward pass: those split the weight rows over threads
//! and use dot products the compiler vectorises. The reference stays plain and remains the
//! oracle; the conformance suite checks this backend against it.

use super::cpu::{Cpu, CpuBuffer};
use super::{Backend, Op};
use crate::error::Result;
use crate::quant::{self, WeightType};
use std::prelude::v1::*;

/// The threaded CPU backend.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    threads: usize,
}

impl Default for Host {
    fn default() -> Self {
        Host::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// Below this many weight bytes a product runs on the calling thread: starting threads
/// costs more than it saves.
const MIN_BYTES_PER_THREAD: usize = 64 << 10;

impl Host {
    /// A backend using up to `threads` threads (at least one).
    pub fn new(threads: usize) -> Host {
        Host {
            threads: threads.max(1),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// The dot product of two equal-length rows, in eight independent partial sums so the
/// compiler can keep them in vector registers.
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

/// out\[i, j\] for j in `rows` (a column block of out, stored row-major as
/// \[m, rows.len()\]): the weight rows are dequantised once each and dotted with every x row.
fn qmatmul_rows(
    x: &[f32],
    w: &[u8],
    wtype: WeightType,
    (m, k): (usize, usize),
    rows: core::ops::Range<usize>,
) -> Result<Vec<f32>> {
    let row_bytes = wtype.row_bytes(k)?;
    let width = rows.len();
    let mut row = vec![0.0f32; k];
    let mut out = vec![0.0f32; m * width];
    for (c, j) in rows.enumerate() {
        quant::dequantize(wtype, &w[j * row_bytes..(j + 1) * row_bytes], &mut row)?;
        for i in 0..m {
            out[i * width + c] = dot(&x[i * k..(i + 1) * k], &row);
        }
    }
    Ok(out)
}

impl Host {
    /// x \[m, k\] times the \[n, k\] quantised rows of `w`, transposed: \[m, n\].
    fn qmatmul(
        &self,
        x: &[f32],
        w: &[u8],
        wtype: WeightType,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let row_bytes = wtype.row_bytes(k)?;
        let threads = self
            .threads
            .min((row_bytes * n) / MIN_BYTES_PER_THREAD)
            .clamp(1, n);
        if threads == 1 {
            return qmatmul_rows(x, w, wtype, (m, k), 0..n);
        }
        let per = n.div_ceil(threads);
        let blocks: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .step_by(per)
                .map(|j0| {
                    let rows = j0..(j0 + per).min(n);
                    s.spawn(move || qmatmul_rows(x, w, wtype, (m, k), rows))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
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

impl Backend for Host {
    type Buffer = CpuBuffer;

    fn name(&self) -> String {
        format!("cpu, {} threads", self.threads)
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
                out,
                wtype,
                m,
                k,
                n,
            } => {
                op.check(|b| self.size(b))?;
                let (m, k, n) = (m as usize, k as usize, n as usize);
                let xs = x.f32s(m * k);
                // The result is computed before `out` is written: it may alias `x`.
                let result = {
                    let wb = w.borrow_bytes();
                    self.qmatmul(&xs, &wb[..wtype.row_bytes(k)? * n], wtype, (m, k, n))?
                };
                out.write_f32(&result);
                Ok(())
            }
            _ => Cpu.run(op),
        }
    }
}
