//! The server process killed with SIGKILL at varied points while clients upload and rounds
//! close, then restarted on the same SQLite file, many times: no acknowledged upload is
//! lost, every stored round equals its recomputation from the stored uploads, and the
//! clients (which keep applying rounds) end on the server's state. 20 kills here
//! (`EDGETUNE_KILLS` for more; scripts/soak_server.sh).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use edgetune::adapter::{AdapterConfig, Target};
use edgetune::backend::cpu::Cpu;
use edgetune::fed::aggregate::Policy;
use edgetune::fed::client::Client;
use edgetune::fed::coordinator::Coordinator;
use edgetune::fed::{Round, Session};
use edgetune::model::files::ModelFiles;
use edgetune::train::Example;
use edgetune::train::history::hex;
use edgetune_server::auth;
use edgetune_server::postgres::Postgres;
use edgetune_server::store::{Sqlite, Store};

mod common;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: u32 = 4;

/// (round, client, upload bytes) of every acknowledged upload.
type Acked = Arc<Mutex<Vec<(u32, u32, Vec<u8>)>>>;
const KEY: u64 = 91;

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/tiny/llama_gqa_tied/q4_0.gguf")
}

fn key(id: u32) -> Vec<u8> {
    (0..32).map(|i| (i * 11 + id * 17) as u8).collect()
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

fn spawn(store: &[String], clients: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_edgetune-server"))
        .args(["--model", model_path().to_str().unwrap()])
        .args(store)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--clients", clients.to_str().unwrap()])
        .args([
            "--tau", "2", "--seeds", "64", "--lr", "1e-2", "--rank", "2", "--alpha", "4",
        ])
        .args([
            "--quorum",
            &CLIENTS.to_string(),
            "--session-key",
            &KEY.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// (status, body), or None when the server is not there.
fn call(r: Result<ureq::Response, ureq::Error>) -> Option<(u16, Vec<u8>)> {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(_) => return None,
    };
    let status = resp.status();
    let mut v = Vec::new();
    resp.into_reader().read_to_end(&mut v).ok()?;
    Some((status, v))
}

#[test]
fn killed_servers_lose_no_acknowledged_upload_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("edgetune-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("server.db");
    let args = vec!["--db".to_owned(), db.display().to_string()];
    kill_run(&dir, &args, &|| Box::new(Sqlite::open(&db).unwrap()));
}

#[test]
fn killed_servers_lose_no_acknowledged_upload_on_postgres() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("edgetune-kill-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let schema = common::fresh_schema(&url, "kill");
    let args = vec![
        "--postgres".to_owned(),
        url.clone(),
        "--pg-schema".to_owned(),
        schema.clone(),
    ];
    kill_run(&dir, &args, &|| {
        Box::new(Postgres::open(&url, &schema).unwrap())
    });
}

/// Kills and restarts a server on the store `store_args` selects while clients work;
/// `open` opens that store for the final checks.
fn kill_run(dir: &Path, store_args: &[String], open: &dyn Fn() -> Box<dyn Store>) {
    let kills: u32 = std::env::var("EDGETUNE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = dir.to_owned();
    let clients_file = dir.join("clients.json");
    let keys: serde_json::Map<String, serde_json::Value> = (1..=CLIENTS)
        .map(|id| (id.to_string(), auth::hex(&key(id)).into()))
        .collect();
    std::fs::write(&clients_file, serde_json::Value::Object(keys).to_string()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");

    // Clients in their own thread, uploading and applying rounds for as long as the test
    // runs, through every kill; every acknowledged upload is recorded.
    let acked: Acked = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let driver = {
        let (acked, done, base, dir) = (acked.clone(), done.clone(), base.clone(), dir.clone());
        std::thread::spawn(move || {
            let f = ModelFiles::open(&model_path(), None).unwrap();
            let sha = hex(&f.sha256());
            let mut model = f.load(&Cpu).unwrap();
            model
                .attach(AdapterConfig::lora(2, 4.0, &[Target::Q, Target::V]), KEY)
                .unwrap();
            let session = loop {
                if let Some((200, b)) = call(ureq::get(&format!("{base}/v1/session")).call()) {
                    break b;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let mut cs: Vec<Client<'_, '_, Cpu>> = (1..=CLIENTS)
                .map(|id| {
                    Client::join(&model, &sha, &session, id, &dir.join(format!("c{id}")), 16)
                        .unwrap()
                })
                .collect();
            let mut nonce = [0u64; CLIENTS as usize];
            while !done.load(Ordering::SeqCst) {
                for (i, c) in cs.iter_mut().enumerate() {
                    // Apply every closed round first.
                    while let Some((200, b)) =
                        call(ureq::get(&format!("{base}/v1/rounds/{}", c.round + 1)).call())
                    {
                        c.apply_round(&b).unwrap();
                    }
                    if c.uploaded > c.round {
                        continue;
                    }
                    let up = c.train_round(&examples(i as u32), 2).unwrap();
                    nonce[i] += 1;
                    let r = ureq::post(&format!("{base}/v1/upload"))
                        .set(auth::CLIENT, &c.id.to_string())
                        .set(auth::NONCE, &nonce[i].to_string())
                        .set(
                            auth::SIGNATURE,
                            &auth::sign(&key(c.id), nonce[i], &up.upload),
                        )
                        .send_bytes(&up.upload);
                    match call(r) {
                        Some((200, _)) => {
                            acked
                                .lock()
                                .unwrap()
                                .push((up.round, c.id, up.upload.clone()));
                            c.mark_uploaded(up.round).unwrap();
                        }
                        // Closed meanwhile (a restart caught up): the next pass applies it.
                        Some((409, _)) | None => {}
                        Some((s, b)) => {
                            panic!("upload refused {s}: {}", String::from_utf8_lossy(&b))
                        }
                    }
                }
            }
            cs.iter()
                .map(|c| (c.round, c.state_hash().unwrap()))
                .collect::<Vec<_>>()
        })
    };

    for k in 0..kills {
        let mut child = spawn(store_args, &clients_file, port);
        // Up, then a varied time of uploads and closes before the kill.
        let t = Instant::now();
        while call(ureq::get(&format!("{base}/v1/session")).call()).is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "server {k} did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(u64::from(30 + k * 53 % 250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    // A last server: let the clients finish the round in flight, then stop everything.
    let mut child = spawn(store_args, &clients_file, port);
    std::thread::sleep(Duration::from_millis(1500));
    done.store(true, Ordering::SeqCst);
    let finals = driver.join().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // Every acknowledged upload is in the store, byte for byte.
    let store = open();
    let acked = acked.lock().unwrap();
    assert!(
        acked.len() >= CLIENTS as usize,
        "only {} uploads went through",
        acked.len()
    );
    for (round, client, bytes) in acked.iter() {
        assert!(
            store.uploads(*round).unwrap().contains(bytes),
            "acknowledged upload of client {client} for round {round} is lost"
        );
    }
    // Every stored round is the recomputation of its stored uploads.
    let f = ModelFiles::open(&model_path(), None).unwrap();
    let mut model = f.load(&Cpu).unwrap();
    model
        .attach(AdapterConfig::lora(2, 4.0, &[Target::Q, Target::V]), KEY)
        .unwrap();
    let session = Session::decode(&store.session().unwrap().unwrap()).unwrap();
    let mut coord = Coordinator::new(&model, session, Policy::default()).unwrap();
    let last = store.last_round().unwrap();
    assert!(last >= 2, "only {last} rounds closed");
    for r in 1..=last {
        let ups: Vec<_> = store
            .uploads(r)
            .unwrap()
            .iter()
            .map(|b| coord.check_upload(b).unwrap())
            .collect();
        assert_eq!(
            coord.close_round(&ups).unwrap(),
            store.round(r).unwrap().unwrap(),
            "round {r}"
        );
    }
    // The clients hold the state of the last round they applied, which is the server's.
    let want = Round::decode(&store.round(last).unwrap().unwrap(), &session)
        .unwrap()
        .digest;
    for (round, hash) in finals {
        if round == last {
            assert_eq!(hash, want);
        }
    }
    eprintln!(
        "{kills} kills, {} acknowledged uploads, {last} rounds",
        acked.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
