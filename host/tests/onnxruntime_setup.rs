//! Proves that `switchyard demo` ends on the fastest engine it can get, with the real binary
//! and a cache directory of its own (so the machine's own install does not count):
//! - with python3 and pip on PATH, the first run installs ONNX Runtime into the cache, saying so
//!   in one line, and runs the model with it; the second run finds it and installs nothing;
//! - without python3 on PATH, it runs tract and the summary says why and what to do;
//! - with the install turned off (`SWITCHYARD_NO_INSTALL_ONNXRUNTIME=1`), it downloads nothing,
//!   runs tract, and the summary says how it was turned off.
//!
//! The install downloads the `onnxruntime` wheel from PyPI (or the machine's pip index).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use switchyard_runtime::nn::onnxruntime;
use switchyard_testing::process::output_within;

/// A download of some 28 MB and a demo run; a run that hangs fails the test instead.
const LIMIT: Duration = Duration::from_secs(600);

const INSTALLING: &str = "installing ONNX Runtime";

/// What a demo run printed: its stderr (progress, summary) and its last line as JSON.
struct DemoRun {
    stderr: String,
    report: serde_json::Value,
}

/// `switchyard demo` on 200 images, with `cache` as its XDG cache (where ONNX Runtime is
/// looked for and installed) and `path` as its PATH.
fn demo(cache: &Path, path: &std::ffi::OsStr, env: &[(&str, &str)]) -> DemoRun {
    // The classifier compiled once for all tests, not once per cache directory.
    let compiled = switchyard_runtime::user_cache_dir("compiled").expect("a cache directory");
    let output = output_within(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["demo", "--images", "200", "--components"])
            .arg(support::components())
            .env("XDG_CACHE_HOME", cache)
            .env("XDG_DATA_HOME", support::hosts::results_home())
            .env("SWITCHYARD_CACHE_DIR", compiled)
            .env("PATH", path)
            .env_remove(onnxruntime::LIBRARY_ENV)
            .env_remove("SWITCHYARD_NO_INSTALL_ONNXRUNTIME")
            .env_remove("BROKER")
            .envs(env.iter().copied()),
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line is JSON ({e}): {stdout}\n{stderr}"));
    assert_eq!(report["predictions"], 200, "{report}");
    DemoRun { stderr, report }
}

impl DemoRun {
    /// Asserts that the run installed nothing and ran tract, and returns the note that says why.
    fn tract_and_its_note(&self) -> &str {
        assert!(!self.stderr.contains(INSTALLING), "{}", self.stderr);
        assert!(
            self.report["inference"]
                .as_str()
                .unwrap()
                .starts_with("wasi-nn (tract, native)"),
            "{}",
            self.report
        );
        self.report["inference_note"].as_str().expect("a note")
    }
}

fn installed_library(cache: &Path) -> std::path::PathBuf {
    cache
        .join("switchyard")
        .join(format!("onnxruntime-{}", onnxruntime::VERSION))
        .join(format!("libonnxruntime.so.{}", onnxruntime::VERSION))
}

fn path() -> std::ffi::OsString {
    std::env::var_os("PATH").unwrap_or_default()
}

#[test]
fn with_pip_the_first_demo_installs_onnxruntime_once_and_runs_it() {
    let pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output();
    assert!(
        pip.is_ok_and(|o| o.status.success()),
        "this test needs python3 with pip on PATH, as the demo's install does"
    );
    let cache = tempfile::tempdir().unwrap();

    let first = demo(cache.path(), &path(), &[]);
    let announced: Vec<&str> = first
        .stderr
        .lines()
        .filter(|line| line.contains(INSTALLING))
        .collect();
    assert_eq!(announced.len(), 1, "one line says so:\n{}", first.stderr);
    let install_dir = installed_library(cache.path());
    assert!(
        announced[0].contains(&install_dir.parent().unwrap().display().to_string())
            && announced[0].contains("--no-install-onnxruntime"),
        "it names where and how to opt out: {}",
        announced[0]
    );
    assert!(install_dir.is_file(), "{install_dir:?}");
    let inference = first.report["inference"].as_str().unwrap();
    assert!(
        inference.starts_with("wasi-nn (onnxruntime, native)"),
        "{}",
        first.report
    );
    assert!(
        first.report.get("inference_note").is_none(),
        "{}",
        first.report
    );

    let second = demo(cache.path(), &path(), &[]);
    assert!(
        !second.stderr.contains(INSTALLING),
        "installed once, not again:\n{}",
        second.stderr
    );
    assert!(
        second.report["inference"]
            .as_str()
            .unwrap()
            .starts_with("wasi-nn (onnxruntime, native)"),
        "{}",
        second.report
    );
}

#[test]
fn without_pip_the_demo_runs_tract_and_says_why() {
    let cache = tempfile::tempdir().unwrap();
    // A PATH with no python3 on it (nor anything else: the demo needs nothing from PATH once
    // its components are built).
    let empty = tempfile::tempdir().unwrap();
    let run = demo(cache.path(), empty.path().as_os_str(), &[]);
    let note = run.tract_and_its_note();
    assert!(!installed_library(cache.path()).exists());
    for needle in ["no python3 with pip", "ensurepip", onnxruntime::LIBRARY_ENV] {
        assert!(note.contains(needle), "{needle:?} not in {note:?}");
    }
    assert!(
        run.stderr.contains(&format!("({note})")),
        "the summary says it:\n{}",
        run.stderr
    );
}

#[test]
fn with_the_install_turned_off_the_demo_downloads_nothing_and_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let run = demo(
        cache.path(),
        &path(),
        &[("SWITCHYARD_NO_INSTALL_ONNXRUNTIME", "1")],
    );
    let note = run.tract_and_its_note();
    assert!(
        !cache.path().join("pip").exists() && !installed_library(cache.path()).exists(),
        "pip ran: {:?}",
        std::fs::read_dir(cache.path()).unwrap().collect::<Vec<_>>()
    );
    assert!(
        note.contains("turned off") && note.contains("switchyard install-onnxruntime"),
        "{note}"
    );
}
