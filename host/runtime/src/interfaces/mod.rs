//! The WIT interfaces the host provides, one file each: the interface's per-instance state
//! (a context), the view its host calls work on, and an `add_to_linker` that takes a
//! projection from the store's state into that view.
//!
//! Why views: an interface's code never names the store's state ([`super::InstanceState`]),
//! so the state depends on the interfaces and not the other way round, and adding an
//! interface is a file here plus a field and a line in `instance.rs`. This is the shape of
//! wasmtime's own interfaces (`WasiView`, wasi-keyvalue).

pub mod messaging;
pub mod progress;
pub mod results;
pub mod test_support;
pub mod wasi_nn;
