//! `switchyard exec` and `switchyard test`: one component run by hand, once, as a command:
//! against a broker (`exec`), or as a crate's unit-test binary with sends recorded (`test`,
//! cargo's runner for wasm32-wasip2).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use switchyard_broker::{BrokerConfig, EmbeddedConfig};
use switchyard_runtime::manifest::{ComponentConfig, Limits, Preopen};
use switchyard_runtime::{Runtime, RuntimeOptions};

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The component.
    pub wasm: PathBuf,
    /// Broker: `embedded` (default), kafka://HOST:PORT or pubsub://PROJECT.
    #[arg(long, env = "BROKER", default_value = "embedded")]
    pub broker: String,
    /// A host directory to preopen read-only, as HOST::GUEST or HOST alone (then at its own
    /// absolute path); a relative HOST is taken from the current directory. Repeatable.
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    pub dirs: Vec<String>,
    /// Topics the component may send to.
    #[arg(long = "publish")]
    pub publish: Vec<String>,
    /// Arguments for the component.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Another host directory to preopen read-only, as HOST::GUEST or HOST alone (then at
    /// its own absolute path); a relative HOST is taken from the current directory, the
    /// package's when cargo runs the tests. Repeatable.
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    pub dirs: Vec<String>,
    /// The test binary (cargo passes it).
    pub wasm: PathBuf,
    /// Arguments for the test binary: cargo passes the test filter and flags such as
    /// --nocapture.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub async fn exec(
    wasm: PathBuf,
    broker: &str,
    dirs: &[String],
    publish: Vec<String>,
    args: Vec<String>,
    mut options: RuntimeOptions,
) -> anyhow::Result<ExitCode> {
    let current = std::env::current_dir().context("reading the current directory")?;
    let preopens = dirs
        .iter()
        .map(|dir| read_only_dir(dir, &current))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (name, config) = one_off(&wasm, publish, args, preopens, &mut options);
    let broker = match BrokerConfig::from_url(broker)? {
        BrokerConfig::Embedded(_) => BrokerConfig::Embedded(EmbeddedConfig::default()),
        other => other,
    };
    let connected = broker.connect().await?;
    let runtime = Runtime::new(connected.broker.clone(), options).await?;
    let component = runtime.load(&name, &config)?;
    let outcome = runtime.run_command(&component).await?;
    Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1)))
}

/// A `--dir` of `exec` or `test`: `HOST::GUEST`, or `HOST` alone, seen at its own absolute
/// path; a relative `HOST` is taken from `current`. Read-only.
fn read_only_dir(dir: &str, current: &Path) -> anyhow::Result<Preopen> {
    let (host, guest) = match dir.split_once("::") {
        Some((host, guest)) => (host, Some(guest)),
        None => (dir, None),
    };
    // Canonical, so `../../models` becomes a path the guest can name without `..`.
    let host = current.join(host).canonicalize().with_context(|| {
        format!(
            "--dir {dir}: no directory {host} (relative paths are taken from {})",
            current.display()
        )
    })?;
    if !host.is_dir() {
        bail!("--dir {dir}: {} is not a directory", host.display());
    }
    Ok(Preopen {
        guest: guest.map_or_else(|| host.to_string_lossy().into_owned(), String::from),
        host,
        writable: false,
    })
}

/// A command run by hand (`exec`, `test`), named after its file: no call deadline and up to
/// 1 GiB of memory, since a one-off job or a test binary is not a service to protect from
/// itself.
fn one_off(
    wasm: &std::path::Path,
    publish: Vec<String>,
    args: Vec<String>,
    preopens: Vec<Preopen>,
    options: &mut RuntimeOptions,
) -> (String, ComponentConfig) {
    options.pool.max_memory_bytes = 1 << 30;
    let name = wasm
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "component".into());
    let config = ComponentConfig {
        publish,
        args,
        preopens,
        limits: Limits {
            max_call_ms: 0,
            max_memory_mb: 1024,
            ..Limits::default()
        },
        ..ComponentConfig::new(wasm.to_path_buf())
    };
    (name, config)
}

/// `switchyard test`: runs a unit-test binary in test mode (see [`Runtime::for_unit_tests`]).
pub async fn unit_tests(
    wasm: PathBuf,
    dirs: &[String],
    args: Vec<String>,
    mut options: RuntimeOptions,
) -> anyhow::Result<ExitCode> {
    // Test binaries change with every edit: caching their compiled code would only fill the
    // cache with builds nobody runs again.
    options.cache_dir = None;
    let current = std::env::current_dir().context("reading the current directory")?;
    let scratch = tempfile::Builder::new()
        .prefix("switchyard-test-")
        .tempdir()
        .context("creating the tests' /tmp")?;
    let read_only = |host: PathBuf| Preopen {
        guest: host.to_string_lossy().into_owned(),
        host,
        writable: false,
    };
    let mut preopens = vec![
        Preopen {
            guest: ".".into(),
            ..read_only(current.clone())
        },
        read_only(current.clone()),
        Preopen {
            host: scratch.path().to_path_buf(),
            guest: "/tmp".into(),
            writable: true,
        },
    ];
    for dir in dirs {
        preopens.push(read_only_dir(dir, &current)?);
    }
    // A failing test panics, and on wasm32-wasip2 a panic aborts the whole binary: libtest
    // never gets to print the output it captured, the panic's message among it. So output is
    // not captured here (libtest's own switch, which a test binary always accepts).
    let capture_switches = ["--nocapture", "--no-capture", "--list"];
    let args = if args
        .iter()
        .any(|arg| capture_switches.contains(&arg.as_str()))
    {
        args
    } else {
        std::iter::once("--nocapture".to_string())
            .chain(args)
            .collect()
    };
    let (name, config) = one_off(&wasm, Vec::new(), args, preopens, &mut options);
    let runtime = Runtime::for_unit_tests(options).await?;
    let component = runtime.load(&name, &config)?;
    match runtime.run_command(&component).await {
        Ok(outcome) => Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1))),
        Err(switchyard_runtime::RuntimeError::Trapped {
            trap, rust_panic, ..
        }) => {
            // A panic's message, above, says where it happened; its trap's Wasm backtrace
            // would only bury it. Any other trap has only the backtrace to tell.
            let details = if rust_panic {
                String::new()
            } else {
                format!("\n{trap}")
            };
            eprintln!(
                "error: {name} stopped: a test failed (its message is above) or trapped; on \
                 wasm32-wasip2 either ends the whole test binary (Wasm cannot unwind), so the \
                 tests after it did not run{details}"
            );
            // libtest's code for failed tests.
            Ok(ExitCode::from(101))
        }
        Err(e) => Err(e.into()),
    }
}
