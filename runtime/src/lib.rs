//! edgetune: an on-device tuning runtime.
//!
//! Data flows top to bottom through the modules: model file -> [`format`](mod@format) readers ->
//! [`quant`] blocks -> [`backend`] (the CPU reference or wgpu) -> [`model`] ->
//! [`generate`] (later: train -> sync). The core ([`format::gguf`], [`quant`], [`rng`],
//! [`backend::cpu`], [`model`], [`generate`]) builds without `std` (alloc only) so it can
//! run on a microcontroller; file maps, tokenizers, the wgpu backend and the conformance
//! suite need `std`.
#![no_std]

// The std/core facade: with `std` this is std itself, without it core + alloc.
#[allow(unused_imports)]
#[macro_use]
extern crate no_std_compat as std;

// Declared first so every other module can use its macros.
#[macro_use]
mod fmt;

pub mod adapter;
pub mod backend;
pub mod error;
#[cfg(feature = "std")]
pub mod fed;
pub mod format;
pub mod generate;
#[cfg(feature = "std")]
pub mod guard;
pub mod held;
pub mod model;
pub mod quant;
pub mod rng;
#[cfg(feature = "std")]
pub mod selftest;
#[cfg(feature = "std")]
pub mod tokenizer;
pub mod train;

pub use backend::{Backend, Op};
pub use error::{Error, Result};
pub use quant::WeightType;
