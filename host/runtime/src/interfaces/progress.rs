//! `switchyard:host/progress`: a command reports how far it is, and the host shows it with
//! [`crate::progress::Progress`] (a bar on a terminal, plain lines elsewhere).
//!
//! Why the host draws and not the guest: a component has no terminal to ask (its standard
//! error is the host's, shared with other components and the host's log), and a bar drawn by
//! each component would fight the others. The guest only counts; whether anything is shown is
//! the host's choice (`switchyard run` shows it, the demo shows its own bar, tests nothing).

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::switchyard::host::progress;
use crate::progress::Progress;

/// The progress of one instance: the host calls work on it directly (it holds no resources).
#[derive(Debug)]
pub struct ProgressCtx {
    component: Arc<str>,
    /// Whether the host shows progress at all.
    shown: bool,
    current: Option<Progress>,
}

/// The longest unit name shown; a longer one is cut (a guest's string reaches the terminal).
const MAX_UNIT_CHARS: usize = 40;

impl ProgressCtx {
    /// Progress of `component`, shown when `shown`.
    pub fn new(component: Arc<str>, shown: bool) -> Self {
        Self {
            component,
            shown,
            current: None,
        }
    }

    /// Progress that is never shown (a handler's; a command's until the host says otherwise).
    pub fn hidden() -> Self {
        Self::new(Arc::from(""), false)
    }

    /// Ends what is shown (the command returned).
    pub fn finish(&mut self) {
        if let Some(progress) = self.current.take() {
            progress.finish();
        }
    }
}

impl Drop for ProgressCtx {
    fn drop(&mut self) {
        // A command that trapped ends here: its bar must not stay half-drawn.
        self.finish();
    }
}

impl progress::Host for ProgressCtx {
    async fn start(&mut self, unit: String, total: u64) -> wasmtime::Result<()> {
        self.finish();
        if self.shown {
            // Only printable characters: a guest must not move the cursor or recolour the
            // terminal through its unit name.
            let unit: String = unit
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_UNIT_CHARS)
                .collect();
            let what = format!("{}: {unit}", self.component);
            self.current = Some(Progress::new(&what, total));
        }
        Ok(())
    }

    async fn set(&mut self, done: u64) -> wasmtime::Result<()> {
        if let Some(progress) = &self.current {
            progress.set(done);
        }
        Ok(())
    }
}

/// Adds `switchyard:host/progress` to a linker, reaching each instance's through `ctx`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    ctx: fn(&mut T) -> &mut ProgressCtx,
) -> wasmtime::Result<()> {
    progress::add_to_linker::<T, HasSelf<ProgressCtx>>(linker, ctx)
}
