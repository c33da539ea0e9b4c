//! Proves `switchyard run` as a user runs it (the binary, a manifest, an embedded broker other
//! processes reach over TCP): a handler's failed message ends in `<topic>.dlq` with its reasons
//! while a good one is handled; SIGTERM (what `kill`, systemd and Kubernetes send) and Ctrl-C
//! (SIGINT) each stop it with exit code 0, after which it prints each handler's counters
//! (received, handled, retried, gave up, dead-lettered, traps), counting what it finished while
//! stopping; and a stop that cannot finish (a handler in a minute-long call) ends at
//! `--stop-timeout` with exit code 1.

mod support;

use std::sync::Arc;

use support::hosts::{Host, WAIT};
use switchyard::broker::kafka::{EMBEDDED_PROPERTIES, Kafka, KafkaConfig};
use switchyard::broker::{Broker, OutgoingMessage};

/// Starts `switchyard run` on a manifest (in `dir`) with the test handler on `work`, its
/// embedded broker listening on a free port; returns the process once it says it is running,
/// and the broker's address from its log.
async fn start(dir: &std::path::Path, extra_args: &[&str]) -> (Host, String) {
    let manifest = dir.join("manifest.toml");
    // Port 0: the broker takes a free port and logs it.
    std::fs::write(
        &manifest,
        format!(
            "[broker.embedded]\nlisten = \"127.0.0.1:0\"\n\n\
             [components.tester]\nwasm = {wasm:?}\nsubscribe = [\"work\"]\n\
             publish = [\"announced\"]\n\
             retry = {{ max_attempts = 2, backoff_ms = 10 }}\n",
            wasm = support::test_handler(),
        ),
    )
    .unwrap();
    let mut args = vec!["run", manifest.to_str().unwrap()];
    args.extend(extra_args);
    let mut host = Host::start("switchyard", &args);
    let said = host.wait_for("embedded broker at ").await;
    let (_, address) = said.split_once("embedded broker at ").unwrap();
    let address = address.trim().to_string();
    (host.running().await, address)
}

async fn client(address: &str) -> Arc<dyn Broker> {
    let mut config = KafkaConfig::new(address);
    for (key, value) in EMBEDDED_PROPERTIES {
        config.properties.insert(key.to_string(), value.to_string());
    }
    Arc::new(Kafka::connect(config).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_dead_letters_a_failed_message_and_stops_on_sigterm_with_its_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (host, address) = start(dir.path(), &[]).await;
    let broker = client(&address).await;
    for payload in ["ok", "error"] {
        let message = OutgoingMessage {
            topic: "work".into(),
            payload: payload.as_bytes().to_vec(),
            ..OutgoingMessage::default()
        };
        support::publish(broker.as_ref(), message).await;
    }
    let reader = support::member(broker.as_ref(), &support::unique("reader"), "work.dlq").await;
    let letter = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("the failed message reaches work.dlq")
        .unwrap();
    assert_eq!(letter.message.payload, b"error");
    reader.close().await.unwrap();
    drop(broker);

    let stdout = host.signal(libc::SIGTERM).await;
    assert!(
        stdout.contains(
            "tester: received 2, handled 1, retried 1, gave up 1 (1 dead-lettered), traps 0"
        ),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_on_ctrl_c_with_its_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (host, _) = start(dir.path(), &[]).await;
    let stdout = host.signal(libc::SIGINT).await;
    assert!(
        stdout.contains(
            "tester: received 0, handled 0, retried 0, gave up 0 (0 dead-lettered), traps 0"
        ),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_takes_too_long_ends_at_the_bound_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let (mut host, address) = start(dir.path(), &["--stop-timeout", "1"]).await;
    let broker = client(&address).await;
    support::create_topics(broker.as_ref(), &["announced"]).await;
    let reader = support::member(broker.as_ref(), &support::unique("reader"), "announced").await;
    let message = OutgoingMessage {
        topic: "work".into(),
        payload: b"announce announced 60000".to_vec(),
        ..OutgoingMessage::default()
    };
    support::publish(broker.as_ref(), message).await;
    // The handler says it is going to sleep for a minute, in the middle of its call.
    tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("the handler announces its sleep")
        .unwrap();
    reader.close().await.unwrap();
    drop(broker);
    let asked = std::time::Instant::now();
    host.send_signal(libc::SIGTERM);
    host.wait_for("--stop-timeout").await;
    let (status, _) = host.finish().await;
    let took = asked.elapsed();
    eprintln!("stopped in {took:?}");
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(
        took < std::time::Duration::from_secs(10),
        "the bound holds: {took:?}"
    );
}
