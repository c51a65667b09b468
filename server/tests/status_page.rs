//! The status page in a real browser: headless Chromium loads `/` from a server with two
//! closed rounds, runs its script, and the DOM it dumps shows the rounds' table rows and
//! the plotted series. Skips without Chromium (Debian's `chromium`), except under CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use edgetune::adapter::{AdapterConfig, Target};
use edgetune::fed::aggregate::Policy;
use edgetune_proto::{Encoding, Scalars, SeedMode, Session, Upload};
use edgetune_server::store::{Sqlite, Store};
use edgetune_server::{Config, SessionParams, auth, start};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("no Chromium (.ci/run installs Debian's chromium)");
        }
        eprintln!("skipped: no Chromium");
    }
    found
}

#[test]
fn the_status_page_renders_rounds_in_a_browser() {
    let Some(browser) = chromium() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("edgetune-page-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(Sqlite::open(&dir.join("server.db")).unwrap());
    store.set_client(1, &[7; 32]).unwrap();
    let cfg = Config {
        model: Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/tiny/llama_gqa_tied/q4_0.gguf"),
        params: SessionParams {
            adapter: AdapterConfig::lora(2, 4.0, &[Target::Q, Target::V]),
            session_key: 3,
            seed_mode: SeedMode::KSeed,
            encoding: Encoding::F32,
            k: 64,
            tau: 4,
            delta_exp: 16,
            eps: 1e-2,
            lr: 1e-2,
            clip: 10.0,
        },
        policy: Policy::default(),
        quorum: 1,
        deadline: Duration::from_secs(3600),
        max_body: 1 << 16,
        eval: Vec::new(),
        threads: 1,
        tls: None,
    };
    let server = start(&cfg, store, "127.0.0.1:0".parse().unwrap()).unwrap();
    let session = Session::decode(&server.session).unwrap();
    for round in 1..=2u32 {
        let body = Upload {
            session_tag: session.tag(),
            round,
            client_id: 1,
            samples: 4,
            loss_sum: 10.5 - round as f32,
            steps: 4,
            // The client's own draws for steps 0 and 1 (the server checks them).
            scalars: Scalars::Pairs(vec![
                (edgetune::fed::seed_for(&session, round, 0, 1, None), 1.5),
                (edgetune::fed::seed_for(&session, round, 1, 1, None), -2.0),
            ]),
        }
        .encode(&session);
        let r = ureq::post(&format!("http://{}/v1/upload", server.addr))
            .set(auth::CLIENT, "1")
            .set(auth::NONCE, &round.to_string())
            .set(
                auth::SIGNATURE,
                &auth::sign(&[7; 32], u64::from(round), &body),
            )
            .send_bytes(&body)
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("http://{}/", server.addr))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The summary, two table rows with the uploads' training loss, and plotted series.
    assert!(dom.contains("open round <b>3</b>"), "{dom}");
    assert!(
        dom.contains("<td>2.3750</td>") && dom.contains("<td>2.1250</td>"),
        "{dom}"
    );
    assert!(dom.matches("class=\"series\"").count() >= 3, "{dom}");
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
