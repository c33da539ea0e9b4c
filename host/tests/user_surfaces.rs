//! Proves the commands a newcomer types, run as the README and the justfile give them, with the
//! real binary:
//! - `just broker`, `just classifier`, `just consumer` and `just producer` (three-terminal mode:
//!   `switchyard broker` and the committed manifests in `components/`) as four processes. The
//!   recipes are read from the justfile and run as written, with the switchyard binary for
//!   `cargo run --release --` and a free port for 9092; every one of the 10,000 test images gets
//!   its prediction line from the consumer, whose tally on Ctrl-C says 10,000 predictions at the
//!   model's 91.67 %.
//! - `switchyard demo`: exit code 0 and a last output line of JSON that counts every image; and
//!   against a broker that is not there, exit code 1 and an error that names the fix.

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use support::hosts::Host;
use switchyard_testing::process::output_within;

/// The default of a justfile variable set with `env_var_or_default("NAME", "DEFAULT")`.
fn justfile_default(justfile: &str, variable: &str) -> String {
    let line = justfile
        .lines()
        .find(|line| line.starts_with(&format!("{variable} :=")))
        .unwrap_or_else(|| panic!("no {variable} in the justfile"));
    let quoted: Vec<&str> = line.split('"').collect();
    quoted
        .get(3)
        .unwrap_or_else(|| panic!("{variable}: not env_var_or_default(NAME, DEFAULT): {line}"))
        .to_string()
}

/// A recipe's command as arguments of the switchyard binary: what follows `cargo run --release
/// --`, split as the shell would (the recipes quote with '…' only).
fn recipe_args(justfile: &str, header: &str, broker_url: &str) -> Vec<String> {
    let command = support::justfile_recipe(justfile, header);
    let rest = command
        .strip_prefix("cargo run --release -- ")
        .unwrap_or_else(|| panic!("`{header}` should run the switchyard binary: {command}"))
        .replace("{{broker_url}}", broker_url);
    rest.split('\'')
        .enumerate()
        .flat_map(|(i, part)| {
            if i % 2 == 1 {
                vec![part.to_string()]
            } else {
                part.split_whitespace().map(str::to_string).collect()
            }
        })
        .collect()
}

const TEST_IMAGES: usize = 10_000;

/// The longest a `switchyard` command here may take; one that hangs fails the test instead.
const LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_terminal_targets_classify_every_test_image() {
    let justfile = support::workspace_file("justfile");
    let root = switchyard_pipeline::demo::workspace_root();
    let components = support::components();
    let env = [("SWITCHYARD_COMPONENTS", components.to_str().unwrap())];
    let start = |name: &str, header: &str, broker_url: &str, extra: &[&str]| {
        let mut args = recipe_args(&justfile, header, broker_url);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Host::start_in(name, &args, &root, &env)
    };

    // The broker takes a free port itself (port 0) and says which, so no other test can take
    // it between a look and its use.
    let default_url = justfile_default(&justfile, "broker_url");
    let mut broker = start("broker", "broker:", &default_url, &["--port", "0"]);
    let address = support::hosts::listening_address(&mut broker).await;
    let broker_url = default_url.replace("127.0.0.1:9092", &address);
    let start = |name: &str, header: &str, extra: &[&str]| start(name, header, &broker_url, extra);
    let classifier = start("classifier", "classifier: components", &[])
        .running()
        .await;
    let mut consumer = start("consumer", "consumer: components", &[])
        .running()
        .await;
    let producer = start("producer", "producer: components", &[]);
    producer.exit().await;

    let mut answered = HashSet::new();
    while answered.len() < TEST_IMAGES {
        let line = consumer
            .next_output_line()
            .await
            .unwrap_or_else(|| panic!("the consumer exited after {} lines", answered.len()));
        if let Some(request) = line.split_whitespace().next() {
            answered.insert(request.to_string());
        }
    }
    let consumer_output = consumer.signal(libc::SIGINT).await;
    let tally = consumer_output
        .lines()
        .find_map(|line| line.strip_prefix("consumer: {"))
        .map(|json| format!("{{{json}"))
        .unwrap_or_else(|| panic!("no tally in the consumer's output:\n{consumer_output}"));
    let tally: serde_json::Value = serde_json::from_str(&tally).unwrap();
    eprintln!("tally: {tally}");
    assert_eq!(tally["predictions"], TEST_IMAGES as u64, "{tally}");
    assert_eq!(tally["correct"], 9_167, "the model's accuracy: {tally}");
    classifier.signal(libc::SIGTERM).await;
    broker.signal(libc::SIGINT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_ends_with_a_json_summary_and_exit_code_0() {
    let components = support::components();
    let host = Host::start(
        "demo",
        &[
            "demo",
            "--images",
            "300",
            "--components",
            components.to_str().unwrap(),
        ],
    );
    let output = host.exit().await;
    let last = output.lines().last().expect("the demo prints a summary");
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line is JSON ({e}): {last}"));
    assert_eq!(report["images"], 300, "{report}");
    assert_eq!(report["predictions"], 300, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let accuracy = report["accuracy"].as_f64().expect("an accuracy");
    assert!((0.8..=1.0).contains(&accuracy), "{report}");

    // Its numbers come from the results store, which it names, with its run: 300 rows.
    let store = support::hosts::results_home().join("switchyard/results.sqlite3");
    assert_eq!(report["results"], store.to_str().unwrap(), "{report}");
    let run = report["run"].as_str().expect("a run id");
    let results = switchyard_runtime::results::Results::open(
        &switchyard_runtime::results::ResultsConfig::Sqlite {
            path: store.clone(),
        },
        &switchyard_pipeline::predictions::tables(),
    )
    .await
    .unwrap();
    assert_eq!(
        switchyard_pipeline::predictions::count(&results, run)
            .await
            .unwrap(),
        300
    );

    // It wrote the run's report, which holds the run's numbers and its plots.
    let accuracy_text = format!("{:.2} %", accuracy * 100.0);
    let page = std::path::PathBuf::from(report["report"].as_str().expect("a report"));
    assert_eq!(
        page,
        support::hosts::results_home().join(format!("switchyard/reports/{run}/report.html"))
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains(&accuracy_text),
        "{accuracy_text} not in {html}"
    );
    assert!(
        html.contains(run) && html.matches("<svg").count() == 4,
        "{html}"
    );

    // `switchyard report` reads the same run back, and writes the page where it is told.
    let out = tempfile::tempdir().unwrap();
    let output = output_within(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["report", store.to_str().unwrap(), "--run", run, "--out"])
            .arg(out.path()),
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        format!("run {run} in {}", store.display()),
        "predictions   300".to_string(),
        format!("accuracy      {accuracy_text}"),
        "confusion matrix (rows: label, columns: predicted)".to_string(),
        "latency       p50 ".to_string(),
        "where the time went".to_string(),
        "sent → classifier".to_string(),
    ] {
        assert!(stdout.contains(&expected), "{expected:?} not in:\n{stdout}");
    }
    for file in [
        "report.html",
        "confusion.svg",
        "latency.svg",
        "throughput.svg",
        "hops.svg",
    ] {
        assert!(
            out.path().join(file).is_file(),
            "{file} in {:?}",
            out.path()
        );
    }
}

#[test]
fn the_demo_against_a_missing_broker_exits_1_and_names_the_fix() {
    let components = support::components();
    let output = output_within(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["demo", "--images", "10", "--broker", "kafka://127.0.0.1:1"])
            .arg("--components")
            .arg(&components)
            .env_remove("BROKER"),
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach Kafka at 127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("switchyard broker"), "the fix: {stderr}");
}
