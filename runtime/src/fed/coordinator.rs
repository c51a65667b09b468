//! The server's side of a session without transport or storage: it checks uploads,
//! closes a round from a set of committed uploads (aggregate, apply, digest, Pro weights)
//! and serves checkpoints. A round is a deterministic function of its uploads, so a server
//! that restarts rebuilds every round by closing them again from its store.

use super::aggregate::{Policy, ProStats, updates};
use super::{Round, Session, Upload, checkpoint_bytes, protocol, seed_weights, zo_config};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use crate::train::{Example, SeedWeights, ZoConfig, ZoState, batch_nll};
use std::prelude::v1::*;

/// The aggregation state of one session.
pub struct Coordinator<'m, 'b, B: Backend> {
    be: &'b B,
    model: &'m Model<'b, B>,
    pub session: Session,
    cfg: ZoConfig,
    pub policy: Policy,
    state: ZoState<B>,
    stats: ProStats,
    /// The draw weights of the open round (from the last closed round).
    weights: Option<SeedWeights>,
    /// The last round closed (0: none).
    pub round: u32,
}

impl<B: Backend> core::fmt::Debug for Coordinator<'_, '_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Coordinator")
            .field("session", &self.session)
            .field("round", &self.round)
            .finish_non_exhaustive()
    }
}

impl<'m, 'b, B: Backend> Coordinator<'m, 'b, B> {
    /// A session over `model`, whose adapter (attached with the session key as its init
    /// seed) must be the session's layout.
    pub fn new(
        be: &'b B,
        model: &'m Model<'b, B>,
        session: Session,
        policy: Policy,
    ) -> Result<Self> {
        if session.layout_sha256 != crate::adapter::layout_hash(model.layout()) {
            return Err(Error::Federation {
                reason: "the session's layout hash is not the model's adapter layout".into(),
            });
        }
        if !(0.0..0.5).contains(&policy.trim)
            || policy.temperature.is_some_and(|t| t.is_nan() || t <= 0.0)
        {
            return Err(Error::InvalidArgument {
                name: "policy",
                reason: "trim must be in [0, 0.5) and the temperature above zero".into(),
            });
        }
        let w0 = super::start_values(model, &session)?;
        Ok(Coordinator {
            be,
            model,
            cfg: zo_config(&session),
            policy,
            state: ZoState::new(be, model, &w0)?,
            stats: ProStats::new(session.k),
            weights: None,
            session,
            round: 0,
        })
    }

    /// Decodes an upload and checks that it is for the open round.
    pub fn check_upload(&self, bytes: &[u8]) -> Result<Upload> {
        let up = protocol("upload", Upload::decode(bytes, &self.session))?;
        if up.round != self.round + 1 {
            return Err(Error::Federation {
                reason: format!(
                    "the upload is for round {}, the open round is {}",
                    up.round,
                    self.round + 1
                ),
            });
        }
        if up.client_id > u64::from(u32::MAX) {
            return Err(Error::Federation {
                reason: format!("client id {} is not below 2^32", up.client_id),
            });
        }
        Ok(up)
    }

    /// Closes the open round from its committed uploads (at most one per client; others
    /// are ignored): the round message, encoded, after applying it to the server's state.
    pub fn close_round(&mut self, uploads: &[Upload]) -> Result<Vec<u8>> {
        let round = self.round + 1;
        let mut mine: Vec<Upload> = uploads
            .iter()
            .filter(|u| u.round == round)
            .cloned()
            .collect();
        mine.sort_by_key(|u| u.client_id);
        mine.dedup_by_key(|u| u.client_id);
        let updates = updates(
            &self.session,
            round,
            &mine,
            self.weights.as_ref(),
            &self.policy,
        );
        self.state.apply(self.be, &self.cfg, &updates)?;
        self.stats
            .record(&self.session, round, &mine, self.weights.as_ref());
        let weights = self.policy.temperature.map(|t| self.stats.weights(t));
        let msg = Round {
            session_tag: self.session.tag(),
            round,
            updates,
            weights,
            digest: self.state.hash(self.be)?,
        };
        self.weights = seed_weights(&msg);
        self.round = round;
        Ok(msg.encode())
    }

    /// The state after the last closed round, as a checkpoint.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        checkpoint_bytes(
            self.model.layout(),
            &self.state.accumulators(self.be)?,
            self.round,
            self.state.spent(),
            &self.state.hash(self.be)?,
        )
    }

    /// Mean loss per target token of `set` at the state after the last closed round.
    pub fn eval(&self, cache: &mut KvCache<B>, set: &[Example]) -> Result<f64> {
        self.state
            .load_into(self.be, self.model, &self.cfg, 0, 0.0)?;
        let (nll, n) = batch_nll(self.model, cache, set)?;
        Ok(nll / n.max(1) as f64)
    }

    /// The hash of the state after the last closed round.
    pub fn state_hash(&self) -> Result<[u8; 32]> {
        self.state.hash(self.be)
    }
}
