//! `edgetune`: a thin skin over the runtime's public API.

use clap::{Parser, Subcommand, ValueEnum};
use edgetune::Backend;
use edgetune::backend::any::{AnyBackend, BackendKind as Kind, BackendOptions};
use edgetune::backend::host::Isa;
use edgetune::backend::tune::{KernelShapes, Tuning};
use edgetune::backend::wgpu::{Gpu, GpuOptions};
use edgetune::selftest::{self, CheckRow};
use std::process::ExitCode;

mod backprop;
mod bench;
mod fed;
mod model;
mod train;

/// Why a command failed: a flag out of range (named as the user typed it), or an error
/// from the runtime.
#[derive(Debug)]
pub enum CliError {
    Flag { flag: &'static str, reason: String },
    Runtime(edgetune::Error),
}

impl From<edgetune::Error> for CliError {
    fn from(e: edgetune::Error) -> Self {
        CliError::Runtime(e)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Flag { flag, reason } => write!(f, "{flag}: {reason}"),
            CliError::Runtime(e) => write!(f, "{e}"),
        }
    }
}

/// A flag error.
pub fn flag<T>(flag: &'static str, reason: impl Into<String>) -> Result<T, CliError> {
    Err(CliError::Flag {
        flag,
        reason: reason.into(),
    })
}

/// Checks that a count flag is in `lo..=hi`, where `hi` comes from `why` (the model's
/// context, ...).
pub fn in_range(
    name: &'static str,
    v: usize,
    lo: usize,
    hi: usize,
    why: &str,
) -> Result<(), CliError> {
    if v < lo || v > hi {
        return flag(name, format!("{v} is outside {lo}..={hi} ({why})"));
    }
    Ok(())
}

#[derive(Parser, Debug)]
#[command(name = "edgetune", version, about = "On-device tuning runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// A real GPU if there is one, else the multi-threaded CPU path (a CPU-emulated adapter
    /// such as llvmpipe counts as no GPU).
    Auto,
    /// The CPU reference: plain, single-threaded, the oracle.
    Cpu,
    /// The multi-threaded CPU path.
    Host,
    Gpu,
}

/// The instruction set of the multi-threaded CPU path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum IsaArg {
    /// The widest this processor has.
    Auto,
    Baseline,
    Avx2,
    Avx512,
}

/// Load-time quantisation of a safetensors model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

/// The model shared by the model commands.
#[derive(clap::Args, Debug, Clone)]
struct ModelArgs {
    /// A .gguf file, or a directory with config.json, safetensors and tokenizer.json.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Quantise a safetensors model's projections at load.
    #[arg(long, value_enum)]
    quantize: Option<QuantArg>,
}

/// A trained adapter to apply.
#[derive(clap::Args, Debug, Clone)]
struct AdapterArg {
    /// A directory with adapter_config.json and adapter_model.safetensors (PEFT LoRA or
    /// IA3, or trainable norms written by `edgetune train`), or a llama.cpp GGUF LoRA file.
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
}

impl ModelArgs {
    fn open(&self) -> Result<edgetune::model::files::ModelFiles, edgetune::Error> {
        let q = self.quantize.map(|q| match q {
            QuantArg::Q8_0 => edgetune::WeightType::Q8_0,
            QuantArg::Q4_0 => edgetune::WeightType::Q4_0,
        });
        edgetune::model::files::ModelFiles::open(&self.model, q)
    }
}

/// Device choice shared by every command.
#[derive(clap::Args, Debug, Clone)]
struct DeviceArgs {
    /// Where kernels run.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// The GPU (wgpu adapter): case-insensitive substring of its name (default:
    /// $WGPU_ADAPTER_NAME, then wgpu's choice).
    #[arg(long)]
    gpu: Option<String>,
    /// GPU APIs to consider, comma-separated: vulkan, metal, dx12, gl (default: $WGPU_BACKEND,
    /// then all).
    #[arg(long)]
    wgpu_backend: Option<String>,
    /// GPU kernel shapes: `cached` (measured on first use of an adapter and driver, then
    /// read from the cache), `measure` (again, replacing the cache), `defaults`, or forced
    /// as matvec=WGxROWS[s|g|gt],matvec_wide=WGxROWS[s|g|gt],attention_decode=WG[s|q|d|dt][/N],
    /// attention_prefill=portable|sg8|sg8t,prompt_matmul=portable|sg8|sg8t (keys left out
    /// keep their defaults).
    #[arg(long, default_value = "cached", value_parser = parse_tuning)]
    kernel_shapes: Tuning,
    /// Instruction set of the multi-threaded CPU path (to compare variants on one host).
    #[arg(long, value_enum, default_value = "auto")]
    cpu_isa: IsaArg,
}

fn parse_tuning(s: &str) -> Result<Tuning, String> {
    Ok(match s {
        "cached" => Tuning::Cached,
        "measure" => Tuning::Measure,
        "defaults" => Tuning::Defaults,
        spec => Tuning::Force(KernelShapes::parse(spec).map_err(|e| e.to_string())?),
    })
}

impl DeviceArgs {
    /// Opens the chosen backend and says on stderr which it is (and, for `auto`, why),
    /// with the GPU's kernel shapes and any notice about them.
    pub fn open(&self) -> Result<AnyBackend, edgetune::Error> {
        let opts = BackendOptions {
            kind: match self.backend {
                BackendKind::Auto => Kind::Auto,
                BackendKind::Cpu => Kind::Cpu,
                BackendKind::Host => Kind::Host,
                BackendKind::Gpu => Kind::Gpu,
            },
            threads: None,
            isa: match self.cpu_isa {
                IsaArg::Auto => None,
                IsaArg::Baseline => Some(Isa::Baseline),
                IsaArg::Avx2 => Some(Isa::Avx2),
                IsaArg::Avx512 => Some(Isa::Avx512),
            },
            gpu: GpuOptions {
                adapter_name: self.gpu.clone(),
                backends: self.wgpu_backend.clone(),
                tuning: self.kernel_shapes.clone(),
                ..GpuOptions::default()
            },
        };
        let (backend, why) = AnyBackend::open(&opts)?;
        match why {
            Some(why) => eprintln!("backend: {} (auto: {why})", backend.name()),
            None => eprintln!("backend: {}", backend.name()),
        }
        if let Some(t) = backend.gpu().and_then(Gpu::tuning) {
            eprintln!("kernel shapes: {} ({})", t.shapes.spec(), t.origin);
            for note in &t.notes {
                eprintln!("notice: {note}");
            }
        }
        Ok(backend)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Device conformance suite: every kernel against the CPU reference, with throughput.
    Selftest {
        #[command(flatten)]
        device: DeviceArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Only kernels whose name contains this text.
        #[arg(long)]
        kernel: Option<String>,
    },
    /// Kernel benchmarks at fixed shapes (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Architecture, parameters, quant types, tokenizer, context and memory of a model.
    Info {
        /// A .gguf file or a Hugging Face model directory.
        model: std::path::PathBuf,
    },
    /// Token ids of a text, as a JSON array.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        text: String,
    },
    /// Streams a continuation of a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        adapter: AdapterArg,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat format (ChatML, Llama 3).
        #[arg(long)]
        chat: bool,
        /// Tokens to generate (default: 128, or what the context leaves after the prompt).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// 0 keeps every token.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Perplexity of a text file, in independent windows of the context.
    Perplexity {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        adapter: AdapterArg,
        /// A UTF-8 text file.
        #[arg(long)]
        text: std::path::PathBuf,
        /// Tokens per window (default: 512, or the model's context if shorter).
        #[arg(long)]
        window: Option<usize>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Float32 logits [n_tokens, vocab] for every position, written as .npy.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        adapter: AdapterArg,
        /// Comma-separated token ids.
        #[arg(long)]
        tokens: String,
        #[arg(long)]
        out: std::path::PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Tunes an adapter on a JSONL data set: zeroth-order by default (two forward passes
    /// per step, every update a (seed, scalar) pair), or `--method backprop` (LoRA, IA3).
    Train(Box<train::TrainArgs>),
    /// Rebuilds a run's trainable state from its seed history alone and prints its hash.
    Replay(train::ReplayArgs),
    /// Exact-match accuracy of greedy answers to prompt/completion pairs, and the loss.
    Score(Box<train::ScoreArgs>),
    /// Adapter files: export for other runtimes.
    Adapter {
        #[command(subcommand)]
        cmd: train::AdapterCmd,
    },
    /// Federated tuning: the aggregation server, and a simulation of a server and clients.
    Fed {
        #[command(subcommand)]
        cmd: fed::FedCmd,
    },
}

fn print_rows(rows: &[CheckRow], json: bool) {
    if !json {
        println!(
            "{:<12} {:<36} {:>10} {:>10} {:>14} {:>5} {:>12}",
            "kernel", "shape", "max_abs", "max_rel", "tolerance", "pass", "throughput"
        );
    }
    for r in rows {
        if json {
            println!("{}", r.to_json());
        } else {
            let verdict = if r.pass { "ok" } else { "FAIL" };
            println!(
                "{:<12} {:<36} {:>10.3e} {:>10.3e} {:>14} {:>5} {:>8.2} {}",
                r.kernel,
                r.shape,
                r.max_abs,
                r.max_rel,
                r.tolerance.text(),
                verdict,
                r.throughput,
                r.unit.label()
            );
            if let Some(e) = &r.error {
                println!("           error: {e}");
            }
        }
    }
}

/// JSON has no NaN or infinity.
fn selftest(device: &DeviceArgs, json: bool, kernel: Option<&str>) -> Result<bool, CliError> {
    if let Some(k) = kernel {
        let mut known: Vec<&str> = selftest::cases().iter().map(|c| c.kernel()).collect();
        known.dedup();
        if !known.iter().any(|n| n.contains(k)) {
            return flag(
                "--kernel",
                format!(
                    "no kernel name contains `{k}`; the kernels are: {}",
                    known.join(", ")
                ),
            );
        }
    }
    let be = device.open()?;
    match &be {
        AnyBackend::Cpu(_) => {
            if json {
                println!("{}", serde_json::json!({"adapter": "cpu reference"}));
            } else {
                println!(
                    "device: cpu reference (compared with itself: checks the harness, times the reference)"
                );
            }
        }
        AnyBackend::Host(host) => {
            if json {
                println!("{}", serde_json::json!({"adapter": host.name()}));
            } else {
                println!("device: {} (against the cpu reference)", host.name());
            }
        }
        AnyBackend::Gpu(gpu) => {
            let a = gpu.report();
            let (shapes, origin) = gpu
                .tuning()
                .map(|t| (t.shapes.spec(), t.origin.clone()))
                .unwrap_or_default();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "adapter": a.name, "backend": a.backend, "device_type": a.device_type,
                        "driver": a.driver, "driver_info": a.driver_info,
                        "max_buffer_size": a.max_buffer_size, "max_storage_binding": a.max_storage_binding,
                        "max_workgroups_per_dim": a.max_workgroups_per_dim,
                        "max_invocations_per_workgroup": a.max_invocations_per_workgroup,
                        "shader_f16": a.shader_f16, "subgroups": a.subgroups,
                        "kernel_shapes": shapes, "kernel_shapes_origin": origin,
                    })
                );
            } else {
                println!("adapter: {} ({}, {})", a.name, a.backend, a.device_type);
                println!("driver:  {} {}", a.driver, a.driver_info);
                println!(
                    "limits:  buffer {} B, storage binding {} B, {} workgroups/dim, {} invocations/workgroup",
                    a.max_buffer_size,
                    a.max_storage_binding,
                    a.max_workgroups_per_dim,
                    a.max_invocations_per_workgroup
                );
                println!(
                    "features: shader-f16 {}, subgroups {}",
                    a.shader_f16, a.subgroups
                );
                println!("kernel shapes: {shapes} ({origin})");
            }
        }
    }
    let rows = selftest::run_any(&be, kernel);
    print_rows(&rows, json);
    let failed = rows.iter().filter(|r| !r.pass).count();
    if !json {
        println!("{} checks, {} failed", rows.len(), failed);
    }
    Ok(failed == 0 && !rows.is_empty())
}

/// The sampling flags, checked against the model before any work.
fn sampling(
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repetition_penalty: f32,
    seed: u64,
    vocab: u32,
) -> Result<edgetune::generate::Sampling, CliError> {
    in_range(
        "--top-k",
        top_k,
        0,
        vocab as usize,
        "0 keeps all; at most the vocabulary",
    )?;
    let sampling = edgetune::generate::Sampling {
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        seed,
    };
    // The ranges live in the runtime; here its field names become the flags.
    sampling.validate().map_err(|e| match e {
        edgetune::Error::InvalidArgument { name, reason } => CliError::Flag {
            flag: match name {
                "temperature" => "--temperature",
                "top_p" => "--top-p",
                "repetition_penalty" => "--repetition-penalty",
                other => other,
            },
            reason,
        },
        other => other.into(),
    })?;
    Ok(sampling)
}

fn run(cli: &Cli) -> Result<bool, CliError> {
    match &cli.command {
        Command::Selftest {
            device,
            json,
            kernel,
        } => selftest(device, *json, kernel.as_deref()),
        Command::Bench(args) => bench::run(args).map(|()| true),
        Command::Info { model } => Ok(model::info(model).map(|()| true)?),
        Command::Tokenize { model: m, text } => {
            let ids = m.open()?.tokenizer()?.encode(text)?;
            println!("{}", serde_json::json!(ids));
            Ok(true)
        }
        Command::Train(args) => train::train(args),
        Command::Replay(args) => train::replay_cmd(args),
        Command::Score(args) => train::score_cmd(args),
        Command::Adapter { cmd } => train::adapter_cmd(cmd),
        Command::Fed { cmd } => fed::run(cmd),
        Command::Generate {
            model: m,
            adapter,
            prompt,
            chat,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            device,
        } => {
            let f = m.open()?;
            let cfg = f.config()?;
            let sampling = sampling(
                *temperature,
                *top_k,
                *top_p,
                *repetition_penalty,
                *seed,
                cfg.vocab,
            )?;
            let tokenizer = f.tokenizer()?;
            if *chat && tokenizer.chat == edgetune::tokenizer::ChatTemplate::Raw {
                eprintln!(
                    "warning: the model's chat template is not recognised; using the prompt as it is"
                );
            }
            let text = if *chat {
                tokenizer.chat.user_turn(prompt)
            } else {
                prompt.clone()
            };
            let prompt = tokenizer.encode_prompt(&text)?;
            let context = cfg.context as usize;
            // At least one token must be left to generate.
            in_range(
                "--prompt",
                prompt.len(),
                1,
                context - 1,
                &format!("tokens; the model's context is {context}"),
            )?;
            let max_tokens = max_tokens.unwrap_or((context - prompt.len()).min(128));
            in_range(
                "--max-tokens",
                max_tokens,
                1,
                context - prompt.len(),
                &format!(
                    "the prompt's {} tokens and these must fit the context of {context}",
                    prompt.len()
                ),
            )?;
            let req = model::GenerateRequest {
                prompt,
                tokenizer: &tokenizer,
                max_tokens,
                sampling,
            };
            model::generate_text(&device.open()?, &f, adapter.adapter.as_deref(), &req)?;
            Ok(true)
        }
        Command::Perplexity {
            model: m,
            adapter,
            text,
            window,
            device,
        } => {
            let f = m.open()?;
            let context = f.config()?.context as usize;
            let window = window.unwrap_or(context.min(512));
            in_range(
                "--window",
                window,
                2,
                context,
                &format!("tokens; the model's context is {context}"),
            )?;
            let body =
                edgetune::format::file::read_text(text, edgetune::format::file::FileKind::Text)?;
            let ids = f.tokenizer()?.encode(&body)?;
            if ids.len() < 2 {
                return flag(
                    "--text",
                    format!(
                        "{} holds {} tokens; perplexity needs at least 2",
                        text.display(),
                        ids.len()
                    ),
                );
            }
            let (nll, n) = model::nll(
                &device.open()?,
                &f,
                adapter.adapter.as_deref(),
                &ids,
                window,
            )?;
            if !nll.is_finite() {
                return Err(edgetune::Error::NonFinite {
                    what: "perplexity",
                    at: format!("the mean negative log-likelihood over {n} tokens ({nll})"),
                }
                .into());
            }
            println!(
                "perplexity {:.4} over {n} tokens (mean NLL {nll:.4})",
                nll.exp()
            );
            Ok(true)
        }
        Command::Logits {
            model: m,
            adapter,
            tokens,
            out,
            device,
        } => {
            let ids = model::parse_tokens(tokens)?;
            let file = m.open()?;
            let context = file.config()?.context as usize;
            in_range(
                "--tokens",
                ids.len(),
                1,
                context,
                &format!("ids; the model's context is {context}"),
            )?;
            let (cfg, logits) =
                model::logits(&device.open()?, &file, adapter.adapter.as_deref(), &ids)?;
            model::write_npy(out, &[ids.len(), cfg.vocab as usize], &logits)?;
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        edgetune::backend::tune::use_llvmpipe_threads();
    }
    // Panics caught at the runtime's boundary (inside a dependency) are reported as errors;
    // do not also print them.
    edgetune::guard::quiet_caught_panics();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
