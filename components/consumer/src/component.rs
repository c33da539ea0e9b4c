//! The consumer as a `switchyard:host/batch-reporting-handler` component: predictions one at a
//! time or, when several are waiting, in one call.
//!
//! Where its manifest entry grants the `predictions` results table, it writes one row per
//! prediction there (a batch in one transaction) before it returns, so a prediction is stored
//! before its message is settled; the table's key makes a redelivered one no second row.
//! Without the grant it only prints and tallies.
//!
//! Arguments: `--quiet` prints nothing per prediction (for benchmarks); `--run-id ID` counts
//! only predictions for requests of that producer run (a shared topic may hold older runs).

use std::cell::RefCell;

use pipeline_core::tally::Tally;

wit_bindgen::generate!({
    world: "switchyard:host/batch-reporting-handler",
    path: "../../wit",
    generate_all,
});

use exports::switchyard::host::{batch, report};
use exports::wasi::messaging::incoming_handler::Guest;
use pipeline_core::row::{Cell, PREDICTIONS_TABLE, prediction_row};
use pipeline_core::wire::{Prediction, unix_ms};
use switchyard::host::results::{self, Table, Value};
use wasi::messaging::types::{Error, Message};

/// The metadata naming the component build that sent a message (set by the host).
const SENT_BY: &str = "switchyard-sent-by";

struct State {
    tally: Tally,
    settings: crate::Settings,
    /// The results table: not opened yet, open, or not granted (then nothing is written).
    table: Option<Option<Table>>,
}

thread_local! {
    static STATE: RefCell<Result<State, String>> = RefCell::new(
        settings().map(|settings| State {
            tally: Tally::default(),
            settings,
            table: None,
        }),
    );
}

/// The manifest's arguments; in the unit tests, whose arguments are the test runner's,
/// `--quiet` alone.
fn settings() -> Result<crate::Settings, String> {
    if cfg!(test) {
        return Ok(crate::Settings {
            quiet: true,
            ..crate::Settings::default()
        });
    }
    crate::Settings::from_args(std::env::args().skip(1))
}

struct Component;

/// A prediction that arrived, with the build that sent it.
struct Arrived {
    prediction: Prediction,
    sent_by: Option<String>,
}

fn arrived(message: &Message) -> Result<Arrived, Error> {
    let prediction = crate::parse(&message.data()).map_err(Error::Other)?;
    let sent_by = message
        .metadata()
        .unwrap_or_default()
        .into_iter()
        .find_map(|(key, value)| (key == SENT_BY).then_some(value));
    Ok(Arrived {
        prediction,
        sent_by,
    })
}

fn value(cell: Cell) -> Value {
    match cell {
        Cell::Null => Value::Null,
        Cell::Integer(v) => Value::Integer(v),
        Cell::Real(v) => Value::Real(v),
        Cell::Text(v) => Value::Text(v),
    }
}

impl State {
    /// The results table, opened on first use; `None` when the manifest grants none.
    fn table(&mut self) -> Option<&Table> {
        self.table
            .get_or_insert_with(|| match Table::open(PREDICTIONS_TABLE) {
                Ok(table) => Some(table),
                Err(e) => {
                    eprintln!("consumer: not storing predictions: {}", describe_error(&e));
                    None
                }
            })
            .as_ref()
    }

    /// Stores, counts and prints the predictions of this run among `arrivals`, received at
    /// `received`. An error means none was stored: the host retries their messages.
    fn record(&mut self, arrivals: &[&Arrived], received: f64) -> Result<(), Error> {
        let ours: Vec<&Arrived> = arrivals
            .iter()
            .copied()
            .filter(|a| self.settings.counts(&a.prediction))
            .collect();
        if ours.is_empty() {
            return Ok(());
        }
        if let Some(table) = self.table() {
            let rows: Vec<Vec<(String, Value)>> = ours
                .iter()
                .map(|a| {
                    prediction_row(&a.prediction, a.sent_by.as_deref(), received)
                        .into_iter()
                        .map(|(name, cell)| (name.to_string(), value(cell)))
                        .collect()
                })
                .collect();
            table.insert(&rows).map_err(|e| {
                Error::Other(format!("storing predictions: {}", describe_error(&e)))
            })?;
        }
        for arrived in ours {
            let fresh = self.tally.record(&arrived.prediction, received);
            if fresh && !self.settings.quiet {
                println!("{}", crate::describe(&arrived.prediction, received));
            }
        }
        Ok(())
    }
}

fn describe_error(error: &results::Error) -> String {
    match error {
        results::Error::AccessDenied(text)
        | results::Error::NoSuchTable(text)
        | results::Error::InvalidRow(text)
        | results::Error::Unavailable(text) => text.clone(),
    }
}

/// Runs `work` on the consumer's state, or fails when its arguments did not parse.
fn with_state<T>(work: impl FnOnce(&mut State) -> Result<T, Error>) -> Result<T, Error> {
    STATE.with(|state| match &mut *state.borrow_mut() {
        Ok(state) => work(state),
        Err(e) => Err(Error::Other(e.clone())),
    })
}

impl Guest for Component {
    fn handle(message: Message) -> Result<(), Error> {
        let arrival = arrived(&message)?;
        with_state(|state| state.record(&[&arrival], unix_ms()))
    }
}

impl batch::Guest for Component {
    fn handle_batch(messages: Vec<Message>) -> Vec<Result<(), Error>> {
        let received = unix_ms();
        let arrivals: Vec<Result<Arrived, Error>> = messages.iter().map(arrived).collect();
        let good: Vec<&Arrived> = arrivals.iter().filter_map(|a| a.as_ref().ok()).collect();
        let stored = with_state(|state| state.record(&good, received));
        arrivals
            .into_iter()
            .map(|arrival| match (arrival, &stored) {
                (Err(e), _) => Err(e),
                (Ok(_), Ok(())) => Ok(()),
                (Ok(_), Err(e)) => Err(e.clone()),
            })
            .collect()
    }
}

impl report::Guest for Component {
    fn report() -> String {
        STATE.with(|state| match &*state.borrow() {
            Ok(state) => serde_json::to_string(&state.tally.summary())
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string()),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        })
    }
}

export!(Component);

/// The component as the host drives it (`switchyard test` runs these inside Wasm: `cargo test
/// --target wasm32-wasip2` in this directory).
#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::tally::Summary;
    use pipeline_core::wire::Timings;
    use switchyard_test::{Received, deliver, deliver_batch};

    switchyard_test::message_type!(Message);

    fn prediction(request_id: &str, class: usize, label: usize) -> Received {
        let mut logits = [0.0f32; 10];
        logits[class] = 10.0;
        let prediction = pipeline_core::wire::Prediction::from_logits(
            request_id.into(),
            &logits,
            Some(label),
            Some(unix_ms() - 5.0),
            "lenet5-test".into(),
            Timings {
                decode_us: 1,
                inference_us: 1,
                batch: 1,
            },
        );
        let body = serde_json::to_vec(&prediction).expect("a prediction serializes");
        Received::on("predictions", body).content_type(pipeline_core::wire::PREDICTION_CONTENT_TYPE)
    }

    fn summary() -> Summary {
        serde_json::from_str(&<Component as report::Guest>::report())
            .expect("the report is a summary")
    }

    #[test]
    fn tallies_each_request_once_and_reports_it() {
        let before = summary();
        let first = deliver(Component::handle, prediction("tally-1", 7, 7));
        assert!(first.outcome.is_ok(), "{:?}", first.outcome);
        assert!(
            first.sent.is_empty(),
            "the consumer sends nothing: {:?}",
            first.sent
        );
        // At-least-once: the same prediction again is a duplicate, not a second count.
        deliver(Component::handle, prediction("tally-1", 7, 7))
            .outcome
            .expect("a duplicate is handled");
        let batch = deliver_batch(
            <Component as batch::Guest>::handle_batch,
            [prediction("tally-2", 3, 4), prediction("tally-3", 0, 0)],
        );
        assert_eq!(batch.outcomes.len(), 2);
        assert!(
            batch.outcomes.iter().all(Result::is_ok),
            "{:?}",
            batch.outcomes
        );

        let after = summary();
        assert_eq!(after.predictions - before.predictions, 3);
        assert_eq!(after.duplicates - before.duplicates, 1);
        assert_eq!(after.labelled - before.labelled, 3);
        assert_eq!(after.correct - before.correct, 2);
        assert!(
            after.p50_ms.is_some_and(|ms| ms >= 5.0),
            "{:?}",
            after.p50_ms
        );
    }

    #[test]
    fn answers_what_is_not_a_prediction_with_an_error_alone() {
        let garbage = deliver(
            Component::handle,
            Received::on("predictions", b"\x00 binary"),
        );
        assert!(
            matches!(&garbage.outcome, Err(Error::Other(text)) if text.starts_with("not a prediction")),
            "{:?}",
            garbage.outcome
        );
        let batch = deliver_batch(
            <Component as batch::Guest>::handle_batch,
            [
                Received::on("predictions", "{}"),
                prediction("alone-1", 1, 1),
            ],
        );
        assert!(
            matches!(&batch.outcomes[0], Err(Error::Other(_))),
            "{:?}",
            batch.outcomes
        );
        assert!(
            batch.outcomes[1].is_ok(),
            "its neighbour is counted: {:?}",
            batch.outcomes
        );
    }
}
