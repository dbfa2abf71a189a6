//! The `conclave` binary: `serve` (the default), `migrate`, `token`, `worker` and `load`.
//! Errors end here, as `anyhow`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use conclave::ServeConfig;
use conclave::auth::{Authenticator, Claims};
use conclave::protocol::Role;
use conclave::store::{self, StoreLocation};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's allocator. A wave of joins writes a broadcast to every member
/// and frees it; glibc kept those pages in its arenas, between the long-lived state of the
/// sockets that joined, so a node's idle memory per socket grew with the size of its sessions
/// (4.8–5.5 KiB a socket at 19,000 sockets in 100 sessions against 3.7 KiB at 5,000; 3.4–3.5
/// KiB at both with jemalloc). Throughput was unchanged and tail latency lower in A/B runs.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start-up from this symbol (a C `const char *`); the
/// `_RJEM_MALLOC_CONF` environment variable overrides them. Freed pages go back to the kernel
/// after a second (`dirty_decay_ms`), purged by jemalloc's own thread, and at once rather than
/// lazily (`muzzy_decay_ms:0`): lazily freed pages (`MADV_FREE`) still count as resident until
/// the kernel runs short, which reads as a leak to anyone watching the node's memory.
#[cfg(all(unix, not(target_env = "musl")))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static ALLOCATOR_OPTIONS: AllocatorOptions =
    AllocatorOptions(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer that may sit in a `static`.
#[cfg(all(unix, not(target_env = "musl")))]
#[repr(transparent)]
struct AllocatorOptions(*const std::ffi::c_char);

// SAFETY: the pointer is to a string literal, which lives for the whole program and is never
// written.
#[cfg(all(unix, not(target_env = "musl")))]
unsafe impl Sync for AllocatorOptions {}

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
    Serve(Box<ServeConfig>),
    /// Apply the store's migrations and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, env = "CONCLAVE_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Print a JWT signed with the configured secret, on the last line.
    Token {
        /// The user (or worker) id: the `sub` claim.
        #[arg(long)]
        sub: String,
        /// viewer, editor, agent or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Session ids or prefixes ending in `*`, comma-separated. Omitted: every session.
        #[arg(long, value_delimiter = ',')]
        sessions: Option<Vec<String>>,
        /// How long the token is valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The display name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, env = "CONCLAVE_JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
    },
    /// Run a program as a worker: each task's input on its stdin, its stdout the output.
    Worker(conclave::worker_client::WorkerArgs),
    /// Generate load against a server on loopback: native, yjs, tasks or idle.
    Load(conclave::load::LoadArgs),
}

fn parse_role(raw: &str) -> Result<Role, String> {
    serde_json::from_value(serde_json::Value::String(raw.to_owned()))
        .map_err(|_| format!("unknown role {raw:?}: use viewer, editor, agent or admin"))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(config)) => serve(*config),
        Some(Command::Migrate {
            database_url,
            data_dir,
        }) => migrate(match database_url {
            Some(url) => StoreLocation::Postgres(url),
            None => StoreLocation::Sqlite(data_dir.join("conclave.sqlite3")),
        }),
        Some(Command::Token {
            sub,
            role,
            sessions,
            ttl,
            name,
            jwt_secret,
        }) => {
            let auth = Authenticator::new(Some(&jwt_secret), None, false)?;
            let exp = chrono::Utc::now().timestamp().max(0) as u64 + ttl.as_secs();
            let claims = Claims {
                sub,
                name,
                role,
                sessions,
                exp,
            };
            println!("{}", auth.issue(&claims)?);
            Ok(())
        }
        Some(Command::Worker(args)) => worker(args),
        Some(Command::Load(args)) => Ok(conclave::load::run(args)?),
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

/// The worker runs until SIGTERM or Ctrl-C, then drains. One thread is plenty: the work happens
/// in the child processes.
fn worker(args: conclave::worker_client::WorkerArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(conclave::worker_client::run(args, shutdown_signal()))?;
    Ok(())
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
