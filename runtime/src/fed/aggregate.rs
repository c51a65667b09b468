//! The server's arithmetic: a round's uploads become one integer coefficient per seed, and
//! the seed history becomes FedKSeed-Pro weights. Deterministic functions of the committed
//! uploads (taken in client-id order), so a crashed server recomputes the same round, and
//! `tools/reference/fed_aggregate.py` reimplements them independently.

use super::{Scalars, Session, Upload, seed_for};
use crate::train::SeedWeights;
use edgetune_proto::{MAX_ROUND_COEFFICIENT, SeedMode};
use std::prelude::v1::*;

/// How shared-seed scalars of one step are combined across clients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SharedRule {
    /// Mean weighted by sample count.
    Mean,
    /// The median (the mean of the two middle values for an even count).
    Median,
}

/// The default cap on a client's claimed sample count.
pub const DEFAULT_MAX_SAMPLES: u32 = 1000;

/// The server's aggregation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Fraction of contributions cut from each end per seed (FedKSeed) or per step (shared
    /// seeds, with [`SharedRule::Mean`]) before averaging, in \[0, 0.5).
    pub trim: f64,
    pub shared: SharedRule,
    /// FedKSeed-Pro: publish seed weights for the next round from softmax(a / T), with this
    /// temperature T; `None` keeps draws uniform.
    pub temperature: Option<f64>,
    /// The largest sample count a client's weight counts (its claim is cut to this).
    pub max_samples: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            trim: 0.0,
            shared: SharedRule::Median,
            temperature: None,
            max_samples: DEFAULT_MAX_SAMPLES,
        }
    }
}

/// g cut to the session's clip (uploads were already range-checked by the reader).
fn clipped(s: &Session, g: f32) -> f64 {
    let g = f64::from(g);
    if s.clip > 0.0 {
        g.clamp(-f64::from(s.clip), f64::from(s.clip))
    } else {
        g
    }
}

/// Weighted mean of (value, weight) after cutting floor(trim * n) values from each end
/// (ties in value broken by position, which is client-id order), times the total weight of
/// all n: the sum the untrimmed weighted values would give if the cut ones had been typical.
fn trimmed_sum(mut xs: Vec<(f64, f64)>, trim: f64) -> f64 {
    let total: f64 = xs.iter().map(|x| x.1).sum();
    let cut = (trim * xs.len() as f64).floor() as usize;
    if cut == 0 {
        return xs.iter().map(|(v, w)| v * w).sum();
    }
    // By value, equal values (+0 and -0 among them) kept in client order: a stable sort
    // on the IEEE comparison (the values are finite).
    xs.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(core::cmp::Ordering::Equal));
    let kept = &xs[cut..xs.len() - cut];
    let kept_w: f64 = kept.iter().map(|x| x.1).sum();
    if kept_w == 0.0 {
        return 0.0;
    }
    kept.iter().map(|(v, w)| v * w).sum::<f64>() * (total / kept_w)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(core::cmp::Ordering::Equal));
    let n = xs.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The coefficient of an aggregate G: round_half_even(-lr * G * 2^delta_exp) in f64,
/// clamped to ±2^30.
pub fn coefficient(s: &Session, g: f64) -> i32 {
    let q = -f64::from(s.lr) * g * libm::exp2(f64::from(s.delta_exp));
    let bound = f64::from(MAX_ROUND_COEFFICIENT);
    libm::rint(q.clamp(-bound, bound)) as i32
}

/// The aggregate G per seed of round `round` (seeds ascending, zeros dropped).
///
/// FedKSeed: each client's contribution to seed j is the sum of its clipped g on j; the
/// clients' contributions are combined with weights n_c / sum n (FedKSeed's rule), with
/// `trim` cut per seed among the clients that drew it. Shared seeds: per step, the
/// clients' clipped g (or, for signs, +1/-1) are combined by the rule (signs: the sign of
/// the weighted vote), and a step's result goes to the seed the round fixed for it.
pub fn aggregate(
    s: &Session,
    round: u32,
    uploads: &[Upload],
    weights: Option<&SeedWeights>,
    policy: &Policy,
) -> Vec<(u32, f64)> {
    let mut ups: Vec<&Upload> = uploads.iter().filter(|u| u.round == round).collect();
    ups.sort_by_key(|u| u.client_id);
    // A client's sample count is its own claim: capped, so no client outweighs others by
    // more than max_samples to one.
    let n = |u: &Upload| f64::from(u.samples.clamp(1, policy.max_samples.max(1)));
    let total_n: f64 = ups.iter().map(|u| n(u)).sum();
    let weight = |u: &Upload| n(u) / total_n;
    let mut per_seed: std::collections::BTreeMap<u32, Vec<(f64, f64)>> = Default::default();
    match s.seed_mode {
        SeedMode::KSeed => {
            for u in &ups {
                let Scalars::Pairs(pairs) = &u.scalars else {
                    continue;
                };
                let mut mine: std::collections::BTreeMap<u32, f64> = Default::default();
                for &(j, g) in pairs {
                    *mine.entry(j).or_default() += clipped(s, g);
                }
                for (j, x) in mine {
                    per_seed.entry(j).or_default().push((x, weight(u)));
                }
            }
        }
        SeedMode::Shared => {
            for step in 0..s.tau {
                let mut xs = Vec::new();
                for u in &ups {
                    if let Some(g) = step_value(s, u, step) {
                        xs.push((g, weight(u)));
                    }
                }
                if xs.is_empty() {
                    continue;
                }
                let g = if s.encoding == edgetune_proto::Encoding::Sign {
                    let vote: f64 = xs.iter().map(|(v, w)| v * w).sum();
                    if vote > 0.0 {
                        1.0
                    } else if vote < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                } else {
                    match policy.shared {
                        SharedRule::Median => median(xs.iter().map(|x| x.0).collect()),
                        SharedRule::Mean => {
                            let w: f64 = xs.iter().map(|x| x.1).sum();
                            trimmed_sum(xs, policy.trim) / w
                        }
                    }
                };
                let j = seed_for(s, round, step, 0, weights);
                // One entry per step: summed below with weight one.
                per_seed.entry(j).or_default().push((g, 1.0));
            }
        }
    }
    per_seed
        .into_iter()
        .map(|(j, xs)| {
            let g = match s.seed_mode {
                SeedMode::KSeed => trimmed_sum(xs, policy.trim),
                SeedMode::Shared => xs.iter().map(|x| x.0).sum(),
            };
            (j, g)
        })
        .filter(|&(_, g)| g != 0.0)
        .collect()
}

/// Client `u`'s clipped scalar of shared-seed step `step` (+1/-1 for signs), or `None`
/// if it skipped that step or stopped before it.
fn step_value(s: &Session, u: &Upload, step: u32) -> Option<f64> {
    if step >= u.steps {
        return None;
    }
    let skipped = match &u.scalars {
        Scalars::Values { skipped, .. } | Scalars::Signs { skipped, .. } => skipped,
        Scalars::Pairs(_) => return None,
    };
    // The step's position among the values sent: the steps before it, less the skipped.
    let index = match skipped.binary_search(&step) {
        Ok(_) => return None,
        Err(before) => step as usize - before,
    };
    match &u.scalars {
        Scalars::Values { values, .. } => values.get(index).map(|&g| clipped(s, g)),
        Scalars::Signs { positive, .. } => positive.get(index).map(|&p| if p { 1.0 } else { -1.0 }),
        Scalars::Pairs(_) => None,
    }
}

/// The round's integer updates: [`aggregate`] through [`coefficient`], zeros dropped.
pub fn updates(
    s: &Session,
    round: u32,
    uploads: &[Upload],
    weights: Option<&SeedWeights>,
    policy: &Policy,
) -> Vec<(u32, i32)> {
    aggregate(s, round, uploads, weights, policy)
        .into_iter()
        .map(|(j, g)| (j, coefficient(s, g)))
        .filter(|&(_, q)| q != 0)
        .collect()
}

/// FedKSeed-Pro's history: per seed the sum and count of |g| (clipped to 1000) over every
/// round's uploads.
#[derive(Debug, Clone, PartialEq)]
pub struct ProStats {
    sum: Vec<f64>,
    count: Vec<u64>,
}

impl ProStats {
    pub fn new(k: u32) -> ProStats {
        ProStats {
            sum: vec![0.0; k as usize],
            count: vec![0; k as usize],
        }
    }

    /// Adds a round's uploads (FedKSeed pairs; shared seeds count per step).
    pub fn record(&mut self, s: &Session, round: u32, uploads: &[Upload], w: Option<&SeedWeights>) {
        let mut ups: Vec<&Upload> = uploads.iter().filter(|u| u.round == round).collect();
        ups.sort_by_key(|u| u.client_id);
        for u in ups {
            match &u.scalars {
                Scalars::Pairs(pairs) => {
                    for &(j, g) in pairs {
                        self.add(j, g);
                    }
                }
                _ => {
                    for step in 0..u.steps {
                        if let Some(g) = step_value(s, u, step) {
                            self.add(seed_for(s, round, step, 0, w), g as f32);
                        }
                    }
                }
            }
        }
    }

    fn add(&mut self, j: u32, g: f32) {
        if let (Some(sum), Some(n)) = (self.sum.get_mut(j as usize), self.count.get_mut(j as usize))
        {
            *sum += f64::from(g).abs().min(1000.0);
            *n += 1;
        }
    }

    /// Weights in 1..=16 for the next round: a_j = mean |g| of seed j (its history starts
    /// with one 0), min-max normalised to \[0, 1\], p = softmax(a / T), weight =
    /// max(1, round(16 p_j / max p)) (f64, round half to even).
    pub fn weights(&self, temperature: f64) -> Vec<u8> {
        let a: Vec<f64> = self
            .sum
            .iter()
            .zip(&self.count)
            .map(|(s, &n)| s / (n + 1) as f64)
            .collect();
        let lo = a.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = hi - lo;
        let z: Vec<f64> = a
            .iter()
            .map(|x| if span > 0.0 { (x - lo) / span } else { 0.0 } / temperature)
            .collect();
        let top = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // p_j / max p = exp(z_j - max z): the softmax's normaliser cancels.
        z.iter()
            .map(|x| {
                let r = libm::exp(x - top);
                libm::rint(16.0 * r).clamp(1.0, 16.0) as u8
            })
            .collect()
    }
}
