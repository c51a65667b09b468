//! Kernel shapes chosen per device (backend::tune): every candidate shape gives the
//! reference's results on the conformance cases it affects, and the on-disk cache is used
//! when valid and ignored, with a notice, and rebuilt when it is not.

mod common;

use edgetune::backend::tune::{KernelShapes, Tuning};
use edgetune::backend::wgpu::{Gpu, GpuOptions};
use edgetune::selftest;

fn open(tuning: Tuning, dir: &std::path::Path) -> Gpu {
    Gpu::open(&GpuOptions {
        tuning,
        cache_dir: Some(dir.to_path_buf()),
        ..GpuOptions::default()
    })
    .unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("edgetune-tune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn every_candidate_shape_matches_the_reference() {
    if common::gpu().is_none() {
        return;
    }
    let dir = scratch("candidates");
    let cases: Vec<_> = selftest::cases()
        .into_iter()
        .filter(|c| {
            // Shapes change how rows and pairs are spread, not how a block decodes: scalar
            // f32 and the split-layout formats the subgroup products read keep it short.
            let format = ["f32 ", "q8_0 ", "q4_0 ", "q4_1 "]
                .iter()
                .any(|f| c.shape().starts_with(f));
            (matches!(
                c.kernel(),
                "qmatvec" | "qmatmul" | "qswiglu" | "norm_qmatvec" | "norm_qkv" | "norm_qkv_rope"
            ) && format)
                || c.kernel().contains("attention")
        })
        .collect();
    assert!(cases.len() >= 8, "only {} cases", cases.len());
    // Each matrix-vector shape once, the attention shapes in turn beside them.
    let mut seen_attention = std::collections::HashSet::new();
    let mut seen_prefill = std::collections::HashSet::new();
    let mut seen_prompt_matmul = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for c in KernelShapes::covering() {
        seen_attention.insert(c.attention_decode.spec());
        seen_prefill.insert(c.attention_prefill.spec());
        seen_prompt_matmul.insert(c.prompt_matmul.spec());
        let gpu = open(Tuning::Force(c), &dir);
        assert_eq!(gpu.tuning().unwrap().shapes, c);
        for case in &cases {
            let r = selftest::check(&gpu, case, false);
            if !r.pass {
                failures.push(format!(
                    "{}: {} {} {:?}",
                    c.spec(),
                    r.kernel,
                    r.shape,
                    r.error
                ));
            }
        }
    }
    // 11 candidates, the 4 subgroup ones also in one pass.
    assert_eq!(seen_attention.len(), 15, "not every attention shape ran");
    assert_eq!(seen_prefill.len(), 3, "not every prefill attention ran");
    assert_eq!(seen_prompt_matmul.len(), 3, "not every prompt product ran");
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(!dir.exists(), "forced shapes must not touch the cache");
}

#[test]
fn subgroup_kernels_forced_on_a_device_without_subgroups_fall_back_with_a_notice() {
    if common::gpu().is_none() {
        return;
    }
    let dir = scratch("no-subgroups");
    let forced = KernelShapes::parse(
        "matvec=8x8g,matvec_wide=8x4gt,attention_decode=32d,attention_prefill=sg8,prompt_matmul=sg8",
    )
    .unwrap();
    let gpu = Gpu::open(&GpuOptions {
        tuning: Tuning::Force(forced),
        cache_dir: Some(dir.clone()),
        without_subgroups: true,
        ..GpuOptions::default()
    })
    .unwrap();
    assert!(!gpu.report().subgroups);
    let notes = &gpu.tuning().unwrap().notes;
    let notice: Vec<_> = notes
        .iter()
        .filter(|n| n.contains("need subgroups of exactly 8"))
        .collect();
    assert_eq!(notice.len(), 1, "{notes:?}");
    assert!(
        notice[0].contains("attention_prefill, prompt_matmul") && notice[0].contains("matvec"),
        "{}",
        notice[0]
    );
    // The portable kernels make no textures, so nothing is said to be held twice.
    assert!(
        !notes.iter().any(|n| n.contains("a second time")),
        "{notes:?}"
    );
    // Every product and attention case the forced kernels would have run, on the
    // portable kernels instead, against the reference.
    let mut failures = Vec::new();
    for case in selftest::cases().into_iter().filter(|c| {
        matches!(
            c.kernel(),
            "qmatvec" | "qmatmul" | "qswiglu" | "norm_qmatvec" | "norm_qkv" | "norm_qkv_rope"
        ) || c.kernel().contains("attention")
    }) {
        let r = selftest::check(&gpu, &case, false);
        if !r.pass {
            failures.push(format!("{} {} {:?}", r.kernel, r.shape, r.error));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Measured without subgroups, no subgroup kernel is chosen.
    let measured = Gpu::open(&GpuOptions {
        tuning: Tuning::Measure,
        cache_dir: Some(dir.clone()),
        without_subgroups: true,
        ..GpuOptions::default()
    })
    .unwrap();
    let shapes = measured.tuning().unwrap().shapes;
    assert!(
        shapes
            .spec()
            .split(',')
            .filter_map(|c| c.split_once('='))
            .all(|(_, v)| !["g", "gt", "sg8", "sg8t", "d", "dt"]
                .iter()
                .any(|s| v.ends_with(s))),
        "{}",
        shapes.spec()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_cache_is_ignored_and_rebuilt() {
    if common::gpu().is_none() {
        return;
    }
    let dir = scratch("cache");
    let first = open(Tuning::Cached, &dir);
    let t = first.tuning().unwrap().clone();
    assert!(t.origin.starts_with("measured now"), "{}", t.origin);
    let file = std::fs::read_dir(dir.join("autotune"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a cache file");
    drop(first);
    let again = open(Tuning::Cached, &dir);
    let cached = again.tuning().unwrap();
    assert!(cached.origin.starts_with("cached in"), "{}", cached.origin);
    assert_eq!(cached.shapes, t.shapes);
    drop(again);

    let valid = std::fs::read_to_string(&file).unwrap();
    let foreign = valid.replace("edgetune ", "edgetune-older ");
    let outside = valid.replace(&t.shapes.spec(), "matvec=7x4");
    // A cache from before the subgroup choices existed: every other key, valid values.
    let spec = t.shapes.spec();
    let older = valid.replace(&spec, &spec[..spec.find(",attention_prefill").unwrap()]);
    for (what, body) in [
        ("a cache without the newer keys", older),
        ("not JSON", "{\"identity\": tru".to_string()),
        ("another identity", foreign),
        ("a shape outside the candidates", outside),
        ("a directory", String::new()),
    ] {
        if what == "a directory" {
            std::fs::remove_file(&file).unwrap();
            std::fs::create_dir(&file).unwrap();
        } else {
            std::fs::write(&file, body).unwrap();
        }
        let gpu = Gpu::open(&GpuOptions {
            tuning: Tuning::Cached,
            cache_dir: Some(dir.clone()),
            ..GpuOptions::default()
        })
        .unwrap();
        let t = gpu.tuning().unwrap();
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("ignored the kernel shape cache")),
            "{what}: {:?}",
            t.notes
        );
        if what == "a directory" {
            // It cannot be replaced by a file; the shapes are still measured and used.
            assert!(t.origin.starts_with("measured now"), "{what}: {}", t.origin);
            std::fs::remove_dir(&file).unwrap();
        } else {
            assert!(t.origin.contains("cached in"), "{what}: {}", t.origin);
            let rebuilt = std::fs::read_to_string(&file).unwrap();
            assert!(rebuilt.contains(&t.shapes.spec()), "{what}: {rebuilt}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The texture copies of the KV cache that `attention_decode=WGdt` reads follow every write
/// to the cache: decode steps appending rows (RopeKv, and NormQkvRope on the fused q/k/v
/// kernel), the cache overwritten with other values from position 0, a write by another
/// kernel (Copy) and a step of several tokens, each against the CPU reference running the
/// same ops.
#[test]
fn decode_attention_from_kv_textures_follows_every_cache_write() {
    use edgetune::WeightType;
    use edgetune::backend::cpu::Cpu;
    use edgetune::backend::{Backend, Op, RopeScaling, RopeStyle, rope_table};
    if common::gpu().is_none() {
        return;
    }
    let dir = scratch("kv-textures");
    let gpu = open(
        Tuning::Force(KernelShapes::parse("matvec=8x8g,attention_decode=32dt").unwrap()),
        &dir,
    );
    let notes = &gpu.tuning().unwrap().notes;
    if notes
        .iter()
        .any(|n| n.contains("need subgroups of exactly 8"))
    {
        return;
    }
    // 8 query heads over 2 kv heads of 64: cache rows of 512 bytes, which a texture takes.
    let (heads, kv, hd, capacity) = (8u32, 2u32, 64u32, 80u32);
    let table = rope_table(10000.0, hd, capacity, &RopeScaling::None);
    // Salts below 1000 apart give different values.
    let value = |i: u32, salt: u32| ((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0 - 1.0;
    let fill = |n: u32, salt: u32| (0..n).map(|i| value(i, salt)).collect::<Vec<f32>>();
    // The fused steps' q, k and v: products of a pending add and norm of `dim` elements
    // (Q8_0 weights, small so that the scores stay moderate).
    let dim = 64u32;
    let weight = |rows: u32, salt: u32| {
        let w: Vec<f32> = fill(rows * dim, salt).iter().map(|v| v / 16.0).collect();
        edgetune::quant::quantize(WeightType::Q8_0, &w).unwrap()
    };
    let weights = [
        weight(heads * hd, 1),
        weight(kv * hd, 2),
        weight(kv * hd, 3),
    ];
    struct Bufs<B: Backend> {
        table: B::Buffer,
        k_cache: B::Buffer,
        v_cache: B::Buffer,
        q_out: B::Buffer,
        out: B::Buffer,
        w: Vec<B::Buffer>,
        norm: B::Buffer,
        sum: B::Buffer,
        scratch: Vec<B::Buffer>,
    }
    fn bufs<B: Backend>(
        be: &B,
        table: &[f32],
        (cache, q): (u32, u32),
        weights: &[Vec<u8>],
        dim: u32,
    ) -> Bufs<B> {
        let alloc = |n: u32, what| be.alloc(u64::from(n) * 4, what).unwrap();
        Bufs {
            table: be.upload_f32(table, "table").unwrap(),
            k_cache: alloc(cache, "k cache"),
            v_cache: alloc(cache, "v cache"),
            q_out: alloc(q, "q out"),
            out: alloc(q, "out"),
            w: weights
                .iter()
                .map(|w| be.upload_weights(WeightType::Q8_0, w, dim, "w").unwrap())
                .collect(),
            norm: be.upload_f32(&vec![1.0; dim as usize], "norm").unwrap(),
            sum: alloc(dim, "sum"),
            scratch: (0..3).map(|_| alloc(q, "scratch")).collect(),
        }
    }
    let cache_len = capacity * kv * hd;
    let g = bufs(&gpu, &table, (cache_len, 3 * heads * hd), &weights, dim);
    let c = bufs(&Cpu, &table, (cache_len, 3 * heads * hd), &weights, dim);
    // A step of `n` tokens from `pos` on both backends, or `fused` one token through
    // NormQkvRope; the attention outputs compared.
    let step = |pos: u32, n: u32, salt: u32, fused: bool| -> f32 {
        let (q, k, v) = (
            fill(n * heads * hd, salt),
            fill(n * kv * hd, salt + 1),
            fill(n * kv * hd, salt + 2),
        );
        let mut outs = Vec::new();
        macro_rules! run {
            ($be:expr, $b:expr) => {{
                let (qb, kb, vb) = (
                    $be.upload_f32(&q, "q").unwrap(),
                    $be.upload_f32(&k, "k").unwrap(),
                    $be.upload_f32(&v, "v").unwrap(),
                );
                if fused {
                    let (a, h) = (
                        $be.upload_f32(&fill(dim, salt + 3), "a").unwrap(),
                        $be.upload_f32(&fill(dim, salt + 4), "h").unwrap(),
                    );
                    $be.run(&Op::NormQkvRope {
                        a: &a,
                        h: &h,
                        norm: &$b.norm,
                        sum: &$b.sum,
                        wq: &$b.w[0],
                        wk: &$b.w[1],
                        wv: &$b.w[2],
                        q: &$b.scratch[0],
                        k: &$b.scratch[1],
                        v: &$b.scratch[2],
                        table: &$b.table,
                        q_out: &$b.q_out,
                        k_cache: &$b.k_cache,
                        v_cache: &$b.v_cache,
                        q_factors: None,
                        k_factors: None,
                        v_factors: None,
                        wtype: WeightType::Q8_0,
                        dim,
                        n_q: heads * hd,
                        n_kv: kv * hd,
                        eps: 1e-5,
                        head_dim: hd,
                        pos,
                        style: RopeStyle::Interleaved,
                    })
                    .unwrap();
                } else {
                    $be.run(&Op::RopeKv {
                        q: &qb,
                        k: &kb,
                        v: &vb,
                        table: &$b.table,
                        q_out: &$b.q_out,
                        k_cache: &$b.k_cache,
                        v_cache: &$b.v_cache,
                        n_tokens: n,
                        n_heads: heads,
                        n_kv_heads: kv,
                        head_dim: hd,
                        pos0: pos,
                        style: RopeStyle::HalfSplit,
                    })
                    .unwrap();
                }
                $be.run(&Op::Attention {
                    q: &$b.q_out,
                    k: &$b.k_cache,
                    v: &$b.v_cache,
                    out: &$b.out,
                    n_tokens: n,
                    n_heads: heads,
                    n_kv_heads: kv,
                    head_dim: hd,
                    pos0: pos,
                    row0: 0,
                    scale: 0.125,
                })
                .unwrap();
                outs.push($be.read_f32(&$b.out, (n * heads * hd) as usize).unwrap());
            }};
        }
        run!(gpu, g);
        run!(Cpu, c);
        outs[0]
            .iter()
            .zip(&outs[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    };
    let mut worst = Vec::new();
    // Every other row through the fused kernel.
    for pos in 0..70 {
        worst.push((pos, step(pos, 1, pos, pos % 2 == 1)));
    }
    // The cache overwritten with other values from position 0: no row of the first pass
    // is read.
    for pos in 0..40 {
        worst.push((pos, step(pos, 1, 500 + pos, pos % 3 == 0)));
    }
    // Another kernel overwrites rows 0..10 of the keys on both backends.
    let src = fill(10 * kv * hd, 77);
    let gpu_src = gpu.upload_f32(&src, "src").unwrap();
    gpu.run(&Op::Copy {
        src: &gpu_src,
        dst: &g.k_cache,
        n: 10 * kv * hd,
        src_offset: 0,
        dst_offset: 0,
    })
    .unwrap();
    let cpu_src = Cpu.upload_f32(&src, "src").unwrap();
    Cpu.run(&Op::Copy {
        src: &cpu_src,
        dst: &c.k_cache,
        n: 10 * kv * hd,
        src_offset: 0,
        dst_offset: 0,
    })
    .unwrap();
    worst.push((40, step(40, 1, 333, false)));
    // Three tokens at once, each attending to the positions up to its own.
    worst.push((41, step(41, 3, 444, false)));
    let bad: Vec<_> = worst
        .iter()
        .filter(|(_, w)| w.is_nan() || *w >= 1e-4)
        .collect();
    assert!(bad.is_empty(), "(position, max |diff|): {bad:?}");
    assert!(!dir.exists(), "forced shapes must not touch the cache");
}
