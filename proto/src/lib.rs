//! edgetune's federated wire protocol: the session a server announces, the rounds it
//! publishes and the uploads clients send, as small binary messages (docs/protocol.md is
//! the specification a client in another language is written from).
//!
//! Every message is `magic, version, kind, body, CRC-32`; integers in the body are
//! LEB128 varints (canonical: no padding groups) or fixed little-endian words. Readers
//! never size an allocation from a count before checking it against the bytes that remain
//! and the session's limits, and reject anything malformed with a [`ProtoError`]. The
//! crate is `no_std` (it needs `alloc`), so the runtime, the server and firmware share it.

#![no_std]

extern crate alloc;

pub mod auth;

use alloc::vec::Vec;
use core::fmt;
use half::f16;

/// The first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"ETfd";
/// The protocol version this crate writes and reads.
pub const VERSION: u8 = 1;
/// The perturbation generator of docs/zeroth-order.md (Philox4x32-10 addressing, v1).
pub const GENERATOR: u8 = 1;
/// Largest number of candidate seeds a session may have.
pub const MAX_K: u32 = 1 << 24;
/// Largest number of local steps per round.
pub const MAX_TAU: u32 = 1 << 16;
/// Scalars beyond this magnitude are refused as corrupt or hostile.
pub const MAX_ABS_G: f32 = 1e9;
/// Largest |coefficient| a round may publish for one seed.
pub const MAX_ROUND_COEFFICIENT: i32 = 1 << 30;
/// Bytes of a frame around its body: magic, version, kind, then the CRC-32.
pub const FRAME_BYTES: usize = 4 + 1 + 1 + 4;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The message ends before `what`.
    Truncated {
        what: &'static str,
    },
    BadMagic,
    /// A version this build does not read.
    Version(u8),
    /// A message kind other than the one expected (or an unknown one).
    Kind {
        expected: u8,
        found: u8,
    },
    /// The CRC-32 does not match the bytes.
    Checksum,
    /// A varint that is too long, overflows its field, or is not in canonical form.
    Varint {
        what: &'static str,
    },
    /// A field outside its allowed range.
    Range {
        what: &'static str,
        value: u64,
    },
    /// A seed index not below K.
    Seed {
        index: u32,
        k: u32,
    },
    /// A scalar that is not finite or is larger than [`MAX_ABS_G`] (its position).
    Scalar {
        position: u32,
    },
    /// The message belongs to another session (its tag differs).
    Session {
        expected: u32,
        found: u32,
    },
    /// The upload's encoding is not the session's.
    Encoding,
    /// Bytes after the message's last field.
    Trailing {
        bytes: usize,
    },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Truncated { what } => write!(f, "message ends before its {what}"),
            ProtoError::BadMagic => write!(f, "not an edgetune protocol message (bad magic)"),
            ProtoError::Version(v) => {
                write!(
                    f,
                    "protocol version {v} is not one this build reads ({VERSION})"
                )
            }
            ProtoError::Kind { expected, found } => {
                write!(f, "message kind {found} where kind {expected} was expected")
            }
            ProtoError::Checksum => write!(f, "checksum mismatch (corrupt message)"),
            ProtoError::Varint { what } => write!(f, "malformed integer in {what}"),
            ProtoError::Range { what, value } => write!(f, "{what} = {value} is out of range"),
            ProtoError::Seed { index, k } => write!(f, "seed index {index} is not below K = {k}"),
            ProtoError::Scalar { position } => {
                write!(
                    f,
                    "scalar {position} is not finite or exceeds {MAX_ABS_G:e}"
                )
            }
            ProtoError::Session { expected, found } => write!(
                f,
                "message for session {found:08x}, not this session ({expected:08x})"
            ),
            ProtoError::Encoding => write!(f, "upload encoding differs from the session's"),
            ProtoError::Trailing { bytes } => write!(f, "{bytes} bytes after the message"),
        }
    }
}

pub type Result<T> = core::result::Result<T, ProtoError>;

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Session = 1,
    Round = 2,
    Upload = 3,
}

/// How each local step's seed is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedMode {
    /// FedKSeed: each client draws its own seed among K per step and uploads (seed, g).
    KSeed,
    /// Every client uses the seed the round fixes for each step (DeComFL, FeedSign) and
    /// uploads only its scalars or their signs; the server aggregates per step.
    Shared,
}

/// How an upload carries its scalars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    F32,
    F16,
    /// One bit per step: the sign of g (shared seeds only).
    Sign,
}

/// The constants every participant of a session shares (docs/protocol.md, kind 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Session {
    pub model_sha256: [u8; 32],
    pub layout_sha256: [u8; 32],
    pub session_key: u64,
    /// [`GENERATOR`].
    pub generator: u8,
    /// 0: binomial z, 1: Rademacher z.
    pub z_kind: u8,
    pub seed_mode: SeedMode,
    pub encoding: Encoding,
    /// Candidate seeds.
    pub k: u32,
    /// Local steps per round.
    pub tau: u32,
    /// The update unit is 2^-delta_exp.
    pub delta_exp: u8,
    pub eps: f32,
    pub lr: f32,
    /// Clients cut |g| to this before uploading (0: no cut).
    pub clip: f32,
}

/// A round's result (kind 2): the integer coefficient of every seed the round changed,
/// the digest of the trainable state after applying it, and optionally FedKSeed-Pro
/// weights for the next round's draws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub session_tag: u32,
    /// Applying this round to the state after round `round - 1` gives the state after
    /// `round`; round 0 is the start state and is never published.
    pub round: u32,
    /// (seed index, coefficient), seeds strictly increasing.
    pub updates: Vec<(u32, i32)>,
    /// K weights in 1..=16 for the next round's seed draws (absent: uniform).
    pub weights: Option<Vec<u8>>,
    /// SHA-256 state hash after this round (docs/zeroth-order.md).
    pub digest: [u8; 32],
}

/// An upload's scalars.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalars {
    /// FedKSeed: (seed index, g) per applied step.
    Pairs(Vec<(u32, f32)>),
    /// Shared seeds: the steps skipped (a non-finite loss), then g for every other step.
    Values { skipped: Vec<u32>, values: Vec<f32> },
    /// Shared seeds, sign only: the steps skipped, then whether g > 0 for every other.
    Signs {
        skipped: Vec<u32>,
        positive: Vec<bool>,
    },
}

/// A client's contribution to a round (kind 3).
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    pub session_tag: u32,
    pub round: u32,
    pub client_id: u64,
    /// Training examples behind this upload (the aggregation weight).
    pub samples: u32,
    /// Sum of the steps' mean losses (l+ + l-) / 2, for monitoring.
    pub loss_sum: f32,
    /// Steps run, skipped ones included (at most tau).
    pub steps: u32,
    pub scalars: Scalars,
}

// ---- writing ----

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: Kind) -> Writer {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&MAGIC);
        v.push(VERSION);
        v.push(kind as u8);
        Writer(v)
    }
    fn varint(&mut self, mut x: u64) {
        while x >= 0x80 {
            self.0.push((x as u8) | 0x80);
            x >>= 7;
        }
        self.0.push(x as u8);
    }
    fn zigzag(&mut self, x: i32) {
        self.varint(u64::from(((x << 1) ^ (x >> 31)) as u32));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn finish(mut self) -> Vec<u8> {
        let crc = crc32(&self.0);
        self.0.extend_from_slice(&crc.to_le_bytes());
        self.0
    }
    /// Ascending indices as a count, then the first index and each later gap minus one.
    fn ascending(&mut self, xs: &[u32]) {
        self.varint(xs.len() as u64);
        let mut next = 0u32;
        for &x in xs {
            self.varint(u64::from(x.wrapping_sub(next)));
            next = x.wrapping_add(1);
        }
    }
    fn scalar(&mut self, g: f32, enc: Encoding) {
        match enc {
            Encoding::F16 => self.bytes(&f16::from_f32(g).to_bits().to_le_bytes()),
            _ => self.bytes(&g.to_le_bytes()),
        }
    }
}

fn mode_byte(m: SeedMode) -> u8 {
    match m {
        SeedMode::KSeed => 0,
        SeedMode::Shared => 1,
    }
}

fn encoding_byte(e: Encoding) -> u8 {
    match e {
        Encoding::F32 => 0,
        Encoding::F16 => 1,
        Encoding::Sign => 2,
    }
}

impl Session {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::Session);
        w.bytes(&self.model_sha256);
        w.bytes(&self.layout_sha256);
        w.bytes(&self.session_key.to_le_bytes());
        w.bytes(&[
            self.generator,
            self.z_kind,
            mode_byte(self.seed_mode),
            encoding_byte(self.encoding),
        ]);
        w.varint(u64::from(self.k));
        w.varint(u64::from(self.tau));
        w.bytes(&[self.delta_exp]);
        for x in [self.eps, self.lr, self.clip] {
            w.bytes(&x.to_le_bytes());
        }
        w.finish()
    }

    /// The tag that binds rounds and uploads to this session: the CRC-32 of its encoding.
    pub fn tag(&self) -> u32 {
        let e = self.encode();
        u32::from_le_bytes([
            e[e.len() - 4],
            e[e.len() - 3],
            e[e.len() - 2],
            e[e.len() - 1],
        ])
    }

    pub fn decode(bytes: &[u8]) -> Result<Session> {
        let mut r = Reader::open(bytes, Kind::Session)?;
        let model_sha256 = r.array("model hash")?;
        let layout_sha256 = r.array("layout hash")?;
        let session_key = u64::from_le_bytes(r.array("session key")?);
        let [generator, z_kind, mode, encoding] = r.array("modes")?;
        if generator != GENERATOR {
            return Err(ProtoError::Range {
                what: "generator version",
                value: generator.into(),
            });
        }
        if z_kind > 1 {
            return Err(ProtoError::Range {
                what: "z kind",
                value: z_kind.into(),
            });
        }
        let seed_mode = match mode {
            0 => SeedMode::KSeed,
            1 => SeedMode::Shared,
            m => {
                return Err(ProtoError::Range {
                    what: "seed mode",
                    value: m.into(),
                });
            }
        };
        let encoding = match (encoding, seed_mode) {
            (0, _) => Encoding::F32,
            (1, _) => Encoding::F16,
            (2, SeedMode::Shared) => Encoding::Sign,
            (e, _) => {
                return Err(ProtoError::Range {
                    what: "encoding",
                    value: e.into(),
                });
            }
        };
        let k = r.bounded("K", 1, MAX_K)?;
        let tau = r.bounded("tau", 1, MAX_TAU)?;
        let [delta_exp] = r.array("delta exponent")?;
        if !(8..=40).contains(&delta_exp) {
            return Err(ProtoError::Range {
                what: "delta exponent",
                value: delta_exp.into(),
            });
        }
        let mut floats = [0.0f32; 3];
        for (x, what) in floats.iter_mut().zip(["eps", "lr", "clip"]) {
            *x = f32::from_le_bytes(r.array(what)?);
            let ok = x.is_finite() && *x >= 0.0 && *x <= MAX_ABS_G && (what == "clip" || *x > 0.0);
            if !ok {
                return Err(ProtoError::Range {
                    what,
                    value: u64::from(x.to_bits()),
                });
            }
        }
        r.end()?;
        Ok(Session {
            model_sha256,
            layout_sha256,
            session_key,
            generator,
            z_kind,
            seed_mode,
            encoding,
            k,
            tau,
            delta_exp,
            eps: floats[0],
            lr: floats[1],
            clip: floats[2],
        })
    }
}

impl Round {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::Round);
        w.bytes(&self.session_tag.to_le_bytes());
        w.varint(u64::from(self.round));
        let seeds: Vec<u32> = self.updates.iter().map(|u| u.0).collect();
        w.ascending(&seeds);
        for &(_, q) in &self.updates {
            w.zigzag(q);
        }
        match &self.weights {
            None => w.bytes(&[0]),
            Some(ws) => {
                w.bytes(&[1]);
                // Two 4-bit weights (minus one) per byte, the even index in the low nibble.
                for pair in ws.chunks(2) {
                    let lo = pair[0].saturating_sub(1) & 0xF;
                    let hi = pair.get(1).map_or(0, |h| h.saturating_sub(1) & 0xF);
                    w.bytes(&[lo | (hi << 4)]);
                }
            }
        }
        w.bytes(&self.digest);
        w.finish()
    }

    /// A round of `session`; seeds below K, coefficients within ±[`MAX_ROUND_COEFFICIENT`].
    pub fn decode(bytes: &[u8], session: &Session) -> Result<Round> {
        let mut r = Reader::open(bytes, Kind::Round)?;
        let session_tag = r.tag(session)?;
        let round = r.bounded("round", 1, u32::MAX)?;
        let seeds = r.ascending("seeds", session.k)?;
        let mut updates = Vec::with_capacity(seeds.len());
        for s in seeds {
            let q = r.zigzag("coefficient")?;
            if q.unsigned_abs() > MAX_ROUND_COEFFICIENT.unsigned_abs() {
                return Err(ProtoError::Range {
                    what: "coefficient",
                    value: u64::from(q.unsigned_abs()),
                });
            }
            updates.push((s, q));
        }
        let [flag] = r.array("weights flag")?;
        let weights = match flag {
            0 => None,
            1 => {
                let packed = r.take(session.k.div_ceil(2) as usize, "seed weights")?;
                let mut ws = Vec::with_capacity(session.k as usize);
                for (i, b) in packed.iter().enumerate() {
                    ws.push((b & 0xF) + 1);
                    if 2 * i + 1 < session.k as usize {
                        ws.push((b >> 4) + 1);
                    } else if b >> 4 != 0 {
                        return Err(ProtoError::Range {
                            what: "padding nibble",
                            value: u64::from(b >> 4),
                        });
                    }
                }
                Some(ws)
            }
            f => {
                return Err(ProtoError::Range {
                    what: "weights flag",
                    value: f.into(),
                });
            }
        };
        let digest = r.array("state digest")?;
        r.end()?;
        Ok(Round {
            session_tag,
            round,
            updates,
            weights,
            digest,
        })
    }
}

impl Upload {
    /// Encodes for `session`, whose encoding the scalars must follow.
    pub fn encode(&self, session: &Session) -> Vec<u8> {
        let mut w = Writer::new(Kind::Upload);
        w.bytes(&self.session_tag.to_le_bytes());
        w.varint(u64::from(self.round));
        w.varint(self.client_id);
        w.varint(u64::from(self.samples));
        w.bytes(&self.loss_sum.to_le_bytes());
        w.varint(u64::from(self.steps));
        match &self.scalars {
            Scalars::Pairs(pairs) => {
                w.varint(pairs.len() as u64);
                for &(s, g) in pairs {
                    w.varint(u64::from(s));
                    w.scalar(g, session.encoding);
                }
            }
            Scalars::Values { skipped, values } => {
                w.ascending(skipped);
                for &g in values {
                    w.scalar(g, session.encoding);
                }
            }
            Scalars::Signs { skipped, positive } => {
                w.ascending(skipped);
                for bits in positive.chunks(8) {
                    let byte = bits
                        .iter()
                        .enumerate()
                        .fold(0u8, |b, (i, &p)| b | (u8::from(p) << i));
                    w.bytes(&[byte]);
                }
            }
        }
        w.finish()
    }

    /// An upload for `session`: its encoding, seeds below K, at most tau steps, finite
    /// scalars within [`MAX_ABS_G`].
    pub fn decode(bytes: &[u8], session: &Session) -> Result<Upload> {
        let mut r = Reader::open(bytes, Kind::Upload)?;
        let session_tag = r.tag(session)?;
        let round = r.bounded("round", 1, u32::MAX)?;
        let client_id = r.varint("client id")?;
        let samples = r.bounded("sample count", 0, u32::MAX)?;
        let loss_sum = f32::from_le_bytes(r.array("loss sum")?);
        if !loss_sum.is_finite() {
            return Err(ProtoError::Scalar { position: u32::MAX });
        }
        let steps = r.bounded("step count", 0, session.tau)?;
        let scalar = |r: &mut Reader<'_>, position: u32| -> Result<f32> {
            let g = if session.encoding == Encoding::F16 {
                f16::from_le_bytes(r.array("scalar")?).to_f32()
            } else {
                f32::from_le_bytes(r.array("scalar")?)
            };
            if g.is_finite() && g.abs() <= MAX_ABS_G {
                Ok(g)
            } else {
                Err(ProtoError::Scalar { position })
            }
        };
        let scalars = match (session.seed_mode, session.encoding) {
            (SeedMode::KSeed, _) => {
                let n = r.bounded("pair count", 0, steps)?;
                let mut pairs = Vec::with_capacity(r.cap(n, 2));
                for i in 0..n {
                    let s = r.bounded("seed", 0, u32::MAX)?;
                    if s >= session.k {
                        return Err(ProtoError::Seed {
                            index: s,
                            k: session.k,
                        });
                    }
                    pairs.push((s, scalar(&mut r, i)?));
                }
                Scalars::Pairs(pairs)
            }
            (SeedMode::Shared, Encoding::Sign) => {
                let skipped = r.ascending("skipped steps", steps)?;
                let n = steps as usize - skipped.len();
                let packed = r.take(n.div_ceil(8), "signs")?;
                let positive = (0..n).map(|i| packed[i / 8] >> (i % 8) & 1 == 1).collect();
                if !n.is_multiple_of(8) && packed[n / 8] >> (n % 8) != 0 {
                    return Err(ProtoError::Range {
                        what: "padding bits",
                        value: u64::from(packed[n / 8]),
                    });
                }
                Scalars::Signs { skipped, positive }
            }
            (SeedMode::Shared, _) => {
                let skipped = r.ascending("skipped steps", steps)?;
                let n = steps - skipped.len() as u32;
                let mut values = Vec::with_capacity(r.cap(n, 2));
                for i in 0..n {
                    values.push(scalar(&mut r, i)?);
                }
                Scalars::Values { skipped, values }
            }
        };
        r.end()?;
        Ok(Upload {
            session_tag,
            round,
            client_id,
            samples,
            loss_sum,
            steps,
            scalars,
        })
    }
}

// ---- reading ----

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the frame (length, magic, version, kind, checksum) and returns a reader of
    /// the body.
    fn open(bytes: &'a [u8], kind: Kind) -> Result<Reader<'a>> {
        if bytes.len() < FRAME_BYTES {
            return Err(ProtoError::Truncated { what: "frame" });
        }
        if bytes[..4] != MAGIC {
            return Err(ProtoError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(ProtoError::Version(bytes[4]));
        }
        let (framed, crc) = bytes.split_at(bytes.len() - 4);
        if crc32(framed).to_le_bytes() != crc {
            return Err(ProtoError::Checksum);
        }
        if bytes[5] != kind as u8 {
            return Err(ProtoError::Kind {
                expected: kind as u8,
                found: bytes[5],
            });
        }
        Ok(Reader { rest: &framed[6..] })
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(ProtoError::Truncated { what });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64> {
        let mut x = 0u64;
        for i in 0..10 {
            let [b] = self.array(what)?;
            let bits = u64::from(b & 0x7F);
            if i == 9 && bits > 1 {
                return Err(ProtoError::Varint { what });
            }
            x |= bits << (7 * i);
            if b & 0x80 == 0 {
                // Canonical: no final group of zeros after the first.
                if i > 0 && b == 0 {
                    return Err(ProtoError::Varint { what });
                }
                return Ok(x);
            }
        }
        Err(ProtoError::Varint { what })
    }

    fn bounded(&mut self, what: &'static str, lo: u32, hi: u32) -> Result<u32> {
        let v = self.varint(what)?;
        match u32::try_from(v) {
            Ok(x) if (lo..=hi).contains(&x) => Ok(x),
            _ => Err(ProtoError::Range { what, value: v }),
        }
    }

    fn zigzag(&mut self, what: &'static str) -> Result<i32> {
        let v = self.bounded(what, 0, u32::MAX)?;
        Ok(((v >> 1) as i32) ^ -((v & 1) as i32))
    }

    fn tag(&mut self, session: &Session) -> Result<u32> {
        let found = u32::from_le_bytes(self.array("session tag")?);
        let expected = session.tag();
        if found != expected {
            return Err(ProtoError::Session { expected, found });
        }
        Ok(found)
    }

    /// Capacity for `n` entries of at least `min_bytes` each: never more than the bytes
    /// left could hold, so a hostile count cannot size an allocation.
    fn cap(&self, n: u32, min_bytes: usize) -> usize {
        (n as usize).min(self.rest.len() / min_bytes)
    }

    /// Strictly increasing indices below `bound`, as [`Writer::ascending`] writes them.
    fn ascending(&mut self, what: &'static str, bound: u32) -> Result<Vec<u32>> {
        let n = self.bounded(what, 0, bound)?;
        let mut out = Vec::with_capacity(self.cap(n, 1));
        let mut next = 0u64;
        for _ in 0..n {
            let x = next.saturating_add(self.varint(what)?);
            if x >= u64::from(bound) {
                return Err(match what {
                    "seeds" => ProtoError::Seed {
                        index: u32::try_from(x).unwrap_or(u32::MAX),
                        k: bound,
                    },
                    _ => ProtoError::Range { what, value: x },
                });
            }
            out.push(x as u32);
            next = x + 1;
        }
        Ok(out)
    }

    fn end(&self) -> Result<()> {
        match self.rest.len() {
            0 => Ok(()),
            bytes => Err(ProtoError::Trailing { bytes }),
        }
    }
}
