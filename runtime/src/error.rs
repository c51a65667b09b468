//! Typed errors. Every failure names what went wrong and where; nothing in the library
//! panics on bad input, device loss or out-of-memory.

use core::fmt;
use std::prelude::v1::*;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong in edgetune.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A buffer is smaller than the operation's shape requires.
    BufferTooSmall {
        op: &'static str,
        buffer: &'static str,
        needed: u64,
        actual: u64,
    },
    /// A shape or parameter is invalid for the operation (zero sizes, misaligned rows,
    /// sizes whose product overflows, ...).
    InvalidShape { op: &'static str, reason: String },
    /// A buffer or binding exceeds what the device allows.
    BufferTooLarge {
        what: &'static str,
        bytes: u64,
        limit: u64,
    },
    /// An index read from data is out of range (for example a token id >= vocabulary size).
    IndexOutOfRange {
        op: &'static str,
        index: u64,
        bound: u64,
    },
    /// The adapter lacks a feature the operation needs.
    MissingFeature {
        feature: &'static str,
        adapter: String,
    },
    /// No GPU adapter is available at all.
    NoAdapter { reason: String },
    /// An adapter was requested by name and none matched.
    NoMatchingAdapter {
        wanted: String,
        available: Vec<String>,
    },
    /// The device could not be created.
    RequestDevice { adapter: String, reason: String },
    /// The device was lost (driver reset, GPU removed, destroyed).
    DeviceLost { reason: String },
    /// The device ran out of memory creating a resource.
    OutOfMemory { what: &'static str, bytes: u64 },
    /// Any other error the GPU API reported (validation, internal), with context.
    Gpu {
        context: &'static str,
        message: String,
    },
    /// A file could not be opened or read.
    Io { path: String, message: String },
    /// A GGUF file is malformed.
    Gguf {
        path: String,
        error: crate::format::gguf::GgufError,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BufferTooSmall {
                op,
                buffer,
                needed,
                actual,
            } => write!(
                f,
                "{op}: buffer `{buffer}` holds {actual} bytes but the shape needs {needed}"
            ),
            Error::InvalidShape { op, reason } => write!(f, "{op}: invalid shape: {reason}"),
            Error::BufferTooLarge { what, bytes, limit } => write!(
                f,
                "{what}: {bytes} bytes exceeds the device limit of {limit} bytes"
            ),
            Error::IndexOutOfRange { op, index, bound } => {
                write!(f, "{op}: index {index} is out of range (must be < {bound})")
            }
            Error::MissingFeature { feature, adapter } => {
                write!(f, "adapter `{adapter}` lacks the `{feature}` feature")
            }
            Error::NoAdapter { reason } => write!(f, "no GPU adapter available: {reason}"),
            Error::NoMatchingAdapter { wanted, available } => write!(
                f,
                "no GPU adapter matches `{wanted}`; available: [{}]",
                available.join(", ")
            ),
            Error::RequestDevice { adapter, reason } => {
                write!(f, "could not open a device on `{adapter}`: {reason}")
            }
            Error::DeviceLost { reason } => write!(f, "GPU device lost: {reason}"),
            Error::OutOfMemory { what, bytes } => {
                write!(f, "out of GPU memory allocating {bytes} bytes for {what}")
            }
            Error::Gpu { context, message } => write!(f, "GPU error in {context}: {message}"),
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::Gguf { path, error } => write!(f, "{path}: {error}"),
        }
    }
}

impl core::error::Error for Error {}
