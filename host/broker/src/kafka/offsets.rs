//! Which Kafka offsets may be committed when messages finish out of order.
//!
//! Several workers handle one partition's messages at once, so message 12 may finish before
//! message 10. Committing 13 then would lose 10 and 11 if the host died, so the committable
//! position of a partition is the lowest offset still in flight (or one past the highest
//! delivered when nothing is in flight). Offsets need not be contiguous: compaction and
//! transaction markers leave gaps, so only delivered offsets count.
//!
//! Each assignment of a partition gets a new generation; an acknowledgement from before a
//! rebalance carries the old generation and is ignored, because the new owner may already have
//! moved the partition on.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

#[derive(Debug, Default)]
struct PartitionState {
    generation: u64,
    /// The first offset handed out in this hold of the partition: where the group stood.
    start: i64,
    in_flight: BTreeSet<i64>,
    highest_delivered: Option<i64>,
    committable: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        match self.in_flight.first() {
            Some(&lowest) => Some(lowest),
            None => self.highest_delivered.map(|h| h + 1),
        }
    }
}

/// Tracks in-flight offsets per partition. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<HashMap<(String, i32), PartitionState>>,
    next_generation: Mutex<u64>,
}

/// Identifies one delivered message for [`OffsetTracker::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Topic of the message.
    pub topic: String,
    /// Partition of the message.
    pub partition: i32,
    /// Offset of the message.
    pub offset: i64,
    generation: u64,
}

impl InFlight {
    /// Which hold of its partition it was delivered in.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl OffsetTracker {
    /// Records that a message was handed out.
    pub fn delivered(&self, topic: &str, partition: i32, offset: i64) -> InFlight {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let state = partitions
            .entry((topic.to_string(), partition))
            .or_insert_with(|| PartitionState {
                generation: self.new_generation(),
                start: offset,
                // Resuming at the first offset handed out is where the group already stands.
                committable: Some(offset),
                ..PartitionState::default()
            });
        state.in_flight.insert(offset);
        state.highest_delivered = Some(state.highest_delivered.map_or(offset, |h| h.max(offset)));
        InFlight {
            topic: topic.to_string(),
            partition,
            offset,
            generation: state.generation,
        }
    }

    /// Records that a message was acknowledged. Returns the position (next offset to read)
    /// that may now be committed for its partition, if it moved forward.
    pub fn complete(&self, message: &InFlight) -> Option<i64> {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let state = partitions.get_mut(&(message.topic.clone(), message.partition))?;
        if state.generation != message.generation || !state.in_flight.remove(&message.offset) {
            return None;
        }
        let position = state.position()?;
        if state.committable.is_some_and(|c| c >= position) {
            return None;
        }
        state.committable = Some(position);
        Some(position)
    }

    /// Whether `message` was delivered in this member's current hold of its partition (not
    /// before a rebalance took the partition away, or before the member left).
    pub fn owns(&self, message: &InFlight) -> bool {
        let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions
            .get(&(message.topic.clone(), message.partition))
            .is_some_and(|state| state.generation == message.generation)
    }

    /// Where the group stood in `message`'s partition when this member's hold of it began (if
    /// it still holds it).
    pub fn hold_start(&self, message: &InFlight) -> Option<i64> {
        let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions
            .get(&(message.topic.clone(), message.partition))
            .filter(|state| state.generation == message.generation)
            .map(|state| state.start)
    }

    /// Forgets partitions this member no longer owns (a rebalance revoked them).
    pub fn revoke(&self, topic: &str, partition: i32) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions.remove(&(topic.to_string(), partition));
    }

    /// Forgets every partition.
    pub fn revoke_all(&self) {
        self.partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Messages handed out and not yet acknowledged.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        let partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        partitions.values().map(|s| s.in_flight.len()).sum()
    }

    fn new_generation(&self) -> u64 {
        let mut next = self
            .next_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *next += 1;
        *next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_past_a_finished_prefix() {
        let tracker = OffsetTracker::default();
        let m: Vec<_> = (10..14).map(|o| tracker.delivered("t", 0, o)).collect();
        assert_eq!(
            tracker.complete(&m[2]),
            None,
            "12 done but 10 and 11 are not"
        );
        assert_eq!(tracker.complete(&m[1]), None);
        assert_eq!(
            tracker.complete(&m[0]),
            Some(13),
            "10..=12 done: resume at 13"
        );
        assert_eq!(tracker.in_flight(), 1);
        assert_eq!(tracker.complete(&m[3]), Some(14));
        assert_eq!(
            tracker.complete(&m[3]),
            None,
            "a second ack changes nothing"
        );
    }

    #[test]
    fn offsets_may_have_gaps() {
        let tracker = OffsetTracker::default();
        let a = tracker.delivered("t", 0, 5);
        let b = tracker.delivered("t", 0, 9);
        assert_eq!(tracker.complete(&b), None);
        assert_eq!(tracker.complete(&a), Some(10));
    }

    #[test]
    fn partitions_are_independent() {
        let tracker = OffsetTracker::default();
        let a = tracker.delivered("t", 0, 1);
        let _held = tracker.delivered("t", 0, 2);
        let b = tracker.delivered("t", 1, 7);
        let c = tracker.delivered("u", 0, 3);
        assert_eq!(tracker.complete(&a), Some(2));
        assert_eq!(tracker.complete(&b), Some(8));
        assert_eq!(tracker.complete(&c), Some(4));
    }

    #[test]
    fn acks_from_before_a_rebalance_are_ignored() {
        let tracker = OffsetTracker::default();
        let old = tracker.delivered("t", 0, 1);
        tracker.revoke("t", 0);
        assert_eq!(tracker.complete(&old), None);
        let fresh = tracker.delivered("t", 0, 1);
        let _later = tracker.delivered("t", 0, 2);
        assert_eq!(tracker.complete(&old), None, "same offset, old generation");
        assert_eq!(tracker.complete(&fresh), Some(2));
        tracker.revoke_all();
        assert_eq!(tracker.in_flight(), 0);
    }
}
