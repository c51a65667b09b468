//! `edgetune bench`: kernel throughput at fixed shapes on the chosen device and on the CPU
//! reference, in the same run. Peers (numpy/OpenBLAS) are timed by `scripts/bench.sh`.

use crate::{CliError, DeviceArgs, flag, in_range};
use edgetune::adapter::{AdapterConfig, Target};
use edgetune::backend::any::AnyBackend;
use edgetune::backend::cpu::Cpu;
use edgetune::train::backprop::{BackpropConfig, BackpropTrainer, Optimizer, Schedule};
use edgetune::train::{Example, SeedMode, ZoConfig, ZoState, batch_nll, pack_capacity, zo_step};
use edgetune::{Backend, Op, WeightType};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Also time the CPU reference (slow at the largest shapes).
    #[arg(long)]
    with_reference: bool,
    /// Benchmark this model instead of the kernels: prompt processing and generation.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Prompt tokens for the model benchmark.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Generated tokens for the model benchmark.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Training shape for the model benchmark, BATCHxTOKENS: that many sequences packed into
    /// one forward with the loss over all their positions (a zeroth-order step runs this
    /// twice).
    #[arg(long, default_value = "4x128", value_parser = parse_batch)]
    train: (usize, usize),
    /// Seconds to spend per measurement (five batches).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Print one JSON object (for scripts/bench_compare.py) instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_batch(s: &str) -> Result<(usize, usize), String> {
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|&v| v > 0);
    match s.split_once('x').map(|(b, t)| (parse(b), parse(t))) {
        Some((Some(b), Some(t))) if b <= 1024 => Ok((b, t)),
        _ => Err(format!(
            "{s:?} is not BATCHxTOKENS with 1 <= BATCH <= 1024 and TOKENS >= 1, e.g. 4x128"
        )),
    }
}

/// One benchmark: a name, the op, and how to turn seconds per call into a rate.
struct Item {
    name: String,
    m: u32,
    k: u32,
    n: u32,
    wtype: Option<WeightType>,
    a_t: bool,
    b_t: bool,
}

impl Item {
    fn flops(&self) -> f64 {
        2.0 * f64::from(self.m) * f64::from(self.k) * f64::from(self.n)
    }

    /// Bytes the kernel must read (weights, activations) and write.
    fn bytes(&self) -> f64 {
        let w = match self.wtype {
            Some(t) => t.row_bytes(self.k as usize).unwrap_or(0) as f64 * f64::from(self.n),
            None => 4.0 * f64::from(self.k) * f64::from(self.n),
        };
        w + 4.0 * f64::from(self.m) * (f64::from(self.k) + f64::from(self.n))
    }
}

fn items() -> Vec<Item> {
    let mut v: Vec<Item> = [(false, false), (true, false), (false, true)]
        .into_iter()
        .map(|(a_t, b_t)| Item {
            name: format!(
                "matmul f32{}{}",
                if a_t { " aT" } else { "" },
                if b_t { " bT" } else { "" }
            ),
            m: 1024,
            k: 1024,
            n: 1024,
            wtype: None,
            a_t,
            b_t,
        })
        .collect();
    // SmolLM2-135M shapes (k = input width, n = output rows): attention/MLP projections
    // and the output head. Q4_K needs k % 256 == 0, so it runs only where k = 1536.
    for (k, n) in [(576u32, 1536u32), (1536, 576), (576, 49152)] {
        for t in [WeightType::Q4_1, WeightType::Q4K, WeightType::Q8_0] {
            if t.row_bytes(k as usize).is_ok() {
                v.push(Item {
                    name: format!("qmatvec {}", t.name()),
                    m: 1,
                    k,
                    n,
                    wtype: Some(t),
                    a_t: false,
                    b_t: false,
                });
            }
        }
    }
    v
}

fn fill(n: usize, salt: u32) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let w = edgetune::rng::philox4x32_10([i as u32 / 16, salt, 0, 0], [1, 2])[0];
            // Keep every 16-bit half a small finite f16 so quantised scales stay sane.
            (w as u8) & if i % 2 == 1 { 0x3B } else { 0xFF }
        })
        .collect()
}

/// Seconds per call (submit and wait included).
fn time<B: Backend>(dev: &B, item: &Item, min_secs: f64) -> edgetune::Result<f64> {
    let (m, k, n) = (item.m as usize, item.k as usize, item.n as usize);
    let x = dev.upload_f32(&vec![0.5f32; m * k], "x")?;
    let w_bytes = match item.wtype {
        Some(t) => fill(t.row_bytes(k)? * n, 1),
        None => (0..k * n)
            .flat_map(|i| ((i % 7) as f32 * 0.1).to_le_bytes())
            .collect(),
    };
    let w = match item.wtype {
        Some(t) => dev.upload_weights(t, &w_bytes, item.k, "w")?,
        None => dev.upload(&w_bytes, "w")?,
    };
    let out = dev.alloc((m * n * 4) as u64, "out")?;
    let op = match item.wtype {
        Some(wtype) => Op::QMatmul {
            x: &x,
            w: &w,
            factors: None,
            out: &out,
            wtype,
            m: item.m,
            k: item.k,
            n: item.n,
        },
        None => Op::Matmul {
            a: &x,
            b: &w,
            out: &out,
            m: item.m,
            k: item.k,
            n: item.n,
            a_t: item.a_t,
            b_t: item.b_t,
        },
    };
    let call = |dev: &B| -> edgetune::Result<f64> {
        let start = Instant::now();
        dev.run(&op)?;
        dev.sync()?;
        Ok(start.elapsed().as_secs_f64())
    };
    // Warm-up (pipeline creation), then the median of five batches; one call is enough
    // when it alone outlasts the budget (the CPU reference at the largest shapes).
    let first = call(dev)?;
    if first > min_secs {
        return Ok(first);
    }
    let mut batches = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let mut reps = 0u32;
        while reps == 0 || start.elapsed().as_secs_f64() < min_secs / 5.0 {
            call(dev)?;
            reps += 1;
        }
        batches.push(start.elapsed().as_secs_f64() / f64::from(reps));
    }
    batches.sort_by(f64::total_cmp);
    Ok(batches[2])
}

/// One kernel measurement, as a table line or a JSON row.
fn report(device: &str, item: &Item, secs: f64, json: &mut Option<Vec<serde_json::Value>>) {
    let shape = format!("{}x{}x{}", item.m, item.k, item.n);
    let (gflops, gbs) = (item.flops() / secs / 1e9, item.bytes() / secs / 1e9);
    match json {
        Some(rows) => rows.push(serde_json::json!({
            "device": device, "kernel": item.name, "shape": shape,
            "ms": secs * 1e3, "gflop_s": gflops, "gb_s": gbs,
        })),
        None => println!(
            "{device:<24} {:<20} {shape:>18} {:>10.3} ms {gflops:>9.2} GFLOP/s {gbs:>8.2} GB/s",
            item.name,
            secs * 1e3,
        ),
    }
}

/// Peak resident set size of this process, from /proc (Linux), in bytes.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts a new peak (Linux: "5" to clear_refs resets VmHWM to the current RSS), so each
/// test reports its own; where that is refused the peaks are cumulative, which the JSON
/// says.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The processor and the flags that pick the CPU paths' variants, as BENCHMARKS.md names
/// them.
pub fn cpu_description() -> (String, Vec<String>) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let listed = field("flags")
        .or_else(|| field("Features"))
        .unwrap_or_default();
    let have: Vec<&str> = listed
        .split_whitespace()
        .map(|f| if f == "asimd" { "neon" } else { f })
        .collect();
    let flags = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "neon",
    ]
    .into_iter()
    .filter(|f| have.contains(f))
    .map(String::from)
    .collect();
    (model, flags)
}

/// One model test: tokens per second and the peak RSS while it ran.
struct Row {
    test: String,
    tokens: usize,
    secs: f64,
    peak_rss: Option<u64>,
    loss: Option<f64>,
    note: Option<String>,
    /// What `tokens` counts ("tokens", or "seeds" for a replay).
    unit: &'static str,
}

/// Runs of each training row ([`Row::timed`]).
const TRAIN_REPS: usize = 3;

impl Row {
    /// Runs `f` `reps` times and keeps the median time and the last run's value; peak RSS
    /// over all runs. Training rows take three runs: one run of several seconds moves with
    /// this kind of shared machine's load, and their ratios are what the goals compare.
    fn timed<T>(
        test: String,
        tokens: usize,
        reps: usize,
        mut f: impl FnMut() -> edgetune::Result<T>,
    ) -> edgetune::Result<(Row, T)> {
        reset_peak_rss();
        let start = Instant::now();
        let mut value = f()?;
        let mut secs = vec![start.elapsed().as_secs_f64()];
        for _ in 1..reps {
            let start = Instant::now();
            value = f()?;
            secs.push(start.elapsed().as_secs_f64());
        }
        secs.sort_by(f64::total_cmp);
        let row = Row {
            test,
            tokens,
            secs: secs[secs.len() / 2],
            peak_rss: peak_rss(),
            loss: None,
            note: None,
            unit: "tokens",
        };
        Ok((row, value))
    }
}

/// Prompt processing (one batched forward of `prompt_tokens`), generation (`gen_tokens`
/// single-token forwards after it), like llama-bench's pp and tg tests, and the training
/// shape: `batch` sequences of `tokens` packed into one forward (as training packs a
/// batch) with the loss at every position.
fn model_bench<B: Backend>(
    dev: &B,
    label: &str,
    shapes: Option<String>,
    files: &edgetune::model::files::ModelFiles,
    args: &BenchArgs,
) -> edgetune::Result<()> {
    let model = files.load(dev)?;
    let vocab = model.cfg.vocab;
    // Arbitrary ids spread over the vocabulary (u64: the product passes u32 for long prompts).
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 7919 + 13 + salt * 104_729) % u64::from(vocab)) as u32)
            .collect()
    };
    let tokens = ids(args.prompt_tokens, 0);
    let capacity = (args.prompt_tokens + args.gen_tokens) as u32;
    let mut cache = model.new_cache(capacity.min(model.cfg.context))?;
    model.forward(&mut cache, &tokens[..8.min(tokens.len())], false)?; // warm-up: pipelines
    cache.clear();
    let mut rows = Vec::new();
    let (row, ()) = Row::timed(
        format!("pp{}", args.prompt_tokens),
        args.prompt_tokens,
        1,
        || model.forward(&mut cache, &tokens, false).map(drop),
    )?;
    rows.push(row);
    let (row, ()) = Row::timed(format!("tg{}", args.gen_tokens), args.gen_tokens, 1, || {
        let mut next = 1u32;
        for _ in 0..args.gen_tokens {
            let logits = model.forward(&mut cache, &[next], false)?;
            next =
                (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b }) as u32;
        }
        Ok(())
    })?;
    rows.push(row);
    drop(cache);
    let (batch, len) = args.train;
    // The batch packed into one forward pass where the context allows, as training runs it.
    let examples: Vec<Example> = (0..batch)
        .map(|b| Example {
            tokens: ids(len, b as u64 + 1),
            targets: vec![true; len],
        })
        .collect();
    let capacity = pack_capacity(&model, len, batch);
    let mut cache = model.new_cache(capacity)?;
    let (mut row, (nll, count)) = Row::timed(
        format!("train{batch}x{len}"),
        batch * len,
        TRAIN_REPS,
        || batch_nll(&model, &mut cache, &examples),
    )?;
    row.loss = Some(nll / count as f64);
    let forward_secs = row.secs;
    rows.push(row);
    drop(cache);
    // A zeroth-order step on the same batch: LoRA rank 8 on q and v, two forwards.
    let mut model = model;
    model.attach(AdapterConfig::lora(8, 16.0, &[Target::Q, Target::V]), 0)?;
    let zo = ZoConfig {
        session_key: 1,
        kind: edgetune::rng::ZKind::Binomial,
        mode: SeedMode::Mezo,
        eps: 1e-2,
        lr: 1e-4,
        delta_exp: 16,
        decay_steps: 0,
    };
    let w0 = model.read_params()?;
    let mut state = ZoState::new(dev, &model, &w0)?;
    let mut cache = model.new_cache(capacity)?;
    let mut step = |batch: &[Example], at: (u64, u32)| {
        zo_step(dev, &model, &mut cache, &mut state, &zo, batch, at, None)
    };
    // Warm-up: the first step compiles the perturbation and adapter pipelines on a GPU.
    step(&examples[..1], (0, 0))?;
    let (mut row, out) = Row::timed(
        format!("zo{batch}x{len}"),
        2 * batch * len,
        TRAIN_REPS,
        || step(&examples, (1, 1)),
    )?;
    row.loss = Some((out.loss_plus + out.loss_minus) / 2.0);
    row.note = Some(format!("{:.2}x the forward", row.secs / forward_secs));
    rows.push(row);
    // Replay: 1000 seeds fused into the accumulators of those LoRA parameters.
    let seeds: Vec<(u32, i32)> = (0..1000).map(|s| (s, 1000 - 2 * s as i32)).collect();
    let (mut row, ()) = Row::timed("replay1000".into(), 1000, 1, || {
        state.apply(dev, &zo, &seeds)?;
        state.accumulators(dev).map(drop)
    })?;
    row.unit = "seeds";
    row.note = Some(format!(
        "{:.3e} seed-params/s over {} params",
        1000.0 * state.params() as f64 / row.secs,
        state.params()
    ));
    rows.push(row);
    // A backprop step on the same batch and LoRA: forward with the tape, loss at every
    // position, backward, AdamW.
    let cfg = BackpropConfig {
        optimizer: Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        lr: 1e-4,
        schedule: Schedule::Constant,
        warmup: 0,
        total_steps: 2,
        clip: Some(1.0),
        micro_batches: 1,
        recompute: false,
        memory_limit: None,
    };
    let mut trainer = BackpropTrainer::start(&model, cfg, len as u32)?;
    trainer.step(&examples[..1])?; // warm-up: pipelines
    let (mut row, out) = Row::timed(format!("bp{batch}x{len}"), batch * len, TRAIN_REPS, || {
        trainer.step(&examples)
    })?;
    row.loss = Some(out.loss);
    row.note = Some(format!(
        "{:.2}x the forward; {:.1} MiB of activations, gradients and AdamW state",
        row.secs / forward_secs,
        trainer.working_bytes() as f64 / 1048576.0
    ));
    rows.push(row);
    drop(trainer);
    let mib = |b: Option<u64>| b.unwrap_or(0) as f64 / 1048576.0;
    if args.json {
        let (cpu, flags) = cpu_description();
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "test": r.test, "tokens": r.tokens, "seconds": r.secs,
                    "tok_s": r.tokens as f64 / r.secs,
                    "peak_rss_mib": r.peak_rss.map(|b| b as f64 / 1048576.0),
                    "loss": r.loss, "note": r.note, "unit": r.unit,
                })
            })
            .collect();
        let peaks_per_test = reset_peak_rss();
        println!(
            "{}",
            serde_json::json!({
                "system": label, "model": args.model.as_ref().map(|p| p.display().to_string()),
                "cpu": cpu, "cpu_flags": flags, "peak_rss_per_test": peaks_per_test,
                "kernel_shapes": shapes, "rows": rows,
            })
        );
        return Ok(());
    }
    for r in &rows {
        let extra = r
            .loss
            .map(|l| format!("   loss {l:.3}"))
            .into_iter()
            .chain(r.note.as_ref().map(|n| format!("   {n}")))
            .collect::<String>();
        println!(
            "{label:<34} {:<12} {:>5} {:<6} {:>8.2}/s   peak RSS {:>4.0} MiB{extra}",
            r.test,
            r.tokens,
            r.unit,
            r.tokens as f64 / r.secs,
            mib(r.peak_rss),
        );
    }
    Ok(())
}

/// The kernel shapes a GPU runs with and where they came from, for the JSON output.
fn shapes_of(gpu: &edgetune::backend::wgpu::Gpu) -> Option<String> {
    gpu.tuning()
        .map(|t| format!("{} ({})", t.shapes.spec(), t.origin))
}

pub fn run(args: &BenchArgs) -> Result<(), CliError> {
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0) {
        return flag(
            "--seconds",
            format!("{} must be in (0, 3600]", args.seconds),
        );
    }
    if let Some(path) = &args.model {
        let files = edgetune::model::files::ModelFiles::open(path, None)?;
        let context = files.config()?.context as usize;
        let why = format!("prompt and generated tokens share the model's context of {context}");
        in_range("--prompt-tokens", args.prompt_tokens, 1, context - 1, &why)?;
        in_range(
            "--gen-tokens",
            args.gen_tokens,
            1,
            context - args.prompt_tokens,
            &why,
        )?;
        in_range(
            "--train",
            args.train.1,
            2,
            context,
            "each training sequence is one window of the model's context, with at least one \
             token to predict",
        )?;
        return Ok(match args.device.open()? {
            AnyBackend::Gpu(gpu) => model_bench(
                &*gpu,
                &format!("edgetune wgpu ({})", gpu.report().name),
                shapes_of(&gpu),
                &files,
                args,
            ),
            AnyBackend::Host(host) => model_bench(
                &host,
                &format!("edgetune {}", host.name()),
                None,
                &files,
                args,
            ),
            AnyBackend::Cpu(_) => model_bench(&Cpu, "edgetune cpu reference", None, &files, args),
        }?);
    }
    let device = args.device.open()?;
    let mut json = args.json.then(Vec::new);
    for item in items() {
        match &device {
            AnyBackend::Gpu(gpu) => report(
                &gpu.report().name,
                &item,
                time(&**gpu, &item, args.seconds)?,
                &mut json,
            ),
            AnyBackend::Host(host) => report(
                &host.name(),
                &item,
                time(host, &item, args.seconds)?,
                &mut json,
            ),
            AnyBackend::Cpu(_) => {}
        }
        if matches!(device, AnyBackend::Cpu(_)) || args.with_reference {
            report(
                "cpu reference",
                &item,
                time(&Cpu, &item, args.seconds)?,
                &mut json,
            );
        }
    }
    if let Some(rows) = json {
        let (cpu, flags) = cpu_description();
        let shapes = device.gpu().and_then(shapes_of);
        println!(
            "{}",
            serde_json::json!({
                "cpu": cpu, "cpu_flags": flags, "kernel_shapes": shapes, "kernels": rows,
            })
        );
    }
    Ok(())
}
