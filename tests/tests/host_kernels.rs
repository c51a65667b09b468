//! The multi-threaded CPU path against the CPU reference, through the conformance suite's
//! cases: the quantised products it runs itself (threads over weight rows, uneven splits
//! with three threads), and every other op it passes to the reference.

use edgetune::backend::host::Host;
use edgetune::selftest;

#[test]
fn every_case_should_match_reference() {
    let host = Host::new(3);
    let cases = selftest::cases();
    let failures: Vec<String> = cases
        .iter()
        .map(|c| selftest::check(&host, c, false))
        .filter(|r| !r.pass)
        .map(|r| {
            format!(
                "{} {}: max_abs {} max_rel {} error {:?}",
                r.kernel, r.shape, r.max_abs, r.max_rel, r.error
            )
        })
        .collect();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    assert!(failures.is_empty(), "{failures:#?}");
}
