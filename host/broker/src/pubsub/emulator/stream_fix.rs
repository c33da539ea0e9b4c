//! Makes Google's Pub/Sub emulator notice that a streaming pull ended.
//!
//! Why: the emulator the Cloud SDK ships (0.8.20) bundles a grpc-core newer than its grpc-api.
//! When a client cancels a stream, or its connection drops, grpc-core calls
//! `io.grpc.InternalStatus.asRuntimeException(Status, Metadata, boolean)`, which that grpc-api
//! lacks. The `NoSuchMethodError` (the emulator logs "Exception in onRstStreamRead()") keeps
//! the cancellation from reaching the emulator, which then takes every stream that ever
//! opened for alive: it leases new messages to members that closed or were killed, a whole ack
//! deadline each, may hold an ordering key on a dead stream for good, and after a `kill -9`
//! hands the dead member's share around again and again. Real Pub/Sub does none of this.
//!
//! The fix is a class of switchyard's own, `io.grpc.InternalStatus` with the members the
//! jar's copy has plus the missing method, compiled with the JDK's `javac` against the
//! emulator's jar and put ahead of it on the classpath. It is built only when the jar's class
//! lacks the method (as `javap` lists it), once per emulator jar, in the user's cache
//! directory (never a shared one: it is code the emulator runs). Without a JDK the emulator
//! runs as shipped, after a warning that says what that costs and how to avoid it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use sha2::{Digest, Sha256};

/// The emulator's entry point (its jar's `Main-Class`).
const MAIN_CLASS: &str = "com.google.cloud.pubsub.testing.v1.Main";

/// The method whose absence breaks stream cancellation, as `javap` prints it.
const MISSING_METHOD: &str = "asRuntimeException(io.grpc.Status, io.grpc.Metadata, boolean)";

/// The class that replaces the jar's: its two keys and its one method, as in the jar, and the
/// method grpc-core needs. An exception without a stack trace is the cheap kind grpc-api
/// makes for statuses it only passes on.
const FIXED_CLASS: &str = r#"package io.grpc;

/** switchyard: the jar's InternalStatus plus the method its grpc-core calls. */
public final class InternalStatus {
    private InternalStatus() {}

    public static final Metadata.Key<String> MESSAGE_KEY = Status.MESSAGE_KEY;

    public static final Metadata.Key<Status> CODE_KEY = Status.CODE_KEY;

    public static StatusRuntimeException asRuntimeExceptionWithoutStacktrace(
            Status status, Metadata trailers) {
        return new InternalStatusRuntimeException(status, trailers);
    }

    public static StatusRuntimeException asRuntimeException(
            Status status, Metadata trailers, boolean withStackTrace) {
        return withStackTrace
                ? new StatusRuntimeException(status, trailers)
                : new InternalStatusRuntimeException(status, trailers);
    }
}
"#;

/// How to start the emulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Launch {
    /// Its own launcher script, as installed.
    Script(PathBuf),
    /// Java with the fixed class ahead of the emulator's jar.
    Fixed {
        /// The `java` to run.
        java: PathBuf,
        /// The fixed class's directory, then the jar.
        classpath: OsString,
    },
}

impl Launch {
    /// The command that starts the emulator, given its JVM options.
    pub(super) fn command(&self, jvm_options: &str) -> Command {
        match self {
            Launch::Script(script) => {
                let mut command = Command::new(script);
                command.env("JAVA_OPTS", jvm_options);
                command
            }
            Launch::Fixed { java, classpath } => {
                let mut command = Command::new(java);
                command
                    .arg(jvm_options)
                    .arg("-cp")
                    .arg(classpath)
                    .arg(MAIN_CLASS);
                command
            }
        }
    }
}

/// How to start the emulator whose launcher script is `script`: with the fix when its jar
/// needs it and it can be built, else as installed.
pub(super) fn launch(script: &Path) -> Launch {
    match fixed(script) {
        Ok(Some(launch)) => launch,
        Ok(None) => Launch::Script(script.to_path_buf()),
        Err(reason) => {
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "the Pub/Sub emulator runs as shipped, without switchyard's fix for its \
                     streaming pulls ({reason}): it will take closed and killed members for \
                     alive and hold messages for them an ack deadline or more. Install a JDK \
                     (`apt install default-jdk-headless`) to have it fixed"
                );
            });
            Launch::Script(script.to_path_buf())
        }
    }
}

/// The fixed launch, `None` when the jar needs no fix, or why it cannot be had.
fn fixed(script: &Path) -> Result<Option<Launch>, String> {
    let jar = emulator_jar(script)?;
    let dir = dirs::cache_dir()
        .ok_or("no cache directory (neither XDG_CACHE_HOME nor HOME is set)")?
        .join("switchyard/pubsub-emulator")
        .join(jar_key(&jar)?);
    let classes = dir.join("classes");
    let unneeded = dir.join("unneeded");
    if unneeded.exists() {
        return Ok(None);
    }
    if !classes.join("io/grpc/InternalStatus.class").is_file() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let listing = run(Command::new(jdk_tool("javap"))
            .arg("-cp")
            .arg(&jar)
            .arg("io.grpc.InternalStatus"))?;
        if listing.contains(MISSING_METHOD) {
            std::fs::write(&unneeded, "")
                .map_err(|e| format!("cannot write {}: {e}", unneeded.display()))?;
            return Ok(None);
        }
        compile(&jar, &dir, &classes)?;
    }
    let mut classpath = classes.into_os_string();
    classpath.push(":");
    classpath.push(&jar);
    Ok(Some(Launch::Fixed {
        java: jdk_tool("java"),
        classpath,
    }))
}

/// Compiles [`FIXED_CLASS`] against `jar` into `classes`. Emulators started at once (tests
/// run in parallel) each compile in a directory of their own and move the result into place;
/// the first move wins and the others' are the same.
fn compile(jar: &Path, dir: &Path, classes: &Path) -> Result<(), String> {
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(dir)
        .map_err(|e| format!("cannot create a directory in {}: {e}", dir.display()))?;
    let source = work.path().join("InternalStatus.java");
    std::fs::write(&source, FIXED_CLASS)
        .map_err(|e| format!("cannot write {}: {e}", source.display()))?;
    let built = work.path().join("classes");
    run(Command::new(jdk_tool("javac"))
        .arg("-nowarn")
        .arg("-cp")
        .arg(jar)
        .arg("-d")
        .arg(&built)
        .arg(&source))?;
    if let Err(e) = std::fs::rename(&built, classes)
        && !classes.join("io/grpc/InternalStatus.class").is_file()
    {
        return Err(format!(
            "cannot move the fix into {}: {e}",
            classes.display()
        ));
    }
    Ok(())
}

/// Runs a JDK tool and returns what it printed, or why it failed.
fn run(command: &mut Command) -> Result<String, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A JDK tool: from `$JAVA_HOME/bin` when set (as the emulator's script does), else from the
/// `PATH`.
fn jdk_tool(name: &str) -> PathBuf {
    match std::env::var_os("JAVA_HOME") {
        Some(home) => PathBuf::from(home).join("bin").join(name),
        None => PathBuf::from(name),
    }
}

/// The emulator's jar, `lib/cloud-pubsub-emulator-*.jar` beside the script's `bin/`.
fn emulator_jar(script: &Path) -> Result<PathBuf, String> {
    let lib = script
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("lib"))
        .ok_or_else(|| format!("{} is not in a bin/ directory", script.display()))?;
    let entries =
        std::fs::read_dir(&lib).map_err(|e| format!("cannot read {}: {e}", lib.display()))?;
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with("cloud-pubsub-emulator") && name.ends_with(".jar")
                })
        })
        .ok_or_else(|| format!("no cloud-pubsub-emulator jar in {}", lib.display()))
}

/// Names a jar's fix after the jar (path, size and time), so an upgraded emulator is looked
/// at again.
fn jar_key(jar: &Path) -> Result<String, String> {
    let metadata =
        std::fs::metadata(jar).map_err(|e| format!("cannot read {}: {e}", jar.display()))?;
    let modified = metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let mut hash = Sha256::new();
    hash.update(jar.as_os_str().as_encoded_bytes());
    hash.update(metadata.len().to_le_bytes());
    hash.update(modified.as_nanos().to_le_bytes());
    Ok(hex::encode(&hash.finalize()[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jar_is_found_beside_the_script_and_named_by_its_contents() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bin")).unwrap();
        std::fs::create_dir_all(root.path().join("lib")).unwrap();
        let script = root.path().join("bin/cloud-pubsub-emulator");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(
            emulator_jar(&script)
                .unwrap_err()
                .contains("no cloud-pubsub-emulator jar")
        );

        let jar = root.path().join("lib/cloud-pubsub-emulator-0.8.20-all.jar");
        std::fs::write(&jar, "one").unwrap();
        assert_eq!(emulator_jar(&script).unwrap(), jar);
        let key = jar_key(&jar).unwrap();
        std::fs::write(&jar, "a newer emulator").unwrap();
        assert_ne!(
            jar_key(&jar).unwrap(),
            key,
            "an upgraded jar is looked at again"
        );
    }

    #[test]
    fn the_fixed_launch_puts_the_fix_first() {
        let launch = Launch::Fixed {
            java: PathBuf::from("java"),
            classpath: OsString::from("/cache/classes:/sdk/emulator.jar"),
        };
        let command = launch.command("-Xmx512m");
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(
            args,
            [
                "-Xmx512m",
                "-cp",
                "/cache/classes:/sdk/emulator.jar",
                MAIN_CLASS
            ]
        );
        let script = Launch::Script(PathBuf::from("/sdk/bin/cloud-pubsub-emulator"));
        let command = script.command("-Xmx512m");
        assert_eq!(command.get_args().count(), 0);
        assert!(
            command
                .get_envs()
                .any(|(name, value)| name == "JAVA_OPTS" && value == Some("-Xmx512m".as_ref()))
        );
    }
}
