//! Shared helpers for the GPU suites.

use edgetune::backend::wgpu::{Gpu, GpuOptions};

/// The GPU chosen by the environment (WGPU_BACKEND, WGPU_ADAPTER_NAME). Without one, the
/// test is skipped with a message, except under CI=true, where a missing GPU fails: GPU
/// tests must never pass by skipping there.
pub fn gpu() -> Option<Gpu> {
    match Gpu::open(&GpuOptions {
        cache_dir: Some(tune_cache()),
        ..GpuOptions::default()
    }) {
        Ok(g) => Some(g),
        Err(e) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI=true but no GPU adapter is available: {e}");
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// The tests' own kernel shape cache: shapes measured while other tests load the machine
/// are fine for checking results but must not become what the user's commands run with.
pub fn tune_cache() -> std::path::PathBuf {
    std::env::temp_dir().join("edgetune-test-autotune")
}
