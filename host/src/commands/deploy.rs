//! `switchyard deploy`: asks the `switchyard run` of a manifest, through its admin socket, to
//! deploy the manifest again, and prints what changed.

use std::path::PathBuf;
use std::process::ExitCode;

use switchyard_runtime::admin;

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The manifest the host was started with, edited.
    pub manifest: PathBuf,
    /// The socket the host listens at, when it was started with --admin-socket.
    #[arg(long, env = "SWITCHYARD_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
}

pub async fn run(args: DeployArgs) -> anyhow::Result<ExitCode> {
    deploy(&args.manifest, args.admin_socket).await
}

/// `switchyard deploy`: asks the host running `manifest` to deploy it again, and prints what
/// changed.
async fn deploy(manifest: &std::path::Path, socket: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let socket = match socket {
        Some(socket) => socket,
        None => {
            let socket = admin::default_socket(manifest)?;
            admin::check_default_dir(&socket)?;
            socket
        }
    };
    let request = admin::Request::Deploy {
        manifest: admin::absolute_manifest(manifest)?,
    };
    eprintln!(
        "deploying {} (checking and compiling what changed)…",
        manifest.display()
    );
    match admin::request(&socket, &request).await? {
        admin::Response::Deployed(report) => {
            for change in &report.changes {
                println!("{change}");
            }
            Ok(ExitCode::SUCCESS)
        }
        admin::Response::Failed { error } => {
            eprintln!("error: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}
