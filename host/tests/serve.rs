//! Proves `switchyard run`'s lifecycle driven in-process through `serve`, with no process and
//! no signal: a manifest is started (on its own embedded broker), handles what arrives, and on
//! a stop request finishes, commits and returns each handler's counters (a failed message
//! dead-lettered, a good one handled); a second stop request while a handler is stuck in a call
//! ends the wait at once with `StoppedAgain`, and a stop that cannot finish ends at the stop
//! timeout with `StopTimedOut`; a manifest of commands alone ends without a stop request,
//! with how each command ended.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use switchyard_broker::OutgoingMessage;
use switchyard_runtime::serve::{self, ServeError, ServeOptions, Serving};

/// How long a test waits for what it expects before failing.
const WAIT: Duration = Duration::from_secs(60);

/// A manifest in `dir` with the test handler on `work` (two attempts, then `work.dlq`).
fn handler_manifest(dir: &Path) -> std::path::PathBuf {
    let manifest = dir.join("manifest.toml");
    std::fs::write(
        &manifest,
        format!(
            "[components.tester]\nwasm = {wasm:?}\nsubscribe = [\"work\"]\n\
             publish = [\"announced\"]\n\
             retry = {{ max_attempts = 2, backoff_ms = 10 }}\n",
            wasm = support::test_handler(),
        ),
    )
    .unwrap();
    manifest
}

/// Options with an admin socket of the test's own, so tests never share the default one.
fn options(dir: &Path, stop_timeout: Duration) -> ServeOptions {
    ServeOptions {
        admin_socket: Some(dir.join("admin.sock")),
        stop_timeout,
        ..ServeOptions::default()
    }
}

async fn publish(serving: &Serving, payload: &str) {
    let message = OutgoingMessage {
        topic: "work".into(),
        payload: payload.as_bytes().to_vec(),
        ..OutgoingMessage::default()
    };
    support::publish(serving.app().broker.broker.as_ref(), message).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_handles_until_stopped_and_returns_the_counters() {
    let dir = tempfile::tempdir().unwrap();
    let serving = Serving::start(
        &handler_manifest(dir.path()),
        options(dir.path(), Duration::from_secs(30)),
    )
    .await
    .expect("the manifest starts");
    let (stop, requests) = serve::stop_requests();
    for payload in ["ok", "error"] {
        publish(&serving, payload).await;
    }
    let mut settled = serving.app().handler("tester").unwrap().stats().settled();
    tokio::time::timeout(WAIT, settled.wait_for(|settled| *settled == 2))
        .await
        .expect("both messages are settled")
        .unwrap();
    let served = tokio::spawn(serving.serve(requests));
    stop.stop("the test");
    let served = tokio::time::timeout(WAIT, served)
        .await
        .expect("serve ends once asked to stop")
        .unwrap();
    assert!(served.failure.is_none(), "{:?}", served.failure);
    assert!(served.succeeded());
    assert_eq!(served.counts.len(), 1);
    let (name, counts) = &served.counts[0];
    assert_eq!(name, "tester");
    assert_eq!(
        counts.to_string(),
        "received 2, handled 1, retried 1, gave up 1 (1 dead-lettered), traps 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_request_or_the_timeout_ends_a_stop_that_hangs() {
    for second_request in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let serving = Serving::start(
            &handler_manifest(dir.path()),
            options(dir.path(), Duration::from_secs(2)),
        )
        .await
        .expect("the manifest starts");
        let broker = serving.app().broker.broker.clone();
        support::create_topics(broker.as_ref(), &["announced"]).await;
        let reader =
            support::member(broker.as_ref(), &support::unique("reader"), "announced").await;
        // The handler says it goes to sleep for a minute, in the middle of its call.
        publish(&serving, "announce announced 60000").await;
        tokio::time::timeout(WAIT, reader.next())
            .await
            .expect("the handler announces its sleep")
            .unwrap();
        reader.close().await.unwrap();
        drop(broker);

        let (stop, requests) = serve::stop_requests();
        let asked = Instant::now();
        stop.stop("the test");
        if second_request {
            stop.stop("the test, again");
        }
        let served = tokio::time::timeout(WAIT, serving.serve(requests))
            .await
            .expect("serve ends within its bound");
        let took = asked.elapsed();
        match (second_request, &served.failure) {
            (true, Some(ServeError::StoppedAgain("the test, again"))) => {
                assert!(took < Duration::from_secs(2), "at once: {took:?}");
            }
            (false, Some(ServeError::StopTimedOut(bound))) => {
                assert_eq!(*bound, Duration::from_secs(2));
                assert!(took < Duration::from_secs(10), "the bound holds: {took:?}");
            }
            (_, other) => panic!("second request {second_request}: {other:?}"),
        }
        assert!(!served.succeeded());
        assert_eq!(served.counts[0].1.received, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_of_commands_ends_by_itself_with_their_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.toml");
    std::fs::write(
        &manifest,
        format!(
            "[components.producer]\nwasm = {wasm:?}\npublish = [\"requests\"]\n\
             args = [\"--images\", \"/models/t10k-images-idx3-ubyte.gz\", \"--labels\", \
             \"/models/t10k-labels-idx1-ubyte.gz\", \"--topic\", \"requests\", \"--count\", \"5\"]\n\
             preopens = [{{ host = {models:?}, guest = \"/models\" }}]\n",
            wasm = support::component("producer"),
            models = support::models(),
        ),
    )
    .unwrap();
    let serving = Serving::start(&manifest, options(dir.path(), Duration::from_secs(30)))
        .await
        .expect("the manifest starts and its command runs");
    // No stop request: a host with nothing to serve stops by itself.
    let (_stop, requests) = serve::stop_requests();
    let served = tokio::time::timeout(WAIT, serving.serve(requests))
        .await
        .expect("serve ends by itself");
    assert!(served.succeeded(), "{served:?}");
    let [(name, Ok(outcome))] = served.commands.as_slice() else {
        panic!("one command that ran: {:?}", served.commands);
    };
    assert_eq!(name, "producer");
    assert_eq!((outcome.exit_code, outcome.delivered), (0, 5), "{outcome}");
}
