//! Bad input and device failures on the wgpu backend become typed errors, never panics.

mod common;

use edgetune::backend::wgpu::{Gpu, GpuOptions};
use edgetune::{Backend, Error, Op};

#[test]
fn unknown_adapter_name_is_a_typed_error() {
    let err = Gpu::open(&GpuOptions {
        adapter_name: Some("no-such-adapter-4711".into()),
        backends: None,
        ..GpuOptions::default()
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::NoMatchingAdapter { ref wanted, .. } if wanted == "no-such-adapter-4711"),
        "{err}"
    );
}

#[test]
fn unknown_backend_list_is_a_typed_error() {
    let err = Gpu::open(&GpuOptions {
        adapter_name: None,
        backends: Some("nonsense".into()),
        ..GpuOptions::default()
    })
    .unwrap_err();
    assert!(matches!(err, Error::NoAdapter { .. }), "{err}");
}

#[test]
fn shape_mismatch_names_the_buffer() {
    let Some(gpu) = common::gpu() else { return };
    let x = gpu.upload_f32(&[1.0; 16], "x").unwrap();
    let out = gpu.alloc(8, "out").unwrap();
    let err = gpu
        .run(&Op::RmsNorm {
            x: &x,
            weight: &x,
            out: &out,
            rows: 4,
            dim: 4,
            eps: 1e-5,
        })
        .unwrap_err();
    assert_eq!(
        err,
        Error::BufferTooSmall {
            op: "rmsnorm",
            buffer: "out",
            needed: 64,
            actual: 8
        }
    );
}

#[test]
fn fused_ops_name_what_is_wrong() {
    let Some(gpu) = common::gpu() else { return };
    let buf = |n: usize| gpu.upload_f32(&vec![0.5; n], "buf").unwrap();
    let (big, small) = (buf(4096), buf(8));
    let err = gpu
        .run(&Op::AddRmsNorm {
            a: &big,
            h: &big,
            sum: &small,
            weight: &big,
            rows: 4,
            dim: 4,
            eps: 1e-5,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferTooSmall {
                op: "add_rmsnorm",
                buffer: "sum",
                ..
            }
        ),
        "{err}"
    );
    let rope_kv = |head_dim: u32, pos0: u32, small_cache: bool| Op::RopeKv {
        q: &big,
        k: &big,
        v: &big,
        table: &big,
        q_out: &big,
        k_cache: if small_cache { &small } else { &big },
        v_cache: &big,
        n_tokens: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim,
        pos0,
        style: edgetune::backend::RopeStyle::Interleaved,
    };
    let err = gpu.run(&rope_kv(7, 0, false)).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidShape { op: "rope_kv", reason } if reason.contains("even")),
        "{err}"
    );
    // The cache must hold the step's rows at pos0.
    let err = gpu.run(&rope_kv(8, 1, true)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferTooSmall {
                op: "rope_kv",
                buffer: "k_cache",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn weights_that_are_not_whole_rows_are_refused() {
    use edgetune::WeightType;
    let Some(gpu) = common::gpu() else { return };
    // Three Q8_0 blocks (96 elements): not whole rows of 64, and no rows at all of 0.
    let bytes = vec![0u8; 3 * WeightType::Q8_0.block_bytes()];
    for cols in [64, 0, 40] {
        let err = gpu
            .upload_weights(WeightType::Q8_0, &bytes, cols, "w")
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidShape { op: "upload_weights", reason } if reason.contains("whole rows")),
            "cols {cols}: {err}"
        );
    }
    // Whole rows go up.
    assert!(
        gpu.upload_weights(WeightType::Q8_0, &bytes, 96, "w")
            .is_ok()
    );
}

#[test]
fn buffers_over_the_device_limits_are_rejected() {
    let Some(gpu) = common::gpu() else { return };
    let limit = gpu.report().max_buffer_size;
    assert!(matches!(
        gpu.alloc(limit + 4, "huge"),
        Err(Error::BufferTooLarge { what: "huge", .. })
    ));
    // A buffer the device can hold but not bind as one storage buffer.
    let binding = gpu.report().max_storage_binding;
    if binding + 4 <= limit {
        let big = gpu.alloc(binding + 4, "big").unwrap();
        let out = gpu.alloc(16, "out").unwrap();
        let err = gpu
            .run(&Op::Scale {
                x: &big,
                out: &out,
                n: 4,
                alpha: 1.0,
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::BufferTooLarge {
                    what: "storage binding",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn lost_device_is_a_typed_error() {
    let Some(gpu) = common::gpu() else { return };
    let x = gpu.upload_f32(&[1.0; 4], "x").unwrap();
    gpu.destroy();
    assert!(matches!(
        gpu.alloc(16, "after"),
        Err(Error::DeviceLost { .. })
    ));
    assert!(matches!(gpu.read(&x), Err(Error::DeviceLost { .. })));
    assert!(matches!(gpu.sync(), Err(Error::DeviceLost { .. })));
}

#[test]
fn real_gpu_only_refuses_a_cpu_emulated_adapter_before_making_a_device() {
    let Some(gpu) = common::gpu() else { return };
    let emulated = gpu.report().device_type == "Cpu";
    drop(gpu);
    let only_real = Gpu::open(&GpuOptions {
        real_gpu_only: true,
        cache_dir: Some(common::tune_cache()),
        ..GpuOptions::default()
    });
    match only_real {
        Err(Error::NoAdapter { reason }) if emulated => {
            assert!(reason.contains("emulates a GPU on the CPU"), "{reason}");
        }
        Ok(_) if !emulated => {}
        other => panic!("emulated adapter: {emulated}; got {:?}", other.err()),
    }
}
