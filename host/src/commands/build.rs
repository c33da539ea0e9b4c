//! `switchyard build` (the components of this source tree, for wasm32-wasip2) and
//! `switchyard install-onnxruntime`.

use std::process::ExitCode;

use switchyard_pipeline::demo;
use switchyard_runtime::nn::onnxruntime;

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// A package to build; repeatable (default: producer, classifier and consumer).
    #[arg(short = 'p', long = "package")]
    pub packages: Vec<String>,
}

pub fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let packages = args.packages;
    let packages = if packages.is_empty() {
        demo::COMPONENTS.map(String::from).to_vec()
    } else {
        packages
    };
    let output = demo::source_build().packages(packages).build()?;
    println!("{}", output.display());
    Ok(ExitCode::SUCCESS)
}

pub async fn install_onnxruntime() -> anyhow::Result<ExitCode> {
    eprintln!(
        "installing ONNX Runtime {} (pip download onnxruntime=={})…",
        onnxruntime::VERSION,
        onnxruntime::VERSION
    );
    let path = tokio::task::spawn_blocking(onnxruntime::install).await??;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
