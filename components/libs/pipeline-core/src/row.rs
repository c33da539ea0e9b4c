//! A prediction as a row of the host's `predictions` results table (see the host's
//! `results` module for the schema): the consumer writes these, and the host's tests build
//! them the same way.

use crate::wire::Prediction;

/// The table the consumer writes.
pub const PREDICTIONS_TABLE: &str = "predictions";

/// One cell of a row, as `switchyard:host/results` takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// No value.
    Null,
    /// An integer.
    Integer(i64),
    /// A float.
    Real(f64),
    /// Text (JSON, for `scores`).
    Text(String),
}

/// The run a request id belongs to: the part before its last `-` (producers name requests
/// `RUN-INDEX`), or the whole id when it has none.
pub fn run_of(request_id: &str) -> &str {
    request_id
        .rsplit_once('-')
        .map_or(request_id, |(run, _)| run)
}

/// The row for `prediction`, received at `received_at_ms` (Unix ms), predicted by the
/// component build `component` (the message's `switchyard-sent-by`).
pub fn prediction_row(
    prediction: &Prediction,
    component: Option<&str>,
    received_at_ms: f64,
) -> Vec<(&'static str, Cell)> {
    let text = |s: &str| Cell::Text(s.to_string());
    let integer = |v: u64| Cell::Integer(i64::try_from(v).unwrap_or(i64::MAX));
    vec![
        ("run_id", text(run_of(&prediction.request_id))),
        ("request_id", text(&prediction.request_id)),
        ("predicted_class", integer(prediction.class as u64)),
        ("class_name", text(&prediction.class_name)),
        (
            "label",
            prediction.label.map_or(Cell::Null, |l| integer(l as u64)),
        ),
        (
            "scores",
            Cell::Text(serde_json::to_string(&prediction.scores).unwrap_or_else(|_| "[]".into())),
        ),
        ("model", text(&prediction.model)),
        ("component", component.map_or(Cell::Null, text)),
        (
            "engine",
            match prediction.engine.as_str() {
                "" => Cell::Null,
                engine => text(engine),
            },
        ),
        ("batch", integer(u64::from(prediction.timings.batch))),
        ("decode_us", integer(prediction.timings.decode_us)),
        ("inference_us", integer(prediction.timings.inference_us)),
        (
            "sent_at_ms",
            prediction.sent_at_ms.map_or(Cell::Null, Cell::Real),
        ),
        ("received_at_ms", Cell::Real(received_at_ms)),
        (
            "handled_at_ms",
            prediction.handled_at_ms.map_or(Cell::Null, Cell::Real),
        ),
        (
            "predicted_at_ms",
            prediction.predicted_at_ms.map_or(Cell::Null, Cell::Real),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_the_request_id_before_its_index() {
        assert_eq!(run_of("abc-12"), "abc");
        assert_eq!(run_of("a-b-12"), "a-b");
        assert_eq!(run_of("plain"), "plain");
    }
}
