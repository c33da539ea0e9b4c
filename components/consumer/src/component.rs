//! The consumer as a `switchyard:host/batch-reporting-handler` component: predictions one at a
//! time or, when several are waiting, in one call.
//!
//! Arguments: `--quiet` prints nothing per prediction (for benchmarks); `--run-id ID` counts
//! only predictions for requests of that producer run (a shared topic may hold older runs).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use pipeline_core::tally::Tally;

wit_bindgen::generate!({
    world: "switchyard:host/batch-reporting-handler",
    path: "../../wit",
    generate_all,
});

use exports::switchyard::host::{batch, report};
use exports::wasi::messaging::incoming_handler::Guest;
use wasi::messaging::types::{Error, Message};

struct State {
    tally: Tally,
    settings: crate::Settings,
}

thread_local! {
    static STATE: RefCell<Result<State, String>> = RefCell::new(
        settings().map(|settings| State {
            tally: Tally::default(),
            settings,
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

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

struct Component;

/// Counts one prediction (and prints it unless `--quiet`).
fn record(message: &Message, received: f64) -> Result<(), Error> {
    let prediction = crate::parse(&message.data()).map_err(Error::Other)?;
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let state = state.as_mut().map_err(|e| Error::Other(e.clone()))?;
        if !state.settings.counts(&prediction) {
            return Ok(());
        }
        let fresh = state.tally.record(&prediction, received);
        if fresh && !state.settings.quiet {
            println!("{}", crate::describe(&prediction, received));
        }
        Ok(())
    })
}

impl Guest for Component {
    fn handle(message: Message) -> Result<(), Error> {
        record(&message, unix_ms())
    }
}

impl batch::Guest for Component {
    fn handle_batch(messages: Vec<Message>) -> Vec<Result<(), Error>> {
        let received = unix_ms();
        messages.iter().map(|m| record(m, received)).collect()
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
