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
        crate::Settings::from_args(std::env::args().skip(1)).map(|settings| State {
            tally: Tally::default(),
            settings,
        }),
    );
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
