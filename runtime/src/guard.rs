//! The panic boundary around third-party parsers and encoders (tokenizers, safetensors):
//! whatever they do with hostile input, a panic inside them becomes
//! [`Error::DependencyPanic`] instead of unwinding through edgetune into the host app.
//!
//! The boundary needs panics to unwind: a binary built with `panic = "abort"` (a profile
//! setting of the final application) aborts inside the dependency before any boundary is
//! reached. edgetune's own binaries keep the default, `unwind`.
//!
//! Rust's default panic hook still prints a caught panic to stderr. A skin (the CLI, the
//! C API) that wants caught panics silent calls [`quiet_caught_panics`] once; panics
//! outside a boundary still reach the previous hook.

use crate::error::{Error, Result};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::prelude::v1::*;

std::thread_local! {
    /// How many boundaries the current thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f`, a call into `library`, turning a panic into an error that names `context`
/// (the file or operation). `f` must not leave shared state half-updated on a panic: the
/// calls we guard either build a value that is then dropped, or read through `&self`.
pub fn guarded<T>(library: &'static str, context: &str, f: impl FnOnce() -> T) -> Result<T> {
    DEPTH.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    result.map_err(|payload| Error::DependencyPanic {
        library,
        context: context.to_owned(),
        message: payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into()),
    })
}

/// Installs (once per process) a panic hook that says nothing about panics caught by
/// [`guarded`] (they are reported as errors) and passes every other panic to the hook that
/// was installed before.
pub fn quiet_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if DEPTH.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_typed_error() {
        quiet_caught_panics();
        #[allow(clippy::panic)]
        let e = guarded("demo", "input.json", || -> u32 {
            core::panic!("index 7 out of range")
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input.json: the `demo` library failed on this input (it panicked: index 7 out of range)"
        );
        assert_eq!(guarded("demo", "x", || 5).unwrap(), 5);
        DEPTH.with(|d| assert_eq!(d.get(), 0));
    }
}
