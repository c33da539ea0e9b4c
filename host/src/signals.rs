//! Ctrl-C and SIGTERM, for the commands that run until asked to stop.

use switchyard_runtime::serve::StopHandle;

/// Ctrl-C (SIGINT) and SIGTERM (what `kill`, systemd and Kubernetes send), listened for from
/// the moment this exists.
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening. Create it before saying how to stop: a signal that comes before the
    /// listener exists is lost, and for a process started with SIGINT ignored (a background
    /// job of a non-interactive shell) it is dropped for good, so the process would never stop
    /// (seen once in CI: Ctrl-C sent right after "press Ctrl-C").
    pub fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next one, and names it.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }

    /// Turns every signal into a stop request of `stop`.
    pub async fn forward(mut self, stop: StopHandle) {
        loop {
            stop.stop(self.next().await);
        }
    }
}
