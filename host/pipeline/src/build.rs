//! Building components from source: the `wasm32-wasip2` target and the cargo invocation.
//!
//! Everything that builds a component (the demo, `switchyard build`, the `just` targets through
//! it, the tests) goes through [`ComponentBuild`], so the rules live here once:
//!
//! - **The target is made present first.** `rust-toolchain.toml` lists `wasm32-wasip2`, but
//!   rustup (1.29) installs the targets it lists only when it installs the toolchain itself; a
//!   machine whose pinned toolchain is already there gets nothing, and cargo then fails deep in
//!   the build with "can't find crate for `core`". So before cargo runs we ask the toolchain
//!   cargo will use (`rustc --print sysroot`, from the workspace so `rust-toolchain.toml`
//!   applies) whether the target's standard library is there, and when it is not we run
//!   `rustup target add` for the active toolchain, saying so in one line, and check again.
//!   Without rustup we stop with an error that says what to install.
//! - **One profile, one target directory layout.** Components build with the `component`
//!   profile (release without debug info) into `<target dir>/wasm32-wasip2/component/`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;

/// The target components are built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// The cargo profile components are built with (see the workspace `Cargo.toml`).
pub const COMPONENT_PROFILE: &str = "component";

/// Why a component could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `rustc` could not be started.
    #[error(
        "cannot run `{program}` to find the Rust toolchain ({error}); install Rust with rustup \
         (https://rustup.rs) and run again"
    )]
    RustcNotRunnable {
        /// The program tried (`$RUSTC`, else `rustc`).
        program: String,
        /// Why it could not start (in the message, so not also a `source`, which `{:#}` would
        /// print twice).
        error: io::Error,
    },
    /// `rustc --print sysroot` ran but did not answer with a directory.
    #[error("`{program} --print sysroot` failed ({status}): {stderr}")]
    SysrootUnknown {
        /// The program run.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on standard error.
        stderr: String,
    },
    /// The target is missing and there is no rustup to add it.
    #[error(
        "the Rust toolchain at {sysroot} has no {target} target, and rustup, which would add \
         it, cannot be run (`{rustup}`: {error}). Install rustup (https://rustup.rs) and run \
         again, or install the {target} standard library for this toolchain yourself (for a \
         Rust from a package manager, its rust-std package for {target})"
    )]
    TargetMissingNoRustup {
        /// The target.
        target: String,
        /// The toolchain's sysroot.
        sysroot: PathBuf,
        /// The rustup program tried.
        rustup: String,
        /// Why it could not start (in the message, so not also a `source`, which `{:#}` would
        /// print twice).
        error: io::Error,
    },
    /// `rustup target add` ran and failed.
    #[error(
        "`{command}` failed ({status}); see its output above, fix what it says (it needs to \
         reach the Rust distribution server) and run again"
    )]
    RustupFailed {
        /// The command line run.
        command: String,
        /// Its exit status.
        status: ExitStatus,
    },
    /// `rustup target add` succeeded but the toolchain cargo uses still lacks the target: the
    /// rustc that cargo runs is not the rustup toolchain the target went to.
    #[error(
        "`{command}` succeeded, but the Rust toolchain at {sysroot} still has no {target} \
         target: that rustc is not managed by rustup (is $RUSTC set?). Install the {target} \
         standard library for it, or unset RUSTC"
    )]
    TargetStillMissing {
        /// The target.
        target: String,
        /// The toolchain's sysroot.
        sysroot: PathBuf,
        /// The command line run.
        command: String,
    },
    /// cargo could not be started.
    #[error("cannot run cargo ({error}); install Rust with rustup (https://rustup.rs)")]
    CargoNotRunnable {
        /// Why it could not start (in the message, so not also a `source`, which `{:#}` would
        /// print twice).
        error: io::Error,
    },
    /// cargo ran and failed.
    #[error("`{command}` failed ({status}); see cargo's output above")]
    CargoFailed {
        /// The command line run.
        command: String,
        /// Its exit status.
        status: ExitStatus,
    },
}

/// The Rust toolchain cargo will use from a directory: its `rustc` and the `rustup` that
/// manages it (if any).
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// The rustc program: `$RUSTC`, else `rustc` from the PATH (rustup's proxy, which picks the
    /// toolchain from `rust-toolchain.toml`).
    pub rustc: OsString,
    /// The rustup program: `rustup` from the PATH.
    pub rustup: OsString,
    /// The directory rustc and rustup run in, so `rust-toolchain.toml` there applies.
    pub dir: PathBuf,
}

impl Toolchain {
    /// The toolchain cargo uses in `dir`, found as cargo finds it.
    pub fn for_dir(dir: &Path) -> Self {
        Self {
            rustc: std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()),
            rustup: "rustup".into(),
            dir: dir.to_path_buf(),
        }
    }

    /// The toolchain's root directory (`rustc --print sysroot`).
    pub fn sysroot(&self) -> Result<PathBuf, BuildError> {
        let program = self.rustc.to_string_lossy().into_owned();
        let output = Command::new(&self.rustc)
            .current_dir(&self.dir)
            .args(["--print", "sysroot"])
            .stdin(Stdio::null())
            .output()
            .map_err(|error| BuildError::RustcNotRunnable {
                program: program.clone(),
                error,
            })?;
        let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !output.status.success() || sysroot.is_empty() {
            return Err(BuildError::SysrootUnknown {
                program,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(PathBuf::from(sysroot))
    }

    /// Whether the toolchain has `target`'s standard library.
    pub fn has_target(&self, target: &str) -> Result<bool, BuildError> {
        Ok(target_libdir(&self.sysroot()?, target).is_dir())
    }

    /// Makes sure the toolchain has `target`, adding it with `rustup target add` (for the
    /// active toolchain) when it is missing. Returns whether it had to be added.
    pub fn ensure_target(&self, target: &str) -> Result<bool, BuildError> {
        let sysroot = self.sysroot()?;
        if target_libdir(&sysroot, target).is_dir() {
            return Ok(false);
        }
        // No `--toolchain`: in the workspace, with the environment cargo gave us
        // (RUSTUP_TOOLCHAIN when cargo runs through rustup's proxy), rustup picks the same
        // active toolchain cargo builds with. The check afterwards catches a rustc that rustup
        // does not manage.
        let args = ["target", "add", target];
        let command = format!("{} {}", self.rustup.to_string_lossy(), args.join(" "));
        let toolchain =
            std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| sysroot.display().to_string());
        eprintln!(
            "switchyard: the Rust toolchain {toolchain} has no {target} target; adding it: \
             {command}"
        );
        let status = Command::new(&self.rustup)
            .current_dir(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .status()
            .map_err(|error| BuildError::TargetMissingNoRustup {
                target: target.to_string(),
                sysroot: sysroot.clone(),
                rustup: self.rustup.to_string_lossy().into_owned(),
                error,
            })?;
        if !status.success() {
            return Err(BuildError::RustupFailed { command, status });
        }
        if !target_libdir(&sysroot, target).is_dir() {
            return Err(BuildError::TargetStillMissing {
                target: target.to_string(),
                sysroot,
                command,
            });
        }
        Ok(true)
    }
}

/// Where a toolchain keeps a target's standard library.
fn target_libdir(sysroot: &Path, target: &str) -> PathBuf {
    sysroot.join("lib").join("rustlib").join(target).join("lib")
}

/// Makes sure the toolchain cargo uses in `workspace` can build for [`WASM_TARGET`], adding
/// the target with rustup when it is missing. Concurrent callers in one process wait for the
/// first one instead of running rustup twice.
pub fn ensure_wasm_target(workspace: &Path) -> Result<(), BuildError> {
    static CHECKED: Mutex<bool> = Mutex::new(false);
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !*checked {
        Toolchain::for_dir(workspace).ensure_target(WASM_TARGET)?;
        *checked = true;
    }
    Ok(())
}

/// A cargo build of components for [`WASM_TARGET`] with the [`COMPONENT_PROFILE`] profile.
#[derive(Debug, Clone)]
pub struct ComponentBuild {
    workspace: PathBuf,
    target_dir: PathBuf,
    packages: Vec<String>,
}

impl ComponentBuild {
    /// A build of packages of the workspace at `workspace` into `target_dir` (used as
    /// `CARGO_TARGET_DIR`).
    pub fn new(workspace: impl Into<PathBuf>, target_dir: impl Into<PathBuf>) -> Self {
        Self {
            workspace: workspace.into(),
            target_dir: target_dir.into(),
            packages: Vec::new(),
        }
    }

    /// Adds packages to build (`-p NAME` each).
    pub fn packages<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.packages.extend(names.into_iter().map(Into::into));
        self
    }

    /// Where the built `.wasm` files go.
    pub fn output_dir(&self) -> PathBuf {
        self.target_dir.join(WASM_TARGET).join(COMPONENT_PROFILE)
    }

    /// Builds the components (a no-op for cargo when nothing changed) and returns
    /// [`Self::output_dir`]. Cargo's progress goes to standard error.
    pub fn build(&self) -> Result<PathBuf, BuildError> {
        let mut command = self.cargo("build")?;
        run(&mut command)?;
        Ok(self.output_dir())
    }

    /// `cargo SUBCOMMAND --profile component --target wasm32-wasip2 -p …`, after making sure the
    /// target is there.
    fn cargo(&self, subcommand: &str) -> Result<Command, BuildError> {
        ensure_wasm_target(&self.workspace)?;
        let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        command
            .current_dir(&self.workspace)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .stdin(Stdio::null())
            .args([
                subcommand,
                "--profile",
                COMPONENT_PROFILE,
                "--target",
                WASM_TARGET,
            ]);
        for package in &self.packages {
            command.args(["-p", package]);
        }
        Ok(command)
    }
}

fn run(command: &mut Command) -> Result<(), BuildError> {
    let status = command
        .status()
        .map_err(|error| BuildError::CargoNotRunnable { error })?;
    if status.success() {
        Ok(())
    } else {
        Err(BuildError::CargoFailed {
            command: command_line(command),
            status,
        })
    }
}

fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> PathBuf {
        crate::demo::workspace_root()
    }

    /// A target this toolchain knows but has no standard library for.
    fn uninstalled_target(toolchain: &Toolchain) -> String {
        let sysroot = toolchain.sysroot().unwrap();
        let output = Command::new(&toolchain.rustc)
            .current_dir(&toolchain.dir)
            .args(["--print", "target-list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|target| !target_libdir(&sysroot, target).exists())
            .expect("a target without its standard library")
            .to_string()
    }

    #[test]
    fn a_present_target_needs_no_rustup() {
        let toolchain = Toolchain {
            rustup: "/nonexistent/rustup".into(),
            ..Toolchain::for_dir(&workspace())
        };
        let output = Command::new(&toolchain.rustc)
            .current_dir(&toolchain.dir)
            .arg("-vV")
            .output()
            .unwrap();
        let host = String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.strip_prefix("host: ").map(str::to_string))
            .expect("rustc -vV names the host");
        assert!(toolchain.has_target(&host).unwrap());
        assert!(!toolchain.ensure_target(&host).unwrap());
    }

    #[test]
    fn a_missing_target_without_rustup_says_what_to_install() {
        let toolchain = Toolchain {
            rustup: "/nonexistent/rustup".into(),
            ..Toolchain::for_dir(&workspace())
        };
        let target = uninstalled_target(&toolchain);
        let error = toolchain.ensure_target(&target).unwrap_err();
        assert!(
            matches!(error, BuildError::TargetMissingNoRustup { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        for needle in [target.as_str(), "rustup", "https://rustup.rs", "rust-std"] {
            assert!(message.contains(needle), "{needle:?} not in: {message}");
        }
    }

    #[test]
    fn an_unrunnable_rustc_is_explained() {
        let toolchain = Toolchain {
            rustc: "/nonexistent/rustc".into(),
            ..Toolchain::for_dir(&workspace())
        };
        let error = toolchain.ensure_target(WASM_TARGET).unwrap_err();
        assert!(
            matches!(error, BuildError::RustcNotRunnable { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("/nonexistent/rustc"));
    }
}
