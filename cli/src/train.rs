//! `edgetune train` and `edgetune replay`: zeroth-order tuning runs over the runtime's
//! trainer, with a progress line, checkpoints and a loss plot (backprop runs: `backprop`),
//! and `edgetune adapter export|merge`.

use crate::{CliError, DeviceArgs, ModelArgs, flag, in_range};
use clap::ValueEnum;
use edgetune::Backend;
use edgetune::adapter::{AdapterConfig, Method, Target};
use edgetune::model::files::ModelFiles;
use edgetune::rng::ZKind;
use edgetune::train::data::{self, DataOptions, Dataset};
use edgetune::train::history::{self, Session, hex};
use edgetune::train::run::{Trainer, replay};
use edgetune::train::{SeedMode, ZoConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Trainable {
    Lora,
    Ia3,
    Norms,
    /// Every weight of an unquantised (f32, f16, bf16) model.
    Full,
    /// The block scales of a Q8_0/Q4_0/Q4_1/Q4_K/Q6_K model's projections (QZO; a K-quant's
    /// super-block scale); written back into
    /// a GGUF model by `adapter export --gguf`.
    Scales,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Mezo,
    Kseed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// Zeroth-order (two forward passes per step).
    Zo,
    /// Backpropagation through the frozen model (LoRA or IA3).
    Backprop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// JSONL: {"prompt","completion"}, {"messages":[...]} or {"input_ids","labels"}.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// The run directory (adapter, seed history, loss plot); with --resume, that run's.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Continue the run in this directory.
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "zo")]
    pub(crate) method: MethodArg,
    #[arg(long, value_enum, default_value = "lora")]
    pub(crate) trainable: Trainable,
    /// mezo: a fresh seed per step; kseed: FedKSeed's K candidate seeds.
    #[arg(long, value_enum, default_value = "mezo")]
    pub(crate) mode: ModeArg,
    /// K for --mode kseed.
    #[arg(long, default_value_t = 4096)]
    pub(crate) seeds: u32,
    /// FedKSeed-Pro: a JSON list of K integer weights, one per candidate seed; each step's
    /// seed is drawn in proportion to them (uniformly without this).
    #[arg(long)]
    pub(crate) seed_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 1e-2)]
    pub(crate) eps: f32,
    /// Learning rate. Zeroth-order default 5e-4 (it lowered SmolLM2's loss steadily on the
    /// real task; 1e-3 diverged there after 60 steps); backprop default 1e-3.
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Backprop: the optimiser (PyTorch's AdamW, or SGD with momentum; default adamw).
    #[arg(long, value_enum)]
    pub(crate) optimizer: Option<OptimizerArg>,
    /// Backprop: the learning-rate schedule after the warmup (Hugging Face's; default
    /// constant).
    #[arg(long, value_enum)]
    pub(crate) schedule: Option<ScheduleArg>,
    /// Backprop: steps of linear warmup from 0.
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup: u64,
    /// Backprop: AdamW's decoupled weight decay, or SGD's L2 term.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) weight_decay: f32,
    /// Backprop: SGD's momentum.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) momentum: f32,
    /// Backprop: micro-batches per step (gradient accumulation); each adds the gradient of
    /// its own mean loss, divided by their number.
    #[arg(long, default_value_t = 1)]
    pub(crate) micro_batches: u32,
    /// Backprop: recompute each layer's activations in the backward pass instead of keeping
    /// them all (less memory, one more forward pass per step).
    #[arg(long)]
    pub(crate) recompute: bool,
    /// Backprop: MiB of activations, gradients and optimiser state the run may hold; more
    /// is refused before the first step, with the size needed.
    #[arg(long)]
    pub(crate) max_memory: Option<u64>,
    #[arg(long, default_value_t = 200)]
    pub(crate) steps: u64,
    /// Examples per step (default 4).
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Longest example in tokens, longer ones skipped and counted (default: 256, or the
    /// model's context if shorter).
    #[arg(long)]
    pub(crate) seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub(crate) rank: u32,
    #[arg(long, default_value_t = 16.0)]
    pub(crate) alpha: f32,
    /// Projections LoRA or scales train, comma-separated (q,k,v,o,gate,up,down); default
    /// q,v for LoRA and all seven for scales; IA3 uses k,v,down.
    #[arg(long)]
    pub(crate) targets: Option<String>,
    /// Held-out JSONL, scored before, at each checkpoint and after.
    #[arg(long)]
    pub(crate) eval: Option<PathBuf>,
    /// Wrap prompt/completion pairs in the model's chat format.
    #[arg(long)]
    pub(crate) chat: bool,
    /// Seeds the session key, the adapter's start values and the data order (default 0).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// The learning rate falls linearly to zero at this step (0: constant).
    #[arg(long, default_value_t = 0)]
    pub(crate) lr_decay_steps: u32,
    /// Zeroth-order: cut |g| above this to it (guards against a rare huge scalar; default
    /// 10). Backprop: the largest global gradient norm (default 1, as Hugging Face's).
    #[arg(long)]
    pub(crate) clip: Option<f32>,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    pub(crate) checkpoint_every: u64,
    /// The update unit is 2^-delta_exp (see docs/zeroth-order.md).
    #[arg(long, default_value_t = 16)]
    pub(crate) delta_exp: u32,
    #[command(flatten)]
    pub(crate) device: DeviceArgs,
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A run directory written by `edgetune train`.
    #[arg(long)]
    history: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained adapter (PEFT format) to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL of {"prompt","completion"} pairs.
    #[arg(long)]
    data: PathBuf,
    /// Wrap prompts in the model's chat format (as `train --chat` does).
    #[arg(long)]
    chat: bool,
    /// Tokens generated per answer (greedy).
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// What decides the data a step sees: fixed for a run, so a resumed run sees what an
/// uninterrupted one would have.
pub(crate) struct RunSettings {
    pub(crate) data_seed: u64,
    pub(crate) batch: usize,
    pub(crate) seq_len: usize,
    pub(crate) chat: bool,
    pub(crate) clip: Option<f32>,
    pub(crate) data_sha256: String,
}

impl RunSettings {
    pub(crate) fn to_json(&self, data: &Path) -> serde_json::Value {
        serde_json::json!({
            "data": data.display().to_string(),
            "data_sha256": self.data_sha256,
            "data_seed": self.data_seed,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "chat": self.chat,
            "clip": self.clip,
        })
    }

    /// The session's settings; a flag that disagrees with them, or other data, is an error.
    pub(crate) fn resumed(
        a: &TrainArgs,
        run: &serde_json::Value,
        init_seed: u64,
        data_sha: &str,
    ) -> Result<RunSettings, CliError> {
        let stored = RunSettings {
            data_seed: run["data_seed"].as_u64().unwrap_or(init_seed),
            batch: run["batch"].as_u64().unwrap_or(0) as usize,
            seq_len: run["seq_len"].as_u64().unwrap_or(0) as usize,
            chat: run["chat"].as_bool().unwrap_or(false),
            clip: run["clip"].as_f64().map(|c| c as f32),
            data_sha256: run["data_sha256"].as_str().unwrap_or_default().to_owned(),
        };
        if stored.data_sha256.is_empty() || stored.batch == 0 || stored.seq_len == 0 {
            return flag(
                "--resume",
                "the session predates the data settings a resume needs (data_sha256, batch, seq_len in `run`)",
            );
        }
        if stored.data_sha256 != data_sha {
            return flag(
                "--data",
                "is not the file this run trained on (its SHA-256 differs from session.json's)",
            );
        }
        let differs = |given: Option<u64>, have: u64| given.is_some_and(|g| g != have);
        for (name, bad) in [
            ("--seed", differs(a.seed, stored.data_seed)),
            (
                "--batch",
                differs(a.batch.map(|b| b as u64), stored.batch as u64),
            ),
            (
                "--seq-len",
                differs(a.seq_len.map(|l| l as u64), stored.seq_len as u64),
            ),
            ("--chat", a.chat && !stored.chat),
            ("--clip", a.clip.is_some() && a.clip != stored.clip),
        ] {
            if bad {
                return flag(
                    name,
                    "differs from the run being resumed (see its session.json)",
                );
            }
        }
        eprintln!(
            "resuming: seed {}, batch {}, seq-len {}, chat {}, and the session's adapter, lr, eps and seeds",
            stored.data_seed, stored.batch, stored.seq_len, stored.chat
        );
        Ok(stored)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum AdapterCmd {
    /// Writes an adapter for another runtime: `--gguf` as llama.cpp's GGUF LoRA, or for a
    /// scales or IA3 adapter the whole GGUF model with it merged.
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// The adapter: a PEFT directory (as `edgetune train` writes) or a GGUF adapter.
        #[arg(long)]
        adapter: PathBuf,
        /// GGUF for llama.cpp (the only export so far).
        #[arg(long, required = true)]
        gguf: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes an unquantised Hugging Face model with a LoRA or IA3 adapter merged into its
    /// weights (model.safetensors, the merged projections in f32, and the model's JSON
    /// files), for runtimes that take no adapters.
    Merge {
        #[command(flatten)]
        model: ModelArgs,
        /// The adapter: a PEFT directory (as `edgetune train` writes).
        #[arg(long)]
        adapter: PathBuf,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn adapter_cmd(cmd: &AdapterCmd) -> Result<bool, CliError> {
    let (model, adapter, out) = match cmd {
        AdapterCmd::Merge {
            model,
            adapter,
            out,
        } => return merge_cmd(model, adapter, out),
        AdapterCmd::Export {
            model,
            adapter,
            gguf: _,
            out,
        } => (model, adapter, out),
    };
    let files = model.open()?;
    let cfg = files.config()?;
    let dims = files.dims()?;
    let (acfg, values) = if adapter.is_file() {
        edgetune::adapter::gguf::load(adapter, &cfg, &dims)?
    } else {
        let order = edgetune::adapter::peft::RowOrder::of(&cfg);
        edgetune::adapter::peft::load(adapter, |c| edgetune::adapter::layout(c, &dims), order)?
    };
    let layout = edgetune::adapter::layout(&acfg, &dims);
    // Scales and IA3 have no place in llama.cpp's adapter format: they are merged into the
    // model they were trained on.
    if matches!(acfg.method, Method::Scales | Method::Ia3) {
        let ModelFiles::Gguf(file) = &files else {
            return flag(
                "--model",
                format!(
                    "{} is merged into the GGUF model it was trained on; this model is safetensors",
                    acfg.method_name()
                ),
            );
        };
        edgetune::adapter::gguf::save_merged_model(out, file, &layout, &values)?;
        eprintln!(
            "wrote {} (the model with its {} merged into {} tensors; llama.cpp: -m {})",
            out.display(),
            acfg.method_name(),
            layout.len(),
            out.display()
        );
        return Ok(true);
    }
    edgetune::adapter::gguf::save(out, &acfg, &layout, &values, &cfg)?;
    eprintln!(
        "wrote {} ({} tensors of {}; llama.cpp: --lora {})",
        out.display(),
        layout.len(),
        acfg.method_name(),
        out.display()
    );
    Ok(true)
}

fn merge_cmd(model: &ModelArgs, adapter: &Path, out: &Path) -> Result<bool, CliError> {
    let files = model.open()?;
    let ModelFiles::Hf(dir) = &files else {
        return flag(
            "--model",
            "merge writes safetensors from an unquantised safetensors model; for a GGUF model use `adapter export --gguf`",
        );
    };
    if model.quantize.is_some() {
        return flag("--quantize", "a merged model is written unquantised");
    }
    let cfg = files.config()?;
    let dims = files.dims()?;
    let order = edgetune::adapter::peft::RowOrder::of(&cfg);
    let (acfg, values) =
        edgetune::adapter::peft::load(adapter, |c| edgetune::adapter::layout(c, &dims), order)?;
    let layout = edgetune::adapter::layout(&acfg, &dims);
    edgetune::adapter::merge::merge_into_safetensors(dir, &acfg, &layout, &values, out)?;
    eprintln!(
        "wrote {} ({} merged into {}: {} tensors)",
        out.display(),
        acfg.method_name(),
        dir.dir().display(),
        layout.len()
    );
    Ok(true)
}

pub(crate) fn adapter_config(a: &TrainArgs) -> Result<AdapterConfig, CliError> {
    let all = Target::ALL.map(Target::short).join(",");
    let default = if a.trainable == Trainable::Scales {
        all.as_str()
    } else {
        "q,v"
    };
    let targets = a
        .targets
        .as_deref()
        .unwrap_or(default)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(Target::parse)
        .collect::<edgetune::Result<Vec<_>>>()
        .or_else(|e| flag("--targets", e.to_string()))?;
    Ok(match a.trainable {
        Trainable::Lora => AdapterConfig {
            method: Method::Lora {
                rank: a.rank,
                alpha: a.alpha,
                rslora: false,
            },
            targets,
        },
        Trainable::Ia3 => AdapterConfig::ia3(),
        Trainable::Norms => AdapterConfig::norms(),
        Trainable::Scales => AdapterConfig::scales(&targets),
        Trainable::Full => AdapterConfig::full(),
    })
}

/// A session key from the user's seed (splitmix64, so seeds 0, 1, 2 give unrelated keys).
pub(crate) fn session_key(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn load_set(
    path: &Path,
    f: &ModelFiles,
    opts: &DataOptions,
    vocab: u32,
) -> Result<Dataset, CliError> {
    let tok = f.tokenizer();
    if let Err(e) = &tok {
        eprintln!("note: no tokenizer ({e}); only pre-tokenised lines are usable");
    }
    let set = data::load_jsonl(path, tok.as_ref().ok(), vocab, opts)?;
    let tokens: usize = set.examples.iter().map(|e| e.tokens.len()).sum();
    eprintln!(
        "data: {} examples ({tokens} tokens) from {}; {} of {} lines skipped",
        set.examples.len(),
        path.display(),
        set.skipped.len(),
        set.lines
    );
    for (line, why) in set.skipped.iter().take(3) {
        eprintln!("  line {line}: {why}");
    }
    Ok(set)
}

/// What either method reads before it trains.
pub(crate) struct Prepared {
    pub(crate) dir: PathBuf,
    pub(crate) files: ModelFiles,
    pub(crate) run: RunSettings,
    pub(crate) train_set: Dataset,
    pub(crate) eval_set: Option<Dataset>,
    pub(crate) model_sha: String,
}

/// The run directory (a new one must not hold `settings_file` already), the run settings
/// (a resumed run's from `stored(dir)`: its `run` object and init seed; a new run's from
/// the flags, with `clip` as the default clip), the data sets and the model's hash.
pub(crate) fn prepare(
    a: &TrainArgs,
    settings_file: &str,
    clip: f32,
    stored: impl FnOnce(&Path) -> Result<(serde_json::Value, u64), CliError>,
) -> Result<Prepared, CliError> {
    let dir = match (&a.out, &a.resume) {
        (_, Some(r)) => r.clone(),
        (Some(o), None) => o.clone(),
        (None, None) => return flag("--out", "is required (or --resume DIR)"),
    };
    if a.resume.is_none() && dir.join(settings_file).exists() {
        return flag(
            "--out",
            format!(
                "{} already holds a run; use --resume {} to continue it, or another directory",
                dir.display(),
                dir.display()
            ),
        );
    }
    let f = a.model.open()?;
    let cfg = f.config()?;
    let context = cfg.context as usize;
    let data_sha = hex(&edgetune::format::file::sha256_file(
        &a.data,
        edgetune::format::file::FileKind::Data,
    )?);
    let run = match &a.resume {
        Some(r) => {
            let (run, seed) = stored(r)?;
            RunSettings::resumed(a, &run, seed, &data_sha)?
        }
        None => RunSettings {
            data_seed: a.seed.unwrap_or(0),
            batch: a.batch.unwrap_or(4),
            seq_len: a.seq_len.unwrap_or(context.min(256)),
            chat: a.chat,
            clip: Some(a.clip.unwrap_or(clip)),
            data_sha256: data_sha,
        },
    };
    in_range(
        "--seq-len",
        run.seq_len,
        2,
        context,
        &format!("tokens; the model's context is {context}"),
    )?;
    in_range("--batch", run.batch, 1, 4096, "examples per step")?;
    in_range(
        "--checkpoint-every",
        a.checkpoint_every as usize,
        1,
        usize::MAX,
        "steps",
    )?;
    let opts = DataOptions {
        seq_len: run.seq_len,
        chat: run.chat,
        max_bad_share: 0.1,
    };
    let train_set = load_set(&a.data, &f, &opts, cfg.vocab)?;
    let eval_set = a
        .eval
        .as_ref()
        .map(|p| load_set(p, &f, &opts, cfg.vocab))
        .transpose()?;
    eprintln!("hashing the model...");
    let model_sha = hex(&f.sha256());
    Ok(Prepared {
        dir,
        files: f,
        run,
        train_set,
        eval_set,
        model_sha,
    })
}

pub fn train(a: &TrainArgs) -> Result<bool, CliError> {
    if a.method == MethodArg::Backprop {
        return crate::backprop::train(a);
    }
    let Prepared {
        dir,
        files: f,
        run,
        train_set,
        eval_set,
        model_sha,
    } = prepare(a, history::SESSION, 10.0, |r| {
        let s = history::read_session(r)?;
        Ok((s.run, s.init_seed))
    })?;
    let be = a.device.open()?;
    let mut model = f.load(&be)?;
    // Room for a batch of the longest examples the data holds, not of --seq-len's bound.
    let longest = train_set
        .examples
        .iter()
        .chain(eval_set.iter().flat_map(|d| &d.examples))
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(1);
    let capacity = edgetune::train::pack_capacity(&model, longest, run.batch);
    let mut trainer = if let Some(r) = &a.resume {
        let session = history::read_session(r)?;
        if a.seed_weights.is_some() {
            return flag(
                "--seed-weights",
                "a resumed run keeps its session's seed weights",
            );
        }
        model.attach(session.adapter.clone(), session.init_seed)?;
        Trainer::resume(&model, r, &model_sha, capacity)?
    } else {
        let zo = ZoConfig {
            session_key: session_key(run.data_seed),
            kind: ZKind::Binomial,
            mode: match a.mode {
                ModeArg::Mezo => SeedMode::Mezo,
                ModeArg::Kseed => SeedMode::KSeed { k: a.seeds },
            },
            eps: a.eps,
            lr: a.lr.unwrap_or(5e-4),
            delta_exp: a.delta_exp,
            decay_steps: a.lr_decay_steps,
        };
        zo.validate().map_err(|e| match e {
            edgetune::Error::InvalidArgument { name, reason } => CliError::Flag {
                flag: match name {
                    "eps" => "--eps",
                    "lr" => "--lr",
                    "seeds" => "--seeds",
                    _ => "--delta-exp",
                },
                reason,
            },
            other => other.into(),
        })?;
        let seed_weights = match &a.seed_weights {
            None => None,
            Some(path) => {
                let v = edgetune::format::file::read_json(
                    path,
                    edgetune::format::file::FileKind::History,
                )?;
                Some(
                    history::seed_weights_from_json(&v, zo.mode).map_err(|e| CliError::Flag {
                        flag: "--seed-weights",
                        reason: format!("{}: {e}", path.display()),
                    })?,
                )
            }
        };
        let layout = model
            .attach(adapter_config(a)?, run.data_seed)
            .map_err(|e| CliError::Flag {
                flag: "--trainable",
                reason: e.to_string(),
            })?;
        let session = Session {
            model_sha256: model_sha.clone(),
            layout_sha256: hex(&edgetune::adapter::layout_hash(layout)),
            adapter: model
                .adapter()
                .cloned()
                .unwrap_or_else(AdapterConfig::norms),
            init_seed: run.data_seed,
            zo,
            seed_weights,
            run: run.to_json(&a.data),
        };
        Trainer::start(&model, session, capacity)?
    };
    if let Some(c) = run.clip
        && !(c.is_finite() && c > 0.0)
    {
        return flag("--clip", format!("{c} must be finite and > 0"));
    }
    trainer.clip = run.clip;
    let params = trainer.state.params();
    eprintln!(
        "training: {} ({} tensors, {params} values), {:?}, eps {}, lr {}, steps {}..{}",
        model.adapter().map_or("", |c| c.method_name()),
        model.layout().len(),
        trainer.session.zo.mode,
        trainer.session.zo.eps,
        trainer.session.zo.lr,
        trainer.next_step,
        a.steps
    );
    let mut curve = read_csv(&dir, LOSS_CSV);
    let mut evals = read_csv(&dir, EVAL_CSV);
    if let Some(set) = &eval_set
        && evals.last().is_none_or(|e| e.0 != trainer.next_step)
    {
        let l = trainer.eval(&set.examples)?;
        eprintln!("eval loss at step {}: {l:.4}", trainer.next_step);
        evals.push((trainer.next_step, l));
    }
    let mut progress = Progress::new(trainer.next_step, a.steps);
    let (mut skipped, mut clamped, mut clipped) = (0u64, 0u64, 0u64);
    while trainer.next_step < a.steps {
        let step = trainer.next_step;
        let batch: Vec<_> =
            data::batch_for_step(&train_set.examples, run.batch, step, run.data_seed)
                .into_iter()
                .cloned()
                .collect();
        // Both perturbed passes read the batch.
        progress.tokens += batch.iter().map(|e| e.tokens.len()).sum::<usize>() * 2;
        let out = match trainer.step(&batch) {
            Ok(out) => out,
            Err(e) => {
                // Keep every step applied so far before reporting.
                write_curve(&dir, &curve, &evals)?;
                trainer.save(&dir)?;
                return Err(e.into());
            }
        };
        let loss = (out.loss_plus + out.loss_minus) / 2.0;
        if out.g.is_none() {
            skipped += 1;
        } else {
            curve.push((step, loss));
        }
        if out.coefficient.unsigned_abs() == edgetune::train::MAX_COEFFICIENT as u32 {
            clamped += 1;
        }
        clipped += u64::from(out.clipped);
        progress.show(
            trainer.next_step,
            format_args!(
                "loss {loss:.4} g {:+.3e} budget {:.1}%",
                out.g.unwrap_or(f32::NAN),
                trainer.state.spent() as f64 / edgetune::train::COEFFICIENT_BUDGET as f64 * 100.0,
            ),
        );
        if trainer.next_step % a.checkpoint_every == 0 || trainer.next_step == a.steps {
            if let Some(set) = &eval_set {
                let l = trainer.eval(&set.examples)?;
                progress.eval(&mut evals, trainer.next_step, l);
            }
            write_curve(&dir, &curve, &evals)?;
            trainer.save(&dir)?;
        }
    }
    eprintln!();
    write_curve(&dir, &curve, &evals)?;
    trainer.save(&dir)?;
    if clipped > 0 {
        eprintln!("{clipped} steps had |g| above --clip and were cut to it");
    }
    if clamped > 0 {
        eprintln!(
            "{clamped} steps had |lr * g| above 2^{} and were clamped: lower --lr or raise --delta-exp",
            20i64 - i64::from(trainer.session.zo.delta_exp)
        );
    }
    if skipped > 0 {
        eprintln!("{skipped} steps skipped (non-finite loss)");
    }
    eprintln!(
        "wrote {} ({} applied steps; adapter, history, loss.svg)",
        dir.display(),
        trainer.records.len()
    );
    println!("state-hash: {}", hex(&trainer.state.hash(&be)?));
    Ok(true)
}

pub fn replay_cmd(a: &ReplayArgs) -> Result<bool, CliError> {
    let f = a.model.open()?;
    let session = history::read_session(&a.history)?;
    let model_sha = hex(&f.sha256());
    let be = a.device.open()?;
    let mut model = f.load(&be)?;
    model.attach(session.adapter.clone(), session.init_seed)?;
    let start = Instant::now();
    let (state, _, records) = replay(&model, &a.history, &model_sha)?;
    let hash = state.hash(&be)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "replayed {} steps over {} values in {secs:.2} s ({:.3e} seed-values/s) on {}",
        records.len(),
        state.params(),
        records.len() as f64 * state.params() as f64 / secs,
        be.name()
    );
    println!("state-hash: {}", hex(&hash));
    Ok(true)
}

/// The progress line of a training run: live on a terminal; in a log, one line per
/// twentieth of the run.
pub(crate) struct Progress {
    start: Instant,
    first: u64,
    steps: u64,
    tty: bool,
    /// Tokens the run's passes have read so far.
    pub(crate) tokens: usize,
}

impl Progress {
    pub(crate) fn new(first: u64, steps: u64) -> Progress {
        Progress {
            start: Instant::now(),
            first,
            steps,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            tokens: 0,
        }
    }

    /// The line after a step, `detail` (the method's figures) between the step count and
    /// the rate.
    pub(crate) fn show(&self, next_step: u64, detail: std::fmt::Arguments<'_>) {
        let secs = self.start.elapsed().as_secs_f64();
        let done = next_step.saturating_sub(self.first).max(1);
        let eta = secs / done as f64 * self.steps.saturating_sub(next_step) as f64;
        if self.tty || next_step.is_multiple_of((self.steps / 20).max(1)) {
            eprint!(
                "{}step {next_step}/{} {detail} {:.0} tok/s ETA {}   {}",
                if self.tty { "\r" } else { "" },
                self.steps,
                self.tokens as f64 / secs,
                duration(eta),
                if self.tty { "" } else { "\n" }
            );
        }
    }

    /// A message on its own line (after a live progress line on a terminal).
    pub(crate) fn note(&self, text: std::fmt::Arguments<'_>) {
        eprintln!("{}{text}", if self.tty { "\n" } else { "" });
    }

    /// Records and shows a held-out loss.
    pub(crate) fn eval(&self, evals: &mut Vec<(u64, f64)>, step: u64, loss: f64) {
        evals.push((step, loss));
        self.note(format_args!("eval loss at step {step}: {loss:.4}"));
    }
}

pub(crate) fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

pub(crate) const LOSS_CSV: &str = "loss.csv";
pub(crate) const EVAL_CSV: &str = "eval.csv";

/// A curve written so far (`step,loss` lines), so a resumed run's plot continues it.
pub(crate) fn read_csv(dir: &Path, name: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (s, v) = l.split_once(',')?;
            Some((s.parse().ok()?, v.parse().ok()?))
        })
        .collect()
}

/// loss.csv (training loss: the mean of the two perturbed losses, per step), eval.csv
/// (held-out loss) and loss.svg (both, with a running mean of the training loss).
pub(crate) fn write_curve(
    dir: &Path,
    curve: &[(u64, f64)],
    evals: &[(u64, f64)],
) -> Result<(), CliError> {
    let csv =
        |c: &[(u64, f64)]| -> String { c.iter().map(|(s, l)| format!("{s},{l}\n")).collect() };
    edgetune::format::file::write_atomic(&dir.join(LOSS_CSV), csv(curve).as_bytes())?;
    edgetune::format::file::write_atomic(&dir.join(EVAL_CSV), csv(evals).as_bytes())?;
    edgetune::format::file::write_atomic(&dir.join("loss.svg"), svg(curve, evals).as_bytes())?;
    Ok(())
}

fn svg(curve: &[(u64, f64)], evals: &[(u64, f64)]) -> String {
    let (w, h, m) = (720.0, 360.0, 48.0);
    let pts: Vec<(f64, f64)> = curve
        .iter()
        .chain(evals)
        .map(|&(s, l)| (s as f64, l))
        .filter(|p| p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\"/>");
    }
    let fold = |f: fn(f64, f64) -> f64, init, i: usize| {
        pts.iter()
            .map(|p| if i == 0 { p.0 } else { p.1 })
            .fold(init, f)
    };
    let (x0, x1) = (
        fold(f64::min, f64::MAX, 0),
        fold(f64::max, f64::MIN, 0).max(1.0),
    );
    let (y0, y1) = (fold(f64::min, f64::MAX, 1), fold(f64::max, f64::MIN, 1));
    let (y0, y1) = if y1 > y0 {
        (y0, y1)
    } else {
        (y0 - 1.0, y1 + 1.0)
    };
    let px = |x: f64| m + (x - x0) / (x1 - x0).max(1.0) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let line = |p: &[(u64, f64)]| -> String {
        p.iter()
            .filter(|q| q.1.is_finite())
            .map(|&(s, l)| format!("{:.1},{:.1}", px(s as f64), py(l)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // Running mean over 20 steps: zeroth-order losses are noisy step to step.
    let smooth: Vec<(u64, f64)> = curve
        .iter()
        .enumerate()
        .map(|(i, &(s, _))| {
            let lo = i.saturating_sub(19);
            let win = &curve[lo..=i];
            (s, win.iter().map(|p| p.1).sum::<f64>() / win.len() as f64)
        })
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{m}\" y=\"{t}\">loss (train: grey, mean of 20: blue; held-out: red)</text>\n\
         <text x=\"{m}\" y=\"{lx}\">step {x0}</text><text x=\"{r}\" y=\"{lx}\" text-anchor=\"end\">{x1}</text>\n\
         <text x=\"4\" y=\"{m}\">{y1:.3}</text><text x=\"4\" y=\"{b}\">{y0:.3}</text>\n\
         <polyline fill=\"none\" stroke=\"#bbb\" points=\"{raw}\"/>\n\
         <polyline fill=\"none\" stroke=\"#2060c0\" stroke-width=\"2\" points=\"{mean}\"/>\n\
         <polyline fill=\"none\" stroke=\"#c02020\" stroke-width=\"2\" points=\"{ev}\"/>\n\
         </svg>\n",
        b = h - m,
        r = w - m,
        t = m - 16.0,
        lx = h - m + 16.0,
        raw = line(curve),
        mean = line(&smooth),
        ev = line(evals),
    )
}

/// Exact-match accuracy of greedy answers, and the mean loss of the reference completions.
pub fn score_cmd(a: &ScoreArgs) -> Result<bool, CliError> {
    let f = a.model.open()?;
    let cfg = f.config()?;
    let tok = f.tokenizer()?;
    let (pairs, other) = data::load_pairs(&a.data)?;
    if pairs.is_empty() {
        return flag(
            "--data",
            format!("{} holds no prompt/completion pairs", a.data.display()),
        );
    }
    let context = cfg.context as usize;
    in_range("--max-tokens", a.max_tokens, 1, context - 1, "tokens")?;
    let scorer = Scorer::new(&tok, pairs.clone(), a.chat, a.max_tokens)?;
    in_range(
        "--data",
        scorer.longest,
        1,
        context,
        "tokens in the longest prompt and answer",
    )?;
    let be = a.device.open()?;
    let model = crate::model::load(&be, &f, a.adapter.as_deref())?;
    let mut cache = model.new_cache(scorer.longest as u32)?;
    let start = Instant::now();
    let (correct, loss) = scorer.run(&model, &mut cache, &tok, |i| {
        eprint!(
            "\rscored {}/{} ({:.1} s)",
            i + 1,
            pairs.len(),
            start.elapsed().as_secs_f64()
        )
    })?;
    eprintln!();
    let n = pairs.len();
    let acc = correct as f64 / n as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"examples": n, "correct": correct, "exact_match": acc, "loss": loss, "skipped_lines": other})
        );
    } else {
        println!(
            "exact-match: {correct}/{n} = {:.1}%, completion loss {loss:.4}",
            acc * 100.0
        );
    }
    Ok(true)
}

/// Greedy exact-match answers and the reference completions' loss for prompt/completion
/// pairs, on a model as it stands (its adapter included).
pub struct Scorer {
    prompts: Vec<Vec<u32>>,
    pairs: Vec<(String, String)>,
    examples: Vec<edgetune::train::Example>,
    max_tokens: usize,
    /// The longest prompt plus answer, or reference sequence, in tokens.
    pub longest: usize,
}

impl Scorer {
    pub fn new(
        tok: &edgetune::tokenizer::Tokenizer,
        pairs: Vec<(String, String)>,
        chat: bool,
        max_tokens: usize,
    ) -> Result<Scorer, CliError> {
        let prompts = pairs
            .iter()
            .map(|(p, _)| {
                tok.encode_prompt(&if chat {
                    tok.chat.user_turn(p)
                } else {
                    p.clone()
                })
            })
            .collect::<edgetune::Result<Vec<_>>>()?;
        let examples = pairs
            .iter()
            .map(|(p, c)| data::prompt_completion(p, c, tok, chat))
            .collect::<Result<Vec<_>, String>>()
            .or_else(|e| flag("--data", e))?;
        let longest = prompts
            .iter()
            .map(|p| p.len() + max_tokens)
            .chain(examples.iter().map(|e| e.tokens.len()))
            .max()
            .unwrap_or(1);
        Ok(Scorer {
            prompts,
            pairs,
            examples,
            max_tokens,
            longest,
        })
    }

    /// (correct answers, mean completion loss per token); `progress` gets each index.
    pub fn run<B: Backend>(
        &self,
        model: &edgetune::model::Model<'_, B>,
        cache: &mut edgetune::model::KvCache<B>,
        tok: &edgetune::tokenizer::Tokenizer,
        mut progress: impl FnMut(usize),
    ) -> Result<(usize, f64), CliError> {
        let greedy = edgetune::generate::Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        };
        let (mut correct, mut nll, mut count) = (0usize, 0.0f64, 0usize);
        for (i, ((prompt, (_, reference)), ex)) in self
            .prompts
            .iter()
            .zip(&self.pairs)
            .zip(&self.examples)
            .enumerate()
        {
            cache.clear();
            let mut sampler = edgetune::generate::Sampler::new(greedy)?;
            let (out, _) = edgetune::generate::generate(
                model,
                cache,
                prompt,
                self.max_tokens,
                &tok.eos,
                &mut sampler,
                |_| Ok(()),
            )?;
            let answer: Vec<u32> = out.into_iter().filter(|t| !tok.eos.contains(t)).collect();
            if data::exact_match(&tok.decode(&answer)?, reference) {
                correct += 1;
            }
            let (l, n) = model.masked_nll(cache, &ex.tokens, Some(&ex.targets))?;
            nll += l;
            count += n;
            progress(i);
        }
        Ok((correct, nll / count.max(1) as f64))
    }
}
