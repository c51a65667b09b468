//! `edgetune train --method backprop`: a backpropagation run over the runtime's
//! [`BackpropTrainer`], with the zeroth-order path's data formats, progress line,
//! checkpoints, resume and loss plot.

use crate::train::{
    EVAL_CSV, LOSS_CSV, OptimizerArg, Prepared, Progress, ScheduleArg, TrainArgs, Trainable,
    adapter_config, prepare, read_csv, write_curve,
};
use crate::{CliError, flag};
use edgetune::Backend;
use edgetune::adapter::peft;
use edgetune::format::file::{FileKind, read_json};
use edgetune::train::backprop::{
    BackpropConfig, BackpropTrainer, CHECKPOINT, Optimizer, SETTINGS, Schedule,
};
use edgetune::train::data;
use std::path::PathBuf;

/// The settings a new run takes from its flags.
fn config(a: &TrainArgs) -> Result<BackpropConfig, CliError> {
    let cfg = BackpropConfig {
        optimizer: match a.optimizer.unwrap_or(OptimizerArg::Adamw) {
            OptimizerArg::Adamw => Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: a.weight_decay,
            },
            OptimizerArg::Sgd => Optimizer::Sgd {
                momentum: a.momentum,
                weight_decay: a.weight_decay,
            },
        },
        lr: a.lr.unwrap_or(1e-3),
        schedule: match a.schedule.unwrap_or(ScheduleArg::Constant) {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Cosine => Schedule::Cosine,
        },
        warmup: a.warmup,
        total_steps: a.steps,
        clip: Some(a.clip.unwrap_or(1.0)),
        micro_batches: a.micro_batches,
        recompute: a.recompute,
        memory_limit: a.max_memory.map(|m| m.saturating_mul(1 << 20)),
    };
    cfg.validate().map_err(|e| match e {
        edgetune::Error::InvalidArgument { name, reason } => CliError::Flag {
            flag: match name {
                "lr" => "--lr",
                "clip" => "--clip",
                "schedule" => "--warmup",
                "micro-batches" => "--micro-batches",
                "weight decay" => "--weight-decay",
                "momentum" => "--momentum",
                "memory" => "--max-memory",
                _ => "--optimizer",
            },
            reason,
        },
        other => other.into(),
    })?;
    Ok(cfg)
}

/// Whether two optimisers are the same algorithm (their settings aside).
fn same_kind(a: &Optimizer, b: &Optimizer) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

pub fn train(a: &TrainArgs) -> Result<bool, CliError> {
    if !matches!(a.trainable, Trainable::Lora | Trainable::Ia3) {
        return flag("--trainable", "backprop trains lora or ia3");
    }
    let shown = a
        .resume
        .as_ref()
        .unwrap_or(a.out.as_ref().unwrap_or(&PathBuf::new()))
        .join(SETTINGS)
        .display()
        .to_string();
    let mut stored = None;
    let Prepared {
        dir,
        files: f,
        run,
        train_set,
        eval_set,
        model_sha,
    } = prepare(a, SETTINGS, 1.0, |r| {
        let s = read_json(&r.join(SETTINGS), FileKind::History)?;
        let run = s["run"].clone();
        let seed = run["data_seed"].as_u64().unwrap_or(0);
        stored = Some(s);
        Ok((run, seed))
    })?;
    let (cfg, adapter) = match &stored {
        Some(s) => {
            if s["run"]["model_sha256"].as_str() != Some(model_sha.as_str()) {
                return flag(
                    "--model",
                    format!("is not the model the run in {shown} trained"),
                );
            }
            let cfg = BackpropConfig::from_json(&s["backprop"], &shown)?;
            // Settings are the run's: a flag given with another value is refused.
            let mine = config(a)?;
            let differs = [
                ("--lr", a.lr.is_some() && mine.lr != cfg.lr),
                (
                    "--optimizer",
                    a.optimizer.is_some() && !same_kind(&mine.optimizer, &cfg.optimizer),
                ),
                (
                    "--schedule",
                    a.schedule.is_some() && mine.schedule != cfg.schedule,
                ),
                ("--warmup", a.warmup != 0 && mine.warmup != cfg.warmup),
                (
                    "--micro-batches",
                    a.micro_batches != 1 && mine.micro_batches != cfg.micro_batches,
                ),
                ("--recompute", a.recompute && !cfg.recompute),
                (
                    "--max-memory",
                    a.max_memory.is_some() && mine.memory_limit != cfg.memory_limit,
                ),
                ("--clip", a.clip.is_some() && mine.clip != cfg.clip),
                (
                    "--weight-decay",
                    a.weight_decay != 0.0 && mine.optimizer != cfg.optimizer,
                ),
            ];
            if let Some((name, _)) = differs.iter().find(|d| d.1) {
                return flag(
                    name,
                    format!("differs from the run being resumed (see {shown})"),
                );
            }
            if cfg.schedule != Schedule::Constant && cfg.total_steps != a.steps {
                return flag(
                    "--steps",
                    format!(
                        "the run's {} schedule ends at step {}; a resumed run keeps it",
                        cfg.schedule.name(),
                        cfg.total_steps
                    ),
                );
            }
            eprintln!("resuming with the settings in {shown}");
            (cfg, peft::parse_config(&s["adapter"], &shown)?)
        }
        None => (config(a)?, adapter_config(a)?),
    };
    let be = a.device.open()?;
    let mut model = f.load(&be)?;
    model
        .attach(adapter, run.data_seed)
        .map_err(|e| CliError::Flag {
            flag: "--trainable",
            reason: e.to_string(),
        })?;
    let capacity = run.seq_len as u32;
    eprintln!(
        "backprop needs {:.1} MiB of activations for {capacity}-token sequences{}",
        model.tape_bytes(capacity, cfg.recompute) as f64 / 1048576.0,
        if cfg.recompute { " (recomputed)" } else { "" }
    );
    let mut trainer = BackpropTrainer::start(&model, cfg, capacity)?;
    if let Some(r) = &a.resume {
        trainer.restore(r)?;
    }
    let mut run_json = run.to_json(&a.data);
    run_json["model_sha256"] = model_sha.into();
    let params: u64 = model.layout().iter().map(|p| u64::from(p.len())).sum();
    eprintln!(
        "training: {} ({} tensors, {params} values) by backprop, {:?}, lr {} ({}, warmup {}), clip {:?}, steps {}..{}",
        model.adapter().map_or("", |c| c.method_name()),
        model.layout().len(),
        trainer.cfg.optimizer,
        trainer.cfg.lr,
        trainer.cfg.schedule.name(),
        trainer.cfg.warmup,
        trainer.cfg.clip,
        trainer.next_step,
        a.steps
    );
    let mut curve = read_csv(&dir, LOSS_CSV);
    let mut evals = read_csv(&dir, EVAL_CSV);
    curve.retain(|&(s, _)| s < trainer.next_step);
    evals.retain(|&(s, _)| s <= trainer.next_step);
    std::fs::create_dir_all(&dir).map_err(|e| edgetune::Error::Io {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    if let Some(set) = &eval_set
        && evals.last().is_none_or(|e| e.0 != trainer.next_step)
    {
        let l = trainer.eval(&set.examples)?;
        eprintln!("eval loss at step {}: {l:.4}", trainer.next_step);
        evals.push((trainer.next_step, l));
    }
    let mut progress = Progress::new(trainer.next_step, a.steps);
    let first = trainer.next_step;
    let (mut skipped, mut clipped) = (0u64, 0u64);
    let save =
        |trainer: &BackpropTrainer<'_, '_, _>, curve: &[(u64, f64)], evals: &[(u64, f64)]| {
            write_curve(&dir, curve, evals)?;
            trainer.save(&dir, &run_json)?;
            Ok::<(), CliError>(())
        };
    while trainer.next_step < a.steps {
        let step = trainer.next_step;
        let batch: Vec<_> =
            data::batch_for_step(&train_set.examples, run.batch, step, run.data_seed)
                .into_iter()
                .cloned()
                .collect();
        progress.tokens += batch.iter().map(|e| e.tokens.len()).sum::<usize>();
        let out = match trainer.step(&batch) {
            Ok(out) => out,
            Err(e) => {
                save(&trainer, &curve, &evals)?;
                return Err(e.into());
            }
        };
        if out.skipped {
            skipped += 1;
            progress.note(format_args!(
                "step {step} skipped: loss {} gradient norm {} (not finite); nothing applied",
                out.loss, out.grad_norm
            ));
            if skipped > 10 && skipped * 2 > trainer.next_step - first {
                save(&trainer, &curve, &evals)?;
                return Err(edgetune::Error::NonFinite {
                    what: "training loss or gradient",
                    at: format!("{skipped} skipped steps by step {step}; lower --lr"),
                }
                .into());
            }
            continue;
        }
        curve.push((step, out.loss));
        clipped += u64::from(out.clipped);
        progress.show(
            trainer.next_step,
            format_args!(
                "loss {:.4} |grad| {:.3e} lr {:.2e}",
                out.loss, out.grad_norm, out.lr
            ),
        );
        if trainer.next_step % a.checkpoint_every == 0 || trainer.next_step == a.steps {
            if let Some(set) = &eval_set {
                let l = trainer.eval(&set.examples)?;
                progress.eval(&mut evals, trainer.next_step, l);
            }
            save(&trainer, &curve, &evals)?;
        }
    }
    eprintln!();
    save(&trainer, &curve, &evals)?;
    if clipped > 0 {
        eprintln!("{clipped} steps had a gradient norm above --clip and were scaled to it");
    }
    if skipped > 0 {
        eprintln!("{skipped} steps skipped (non-finite loss or gradient)");
    }
    eprintln!(
        "peak memory: {:.1} MiB of activations, gradients and optimiser state on {}; process peak RSS {}",
        trainer.working_bytes() as f64 / 1048576.0,
        be.name(),
        crate::bench::peak_rss().map_or("unknown".into(), |b| format!(
            "{:.1} MiB",
            b as f64 / 1048576.0
        ))
    );
    eprintln!(
        "wrote {} (adapter, {CHECKPOINT} with optimiser state, loss.svg)",
        dir.display()
    );
    Ok(true)
}
