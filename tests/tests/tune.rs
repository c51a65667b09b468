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
            (matches!(c.kernel(), "qmatvec" | "qmatmul") && format)
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
    assert_eq!(seen_attention.len(), 7, "not every attention shape ran");
    assert_eq!(seen_prefill.len(), 2, "not every prefill attention ran");
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
        "matvec=8x8g,matvec_wide=8x4g,attention_decode=8q,attention_prefill=sg8,prompt_matmul=sg8",
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
    // Every product and attention case the forced kernels would have run, on the
    // portable kernels instead, against the reference.
    let mut failures = Vec::new();
    for case in selftest::cases()
        .into_iter()
        .filter(|c| matches!(c.kernel(), "qmatvec" | "qmatmul") || c.kernel().contains("attention"))
    {
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
            .all(|c| !c.ends_with('g') && !c.ends_with("sg8")),
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
