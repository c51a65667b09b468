//! `et_trainer`: a training session on an `et_model` with an adapter attached, keeping its
//! state (zeroth-order accumulators, or backprop's optimiser moments and step count) from
//! call to call; steps on the caller's examples with progress through a callback, eval,
//! save and resume.

use crate::error::{Fail, boundary, et_result};
use crate::handle::{self, Kind};
use crate::model::{Model_, et_model};
use crate::runtime::{c_str, out_dir};
use edgetune::adapter::layout_hash;
use edgetune::backend::any::AnyBackend;
use edgetune::model::Model;
use edgetune::rng::ZKind;
use edgetune::train::Example;
use edgetune::train::backprop::{BackpropConfig, BackpropTrainer, Optimizer, Schedule};
use edgetune::train::data::batch_for_step;
use edgetune::train::history::{Session, hex};
use edgetune::train::run::Trainer;
use edgetune::train::{SeedMode, ZoConfig};
use std::ffi::{c_char, c_void};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// A training session. Use it, and the model it was made on, from one thread at a time.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct et_trainer {
    _opaque: [u8; 0],
}

/// One training example: `len` token ids and, per token, whether the loss predicts it
/// (`targets[0]` is ignored).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct et_example {
    pub tokens: *const u32,
    pub targets: *const u8,
    pub len: usize,
}

/// Zeroth-order settings (docs/zeroth-order.md): two perturbed forward passes per step,
/// no backward pass, every update a (seed, scalar) pair that replays bit-identically.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct et_zo_options {
    /// Examples per step.
    pub batch: u32,
    /// In (0, 1].
    pub lr: f32,
    /// The perturbation scale, in (0, 1].
    pub eps: f32,
    /// K candidate seeds (FedKSeed); 0 for a fresh seed every step (MeZO).
    pub seeds: u32,
    /// The update unit is 2^-delta_exp, in 8..=40; 0 for 16.
    pub delta_exp: u32,
    /// |g| is cut to this; 0 for no cut.
    pub clip: f32,
    /// The session key (every perturbation derives from it) and the examples' order.
    pub seed: u64,
    /// The longest example in tokens.
    pub max_tokens: u32,
}

/// Backprop settings (AdamW, betas 0.9 / 0.999, eps 1e-8).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct et_backprop_options {
    /// Examples per step.
    pub batch: u32,
    pub lr: f32,
    /// The steps the learning-rate schedule spans (at least 1; steps beyond it keep the
    /// schedule's last rate).
    pub total_steps: u32,
    pub warmup: u32,
    /// 0 constant, 1 linear, 2 cosine (Hugging Face's schedules).
    pub schedule: u32,
    /// The largest global gradient norm; 0 for no clipping.
    pub clip: f32,
    pub weight_decay: f32,
    /// Seeds the examples' order.
    pub seed: u64,
    /// The longest example in tokens.
    pub max_tokens: u32,
}

/// Called after each step of `et_trainer_train` with its number within the call (from 1),
/// the call's step count and the step's mean loss (NaN for a skipped step). Return 0 to go
/// on; anything else stops the call with ET_CALLBACK (the steps done so far stay applied).
/// The callback must return normally and make no et_ call on the trainer or its model.
#[allow(non_camel_case_types)]
pub type et_progress_callback =
    Option<unsafe extern "C" fn(user: *mut c_void, step: u32, steps: u32, loss: f32) -> i32>;

enum Method {
    Zo(Box<Trainer<'static, 'static, AnyBackend>>),
    Backprop(Box<BackpropTrainer<'static, 'static, AnyBackend>>),
}

pub(crate) struct Trainer_ {
    method: Method,
    /// What a zeroth-order resume rebuilds its trainer on.
    model: Arc<Model<'static, AnyBackend>>,
    batch: usize,
    seed: u64,
    max_tokens: u32,
}

impl Kind for Trainer_ {
    const TAG: u64 = 0x6574_5f74_7261_696e; // "et_train"
    const NAME: &'static str = "et_trainer";
    type C = et_trainer;
}

fn invalid(message: impl Into<String>) -> Fail {
    Fail::new(et_result::ET_INVALID_ARGUMENT, message)
}

/// What a saved session records of how its steps were fed (a resume checks batch and seed).
fn run_json(batch: usize, seed: u64, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "source": "edgetune-ffi",
        "batch": batch,
        "data_seed": seed,
        "seq_len": max_tokens,
    })
}

/// The most examples a step or local step takes (a batch is copied per step).
pub(crate) const MAX_BATCH: u32 = 4096;

/// `batch` and `max_tokens` as a session takes them.
pub(crate) fn check_sizes(batch: u32, max_tokens: u32) -> Result<(), Fail> {
    if batch == 0 || batch > MAX_BATCH || max_tokens < 2 {
        return Err(invalid(format!(
            "batch must be in 1..={MAX_BATCH} and max_tokens at least 2 (got {batch} and {max_tokens})"
        )));
    }
    Ok(())
}

/// The caller's `n` examples, copied, each no longer than `max_tokens`.
///
/// # Safety
/// `examples` points at `n` examples, each with `len` readable tokens and flags.
pub(crate) unsafe fn examples(
    examples: *const et_example,
    n: usize,
    max_tokens: u32,
) -> Result<Vec<Example>, Fail> {
    if examples.is_null() {
        return Err(Fail::null("examples"));
    }
    if n == 0 {
        return Err(invalid("no examples were given"));
    }
    // SAFETY: per the contract above.
    let raw = unsafe { std::slice::from_raw_parts(examples, n) };
    let mut set = Vec::with_capacity(n);
    for (i, e) in raw.iter().enumerate() {
        if e.tokens.is_null() || e.targets.is_null() {
            return Err(Fail::null(if e.tokens.is_null() {
                "tokens"
            } else {
                "targets"
            }));
        }
        if e.len < 2 || e.len > max_tokens as usize {
            return Err(invalid(format!(
                "example {i} has {} tokens; a loss needs 2 and this session takes at most {max_tokens}",
                e.len
            )));
        }
        // SAFETY: per the contract above.
        let (tokens, targets) = unsafe {
            (
                std::slice::from_raw_parts(e.tokens, e.len),
                std::slice::from_raw_parts(e.targets, e.len),
            )
        };
        set.push(Example {
            tokens: tokens.to_vec(),
            targets: targets.iter().map(|&t| t != 0).collect(),
        });
    }
    Ok(set)
}

/// Whether the caller's cancel byte (NULL: none) is set.
///
/// # Safety
/// `cancel` is NULL or a byte the caller may store to atomically while the call runs.
pub(crate) unsafe fn cancelled(cancel: *const u8) -> bool {
    // SAFETY: per the contract above.
    !cancel.is_null() && unsafe { &*cancel.cast::<AtomicU8>() }.load(Ordering::Relaxed) != 0
}

/// The model behind `model` with its adapter's session facts, for a new trainer.
///
/// # Safety
/// `model` is NULL or a handle from this library.
unsafe fn trainable<'a>(model: *const et_model) -> Result<&'a Model_, Fail> {
    // SAFETY: per the contract above.
    let m = unsafe { handle::get::<Model_>(model) }?;
    if m.model.adapter().is_none() {
        return Err(invalid(
            "the model has no adapter attached (et_adapter_lora, et_adapter_ia3 or et_adapter_load first)",
        ));
    }
    Ok(m)
}

/// A zeroth-order trainer on the model's attached adapter, from its current values.
#[unsafe(no_mangle)]
pub extern "C" fn et_trainer_zo_new(
    model: *const et_model,
    opts: *const et_zo_options,
    out: *mut *mut et_trainer,
) -> et_result {
    boundary(|| {
        if opts.is_null() || out.is_null() {
            return Err(Fail::null(if opts.is_null() { "opts" } else { "out" }));
        }
        // SAFETY: `model` is NULL or a handle; `opts` is non-NULL.
        let (m, o) = (unsafe { trainable(model) }?, unsafe { *opts });
        check_sizes(o.batch, o.max_tokens)?;
        if !(o.clip.is_finite() && o.clip >= 0.0) {
            return Err(invalid(format!("clip {} must be finite and >= 0", o.clip)));
        }
        let zo = ZoConfig {
            session_key: o.seed,
            kind: ZKind::Binomial,
            mode: match o.seeds {
                0 => SeedMode::Mezo,
                k => SeedMode::KSeed { k },
            },
            eps: o.eps,
            lr: o.lr,
            delta_exp: if o.delta_exp == 0 { 16 } else { o.delta_exp },
            decay_steps: 0,
        };
        zo.validate()?;
        let adapter = m
            .model
            .adapter()
            .cloned()
            .ok_or_else(|| invalid("no adapter"))?;
        let session = Session {
            model_sha256: m.sha256.clone(),
            layout_sha256: hex(&layout_hash(m.model.layout())),
            adapter,
            init_seed: m.adapter_seed,
            zo,
            seed_weights: None,
            run: run_json(o.batch as usize, o.seed, o.max_tokens),
        };
        let mut t = Trainer::start(m.share()?, session, o.max_tokens)?;
        t.clip = (o.clip > 0.0).then_some(o.clip);
        handle::publish(
            Trainer_::new(Method::Zo(Box::new(t)), m, o.batch, o.seed, o.max_tokens),
            out,
        );
        Ok(())
    })
}

/// A backprop trainer (AdamW) on the model's attached LoRA or IA3 adapter. Everything a
/// step needs is allocated here: a size that does not fit fails now.
#[unsafe(no_mangle)]
pub extern "C" fn et_trainer_backprop_new(
    model: *const et_model,
    opts: *const et_backprop_options,
    out: *mut *mut et_trainer,
) -> et_result {
    boundary(|| {
        if opts.is_null() || out.is_null() {
            return Err(Fail::null(if opts.is_null() { "opts" } else { "out" }));
        }
        // SAFETY: as above.
        let (m, o) = (unsafe { trainable(model) }?, unsafe { *opts });
        check_sizes(o.batch, o.max_tokens)?;
        let cfg = BackpropConfig {
            optimizer: Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: o.weight_decay,
            },
            lr: o.lr,
            schedule: match o.schedule {
                0 => Schedule::Constant,
                1 => Schedule::Linear,
                2 => Schedule::Cosine,
                other => return Err(invalid(format!("schedule {other} is not 0, 1 or 2"))),
            },
            warmup: u64::from(o.warmup),
            total_steps: u64::from(o.total_steps),
            clip: (o.clip != 0.0).then_some(o.clip),
            micro_batches: 1,
            recompute: false,
            memory_limit: None,
        };
        let t = BackpropTrainer::start(m.share()?, cfg, o.max_tokens)?;
        handle::publish(
            Trainer_::new(
                Method::Backprop(Box::new(t)),
                m,
                o.batch,
                o.seed,
                o.max_tokens,
            ),
            out,
        );
        Ok(())
    })
}

/// Frees the trainer at `*t` and sets `*t` to NULL (NULL is a no-op); the model keeps the
/// values it reached.
#[unsafe(no_mangle)]
pub extern "C" fn et_trainer_free(t: *mut *mut et_trainer) {
    let _ = boundary(|| {
        // SAFETY: `t` is NULL or a handle slot from this library.
        unsafe { handle::free::<Trainer_>(t) };
        Ok(())
    });
}

impl Trainer_ {
    fn new(method: Method, m: &Model_, batch: u32, seed: u64, max_tokens: u32) -> Trainer_ {
        Trainer_ {
            method,
            model: Arc::clone(&m.model),
            batch: batch as usize,
            seed,
            max_tokens,
        }
    }

    /// One step on the batch the session's order picks for its next step; the step's mean
    /// loss (NaN when skipped for a non-finite loss).
    fn step(&mut self, set: &[Example]) -> Result<f64, Fail> {
        let next = match &self.method {
            Method::Zo(t) => t.next_step,
            Method::Backprop(t) => t.next_step,
        };
        let batch: Vec<Example> = batch_for_step(set, self.batch, next, self.seed)
            .into_iter()
            .cloned()
            .collect();
        Ok(match &mut self.method {
            Method::Zo(t) => {
                let o = t.step(&batch)?;
                match o.g {
                    Some(_) => (o.loss_plus + o.loss_minus) / 2.0,
                    None => f64::NAN,
                }
            }
            Method::Backprop(t) => {
                let o = t.step(&batch)?;
                if o.skipped { f64::NAN } else { o.loss }
            }
        })
    }

    /// Leaves the model at the session's current values (zeroth-order steps leave it
    /// perturbed), so generation and logits on it see what was trained.
    fn settle(&self) -> Result<(), Fail> {
        if let Method::Zo(t) = &self.method {
            t.load()?;
        }
        Ok(())
    }
}

/// Runs `steps` steps on the `n_examples` examples (copied at the call; each step takes
/// `batch` of them in the session's seeded order, continuing from the previous call),
/// reporting each to `callback` (may be NULL). `*cancel` (may be NULL; an atomic byte as
/// for `et_generate`) stops it between steps with ET_CANCELLED, the steps done so far
/// applied. Writes the mean loss of the call's applied steps to `*out_loss` (NaN if every
/// step was skipped for a non-finite loss). Afterwards the model holds the trained values.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn et_trainer_train(
    t: *mut et_trainer,
    examples: *const et_example,
    n_examples: usize,
    steps: u32,
    callback: et_progress_callback,
    user: *mut c_void,
    cancel: *const u8,
    out_loss: *mut f32,
) -> et_result {
    boundary(|| {
        if out_loss.is_null() {
            return Err(Fail::null("out_loss"));
        }
        // SAFETY: `t` is NULL or a handle from this library.
        let t = unsafe { handle::get_mut::<Trainer_>(t) }?;
        // SAFETY: the caller's examples as documented.
        let set = unsafe { self::examples(examples, n_examples, t.max_tokens) }?;
        let (mut sum, mut applied) = (0.0, 0u32);
        let run = (|| {
            for i in 1..=steps {
                // SAFETY: `cancel` as documented.
                if unsafe { cancelled(cancel) } {
                    return Err(Fail::new(
                        et_result::ET_CANCELLED,
                        "the cancel flag was set",
                    ));
                }
                let loss = t.step(&set)?;
                if loss.is_finite() {
                    sum += loss;
                    applied += 1;
                }
                if let Some(cb) = callback {
                    // SAFETY: the caller's function, called with plain values.
                    let r = unsafe { cb(user, i, steps, loss as f32) };
                    if r != 0 {
                        return Err(Fail::new(
                            et_result::ET_CALLBACK,
                            format!("the progress callback returned {r} after step {i}"),
                        ));
                    }
                }
            }
            Ok(())
        })();
        // The model is left at the trained values whether or not the run stopped early;
        // the run's own failure is the one reported.
        let settled = t.settle();
        run?;
        settled?;
        // SAFETY: checked non-NULL.
        unsafe {
            *out_loss = if applied == 0 {
                f32::NAN
            } else {
                (sum / f64::from(applied)) as f32
            }
        };
        Ok(())
    })
}

/// Writes the mean loss per target token of the `n_examples` examples at the session's
/// current values to `*out_loss`.
#[unsafe(no_mangle)]
pub extern "C" fn et_trainer_eval(
    t: *mut et_trainer,
    examples: *const et_example,
    n_examples: usize,
    out_loss: *mut f32,
) -> et_result {
    boundary(|| {
        if out_loss.is_null() {
            return Err(Fail::null("out_loss"));
        }
        // SAFETY: as above.
        let t = unsafe { handle::get_mut::<Trainer_>(t) }?;
        // SAFETY: as above.
        let set = unsafe { self::examples(examples, n_examples, t.max_tokens) }?;
        let loss = match &mut t.method {
            Method::Zo(z) => z.eval(&set)?,
            Method::Backprop(b) => b.eval(&set)?,
        };
        // SAFETY: checked non-NULL.
        unsafe { *out_loss = loss as f32 };
        Ok(())
    })
}

/// Writes the session into directory `dir` (NUL-terminated UTF-8, created if needed): the
/// adapter in PEFT format, and what a resume needs (zeroth-order: the session, start
/// values and the (seed, g) history; backprop: a checkpoint of values, moments and step
/// counts). Each file is replaced atomically.
#[unsafe(no_mangle)]
pub extern "C" fn et_trainer_save(t: *const et_trainer, dir: *const c_char) -> et_result {
    boundary(|| {
        if dir.is_null() {
            return Err(Fail::null("dir"));
        }
        // SAFETY: as above; `dir` is non-NULL and NUL-terminated.
        let (t, dir) = (unsafe { handle::get::<Trainer_>(t) }?, unsafe {
            out_dir(dir, "dir")
        }?);
        match &t.method {
            Method::Zo(z) => z.save(dir)?,
            Method::Backprop(b) => b.save(dir, &run_json(t.batch, t.seed, t.max_tokens))?,
        }
        Ok(())
    })
}

/// Continues the session saved in `dir` by a trainer of the same kind, made with the same
/// options on the same model and adapter layout: the saved state replaces this trainer's
/// (zeroth-order: the session's settings come from `dir`, its history is replayed and each
/// record checked, and a batch or seed other than the saved one is refused; backprop: the
/// checkpoint's layout is checked). A failed zeroth-order resume changes nothing; a failed
/// backprop one may leave the values half restored (resume again or free the trainer).
#[unsafe(no_mangle)]
pub extern "C" fn et_trainer_resume(t: *mut et_trainer, dir: *const c_char) -> et_result {
    boundary(|| {
        if dir.is_null() {
            return Err(Fail::null("dir"));
        }
        // SAFETY: as above.
        let (t, dir) = (unsafe { handle::get_mut::<Trainer_>(t) }?, unsafe {
            c_str(dir, "dir")
        }?);
        let dir = Path::new(dir);
        match &mut t.method {
            Method::Zo(z) => {
                // The model's hash is the one this trainer's session was made with.
                let sha = z.session.model_sha256.clone();
                let mut resumed = Trainer::resume(Arc::clone(&t.model), dir, &sha, t.max_tokens)?;
                let run = &resumed.session.run;
                if run["batch"].as_u64() != Some(t.batch as u64)
                    || run["data_seed"].as_u64() != Some(t.seed)
                {
                    return Err(invalid(format!(
                        "{} was saved with batch {} and seed {}; this trainer has {} and {}",
                        dir.display(),
                        run["batch"],
                        run["data_seed"],
                        t.batch,
                        t.seed
                    )));
                }
                resumed.clip = z.clip;
                **z = resumed;
            }
            Method::Backprop(b) => b.restore(dir)?,
        }
        t.settle()
    })
}

/// Writes the 32-byte hash of a zeroth-order session's trainable state
/// (docs/zeroth-order.md: equal on every backend and device for the same history) to
/// `out`. Backprop sessions have none (ET_INVALID_ARGUMENT).
#[unsafe(no_mangle)]
pub extern "C" fn et_trainer_state_hash(t: *const et_trainer, out: *mut u8) -> et_result {
    boundary(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        // SAFETY: as above.
        let t = unsafe { handle::get::<Trainer_>(t) }?;
        let Method::Zo(z) = &t.method else {
            return Err(invalid("a backprop session has no seed-replay state hash"));
        };
        let hash = z.state.hash(t.model.backend())?;
        // SAFETY: the caller gives 32 writable bytes at `out`.
        unsafe { std::ptr::copy_nonoverlapping(hash.as_ptr(), out, 32) };
        Ok(())
    })
}
