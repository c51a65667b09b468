//! edgetune's no_std core training on a microcontroller (a Cortex-M4F under QEMU, with the
//! 256 KiB of RAM memory.x gives it): the tiny Llama of tests/golden (2 layers, width 64,
//! Q8_0 blocks) is read in place from the image (flash), IA3
//! vectors train by zeroth-order steps on a handful of embedded examples, and every applied
//! step's (seed, g) record goes out through defmt over semihosting, with the losses, the
//! state hash and the memory used. `run.sh` decodes the log, replays the records with
//! `edgetune replay` on the host's backends and compares the hashes.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
// Linked for its critical-section implementation (single core), which the heap and the
// defmt logger take.
use cortex_m as _;
use cortex_m_rt::{ExceptionFrame, entry, exception};
use defmt_semihosting as _;
use edgetune::adapter::{AdapterConfig, layout_hash};
use edgetune::backend::cpu::CpuInPlace;
use edgetune::format::gguf::Gguf;
use edgetune::model::Model;
use edgetune::rng::ZKind;
use edgetune::train::{Example, SeedMode, ZoConfig, ZoState, zo_step};
use embedded_alloc::LlffHeap;

/// The model, in the image (flash); its SHA-256 pins the session, as a file's does.
static MODEL: &[u8] = include_bytes!("../../tests/golden/tiny/llama_gqa_tied/q8_0.gguf");

/// Heap for the model's buffers, the adapter, the state and the activations (feature
/// `oom`: too small for them, to show an allocation failure's error path).
#[cfg(not(feature = "oom"))]
const HEAP_BYTES: usize = 160 * 1024;
#[cfg(feature = "oom")]
const HEAP_BYTES: usize = 16 * 1024;
/// Zeroth-order steps to run.
const STEPS: u32 = 40;

/// The session: FedKSeed draws among K seeds, IA3 from its initial ones.
const ZO: ZoConfig = ZoConfig {
    session_key: 0x5eed_cafe,
    kind: ZKind::Binomial,
    mode: SeedMode::KSeed { k: 1024 },
    eps: 1e-2,
    lr: 1.0,
    delta_exp: 16,
    decay_steps: 0,
};

/// The examples: short counting and repeating patterns over the 128-token vocabulary,
/// every token after the first a target.
const SEQS: [[u32; 12]; 4] = [
    [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [1, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60],
    [1, 7, 8, 7, 8, 7, 8, 7, 8, 7, 8, 7],
    [1, 100, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90],
];

/// The heap, recording its peak use (embedded-alloc reports only the current one).
struct Tracked {
    heap: LlffHeap,
    peak: AtomicUsize,
}

// SAFETY: forwards to LlffHeap, a GlobalAlloc, and only reads its counters besides.
unsafe impl GlobalAlloc for Tracked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.heap.alloc(layout) };
        self.peak.fetch_max(self.heap.used(), Ordering::Relaxed);
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.heap.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: Tracked = Tracked {
    heap: LlffHeap::empty(),
    peak: AtomicUsize::new(0),
};

unsafe extern "C" {
    static _stack_start: u32;
    static _stack_end: u32;
}

/// Bytes of stack ever used: cortex-m-rt painted the stack region at reset (feature
/// `paint-stack`); the lowest word no longer holding the paint is the deepest reached.
fn stack_peak() -> usize {
    let top = &raw const _stack_start as usize;
    let mut p = &raw const _stack_end as usize;
    // SAFETY: every word between the stack's end and its start is RAM cortex-m-rt painted.
    while p < top
        && unsafe { core::ptr::read_volatile(p as *const u32) } == cortex_m_rt::STACK_PAINT_VALUE
    {
        p += 4;
    }
    top - p
}

/// Lowercase hex of `bytes` into `out`.
fn hex<'a>(bytes: &[u8], out: &'a mut [u8; 64]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().take(32).enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    core::str::from_utf8(&out[..2 * bytes.len().min(32)]).unwrap_or("")
}

fn run() -> edgetune::Result<()> {
    // The weights are read where they are in the image, not copied to the heap.
    let be = CpuInPlace { image: MODEL };
    // Feature `truncated-model`: the image's model cut short, to show that error path.
    let bytes = if cfg!(feature = "truncated-model") {
        &MODEL[..MODEL.len() / 2]
    } else {
        MODEL
    };
    let gguf = Gguf::parse(bytes).map_err(|e| edgetune::Error::InvalidArgument {
        name: "model",
        reason: alloc::format!("the embedded GGUF does not parse: {e}"),
    })?;
    let mut model = Model::from_gguf(&be, &gguf, bytes, "flash")?;
    let loaded = HEAP.heap.used();
    let layout = model.attach(AdapterConfig::ia3(), 0)?;
    let params: usize = layout.iter().map(|p| p.len() as usize).sum();
    let (mut model_hex, mut layout_hex) = ([0u8; 64], [0u8; 64]);
    let model_sha: [u8; 32] = {
        use sha2::{Digest, Sha256};
        Sha256::digest(MODEL).into()
    };
    defmt::println!(
        "model: {=usize} bytes in flash, {=u32} layers of width {=u32}; IA3: {=usize} trainable values",
        MODEL.len(),
        model.cfg.n_layers,
        model.cfg.dim,
        params
    );
    let ZoConfig {
        session_key,
        eps,
        lr,
        delta_exp,
        ..
    } = ZO;
    let SeedMode::KSeed { k } = ZO.mode else {
        return Err(edgetune::Error::InvalidArgument {
            name: "mode",
            reason: "kseed".into(),
        });
    };
    defmt::println!(
        "session model={=str} layout={=str} trainable=ia3 init_seed=0 session_key={=u64} z=binomial mode=kseed k={=u32} eps_bits={=u32} lr_bits={=u32} delta_exp={=u32}",
        hex(&model_sha, &mut model_hex),
        hex(&layout_hash(model.layout()), &mut layout_hex),
        session_key,
        k,
        eps.to_bits(),
        lr.to_bits(),
        delta_exp
    );
    if cfg!(feature = "non-finite") {
        // Infinite IA3 scales: every loss is not finite, so every step is skipped.
        let huge: Vec<Vec<f32>> = model
            .layout()
            .iter()
            .map(|p| alloc::vec![f32::INFINITY; p.len() as usize])
            .collect();
        model.write_params(&huge)?;
    }
    let w0 = model.read_params()?;
    // The start values with their layout, so the host's run directory is complete (and a
    // reader in another language needs no model to replay it).
    for (p, v) in model.layout().iter().zip(&w0) {
        let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        defmt::println!(
            "param name={=str} rows={=u32} cols={=u32} w0_bits={=[?]}",
            p.name.as_str(),
            p.rows,
            p.cols,
            &bits[..]
        );
    }
    let mut state = ZoState::new(&be, &model, &w0)?;
    drop(w0);
    let batch: Vec<Example> = SEQS
        .iter()
        .map(|s| Example {
            tokens: s.to_vec(),
            targets: (0..s.len()).map(|i| i > 0).collect(),
        })
        .collect();
    let mut cache = model.new_cache(SEQS[0].len() as u32)?;
    for step in 0..STEPS {
        let seed = ZO.seed_for_step(step, None);
        let out = zo_step(
            &be,
            &model,
            &mut cache,
            &mut state,
            &ZO,
            &batch,
            (u64::from(step), seed),
            None,
        )?;
        match out.g {
            Some(g) => defmt::println!(
                "record step={=u32} seed={=u32} g_bits={=u32} loss={=f32}",
                step,
                seed,
                g.to_bits(),
                ((out.loss_plus + out.loss_minus) / 2.0) as f32
            ),
            None => defmt::println!("skipped step={=u32}: a loss was not finite", step),
        }
    }
    let mut hash_hex = [0u8; 64];
    defmt::println!("state-hash: {=str}", hex(&state.hash(&be)?, &mut hash_hex));
    defmt::println!(
        "memory: heap peak {=usize} B of {=usize} (the loaded model: {=usize}), stack peak {=usize} B, model image {=usize} B in flash",
        HEAP.peak.load(Ordering::Relaxed),
        HEAP_BYTES,
        loaded,
        stack_peak(),
        MODEL.len()
    );
    Ok(())
}

#[entry]
fn main() -> ! {
    {
        use core::mem::MaybeUninit;
        static mut MEMORY: [MaybeUninit<u8>; HEAP_BYTES] = [MaybeUninit::uninit(); HEAP_BYTES];
        // SAFETY: called once, before any allocation; the buffer is used by nothing else.
        unsafe { HEAP.heap.init(&raw mut MEMORY as usize, HEAP_BYTES) };
    }
    match run() {
        Ok(()) => semihosting::process::exit(0),
        Err(e) => {
            defmt::error!("{}", defmt::Display2Format(&e));
            semihosting::process::exit(2)
        }
    }
}

/// Set by the first panic or fault: a second one (say, inside the logger) halts without
/// logging, so nothing recurses.
static HALTING: AtomicBool = AtomicBool::new(false);

/// An allocation failure or a bug: logged, then a clean halt with a non-zero exit.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if !HALTING.swap(true, Ordering::Relaxed) {
        defmt::error!("panic: {}", defmt::Display2Format(info));
    }
    semihosting::process::exit(101)
}

/// A fault (a stack overflow into the flash-linked region, a bad access): halts.
#[exception]
unsafe fn HardFault(_frame: &ExceptionFrame) -> ! {
    if !HALTING.swap(true, Ordering::Relaxed) {
        defmt::error!("hard fault");
    }
    semihosting::process::exit(3)
}
