//! Proves scale-out with real processes against a standalone broker (the embedded Kafka broker
//! listening on TCP, and Google's Pub/Sub emulator): three `switchyard run` hosts of the same
//! classifier manifest share one consumer group (one subscription on Pub/Sub) and split the
//! work; one of them is killed with SIGKILL in the middle of the run and its share moves to the
//! other two, with every request answered. Each survivor's counters, printed when it stops,
//! show the part it handled. The producer, run by a fourth host whose standard error is a
//! pipe, reports its progress as plain lines: one while it sends, with the rate and the time
//! left, and one when it is done.

mod support;

use std::time::Duration;

use support::hosts::{self, Host, Pipeline, StandaloneBroker};

/// Requests the producer sends, and how fast: slow enough that the kill lands mid-run.
const REQUESTS: u64 = 3_000;
const RATE: u64 = 300;
/// Distinct predictions seen before one host is killed.
const KILL_AFTER: usize = 900;

/// Three hosts of one classifier (one worker each, so each is one member of the group), one
/// of them killed after [`KILL_AFTER`] predictions; returns the survivors' handled counts.
async fn three_hosts_share_the_work_and_survive_one_kill(broker: StandaloneBroker) -> (u64, u64) {
    let pipeline = Pipeline::new(broker.client.as_ref(), 4).await;
    let mut predictions = pipeline.predictions(broker.client.as_ref()).await;
    let classifier = pipeline.classifier(1);
    let mut hosts = Vec::new();
    for name in ["classifier A", "classifier B", "classifier C"] {
        hosts.push(Host::spawn(name, &classifier, &broker.url).running().await);
    }
    let mut producer = Host::spawn("producer", &pipeline.producer(REQUESTS, RATE), &broker.url);
    predictions.until(KILL_AFTER).await;
    hosts.pop().unwrap().kill().await;
    eprintln!(
        "killed classifier C after {} predictions",
        predictions.distinct()
    );
    predictions.until(REQUESTS as usize).await;
    // It sends for 10 s, so at least one line comes while it sends (every 5 s), then the last.
    let sending = producer.wait_for("producer: requests: ").await;
    assert!(
        sending.contains("/3,000 (") && sending.contains("/s, ETA "),
        "{sending}"
    );
    producer
        .wait_for("producer: requests: 3,000/3,000 in ")
        .await;
    producer.exit().await;
    predictions.until_quiet(Duration::from_secs(2)).await;
    assert!(
        predictions.answers_exactly(REQUESTS),
        "every request answered, and nothing else"
    );
    eprintln!("{} duplicates", predictions.duplicates());

    let b = hosts.pop().unwrap().stop().await;
    let a = hosts.pop().unwrap().stop().await;
    let (a, b) = (
        hosts::handled(&a, "classifier"),
        hosts::handled(&b, "classifier"),
    );
    eprintln!("classifier A handled {a}, classifier B {b}");
    // Both took part...
    for handled in [a, b] {
        assert!(handled >= REQUESTS / 10, "A handled {a}, B {b}");
    }
    // ...and between them they handled all that was left when C died, C's share included.
    assert!(
        a + b >= REQUESTS - KILL_AFTER as u64,
        "A handled {a}, B {b}"
    );
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_hosts_of_one_group_split_the_work_and_take_over_a_killed_ones_share() {
    three_hosts_share_the_work_and_survive_one_kill(hosts::kafka().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_hosts_of_one_subscription_split_the_work_and_take_over_a_killed_ones_share() {
    three_hosts_share_the_work_and_survive_one_kill(hosts::pubsub().await).await;
}
