//! Two server replicas (separate processes) on one PostgreSQL database: uploads spread over
//! both, one replica killed with SIGKILL mid-round, the other closes the round once; with
//! both up, both close the next round concurrently and store it once; every acknowledged
//! upload is there and every client ends on the published state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use edgetune::adapter::{AdapterConfig, Target};
use edgetune::backend::cpu::Cpu;
use edgetune::fed::client::{Applied, Client};
use edgetune::model::files::ModelFiles;
use edgetune::train::Example;
use edgetune::train::history::hex;
use edgetune_server::auth;
use edgetune_server::postgres::Postgres;
use edgetune_server::store::Store;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: u64 = 4242;

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/tiny/llama_gqa_tied/q4_0.gguf")
}

fn key(id: u32) -> Vec<u8> {
    (0..32).map(|i| (i * 5 + id * 29) as u8).collect()
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(url: &str, schema: &str, clients: &Path, port: u16) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_edgetune-server"))
        .args(["--model", model_path().to_str().unwrap()])
        .args(["--postgres", url, "--pg-schema", schema])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--clients", clients.to_str().unwrap()])
        .args([
            "--tau", "2", "--seeds", "64", "--lr", "1e-2", "--rank", "2", "--alpha", "4",
        ])
        .args(["--quorum", "4", "--session-key", &KEY.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while get(&format!("http://127.0.0.1:{port}/v1/session")).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "replica did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn get(url: &str) -> Option<(u16, Vec<u8>)> {
    let resp = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(_) => return None,
    };
    let status = resp.status();
    let mut v = Vec::new();
    resp.into_reader().read_to_end(&mut v).ok()?;
    Some((status, v))
}

fn upload(port: u16, id: u32, nonce: u64, body: &[u8]) -> u16 {
    let r = ureq::post(&format!("http://127.0.0.1:{port}/v1/upload"))
        .set(auth::CLIENT, &id.to_string())
        .set(auth::NONCE, &nonce.to_string())
        .set(auth::SIGNATURE, &auth::sign(&key(id), nonce, body))
        .send_bytes(body);
    match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn two_replicas_on_one_database_close_each_round_once() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    let schema = common::fresh_schema(&url, "replicas");
    let dir = std::env::temp_dir().join(format!("edgetune-replicas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let clients_file = dir.join("clients.json");
    let keys: serde_json::Map<String, serde_json::Value> = (1..=4u32)
        .map(|id| (id.to_string(), auth::hex(&key(id)).into()))
        .collect();
    std::fs::write(&clients_file, serde_json::Value::Object(keys).to_string()).unwrap();
    let (pa, pb) = (free_port(), free_port());
    let mut a = spawn(&url, &schema, &clients_file, pa);
    let mut b = spawn(&url, &schema, &clients_file, pb);

    let f = ModelFiles::open(&model_path(), None).unwrap();
    let sha = hex(&f.sha256());
    let mut model = f.load(&Cpu).unwrap();
    model
        .attach(AdapterConfig::lora(2, 4.0, &[Target::Q, Target::V]), KEY)
        .unwrap();
    let session = get(&format!("http://127.0.0.1:{pa}/v1/session")).unwrap().1;
    assert_eq!(
        get(&format!("http://127.0.0.1:{pb}/v1/session")).unwrap().1,
        session
    );
    let mut cs: Vec<Client<'_, '_, Cpu>> = (1..=4u32)
        .map(|id| {
            Client::join(&model, &sha, &session, id, &dir.join(format!("c{id}")), 16).unwrap()
        })
        .collect();
    let mut acked = Vec::new();

    // Round 1: two uploads to A, one to B; A is killed; the last upload, to B, closes it.
    let ups: Vec<Vec<u8>> = cs
        .iter_mut()
        .enumerate()
        .map(|(i, c)| c.train_round(&examples(i as u32), 2).unwrap().upload)
        .collect();
    for (i, port) in [(0, pa), (1, pa), (2, pb)] {
        assert_eq!(upload(port, i as u32 + 1, 1, &ups[i]), 200);
        acked.push((1, ups[i].clone()));
    }
    a.kill().unwrap(); // SIGKILL, mid-round
    a.wait().unwrap();
    assert_eq!(upload(pb, 4, 1, &ups[3]), 200);
    acked.push((1, ups[3].clone()));
    let (s, round1) = get(&format!("http://127.0.0.1:{pb}/v1/rounds/1")).unwrap();
    assert_eq!(s, 200);
    for c in &mut cs {
        assert_eq!(c.apply_round(&round1).unwrap(), Applied::Applied(1));
    }

    // Round 2 with both replicas up (A restarted, catching up on round 1): uploads
    // alternate, and the two quorum-completing uploads go to both at once.
    let mut a = spawn(&url, &schema, &clients_file, pa);
    assert_eq!(
        get(&format!("http://127.0.0.1:{pa}/v1/rounds/1"))
            .unwrap()
            .1,
        round1
    );
    let ups: Vec<Vec<u8>> = cs
        .iter_mut()
        .enumerate()
        .map(|(i, c)| c.train_round(&examples(i as u32), 2).unwrap().upload)
        .collect();
    assert_eq!(upload(pa, 1, 2, &ups[0]), 200);
    assert_eq!(upload(pb, 2, 2, &ups[1]), 200);
    let (u3, u4) = (ups[2].clone(), ups[3].clone());
    let t3 = std::thread::spawn(move || upload(pa, 3, 2, &u3));
    let t4 = std::thread::spawn(move || upload(pb, 4, 2, &u4));
    assert_eq!((t3.join().unwrap(), t4.join().unwrap()), (200, 200));
    acked.extend(ups.iter().map(|u| (2, u.clone())));
    // Whichever replica closed it, both serve the one stored round (a replica that did not
    // close it catches up on the next request that needs it).
    let t = Instant::now();
    let round2 = loop {
        if let Some((200, r)) = get(&format!("http://127.0.0.1:{pb}/v1/rounds/2")) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "round 2 did not close"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        get(&format!("http://127.0.0.1:{pa}/v1/rounds/2"))
            .unwrap()
            .1,
        round2
    );
    for c in &mut cs {
        c.apply_round(&round2).unwrap();
    }
    let h = cs[0].state_hash().unwrap();
    assert!(cs.iter().all(|c| c.state_hash().unwrap() == h));
    a.kill().unwrap();
    b.kill().unwrap();
    a.wait().unwrap();
    b.wait().unwrap();

    let store = Postgres::open(&url, &schema).unwrap();
    assert_eq!(store.last_round().unwrap(), 2);
    for (round, bytes) in &acked {
        assert!(
            store.uploads(*round).unwrap().contains(bytes),
            "lost an upload of round {round}"
        );
    }
    assert_eq!(store.round(2).unwrap().unwrap(), round2);
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
