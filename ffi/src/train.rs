//! Adapters and training on an `et_model`: attach LoRA or IA3, train by backprop on the
//! caller's examples with a progress callback, save and load PEFT adapters.

use crate::error::{Fail, boundary, et_result};
use crate::handle;
use crate::model::{Model_, et_model};
use crate::runtime::c_str;
use edgetune::adapter::{AdapterConfig, Target, peft};
use edgetune::train::Example;
use edgetune::train::backprop::{BackpropConfig, BackpropTrainer, Optimizer, Schedule};
use edgetune::train::data::batch_for_step;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicU8, Ordering};

/// LoRA on the query projection (bits of `et_lora_options.targets`).
pub const ET_TARGET_Q: u32 = 1;
pub const ET_TARGET_K: u32 = 2;
pub const ET_TARGET_V: u32 = 4;
pub const ET_TARGET_O: u32 = 8;
pub const ET_TARGET_GATE: u32 = 16;
pub const ET_TARGET_UP: u32 = 32;
pub const ET_TARGET_DOWN: u32 = 64;

/// A LoRA adapter's shape.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct et_lora_options {
    pub rank: u32,
    pub alpha: f32,
    /// ET_TARGET_* bits; 0 for q and v.
    pub targets: u32,
    /// Seeds A's start values (PEFT's initialisation; B starts at zero).
    pub seed: u64,
}

/// Attaches a LoRA adapter to the model (one adapter at a time).
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_lora(model: *mut et_model, opts: *const et_lora_options) -> et_result {
    boundary(|| {
        if opts.is_null() {
            return Err(Fail::null("opts"));
        }
        // SAFETY: `model` is NULL or a handle from this library; `opts` is non-NULL.
        let (m, o) = (unsafe { handle::get_mut::<Model_>(model) }?, unsafe {
            *opts
        });
        let bits = if o.targets == 0 {
            ET_TARGET_Q | ET_TARGET_V
        } else {
            o.targets
        };
        if bits >= 1 << Target::ALL.len() {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                format!("targets {bits:#x} has bits beyond ET_TARGET_DOWN"),
            ));
        }
        let targets: Vec<Target> = Target::ALL
            .into_iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, t)| t)
            .collect();
        m.model
            .attach(AdapterConfig::lora(o.rank, o.alpha, &targets), o.seed)?;
        Ok(())
    })
}

/// Attaches an IA3 adapter (scales on k, v and down's input, starting at one).
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_ia3(model: *mut et_model) -> et_result {
    boundary(|| {
        // SAFETY: as above.
        let m = unsafe { handle::get_mut::<Model_>(model) }?;
        m.model.attach(AdapterConfig::ia3(), 0)?;
        Ok(())
    })
}

/// Writes the attached adapter's current values into directory `dir` (NUL-terminated UTF-8,
/// created if needed) as PEFT's adapter_config.json and adapter_model.safetensors.
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_save(model: *const et_model, dir: *const c_char) -> et_result {
    boundary(|| {
        if dir.is_null() {
            return Err(Fail::null("dir"));
        }
        // SAFETY: as above; `dir` is non-NULL and NUL-terminated.
        let (m, dir) = (unsafe { handle::get::<Model_>(model) }?, unsafe {
            c_str(dir, "dir")
        }?);
        let dir = std::path::Path::new(dir);
        std::fs::create_dir_all(dir)
            .map_err(|e| Fail::new(et_result::ET_IO, format!("{}: {e}", dir.display())))?;
        peft::save_attached(dir, &m.model)?;
        Ok(())
    })
}

/// Attaches the PEFT adapter in directory `dir` (or a llama.cpp GGUF adapter file).
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_load(model: *mut et_model, dir: *const c_char) -> et_result {
    boundary(|| {
        if dir.is_null() {
            return Err(Fail::null("dir"));
        }
        // SAFETY: as above.
        let (m, dir) = (unsafe { handle::get_mut::<Model_>(model) }?, unsafe {
            c_str(dir, "dir")
        }?);
        peft::attach_dir(&mut m.model, std::path::Path::new(dir))?;
        Ok(())
    })
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

/// Backprop settings (AdamW, betas 0.9/0.999, eps 1e-8).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct et_train_options {
    pub steps: u32,
    /// Examples per step.
    pub batch: u32,
    pub lr: f32,
    pub warmup: u32,
    /// 0 constant, 1 linear, 2 cosine (Hugging Face's schedules).
    pub schedule: u32,
    /// The largest global gradient norm; 0 for no clipping.
    pub clip: f32,
    pub weight_decay: f32,
    /// Seeds the order of the examples.
    pub seed: u64,
}

/// Called after each step with its number (from 1), the step count and the step's mean
/// loss. Return 0 to go on; anything else stops training with ET_CALLBACK (the steps done
/// so far stay applied). The callback must return normally and not free the model.
#[allow(non_camel_case_types)]
pub type et_progress_callback =
    Option<unsafe extern "C" fn(user: *mut c_void, step: u32, steps: u32, loss: f32) -> i32>;

/// Trains the attached LoRA or IA3 adapter by backprop for `opts->steps` steps on the
/// `n_examples` examples (copied at the call), reporting each step to `callback` (may be
/// NULL); `*cancel` (may be NULL, an atomic byte as for `et_generate`) stops it between
/// steps with ET_CANCELLED, the steps done so far applied. Writes the last step's mean
/// loss to `*out_loss` on success. A step whose loss or gradient is not finite is skipped.
#[unsafe(no_mangle)]
pub extern "C" fn et_train_backprop(
    model: *mut et_model,
    examples: *const et_example,
    n_examples: usize,
    opts: *const et_train_options,
    callback: et_progress_callback,
    user: *mut c_void,
    cancel: *const u8,
    out_loss: *mut f32,
) -> et_result {
    boundary(|| {
        if examples.is_null() || opts.is_null() || out_loss.is_null() {
            return Err(Fail::null(if examples.is_null() {
                "examples"
            } else if opts.is_null() {
                "opts"
            } else {
                "out_loss"
            }));
        }
        // SAFETY: as above; `opts` non-NULL.
        let (m, o) = (unsafe { handle::get::<Model_>(model) }?, unsafe { *opts });
        // SAFETY: the caller gives `n_examples` examples, each with `len` tokens and flags.
        let raw = unsafe { std::slice::from_raw_parts(examples, n_examples) };
        let mut set = Vec::with_capacity(raw.len());
        for (i, e) in raw.iter().enumerate() {
            if e.tokens.is_null() || e.targets.is_null() {
                return Err(Fail::null(if e.tokens.is_null() {
                    "tokens"
                } else {
                    "targets"
                }));
            }
            // SAFETY: per the contract above.
            let (tokens, targets) = unsafe {
                (
                    std::slice::from_raw_parts(e.tokens, e.len),
                    std::slice::from_raw_parts(e.targets, e.len),
                )
            };
            if e.len < 2 {
                return Err(Fail::new(
                    et_result::ET_INVALID_ARGUMENT,
                    format!("example {i} has {} tokens; a loss needs 2", e.len),
                ));
            }
            set.push(Example {
                tokens: tokens.to_vec(),
                targets: targets.iter().map(|&t| t != 0).collect(),
            });
        }
        let capacity = set.iter().map(|e| e.tokens.len()).max().unwrap_or(2);
        let capacity = u32::try_from(capacity)
            .map_err(|_| Fail::new(et_result::ET_INVALID_ARGUMENT, "an example is too long"))?;
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
                other => {
                    return Err(Fail::new(
                        et_result::ET_INVALID_ARGUMENT,
                        format!("schedule {other} is not 0, 1 or 2"),
                    ));
                }
            },
            warmup: u64::from(o.warmup),
            total_steps: u64::from(o.steps),
            clip: (o.clip != 0.0).then_some(o.clip),
            micro_batches: 1,
            recompute: false,
            memory_limit: None,
        };
        if o.batch == 0 || set.is_empty() {
            return Err(Fail::new(
                et_result::ET_INVALID_ARGUMENT,
                "a step needs examples and a batch of at least one",
            ));
        }
        let mut trainer = BackpropTrainer::start(&m.model, cfg, capacity)?;
        // SAFETY: when non-NULL, `cancel` is a byte the caller may store to atomically.
        let cancelled = || {
            !cancel.is_null() && unsafe { &*cancel.cast::<AtomicU8>() }.load(Ordering::Relaxed) != 0
        };
        let mut last = f32::NAN;
        for step in 0..u64::from(o.steps) {
            if cancelled() {
                return Err(Fail::new(
                    et_result::ET_CANCELLED,
                    "the cancel flag was set",
                ));
            }
            let batch: Vec<Example> = batch_for_step(&set, o.batch as usize, step, o.seed)
                .into_iter()
                .cloned()
                .collect();
            let out = trainer.step(&batch)?;
            last = out.loss as f32;
            if let Some(cb) = callback {
                // SAFETY: the caller's function, called with plain values.
                let r = unsafe { cb(user, (step + 1) as u32, o.steps, last) };
                if r != 0 {
                    return Err(Fail::new(
                        et_result::ET_CALLBACK,
                        format!("the progress callback returned {r} after step {}", step + 1),
                    ));
                }
            }
        }
        // SAFETY: checked non-NULL.
        unsafe { *out_loss = last };
        Ok(())
    })
}
