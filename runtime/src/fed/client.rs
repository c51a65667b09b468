//! The device side of a federated session, as message processing: the app's own transport
//! carries the bytes. A client joins a session (its model and adapter layout must match),
//! applies each round exactly once and checks the published state digest (on a mismatch it
//! keeps its state and needs a checkpoint), runs its tau local zeroth-order steps from the
//! shared state and builds the upload. What it applied and uploaded is kept in a directory,
//! so an app restart rebuilds the same state and applies nothing twice.

use super::{Checkpoint, Round, Scalars, Session, Upload, protocol, read_checkpoint, seed_for};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::file::{FileKind, read_bounded, read_json, write_atomic};
use crate::held::Held;
use crate::model::{KvCache, Model};
use crate::train::history::hex;
use crate::train::{
    COEFFICIENT_BUDGET, Example, MAX_COEFFICIENT, SeedWeights, ZoConfig, ZoState, batch_nll,
    zo_step,
};
use edgetune_proto::{Encoding, SeedMode};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::prelude::v1::*;

const STATE: &str = "client.json";
const CHECKPOINT: &str = "checkpoint.safetensors";

/// What applying a round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The round was applied and its digest matched.
    Applied(u32),
    /// The round was applied before (a repeated delivery): nothing changed.
    Already(u32),
}

/// One round of local work, ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRound {
    pub round: u32,
    /// The encoded upload (docs/protocol.md, kind 3).
    pub upload: Vec<u8>,
    /// Mean of the steps' (l+ + l-) / 2 over the steps that ran.
    pub loss: f64,
    pub skipped: u32,
}

/// A federated client over a model whose adapter is the session's (attached with the
/// session key as its init seed, so every participant starts from the same values).
pub struct Client<'m, 'b, B: Backend> {
    model: Held<'m, Model<'b, B>>,
    pub session: Session,
    cfg: ZoConfig,
    pub id: u32,
    state: ZoState<B>,
    w0: Vec<Vec<f32>>,
    /// The last round applied (0: the start state).
    pub round: u32,
    /// The last round uploaded.
    pub uploaded: u32,
    /// The round of the checkpoint the state was rebuilt from (0: none).
    checkpoint: u32,
    weights: Option<SeedWeights>,
    dir: PathBuf,
    cache: KvCache<B>,
}

impl<B: Backend> core::fmt::Debug for Client<'_, '_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("round", &self.round)
            .field("uploaded", &self.uploaded)
            .finish_non_exhaustive()
    }
}

impl<'m, 'b, B: Backend> Client<'m, 'b, B> {
    /// Joins the session `session` as client `id`, keeping its durable record in `dir`; a
    /// client that ran before in `dir` resumes where it stopped (its rounds reapplied and
    /// checked). `model_sha256` is the hex SHA-256 of the model file; `capacity` the
    /// tokens one forward pass holds: at least the longest sequence, more to pack several
    /// into one pass ([`crate::train::pack_capacity`]).
    pub fn join(
        model: impl Into<Held<'m, Model<'b, B>>>,
        model_sha256: &str,
        session: &[u8],
        id: u32,
        dir: &Path,
        capacity: u32,
    ) -> Result<Self> {
        let model = model.into();
        let session = protocol("session", Session::decode(session))?;
        let layout = crate::adapter::layout_hash(model.layout());
        if hex(&session.model_sha256) != model_sha256 {
            return Err(Error::Federation {
                reason: format!(
                    "the session is for model {}, this model is {model_sha256}",
                    hex(&session.model_sha256)
                ),
            });
        }
        if session.layout_sha256 != layout {
            return Err(Error::Federation {
                reason: "the session's trainable layout is not this model's adapter".into(),
            });
        }
        let w0 = super::start_values(&model, &session)?;
        let (state, cache) = (
            ZoState::new(model.backend(), &model, &w0)?,
            model.new_cache(capacity)?,
        );
        let mut c = Client {
            model,
            cfg: super::zo_config(&session),
            session,
            id,
            state,
            w0,
            round: 0,
            uploaded: 0,
            checkpoint: 0,
            weights: None,
            dir: dir.to_owned(),
            cache,
        };
        c.restore()?;
        Ok(c)
    }

    /// The hash of the shared trainable state (docs/zeroth-order.md).
    pub fn state_hash(&self) -> Result<[u8; 32]> {
        self.state.hash(self.model.backend())
    }

    fn round_path(&self, r: u32) -> PathBuf {
        self.dir.join("rounds").join(format!("{r}.bin"))
    }

    /// Rebuilds the state a previous run of this client reached: its checkpoint if any,
    /// then the rounds after it, each checked against its digest.
    fn restore(&mut self) -> Result<()> {
        let path = self.dir.join(STATE);
        if !path.exists() {
            return Ok(());
        }
        let v = read_json(&path, FileKind::History)?;
        let num = |k: &str| v[k].as_u64().and_then(|x| u32::try_from(x).ok());
        let bad = |reason: &str| Error::Metadata {
            file: path.display().to_string(),
            key: "client".into(),
            reason: reason.into(),
        };
        if num("session_tag") != Some(self.session.tag()) || num("client_id") != Some(self.id) {
            return Err(bad("belongs to another session or client"));
        }
        let (round, uploaded) = (
            num("round").ok_or_else(|| bad("`round` is missing"))?,
            num("uploaded").ok_or_else(|| bad("`uploaded` is missing"))?,
        );
        // The checkpoint file itself says which round it holds (it is written before the
        // record, so it may be newer than the record says).
        if num("checkpoint").is_some_and(|r| r > 0) {
            let bytes = read_bounded(&self.dir.join(CHECKPOINT), FileKind::Adapter)?;
            self.load_checkpoint(&read_checkpoint(&bytes, self.model.layout())?)?;
        }
        for r in self.round + 1..=round {
            let bytes = read_bounded(&self.round_path(r), FileKind::History)?;
            let msg = protocol("stored round", Round::decode(&bytes, &self.session))?;
            let next = self.next_state(&msg)?;
            self.adopt(&msg, next);
        }
        self.uploaded = uploaded;
        Ok(())
    }

    fn save(&self) -> Result<()> {
        let v = json!({
            "session_tag": self.session.tag(),
            "client_id": self.id,
            "round": self.round,
            "uploaded": self.uploaded,
            "checkpoint": self.checkpoint,
        });
        write_atomic(&self.dir.join(STATE), v.to_string().as_bytes())
    }

    /// The state after `msg` (the next round), applied to a copy and checked against the
    /// published digest; nothing changes here.
    fn next_state(&self, msg: &Round) -> Result<ZoState<B>> {
        if msg.round != self.round + 1 {
            return Err(Error::Federation {
                reason: format!(
                    "round {} does not follow round {} (a checkpoint is needed)",
                    msg.round, self.round
                ),
            });
        }
        let mut next = self.state.duplicate(self.model.backend(), &self.model)?;
        next.apply(self.model.backend(), &self.cfg, &msg.updates)?;
        let found = next.hash(self.model.backend())?;
        if found != msg.digest {
            return Err(Error::StateMismatch {
                round: msg.round,
                expected: hex(&msg.digest),
                found: hex(&found),
            });
        }
        Ok(next)
    }

    fn adopt(&mut self, msg: &Round, state: ZoState<B>) {
        self.state = state;
        self.round = msg.round;
        self.weights = super::seed_weights(msg);
    }

    /// Applies a round message: the next round is applied and checked, a round applied
    /// before changes nothing, anything else is an error with nothing applied.
    pub fn apply_round(&mut self, bytes: &[u8]) -> Result<Applied> {
        let msg = protocol("round", Round::decode(bytes, &self.session))?;
        if msg.round <= self.round {
            return Ok(Applied::Already(msg.round));
        }
        let next = self.next_state(&msg)?;
        // The round's bytes on disk first, then the state, then the record that counts it:
        // a failed write leaves the round unapplied, to be delivered again.
        write_atomic(&self.round_path(msg.round), bytes)?;
        let before = (self.round, self.weights.clone());
        let state = core::mem::replace(&mut self.state, next);
        (self.round, self.weights) = (msg.round, super::seed_weights(&msg));
        if let Err(e) = self.save() {
            (self.state, (self.round, self.weights)) = (state, before);
            return Err(e);
        }
        Ok(Applied::Applied(msg.round))
    }

    fn load_checkpoint(&mut self, cp: &Checkpoint) -> Result<()> {
        let state = ZoState::from_parts(
            self.model.backend(),
            &self.model,
            &self.w0,
            &cp.acc,
            cp.spent,
        )?;
        let found = hex(&state.hash(self.model.backend())?);
        if found != cp.state_hash {
            return Err(Error::StateMismatch {
                round: cp.round,
                expected: cp.state_hash.clone(),
                found,
            });
        }
        self.state = state;
        self.round = cp.round;
        self.checkpoint = cp.round;
        self.weights = cp.next_weights.clone();
        Ok(())
    }

    /// Replaces the state by a checkpoint's (after a digest mismatch, or to join late);
    /// its hash is checked before anything changes.
    pub fn restore_checkpoint(&mut self, bytes: &[u8]) -> Result<()> {
        let cp = read_checkpoint(bytes, self.model.layout())?;
        let before = (
            self.state.duplicate(self.model.backend(), &self.model)?,
            self.round,
            self.checkpoint,
            self.weights.clone(),
        );
        self.load_checkpoint(&cp)?;
        if let Err(e) = write_atomic(&self.dir.join(CHECKPOINT), bytes) {
            (self.state, self.round, self.checkpoint, self.weights) = before;
            return Err(e);
        }
        self.save()
    }

    /// Runs the tau local steps of the next round on `data` (batches of `batch`, chosen by
    /// round and client) from the shared state, which they leave unchanged, and returns the
    /// upload.
    pub fn train_round(&mut self, data: &[Example], batch: usize) -> Result<LocalRound> {
        let round = self.round + 1;
        let s = self.session;
        let clip = (s.clip > 0.0).then_some(s.clip);
        let mut local = self.state.duplicate(self.model.backend(), &self.model)?;
        // Local steps only move this copy; when the integer budget could not take all of
        // them, they run without moving it (the scalars, which are what is uploaded, are
        // unchanged in kind).
        let room = COEFFICIENT_BUDGET.saturating_sub(local.spent());
        let local_cfg = if room < u64::from(s.tau) * u64::from(MAX_COEFFICIENT.unsigned_abs()) {
            ZoConfig {
                lr: 0.0,
                ..self.cfg
            }
        } else {
            self.cfg
        };
        let (mut pairs, mut skipped, mut values, mut loss, mut ran) =
            (Vec::new(), Vec::new(), Vec::new(), 0.0, 0u32);
        for step in 0..s.tau {
            let seed = seed_for(&s, round, step, self.id, self.weights.as_ref());
            let at = u64::from(round - 1) * u64::from(s.tau) + u64::from(step);
            let picked: Vec<Example> =
                crate::train::data::batch_for_step(data, batch, at, u64::from(self.id))
                    .into_iter()
                    .cloned()
                    .collect();
            let out = zo_step(
                self.model.backend(),
                &self.model,
                &mut self.cache,
                &mut local,
                &local_cfg,
                &picked,
                (at, seed),
                clip,
            )?;
            match out.g {
                Some(g) => {
                    pairs.push((seed, g));
                    values.push(g);
                    loss += (out.loss_plus + out.loss_minus) / 2.0;
                    ran += 1;
                }
                None => skipped.push(step),
            }
        }
        let scalars = match (s.seed_mode, s.encoding) {
            (SeedMode::KSeed, _) => Scalars::Pairs(pairs),
            (SeedMode::Shared, Encoding::Sign) => Scalars::Signs {
                positive: values.iter().map(|&g| g > 0.0).collect(),
                skipped: skipped.clone(),
            },
            (SeedMode::Shared, _) => Scalars::Values {
                skipped: skipped.clone(),
                values,
            },
        };
        let upload = Upload {
            session_tag: s.tag(),
            round,
            client_id: u64::from(self.id),
            samples: u32::try_from(data.len()).unwrap_or(u32::MAX),
            loss_sum: loss as f32,
            steps: s.tau,
            scalars,
        };
        Ok(LocalRound {
            round,
            upload: upload.encode(&s),
            loss: loss / f64::from(ran.max(1)),
            skipped: skipped.len() as u32,
        })
    }

    /// Records that the server acknowledged the upload of `round` (at most the next
    /// round: a later one was never trained).
    pub fn mark_uploaded(&mut self, round: u32) -> Result<()> {
        if round > self.round + 1 {
            return Err(Error::Federation {
                reason: format!(
                    "round {round} was never trained here (the client is at round {})",
                    self.round
                ),
            });
        }
        let before = self.uploaded;
        self.uploaded = self.uploaded.max(round);
        self.save().inspect_err(|_| self.uploaded = before)
    }

    /// Writes the shared state into the model's adapter buffers (for generation or
    /// scoring with the model directly; local steps leave them perturbed).
    pub fn load(&self) -> Result<()> {
        self.state
            .load_into(self.model.backend(), &self.model, &self.cfg, 0, 0.0)
    }

    /// Mean loss per target token of `set` at the shared state (no perturbation).
    pub fn eval(&mut self, set: &[Example]) -> Result<f64> {
        self.load()?;
        let (nll, n) = batch_nll(&self.model, &mut self.cache, set)?;
        Ok(nll / n.max(1) as f64)
    }
}
