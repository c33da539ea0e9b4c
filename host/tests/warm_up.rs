//! Proves `switchyard:host/warm-up` with the test handler (components/test-handler, whose
//! `--warm-up MODE` argument says what its warm-up does) on the embedded Kafka broker:
//! - every worker's first instance is made and warmed up before the handler counts as joined,
//!   and the first message finds its instance warmed once and fresh (no message before it);
//! - a warm-up that fails (an `error`, a trap, or a send, which the host refuses there) costs
//!   no instance's start: the handler still joins, and its messages fail with the reason and
//!   go to the dead-letter topic, nothing else lost or stuck.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_broker::dead_letter as dlq;
use switchyard_runtime::manifest::{ComponentConfig, RetryPolicy};

const WAIT: Duration = Duration::from_secs(60);

fn handler(input: &str, output: &str, warm_up: &str) -> ComponentConfig {
    ComponentConfig {
        subscribe: vec![input.into()],
        group: Some(support::unique("g")),
        publish: vec![output.into()],
        args: vec!["--warm-up".into(), warm_up.into()],
        workers: 2,
        retry: RetryPolicy {
            max_attempts: 2,
            backoff_ms: 10,
        },
        ..ComponentConfig::new(support::test_handler())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_means_every_worker_has_warmed_up_and_the_first_message_waits_for_none() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output, reader, runtime) = support::handler_setup(&broker).await;
    const WARM_UP_MS: u64 = 1_500;
    let loaded = runtime
        .load(
            "warming",
            &handler(&input, &output, &format!("sleep {WARM_UP_MS}")),
        )
        .unwrap();
    let started = Instant::now();
    let running = runtime.start_handler(&loaded).await.unwrap();
    running.joined().await.unwrap();
    // Both workers sleep in their warm-ups at once; joined returned after them, not before.
    assert!(
        started.elapsed() >= Duration::from_millis(WARM_UP_MS),
        "joined after {:?}, before the warm-ups ended",
        started.elapsed()
    );

    support::publish_text(broker.as_ref(), &input, &format!("warmed {output}")).await;
    let reply = support::receive(reader.as_ref(), "the warm-up count").await;
    assert_eq!(
        String::from_utf8_lossy(&reply.message.payload),
        "1 0",
        "one warm-up, and no message before this one"
    );
    reply.ack().unwrap();
    running.stop().await.unwrap();
    reader.close().await.unwrap();
}

/// A handler whose warm-up does `mode` joins all the same; a message then fails with
/// `reason` and is dead-lettered.
async fn a_failed_warm_up_fails_messages_with(mode: &str, reason: &str) {
    let (_cluster, broker) = support::embedded().await;
    let (input, output, reader, runtime) = support::handler_setup(&broker).await;
    let loaded = runtime
        .load(
            "failing",
            &handler(&input, &output, &mode.replace("OUT", &output)),
        )
        .unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    tokio::time::timeout(WAIT, running.joined())
        .await
        .unwrap_or_else(|_| panic!("{mode}: a failed warm-up does not stop the join"))
        .unwrap();
    support::publish_text(broker.as_ref(), &input, "ok").await;

    let dead_letters = format!("{input}.dlq");
    let letters = support::member(broker.as_ref(), &support::unique("dlq"), &dead_letters).await;
    let letter = support::receive(letters.as_ref(), "the dead letter").await;
    let error = letter
        .message
        .headers
        .iter()
        .find(|(name, _)| name == dlq::ERROR)
        .map(|(_, error)| error.clone())
        .unwrap_or_default();
    assert!(
        error.contains("warm-up") && error.contains(reason),
        "{mode}: {error}"
    );
    assert_eq!(letter.message.payload, b"ok");
    letter.ack().unwrap();
    let stats = Arc::clone(running.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 1))
        .await
        .expect("the message settled")
        .unwrap();
    // Nothing the warm-up tried to send went out.
    let sent = support::drain(reader.as_ref(), Duration::from_secs(1)).await;
    assert!(sent.is_empty(), "{mode}: sent {sent:?}");
    running.stop().await.unwrap();
    letters.close().await.unwrap();
    reader.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_error_fails_the_messages_with_it() {
    a_failed_warm_up_fails_messages_with("error", "asked to fail its warm-up").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_trap_fails_the_messages_with_it() {
    a_failed_warm_up_fails_messages_with("trap", "trapped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_during_warm_up_is_refused() {
    a_failed_warm_up_fails_messages_with("send OUT", "during warm-up").await;
}
