//! The consumer: receives predictions, prints one line per prediction (unless `--quiet`) and
//! keeps the tally (accuracy, latency) that it reports through `switchyard:host/report`.
//!
//! The tally counts each request once, so a prediction delivered twice (at-least-once delivery)
//! never counts twice. A message that is not a prediction is answered with a WIT `error`.
#![deny(missing_docs)]

use pipeline_core::CLASS_NAMES;
use pipeline_core::wire::Prediction;

#[cfg(target_arch = "wasm32")]
mod component;

/// The consumer's arguments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Print nothing per prediction.
    pub quiet: bool,
    /// Count only predictions of this producer run (request ids `RUN-INDEX`).
    pub run_id: Option<String>,
}

impl Settings {
    /// Parses the component's arguments (without `argv[0]`).
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut settings = Settings::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quiet" => settings.quiet = true,
                "--run-id" => {
                    settings.run_id = Some(args.next().ok_or("consumer: --run-id needs a value")?)
                }
                other => {
                    return Err(format!(
                        "consumer: unknown argument {other:?}; it takes --quiet and --run-id ID"
                    ));
                }
            }
        }
        Ok(settings)
    }

    /// Whether a prediction belongs to the run being counted.
    pub fn counts(&self, prediction: &Prediction) -> bool {
        match &self.run_id {
            Some(run) => prediction
                .request_id
                .strip_prefix(run.as_str())
                .is_some_and(|rest| rest.starts_with('-')),
            None => true,
        }
    }
}

/// The console line for one prediction, like the original console consumer's.
pub fn describe(prediction: &Prediction, received_ms: f64) -> String {
    let score = prediction
        .scores
        .get(prediction.class)
        .copied()
        .unwrap_or(0.0);
    let mut line = format!(
        "{:<14} {:<12} {:5.1}%",
        prediction.request_id,
        prediction.class_name,
        score * 100.0
    );
    if let Some(label) = prediction.label {
        let truth = CLASS_NAMES.get(label).copied().unwrap_or("?");
        let verdict = if label == prediction.class {
            "ok"
        } else {
            "WRONG"
        };
        line.push_str(&format!("  label {truth:<12} {verdict:<5}"));
    }
    if let Some(sent) = prediction.sent_at_ms {
        line.push_str(&format!("  {:7.1} ms", (received_ms - sent).max(0.0)));
    }
    line
}

/// Parses a prediction message body.
pub fn parse(body: &[u8]) -> Result<Prediction, String> {
    serde_json::from_slice(body).map_err(|e| {
        let preview: String = String::from_utf8_lossy(&body[..body.len().min(60)]).into();
        format!("not a prediction ({e}); the body starts with {preview:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::wire::Timings;

    #[test]
    fn describes_a_prediction() {
        let mut logits = [0.0f32; 10];
        logits[7] = 20.0;
        let p = Prediction::from_logits(
            "run-3".into(),
            &logits,
            Some(5),
            Some(100.0),
            "lenet5-x".into(),
            Timings {
                decode_us: 1,
                inference_us: 1,
                batch: 1,
            },
        );
        let line = describe(&p, 112.5);
        assert!(line.starts_with("run-3"), "{line}");
        assert!(line.contains("Sneaker"), "{line}");
        assert!(line.contains("100.0%"), "{line}");
        assert!(line.contains("label Sandal"), "{line}");
        assert!(line.contains("WRONG"), "{line}");
        assert!(line.contains("12.5 ms"), "{line}");
        let back = parse(serde_json::to_vec(&p).unwrap().as_slice()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn settings_select_the_run() {
        let args = |a: &[&str]| Settings::from_args(a.iter().map(|s| s.to_string()));
        let s = args(&["--quiet", "--run-id", "abc"]).unwrap();
        assert!(s.quiet);
        let mut p = Prediction::from_logits(
            "abc-1".into(),
            &[0.0; 10],
            None,
            None,
            "m".into(),
            Timings {
                decode_us: 0,
                inference_us: 0,
                batch: 1,
            },
        );
        assert!(s.counts(&p));
        p.request_id = "abcd-1".into();
        assert!(!s.counts(&p));
        assert!(Settings::default().counts(&p));
        assert!(args(&["--run-id"]).is_err());
        assert!(args(&["--loud"]).unwrap_err().contains("unknown argument"));
    }

    #[test]
    fn rejects_what_is_not_a_prediction() {
        let err = parse(b"\x00\x01 binary").unwrap_err();
        assert!(err.starts_with("not a prediction"), "{err}");
    }
}
