//! One module per command (or pair of commands); [`dispatch`] sends a parsed command line to
//! its body.

pub mod broker;
pub mod build;
pub mod demo;
pub mod deploy;
pub mod exec;
pub mod messages;
pub mod new;
pub mod report;
pub mod run;
pub mod topics;
pub mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use switchyard_runtime::RuntimeOptions;

use crate::cli::{Cli, Commands};

/// Runs the command `cli` names; its exit code, or the error to print.
pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let options = runtime_options(cli.cache_dir);
    let done = |()| ExitCode::SUCCESS;
    match cli.command {
        Commands::Publish(args) => messages::publish(args).await.map(done),
        Commands::Consume(args) => messages::consume(args).await.map(done),
        Commands::Replay(args) => messages::replay(args).await.map(done),
        Commands::Topics { command } => topics::run(command).await.map(done),
        Commands::Validate(args) => validate::run(args),
        Commands::Run(args) => run::run(args, options).await,
        Commands::Deploy(args) => deploy::run(args).await,
        Commands::PubsubEmulator(args) => broker::pubsub_emulator(args).await,
        Commands::Broker(args) => broker::broker(args).await,
        Commands::Demo(args) => demo::run(args, options).await,
        Commands::InstallOnnxruntime => build::install_onnxruntime().await,
        Commands::Build(args) => build::build(args),
        Commands::Report(args) => report::run(args).await,
        Commands::New(args) => new::run(args),
        Commands::Test(args) => exec::unit_tests(args.wasm, &args.dirs, args.args, options).await,
        Commands::Exec(args) => {
            exec::exec(
                args.wasm,
                &args.broker,
                &args.dirs,
                args.publish,
                args.args,
                options,
            )
            .await
        }
    }
}

/// The runtime's options, with the compile cache `--cache-dir` names. The binary keeps the
/// demo's results table, so its components run under `switchyard run` and `test` too.
fn runtime_options(cache_dir: Option<PathBuf>) -> RuntimeOptions {
    let mut options = RuntimeOptions {
        tables: switchyard_pipeline::predictions::tables(),
        ..RuntimeOptions::default()
    };
    if let Some(dir) = cache_dir {
        options.cache_dir = Some(dir);
    }
    options
}
