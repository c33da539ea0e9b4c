//! Starts Google's Pub/Sub emulator (a Java program from the Cloud SDK) on a free loopback
//! port, for the demo, `just pubsub-emulator` and the tests, and stops it when dropped.
//!
//! Where it is: `$PUBSUB_EMULATOR_BIN` if set, else `platform/pubsub-emulator/bin/
//! cloud-pubsub-emulator` under the SDK root that `gcloud info` reports, else under the Debian
//! package's root `/usr/lib/google-cloud-sdk`. Its Java heap is capped (it grows without
//! bound otherwise). Unless `$PUBSUB_EMULATOR_BIN` names what to run, it starts with a fix
//! for its streaming pulls ([`stream_fix`]): as shipped, it never notices that a subscriber
//! closed or died.
//!
//! The emulator must not outlive its host, even one that is killed: it is spawned from a
//! thread of its own that lives as long as the emulator, and asks Linux to kill it when that
//! thread (so, at the latest, the process) ends.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::BrokerError;

mod stream_fix;

/// The heap the emulator may use.
const HEAP: &str = "-Xmx512m";
/// How long the emulator may take to start (it needs about 4 s).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running emulator; dropping it stops it.
#[derive(Debug)]
pub struct PubSubEmulator {
    pid: u32,
    exited: Mutex<mpsc::Receiver<String>>,
    address: SocketAddr,
}

impl PubSubEmulator {
    /// Starts an emulator on 127.0.0.1 at `port`, or at a free port, and waits until it
    /// accepts connections.
    ///
    /// The emulator cannot take a free port itself and say which (`--port=0` binds one but
    /// reports 0), so a port found free may be taken by someone else before the emulator
    /// binds it; then the emulator exits at start, and another free port is tried, twice.
    pub fn start(port: Option<u16>) -> Result<Self, BrokerError> {
        let launch = match std::env::var_os("PUBSUB_EMULATOR_BIN") {
            Some(binary) => stream_fix::Launch::Script(PathBuf::from(binary)),
            None => stream_fix::launch(&find_binary()?),
        };
        tracing::debug!("starting the Pub/Sub emulator: {launch:?}");
        if let Some(port) = port {
            return Self::start_at(&launch, port).map_err(|(error, _)| error);
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::start_at(&launch, free_port()?) {
                Err((e, StartFailure::ExitedAtStart)) if attempts < 3 => {
                    tracing::debug!("the Pub/Sub emulator did not start ({e}); another port");
                }
                started => return started.map_err(|(error, _)| error),
            }
        }
    }

    fn start_at(
        launch: &stream_fix::Launch,
        port: u16,
    ) -> Result<Self, (BrokerError, StartFailure)> {
        let other = |error: BrokerError| (error, StartFailure::Other);
        let launch = launch.clone();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let (spawned, pid) = mpsc::channel();
        let (exit_sender, exited) = mpsc::channel();
        std::thread::Builder::new()
            .name("pubsub-emulator".into())
            .spawn(move || {
                let mut command = launch.command(HEAP);
                command
                    .arg("--host=127.0.0.1")
                    .arg(format!("--port={port}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                kill_with_parent(&mut command);
                match command.spawn() {
                    Ok(mut child) => {
                        let _ = spawned.send(Ok(child.id()));
                        let status = child.wait();
                        let _ = exit_sender.send(format!("{status:?}"));
                    }
                    Err(e) => {
                        let _ = spawned.send(Err(format!(
                            "cannot start the Pub/Sub emulator ({launch:?}): {e}"
                        )));
                    }
                }
            })
            .map_err(|e| other(BrokerError::unavailable("cannot start a thread").with_source(e)))?;
        let pid = pid
            .recv()
            .map_err(|e| {
                other(BrokerError::unavailable("the emulator's launcher stopped").with_source(e))
            })?
            .map_err(|e| other(BrokerError::unavailable(e)))?;
        let emulator = Self {
            pid,
            exited: Mutex::new(exited),
            address,
        };
        emulator.wait_until_ready()?;
        Ok(emulator)
    }

    /// `http://127.0.0.1:PORT`, for the backend's `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `127.0.0.1:PORT`, the form `PUBSUB_EMULATOR_HOST` takes.
    pub fn host(&self) -> String {
        self.address.to_string()
    }

    fn wait_until_ready(&self) -> Result<(), (BrokerError, StartFailure)> {
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            let exited = self
                .exited
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_recv();
            if let Ok(status) = exited {
                let error = BrokerError::unavailable(format!(
                    "the Pub/Sub emulator exited at start ({status}); is port {} free and Java \
                     installed?",
                    self.address.port()
                ));
                return Err((error, StartFailure::ExitedAtStart));
            }
            if TcpStream::connect_timeout(&self.address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let error = BrokerError::timeout(format!(
            "the Pub/Sub emulator did not listen on {} within {START_TIMEOUT:?}",
            self.address
        ));
        Err((error, StartFailure::Other))
    }
}

/// Why an emulator did not start, for [`PubSubEmulator::start`] to decide whether another
/// port may help.
#[derive(Debug, Clone, Copy)]
enum StartFailure {
    /// It exited at once: most likely its port was taken between being found free and bound.
    ExitedAtStart,
    /// Anything else (no Java, no thread, too slow): another port would fail the same way.
    Other,
}

impl Drop for PubSubEmulator {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: plain syscall on the emulator's pid, which its keeper thread has not
            // reaped yet (it reports the exit through `exited`).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let exited = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        let _ = exited.recv_timeout(Duration::from_secs(10));
    }
}

/// Asks Linux to send the emulator SIGTERM when the thread that spawned it ends.
fn kill_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

fn free_port() -> Result<u16, BrokerError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BrokerError::unavailable("cannot find a free port").with_source(e))
}

/// The emulator's launcher script as the Cloud SDK installs it.
fn find_binary() -> Result<PathBuf, BrokerError> {
    const RELATIVE: &str = "platform/pubsub-emulator/bin/cloud-pubsub-emulator";
    let mut roots = Vec::new();
    if let Ok(output) = Command::new("gcloud")
        .args(["info", "--format=value(installation.sdk_root)"])
        .stderr(Stdio::null())
        .output()
    {
        let root = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !root.is_empty() {
            roots.push(PathBuf::from(root));
        }
    }
    roots.push(PathBuf::from("/usr/lib/google-cloud-sdk"));
    roots
        .into_iter()
        .map(|root| root.join(RELATIVE))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            BrokerError::config(
                "the Pub/Sub emulator is not installed: install the Debian package \
                 google-cloud-cli-pubsub-emulator (or `gcloud components install \
                 pubsub-emulator`), or set PUBSUB_EMULATOR_BIN",
            )
        })
}
