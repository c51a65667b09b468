//! Every kernel on the wgpu backend against the CPU reference, through the same cases the
//! `edgetune selftest` conformance suite runs. Named `<kernel>_should_match_reference`.

mod common;

use edgetune::selftest;

fn kernel_should_match_reference(kernel: &str) {
    let Some(gpu) = common::gpu() else { return };
    let cases: Vec<_> = selftest::cases()
        .into_iter()
        .filter(|c| c.kernel() == kernel)
        .collect();
    assert!(!cases.is_empty(), "no cases for {kernel}");
    let failures: Vec<String> = cases
        .iter()
        .map(|c| selftest::check(&gpu, c, false))
        .filter(|r| !r.pass)
        .map(|r| {
            format!(
                "{} {}: max_abs {} max_rel {} error {:?}",
                r.kernel, r.shape, r.max_abs, r.max_rel, r.error
            )
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

macro_rules! kernel_tests {
    ($($name:ident => $kernel:literal),* $(,)?) => {
        $(#[test] fn $name() { kernel_should_match_reference($kernel); })*
    };
}

kernel_tests! {
    matmul_should_match_reference => "matmul",
    dequant_should_match_reference => "dequant",
    embed_should_match_reference => "embed",
    qmatvec_should_match_reference => "qmatvec",
    qmatmul_should_match_reference => "qmatmul",
    qswiglu_should_match_reference => "qswiglu",
    norm_qmatvec_should_match_reference => "norm_qmatvec",
    norm_qkv_should_match_reference => "norm_qkv",
    norm_qkv_rope_should_match_reference => "norm_qkv_rope",
    rmsnorm_should_match_reference => "rmsnorm",
    add_rmsnorm_should_match_reference => "add_rmsnorm",
    rope_should_match_reference => "rope",
    rope_kv_should_match_reference => "rope_kv",
    softmax_should_match_reference => "softmax",
    add_should_match_reference => "add",
    scale_should_match_reference => "scale",
    copy_should_match_reference => "copy",
    add_bias_should_match_reference => "add_bias",
    swiglu_should_match_reference => "swiglu",
    attention_should_match_reference => "attention",
    philox_should_match_reference => "philox",
    perturb_z_should_match_reference => "perturb_z",
    zo_weights_should_match_reference => "zo_weights",
    zo_accumulate_should_match_reference => "zo_accumulate",
    mul_cols_should_match_reference => "mul_cols",
}

#[test]
fn suite_covers_every_kernel() {
    let mut kernels: Vec<&str> = selftest::cases().iter().map(|c| c.kernel()).collect();
    kernels.sort();
    kernels.dedup();
    assert_eq!(kernels.len(), 34, "{kernels:?}");
}

/// The shaders widen halves in integer arithmetic (no shader-f16, no flushing): every one of
/// the 65536 bit patterns must come out as the reference's bits (NaNs as NaN).
#[test]
fn every_half_dequantises_exactly() {
    use edgetune::backend::cpu::Cpu;
    use edgetune::{Backend, Op, WeightType};
    let Some(gpu) = common::gpu() else { return };
    let bytes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    fn widen<B: Backend>(be: &B, bytes: &[u8]) -> Vec<f32> {
        let n = 1u32 << 16;
        let w = be
            .upload_weights(WeightType::F16, bytes, n, "halves")
            .unwrap();
        let out = be.alloc(u64::from(n) * 4, "out").unwrap();
        be.run(&Op::Dequant {
            w: &w,
            factors: None,
            out: &out,
            wtype: WeightType::F16,
            rows: 1,
            cols: n,
        })
        .unwrap();
        be.read_f32(&out, n as usize).unwrap()
    }
    let (got, want) = (widen(&gpu, &bytes), widen(&Cpu, &bytes));
    let wrong: Vec<String> = got
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()))
        .take(5)
        .map(|(h, (g, w))| format!("{h:#06x}: {g:e} vs {w:e}"))
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
}

/// Products of many tokens dequantise their weights into one shared scratch buffer first;
/// two threads issuing them on one device must each get their own weights' result.
#[test]
fn concurrent_dequantising_products_keep_their_weights() {
    use edgetune::backend::cpu::Cpu;
    use edgetune::{Backend, Op, WeightType};
    let Some(gpu) = common::gpu() else { return };
    let (m, k, n) = (16u32, 64u32, 64u32);
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
    // Two different weight matrices, one per thread.
    let weights = |salt: u32| -> Vec<u8> {
        (0..n * k)
            .flat_map(|i| (((i * (salt + 3)) % 17) as f32 * 0.05 - 0.4).to_le_bytes())
            .collect()
    };
    fn product<B: Backend>(be: &B, x: &[f32], w: &[u8], (m, k, n): (u32, u32, u32)) -> Vec<f32> {
        let xb = be.upload_f32(x, "x").unwrap();
        let wb = be.upload_weights(WeightType::F32, w, k, "w").unwrap();
        let out = be.alloc(u64::from(m * n) * 4, "out").unwrap();
        be.run(&Op::QMatmul {
            x: &xb,
            w: &wb,
            factors: None,
            out: &out,
            wtype: WeightType::F32,
            m,
            k,
            n,
        })
        .unwrap();
        be.read_f32(&out, (m * n) as usize).unwrap()
    }
    let (w0, w1) = (weights(0), weights(1));
    let want = [
        product(&Cpu, &x, &w0, (m, k, n)),
        product(&Cpu, &x, &w1, (m, k, n)),
    ];
    std::thread::scope(|s| {
        for (w, want) in [(&w0, &want[0]), (&w1, &want[1])] {
            let (gpu, x) = (&gpu, &x);
            s.spawn(move || {
                for round in 0..20 {
                    let got = product(gpu, x, w, (m, k, n));
                    let worst = got
                        .iter()
                        .zip(want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    assert!(worst < 1e-3, "round {round}: max diff {worst}");
                }
            });
        }
    });
}
