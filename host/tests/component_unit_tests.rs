//! Proves that each component crate's own `cargo test --target wasm32-wasip2` passes, run the
//! way its author runs it: in the crate's directory, through the runner its
//! `.cargo/config.toml` names (`switchyard test`), with the `switchyard` just built first on
//! the PATH. The tests run inside Wasm in the host's test mode: the consumer's and the
//! classifier's drive their handlers with `switchyard-test` and check what they sent, the
//! producer's checks the requests it sends, the classifier's golden tests check tract's
//! numbers inside Wasm. The tests that must be there are named, so a crate whose tests
//! silently stopped running fails here.
//!
//! `cargo component test` runs the consumer's the same way, when cargo-component is installed
//! (CI installs it). And a test that fails inside Wasm fails the run: `switchyard test` does
//! not pass what failed.
//!
//! They build with the `component` profile (optimized, as the components themselves) into the
//! test-only target directory, which the other tests' builds share.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use switchyard_testing::process::output_within;

/// The longest one cargo run here may take: a cold build of a component's dependencies is
/// minutes on a loaded 2-core machine; a run that hangs is a regression to fail on.
const CARGO_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Runs `cargo test --profile component --target wasm32-wasip2` in `crate_dir` and returns
/// its standard output, failing with both streams when it fails.
fn cargo_test_in(crate_dir: &str) -> String {
    let workspace = switchyard_pipeline::demo::workspace_root();
    switchyard_pipeline::build::ensure_wasm_target(&workspace).expect("the wasm32-wasip2 target");
    cargo_in(
        crate_dir,
        &[
            "test",
            "--profile",
            "component",
            "--target",
            "wasm32-wasip2",
        ],
    )
}

/// Runs cargo with `args` in `crate_dir`, the `switchyard` just built first on the PATH, and
/// returns what it did.
fn run_cargo_in(crate_dir: &str, args: &[&str]) -> Output {
    let workspace = switchyard_pipeline::demo::workspace_root();
    output_within(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace.join(crate_dir))
            .env("PATH", support::path_with_switchyard())
            .env("CARGO_TARGET_DIR", support::test_target_dir())
            .args(args),
        CARGO_LIMIT,
    )
}

/// [`run_cargo_in`], returning its standard output, failing with both streams when it fails.
fn cargo_in(crate_dir: &str, args: &[&str]) -> String {
    let output = run_cargo_in(crate_dir, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "cargo {args:?} in {crate_dir} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// Asserts that each named test ran and was not ignored. It passed: a failing test ends its
/// binary and fails the run, which [`cargo_test_in`] checks. (Its line may go on with the
/// test's own output, which the runner does not capture, before `ok`.)
fn ran(stdout: &str, tests: &[&str]) {
    for test in tests {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&format!("test {test} ... ")))
            .unwrap_or_else(|| panic!("test {test} did not run:\n{stdout}"));
        assert!(!line.contains("ignored"), "{line}");
    }
}

#[test]
fn consumer_tests_drive_its_handler_inside_wasm() {
    let stdout = cargo_test_in("components/consumer");
    ran(
        &stdout,
        &[
            "component::tests::tallies_each_request_once_and_reports_it",
            "component::tests::answers_what_is_not_a_prediction_with_an_error_alone",
            "tests::describes_a_prediction",
        ],
    );
}

#[test]
fn producer_tests_check_what_it_sends_inside_wasm() {
    let stdout = cargo_test_in("components/producer");
    ran(
        &stdout,
        &[
            "tests::sends_one_labelled_gray8_request_per_image_and_cycles",
            "tests::loads_images_and_checks_they_fit_the_model",
        ],
    );
}

#[test]
fn classifier_tests_answer_requests_and_match_pytorch_inside_wasm() {
    let stdout = cargo_test_in("components/classifier");
    ran(
        &stdout,
        &[
            "component::tests::answers_a_request_with_one_prediction_that_carries_its_headers",
            "component::tests::a_request_it_cannot_use_fails_alone_and_its_neighbours_are_answered",
            "tract_logits_match_pytorch_within_1e_4",
            "accuracy_on_the_test_set_is_at_least_91_percent",
            "switchyard_pooling_gives_tract_logits_bit_for_bit",
        ],
    );
}

/// The runner must fail a run whose test fails: pipeline-core carries one test that fails on
/// purpose, ignored in its own runs, which this runs alone.
#[test]
fn a_failing_wasm_test_fails_the_run() {
    let workspace = switchyard_pipeline::demo::workspace_root();
    switchyard_pipeline::build::ensure_wasm_target(&workspace).expect("the wasm32-wasip2 target");
    let output = run_cargo_in(
        "components/libs/pipeline-core",
        &[
            "test",
            "--profile",
            "component",
            "--target",
            "wasm32-wasip2",
            "--test",
            "runner_reports_failure",
            "--",
            "--ignored",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a failing test passed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("test fails_on_purpose ..."),
        "the test did not run:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("this test fails on purpose"),
        "the failure's message is not shown:\n{stdout}\n{stderr}"
    );
}

#[test]
fn pipeline_core_tests_pass_inside_wasm() {
    let stdout = cargo_test_in("components/libs/pipeline-core");
    ran(&stdout, &["tally::tests::counts_each_request_once"]);
}

/// `cargo component test` runs a crate's tests the same way: cargo-component builds them for
/// `wasm32-wasip1`, makes a component of each, and hands it to the runner that
/// `.cargo/config.toml` names for that target (`switchyard test` too). cargo-component is not
/// part of a Rust toolchain: without it on the PATH this test says so and passes, unless
/// `SWITCHYARD_REQUIRE_CARGO_COMPONENT` is set (`.ci/run` installs it and sets it).
#[test]
fn cargo_component_test_runs_the_consumer_tests_inside_wasm() {
    if !support::cargo_component_ready() {
        return;
    }
    let stdout = cargo_in(
        "components/consumer",
        &["component", "test", "--profile", "component"],
    );
    ran(
        &stdout,
        &[
            "component::tests::tallies_each_request_once_and_reports_it",
            "component::tests::answers_what_is_not_a_prediction_with_an_error_alone",
        ],
    );
}
