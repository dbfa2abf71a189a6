//! The `conclave` binary: `serve` (the default) and `migrate`. Errors end here, as `anyhow`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use conclave::ServeConfig;
use conclave::store::{self, StoreLocation};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "conclave",
    version,
    about = "Real-time collaboration for people and AI agents"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `serve`'s settings, for when no command is given.
    #[command(flatten)]
    serve: ServeConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (the default).
    Serve(ServeConfig),
    /// Apply the store's migrations and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, env = "CONCLAVE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(config)) => serve(config),
        Some(Command::Migrate {
            database_url,
            data_dir,
        }) => migrate(match database_url {
            Some(url) => StoreLocation::Postgres(url),
            None => StoreLocation::Sqlite(data_dir.join("conclave.sqlite3")),
        }),
    }
}

fn serve(config: ServeConfig) -> anyhow::Result<()> {
    actix_web::rt::System::new().block_on(async move {
        let server = conclave::start(config).await?;
        shutdown_signal().await;
        server.shutdown().await;
        Ok(())
    })
}

fn migrate(location: StoreLocation) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let store = store::connect(&location)
                .await
                .context("connecting to the store")?;
            store.migrate().await.context("applying migrations")?;
            println!("migrations applied to the {} store", store.backend());
            Ok(())
        })
}

/// Resolves on SIGTERM or Ctrl-C: the explicit signal that starts a graceful shutdown.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
