//! Typed errors. Every failure names what went wrong and where; nothing in the library
//! panics on bad input, device loss or out-of-memory. Text taken from files (keys, tensor
//! names, values) is shown with control characters escaped, so a message cannot rewrite
//! the user's terminal.

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
    /// The device (the GPU, or host memory for the CPU reference) ran out of memory
    /// creating a resource.
    OutOfMemory { what: &'static str, bytes: u64 },
    /// Any other error the GPU API reported (validation, internal), with context.
    Gpu {
        context: &'static str,
        message: String,
    },
    /// A file could not be opened or read.
    Io { path: String, message: String },
    /// A path names something other than a regular file (a directory, FIFO, device or
    /// socket): edgetune reads only regular files, so it never blocks on a pipe.
    NotAFile { path: String, found: &'static str },
    /// A file is larger than edgetune reads for its kind.
    FileTooLarge {
        path: String,
        kind: &'static str,
        bytes: u64,
        limit: u64,
    },
    /// A file is not well formed (JSON, text, a safetensors header); `line` is 0 where
    /// the format has no lines.
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A metadata value (a config.json key, a GGUF key) is missing, of the wrong type, out
    /// of range, or disagrees with another value or with the tensors the file holds.
    Metadata {
        file: String,
        key: String,
        reason: String,
    },
    /// A tensor is missing, of an unsupported type, or of a shape the metadata does not
    /// imply.
    Tensor {
        file: String,
        tensor: String,
        reason: String,
    },
    /// A tokenizer could not be built from its description, or could not run.
    Tokenizer { source: String, reason: String },
    /// A third-party library panicked; the panic was caught at edgetune's boundary.
    DependencyPanic {
        library: &'static str,
        context: String,
        message: String,
    },
    /// A parameter of a call is out of its range (a count, a probability, a window).
    InvalidArgument { name: &'static str, reason: String },
    /// A result holds NaN or infinity; `at` names the first such value.
    NonFinite { what: &'static str, at: String },
    /// A GGUF file is malformed.
    Gguf {
        path: String,
        error: crate::format::gguf::GgufError,
    },
    /// A federated message is malformed or does not belong here (`what` names it).
    Protocol {
        what: String,
        error: edgetune_proto::ProtoError,
    },
    /// A federated message is well formed but out of turn or for another model.
    Federation { reason: String },
    /// After applying round `round` the trainable state's hash is not the published one:
    /// nothing was kept; the client needs a checkpoint.
    StateMismatch {
        round: u32,
        expected: String,
        found: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Messages quote names and values from files: escape their control characters here,
        // once, for every variant.
        let raw = self.raw_message();
        for c in raw.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl Error {
    fn raw_message(&self) -> String {
        struct Raw<'a>(&'a Error);
        impl fmt::Display for Raw<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.write_raw(f)
            }
        }
        Raw(self).to_string()
    }

    fn write_raw(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
                write!(f, "out of memory allocating {bytes} bytes for {what}")
            }
            Error::Gpu { context, message } => write!(f, "GPU error in {context}: {message}"),
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::Gguf { path, error } => write!(f, "{path}: {error}"),
            Error::Protocol { what, error } => write!(f, "{what}: {error}"),
            Error::Federation { reason } => write!(f, "federation: {reason}"),
            Error::StateMismatch {
                round,
                expected,
                found,
            } => write!(
                f,
                "round {round}: the state hash is {found}, the server published {expected}; nothing applied"
            ),
            Error::NotAFile { path, found } => {
                write!(f, "{path}: is {found}, not a regular file")
            }
            Error::FileTooLarge {
                path,
                kind,
                bytes,
                limit,
            } => write!(
                f,
                "{path}: {bytes} bytes is more than edgetune reads for a {kind} ({limit} bytes)"
            ),
            // Binary formats have no lines: line 0 means no position.
            Error::Syntax {
                path,
                line: 0,
                message,
                ..
            } => write!(f, "{path}: {message}"),
            Error::Syntax {
                path,
                line,
                column,
                message,
            } => write!(f, "{path}:{line}:{column}: {message}"),
            Error::Metadata { file, key, reason } => write!(f, "{file}: `{key}`: {reason}"),
            Error::Tensor {
                file,
                tensor,
                reason,
            } => write!(f, "{file}: tensor `{tensor}`: {reason}"),
            Error::Tokenizer { source, reason } => write!(f, "{source}: tokenizer: {reason}"),
            Error::DependencyPanic {
                library,
                context,
                message,
            } => write!(
                f,
                "{context}: the `{library}` library failed on this input (it panicked: {message})"
            ),
            Error::InvalidArgument { name, reason } => write!(f, "{name}: {reason}"),
            Error::NonFinite { what, at } => {
                write!(
                    f,
                    "{what} are not finite: the first NaN or infinity is at {at}"
                )
            }
        }
    }
}

impl core::error::Error for Error {}
