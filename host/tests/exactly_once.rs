//! Proves exactly-once handlers (`delivery = "exactly-once"` in a manifest entry) with the
//! test handler (components/test-handler) over real connections, on the second Kafka-protocol
//! broker (Tansu, or the cluster `KAFKA_BOOTSTRAP` names), the one broker here that keeps the
//! offsets a transaction commits:
//! - what a failed attempt sent is never seen: only the attempt that succeeded has outputs,
//!   where an at-least-once handler's failed attempts each publish theirs (handler_delivery.rs
//!   shows "1", "2", "3" for the same message);
//! - a dead letter commits with its original's acknowledgement;
//! - a batch commits as a whole: calls share messages, and when one of a call's messages fails
//!   the call commits nothing and its other messages go again alone, so every output is seen
//!   once;
//! - the outputs commit with the group's offsets: the next host of the group starts after the
//!   messages handled, and receives only what came since;
//! - the broker that cannot keep the promise refuses to start the handler, saying why: the
//!   embedded broker (librdkafka's mock cluster stores no transactional offsets);
//! - on Pub/Sub (the emulator), with its exactly-once delivery: only the attempt that
//!   succeeded has outputs, the dead letter is stored, and a message whose acknowledgement
//!   was confirmed never comes again, not even to the subscription's next host;
//! - with real processes: the real classifier's host (`switchyard run`), answering 10,000
//!   paced requests, killed with SIGKILL twice mid-run and restarted each time, answers every
//!   request, and exactly-once leaves no duplicate prediction, where the same run at-least-once
//!   (beside it, on the same broker) leaves the dead hosts' uncommitted work twice. Tansu shows
//!   the records of aborted transactions to `read_committed` readers, so the copies a killed
//!   host wrote in its last, open transaction (aborted when its successor took its
//!   transactional id) are told apart by their `switchyard-transaction` header and counted
//!   apart: a duplicate is a second copy from a transaction that committed;
//! - the same two kills on Pub/Sub, at-least-once and with its exactly-once delivery: every
//!   request answered, the duplicates of each reported side by side, exactly-once's at most
//!   what the killed hosts held.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::hosts::{self, Host, Pipeline, Predictions, StandaloneBroker};

use switchyard_broker::kafka::Kafka;
use switchyard_broker::{Broker, ErrorKind, Subscriber};
use switchyard_runtime::manifest::{ComponentConfig, DeliveryGuarantee, RetryPolicy};
use switchyard_runtime::{HandlerGroup, LoadedComponent, Runtime, RuntimeError, RuntimeOptions};

const WAIT: Duration = Duration::from_secs(60);

fn exactly_once(input: &str, output: &str, group: &str, retry: RetryPolicy) -> ComponentConfig {
    ComponentConfig {
        subscribe: vec![input.into()],
        group: Some(group.into()),
        publish: vec![output.into()],
        retry,
        delivery: DeliveryGuarantee::ExactlyOnce,
        ..ComponentConfig::new(support::test_handler())
    }
}

/// Everything a reader of `topic` (reading committed data, librdkafka's default) receives
/// until `topic` has been quiet for a few seconds.
async fn read_all(broker: &dyn Broker, topic: &str) -> Vec<String> {
    support::read_all(broker, topic, Duration::from_secs(8)).await
}

/// An exactly-once handler of a new group running on the second Kafka broker, between an
/// input and an output topic of its own, joined to its group.
struct Started {
    _second: support::SecondKafka,
    broker: Arc<dyn Broker>,
    input: String,
    output: String,
    runtime: Runtime,
    loaded: LoadedComponent,
    running: HandlerGroup,
}

/// Starts the handler `configure(input, output)` describes; `None` without a second broker.
async fn start_on_second_kafka(
    test: &str,
    configure: impl FnOnce(&str, &str) -> ComponentConfig,
) -> Option<Started> {
    let second = support::second_kafka(test)?;
    let broker: Arc<dyn Broker> = Arc::new(Kafka::connect(second.kafka_config()).await.unwrap());
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let loaded = runtime
        .load("exactly-once", &configure(&input, &output))
        .unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    running.joined().await.unwrap();
    Some(Started {
        _second: second,
        broker,
        input,
        output,
        runtime,
        loaded,
        running,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_attempt_that_succeeded_is_seen_and_the_next_host_starts_after_it() {
    let retry = RetryPolicy {
        max_attempts: 3,
        backoff_ms: 10,
    };
    let Some(Started {
        _second,
        broker,
        input,
        output,
        runtime,
        loaded,
        running,
    }) = start_on_second_kafka("exactly_once_handlers", |input, output| {
        exactly_once(input, output, &support::unique("g"), retry)
    })
    .await
    else {
        return;
    };
    let dead_letters = format!("{input}.dlq");

    // Sends its attempt number each time, and fails until the third.
    support::publish_text(broker.as_ref(), &input, &format!("attempt {output} 3")).await;
    // Fails all three attempts: a dead letter.
    support::publish_text(broker.as_ref(), &input, "error").await;
    let stats = Arc::clone(running.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 2))
        .await
        .expect("both messages settled")
        .unwrap();
    assert_eq!(stats.snapshot().handled, 1);
    running.stop().await.unwrap();

    assert_eq!(
        read_all(broker.as_ref(), &output).await,
        ["3"],
        "the failed attempts' outputs were dropped"
    );
    assert_eq!(
        read_all(broker.as_ref(), &dead_letters).await,
        ["error"],
        "the dead letter committed"
    );

    // The next host of the group: the two messages are behind the committed offsets, so it
    // handles only what is sent now.
    support::publish_text(broker.as_ref(), &input, &format!("echo {output}")).await;
    let next = runtime.start_handler(&loaded).await.unwrap();
    let stats = Arc::clone(next.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 1))
        .await
        .expect("the new message settled")
        .unwrap();
    // Anything redelivered would settle too: a second settlement within a few seconds fails.
    let mut settled = stats.settled();
    let redelivered =
        tokio::time::timeout(Duration::from_secs(3), settled.wait_for(|n| *n >= 2)).await;
    assert!(redelivered.is_err(), "a handled message came again");
    next.stop().await.unwrap();
    let counts = stats.snapshot();
    assert_eq!(
        (counts.handled, counts.retried),
        (1, 0),
        "only the new message"
    );
    assert_eq!(
        read_all(broker.as_ref(), &output).await,
        ["3", &format!("echo {output}")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_as_a_whole_and_its_outputs_are_seen_once() {
    let retry = RetryPolicy {
        max_attempts: 1,
        backoff_ms: 10,
    };
    let Some(Started {
        _second,
        broker,
        input,
        output,
        loaded,
        running,
        ..
    }) = start_on_second_kafka("exactly_once_batches", |input, output| ComponentConfig {
        batch: 8,
        batch_max_wait_ms: 1_000,
        ..exactly_once(input, output, &support::unique("g"), retry)
    })
    .await
    else {
        return;
    };
    assert!(loaded.takes_batches());

    // Sent at once, so they share calls: "batch" answers with its call's size, "error" fails
    // (and, one attempt allowed, becomes a dead letter), the echoes answer with themselves.
    for payload in ["batch", "batch", "batch"] {
        support::publish_text(broker.as_ref(), &input, &format!("{payload} {output}")).await;
    }
    let stats = Arc::clone(running.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 3))
        .await
        .expect("the batch settled")
        .unwrap();
    for payload in [
        "echo {output} a",
        "echo {output} b",
        "error",
        "echo {output} c",
    ] {
        support::publish_text(
            broker.as_ref(),
            &input,
            &payload.replace("{output}", &output),
        )
        .await;
    }
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 7))
        .await
        .expect("the second batch settled")
        .unwrap();
    running.stop().await.unwrap();
    assert_eq!(stats.snapshot().handled, 6);

    let mut seen = read_all(broker.as_ref(), &output).await;
    let sizes: Vec<usize> = seen
        .iter()
        .filter_map(|payload| payload.parse().ok())
        .collect();
    // Each message answers with its call's size: a call of n gives n answers "n".
    assert_eq!(sizes.len(), 3, "one answer per message: {seen:?}");
    for size in &sizes {
        let answers = sizes.iter().filter(|other| *other == size).count();
        assert_eq!(answers % size, 0, "whole calls only: {sizes:?}");
    }
    assert!(
        sizes.iter().any(|&size| size > 1),
        "calls shared: {sizes:?}"
    );
    seen.retain(|payload| payload.parse::<usize>().is_err());
    seen.sort();
    assert_eq!(
        seen,
        ["a", "b", "c"].map(|name| format!("echo {output} {name}")),
        "each echo once, although its first call failed with \"error\" and committed nothing"
    );
}

/// Starting an exactly-once handler on `broker` fails; the error says why.
async fn refused(broker: Arc<dyn Broker>) -> RuntimeError {
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let config = exactly_once(
        &input,
        &output,
        &support::unique("g"),
        RetryPolicy::default(),
    );
    let runtime = Runtime::new(broker, RuntimeOptions::default())
        .await
        .unwrap();
    let loaded = runtime.load("exactly-once", &config).unwrap();
    match runtime.start_handler(&loaded).await {
        Ok(_) => panic!("an exactly-once handler started where it cannot be exactly-once"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_exactly_once_handlers() {
    let (_cluster, embedded) = support::embedded().await;
    let error = refused(embedded).await;
    let RuntimeError::Broker(broker_error) = &error else {
        panic!("a broker error: {error:#}");
    };
    assert_eq!(broker_error.kind(), ErrorKind::Config, "{error:#}");
    assert!(error.to_string().contains("transaction"), "{error:#}");
}

/// What `reader` (subscribed before anything was sent) receives until nothing comes for a few
/// seconds, sorted.
async fn drain(reader: &dyn Subscriber) -> Vec<String> {
    let mut seen = support::drain(reader, Duration::from_secs(5)).await;
    seen.sort();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_pubsub_only_the_attempt_that_succeeded_is_seen_and_a_handled_message_never_comes_again()
{
    let broker = support::pubsub().await;
    let (input, output, group) = (
        support::unique("in"),
        support::unique("out"),
        support::unique("g"),
    );
    let dead_letters = format!("{input}.dlq");
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let reader = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let retry = RetryPolicy {
        max_attempts: 3,
        backoff_ms: 10,
    };
    let loaded = runtime
        .load(
            "exactly-once",
            &exactly_once(&input, &output, &group, retry),
        )
        .unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    running.joined().await.unwrap();
    // The handler created the dead-letter topic with a subscription of its name, which keeps
    // its dead letters until read.
    let dead_letter_reader = support::member(broker.as_ref(), &dead_letters, &dead_letters).await;

    support::publish_text(broker.as_ref(), &input, &format!("attempt {output} 3")).await;
    support::publish_text(broker.as_ref(), &input, "error").await;
    let stats = Arc::clone(running.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 2))
        .await
        .expect("both messages settled")
        .unwrap();
    assert_eq!(stats.snapshot().handled, 1);
    assert_eq!(
        drain(reader.as_ref()).await,
        ["3"],
        "the failed attempts' outputs were dropped"
    );
    assert_eq!(drain(dead_letter_reader.as_ref()).await, ["error"]);
    running.stop().await.unwrap();

    // The next host of the subscription: the confirmed messages never come again (past the
    // ack deadline, when the emulator delivers acknowledged messages again to an
    // at-least-once subscription whose member left), only what is sent now.
    let next = runtime.start_handler(&loaded).await.unwrap();
    support::publish_text(broker.as_ref(), &input, &format!("echo {output}")).await;
    let stats = Arc::clone(next.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 1))
        .await
        .expect("the new message settled")
        .unwrap();
    let mut settled = stats.settled();
    let redelivered =
        tokio::time::timeout(Duration::from_secs(15), settled.wait_for(|n| *n >= 2)).await;
    assert!(redelivered.is_err(), "a confirmed message came again");
    next.stop().await.unwrap();
    assert_eq!(drain(reader.as_ref()).await, [format!("echo {output}")]);
    reader.close().await.unwrap();
    dead_letter_reader.close().await.unwrap();
}

/// Requests of a crash run, how fast the producer sends them, and after how many answered
/// requests each of the two kills lands.
const CRASH_REQUESTS: u64 = 10_000;
const CRASH_RATE: u64 = 500;
const KILLS_AFTER: [usize; 2] = [2_500, 6_000];

/// What a crash run left on the predictions topic.
#[derive(Debug)]
struct CrashOutcome {
    /// Copies of a request's prediction beyond its first, from transactions that committed
    /// (at-least-once: all copies beyond the first).
    duplicates: usize,
    /// Copies written in transactions that were aborted (exactly-once only), which a reader
    /// that honours transaction markers never sees.
    aborted_copies: usize,
    /// From each restarted host's start to the first prediction after it.
    resumed_after: Vec<Duration>,
}

/// The transactions that were aborted. Candidates: the last transaction of every producer
/// session but the last (a killed host's open transaction, aborted when its successor took
/// its transactional id, or committed just before the kill), and every one a host said it
/// aborted. Tansu shows a transaction's records before it ends, so what a candidate wrote
/// does not say whether it committed; what came after does: its requests were all handled
/// again if it was aborted (their offsets did not commit), and none was if it committed. A
/// candidate with any request handled again counts as aborted; were only some handled again,
/// the others would be left with no committed answer, which the caller fails on.
fn aborted_transactions(predictions: &Predictions, logs: &[String]) -> HashSet<String> {
    // Each transaction's requests, and the last N of each TRANSACTIONAL_ID/SESSION.
    let mut requests_of: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut last_of_session: HashMap<(&str, u128), u64> = HashMap::new();
    for (request, answers) in predictions.answers() {
        for tag in answers
            .iter()
            .filter_map(|answer| answer.transaction.as_deref())
        {
            requests_of.entry(tag).or_default().push(request);
            let mut parts = tag.rsplitn(3, '/');
            let number: u64 = parts.next().and_then(|n| n.parse().ok()).expect(tag);
            let session: u128 = parts.next().and_then(|s| s.parse().ok()).expect(tag);
            let id = parts.next().expect(tag);
            let last = last_of_session.entry((id, session)).or_default();
            *last = (*last).max(number);
        }
    }
    let latest = last_of_session.keys().map(|(_, session)| *session).max();
    let mut candidates: HashSet<String> = last_of_session
        .into_iter()
        .filter(|((_, session), _)| Some(*session) != latest)
        .map(|((id, session), number)| format!("{id}/{session}/{number}"))
        .collect();
    candidates.extend(logs.iter().filter_map(|line| {
        let (_, rest) = line.split_once("aborted transaction ")?;
        rest.split_whitespace().next().map(str::to_string)
    }));
    let handled_again = |tag: &str, request: &str| {
        predictions.answers()[request].iter().any(|answer| {
            answer
                .transaction
                .as_deref()
                .is_some_and(|other| other != tag)
        })
    };
    candidates
        .into_iter()
        .filter(|tag| {
            requests_of
                .get(tag.as_str())
                .is_some_and(|requests| requests.iter().any(|r| handled_again(tag, r)))
        })
        .collect()
}

/// The classifier's host with `delivery`, killed with SIGKILL after each of [`KILLS_AFTER`]
/// answered requests, down for [`hosts::DOWNTIME`] and started again, while the producer sends
/// [`CRASH_REQUESTS`]; then every request is counted.
async fn kill_the_classifier_twice(broker: &StandaloneBroker, delivery: &str) -> CrashOutcome {
    let pipeline = Pipeline::new(broker.client.as_ref(), 4).await;
    let mut predictions = pipeline.predictions(broker.client.as_ref()).await;
    let manifest = pipeline.classifier_delivering(2, delivery);
    let name = format!("classifier ({delivery})");
    let mut host = Host::spawn(&name, &manifest, &broker.url).running().await;
    let producer = Host::spawn(
        "producer",
        &pipeline.producer(CRASH_REQUESTS, CRASH_RATE),
        &broker.url,
    );
    let mut logs = Vec::new();
    let mut resumed_after = Vec::new();
    let mut restarted: Option<Instant> = None;
    for (kill, after) in KILLS_AFTER.into_iter().enumerate() {
        let (_, first) = predictions.until(after).await;
        if let Some(restarted) = restarted {
            resumed_after.push(
                first
                    .expect("a prediction")
                    .saturating_duration_since(restarted),
            );
        }
        logs.extend(host.kill_with_log().await);
        eprintln!(
            "{delivery}: killed the classifier after {} answered requests",
            predictions.distinct()
        );
        tokio::time::sleep(hosts::DOWNTIME).await;
        predictions.drain();
        restarted = Some(Instant::now());
        host = Host::spawn(
            &format!("{name}, restart {}", kill + 1),
            &manifest,
            &broker.url,
        )
        .running()
        .await;
    }
    let (_, first) = predictions.until(CRASH_REQUESTS as usize).await;
    if let Some(restarted) = restarted {
        resumed_after.push(
            first
                .expect("a prediction")
                .saturating_duration_since(restarted),
        );
    }
    producer.exit().await;
    predictions.until_quiet(Duration::from_secs(5)).await;
    host.send_signal(libc::SIGTERM);
    let (status, stdout, log) = host.finish_with_log().await;
    assert!(status.success(), "{name}: {status}: {stdout}");
    logs.extend(log);
    assert!(
        predictions.answers_exactly(CRASH_REQUESTS),
        "{delivery}: every request answered, and nothing else"
    );

    // Kafka's exactly-once writes in transactions, each output tagged with its own; Pub/Sub's
    // has none.
    let transactional = delivery == "exactly-once" && broker.url.starts_with("kafka");
    let aborted = match transactional {
        true => aborted_transactions(&predictions, &logs),
        false => HashSet::new(),
    };
    let (mut duplicates, mut aborted_copies) = (0, 0);
    for (request, answers) in predictions.answers() {
        let committed = answers
            .iter()
            .filter(|answer| {
                let from_aborted = answer
                    .transaction
                    .as_ref()
                    .is_some_and(|tag| aborted.contains(tag));
                aborted_copies += usize::from(from_aborted);
                !from_aborted
            })
            .count();
        assert!(
            committed >= 1,
            "{delivery}: {request} has no committed answer: {answers:?}"
        );
        duplicates += committed - 1;
    }
    if transactional {
        assert!(
            predictions
                .answers()
                .values()
                .flatten()
                .all(|answer| answer.transaction.is_some()),
            "every prediction names its transaction"
        );
    }
    CrashOutcome {
        duplicates,
        aborted_copies,
        resumed_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classifier_killed_twice_mid_run_answers_every_request_once_exactly_once() {
    let test = "a_classifier_killed_twice_mid_run_answers_every_request_once_exactly_once";
    let Some(second) = support::hosts::second_kafka(test).await else {
        return;
    };
    // At-least-once on the embedded broker over TCP (the mock `switchyard broker` runs, which
    // cannot run exactly-once) and on the second broker, then exactly-once on the second.
    let embedded = support::hosts::kafka().await;
    let at_least_once_embedded = kill_the_classifier_twice(&embedded, "at-least-once").await;
    let at_least_once = kill_the_classifier_twice(&second, "at-least-once").await;
    let exactly_once = kill_the_classifier_twice(&second, "exactly-once").await;
    eprintln!(
        "{CRASH_REQUESTS} requests at {CRASH_RATE}/s, the classifier killed twice:\n  \
         embedded broker, at-least-once: {at_least_once_embedded:?}\n  \
         {url}, at-least-once: {at_least_once:?}\n  \
         {url}, exactly-once:  {exactly_once:?}",
        url = second.url
    );
    for (run, outcome) in [
        ("embedded, at-least-once", &at_least_once_embedded),
        ("second, at-least-once", &at_least_once),
        ("second, exactly-once", &exactly_once),
    ] {
        eprintln!(
            "{run}: the restarted hosts' first predictions came {:?} after they started",
            outcome.resumed_after
        );
    }
    assert_eq!(
        exactly_once.duplicates, 0,
        "exactly-once: a prediction committed twice: {exactly_once:?}"
    );
    // At-least-once: what each dead host handled since its last offset commit (every second)
    // comes again. On the embedded broker, where a restarted host resumes within 3 s, that is
    // under two seconds of requests per kill. On Tansu a join takes 11.5 s, so the second kill
    // lands about 2 s after the first restarted host joined, while it works through the 3,500
    // requests that queued meanwhile, most of them handled and not yet committed (measured
    // 4,332 to 5,050 duplicates): reported, not asserted.
    assert!(
        at_least_once_embedded.duplicates <= KILLS_AFTER.len() * 2 * CRASH_RATE as usize,
        "{at_least_once_embedded:?}"
    );
    for outcome in [&at_least_once_embedded, &at_least_once] {
        assert_eq!(outcome.aborted_copies, 0, "{outcome:?}");
    }
}

/// Pub/Sub's exactly-once delivery, with the same two kills: every request is answered, and
/// the duplicates are counted beside at-least-once's on the same emulator. Not asserted to be
/// none: Pub/Sub has no transactions, so what a killed host published and had not yet
/// confirmed is handled and sent again (the README's "Exactly-once delivery on Pub/Sub").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_pubsub_a_classifier_killed_twice_mid_run_answers_every_request() {
    let pubsub = support::hosts::pubsub().await;
    let at_least_once = kill_the_classifier_twice(&pubsub, "at-least-once").await;
    let exactly_once = kill_the_classifier_twice(&pubsub, "exactly-once").await;
    eprintln!(
        "{CRASH_REQUESTS} requests at {CRASH_RATE}/s on the Pub/Sub emulator, the classifier \
         killed twice:\n  at-least-once: {at_least_once:?}\n  exactly-once:  {exactly_once:?}"
    );
    for outcome in [&at_least_once, &exactly_once] {
        assert_eq!(outcome.aborted_copies, 0, "{outcome:?}");
    }
    // A message confirmed never comes again, so what a killed host leaves twice is at most
    // what it held (its streams' outstanding messages). At-least-once is bounded by nothing
    // of the kind on the emulator, which delivers acknowledged messages again once a member
    // has died (measured 3,524 here against exactly-once's 28): reported, not asserted.
    let config = switchyard_broker::pubsub::PubSubConfig::new("p");
    let held = config.streams * usize::try_from(config.max_outstanding_messages).unwrap();
    assert!(
        exactly_once.duplicates <= KILLS_AFTER.len() * held,
        "exactly-once: more duplicates than two killed hosts held: {exactly_once:?}"
    );
}
