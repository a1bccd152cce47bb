//! The `keelson` binary: `run` (the operator), `crds` (the CRDs from the types) and `router` (the A/B router).

mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keelson_operator::operator::RunOptions;
use telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "keelson",
    version,
    about = "Notebooks, distributed training and A/B model serving on Kubernetes"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "KEELSON_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator: the Notebook, TrainingJob and ModelDeployment controllers.
    Run(RunOptions),
    /// Print the CRDs generated from the Rust types (or write one file per kind with --out).
    Crds {
        /// Directory to write `<plural>.yaml` files into, instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the A/B traffic router of a ModelDeployment (`traffic.router: Builtin`).
    Router(keelson_router::RouterOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { out } => crds(out),
        Command::Router(opts) => {
            telemetry::init(cli.log_format);
            keelson_router::run(opts)
        }
        Command::Run(opts) => {
            telemetry::init(cli.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("keelson: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(run(opts))
        }
    }
}

fn crds(out: Option<PathBuf>) -> ExitCode {
    let result = match out {
        None => keelson_api::crd::all_yaml()
            .map(|y| print!("{y}"))
            .map_err(|e| e.to_string()),
        Some(dir) => keelson_api::crd::all().iter().try_for_each(|(file, crd)| {
            let yaml = keelson_api::crd::to_yaml(crd).map_err(|e| e.to_string())?;
            std::fs::write(dir.join(file), yaml)
                .map_err(|e| format!("{}: {e}", dir.join(file).display()))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelson crds: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: RunOptions) -> ExitCode {
    match keelson_operator::operator::serve(opts).await {
        Ok(keelson_operator::operator::Exit::Stopped) => {
            tracing::info!("keelson operator stopped");
            ExitCode::SUCCESS
        }
        Ok(keelson_operator::operator::Exit::LostLease) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!(error = %e, "keelson operator failed");
            ExitCode::FAILURE
        }
    }
}
