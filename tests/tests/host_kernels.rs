//! The multi-threaded CPU path against the CPU reference, through the conformance suite's
//! cases: the quantised products and the zeroth-order kernels it runs itself (threads over
//! weight rows or elements, uneven splits with three threads), in every instruction-set
//! variant this processor runs, and every other op it passes to the reference.

use edgetune::backend::host::{Host, Isa};
use edgetune::selftest;

#[test]
fn every_case_should_match_reference_in_every_variant() {
    let cases = selftest::cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut ran = 0;
    let mut failures = Vec::new();
    for isa in Isa::ALL {
        let Some(host) = Host::with_isa(3, isa) else {
            eprintln!("{}: not available on this processor", isa.name());
            continue;
        };
        ran += 1;
        failures.extend(
            cases
                .iter()
                .map(|c| selftest::check(&host, c, false))
                .filter(|r| !r.pass)
                .map(|r| {
                    format!(
                        "{} {} {}: max_abs {} max_rel {} error {:?}",
                        isa.name(),
                        r.kernel,
                        r.shape,
                        r.max_abs,
                        r.max_rel,
                        r.error
                    )
                }),
        );
    }
    assert!(ran >= 1, "not even the baseline variant ran");
    assert!(failures.is_empty(), "{failures:#?}");
}
