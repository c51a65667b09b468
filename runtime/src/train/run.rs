//! A zeroth-order training run over a model with an adapter attached: steps, evaluation,
//! checkpoints into a run directory, resumption, and replay of a directory's history.
//! The skins (CLI, C API) drive it and draw progress.

use super::history::{self, Record, Session, hex};
use super::{Example, StepOutcome, ZoState, batch_nll, zo_step};
use crate::adapter::{layout_hash, peft};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::held::Held;
use crate::model::{KvCache, Model};
use std::path::Path;
use std::prelude::v1::*;

/// Seeds applied per fused replay call.
const REPLAY_CHUNK: usize = 4096;

/// A run in progress.
pub struct Trainer<'m, 'b, B: Backend> {
    model: Held<'m, Model<'b, B>>,
    pub state: ZoState<B>,
    pub session: Session,
    pub records: Vec<Record>,
    cache: KvCache<B>,
    /// The number of the next step.
    pub next_step: u64,
    /// |g| above this is cut to it (a local choice: the history records the cut g).
    pub clip: Option<f32>,
}

impl<B: Backend> core::fmt::Debug for Trainer<'_, '_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Trainer")
            .field("session", &self.session)
            .field("records", &self.records.len())
            .field("next_step", &self.next_step)
            .finish_non_exhaustive()
    }
}

/// The session's hex hashes for `model` with its adapter attached.
fn layout_hex<B: Backend>(model: &Model<'_, B>) -> String {
    hex(&layout_hash(model.layout()))
}

/// Rebuilds the state of run directory `dir` on `model` (whose adapter must be the
/// session's), checking the model and layout hashes and every record before applying any.
pub fn replay<B: Backend>(
    model: &Model<'_, B>,
    dir: &Path,
    model_sha256: &str,
) -> Result<(ZoState<B>, Session, Vec<Record>)> {
    let be = model.backend();
    let session = history::read_session(dir)?;
    let shown = dir.join(history::SESSION).display().to_string();
    session.check_target(model_sha256, &layout_hex(model), &shown)?;
    let w0 = history::read_w0(dir, model.layout())?;
    let records = history::read_history(dir, &session)?;
    let mut state = ZoState::new(be, model, &w0)?;
    let updates: Vec<(u32, i32)> = records
        .iter()
        .map(|r| (r.seed, session.zo.coefficient(r.g, r.step)))
        .collect();
    for chunk in updates.chunks(REPLAY_CHUNK) {
        state.apply(be, &session.zo, chunk)?;
    }
    Ok((state, session, records))
}

impl<'m, 'b, B: Backend> Trainer<'m, 'b, B> {
    /// A new run from the model's current adapter values; `capacity` is the tokens
    /// one forward pass holds: at least the longest sequence, more to pack several into one
    /// pass ([`super::pack_capacity`]).
    pub fn start(
        model: impl Into<Held<'m, Model<'b, B>>>,
        session: Session,
        capacity: u32,
    ) -> Result<Self> {
        let model = model.into();
        if session.layout_sha256 != layout_hex(&model) {
            return Err(Error::InvalidArgument {
                name: "session",
                reason: "its layout hash is not the model's adapter layout".into(),
            });
        }
        let w0 = model.read_params()?;
        Ok(Trainer {
            state: ZoState::new(model.backend(), &model, &w0)?,
            session,
            records: Vec::new(),
            cache: model.new_cache(capacity)?,
            model,
            next_step: 0,
            clip: None,
        })
    }

    /// Continues the run in `dir` (see [`replay`]).
    pub fn resume(
        model: impl Into<Held<'m, Model<'b, B>>>,
        dir: &Path,
        model_sha256: &str,
        capacity: u32,
    ) -> Result<Self> {
        let model = model.into();
        let (state, session, records) = replay(&model, dir, model_sha256)?;
        let next_step = records
            .last()
            .map_or(0, |r| r.step + 1)
            .max(history::read_progress(dir)?);
        Ok(Trainer {
            state,
            session,
            records,
            cache: model.new_cache(capacity)?,
            model,
            next_step,
            clip: None,
        })
    }

    /// One step on `batch`; an applied step is recorded.
    pub fn step(&mut self, batch: &[Example]) -> Result<StepOutcome> {
        let step = u32::try_from(self.next_step).map_err(|_| Error::InvalidArgument {
            name: "steps",
            reason: "a run holds at most 2^32 steps".into(),
        })?;
        let seed = self
            .session
            .zo
            .seed_for_step(step, self.session.seed_weights.as_ref());
        let out = zo_step(
            self.model.backend(),
            &self.model,
            &mut self.cache,
            &mut self.state,
            &self.session.zo,
            batch,
            (self.next_step, seed),
            self.clip,
        )?;
        if let Some(g) = out.g {
            self.records.push(Record {
                step: self.next_step,
                seed,
                g,
            });
        }
        self.next_step += 1;
        Ok(out)
    }

    /// Writes the current (unperturbed) values into the model's adapter buffers: steps
    /// leave them perturbed.
    pub fn load(&self) -> Result<()> {
        self.state
            .load_into(self.model.backend(), &self.model, &self.session.zo, 0, 0.0)
    }

    /// Mean loss per target token of `set` at the current (unperturbed) values.
    pub fn eval(&mut self, set: &[Example]) -> Result<f64> {
        self.load()?;
        let (nll, n) = batch_nll(&self.model, &mut self.cache, set)?;
        Ok(nll / n.max(1) as f64)
    }

    /// The current adapter values (layout order), left loaded in the model.
    pub fn values(&self) -> Result<Vec<Vec<f32>>> {
        self.load()?;
        self.model.read_params()
    }

    /// Writes the run into `dir`: session and start values (first time; a directory
    /// holding another session is refused), the history, and the adapter in PEFT format,
    /// each file atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if dir.join(history::SESSION).exists() {
            // Another session's start would pair this history with the wrong values.
            let stored = history::read_session(dir)?;
            if !stored.same_run(&self.session) {
                return Err(Error::InvalidArgument {
                    name: "dir",
                    reason: format!(
                        "{} holds another session's run; save into a new directory",
                        dir.display()
                    ),
                });
            }
        } else {
            history::write_start(
                dir,
                &self.session,
                self.model.layout(),
                &self.state.start(self.model.backend())?,
            )?;
        }
        history::write_history(dir, &self.records)?;
        history::write_progress(dir, self.next_step)?;
        let cfg = self.model.adapter().ok_or_else(|| Error::InvalidArgument {
            name: "adapter",
            reason: "the model has none attached".into(),
        })?;
        let order = peft::RowOrder::of(&self.model.cfg);
        peft::save(dir, cfg, self.model.layout(), &self.values()?, order)
    }
}
