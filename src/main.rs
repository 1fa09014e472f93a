use clap::{Parser, Subcommand};

use fhirsync::cli::{check, sync_once};
use fhirsync::telemetry::{self, LogFormat};

/// fhirsync: keeps a Pathling FHIR analytics server in sync with clinical FHIR servers.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator against the cluster in KUBECONFIG (or in-cluster).
    Run(Box<fhirsync::controller::RunArgs>),
    /// Print all CRDs as YAML.
    Crds,
    /// Print the public JWK Set of a private key (PEM or JWK), to register fhirsync with a server
    /// for SMART Backend Services.
    Jwks {
        /// The private key file.
        #[arg(short = 'f', long = "key")]
        key: std::path::PathBuf,
        /// Key id (`kid`), the value of smartBackendServices.keyId.
        #[arg(long)]
        kid: String,
    },
    /// Checks, in seconds, that everything the BulkExportSync in FILE needs answers: the spec, the
    /// source and its $export, credentials, Pathling and its $import, staging. Exit 0 only if all pass.
    Check {
        #[command(flatten)]
        args: check::Args,
    },
    /// One run of the BulkExportSync in FILE, without a cluster.
    SyncOnce {
        #[command(flatten)]
        args: sync_once::Args,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Log level (tracing EnvFilter directive).
        #[arg(long, default_value = "warn")]
        log_level: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Crds => match fhirsync::api::crds_yaml() {
            Ok(y) => {
                print!("{y}");
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Command::Jwks { key, kid } => match std::fs::read(&key)
            .map_err(|e| format!("{}: {e}", key.display()))
            .and_then(|b| fhirsync::auth::keys::parse_private_key(&b))
        {
            Ok(k) => {
                println!("{}", serde_json::to_string_pretty(&k.jwks(&kid)).unwrap_or_default());
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        Command::Check { args } => {
            telemetry::init(LogFormat::Text, "error");
            runtime().block_on(check::run(args))
        }
        Command::SyncOnce { args, log_format, log_level } => {
            telemetry::init(log_format, &log_level);
            runtime().block_on(sync_once::run(args))
        }
        Command::Run(args) => {
            telemetry::init(args.log_format, &args.log_level);
            runtime().block_on(fhirsync::controller::run(*args))
        }
    };
    std::process::exit(code);
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread().max_blocking_threads(8).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}
