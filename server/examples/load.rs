//! Load test: N simulated clients (default 1,000) upload to one round at once over
//! loopback, each on its own connection and thread; prints uploads per second and the
//! p50 / p99 / max acknowledgement latency, then checks that every acknowledged upload is
//! committed and the round closed once. On SQLite by default, on PostgreSQL with
//! `--postgres URL`.
//!
//!     cargo run --release -p edgetune-server --example load -- [--clients N] [--postgres URL]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use edgetune::adapter::{AdapterConfig, Target};
use edgetune::fed::aggregate::Policy;
use edgetune_proto::{Encoding, Scalars, SeedMode, Session, Upload};
use edgetune_server::store::{Sqlite, Store};
use edgetune_server::{Config, SessionParams, auth, start};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let n: u32 = value("--clients")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let postgres = value("--postgres");
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/tiny/llama_gqa_tied/q4_0.gguf");
    let cfg = Config {
        model,
        params: SessionParams {
            adapter: AdapterConfig::lora(2, 4.0, &[Target::Q, Target::V]),
            session_key: 5,
            seed_mode: SeedMode::KSeed,
            encoding: Encoding::F32,
            k: 4096,
            tau: 200,
            delta_exp: 16,
            eps: 1e-2,
            lr: 5e-4,
            clip: 10.0,
        },
        policy: Policy::default(),
        quorum: n,
        deadline: Duration::from_secs(3600),
        max_body: 1 << 20,
        eval: Vec::new(),
        threads: 1,
        tls: None,
    };
    let dir = std::env::temp_dir().join(format!("edgetune-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let (store, name): (Arc<dyn Store>, &str) = match &postgres {
        Some(url) => {
            let schema = format!("load_{}", std::process::id());
            (
                Arc::new(
                    edgetune_server::postgres::Postgres::open(url, &schema)
                        .unwrap_or_else(|e| panic!("{e}")),
                ),
                "PostgreSQL",
            )
        }
        None => (
            Arc::new(Sqlite::open(&dir.join("server.db")).unwrap_or_else(|e| panic!("{e}"))),
            "SQLite",
        ),
    };
    let key = |id: u32| -> Vec<u8> { id.to_le_bytes().repeat(8) };
    for id in 1..=n {
        store
            .set_client(id, &key(id))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let server = start(
        &cfg,
        store.clone(),
        "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let session = Session::decode(&server.session).unwrap_or_else(|e| panic!("{e}"));
    // Uploads of the reference size: tau = 200 (seed, f32) pairs each.
    let bodies: Vec<Vec<u8>> = (1..=n)
        .map(|id| {
            Upload {
                session_tag: session.tag(),
                round: 1,
                client_id: u64::from(id),
                samples: 10,
                loss_sum: 1.0,
                steps: 200,
                scalars: Scalars::Pairs(
                    (0..200u32)
                        .map(|s| {
                            // The client's own seed draws (the server checks them).
                            let seed = edgetune::fed::seed_for(&session, 1, s, id, None);
                            (seed, ((s + id) % 21) as f32 - 10.0)
                        })
                        .collect(),
                ),
            }
            .encode(&session)
        })
        .collect();
    let url = format!("http://{}/v1/upload", server.addr);
    let barrier = Arc::new(Barrier::new(n as usize + 1));
    let threads: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let (barrier, url, k) = (barrier.clone(), url.clone(), key(i as u32 + 1));
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    let id = i as u32 + 1;
                    let req = ureq::post(&url)
                        .timeout(Duration::from_secs(120))
                        .set(auth::CLIENT, &id.to_string())
                        .set(auth::NONCE, "1")
                        .set(auth::SIGNATURE, &auth::sign(&k, 1, &body));
                    barrier.wait();
                    let t = Instant::now();
                    let (status, why) = match req.send_bytes(&body) {
                        Ok(r) => (r.status(), String::new()),
                        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
                        Err(e) => (0, e.to_string()),
                    };
                    (status, t.elapsed(), why)
                })
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    barrier.wait();
    let start_all = Instant::now();
    let mut results: Vec<(u16, Duration, String)> = threads
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap_or((0, Duration::ZERO, "thread panicked".into()))
        })
        .collect();
    let mut failures: Vec<&str> = results
        .iter()
        .filter(|r| r.0 != 200)
        .map(|r| r.2.as_str())
        .collect();
    failures.sort_unstable();
    failures.dedup();
    for f in failures.iter().take(5) {
        eprintln!("failure: {f}");
    }
    let wall = start_all.elapsed();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    results.sort_by_key(|r| r.1);
    let pct = |p: f64| results[((results.len() as f64 * p) as usize).min(results.len() - 1)].1;
    let committed = store.upload_count(1).unwrap_or(0);
    let closed = store.round(1).unwrap_or(None).is_some();
    println!(
        "{name}: {n} clients, {ok} acknowledged, {committed} committed, round closed: {closed}; \
         {:.0} uploads/s; latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ok as f64 / wall.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        results.last().map_or(0.0, |r| r.1.as_secs_f64() * 1e3),
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(url) = &postgres {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.batch_execute(&format!("DROP SCHEMA load_{} CASCADE", std::process::id()))
            .unwrap();
    }
    if ok != n as usize || committed != n || !closed {
        eprintln!("FAILED: not every upload was acknowledged and committed");
        std::process::exit(1);
    }
}
