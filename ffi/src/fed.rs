//! `et_fed_client`: the device side of a federated session as message processing. The
//! app's own HTTP stack carries the bytes (docs/protocol.md): it fetches the session,
//! gets an upload built here, signs it with `et_fed_sign`, posts it, and hands each
//! published round back. What the client applied and uploaded is kept in its directory,
//! so a client made again on the same directory resumes with the same state.

use crate::error::{Fail, boundary, et_result};
use crate::handle::{self, Kind};
use crate::model::{Model_, et_model};
use crate::runtime::{bytes, out_dir};
use crate::train::{check_sizes, et_example, examples};
use edgetune::backend::any::AnyBackend;
use edgetune::fed::client::{Applied, Client};
use edgetune_proto::auth;
use std::ffi::c_char;

/// A federated client. Use it, and the model it was made on, from one thread at a time.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct et_fed_client {
    _opaque: [u8; 0],
}

pub(crate) struct Client_ {
    client: Client<'static, 'static, AnyBackend>,
    max_tokens: u32,
}

impl Kind for Client_ {
    const TAG: u64 = 0x6574_5f66_6564_636c; // "et_fedcl"
    const NAME: &'static str = "et_fed_client";
    type C = et_fed_client;
}

/// Joins the session whose message (kind 1, `session_len` bytes, as `GET /v1/session`
/// returns it) is at `session`, as client `client_id`, keeping its record in directory
/// `dir` (NUL-terminated UTF-8, created if needed; a client that ran there before resumes:
/// its rounds are reapplied and checked). The model must have the session's adapter
/// attached (its layout hash is checked) and be the session's model file; examples may be
/// up to `max_tokens` long. The model then holds the shared state's values.
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_client_new(
    model: *const et_model,
    session: *const u8,
    session_len: usize,
    client_id: u32,
    dir: *const c_char,
    max_tokens: u32,
    out: *mut *mut et_fed_client,
) -> et_result {
    boundary(|| {
        if dir.is_null() || out.is_null() {
            return Err(Fail::null(if dir.is_null() { "dir" } else { "out" }));
        }
        // SAFETY: `model` is NULL or a handle; the caller's bytes as documented.
        let (m, session) = unsafe {
            (
                handle::get::<Model_>(model)?,
                bytes(session, session_len, "session")?,
            )
        };
        if max_tokens < 2 {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                "max_tokens must be at least 2",
            ));
        }
        // SAFETY: `dir` is non-NULL (checked) and NUL-terminated per the contract.
        let dir = unsafe { out_dir(dir, "dir") }?;
        let client = Client::join(m.share()?, &m.sha256, session, client_id, dir, max_tokens)?;
        client.load()?;
        handle::publish(Client_ { client, max_tokens }, out);
        Ok(())
    })
}

/// Frees the client at `*c` and sets `*c` to NULL (NULL is a no-op). Its directory stays.
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_client_free(c: *mut *mut et_fed_client) {
    let _ = boundary(|| {
        // SAFETY: `c` is NULL or a handle slot from this library.
        unsafe { handle::free::<Client_>(c) };
        Ok(())
    });
}

/// Runs the session's local steps for the next round on the `n_examples` examples (from
/// the shared state, which they leave unchanged) and writes the upload message (kind 3)
/// to `*out_upload` (`*out_len` bytes, owned by the caller, freed with `et_bytes_free`),
/// its round to `*out_round` and the mean loss of the steps that ran to `*out_loss` (NaN
/// if every step was skipped for a non-finite loss). Any of the outputs
/// but `out_upload` and `out_len` may be NULL.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn et_fed_client_train_round(
    c: *mut et_fed_client,
    examples: *const et_example,
    n_examples: usize,
    batch: u32,
    out_upload: *mut *mut u8,
    out_len: *mut usize,
    out_round: *mut u32,
    out_loss: *mut f32,
) -> et_result {
    boundary(|| {
        if out_upload.is_null() || out_len.is_null() {
            return Err(Fail::null(if out_upload.is_null() {
                "out_upload"
            } else {
                "out_len"
            }));
        }
        // SAFETY: `c` is NULL or a handle from this library.
        let c = unsafe { handle::get_mut::<Client_>(c) }?;
        // SAFETY: the caller's examples as documented.
        let set = unsafe { self::examples(examples, n_examples, c.max_tokens) }?;
        check_sizes(batch, c.max_tokens)?;
        let local = c.client.train_round(&set, batch as usize);
        // Local steps leave the model perturbed: back to the shared state either way.
        c.client.load()?;
        let local = local?;
        let upload = local.upload.into_boxed_slice();
        // SAFETY: checked non-NULL above; the optional outputs are written when non-NULL.
        unsafe {
            *out_len = upload.len();
            *out_upload = Box::into_raw(upload).cast::<u8>();
            if !out_round.is_null() {
                *out_round = local.round;
            }
            if !out_loss.is_null() {
                *out_loss = if local.skipped >= c.client.session.tau {
                    f32::NAN
                } else {
                    local.loss as f32
                };
            }
        }
        Ok(())
    })
}

/// Records that the server accepted the upload of `round` (at most the next round).
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_client_mark_uploaded(c: *mut et_fed_client, round: u32) -> et_result {
    boundary(|| {
        // SAFETY: as above.
        let c = unsafe { handle::get_mut::<Client_>(c) }?;
        c.client.mark_uploaded(round)?;
        Ok(())
    })
}

/// Applies a round message (kind 2, as `GET /v1/rounds/{r}` returns it): the next round
/// is applied and its digest checked (ET_STATE_MISMATCH: nothing applied, restore a
/// checkpoint); a round applied before changes nothing; any other round is refused
/// (ET_PROTOCOL). Writes the message's round to `*out_round` and 1 (applied now) or 0
/// (applied before) to `*out_applied`; either may be NULL.
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_client_apply_round(
    c: *mut et_fed_client,
    round: *const u8,
    len: usize,
    out_round: *mut u32,
    out_applied: *mut u8,
) -> et_result {
    boundary(|| {
        // SAFETY: as above; the caller's bytes as documented.
        let (c, msg) = unsafe { (handle::get_mut::<Client_>(c)?, bytes(round, len, "round")?) };
        let applied = c.client.apply_round(msg);
        // The model follows the client's state whatever the outcome.
        c.client.load()?;
        let applied = applied?;
        let (r, now) = match applied {
            Applied::Applied(r) => (r, 1),
            Applied::Already(r) => (r, 0),
        };
        // SAFETY: written only when non-NULL.
        unsafe {
            if !out_round.is_null() {
                *out_round = r;
            }
            if !out_applied.is_null() {
                *out_applied = now;
            }
        }
        Ok(())
    })
}

/// Replaces the client's state by a checkpoint (`GET /v1/checkpoint`), after a digest
/// mismatch or to join late; its hash is checked before anything changes (a damaged file
/// is ET_BAD_FILE).
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_client_restore_checkpoint(
    c: *mut et_fed_client,
    checkpoint: *const u8,
    len: usize,
) -> et_result {
    boundary(|| {
        // SAFETY: as above.
        let (c, cp) = unsafe {
            (
                handle::get_mut::<Client_>(c)?,
                bytes(checkpoint, len, "checkpoint")?,
            )
        };
        let restored = c.client.restore_checkpoint(cp);
        c.client.load()?;
        Ok(restored?)
    })
}

/// Writes the last round applied and the last round uploaded (0: none) to `*out_applied`
/// and `*out_uploaded`.
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_client_rounds(
    c: *const et_fed_client,
    out_applied: *mut u32,
    out_uploaded: *mut u32,
) -> et_result {
    boundary(|| {
        if out_applied.is_null() || out_uploaded.is_null() {
            return Err(Fail::null(if out_applied.is_null() {
                "out_applied"
            } else {
                "out_uploaded"
            }));
        }
        // SAFETY: as above.
        let c = unsafe { handle::get::<Client_>(c) }?;
        // SAFETY: checked non-NULL.
        unsafe {
            *out_applied = c.client.round;
            *out_uploaded = c.client.uploaded;
        }
        Ok(())
    })
}

/// Writes the 32-byte hash of the shared trainable state (docs/zeroth-order.md; after
/// round r it equals round r's published digest) to `out`.
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_client_state_hash(c: *const et_fed_client, out: *mut u8) -> et_result {
    boundary(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        // SAFETY: as above.
        let c = unsafe { handle::get::<Client_>(c) }?;
        let hash = c.client.state_hash()?;
        // SAFETY: the caller gives 32 writable bytes at `out`.
        unsafe { std::ptr::copy_nonoverlapping(hash.as_ptr(), out, 32) };
        Ok(())
    })
}

/// Writes the upload signature the server checks (HMAC-SHA256 under the client's key over
/// the nonce, 8 bytes little-endian, and the body; docs/protocol.md) as 64 lowercase hex
/// digits and a NUL into `out` (65 bytes). Send it as `x-edgetune-signature`, with
/// `x-edgetune-client` and `x-edgetune-nonce` (decimal, above the client's last nonce).
#[unsafe(no_mangle)]
pub extern "C" fn et_fed_sign(
    key: *const u8,
    key_len: usize,
    nonce: u64,
    body: *const u8,
    body_len: usize,
    out: *mut c_char,
) -> et_result {
    boundary(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        // SAFETY: the caller's bytes as documented.
        let (key, body) = unsafe { (bytes(key, key_len, "key")?, bytes(body, body_len, "body")?) };
        if key.is_empty() {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                "the key is empty",
            ));
        }
        let sig = auth::sign(key, nonce, body);
        if sig.len() != 64 {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                "the key cannot key a MAC",
            ));
        }
        // SAFETY: the caller gives 65 writable bytes at `out`; the hex is 64 ASCII bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(sig.as_ptr(), out.cast::<u8>(), sig.len());
            *out.add(sig.len()) = 0;
        }
        Ok(())
    })
}

/// Frees `len` bytes at `p` that this library returned (an upload), unmodified, with the
/// length it returned. NULL is a no-op.
#[unsafe(no_mangle)]
pub extern "C" fn et_bytes_free(p: *mut u8, len: usize) {
    let _ = boundary(|| {
        if !p.is_null() {
            // SAFETY: `p` and `len` are a boxed slice this library leaked.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, len)) });
        }
        Ok(())
    });
}
