//! Model files on std targets: memory-mapped, so tensor data is read in place and never
//! copied as a whole.

use crate::error::{Error, Result};
use std::path::Path;
use std::prelude::v1::*;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
    path: String,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<MappedFile> {
        let shown = path.display().to_string();
        let io = |e: std::io::Error| Error::Io {
            path: shown.clone(),
            message: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. If another process
        // truncates or rewrites the file while it is mapped, reads may fault or see the
        // new bytes; every read goes through bounds checks against the length the header
        // was validated with, so no out-of-bounds access can follow from the contents.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
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
