//! Proves `switchyard run` as a user runs it (the binary, a manifest, an embedded broker other
//! processes reach over TCP): a handler's failed message ends in `<topic>.dlq` with its reasons
//! while a good one is handled; SIGTERM (what `kill`, systemd and Kubernetes send) and Ctrl-C
//! (SIGINT) each stop it with exit code 0, after which it prints each handler's counters
//! (received, handled, retried, gave up, dead-lettered, traps), counting what it finished while
//! stopping.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use switchyard::broker::kafka::{EMBEDDED_PROPERTIES, Kafka, KafkaConfig};
use switchyard::broker::{Broker, OutgoingMessage};

const WAIT: Duration = Duration::from_secs(60);

/// Starts `switchyard run` on a manifest with the test handler on `work`, its embedded broker
/// listening on a free port; returns the process once it says it is running, and the broker's
/// address from its log.
fn start(dir: &std::path::Path) -> (Child, String) {
    let manifest = dir.join("manifest.toml");
    // Port 0: the broker takes a free port and logs it.
    std::fs::write(
        &manifest,
        format!(
            "[broker.embedded]\nlisten = \"127.0.0.1:0\"\n\n\
             [components.tester]\nwasm = {wasm:?}\nsubscribe = [\"work\"]\n\
             retry = {{ max_attempts = 2, backoff_ms = 10 }}\n",
            wasm = support::test_handler(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["run", manifest.to_str().unwrap()])
        .env_remove("BROKER")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running switchyard");
    let stderr = child.stderr.take().unwrap();
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("switchyard: {line}");
            let _ = said.send(line);
        }
    });
    let mut address = None;
    loop {
        let line = heard
            .recv_timeout(WAIT)
            .expect("switchyard run says where its broker is and that it is running");
        if let Some((_, at)) = line.split_once("embedded broker at ") {
            address = Some(at.trim().to_string());
        }
        if line.contains("press Ctrl-C") {
            break;
        }
    }
    (
        child,
        address.expect("switchyard run logs its broker's address"),
    )
}

async fn client(address: &str) -> Arc<dyn Broker> {
    let mut config = KafkaConfig::new(address);
    for (key, value) in EMBEDDED_PROPERTIES {
        config.properties.insert(key.to_string(), value.to_string());
    }
    Arc::new(Kafka::connect(config).await.unwrap())
}

/// Sends `signal`, waits (at most [`WAIT`]) for the exit, and returns standard output.
fn stop(mut child: Child, signal: libc::c_int) -> String {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a pid this test spawned and has not yet waited for.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let mut pipe = child.stdout.take().unwrap();
    let (read, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stdout);
        let _ = read.send(stdout);
    });
    let Ok(stdout) = output.recv_timeout(WAIT) else {
        let _ = child.kill();
        panic!("switchyard run did not stop within {WAIT:?} of signal {signal}");
    };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_dead_letters_a_failed_message_and_stops_on_sigterm_with_its_counters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (child, address) = tokio::task::spawn_blocking(move || start(&path))
        .await
        .unwrap();
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

    let stdout = tokio::task::spawn_blocking(move || stop(child, libc::SIGTERM))
        .await
        .unwrap();
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
    let path = dir.path().to_path_buf();
    let (child, _) = tokio::task::spawn_blocking(move || start(&path))
        .await
        .unwrap();
    let stdout = tokio::task::spawn_blocking(move || stop(child, libc::SIGINT))
        .await
        .unwrap();
    assert!(
        stdout.contains(
            "tester: received 0, handled 0, retried 0, gave up 0 (0 dead-lettered), traps 0"
        ),
        "{stdout}"
    );
}
