//! The consumer's running tally: predictions seen (each request counted once, so a redelivered
//! prediction never counts twice), accuracy against the ground truth the requests carried, and
//! the end-to-end latency from `sent-at` to the prediction's arrival.
//!
//! Its memory stays flat however long a run is: a request id the producer made (`RUN-INDEX`)
//! costs one bit, and latencies go into a histogram with three significant digits (so p50 and
//! p99 are exact to 0.1 %) instead of a list.

use std::collections::{BTreeMap, HashMap, HashSet};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::CLASS_NAMES;
use crate::wire::Prediction;

/// A running tally of predictions.
#[derive(Debug)]
pub struct Tally {
    seen: SeenRequests,
    duplicates: u64,
    labelled: u64,
    correct: u64,
    per_class: [ClassTally; 10],
    /// Microseconds from `sent-at` to arrival.
    latencies_us: Histogram<u64>,
    first_sent_ms: Option<f64>,
    first_received_ms: Option<f64>,
    last_received_ms: Option<f64>,
    engines: BTreeMap<String, u64>,
    batched: u64,
}

/// The longest latency the histogram tells apart: an hour; longer ones count as an hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;

impl Default for Tally {
    fn default() -> Self {
        Self {
            seen: SeenRequests::default(),
            duplicates: 0,
            labelled: 0,
            correct: 0,
            per_class: Default::default(),
            latencies_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("1 µs to an hour at 3 significant digits is a valid histogram"),
            first_sent_ms: None,
            first_received_ms: None,
            last_received_ms: None,
            engines: BTreeMap::new(),
            batched: 0,
        }
    }
}

/// The request ids counted so far. Ids of the form `RUN-INDEX` (what the producer sends, with
/// INDEX in canonical decimal) are one bit in their run's bitmap; any other id is kept whole.
#[derive(Debug, Default)]
struct SeenRequests {
    runs: HashMap<String, Vec<u64>>,
    other: HashSet<String>,
    count: u64,
}

/// The largest INDEX kept as a bit (a 64 Mi-bit map is 8 MiB); ids beyond it are kept whole,
/// so a malformed id cannot make the tally allocate a huge map.
const MAX_BIT_INDEX: u64 = (1 << 26) - 1;

impl SeenRequests {
    /// Adds `id`; `false` when it was already there.
    fn insert(&mut self, id: &str) -> bool {
        let fresh = match split_request_id(id) {
            Some((run, index)) => {
                let words = match self.runs.get_mut(run) {
                    Some(words) => words,
                    None => self.runs.entry(run.to_string()).or_default(),
                };
                let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
                if words.len() <= word {
                    words.resize(word + 1, 0);
                }
                let fresh = words[word] & bit == 0;
                words[word] |= bit;
                fresh
            }
            None => self.other.insert(id.to_string()),
        };
        self.count += u64::from(fresh);
        fresh
    }

    fn len(&self) -> u64 {
        self.count
    }
}

/// `RUN-INDEX` split at its last `-`, when INDEX is canonical decimal (no sign, no leading
/// zero, so one index has one spelling) and at most [`MAX_BIT_INDEX`].
fn split_request_id(id: &str) -> Option<(&str, u64)> {
    let (run, index) = id.rsplit_once('-')?;
    let canonical = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    let index: u64 = index.parse().ok().filter(|_| canonical)?;
    (index <= MAX_BIT_INDEX).then_some((run, index))
}

#[derive(Debug, Default, Clone, Copy)]
struct ClassTally {
    labelled: u64,
    correct: u64,
}

/// What a tally says at one moment; the JSON the consumer reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Distinct requests with a prediction.
    pub predictions: u64,
    /// Predictions received again for a request already counted (at-least-once redelivery).
    pub duplicates: u64,
    /// Predictions whose request carried a label.
    pub labelled: u64,
    /// Labelled predictions that were right.
    pub correct: u64,
    /// `correct / labelled`, or `None` without labels.
    pub accuracy: Option<f64>,
    /// Accuracy per true class, by class index.
    pub per_class_accuracy: Vec<Option<f64>>,
    /// Median latency from `sent-at` to arrival, in milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile of that latency.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile of that latency: the tail a paced run is judged by.
    #[serde(default)]
    pub p999_ms: Option<f64>,
    /// Unix milliseconds of the earliest `sent-at` among the predictions' requests: when the
    /// producer sent its first request.
    #[serde(default)]
    pub first_sent_ms: Option<f64>,
    /// Unix milliseconds of the first prediction's arrival.
    pub first_received_ms: Option<f64>,
    /// Unix milliseconds of the last prediction's arrival.
    pub last_received_ms: Option<f64>,
    /// Predictions by the engine that computed them (`wasm`, `wasi-nn`).
    #[serde(default)]
    pub engines: BTreeMap<String, u64>,
    /// How many requests shared a model run, on average over the predictions.
    #[serde(default)]
    pub mean_batch: Option<f64>,
}

impl Tally {
    /// Counts one prediction that arrived at `received_ms` (Unix milliseconds). Returns
    /// `false`, counting nothing but the duplicate, when its request was already counted.
    pub fn record(&mut self, prediction: &Prediction, received_ms: f64) -> bool {
        if !self.seen.insert(&prediction.request_id) {
            self.duplicates += 1;
            return false;
        }
        if let Some(label) = prediction.label.filter(|&l| l < CLASS_NAMES.len()) {
            let right = label == prediction.class;
            self.labelled += 1;
            self.correct += u64::from(right);
            self.per_class[label].labelled += 1;
            self.per_class[label].correct += u64::from(right);
        }
        *self.engines.entry(prediction.engine.clone()).or_default() += 1;
        self.batched += u64::from(prediction.timings.batch.max(1));
        if let Some(sent) = prediction.sent_at_ms {
            self.first_sent_ms = Some(self.first_sent_ms.map_or(sent, |f| f.min(sent)));
            let micros = ((received_ms - sent).max(0.0) * 1000.0).round() as u64;
            self.latencies_us.saturating_record(micros.max(1));
        }
        self.first_received_ms = Some(
            self.first_received_ms
                .map_or(received_ms, |f| f.min(received_ms)),
        );
        self.last_received_ms = Some(
            self.last_received_ms
                .map_or(received_ms, |l| l.max(received_ms)),
        );
        true
    }

    /// The tally so far.
    pub fn summary(&self) -> Summary {
        let ratio =
            |correct: u64, labelled: u64| (labelled > 0).then(|| correct as f64 / labelled as f64);
        Summary {
            predictions: self.seen.len(),
            duplicates: self.duplicates,
            labelled: self.labelled,
            correct: self.correct,
            accuracy: ratio(self.correct, self.labelled),
            per_class_accuracy: self
                .per_class
                .iter()
                .map(|c| ratio(c.correct, c.labelled))
                .collect(),
            p50_ms: self.latency_ms(0.50),
            p99_ms: self.latency_ms(0.99),
            p999_ms: self.latency_ms(0.999),
            first_sent_ms: self.first_sent_ms,
            first_received_ms: self.first_received_ms,
            last_received_ms: self.last_received_ms,
            engines: self.engines.clone(),
            mean_batch: (self.seen.len() > 0).then(|| self.batched as f64 / self.seen.len() as f64),
        }
    }

    /// The latency at `quantile`, in ms: the smallest value that at least that share of the
    /// predictions did not exceed (nearest rank), to the histogram's precision.
    fn latency_ms(&self, quantile: f64) -> Option<f64> {
        (!self.latencies_us.is_empty())
            .then(|| self.latencies_us.value_at_quantile(quantile) as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Timings;

    fn prediction(id: &str, class: usize, label: Option<usize>, sent: f64) -> Prediction {
        let mut logits = [0.0f32; 10];
        logits[class] = 10.0;
        Prediction::from_logits(
            id.into(),
            &logits,
            label,
            Some(sent),
            "m".into(),
            Timings {
                decode_us: 0,
                inference_us: 0,
                batch: 1,
            },
        )
    }

    #[test]
    fn counts_each_request_once() {
        let mut tally = Tally::default();
        assert!(tally.record(&prediction("a", 1, Some(1), 0.0), 10.0));
        assert!(!tally.record(&prediction("a", 1, Some(1), 0.0), 30.0));
        assert!(tally.record(&prediction("b", 2, Some(3), 0.0), 20.0));
        assert!(tally.record(&prediction("c", 2, None, 5.0), 20.0));
        let s = tally.summary();
        assert_eq!(s.predictions, 3);
        assert_eq!(s.duplicates, 1);
        assert_eq!((s.labelled, s.correct), (2, 1));
        assert_eq!(s.accuracy, Some(0.5));
        assert_eq!(s.per_class_accuracy[1], Some(1.0));
        assert_eq!(s.per_class_accuracy[3], Some(0.0));
        assert_eq!(s.per_class_accuracy[0], None);
        // Nearest rank, to the histogram's 0.1 %: latencies 10, 15 and 20 ms.
        assert!((s.p50_ms.unwrap() - 15.0).abs() < 0.015, "{:?}", s.p50_ms);
        assert!((s.p99_ms.unwrap() - 20.0).abs() < 0.02, "{:?}", s.p99_ms);
        assert_eq!(
            (s.first_received_ms, s.last_received_ms),
            (Some(10.0), Some(20.0))
        );
        assert_eq!(s.first_sent_ms, Some(0.0));
    }

    #[test]
    fn percentiles_use_nearest_rank_to_three_significant_digits() {
        let mut tally = Tally::default();
        for ms in 1..=100 {
            tally.record(&prediction(&format!("r-{ms}"), 0, None, 0.0), f64::from(ms));
        }
        let s = tally.summary();
        let near = |got: Option<f64>, want: f64| {
            let got = got.unwrap();
            assert!((got - want).abs() <= want * 1e-3, "{got} vs {want}");
        };
        near(s.p50_ms, 50.0);
        near(s.p99_ms, 99.0);
        near(s.p999_ms, 100.0);
        assert_eq!(Tally::default().summary().p50_ms, None);
    }

    #[test]
    fn request_ids_are_counted_once_whatever_their_shape() {
        let mut seen = SeenRequests::default();
        for id in [
            "run-0", "run-1", "run-63", "run-64", "other-1", "run-01", "plain", "-5",
        ] {
            assert!(seen.insert(id), "{id} is new");
        }
        for id in ["run-0", "run-64", "other-1", "run-01", "plain", "-5"] {
            assert!(!seen.insert(id), "{id} was seen");
        }
        // Past the bitmap's bound, and not decimal: kept whole, still counted once.
        let huge = format!("run-{}", MAX_BIT_INDEX + 1);
        assert!(seen.insert(&huge) && !seen.insert(&huge));
        assert!(seen.insert("run-+7") && !seen.insert("run-+7"));
        assert_eq!(seen.len(), 10);
        assert_eq!(seen.runs["run"].len(), 2, "indices 0..=64 take two words");
    }

    #[test]
    fn a_long_run_keeps_the_tally_small() {
        let mut tally = Tally::default();
        for i in 0..200_000 {
            tally.record(&prediction(&format!("big-{i}"), 0, None, 0.0), 5.0);
        }
        assert_eq!(tally.summary().predictions, 200_000);
        assert!(tally.seen.other.is_empty());
        assert_eq!(tally.seen.runs["big"].len(), 200_000usize.div_ceil(64));
    }
}
