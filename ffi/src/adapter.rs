//! Adapters on an `et_model`: attach LoRA or IA3, save and load PEFT adapters.

use crate::error::{Fail, boundary, et_result};
use crate::handle;
use crate::model::{Model_, et_model};
use crate::runtime::{c_str, out_dir};
use edgetune::adapter::{AdapterConfig, Target, peft};
use std::ffi::c_char;

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

/// The projections ET_TARGET_* `bits` name (`default` when 0).
fn targets(bits: u32, default: u32) -> Result<Vec<Target>, Fail> {
    let bits = if bits == 0 { default } else { bits };
    if bits >= 1 << Target::ALL.len() {
        return Err(Fail::new(
            et_result::ET_INVALID_ARGUMENT,
            format!("targets {bits:#x} has bits beyond ET_TARGET_DOWN"),
        ));
    }
    Ok(Target::ALL
        .into_iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, t)| t)
        .collect())
}

/// Attaches a LoRA adapter to the model (one adapter at a time; ET_BUSY while a trainer
/// or federated client uses the model).
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
        let targets = targets(o.targets, ET_TARGET_Q | ET_TARGET_V)?;
        m.model_mut()?
            .attach(AdapterConfig::lora(o.rank, o.alpha, &targets), o.seed)?;
        m.adapter_seed = o.seed;
        Ok(())
    })
}

/// Attaches an IA3 adapter (scales on k, v and down's input, starting at one).
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_ia3(model: *mut et_model) -> et_result {
    boundary(|| {
        // SAFETY: as above.
        let m = unsafe { handle::get_mut::<Model_>(model) }?;
        m.model_mut()?.attach(AdapterConfig::ia3(), 0)?;
        m.adapter_seed = 0;
        Ok(())
    })
}

/// Makes the model's norm weights the trainable set (starting at the model's values;
/// zeroth-order training only).
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_norms(model: *mut et_model) -> et_result {
    boundary(|| {
        // SAFETY: as above.
        let m = unsafe { handle::get_mut::<Model_>(model) }?;
        m.model_mut()?.attach(AdapterConfig::norms(), 0)?;
        m.adapter_seed = 0;
        Ok(())
    })
}

/// Makes the block scales of the quantised projections on `targets` (ET_TARGET_* bits; 0
/// for all seven) the trainable set, as QZO does: the quantised codes stay frozen, one
/// factor per block (32 values of Q8_0, Q4_0, Q4_1 weights; a 256-value super-block of
/// Q4_K, Q6_K weights) starts at one and learns
/// (zeroth-order training only). A projection in another format, or one whose layers mix
/// block sizes, is ET_INVALID_ARGUMENT.
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_scales(model: *mut et_model, targets: u32) -> et_result {
    boundary(|| {
        // SAFETY: as above.
        let m = unsafe { handle::get_mut::<Model_>(model) }?;
        let targets = self::targets(targets, (1 << Target::ALL.len()) - 1)?;
        m.model_mut()?.attach(AdapterConfig::scales(&targets), 0)?;
        m.adapter_seed = 0;
        Ok(())
    })
}

/// Writes the attached adapter's current values into directory `dir` (NUL-terminated UTF-8,
/// created if needed) as PEFT's adapter_config.json and adapter_model.safetensors (norms and
/// block scales under edgetune's own `peft_type`s, docs/zeroth-order.md).
#[unsafe(no_mangle)]
pub extern "C" fn et_adapter_save(model: *const et_model, dir: *const c_char) -> et_result {
    boundary(|| {
        if dir.is_null() {
            return Err(Fail::null("dir"));
        }
        // SAFETY: as above; `dir` is non-NULL and NUL-terminated.
        let (m, dir) = (unsafe { handle::get::<Model_>(model) }?, unsafe {
            out_dir(dir, "dir")
        }?);
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
        peft::attach_dir(m.model_mut()?, std::path::Path::new(dir))?;
        m.adapter_seed = 0;
        Ok(())
    })
}
