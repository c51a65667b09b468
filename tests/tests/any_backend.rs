//! The runtime's one backend type for skins: every conformance case through `AnyBackend`
//! (each backend it can hold) matches the reference, and a buffer made by another
//! backend is refused with an error naming it, not used.

mod common;

use edgetune::backend::any::{AnyBackend, BackendKind, BackendOptions};
use edgetune::{Backend, Error, Op, selftest};

fn open(kind: BackendKind) -> AnyBackend {
    AnyBackend::open(&BackendOptions {
        kind,
        threads: Some(3),
        gpu: edgetune::backend::wgpu::GpuOptions {
            cache_dir: Some(common::tune_cache()),
            ..Default::default()
        },
        ..BackendOptions::default()
    })
    .unwrap()
    .0
}

#[test]
fn every_case_matches_the_reference_through_any_backend() {
    let mut kinds = vec![BackendKind::Cpu, BackendKind::Host];
    if common::gpu().is_some() {
        kinds.push(BackendKind::Gpu);
    }
    let cases = selftest::cases();
    for kind in kinds {
        let be = open(kind);
        let failures: Vec<String> = cases
            .iter()
            .map(|c| selftest::check(&be, c, false))
            .filter(|r| !r.pass)
            .map(|r| format!("{kind:?} {} {}: {:?}", r.kernel, r.shape, r.error))
            .collect();
        assert!(failures.is_empty(), "{failures:#?}");
    }
}

#[test]
fn a_buffer_of_another_backend_is_refused() {
    if common::gpu().is_none() {
        return;
    }
    let (cpu, gpu) = (open(BackendKind::Host), open(BackendKind::Gpu));
    let x = cpu.upload_f32(&[1.0; 4], "x").unwrap();
    let out = gpu.alloc(16, "out").unwrap();
    let err = gpu
        .run(&Op::Scale {
            x: &x,
            out: &out,
            n: 4,
            alpha: 2.0,
        })
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { reason, .. } if reason.contains("another backend")),
        "{err}"
    );
    assert!(cpu.read(&out).is_err());
}
