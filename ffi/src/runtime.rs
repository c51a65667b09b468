//! `et_runtime`: the chosen backend, shared by the models loaded on it; the conformance
//! suite as JSON.

use crate::error::{Fail, boundary, et_result};
use crate::handle::{self, Kind};
use edgetune::backend::any::{AnyBackend, BackendKind, BackendOptions};
use std::ffi::{CStr, CString, c_char};
use std::path::Path;
use std::sync::Arc;

/// A backend: a real GPU, the multi-threaded CPU path, the CPU reference, or any wgpu
/// adapter. Use it from one thread at a time; models loaded on it share it and may
/// outlive this handle.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct et_runtime {
    _opaque: [u8; 0],
}

/// A GPU if wgpu finds a real one, else the multi-threaded CPU path.
pub const ET_BACKEND_AUTO: u32 = 0;
/// The CPU reference: single-threaded, the oracle.
pub const ET_BACKEND_CPU: u32 = 1;
/// The multi-threaded CPU path.
pub const ET_BACKEND_HOST: u32 = 2;
/// Any wgpu adapter, CPU-emulated ones included.
pub const ET_BACKEND_GPU: u32 = 3;

/// How to open a runtime; pass NULL to `et_runtime_new` for the defaults (all zero).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct et_runtime_options {
    /// One of the ET_BACKEND_* values.
    pub backend: u32,
    /// Threads of the CPU path; 0 for the processor's count.
    pub threads: u32,
    /// A case-insensitive substring of the wgpu adapter's name (NUL-terminated UTF-8), or
    /// NULL for any.
    pub gpu_name: *const c_char,
}

pub(crate) struct Runtime {
    pub(crate) backend: Arc<AnyBackend>,
}

impl Kind for Runtime {
    const TAG: u64 = 0x6574_5f72_756e_7469; // "et_runti"
    const NAME: &'static str = "et_runtime";
    type C = et_runtime;
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is non-NULL and NUL-terminated.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|e| {
        Fail::new(
            et_result::ET_INVALID_UTF8,
            format!("`{what}` is not UTF-8: {e}"),
        )
    })
}

/// `len` bytes at `data` (NULL allowed when `len` is 0).
///
/// # Safety
/// The caller gives `len` readable bytes at `data`.
pub(crate) unsafe fn bytes<'a>(data: *const u8, len: usize, what: &str) -> Result<&'a [u8], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(Fail::null(what));
    }
    // SAFETY: per the contract above.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// The directory at `p` (NUL-terminated UTF-8), created if needed, for a call that writes
/// files into it.
///
/// # Safety
/// `p` is non-NULL and NUL-terminated.
pub(crate) unsafe fn out_dir<'a>(p: *const c_char, what: &str) -> Result<&'a Path, Fail> {
    // SAFETY: per the contract.
    let dir = Path::new(unsafe { c_str(p, what) }?);
    std::fs::create_dir_all(dir)
        .map_err(|e| Fail::new(et_result::ET_IO, format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Opens a runtime with `opts` (NULL: defaults) into `*out`.
#[unsafe(no_mangle)]
pub extern "C" fn et_runtime_new(
    opts: *const et_runtime_options,
    out: *mut *mut et_runtime,
) -> et_result {
    boundary(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let o = if opts.is_null() {
            et_runtime_options {
                backend: ET_BACKEND_AUTO,
                threads: 0,
                gpu_name: std::ptr::null(),
            }
        } else {
            // SAFETY: non-NULL, and the caller passes a valid options struct.
            unsafe { *opts }
        };
        let kind = match o.backend {
            ET_BACKEND_AUTO => BackendKind::Auto,
            ET_BACKEND_CPU => BackendKind::Cpu,
            ET_BACKEND_HOST => BackendKind::Host,
            ET_BACKEND_GPU => BackendKind::Gpu,
            other => {
                return Err(Fail::new(
                    et_result::ET_INVALID_ARGUMENT,
                    format!("backend {other} is not one of ET_BACKEND_AUTO..ET_BACKEND_GPU"),
                ));
            }
        };
        let gpu_name = if o.gpu_name.is_null() {
            None
        } else {
            // SAFETY: non-NULL; documented NUL-terminated.
            Some(unsafe { c_str(o.gpu_name, "gpu_name") }?.to_owned())
        };
        let options = BackendOptions {
            kind,
            threads: (o.threads > 0).then_some(o.threads as usize),
            isa: None,
            gpu: edgetune::backend::wgpu::GpuOptions {
                adapter_name: gpu_name,
                ..Default::default()
            },
        };
        let (backend, _) = AnyBackend::open(&options)?;
        handle::publish(
            Runtime {
                backend: Arc::new(backend),
            },
            out,
        );
        Ok(())
    })
}

/// Frees the runtime at `*rt` and sets `*rt` to NULL (NULL is a no-op). Models loaded on it
/// keep the backend alive until they are freed too.
#[unsafe(no_mangle)]
pub extern "C" fn et_runtime_free(rt: *mut *mut et_runtime) {
    // SAFETY: `rt` is NULL or a handle slot from this library (see the header).
    let _ = boundary(|| {
        unsafe { handle::free::<Runtime>(rt) };
        Ok(())
    });
}

/// Runs the conformance suite on the runtime's backend against the CPU reference (the
/// cases whose kernel name contains `kernel`, NUL-terminated UTF-8; NULL for all) and
/// writes a NUL-terminated JSON object `{"device": ..., "rows": [...]}` (one row per case:
/// kernel, shape, max_abs, max_rel, tolerance, pass, throughput, unit, error) to `*out`,
/// owned by the caller, not to be modified, and freed with `et_string_free`.
#[unsafe(no_mangle)]
pub extern "C" fn et_selftest_json(
    rt: *const et_runtime,
    kernel: *const c_char,
    out: *mut *const c_char,
) -> et_result {
    boundary(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        // SAFETY: `rt` is NULL or a handle from this library.
        let rt = unsafe { handle::get::<Runtime>(rt) }?;
        let kernel = if kernel.is_null() {
            None
        } else {
            // SAFETY: non-NULL, NUL-terminated per the contract.
            Some(unsafe { c_str(kernel, "kernel") }?)
        };
        let rows = edgetune::selftest::run_any(&rt.backend, kernel);
        let json = serde_json::json!({
            "device": edgetune::Backend::name(&*rt.backend),
            "rows": rows.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        });
        let text = CString::new(json.to_string())
            .map_err(|e| Fail::new(et_result::ET_INVALID_ARGUMENT, e.to_string()))?;
        // SAFETY: checked non-NULL.
        unsafe { *out = text.into_raw().cast_const() };
        Ok(())
    })
}

/// Frees a string `et_selftest_json` returned (unmodified) and sets `*s` to NULL (NULL is a
/// no-op). Not for `et_version()`'s static string.
#[unsafe(no_mangle)]
pub extern "C" fn et_string_free(s: *mut *const c_char) {
    let _ = boundary(|| {
        if s.is_null() {
            return Ok(());
        }
        // SAFETY: `s` is a valid slot; its string came from CString::into_raw here.
        unsafe {
            let p = *s;
            if !p.is_null() {
                *s = std::ptr::null_mut();
                drop(CString::from_raw(p.cast_mut()));
            }
        }
        Ok(())
    });
}
