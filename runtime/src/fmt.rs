//! The one logging shim: `defmt` on embedded targets, `log` on hosts, or nothing.
//! Every log line in the crate goes through these macros, so the sink is chosen by feature
//! and call sites carry no `cfg`.

#[cfg(all(feature = "defmt", feature = "log"))]
compile_error!("features `defmt` and `log` are mutually exclusive");

// Only std-side modules log so far; the core keeps the shim for its later users.
#[cfg_attr(not(feature = "gpu"), allow(unused_macros))]
macro_rules! debug_ {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        ::defmt::debug!($($arg)*);
        #[cfg(feature = "log")]
        ::log::debug!($($arg)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        let _ = ($($arg)*);
    }};
}
