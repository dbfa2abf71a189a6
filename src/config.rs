//! Configuration of `conclave serve`: every setting is a flag with an environment variable of
//! the same meaning (DESIGN.md, "Interfaces that are fixed"), checked once at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::Authenticator;
use crate::store::StoreLocation;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "refusing to serve anonymous users on the non-loopback address {0}: set a JWT secret with \
         --jwt-secret (CONCLAVE_JWT_SECRET), or pass --insecure-allow-anonymous to allow it knowingly"
    )]
    AnonymousOnPublicBind(SocketAddr),
    #[error("--anonymous=true needs a loopback bind or --insecure-allow-anonymous")]
    AnonymousNeedsLoopback,
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
}

/// The settings of one node.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// The address to listen on.
    #[arg(long, env = "CONCLAVE_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Where the embedded SQLite store lives.
    #[arg(long, env = "CONCLAVE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// A postgres:// URL selects PostgreSQL; unset, SQLite in the data dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Set: the Redis bus, and this node may join a cluster. Unset: the in-process bus.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// The Redis bus names its channels under this prefix, so clusters can share one Redis.
    #[arg(long, env = "CONCLAVE_BUS_PREFIX", default_value = "conclave")]
    pub bus_prefix: String,

    /// This node's id; a UUIDv7 is generated when unset.
    #[arg(long, env = "CONCLAVE_NODE_ID")]
    pub node_id: Option<String>,

    /// The secret that signs and checks tokens.
    #[arg(long, env = "CONCLAVE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// An RSA public key (PEM) to check RS256 tokens with, instead of the HS256 secret.
    #[arg(long, env = "CONCLAVE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Whether anonymous users are let in. Default: yes while bound to loopback with no secret.
    #[arg(long, env = "CONCLAVE_ANONYMOUS")]
    pub anonymous: Option<bool>,

    /// Allow anonymous access on a non-loopback bind. Only for trusted networks.
    #[arg(long, env = "CONCLAVE_INSECURE_ALLOW_ANONYMOUS")]
    pub insecure_allow_anonymous: bool,

    /// Apply migrations at start-up.
    #[arg(long, env = "CONCLAVE_AUTO_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_migrate: bool,

    #[command(flatten)]
    pub limits: Limits,
}

/// Tuning and limits, each with a documented default (README, "Configuration").
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Group commit: flush a session's batch at this many writes…
    #[arg(long, env = "CONCLAVE_COMMIT_BATCH", default_value_t = 256)]
    pub commit_batch: usize,

    /// …or this many milliseconds after its first write. 0 flushes as soon as the actor has
    /// handled the messages in hand: batches still form behind the one in flight, and across
    /// sessions in the node's group commit, so a wait buys little and costs every write.
    #[arg(long, env = "CONCLAVE_COMMIT_WINDOW_MS", default_value_t = 0)]
    pub commit_window_ms: u64,

    /// Events each live session keeps in memory for fast replay; older ones come from the store.
    #[arg(long, env = "CONCLAVE_EVENT_TAIL", default_value_t = 1024)]
    pub event_tail: usize,

    /// The shortest interval between two presence broadcasts of one session (50 ms: 20/s).
    #[arg(long, env = "CONCLAVE_PRESENCE_INTERVAL_MS", default_value_t = 50)]
    pub presence_interval_ms: u64,

    /// A session with no subscribers flushes and stops after this many seconds.
    #[arg(long, env = "CONCLAVE_IDLE_TIMEOUT_S", default_value_t = 60)]
    pub idle_timeout_s: u64,

    /// The largest frame a client may send.
    #[arg(long, env = "CONCLAVE_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    pub max_frame_bytes: usize,

    /// Bytes queued for one slow client before it is dropped with close code 1013.
    #[arg(long, env = "CONCLAVE_OUTBOUND_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub outbound_queue_bytes: usize,

    /// Compact a document into a snapshot after this many stored updates, once they hold as
    /// many bytes as the snapshot…
    #[arg(long, env = "CONCLAVE_DOC_COMPACT_EVERY", default_value_t = 500)]
    pub doc_compact_every: u64,

    /// …or every this many seconds, if it has any.
    #[arg(long, env = "CONCLAVE_DOC_COMPACT_INTERVAL_S", default_value_t = 30)]
    pub doc_compact_interval_s: u64,

    /// Frames per second one connection may send, on average (a token bucket)…
    #[arg(long, env = "CONCLAVE_RATE_PER_S", default_value_t = 100)]
    pub rate_per_s: u32,

    /// …and in a burst. Past it, frames get `rate_limited`.
    #[arg(long, env = "CONCLAVE_RATE_BURST", default_value_t = 200)]
    pub rate_burst: u32,

    /// Refused frames in a row after which the socket is closed with 1008.
    #[arg(long, env = "CONCLAVE_RATE_ABUSE_STRIKES", default_value_t = 100)]
    pub rate_abuse_strikes: u32,

    /// Sessions one connection may join at once.
    #[arg(long, env = "CONCLAVE_MAX_SESSIONS_PER_CONN", default_value_t = 64)]
    pub max_sessions_per_conn: usize,

    /// Distinct users present in one session at once.
    #[arg(long, env = "CONCLAVE_MAX_MEMBERS", default_value_t = 1000)]
    pub max_members: usize,

    /// The longest document, in UTF-16 code units.
    #[arg(long, env = "CONCLAVE_MAX_DOC_UNITS", default_value_t = 4 << 20)]
    pub max_doc_units: u64,

    /// Sessions live on this node at once.
    #[arg(long, env = "CONCLAVE_MAX_LIVE_SESSIONS", default_value_t = 100_000)]
    pub max_live_sessions: usize,

    /// WebSockets open on this node at once; past it an upgrade is answered 429.
    #[arg(long, env = "CONCLAVE_MAX_SOCKETS", default_value_t = 100_000)]
    pub max_sockets: usize,

    /// Seconds a new socket has to send `hello`.
    #[arg(long, env = "CONCLAVE_HELLO_TIMEOUT_S", default_value_t = 10)]
    pub hello_timeout_s: u64,

    /// Seconds of silence after which a socket is considered dead (pings go out at a third).
    #[arg(long, env = "CONCLAVE_IDLE_SOCKET_TIMEOUT_S", default_value_t = 60)]
    pub socket_timeout_s: u64,

    /// Seconds between a worker's heartbeats; three missed ones end it and lapse its leases.
    #[arg(long, env = "CONCLAVE_WORKER_HEARTBEAT_S", default_value_t = 5)]
    pub worker_heartbeat_s: u64,

    /// Frames per second one worker socket may send on average (twice that in a burst).
    #[arg(long, env = "CONCLAVE_WORKER_RATE_PER_S", default_value_t = 5000)]
    pub worker_rate_per_s: u32,

    /// A retried task's first backoff; it doubles per attempt, with jitter…
    #[arg(long, env = "CONCLAVE_TASK_RETRY_BASE_MS", default_value_t = 500)]
    pub task_retry_base_ms: u64,

    /// …up to this.
    #[arg(long, env = "CONCLAVE_TASK_RETRY_MAX_MS", default_value_t = 60_000)]
    pub task_retry_max_ms: u64,

    /// The largest task output a worker may return, in bytes of JSON.
    #[arg(long, env = "CONCLAVE_MAX_TASK_OUTPUT_BYTES", default_value_t = 256 << 10)]
    pub max_task_output_bytes: usize,

    /// A session owner's lease, renewed every third of it: after its node dies, another node
    /// may take the session over once this has passed.
    #[arg(long, env = "CONCLAVE_OWNER_LEASE_TTL_MS", default_value_t = 10_000)]
    pub owner_lease_ttl_ms: u64,

    /// How often the scheduler looks for lapsed leases and queued tasks it was not woken for.
    #[arg(long, env = "CONCLAVE_TASK_SWEEP_MS", default_value_t = 1000)]
    pub task_sweep_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            commit_batch: 256,
            commit_window_ms: 0,
            event_tail: 1024,
            presence_interval_ms: 50,
            idle_timeout_s: 60,
            max_frame_bytes: 1 << 20,
            outbound_queue_bytes: 4 << 20,
            doc_compact_every: 500,
            doc_compact_interval_s: 30,
            rate_per_s: 100,
            rate_burst: 200,
            rate_abuse_strikes: 100,
            max_sessions_per_conn: 64,
            max_members: 1000,
            max_doc_units: 4 << 20,
            max_live_sessions: 100_000,
            max_sockets: 100_000,
            hello_timeout_s: 10,
            socket_timeout_s: 60,
            worker_heartbeat_s: 5,
            worker_rate_per_s: 5000,
            task_retry_base_ms: 500,
            task_retry_max_ms: 60_000,
            max_task_output_bytes: 256 << 10,
            owner_lease_ttl_ms: 10_000,
            task_sweep_ms: 1000,
        }
    }
}

impl Limits {
    pub fn commit_window(&self) -> Duration {
        Duration::from_millis(self.commit_window_ms)
    }

    pub fn presence_interval(&self) -> Duration {
        Duration::from_millis(self.presence_interval_ms)
    }

    pub fn doc_compact_interval(&self) -> Duration {
        Duration::from_secs(self.doc_compact_interval_s.max(1))
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }

    pub fn owner_lease_ttl(&self) -> Duration {
        Duration::from_millis(self.owner_lease_ttl_ms.max(300))
    }
}

impl ServeConfig {
    /// A configuration with every default, for a node on `bind` storing under `data_dir`.
    pub fn local(bind: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            bind,
            data_dir,
            database_url: None,
            redis_url: None,
            bus_prefix: "conclave".to_owned(),
            node_id: None,
            jwt_secret: None,
            jwt_public_key: None,
            anonymous: None,
            insecure_allow_anonymous: false,
            auto_migrate: true,
            limits: Limits::default(),
        }
    }

    pub fn store_location(&self) -> StoreLocation {
        match &self.database_url {
            Some(url) => StoreLocation::Postgres(url.clone()),
            None => StoreLocation::Sqlite(self.data_dir.join("conclave.sqlite3")),
        }
    }

    /// Checks the settings against each other and builds the authenticator every door uses.
    ///
    /// Secure by default: anonymous users (as `editor`) are admitted only while bound to
    /// loopback, unless `--insecure-allow-anonymous` says otherwise. With a secret or key,
    /// anonymous access is off unless `--anonymous=true` turns it on.
    pub fn authenticator(&self) -> Result<Authenticator, ConfigError> {
        let has_keys = self.jwt_secret.is_some() || self.jwt_public_key.is_some();
        let may_be_anonymous = self.bind.ip().is_loopback() || self.insecure_allow_anonymous;
        let anonymous = match self.anonymous {
            Some(false) => false,
            Some(true) if may_be_anonymous => true,
            Some(true) => return Err(ConfigError::AnonymousNeedsLoopback),
            None if has_keys => false,
            None if may_be_anonymous => true,
            None => return Err(ConfigError::AnonymousOnPublicBind(self.bind)),
        };
        Ok(Authenticator::new(
            self.jwt_secret.as_deref(),
            self.jwt_public_key.as_deref(),
            anonymous,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_bind_without_a_secret_is_refused_with_the_flag_named() {
        let config = ServeConfig::local("0.0.0.0:8080".parse().unwrap(), "d".into());
        let err = config.authenticator().err().unwrap().to_string();
        assert!(err.contains("--insecure-allow-anonymous"), "{err}");
        let mut allowed = config.clone();
        allowed.insecure_allow_anonymous = true;
        assert!(
            allowed
                .authenticator()
                .unwrap()
                .authenticate(None, None)
                .is_ok()
        );
        let mut with_secret = config.clone();
        with_secret.jwt_secret = Some("s".into());
        let auth = with_secret.authenticator().unwrap();
        assert!(auth.authenticate(None, None).is_err());
        let loopback = ServeConfig::local("127.0.0.1:0".parse().unwrap(), "d".into());
        assert!(
            loopback
                .authenticator()
                .unwrap()
                .authenticate(None, None)
                .is_ok()
        );
    }
}
