//! Progress of a long run, for a person watching: on a terminal, an `indicatif` bar with the
//! rate and the time left; anywhere else (a log file, CI, a pipe) a plain line at most every
//! [`PLAIN_INTERVAL`], so a log shows the run moving without a line per message and without
//! the control characters a bar redraws with. Either way the rate and the ETA are indicatif's
//! (a hidden bar still measures).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{
    HumanCount, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle,
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
        let target = match terminal {
            true => ProgressDrawTarget::stderr_with_hz(BAR_REFRESH_HZ),
            false => ProgressDrawTarget::hidden(),
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
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
            None => self.bar.finish_and_clear(),
        }
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
