//! Proves that the `switchyard` command turns bad input into one clear error line that names
//! the problem and the fix, and a failing exit code, never a panic: a missing manifest, a
//! malformed one (with its line), an unknown key, a missing `.wasm`, a file that is not a
//! component, an unknown broker URL, and a Kafka broker that is not running. And that `exec`
//! runs a command component with the directories and topics it is granted, and that `build`
//! names the cargo build that failed, and a manifest asking for an inference engine the host
//! cannot load names the library it tried. `validate` passes the committed pipeline manifest
//! and names, for a component whose world does not fit its role, the export it lacks and the
//! fix; `run` refuses the same manifest before it reaches any broker. `deploy` with no host
//! running the manifest says where it looked and how to start one. `report` on a store that
//! is not there, on one with no runs, and for a run it does not hold, says so and names the
//! fix or the runs it holds. Every subcommand's `--help` ends with an example of it, and the
//! top-level help says what the exit codes mean.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use switchyard_testing::process::output_within;

mod support;

/// The longest a command here may take: each fails (or validates) within seconds, and one that
/// hangs instead is a regression to fail on, not to wait for.
const LIMIT: Duration = Duration::from_secs(180);

fn switchyard(args: &[&str], dir: &Path) -> Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .current_dir(dir)
            .env("SWITCHYARD_CACHE_DIR", dir.join("cache"))
            .env("RUST_LOG", "error"),
        LIMIT,
    )
}

fn fails_with(args: &[&str], dir: &Path, expected: &[&str]) {
    let output = switchyard(args, dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for needle in expected {
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in:\n{stderr}"
        );
    }
}

#[test]
fn bad_manifests_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails_with(
        &["run", "missing.toml"],
        d,
        &["cannot read the manifest", "missing.toml"],
    );

    std::fs::write(d.join("broken.toml"), "[components.c\nwasm = 1\n").unwrap();
    fails_with(&["run", "broken.toml"], d, &["broken.toml", "line 1"]);

    std::fs::write(d.join("c.wasm"), b"\0asm\x0d\0\x01\0").unwrap();
    std::fs::write(
        d.join("typo.toml"),
        "[components.c]\nwasm = \"c.wasm\"\nworkerz = 2\n",
    )
    .unwrap();
    fails_with(&["run", "typo.toml"], d, &["workerz", "line 3"]);

    std::fs::write(
        d.join("nowasm.toml"),
        "[components.c]\nwasm = \"nope.wasm\"\n",
    )
    .unwrap();
    fails_with(
        &["run", "nowasm.toml"],
        d,
        &["nope.wasm", "just components"],
    );

    std::fs::write(d.join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::write(
        d.join("core.toml"),
        "[components.c]\nwasm = \"core.wasm\"\n",
    )
    .unwrap();
    fails_with(
        &["run", "core.toml"],
        d,
        &["core WebAssembly module", "wasm32-wasip2"],
    );

    fails_with(
        &["run", "core.toml", "--broker", "amqp://x"],
        d,
        &["unknown broker", "kafka://"],
    );
}

#[test]
fn every_subcommand_s_help_ends_with_an_example() {
    let dir = tempfile::tempdir().unwrap();
    let help = |args: &[&str]| {
        let output = switchyard(args, dir.path());
        assert!(output.status.success(), "{args:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let top = help(&["--help"]);
    assert!(top.contains("Exit codes: 0 success; 1 "), "{top}");
    let subcommands = |help: &str| -> Vec<String> {
        help.lines()
            .skip_while(|line| !line.starts_with("Commands:"))
            .skip(1)
            .take_while(|line| line.starts_with("  "))
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(str::to_string)
            .collect()
    };
    let mut commands: Vec<Vec<String>> = subcommands(&top).into_iter().map(|c| vec![c]).collect();
    assert!(commands.len() >= 15, "{commands:?} from:\n{top}");
    let mut checked = 0;
    while let Some(command) = commands.pop() {
        let mut args: Vec<&str> = command.iter().map(String::as_str).collect();
        args.push("--help");
        let text = help(&args);
        let line = command.join(" ");
        let example = text
            .rsplit_once("Example")
            .unwrap_or_else(|| panic!("`{line} --help` has no example:\n{text}"))
            .1;
        assert!(
            example.contains(&format!("switchyard {line}")),
            "`{line} --help` ends with an example of it:\n{text}"
        );
        // Commands of commands (`topics list`) too.
        for nested in subcommands(&text) {
            let mut deeper = command.clone();
            deeper.push(nested);
            commands.push(deeper);
        }
        checked += 1;
    }
    assert!(checked >= 18, "nested commands are checked too: {checked}");
}

#[tokio::test]
async fn a_report_on_what_is_not_there_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fails_with(
        &["report", "missing.sqlite3"],
        d,
        &["no results store at missing.sqlite3", "switchyard demo"],
    );
    fails_with(
        &["report", "postgres://postgres@127.0.0.1:1/test"],
        d,
        &["is PostgreSQL running"],
    );
    let store = switchyard_runtime::results::ResultsConfig::Sqlite {
        path: d.join("r.sqlite3"),
    };
    let results = switchyard_runtime::results::Results::open(
        &store,
        &switchyard_pipeline::predictions::tables(),
    )
    .await
    .unwrap();
    fails_with(&["report", "r.sqlite3"], d, &["holds no predictions yet"]);
    let mut logits = [0.0f32; 10];
    logits[3] = 1.0;
    let prediction = pipeline_core::wire::Prediction::from_logits(
        "abc-1".into(),
        &logits,
        Some(3),
        None,
        "m".into(),
        pipeline_core::wire::Timings {
            decode_us: 0,
            inference_us: 0,
            batch: 1,
        },
    );
    let row = switchyard_pipeline::predictions::PredictionRecord::row(&prediction, None, 5.0);
    results
        .insert(&switchyard_pipeline::predictions::PREDICTIONS, vec![row])
        .await
        .unwrap();
    fails_with(
        &["report", "r.sqlite3", "--run", "xyz"],
        d,
        &["holds no run \"xyz\"", "abc (1 predictions)"],
    );
    let output = switchyard(&["report", "r.sqlite3"], d);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("run abc in r.sqlite3"), "{stdout}");
    assert!(stdout.contains("accuracy      100.00 %"), "{stdout}");
}

#[test]
fn a_deploy_with_no_host_running_the_manifest_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("idle.toml"), "").unwrap();
    fails_with(
        &["deploy", "idle.toml"],
        d,
        &[
            "no `switchyard run` is listening",
            "idle-",
            "--admin-socket",
        ],
    );
    fails_with(
        &["deploy", "idle.toml", "--admin-socket", "elsewhere.sock"],
        d,
        &["no `switchyard run` is listening at elsewhere.sock"],
    );
    fails_with(&["deploy", "gone.toml"], d, &["gone.toml"]);
}

#[test]
fn an_unreachable_kafka_is_reported_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing here listens on. A port freed by binding and dropping a listener is not:
    // another test's embedded broker may take it meanwhile (seen once, when the check then
    // reached that broker).
    let address = "127.0.0.1:9".to_string();
    let producer = support::component("producer");
    std::fs::write(
        dir.path().join("k.toml"),
        format!(
            "[broker.kafka]\nbootstrap_servers = \"{address}\"\nconnect_timeout_ms = 1000\n\n\
             [components.c]\nwasm = {:?}\n",
            producer.display().to_string()
        ),
    )
    .unwrap();
    fails_with(
        &["run", "k.toml"],
        dir.path(),
        &["cannot reach Kafka", &address, "switchyard broker"],
    );
}

#[test]
fn exec_runs_a_command_component_with_its_grants() {
    let dir = tempfile::tempdir().unwrap();
    let producer = support::component("producer");
    let models = format!("{}::/models", support::models().display());
    let run = |topic: &str| {
        switchyard(
            &[
                "exec",
                producer.to_str().unwrap(),
                "--dir",
                &models,
                "--publish",
                "requests",
                "--",
                "--images",
                "/models/t10k-images-idx3-ubyte.gz",
                "--topic",
                topic,
                "--count",
                "5",
            ],
            dir.path(),
        )
    };
    let granted = run("requests");
    let stderr = String::from_utf8_lossy(&granted.stderr);
    assert!(granted.status.success(), "{stderr}");
    assert!(stderr.contains("sent 5 requests"), "{stderr}");

    let refused = run("elsewhere");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("may not send to topic \"elsewhere\""),
        "{stderr}"
    );
}

#[test]
fn build_names_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        &["build", "-p", "no-such-component"],
        dir.path(),
        &["no-such-component", "cargo build", "failed"],
    );
}

#[test]
fn an_engine_the_host_cannot_load_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let classifier = support::component("classifier");
    std::fs::write(
        dir.path().join("nn.toml"),
        format!(
            "[components.classifier]\nwasm = {:?}\nsubscribe = [\"requests\"]\nnn = \"onnxruntime\"\n",
            classifier.display().to_string()
        ),
    )
    .unwrap();
    // A host that started instead of failing would run until killed: the limit turns that
    // regression into a failure.
    let output = output_within(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["run", "nn.toml"])
            .current_dir(dir.path())
            .env("SWITCHYARD_CACHE_DIR", dir.path().join("cache"))
            .env(
                "SWITCHYARD_ONNXRUNTIME",
                dir.path().join("libonnxruntime.so"),
            )
            .env("RUST_LOG", "error"),
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    for needle in ["classifier", "onnxruntime", "libonnxruntime.so"] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

#[test]
fn validate_passes_the_pipeline_and_names_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let output = output_within(
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["validate", "components/pipeline.toml"])
            .current_dir(switchyard_pipeline::demo::workspace_root())
            .env("SWITCHYARD_COMPONENTS", support::components())
            .env("RUST_LOG", "error"),
        LIMIT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "producer: ok, command, sends to requests",
        "classifier: ok, handler of requests, sends to predictions (takes batches, may use wasi:nn)",
        "consumer: ok, handler of predictions, writes results to predictions (takes batches, reports)",
        "components/pipeline.toml: 3 component(s) ok",
    ] {
        assert!(stdout.contains(line), "{line:?} not in:\n{stdout}");
    }

    // The classifier without `subscribe` is a command, which it is not. Kafka at a port nothing
    // listens on: `run` must refuse the component before it tries the broker. Its file is
    // named apart from it, so the error must name the component itself.
    std::fs::copy(
        support::component("classifier"),
        dir.path().join("model.wasm"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("wrong.toml"),
        "[broker.kafka]\nbootstrap_servers = \"127.0.0.1:9\"\n\n\
         [components.labeller]\nwasm = \"model.wasm\"\npublish = [\"predictions\"]\n",
    )
    .unwrap();
    let expected = [
        "labeller: component",
        "model.wasm",
        "must export wasi:cli/run",
        "give its manifest entry the topics to `subscribe` to",
    ];
    fails_with(&["validate", "wrong.toml"], dir.path(), &expected);
    fails_with(&["run", "wrong.toml"], dir.path(), &expected);
    let output = switchyard(&["run", "wrong.toml"], dir.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("Kafka"),
        "run reached for the broker first: {stderr}"
    );
}
