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

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::broker::embedded::EmbeddedKafka;
use switchyard::broker::kafka::Kafka;
use switchyard::broker::pubsub::{PubSub, PubSubConfig};
use switchyard::broker::pubsub_emulator::PubSubEmulator;
use switchyard::broker::{Broker, OutgoingMessage, StartPosition, SubscriptionSpec, TopicSpec};

const PAYLOAD_BYTES: usize = 1024;
const PARTITIONS: i32 = 8;

struct Case {
    name: String,
    broker: Arc<dyn Broker>,
}

struct Sample {
    publish_per_s: f64,
    end_to_end_per_s: f64,
}

async fn run_once(case: &Case, round: usize, messages: usize) -> anyhow::Result<Sample> {
    let slug: String = case
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let topic = format!("bench-{round}-{slug}");
    case.broker
        .ensure_topics(&[TopicSpec {
            name: topic.clone(),
            partitions: PARTITIONS,
        }])
        .await?;
    let subscriber = case
        .broker
        .subscribe(&SubscriptionSpec {
            group: format!("{topic}-group"),
            topics: vec![topic.clone()],
            start: StartPosition::Earliest,
        })
        .await?;
    let publisher = case.broker.publisher().await?;
    let payload = vec![b'x'; PAYLOAD_BYTES];

    let started = Instant::now();
    let receiving = {
        let subscriber = subscriber.clone();
        tokio::spawn(async move {
            for _ in 0..messages {
                subscriber.next().await?.ack()?;
            }
            anyhow::Ok(started.elapsed())
        })
    };
    let mut receipts = Vec::with_capacity(messages);
    for _ in 0..messages {
        receipts.push(
            publisher
                .publish(OutgoingMessage {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    ..OutgoingMessage::default()
                })
                .await?,
        );
    }
    for receipt in receipts {
        receipt.wait().await?;
    }
    let published = started.elapsed();
    let received = tokio::time::timeout(Duration::from_secs(600), receiving)
        .await
        .map_err(|_| anyhow::anyhow!("{}: messages did not all arrive in 600 s", case.name))???;
    subscriber.close().await?;
    Ok(Sample {
        publish_per_s: messages as f64 / published.as_secs_f64(),
        end_to_end_per_s: messages as f64 / received.as_secs_f64(),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

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
            let sample = run_once(case, round, messages).await?;
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
