//! Opaque handles: a tag naming the kind at offset 0, then the value, boxed. The C side
//! sees pointers to empty structs; a handle of another kind is caught by its tag, and
//! `*_free` sets the caller's pointer to NULL so a second free through it is a no-op. A
//! handle freed through another copy of the pointer is undefined behaviour, as with free().

use crate::error::{Fail, et_result};

#[repr(C)]
struct Tagged<T> {
    tag: u64,
    value: T,
}

/// A Rust value behind a C handle type `C`.
pub(crate) trait Kind: Sized {
    /// Distinct per kind, never 0.
    const TAG: u64;
    const NAME: &'static str;
    /// The opaque type the header declares.
    type C;
}

/// Boxes `value` and writes its handle to `*out` (checked non-NULL by the caller).
pub(crate) fn publish<T: Kind>(value: T, out: *mut *mut T::C) {
    let raw = Box::into_raw(Box::new(Tagged { tag: T::TAG, value }));
    // SAFETY: the caller checked `out` and the C contract gives a writable pointer slot.
    unsafe { *out = raw.cast() };
}

/// The value behind `p`, if `p` is a live handle of kind `T`.
///
/// # Safety
/// `p` is NULL or a pointer returned by this library and not yet freed (every handle
/// starts with its u64 tag, so reading it is valid for a handle of any kind).
pub(crate) unsafe fn get<'a, T: Kind>(p: *const T::C) -> Result<&'a T, Fail> {
    if p.is_null() {
        return Err(Fail::null(T::NAME));
    }
    // SAFETY: per the contract above, `p` points at a live Tagged<_> whose first field is
    // the u64 tag.
    let tag = unsafe { p.cast::<u64>().read() };
    if tag != T::TAG {
        return Err(Fail::new(
            et_result::ET_WRONG_HANDLE,
            format!("`{}` is not a live {} handle", T::NAME, T::NAME),
        ));
    }
    // SAFETY: the tag says this is a Tagged<T> made by `publish`.
    Ok(unsafe { &(*p.cast::<Tagged<T>>()).value })
}

/// The value behind `p` for a call that changes it (see [`get`]).
///
/// # Safety
/// As for [`get`]; no other reference to the handle's value is live.
pub(crate) unsafe fn get_mut<'a, T: Kind>(p: *mut T::C) -> Result<&'a mut T, Fail> {
    // SAFETY: `get` checks NULL and the tag; the pointer is the caller's mutable handle.
    unsafe { get::<T>(p.cast_const()) }?;
    // SAFETY: checked above to be a live Tagged<T>.
    Ok(unsafe { &mut (*p.cast::<Tagged<T>>()).value })
}

/// Frees the handle at `*pp` and sets `*pp` to NULL; NULL (either) is a no-op, as is a
/// pointer whose tag is not `T`'s (nothing is freed that this kind did not make).
///
/// # Safety
/// `pp` is NULL or points at a handle slot as in [`get`].
pub(crate) unsafe fn free<T: Kind>(pp: *mut *mut T::C) {
    if pp.is_null() {
        return;
    }
    // SAFETY: `pp` is a valid slot per the contract.
    let p = unsafe { *pp };
    // SAFETY: as in `get`.
    if p.is_null() || unsafe { p.cast::<u64>().read() } != T::TAG {
        return;
    }
    let tagged = p.cast::<Tagged<T>>();
    // SAFETY: the tag says this box was made by `publish` for T; the slot is cleared so
    // the caller's pointer cannot free it twice.
    unsafe {
        *pp = std::ptr::null_mut();
        drop(Box::from_raw(tagged));
    }
}
