//! Broker throughput through the unified API, side by side in one run: the embedded Kafka
//! broker, and Google's Pub/Sub emulator with one streaming pull per subscription and with
//! several. The cases alternate round by round so that a noisy neighbour slows all of them
//! alike, and the table gives medians and ratios rather than absolute claims.
//!
//! Each case subscribes a fresh group, publishes N messages of 1 KiB without keys, and takes
//! them back, acknowledging each. "publish" is N over the time until the broker confirmed
//! every message; "end to end" is N over the time until the last one was received and
//! acknowledged.
//!
//! ```sh
//! cargo bench -p switchyard --bench broker_throughput            # N = 10000, 3 rounds
//! cargo bench -p switchyard --bench broker_throughput -- 20000 5  # N, rounds
//! ```

mod common;

use std::sync::Arc;

use common::{Case, Sample, median, run_once};
use switchyard_broker::kafka::EmbeddedKafka;
use switchyard_broker::kafka::Kafka;
use switchyard_broker::pubsub::PubSubEmulator;
use switchyard_broker::pubsub::{PubSub, PubSubConfig};

const PAYLOAD_BYTES: usize = 1024;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the numbers are ours.
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let messages = numbers.first().copied().unwrap_or(10_000);
    let rounds = numbers.get(1).copied().unwrap_or(3).max(1);

    let cluster = Arc::new(EmbeddedKafka::start(None).await?);
    let emulator = tokio::task::spawn_blocking(|| PubSubEmulator::start(None)).await??;
    let mut cases = vec![Case {
        name: "kafka (embedded)".into(),
        broker: Arc::new(Kafka::embedded(cluster.clone())),
    }];
    for streams in [1, 4] {
        let mut config = PubSubConfig::new("switchyard-bench");
        config.endpoint = Some(emulator.endpoint());
        config.anonymous = true;
        config.streams = streams;
        cases.push(Case {
            name: format!("pubsub emulator, streams={streams}"),
            broker: Arc::new(PubSub::connect(config).await?),
        });
    }

    eprintln!("{messages} messages of {PAYLOAD_BYTES} B per case, {rounds} round(s)");
    let mut samples: Vec<Vec<Sample>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (case, into) in cases.iter().zip(samples.iter_mut()) {
            let sample = run_once(case, round, messages, PAYLOAD_BYTES).await?;
            eprintln!(
                "  round {} {:<28} publish {:>8.0}/s  end to end {:>8.0}/s",
                round + 1,
                case.name,
                sample.publish_per_s,
                sample.end_to_end_per_s
            );
            into.push(sample);
        }
    }

    let medians: Vec<(f64, f64)> = samples
        .iter()
        .map(|case| {
            (
                median(case.iter().map(|s| s.publish_per_s).collect()),
                median(case.iter().map(|s| s.end_to_end_per_s).collect()),
            )
        })
        .collect();
    let baseline = medians[0].1;
    println!();
    println!(
        "| backend | publish (msg/s) | end to end (msg/s) | end to end vs {} |",
        cases[0].name
    );
    println!("| --- | ---: | ---: | ---: |");
    for (case, (publish, end_to_end)) in cases.iter().zip(&medians) {
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x |",
            case.name,
            publish,
            end_to_end,
            end_to_end / baseline
        );
    }
    println!("\nmedians of {rounds} round(s), {messages} messages each");
    Ok(())
}
