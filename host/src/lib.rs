//! switchyard: runs sandboxed WebAssembly components against Kafka and Google Cloud Pub/Sub
//! through one messaging interface (`wasi:messaging@0.2.0-draft`).
//!
//! The host owns every broker connection; a component sees only the WIT interface and what its
//! manifest entry grants. The pieces:
//!
//! - `switchyard-broker` (its own crate): the unified broker API and its backends (Kafka on
//!   rdkafka, the embedded Kafka-protocol broker, and Pub/Sub on Google's SDK), the one layer
//!   the runtime reaches brokers through;
//! - [`runtime`]: the wasmtime engine, the compiled-component cache, the instance pool, the
//!   `wasi:messaging` host implementation and the handler workers;
//! - `switchyard-client` (its own crate): producers and consumers for Rust programs, on any
//!   backend; the CLI's `publish`, `consume` and `replay` use it;
//! - [`manifest`]: the TOML manifest;
//! - [`nn`]: inference on the host, the engines behind `wasi:nn`;
//! - [`build`]: building components from source for `wasm32-wasip2` (adding the target when
//!   the toolchain lacks it);
//! - [`app`]: starting a whole manifest, as `switchyard run` does, and deploying a changed
//!   one into it;
//! - [`metrics`]: what a running host counts, served to Prometheus at `/metrics`;
//! - [`progress`]: progress bars on a terminal, plain lines elsewhere;
//! - [`serve`]: serving a manifest until asked to stop (`switchyard run`, in-process);
//! - [`admin`]: the local socket through which `switchyard deploy` reaches a running host;
//! - [`results`]: the results store (SQLite or PostgreSQL) components write rows into;
//! - [`report`]: a run's results as a terminal summary and an HTML page with plots;
//! - [`pipeline`]: the Fashion-MNIST demo built on the above, and [`predictions`], the table
//!   its components write into the results store.
#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod build;
pub mod manifest;
pub mod metrics;
pub mod nn;
pub mod pipeline;
pub mod predictions;
pub mod private_dir;
pub mod progress;
pub mod report;
pub mod results;
pub mod runtime;
pub mod scaffold;
pub mod serve;

/// `NAME` in switchyard's per-user cache: `$XDG_CACHE_HOME/switchyard/NAME`, else
/// `$HOME/.cache/switchyard/NAME`; `None` without either. What is kept there (compiled
/// components, the emulator's fix) is code that runs, so it is never a shared directory.
pub(crate) fn user_cache_dir(name: &str) -> Option<std::path::PathBuf> {
    xdg_dir("XDG_CACHE_HOME", ".cache", name)
}

/// `NAME` in switchyard's per-user data directory: `$XDG_DATA_HOME/switchyard/NAME`, else
/// `$HOME/.local/share/switchyard/NAME`; `None` without either. Results and reports live
/// there: what a user keeps, unlike the cache.
pub(crate) fn user_data_dir(name: &str) -> Option<std::path::PathBuf> {
    xdg_dir("XDG_DATA_HOME", ".local/share", name)
}

/// `$VARIABLE/switchyard/NAME`, else `$HOME/UNDER_HOME/switchyard/NAME` (the XDG base
/// directory rule).
fn xdg_dir(variable: &str, under_home: &str, name: &str) -> Option<std::path::PathBuf> {
    let root = match std::env::var_os(variable) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(under_home),
    };
    Some(root.join("switchyard").join(name))
}
