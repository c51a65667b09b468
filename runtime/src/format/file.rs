//! The one way edgetune opens files on std targets. Every file a user hands over (a model,
//! a directory's config, shards and tokenizer, a text to score) comes through
//! [`open_regular`]: only regular files are accepted (a FIFO would block the open, a
//! device could stream forever), each kind of file has a size cap checked before anything
//! is read, and every error names the file. Model files are then memory-mapped, so tensor
//! data is read in place and never copied as a whole.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::prelude::v1::*;

/// What a file is for, which sets the most edgetune will read of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A GGUF file or a safetensors shard: memory-mapped, never read whole.
    Weights,
    /// A model directory's config.json.
    Config,
    /// model.safetensors.index.json.
    ShardIndex,
    /// tokenizer.json.
    Tokenizer,
    /// tokenizer_config.json (chat template, special tokens).
    TokenizerConfig,
    /// A UTF-8 text to score or train on.
    Text,
    /// A cached choice of GPU kernel shapes (backend::tune).
    TuneCache,
    /// A JSONL training or evaluation set.
    Data,
    /// A seed history or training session file (train::history).
    History,
    /// An adapter's tensors (adapter_model.safetensors) or config.
    Adapter,
}

const MIB: u64 = 1 << 20;

impl FileKind {
    /// The largest file of this kind edgetune accepts, in bytes. Real files are far below:
    /// config.json a few KiB, tokenizer.json up to about 35 MiB (Gemma 3's 262k tokens).
    pub fn limit(self) -> u64 {
        match self {
            FileKind::Weights => 1 << 40,
            FileKind::Config => MIB,
            FileKind::ShardIndex => 16 * MIB,
            FileKind::Tokenizer => 64 * MIB,
            FileKind::TokenizerConfig => 16 * MIB,
            FileKind::Text => 256 * MIB,
            FileKind::TuneCache => MIB,
            FileKind::Data => 1 << 30,
            FileKind::History => 256 * MIB,
            FileKind::Adapter => crate::adapter::MAX_FILE_BYTES,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            FileKind::Weights => "model file",
            FileKind::Config => "config.json",
            FileKind::ShardIndex => "shard index",
            FileKind::Tokenizer => "tokenizer.json",
            FileKind::TokenizerConfig => "tokenizer_config.json",
            FileKind::Text => "text file",
            FileKind::TuneCache => "kernel shape cache",
            FileKind::Data => "JSONL data file",
            FileKind::History => "seed history",
            FileKind::Adapter => "adapter file",
        }
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// What a non-regular file is, for the error message.
fn describe(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// Opens `path` for reading if it is a regular file no larger than `kind`'s cap; returns
/// the file and its length.
pub fn open_regular(path: &Path, kind: FileKind) -> Result<(File, u64)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Non-blocking, so opening a FIFO with no writer returns at once instead of waiting;
    // the type check below then rejects it. Regular files ignore the flag.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| io_error(path, &e))?;
    // The type and size of what was opened, not of what the path named a moment earlier.
    let meta = file.metadata().map_err(|e| io_error(path, &e))?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: path.display().to_string(),
            found: describe(&meta),
        });
    }
    let len = meta.len();
    if len > kind.limit() {
        return Err(Error::FileTooLarge {
            path: path.display().to_string(),
            kind: kind.label(),
            bytes: len,
            limit: kind.limit(),
        });
    }
    Ok((file, len))
}

/// The whole of a file of `kind`, at most its cap (a file growing while it is read is cut
/// off there and reported).
pub fn read_bounded(path: &Path, kind: FileKind) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, kind)?;
    let mut bytes = Vec::new();
    // `len` is within the cap, which fits in memory on every host we support.
    bytes
        .try_reserve_exact(usize::try_from(len).unwrap_or(usize::MAX))
        .map_err(|_| Error::FileTooLarge {
            path: path.display().to_string(),
            kind: kind.label(),
            bytes: len,
            limit: kind.limit(),
        })?;
    file.take(kind.limit() + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, &e))?;
    if bytes.len() as u64 > kind.limit() {
        return Err(Error::FileTooLarge {
            path: path.display().to_string(),
            kind: kind.label(),
            bytes: bytes.len() as u64,
            limit: kind.limit(),
        });
    }
    Ok(bytes)
}

/// A UTF-8 text file of `kind`.
pub fn read_text(path: &Path, kind: FileKind) -> Result<String> {
    let bytes = read_bounded(path, kind)?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
            + 1;
        Error::Syntax {
            path: path.display().to_string(),
            line,
            column,
            message: format!("invalid UTF-8 at byte {at}"),
        }
    })
}

/// A JSON file of `kind`, parsed. serde_json limits nesting to 128 levels, so a deeply
/// nested file is an error rather than a stack overflow.
pub fn read_json(path: &Path, kind: FileKind) -> Result<serde_json::Value> {
    parse_json(&read_bounded(path, kind)?, &path.display().to_string())
}

/// JSON from bytes already in memory; `name` is what errors call it.
pub fn parse_json(bytes: &[u8], name: &str) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|e| {
        // The position is shown as path:line:column; drop serde_json's own copy of it.
        let text = e.to_string();
        let message = text
            .rsplit_once(" at line ")
            .map_or(text.as_str(), |(m, _)| m)
            .to_owned();
        Error::Syntax {
            path: name.to_owned(),
            line: e.line(),
            column: e.column(),
            message,
        }
    })
}

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
    path: String,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<MappedFile> {
        let shown = path.display().to_string();
        let (file, _) = open_regular(path, FileKind::Weights)?;
        // SAFETY: the map is read-only and private to this process. If another process
        // truncates or rewrites the file while it is mapped, reads may fault or see the
        // new bytes; every read goes through bounds checks against the length the header
        // was validated with, so no out-of-bounds access can follow from the contents.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_error(path, &e))?;
        Ok(MappedFile { map, path: shown })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Drops the pages of `range` (byte offsets) from memory; see [`MappedFile::release_pages`].
    pub fn release_range(&self, range: core::ops::Range<usize>) {
        if range.start >= range.end || range.end > self.map.len() {
            return;
        }
        // SAFETY: as in `release_pages`; the range lies inside the mapping (checked above).
        #[allow(unsafe_code)]
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.end - range.start,
            )
        };
    }

    /// Drops the pages read so far from memory (they are read again from the file if
    /// touched): once a model's weights are on the device, its file need not stay resident.
    pub fn release_pages(&self) {
        // SAFETY: MADV_DONTNEED on a read-only, file-backed private mapping only discards
        // clean page-cache copies; later reads fault the same bytes back in from the file.
        #[allow(unsafe_code)]
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

/// A memory-mapped GGUF file with its parsed header.
#[derive(Debug)]
pub struct GgufFile {
    file: MappedFile,
    pub header: crate::format::gguf::Gguf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = MappedFile::open(path)?;
        let header =
            crate::format::gguf::Gguf::parse(file.bytes()).map_err(|error| Error::Gguf {
                path: file.path().to_owned(),
                error,
            })?;
        Ok(GgufFile { file, header })
    }

    /// See [`MappedFile::release_pages`].
    pub fn release_pages(&self) {
        self.file.release_pages();
    }

    /// See [`MappedFile::release_range`].
    pub fn release_range(&self, range: core::ops::Range<usize>) {
        self.file.release_range(range);
    }

    /// The whole file (tensor data is borrowed from here).
    pub fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    pub fn path(&self) -> &str {
        self.file.path()
    }
}

/// Writes `bytes` to `path` atomically: into a temporary file beside it, synced, then
/// renamed into place, so a reader (or a crash) never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Unique per process and call: two writers in one process must not share a temporary.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}-{call}", std::process::id()));
    let tmp = path.with_file_name(name);
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename is durable once the directory is: a file acknowledged as written survives
    // a power loss (directories can be opened and synced on Unix).
    #[cfg(unix)]
    {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// SHA-256 of a file of `kind` (within its size cap).
pub fn sha256_file(path: &Path, kind: FileKind) -> Result<[u8; 32]> {
    Ok(sha256_bytes(&read_bounded(path, kind)?))
}

/// SHA-256 of bytes in memory (a model loaded from memory is pinned by it as a file is).
pub fn sha256_bytes(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}
