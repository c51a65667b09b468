//! The server over real HTTP and a real SQLite file, with the runtime's client on the tiny
//! model: rounds close at quorum and every client holds the server's state; each kind of
//! bad request gets its status, changes nothing and is counted; a restarted server
//! recomputes its rounds from the store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use edgetune::adapter::{AdapterConfig, Target};
use edgetune::backend::cpu::Cpu;
use edgetune::fed::aggregate::Policy;
use edgetune::fed::client::{Applied, Client};
use edgetune::model::files::ModelFiles;
use edgetune::train::Example;
use edgetune::train::history::hex;
use edgetune_proto::{Encoding, SeedMode};
use edgetune_server::store::{Sqlite, Store};
use edgetune_server::{Config, SessionParams, auth, start};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/tiny/llama_gqa_tied/q4_0.gguf")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgetune-server-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const KEY: u64 = 77;

fn config() -> Config {
    Config {
        model: model_path(),
        params: SessionParams {
            adapter: AdapterConfig::lora(2, 4.0, &[Target::Q, Target::V]),
            session_key: KEY,
            seed_mode: SeedMode::KSeed,
            encoding: Encoding::F32,
            k: 64,
            tau: 3,
            delta_exp: 16,
            eps: 1e-2,
            lr: 1e-2,
            clip: 10.0,
        },
        policy: Policy::default(),
        quorum: 2,
        deadline: Duration::from_secs(3600),
        max_body: 4096,
        eval: Vec::new(),
        threads: 1,
        tls: None,
    }
}

fn examples(client: u32) -> Vec<Example> {
    (0..4)
        .map(|i| {
            let i = i + 4 * client as usize;
            let tokens: Vec<u32> = std::iter::once(1)
                .chain((0..10).map(|k| ((i * 7 + 3 * k) % 60 + 2) as u32))
                .collect();
            let targets = (0..tokens.len()).map(|j| j >= 3).collect();
            Example { tokens, targets }
        })
        .collect()
}

fn key(id: u32) -> Vec<u8> {
    (0..32).map(|i| (i * 7 + id * 13) as u8).collect()
}

/// Posts an upload signed by `id` with `nonce`: (status, body text).
fn post(base: &str, id: u32, nonce: u64, body: &[u8], signer: &[u8]) -> (u16, String) {
    let r = ureq::post(&format!("{base}/v1/upload"))
        .set(auth::CLIENT, &id.to_string())
        .set(auth::NONCE, &nonce.to_string())
        .set(auth::SIGNATURE, &auth::sign(signer, nonce, body))
        .send_bytes(body);
    match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn get(url: &str) -> (u16, Vec<u8>) {
    match ureq::get(url).call() {
        Ok(resp) => {
            let mut v = Vec::new();
            let status = resp.status();
            resp.into_reader().read_to_end(&mut v).unwrap();
            (status, v)
        }
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap().into_bytes()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn rounds_over_http_keep_clients_in_step_and_bad_requests_change_nothing() {
    let dir = tmp("rounds");
    let db = dir.join("server.db");
    let store = Arc::new(Sqlite::open(&db).unwrap());
    for id in [1, 2] {
        store.set_client(id, &key(id)).unwrap();
    }
    let cfg = config();
    let server = start(&cfg, store.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let base = format!("http://{}", server.addr);
    let (status, session) = get(&format!("{base}/v1/session"));
    assert_eq!((status, &session), (200, &server.session));

    let f = ModelFiles::open(&model_path(), None).unwrap();
    let sha = hex(&f.sha256());
    let mut model = f.load(&Cpu).unwrap();
    model.attach(cfg.params.adapter.clone(), KEY).unwrap();
    let mut clients: Vec<Client<'_, '_, Cpu>> = [1u32, 2]
        .iter()
        .map(|&id| {
            Client::join(&model, &sha, &session, id, &dir.join(format!("c{id}")), 16).unwrap()
        })
        .collect();
    // Round 1: client 1 uploads (the round stays open below quorum), then client 2.
    let up1 = clients[0].train_round(&examples(0), 2).unwrap().upload;
    let up2 = clients[1].train_round(&examples(1), 2).unwrap().upload;
    let (s, body) = post(&base, 1, 1, &up1, &key(1));
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("committed"));
    assert_eq!(get(&format!("{base}/v1/rounds/1")).0, 404);

    // Each bad request: its status, nothing stored.
    let other = clients[0].train_round(&examples(3), 1).unwrap().upload;
    let mut corrupt = up2.clone();
    corrupt[12] ^= 1;
    // (what, status, client, nonce, body, signing key)
    let cases = [
        ("unknown client", 401, 9, 1, up2.clone(), key(9)),
        ("bad signature", 401, 2, 100, up2.clone(), key(1)),
        ("impersonation", 403, 1, 101, up2.clone(), key(1)),
        ("different bytes", 409, 1, 102, other, key(1)),
        ("corrupt", 400, 2, 103, corrupt, key(2)),
        ("oversized", 413, 2, 104, vec![0u8; 8192], key(2)),
    ];
    for (what, want, id, nonce, body, signer) in &cases {
        let (status, text) = post(&base, *id, *nonce, body, signer);
        assert_eq!(status, *want, "{what}: {text}");
    }
    // A replayed nonce (the client's last accepted one) is refused even with a valid
    // signature.
    assert_eq!(post(&base, 1, 102, &up1, &key(1)).0, 401);
    assert_eq!(store.upload_count(1).unwrap(), 1);
    // A retry of the committed upload is accepted once.
    let (s, body) = post(&base, 1, 200, &up1, &key(1));
    assert_eq!(s, 200);
    assert!(body.contains("duplicate"), "{body}");
    // Client 2 completes the quorum: round 1 closes.
    let (s, body) = post(&base, 2, 201, &up2, &key(2));
    assert_eq!(s, 200, "{body}");
    let (s, round1) = get(&format!("{base}/v1/rounds/1"));
    assert_eq!(s, 200);
    for c in &mut clients {
        assert_eq!(c.apply_round(&round1).unwrap(), Applied::Applied(1));
    }
    assert_eq!(
        clients[0].state_hash().unwrap(),
        clients[1].state_hash().unwrap()
    );
    // A retry of a committed upload after its round closed is told it is in the round;
    // an upload the round does not hold is stale.
    let (s, body) = post(&base, 2, 202, &up2, &key(2));
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("duplicate"), "{body}");
    let session_msg = edgetune_proto::Session::decode(&session).unwrap();
    let mut other2 = edgetune_proto::Upload::decode(&up2, &session_msg).unwrap();
    other2.loss_sum += 1.0;
    assert_eq!(
        post(&base, 2, 203, &other2.encode(&session_msg), &key(2)).0,
        409
    );
    let (_, metrics) = get(&format!("{base}/metrics"));
    let metrics = String::from_utf8(metrics).unwrap();
    for line in [
        "edgetune_uploads_committed_total 2",
        "edgetune_uploads_duplicate_total 2",
        "edgetune_rounds_closed 1",
        "reason=\"unauthenticated\"} 2",
        "reason=\"oversized\"} 1",
        "reason=\"impersonation\"} 1",
        "reason=\"conflict\"} 1",
        "reason=\"malformed\"} 1",
        "reason=\"replayed\"} 1",
        "reason=\"wrong_round\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    let (s, page) = get(&format!("{base}/"));
    assert_eq!(s, 200);
    assert!(String::from_utf8(page).unwrap().contains("/v1/status"));

    // Restarted on the same store: round 1 is recomputed and equal; the checkpoint holds
    // the clients' state.
    server.stop();
    let server = start(
        &cfg,
        Arc::new(Sqlite::open(&db).unwrap()),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let base = format!("http://{}", server.addr);
    assert_eq!(get(&format!("{base}/v1/rounds/1")).1, round1);
    let (s, cp) = get(&format!("{base}/v1/checkpoint"));
    assert_eq!(s, 200);
    let mut late = Client::join(&model, &sha, &session, 3, &dir.join("late"), 16).unwrap();
    late.restore_checkpoint(&cp).unwrap();
    assert_eq!(late.state_hash().unwrap(), clients[0].state_hash().unwrap());
    // A server configured for another session refuses this store.
    let mut other = cfg.clone();
    other.params.lr = 2e-2;
    assert!(
        start(
            &other,
            Arc::new(Sqlite::open(&db).unwrap()),
            "127.0.0.1:0".parse().unwrap()
        )
        .is_err()
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
