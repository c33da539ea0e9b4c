//! Progress of a long run, for a person watching: on a terminal, an `indicatif` bar with the
//! rate and the time left; anywhere else (a log file, CI, a pipe) a plain line at most every
//! [`PLAIN_INTERVAL`], so a log shows the run moving without a line per message and without
//! the control characters a bar redraws with. Either way the rate and the ETA are indicatif's
//! (a hidden bar still measures).
//!
//! Bars and log lines share standard error. Every bar belongs to one [`MultiProgress`], and
//! the log writes through [`BarAwareStderr`], which hides the bars while it writes a line and
//! draws them again below it: a warning during a run stays whole instead of landing on a bar's
//! line, and several commands' bars under `switchyard run` stack instead of fighting.
//! Components' standard error goes the same way, a line at a time ([`GuestStderr`]).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{
    HumanCount, HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState,
    ProgressStyle,
};

/// The shortest time between two plain progress lines.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

/// How often a bar on a terminal redraws: enough to look live, few enough to cost nothing.
const BAR_REFRESH_HZ: u8 = 10;

/// Counts `done` of `total` units of one kind of work.
#[derive(Debug)]
pub struct Progress {
    what: String,
    bar: ProgressBar,
    /// When the last plain line was printed; `None` when drawing a bar.
    plain: Option<Mutex<Instant>>,
}

impl Progress {
    /// Progress of `total` units of `what` ("predictions"): a bar when standard error is a
    /// terminal, plain lines otherwise.
    pub fn new(what: &str, total: u64) -> Self {
        Self::drawn(what, total, std::io::stderr().is_terminal())
    }

    /// Progress drawn as a bar (`terminal`) or as plain lines.
    pub fn drawn(what: &str, total: u64, terminal: bool) -> Self {
        let bar = match terminal {
            true => bars().add(ProgressBar::new(total)),
            false => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden()),
        };
        let style = ProgressStyle::with_template(
            "{msg} [{wide_bar}] {human_pos}/{human_len} {rate} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        // Whole units per second, as the plain lines say it (indicatif's own `per_sec` shows
        // four decimals).
        .with_key(
            "rate",
            |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{}/s", HumanCount(state.per_sec().round() as u64));
            },
        )
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        Self {
            what: what.to_string(),
            bar,
            plain: (!terminal).then(|| Mutex::new(Instant::now())),
        }
    }

    /// Sets how many units are done.
    pub fn set(&self, done: u64) {
        if done == self.bar.position() {
            return;
        }
        self.bar.set_position(done);
        if let Some(last) = &self.plain {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= PLAIN_INTERVAL {
                *last = Instant::now();
                eprintln!("{}", self.line());
            }
        }
    }

    /// The plain line: `predictions: 4,000/10,000 (2,131/s, ETA 3 seconds)`.
    pub fn line(&self) -> String {
        let (done, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
        format!(
            "{}: {}/{} ({}/s, ETA {})",
            self.what,
            HumanCount(done),
            HumanCount(total),
            HumanCount(self.bar.per_sec().round() as u64),
            HumanDuration(self.bar.eta())
        )
    }

    /// Ends it: the bar is cleared (what follows is the run's summary), and plain lines get a
    /// last one.
    pub fn finish(&self) {
        match &self.plain {
            Some(_) => eprintln!(
                "{}: {}/{} in {}",
                self.what,
                HumanCount(self.bar.position()),
                HumanCount(self.bar.length().unwrap_or(0)),
                took(self.bar.elapsed())
            ),
            None => {
                self.bar.finish_and_clear();
                bars().remove(&self.bar);
            }
        }
    }
}

/// The bars on the terminal, drawn together.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| {
        MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(BAR_REFRESH_HZ))
    })
}

/// A component's standard error, on the host's: written a line at a time through
/// [`BarAwareStderr`]. Why lines: Rust's `eprintln!` in a guest writes one line in several
/// pieces (each a WASI write and flush), and a bar redrawn between two pieces would split it.
/// What is left without a newline is written when the instance goes.
#[derive(Debug, Clone, Default)]
pub struct GuestStderr {
    pending: Arc<PendingLine>,
}

/// The start of a line not yet ended, shared by the streams of one instance.
#[derive(Debug, Default)]
struct PendingLine(Mutex<Vec<u8>>);

impl GuestStderr {
    /// A component's standard error, for `WasiCtxBuilder::stderr`.
    pub fn new() -> Self {
        Self::default()
    }

    fn write_lines(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut pending = self.pending.0.lock().unwrap_or_else(|p| p.into_inner());
        match whole_lines(&mut pending, bytes) {
            Some(lines) => BarAwareStderr.write_all(&lines),
            None => Ok(()),
        }
    }
}

/// Adds `bytes` to `pending` and takes out the lines it now ends, if any.
fn whole_lines(pending: &mut Vec<u8>, bytes: &[u8]) -> Option<Vec<u8>> {
    pending.extend_from_slice(bytes);
    let end = pending.iter().rposition(|&byte| byte == b'\n')?;
    Some(pending.drain(..=end).collect())
}

impl Drop for PendingLine {
    fn drop(&mut self) {
        let rest = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        if !rest.is_empty() {
            rest.push(b'\n');
            let _ = BarAwareStderr.write_all(rest);
        }
    }
}

impl wasmtime_wasi::cli::IsTerminal for GuestStderr {
    fn is_terminal(&self) -> bool {
        std::io::IsTerminal::is_terminal(&std::io::stderr())
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestStderr {
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

fn stream_error(e: std::io::Error) -> wasmtime_wasi::p2::StreamError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe => wasmtime_wasi::p2::StreamError::Closed,
        _ => wasmtime_wasi::p2::StreamError::LastOperationFailed(e.into()),
    }
}

impl wasmtime_wasi::p2::OutputStream for GuestStderr {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.write_lines(&bytes).map_err(stream_error)
    }

    /// Flushes the host's standard error, not the unfinished line: a guest flushes after
    /// every piece of a line.
    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        std::io::stderr().flush().map_err(stream_error)
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        // As wasmtime-wasi's own standard error: stderr writes do not wait.
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::Pollable for GuestStderr {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestStderr {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.write_lines(buf).map(|()| buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(std::io::stderr().flush())
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Standard error for log lines (`tracing_subscriber::fmt().with_writer(BarAwareStderr::new)`):
/// writes with the progress bars hidden, then draws them again below what it wrote.
#[derive(Debug, Default)]
pub struct BarAwareStderr;

impl BarAwareStderr {
    /// The writer (a function, as `with_writer` takes one).
    pub fn new() -> Self {
        Self
    }
}

impl Write for BarAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // One log line in one piece, with the bars hidden once.
        bars().suspend(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// How long something took: tenths of a second under a minute (indicatif's words would call a
/// sub-second run "0 seconds"), indicatif's words beyond.
fn took(elapsed: Duration) -> String {
    if elapsed < Duration::from_secs(60) {
        format!("{:.1} s", elapsed.as_secs_f64())
    } else {
        HumanDuration(elapsed).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_line_written_in_pieces_comes_out_whole() {
        let mut pending = Vec::new();
        assert_eq!(whole_lines(&mut pending, b"producer: sent "), None);
        assert_eq!(whole_lines(&mut pending, b"3000"), None);
        assert_eq!(
            whole_lines(&mut pending, b" requests\nnext"),
            Some(b"producer: sent 3000 requests\n".to_vec())
        );
        assert_eq!(
            whole_lines(&mut pending, b" one\nand\n"),
            Some(b"next one\nand\n".to_vec())
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn short_runs_take_tenths_of_a_second() {
        assert_eq!(took(Duration::from_millis(140)), "0.1 s");
        assert_eq!(took(Duration::from_millis(12_340)), "12.3 s");
        assert_eq!(took(Duration::from_secs(125)), "2 minutes");
    }

    #[test]
    fn plain_lines_say_what_how_many_the_rate_and_the_time_left() {
        let progress = Progress::drawn("predictions", 10_000, false);
        progress.set(4_000);
        let line = progress.line();
        assert!(line.starts_with("predictions: 4,000/10,000 ("), "{line}");
        assert!(line.contains("/s, ETA "), "{line}");
    }
}
