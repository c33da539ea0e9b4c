//! Running a program from a test without letting a regression hang the test binary: a run
//! that outlives its limit is killed, with everything it started, and the test fails naming
//! the program and showing what it printed so far.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Runs `command` to its end and returns its output, as [`Command::output`] does; once `limit`
/// has passed it kills the program's whole process group (a `cargo` with its `rustc`s, a
/// `switchyard` with its children) and panics with what the program printed.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let program = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let group = child.id();
    let (done, finished) = mpsc::channel();
    // The output is read to its end on a thread of its own, so the wait can have a deadline
    // and the pipes never fill up and stall the program.
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(limit) {
        Ok(output) => output.unwrap_or_else(|e| panic!("waiting for {program}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
            let printed = match finished.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(output)) => format!(
                    "stdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
                _ => "(its output could not be read)".to_string(),
            };
            panic!("{program} did not finish within {limit:?}, so it was killed; {printed}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_ends_gives_its_output() {
        let output = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(30),
        );
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");
        assert_eq!(output.status.code(), Some(3));
    }

    #[test]
    fn a_program_that_hangs_is_killed_with_its_children_and_named() {
        let started = std::time::Instant::now();
        let hung = std::panic::catch_unwind(|| {
            output_within(
                Command::new("sh").args(["-c", "echo before; sleep 600 & wait"]),
                Duration::from_millis(500),
            )
        });
        let message = *hung
            .expect_err("it must fail")
            .downcast::<String>()
            .expect("a message");
        assert!(message.contains("did not finish within 500ms"), "{message}");
        assert!(message.contains("before"), "{message}");
        // The background `sleep` held the pipes open: only killing the group ends the read.
        assert!(started.elapsed() < Duration::from_secs(10), "{message}");
    }
}
