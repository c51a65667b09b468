//! `et_model`: a model loaded on a runtime's backend, with its tokenizer; tokenize,
//! detokenize, generate, logits.

use crate::error::{Fail, boundary, et_result};
use crate::handle::{self, Kind};
use crate::runtime::{Runtime, bytes, c_str, et_runtime};
use edgetune::backend::any::AnyBackend;
use edgetune::format::file::sha256_bytes;
use edgetune::format::gguf::Gguf;
use edgetune::generate::{Sampler, Sampling, generate};
use edgetune::model::Model;
use edgetune::model::files::ModelFiles;
use edgetune::tokenizer::{TextStream, Tokenizer};
use edgetune::train::history::hex;
use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// A model and its tokenizer. Use it from one thread at a time.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct et_model {
    _opaque: [u8; 0],
}

pub(crate) struct Model_ {
    /// Shared with the trainers and federated clients made on it.
    pub(crate) model: Arc<Model<'static, AnyBackend>>,
    /// Hex SHA-256 of the model's bytes, which pins a training or federated session to it.
    pub(crate) sha256: String,
    /// The seed the attached adapter was initialised with (0 for a loaded adapter).
    pub(crate) adapter_seed: u64,
    /// Why there is none, when the model's files hold no usable tokenizer (tokenizing and
    /// generating are then refused with it; logits need none).
    tokenizer: Result<Tokenizer, String>,
}

impl Model_ {
    fn new(
        model: Model<'static, AnyBackend>,
        sha: [u8; 32],
        tokenizer: Result<Tokenizer, String>,
    ) -> Self {
        // Model is not Sync (its buffers are used from one thread at a time, as the
        // header requires of a model and everything made on it); Arc rather than Rc so
        // that freeing a trainer on another thread cannot corrupt the count.
        #[allow(clippy::arc_with_non_send_sync)]
        let model = Arc::new(model);
        Model_ {
            model,
            sha256: hex(&sha),
            adapter_seed: 0,
            tokenizer,
        }
    }

    /// The model for a new trainer or federated client: one at a time, since each writes
    /// the adapter's values the next forward pass reads.
    pub(crate) fn share(&self) -> Result<Arc<Model<'static, AnyBackend>>, Fail> {
        if Arc::strong_count(&self.model) > 1 {
            return Err(Fail::new(
                et_result::ET_BUSY,
                "another trainer or federated client uses this model; free it first",
            ));
        }
        Ok(Arc::clone(&self.model))
    }

    /// The model for a call that changes it (attaching an adapter): refused while a
    /// trainer or federated client made on it is alive.
    pub(crate) fn model_mut(&mut self) -> Result<&mut Model<'static, AnyBackend>, Fail> {
        Arc::get_mut(&mut self.model).ok_or_else(|| {
            Fail::new(
                et_result::ET_BUSY,
                "a trainer or federated client uses this model; free it first",
            )
        })
    }

    fn tokenizer(&self) -> Result<&Tokenizer, Fail> {
        self.tokenizer.as_ref().map_err(|why| {
            Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                format!("the model has no usable tokenizer: {why}"),
            )
        })
    }
}

impl Kind for Model_ {
    const TAG: u64 = 0x6574_5f6d_6f64_656c; // "et_model"
    const NAME: &'static str = "et_model";
    type C = et_model;
}

/// Loads the GGUF file or Hugging Face directory at `path` (NUL-terminated UTF-8) on the
/// runtime's backend into `*out`.
#[unsafe(no_mangle)]
pub extern "C" fn et_model_load_file(
    rt: *const et_runtime,
    path: *const c_char,
    out: *mut *mut et_model,
) -> et_result {
    boundary(|| {
        if path.is_null() || out.is_null() {
            return Err(Fail::null(if path.is_null() { "path" } else { "out" }));
        }
        // SAFETY: `rt` is NULL or a handle from this library.
        let rt = unsafe { handle::get::<Runtime>(rt) }?;
        // SAFETY: non-NULL, NUL-terminated per the contract.
        let path = unsafe { c_str(path, "path") }?;
        let files = ModelFiles::open(std::path::Path::new(path), None)?;
        let tokenizer = files.tokenizer().map_err(|e| e.to_string());
        let model = files.load(Arc::clone(&rt.backend))?;
        handle::publish(Model_::new(model, files.sha256(), tokenizer), out);
        Ok(())
    })
}

/// Loads a GGUF model from `len` bytes at `data` (copied into the backend's buffers; the
/// caller may free them after the call) into `*out`.
#[unsafe(no_mangle)]
pub extern "C" fn et_model_load_bytes(
    rt: *const et_runtime,
    data: *const u8,
    len: usize,
    out: *mut *mut et_model,
) -> et_result {
    boundary(|| {
        if data.is_null() || out.is_null() {
            return Err(Fail::null(if data.is_null() { "data" } else { "out" }));
        }
        // SAFETY: `rt` is NULL or a handle from this library.
        let rt = unsafe { handle::get::<Runtime>(rt) }?;
        // SAFETY: the caller gives `len` readable bytes at `data`.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) };
        let gguf = Gguf::parse(bytes).map_err(|e| {
            Fail::new(
                et_result::ET_BAD_FILE,
                format!("not a usable GGUF file: {e}"),
            )
        })?;
        let tokenizer = Tokenizer::from_gguf(&gguf, "memory").map_err(|e| e.to_string());
        let model = Model::from_gguf(Arc::clone(&rt.backend), &gguf, bytes, "memory")?;
        handle::publish(Model_::new(model, sha256_bytes(bytes), tokenizer), out);
        Ok(())
    })
}

/// Frees the model at `*model` and sets `*model` to NULL (NULL is a no-op).
#[unsafe(no_mangle)]
pub extern "C" fn et_model_free(model: *mut *mut et_model) {
    let _ = boundary(|| {
        // SAFETY: `model` is NULL or a handle slot from this library.
        unsafe { handle::free::<Model_>(model) };
        Ok(())
    });
}

/// Writes the model's vocabulary size (the width of a row of logits) to `*out`.
#[unsafe(no_mangle)]
pub extern "C" fn et_vocab_size(model: *const et_model, out: *mut u32) -> et_result {
    boundary(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        // SAFETY: as above.
        let m = unsafe { handle::get::<Model_>(model) }?;
        // SAFETY: checked non-NULL.
        unsafe { *out = m.model.cfg.vocab };
        Ok(())
    })
}

/// `len` bytes of UTF-8 at `text` (NULL allowed when `len` is 0).
///
/// # Safety
/// The caller gives `len` readable bytes at `text`.
unsafe fn utf8<'a>(text: *const c_char, len: usize, what: &str) -> Result<&'a str, Fail> {
    // SAFETY: per the contract.
    let bytes = unsafe { bytes(text.cast::<u8>(), len, what) }?;
    std::str::from_utf8(bytes).map_err(|e| {
        Fail::new(
            et_result::ET_INVALID_UTF8,
            format!("`{what}` is not UTF-8: {e}"),
        )
    })
}

/// Checks a caller's output array of `cap` elements for `n` values: a query (`buf` NULL,
/// `cap` 0) or room enough.
fn room<T>(buf: *mut T, cap: usize, n: usize, what: &str) -> Result<bool, Fail> {
    if buf.is_null() && cap == 0 {
        return Ok(false);
    }
    if buf.is_null() {
        return Err(Fail::null(what));
    }
    if cap < n {
        return Err(Fail::new(
            et_result::ET_BUFFER_TOO_SMALL,
            format!("`{what}` holds {cap}; {n} are needed"),
        ));
    }
    Ok(true)
}

/// Tokenizes `len` bytes of UTF-8 `text` as a prompt (with the model's BOS where it uses
/// one) into `ids` (room for `cap`) and writes the count to `*out_n`. With `ids` NULL and
/// `cap` 0, only the count is written; a `cap` too small is ET_BUFFER_TOO_SMALL, nothing
/// written.
#[unsafe(no_mangle)]
pub extern "C" fn et_tokenize(
    model: *const et_model,
    text: *const c_char,
    len: usize,
    ids: *mut u32,
    cap: usize,
    out_n: *mut usize,
) -> et_result {
    boundary(|| {
        if out_n.is_null() {
            return Err(Fail::null("out_n"));
        }
        // SAFETY: as above.
        let m = unsafe { handle::get::<Model_>(model) }?;
        // SAFETY: the caller gives `len` bytes at `text`.
        let text = unsafe { utf8(text, len, "text") }?;
        let tokens = m.tokenizer()?.encode_prompt(text)?;
        if room(ids, cap, tokens.len(), "ids")? {
            // SAFETY: `ids` holds `cap` >= tokens.len() values.
            unsafe { std::ptr::copy_nonoverlapping(tokens.as_ptr(), ids, tokens.len()) };
        }
        // SAFETY: checked non-NULL.
        unsafe { *out_n = tokens.len() };
        Ok(())
    })
}

/// Decodes `n` token ids into `buf` (room for `cap` bytes) as NUL-terminated UTF-8 and
/// writes its length without the NUL to `*out_len`. With `buf` NULL and `cap` 0, only the
/// length is written; `cap` must exceed the length (for the NUL).
#[unsafe(no_mangle)]
pub extern "C" fn et_detokenize(
    model: *const et_model,
    ids: *const u32,
    n: usize,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> et_result {
    boundary(|| {
        if out_len.is_null() || (ids.is_null() && n != 0) {
            return Err(Fail::null(if out_len.is_null() {
                "out_len"
            } else {
                "ids"
            }));
        }
        // SAFETY: as above.
        let m = unsafe { handle::get::<Model_>(model) }?;
        let ids = if n == 0 {
            &[][..]
        } else {
            // SAFETY: the caller gives `n` ids at `ids`.
            unsafe { std::slice::from_raw_parts(ids, n) }
        };
        if let Some(&bad) = ids.iter().find(|&&id| id >= m.model.cfg.vocab) {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    m.model.cfg.vocab
                ),
            ));
        }
        let text = m.tokenizer()?.decode(ids)?;
        if room(buf, cap, text.len() + 1, "buf")? {
            // SAFETY: `buf` holds `cap` > text.len() bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
                *buf.add(text.len()) = 0;
            }
        }
        // SAFETY: checked non-NULL.
        unsafe { *out_len = text.len() };
        Ok(())
    })
}

/// Sampling for `et_generate`; pass NULL for greedy decoding of up to 64 tokens.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct et_generate_options {
    /// Tokens to generate at most (the context bounds it too).
    pub max_tokens: u32,
    /// 0 for greedy decoding.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    /// 1 keeps every token.
    pub top_p: f32,
    /// 1 for no penalty.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Non-zero: wrap the prompt in the model's chat format as one user turn.
    pub chat: u8,
}

/// Called with each piece of generated text as it completes: `len` bytes of UTF-8 at
/// `piece` (not NUL-terminated, valid during the call) and the token that completed it.
/// Return 0 to go on; anything else stops generation with ET_CALLBACK. The callback must
/// return normally (no longjmp, no C++ exception) and must make no et_ call on the model.
#[allow(non_camel_case_types)]
pub type et_token_callback = Option<
    unsafe extern "C" fn(user: *mut c_void, piece: *const c_char, len: usize, token: u32) -> i32,
>;

/// Generates a continuation of `len` bytes of UTF-8 `prompt` with `opts` (NULL: greedy, 64
/// tokens), calling `callback` (may be NULL) with each piece of text; stops with
/// ET_CANCELLED when `*cancel` (may be NULL) is non-zero before the prompt is run or when a
/// token is produced. The flag may be set from another thread: make it a C11
/// `_Atomic uint8_t` (C++ `std::atomic<uint8_t>`) written with an atomic store. Writes the
/// number of tokens generated to `*out_tokens` on success.
#[unsafe(no_mangle)]
pub extern "C" fn et_generate(
    model: *const et_model,
    prompt: *const c_char,
    len: usize,
    opts: *const et_generate_options,
    callback: et_token_callback,
    user: *mut c_void,
    cancel: *const u8,
    out_tokens: *mut usize,
) -> et_result {
    boundary(|| {
        if out_tokens.is_null() {
            return Err(Fail::null("out_tokens"));
        }
        // SAFETY: as above.
        let m = unsafe { handle::get::<Model_>(model) }?;
        // SAFETY: the caller gives `len` bytes at `prompt`.
        let text = unsafe { utf8(prompt, len, "prompt") }?;
        let o = if opts.is_null() {
            et_generate_options {
                max_tokens: 64,
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 0,
                chat: 0,
            }
        } else {
            // SAFETY: non-NULL, a valid options struct per the contract.
            unsafe { *opts }
        };
        let tok = m.tokenizer()?;
        let text = if o.chat != 0 {
            tok.chat.user_turn(text)
        } else {
            text.to_owned()
        };
        let ids = tok.encode_prompt(&text)?;
        let context = m.model.cfg.context as usize;
        if ids.is_empty() || ids.len() >= context {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                format!(
                    "the prompt's {} tokens must be 1 to {} (the context)",
                    ids.len(),
                    context - 1
                ),
            ));
        }
        let sampling = Sampling {
            temperature: o.temperature,
            top_k: o.top_k as usize,
            top_p: o.top_p,
            repetition_penalty: o.repetition_penalty,
            seed: o.seed,
        };
        let mut sampler = Sampler::new(sampling)?;
        let max = (o.max_tokens as usize).min(context - ids.len());
        let mut cache = m.model.new_cache((ids.len() + max).min(context) as u32)?;
        // SAFETY: when non-NULL, `cancel` points at a byte the caller may write from any
        // thread while this runs: read atomically.
        let cancelled = || {
            !cancel.is_null() && unsafe { &*cancel.cast::<AtomicU8>() }.load(Ordering::Relaxed) != 0
        };
        if cancelled() {
            return Err(Fail::new(
                et_result::ET_CANCELLED,
                "the cancel flag was set",
            ));
        }
        let mut stream = TextStream::default();
        let mut stop = None;
        let emit = |piece: &str, token: u32| -> Result<(), Fail> {
            let Some(cb) = callback else { return Ok(()) };
            // SAFETY: the caller's function, called with a valid (pointer, len) it may read.
            let r = unsafe { cb(user, piece.as_ptr().cast(), piece.len(), token) };
            if r != 0 {
                return Err(Fail::new(
                    et_result::ET_CALLBACK,
                    format!("the callback returned {r}"),
                ));
            }
            Ok(())
        };
        let result = generate(
            &m.model,
            &mut cache,
            &ids,
            max,
            &tok.eos,
            &mut sampler,
            |t| {
                if cancelled() {
                    stop = Some(Fail::new(
                        et_result::ET_CANCELLED,
                        "the cancel flag was set",
                    ));
                } else if let Some(piece) = stream.push(tok, t)?
                    && let Err(f) = emit(&piece, t)
                {
                    stop = Some(f);
                }
                // Stops generation; the reason is in `stop`.
                match stop {
                    Some(_) => Err(edgetune::Error::InvalidArgument {
                        name: "generation",
                        reason: "stopped by the caller".into(),
                    }),
                    None => Ok(()),
                }
            },
        );
        if let Some(f) = stop {
            return Err(f);
        }
        let (out, _) = result?;
        if let Some(rest) = stream.finish(tok)? {
            emit(&rest, out.last().copied().unwrap_or(0))?;
        }
        // SAFETY: checked non-NULL.
        unsafe { *out_tokens = out.len() };
        Ok(())
    })
}

/// Runs `n` token ids from an empty cache and writes the logits of every position,
/// `n * vocab` floats row by row, to `out` (room for `cap` floats; NULL with `cap` 0 only
/// writes the count to `*out_n`).
#[unsafe(no_mangle)]
pub extern "C" fn et_logits(
    model: *const et_model,
    ids: *const u32,
    n: usize,
    out: *mut f32,
    cap: usize,
    out_n: *mut usize,
) -> et_result {
    boundary(|| {
        if out_n.is_null() {
            return Err(Fail::null("out_n"));
        }
        // SAFETY: as above.
        let m = unsafe { handle::get::<Model_>(model) }?;
        let context = m.model.cfg.context as usize;
        if n == 0 || n > context {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                format!("{n} tokens; 1 to {context} (the context) are allowed"),
            ));
        }
        if ids.is_null() {
            return Err(Fail::null("ids"));
        }
        let vocab = m.model.cfg.vocab as usize;
        let need = n.checked_mul(vocab).ok_or_else(|| {
            Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                format!("{n} tokens are too many"),
            )
        })?;
        if !room(out, cap, need, "out")? {
            // SAFETY: checked non-NULL.
            unsafe { *out_n = need };
            return Ok(());
        }
        // SAFETY: the caller gives `n` ids at `ids`.
        let tokens = unsafe { std::slice::from_raw_parts(ids, n) };
        let mut cache = m.model.new_cache(n as u32)?;
        let logits = m.model.forward(&mut cache, tokens, true)?;
        // SAFETY: `out` holds `cap` >= need floats; logits has `need` values.
        unsafe { std::ptr::copy_nonoverlapping(logits.as_ptr(), out, need) };
        // SAFETY: checked non-NULL.
        unsafe { *out_n = need };
        Ok(())
    })
}
