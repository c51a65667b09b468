//! Result codes, the panic boundary, and the calling thread's last detailed message.

use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// What a call did. 0 is success; the numbers are stable: new codes are only added.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum et_result {
    ET_OK = 0,
    /// A pointer that must not be NULL was NULL.
    ET_NULL_POINTER = 1,
    /// A handle of another kind was passed (a freed handle is undefined behaviour, as
    /// with free(): `_free(&h)` sets `h` to NULL so a second free is a no-op).
    ET_WRONG_HANDLE = 2,
    /// A string was not valid UTF-8.
    ET_INVALID_UTF8 = 3,
    /// An argument was out of range or inconsistent (see the detailed message).
    ET_INVALID_ARGUMENT = 4,
    /// The caller's output buffer is too small; nothing was written.
    ET_BUFFER_TOO_SMALL = 5,
    /// A file could not be opened, read or written.
    ET_IO = 6,
    /// A model, tokenizer or adapter file is malformed or unsupported.
    ET_BAD_FILE = 7,
    /// Memory (host or device) ran out, or a buffer exceeds the device's limits.
    ET_OUT_OF_MEMORY = 8,
    /// The GPU was not found, refused a device, or was lost.
    ET_DEVICE = 9,
    /// The caller's cancel flag was set.
    ET_CANCELLED = 10,
    /// The caller's callback returned non-zero.
    ET_CALLBACK = 11,
    /// The runtime panicked (caught at the boundary). The handles the call used may be
    /// left inconsistent: free them.
    ET_PANIC = 12,
    /// Non-finite numbers appeared (a model or adapter holding nonsense).
    ET_NON_FINITE = 13,
    /// A federated message is malformed, or belongs to another session, model or adapter.
    ET_PROTOCOL = 14,
    /// The client's state does not reproduce a round's published digest (nothing was
    /// applied): restore a checkpoint from the server.
    ET_STATE_MISMATCH = 15,
    /// The model is in use by a trainer or federated client, which must be freed before
    /// its adapter changes.
    ET_BUSY = 16,
}

impl et_result {
    fn describe(self) -> &'static str {
        match self {
            et_result::ET_OK => "success",
            et_result::ET_NULL_POINTER => "a required pointer was NULL",
            et_result::ET_WRONG_HANDLE => "a handle of another kind was passed",
            et_result::ET_INVALID_UTF8 => "a string was not valid UTF-8",
            et_result::ET_INVALID_ARGUMENT => "an argument is out of range",
            et_result::ET_BUFFER_TOO_SMALL => "the output buffer is too small",
            et_result::ET_IO => "a file could not be read or written",
            et_result::ET_BAD_FILE => "a file is malformed or unsupported",
            et_result::ET_OUT_OF_MEMORY => "out of memory",
            et_result::ET_DEVICE => "GPU device error",
            et_result::ET_CANCELLED => "cancelled by the caller",
            et_result::ET_CALLBACK => "the callback returned an error",
            et_result::ET_PANIC => "internal error (a panic was caught)",
            et_result::ET_NON_FINITE => "non-finite numbers appeared",
            et_result::ET_PROTOCOL => "a federated message was refused",
            et_result::ET_STATE_MISMATCH => "the state does not match the round's digest",
            et_result::ET_BUSY => "the model is in use by a trainer or client",
        }
    }

    /// The code of a number, if it is one.
    fn from_code(code: u32) -> Option<et_result> {
        use et_result::*;
        [
            ET_OK,
            ET_NULL_POINTER,
            ET_WRONG_HANDLE,
            ET_INVALID_UTF8,
            ET_INVALID_ARGUMENT,
            ET_BUFFER_TOO_SMALL,
            ET_IO,
            ET_BAD_FILE,
            ET_OUT_OF_MEMORY,
            ET_DEVICE,
            ET_CANCELLED,
            ET_CALLBACK,
            ET_PANIC,
            ET_NON_FINITE,
            ET_PROTOCOL,
            ET_STATE_MISMATCH,
            ET_BUSY,
        ]
        .into_iter()
        .find(|r| *r as u32 == code)
    }
}

/// A failed call: its code and the detailed message kept for `et_error_text`.
#[derive(Debug)]
pub(crate) struct Fail {
    pub code: et_result,
    pub message: String,
}

impl Fail {
    pub(crate) fn new(code: et_result, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn null(what: &str) -> Fail {
        Fail::new(et_result::ET_NULL_POINTER, format!("`{what}` is NULL"))
    }
}

impl From<edgetune::Error> for Fail {
    fn from(e: edgetune::Error) -> Fail {
        use edgetune::Error as E;
        let code = match &e {
            E::Io { .. } | E::NotAFile { .. } => et_result::ET_IO,
            E::Syntax { .. }
            | E::Metadata { .. }
            | E::Tensor { .. }
            | E::Tokenizer { .. }
            | E::Gguf { .. }
            | E::FileTooLarge { .. } => et_result::ET_BAD_FILE,
            E::DependencyPanic { .. } => et_result::ET_PANIC,
            E::OutOfMemory { .. } | E::BufferTooLarge { .. } => et_result::ET_OUT_OF_MEMORY,
            E::NoAdapter { .. }
            | E::NoMatchingAdapter { .. }
            | E::RequestDevice { .. }
            | E::DeviceLost { .. }
            | E::Gpu { .. }
            | E::MissingFeature { .. } => et_result::ET_DEVICE,
            E::NonFinite { .. } => et_result::ET_NON_FINITE,
            E::Protocol { .. } | E::Federation { .. } => et_result::ET_PROTOCOL,
            E::StateMismatch { .. } => et_result::ET_STATE_MISMATCH,
            _ => et_result::ET_INVALID_ARGUMENT,
        };
        Fail::new(code, e.to_string())
    }
}

thread_local! {
    /// The calling thread's last failure, for `et_error_text`.
    static LAST: RefCell<Option<(et_result, String)>> = const { RefCell::new(None) };
}

/// Runs `f` inside the panic boundary: its failure or panic becomes a result code and the
/// thread's last message.
pub(crate) fn boundary(f: impl FnOnce() -> Result<(), Fail>) -> et_result {
    let fail = match caught(f) {
        Ok(()) => return et_result::ET_OK,
        Err(fail) => fail,
    };
    let code = fail.code;
    // A thread-local that is being destroyed cannot take the message; the code still
    // reaches the caller.
    let _ = LAST.try_with(|l| *l.borrow_mut() = Some((code, fail.message)));
    code
}

/// `f` inside `catch_unwind`, a panic as an ET_PANIC failure. The payload is dropped inside
/// a second `catch_unwind` (a payload whose drop panics would otherwise abort the host
/// app); the payload of such a panic is forgotten.
fn caught(f: impl FnOnce() -> Result<(), Fail>) -> Result<(), Fail> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            if let Err(again) = catch_unwind(AssertUnwindSafe(|| drop(payload))) {
                std::mem::forget(again);
            }
            Err(Fail::new(et_result::ET_PANIC, text))
        }
    }
}

/// The library's version, a static NUL-terminated string ("0.1.0"); the header's
/// `ET_VERSION` is the same.
#[unsafe(no_mangle)]
pub extern "C" fn et_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Writes the description of `code`, followed by the calling thread's last detailed
/// message if its last failure had that code, into `buf` (`len` bytes, NUL-terminated,
/// cut at a UTF-8 character boundary if it does not fit: the one function that cuts rather
/// than fails), and the bytes written without the NUL into `*out_len`. `buf` may be NULL
/// only with `len` 0 (then only `*out_len` is written: the full length). Its own failures
/// are returned but not recorded, so the message it reports survives them.
#[unsafe(no_mangle)]
pub extern "C" fn et_error_text(
    code: u32,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> et_result {
    let r = caught(|| {
        if out_len.is_null() {
            return Err(Fail::null("out_len"));
        }
        if buf.is_null() && len != 0 {
            return Err(Fail::null("buf"));
        }
        let Some(result) = et_result::from_code(code) else {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                format!("{code} is not an et_result code"),
            ));
        };
        let mut text = result.describe().to_owned();
        let detail = LAST
            .try_with(|l| l.borrow().clone())
            .ok()
            .flatten()
            .filter(|(c, _)| *c == result);
        if let Some((_, message)) = detail {
            text.push_str(": ");
            text.push_str(&message);
        }
        let n = if len == 0 {
            text.len()
        } else {
            let mut n = text.len().min(len - 1);
            while !text.is_char_boundary(n) {
                n -= 1;
            }
            // SAFETY: the caller gives `len` writable bytes at `buf` (non-NULL here); n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
            n
        };
        // SAFETY: checked non-NULL above; the caller gives a writable size_t.
        unsafe { *out_len = n };
        Ok(())
    });
    match r {
        Ok(()) => et_result::ET_OK,
        Err(f) => f.code,
    }
}

/// Panics inside the boundary (feature `panic-test`): the C tests' injected panic.
#[cfg(feature = "panic-test")]
#[unsafe(no_mangle)]
pub extern "C" fn et_debug_panic() -> et_result {
    #[allow(clippy::panic)]
    boundary(|| panic!("injected by et_debug_panic"))
}
