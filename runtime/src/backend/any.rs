//! One backend type for skins (the CLI, the C API, the server): whichever backend was chosen
//! at run time, behind the [`Backend`] trait, so a skin holds a `Model<AnyBackend>` instead
//! of being generic or dispatching by hand. Each op is handed to the backend held with its
//! buffers unwrapped ([`Op::map_buffers`]); a buffer made by another backend is an error.

use super::cpu::{Cpu, CpuBuffer};
use super::host::{Host, Isa};
#[cfg(feature = "gpu")]
use super::wgpu::{Gpu, GpuBuffer, GpuOptions};
use super::{Backend, Op};
use crate::error::{Error, Result};
use crate::quant::WeightType;
use std::prelude::v1::*;

/// Which backend to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// A real GPU if wgpu finds one, else the multi-threaded CPU path (a CPU-emulated
    /// adapter such as llvmpipe counts as no GPU).
    #[default]
    Auto,
    /// The CPU reference: plain, single-threaded, the oracle.
    Cpu,
    /// The multi-threaded CPU path.
    Host,
    /// Any wgpu adapter, CPU-emulated ones included.
    Gpu,
}

/// How to open a backend.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    pub kind: BackendKind,
    /// Threads of the CPU path (default: the processor's).
    pub threads: Option<usize>,
    /// Instruction set of the CPU path (default: the widest the processor has).
    pub isa: Option<Isa>,
    /// Adapter choice and kernel shapes of the GPU path.
    #[cfg(feature = "gpu")]
    pub gpu: GpuOptions,
}

/// The chosen backend.
#[derive(Debug)]
pub enum AnyBackend {
    Cpu(Cpu),
    Host(Host),
    /// Boxed: a wgpu device is large beside the others.
    #[cfg(feature = "gpu")]
    Gpu(Box<Gpu>),
}

/// A buffer of an [`AnyBackend`]: the CPU paths share the reference's buffers.
#[derive(Debug)]
pub enum AnyBuffer {
    Cpu(CpuBuffer),
    #[cfg(feature = "gpu")]
    Gpu(GpuBuffer),
}

impl AnyBuffer {
    fn cpu(&self) -> Option<&CpuBuffer> {
        match self {
            AnyBuffer::Cpu(b) => Some(b),
            #[cfg(feature = "gpu")]
            AnyBuffer::Gpu(_) => None,
        }
    }

    #[cfg(feature = "gpu")]
    fn gpu(&self) -> Option<&GpuBuffer> {
        match self {
            AnyBuffer::Gpu(b) => Some(b),
            AnyBuffer::Cpu(_) => None,
        }
    }
}

fn foreign(op: &'static str) -> Error {
    Error::InvalidArgument {
        name: "buffer",
        reason: format!("{op} was given a buffer made by another backend"),
    }
}

impl AnyBackend {
    /// Opens the backend `opts` asks for. For [`BackendKind::Auto`] also says why it chose
    /// what it did (for a skin to show).
    pub fn open(opts: &BackendOptions) -> Result<(AnyBackend, Option<String>)> {
        let host = || -> Result<AnyBackend> {
            let threads = opts
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            match opts.isa {
                None => Ok(AnyBackend::Host(Host::new(threads))),
                Some(isa) => Host::with_isa(threads, isa)
                    .map(AnyBackend::Host)
                    .ok_or_else(|| Error::InvalidArgument {
                        name: "instruction set",
                        reason: format!("this processor cannot run the {} variant", isa.name()),
                    }),
            }
        };
        match opts.kind {
            BackendKind::Cpu => Ok((AnyBackend::Cpu(Cpu), None)),
            BackendKind::Host => Ok((host()?, None)),
            #[cfg(feature = "gpu")]
            BackendKind::Gpu => Ok((AnyBackend::Gpu(Box::new(Gpu::open(&opts.gpu)?)), None)),
            #[cfg(feature = "gpu")]
            BackendKind::Auto => {
                let real = GpuOptions {
                    real_gpu_only: true,
                    ..opts.gpu.clone()
                };
                match Gpu::open(&real) {
                    Ok(g) => Ok((AnyBackend::Gpu(Box::new(g)), Some("a GPU".into()))),
                    Err(e) => Ok((
                        host()?,
                        Some(format!("{e}; --backend gpu takes any adapter")),
                    )),
                }
            }
            #[cfg(not(feature = "gpu"))]
            BackendKind::Gpu => Err(Error::NoAdapter {
                reason: "this build has no GPU backend (feature `gpu`)".into(),
            }),
            #[cfg(not(feature = "gpu"))]
            BackendKind::Auto => Ok((host()?, Some("this build has no GPU backend".into()))),
        }
    }

    /// The wgpu device, if that is what this is.
    #[cfg(feature = "gpu")]
    pub fn gpu(&self) -> Option<&Gpu> {
        match self {
            AnyBackend::Gpu(g) => Some(g),
            _ => None,
        }
    }
}

impl Backend for AnyBackend {
    type Buffer = AnyBuffer;

    fn name(&self) -> String {
        match self {
            AnyBackend::Cpu(c) => c.name(),
            AnyBackend::Host(h) => h.name(),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => format!("wgpu, {}", g.report().name),
        }
    }

    fn alloc(&self, bytes: u64, what: &'static str) -> Result<AnyBuffer> {
        match self {
            AnyBackend::Cpu(c) => c.alloc(bytes, what).map(AnyBuffer::Cpu),
            AnyBackend::Host(h) => h.alloc(bytes, what).map(AnyBuffer::Cpu),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => g.alloc(bytes, what).map(AnyBuffer::Gpu),
        }
    }

    fn upload(&self, data: &[u8], what: &'static str) -> Result<AnyBuffer> {
        match self {
            AnyBackend::Cpu(c) => c.upload(data, what).map(AnyBuffer::Cpu),
            AnyBackend::Host(h) => h.upload(data, what).map(AnyBuffer::Cpu),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => g.upload(data, what).map(AnyBuffer::Gpu),
        }
    }

    fn upload_weights(
        &self,
        wtype: WeightType,
        data: &[u8],
        cols: u32,
        what: &'static str,
    ) -> Result<AnyBuffer> {
        match self {
            AnyBackend::Cpu(c) => c
                .upload_weights(wtype, data, cols, what)
                .map(AnyBuffer::Cpu),
            AnyBackend::Host(h) => h
                .upload_weights(wtype, data, cols, what)
                .map(AnyBuffer::Cpu),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => g
                .upload_weights(wtype, data, cols, what)
                .map(AnyBuffer::Gpu),
        }
    }

    fn fuses_norm(&self, wtype: WeightType, n: u32) -> bool {
        match self {
            AnyBackend::Cpu(c) => c.fuses_norm(wtype, n),
            AnyBackend::Host(h) => h.fuses_norm(wtype, n),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => g.fuses_norm(wtype, n),
        }
    }

    fn size(&self, buf: &AnyBuffer) -> u64 {
        match buf {
            AnyBuffer::Cpu(b) => Cpu.size(b),
            #[cfg(feature = "gpu")]
            AnyBuffer::Gpu(b) => match self {
                AnyBackend::Gpu(g) => g.size(b),
                // A buffer of another backend: every op and read rejects it by name.
                _ => 0,
            },
        }
    }

    fn read(&self, buf: &AnyBuffer) -> Result<Vec<u8>> {
        match self {
            AnyBackend::Cpu(c) => c.read(buf.cpu().ok_or_else(|| foreign("read"))?),
            AnyBackend::Host(h) => h.read(buf.cpu().ok_or_else(|| foreign("read"))?),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => g.read(buf.gpu().ok_or_else(|| foreign("read"))?),
        }
    }

    fn run(&self, op: &Op<'_, AnyBuffer>) -> Result<()> {
        match self {
            AnyBackend::Cpu(c) => c.run(
                &op.map_buffers(AnyBuffer::cpu)
                    .ok_or_else(|| foreign("an op"))?,
            ),
            AnyBackend::Host(h) => h.run(
                &op.map_buffers(AnyBuffer::cpu)
                    .ok_or_else(|| foreign("an op"))?,
            ),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => g.run(
                &op.map_buffers(AnyBuffer::gpu)
                    .ok_or_else(|| foreign("an op"))?,
            ),
        }
    }

    fn sync(&self) -> Result<()> {
        match self {
            AnyBackend::Cpu(c) => c.sync(),
            AnyBackend::Host(h) => h.sync(),
            #[cfg(feature = "gpu")]
            AnyBackend::Gpu(g) => g.sync(),
        }
    }
}
