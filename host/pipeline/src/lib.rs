//! switchyard's Fashion-MNIST pipeline, built on `switchyard-runtime`: a producer sends images
//! as classification requests, a LeNet-5 classifier answers with predictions, a consumer
//! stores them, all three as WebAssembly components in one host.
//!
//! The runtime knows nothing of images or predictions; this crate is where they live:
//!
//! - [`demo`]: the demo's orchestration (build the components, start the broker, run the
//!   manifest, wait for every answer) and what it returns: the run it read back;
//! - [`predictions`]: the `predictions` table its consumer writes into the results store, and
//!   reading a run's rows back;
//! - [`report`]: a run's numbers as a terminal summary and an HTML page with plots;
//! - [`build`]: building components from source for `wasm32-wasip2` (adding the target when
//!   the toolchain lacks it), the demo's three and any other crate's.
#![deny(missing_docs)]

pub mod build;
pub mod demo;
pub mod predictions;
pub mod report;
