//! The demo's table in the results store: `predictions`, keyed by `(run_id, request_id)`, one
//! row per prediction, which the consumer component writes and `switchyard report` reads.
//!
//! Its columns are in [`PREDICTIONS`]; times are Unix milliseconds (fractional), `scores` a
//! JSON array of the ten class probabilities (`JSONB` in PostgreSQL, `TEXT` in SQLite). The
//! store itself knows no table: the `switchyard` binary declares this one ([`tables`]).

use pipeline_core::row::Cell;
use pipeline_core::wire::{Prediction, Timings};

use switchyard_runtime::results::{
    Column, ColumnType, Results, ResultsError, RowPages, TableSchema, Tables, Value,
};

/// One row per prediction, keyed by run and request.
pub const PREDICTIONS: TableSchema = TableSchema {
    name: "predictions",
    columns: &[
        // The producer run the request belongs to (the part of its id before the last `-`).
        Column::new("run_id", ColumnType::Text, false),
        Column::new("request_id", ColumnType::Text, false),
        Column::new("predicted_class", ColumnType::Integer, false),
        Column::new("class_name", ColumnType::Text, false),
        // The request's ground truth, when it had one.
        Column::new("label", ColumnType::Integer, true),
        // Probability of each class, by class index.
        Column::new("scores", ColumnType::Json, false),
        // The model's name and the first bytes of its SHA-256.
        Column::new("model", ColumnType::Text, false),
        // The component build that predicted it, `classifier@sha256:…`.
        Column::new("component", ColumnType::Text, true),
        // `wasm` (inside the classifier) or `wasi-nn` (on the host).
        Column::new("engine", ColumnType::Text, true),
        // How many requests shared the model run.
        Column::new("batch", ColumnType::Integer, true),
        Column::new("decode_us", ColumnType::Integer, true),
        Column::new("inference_us", ColumnType::Integer, true),
        Column::new("sent_at_ms", ColumnType::Real, true),
        Column::new("received_at_ms", ColumnType::Real, false),
        // When the classifier was handed the request, and when it sent the prediction: with
        // the two above, the four hops of a request (added in schema 2; older rows hold NULL).
        Column::new("handled_at_ms", ColumnType::Real, true),
        Column::new("predicted_at_ms", ColumnType::Real, true),
    ],
    key_columns: 2,
};

/// The tables the demo's components write: [`PREDICTIONS`].
pub fn tables() -> Tables {
    Tables::new([&PREDICTIONS])
}

/// One run in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    /// Its id.
    pub run_id: String,
    /// Its predictions.
    pub predictions: u64,
    /// When its last prediction arrived (Unix ms).
    pub last_received_ms: f64,
}

/// The runs in `results`, newest first.
pub async fn runs(results: &Results) -> Result<Vec<RunInfo>, ResultsError> {
    Ok(results
        .groups(&PREDICTIONS, "received_at_ms")
        .await?
        .into_iter()
        .map(|group| RunInfo {
            run_id: group.key,
            predictions: group.rows,
            last_received_ms: group.newest,
        })
        .collect())
}

/// The predictions of run `run_id`, in request order, in one `Vec`: for a run known to be
/// small; [`pages`] reads any run in bounded memory.
pub async fn read(results: &Results, run_id: &str) -> Result<Vec<PredictionRecord>, ResultsError> {
    let rows = results.select(&PREDICTIONS, run_id).all().await?;
    records(rows, &results.describe())
}

/// `rows` of [`PREDICTIONS`] as records; a row that is not one is a corrupt `store`.
fn records(rows: Vec<Vec<Value>>, store: &str) -> Result<Vec<PredictionRecord>, ResultsError> {
    rows.into_iter()
        .map(|row| {
            PredictionRecord::from_row(row).map_err(|problem| ResultsError::Corrupt {
                store: store.to_string(),
                table: PREDICTIONS.name,
                problem,
            })
        })
        .collect()
}

/// The predictions of run `run_id`, in request order, a page at a time.
pub fn pages<'a>(results: &'a Results, run_id: &str) -> RunPages<'a> {
    RunPages {
        rows: results.select(&PREDICTIONS, run_id),
        store: results.describe(),
    }
}

/// A run's predictions, read a page at a time ([`pages`]).
pub struct RunPages<'a> {
    rows: RowPages<'a>,
    store: String,
}

impl RunPages<'_> {
    /// Reads `rows` predictions per page.
    pub fn page_rows(self, rows: usize) -> Self {
        Self {
            rows: self.rows.page_rows(rows),
            ..self
        }
    }

    /// The next page; `None` after the run's last prediction.
    pub async fn next(&mut self) -> Result<Option<Vec<PredictionRecord>>, ResultsError> {
        let Some(rows) = self.rows.next().await? else {
            return Ok(None);
        };
        records(rows, &self.store).map(Some)
    }
}

/// How many predictions run `run_id` has.
pub async fn count(results: &Results, run_id: &str) -> Result<u64, ResultsError> {
    results.count(&PREDICTIONS, run_id).await
}

/// A value of a component's row as the store takes it.
fn value(cell: Cell) -> Value {
    match cell {
        Cell::Null => Value::Null,
        Cell::Integer(v) => Value::Integer(v),
        Cell::Real(v) => Value::Real(v),
        Cell::Text(v) => Value::Text(v),
    }
}

/// A row of `predictions`, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionRecord {
    /// The run.
    pub run_id: String,
    /// The prediction as the classifier sent it (its timings' `batch`, `decode_us` and
    /// `inference_us` are 0 where the row has none).
    pub prediction: Prediction,
    /// The component build that predicted it.
    pub component: Option<String>,
    /// When it arrived (Unix ms).
    pub received_at_ms: f64,
}

impl PredictionRecord {
    /// The row for `prediction`, received at `received_at_ms`, predicted by `component`: the
    /// one the consumer writes ([`pipeline_core::row::prediction_row`]).
    pub fn row(
        prediction: &Prediction,
        component: Option<&str>,
        received_at_ms: f64,
    ) -> Vec<(String, Value)> {
        pipeline_core::row::prediction_row(prediction, component, received_at_ms)
            .into_iter()
            .map(|(name, cell)| (name.to_string(), value(cell)))
            .collect()
    }

    /// Reads a row in [`PREDICTIONS`]' column order.
    fn from_row(row: Vec<Value>) -> Result<Self, String> {
        let get = |name: &str| {
            PREDICTIONS
                .columns
                .iter()
                .position(|c| c.name == name)
                .and_then(|i| row.get(i))
                .unwrap_or(&Value::Null)
        };
        let text = |name: &str| {
            get(name)
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("column {name} holds {}, not text", get(name).kind()))
        };
        let count = |name: &str| get(name).as_i64().and_then(|v| u64::try_from(v).ok());
        let class = count("predicted_class").ok_or("predicted_class is no class index")? as usize;
        let scores: Vec<f32> = serde_json::from_str(&text("scores")?)
            .map_err(|e| format!("scores are no JSON list of numbers: {e}"))?;
        Ok(Self {
            run_id: text("run_id")?,
            prediction: Prediction {
                request_id: text("request_id")?,
                class,
                class_name: text("class_name")?,
                scores,
                label: count("label").map(|l| l as usize),
                sent_at_ms: get("sent_at_ms").as_f64(),
                handled_at_ms: get("handled_at_ms").as_f64(),
                predicted_at_ms: get("predicted_at_ms").as_f64(),
                model: text("model")?,
                timings: Timings {
                    decode_us: count("decode_us").unwrap_or(0),
                    inference_us: count("inference_us").unwrap_or(0),
                    batch: count("batch").map_or(0, |b| b as u32),
                },
                engine: get("engine").as_str().unwrap_or_default().to_string(),
            },
            component: get("component").as_str().map(str::to_string),
            received_at_ms: get("received_at_ms")
                .as_f64()
                .ok_or("received_at_ms is no number")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(name: &str, value: Value) -> (String, Value) {
        (name.to_string(), value)
    }

    #[test]
    fn a_prediction_round_trips_through_its_row_and_bad_rows_are_refused() {
        let prediction = Prediction {
            handled_at_ms: Some(11.0),
            predicted_at_ms: Some(11.25),
            ..Prediction::from_logits(
                "run7-12".into(),
                &[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                Some(1),
                Some(10.5),
                "lenet5-x".into(),
                Timings {
                    decode_us: 3,
                    inference_us: 40,
                    batch: 4,
                },
            )
        };
        let values = PREDICTIONS
            .row(PredictionRecord::row(
                &prediction,
                Some("classifier@sha256:ab"),
                12.0,
            ))
            .unwrap();
        assert_eq!(values[0], Value::Text("run7".into()));
        let back = PredictionRecord::from_row(values).unwrap();
        assert_eq!(back.prediction, prediction);
        assert_eq!(back.run_id, "run7");
        assert_eq!(back.component.as_deref(), Some("classifier@sha256:ab"));

        let problem = |cells| match PREDICTIONS.row(cells) {
            Err(ResultsError::InvalidRow { problem, .. }) => problem,
            other => panic!("{other:?}"),
        };
        assert!(problem(vec![cell("run_id", Value::Text("r".into()))]).contains("request_id"));
        assert!(problem(vec![cell("colour", Value::Integer(1))]).contains("no column \"colour\""));
        assert!(
            problem(vec![cell("label", Value::Text("seven".into()))])
                .contains("takes an integer, not text")
        );
        assert!(problem(vec![cell("scores", Value::Text("[1,".into()))]).contains("JSON"));
        assert!(
            problem(vec![
                cell("label", Value::Integer(1)),
                cell("label", Value::Integer(2))
            ])
            .contains("twice")
        );
    }
}
