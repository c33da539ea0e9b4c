//! `switchyard report`: a run's numbers from the results store, and its page with plots.

use std::path::PathBuf;
use std::process::ExitCode;

use switchyard_pipeline::report::RunReport;
use switchyard_runtime::results::{Results, ResultsConfig};

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The results store: a SQLite file (PATH or sqlite:PATH) or
    /// postgres://USER@HOST/DATABASE (default: the demo's, results.sqlite3 in
    /// $XDG_DATA_HOME/switchyard, else ~/.local/share/switchyard).
    #[arg(env = "SWITCHYARD_RESULTS", value_name = "RESULTS")]
    pub results: Option<String>,
    /// The run (the demo's summary names it; default: the latest).
    #[arg(long, value_name = "ID")]
    pub run: Option<String>,
    /// Write report.html (the plots inline) and the plots as SVG files into this directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub async fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let ReportArgs { results, run, out } = args;
    let config = match results {
        Some(url) => ResultsConfig::from_url(&url)?,
        None => ResultsConfig::default_store(),
    };
    if let ResultsConfig::Sqlite { path } = &config
        && !path.is_file()
    {
        anyhow::bail!(
            "no results store at {}: run `switchyard demo` first, or name the store \
             (a SQLite file or postgres://…)",
            path.display()
        );
    }
    let store = Results::open(&config, &switchyard_pipeline::predictions::tables()).await?;
    let report = RunReport::read(&store, run.as_deref()).await?;
    print!("{}", report.to_text());
    if let Some(dir) = out {
        let page = report.write(&dir)?;
        println!("\nreport: {}", page.display());
    }
    Ok(ExitCode::SUCCESS)
}
