//! A test that fails on purpose, ignored so the crate's own runs skip it: the host's
//! `component_unit_tests` runs it (`-- --ignored`) to prove that `switchyard test`, the runner
//! of these crates' Wasm tests, reports a failing test as a failure and does not pass it.

#[test]
#[ignore = "fails on purpose: host/tests/component_unit_tests.rs runs it to see the runner fail"]
fn fails_on_purpose() {
    let answer = 6 * 7;
    assert_eq!(answer, 41, "this test fails on purpose");
}
