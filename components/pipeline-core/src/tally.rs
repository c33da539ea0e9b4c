//! The consumer's running tally: predictions seen (each request counted once, so a redelivered
//! prediction never counts twice), accuracy against the ground truth the requests carried, and
//! the end-to-end latency from `sent-at` to the prediction's arrival.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::CLASS_NAMES;
use crate::wire::Prediction;

/// A running tally of predictions.
#[derive(Debug, Default)]
pub struct Tally {
    seen: HashSet<String>,
    duplicates: u64,
    labelled: u64,
    correct: u64,
    per_class: [ClassTally; 10],
    latencies_ms: Vec<f64>,
    first_received_ms: Option<f64>,
    last_received_ms: Option<f64>,
    engines: BTreeMap<String, u64>,
    batched: u64,
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
        if !self.seen.insert(prediction.request_id.clone()) {
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
            self.latencies_ms.push((received_ms - sent).max(0.0));
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
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let ratio =
            |correct: u64, labelled: u64| (labelled > 0).then(|| correct as f64 / labelled as f64);
        Summary {
            predictions: self.seen.len() as u64,
            duplicates: self.duplicates,
            labelled: self.labelled,
            correct: self.correct,
            accuracy: ratio(self.correct, self.labelled),
            per_class_accuracy: self
                .per_class
                .iter()
                .map(|c| ratio(c.correct, c.labelled))
                .collect(),
            p50_ms: percentile(&sorted, 0.50),
            p99_ms: percentile(&sorted, 0.99),
            first_received_ms: self.first_received_ms,
            last_received_ms: self.last_received_ms,
            engines: self.engines.clone(),
            mean_batch: (!self.seen.is_empty())
                .then(|| self.batched as f64 / self.seen.len() as f64),
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], quantile: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
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
        assert_eq!(s.p50_ms, Some(15.0));
        assert_eq!(s.p99_ms, Some(20.0));
        assert_eq!(
            (s.first_received_ms, s.last_received_ms),
            (Some(10.0), Some(20.0))
        );
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[3.0], 0.0), Some(3.0));
    }
}
