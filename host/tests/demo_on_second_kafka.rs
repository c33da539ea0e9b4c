//! Proves the demo runs as a user runs it against a broker that outlives it: `switchyard demo
//! --broker kafka://HOST:PORT`, twice against the same standalone broker, first the embedded
//! one (`switchyard broker`'s), then a second, independent Kafka-protocol broker (Tansu; see
//! `switchyard_testing::second_kafka`) with no client settings at all. Each run answers every
//! request, once, and counts only its own predictions: its consumer is a new group that starts
//! where the predictions topic ends when the run starts, so its progress never passes the
//! number of images (it read the first run's predictions too, and said "2,000/1,000", before).
//! The classifier runs the strongest delivery the broker offers, and the summary says which:
//! at-least-once on `switchyard broker` (librdkafka's mock cluster keeps no transactional
//! offsets), exactly-once on the second broker (it keeps them).

mod support;

use support::TansuDefect;
use support::hosts::{self, Host, StandaloneBroker};

const IMAGES: u64 = 300;

/// The last line of a demo's progress: `predictions: 300/300 in 4s`.
fn final_progress(stderr: &[String]) -> &str {
    stderr
        .iter()
        .rev()
        .find(|line| line.starts_with("predictions: ") && line.contains(" in "))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no final progress line in {stderr:#?}"))
}

/// Two demo runs against `broker`, whose classifiers run with `delivery`; the second one's
/// progress is checked unless the broker has a defect that makes a new group read some of
/// the first run's predictions.
async fn run_the_demo_twice(broker: StandaloneBroker, test: &str, delivery: &str) {
    let components = support::components();
    for run in 1..=2 {
        let demo = Host::start(
            &format!("demo {run}"),
            &[
                "demo",
                "--broker",
                &broker.url,
                "--images",
                &IMAGES.to_string(),
                "--components",
                components.to_str().unwrap(),
            ],
        );
        let (status, stdout, stderr) = demo.finish_with_log().await;
        assert!(status.success(), "demo {run} failed: {stderr:#?}");
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().expect("the summary as the last line"))
                .unwrap_or_else(|e| {
                    panic!("demo {run}'s last line is not its JSON summary ({e}): {stdout}")
                });
        eprintln!("demo {run}: {summary}");
        assert_eq!(summary["images"], IMAGES, "demo {run}: {summary}");
        assert_eq!(summary["predictions"], IMAGES, "demo {run}: {summary}");
        assert_eq!(summary["duplicates"], 0, "demo {run}: {summary}");
        let ran = summary["delivery"].as_str().unwrap_or_default();
        assert!(ran.starts_with(delivery), "demo {run}: {summary}");
        let progress = final_progress(&stderr);
        let counted_only_its_own =
            progress.starts_with(&format!("predictions: {IMAGES}/{IMAGES} in"));
        let step = format!("the second run counts only its own predictions; it said {progress:?}");
        if run == 2
            && broker.second_kafka.as_ref().is_some_and(|second| {
                second.has(TansuDefect::LatestOffsetInsideLastBatch, test, &step)
            })
        {
            continue;
        }
        assert!(
            counted_only_its_own,
            "demo {run} counted other runs' predictions: {progress:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_twice_on_a_standalone_embedded_broker_and_counts_only_its_own_run() {
    let test = "the_demo_runs_twice_on_a_standalone_embedded_broker_and_counts_only_its_own_run";
    run_the_demo_twice(hosts::kafka().await, test, "at-least-once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_twice_on_the_second_kafka_broker_and_counts_only_its_own_run() {
    let test = "the_demo_runs_twice_on_the_second_kafka_broker_and_counts_only_its_own_run";
    let Some(broker) = hosts::second_kafka(test).await else {
        return;
    };
    run_the_demo_twice(broker, test, "exactly-once").await;
}
