//! Proves the floor the client stands on, from Cargo's own dependency graph (`cargo tree`):
//! `switchyard-client` compiles none of the Wasm host (wasmtime, wasmtime-wasi), the inference
//! engines (tract-onnx, ort), the results store (rusqlite, tokio-postgres), the report's plots
//! (plotters) or the metrics server (prometheus, hyper); and each backend is a Cargo feature,
//! so a program built for Kafka compiles no Google SDK and one built for Pub/Sub no
//! librdkafka. The one exception is hyper, which Google's SDK brings itself (its HTTP and
//! gRPC transports): the Pub/Sub builds may contain it, but only under the SDK, never as a
//! dependency of switchyard's own crates.

use std::collections::BTreeSet;

use switchyard_testing::cargo_tree::normal_dependencies;

/// What a library user of the client must never compile.
const NEVER: [&str; 9] = [
    "wasmtime",
    "wasmtime-wasi",
    "tract-onnx",
    "ort",
    "rusqlite",
    "tokio-postgres",
    "plotters",
    "prometheus",
    "hyper",
];

/// `cargo tree` of the client with `arguments`, one package name each.
fn cargo_tree(arguments: &[&str]) -> BTreeSet<String> {
    normal_dependencies("switchyard-client", arguments)
}

fn assert_absent(packages: &BTreeSet<String>, forbidden: &[&str], build: &str) {
    let found: Vec<&&str> = forbidden
        .iter()
        .filter(|name| packages.contains(**name))
        .collect();
    assert!(
        found.is_empty(),
        "the client ({build}) depends on {found:?}"
    );
}

#[test]
fn a_kafka_only_client_compiles_neither_the_host_nor_google_s_sdk() {
    let packages = cargo_tree(&["--no-default-features", "--features", "kafka"]);
    assert!(packages.contains("rdkafka"), "{packages:?}");
    assert_absent(&packages, &NEVER, "Kafka only");
    assert_absent(
        &packages,
        &["google-cloud-pubsub", "google-cloud-auth", "tonic"],
        "Kafka only",
    );
}

#[test]
fn a_pubsub_only_client_compiles_neither_the_host_nor_librdkafka() {
    let packages = cargo_tree(&["--no-default-features", "--features", "pubsub"]);
    assert!(packages.contains("google-cloud-pubsub"), "{packages:?}");
    assert_absent(&packages, &NEVER[..8], "Pub/Sub only");
    assert_absent(&packages, &["rdkafka", "rdkafka-sys"], "Pub/Sub only");
}

#[test]
fn the_default_client_has_both_backends_and_none_of_the_host() {
    let packages = cargo_tree(&[]);
    assert!(
        packages.contains("rdkafka") && packages.contains("google-cloud-pubsub"),
        "{packages:?}"
    );
    assert_absent(&packages, &NEVER[..8], "both backends");
    // hyper comes with Google's SDK alone: none of switchyard's crates asks for it.
    let hyper_users = cargo_tree(&["--invert", "hyper", "--depth", "1"]);
    let ours: Vec<&String> = hyper_users
        .iter()
        .filter(|name| name.starts_with("switchyard"))
        .collect();
    assert!(ours.is_empty(), "{ours:?} depend on hyper directly");
}
