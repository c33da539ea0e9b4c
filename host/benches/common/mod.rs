//! What the benchmarks share: one round of publishing and taking back messages through the
//! unified broker API, and medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_broker::{Broker, OutgoingMessage, StartPosition, SubscriptionSpec, TopicSpec};

/// Partitions of every topic a benchmark creates (the demo's topics have as many).
pub const PARTITIONS: i32 = 8;

/// A broker to measure, by name.
pub struct Case {
    /// How the table names it.
    pub name: String,
    /// The broker.
    pub broker: Arc<dyn Broker>,
}

/// One round of one case.
pub struct Sample {
    /// Messages over the time until the broker confirmed all of them.
    pub publish_per_s: f64,
    /// Messages over the time until the last was received and acknowledged.
    pub end_to_end_per_s: f64,
}

/// Subscribes a fresh group, publishes `messages` keyless messages of `payload_bytes`, and
/// takes them back, acknowledging each.
pub async fn run_once(
    case: &Case,
    round: usize,
    messages: usize,
    payload_bytes: usize,
) -> anyhow::Result<Sample> {
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
            guarantee: Default::default(),
            isolation: Default::default(),
        })
        .await?;
    let publisher = case.broker.publisher().await?;
    let payload = vec![b'x'; payload_bytes];

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

/// The middle value (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
