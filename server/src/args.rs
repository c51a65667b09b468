//! The server's command line, shared by `edgetune-server` and `edgetune fed serve`.

use crate::{Config, SessionParams};
use edgetune::adapter::{AdapterConfig, Target};
use edgetune::fed::aggregate::{Policy, SharedRule};
use edgetune_proto::{Encoding, SeedMode};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// FedKSeed: each client draws its seeds among K and uploads (seed, g).
    Kseed,
    /// Shared seeds: the round fixes every step's seed; clients upload scalars or signs.
    Shared,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodingArg {
    F32,
    F16,
    /// Signs only (shared seeds).
    Sign,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleArg {
    Median,
    Mean,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainableArg {
    Lora,
    Ia3,
    Norms,
    Scales,
}

/// Settings of a federated session and its server.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The base model every client runs (GGUF file or safetensors directory).
    #[arg(long)]
    pub model: PathBuf,
    /// The SQLite database holding the session, uploads and rounds (created if absent).
    #[arg(long, default_value = "edgetune-server.db")]
    pub db: PathBuf,
    /// A PostgreSQL database instead of SQLite (postgres://user:password@host/db), for
    /// several replicas sharing one store.
    #[arg(long)]
    pub postgres: Option<String>,
    /// The PostgreSQL schema holding this session's tables.
    #[arg(long, default_value = "edgetune")]
    pub pg_schema: String,
    #[arg(long, default_value = "127.0.0.1:8470")]
    pub listen: SocketAddr,
    /// JSON object of client ids to hex HMAC keys ({"1": "9f2c..."}), added to the store
    /// (clients already there keep working).
    #[arg(long)]
    pub clients: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "lora")]
    pub trainable: TrainableArg,
    #[arg(long, default_value_t = 8)]
    pub rank: u32,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// LoRA or scales targets, comma-separated (q,k,v,o,gate,up,down).
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    #[arg(long, value_enum, default_value = "kseed")]
    pub mode: ModeArg,
    #[arg(long, value_enum, default_value = "f32")]
    pub encoding: EncodingArg,
    /// K candidate seeds.
    #[arg(long, default_value_t = 4096)]
    pub seeds: u32,
    /// Local steps per round.
    #[arg(long, default_value_t = 200)]
    pub tau: u32,
    #[arg(long, default_value_t = 1e-2)]
    pub eps: f32,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f32,
    /// Clients cut |g| to this; the server cuts again (0: none).
    #[arg(long, default_value_t = 10.0)]
    pub clip: f32,
    #[arg(long, default_value_t = 16)]
    pub delta_exp: u8,
    /// The session key (every z and seed draw derives from it).
    #[arg(long, default_value_t = 1)]
    pub session_key: u64,
    /// Uploads that close a round.
    #[arg(long, default_value_t = 10)]
    pub quorum: u32,
    /// Seconds after which a round with at least one upload closes.
    #[arg(long, default_value_t = 600)]
    pub deadline: u64,
    /// Fraction cut from each end per seed or step before averaging, in [0, 0.5).
    #[arg(long, default_value_t = 0.0)]
    pub trim: f64,
    /// How shared-seed scalars of a step are combined.
    #[arg(long, value_enum, default_value = "median")]
    pub rule: RuleArg,
    /// FedKSeed-Pro: publish seed weights softmax(a / T) with this temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// The largest sample count a client's upload is weighted by (its claim is cut to it).
    #[arg(long, default_value_t = edgetune::fed::aggregate::DEFAULT_MAX_SAMPLES)]
    pub max_samples: u32,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Threads of the server's CPU backend.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Held-out JSONL (prompt/completion in the chat format, or pre-tokenised) scored after
    /// every round for the status page.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ServeArgs {
    /// The server configuration (without a held-out set), or the flag that is wrong.
    pub fn config(&self) -> Result<Config, (&'static str, String)> {
        let targets = self
            .targets
            .split(',')
            .filter(|s| !s.is_empty())
            .map(Target::parse)
            .collect::<edgetune::Result<Vec<_>>>()
            .map_err(|e| ("--targets", e.to_string()))?;
        let adapter = match self.trainable {
            TrainableArg::Lora => AdapterConfig::lora(self.rank, self.alpha, &targets),
            TrainableArg::Ia3 => AdapterConfig::ia3(),
            TrainableArg::Norms => AdapterConfig::norms(),
            TrainableArg::Scales => AdapterConfig::scales(&targets),
        };
        let seed_mode = match self.mode {
            ModeArg::Kseed => SeedMode::KSeed,
            ModeArg::Shared => SeedMode::Shared,
        };
        let encoding = match self.encoding {
            EncodingArg::F32 => Encoding::F32,
            EncodingArg::F16 => Encoding::F16,
            EncodingArg::Sign if seed_mode == SeedMode::Shared => Encoding::Sign,
            EncodingArg::Sign => {
                return Err(("--encoding", "sign needs --mode shared".into()));
            }
        };
        let range = |ok: bool, flag: &'static str, why: &str| {
            if ok {
                Ok(())
            } else {
                Err((flag, why.to_owned()))
            }
        };
        range(
            (1..=edgetune_proto::MAX_K).contains(&self.seeds),
            "--seeds",
            "must be in 1..=2^24",
        )?;
        range(
            (1..=edgetune_proto::MAX_TAU).contains(&self.tau),
            "--tau",
            "must be in 1..=65536",
        )?;
        range(
            self.eps > 0.0 && self.eps <= 1.0,
            "--eps",
            "must be in (0, 1]",
        )?;
        range(self.lr > 0.0 && self.lr <= 1.0, "--lr", "must be in (0, 1]")?;
        range(
            self.clip >= 0.0 && self.clip.is_finite(),
            "--clip",
            "must be finite and >= 0",
        )?;
        range(
            (8..=40).contains(&self.delta_exp),
            "--delta-exp",
            "must be in 8..=40",
        )?;
        range(
            (0.0..0.5).contains(&self.trim),
            "--trim",
            "must be in [0, 0.5)",
        )?;
        range(
            self.temperature.is_none_or(|t| t > 0.0 && t.is_finite()),
            "--temperature",
            "must be finite and above zero",
        )?;
        range(self.max_body >= 1024, "--max-body", "must be at least 1024")?;
        Ok(Config {
            model: self.model.clone(),
            params: SessionParams {
                adapter,
                session_key: self.session_key,
                seed_mode,
                encoding,
                k: self.seeds,
                tau: self.tau,
                delta_exp: self.delta_exp,
                eps: self.eps,
                lr: self.lr,
                clip: self.clip,
            },
            policy: Policy {
                trim: self.trim,
                shared: match self.rule {
                    RuleArg::Median => SharedRule::Median,
                    RuleArg::Mean => SharedRule::Mean,
                },
                temperature: self.temperature,
                max_samples: self.max_samples,
            },
            quorum: self.quorum.max(1),
            deadline: Duration::from_secs(self.deadline),
            max_body: self.max_body,
            eval: self.eval_set()?,
            threads: self.threads.max(1),
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
        })
    }

    fn eval_set(&self) -> Result<Vec<edgetune::train::Example>, (&'static str, String)> {
        let Some(path) = &self.eval else {
            return Ok(Vec::new());
        };
        let load = || -> edgetune::Result<Vec<edgetune::train::Example>> {
            let files = edgetune::model::files::ModelFiles::open(&self.model, None)?;
            let cfg = files.config()?;
            let tok = files.tokenizer().ok();
            let opts = edgetune::train::data::DataOptions {
                seq_len: cfg.context as usize,
                chat: true,
                max_bad_share: 0.1,
            };
            Ok(edgetune::train::data::load_jsonl(path, tok.as_ref(), cfg.vocab, &opts)?.examples)
        };
        load().map_err(|e| ("--eval", e.to_string()))
    }
}

/// Reads a clients file: a JSON object of decimal ids to hex keys.
pub fn read_clients(path: &std::path::Path) -> Result<Vec<(u32, Vec<u8>)>, String> {
    let v = edgetune::format::file::read_json(path, edgetune::format::file::FileKind::Config)
        .map_err(|e| e.to_string())?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{}: not a JSON object of id: key", path.display()))?;
    obj.iter()
        .map(|(id, key)| {
            let id: u32 = id
                .parse()
                .map_err(|_| format!("{}: client id `{id}` is not a u32", path.display()))?;
            let key = key
                .as_str()
                .and_then(crate::auth::unhex)
                .filter(|k| k.len() >= 16)
                .ok_or_else(|| {
                    format!(
                        "{}: client {id}: key must be hex, at least 16 bytes",
                        path.display()
                    )
                })?;
            Ok((id, key))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::read_clients;

    /// Each malformed clients file is refused with a message naming it; a sound one reads.
    #[test]
    fn hostile_clients_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("edgetune-clients-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("clients.json");
        let key = "00112233445566778899aabbccddeeff";
        for (text, why) in [
            ("[1, 2]", "not a JSON object"),
            ("{\"one\": \"00\"}", "not a u32"),
            ("{\"1\": \"zz\"}", "key must be hex"),
            ("{\"1\": \"0011\"}", "at least 16 bytes"),
            ("{\"1\": 7}", "key must be hex"),
            ("{", "clients.json"),
        ] {
            std::fs::write(&path, text).unwrap_or_default();
            match read_clients(&path) {
                Err(e) => assert!(e.contains(why), "{text}: {e}"),
                Ok(c) => panic!("{text} was accepted: {c:?}"),
            }
        }
        std::fs::write(&path, format!("{{\"7\": \"{key}\"}}")).unwrap_or_default();
        assert_eq!(read_clients(&path).map(|c| c.len()), Ok(1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
