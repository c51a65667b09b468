//! Model implementations over the backend: one Llama family for every weight format.

pub mod config;
#[cfg(feature = "std")]
pub mod files;
pub mod llama;

pub use config::{Arch, Config};
pub use llama::{KvCache, Model};
