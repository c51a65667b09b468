//! Model file readers: bounded, checked parsing into tensor indexes (no_std), and memory
//! maps of files on std targets.

#[cfg(feature = "std")]
pub mod file;
pub mod gguf;
