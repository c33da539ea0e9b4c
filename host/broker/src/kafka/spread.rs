//! Where a keyless message goes on the embedded broker: runs of [`RUN_BYTES`] to one
//! partition, then the next partition, round the topic.
//!
//! Why the publisher chooses rather than librdkafka. librdkafka sends keyless messages either
//! each to a partition of its own choosing (`sticky.partitioning.linger.ms` = 0), which makes
//! batches of about one message, or for a span of time to one partition (sticky), with no
//! bound on how much lands there. On the embedded broker (librdkafka's mock cluster) both
//! hurt: its fetch finds a batch by walking the partition's batches from the oldest (15 % of
//! the demo's CPU at one message per batch, BENCHMARKS.md), and it keeps 5 MiB per partition,
//! dropping the oldest beyond that, read or not (1 ms of stickiness put 4.8 MiB of a 12 MiB
//! burst into one partition of 8). Runs bounded in bytes, as Kafka's Java producer bounds its
//! sticky partitioner (KIP-794), keep batches large and give every partition its share to
//! within one run.
//!
//! rdkafka's `FutureProducer` hands librdkafka no custom partitioner, so the publisher names
//! the partition of each keyless message itself, from the topic's partition count: looked up
//! when the topic's first message is published (which waits for it), and again in the
//! background every [`REFRESH_AFTER`]. For a topic the broker does not know yet, and for
//! messages published while the first lookup is under way, librdkafka chooses.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, Producer};

use super::errors::ClientErrors;

/// How many bytes of keyless messages go to one partition before the next takes over:
/// Kafka's Java producer switches after `batch.size`, 16 KiB by default.
pub(super) const RUN_BYTES: usize = 16 * 1024;

/// How long a topic's partition count is used before it is looked up again (partitions can
/// be added to a topic; librdkafka refreshes its own metadata every 5 minutes).
const REFRESH_AFTER: Duration = Duration::from_secs(60);

/// How soon a topic whose count could not be had is looked up again (the broker may create
/// it on its first message).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The current run of each topic's keyless messages.
pub(super) struct KeylessSpread {
    topics: Mutex<HashMap<String, TopicRuns>>,
    /// Where a topic's first run starts, so that producers do not all start on partition 0.
    first: RandomState,
}

/// One topic's runs.
struct TopicRuns {
    /// The topic's partition count once known; always positive (`learned` keeps no other).
    partitions: Option<i32>,
    /// When to look the count up again; `None` while a lookup is under way.
    look_up_at: Option<Instant>,
    partition: i32,
    bytes_in_run: usize,
}

impl TopicRuns {
    /// The partition of the next message of `size` bytes, once the count is known.
    fn place(&mut self, size: usize) -> Option<i32> {
        let partitions = self.partitions?;
        if self.bytes_in_run >= RUN_BYTES {
            self.partition = (self.partition + 1) % partitions;
            self.bytes_in_run = 0;
        }
        self.bytes_in_run += size;
        Some(self.partition)
    }
}

/// What the publisher does with a keyless message.
pub(super) struct Placement {
    /// The partition to send it to; `None` leaves the choice to librdkafka.
    pub(super) partition: Option<i32>,
    /// Whether the publisher should look up the topic's partition count.
    pub(super) look_up: LookUp,
}

/// Whether the publisher looks up a topic's partition count, and how.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LookUp {
    /// Not now: the count is fresh, or a lookup is under way.
    No,
    /// The topic's first message: the publisher waits for the count before placing it, so
    /// that a burst sent at once is spread too: the lookup is a round trip to the broker
    /// (52 ms measured while the producer's connection was new), longer than publishing a
    /// burst of 12,000 messages takes.
    First,
    /// The count is old: the publisher looks it up in the background.
    Refresh,
}

impl KeylessSpread {
    pub(super) fn new() -> Self {
        Self {
            topics: Mutex::new(HashMap::new()),
            first: RandomState::new(),
        }
    }

    /// Where the next keyless message of `size` bytes to `topic` goes.
    pub(super) fn place(&self, topic: &str, size: usize) -> Placement {
        let now = Instant::now();
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(runs) = topics.get_mut(topic) else {
            topics.insert(
                topic.to_string(),
                TopicRuns {
                    partitions: None,
                    look_up_at: None,
                    partition: 0,
                    bytes_in_run: 0,
                },
            );
            return Placement {
                partition: None,
                look_up: LookUp::First,
            };
        };
        let look_up = if runs.look_up_at.is_some_and(|at| now >= at) {
            runs.look_up_at = None;
            LookUp::Refresh
        } else {
            LookUp::No
        };
        Placement {
            partition: runs.place(size),
            look_up,
        }
    }

    /// Records the outcome of a lookup of `topic`'s partition count.
    pub(super) fn learned(&self, topic: &str, partitions: Option<i32>) {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(runs) = topics.get_mut(topic) else {
            return;
        };
        let partitions = partitions.filter(|&count| count > 0);
        runs.look_up_at = Some(
            Instant::now()
                + if partitions.is_some() {
                    REFRESH_AFTER
                } else {
                    RETRY_AFTER
                },
        );
        if let Some(count) = partitions {
            if runs.partitions.is_none() {
                let start = self.first.hash_one(topic) % count.unsigned_abs() as u64;
                runs.partition = i32::try_from(start).unwrap_or(0);
                runs.bytes_in_run = 0;
            } else if runs.partition >= count {
                runs.partition = 0;
            }
        }
        runs.partitions = partitions;
    }

    /// Forgets `topic`'s count, after the broker said a partition it named does not exist
    /// (the topic was made again with fewer): librdkafka chooses until a new lookup.
    pub(super) fn forget(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(runs) = topics.get_mut(topic) {
            runs.partitions = None;
            if runs.look_up_at.is_some() {
                runs.look_up_at = Some(Instant::now());
            }
        }
    }

    /// Looks up `topic`'s partition count on a blocking thread and records it; the handle
    /// says when it is recorded.
    pub(super) fn look_up(
        self: &std::sync::Arc<Self>,
        producer: &FutureProducer<ClientErrors>,
        topic: &str,
    ) -> tokio::task::JoinHandle<()> {
        let (spread, producer, topic) = (self.clone(), producer.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let count = match producer
                .client()
                .fetch_metadata(Some(&topic), LOOKUP_TIMEOUT)
            {
                Ok(metadata) => metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .and_then(|t| i32::try_from(t.partitions().len()).ok()),
                Err(e) => {
                    tracing::debug!("looking up the partitions of {topic:?}: {e}");
                    None
                }
            };
            spread.learned(&topic, count);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(spread: &KeylessSpread, topic: &str, messages: usize, size: usize) -> Vec<usize> {
        let mut per_partition = Vec::new();
        for _ in 0..messages {
            let partition = spread.place(topic, size).partition.expect("count known");
            let partition = usize::try_from(partition).unwrap();
            if per_partition.len() <= partition {
                per_partition.resize(partition + 1, 0);
            }
            per_partition[partition] += 1;
        }
        per_partition
    }

    #[test]
    fn keyless_messages_go_in_runs_of_bounded_bytes_round_the_partitions() {
        let spread = KeylessSpread::new();
        let first = spread.place("t", 1024);
        assert_eq!(first.look_up, LookUp::First);
        assert_eq!(first.partition, None, "unknown at first");
        assert_eq!(spread.place("t", 1024).look_up, LookUp::No, "one at a time");
        spread.learned("t", Some(8));
        let start = spread.place("t", 1024).partition.unwrap();
        // The rest of the first run, then seven runs of 16 messages on the other partitions.
        let mut seen = vec![start];
        for _ in 0..(15 + 7 * 16) {
            seen.push(spread.place("t", 1024).partition.unwrap());
        }
        for (i, run) in seen.chunks(16).enumerate() {
            let expected = (start + i32::try_from(i).unwrap()) % 8;
            assert!(run.iter().all(|&p| p == expected), "run {i}: {run:?}");
        }
        // 12,000 messages of 1 KiB: every partition within one run of its share.
        let counts = share(&spread, "t", 12_000, 1024);
        assert_eq!(counts.len(), 8);
        for count in counts {
            assert!(count.abs_diff(1500) <= 16, "{count} of 12,000");
        }
    }

    #[test]
    fn a_topic_the_broker_does_not_know_is_left_to_librdkafka_and_looked_up_again() {
        let spread = KeylessSpread::new();
        spread.place("t", 10);
        spread.learned("t", None);
        let placement = spread.place("t", 10);
        assert_eq!(placement.partition, None);
        assert_eq!(
            placement.look_up,
            LookUp::No,
            "not before the retry interval"
        );
        std::thread::sleep(RETRY_AFTER);
        assert_eq!(spread.place("t", 10).look_up, LookUp::Refresh);
    }

    #[test]
    fn a_smaller_topic_made_again_is_forgotten_and_its_new_count_used() {
        let spread = KeylessSpread::new();
        spread.place("t", 10);
        spread.learned("t", Some(8));
        spread.forget("t");
        let placement = spread.place("t", 10);
        assert_eq!(placement.partition, None);
        assert_eq!(placement.look_up, LookUp::Refresh, "looked up at once");
        spread.learned("t", Some(2));
        let counts = share(&spread, "t", 1000, 100);
        assert_eq!(counts.len(), 2, "only the two partitions: {counts:?}");
    }
}
