//! Starting and stopping a node: the store, the session arbiters, the HTTP server, and the
//! graceful shutdown that drains every session before the process exits.
//!
//! Shutdown is an explicit call, [`RunningServer::shutdown`], made by the binary on SIGTERM or
//! Ctrl-C and by tests directly: stop accepting, flush every session, then stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::{Arbiter, ArbiterHandle};
use actix_http::HttpService;
use actix_service::{fn_service, map_config};
use actix_web::App;
use actix_web::dev::AppConfig;

use crate::cluster::{LocalBus, RedisBus, SharedBus};
use crate::config::{ConfigError, ServeConfig};
use crate::council::Councils;
use crate::node::Node;
use crate::session::{Drain, SessionDeps, SessionRegistry};
use crate::store::{self, GroupCommit, SharedStore, StoreError};
use crate::tasks::{SchedulerConfig, SchedulerHandle};

/// How long shutdown waits for sockets to send their close frames: a client that does not
/// read is cut after this.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long shutdown waits for sessions to flush their last batch.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for the store's last queries.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the kernel queues before they are accepted: a load test opens thousands at once.
const ACCEPT_BACKLOG: u32 = 2048;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the Redis bus at --redis-url: {0}")]
    Bus(#[from] crate::cluster::BusError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A node that is serving.
pub struct RunningServer {
    node: Arc<Node>,
    addr: SocketAddr,
    http: actix_server::ServerHandle,
    arbiters: Vec<Arbiter>,
}

/// Starts a node from its configuration. Must run inside an actix `System`.
pub async fn start(config: ServeConfig) -> Result<RunningServer, ServerError> {
    config.authenticator()?;
    let store = store::connect(&config.store_location()).await?;
    start_with_store(config, store).await
}

/// Starts a node on a store built by the caller: tests wrap the real store to inject faults.
pub async fn start_with_store(
    config: ServeConfig,
    store: SharedStore,
) -> Result<RunningServer, ServerError> {
    let auth = config.authenticator()?;
    crate::telemetry::install();
    if config.auto_migrate {
        store.migrate().await?;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arbiters: Vec<Arbiter> = (0..cores).map(|_| Arbiter::new()).collect();
    let handles: Vec<ArbiterHandle> = arbiters.iter().map(Arbiter::handle).collect();
    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let bus: SharedBus = match &config.redis_url {
        Some(url) => RedisBus::connect(url, &config.bus_prefix).await?,
        None => LocalBus::new(),
    };
    let registry = SessionRegistry::new(
        SessionDeps {
            store: store.clone(),
            commits: GroupCommit::start(store.clone()),
            limits: config.limits.clone(),
            node: node_id.clone(),
            bus: bus.clone(),
        },
        handles,
    );
    actix::spawn(SessionRegistry::keep_leases(Arc::downgrade(&registry)));
    let limits = &config.limits;
    let scheduler_config = SchedulerConfig {
        node: node_id.clone(),
        heartbeat: Duration::from_secs(limits.worker_heartbeat_s.max(1)),
        retry_base: Duration::from_millis(limits.task_retry_base_ms),
        retry_max: Duration::from_millis(limits.task_retry_max_ms),
        max_output_bytes: limits.max_task_output_bytes,
        sweep_every: Duration::from_millis(limits.task_sweep_ms.max(10)),
        bus: bus.clone(),
    };
    // The scheduler and the councils get an arbiter of their own, so a burst of session work
    // never delays an assignment (and the reverse).
    let scheduler_arbiter = Arbiter::new();
    let scheduler = SchedulerHandle::start(
        scheduler_arbiter.handle(),
        store.clone(),
        registry.clone(),
        scheduler_config,
    );
    let councils = Councils::new(
        scheduler_arbiter.handle(),
        store.clone(),
        scheduler.clone(),
        registry.clone(),
    );
    let resumed = councils.resume_all().await?;
    if resumed > 0 {
        tracing::info!(resumed, "resumed open councils");
    }
    let mut arbiters = arbiters;
    arbiters.push(scheduler_arbiter);
    let node = Arc::new(Node {
        id: node_id,
        store,
        registry,
        auth,
        limits: config.limits.clone(),
        scheduler,
        councils,
        bus,
        sockets: crate::node::OpenSockets::default(),
        stopping: crate::node::Stopping::default(),
    });

    let bind_error = |source| ServerError::Bind {
        addr: config.bind,
        source,
    };
    let listener = listen(config.bind).map_err(bind_error)?;
    let addr = listener.local_addr().unwrap_or(config.bind);
    let app_node = node.clone();
    // actix-web's `HttpServer` cannot hand upgrades to a service of their own, so the HTTP
    // service is assembled here: the app for requests, `http::upgrade` for WebSockets.
    let server = actix_server::Server::build()
        .workers(cores)
        .disable_signals()
        .shutdown_timeout(1)
        .listen("conclave", listener, move || {
            let app = App::new().configure(crate::http::configure(app_node.clone()));
            let upgrade_node = app_node.clone();
            HttpService::build()
                // Acks and broadcasts are small frames that must leave at once; with Nagle on,
                // an ack written after another frame waits for the client's delayed ACK.
                .tcp_nodelay(true)
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .upgrade(fn_service(move |(req, connection)| {
                    crate::http::upgrade::serve(upgrade_node.clone(), req, connection)
                }))
                .finish(map_config(app, |()| AppConfig::default()))
                .tcp()
        })
        .map_err(bind_error)?;
    let server = server.run();
    let http = server.handle();
    actix::spawn(async move {
        if let Err(err) = server.await {
            tracing::error!(%err, "http server failed");
        }
    });
    tracing::info!(%addr, node = %node.id, store = node.store.backend(), "conclave is serving");
    Ok(RunningServer {
        node,
        addr,
        http,
        arbiters,
    })
}

/// Binds the listening socket, reusing an address in TIME_WAIT as actix-web does.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)?.into_std()
}

impl RunningServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Waits until every live session has committed what it accepted.
    async fn drain_sessions(&self) {
        let drains = self
            .node
            .registry
            .all_live()
            .into_iter()
            .map(|addr| async move {
                let _ = addr.send(Drain).await;
            });
        if tokio::time::timeout(DRAIN_TIMEOUT, futures_util::future::join_all(drains))
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not flush within {DRAIN_TIMEOUT:?}");
        }
    }

    /// Tells every socket the node is stopping and waits, for at most [`CLOSE_TIMEOUT`], until
    /// each has sent its close frame and ended.
    async fn close_sockets(&self) {
        self.node.stopping.begin();
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        while self.node.sockets.open_now() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.node.sockets.open_now();
        if left > 0 {
            tracing::warn!(
                left,
                "some sockets had not closed within {CLOSE_TIMEOUT:?}; cutting them"
            );
        }
    }

    /// Stops accepting connections, flushes every session, closes every socket with 1001, then
    /// stops the server.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new connections; flushing sessions");
        self.http.pause().await;
        self.drain_sessions().await;
        // After the drain, so each client's acks are queued ahead of its close frame.
        self.close_sockets().await;
        self.http.stop(false).await;
        // Closing the sockets made members leave; commit those events too before the session
        // arbiters (and any commit still in flight on them) go away.
        self.drain_sessions().await;
        self.node.registry.begin_shutdown();
        // Every session is committed: let other nodes take them over now rather than after
        // the leases run out.
        self.node.registry.release_all().await;
        self.node.scheduler.begin_shutdown();
        self.node.councils.begin_shutdown();
        // A socket cut after `CLOSE_TIMEOUT` leaves its session now, and that commit may still
        // be running: wait for it before the runtimes that hold it are dropped.
        if tokio::time::timeout(STORE_CLOSE_TIMEOUT, self.node.store.close())
            .await
            .is_err()
        {
            tracing::warn!("store work still running after {STORE_CLOSE_TIMEOUT:?}; cutting it");
        }
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        tracing::info!("shutdown complete");
    }
}
