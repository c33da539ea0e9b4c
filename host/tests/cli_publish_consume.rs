//! Proves that `switchyard publish` and `switchyard consume` behave the same on both backends,
//! run as a user runs them (the binary, over TCP): against a `switchyard broker`-style embedded
//! Kafka broker on a fixed address, and against Google's Pub/Sub emulator. Lines from standard
//! input become messages with the given key, header and content type, and come back as one JSON
//! object per line; a binary file comes back in base64.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use switchyard::broker::embedded::EmbeddedKafka;
use switchyard::broker::kafka::EMBEDDED_PROPERTIES;
use switchyard::broker::pubsub_emulator::PubSubEmulator;

fn switchyard(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("BROKER")
        .env_remove("PUBSUB_EMULATOR_HOST")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running switchyard");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "switchyard {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

/// Publishes and consumes through the CLI on `broker` and checks what comes back.
fn round_trip(broker: &str) {
    let topic = support::unique("cli");
    let group = support::unique("cli-group");
    // Create the group (a Pub/Sub subscription) before publishing, as consumers must on
    // Pub/Sub.
    switchyard(
        &[
            "consume", "--broker", broker, "-t", &topic, "-g", &group, "-c", "0",
        ],
        None,
    );
    switchyard(
        &[
            "publish",
            "--broker",
            broker,
            "-t",
            &topic,
            "-k",
            "order-1",
            "-H",
            "source=cli",
            "--content-type",
            "text/plain",
        ],
        Some(b"first\nsecond\nthird\n"),
    );
    let binary = std::env::temp_dir().join(format!("{topic}.bin"));
    std::fs::write(&binary, [0u8, 159, 146, 150, 255]).unwrap();
    switchyard(
        &[
            "publish",
            "--broker",
            broker,
            "-t",
            &topic,
            "-k",
            "order-1",
            "--file",
            binary.to_str().unwrap(),
        ],
        None,
    );
    std::fs::remove_file(&binary).unwrap();

    let output = switchyard(
        &[
            "consume",
            "--broker",
            broker,
            "-t",
            &topic,
            "-g",
            &group,
            "-c",
            "4",
            "--idle-exit",
            "30",
        ],
        None,
    );
    let received = lines(&output);
    assert_eq!(received.len(), 4, "{broker}: {received:?}");
    for (line, payload) in received.iter().zip(["first", "second", "third"]) {
        assert_eq!(line["payload"], payload, "{broker}: same key, same order");
        assert_eq!(line["key"], "order-1");
        assert_eq!(line["headers"]["source"], "cli");
        assert_eq!(line["content_type"], "text/plain");
        assert_eq!(line["topic"], topic.as_str());
    }
    assert_eq!(received[3]["payload_base64"], "AJ+Slv8=", "{broker}");
    assert!(received[3]["payload"].is_null());

    // Everything was acknowledged: the group has nothing more.
    let output = switchyard(
        &[
            "consume",
            "--broker",
            broker,
            "-t",
            &topic,
            "-g",
            &group,
            "--idle-exit",
            "3",
        ],
        None,
    );
    assert!(lines(&output).is_empty(), "{broker}: {:?}", lines(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_on_kafka() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = probe.local_addr().unwrap();
    drop(probe);
    let _broker = EmbeddedKafka::start(Some(address)).await.unwrap();
    let properties: Vec<String> = EMBEDDED_PROPERTIES
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let url = format!("kafka://{address}?{}", properties.join("&"));
    tokio::task::spawn_blocking(move || round_trip(&url))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_on_pubsub() {
    let emulator = tokio::task::spawn_blocking(|| PubSubEmulator::start(None))
        .await
        .unwrap()
        .expect("starting the Pub/Sub emulator");
    let url = format!(
        "pubsub://switchyard-cli?endpoint={}&anonymous=true",
        emulator.endpoint()
    );
    tokio::task::spawn_blocking(move || round_trip(&url))
        .await
        .unwrap();
    drop(emulator);
}
