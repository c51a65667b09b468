//! Backpropagation training of a LoRA or IA3 adapter ([`Model::backward`]): AdamW or SGD
//! with momentum as kernels with their state on the device, learning-rate schedules as
//! Hugging Face's, clipping by global gradient norm, gradient accumulation over
//! micro-batches, steps with a non-finite loss or gradient skipped before they reach the
//! adapter, and checkpoints holding the optimiser state. The skins drive it.

use super::Example;
use super::history::hex;
use crate::adapter::{ParamInfo, layout_hash, peft};
use crate::backend::{AdamHyper, Backend, Op};
use crate::error::{Error, Result};
use crate::format::file::{FileKind, read_bounded, write_atomic};
use crate::held::Held;
use crate::model::llama::Tape;
use crate::model::{KvCache, Model};
use serde_json::{Value, json};
use std::path::Path;
use std::prelude::v1::*;

/// The run's settings file in its directory.
pub const SETTINGS: &str = "backprop.json";
/// Adapter values, optimiser state and step, written atomically together.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
const FORMAT: &str = "edgetune-backprop-1";

/// The optimiser and its settings (PyTorch's torch.optim.AdamW and SGD).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    Sgd {
        momentum: f32,
        weight_decay: f32,
    },
}

impl Optimizer {
    /// State tensors per trainable tensor and their names' suffixes.
    fn state_names(&self) -> &'static [&'static str] {
        match self {
            Optimizer::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
            Optimizer::Sgd { .. } => &["momentum_buffer"],
        }
    }
}

/// How the learning rate moves over the run, as Hugging Face's schedules: a linear warmup
/// from 0 over `warmup` steps, then constant, linear down to 0 at the last step, or a half
/// cosine down to 0 at the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    pub fn parse(s: &str) -> Result<Schedule> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(Error::InvalidArgument {
                name: "schedule",
                reason: format!("`{s}` is not constant, linear or cosine"),
            }),
        }
    }
}

/// A backprop run's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BackpropConfig {
    pub optimizer: Optimizer,
    pub lr: f32,
    pub schedule: Schedule,
    pub warmup: u64,
    /// The run's length, which the schedules end at.
    pub total_steps: u64,
    /// Gradients whose global L2 norm exceeds this are scaled down to it (PyTorch's
    /// clip_grad_norm_).
    pub clip: Option<f32>,
    /// Micro-batches per step: each contributes the mean loss over its own targets, and
    /// the step follows the mean of those (gradient accumulation).
    pub micro_batches: u32,
    /// Recompute each layer's activations in the backward pass instead of keeping them
    /// (see [`Model::tape`]): the same arithmetic, less memory, one more forward.
    pub recompute: bool,
    /// Bytes of activations, gradients and optimiser state the run may hold; a run that
    /// needs more is refused before its first step.
    pub memory_limit: Option<u64>,
}

fn bad(name: &'static str, reason: String) -> Error {
    Error::InvalidArgument { name, reason }
}

impl BackpropConfig {
    pub fn validate(&self) -> Result<()> {
        let pos = |v: f32| v.is_finite() && v > 0.0;
        let unit = |v: f32| (0.0..1.0).contains(&v);
        if !pos(self.lr) {
            return Err(bad("lr", format!("{} must be finite and > 0", self.lr)));
        }
        match self.optimizer {
            Optimizer::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                if !(unit(beta1) && unit(beta2) && pos(eps)) {
                    return Err(bad(
                        "optimizer",
                        format!(
                            "AdamW needs betas in [0, 1) and eps > 0, got {beta1}, {beta2}, {eps}"
                        ),
                    ));
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return Err(bad("weight decay", format!("{weight_decay} must be >= 0")));
                }
            }
            Optimizer::Sgd {
                momentum,
                weight_decay,
            } => {
                if !(unit(momentum) && weight_decay.is_finite() && weight_decay >= 0.0) {
                    return Err(bad(
                        "optimizer",
                        format!(
                            "SGD needs momentum in [0, 1) and weight decay >= 0, got {momentum}, {weight_decay}"
                        ),
                    ));
                }
            }
        }
        if let Some(c) = self.clip
            && !pos(c)
        {
            return Err(bad("clip", format!("{c} must be finite and > 0")));
        }
        if self.total_steps == 0 || self.warmup > self.total_steps {
            return Err(bad(
                "schedule",
                format!(
                    "{} warmup steps in a run of {}: the run needs a step and the warmup must fit in it",
                    self.warmup, self.total_steps
                ),
            ));
        }
        if self.micro_batches == 0 {
            return Err(bad("micro-batches", "must be at least 1".into()));
        }
        Ok(())
    }

    /// The learning rate of step `step` (from 0), computed in f64 as Hugging Face's
    /// LambdaLR schedules do.
    pub fn lr_at(&self, step: u64) -> f64 {
        let (s, w, total) = (step as f64, self.warmup as f64, self.total_steps as f64);
        let factor = if step < self.warmup {
            s / w.max(1.0)
        } else {
            let progress = (s - w) / (total - w).max(1.0);
            match self.schedule {
                Schedule::Constant => 1.0,
                Schedule::Linear => ((total - s) / (total - w).max(1.0)).max(0.0),
                Schedule::Cosine => {
                    (0.5 * (1.0 + libm::cos(core::f64::consts::PI * progress))).max(0.0)
                }
            }
        };
        f64::from(self.lr) * factor
    }

    pub fn to_json(&self) -> Value {
        let opt = match self.optimizer {
            Optimizer::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                json!({"name": "adamw", "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay})
            }
            Optimizer::Sgd {
                momentum,
                weight_decay,
            } => json!({"name": "sgd", "momentum": momentum, "weight_decay": weight_decay}),
        };
        json!({
            "optimizer": opt,
            "lr": self.lr,
            "schedule": self.schedule.name(),
            "warmup": self.warmup,
            "total_steps": self.total_steps,
            "clip": self.clip,
            "micro_batches": self.micro_batches,
            "recompute": self.recompute,
            "memory_limit": self.memory_limit,
        })
    }

    pub fn from_json(v: &Value, file: &str) -> Result<BackpropConfig> {
        let syntax = |m: String| Error::Syntax {
            path: file.to_owned(),
            line: 0,
            column: 0,
            message: m,
        };
        let f = |v: &Value, k: &str| -> Result<f32> {
            v.get(k)
                .and_then(Value::as_f64)
                .map(|x| x as f32)
                .ok_or_else(|| syntax(format!("`{k}` is missing or not a number")))
        };
        let u = |k: &str| -> Result<u64> {
            v.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| syntax(format!("`{k}` is missing or not a count")))
        };
        let o = v
            .get("optimizer")
            .ok_or_else(|| syntax("`optimizer` is missing".into()))?;
        let optimizer = match o.get("name").and_then(Value::as_str) {
            Some("adamw") => Optimizer::AdamW {
                beta1: f(o, "beta1")?,
                beta2: f(o, "beta2")?,
                eps: f(o, "eps")?,
                weight_decay: f(o, "weight_decay")?,
            },
            Some("sgd") => Optimizer::Sgd {
                momentum: f(o, "momentum")?,
                weight_decay: f(o, "weight_decay")?,
            },
            other => return Err(syntax(format!("optimizer {other:?} is not adamw or sgd"))),
        };
        let cfg = BackpropConfig {
            optimizer,
            lr: f(v, "lr")?,
            schedule: Schedule::parse(v.get("schedule").and_then(Value::as_str).unwrap_or(""))
                .map_err(|e| syntax(e.to_string()))?,
            warmup: u("warmup")?,
            total_steps: u("total_steps")?,
            clip: match v.get("clip") {
                None | Some(Value::Null) => None,
                Some(_) => Some(f(v, "clip")?),
            },
            micro_batches: u32::try_from(u("micro_batches")?)
                .map_err(|_| syntax("`micro_batches` is out of range".into()))?,
            recompute: v.get("recompute").and_then(Value::as_bool).unwrap_or(false),
            memory_limit: v.get("memory_limit").and_then(Value::as_u64),
        };
        cfg.validate().map_err(|e| syntax(e.to_string()))?;
        Ok(cfg)
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackpropOutcome {
    /// Mean loss of the batch (the mean over micro-batches of each one's mean).
    pub loss: f64,
    /// The global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// A non-finite loss or gradient: nothing was applied.
    pub skipped: bool,
    pub clipped: bool,
}

/// A backprop run over a model with a LoRA or IA3 adapter attached.
pub struct BackpropTrainer<'m, 'b, B: Backend> {
    model: Held<'m, Model<'b, B>>,
    pub cfg: BackpropConfig,
    tape: Tape<B>,
    grads: Vec<B::Buffer>,
    /// Optimiser state per trainable tensor (two for AdamW, one for SGD).
    state: Vec<Vec<B::Buffer>>,
    zeros: B::Buffer,
    cache: KvCache<B>,
    /// The number of the next step (which picks its batch and learning rate).
    pub next_step: u64,
    /// Steps applied (the optimiser's count for its bias corrections): skipped steps
    /// advance `next_step` only.
    pub applied: u64,
}

impl<B: Backend> core::fmt::Debug for BackpropTrainer<'_, '_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BackpropTrainer")
            .field("cfg", &self.cfg)
            .field("next_step", &self.next_step)
            .finish_non_exhaustive()
    }
}

impl<'m, 'b, B: Backend> BackpropTrainer<'m, 'b, B> {
    /// A new run from the model's current adapter values, for sequences of up to
    /// `capacity` tokens. Everything a step needs is allocated here: a batch that does
    /// not fit the device fails now, with the size it needs.
    pub fn start(
        model: impl Into<Held<'m, Model<'b, B>>>,
        cfg: BackpropConfig,
        capacity: u32,
    ) -> Result<Self> {
        let model = model.into();
        let be = model.backend();
        cfg.validate()?;
        if model.layout().is_empty() {
            return Err(bad(
                "adapter",
                "the model has no trainable tensors attached".into(),
            ));
        }
        let states = cfg.optimizer.state_names().len() as u64;
        let params: u64 = model.layout().iter().map(|p| u64::from(p.len()) * 4).sum();
        let need = model.tape_bytes(capacity, cfg.recompute) + params * (1 + states);
        if let Some(limit) = cfg.memory_limit
            && need > limit
        {
            return Err(Error::InvalidArgument {
                name: "memory",
                reason: format!(
                    "backprop over {capacity}-token sequences needs {need} bytes of activations, gradients and optimiser state; the limit is {limit} (shorten the sequences or recompute activations)"
                ),
            });
        }
        let tape = model.tape(capacity, cfg.recompute).map_err(|e| match e {
            Error::OutOfMemory { .. } | Error::BufferTooLarge { .. } => Error::OutOfMemory {
                what: "backprop activations (lower --seq-len)",
                bytes: need,
            },
            other => other,
        })?;
        let layout = model.layout();
        let mut state = Vec::with_capacity(layout.len());
        for p in layout {
            let n = cfg.optimizer.state_names().len();
            state.push(
                (0..n)
                    .map(|_| be.alloc(u64::from(p.len()) * 4, "optimizer state"))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let largest = layout.iter().map(|p| p.len()).max().unwrap_or(1);
        let (grads, zeros, cache) = (
            model.grad_buffers()?,
            be.alloc(u64::from(largest) * 4, "gradients")?,
            model.new_cache(capacity)?,
        );
        Ok(BackpropTrainer {
            model,
            cfg,
            tape,
            grads,
            state,
            zeros,
            cache,
            next_step: 0,
            applied: 0,
        })
    }

    /// Device bytes of the activations and gradient buffers a step uses.
    pub fn working_bytes(&self) -> u64 {
        let per_tensor: u64 = self
            .model
            .layout()
            .iter()
            .map(|p| u64::from(p.len()) * 4)
            .sum();
        self.tape.bytes() + per_tensor * (1 + self.state.first().map_or(0, |s| s.len()) as u64)
    }

    /// One optimiser step on `batch`, split into the configured number of micro-batches
    /// (as equal as the batch allows); the step follows the mean over the micro-batches
    /// that have targets of each one's mean loss. An empty batch, or one without targets,
    /// is an error and changes nothing.
    pub fn step(&mut self, batch: &[Example]) -> Result<BackpropOutcome> {
        let targets = |e: &Example| e.targets.iter().skip(1).filter(|&&t| t).count();
        let micro = (self.cfg.micro_batches as usize).min(batch.len());
        let chunks: Vec<&[Example]> = (0..micro)
            .map(|i| &batch[batch.len() * i / micro..batch.len() * (i + 1) / micro])
            .filter(|c| c.iter().map(targets).sum::<usize>() > 0)
            .collect();
        if chunks.is_empty() {
            return Err(bad(
                "batch",
                format!(
                    "{} examples with no target token between them: nothing to learn from",
                    batch.len()
                ),
            ));
        }
        // Gradients from a step that failed part-way must not leak into this one.
        self.zero_grads()?;
        let n = chunks.len() as f64;
        let mut loss = 0.0f64;
        for chunk in &chunks {
            let count: usize = chunk.iter().map(targets).sum();
            let scale = 1.0 / (n * count as f64);
            let mut sum = 0.0;
            for ex in *chunk {
                let (s, _) = self.model.backward(
                    &mut self.tape,
                    &ex.tokens,
                    &ex.targets,
                    scale as f32,
                    &self.grads,
                )?;
                sum += s;
            }
            loss += sum / count as f64 / n;
        }
        let norm = self.grad_norm()?;
        let lr = self.cfg.lr_at(self.next_step);
        if !(loss.is_finite() && norm.is_finite()) {
            self.next_step += 1;
            return Ok(BackpropOutcome {
                loss,
                grad_norm: norm,
                lr,
                skipped: true,
                clipped: false,
            });
        }
        // PyTorch's clip_grad_norm_: the coefficient max_norm / (norm + 1e-6), at most 1.
        let coef = self
            .cfg
            .clip
            .map_or(1.0, |c| (f64::from(c) / (norm + 1e-6)).min(1.0)) as f32;
        let params = self.model.params()?;
        let t = self.applied + 1;
        for (i, (p, info)) in params.iter().zip(self.model.layout()).enumerate() {
            let (grad, n) = (&self.grads[i], info.len());
            let st = &self.state[i];
            match self.cfg.optimizer {
                Optimizer::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => self.model.backend().run(&Op::AdamW {
                    param: p,
                    grad,
                    m: &st[0],
                    v: &st[1],
                    n,
                    hyper: AdamHyper {
                        lr: lr as f32,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                        bias1: 1.0,
                        bias2_sqrt: 1.0,
                        grad_scale: coef,
                    }
                    .at_step(t),
                })?,
                Optimizer::Sgd {
                    momentum,
                    weight_decay,
                } => self.model.backend().run(&Op::Sgd {
                    param: p,
                    grad,
                    buf: &st[0],
                    n,
                    lr: lr as f32,
                    momentum,
                    weight_decay,
                    grad_scale: coef,
                })?,
            }
        }
        self.next_step += 1;
        self.applied += 1;
        Ok(BackpropOutcome {
            loss,
            grad_norm: norm,
            lr,
            skipped: false,
            clipped: coef < 1.0,
        })
    }

    /// The global L2 norm of the accumulated gradients (sum of squares in f64).
    fn grad_norm(&self) -> Result<f64> {
        let mut ss = 0.0f64;
        for (g, p) in self.grads.iter().zip(self.model.layout()) {
            for v in self.model.backend().read_f32(g, p.len() as usize)? {
                ss += f64::from(v) * f64::from(v);
            }
        }
        Ok(libm::sqrt(ss))
    }

    fn zero_grads(&self) -> Result<()> {
        for (g, p) in self.grads.iter().zip(self.model.layout()) {
            self.model.backend().run(&Op::Copy {
                src: &self.zeros,
                dst: g,
                n: p.len(),
                src_offset: 0,
                dst_offset: 0,
            })?;
        }
        Ok(())
    }

    /// Mean loss per target token of `set` at the current values.
    pub fn eval(&mut self, set: &[Example]) -> Result<f64> {
        let (nll, n) = super::batch_nll(&self.model, &mut self.cache, set)?;
        Ok(nll / n.max(1) as f64)
    }

    /// Names of the checkpoint's tensors: the values by their layout names, then each
    /// optimiser state tensor as `{name}.{state}`.
    fn checkpoint_layout(&self) -> Vec<ParamInfo> {
        let layout = self.model.layout();
        let mut out = layout.to_vec();
        for s in self.cfg.optimizer.state_names() {
            out.extend(layout.iter().map(|p| ParamInfo {
                name: format!("{}.{s}", p.name),
                ..p.clone()
            }));
        }
        out
    }

    /// Writes the settings (first time), the checkpoint (values, optimiser state, step,
    /// one atomic file) and the adapter in PEFT format into `dir`.
    pub fn save(&self, dir: &Path, run: &Value) -> Result<()> {
        let settings = dir.join(SETTINGS);
        let layout_hex = hex(&layout_hash(self.model.layout()));
        if !settings.exists() {
            let v = json!({
                "backprop": self.cfg.to_json(),
                "layout_sha256": layout_hex,
                "adapter": peft::config_json(self.adapter()?),
                "run": run,
            });
            write_atomic(
                &settings,
                serde_json::to_string_pretty(&v)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
        }
        let mut tensors = self.model.read_params()?;
        for k in 0..self.cfg.optimizer.state_names().len() {
            for (st, p) in self.state.iter().zip(self.model.layout()) {
                tensors.push(self.model.backend().read_f32(&st[k], p.len() as usize)?);
            }
        }
        let bytes = peft::safetensors_bytes_with(
            &self.checkpoint_layout(),
            &tensors,
            "checkpoint",
            &[
                ("format", FORMAT.to_owned()),
                ("step", self.next_step.to_string()),
                ("applied", self.applied.to_string()),
                ("layout_sha256", layout_hex),
            ],
        )?;
        write_atomic(&dir.join(CHECKPOINT), &bytes)?;
        peft::save_attached(dir, &self.model)
    }

    fn adapter(&self) -> Result<&crate::adapter::AdapterConfig> {
        self.model.adapter().ok_or_else(|| Error::InvalidArgument {
            name: "adapter",
            reason: "the model has none attached".into(),
        })
    }

    /// Continues from the checkpoint in `dir`: its values go into the model, its
    /// optimiser state into the device, its step into `next_step`. A checkpoint of another
    /// layout or optimiser is refused, naming the tensor or setting.
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(CHECKPOINT);
        let shown = path.display().to_string();
        let bytes = read_bounded(&path, FileKind::Adapter)?;
        let meta = peft::safetensors_metadata(&bytes, &shown)?;
        let syntax = |m: String| Error::Syntax {
            path: shown.clone(),
            line: 0,
            column: 0,
            message: m,
        };
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(syntax(format!("metadata `format` is not {FORMAT}")));
        }
        if meta.get("layout_sha256") != Some(&hex(&layout_hash(self.model.layout()))) {
            return Err(syntax(
                "was written for another adapter layout (targets, rank or model)".into(),
            ));
        }
        let count = |k: &str| -> Result<u64> {
            meta.get(k)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| syntax(format!("metadata `{k}` is missing or not a number")))
        };
        let (step, applied) = (count("step")?, count("applied")?);
        // Counts a run can reach; far larger ones are damage.
        if applied > step || step > u64::from(u32::MAX) {
            return Err(syntax(format!("{applied} steps applied of {step}")));
        }
        let tensors = peft::read_layout(&path, &self.checkpoint_layout())?;
        let n = self.model.layout().len();
        self.model.write_params(&tensors[..n])?;
        for (k, chunk) in tensors[n..].chunks(n).enumerate() {
            for (st, v) in self.state.iter().zip(chunk) {
                let src = self.model.backend().upload_f32(v, "optimizer state")?;
                self.model.backend().run(&Op::Copy {
                    src: &src,
                    dst: &st[k],
                    n: v.len() as u32,
                    src_offset: 0,
                    dst_offset: 0,
                })?;
            }
        }
        self.next_step = step;
        self.applied = applied;
        Ok(())
    }
}
