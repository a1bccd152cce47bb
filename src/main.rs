//! The `keelson` binary: `run` (the operator), `crds` (the CRDs from the types) and `router` (the A/B router).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keelson::operator::{run_controllers, shutdown_channel, termination, RunOptions};
use keelson::telemetry::{self, LogFormat};

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
    Router(keelson::router::RouterOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { out } => crds(out),
        Command::Router(opts) => {
            telemetry::init(cli.log_format);
            keelson::router::run(opts)
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
        None => keelson::crd::all_yaml()
            .map(|y| print!("{y}"))
            .map_err(|e| e.to_string()),
        Some(dir) => keelson::crd::all().iter().try_for_each(|(file, crd)| {
            let yaml = keelson::crd::to_yaml(crd).map_err(|e| e.to_string())?;
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
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API (check KUBECONFIG or the in-cluster service account)");
            return ExitCode::FAILURE;
        }
    };
    let (stop, shutdown) = shutdown_channel();
    tokio::spawn(async move {
        termination().await;
        tracing::info!("shutting down: finishing in-flight reconciles");
        let _ = stop.send(true);
    });
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !opts.health_addr.is_empty() {
        match tokio::net::TcpListener::bind(&opts.health_addr).await {
            Ok(l) => {
                tokio::spawn(keelson::health::serve(l, ready.clone()));
            }
            Err(e) => {
                tracing::error!(error = %e, addr = %opts.health_addr, "cannot listen for health probes");
                return ExitCode::FAILURE;
            }
        }
    }
    // Ready once the API server answers; the controllers then list their caches before reconciling.
    match client.apiserver_version().await {
        Ok(v) => tracing::info!(server = %v.git_version, "keelson operator starting"),
        Err(e) => {
            tracing::error!(error = %e, "the Kubernetes API does not answer");
            return ExitCode::FAILURE;
        }
    }
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    run_controllers(client, &opts, shutdown).await;
    tracing::info!("keelson operator stopped");
    ExitCode::SUCCESS
}
