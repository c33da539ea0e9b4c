//! Proves `switchyard run` as a user runs it (the binary, a manifest, an embedded broker other
//! processes reach over TCP): a handler's failed message ends in `<topic>.dlq` with its reasons
//! while a good one is handled; SIGTERM (what `kill`, systemd and Kubernetes send) and Ctrl-C
//! (SIGINT) each stop it with exit code 0, after which it prints each handler's counters
//! (received, handled, retried, gave up, dead-lettered, traps), counting what it finished while
//! stopping; and a stop that cannot finish (a handler in a minute-long call) ends at
//! `--stop-timeout` with exit code 1. With `--metrics`, `/metrics` answers during the run in
//! Prometheus' text format, and its counters (received, handled, sent, failures, retries, dead
//! letters, handler latency) move as messages are handled, with the group's consumer lag.

mod support;

use std::sync::Arc;

use support::hosts::{Host, WAIT};
use switchyard_broker::kafka::{Kafka, KafkaConfig};
use switchyard_broker::{Broker, OutgoingMessage};

/// Starts `switchyard run` on a manifest (in `dir`) with the test handler on `work`, its
/// embedded broker listening on a free port; returns the process once it says it is running,
/// and the broker's address from its log.
async fn start(dir: &std::path::Path, extra_args: &[&str]) -> (Host, String) {
    let mut host = launch(dir, extra_args);
    let address = broker_address(&mut host).await;
    (host.running().await, address)
}

/// Starts `switchyard run` as [`start`] does, without waiting.
fn launch(dir: &std::path::Path, extra_args: &[&str]) -> Host {
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
    Host::start("switchyard", &args)
}

/// The embedded broker's address, from the host's log.
async fn broker_address(host: &mut Host) -> String {
    let said = host.wait_for("embedded broker at ").await;
    let (_, address) = said.split_once("embedded broker at ").unwrap();
    address.trim().to_string()
}

async fn client(address: &str) -> Arc<dyn Broker> {
    Arc::new(
        Kafka::connect(KafkaConfig::for_embedded(address))
            .await
            .unwrap(),
    )
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

/// `GET /metrics` over a plain TCP connection, as Prometheus scrapes: the status line and the
/// body.
async fn scrape(address: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connection = tokio::net::TcpStream::connect(address).await.unwrap();
    connection
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    connection.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the series `series` (name and labels, as the text format writes them).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// Scrapes until `ready` holds of the metrics (Prometheus' way of watching: the endpoint is
/// the only window into the process); returns the last scrape.
async fn scrape_until(address: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    support::wait_until(what, WAIT, async || {
        let (status, metrics) = scrape(address).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{metrics}");
        last = metrics;
        ready(&last)
    })
    .await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_during_a_run_and_their_counters_move() {
    let dir = tempfile::tempdir().unwrap();
    let mut host = launch(dir.path(), &["--metrics", "127.0.0.1:0"]);
    let said = host.wait_for("metrics at http://").await;
    let (_, url) = said.split_once("metrics at http://").unwrap();
    let metrics_address = url.trim().trim_end_matches("/metrics").to_string();
    let address = broker_address(&mut host).await;
    let host = host.running().await;

    // Before any message: the endpoint answers, with the process' own metrics and the
    // handler's series at zero (so a rate or an alert works from the start).
    let (status, before) = scrape(&metrics_address).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(before.contains("process_resident_memory_bytes"), "{before}");
    for series in [
        "switchyard_messages_handled_total{component=\"tester\",topic=\"work\"}",
        "switchyard_traps_total{component=\"tester\"}",
        "switchyard_handler_duration_seconds_count{component=\"tester\"}",
    ] {
        assert_eq!(value(&before, series), Some(0.0), "{series}:\n{before}");
    }

    let broker = client(&address).await;
    support::create_topics(broker.as_ref(), &["announced"]).await;
    let send = async |payload: &str| {
        let message = OutgoingMessage {
            topic: "work".into(),
            payload: payload.as_bytes().to_vec(),
            ..OutgoingMessage::default()
        };
        support::publish(broker.as_ref(), message).await;
    };
    let handled = "switchyard_messages_handled_total{component=\"tester\",topic=\"work\"}";
    let dead_letters = "switchyard_dead_letters_total{component=\"tester\",topic=\"work\"}";
    // One message at a time, each awaited: messages queued together may reach the handler in
    // one batch call, and the call count below is exact only when each had a call of its own.
    for (payload, done, ready) in [
        ("ok", "one handled", handled),
        ("send announced", "two handled", handled),
        ("error", "one dead letter", dead_letters),
    ] {
        let before = value(&scrape(&metrics_address).await.1, ready);
        send(payload).await;
        scrape_until(&metrics_address, done, |m| value(m, ready) > before).await;
    }
    let metrics = scrape_until(&metrics_address, "two handled, one dead letter", |m| {
        value(m, handled) == Some(2.0) && value(m, dead_letters) == Some(1.0)
    })
    .await;
    for (series, expected) in [
        (
            "switchyard_messages_received_total{component=\"tester\",topic=\"work\"}",
            3.0,
        ),
        (
            "switchyard_messages_sent_total{component=\"tester\",topic=\"announced\"}",
            1.0,
        ),
        (
            "switchyard_handler_failures_total{component=\"tester\",reason=\"error\"}",
            2.0,
        ),
        ("switchyard_retries_total{component=\"tester\"}", 1.0),
        ("switchyard_traps_total{component=\"tester\"}", 0.0),
        // Four calls: two that succeeded, and the failing message's two attempts.
        (
            "switchyard_handler_duration_seconds_count{component=\"tester\"}",
            4.0,
        ),
    ] {
        assert_eq!(
            value(&metrics, series),
            Some(expected),
            "{series}:\n{metrics}"
        );
    }

    // The counters keep moving with the run.
    for _ in 0..5 {
        send("ok").await;
    }
    scrape_until(&metrics_address, "seven handled", |m| {
        value(m, handled) == Some(7.0)
    })
    .await;

    // librdkafka reports the group's lag every few seconds: once the handled offsets are
    // committed, the partitions this member holds show nothing left to handle.
    let lag = "switchyard_consumer_lag{component=\"tester\",";
    scrape_until(&metrics_address, "the group's lag, at 0", |m| {
        let lags: Vec<&str> = m.lines().filter(|line| line.starts_with(lag)).collect();
        !lags.is_empty() && lags.iter().all(|line| line.ends_with(" 0"))
    })
    .await;

    // Anything but /metrics is not found, and says where the metrics are.
    let mut connection = tokio::net::TcpStream::connect(&metrics_address)
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        connection
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        connection.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        assert!(response.contains("/metrics"), "{response}");
    }
    drop(broker);

    let stdout = host.stop().await;
    assert!(
        stdout.contains(
            "tester: received 8, handled 7, retried 1, gave up 1 (1 dead-lettered), traps 0"
        ),
        "{stdout}"
    );
}
