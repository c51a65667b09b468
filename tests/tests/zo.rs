//! Zeroth-order training on a tiny model: replay gives the same state hash on every
//! backend, incremental and fused application agree in any order, a step never writes
//! the frozen weights, a short run lowers the loss, and bad histories apply nothing.

mod common;

use edgetune::Backend;
use edgetune::adapter::{AdapterConfig, Target};
use edgetune::backend::cpu::Cpu;
use edgetune::backend::host::Host;
use edgetune::model::Model;
use edgetune::model::files::ModelFiles;
use edgetune::rng::ZKind;
use edgetune::train::history::{self, Session, hex};
use edgetune::train::run::{Trainer, replay};
use edgetune::train::{Example, SeedMode, ZoConfig, ZoState};
use std::path::{Path, PathBuf};

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/llama_gqa_tied/q4_0.gguf")
}

/// A model with K-quant projections (Q4_K; Q6_K for v and down), o in Q8_0, and k in Q4_K
/// in layer 0 but Q8_0 in layer 1, from tools/reference/kquant_model.py.
fn kquant_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/llama_kquant/model.gguf")
}

/// The targets whose "scales" a model takes: every one, except k on the K-quant model,
/// whose layers mix block sizes (refused; tested below).
fn scale_targets(model: &Path) -> Vec<Target> {
    Target::ALL
        .into_iter()
        .filter(|&t| model != kquant_path() || t != Target::K)
        .collect()
}

fn files() -> ModelFiles {
    files_at(&model_path())
}

fn files_at(path: &Path) -> ModelFiles {
    ModelFiles::open(path, None).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgetune-zo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Sequences that follow a rule (step 3 modulo 60), so there is something to learn.
fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = std::iter::once(1)
                .chain((0..12).map(|k| ((i * 7 + 3 * k) % 60 + 2) as u32))
                .collect();
            let targets = (0..tokens.len()).map(|j| j >= 4).collect();
            Example { tokens, targets }
        })
        .collect()
}

fn zo(mode: SeedMode, lr: f32) -> ZoConfig {
    ZoConfig {
        session_key: 0xABCD_0123_4567_89EF,
        kind: ZKind::Binomial,
        mode,
        eps: 1e-2,
        lr,
        delta_exp: 20,
        decay_steps: 0,
    }
}

fn session(model: &Model<'_, impl Backend>, sha: &str, zo: ZoConfig) -> Session {
    Session {
        model_sha256: sha.into(),
        layout_sha256: hex(&edgetune::adapter::layout_hash(model.layout())),
        adapter: model.adapter().unwrap().clone(),
        init_seed: 5,
        zo,
        seed_weights: None,
        run: serde_json::Value::Null,
    }
}

/// Trains `steps` steps on the CPU reference into `dir`; returns the final state hash.
fn train_run(model: &Path, dir: &Path, cfg: AdapterConfig, zo: ZoConfig, steps: u64) -> String {
    let f = files_at(model);
    let sha = hex(&f.sha256());
    let mut model = f.load(&Cpu).unwrap();
    model.attach(cfg, 5).unwrap();
    let s = session(&model, &sha, zo);
    let mut t = Trainer::start(&model, s, 16).unwrap();
    let data = examples(8);
    for step in 0..steps as usize {
        t.step(&data[step % 8..step % 8 + 1]).unwrap();
    }
    t.save(dir).unwrap();
    hex(&t.state.hash(&Cpu).unwrap())
}

fn replay_hash<B: Backend>(be: &B, model: &Path, dir: &Path) -> String {
    let f = files_at(model);
    let sha = hex(&f.sha256());
    let session = history::read_session(dir).unwrap();
    let mut model = f.load(be).unwrap();
    model.attach(session.adapter.clone(), 0).unwrap();
    let (state, _, _) = replay(&model, dir, &sha).unwrap();
    hex(&state.hash(be).unwrap())
}

#[test]
fn replay_gives_the_same_state_hash_on_every_backend() {
    let dir = tmp("replay");
    // The K-quant model's scales: one factor per 256-element super-block of Q4_K (q) and
    // Q6_K (down), one per 32-element block of Q8_0 (o).
    for (model, cfg) in [
        (
            model_path(),
            AdapterConfig::lora(4, 8.0, &[Target::Q, Target::V, Target::Down]),
        ),
        (
            model_path(),
            AdapterConfig::scales(&[Target::K, Target::Down]),
        ),
        (
            kquant_path(),
            AdapterConfig::scales(&[Target::Q, Target::O, Target::Down]),
        ),
    ] {
        let trained = train_run(&model, &dir, cfg, zo(SeedMode::KSeed { k: 64 }, 1e-2), 12);
        assert_eq!(replay_hash(&Cpu, &model, &dir), trained);
        assert_eq!(replay_hash(&Host::new(2), &model, &dir), trained);
        if let Some(gpu) = common::gpu() {
            assert_eq!(replay_hash(&gpu, &model, &dir), trained);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn incremental_and_fused_application_agree_in_any_order() {
    let f = files();
    let mut model = f.load(&Cpu).unwrap();
    model.attach(AdapterConfig::ia3(), 0).unwrap();
    let cfg = zo(SeedMode::Mezo, 1e-3);
    let w0 = model.read_params().unwrap();
    let updates: Vec<(u32, i32)> = (0..40u32)
        .map(|s| (s * 977, (s as i32 - 20) * 1031))
        .collect();
    let state = |order: &[(u32, i32)], chunk: usize| {
        let mut st = ZoState::new(&Cpu, &model, &w0).unwrap();
        for c in order.chunks(chunk) {
            st.apply(&Cpu, &cfg, c).unwrap();
        }
        st.accumulators(&Cpu).unwrap()
    };
    let one_by_one = state(&updates, 1);
    let mut reversed = updates.clone();
    reversed.reverse();
    assert_eq!(one_by_one, state(&reversed, 40));
    let mut shuffled = updates.clone();
    shuffled.rotate_left(17);
    assert_eq!(one_by_one, state(&shuffled, 7));
    assert!(one_by_one.iter().flatten().any(|&d| d != 0));
    // The same on the GPU's fused kernel.
    if let Some(gpu) = common::gpu() {
        let mut m = f.load(&gpu).unwrap();
        m.attach(AdapterConfig::ia3(), 0).unwrap();
        let mut st = ZoState::new(&gpu, &m, &w0).unwrap();
        st.apply(&gpu, &cfg, &shuffled).unwrap();
        assert_eq!(one_by_one, st.accumulators(&gpu).unwrap());
    }
}

#[test]
fn the_accumulator_budget_refuses_what_could_overflow() {
    use edgetune::train::{COEFFICIENT_BUDGET, MAX_COEFFICIENT};
    let f = files();
    let mut model = f.load(&Cpu).unwrap();
    model.attach(AdapterConfig::norms(), 0).unwrap();
    let w0 = model.read_params().unwrap();
    let mut st = ZoState::new(&Cpu, &model, &w0).unwrap();
    let cfg = zo(SeedMode::Mezo, 1e-3);
    // 63 maximal coefficients fit (63 * 2^20 * 32 < 2^31); the 64th would not.
    let full = u64::from(MAX_COEFFICIENT.unsigned_abs());
    assert!(64 * full > COEFFICIENT_BUDGET && 63 * full <= COEFFICIENT_BUDGET);
    for s in 0..63 {
        st.apply(&Cpu, &cfg, &[(s, MAX_COEFFICIENT)]).unwrap();
    }
    assert_eq!(st.spent(), 63 * full);
    let before = st.accumulators(&Cpu).unwrap();
    assert!(st.apply(&Cpu, &cfg, &[(63, -MAX_COEFFICIENT)]).is_err());
    assert_eq!(st.spent(), 63 * full);
    assert_eq!(
        st.accumulators(&Cpu).unwrap(),
        before,
        "a refused update changed the state"
    );
}

#[test]
fn a_resumed_run_continues_as_an_uninterrupted_one() {
    let f = files();
    let sha = hex(&f.sha256());
    let data = examples(8);
    let lora = AdapterConfig::lora(2, 4.0, &[Target::Q, Target::Up]);
    let cfg = zo(SeedMode::KSeed { k: 32 }, 1e-2);
    let run = |t: &mut Trainer<'_, '_, Cpu>, until: u64| {
        while t.next_step < until {
            let batch: Vec<Example> =
                edgetune::train::data::batch_for_step(&data, 2, t.next_step, 3)
                    .into_iter()
                    .cloned()
                    .collect();
            t.step(&batch).unwrap();
        }
    };
    let mut whole = f.load(&Cpu).unwrap();
    whole.attach(lora.clone(), 5).unwrap();
    let mut t = Trainer::start(&whole, session(&whole, &sha, cfg), 16).unwrap();
    run(&mut t, 10);
    let (want_hash, want_records) = (t.state.hash(&Cpu).unwrap(), t.records.clone());

    let dir = tmp("resume");
    let mut first = f.load(&Cpu).unwrap();
    first.attach(lora.clone(), 5).unwrap();
    let mut t = Trainer::start(&first, session(&first, &sha, cfg), 16).unwrap();
    run(&mut t, 4);
    t.save(&dir).unwrap();
    let mut second = f.load(&Cpu).unwrap();
    second.attach(lora, 5).unwrap();
    let mut t = Trainer::resume(&second, &dir, &sha, 16).unwrap();
    assert_eq!(t.next_step, 4);
    run(&mut t, 10);
    assert_eq!(t.records, want_records);
    assert_eq!(t.state.hash(&Cpu).unwrap(), want_hash);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn check_step_leaves_frozen_weights<B: Backend>(be: &B, model: &Path, cfg: AdapterConfig) {
    let f = files_at(model);
    let mut model = f.load(be).unwrap();
    model.attach(cfg, 1).unwrap();
    let before: Vec<Vec<u8>> = model.frozen().iter().map(|b| be.read(b).unwrap()).collect();
    let sha = hex(&f.sha256());
    let s = session(&model, &sha, zo(SeedMode::Mezo, 1e-2));
    let mut t = Trainer::start(&model, s, 16).unwrap();
    let w0 = t.state.start(be).unwrap();
    let data = examples(2);
    for _ in 0..3 {
        t.step(&data).unwrap();
    }
    let after: Vec<Vec<u8>> = model.frozen().iter().map(|b| be.read(b).unwrap()).collect();
    assert_eq!(before, after, "a frozen buffer changed");
    assert_eq!(w0, t.state.start(be).unwrap(), "w0 changed");
    assert!(
        t.state
            .accumulators(be)
            .unwrap()
            .iter()
            .flatten()
            .any(|&d| d != 0)
    );
}

#[test]
fn a_step_never_writes_the_frozen_weights() {
    let gpu = common::gpu();
    for (model, cfg) in [
        (model_path(), AdapterConfig::lora(2, 4.0, &Target::ALL)),
        (model_path(), AdapterConfig::scales(&Target::ALL)),
        (
            kquant_path(),
            AdapterConfig::scales(&scale_targets(&kquant_path())),
        ),
    ] {
        check_step_leaves_frozen_weights(&Cpu, &model, cfg.clone());
        if let Some(gpu) = &gpu {
            check_step_leaves_frozen_weights(gpu, &model, cfg);
        }
    }
}

fn check_identity_adapters<B: Backend>(be: &B, model: &Path) {
    let f = files_at(model);
    let tokens = [1u32, 5, 9, 33, 2, 17];
    let plain = f.load(be).unwrap();
    let mut cache = plain.new_cache(8).unwrap();
    let want = plain.forward(&mut cache, &tokens, true).unwrap();
    // LoRA with B = 0 adds exact zeros; IA3 and block-scale factors scale by exactly one.
    for cfg in [
        AdapterConfig::lora(3, 6.0, &Target::ALL),
        AdapterConfig::ia3(),
        AdapterConfig::scales(&scale_targets(model)),
    ] {
        let mut m = f.load(be).unwrap();
        m.attach(cfg.clone(), 9).unwrap();
        let mut cache = m.new_cache(8).unwrap();
        let got = m.forward(&mut cache, &tokens, true).unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{cfg:?} on {}",
            be.name()
        );
    }
}

#[test]
fn identity_adapters_leave_the_logits_bit_for_bit() {
    let gpu = common::gpu();
    for model in [model_path(), kquant_path()] {
        check_identity_adapters(&Cpu, &model);
        check_identity_adapters(&Host::new(2), &model);
        if let Some(gpu) = &gpu {
            check_identity_adapters(gpu, &model);
        }
    }
}

#[test]
fn a_short_run_lowers_the_held_out_loss() {
    let f = files();
    let sha = hex(&f.sha256());
    for (cfg, lr) in [
        (AdapterConfig::norms(), 5e-2),
        (AdapterConfig::scales(&Target::ALL), 1.0),
    ] {
        let mut model = f.load(&Cpu).unwrap();
        model.attach(cfg.clone(), 0).unwrap();
        let s = session(&model, &sha, zo(SeedMode::Mezo, lr));
        let mut t = Trainer::start(&model, s, 16).unwrap();
        let data = examples(16);
        let (train, held_out) = data.split_at(12);
        let before = t.eval(held_out).unwrap();
        for step in 0..400 {
            let b = step % 3 * 4;
            t.step(&train[b..b + 4]).unwrap();
        }
        let after = t.eval(held_out).unwrap();
        assert!(
            after < before - 0.05,
            "{}: held-out loss {before} -> {after}",
            cfg.method_name()
        );
    }
}

#[test]
fn bad_histories_are_refused_and_apply_nothing() {
    let dir = tmp("bad");
    train_run(
        &model_path(),
        &dir,
        AdapterConfig::ia3(),
        zo(SeedMode::KSeed { k: 16 }, 1e-2),
        5,
    );
    let f = files();
    let sha = hex(&f.sha256());
    let session_text = std::fs::read_to_string(dir.join(history::SESSION)).unwrap();
    let history_text = std::fs::read_to_string(dir.join(history::HISTORY)).unwrap();
    let attempt = |expect: &str| {
        let mut model = f.load(&Cpu).unwrap();
        model.attach(AdapterConfig::ia3(), 0).unwrap();
        let err = replay(&model, &dir, &sha).unwrap_err().to_string();
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
    };
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write(history::HISTORY, &history_text[..history_text.len() - 5]);
    attempt("truncated");
    write(
        history::HISTORY,
        &history_text.replacen("\"g\":", "\"g\":1e30,\"x\":", 1),
    );
    attempt("not a finite scalar");
    write(
        history::HISTORY,
        &history_text.replacen("\"seed\":", "\"seed\":1000", 1),
    );
    attempt("not below K");
    write(history::HISTORY, &history_text);
    write(
        history::SESSION,
        &session_text.replace("\"version\": 1", "\"version\": 2"),
    );
    attempt("not a version this build reads");
    write(history::SESSION, &session_text);
    let mut model = f.load(&Cpu).unwrap();
    model.attach(AdapterConfig::ia3(), 0).unwrap();
    let err = replay(&model, &dir, "00").unwrap_err().to_string();
    assert!(err.contains("another model"), "{err}");
    let mut model = f.load(&Cpu).unwrap();
    model
        .attach(AdapterConfig::lora(2, 2.0, &[Target::Q]), 0)
        .unwrap();
    let err = replay(&model, &dir, &sha).unwrap_err().to_string();
    assert!(err.contains("trainable layout"), "{err}");
    // Intact again, it replays.
    assert_eq!(replay_hash(&Cpu, &model_path(), &dir).len(), 64);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_masked_loss_matches_the_full_forward() {
    let f = files();
    let model = f.load(&Cpu).unwrap();
    let tokens = [1u32, 5, 9, 33, 2, 17, 40];
    let vocab = model.cfg.vocab as usize;
    let mut cache = model.new_cache(8).unwrap();
    let all = model.forward(&mut cache, &tokens, true).unwrap();
    cache.clear();
    let last = model.forward(&mut cache, &tokens, false).unwrap();
    assert_eq!(last[..], all[6 * vocab..]);
    // The masked loss over targets 3, 5, 6 from the full logits.
    let targets = [false, false, false, true, false, true, true];
    let want: f64 = [3usize, 5, 6]
        .iter()
        .map(|&i| {
            let row = &all[(i - 1) * vocab..i * vocab];
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            lse - row[tokens[i] as usize] as f64
        })
        .sum();
    let (got, n) = model
        .masked_nll(&mut cache, &tokens, Some(&targets))
        .unwrap();
    assert_eq!(n, 3);
    assert!(
        (got - want).abs() < 1e-9 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}

/// Sequences of different lengths and targets packed into one forward pass (as training
/// runs a batch) give each its own loss: positions restart at every sequence and attention
/// stays inside it. With a LoRA of non-zero values attached, on every backend; a cache too
/// small for the whole batch takes several passes with the same result.
fn check_packing<B: Backend>(be: &B) {
    let f = files();
    let mut model = f.load(be).unwrap();
    model
        .attach(
            AdapterConfig::lora(4, 8.0, &[Target::Q, Target::V, Target::Down]),
            3,
        )
        .unwrap();
    let values: Vec<Vec<f32>> = model
        .read_params()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(t, v)| {
            (0..v.len())
                .map(|i| ((i * 37 + t * 11) % 23) as f32 / 23.0 - 0.5)
                .collect()
        })
        .collect();
    model.write_params(&values).unwrap();
    let mut batch = examples(4);
    batch[1].tokens.truncate(7);
    batch[1].targets.truncate(7);
    batch[2].tokens.truncate(2);
    batch[2].targets = vec![false, true];
    let mut cache = model.new_cache(13).unwrap();
    let alone: Vec<(f64, usize)> = batch
        .iter()
        .map(|ex| {
            model
                .masked_nll(&mut cache, &ex.tokens, Some(&ex.targets))
                .unwrap()
        })
        .collect();
    let want: f64 = alone.iter().map(|a| a.0).sum();
    let count: usize = alone.iter().map(|a| a.1).sum();
    let total: usize = batch.iter().map(|ex| ex.tokens.len()).sum();
    for capacity in [total as u32, 20] {
        let mut cache = model.new_cache(capacity).unwrap();
        let (got, n) = edgetune::train::batch_nll(&model, &mut cache, &batch).unwrap();
        assert_eq!(n, count);
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{}: capacity {capacity}: packed {got} against {want} one by one",
            be.name()
        );
    }
    // More tokens than the cache holds in one pass, and a one-token sequence, are refused.
    let seqs: Vec<(&[u32], Option<&[bool]>)> =
        batch.iter().map(|ex| (&ex.tokens[..], None)).collect();
    assert!(model.packed_nll(&mut cache, &seqs).is_err());
    assert!(model.packed_nll(&mut cache, &[(&[1], None)]).is_err());
}

#[test]
fn a_packed_batch_gives_each_sequence_its_own_loss() {
    check_packing(&Cpu);
    check_packing(&Host::new(3));
    if let Some(gpu) = common::gpu() {
        check_packing(&gpu);
    }
}

/// Full training of an unquantised model: every weight in f32, identical logits before any
/// step, a replay that gives the same hash on the GPU, and a quantised model refused.
#[test]
fn full_training_holds_every_weight_and_refuses_a_quantised_model() {
    let f32_model = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/qwen2_gqa_bias");
    let f = ModelFiles::open(&f32_model, None).unwrap();
    let tokens = [1u32, 5, 9, 33, 2, 17];
    let plain = f.load(&Cpu).unwrap();
    let mut cache = plain.new_cache(8).unwrap();
    let want = plain.forward(&mut cache, &tokens, true).unwrap();
    let mut model = f.load(&Cpu).unwrap();
    let layout = model.attach(AdapterConfig::full(), 0).unwrap().to_vec();
    // Embedding, 2 layers of 2 norms + 7 matrices + 3 biases, final norm, head.
    assert_eq!(layout.len(), 1 + 2 * 12 + 1 + 1);
    assert!(model.frozen().is_empty());
    let mut cache = model.new_cache(8).unwrap();
    assert_eq!(model.forward(&mut cache, &tokens, true).unwrap(), want);

    let dir = tmp("full");
    let sha = hex(&f.sha256());
    let mut t =
        Trainer::start(&model, session(&model, &sha, zo(SeedMode::Mezo, 1e-3)), 16).unwrap();
    let data = examples(4);
    for _ in 0..3 {
        t.step(&data).unwrap();
    }
    t.save(&dir).unwrap();
    let trained = hex(&t.state.hash(&Cpu).unwrap());
    if let Some(gpu) = common::gpu() {
        let mut m = f.load(&gpu).unwrap();
        m.attach(AdapterConfig::full(), 0).unwrap();
        let (state, _, _) = replay(&m, &dir, &sha).unwrap();
        assert_eq!(hex(&state.hash(&gpu).unwrap()), trained);
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let mut quantised = files().load(&Cpu).unwrap();
    let err = quantised
        .attach(AdapterConfig::full(), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unquantised"), "{err}");
    assert!(quantised.adapter().is_none());
}

/// Full training on a GGUF Llama (q/k rows permuted in the model): the saved weights, read
/// back as an adapter onto a fresh model, give the trained model's logits, on the CPU and
/// the GPU.
#[test]
fn a_full_run_saves_weights_that_reload_to_the_same_logits() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/llama_gqa_tied/f32.gguf");
    let f = ModelFiles::open(&path, None).unwrap();
    let sha = hex(&f.sha256());
    let tokens = [1u32, 5, 9, 33, 2, 17];
    let dir = tmp("full-reload");
    let mut model = f.load(&Cpu).unwrap();
    model.attach(AdapterConfig::full(), 0).unwrap();
    let mut t =
        Trainer::start(&model, session(&model, &sha, zo(SeedMode::Mezo, 1e-2)), 16).unwrap();
    for _ in 0..3 {
        t.step(&examples(2)).unwrap();
    }
    t.save(&dir).unwrap();
    let mut cache = model.new_cache(8).unwrap();
    let want = model.forward(&mut cache, &tokens, true).unwrap();
    fn reloaded<B: Backend>(be: &B, f: &ModelFiles, dir: &Path, tokens: &[u32]) -> Vec<f32> {
        let mut m = f.load(be).unwrap();
        edgetune::adapter::peft::attach_dir(&mut m, dir).unwrap();
        let mut cache = m.new_cache(8).unwrap();
        m.forward(&mut cache, tokens, true).unwrap()
    }
    assert_eq!(reloaded(&Cpu, &f, &dir, &tokens), want);
    let plain = f.load(&Cpu).unwrap();
    let mut cache = plain.new_cache(8).unwrap();
    assert_ne!(
        plain.forward(&mut cache, &tokens, true).unwrap(),
        want,
        "training changed nothing"
    );
    if let Some(gpu) = common::gpu() {
        let got = reloaded(&gpu, &f, &dir, &tokens);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "GPU forward of the reloaded weights: {worst}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The "scales" adapter merged into the GGUF it was trained on: with factors that are
/// powers of two, d * factor is exact in f16, so the merged model's logits must equal the
/// adapter's bit for bit (q/k rows permuted in these Llama GGUFs; the adapter goes through
/// its files, which hold them in Hugging Face's order), on the Q4_0 model and on the K-quant
/// one (whose super-block scales d take the factors). An unquantised model is refused.
#[test]
fn trained_scales_merge_into_a_gguf_with_the_same_logits() {
    use edgetune::adapter::peft::{self, RowOrder};
    let tokens = [1u32, 5, 9, 33, 2, 17];
    for path in [model_path(), kquant_path()] {
        let cfg = AdapterConfig::scales(&scale_targets(&path));
        let f = files_at(&path);
        let mut model = f.load(&Cpu).unwrap();
        let layout = model.attach(cfg.clone(), 0).unwrap().to_vec();
        let values: Vec<Vec<f32>> = layout
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (0..p.len() as usize)
                    .map(|e| [1.0, 2.0, 0.5, 0.25][(e * 7 + i) % 4])
                    .collect()
            })
            .collect();
        model.write_params(&values).unwrap();
        let mut cache = model.new_cache(8).unwrap();
        let want = model.forward(&mut cache, &tokens, true).unwrap();

        let dir = tmp("scales-merge");
        peft::save(&dir, &cfg, &layout, &values, RowOrder::of(&model.cfg)).unwrap();
        let dims = model.dims();
        let (read_cfg, read) = peft::load(
            &dir,
            |c| edgetune::adapter::layout(c, &dims),
            RowOrder::of(&model.cfg),
        )
        .unwrap();
        assert_eq!(read_cfg, cfg);
        let ModelFiles::Gguf(gguf) = &f else {
            panic!("the tiny models are GGUF")
        };
        let merged = dir.join("merged.gguf");
        edgetune::adapter::gguf::save_merged_model(&merged, gguf, &layout, &read).unwrap();
        assert_eq!(
            std::fs::metadata(&merged).unwrap().len(),
            std::fs::metadata(&path).unwrap().len()
        );
        let m = ModelFiles::open(&merged, None).unwrap().load(&Cpu).unwrap();
        let mut cache = m.new_cache(8).unwrap();
        let got = m.forward(&mut cache, &tokens, true).unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let plain = f.load(&Cpu).unwrap();
        let mut cache = plain.new_cache(8).unwrap();
        assert_ne!(plain.forward(&mut cache, &tokens, true).unwrap(), want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    let f32_model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/llama_gqa_tied/f32.gguf");
    let mut unquantised = ModelFiles::open(&f32_model, None)
        .unwrap()
        .load(&Cpu)
        .unwrap();
    let cfg = AdapterConfig::scales(&Target::ALL);
    let err = unquantised.attach(cfg.clone(), 0).unwrap_err().to_string();
    assert!(err.contains("q8_0, q4_0, q4_1, q4_k and q6_k"), "{err}");
    assert!(unquantised.adapter().is_none());
    // k's blocks are 256 elements in layer 0 and 32 in layer 1: one layout cannot hold both.
    let mut mixed = files_at(&kquant_path()).load(&Cpu).unwrap();
    let err = mixed.attach(cfg, 0).unwrap_err().to_string();
    assert!(err.contains("layer 1's k_proj is q8_0"), "{err}");
    assert!(mixed.adapter().is_none());
}

/// IA3 merged into the GGUF it was trained on: k and v scales go into each row's block
/// scales, down's input scales into up's rows (down's input is silu(gate x) * up x). With
/// power-of-two scales every merged value is exact, so the logits are bit-exact (Q4_0 and
/// the K-quant model); with any scales, equal to the f16 rounding of the block scales
/// (Q4_0) or to rounding (the f32 model, whose rows are rewritten).
#[test]
fn ia3_merges_into_a_gguf() {
    use edgetune::adapter::peft::{self, RowOrder};
    let tokens = [1u32, 5, 9, 33, 2, 17];
    let logits = |m: &Model<'_, Cpu>| {
        let mut cache = m.new_cache(8).unwrap();
        m.forward(&mut cache, &tokens, true).unwrap()
    };
    let dir = tmp("ia3-merge");
    let f32_model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/llama_gqa_tied/f32.gguf");
    let all = || vec![Target::K, Target::V, Target::Down];
    let qwen2_q4_0 =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/qwen2_gqa_bias/q4_0.gguf");
    // (model, targets, power-of-two scales, tolerance relative to the adapter's effect)
    for (path, targets, exact, within) in [
        (model_path(), vec![Target::K, Target::V], true, 0.0),
        // Qwen2's k and v biases are scaled with their rows.
        (qwen2_q4_0, vec![Target::K, Target::V], true, 0.0),
        (model_path(), all(), true, 0.0),
        (kquant_path(), all(), true, 0.0),
        (f32_model, all(), false, 1e-4),
        (model_path(), all(), false, 1e-2),
    ] {
        let f = ModelFiles::open(&path, None).unwrap();
        let ModelFiles::Gguf(gguf) = &f else {
            panic!("the tiny models are GGUF")
        };
        let base = logits(&f.load(&Cpu).unwrap());
        let cfg = AdapterConfig {
            method: edgetune::adapter::Method::Ia3,
            targets,
        };
        let mut model = f.load(&Cpu).unwrap();
        let layout = model.attach(cfg.clone(), 0).unwrap().to_vec();
        let values: Vec<Vec<f32>> = layout
            .iter()
            .map(|p| {
                (0..p.len() as usize)
                    .map(|e| {
                        if exact {
                            [2.0, 0.5, 1.0, 0.25][e % 4]
                        } else {
                            1.0 + 0.3 * ((e * 37 % 19) as f32 / 19.0 - 0.5)
                        }
                    })
                    .collect()
            })
            .collect();
        model.write_params(&values).unwrap();
        let want = logits(&model);
        peft::save(&dir, &cfg, &layout, &values, RowOrder::of(&model.cfg)).unwrap();
        let dims = model.dims();
        let (_, read) = peft::load(
            &dir,
            |c| edgetune::adapter::layout(c, &dims),
            RowOrder::of(&model.cfg),
        )
        .unwrap();
        let merged = dir.join("merged.gguf");
        edgetune::adapter::gguf::save_merged_model(&merged, gguf, &layout, &read).unwrap();
        let got = logits(&ModelFiles::open(&merged, None).unwrap().load(&Cpu).unwrap());
        let effect = want
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(effect > 0.01, "the adapter changed nothing");
        if exact {
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: {diff}",
                path.display()
            );
        } else {
            assert!(
                diff < within * effect.max(1.0),
                "merged vs adapter {diff}, adapter effect {effect}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
