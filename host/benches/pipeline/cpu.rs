//! CPU time, the figure a noisy machine moves least: a process's user and system seconds
//! count its own work, not the time it waited for a core another process had.
//!
//! Linux only (the bench's machines): a running process's from `/proc/PID/stat`, finished
//! children's from `getrusage(RUSAGE_CHILDREN)`.

use anyhow::{Context, bail};

/// The CPU seconds (user and system) of every child process this process has waited for so
/// far: read it before and after a run, and the difference is what the run's children used.
pub fn reaped_children_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given, which lives on this stack.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The CPU seconds (user and system) process `pid` has used so far, to the kernel's clock
/// tick (10 ms on most systems).
pub fn process_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces, but it ends at the last ')'; utime and
    // stime are fields 14 and 15, the 12th and 13th after it.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path} has no command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        let field = fields
            .get(index)
            .with_context(|| format!("{path} has {} fields", fields.len() + 2))?;
        Ok(field.parse::<u64>()? as f64)
    };
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        bail!("the system says no clock ticks per second");
    }
    Ok((ticks(11)? + ticks(12)?) / per_second as f64)
}

/// What a pipeline used per request: the difference between a long and a short run of it,
/// divided by the requests between them, so what both runs spend once (start-up, joining the
/// groups, draining at the end) cancels out.
pub fn per_request_us(short: (usize, f64), long: (usize, f64)) -> Option<f64> {
    let ((short_n, short_s), (long_n, long_s)) = (short, long);
    (long_n > short_n).then(|| (long_s - short_s) * 1e6 / (long_n - short_n) as f64)
}
